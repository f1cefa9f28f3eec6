"""SAE evaluation: FVU, L0, dead %, MSE on held-out activations; CE / KL recovered with the reconstruction spliced in;
a pass / fail check of each SAE against thresholds (seed 000's validation)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mechdiff.errors import MechdiffError
from mechdiff.model.memo import Memo
from mechdiff.model.sites import (
    Site,
    capture,
    embedding_rows,
    keep_block_outputs,
    model_width,
    read_at,
    replace_at,
    reuse_blocks,
)
from mechdiff.model.tokens import Encoded, batches
from mechdiff.resume import UnitsFn, compute_all
from mechdiff.sae.model import TopKSAE
from mechdiff.sae.sources import first_position, read_source, rows_of, tokens_paired
from mechdiff.stats.kl import kl_divergence

RefLogits = torch.Tensor | np.ndarray | Mapping[str, torch.Tensor | np.ndarray] | None


def _as_matrix(X: np.ndarray | torch.Tensor, d: int) -> torch.Tensor:
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.asarray(X, dtype=np.float32))
    if not isinstance(X, torch.Tensor):
        raise MechdiffError(f"expected a numpy array of activations, got {type(X).__name__}")
    if X.dim() != 2 or X.shape[1] != d or X.shape[0] == 0:
        raise MechdiffError(f"activations have shape {tuple(X.shape)}, expected (n > 0, {d})")
    X = X.float()
    if not bool(torch.isfinite(X).all()):
        raise MechdiffError("activations contain NaN or inf: check the activation store")
    return X


@torch.no_grad()
def eval_sae(sae: TopKSAE, X: np.ndarray | torch.Tensor, *, batch_size: int = 4096,
             fired_out: np.ndarray | None = None) -> dict:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2, mean L0, dead % (never active on X), MSE per element.

    FVU equals 1 - sklearn's r2_score(X, X_hat, multioutput="variance_weighted"); it is summed here batch by
    batch so that X_hat is never held whole. `fired_out` (a bool array of the SAE's width) receives which
    latents fired on X.
    """
    X = _as_matrix(X, sae.d_total)
    n = X.shape[0]
    mu = X.double().mean(0)
    sse = 0.0
    sst = float(((X.double() - mu) ** 2).sum())
    l0 = 0.0
    fired = torch.zeros(sae.width, dtype=torch.bool)
    for s in range(0, n, batch_size):
        x = X[s : s + batch_size]
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sse += float(((x_hat.double() - x.double()) ** 2).sum())
        act = z > 0
        l0 += float(act.sum())
        fired |= act.any(0)
    if fired_out is not None:
        fired_out[:] = fired.cpu().numpy()
    return {
        "fvu": sse / sst if sst > 0 else float("nan"),
        "l0": l0 / n,
        "dead_pct": 100.0 * float((~fired).float().mean()),
        "mse": sse / (n * sae.d_total),
        "n": n,
    }


SPLICE_SOURCES = ("base", "tuned", "delta", "crosscoder")
_PAIR = ("base", "tuned")
_KINDS = ("clean", "sae", "zero")
# flat clean activations {model: (N, d) float32} at the spliced positions -> {"sae"|"zero": {target model: (N, d)}}
Replace = Callable[[Mapping[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _vocab(model: nn.Module) -> int:
    rows = embedding_rows(model)
    if rows is None:
        raise MechdiffError(f"{type(model).__name__} has no input embedding: it is not a supported causal LM")
    return rows


def _plan(source: str, name: str, sae: TopKSAE) -> tuple[tuple[str, ...], tuple[str, ...], Replace]:
    """(models whose site activation is read, models whose loss is measured, what replaces the activation)."""
    if source == "crosscoder":
        d = sae.d_in

        def cross(x: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
            r = sae(torch.cat([x["base"], x["tuned"]], 1))  # one latent code, one decoder block per model
            return {"sae": {"base": r[:, :d], "tuned": r[:, d:]},
                    "zero": {m: torch.zeros_like(x[m]) for m in _PAIR}}

        return _PAIR, _PAIR, cross
    if source == "delta":

        def delta(x: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
            b = x["base"]  # the tuned activation becomes base + recon(tuned - base); zero-ablation: delta = 0
            return {"sae": {"tuned": b + sae(x["tuned"] - b)}, "zero": {"tuned": b}}

        return _PAIR, ("tuned",), delta

    def single(x: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return {"sae": {name: sae(x[name])}, "zero": {name: torch.zeros_like(x[name])}}

    return (name,), (name,), single


def _inputs(model: nn.Module | Mapping[str, nn.Module], enc: Encoded | Mapping[str, Encoded], rows: np.ndarray,
            sae: TopKSAE, source: str | None) -> tuple[str, str, dict[str, nn.Module], Encoded]:
    """Validate the call: (source, model name, models by name, the shared encoding)."""
    if isinstance(model, nn.Module):
        if source in ("delta", "crosscoder"):
            raise MechdiffError(f"the {source} SAE is spliced with both models' activations: "
                                "pass the models as {'base': base_model, 'tuned': tuned_model}")
        name = source or "model"
        models: dict[str, nn.Module] = {name: model}
    elif isinstance(model, Mapping):
        if source is None:
            raise MechdiffError(f"models given by name need source= (one of {', '.join(SPLICE_SOURCES)})")
        name = source
        models = dict(model)
    else:
        raise MechdiffError(f"expected a model or a dict of models, got {type(model).__name__}")
    src = source or "model"
    if source is not None and source not in SPLICE_SOURCES:
        raise MechdiffError(f"unknown SAE source {source!r}: choose one of {', '.join(SPLICE_SOURCES)}")
    need = _PAIR if src in ("delta", "crosscoder") else (name,)
    missing = [m for m in need if not isinstance(models.get(m), nn.Module)]
    if missing:
        raise MechdiffError(f"the {src} SAE needs the {' and '.join(need)} model(s); missing: {', '.join(missing)}")
    want_blocks = 2 if src == "crosscoder" else 1
    if sae.n_blocks != want_blocks:
        what = "a crosscoder (n_blocks=2) over [base, tuned]" if want_blocks == 2 else \
            "a single-model SAE (n_blocks=1); a crosscoder spans two models"
        raise MechdiffError(f"spliced metrics for source {src!r} need {what}, got n_blocks={sae.n_blocks}")
    for m in need:
        w = model_width(models[m])
        if w != sae.d_in:
            raise MechdiffError(f"SAE d_in={sae.d_in} does not match the {m} model's width {w}")
    if len(need) == 2 and _vocab(models["base"]) != _vocab(models["tuned"]):
        raise MechdiffError(f"base and tuned have different vocabularies ({_vocab(models['base'])} vs "
                            f"{_vocab(models['tuned'])} tokens): {src} splicing needs one shared tokenizer")
    if isinstance(enc, Mapping):
        miss = [m for m in need if not isinstance(enc.get(m), Encoded)]
        if miss:
            raise MechdiffError(f"no encoded prompts for the {', '.join(miss)} model: pass one Encoded per model")
        shared = enc[need[0]]
        for m in need[1:]:
            if not tokens_paired(shared, enc[m], rows):
                raise MechdiffError(f"base and tuned tokenise the held-out prompts differently: {src} splicing "
                                    "needs the same tokens in both models (use one tokenizer)")
    elif isinstance(enc, Encoded):
        shared = enc
    else:
        raise MechdiffError(f"expected Encoded prompts, got {type(enc).__name__}")
    if rows.size and (rows.min() < 0 or rows.max() >= len(shared)):
        raise MechdiffError(f"prompt rows must lie in 0..{len(shared) - 1}, got {int(rows.min())}..{int(rows.max())}")
    top = max((max(shared.ids[r], default=0) for r in rows), default=0)
    for m in need:
        if top >= _vocab(models[m]):
            raise MechdiffError(f"token id {top} is outside the {m} model's vocabulary ({_vocab(models[m])}): "
                                "encode the prompts with that model's tokenizer")
    return src, name, models, shared


def _refs(ref_logits: RefLogits, targets: tuple[str, ...], n: int) -> dict[str, torch.Tensor]:
    """Reference logits per target model ({} entries fall back to the clean model)."""
    if ref_logits is None:
        return {}
    if isinstance(ref_logits, Mapping):
        extra = set(ref_logits) - set(targets)
        if extra:
            raise MechdiffError(f"ref_logits for {', '.join(sorted(extra))}, but only {', '.join(targets)} is spliced")
        given = dict(ref_logits)
    elif len(targets) == 1:
        given = {targets[0]: ref_logits}
    else:
        raise MechdiffError("a crosscoder splices both models: give ref_logits as {'base': ..., 'tuned': ...}")
    out = {}
    for t, r in given.items():
        ref = torch.as_tensor(np.asarray(r) if isinstance(r, np.ndarray) else r).float()
        if ref.dim() != 2 or ref.shape[0] != n:
            raise MechdiffError(f"ref_logits ({t}) has shape {tuple(ref.shape)}, expected ({n}, vocab)")
        out[t] = ref
    return out


def _select(t: torch.Tensor, positions: str, pos: torch.Tensor, skip: int) -> torch.Tensor:
    """The spliced rows of a site activation (B, T, d): "all" = every position from `skip` on, flattened."""
    if positions == "all":
        return t[:, skip:].reshape(-1, t.shape[-1])
    return t[torch.arange(t.shape[0], device=t.device), pos.to(t.device)]


def _spliced(model: nn.Module, site: Site, clean: torch.Tensor, v: torch.Tensor, positions: str, pos: torch.Tensor,
             skip: int):
    """`replace_at` writing the rows `v` (as laid out by `_select`) into the site activation (clean: (B, T, d))."""
    if positions == "all":  # positions before `skip` (the sink, the shared prefix) keep their clean values
        full = clean.clone()
        full[:, skip:] = v.reshape(clean.shape[0], clean.shape[1] - skip, -1).to(device=clean.device,
                                                                                dtype=clean.dtype)
        return replace_at(model, site, None, full)
    return replace_at(model, site, pos, v)


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    dev = _device(model)
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float()


def _add_losses(acc: dict[str, float], kind: str, lg: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                pos: torch.Tensor, ref: torch.Tensor) -> None:
    """Add the summed next-token CE (valid pairs) and decision-token KL(p || p_ref) of logits (B, T, V)."""
    ids, mask, pos = ids.to(lg.device), mask.to(lg.device), pos.to(lg.device)
    dec = lg[torch.arange(lg.shape[0], device=lg.device), pos]
    acc[f"kl_{kind}"] += float(kl_divergence(dec, ref.to(lg.device)).sum())
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    ce = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    acc[f"ce_{kind}"] += float((ce.view_as(valid) * valid).sum())


@dataclass
class _Clean:
    """One batch's unspliced forward of one model, kept for every SAE spliced into it at the same site: the site
    activation, the outputs of the blocks before the site and, when it ran whole, its decision-token logits and
    its summed CE / KL (`_add_losses` against those logits)."""

    acts: torch.Tensor
    kept: list | None = None
    dec: torch.Tensor | None = None
    losses: dict[str, float] | None = None


class CleanMemo(Memo):
    """Clean passes by (id of the model, site name, the batch's token ids and mask), shared by the SAEs that
    `evaluate_saes` splices in at one site; at most `keep_bytes` kept (a `memo.Memo`: the least recently used
    dropped first, then run again when asked for: the same tensors either way)."""

    def __init__(self, keep_bytes: int = 2 << 30) -> None:
        super().__init__(keep_bytes)


def _clean_pass(model: nn.Module, site: Site, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, *,
                whole: bool, memo: CleanMemo | None) -> _Clean:
    """The batch's clean pass: read the site activation (`whole`: in a full forward that also keeps the block
    outputs before the site, the decision-token logits and the clean CE / KL against them), from `memo` when an
    earlier SAE at this site already ran it (the same tensors: the forward is the same)."""
    key = (id(model), site.name, ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())
    hit = memo.get(key) if memo is not None else None
    if hit is not None and (hit.losses is not None or not whole):
        return hit
    dev = _device(model)
    if not whole:
        c = _Clean(capture(model, ids.to(dev), mask.to(dev), [site])[0][site.name])
    else:
        got: dict[str, torch.Tensor] = {}
        kept: list = []
        with read_at(model, site, functools.partial(got.__setitem__, "a")), keep_block_outputs(model, kept):
            lg = _logits(model, ids, mask)
        dec = lg[torch.arange(lg.shape[0], device=lg.device), pos.to(lg.device)]
        losses = {"kl_clean": 0.0, "ce_clean": 0.0}
        _add_losses(losses, "clean", lg, ids, mask, pos, dec)
        c = _Clean(got["a"], kept[: site.layer], dec, losses)
    if memo is not None:
        memo.put(key, c)
    return c


@torch.no_grad()
def _spliced_totals(models: Mapping[str, nn.Module], enc: Encoded, rows: np.ndarray, site: Site,
                    reads: tuple[str, ...], targets: tuple[str, ...], replace: Replace,
                    refs: Mapping[str, torch.Tensor], *, batch_size: int, positions: str, skip: int,
                    memo: CleanMemo | None = None) -> tuple[dict[str, dict[str, float]], int, int]:
    """Summed CE / KL per target model and kind over the prompts `rows`: (totals, n_prompts, n_tokens).
    `memo`: clean passes shared with other SAEs at this site (`_clean_pass`)."""
    where = {int(r): i for i, r in enumerate(rows)}
    tot = {t: {f"{m}_{k}": 0.0 for m in ("ce", "kl") for k in _KINDS} for t in targets}
    n_tok = n_rows = 0
    for brows, ids, mask, pos in batches(enc, rows, batch_size, enc.pad, device=_device(models[targets[0]])):
        # a target's clean forward gives the logits and, read on the way, the site activation and the outputs of
        # the blocks before the site, which the splices leave alone; a model only read runs up to the site
        clean = {name: _clean_pass(models[name], site, ids, mask, pos, whole=name in targets, memo=memo)
                 for name in dict.fromkeys((*targets, *reads))}
        new = replace({n: _select(clean[n].acts, positions, pos, skip).float() for n in reads})
        for name in targets:
            c = clean[name]
            if name in refs:
                ref_b = refs[name][[where[int(r)] for r in brows]]
                if ref_b.shape[-1] != c.dec.shape[-1]:
                    raise MechdiffError(f"ref_logits ({name}) have {ref_b.shape[-1]} columns but the model gives "
                                        f"{c.dec.shape[-1]} logits")
                # the clean KL against these reference logits (the CE does not depend on them)
                tot[name]["kl_clean"] += float(kl_divergence(c.dec, ref_b.to(c.dec.device)).sum())
                tot[name]["ce_clean"] += c.losses["ce_clean"]
            else:
                ref_b = c.dec
                for k, v in c.losses.items():
                    tot[name][k] += v
            for kind in ("sae", "zero"):  # blocks 0..layer-1 return their clean outputs instead of running
                with reuse_blocks(models[name], c.kept, site.layer), \
                        _spliced(models[name], site, c.acts, new[kind][name], positions, pos, skip):
                    _add_losses(tot[name], kind, _logits(models[name], ids, mask), ids, mask, pos, ref_b)
        n_tok += int((mask[:, 1:].bool() & mask[:, :-1].bool()).sum())
        n_rows += ids.shape[0]
    return tot, n_rows, n_tok


def _recovered(zero: float, sae_v: float, clean: float) -> float:
    den = zero - clean
    return (zero - sae_v) / den if abs(den) > 1e-12 else float("nan")


@torch.no_grad()
def spliced_metrics(model: nn.Module | Mapping[str, nn.Module], enc: Encoded | Mapping[str, Encoded],
                    rows: Sequence[int] | np.ndarray, site: Site, sae: TopKSAE, ref_logits: RefLogits = None, *,
                    source: str | None = None, batch_size: int = 8, positions: str = "all",
                    skip: int | None = None, memo: CleanMemo | None = None) -> dict:
    """CE / KL recovered when the SAE reconstruction replaces the site's activation (vs zero-ablation).

    Sources (`source`; `model` one model, or {"base": ..., "tuned": ...} by name, `enc` one Encoded or one
    per model, which must then hold the same tokens for delta / crosscoder):
      single (source None, "base" or "tuned"): the site activation x becomes sae(x), zero-ablation x -> 0;
      "delta" (trained on tuned - base): the tuned model's x_t becomes x_b + sae(x_t - x_b), with x_b the base
        model's activation on the same tokens; zero-ablation x_t -> x_b (delta zeroed); clean = tuned;
      "crosscoder" (n_blocks=2): [x_b, x_t] is encoded once, the base block of the reconstruction is spliced
        into the base model and the tuned block into the tuned model; zero-ablation zeroes each; keys per
        model get a `_base` / `_tuned` suffix.
    `positions="all"` splices every prompt position from `skip` on (default: after the attention sink at 0 and
    the shared prefix of the prompts of `enc`, the rows `sae.sources.source_rows` trains on); `"decision"` only
    the decision token.
    CE = mean next-token cross-entropy over the prompt's own tokens (positions 0..len-2; "all" only);
    KL = KL(p_patched || p_ref) at the decision token, p_ref from `ref_logits` (len(rows), V) in the order of
    `rows` (a dict by model for a crosscoder), or the clean model's logits when None.
    recovered = (L_zero - L_sae) / (L_zero - L_clean).
    `memo` (a `CleanMemo`): the models' clean passes, shared with other SAEs spliced in at the same site.
    """
    if positions not in ("all", "decision"):
        raise MechdiffError(f"positions must be 'all' or 'decision', got {positions!r}")
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise MechdiffError("no prompts to evaluate the SAE on: the split is empty")
    src, name, models, shared = _inputs(model, enc, rows, sae, source)
    home = "tuned" if src in ("delta", "crosscoder") else name  # the SAE runs on this model's device
    reads, targets, replace = _plan(src, name, sae.to(_device(models[home])))
    refs = _refs(ref_logits, targets, rows.size)
    if skip is None:
        skip = first_position(shared)
    if not 0 <= int(skip) <= int(min(shared.decision[int(r)] for r in rows)):
        raise MechdiffError(f"skip {skip} must be in 0..the earliest decision position of the prompts")
    tot, n_rows, n_tok = _spliced_totals(models, shared, rows, site, reads, targets, replace, refs,
                                         batch_size=batch_size, positions=positions, skip=int(skip), memo=memo)
    res: dict = {}
    for t in targets:
        sfx = "" if len(targets) == 1 else f"_{t}"
        for kind in _KINDS:
            res[f"kl_{kind}{sfx}"] = tot[t][f"kl_{kind}"] / n_rows
            res[f"ce_{kind}{sfx}"] = tot[t][f"ce_{kind}"] / n_tok if n_tok else float("nan")
        res[f"kl_recovered{sfx}"] = _recovered(res[f"kl_zero{sfx}"], res[f"kl_sae{sfx}"], res[f"kl_clean{sfx}"])
        res[f"ce_recovered{sfx}"] = (_recovered(res[f"ce_zero{sfx}"], res[f"ce_sae{sfx}"], res[f"ce_clean{sfx}"])
                                     if positions == "all" else float("nan"))
    res["n_prompts"] = n_rows
    res["n_tokens"] = n_tok
    return res


def crosscoder_norm_shares(sae: TopKSAE, *, base_only: float = 0.1, tuned_only: float = 0.9,
                           shared: tuple[float, float] = (0.3, 0.7), bins: int = 20,
                           live: np.ndarray | None = None) -> tuple[dict, list[dict]]:
    """Crosscoder latents by their tuned decoder-norm share r = ||d_tuned|| / (||d_base|| + ||d_tuned||).

    Counts n_base_only (r < base_only), n_tuned_only (r > tuned_only), n_shared (shared[0] <= r <= shared[1]),
    and a histogram over [0, 1]: rows {rel_norm_tuned (bin centre, 3 decimals), n_latents}. Every latent is
    counted, dead ones too, and a dead latent's decoder stays near its initialisation (a share of about 0.5
    under the joint scale: "shared"); with `live` (bool, one per latent: fired on held-out rows) the same counts
    over the live latents alone are added as n_*_live.
    """
    if sae.n_blocks != 2:
        raise MechdiffError(f"decoder-norm shares need a crosscoder (n_blocks=2), got n_blocks={sae.n_blocks}")
    rel = sae.relative_norms(block=1).cpu().numpy()
    counts = {"n_base_only": int((rel < base_only).sum()), "n_tuned_only": int((rel > tuned_only).sum()),
              "n_shared": int(((rel >= shared[0]) & (rel <= shared[1])).sum())}
    if live is not None:
        live = np.asarray(live, dtype=bool)
        if live.shape != rel.shape:
            raise MechdiffError(f"live: {live.shape} flags for {rel.shape[0]} latents")
        r = rel[live]
        counts.update({"n_base_only_live": int((r < base_only).sum()), "n_tuned_only_live": int((r > tuned_only).sum()),
                       "n_shared_live": int(((r >= shared[0]) & (r <= shared[1])).sum())})
    hist, edges = np.histogram(rel, bins=bins, range=(0.0, 1.0))
    centres = edges[:-1] + 0.5 / bins
    return counts, [{"rel_norm_tuned": round(float(c), 3), "n_latents": int(h)} for c, h in zip(centres, hist)]


# a model by name ("base" | "tuned") -> (model, tokenizer, its encoding of every prompt), loaded once by the caller
ModelLoader = Callable[[str], tuple[nn.Module, object, Encoded]]


@dataclass(frozen=True)
class Criteria:
    """Thresholds an SAE must meet on held-out prompts to pass (seed 000's validation: reconstruction below a
    threshold and a sparsity ratio width / L0 of at least 10x; FVU here, as the seed's raw MSE depends on the
    activations' scale). The defaults live in params (`sae.validate`) only."""

    max_fvu: float  # fraction of variance unexplained
    min_sparsity: float  # width / mean L0
    max_dead_pct: float  # latents never active on the held-out rows
    min_kl_recovered: float  # spliced KL recovered, every model the SAE is spliced into


def check_sae(m: Mapping[str, float], width: int, criteria: Criteria) -> dict:
    """Pass / fail of one SAE's metrics `m` (from `eval_sae`, plus `kl_recovered*` from `spliced_metrics` where
    they were computed): {"sparsity_ratio", "passed", "failed" (the failed checks, comma-separated, "" if none)}.
    A NaN metric fails its check; without spliced metrics the KL check is not made."""
    l0 = float(m["l0"])
    # no latent ever fires: sparse (the FVU check fails it); a NaN L0 fails the sparsity check
    ratio = width / l0 if l0 > 0 else math.inf if l0 == 0 else math.nan
    checks = {"fvu": float(m["fvu"]) <= criteria.max_fvu, "sparsity": ratio >= criteria.min_sparsity,
              "dead": float(m["dead_pct"]) <= criteria.max_dead_pct}
    kl = [float(v) for k, v in m.items() if k.startswith("kl_recovered")]
    if kl:
        checks["kl_recovered"] = all(v >= criteria.min_kl_recovered for v in kl)
    return {"sparsity_ratio": ratio if math.isfinite(ratio) else None, "passed": all(checks.values()),
            "failed": ",".join(k for k, ok in checks.items() if not ok)}


def evaluate_saes(layers: Sequence[int], sources: Sequence[str], load: Callable[[str, int], TopKSAE], base, tuned,
                  val: np.ndarray, models: ModelLoader, *, view: str, batch_size: int,
                  criteria: Criteria | None = None, log: Callable[[str], None] = print,
                  units: UnitsFn = compute_all) -> tuple[dict, list[dict]]:
    """Every SAE at L<layer>.resid_post on the held-out prompts `val`: `eval_sae` on its source's activations,
    `spliced_metrics` into the model(s) it was trained on (delta and crosscoder only when `tokens_paired`),
    and for a crosscoder `crosscoder_norm_shares`; with `criteria`, `check_sae`'s pass / fail.

    Returns metrics {"<source>_L<layer>": {...}} and the crosscoders' norm-share histogram rows (with layer).
    `load(source, layer)` gives an SAE; `models(name)` a model, its tokenizer and its prompt encoding. `units`
    (`resume.Units`) keeps each SAE's results as they finish, so an interrupted run resumes.
    """
    val = np.asarray(val, dtype=np.int64)
    paired = tokens_paired(base, tuned, val)
    metrics: dict = {}
    norm_rows: list[dict] = []
    for layer in layers:
        site = f"L{layer}.resid_post"
        memo = CleanMemo()  # the models' clean passes at this site, run once for all its SAEs

        def one(source: str, layer: int = layer, site: str = site, memo: CleanMemo = memo
                ) -> tuple[dict, list[dict]]:
            sae = load(source, layer)
            fired = np.zeros(sae.width, dtype=bool)
            m = eval_sae(sae, read_source(source, base, tuned, site, view, rows_of(source, base, tuned, view, val)),
                         fired_out=fired)
            names = ("base", "tuned") if source in ("delta", "crosscoder") else (source,)
            loaded = {n: models(n) for n in names}
            if len(names) == 2 and not (paired and _vocab(loaded["base"][0]) == _vocab(loaded["tuned"][0])):
                log(f"sae_eval: {source}_L{layer}: base and tuned tokenisers differ, so tokens do not pair up: "
                    "no spliced metrics")
            else:
                sp = spliced_metrics({n: v[0] for n, v in loaded.items()}, {n: v[2] for n, v in loaded.items()}, val,
                                     Site(layer), sae, source=source, batch_size=batch_size,
                                     positions="all" if view == "tokens" else "decision",
                                     skip=first_position(tuned if source == "tuned" else base), memo=memo)
                m.update({k: v for k, v in sp.items() if k.startswith(("ce_", "kl_"))})
            rows: list[dict] = []
            if source == "crosscoder":
                counts, hist = crosscoder_norm_shares(sae, live=fired)
                m.update(counts)
                rows = [{"layer": layer, **r} for r in hist]
            if criteria is not None:
                m.update(check_sae(m, sae.width, criteria))
            return m, rows

        for source in sources:
            m, rows = units(f"{source}_L{layer}", lambda source=source, one=one: one(source))
            norm_rows += rows
            metrics[f"{source}_L{layer}"] = m
            rec = "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("ce_recovered"))
            verdict = "" if criteria is None else ("  PASS" if m["passed"] else f"  FAIL ({m['failed']})")
            log(f"sae_eval: {source}_L{layer}: fvu {m['fvu']:.3f} l0 {m['l0']:.1f} dead {m['dead_pct']:.1f}%  "
                f"{rec}{verdict}")
    return metrics, norm_rows
