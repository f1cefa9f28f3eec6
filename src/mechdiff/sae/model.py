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

The sparse path never forms the dense (B, width) latent matrix for the backward pass: the decoder is an
embedding bag over the active columns, and custom autograd functions give the encoder and decoder gradients
through sparse x dense products (`torch.sparse.mm`) and sampled dense-dense products
(`torch.sparse.sampled_addmm`). The dense path (`sparse=False`) is the plain autograd reference; both give
the same gradients.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mechdiff.errors import MechdiffError


def _coo_t(cols: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, n_cols: int, n_rows: int) -> torch.Tensor:
    """Sparse (n_cols, n_rows) matrix with vals at (cols, rows)."""
    return torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (n_cols, n_rows), check_invariants=False)


def _sampled(pattern_crow: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
             width: int) -> torch.Tensor:
    """Values of (a @ b_t.T) at a CSR pattern (rows sorted), i.e. rowwise dot products a[r] . b_t[c]."""
    zeros = torch.zeros(cols.shape[0], dtype=a.dtype, device=a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pat = torch.sparse_csr_tensor(pattern_crow, cols, zeros, (a.shape[0], width), check_invariants=False)
    return torch.sparse.sampled_addmm(pat, a, b_t.t()).values()


class _Pattern:
    """Active (row, col) pairs of a sparse latent batch, rows ascending (CSR order)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, width: int) -> None:
        self.rows, self.cols, self.n_rows, self.width = rows, cols, n_rows, width
        counts = torch.bincount(rows, minlength=n_rows)
        self.crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        self.crow[1:] = counts.cumsum(0)

    @classmethod
    def from_topk(cls, idx: torch.Tensor, width: int) -> _Pattern:
        """Pattern of a (B, k) index matrix."""
        B, k = idx.shape
        rows = torch.arange(B, device=idx.device).repeat_interleave(k)
        return cls(rows, idx.reshape(-1), B, width)


class _SparseEncode(torch.autograd.Function):
    """vals[n] = (x - b_pre)[rows[n]] . W_enc[cols[n]] + b_enc[cols[n]] with a sparse backward."""

    @staticmethod
    def forward(ctx, x, b_pre, W_enc, b_enc, pat: _Pattern):  # type: ignore[override]
        xc = x - b_pre
        vals = _sampled(pat.crow, pat.cols, xc, W_enc, pat.width) + b_enc[pat.cols]
        ctx.save_for_backward(xc, W_enc)
        ctx.pat = pat
        return vals

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        xc, W_enc = ctx.saved_tensors
        pat: _Pattern = ctx.pat
        g = g.contiguous()
        gx = gbp = gW = gb = None
        gb_full = torch.zeros(pat.width, dtype=g.dtype, device=g.device).index_add_(0, pat.cols, g)
        if ctx.needs_input_grad[2]:
            gW = torch.sparse.mm(_coo_t(pat.cols, pat.rows, g, pat.width, pat.n_rows), xc)
        if ctx.needs_input_grad[3]:
            gb = gb_full
        if ctx.needs_input_grad[0]:
            gx = torch.sparse.mm(_coo_t(pat.rows, pat.cols, g, pat.n_rows, pat.width), W_enc)
        if ctx.needs_input_grad[1]:
            gbp = -(gb_full @ W_enc)
        return gx, gbp, gW, gb, None


class _SparseDecode(torch.autograd.Function):
    """out[r] = sum_n vals[n] dec[cols[n]] over the active entries of row r, with a sparse backward."""

    @staticmethod
    def forward(ctx, vals, dec, pat: _Pattern):  # type: ignore[override]
        out = F.embedding_bag(pat.cols, dec, pat.crow[:-1], mode="sum", per_sample_weights=vals,
                              include_last_offset=False)
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
            gv = _sampled(pat.crow, pat.cols, g, dec, pat.width)
        if ctx.needs_input_grad[1]:
            gd = torch.sparse.mm(_coo_t(pat.cols, pat.rows, vals, pat.width, pat.n_rows), g)
        return gv, gd, None


class TopKSAE(nn.Module):
    """TopK (or BatchTopK) SAE; `n_blocks=2` makes it a crosscoder over [x_base, x_tuned]."""

    def __init__(self, d_in: int, width: int, k: int, *, k_aux: int | None = None, batchtopk: bool = False,
                 n_blocks: int = 1, seed: int = 0) -> None:
        super().__init__()
        for name, v in (("d_in", d_in), ("width", width), ("k", k), ("n_blocks", n_blocks)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MechdiffError(f"SAE {name} must be a positive int, got {v!r}")
        if k > width:
            raise MechdiffError(f"SAE k={k} exceeds width={width}: lower k or widen the SAE")
        self.d_in, self.width, self.k, self.n_blocks = d_in, width, k, n_blocks
        self.k_aux = int(k_aux) if k_aux is not None else max(1, d_in // 2)
        self.batchtopk = bool(batchtopk)
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
    def set_input_scale(self, x: torch.Tensor) -> float:
        """Estimate and store the scale s with mean ||s x||^2 = d_in * n_blocks from a sample of raw inputs."""
        x = self._check(x)
        msq = float((x.double() ** 2).sum(1).mean())
        if not math.isfinite(msq) or msq <= 0:
            raise MechdiffError("cannot estimate the SAE input scale: the first batch is all zeros or not finite")
        self.input_scale.fill_(math.sqrt(self.d_total / msq))
        return float(self.input_scale)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs -> normalised space."""
        return self._check(x) * self.input_scale

    # ------------------------------------------------------------------ inference
    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (B, width) of normalised inputs."""
        return torch.addmm(self.b_enc, x_n - self.b_pre, self.W_enc.t())

    def encode(self, x: torch.Tensor, *, use_threshold: bool | None = None) -> torch.Tensor:
        """Dense latents (B, width) of raw inputs (TopK per row; BatchTopK SAEs use the stored threshold)."""
        pre = self.pre_acts(self.normalize(x))
        if use_threshold is None:
            use_threshold = self.batchtopk and bool(self.threshold_set)
        if use_threshold:
            return torch.where(pre > self.threshold.clamp_min(0), pre, torch.zeros_like(pre))
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of dense latents."""
        return (z @ self.dec + self.b_pre) / self.input_scale

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
        g.sub_((g * self.dec).sum(1, keepdim=True) * self.dec)

    # ------------------------------------------------------------------ training
    def _select(self, pre: torch.Tensor, sel: torch.Tensor | None = None) -> _Pattern:
        """Active pattern: TopK per row, or BatchTopK (k * B over the batch) when `batchtopk`."""
        src = pre if sel is None else sel
        B = src.shape[0]
        if not self.batchtopk:
            idx = src.topk(self.k, dim=1, sorted=False).indices
            idx, _ = idx.sort(dim=1)
            return _Pattern.from_topk(idx, self.width)
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
        order = torch.argsort(rows * self.width + cols)
        return _Pattern(rows[order], cols[order], B, self.width)

    def training_loss(self, x_n: torch.Tensor, dead: torch.Tensor | None = None, *, aux_coef: float = 1 / 32,
                      sparse: bool = True, select_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
        """Loss L_main + aux_coef * L_aux on normalised inputs; `dead` is a (width,) bool mask of dead latents.

        Returns the loss and a dict with the batch fvu, l0, aux loss, the fired latents mask and, for
        BatchTopK, the smallest kept positive activation.
        """
        B = x_n.shape[0]
        with torch.no_grad():
            if select_dtype is not None and select_dtype != x_n.dtype:
                sel = torch.addmm(self.b_enc.to(select_dtype), (x_n - self.b_pre).to(select_dtype),
                                  self.W_enc.detach().to(select_dtype).t())
                pre_d = None
            else:
                pre_d = self.pre_acts(x_n)
                sel = pre_d
            pat = self._select(sel)
        if sparse:
            vals = _SparseEncode.apply(x_n, self.b_pre, self.W_enc, self.b_enc, pat).relu()
            recon = _SparseDecode.apply(vals, self.dec, pat)
        else:
            pre = self.pre_acts(x_n)
            vals = pre[pat.rows, pat.cols].relu()
            z = torch.zeros(B, self.width, dtype=pre.dtype, device=pre.device).index_put(
                (pat.rows, pat.cols), vals)
            recon = z @ self.dec
        x_hat = recon + self.b_pre
        denom = ((x_n - x_n.mean(0)) ** 2).sum().clamp_min(1e-12)
        err = ((x_hat - x_n) ** 2).sum()
        main = err / denom
        info: dict = {"fvu": float(main.detach())}
        fired = torch.zeros(self.width, dtype=torch.bool, device=x_n.device)
        with torch.no_grad():
            pos = vals.detach() > 0
            fired[pat.cols[pos]] = True
            info["l0"] = float(pos.sum()) / B
            if self.batchtopk and bool(pos.any()):
                info["min_kept"] = float(vals.detach()[pos].min())
        info["fired"] = fired
        loss = main
        aux_val = 0.0
        if dead is not None and bool(dead.any()) and aux_coef > 0:
            dead_idx = torch.nonzero(dead).squeeze(1)
            ka = min(self.k_aux, int(dead_idx.numel()))
            e = (x_n - x_hat).detach()
            with torch.no_grad():
                src = sel if pre_d is None else pre_d
                local = src[:, dead_idx].topk(ka, dim=1, sorted=False).indices
                aidx, _ = dead_idx[local].sort(dim=1)
                apat = _Pattern.from_topk(aidx, self.width)
            if sparse:
                avals = _SparseEncode.apply(x_n, self.b_pre, self.W_enc, self.b_enc, apat).relu()
                e_hat = _SparseDecode.apply(avals, self.dec, apat)
            else:
                pre = self.pre_acts(x_n)
                avals = pre[apat.rows, apat.cols].relu()
                za = torch.zeros(B, self.width, dtype=pre.dtype, device=pre.device).index_put(
                    (apat.rows, apat.cols), avals)
                e_hat = za @ self.dec
            aux = ((e_hat - e) ** 2).sum() / (e ** 2).sum().clamp_min(1e-12)
            aux = torch.nan_to_num(aux, nan=0.0)
            aux_val = float(aux.detach())
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
        z = self.encode(x_n / self.input_scale, use_threshold=False)
        res = x_n - (z @ self.dec + self.b_pre)
        w = (res ** 2).sum(1)
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        pick = torch.multinomial(w, dead_idx.numel(), replacement=True, generator=generator)
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
            "architecture": "topk" if not self.batchtopk else "batchtopk",
            "d_in": self.d_in, "width": self.width, "k": self.k, "k_aux": self.k_aux,
            "n_blocks": self.n_blocks, "batchtopk": self.batchtopk,
            "threshold": float(self.threshold) if bool(self.threshold_set) else None,
            "input_scale": float(self.input_scale),
        }


# ---------------------------------------------------------------------- checkpoint format
FORMAT = "mechdiff-topk-sae/1"


def save_sae(sae: TopKSAE, out_dir: str | Path, *, meta: dict | None = None) -> Path:
    """Write `sae.safetensors` (W_enc, b_enc, W_dec, b_pre) and `cfg.json` into `out_dir` (atomically per file).

    Tensors (float32): W_enc (width, d_in*n_blocks), b_enc (width,), W_dec (d_in*n_blocks, width) with unit-norm
    columns, b_pre (d_in*n_blocks,). cfg.json: d_in, width, k, k_aux, n_blocks, batchtopk, threshold,
    input_scale, format, plus `meta` (hook site, source, model id ...). Without this project:

        x_n = input_scale * x;  pre = (x_n - b_pre) @ W_enc.T + b_enc
        z = ReLU(top-k of pre per row)   (BatchTopK: z = pre * (pre > threshold))
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
    if meta:
        sae.meta.update(meta)
    cfg = {"format": FORMAT, **sae.config_dict(), **{k: v for k, v in sae.meta.items() if k not in ("format",)}}
    tmp = out / ".sae.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out / "sae.safetensors")
    tmpj = out / ".cfg.json.tmp"
    tmpj.write_text(json.dumps(cfg, indent=2, sort_keys=True))
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
                      batchtopk=bool(cfg.get("batchtopk", False)), n_blocks=int(cfg.get("n_blocks", 1)))
    except KeyError as e:
        raise MechdiffError(f"{d / 'cfg.json'} lacks {e.args[0]!r}: it is not an SAE config written by mechdiff") from e
    t = load_file(str(d / "sae.safetensors"))
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"])
        sae.b_enc.copy_(t["b_enc"])
        sae.dec.copy_(t["W_dec"].t())
        sae.b_pre.copy_(t["b_pre"])
        sae.input_scale.fill_(float(cfg.get("input_scale", 1.0)))
        if cfg.get("threshold") is not None:
            sae.threshold.fill_(float(cfg["threshold"]))
            sae.threshold_set.fill_(True)
    own = set(sae.config_dict()) | {"format"}
    sae.meta = {k: v for k, v in cfg.items() if k not in own}
    return sae
