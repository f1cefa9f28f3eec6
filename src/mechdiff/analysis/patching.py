"""Patched forward passes at the decision token and KL sweeps (raw cross-patch, mapped patch, layer patch).

A patch replaces one site's activation at each prompt's decision token with a given vector and reads the
model's next-token logits at that same position; the KL is ``KL(p_patched || p_ref)`` against the unpatched
reference logits (ALGORITHMS.md, "Patching"). The vectors always come from the caller (the activation store
and a transport map): this module never re-runs the base model.

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

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff.analysis.similarity import bootstrap_mean_ci, kl_divergence
from mechdiff.analysis.transport import recolour
from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site, _register_read, get_body, head_logits, model_width, site_module
from mechdiff.model.tokens import Encoded

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


def _pad_value(model: nn.Module) -> int:
    v = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(v) if isinstance(v, int) and v >= 0 else 0


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


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, allowed: torch.Tensor | None) -> np.ndarray:
    """Per-row KL(p || q) in float64 from logits; over the allowed ids (renormalised) when given."""
    p, q = p_logits.double(), q_logits.double()
    if allowed is not None:
        p, q = p[:, allowed], q[:, allowed]
    if torch.isnan(p).any() or torch.isnan(q).any():
        raise MechdiffError("patched or reference logits contain NaN: the model overflowed (try float32)")
    lp, lq = torch.log_softmax(p, dim=-1), torch.log_softmax(q, dim=-1)
    pp = lp.exp()
    terms = torch.where(pp > 0, pp * (lp - lq), torch.zeros_like(pp))
    return terms.sum(dim=-1).cpu().numpy()


def _allowed(allowed: Any, vocab: int) -> torch.Tensor | None:
    if allowed is None:
        return None
    a = np.asarray(allowed)
    if a.dtype == bool:
        a = np.flatnonzero(a)
    a = a.astype(np.int64).ravel()
    if a.size == 0 or a.min() < 0 or a.max() >= vocab:
        raise MechdiffError(f"allowed token ids must be a non-empty set of ids in [0, {vocab})")
    if a.size == vocab and np.array_equal(np.sort(a), np.arange(vocab)):
        return None  # identical tokenizers: the mask is a no-op and costs nothing
    return torch.from_numpy(a)


class _Patcher:
    """Hooks that overwrite, per site, chosen (row, position) activations of a batch with given vectors."""

    def __init__(self, model: nn.Module, sites: Sequence[Site]) -> None:
        self.model = model
        self.sites = list(sites)
        self.handles: list = []
        self.plan: dict[Site, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def set(self, plan: dict[Site, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.plan = plan

    def __enter__(self) -> _Patcher:
        self.handles = []
        for site in self.sites:
            def fn(t: torch.Tensor, _s: Site = site) -> torch.Tensor | None:
                item = self.plan.get(_s)
                if item is None:
                    return None
                rows, pos, vec = item
                t = t.clone()
                t[rows.to(t.device), pos.to(t.device)] = vec.to(device=t.device, dtype=t.dtype)
                return t
            self.handles.append(_register_read(site_module(self.model, site), site.kind, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


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
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def update(self, _n: int) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------- engines


def _hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _pad_batch(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[j, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _run_full(model, enc, rows, jobs, reduce, *, batch_size, device, progress) -> None:
    """Full forwards: each batch row is one (prompt, job) pair, prompts grouped by length."""
    body, pad = get_body(model), _pad_value(model)
    sites = sorted({s for s, v in jobs if v is not None})
    order = np.argsort(np.array([len(enc.ids[r]) for r in rows]), kind="stable")
    pairs = [(int(i), j) for i in order for j in range(len(jobs))]
    bar = _progress(len(pairs), progress, "patch")
    patcher = _Patcher(model, sites)
    with patcher:
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            seqs = [enc.ids[rows[i]][: enc.decision[rows[i]] + 1] for i, _ in chunk]
            ids, mask = _pad_batch(seqs, pad, device)
            pos = torch.tensor([len(q) - 1 for q in seqs], dtype=torch.long)
            vecs = [None if jobs[j][1] is None else jobs[j][1][i] for i, j in chunk]
            patcher.set(_plan([jobs[j][0] for _, j in chunk], vecs, pos))
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


def _cache_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(ly.keys, ly.values) for ly in layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    raise _NoPrefixCache("unknown cache layout")


def _new_cache(model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], sel: torch.Tensor, P: int):
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    for li, (k, v) in enumerate(kv):
        cache.update(k[sel, :, :P], v[sel, :, :P], li)
    return cache


@torch.no_grad()
def _run_prefix(model, enc, rows, jobs, reduce, *, batch_size, decode_batch, device, progress) -> None:
    """Prefix-cache path: one prefix forward per prompt, one-token forwards per (prompt, job)."""
    from transformers import DynamicCache

    body, pad = get_body(model), _pad_value(model)
    sites = sorted({s for s, v in jobs if v is not None})
    dec = np.array([enc.decision[r] for r in rows], dtype=np.int64)
    order = np.argsort(dec, kind="stable")
    bar = _progress(len(rows) * len(jobs), progress, "patch")
    patcher = _Patcher(model, sites)
    checked = False
    for s in range(0, len(order), batch_size):
        pidx = order[s : s + batch_size]
        seqs = [enc.ids[rows[i]][: dec[i] + 1] for i in pidx]
        ids, mask = _pad_batch(seqs, pad, device)
        p = torch.tensor(dec[pidx], dtype=torch.long, device=device)
        P = int(p.max())
        try:
            cache = DynamicCache(config=model.config)
        except TypeError:
            cache = DynamicCache()
        out = body(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        kv = _cache_kv(getattr(out, "past_key_values", None) or cache)
        ar = torch.arange(len(pidx), device=device)
        ref_here = head_logits(model, _hidden(out)[ar, p]) if not checked else None
        tok = ids[ar, p]
        pairs = [(b, j) for b in range(len(pidx)) for j in range(len(jobs))]
        if not checked:
            pairs = [(b, -1) for b in range(len(pidx))] + pairs
        slot = torch.arange(P + 1, device=device)
        with patcher:
            for c in range(0, len(pairs), decode_batch):
                chunk = pairs[c : c + decode_batch]
                bsel = torch.tensor([b for b, _ in chunk], dtype=torch.long, device=device)
                pos0 = torch.zeros(len(chunk), dtype=torch.long)
                vecs = [None if j < 0 or jobs[j][1] is None else jobs[j][1][pidx[b]] for b, j in chunk]
                patcher.set(_plan([None if j < 0 else jobs[j][0] for _, j in chunk], vecs, pos0))
                pb = p[bsel]
                amask = ((slot[None, :] < pb[:, None]) | (slot[None, :] == P)).long()
                past = _new_cache(model, kv, bsel, P) if P > 0 else None
                o = body(input_ids=tok[bsel][:, None], attention_mask=amask[:, : P + 1] if P > 0 else None,
                         position_ids=pb[:, None], past_key_values=past, use_cache=True)
                logits = head_logits(model, _hidden(o)[:, -1])
                real = [k for k, (_, j) in enumerate(chunk) if j >= 0]
                if len(real) < len(chunk):
                    got = logits[[k for k, (_, j) in enumerate(chunk) if j < 0]]
                    want = ref_here[[b for b, j in chunk if j < 0]]
                    tol = 1e-3 + 1e-2 * float(want.abs().max())
                    err = float((got - want).abs().max())
                    if not err <= tol:
                        raise _NoPrefixCache(f"prefix-cache logits differ from a full forward by {err:.3g}")
                    checked = True
                if real:
                    sub = [chunk[k] for k in real]
                    _emit([(int(pidx[b]), j) for b, j in sub], logits[real], reduce)
                    bar.update(len(sub))
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
        except (_NoPrefixCache, TypeError, AttributeError, ValueError, RuntimeError, NotImplementedError) as exc:
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


def sweep_kl(
    model: nn.Module, enc: Encoded, rows: Any, site: Site | Sequence[Site], configs: Mapping[str, Any],
    ref_logits: Any, *, allowed: Any = None, batch_size: int = 16, progress: bool = True,
    device: str | torch.device | None = None, prefix_cache: bool = True, decode_batch: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-prompt KL(p_patched || p_ref) for many patch configurations {name: (len(rows), d) vectors}.

    `site` is one Site for all configurations, or one Site per configuration (in the order of `configs`).
    """
    r = _rows(enc, rows)
    if not configs:
        raise MechdiffError("no patch configurations given: nothing to sweep")
    names = list(configs)
    sites = [site] * len(names) if isinstance(site, Site) else list(site)
    if len(sites) != len(names) or not all(isinstance(s, Site) for s in sites):
        raise MechdiffError("site must be one Site or a list of Sites, one per configuration")
    ref = _ref(ref_logits, len(r))
    allow = _allowed(allowed, ref.shape[1])
    jobs: list[Job] = [
        (s, None if configs[nm] is None else _vectors(configs[nm], len(r), model_width_of(model, s), nm))
        for s, nm in zip(sites, names)
    ]
    res = {nm: np.full(len(r), np.nan) for nm in names}

    def reduce(j: int, i: np.ndarray, lg: torch.Tensor) -> None:
        q = torch.from_numpy(np.asarray(ref[i], dtype=np.float32)).to(lg.device)
        if lg.shape[1] != q.shape[1]:
            raise MechdiffError(f"ref_logits have {q.shape[1]} columns but the model's vocabulary is {lg.shape[1]}")
        res[names[j]][i] = _kl_rows(lg, q, None if allow is None else allow.to(lg.device))

    _run(model, enc, r, jobs, reduce, batch_size=batch_size, device=_model_device(model, device),
         progress=progress, prefix_cache=prefix_cache, decode_batch=decode_batch)
    return res


def patch_kl(
    model: nn.Module, enc: Encoded, rows: Any, site: Site, vectors: Any | None, ref_logits: Any, *,
    allowed: Any = None, batch_size: int = 16, device: str | torch.device | None = None, prefix_cache: bool = True,
) -> np.ndarray:
    """Per-prompt KL(p_patched || p_ref) for one set of patch vectors (None = unpatched)."""
    return sweep_kl(model, enc, rows, site, {"patch": vectors}, ref_logits, allowed=allowed,
                    batch_size=batch_size, progress=False, device=device, prefix_cache=prefix_cache)["patch"]


def kl_drop(kl_raw: Any, kl_mapped: Any, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """KL drop % = 100 (mean raw - mean mapped) / mean raw, with a paired 95% bootstrap CI over prompts."""
    a = np.asarray(kl_raw, dtype=np.float64).ravel()
    b = np.asarray(kl_mapped, dtype=np.float64).ravel()
    if a.size == 0 or a.shape != b.shape:
        raise MechdiffError(f"kl_raw and kl_mapped must be non-empty and paired per prompt, got {a.shape}, {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise MechdiffError("KL values contain NaN or inf: check the patched logits")
    if not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise MechdiffError(f"n_boot must be a positive integer, got {n_boot!r}")
    ma, mb = float(a.mean()), float(b.mean())
    if ma <= 0.0:
        return {"drop_pct": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "kl_raw": ma,
                "kl_mapped": mb}
    rng = np.random.default_rng(seed)
    drops = np.empty(n_boot)
    for s in range(0, n_boot, 256):
        idx = rng.integers(0, a.size, size=(min(256, n_boot - s), a.size))
        ra, rb = a[idx].mean(axis=1), b[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            drops[s : s + idx.shape[0]] = 100.0 * (ra - rb) / ra
    drops = drops[np.isfinite(drops)]
    lo, hi = (np.percentile(drops, [2.5, 97.5]) if drops.size else (np.nan, np.nan))
    return {"drop_pct": 100.0 * (ma - mb) / ma, "ci_low": float(lo), "ci_high": float(hi), "kl_raw": ma,
            "kl_mapped": mb}


def min_k(ks: Sequence[int], drops: Sequence[float], target: float) -> int | None:
    """The smallest k whose KL drop (%) reaches `target`, or None."""
    if len(ks) != len(drops):
        raise MechdiffError(f"ks and drops must have the same length, got {len(ks)} and {len(drops)}")
    hits = [int(k) for k, d in zip(ks, drops) if d is not None and np.isfinite(d) and d >= target]
    return min(hits) if hits else None


def _site_stats(stats: Mapping[str, Any], name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in stats:
        raise MechdiffError(f"{what} stats have no entry for site {name}: compute the store statistics first")
    s = stats[name]
    if isinstance(s, Mapping):
        mu = s.get("mu", s.get("mean"))
        sd = s.get("sd", s.get("std"))
    else:
        mu, sd = s
    if mu is None or sd is None:
        raise MechdiffError(f"{what} stats for {name} need 'mu' (or 'mean') and 'sd' (or 'std')")
    return np.asarray(mu, dtype=np.float64), np.asarray(sd, dtype=np.float64)


def layer_patch(
    model_dst: nn.Module, enc_dst: Encoded, rows: Any, layer_sites: Sequence[Site], src_vectors: Mapping[str, Any],
    dst_stats: Mapping[str, Any], src_stats: Mapping[str, Any], ref_logits: Any, *, allowed: Any = None,
    batch_size: int = 16, progress: bool = True, device: str | torch.device | None = None, prefix_cache: bool = True,
) -> dict[str, np.ndarray]:
    """RQ1: per site, patch dst with the src decision vector re-coloured into dst statistics; KL per prompt.

    Stats map a site name to {'mu', 'sd'} (or a (mu, sd) pair); src_vectors maps a site name to (len(rows), d).
    """
    if not layer_sites:
        raise MechdiffError("no layer sites given for the layer patch")
    configs: dict[str, np.ndarray] = {}
    for s in layer_sites:
        if s.name not in src_vectors:
            raise MechdiffError(f"src_vectors has no entry for site {s.name}")
        mu_s, sd_s = _site_stats(src_stats, s.name, "source")
        mu_d, sd_d = _site_stats(dst_stats, s.name, "destination")
        st = {"mu_b": mu_s, "sd_b": sd_s, "mu_t": mu_d, "sd_t": sd_d}
        configs[s.name] = recolour(src_vectors[s.name], st)
    return sweep_kl(model_dst, enc_dst, rows, list(layer_sites), configs, ref_logits, allowed=allowed,
                    batch_size=batch_size, progress=progress, device=device, prefix_cache=prefix_cache)


def reference_logits(model: nn.Module, enc: Encoded, rows: Any, *, batch_size: int = 16,
                     device: str | torch.device | None = None) -> np.ndarray:
    """Unpatched decision-token logits (len(rows), V): the reference of every patch KL."""
    return patched_logits(model, enc, rows, Site(0, "resid_post"), None, batch_size=batch_size, device=device,
                          prefix_cache=False)


def kl_summary(kl: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean per-prompt KL with a 95% bootstrap CI: {'mean', 'ci_low', 'ci_high'}."""
    m, lo, hi = bootstrap_mean_ci(kl, n_boot=n_boot, seed=seed)
    return {"mean": m, "ci_low": lo, "ci_high": hi}


__all__ = [
    "kl_divergence", "kl_drop", "kl_summary", "layer_patch", "min_k", "patch_kl", "patched_logits",
    "reference_logits", "sweep_kl",
]
