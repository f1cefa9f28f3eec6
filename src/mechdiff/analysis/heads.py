"""Head-level diffing (seed 002 RQ4): which attention heads carry the tuned behaviour, in each model and across
the pair, checked by patching.

The behaviour is a scalar per prompt: the summed log-probability of a continuation after the prompt's decision
token, teacher-forced (`behaviour.scored_sequences` builds prompt + continuation as the behaviour metrics score
it). A head is one block of the attention output projection's input (`sites.attention_heads`; grouped-query
attention shares keys and values, not outputs, so every query head is one block).

- `attribution`: per head, grad x act on its block, summed over positions and averaged over prompts, with the
  heads' outputs as independent inputs (each a leaf: a change in one head does not spill into the attribution
  of every head that feeds it); with `ig_steps` > 0, integrated gradients along the straight path from all head
  outputs 0 to their values (the heads then add up to f(z) - f(all heads 0), up to the quadrature error).
- The estimates (base scan with the tuned scan): `pred`, the first-order effect of patching a head's write in from
  the tuned model, and `direct`, the same for the head's own weight change alone (0 for an unchanged head, even
  one that reads a changed residual stream).
- `zscores`, `churn`, `topk_jaccard`: how the two models' head rankings differ.
- `Patcher`: a head's write into the residual stream, z_h W_h^T, replaced in the base by the tuned model's
  (patch: the tuned activation through the tuned weights, so a change in the head's own output weights counts),
  or zeroed in the tuned model (zero); the behaviour change as a share of the base -> tuned gap and the KL to
  the tuned model's next-token distributions on the continuation.
- `cumulative`: the top 1, 2, 4, ... heads (by an estimate, or by |delta attribution|) patched together, and the
  fewest heads that close a target share of the gap (by bisection between the powers of two).
- `diff_heads`: all of it for one pair.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from mechdiff.analysis.behaviour import _hidden, _progress
from mechdiff.errors import MechdiffError
from mechdiff.model.kernels import reuse_transposes
from mechdiff.model.sites import (
    Heads,
    Site,
    attention_heads,
    edit_at,
    edit_heads_at,
    get_body,
    head_logits,
    keep_block_outputs,
    reuse_blocks,
)
from mechdiff.model.tokens import right_pad
from mechdiff.resume import UnitsFn, compute_all
from mechdiff.stats.bootstrap import mean_ci
from mechdiff.stats.kl import kl_divergence, log_softmax

HeadSet = Iterable[tuple[int, int]]
RANK_BY = ("direct", "pred", "delta")  # orders of heads for patching (`diff_heads`)


@dataclass
class Batch:
    """Prompt + continuation sequences, right-padded; continuation token j of the batch is ids[bi[j], ti[j]],
    predicted from position ti[j] - 1, and belongs to row bi[j]; `rows` are the prompts' indices."""

    ids: torch.Tensor
    mask: torch.Tensor
    bi: torch.Tensor
    ti: torch.Tensor
    rows: np.ndarray


def make_batches(seqs: Sequence[Sequence[int]], n_prompt: Sequence[int], n_cont: Sequence[int], *, pad: int,
                 batch_size: int, device: str | torch.device = "cpu") -> list[Batch]:
    """Batches of similar length (`behaviour.scored_sequences` output); every sequence ends in its continuation."""
    if not seqs:
        raise MechdiffError("no prompts to attribute: the head target set is empty")
    if batch_size < 1:
        raise MechdiffError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = []
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids, mask = right_pad([seqs[r] for r in rows], pad, device)
        bi = torch.cat([torch.full((n_cont[r],), b, dtype=torch.long) for b, r in enumerate(rows)])
        ti = torch.cat([torch.arange(n_prompt[r], n_prompt[r] + n_cont[r]) for r in rows])
        out.append(Batch(ids, mask, bi.to(device), ti.to(device), np.asarray(rows)))
    return out


def _score(model: nn.Module, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row summed continuation log-prob (B,) float64, continuation logits (N, V) float32) of one forward."""
    hidden = _hidden(get_body(model)(input_ids=b.ids, attention_mask=b.mask, use_cache=False))
    logits = head_logits(model, hidden[b.bi, b.ti - 1])
    tok = log_softmax(logits).gather(1, b.ids[b.bi, b.ti][:, None])[:, 0]
    scores = torch.zeros(len(b.rows), dtype=torch.float64, device=tok.device).index_add(0, b.bi.to(tok.device), tok)
    return scores, logits


# --------------------------------------------------------------------------------------------- attribution


@dataclass
class Scan:
    """One model on the target: attribution (L, H), the score per prompt, and the heads' outputs per batch."""

    attr: np.ndarray
    scores: np.ndarray
    z: list[list[torch.Tensor]]  # [batch][layer] (B, T, H * head_dim), detached
    logits: list[torch.Tensor]  # [batch] continuation logits (N, V)
    blocks: list[list[Any]]  # [batch][layer] each decoder block's output (`sites.reuse_blocks`)
    pred: np.ndarray | None = None  # (L, H) attribution-patching estimate of patching each head from `other`
    direct: np.ndarray | None = None  # (L, H) the same estimate for the head's own change alone (`other`'s weights
    #                                   on this model's inputs to the layer)


def _block_sum(x: torch.Tensor, mask: torch.Tensor, heads: Heads) -> torch.Tensor:
    """(B, H): x (B, T, H * head_dim) summed over each head's block and the unmasked positions."""
    B, T, _ = x.shape
    return (x.double().view(B, T, heads.n_heads, heads.head_dim).sum(-1) * mask[:, :, None].double()).sum(1)


@reuse_transposes()  # the weights stay as they are: each one's transposed copy for the backward is made once
def attribution(model: nn.Module, batches: Sequence[Batch], *, ig_steps: int = 0, other: Scan | None = None,
                other_model: nn.Module | None = None, progress: bool = False) -> Scan:
    """Per-head attribution of the summed continuation log-prob, averaged over prompts, with each prompt's score
    and the heads' outputs.

    The heads' outputs are the inputs: every head's block of every layer is a leaf of the graph, so the gradient
    of a head is the partial derivative with every other head's output held as it is (the paths through later
    heads are cut; the residual stream, MLPs and norms stay). grad x act: z_h . dF/dz_h. Integrated gradients
    (`ig_steps` > 0): every head output scaled together from 0 to z (midpoint rule), z_h . mean dF/dz_h(alpha z);
    the heads then add up to F(z) - F(all head outputs 0).

    With `other` (the other model's scan on the same batches) and `other_model`, also the attribution-patching
    estimate of patching each head in from the other model: sum over positions of
    (z'_h W'_h^T - z_h W_h^T) . dF/d(attn_out) (`pred`; the total gradient, later heads included, from a second
    backward: `_write_grads`), and the same for the head's own change alone (`direct`):
    z'_h there is the other model's layer (its norm, query, key, value weights) run on this model's input to the
    layer, so a head whose weights did not change has a direct estimate of exactly 0 even when heads before it
    changed what it reads.
    """
    if (other is None) != (other_model is None):
        raise MechdiffError("attribution: pass both `other` (the other model's scan) and `other_model`, or neither")
    heads = attention_heads(model)
    L = heads.n_layers
    n = int(sum(len(b.rows) for b in batches))
    attr = np.zeros((L, heads.n_heads))
    pred = np.zeros((L, heads.n_heads)) if other is not None else None
    direct = np.zeros((L, heads.n_heads)) if other is not None else None
    scores = np.zeros(n)
    zs: list[list[torch.Tensor]] = []
    logits_all: list[torch.Tensor] = []
    blocks: list[list[Any]] = []
    other_heads = attention_heads(other_model) if other_model is not None else None
    bar = _progress(len(batches) * (1 + ig_steps), progress, "heads: attribution")

    def leaves(source: list[torch.Tensor] | None, alpha: float, store: dict):
        """Hooks making every layer's head outputs a leaf (its own value, or alpha x the cached one)."""
        ctxs = []
        for layer in range(L):
            def fn(z: torch.Tensor, layer: int = layer) -> torch.Tensor:
                base = z if source is None else source[layer]
                leaf = (base.detach() * alpha).requires_grad_(True)
                store[layer] = leaf
                return leaf

            ctxs.append(edit_heads_at(model, heads, layer, fn))
        return ctxs

    for bn, b in enumerate(batches):
        z_store: dict[int, torch.Tensor] = {}
        kept: list[Any] = []
        with torch.enable_grad(), contextlib.ExitStack() as st:
            st.enter_context(keep_block_outputs(model, kept))
            for ctx in leaves(None, 1.0, z_store):
                st.enter_context(ctx)
            s, lg = _score(model, b)
            got = torch.autograd.grad(s.sum(), [z_store[layer] for layer in range(L)])  # no parameter collects one
        scores[b.rows] = s.detach().cpu().numpy()
        logits_all.append(lg.detach())
        blocks.append(kept)
        zb = [z_store[layer].detach() for layer in range(L)]
        zs.append(zb)
        bar.update(1)
        grads = list(got)
        if pred is not None:
            out_grads, inputs = _write_grads(model, b, L)
            # both sides of the direct estimate from the same kind of forward (no grad, each block fed the same
            # input), so a layer whose weights did not change gives exactly 0 whatever kernels each path uses
            own_other = _own_outputs(other_model, other_heads, inputs, b)
            own_mine = _own_outputs(model, heads, inputs, b)
        if ig_steps:
            grads = [torch.zeros_like(g) for g in grads]
            for i in range(ig_steps):
                scaled: dict[int, torch.Tensor] = {}
                with torch.enable_grad(), contextlib.ExitStack() as st:
                    for ctx in leaves(zb, (i + 0.5) / ig_steps, scaled):
                        st.enter_context(ctx)
                    s_a, _ = _score(model, b)
                    g_a = torch.autograd.grad(s_a.sum(), [scaled[layer] for layer in range(L)])
                for layer in range(L):
                    grads[layer] += g_a[layer] / ig_steps
                bar.update(1)
        for layer in range(L):
            attr[layer] += _block_sum(zb[layer].double() * grads[layer].double(), b.mask, heads).sum(0).cpu().numpy()
            if pred is not None:
                g = out_grads[layer].detach().double()
                W = heads.matrix(layer).detach().to(g.device, torch.float64)
                Wo = other_heads.matrix(layer).detach().to(g.device, torch.float64)
                mine = zb[layer].double() * (g @ W)
                diff = other.z[bn][layer].to(g.device, torch.float64) * (g @ Wo) - mine
                pred[layer] += _block_sum(diff, b.mask, heads).sum(0).cpu().numpy()
                diff = (own_other[layer].to(g.device, torch.float64) * (g @ Wo)
                        - own_mine[layer].to(g.device, torch.float64) * (g @ W))
                direct[layer] += _block_sum(diff, b.mask, heads).sum(0).cpu().numpy()
    bar.close()
    return Scan(attr / n, scores, zs, logits_all, blocks, None if pred is None else pred / n,
                None if direct is None else direct / n)


def _write_grads(model: nn.Module, b: Batch, n_layers: int) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """(dF/d(attn_out) of every layer along every path, later heads included; every block's input) of one forward:
    the gradient of the attribution-patching estimates (which, unlike grad x act, do not hold later heads fixed)."""
    zero: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}

    def add_zero(t: torch.Tensor, layer: int) -> torch.Tensor:
        zero[layer] = torch.zeros_like(t, requires_grad=True)
        return t + zero[layer]

    def keep_input(t: torch.Tensor, layer: int) -> None:
        inputs[layer] = t.detach()

    with torch.enable_grad(), contextlib.ExitStack() as st:
        for layer in range(n_layers):
            st.enter_context(edit_at(model, Site(layer, "attn_out"), lambda t, layer=layer: add_zero(t, layer)))
            st.enter_context(edit_at(model, Site(layer, "resid_pre"), lambda t, layer=layer: keep_input(t, layer)))
        s, _ = _score(model, b)
        grads = torch.autograd.grad(s.sum(), [zero[layer] for layer in range(n_layers)])
    return list(grads), inputs


@torch.no_grad()
def _own_outputs(model: nn.Module, heads: Heads, inputs: dict[int, torch.Tensor], b: Batch) -> list[torch.Tensor]:
    """Every layer's head outputs z (B, T, H * head_dim) of `model` when each of its decoder blocks reads the
    given input (`inputs[layer]`, another model's input to that block) instead of its own previous block's output:
    one forward, the layers' own change with their inputs held at the other model's."""
    out: dict[int, torch.Tensor] = {}

    def keep(z: torch.Tensor, layer: int) -> None:
        out[layer] = z

    with contextlib.ExitStack() as st:
        for layer in range(heads.n_layers):
            st.enter_context(edit_at(model, Site(layer, "resid_pre"),
                                     lambda t, layer=layer: inputs[layer].to(t.device, t.dtype)))
            st.enter_context(edit_heads_at(model, heads, layer, lambda z, layer=layer: keep(z, layer)))
        get_body(model)(input_ids=b.ids, attention_mask=b.mask, use_cache=False)
    return [out[layer] for layer in range(heads.n_layers)]


# --------------------------------------------------------------------------------------------- rankings


def zscores(a: np.ndarray) -> np.ndarray:
    """(a - mean) / std over every head of one model."""
    a = np.asarray(a, dtype=np.float64)
    sd = a.std()
    if not np.isfinite(sd) or sd == 0:
        raise MechdiffError("every head has the same attribution: nothing to rank (is the target constant?)")
    return (a - a.mean()) / sd


def churn(z_base: np.ndarray, z_tuned: np.ndarray, threshold: float) -> float:
    """Share of heads whose z-score moved by more than `threshold`."""
    return float(np.mean(np.abs(np.asarray(z_tuned) - np.asarray(z_base)) > threshold))


def top_heads(a: np.ndarray, k: int, then: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The k heads of largest |a| (ties by largest |then| when given, then by index), as (layer, head)."""
    key = -np.abs(np.asarray(a)).ravel()
    flat = (np.argsort(key, kind="stable") if then is None
            else np.lexsort((-np.abs(np.asarray(then)).ravel(), key)))[: int(k)]
    return [tuple(int(x) for x in np.unravel_index(i, np.shape(a))) for i in flat]


def topk_jaccard(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Jaccard overlap of the top-k heads by |attribution| of two models."""
    sa, sb = set(top_heads(a, k)), set(top_heads(b, k))
    return len(sa & sb) / len(sa | sb)


# --------------------------------------------------------------------------------------------- patching


class Patcher:
    """Head patching and zero ablation on fixed batches, scored against the base -> tuned gap."""

    def __init__(self, base: nn.Module, tuned: nn.Module, batches: Sequence[Batch], base_scan: Scan,
                 tuned_scan: Scan) -> None:
        self.base, self.tuned, self.batches = base, tuned, list(batches)
        self.hb, self.ht = attention_heads(base), attention_heads(tuned)
        if (self.hb.n_layers, self.hb.n_heads, self.hb.head_dim) != (self.ht.n_layers, self.ht.n_heads,
                                                                      self.ht.head_dim):
            raise MechdiffError("base and tuned models differ in their attention heads: head patching needs one "
                                "architecture")
        self.base_scan, self.tuned_scan = base_scan, tuned_scan
        self.s_base, self.s_tuned = float(base_scan.scores.mean()), float(tuned_scan.scores.mean())
        self.gap = self.s_tuned - self.s_base
        if not abs(self.gap) > 1e-9:
            raise MechdiffError(f"base and tuned score the head target alike (gap {self.gap:.2e} nats): nothing to "
                                "attribute; choose heads.dataset / heads.target where the behaviour differs")
        self.kl_base = self._kl(base_scan.logits)

    def _kl(self, logits: Sequence[torch.Tensor]) -> float:
        """Mean over prompts of the mean over continuation tokens of KL(tuned || model)."""
        per_row = []
        for b, lg, lt in zip(self.batches, logits, self.tuned_scan.logits):
            kl = kl_divergence(lt, lg.to(lt.device))
            tot = torch.zeros(len(b.rows), dtype=torch.float64, device=kl.device).index_add(0, b.bi.to(kl.device), kl)
            cnt = torch.bincount(b.bi, minlength=len(b.rows)).to(kl.device)
            per_row.append((tot / cnt).cpu().numpy())
        return float(np.concatenate(per_row).mean())

    @torch.no_grad()
    def _run(self, model: nn.Module, scan: Scan, upto: int, hooks) -> tuple[float, float]:
        """Mean score and KL to tuned of `model` with the edits of `hooks(batch)`, none before block `upto`."""
        scores, logits = [], []
        for bn, b in enumerate(self.batches):
            with contextlib.ExitStack() as st:
                st.enter_context(reuse_blocks(model, scan.blocks[bn], upto))
                for ctx in hooks(bn):
                    st.enter_context(ctx)
                s, lg = _score(model, b)
            scores.append(s.cpu().numpy())
            logits.append(lg)
        return float(np.concatenate(scores).mean()), self._kl(logits)

    def _by_layer(self, heads: HeadSet) -> dict[int, list[int]]:
        """{layer: [head, ...]} of a head set, checked: in range, no head twice."""
        by_layer: dict[int, list[int]] = {}
        seen: set[tuple[int, int]] = set()
        for layer, h in heads:
            lh = (int(layer), int(h))
            if not (0 <= lh[0] < self.hb.n_layers and 0 <= lh[1] < self.hb.n_heads) or lh in seen:
                raise MechdiffError(f"head {lh} is out of range (layers 0..{self.hb.n_layers - 1}, heads "
                                    f"0..{self.hb.n_heads - 1}) or listed twice")
            seen.add(lh)
            by_layer.setdefault(lh[0], []).append(lh[1])
        return by_layer

    def patch(self, heads: HeadSet) -> dict[str, float]:
        """Base forwards with each head's write replaced by the tuned model's: score change, gap share, KL."""
        by_layer = self._by_layer(heads)

        def hooks(bn: int):
            out = []
            for layer, hs in by_layer.items():
                seen: dict[str, torch.Tensor] = {}
                zt = self.tuned_scan.z[bn][layer]
                Wb, Wt = self.hb.matrix(layer), self.ht.matrix(layer)

                def read(z: torch.Tensor, seen: dict = seen) -> None:
                    seen["z"] = z

                def write(t: torch.Tensor, seen: dict = seen, zt: torch.Tensor = zt, Wb: torch.Tensor = Wb,
                          Wt: torch.Tensor = Wt, hs: list[int] = hs) -> torch.Tensor:
                    add = torch.zeros_like(t)
                    for h in hs:
                        sl = self.hb.block(h)
                        add = (add + zt[..., sl].to(t.device, t.dtype) @ Wt[:, sl].T.to(t.device, t.dtype)
                               - seen["z"][..., sl] @ Wb[:, sl].T)
                    return t + add

                out += [edit_heads_at(self.base, self.hb, layer, read), edit_at(self.base, Site(layer, "attn_out"), write)]
            return out

        s, kl = self._run(self.base, self.base_scan, min(by_layer, default=0), hooks)
        return {"effect": s - self.s_base, "share": (s - self.s_base) / self.gap, "kl": kl,
                "kl_share": 1.0 - kl / self.kl_base if self.kl_base > 0 else float("nan")}

    def zero(self, heads: HeadSet) -> dict[str, float]:
        """Tuned forwards with the heads' outputs zeroed: score change and the share of the gap it removes."""
        by_layer = self._by_layer(heads)

        def hooks(_bn: int):
            out = []
            for layer, hs in by_layer.items():
                def fn(z: torch.Tensor, hs: list[int] = hs) -> torch.Tensor:
                    z = z.clone()
                    for h in hs:
                        z[..., self.ht.block(h)] = 0
                    return z

                out.append(edit_heads_at(self.tuned, self.ht, layer, fn))
            return out

        s, kl = self._run(self.tuned, self.tuned_scan, min(by_layer, default=0), hooks)
        return {"effect": self.s_tuned - s, "share": (self.s_tuned - s) / self.gap, "kl": kl}


def cumulative(patcher: Patcher, order: Sequence[tuple[int, int]], target: float, *,
               progress: bool = False, units: UnitsFn = compute_all
               ) -> tuple[list[dict[str, float]], int | None]:
    """Patch the first 1, 2, 4, ... heads of `order` (and all of them) together; the fewest heads whose joint
    patch closes `target` of the gap (bisection between the powers of two; None when all heads do not).
    `units` (`resume.Units`) keeps each joint patch as it finishes."""
    N = len(order)
    ns = sorted({min(2**i, N) for i in range(int(np.ceil(np.log2(max(N, 1)))) + 1)} | {N})
    done: dict[int, dict[str, float]] = {}
    bar = _progress(len(ns), progress, "heads: cumulative")

    def at(n: int) -> dict[str, float]:
        if n not in done:
            heads = ",".join(f"L{a}H{b}" for a, b in order[:n])  # the heads themselves: the order is recomputed
            done[n] = units(f"cumulative/{hashlib.sha256(heads.encode()).hexdigest()[:16]}",
                            lambda: patcher.patch(order[:n]))
        return done[n]

    first = None
    prev = 0
    for n in ns:
        if at(n)["share"] >= target and first is None:
            lo, hi = prev, n  # share(lo) < target <= share(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if at(mid)["share"] >= target else (mid, hi)
            first = hi
        prev = n
        bar.update(1)
    bar.close()
    rows = [{"n_heads": n, "share": v["share"], "kl_share": v["kl_share"], "effect": v["effect"]}
            for n, v in sorted(done.items())]
    return rows, first


# --------------------------------------------------------------------------------------------- one pair


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def diff_heads(base: nn.Module, tuned: nn.Module, batches: Sequence[Batch], *, z_threshold: float = 2.0,
               abs_threshold: float = 0.1, top_k: int = 10, n_patch: int = 10, n_random: int = 10,
               target_effect: float = 0.5, ig_steps: int = 0, rank_by: str = "pred", seed: int = 0,
               progress: bool = False, units: UnitsFn = compute_all
               ) -> dict[str, Any]:
    """Attribution in both models, churn and overlap, single-head patching and zero ablation of the top heads and
    of a seeded random sample of the others, and the cumulative patching curve.

    Heads are ranked for patching by `rank_by`: "direct" (|the estimate for the head's own change|: zero for a
    head whose weights and layer norm did not change, even when heads before it changed what it reads; ties
    broken by |pred|), "pred"
    (|attribution-patching estimate|: the first-order effect of patching the head's whole write, zero for a head
    whose output and weights did not change; heads after a changed one relay part of its change and rank with
    it) or "delta" (|attribution in tuned - attribution in base|, the seed's ranking; it also moves for heads
    that did not change, because their gradient passes through parts that did).

    Returns {"base", "tuned", "delta", "z_base", "z_tuned", "pred", "direct" (L, H) arrays, "patched" (one dict
    per patched head), "curve" (cumulative rows), "metrics"}. `units` (`resume.Units`) keeps each head's patch and
    each joint patch as they finish, so an interrupted run redoes only the attribution and the rest.
    """
    if rank_by not in RANK_BY:
        raise MechdiffError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    ts = attribution(tuned, batches, ig_steps=ig_steps, progress=progress)
    bs = attribution(base, batches, ig_steps=ig_steps, other=ts, other_model=tuned, progress=progress)
    delta = ts.attr - bs.attr
    zb, zt = zscores(bs.attr), zscores(ts.attr)
    L, H = delta.shape
    patcher = Patcher(base, tuned, batches, bs, ts)
    # by direct, the heads whose weights did not change tie at 0: those relaying the change come first
    order = (top_heads(bs.direct, L * H, then=bs.pred) if rank_by == "direct"
             else top_heads(bs.pred if rank_by == "pred" else delta, L * H))
    top = order[: min(int(n_patch), L * H)]
    rest = order[len(top):]
    rng = np.random.default_rng(int(seed))
    pick = sorted(rng.choice(len(rest), size=min(int(n_random), len(rest)), replace=False).tolist()) if rest else []
    chosen = [(lh, "top") for lh in top] + [(rest[i], "random") for i in pick]
    patched = []
    bar = _progress(len(chosen), progress, "heads: patching")
    for (layer, h), group in chosen:
        p, zr = units(f"patch/L{layer}H{h}", lambda lh=(layer, h): (patcher.patch([lh]), patcher.zero([lh])))
        patched.append({
            "layer": layer, "head": h, "group": group, "rank": order.index((layer, h)) + 1,
            "delta_attr": float(delta[layer, h]), "pred": float(bs.pred[layer, h]),
            "direct": float(bs.direct[layer, h]),
            "attr_tuned": float(ts.attr[layer, h]), "patch_effect": p["effect"], "patch_share": p["share"],
            "patch_kl": p["kl"], "patch_kl_share": p["kl_share"], "zero_effect": zr["effect"], "zero_share": zr["share"],
        })
        bar.update(1)
    bar.close()
    curve, n_target = cumulative(patcher, order, target_effect, progress=progress, units=units)
    col = {k: [r[k] for r in patched] for k in patched[0]} if patched else {}
    # the gap every share divides by, with its paired bootstrap CI over prompts: a CI that reaches 0 makes the
    # shares (patch_share, zero_share, the curve, heads_for_target) ratios of noise
    _, gap_lo, gap_hi = mean_ci(ts.scores - bs.scores, n_boot=1000, seed=seed)  # one prompt: [gap, gap]
    metrics = {
        "n_layers": L, "n_heads": H, "n_prompts": int(len(bs.scores)), "ig_steps": int(ig_steps),
        "score_base": patcher.s_base, "score_tuned": patcher.s_tuned, "gap": patcher.gap,
        "gap_lo": gap_lo, "gap_hi": gap_hi, "gap_significant": bool(len(bs.scores) > 1 and (gap_lo > 0 or gap_hi < 0)),
        "kl_tuned_base": patcher.kl_base,
        "churn": churn(zb, zt, z_threshold), "churn_abs": float(np.mean(np.abs(delta) > abs_threshold)),
        "n_churn": int(np.sum(np.abs(zt - zb) > z_threshold)),
        "jaccard_top_k": topk_jaccard(bs.attr, ts.attr, top_k), "top_k": int(top_k),
        "churn_pred": float(np.mean(np.abs(bs.pred) > abs_threshold)),
        "churn_direct": float(np.mean(np.abs(bs.direct) > abs_threshold)), "rank_by": rank_by,
        "spearman_patch": _spearman(np.abs(col.get("delta_attr", [])), np.abs(col.get("patch_share", []))),
        "spearman_zero": _spearman(np.abs(col.get("attr_tuned", [])), np.abs(col.get("zero_share", []))),
        "spearman_pred": _spearman(col.get("pred", []), col.get("patch_share", [])),
        "spearman_direct": _spearman(col.get("direct", []), col.get("patch_share", [])),
        "heads_for_target": n_target, "target_effect": float(target_effect),
        "share_all_heads": curve[-1]["share"], "share_top1": curve[0]["share"],
        "top_base": [list(x) for x in top_heads(bs.attr, 5)], "top_tuned": [list(x) for x in top_heads(ts.attr, 5)],
        "top_delta": [list(x) for x in top_heads(delta, 5)], "top_pred": [list(x) for x in top_heads(bs.pred, 5)],
        # heads with a direct estimate of exactly 0 (their own weights did not change) are never listed
        "top_direct": [list(x) for x in top_heads(bs.direct, min(5, int(np.count_nonzero(bs.direct))))],
    }
    return {"base": bs.attr, "tuned": ts.attr, "delta": delta, "z_base": zb, "z_tuned": zt, "pred": bs.pred,
            "direct": bs.direct, "patched": patched, "curve": curve, "metrics": metrics}


def head_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per head (layer, head, attributions, z-scores, delta z, attribution-patching estimates)."""
    L, H = res["delta"].shape
    return [{"layer": layer, "head": h, "label": f"L{layer}H{h}", "base": float(res["base"][layer, h]),
             "tuned": float(res["tuned"][layer, h]), "delta": float(res["delta"][layer, h]),
             "z_base": float(res["z_base"][layer, h]), "z_tuned": float(res["z_tuned"][layer, h]),
             "dz": float(res["z_tuned"][layer, h] - res["z_base"][layer, h]), "pred": float(res["pred"][layer, h]),
             "direct": float(res["direct"][layer, h])}
            for layer in range(L) for h in range(H)]
