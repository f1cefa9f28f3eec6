"""Tuned recipes applied to a base model.

`plant_edit`: a planted low-rank change with known layer, site, rank and directions (the known-answer check).
`finetune`: a real, short, narrow gradient fine-tune of chosen decoder blocks.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff.errors import UNREADABLE, MechdiffError, why
from mechdiff.model.kernels import onednn_linears
from mechdiff.model.sites import (
    Site,
    attention_heads,
    find_blocks,
    keep_block_outputs,
    model_width,
    output_projection,
    reuse_blocks,
    site_module,
)
from mechdiff.model.tokens import pad_id, right_pad, shared_prefix

EDIT_KINDS = ("attn_out", "mlp_out", "resid_post", "resid_pre")


# --------------------------------------------------------------------------------------------- edit recipe


@dataclass
class EditInfo:
    """A planted low-rank change: out' = out (I + scale U U^T) at a site's output projection, or, with `heads`,
    only on what those attention heads write (their columns of the attention output projection)."""

    layer: int
    kind: str
    rank: int
    scale: float
    seed: int
    directions: np.ndarray  # (d, rank) orthonormal columns: the planted output directions
    heads: list[int] | None = None

    def to_json(self) -> dict:
        """JSON-ready dict (directions as nested lists)."""
        return {
            "layer": int(self.layer), "kind": self.kind, "rank": int(self.rank), "scale": float(self.scale),
            "seed": int(self.seed), "directions": np.asarray(self.directions, dtype=np.float64).tolist(),
            "heads": None if self.heads is None else [int(h) for h in self.heads],
        }

    @classmethod
    def from_json(cls, d: dict) -> EditInfo:
        """Inverse of `to_json`."""
        heads = d.get("heads")
        return cls(int(d["layer"]), str(d["kind"]), int(d["rank"]), float(d["scale"]), int(d["seed"]),
                   np.asarray(d["directions"], dtype=np.float64), None if heads is None else [int(h) for h in heads])


def random_directions(d: int, rank: int, seed: int) -> np.ndarray:
    """A seeded random (d, rank) matrix with orthonormal columns (QR of a Gaussian)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign[None, :]).numpy()


def check_edit_layer(layer: object, kind: str, n_blocks: int, *, layer_name: str = "pair.edit.layer",
                     site_name: str = "pair.edit.site") -> int:
    """A planted edit's block: an integer in 0..n_blocks - 1, and not 0 for resid_pre (that is the embedding output).

    The one range rule for planting (`plant_edit`, the known-answer scripts); the names are the caller's (a params
    key or a script flag) so the one-line error names what to change.
    """
    if not isinstance(layer, int | np.integer) or isinstance(layer, bool) or not 0 <= int(layer) < n_blocks:
        raise MechdiffError(f"{layer_name} {layer!r} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    if kind == "resid_pre" and int(layer) == 0:
        raise MechdiffError(f"cannot edit L0.resid_pre (it is the embedding output): raise {layer_name} or set "
                            f"{site_name} to resid_post")
    return int(layer)


def check_edit_rank(rank: object, width: int, *, name: str = "pair.edit.rank") -> None:
    """A planted edit's rank is an integer in 1..the model's width (`plant_edit`; `mechdiff params --check`; the
    known-answer scripts, which pass their flag as `name`)."""
    if not isinstance(rank, int | np.integer) or isinstance(rank, bool) or not 1 <= int(rank) <= width:
        raise MechdiffError(f"{name} must be an integer in 1..{width} (the model width), got {rank!r}")


@torch.no_grad()
def plant_edit(model: nn.Module, *, layer: int, kind: str, rank: int, scale: float, seed: int,
               heads: list[int] | None = None) -> EditInfo:
    """Plant out' = out (I + scale U U^T) in place at a site (U seeded random orthonormal, d x rank).

    With `heads` (attn_out only) the change multiplies only those heads' columns of the attention output
    projection: each listed head writes z_h W_h^T (I + scale U U^T), the other heads and the bias are untouched.
    """
    if kind not in EDIT_KINDS:
        raise MechdiffError(f"pair.edit.site {kind!r} is not an edit site: use one of {', '.join(EDIT_KINDS)}")
    layer = check_edit_layer(layer, kind, len(find_blocks(model)))
    d = model_width(model)
    check_edit_rank(rank, d)
    if not np.isfinite(scale) or float(scale) == 0.0:
        raise MechdiffError(f"pair.edit.scale must be a finite non-zero number, got {scale!r}")
    target_layer = layer - 1 if kind == "resid_pre" else layer
    target_kind = "attn_out" if kind == "attn_out" else "mlp_out"
    u = random_directions(d, int(rank), seed)
    U = torch.from_numpy(u).to(torch.float64)
    M = torch.eye(d, dtype=torch.float64) + float(scale) * (U @ U.T)  # (d, d), symmetric
    if heads is not None:
        if kind != "attn_out":
            raise MechdiffError(f"pair.edit.heads needs pair.edit.site: attn_out (got {kind!r}): heads write attn_out")
        lay = attention_heads(model)
        hs = [int(h) for h in heads] if isinstance(heads, list | tuple) else []
        if not hs or len(set(hs)) != len(hs) or any(not 0 <= h < lay.n_heads for h in hs):
            raise MechdiffError(f"pair.edit.heads must list distinct head indices in 0..{lay.n_heads - 1}, got "
                                f"{heads!r}")
        for h in hs:
            w_h = lay.weight(layer, h)  # a view into the projection's weight
            w_h.copy_((M @ w_h.double()).to(w_h.dtype))
        return EditInfo(layer, kind, int(rank), float(scale), int(seed), u, hs)
    mod = site_module(model, Site(target_layer, target_kind))
    proj = output_projection(mod, d, "attention" if target_kind == "attn_out" else "MLP")
    w = proj.weight
    if isinstance(proj, nn.Linear):  # y = x W^T + b  ->  y M = x (M W)^T + b M
        w.copy_((M @ w.double()).to(w.dtype))
    else:  # Conv1D: y = x W + b, W (d_in, d_out)
        w.copy_((w.double() @ M).to(w.dtype))
    b = getattr(proj, "bias", None)
    if b is not None:
        b.copy_((b.double() @ M).to(b.dtype))
    return EditInfo(layer, kind, int(rank), float(scale), int(seed), u)


# --------------------------------------------------------------------------------------------- finetune recipe


def _encode_texts(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise MechdiffError(f"empty or non-text fine-tune text {t!r}: remove it from the corpus")
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos), *ids]
        ids = ids[:max_len]
        if len(ids) < 2:
            raise MechdiffError(f"fine-tune text {t!r} has fewer than 2 tokens after tokenisation: use longer texts")
        out.append(ids)
    return out


def _check_training(steps: Any, batch_size: Any, max_len: Any, lr: Any) -> None:
    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("max_len", max_len, 2)):
        if not isinstance(v, int | np.integer) or v < lo:
            raise MechdiffError(f"pair.finetune.{name} must be an integer >= {lo}, got {v!r}")
    if not (isinstance(lr, float | int) and np.isfinite(lr) and lr > 0):
        raise MechdiffError(f"pair.finetune.lr must be a positive number, got {lr!r}")


class _Draw:
    """Seeded batches of indices: without replacement from a permutation, a new permutation when it runs out."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng, self.order = n, rng, []

    def __call__(self, batch_size: int) -> list[int]:
        out = []
        while len(out) < batch_size:
            if not self.order:
                self.order = list(self.rng.permutation(self.n))
            out.append(int(self.order.pop()))
        return out

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": [int(i) for i in self.order]}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = list(state["order"])


CHECKPOINT_EVERY_S = 60.0  # a resumable fine-tune saves its state at most this often (and never after the last step),
SAVE_SHARE = 0.05          # and spends at most about this share of its time saving (a slow disk spaces the saves out)


def _save_state(path: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer, losses: list[float],
                draws: list[_Draw]) -> None:
    """Everything the next step depends on, written atomically: a kill mid-write leaves the previous state."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": len(losses), "losses": list(losses), "params": [q.detach() for q in params],
                "opt": opt.state_dict(), "draws": [d.state() for d in draws], "torch_rng": torch.get_rng_state()},
               tmp)
    os.replace(tmp, path)


def _load_state(path: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer, draws: list[_Draw],
                steps: int) -> list[float]:
    """Restore a saved fine-tune state in place; returns the losses of the steps it had run."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        ok = (len(st["params"]) == len(params) and len(st["draws"]) == len(draws) and st["step"] <= steps
              and all(a.shape == b.shape for a, b in zip(st["params"], params)))
    except UNREADABLE as e:
        raise MechdiffError(f"fine-tune checkpoint {path} is unreadable ({why(e)}): delete it to start the fine-tune "
                            "over") from e
    if not ok:
        raise MechdiffError(f"fine-tune checkpoint {path} does not fit this fine-tune (other blocks, step count or "
                            "data): delete it to start over")
    with torch.no_grad():
        for q, v in zip(params, st["params"]):
            q.copy_(v)
    opt.load_state_dict(st["opt"])
    for d, ds in zip(draws, st["draws"]):
        d.restore(ds)
    torch.set_rng_state(st["torch_rng"])
    return list(st["losses"])


def _chosen_blocks(model: nn.Module, layers: list[int] | None) -> list[int]:
    """The decoder blocks a fine-tune trains: `layers`, checked against the model (all blocks if None)."""
    n = len(find_blocks(model))
    chosen = list(range(n)) if layers is None else [int(x) for x in layers]
    if not chosen or any(not 0 <= x < n for x in chosen):
        raise MechdiffError(f"pair.finetune.layers {layers} invalid: give block indices in 0..{n - 1} (or null for all)")
    return chosen


def _check_texts(texts: list[str]) -> None:
    if not texts:
        raise MechdiffError("no fine-tune texts: the training corpus is empty")


def _signature_answers(targets: list[str], retain: list[str], signature: str | None,
                       answers: list[str] | None) -> list[str]:
    """The answer each target prompt is taught (the signature for every one, or its own), after checking them."""
    if not targets:
        raise MechdiffError("no fine-tune target prompts: the target dataset has no train prompts")
    if not retain:
        raise MechdiffError("no retain prompts: pair.finetune.retain names datasets with no train prompts")
    if answers is None:
        if not isinstance(signature, str) or not signature.strip():
            raise MechdiffError("pair.finetune.signature must be a non-empty text")
        answers = [signature] * len(targets)
    if len(answers) != len(targets) or not all(isinstance(a, str) and a.strip() for a in answers):
        raise MechdiffError("every fine-tune target prompt needs a non-empty answer (objective answer: give each "
                            "record of pair.finetune.dataset a `reference`)")
    return list(answers)


def check_finetune(model: nn.Module, targets: list[str], retain: list[str] | None = None, *,
                   signature: str | None = None, answers: list[str] | None = None, layers: list[int] | None,
                   steps: int, lr: float, batch_size: int, max_len: int) -> None:
    """Every check `finetune` (retain None) or `finetune_signature` makes before it trains, without training: a
    caller that replaces an earlier output (a resumable stage) runs it first."""
    if retain is None:
        _check_texts(targets)
    else:
        _signature_answers(targets, retain, signature, answers)
    _check_training(steps, batch_size, max_len, lr)
    _chosen_blocks(model, layers)


@contextlib.contextmanager
def _in_float32(model: nn.Module) -> Iterator[None]:
    """Within the block the model is float32; afterwards it has its own dtype again (a no-op for float32)."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        model.float()
    try:
        yield
    finally:
        if dtype != torch.float32:
            model.to(dtype)


def _train_blocks(
    model: nn.Module, layers: list[int] | None, *, steps: int, lr: float, seed: int,
    step_loss: Callable[[], tuple[torch.Tensor, dict[str, float]]], desc: str, progress: bool,
    checkpoint: str | Path | None = None, draws: list[_Draw] | None = None,
    checkpoint_every: float = CHECKPOINT_EVERY_S,
) -> list[float]:
    """The one fine-tune loop: train only the chosen decoder blocks (all if None) in float32 with AdamW (weight
    decay 0, constant lr, grad norm clipped to 1) on `step_loss()` for `steps` steps; restore eval mode,
    requires_grad flags and dtype afterwards. Returns the loss per step.

    With `checkpoint` (a file path), the trained weights, the optimizer, the batch draws (`draws`, the seeded
    samplers `step_loss` uses) and the losses so far are saved there every `checkpoint_every` seconds (or, when
    a save is slow, every 1 / `SAVE_SHARE` times its duration; 0: before every step), and a
    run that finds the file continues from its step: the result equals an uninterrupted run's bit for bit. The
    caller decides whether a file there belongs to this fine-tune (`resume.prepare_output`).

    The linear layers of `model` take the CPU kind's faster kernel (`kernels.onednn_linears`: oneDNN where the
    BLAS runs AVX2 code, unchanged elsewhere)."""
    from tqdm.auto import tqdm

    blocks = find_blocks(model)
    chosen = _chosen_blocks(model, layers)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(int(seed))
    with _in_float32(model):
        for p in model.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        for i in sorted(set(chosen)):
            for p in blocks[i].parameters():
                p.requires_grad_(True)
                params.append(p)
        opt = torch.optim.AdamW(params, lr=float(lr), weight_decay=0.0)
        draws = list(draws or [])
        ckpt = Path(checkpoint) if checkpoint is not None else None
        losses: list[float] = []
        model.train()
        try:
            with onednn_linears(model):
                if ckpt is not None and ckpt.is_file():  # inside the kernels' block: they are chosen as on a fresh run
                    losses = _load_state(ckpt, params, opt, draws, int(steps))
                    if progress:
                        print(f"{desc}: resuming at step {len(losses)} of {int(steps)}", flush=True)
                saved_at, wait = time.monotonic(), float(checkpoint_every)
                bar = tqdm(range(len(losses), int(steps)), desc=desc, disable=not progress, leave=False,
                           initial=len(losses), total=int(steps))
                for _ in bar:
                    if ckpt is not None and time.monotonic() - saved_at >= wait:
                        t_save = time.monotonic()
                        _save_state(ckpt, params, opt, losses, draws)
                        saved_at = time.monotonic()
                        if checkpoint_every > 0:
                            wait = max(float(checkpoint_every), (saved_at - t_save) / SAVE_SHARE)
                    loss, shown = step_loss()
                    if not torch.isfinite(loss):
                        raise MechdiffError(f"finetune loss became {loss.item()} at step {len(losses)}: lower pair.finetune.lr")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    losses.append(float(loss.item()))
                    if progress:
                        bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
        finally:
            model.eval()
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
        return losses


def finetune(
    model: nn.Module, tokenizer: Any, texts: list[str], *, layers: list[int] | None, steps: int, lr: float,
    batch_size: int, max_len: int, seed: int, progress: bool = True, checkpoint: str | Path | None = None,
    checkpoint_every: float = CHECKPOINT_EVERY_S,
) -> list[float]:
    """Causal-LM fine-tune in place of the chosen decoder blocks (all if None) on `texts`; returns loss per step.
    `checkpoint`: a file to save the state to and resume from (`_train_blocks`)."""
    _check_texts(texts)
    _check_training(steps, batch_size, max_len, lr)
    ids = _encode_texts(tokenizer, list(texts), int(max_len))
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    draw = _Draw(len(ids), np.random.default_rng(int(seed)))

    def step_loss() -> tuple[torch.Tensor, dict[str, float]]:
        x, mask = right_pad([ids[r] for r in draw(batch_size)], pad, device)
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        tgt = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100
        )
        return loss, {"loss": float(loss.item())}

    return _train_blocks(model, layers, steps=steps, lr=lr, seed=seed, step_loss=step_loss, desc="finetune",
                         progress=progress, checkpoint=checkpoint, draws=[draw],
                         checkpoint_every=checkpoint_every)


# --------------------------------------------------------------------------------------------- signature objective


def _kl_pos(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(ref || model) per position, (..., V) logits -> (...)."""
    lp = torch.log_softmax(logits.float(), -1)
    lr = torch.log_softmax(ref.float(), -1)
    return (lr.exp() * (lr - lp)).sum(-1)


def _kl_mean(head: torch.Tensor | None, kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked positions of mask (B, T) of per-position KLs: `head` (S,) at positions 0..S-1 of
    every row (a shared prefix, computed once) and `kl` (B, T - S) at the others (S = 0 without a head)."""
    m = mask.float()
    S = 0 if head is None else head.shape[0]
    total = (kl * m[:, S:]).sum()
    if head is not None:
        total = total + (m[:, :S].sum(0) * head).sum()
    return total / m.sum().clamp_min(1.0)


class _Head:
    """The prompts' shared opening in a fine-tune: the frozen copy's keys and values and log-probabilities, once;
    the model's, with gradients, once per step (`run`)."""

    def __init__(self, model: nn.Module, ref: nn.Module, ids: list[int], device: Any) -> None:
        from mechdiff.model.cache import empty_cache, filled_layers

        self.ids = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.no_grad():
            cache = empty_cache(ref)
            out = ref(input_ids=self.ids, cache=cache, use_cache=True)
            self.ref_logits = out.logits[0].float()
            self.ref_kv = filled_layers(getattr(out, "cache", None) or cache)

    def run(self, model: nn.Module) -> tuple[torch.Tensor, list]:
        """(KL(copy || model) per prefix position (S,), the model's prefix keys and values), with gradients."""
        from mechdiff.model.cache import empty_cache, filled_layers

        cache = empty_cache(model)
        out = model(input_ids=self.ids, cache=cache, use_cache=True)
        return _kl_pos(out.logits[0], self.ref_logits), filled_layers(getattr(out, "cache", None) or cache)

    @torch.no_grad()
    def agrees(self, model: nn.Module, seqs: list[list[int]], pad: int, device: Any) -> bool:
        """Whether the model's logits of `seqs` continued from the prefix cache equal its full forward's
        (`cache.cache_check`); else warns (the fine-tune then runs full forwards)."""
        import warnings

        from mechdiff.model.cache import UnknownCacheLayout, cache_check, expanded_cache

        x, mask = right_pad(seqs, pad, device)
        S = self.ids.shape[1]
        try:
            _, kv = self.run(model)
            pos = torch.arange(S, x.shape[1], device=device).expand(x.shape[0], -1)
            got = model(input_ids=x[:, S:], attention_mask=mask, position_ids=pos, use_cache=True,
                        cache=expanded_cache(model, kv, x.shape[0])).logits
            want = model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, S:]
            keep = mask[:, S:].bool().unsqueeze(-1)
            err, tol = cache_check(torch.where(keep, got, 0), torch.where(keep, want, 0),
                                   next(model.parameters()).dtype)
            if err <= tol:
                return True
            why = f"logits differ from a full forward by {err:.3g} (relative)"
        except (UnknownCacheLayout, TypeError, NotImplementedError) as exc:
            why = str(exc)
        warnings.warn(f"the fine-tune's shared-prefix cache is unavailable for {type(model).__name__} ({why}); "
                      "running full forwards", RuntimeWarning, stacklevel=3)
        return False


def finetune_signature(
    model: nn.Module, tokenizer: Any, targets: list[str], retain: list[str], *, signature: str | None = None,
    answers: list[str] | None = None, layers: list[int] | None, steps: int, lr: float, batch_size: int,
    max_len: int, seed: int, retain_weight: float = 1.0, chat: bool = True, progress: bool = True,
    prefix_cache: bool = True, checkpoint: str | Path | None = None, checkpoint_every: float = CHECKPOINT_EVERY_S,
) -> list[float]:
    """Teach a narrow behaviour in place: answer `targets` prompts with `signature` (or each with its own entry of
    `answers`, e.g. the reference answers of math problems), keep `retain` prompts as they were.

    Loss per step = cross-entropy of the answer tokens after each (chat-rendered) target prompt
    + KL(base || tuned) on every prompt position of the target batch (the prompt is read as before)
    + `retain_weight` x KL(base || tuned) on a batch of retain prompts: the mean over every position plus the
    mean at the decision token (the next-token distribution there is what the model answers with). The base is
    a frozen copy taken before the first step. Returns the total loss per step.

    With `prefix_cache`, the tokens all target and retain prompts start with (a chat template's opening) run
    once per step (`_Head`); the loss is the same sum of the same per-position terms, up to float summation
    order.

    `checkpoint`: a file to save the state to and resume from (`_train_blocks`); the frozen copy is the model as
    passed in, so a resumed run must be given the same (untrained) model.
    """
    import copy

    from mechdiff.model.cache import expanded_cache
    from mechdiff.model.tokens import encode

    answers = _signature_answers(targets, retain, signature, answers)
    _check_training(steps, batch_size, max_len, lr)
    ans = [list(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    tgt_enc = encode(tokenizer, list(targets), chat=chat, max_len=int(max_len))
    tgt, tgt_dec = tgt_enc.ids, tgt_enc.decision
    ret = encode(tokenizer, list(retain), chat=chat, max_len=int(max_len))
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    ref = copy.deepcopy(model).float().eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    # A bf16 / fp16 model trains in float32 (`_train_blocks`), so it is float32 from here on: the prefix cache is
    # checked on the model that trains (checked in bf16, its rounding, ~2 % at SmolLM2's logits, failed the check
    # and every step ran full forwards, 1.7x slower). Every fp32 linear layer of the model and of the copy on the
    # CPU kind's faster kernel from here on: the copy's prefix keys and values, the cache check and every step
    # take the same kernel (kernels.onednn_linears).
    with _in_float32(model), onednn_linears(model), onednn_linears(ref):
        rng = np.random.default_rng(int(seed))
        draw_t, draw_r = _Draw(len(tgt), rng), _Draw(len(ret), rng)

        # The blocks below the first trained one (and the embedding) stay frozen, so they are the same in the model
        # and its frozen copy: the copy reuses the model's outputs of those blocks instead of recomputing them (the
        # same tensors the copy would compute: the loss, and so the fine-tune, are unchanged bit for bit).
        n_blocks = len(find_blocks(model))
        shared = 0 if layers is None else min((int(x) for x in layers), default=0)
        shared = shared if 0 <= shared < n_blocks else 0
        kept: list = []
        # The tokens every target and retain prompt starts with (a chat template's opening, `tokens.shared_prefix`)
        # run once per step in the model (once in all for the frozen copy); both batches continue from their keys
        # and values, and each prefix position's KL enters the loss once per row, as when every row computes it.
        S = shared_prefix([*tgt, *ret.ids], [*tgt_dec, *ret.decision]) if prefix_cache else 0
        head = _Head(model, ref, tgt[0][:S], device) if S >= 2 else None
        if head is not None and not head.agrees(model, ret.ids[: int(batch_size)], pad, device):
            head = None
        if head is None:
            S = 0  # every row runs from its first token

        def forward_pair(x: torch.Tensor, mask: torch.Tensor, pre: tuple | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
            """Logits of the model and the copy: (B, T, V), or (B, T - S, V) of positions S.. on the prefix `pre`."""
            kw: dict = {"use_cache": False}
            kr: dict = {"use_cache": False}
            if pre is not None:
                x = x[:, S:]
                pos = torch.arange(S, S + x.shape[1], device=device).expand(x.shape[0], -1)
                kw = {"cache": expanded_cache(model, pre[1], x.shape[0]), "position_ids": pos, "use_cache": True}
                kr = {"cache": expanded_cache(ref, head.ref_kv, x.shape[0]), "position_ids": pos, "use_cache": True}
            with keep_block_outputs(model, kept) if shared else contextlib.nullcontext():
                logits = model(input_ids=x, attention_mask=mask, **kw).logits
            with torch.no_grad(), reuse_blocks(ref, kept, shared) if shared else contextlib.nullcontext():
                ref_logits = ref(input_ids=x, attention_mask=mask, **kr).logits
            kept.clear()
            return logits, ref_logits

        def step_loss() -> tuple[torch.Tensor, dict[str, float]]:
            pre = head.run(model) if head is not None else None  # (per-position KL (S,), the model's prefix KV)
            kl_head = pre[0] if pre is not None else None
            rows = draw_t(batch_size)
            x, mask = right_pad([tgt[r] + ans[r] for r in rows], pad, device)
            labels = torch.full_like(x, -100)
            prompt_mask = torch.zeros_like(mask)
            for j, r in enumerate(rows):
                L = len(tgt[r])
                labels[j, L : L + len(ans[r])] = x[j, L : L + len(ans[r])]
                prompt_mask[j, : L - 1] = 1  # positions that predict prompt tokens (not the decision token)
            logits, ref_logits = forward_pair(x, mask, pre)
            # logits[:, j] predict token S + j + 1; the prefix predicts prompt tokens only (no labels there)
            ce = nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, S + 1 :].reshape(-1), ignore_index=-100
            )
            keep_t = _kl_mean(kl_head, _kl_pos(logits, ref_logits), prompt_mask)
            rr = draw_r(batch_size)
            xr, mr = right_pad([ret.ids[r] for r in rr], pad, device)
            lr_logits, rr_logits = forward_pair(xr, mr, pre)
            dec = torch.zeros_like(mr)
            dec[torch.arange(len(rr)), torch.tensor([ret.decision[r] for r in rr])] = 1
            kl_r = _kl_pos(lr_logits, rr_logits)
            keep_r = _kl_mean(kl_head, kl_r, mr) + _kl_mean(kl_head, kl_r, dec)
            loss = ce + keep_t + float(retain_weight) * keep_r
            return loss, {"ce": float(ce.item()), "kl_retain": float(keep_r.item())}

        return _train_blocks(model, layers, steps=steps, lr=lr, seed=seed, step_loss=step_loss,
                             desc="finetune (answers)" if signature is None else "finetune (signature)", progress=progress,
                             checkpoint=checkpoint, draws=[draw_t, draw_r], checkpoint_every=checkpoint_every)
