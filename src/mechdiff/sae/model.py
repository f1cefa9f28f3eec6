"""TopK / BatchTopK sparse autoencoder (and crosscoder) with AuxK and a sparse forward/backward.

One class serves every source: a plain SAE on one model's activations (`n_blocks=1`), a delta SAE on
tuned - base (`n_blocks=1`), and a crosscoder on the concatenation [x_base, x_tuned] (`n_blocks=2`: one
latent space, the decoder column of each latent split into one block per model).

Maths (Gao et al. 2024, arXiv 2406.04093), with x_n = input_scale * x the normalised input:

    pre   = W_enc (x_n - b_pre) + b_enc
    z     = ReLU(TopK_k(pre))                 (BatchTopK: top k*B over the batch at train time,
                                               `pre > threshold` at inference)
    x_hat = (W_dec z + b_pre) / input_scale

Decoder columns have unit norm (the joint column across blocks for a crosscoder). The parameters live in
normalised space; `input_scale` is chosen so that E||x_n||^2 = d_in * n_blocks and is stored with the SAE.

Training loss (normalised MSE, scale free):

    L_main = sum_b ||x_n - x_hat_n||^2 / sum_b ||x_n - mean_b(x_n)||^2            (the batch FVU)
    L_aux  = sum_b ||e - e_hat||^2 / sum_b ||e||^2,  e = x_n - x_hat_n (detached),
             e_hat = W_dec ReLU(TopK_{k_aux}(pre restricted to dead latents))   (no b_pre)
    L      = L_main + aux_coef * L_aux,  aux_coef = 1/32 by default.

Cost of one training step (sparse path): one dense encoder matmul (B, D) x (D, width) into a reused scratch
buffer, serving both the TopK and the AuxK selection (the AuxK top-k runs on its dead columns only, and costs
nothing when no latent is dead); the TopK values are read off that matmul. Everything after touches only the
B*k selected (row, latent) pairs: the decoder is an embedding bag over the active columns, and custom autograd
functions give the gradients through sampled dot products (`torch.sparse.sampled_addmm`, for d vals) and
embedding bags over the pairs sorted by latent (for d W_enc and d W_dec, whose rows of unselected latents are
zero). The dense (B, width) latent matrix is never formed. AuxK does the same when it selects few of the dead
latents; when the dead latents are few enough that its selection fills a large share of them (n_dead <=
AUX_DENSE_FILL x k_aux, the usual case) it runs as small dense products over the dead columns instead, which
costs less than B x k_aux pairs of full-width rows. The dense path (`sparse=False`) is the plain autograd
reference; all give the same gradients up to float summation order.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mechdiff.errors import MechdiffError
from mechdiff.io import to_jsonable
from mechdiff.model.kernels import linear, onednn_fp32


def _bag(indices: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_n weights[n] table[indices[n]] over bag b = [offsets[b], offsets[b+1]) (empty bag -> 0)."""
    return F.embedding_bag(indices, table.detach(), offsets, mode="sum",
                           per_sample_weights=weights.detach().contiguous())


def _sort_key(key: torch.Tensor, bound: int) -> torch.Tensor:
    """Integer sort key in int32 when `bound` fits (1-D int64 sorts take a far slower path on CPU)."""
    return key.to(torch.int32) if bound < 2 ** 31 else key


def _rowdot(pat: _Pattern, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Values of (a @ b.T) at the pattern, i.e. the dot products a[rows[n]] . b[cols[n]] (sampled dense product)."""
    zeros = torch.zeros(pat.cols.shape[0], dtype=a.dtype, device=a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        sp = torch.sparse_csr_tensor(pat.crow, pat.cols, zeros, (a.shape[0], pat.width), check_invariants=False)
    return torch.sparse.sampled_addmm(sp, a.contiguous(), b.t()).values()


class _Pattern:
    """Active (row, col) pairs of a sparse latent batch: rows ascending, cols ascending within a row (CSR).

    The column-major view (`by_col`: the pairs sorted by latent, with per-latent offsets) is built once on
    demand and shared by the encoder and decoder backward passes, which reduce over latents.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, width: int,
                 crow: torch.Tensor | None = None) -> None:
        self.rows, self.cols, self.n_rows, self.width = rows, cols, n_rows, width
        if crow is None:
            crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
            crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
        self.crow = crow
        self.xc: torch.Tensor | None = None  # x - b_pre of the step, when the caller already has it
        self._by_col: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_topk(cls, idx: torch.Tensor, width: int) -> _Pattern:
        """Pattern of a (B, k) index matrix (each row sorted ascending)."""
        B, k = idx.shape
        rows = torch.arange(B, device=idx.device).repeat_interleave(k)
        crow = torch.arange(0, B * k + 1, k, device=idx.device)
        return cls(rows, idx.reshape(-1), B, width, crow)

    def by_col(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perm, rows[perm], col_offsets): the pairs in latent order and where each latent's run starts."""
        if self._by_col is None:
            perm = torch.argsort(_sort_key(self.cols, self.width), stable=True)
            counts = torch.bincount(self.cols, minlength=self.width)
            self._by_col = (perm, self.rows[perm], counts.cumsum(0) - counts)
        return self._by_col

    def scatter_rows(self, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(width, D) matrix G[c] = sum over pairs n with cols[n] = c of w[n] * table[rows[n]]."""
        perm, rows_c, off = self.by_col()
        return _bag(rows_c, table, off, w[perm])


class _DeadColumns(NamedTuple):
    """The dense form of an AuxK selection: the dead latents' ids and a (B, n_dead) bool mask of the ones selected
    per row (None: every dead latent is selected in every row)."""

    idx: torch.Tensor
    mask: torch.Tensor | None


class _SparseEncode(torch.autograd.Function):
    """vals[n] = (x - b_pre)[rows[n]] . W_enc[cols[n]] + b_enc[cols[n]] with a sparse backward.

    `known` (optional) holds these values already (gathered from the selection matmul); otherwise they are
    computed as sampled dot products. Backward: dW_enc[c] = sum_n g[n] (x - b_pre)[rows[n]] over the pairs
    of latent c (an embedding bag over the latent-sorted pairs), db_enc = index_add of g, db_pre =
    -db_enc @ W_enc, dx[r] = sum_n g[n] W_enc[cols[n]].
    """

    @staticmethod
    def forward(ctx, x, b_pre, W_enc, b_enc, pat: _Pattern, known):  # type: ignore[override]
        xc = pat.xc if pat.xc is not None else x - b_pre
        if known is not None:
            vals = known.clone()
        else:
            vals = _rowdot(pat, xc, W_enc) + b_enc[pat.cols]
        ctx.save_for_backward(xc, W_enc)
        ctx.pat = pat
        return vals

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        xc, W_enc = ctx.saved_tensors
        pat: _Pattern = ctx.pat
        g = g.contiguous()
        gx = gbp = gW = gb = None
        if ctx.needs_input_grad[2]:
            gW = pat.scatter_rows(g, xc)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[1]:
            gb_full = torch.zeros(pat.width, dtype=g.dtype, device=g.device).index_add_(0, pat.cols, g)
            if ctx.needs_input_grad[3]:
                gb = gb_full
            if ctx.needs_input_grad[1]:
                gbp = -(gb_full @ W_enc)
        if ctx.needs_input_grad[0]:
            gx = _bag(pat.cols, W_enc, pat.crow[:-1], g)
        return gx, gbp, gW, gb, None, None


# _SparseEncode and _SparseDecode share the autograd.Function layout (save, then per-input gradients) by
# design: each is one sparse kernel pair, and merging them would hide which gradient belongs to which input.
class _SparseDecode(torch.autograd.Function):
    """out[r] = sum_n vals[n] dec[cols[n]] over the active entries of row r, with a sparse backward.

    Forward is an embedding bag over the active columns; backward: dvals[n] = g[rows[n]] . dec[cols[n]]
    (sampled dot products) and ddec[c] = sum_n vals[n] g[rows[n]] over the pairs of latent c.
    """

    @staticmethod
    def forward(ctx, vals, dec, pat: _Pattern):  # type: ignore[override]
        out = _bag(pat.cols, dec, pat.crow[:-1], vals)
        ctx.save_for_backward(vals, dec)
        ctx.pat = pat
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        vals, dec = ctx.saved_tensors
        pat: _Pattern = ctx.pat
        g = g.contiguous()
        gv = gd = None
        if ctx.needs_input_grad[0]:
            gv = _rowdot(pat, g, dec)
        if ctx.needs_input_grad[1]:
            gd = pat.scatter_rows(vals, g)
        return gv, gd, None


# AuxK runs dense over the dead columns when n_dead <= this x k_aux. Measured (B 1024, width 4608, k_aux 288, d 576
# and 1152, 2 cores): a whole training step is faster dense up to n_dead ~6-8 x k_aux, 1.8x at n_dead = k_aux.
AUX_DENSE_FILL = 4


class TopKSAE(nn.Module):
    """TopK (or BatchTopK) SAE; `n_blocks=2` makes it a crosscoder over [x_base, x_tuned].

    `jumprelu=True`: an imported JumpReLU (or ReLU) SAE (`sae.pretrained`): inference keeps each latent above its
    own threshold (`set_thresholds`); it is never trained here."""

    def __init__(self, d_in: int, width: int, k: int, *, k_aux: int | None = None, batchtopk: bool = False,
                 n_blocks: int = 1, seed: int = 0, jumprelu: bool = False) -> None:
        super().__init__()
        for name, v in (("d_in", d_in), ("width", width), ("k", k), ("n_blocks", n_blocks)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MechdiffError(f"SAE {name} must be a positive int, got {v!r}")
        if k > width:
            raise MechdiffError(f"SAE k={k} exceeds width={width}: lower k or widen the SAE")
        self.d_in, self.width, self.k, self.n_blocks = d_in, width, k, n_blocks
        self.k_aux = int(k_aux) if k_aux is not None else max(1, d_in // 2)
        self.batchtopk = bool(batchtopk)
        self.jumprelu = bool(jumprelu)
        D = d_in * n_blocks
        gen = torch.Generator().manual_seed(int(seed))
        dec = torch.randn(width, D, generator=gen)
        dec /= dec.norm(dim=1, keepdim=True)
        self.dec = nn.Parameter(dec)  # (width, D): row j is latent j's decoder column
        self.W_enc = nn.Parameter(dec.clone())  # W_enc = W_dec^T at init
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_pre = nn.Parameter(torch.zeros(D))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_set", torch.tensor(False))
        self.meta: dict = {}

    # ------------------------------------------------------------------ basics
    @property
    def d_total(self) -> int:
        """Input width d_in * n_blocks."""
        return self.d_in * self.n_blocks

    @property
    def W_dec(self) -> torch.Tensor:
        """Decoder matrix (d_in * n_blocks, width); columns are the latents' directions."""
        return self.dec.t()

    def _check(self, x: torch.Tensor | object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise MechdiffError(f"SAE input must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.d_total:
            raise MechdiffError(
                f"SAE input has shape {tuple(x.shape)}, expected (n, {self.d_total}) "
                f"(d_in={self.d_in} x n_blocks={self.n_blocks})"
            )
        return x.to(self.dec.dtype)

    @torch.no_grad()
    def set_input_scale(self, x: torch.Tensor, *, per_block: bool = False) -> float | list[float]:
        """Estimate and store the scale s with mean ||s x||^2 = d_in * n_blocks from a sample of raw inputs; with
        `per_block` (a crosscoder), one scale per block (model), each with mean ||s_b x_b||^2 = d_in, so that a
        difference in the two models' activation norms is not read as a difference in their features."""
        x = self._check(x)
        if per_block and self.n_blocks > 1:
            msq_b = (x.double().view(len(x), self.n_blocks, self.d_in) ** 2).sum(2).mean(0)
            if not bool(torch.isfinite(msq_b).all()) or bool((msq_b <= 0).any()):
                raise MechdiffError("cannot estimate the SAE input scales: a block of the first batch is all zeros or "
                                    "not finite")
            self.set_scale(torch.sqrt(self.d_in / msq_b).tolist())
            return self.input_scale.tolist()
        msq = float((x.double() ** 2).sum(1).mean())
        if not math.isfinite(msq) or msq <= 0:
            raise MechdiffError("cannot estimate the SAE input scale: the first batch is all zeros or not finite")
        self.set_scale(math.sqrt(self.d_total / msq))
        return float(self.input_scale)

    def scale(self) -> torch.Tensor:
        """The input scale as it multiplies a raw input row: a scalar, or (d_in * n_blocks,) with one scale per block."""
        s = self.input_scale
        return s if s.dim() == 0 else s.repeat_interleave(self.d_in)

    def set_scale(self, value: float | list[float]) -> None:
        """Store an input scale: one number, or one per block (as `config_dict` writes it)."""
        v = torch.as_tensor(value, dtype=torch.float64)
        if v.dim() > 1 or (v.dim() == 1 and v.numel() != self.n_blocks) or not bool((v > 0).all()):
            raise MechdiffError(f"input_scale must be a positive number or one per block ({self.n_blocks}), got "
                                f"{value!r}")
        if v.dim() == 0:  # the scalar buffer, filled in place (its dtype and device kept)
            if self.input_scale.dim() != 0:
                self.input_scale = self.input_scale.new_tensor(1.0)
            self.input_scale.fill_(float(v))
        else:
            self.input_scale = v.to(self.input_scale.dtype).to(self.input_scale.device)

    @torch.no_grad()
    def set_thresholds(self, theta: torch.Tensor) -> None:
        """Per-latent JumpReLU thresholds (width,) in the normalised space (a `jumprelu` SAE)."""
        theta = torch.as_tensor(theta, dtype=torch.float32).reshape(-1)
        if theta.numel() != self.width:
            raise MechdiffError(f"{theta.numel()} thresholds for {self.width} latents")
        self.threshold = theta.to(self.b_enc.device)  # replaces the scalar buffer
        self.threshold_set.fill_(True)

    @property
    def thresholded(self) -> bool:
        """Whether inference thresholds (BatchTopK after training, JumpReLU) instead of taking the top k."""
        return (self.batchtopk or self.jumprelu) and bool(self.threshold_set)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs -> normalised space."""
        return self._check(x) * self.scale()

    # ------------------------------------------------------------------ inference
    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (B, width) of normalised inputs (`kernels.linear`: the CPU kind's faster
        kernel, the same BLAS call as before on Intel AVX-512)."""
        return linear(x_n - self.b_pre, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor, *, use_threshold: bool | None = None) -> torch.Tensor:
        """Dense latents (B, width) of raw inputs (TopK per row; BatchTopK and JumpReLU SAEs use the stored threshold)."""
        pre = self.pre_acts(self.normalize(x))
        if use_threshold is None:
            use_threshold = self.thresholded
        if use_threshold:
            return torch.where(pre > self.threshold.clamp_min(0), pre, torch.zeros_like(pre))
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())

    def topk_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`encode` kept sparse: (feature indices (B, k) ascending per row, their latents (B, k), zeros included),
        the same values `encode` scatters; None where `encode` thresholds instead (BatchTopK at inference, JumpReLU)."""
        if self.thresholded:
            return None
        vals, idx = self.pre_acts(self.normalize(x)).topk(self.k, dim=1, sorted=False)
        idx, order = idx.sort(dim=1)
        return idx, vals.gather(1, order).relu()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of dense latents."""
        return (z @ self.dec + self.b_pre) / self.scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw inputs (B, d_in * n_blocks), in raw units."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ geometry
    @torch.no_grad()
    def decoder_norms(self) -> torch.Tensor:
        """Per-block decoder column norms (n_blocks, width)."""
        return self.dec.detach().view(self.width, self.n_blocks, self.d_in).norm(dim=2).t().contiguous()

    @torch.no_grad()
    def relative_norms(self, block: int = -1) -> torch.Tensor:
        """||d_block|| / sum_b ||d_b|| per latent (crosscoder: near 1 = specific to that model, 0.5 = shared)."""
        n = self.decoder_norms()
        return n[block] / n.sum(0).clamp_min(1e-12)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each decoder column (joint over blocks) to unit norm, in place."""
        self.dec.div_(self.dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from the decoder gradient its component parallel to each (unit) decoder column."""
        g = self.dec.grad
        if g is None:
            return
        g.addcmul_(self.dec, torch.linalg.vecdot(g, self.dec).unsqueeze(1), value=-1.0)

    # ------------------------------------------------------------------ training
    def _workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A scratch tensor reused across training steps (large fresh allocations page-fault on every step)."""
        ws: dict = self.__dict__.setdefault("_ws", {})
        n = math.prod(shape)
        buf = ws.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            ws[name] = buf
        return buf[:n].view(shape)

    def release_workspace(self) -> None:
        """Free the scratch buffers kept between training steps."""
        self.__dict__.pop("_ws", None)

    def _select(self, src: torch.Tensor) -> tuple[_Pattern, torch.Tensor]:
        """Active pattern and the values of `src` there: TopK per row, or BatchTopK (k * B over the batch)."""
        B = src.shape[0]
        if not self.batchtopk:
            v, idx = src.topk(self.k, dim=1, sorted=False)
            idx, order = idx.sort(dim=1)
            return _Pattern.from_topk(idx, self.width), v.gather(1, order).reshape(-1)
        cap = min(self.width, 4 * self.k)
        while True:
            cv, ci = src.topk(cap, dim=1, sorted=False)
            n_keep = min(self.k * B, cv.numel())
            keep = cv.reshape(-1).topk(n_keep, sorted=False).indices
            mask = torch.zeros(cv.numel(), dtype=torch.bool, device=cv.device)
            mask[keep] = True
            mask = mask.view(B, cap)
            if cap == self.width or not bool(mask.all(dim=1).any()):
                break
            cap = min(self.width, cap * 4)  # some row may have more than `cap` winners: widen (exact)
        rows = torch.arange(B, device=src.device).unsqueeze(1).expand(B, cap)[mask]
        cols = ci[mask]
        order = torch.argsort(_sort_key(rows * self.width + cols, B * self.width))
        return _Pattern(rows[order], cols[order], B, self.width), cv[mask][order]

    def _select_aux(self, src: torch.Tensor, dead_idx: torch.Tensor,
                    dense: bool | None = None) -> tuple[_Pattern, torch.Tensor] | _DeadColumns:
        """AuxK selection: top k_aux of `src` restricted to the dead latents, per row.

        Sparse form: (pattern, values of `src` there). Dense form, chosen when the selection fills at least
        1 / AUX_DENSE_FILL of the dead columns (`dense=None`; True / False force it): `_DeadColumns`, for
        `_aux_dense`.
        """
        B, n_dead = src.shape[0], int(dead_idx.numel())
        ka = min(self.k_aux, n_dead)
        if dense is None:
            dense = n_dead <= AUX_DENSE_FILL * ka
        if dense and ka == n_dead:
            return _DeadColumns(dead_idx, None)
        sub = torch.index_select(src, 1, dead_idx,
                                 out=self._workspace("aux", (B, n_dead), src.dtype, src.device))
        v, local = sub.topk(ka, dim=1, sorted=False)
        if dense:
            mask = torch.zeros(B, n_dead, dtype=torch.bool, device=src.device).scatter_(1, local, True)
            return _DeadColumns(dead_idx, mask)
        aidx, order = dead_idx[local].sort(dim=1)
        return _Pattern.from_topk(aidx, self.width), v.gather(1, order).reshape(-1)

    def _aux_dense(self, x_n: torch.Tensor, dead_idx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """AuxK reconstruction from the dead latents as small dense products over the dead columns only:
        ReLU of their pre-activations (kept where `mask`, all if None) times their decoder rows. Where the AuxK
        selection fills most dead columns (many dead latents, k_aux of them per row) this beats the pairwise
        sparse kernels, whose work grows with B x k_aux pairs of full-width rows. (`x_n - b_pre` is formed
        again here: the selection's copy carries no gradient to b_pre.)"""
        pre = torch.addmm(self.b_enc.index_select(0, dead_idx), x_n - self.b_pre,
                          self.W_enc.index_select(0, dead_idx).t())
        vals = pre.relu() if mask is None else torch.where(mask, pre.relu(), pre.new_zeros(()))
        return vals @ self.dec.index_select(0, dead_idx)

    def training_loss(self, x_n: torch.Tensor, dead: torch.Tensor | None = None, *, aux_coef: float = 1 / 32,
                      sparse: bool = True, select_dtype: torch.dtype | None = None,
                      denom: torch.Tensor | None = None,
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """Loss L_main + aux_coef * L_aux on normalised inputs; `dead` is a (width,) bool mask of dead latents.

        The encoder matmul runs once (in `select_dtype` when given, e.g. bf16) and serves both the TopK and
        the AuxK selection; with `sparse=True` the values and gradients then only touch the selected pairs.
        Returns the loss and a dict with the batch fvu, l0, aux loss, the fired latents mask and, for
        BatchTopK, the smallest kept positive activation.

        Data-parallel training passes each rank's share of one global batch with `denom` (the global batch's
        sum of squared deviations) and `reduce` (a sum over ranks): the loss is then this rank's share of the
        global loss, so gradients summed over ranks are the one-process gradients, and the reported fvu, l0
        and fired latents are the global batch's. TopK only (BatchTopK selects across the whole batch).
        """
        if reduce is not None and self.batchtopk:
            raise MechdiffError("data-parallel SAE training supports TopK SAEs only (batchtopk: false)")
        B = x_n.shape[0]
        dev = x_n.device
        with torch.no_grad():
            xc = x_n - self.b_pre
            if select_dtype is not None and select_dtype != x_n.dtype:
                sd = select_dtype
                src = torch.addmm(self.b_enc.detach().to(sd), xc.to(sd), self.W_enc.detach().to(sd).t(),
                                  out=self._workspace("pre", (B, self.width), sd, dev))
                exact = False  # selection values are approximate: recompute them in full precision
            else:
                ws = None if onednn_fp32(xc, self.W_enc, self.b_enc) else \
                    self._workspace("pre", (B, self.width), x_n.dtype, dev)  # oneDNN returns its own tensor
                src = linear(xc, self.W_enc, self.b_enc, out=ws)
                exact = True
            pat, pvals = self._select(src)
            pat.xc = xc
            aux_sel = None
            if dead is not None and aux_coef > 0 and bool(dead.any()):
                aux_sel = self._select_aux(src, torch.nonzero(dead).squeeze(1), None if sparse else False)
                if not isinstance(aux_sel, _DeadColumns):
                    aux_sel[0].xc = xc
            del src
        if sparse:
            vals = _SparseEncode.apply(x_n, self.b_pre, self.W_enc, self.b_enc, pat,
                                       pvals if exact else None).relu()
            recon = _SparseDecode.apply(vals, self.dec, pat)
        else:
            pre = self.pre_acts(x_n)
            vals = pre[pat.rows, pat.cols].relu()
            z = torch.zeros(B, self.width, dtype=pre.dtype, device=dev).index_put((pat.rows, pat.cols), vals)
            recon = z @ self.dec
        x_hat = recon + self.b_pre
        if denom is None:
            denom = (x_n.var(0, correction=0).sum() * B).clamp_min(1e-12)  # sum_b ||x_n - mean_b(x_n)||^2
        red = reduce or (lambda t: t)
        err = F.mse_loss(x_hat, x_n, reduction="sum")
        main = err / denom
        info: dict = {"fvu": float(red(main.detach()))}
        with torch.no_grad():
            v = vals.detach()
            pos = (v > 0).to(v.dtype)
            fired = red(torch.zeros(self.width, dtype=v.dtype, device=dev).index_add_(0, pat.cols, pos)) > 0
            counts = red(torch.tensor([float(pos.sum()), float(B)], dtype=torch.float64, device=dev))
            info["l0"] = float(counts[0] / counts[1])
            if self.batchtopk:
                mk = float(torch.where(v > 0, v, torch.inf).min())
                if math.isfinite(mk):
                    info["min_kept"] = mk
        info["fired"] = fired
        loss = main
        aux_val = 0.0
        if aux_sel is not None:
            e = (x_n - x_hat).detach()
            if isinstance(aux_sel, _DeadColumns):  # dense over the dead columns (`_select_aux`)
                e_hat = self._aux_dense(x_n, aux_sel.idx, aux_sel.mask)
            elif sparse:
                apat, apvals = aux_sel
                avals = _SparseEncode.apply(x_n, self.b_pre, self.W_enc, self.b_enc, apat,
                                            apvals if exact else None).relu()
                e_hat = _SparseDecode.apply(avals, self.dec, apat)
            else:
                apat = aux_sel[0]
                pre = self.pre_acts(x_n)
                avals = pre[apat.rows, apat.cols].relu()
                za = torch.zeros(B, self.width, dtype=pre.dtype, device=dev).index_put((apat.rows, apat.cols),
                                                                                      avals)
                e_hat = za @ self.dec
            e_sq = red(torch.linalg.vecdot(e.reshape(-1), e.reshape(-1))).clamp_min(1e-12)
            aux = F.mse_loss(e_hat, e, reduction="sum") / e_sq
            aux = torch.nan_to_num(aux, nan=0.0)
            aux_val = float(red(aux.detach()))
            loss = loss + aux_coef * aux
        info["aux"] = aux_val
        return loss, info

    @torch.no_grad()
    def resample_dead_(self, x_n: torch.Tensor, dead: torch.Tensor, *, generator: torch.Generator | None = None,
                       enc_scale: float = 0.2) -> torch.Tensor:
        """Rewrite dead latents in place: decoder = residual direction of high-loss inputs; returns their ids.

        Inputs are drawn with probability proportional to their squared reconstruction error; the encoder
        row becomes the same direction scaled to `enc_scale` x the mean alive encoder norm; b_enc = 0.
        """
        dead_idx = torch.nonzero(dead).squeeze(1)
        if dead_idx.numel() == 0:
            return dead_idx
        z = self.encode(x_n / self.scale(), use_threshold=False)
        res = x_n - (z @ self.dec + self.b_pre)
        w = (res ** 2).sum(1)
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        on = generator.device if generator is not None else w.device  # a CPU generator draws on the CPU
        pick = torch.multinomial(w.to(on), dead_idx.numel(), replacement=True, generator=generator).to(w.device)
        dirs = res[pick]
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        enc_norm = float(self.W_enc[alive].norm(dim=1).mean()) if bool(alive.any()) else 1.0
        self.dec[dead_idx] = dirs
        self.W_enc[dead_idx] = dirs * (enc_scale * enc_norm)
        self.b_enc[dead_idx] = 0.0
        return dead_idx

    def config_dict(self) -> dict:
        """Architecture + normalisation config (JSON-serialisable)."""
        return {
            "architecture": "jumprelu" if self.jumprelu else "batchtopk" if self.batchtopk else "topk",
            "d_in": self.d_in, "width": self.width, "k": self.k, "k_aux": self.k_aux,
            "n_blocks": self.n_blocks, "batchtopk": self.batchtopk,
            "threshold": (None if not bool(self.threshold_set) else float(self.threshold) if self.threshold.dim() == 0
                          else "per_latent"),  # per-latent thresholds: the `threshold` tensor of sae.safetensors
            "input_scale": float(self.input_scale) if self.input_scale.dim() == 0 else self.input_scale.tolist(),
        }


# ---------------------------------------------------------------------- checkpoint format
FORMAT = "mechdiff-topk-sae/1"
FORMAT_JUMPRELU = "mechdiff-jumprelu-sae/1"  # per-latent thresholds (an imported SAE): readers of /1 must not take it
FORMAT_BLOCKS = "mechdiff-topk-sae-blockscale/1"  # a crosscoder with one input scale per model: input_scale is a list


def save_sae(sae: TopKSAE, out_dir: str | Path, *, meta: dict | None = None) -> Path:
    """Write `sae.safetensors` (W_enc, b_enc, W_dec, b_pre) and `cfg.json` into `out_dir` (atomically per file).

    Tensors (float32): W_enc (width, d_in*n_blocks), b_enc (width,), W_dec (d_in*n_blocks, width) with unit-norm
    columns, b_pre (d_in*n_blocks,). cfg.json: d_in, width, k, k_aux, n_blocks, batchtopk, threshold,
    input_scale, format, plus `meta` (hook site, source, model id ...). A crosscoder trained with one scale per
    model (format `mechdiff-topk-sae-blockscale/1`) has input_scale = [s_base, s_tuned]: read `input_scale * x`
    below as s_b times block b of x. Without this project:

        x_n = input_scale * x;  pre = (x_n - b_pre) @ W_enc.T + b_enc
        z = ReLU(top-k of pre per row)   (BatchTopK: z = pre * (pre > threshold); JumpReLU, cfg threshold
                                          "per_latent": z = pre * (pre > max(threshold, 0)), tensor `threshold`)
        x_hat = (z @ W_dec.T + b_pre) / input_scale

    SAELens `TopKSAE` (W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec, input minus b_dec before the
    encoder): W_enc_sl = input_scale * W_enc.T, W_dec_sl = W_dec.T / input_scale, b_enc_sl = b_enc,
    b_dec_sl = b_pre / input_scale, k = k (this folds the input scale into the weights, so the SAELens decoder
    rows are no longer unit norm; keep `normalize_activations="none"`).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.W_enc.detach().float().contiguous().cpu(),
        "b_enc": sae.b_enc.detach().float().contiguous().cpu(),
        "W_dec": sae.dec.detach().float().t().contiguous().cpu(),
        "b_pre": sae.b_pre.detach().float().contiguous().cpu(),
    }
    if bool(sae.threshold_set) and sae.threshold.dim() == 1:
        tensors["threshold"] = sae.threshold.detach().float().contiguous().cpu()
    if meta:
        sae.meta.update(meta)
    fmt = FORMAT_JUMPRELU if sae.jumprelu else FORMAT_BLOCKS if sae.input_scale.dim() == 1 else FORMAT
    cfg = {"format": fmt, **sae.config_dict(), **{k: v for k, v in sae.meta.items() if k not in ("format",)}}
    tmp = out / ".sae.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": fmt})
    os.replace(tmp, out / "sae.safetensors")
    tmpj = out / ".cfg.json.tmp"
    tmpj.write_text(json.dumps(to_jsonable(cfg), indent=2, sort_keys=True))
    os.replace(tmpj, out / "cfg.json")
    return out


def load_sae(out_dir: str | Path) -> TopKSAE:
    """Load an SAE written by `save_sae`."""
    from safetensors.torch import load_file

    d = Path(out_dir)
    if not (d / "sae.safetensors").is_file() or not (d / "cfg.json").is_file():
        raise MechdiffError(f"no SAE in {d}: expected sae.safetensors and cfg.json (train it first)")
    cfg = json.loads((d / "cfg.json").read_text())
    try:
        sae = TopKSAE(int(cfg["d_in"]), int(cfg["width"]), int(cfg["k"]), k_aux=cfg.get("k_aux"),
                      batchtopk=bool(cfg.get("batchtopk", False)), n_blocks=int(cfg.get("n_blocks", 1)),
                      jumprelu=cfg.get("architecture") == "jumprelu")
    except KeyError as e:
        raise MechdiffError(f"{d / 'cfg.json'} lacks {e.args[0]!r}: it is not an SAE config written by mechdiff") from e
    t = load_file(str(d / "sae.safetensors"))
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"])
        sae.b_enc.copy_(t["b_enc"])
        sae.dec.copy_(t["W_dec"].t())
        sae.b_pre.copy_(t["b_pre"])
        sae.set_scale(cfg.get("input_scale", 1.0))
        if "threshold" in t:
            sae.set_thresholds(t["threshold"])
        elif cfg.get("threshold") is not None:
            sae.threshold.fill_(float(cfg["threshold"]))
            sae.threshold_set.fill_(True)
    own = set(sae.config_dict()) | {"format"}
    sae.meta = {k: v for k, v in cfg.items() if k not in own}
    return sae
