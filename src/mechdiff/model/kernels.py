"""CPU kernels: run a model's linear layers on oneDNN weights packed once, instead of re-laid-out per call.

A plain `nn.Linear` on CPU calls a BLAS GEMM that re-packs the weight matrix on every call. oneDNN can pack
a weight once into its blocked layout (`mkldnn._reorder_linear_weight`) and reuse it for every batch; on
the 2-core AVX2 machine this project is measured on, that brings the fp32 matmuls of SmolLM2's blocks from
~150 to ~200 GFLOP/s at batch 16 x 50 tokens. The arithmetic stays in the weight's dtype (fp32 stays fp32;
results differ from the BLAS path only by summation order, ~1e-6 relative). Packing is inference-only (no
autograd through the packed weight) and costs one extra copy of the packed weights while it is active.
Whether a call takes the packed weight is one CPU-kind rule, `use_packed`: where torch's BLAS runs AVX-512
kernels (Intel AVX-512 CPUs under MKL, where plain fp32 GEMM already runs at the matmul peak for large
inputs) fp32 calls use it only at 2-512 rows; elsewhere always.

Training (weights that change every step) cannot pack once: `linear` and `onednn_linears` run fp32 linears
forward and backward on oneDNN with the unpacked weight, where the BLAS runs AVX2 code (AVX2 CPUs, and AMD's
AVX-512 CPUs, on which MKL takes its AVX2 kernels); on Intel AVX-512 they are the plain BLAS calls.

Gated SiLU MLPs (Llama, Qwen, Mistral, SmolLM...: down(silu(gate(x)) * up(x))) additionally run as two fused
oneDNN calls: the gate matmul with its SiLU as a post-op, and the up matmul with the product as a binary
post-op (~12% faster MLPs, ~1e-7 relative difference). Hooks on the MLP module still see its output; hooks
on its inner gate/up projections are bypassed while fused.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mechdiff.cpu import cpu_info

_DTYPES = (torch.float32, torch.bfloat16)


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix units ('AMX' or 'AVX512-BF16'), or None: detected, never assumed.

    From torch's own CPU feature probes, else the Linux CPU flags (amx_bf16, avx512_bf16).
    """
    probes = [(name, getattr(torch.cpu, fn, None))
              for name, fn in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))]
    if all(f is not None for _, f in probes):  # torch's answer is the one that counts: its kernels use them
        for name, f in probes:
            try:
                if f():
                    return name
            except RuntimeError:
                pass
        return None
    flags = cpu_info().flags
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def onednn_linear_available() -> bool:
    """True when this torch build can pack linear weights for oneDNN (CPU builds with mkldnn enabled)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (RuntimeError, AttributeError):
        return False


_BLAS_AVX512: bool | None = None
# fp32 where torch's BLAS runs AVX-512 kernels: the plain BLAS path runs at the matmul peak for large and single-row
# inputs; the packed weights win only in between (measured on SmolLM2's 576x1536 / 1536x576 / 576x576 layers, 2 cores
# of a Xeon with AVX-512 and AMX: packed/plain time 0.5-0.75 at 1 row, 0.3-0.8 at 16-256 rows, 1.0-1.1 at 800-2048).
_FP32_PACKED_ROWS = (2, 512)


def cpu_vendor() -> str | None:
    """The CPU's vendor string from the Linux CPU flags ('GenuineIntel', 'AuthenticAMD', ...), or None."""
    return cpu_info().vendor


def _blas_avx512() -> bool:
    """True when torch's plain fp32 BLAS calls run AVX-512 kernels on this machine (detected once, never assumed).

    That needs an AVX-512 CPU and, where the BLAS is MKL (torch's x86 wheels), an Intel one: MKL takes its
    AVX-512 kernels on Intel CPUs only and runs AVX2 code on AMD's AVX-512 CPUs (measured on 2 cores of an AMD
    EPYC with AVX-512: MKL fp32 GEMM ~170 GFLOP/s against oneDNN's ~350-400 on the same shapes), so there every
    fp32 call takes oneDNN, as on an AVX2 CPU.
    """
    global _BLAS_AVX512
    if _BLAS_AVX512 is None:
        try:
            avx512 = torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
        except (AttributeError, RuntimeError):
            avx512 = False
        mkl = bool(getattr(torch.backends, "mkl", None) and torch.backends.mkl.is_available())
        vendor = cpu_vendor()
        _BLAS_AVX512 = avx512 and not (mkl and vendor is not None and vendor != "GenuineIntel")
    return _BLAS_AVX512


def use_packed(x: torch.Tensor) -> bool:
    """The one CPU-kind rule: does a oneDNN weight beat the plain BLAS call for this input?

    bf16: always (2-3x at a few rows, even at 2048). fp32: always where the BLAS runs AVX2 code (AVX2 CPUs:
    1.1-1.3x; AMD's AVX-512 CPUs under MKL: 2-3x); where it runs AVX-512 kernels (Intel) only for 2-512 rows,
    where plain MKL GEMM is slower; a single decode row or a full prefill batch runs plain there.
    """
    if x.dtype != torch.float32 or not _blas_avx512():
        return True
    rows = x.numel() // max(1, x.shape[-1])
    return _FP32_PACKED_ROWS[0] <= rows <= _FP32_PACKED_ROWS[1]


def _lp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) in one oneDNN call on an unpacked weight; 2-D contiguous inputs."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _lp_nd(x2: torch.Tensor, shape: torch.Size, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`_lp` of the rows `x2` (x flattened to 2-D) back in x's leading `shape`."""
    return _lp(x2, w.contiguous(), b).reshape(*shape[:-1], w.shape[0])


# Transposed weights for the backward products, per weight and version, while `reuse_transposes` is active
# (None: off). Entries hold the weight itself, so an id is never reused for another tensor while it is kept.
_TRANSPOSES: list[dict[int, tuple[torch.Tensor, tuple[int, int], torch.Tensor]] | None] = [None]


@contextlib.contextmanager
def reuse_transposes() -> Iterator[None]:
    """Within the block, the oneDNN backward (`_OneDNNLinear`) makes each weight's transposed copy once per weight
    version instead of once per backward call: a frozen weight (an LM head, every layer under attribution) once
    in all, a trained one once per optimizer step however many forwards the step runs. The copy is the same
    tensor either way, so results are unchanged bit for bit. Only parameters are kept (a weight built anew per
    call is transposed per call, as outside the block); each kept copy costs as much memory as its weight until
    the outermost block ends. In-place updates through tracked ops (optimizer steps, `copy_` under no_grad)
    bump the version, and a conversion that swaps a parameter's storage (`.to()`, `.float()`) changes its data
    pointer: either makes a fresh copy. Writes through `.data` into the same storage are not tracked and must
    not happen inside the block. Nested blocks share the outermost one's copies."""
    outer = _TRANSPOSES[0] is not None
    if not outer:
        _TRANSPOSES[0] = {}
    try:
        yield
    finally:
        if not outer:
            _TRANSPOSES[0] = None


def _weight_t(weight: torch.Tensor) -> torch.Tensor:
    """weight.T as a contiguous tensor: made anew, or (inside `reuse_transposes`) the copy of this version."""
    cache = _TRANSPOSES[0]
    if cache is None or not isinstance(weight, nn.Parameter):
        return weight.t().contiguous()
    key = (weight._version, weight.data_ptr())
    hit = cache.get(id(weight))
    if hit is not None and hit[0] is weight and hit[1] == key:
        return hit[2]
    wt = weight.detach().t().contiguous()
    cache[id(weight)] = (weight, key, wt)
    return wt


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with its forward and both backward products on oneDNN (fp32, CPU): grad_x = g @ W and
    grad_W = g.T @ x run as linear calls on transposed copies (O(rows x d) copies for O(rows x d x d') products;
    the weight's copy is reused across calls inside `reuse_transposes`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.in_shape = x.shape
        return _lp_nd(x2, x.shape, weight, bias)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _lp(g2, _weight_t(weight)).reshape(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            gw = _lp(g2.t().contiguous(), x2.t().contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def onednn_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """The rule `linear` follows: True when this fp32 CPU linear runs on oneDNN (the BLAS runs AVX2 code here:
    `_blas_avx512` false, i.e. AVX2 CPUs and AMD's AVX-512 CPUs under MKL) rather than the plain BLAS call.
    It depends on the CPU kind and the tensors' dtype, device and shape kind, never on their values or sizes."""
    return (not _blas_avx512() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.dim() >= 1 and x.numel() > 0 and weight.dim() == 2
            and (bias is None or (bias.dim() == 1 and bias.dtype == torch.float32))
            and onednn_linear_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (x @ weight.T + bias) on the CPU kind's faster kernel, with or without autograd: the one call
    for linear layers and SAE encoders whose weights change every step (nothing packed once).

    Where `onednn_fp32` says so: oneDNN on the unpacked weight, forward and backward (on 2 cores of an AMD
    EPYC with AVX-512 1.8-2.3x MKL on SAE and SmolLM2 shapes). Everywhere else the plain BLAS call as before
    (`torch.addmm` into `out` when given, a reused workspace, else `F.linear`); `out` is for that path only
    (callers that want a workspace ask `onednn_fp32` first). Both compute the same sums in a different order
    (~1e-6 relative).
    """
    if onednn_fp32(x, weight, bias):
        b = None if bias is None else bias.contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _OneDNNLinear.apply(x, weight, b)
        return _lp_nd(x.reshape(-1, x.shape[-1]).contiguous(), x.shape, weight, b)
    if out is not None:
        return torch.addmm(bias, x, weight.t(), out=out) if bias is not None else torch.mm(x, weight.t(), out=out)
    return F.linear(x, weight, bias)


def _pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor | None:
    """The oneDNN-packed copy of `weight`, or None when this build or dtype cannot pack it."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    except (RuntimeError, NotImplementedError):
        return None


class _Packed:
    """One linear layer's oneDNN-packed weight, made on the first call that takes the packed path (never, where
    `use_packed` always says no: no time or memory spent on packing)."""

    __slots__ = ("layer", "rows_hint", "value", "failed")

    def __init__(self, layer: nn.Linear, rows_hint: int) -> None:
        self.layer, self.rows_hint, self.value, self.failed = layer, rows_hint, None, False

    def get(self) -> torch.Tensor | None:
        if self.value is None and not self.failed:
            self.value = _pack(self.layer.weight, self.rows_hint)
            self.failed = self.value is None
        return self.value


def _fast_path(x: torch.Tensor, cell: _Packed) -> bool:
    return (x.dtype == cell.layer.weight.dtype and x.device.type == "cpu" and not torch.is_grad_enabled()
            and use_packed(x))


def _packed_forward(cell: _Packed) -> types.FunctionType:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        packed = cell.get() if _fast_path(x, cell) else None
        if packed is None:  # with gradients (e.g. attribution through a packed model): `linear`'s rule
            return linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    return forward


def _silu_like(act: object) -> bool:
    """True when `act` computes SiLU (checked on a probe, whatever its class is called)."""
    if not callable(act):
        return False
    probe = torch.linspace(-6, 6, 49)
    try:
        with torch.no_grad():
            out = act(probe)
    except Exception:  # noqa: BLE001 - anything that cannot run on a probe is not fused
        return False
    return isinstance(out, torch.Tensor) and out.shape == probe.shape and bool(
        torch.allclose(out.float(), F.silu(probe), rtol=1e-5, atol=1e-6))


def _fused_mlp_forward(gate: _Packed, up: _Packed, down: _Packed) -> types.FunctionType:
    state = {"ok": None}  # checked against the plain MLP on the first packed call

    def fused(self: nn.Module, x: torch.Tensor, g_w: torch.Tensor, u_w: torch.Tensor, d_w: torch.Tensor):
        g = torch.ops.mkldnn._linear_pointwise(x, g_w, self.gate_proj.bias, "swish", [], "")
        h = torch.ops.mkldnn._linear_pointwise.binary(x, g, u_w, self.up_proj.bias, "mul")
        return torch.ops.mkldnn._linear_pointwise(h, d_w, self.down_proj.bias, "none", [], "")

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if state["ok"] is False or not _fast_path(x, gate):
            return type(self).forward(self, x)
        ws = (gate.get(), up.get(), down.get())
        if any(w is None for w in ws):
            state["ok"] = False
            return type(self).forward(self, x)
        if state["ok"] is None:
            probe = x.reshape(-1, x.shape[-1])[:3]
            state["ok"] = bool(torch.allclose(fused(self, probe, *ws).float(), type(self).forward(self, probe).float(),
                                              rtol=1e-3, atol=1e-4))
            if not state["ok"]:
                return type(self).forward(self, x)
        return fused(self, x, *ws)

    return forward


def _agrees(mod: nn.Linear, packed: torch.Tensor) -> bool:
    """Self-check of one packed layer against F.linear on a random input (guards against odd builds)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, mod.in_features, generator=gen).to(mod.weight.dtype)
    with torch.no_grad():
        ref = F.linear(x, mod.weight, mod.bias).float()
        out = torch.ops.mkldnn._linear_pointwise(x, packed, mod.bias, "none", [], "").float()
    tol = 1e-4 if mod.weight.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(out, ref, rtol=tol, atol=tol * float(ref.abs().max().clamp_min(1.0))))


def warm_up(model: nn.Module) -> None:
    """One tiny forward (1 x 4 tokens, discarded) before a process's first real forward.

    The first forward of a process sometimes gives different fp32 results from every later forward of the same
    batch: seen after packing (`patch` at a tiny-KL site differed run to run, in about a third of processes) and
    on the plain MKL path in extraction (one 16-prompt batch of a store, max |diff| 4e-5 at layer 0 and 0.03 in
    the logits, in 2 of 10 processes on a loaded 2-core machine). A thread-pool start-up effect, not seeded;
    after this warm-up the later forwards agree bit for bit (README "Same numbers on every run")."""
    p = next(model.parameters(), None)
    if p is None:
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=p.device), use_cache=False)
    except Exception:  # noqa: BLE001 - best effort: a model that cannot take this input still runs
        pass
    finally:
        model.train(was)


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def onednn_linears(model: nn.Module) -> Iterator[int]:
    """Within the block, every CPU fp32 `nn.Linear` of `model` runs forward and backward on oneDNN, where the
    BLAS runs AVX2 code (`_blas_avx512` false: AVX2 CPUs, AMD's AVX-512 CPUs under MKL, where oneDNN is ~2x
    faster on AVX-512); yields how many layers. Elsewhere (Intel AVX-512, no oneDNN, layers already patched)
    it changes nothing and yields 0. For training: unlike `packed_linears` it keeps autograd (gradients equal
    F.linear's up to summation order, checked once on the first layer before anything is patched). The block
    runs inside `reuse_transposes`: no `.data` writes to the weights within it."""
    patched: list[nn.Module] = []
    try:
        if not _blas_avx512() and onednn_linear_available():
            mods = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__
                    and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
            if mods and _grads_agree(mods[0]):
                for mod in mods:
                    mod.forward = types.MethodType(_onednn_forward, mod)
                    patched.append(mod)
        with reuse_transposes():
            yield len(patched)
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)


def _grads_agree(mod: nn.Linear) -> bool:
    """One eager self-check: the oneDNN linear's output and gradients equal F.linear's on a probe batch (run with
    gradients on, also when the caller is under no_grad / inference_mode)."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(5, mod.in_features, generator=gen)
            g = torch.randn(5, mod.out_features, generator=gen)
            w = mod.weight.detach().clone().requires_grad_(True)
            b = None if mod.bias is None else mod.bias.detach().clone().requires_grad_(True)
            xs = [x.clone().requires_grad_(True) for _ in range(2)]
            outs = [F.linear(xs[0], w, b), _OneDNNLinear.apply(xs[1], w, b)]
            ok = torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
            got = [torch.autograd.grad(o, [xi, w], g) for o, xi in zip(outs, xs)]
            return ok and all(torch.allclose(a, c, rtol=1e-4, atol=1e-4) for a, c in zip(*got))
    except (RuntimeError, NotImplementedError):
        return False


@contextlib.contextmanager
def packed_linears(model: nn.Module, *, rows_hint: int = 1024, enabled: bool = True, avx512_fp32: bool = True
                   ) -> Iterator[int]:
    """Within the block, every CPU fp32/bf16 `nn.Linear` of `model` runs on a oneDNN-packed weight; yields how many.

    Each weight is packed on the first call that `use_packed` sends to the packed path (so never, where the
    rule always picks the plain path), and gated SiLU MLPs then run fused (checked against the plain MLP on that
    first call). Only used under `torch.no_grad()` / `torch.inference_mode()`; with gradients enabled, on another device
    or another input dtype a layer falls back to `F.linear`. A no-op (yields 0) when disabled or unsupported.
    `avx512_fp32=False` keeps fp32 calls on the plain BLAS wherever it runs AVX-512 kernels (Intel AVX-512 CPUs:
    those numbers exactly as without packing); bf16 calls and the CPUs whose BLAS runs AVX2 code still pack.
    """
    patched: list[nn.Module] = []
    packs: dict[int, _Packed] = {}
    try:
        if enabled and onednn_linear_available():
            checked: dict[torch.dtype, bool] = {}
            for mod in model.modules():
                if type(mod) is not nn.Linear or "forward" in mod.__dict__:
                    continue
                w = mod.weight
                if w.device.type != "cpu" or w.dtype not in _DTYPES:
                    continue
                if not avx512_fp32 and w.dtype == torch.float32 and _blas_avx512():
                    continue  # left as it is: the plain BLAS call, no packed copy, no self-check
                cell = _Packed(mod, rows_hint)
                if w.dtype not in checked:  # one eager self-check per dtype guards against odd builds
                    packed = cell.get()
                    checked[w.dtype] = packed is not None and _agrees(mod, packed)
                if not checked[w.dtype]:
                    continue
                mod.forward = types.MethodType(_packed_forward(cell), mod)
                patched.append(mod)
                packs[id(mod)] = cell
            n_linear = len(patched)
            for mod in list(model.modules()) if packs else []:
                parts = [getattr(mod, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
                if "forward" in mod.__dict__ or not all(id(p) in packs for p in parts) \
                        or not _silu_like(getattr(mod, "act_fn", None)):
                    continue
                mod.forward = types.MethodType(_fused_mlp_forward(*(packs[id(p)] for p in parts)), mod)
                patched.append(mod)
            yield n_linear
        else:
            yield 0
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
