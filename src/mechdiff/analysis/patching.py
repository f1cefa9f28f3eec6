"""Patched forward passes at the decision token and KL sweeps (raw cross-patch, mapped patch, layer patch).

A patch replaces one site's activation at each prompt's decision token with a given vector and reads the
model's next-token logits at that same position; the KL is ``KL(p_patched || p_ref)`` against the unpatched
reference logits (docs/ALGORITHMS.md, sections 9 and 11). The vectors always come from the caller (the activation
store and a transport map): this module never re-runs the source model. It also holds the two experiments built
on patching: the RQ1 layer patch (`layer_patch_direction`, recolour statistics from train rows only) and the
rank x alpha sweep of a transport map (`rank_alpha_sweep`, `summarise_sweep`, `min_k`).

Fast path (``prefix_cache=True``, the default): the logits at decision position p depend only on tokens
0..p, and a patch at position p leaves positions < p untouched in every layer. So the model runs once per
prompt over its prefix (tokens < p), keeping the key/value cache, and every configuration (rank x alpha, or
layer) is then a one-token forward of the decision token on top of that cache, many configurations and prompts
per batch. Prefixes of different lengths share a batch through right padding: padded cache slots are masked
out and the decision token gets its true position id, so rotary embeddings are exact. The first batch checks
itself against an ordinary full forward; on a mismatch or an unsupported cache the code falls back to full
forwards (``prefix_cache=False``), which pack several configurations of the same prompts into one batch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff.analysis.transport import TransportMap, rank_value, recolour, recolour_stats
from mechdiff.errors import MechdiffError
from mechdiff.model.cache import (
    UnknownCacheLayout,
    cache_check,
    cache_kv,
    empty_cache,
    fits_window,
    prefilled_cache,
    sliding_window,
)
from mechdiff.model.sites import (
    Heads,
    Site,
    find_blocks,
    get_body,
    head_logits,
    keep_block_outputs,
    model_width,
    replace_at,
    reuse_blocks,
    site_module,
)
from mechdiff.model.tokens import Encoded, right_pad
from mechdiff.stats.bootstrap import drop_pct_ci, mean_ci
from mechdiff.stats.kl import allowed_index, kl_divergence, token_ids

Job = tuple[Site, "torch.Tensor | None"]
Reducer = Callable[[int, np.ndarray, torch.Tensor], None]


# --------------------------------------------------------------------------------------------- helpers


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _rows(enc: Encoded, rows: Any) -> np.ndarray:
    if not isinstance(enc, Encoded):
        raise MechdiffError(f"enc must be a mechdiff.model.tokens.Encoded, got {type(enc).__name__}")
    r = np.asarray(rows, dtype=np.int64).ravel()
    if r.size == 0:
        raise MechdiffError("no prompts to patch: the row selection is empty")
    if r.min() < 0 or r.max() >= len(enc):
        raise MechdiffError(f"prompt rows out of range: the encoded corpus has {len(enc)} prompts")
    return r


def _vectors(v: Any, n: int, d: int, what: str) -> torch.Tensor:
    if hasattr(v, "detach"):
        v = v.detach().cpu().float().numpy()
    a = np.asarray(v, dtype=np.float32)
    if a.shape != (n, d):
        raise MechdiffError(f"{what}: patch vectors must have shape ({n}, {d}) (prompts x width), got {a.shape}")
    if not np.isfinite(a).all():
        raise MechdiffError(f"{what}: patch vectors contain NaN or inf")
    return torch.from_numpy(a)


def _ref(ref_logits: Any, n: int) -> np.ndarray:
    if hasattr(ref_logits, "detach"):
        ref_logits = ref_logits.detach().cpu().float().numpy()
    r = np.asarray(ref_logits)
    if r.ndim != 2 or r.shape[0] != n:
        raise MechdiffError(f"ref_logits must be (prompts, vocab) with {n} rows, got shape {r.shape}")
    return r


@contextlib.contextmanager
def _patched(model: nn.Module, plan: dict[Site, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Within the block, one batch's plan (`_plan`) is in place: `replace_at` of its vectors at its rows and
    positions, for every site in it."""
    with contextlib.ExitStack() as stack:
        for site, (rows, pos, vec) in plan.items():
            stack.enter_context(replace_at(model, site, pos, vec, rows=rows))
        yield


def _plan(sites_of_rows: list[Site | None], vecs: list[torch.Tensor | None], pos: torch.Tensor):
    """Group batch rows by site: {site: (row idx, positions, vectors)}."""
    plan: dict[Site, tuple[list[int], list[torch.Tensor]]] = {}
    for i, (s, v) in enumerate(zip(sites_of_rows, vecs)):
        if s is None or v is None:
            continue
        plan.setdefault(s, ([], []))
        plan[s][0].append(i)
        plan[s][1].append(v)
    out = {}
    for s, (ri, vs) in plan.items():
        idx = torch.tensor(ri, dtype=torch.long)
        out[s] = (idx, pos[idx], torch.stack(vs))
    return out


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled)


# --------------------------------------------------------------------------------------------- engines


def _hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def _run_full(model, enc, rows, jobs, reduce, *, batch_size, device, progress) -> None:
    """Full forwards: each batch row is one (prompt, job) pair, prompts grouped by length."""
    body, pad = get_body(model), enc.pad
    order = np.argsort(np.array([len(enc.ids[r]) for r in rows]), kind="stable")
    pairs = [(int(i), j) for i in order for j in range(len(jobs))]
    bar = _progress(len(pairs), progress, "patch")
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        seqs = [enc.ids[rows[i]][: enc.decision[rows[i]] + 1] for i, _ in chunk]
        ids, mask = right_pad(seqs, pad, device)
        pos = torch.tensor([len(q) - 1 for q in seqs], dtype=torch.long)
        vecs = [None if jobs[j][1] is None else jobs[j][1][i] for i, j in chunk]
        with _patched(model, _plan([jobs[j][0] for _, j in chunk], vecs, pos)):
            hidden = _hidden(body(input_ids=ids, attention_mask=mask, use_cache=False))
        logits = head_logits(model, hidden[torch.arange(len(chunk), device=hidden.device), pos.to(hidden.device)])
        _emit(chunk, logits, reduce)
        bar.update(len(chunk))
    bar.close()


def _emit(chunk: list[tuple[int, int]], logits: torch.Tensor, reduce: Reducer) -> None:
    by_job: dict[int, list[int]] = {}
    for b, (_, j) in enumerate(chunk):
        by_job.setdefault(j, []).append(b)
    for j, bs in by_job.items():
        reduce(j, np.array([chunk[b][0] for b in bs], dtype=np.int64), logits[bs])


class _NoPrefixCache(Exception):
    """The model does not support the prefix-cache path (or it failed its self-check)."""


def _new_cache(model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], sel: torch.Tensor | None, P: int,
               upto: int = 0):
    """A cache of the first P slots of batch rows `sel` (None = all rows) of `kv`, the prefix forward's keys and
    values (P + 1 slots: slot P, the longest rows' decision token, is free and takes the decoded token in place).

    Every layer is filled, also those whose blocks will be reused (the model sizes its attention masks from the
    cache of its first full-attention or sliding layer, whichever that is); those below `upto` belong to reused
    blocks, which never read them: they get a broadcast view of the right shape. With `sel` None nothing is
    copied; else each running layer's rows are gathered once."""
    n = len(sel) if sel is not None else kv[0][0].shape[0]
    rows = []
    for li, (k, v) in enumerate(kv):
        if li < upto and sel is not None:
            rows.append((k[:1, :, :P].expand(n, -1, -1, -1), v[:1, :, :P].expand(n, -1, -1, -1)))
        elif sel is None:
            rows.append((k, v))
        else:
            rows.append((k.index_select(0, sel), v.index_select(0, sel)))
    return prefilled_cache(model, rows, P)


def _first_changed_block(site: Site | None, n_blocks: int) -> int:
    """Index of the first decoder block whose output a patch at `site` can change (blocks before it are reused)."""
    if site is None:
        return n_blocks
    return site.layer + 1 if site.kind == "resid_post" else site.layer


def _rows_of(out: Any, sel: torch.Tensor) -> Any:
    """Batch rows `sel` of a kept block output (a tensor, or a tuple whose first item is the hidden state)."""
    if isinstance(out, torch.Tensor):
        return out[sel]
    return type(out)((out[0][sel], *out[1:]))


def _decode(model: nn.Module, body: nn.Module, ctx: tuple, bsel: torch.Tensor, plan: dict, upto: int = 0,
            kept: list | None = None) -> torch.Tensor:
    """Logits of a one-token forward of the decision tokens of batch rows `bsel` on their prefix cache.

    ctx = (kv, tok, p, P): the batch's prefix keys/values, decision tokens, decision positions and longest
    prefix. Blocks 0..upto-1 return their `kept` outputs (rows `bsel`) instead of running.
    """
    kv, tok, p, P = ctx
    pb = p[bsel]
    slot = torch.arange(P + 1, device=p.device)
    amask = ((slot[None, :] < pb[:, None]) | (slot[None, :] == P)).long()
    every = len(bsel) == len(p) and bool((bsel == torch.arange(len(p), device=p.device)).all())
    past = _new_cache(model, kv, None if every else bsel, P, upto) if P > 0 else None
    reuse = reuse_blocks(model, [_rows_of(kept[i], bsel) for i in range(upto)], upto) if upto else \
        contextlib.nullcontext()
    with reuse, _patched(model, plan):
        o = body(input_ids=tok[bsel][:, None], attention_mask=amask if P > 0 else None,
                 position_ids=pb[:, None], cache=past, use_cache=True)
    return head_logits(model, _hidden(o)[:, -1])


@torch.no_grad()
def _run_prefix(model, enc, rows, jobs, reduce, *, batch_size, decode_batch, device, progress) -> None:
    """Prefix-cache path: one prefix forward per prompt, one-token forwards per (prompt, job).

    Per batch of prompts, one unpatched one-token forward keeps every block's output at the decision token;
    the jobs are then decoded grouped by the first block their site can change, and the blocks before it
    return their kept outputs (`sites.reuse_blocks`) instead of running: exact, since nothing before them
    differs, and the RQ1 layer patch (one job per layer) skips about half of the model's blocks.
    """
    body, pad = get_body(model), enc.pad
    nb = len(find_blocks(model))
    dec = np.array([enc.decision[r] for r in rows], dtype=np.int64)
    order = np.argsort(dec, kind="stable")
    first = [_first_changed_block(s if v is not None else None, nb) for s, v in jobs]
    job_order = sorted(range(len(jobs)), key=lambda j: (jobs[j][1] is not None, first[j]))  # unpatched first
    if len(dec) and not fits_window(model, int(dec.max()) + 1):
        raise _NoPrefixCache(f"its sliding attention window ({sliding_window(model)} tokens) does not hold the "
                             f"longest prompt ({int(dec.max()) + 1} tokens) with two slots to spare")
    bar = _progress(len(rows) * len(jobs), progress, "patch")
    for s in range(0, len(order), batch_size):
        pidx = order[s : s + batch_size]
        seqs = [enc.ids[rows[i]][: dec[i] + 1] for i in pidx]
        ids, mask = right_pad(seqs, pad, device)
        p = torch.tensor(dec[pidx], dtype=torch.long, device=device)
        P = int(p.max())
        cache = empty_cache(model)
        out = body(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        kv = cache_kv(getattr(out, "cache", None) or cache)
        if any(k.shape[-2] != ids.shape[1] for k, _ in kv):
            raise _NoPrefixCache(f"its cache keeps {min(k.shape[-2] for k, _ in kv)} of a batch's {ids.shape[1]} "
                                 "positions")
        ar = torch.arange(len(pidx), device=device)
        tok = ids[ar, p]
        ctx = (kv, tok, p, P)
        kept: list = []
        with keep_block_outputs(model, kept):
            base = _decode(model, body, ctx, ar, {})
        # every batch's unpatched decode against its own full forward (both are needed anyway): a batch the
        # cache path gets wrong sends the whole run to full forwards
        err, tol = cache_check(base, head_logits(model, _hidden(out)[ar, p]), _hidden(out).dtype)
        if not err <= tol:
            raise _NoPrefixCache(f"prefix-cache logits differ from a full forward by {err:.3g} (relative; "
                                 f"allowed {tol:.3g})")
        chunks: list[list[tuple[int, int]]] = []  # at most decode_batch pairs, one first-changed block each
        for j in job_order:
            for b in range(len(pidx)):
                if not chunks or len(chunks[-1]) >= decode_batch or first[chunks[-1][0][1]] != first[j]:
                    chunks.append([])
                chunks[-1].append((b, j))
        for chunk in chunks:
            bsel = torch.tensor([b for b, _ in chunk], dtype=torch.long, device=device)
            pos0 = torch.zeros(len(chunk), dtype=torch.long)
            vecs = [None if jobs[j][1] is None else jobs[j][1][pidx[b]] for b, j in chunk]
            upto = min(first[j] for _, j in chunk)
            logits = _decode(model, body, ctx, bsel, _plan([jobs[j][0] for _, j in chunk], vecs, pos0), upto, kept)
            _emit([(int(pidx[b]), j) for b, j in chunk], logits, reduce)
            bar.update(len(chunk))
    bar.close()


def _run(model: nn.Module, enc: Encoded, rows: np.ndarray, jobs: list[Job], reduce: Reducer, *, batch_size: int,
         device: torch.device, progress: bool, prefix_cache: bool, decode_batch: int | None = None) -> None:
    if batch_size < 1:
        raise MechdiffError(f"batch_size must be >= 1, got {batch_size}")
    if prefix_cache:
        # reductions are idempotent per (job, prompt), so a fallback may simply redo everything
        try:
            _run_prefix(model, enc, rows, jobs, reduce, batch_size=batch_size,
                        decode_batch=decode_batch or 8 * batch_size, device=device, progress=progress)
        except (_NoPrefixCache, UnknownCacheLayout, TypeError, AttributeError, ValueError, RuntimeError, NotImplementedError) as exc:
            warnings.warn(f"prefix-cache patching unavailable for {type(model).__name__} ({exc}); using full "
                          "forwards", RuntimeWarning, stacklevel=3)
        else:
            return
    _run_full(model, enc, rows, jobs, reduce, batch_size=batch_size, device=device, progress=progress)


# --------------------------------------------------------------------------------------------- public API


def patched_logits(
    model: nn.Module, enc: Encoded, rows: Any, site: Site, vectors: Any | None, *, batch_size: int = 16,
    device: str | torch.device | None = None, prefix_cache: bool = True, progress: bool = False,
) -> np.ndarray:
    """(len(rows), V) float32 decision-token logits with the site's decision activation set to vectors (None = unpatched)."""
    r = _rows(enc, rows)
    dev = _model_device(model, device)
    vec = None if vectors is None else _vectors(vectors, len(r), model_width_of(model, site), site.name)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    _run(model, enc, r, [(site, vec)], lambda _j, i, lg: out.append((i, lg.float().cpu().numpy())),
         batch_size=batch_size, device=dev, progress=progress, prefix_cache=prefix_cache)
    V = out[0][1].shape[1]
    res = np.empty((len(r), V), dtype=np.float32)
    for i, lg in out:
        res[i] = lg
    return res


def model_width_of(model: nn.Module, site: Site) -> int:
    """Width of the activation at a site (the residual width for every supported kind)."""
    site_module(model, site)  # validates the layer
    return model_width(model)


@dataclass
class Sweep:
    """`sweep_patch`'s result: per configuration the per-prompt KL and, with targets, whether the patched
    decision is the target; per prompt whether the unpatched one is (None without targets)."""

    kl: dict[str, np.ndarray]
    hits: dict[str, np.ndarray] | None
    agree: np.ndarray | None


def sweep_kl(
    model: nn.Module, enc: Encoded, rows: Any, site: Site | Sequence[Site], configs: Mapping[str, Any],
    ref_logits: Any, *, allowed: Any = None, batch_size: int = 16, progress: bool = True,
    device: str | torch.device | None = None, prefix_cache: bool = True, decode_batch: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-prompt KL(p_patched || p_ref) for many patch configurations {name: (len(rows), d) vectors}.

    `site` is one Site for all configurations, or one Site per configuration (in the order of `configs`).
    `ref_logits` None takes the reference from the same engine: the unpatched logits of the same one-token
    forwards (saves the separate full forwards of `reference_logits`; equal to them up to float rounding).
    """
    return sweep_patch(model, enc, rows, site, configs, ref_logits, allowed=allowed, batch_size=batch_size,
                       progress=progress, device=device, prefix_cache=prefix_cache, decode_batch=decode_batch).kl


def sweep_patch(
    model: nn.Module, enc: Encoded, rows: Any, site: Site | Sequence[Site], configs: Mapping[str, Any],
    ref_logits: Any, *, allowed: Any = None, targets: Any = None, batch_size: int = 16, progress: bool = True,
    device: str | torch.device | None = None, prefix_cache: bool = True, decode_batch: int | None = None,
) -> Sweep:
    """`sweep_kl`'s KL and, with `targets` (one token id of the model's vocabulary per row), whether each
    patched decision, the argmax of the next-token logits over `allowed`, is that token (per prompt, bool), and
    whether the unpatched decision of the same reference already was."""
    r = _rows(enc, rows)
    if not configs:
        raise MechdiffError("no patch configurations given: nothing to sweep")
    names = list(configs)
    sites = [site] * len(names) if isinstance(site, Site) else list(site)
    if len(sites) != len(names) or not all(isinstance(s, Site) for s in sites):
        raise MechdiffError("site must be one Site or a list of Sites, one per configuration")
    own = ref_logits is None
    ref = None if own else _ref(ref_logits, len(r))
    V = int(getattr(model.get_output_embeddings(), "out_features", 0) or 0) if own else ref.shape[1]
    allow = allowed_index(allowed, V) if V else (None if allowed is None else np.asarray(allowed))
    jobs: list[Job] = [
        (s, None if configs[nm] is None else _vectors(configs[nm], len(r), model_width_of(model, s), nm))
        for s, nm in zip(sites, names)
    ]
    if own:
        jobs.insert(0, (sites[0], None))
    res = {nm: np.full(len(r), np.nan) for nm in names}
    tgt = None if targets is None else np.asarray(targets, dtype=np.int64).ravel()
    if tgt is not None and tgt.shape[0] != len(r):
        raise MechdiffError(f"targets has {tgt.shape[0]} entries for {len(r)} rows: give one token id per row")
    hits = None if tgt is None else {nm: np.zeros(len(r), dtype=bool) for nm in names}
    own_ref: dict[int, torch.Tensor] = {}
    pending: list[tuple[int, np.ndarray, torch.Tensor]] = []

    def kl(j: int, i: np.ndarray, lg: torch.Tensor) -> None:
        q = (torch.stack([own_ref[int(k)] for k in i]) if own
             else torch.from_numpy(np.asarray(ref[i], dtype=np.float32)).to(lg.device))
        if lg.shape[1] != q.shape[1]:
            raise MechdiffError(f"ref_logits have {q.shape[1]} columns but the model's vocabulary is {lg.shape[1]}")
        res[names[j - own]][i] = kl_divergence(lg, q, allow).cpu().numpy()
        if hits is not None:
            hits[names[j - own]][i] = decisions(lg, allow) == tgt[i]

    def reduce(j: int, i: np.ndarray, lg: torch.Tensor) -> None:
        if own and j == 0:
            for k, row in zip(i, lg):
                own_ref[int(k)] = row.float()
        elif own and any(int(k) not in own_ref for k in i):
            pending.append((j, i, lg))  # the full-forward fallback may emit a job before its reference
        else:
            kl(j, i, lg)

    _run(model, enc, r, jobs, reduce, batch_size=batch_size, device=_model_device(model, device),
         progress=progress, prefix_cache=prefix_cache, decode_batch=decode_batch)
    for j, i, lg in pending:
        kl(j, i, lg)
    agree = None
    if tgt is not None:  # the unpatched decisions from the reference the KL is taken against
        unpatched = torch.stack([own_ref[k] for k in range(len(r))]) if own else np.asarray(ref, dtype=np.float32)
        agree = decisions(unpatched, allow) == tgt
    return Sweep(res, hits, agree)


def decisions(logits: Any, allowed: Any = None) -> np.ndarray:
    """The decision token of each row of next-token logits (n, V): the argmax over the `allowed` ids (all when
    None), as token ids of that vocabulary."""
    lg = torch.as_tensor(logits)
    idx = allowed_index(allowed, lg.shape[1])
    if idx is None:
        return lg.argmax(1).cpu().numpy()
    return idx[lg[:, torch.from_numpy(idx).to(lg.device)].argmax(1).cpu().numpy()]


def patch_kl(
    model: nn.Module, enc: Encoded, rows: Any, site: Site, vectors: Any | None, ref_logits: Any, *,
    allowed: Any = None, batch_size: int = 16, device: str | torch.device | None = None, prefix_cache: bool = True,
) -> np.ndarray:
    """Per-prompt KL(p_patched || p_ref) for one set of patch vectors (None = unpatched)."""
    return sweep_kl(model, enc, rows, site, {"patch": vectors}, ref_logits, allowed=allowed,
                    batch_size=batch_size, progress=False, device=device, prefix_cache=prefix_cache)["patch"]


kl_drop = drop_pct_ci  # the patch KL drop % is the paired drop % of mechdiff.stats.bootstrap


def min_k(ks: Sequence[int], drops: Sequence[float], target: float) -> int | None:
    """The smallest k whose KL drop (%) reaches `target`, or None (undefined drops never reach it)."""
    if len(ks) != len(drops):
        raise MechdiffError(f"ks and drops must have the same length, got {len(ks)} and {len(drops)}")
    hits = [int(k) for k, d in zip(ks, drops) if d is not None and np.isfinite(d) and d >= target]
    return min(hits) if hits else None


def saturation_k(ks: Sequence[int], drops: Sequence[float], share: float) -> int | None:
    """The smallest k whose KL drop (%) reaches `share` of the best drop any k in the sweep reaches (the rank at
    which the drop saturates: how many directions carry the change, with no fixed target); None when no drop is
    positive. A planted rank-r change saturates at k = r when each of its directions adds more than 1 - share of
    the best drop; with many comparable directions (from r = 5 or 6 at share 0.9, depending on the model) the
    last one adds less and k < r."""
    if len(ks) != len(drops):
        raise MechdiffError(f"ks and drops must have the same length, got {len(ks)} and {len(drops)}")
    if not 0 < share <= 1:
        raise MechdiffError(f"saturation share must lie in (0, 1], got {share}")
    ok = [(int(k), float(d)) for k, d in zip(ks, drops) if d is not None and np.isfinite(d)]
    best = max((d for _k, d in ok), default=float("nan"))
    if not best > 0:
        return None
    return min(k for k, d in ok if d >= share * best)


def reference_logits(model: nn.Module, enc: Encoded, rows: Any, *, batch_size: int = 16,
                     device: str | torch.device | None = None) -> np.ndarray:
    """Unpatched decision-token logits (len(rows), V): the reference of every patch KL."""
    return patched_logits(model, enc, rows, Site(0, "resid_post"), None, batch_size=batch_size, device=device,
                          prefix_cache=False)


# --------------------------------------------------------------------------------------------- RQ1 layer patch

LAYER_PATCH_DIRECTIONS = {"base_into_tuned": ("base", "tuned"), "tuned_into_base": ("tuned", "base")}


def layer_recolour_stats(src: Any, dst: Any, sites: Sequence[Site], train_rows: Any, view: str = "last"
                         ) -> dict[str, dict[str, np.ndarray]]:
    """Per site, recolour stats src -> dst from TRAIN rows only (`transport.recolour_stats`).

    `src` / `dst` are activation stores (anything with `.read(site, view, rows)`); the validation rows a
    layer patch evaluates never enter the statistics it recolours with.
    """
    tr = np.asarray(train_rows, dtype=np.int64)
    if tr.size == 0:
        raise MechdiffError("no train rows for the recolour statistics: check data.splits")
    return {s.name: recolour_stats(src.read(s.name, view, tr), dst.read(s.name, view, tr)) for s in sites}


def layer_patch(
    model_dst: nn.Module, enc_dst: Encoded, rows: Any, layer_sites: Sequence[Site], src_vectors: Mapping[str, Any],
    stats: Mapping[str, Mapping[str, Any]], ref_logits: Any, *, allowed: Any = None, batch_size: int = 16,
    progress: bool = True, device: str | torch.device | None = None, prefix_cache: bool = True,
) -> dict[str, np.ndarray]:
    """RQ1: per site, patch dst with the src decision vector recoloured into dst statistics; KL per prompt.

    `stats` maps a site name to recolour stats {mu_b, sd_b (src), mu_t, sd_t (dst)}, from train rows
    (`layer_recolour_stats`); `src_vectors` maps a site name to (len(rows), d) src decision vectors.
    `ref_logits` None: the unpatched logits of the same engine (`sweep_kl`).
    """
    return sweep_kl(model_dst, enc_dst, rows, list(layer_sites), layer_patch_configs(layer_sites, src_vectors, stats),
                    ref_logits, allowed=allowed, batch_size=batch_size, progress=progress, device=device,
                    prefix_cache=prefix_cache)


def layer_patch_configs(layer_sites: Sequence[Site], src_vectors: Mapping[str, Any],
                        stats: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The layer patch's vectors per site: the src decision vectors recoloured into dst statistics."""
    if not layer_sites:
        raise MechdiffError("no layer sites given for the layer patch")
    configs: dict[str, np.ndarray] = {}
    for s in layer_sites:
        if s.name not in src_vectors:
            raise MechdiffError(f"src_vectors has no entry for site {s.name}")
        if s.name not in stats:
            raise MechdiffError(f"no recolour stats for site {s.name}: compute them with layer_recolour_stats")
        configs[s.name] = recolour(src_vectors[s.name], stats[s.name])
    return configs


@dataclass
class LayerPatch:
    """One direction of the layer patch: per site, the per-prompt KL(patched dst || dst) and whether the patched
    decision token is the src model's own; per prompt, whether dst's own decision already was."""

    kl: dict[str, np.ndarray]
    top1: dict[str, np.ndarray]
    agree: np.ndarray


def src_decisions_in_dst(src_logits: Any, allowed_src: Any = None, allowed_dst: Any = None) -> np.ndarray:
    """The src model's decision tokens (argmax over its shared ids) as dst token ids: the shared-vocabulary id
    lists are aligned string by string, so position j of one is position j of the other (identity when None)."""
    lg = np.asarray(src_logits)
    if allowed_src is None and allowed_dst is None:
        return lg.argmax(1)
    if allowed_src is None or allowed_dst is None:
        raise MechdiffError("give the shared token ids of both models (allowed_src and allowed_dst) or of neither")
    # in their aligned order: a side whose whole vocabulary is shared (a tuned tokenizer that only adds tokens, or
    # the same tokens under other ids) still maps position by position
    a_src = allowed_index(allowed_src, lg.shape[1], keep_order=True)
    a_dst = token_ids(allowed_dst)
    if a_src.shape != a_dst.shape:
        raise MechdiffError(f"shared token ids differ in length ({a_src.size} vs {a_dst.size}): re-run fairness")
    return a_dst[lg[:, a_src].argmax(1)]


def layer_patch_direction(
    model_dst: nn.Module, enc_dst: Encoded, src: Any, dst: Any, layer_sites: Sequence[Site], rows: Any,
    train_rows: Any, *, allowed: Any = None, allowed_src: Any = None, batch_size: int = 16, progress: bool = True,
) -> LayerPatch:
    """One direction of the RQ1 layer patch from stores: src decision vectors of `rows` (val), recoloured with
    train-only stats into dst, patched into `model_dst` at every site; per-prompt KL against dst's own logits and
    whether the patched decision becomes src's (src's decision from its store's logits, dst's unpatched one from
    the same forwards as the patched ones; `allowed` / `allowed_src`: the shared ids of dst / src, or both None
    for one tokenizer)."""
    src_vecs = {s.name: src.read(s.name, "last", rows) for s in layer_sites}
    stats = layer_recolour_stats(src, dst, layer_sites, train_rows)
    target = src_decisions_in_dst(src.read_logits(rows), allowed_src, allowed)
    sw = sweep_patch(model_dst, enc_dst, rows, list(layer_sites), layer_patch_configs(layer_sites, src_vecs, stats),
                     None, allowed=allowed, targets=target, batch_size=batch_size, progress=progress)
    return LayerPatch(sw.kl, sw.hits, sw.agree)


def layer_patch_table(results: Mapping[str, LayerPatch | Mapping[str, np.ndarray]]) -> tuple[list[dict], dict]:
    """Mean KL per site and direction: (records {'layer', 'kl_<direction>'...}, {direction: {'L<layer>': mean}})."""
    rows: dict[str, dict] = {}
    metrics: dict[str, dict[str, float]] = {}
    for direction, res in results.items():
        for name, kl in (res.kl if isinstance(res, LayerPatch) else res).items():
            site = Site.parse(name)
            m = float(np.mean(kl))
            rows.setdefault(name, {"layer": site.layer})[f"kl_{direction}"] = m
            metrics.setdefault(direction, {})[f"L{site.layer}"] = m
    return [rows[k] for k in sorted(rows, key=Site.parse)], metrics


def layer_patch_decisions(results: Mapping[str, LayerPatch]) -> tuple[list[dict], dict]:
    """The behaviour side of the layer patch: records {'layer', 'top1_<direction>' (share of prompts whose patched
    decision is src's), 'flip_<direction>' (the same among the prompts where dst decided otherwise before the
    patch; NaN if none)} and per direction {"agree_before": share of prompts where dst already decided like src,
    "n_differ": the others' count, "flip": {"L<layer>": their share the patch turns into src's, or None}}."""
    rows: dict[str, dict] = {}
    out: dict = {}
    for direction, res in results.items():
        moved = ~res.agree
        flips: dict[str, float | None] = {}
        for name, hit in sorted(res.top1.items(), key=lambda kv: Site.parse(kv[0])):
            layer = Site.parse(name).layer
            flip = float(np.mean(hit[moved])) if moved.any() else None
            flips[f"L{layer}"] = flip
            row = rows.setdefault(name, {"layer": layer})
            row[f"top1_{direction}"] = float(np.mean(hit))
            row[f"flip_{direction}"] = float("nan") if flip is None else flip
        out[direction] = {"agree_before": float(np.mean(res.agree)), "n_differ": int(moved.sum()), "flip": flips}
    return [rows[k] for k in sorted(rows, key=Site.parse)], out


# --------------------------------------------------------------------------------------------- rank x alpha sweep


def alpha_key(a: float | str) -> str:
    """Label of an alpha value: 'auto' or the number as %g."""
    return "auto" if a == "auto" else f"{float(a):g}"


def _config_name(k: int | str, a: float | str) -> str:
    return f"k={k}|a={alpha_key(a)}"


def rank_alpha_configs(m: TransportMap, X: Any, ranks: Sequence[int | str], alphas: Sequence[float | str]
                       ) -> dict[str, np.ndarray]:
    """Patch vectors of a sweep: 'raw' (train-stat recolour of X) and 'k=<k>|a=<alpha>' (the map at rank k, alpha).

    Rank 'full' is the full map; alpha 'auto' keeps the map's fitted alpha.
    """
    configs = {"raw": recolour(X, m.stats)}
    for k in ranks:
        mk = m.at_rank(rank_value(k))
        for a in alphas:
            configs[_config_name(k, a)] = (mk if a == "auto" else mk.with_alpha(float(a))).apply(X)
    return configs


def summarise_sweep(
    kls: Mapping[str, np.ndarray], *, site: str, width: int, ranks: Sequence[int | str], alphas: Sequence[float | str],
    rank: int | str, alpha: float | str, target_drop: float, datasets: Sequence[str] | None = None,
    n_boot: int = 1000, seed: int = 0, saturation: float = 0.9,
) -> tuple[list[dict], list[dict], dict]:
    """KL drop % of every (rank, alpha) of a sweep against 'raw': (rank records, alpha records, site metrics).

    Rank records (at `alpha`): {'site', 'k', 'k_label', 'kl_drop', 'ci_low', 'ci_high'} ('full', and any rank
    beyond the width, -> k = width: every direction kept);
    alpha records: {'site', 'alpha', 'k', 'kl_drop'}. Site metrics hold the drop at (`rank`, `alpha`) with CI,
    the full-rank drop, `min_k` (smallest k reaching `target_drop` %, -1 if none), `k_saturated` (smallest k
    reaching `saturation` x the best drop of the sweep, `saturation_k`; -1 if no drop is positive), the paired
    difference `kl_diff` = mean(KL_raw - KL_mapped) in nats with its bootstrap CI, and, for each
    dataset with >= 2 prompts, 'kl_drop_<dataset>'.
    """
    raw = np.asarray(kls["raw"], dtype=np.float64)
    a_main = alpha_key(alpha)
    rank_rows, alpha_rows, drops = [], [], {}

    def k_of(k: int | str) -> int:  # a rank at or beyond the width keeps every direction: the full map
        return width if k == "full" else min(int(k), width)

    for k in ranks:
        kx = k_of(k)
        for a in alphas:
            res = drop_pct_ci(raw, kls[_config_name(k, a)], n_boot=n_boot, seed=seed)
            if alpha_key(a) == a_main:
                drops[k] = res["drop_pct"]
                rank_rows.append({"site": site, "k": kx, "k_label": str(k), "kl_drop": res["drop_pct"],
                                  "ci_low": res["ci_low"], "ci_high": res["ci_high"]})
            alpha_rows.append({"site": site, "alpha": alpha_key(a), "k": kx, "kl_drop": res["drop_pct"]})
    main_name = _config_name(rank, alpha)
    main = drop_pct_ci(raw, kls[main_name], n_boot=n_boot, seed=seed)
    diff = mean_ci(raw - np.asarray(kls[main_name], dtype=np.float64), n_boot=n_boot, seed=seed)
    kx, dk = [k_of(k) for k in ranks], [drops[k] for k in ranks]
    mk, ks = min_k(kx, dk, target_drop), saturation_k(kx, dk, saturation)
    metrics = {
        "kl_raw": main["kl_raw"], "kl_mapped": main["kl_mapped"], "kl_drop": main["drop_pct"],
        "kl_drop_ci_low": main["ci_low"], "kl_drop_ci_high": main["ci_high"],
        "kl_diff": diff[0], "kl_diff_ci_low": diff[1], "kl_diff_ci_high": diff[2],
        "kl_drop_full": drops.get("full", next((drops[k] for k in ranks if k_of(k) == width), float("nan"))),
        "min_k": -1 if mk is None else int(mk),
        "k_saturated": -1 if ks is None else int(ks),
    }
    if datasets is not None:
        ds = np.asarray([str(x) for x in datasets])
        if ds.shape != raw.shape:
            raise MechdiffError(f"one dataset label per prompt is needed: {ds.size} labels for {raw.size} prompts")
        for name in sorted(set(ds.tolist())):
            sel = ds == name
            if sel.sum() >= 2:
                r = drop_pct_ci(raw[sel], np.asarray(kls[main_name])[sel], n_boot=n_boot, seed=seed)
                metrics[f"kl_drop_{name}"] = r["drop_pct"]
    return rank_rows, alpha_rows, metrics


def head_blend(heads: Heads, layer: int, clean: Any, select: Sequence[int] | str = "all", *, rtol: float = 1e-3
               ) -> Callable[[Any], np.ndarray]:
    """Patch vectors for an `attn_out` site blended per head through the pseudo-inverse of the output projection
    (the seeds' head-level form of the attention patch).

    attn_out = z W^T + b with z the heads' outputs concatenated (`Heads.matrix`). The difference between a patch
    vector v and the model's own attention output c at the same prompt is split into per-head parts
    (v - c) pinv(W)^T; the selected heads take their parts, the others keep their own output: the patched
    vector is c + sum over the selected heads h of W_h (part of h) (the bias cancels). `select` "all" gives v
    itself wherever W (d x n_heads * head_dim) has rank d (c plus the projection of v - c onto W's column space
    otherwise, e.g. when n_heads * head_dim < d).

    The pseudo-inverse drops singular values below `rtol` x the largest: output projections can be
    ill-conditioned (SmolLM2's L20: condition number 3e4), and the exact pseudo-inverse then splits a small
    difference into per-head parts about 20x larger than the heads' own outputs that cancel only in their sum,
    so a subset of heads would patch a vector several times the activation's norm. Returns a function of (n, d)
    vectors (rows matching `clean`, the model's own attn_out at the same prompts and position); its `rank`
    attribute is the number of singular directions kept.

    The split is the heads' own only where their concatenated outputs are no wider than the residual stream
    (n_heads * head_dim <= d, as in Llama-style models). Wider ones (Gemma-7B, Qwen3-0.6B: e.g. 16 x 128 = 2048 over
    d = 1024) leave a null space of W in which any part can be moved between heads: the pseudo-inverse then gives
    the minimum-norm split, so a subset of heads takes parts of the other heads' change (a change planted in one
    head's queries of such a tiny model: the four unchanged heads' parts removed 36 % of its KL). A subset is
    then warned about, and `identified` (attribute) is False; `all` is unaffected. The heads' own outputs are
    what the `heads` stage patches (`analysis.heads`)."""
    W = heads.matrix(layer).detach().double().cpu()
    H = heads.n_heads
    chosen = list(range(H)) if select == "all" else [int(h) for h in select]
    bad = [h for h in chosen if not 0 <= h < H]
    if bad or not chosen:
        raise MechdiffError(f"heads to blend {list(select)}: the model has {H} heads per layer (0..{H - 1})")
    mask = torch.zeros(W.shape[1], dtype=torch.float64)
    for h in chosen:
        mask[heads.block(h)] = 1.0
    # (d, d): x -> the selected heads' share of x, through the truncated pseudo-inverse
    share = (torch.linalg.pinv(W, rtol=rtol).T * mask) @ W.T
    sv = torch.linalg.svdvals(W)
    c = torch.as_tensor(np.asarray(clean), dtype=torch.float64)

    def blend(v: Any) -> np.ndarray:
        x = torch.as_tensor(np.asarray(v), dtype=torch.float64)
        if x.shape != c.shape:
            raise MechdiffError(f"head blend: {tuple(x.shape)} vectors for {tuple(c.shape)} unpatched ones")
        return (c + (x - c) @ share).float().numpy()

    blend.rank = int((sv > rtol * sv[0]).sum())  # type: ignore[attr-defined]
    blend.identified = W.shape[1] <= W.shape[0] or len(set(chosen)) == H  # type: ignore[attr-defined]
    if not blend.identified:  # type: ignore[attr-defined]
        warnings.warn(f"head blend at layer {layer}: the heads' outputs ({H} x {W.shape[1] // H} = {W.shape[1]}) are "
                      f"wider than the residual stream ({W.shape[0]}), so the split of a patch into heads' parts is "
                      "not unique (pinv gives the minimum-norm one) and heads "
                      f"{chosen} also take parts of the other heads' change; patch all heads, or use the heads "
                      "stage for single heads", RuntimeWarning, stacklevel=2)
    return blend


def check_reported_rank(rank: int | str, width: int, what: str = "the model's width") -> None:
    """The reported rank (params `rank`) is 'full' or at most the width. (Sweep ranks beyond the width stay
    allowed: they mean the full map.)"""
    if rank != "full" and int(rank) > width:
        raise MechdiffError(f"rank {rank}: more directions than {what} {width}: use a k <= {width} or 'full'")


def rank_alpha_sweep(
    model: nn.Module, enc: Encoded, rows: Any, site: Site, m: TransportMap, X: Any, *, ranks: Sequence[int | str],
    alphas: Sequence[float | str], rank: int | str, alpha: float | str, target_drop: float, allowed: Any = None,
    datasets: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0, batch_size: int = 16,
    progress: bool = True, ref_logits: Any = None, saturation: float = 0.9,
    blend: Callable[[Any], np.ndarray] | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """The patch experiment at one site: raw vs mapped patch of base vectors X (len(rows), d) into `model`.

    The reported (`rank`, `alpha`) is added to the grid; returns `summarise_sweep`'s records and metrics, with
    'alpha' (the alpha used at the reported point). `ref_logits` (unpatched, computed when None) may be shared
    between sites. `blend` (e.g. `head_blend`) turns every configuration's vectors, raw and mapped alike, into
    the vectors actually patched.
    """
    width = int(np.shape(X)[1])
    check_reported_rank(rank, width, f"{site.name}'s width")
    ranks = list(dict.fromkeys([*ranks, rank]))
    alphas = list(dict.fromkeys([*alphas, alpha]))
    configs = rank_alpha_configs(m, X, ranks, alphas)
    if blend is not None:
        configs = {name: blend(v) for name, v in configs.items()}
    ref = reference_logits(model, enc, rows, batch_size=batch_size) if ref_logits is None else ref_logits
    kls = sweep_kl(model, enc, rows, site, configs, ref, allowed=allowed, batch_size=batch_size, progress=progress)
    rank_rows, alpha_rows, metrics = summarise_sweep(
        kls, site=site.name, width=width, ranks=ranks, alphas=alphas, rank=rank, alpha=alpha,
        target_drop=target_drop, datasets=datasets, n_boot=n_boot, seed=seed, saturation=saturation)
    metrics["alpha"] = m.alpha if alpha == "auto" else float(alpha)
    return rank_rows, alpha_rows, metrics


__all__ = [
    "LAYER_PATCH_DIRECTIONS", "LayerPatch", "Sweep", "alpha_key", "check_reported_rank", "decisions", "head_blend", "kl_drop", "layer_patch",
    "layer_patch_decisions", "layer_patch_direction", "layer_patch_table", "layer_recolour_stats", "min_k",
    "patch_kl", "patched_logits", "rank_alpha_configs", "rank_alpha_sweep", "reference_logits", "saturation_k",
    "src_decisions_in_dst", "summarise_sweep", "sweep_kl", "sweep_patch",
]
