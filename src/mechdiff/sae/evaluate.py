"""SAE evaluation: FVU, L0, dead %, MSE on held-out activations; CE / KL recovered with the reconstruction spliced in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site, _hooks, _register_read, capture, model_width, site_module
from mechdiff.model.tokens import Encoded, batches
from mechdiff.sae.model import TopKSAE

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
def eval_sae(sae: TopKSAE, X: np.ndarray | torch.Tensor, *, batch_size: int = 4096) -> dict:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2, mean L0, dead % (never active on X), MSE per element."""
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
    return {
        "fvu": sse / sst if sst > 0 else float("nan"),
        "l0": l0 / n,
        "dead_pct": 100.0 * float((~fired).float().mean()),
        "mse": sse / (n * sae.d_total),
        "n": n,
    }


@contextlib.contextmanager
def _splice(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the site's activation tensor t (B, T, d) becomes fn(t)."""
    with _hooks([_register_read(site_module(model, site), site.kind, fn)]):
        yield


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


SPLICE_SOURCES = ("base", "tuned", "delta", "crosscoder")
_PAIR = ("base", "tuned")
_KINDS = ("clean", "sae", "zero")
# flat clean activations {model: (N, d) float32} at the spliced positions -> {"sae"|"zero": {target model: (N, d)}}
Replace = Callable[[Mapping[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _vocab(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or not hasattr(emb, "num_embeddings"):
        raise MechdiffError(f"{type(model).__name__} has no input embedding: it is not a supported causal LM")
    return int(emb.num_embeddings)


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
            if any(shared.ids[r] != enc[m].ids[r] or shared.decision[r] != enc[m].decision[r] for r in rows):
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


def _select(t: torch.Tensor, positions: str, pos: torch.Tensor) -> torch.Tensor:
    """The spliced rows of a site activation (B, T, d): "all" = every position but the sink at 0, flattened."""
    if positions == "all":
        return t[:, 1:].reshape(-1, t.shape[-1])
    return t[torch.arange(t.shape[0], device=t.device), pos.to(t.device)]


def _put(v: torch.Tensor, positions: str, pos: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A splice function writing the rows `v` (as laid out by `_select`) into the site activation."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if positions == "all":
            t[:, 1:] = v.reshape(t.shape[0], t.shape[1] - 1, -1).to(device=t.device, dtype=t.dtype)
        else:
            t[torch.arange(t.shape[0], device=t.device), pos.to(t.device)] = v.to(device=t.device, dtype=t.dtype)
        return t

    return fn


def _keep(store: dict[str, torch.Tensor], name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A splice function that records the site activation under `name` and leaves it unchanged."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        store[name] = t.detach()
        return t

    return fn


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    dev = _device(model)
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float()


def _add_losses(acc: dict[str, float], kind: str, lg: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                pos: torch.Tensor, logp_ref: torch.Tensor) -> None:
    """Add the summed next-token CE (valid pairs) and decision-token KL(p || p_ref) of logits (B, T, V)."""
    ids, mask, pos = ids.to(lg.device), mask.to(lg.device), pos.to(lg.device)
    lp_dec = F.log_softmax(lg[torch.arange(lg.shape[0], device=lg.device), pos], -1)
    acc[f"kl_{kind}"] += float(_kl_rows(lp_dec, logp_ref.to(lg.device)).sum())
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    ce = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    acc[f"ce_{kind}"] += float((ce.view_as(valid) * valid).sum())


@torch.no_grad()
def _spliced_totals(models: Mapping[str, nn.Module], enc: Encoded, rows: np.ndarray, site: Site,
                    reads: tuple[str, ...], targets: tuple[str, ...], replace: Replace,
                    refs: Mapping[str, torch.Tensor], *, batch_size: int, positions: str, pad: int
                    ) -> tuple[dict[str, dict[str, float]], int, int]:
    """Summed CE / KL per target model and kind over the prompts `rows`: (totals, n_prompts, n_tokens)."""
    where = {int(r): i for i, r in enumerate(rows)}
    tot = {t: {f"{m}_{k}": 0.0 for m in ("ce", "kl") for k in _KINDS} for t in targets}
    n_tok = n_rows = 0
    for brows, ids, mask, pos in batches(enc, rows, batch_size, pad, device=_device(models[targets[0]])):
        acts: dict[str, torch.Tensor] = {}
        clean: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys((*targets, *reads)):
            model = models[name]
            if name in targets:  # its clean forward gives the logits and, read on the way, the site activation
                with _splice(model, site, _keep(acts, name)):
                    clean[name] = _logits(model, ids, mask)
            else:
                dev = _device(model)
                acts[name] = capture(model, ids.to(dev), mask.to(dev), [site])[0][site.name]
        new = replace({n: _select(acts[n], positions, pos).float() for n in reads})
        for name in targets:
            lg = clean.pop(name)
            if name in refs:
                ref_b = refs[name][[where[int(r)] for r in brows]]
                if ref_b.shape[-1] != lg.shape[-1]:
                    raise MechdiffError(f"ref_logits ({name}) have {ref_b.shape[-1]} columns but the model gives "
                                        f"{lg.shape[-1]} logits")
            else:
                ref_b = lg[torch.arange(lg.shape[0], device=lg.device), pos.to(lg.device)]
            logp_ref = F.log_softmax(ref_b.to(lg.device), -1)
            _add_losses(tot[name], "clean", lg, ids, mask, pos, logp_ref)
            for kind in ("sae", "zero"):
                with _splice(models[name], site, _put(new[kind][name], positions, pos)):
                    _add_losses(tot[name], kind, _logits(models[name], ids, mask), ids, mask, pos, logp_ref)
        n_tok += int((mask[:, 1:].bool() & mask[:, :-1].bool()).sum())
        n_rows += ids.shape[0]
    return tot, n_rows, n_tok


def _recovered(zero: float, sae_v: float, clean: float) -> float:
    den = zero - clean
    return (zero - sae_v) / den if abs(den) > 1e-12 else float("nan")


@torch.no_grad()
def spliced_metrics(model: nn.Module | Mapping[str, nn.Module], enc: Encoded | Mapping[str, Encoded],
                    rows: Sequence[int] | np.ndarray, site: Site, sae: TopKSAE, ref_logits: RefLogits = None, *,
                    source: str | None = None, batch_size: int = 8, positions: str = "all", pad: int = 0) -> dict:
    """CE / KL recovered when the SAE reconstruction replaces the site's activation (vs zero-ablation).

    Sources (`source`; `model` one model, or {"base": ..., "tuned": ...} by name, `enc` one Encoded or one
    per model, which must then hold the same tokens for delta / crosscoder):
      single (source None, "base" or "tuned"): the site activation x becomes sae(x), zero-ablation x -> 0;
      "delta" (trained on tuned - base): the tuned model's x_t becomes x_b + sae(x_t - x_b), with x_b the base
        model's activation on the same tokens; zero-ablation x_t -> x_b (delta zeroed); clean = tuned;
      "crosscoder" (n_blocks=2): [x_b, x_t] is encoded once, the base block of the reconstruction is spliced
        into the base model and the tuned block into the tuned model; zero-ablation zeroes each; keys per
        model get a `_base` / `_tuned` suffix.
    `positions="all"` splices every prompt position but the first (the standard; position 0 is an attention sink
    left out of SAE training); `"decision"` only the decision token.
    CE = mean next-token cross-entropy over the prompt's own tokens (positions 0..len-2; "all" only);
    KL = KL(p_patched || p_ref) at the decision token, p_ref from `ref_logits` (len(rows), V) in the order of
    `rows` (a dict by model for a crosscoder), or the clean model's logits when None.
    recovered = (L_zero - L_sae) / (L_zero - L_clean).
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
    tot, n_rows, n_tok = _spliced_totals(models, shared, rows, site, reads, targets, replace, refs,
                                         batch_size=batch_size, positions=positions, pad=pad)
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
