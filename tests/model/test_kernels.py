"""Packed oneDNN linears: same numbers as F.linear, restored afterwards, inert under autograd."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from mechdiff.model.kernels import onednn_linear_available, packed_linears
from mechdiff.model.tiny import make_tiny_model

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear packing")


def test_packed_linear_matches_numpy_reference():
    torch.manual_seed(0)
    lin = nn.Linear(48, 80)
    x = torch.randn(3, 11, 48)
    ref = x.numpy().astype(np.float64) @ lin.weight.detach().numpy().T.astype(np.float64) + lin.bias.detach().numpy()
    with torch.inference_mode(), packed_linears(lin) as n:
        out = lin(x)
    assert n == 1
    assert out.shape == (3, 11, 80) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert "forward" not in lin.__dict__  # restored


def test_packed_model_logits_match_plain_forward_and_restore():
    model = make_tiny_model(64, n_layers=3, d_model=32, seed=3).eval()
    ids = torch.randint(4, 64, (4, 9))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        with packed_linears(model.model) as n:
            fused = ["forward" in layer.mlp.__dict__ for layer in model.model.layers]
            out = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    n_lin = sum(type(m) is nn.Linear for m in model.model.modules())
    assert n == n_lin > 0
    assert all(fused)  # the gated SiLU MLPs run as fused oneDNN calls
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(after, ref)


def test_mlp_with_another_activation_is_not_fused():
    model = make_tiny_model(64, n_layers=2, d_model=32, seed=4).eval()
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.GELU()
    ids = torch.randint(4, 64, (2, 7))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        with packed_linears(model.model):
            assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)
            out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_packed_layers_fall_back_under_autograd_and_when_disabled():
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    with packed_linears(lin) as n:
        assert n == 1
        y = lin(x).sum()  # grad mode: plain F.linear, so gradients flow
        y.backward()
    np.testing.assert_allclose(x.grad.numpy(), lin.weight.detach().sum(0).expand(5, 16).numpy(), rtol=1e-6)
    with packed_linears(lin, enabled=False) as n:
        assert n == 0


@pytest.mark.parametrize("avx512", [True, False])
def test_cpu_kind_rule_picks_the_path_and_both_paths_agree(monkeypatch, avx512):
    """The one rule (kernels.use_packed): AVX2 packs every fp32 call; AVX-512 packs fp32 only at 2-512 rows; bf16 always.

    Whichever path a call takes, the model's numbers are the plain forward's (float64 numpy reference).
    """
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", avx512)
    f32 = {rows: kernels.use_packed(torch.zeros(rows, 8)) for rows in (1, 2, 64, 512, 513, 4096)}
    if avx512:
        assert f32 == {1: False, 2: True, 64: True, 512: True, 513: False, 4096: False}
    else:
        assert all(f32.values())
    assert kernels.use_packed(torch.zeros(4096, 8, dtype=torch.bfloat16))
    assert kernels.use_packed(torch.zeros(3, 300, 8)) is (not avx512)  # rows = all leading dims (900)

    calls = {"plain": 0}
    real = torch.nn.functional.linear

    def counting(*a, **k):
        calls["plain"] += 1
        return real(*a, **k)

    torch.manual_seed(1)
    lin = nn.Linear(24, 40)
    w, b = lin.weight.detach().numpy().astype(np.float64), lin.bias.detach().numpy().astype(np.float64)
    monkeypatch.setattr(kernels.F, "linear", counting)
    for rows in (1, 64, 700):
        x = torch.randn(rows, 24)
        with torch.inference_mode(), packed_linears(lin):
            calls["plain"] = 0  # after the packing self-check, which calls F.linear once
            out = lin(x)
        assert calls["plain"] == (0 if kernels.use_packed(x) else 1)
        np.testing.assert_allclose(out.numpy(), x.numpy().astype(np.float64) @ w.T + b, rtol=1e-5, atol=1e-5)


def test_weights_are_packed_only_when_a_call_takes_the_packed_path(monkeypatch):
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", True)
    packed = []
    real = kernels._pack
    monkeypatch.setattr(kernels, "_pack", lambda w, rows: packed.append(tuple(w.shape)) or real(w, rows))
    model = make_tiny_model(64, n_layers=2, d_model=32, seed=5).eval()
    n_lin = sum(type(m) is nn.Linear for m in model.model.modules())
    big = torch.randint(4, 64, (8, 80))  # 640 rows: plain fp32 path on AVX-512
    with torch.inference_mode():
        ref_big, ref_small = model(input_ids=big).logits, model(input_ids=big[:2, :9]).logits
        with packed_linears(model.model) as n:
            out_big = model(input_ids=big).logits
            assert len(packed) == 1  # only the eager self-check of the first layer
            out_small = model(input_ids=big[:2, :9]).logits  # 18 rows: every layer packs now
            assert len(packed) == n == n_lin
    torch.testing.assert_close(out_big, ref_big, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_small, ref_small, rtol=1e-4, atol=1e-5)


def test_warm_up_runs_one_discarded_forward_and_keeps_the_model_as_it_was():
    from mechdiff.model.kernels import warm_up

    model = make_tiny_model(64, n_layers=2, d_model=32, seed=6).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    h = model.register_forward_hook(lambda m, a, kw_out: seen.append(True))
    warm_up(model)
    h.remove()
    assert len(seen) == 1 and model.training  # one forward ran; train mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    warm_up(nn.Linear(3, 3))  # a module that takes no input_ids: best effort, no error


@pytest.mark.parametrize(("vendor", "mkl", "avx512", "expected"), [
    ("GenuineIntel", True, True, True),  # MKL's AVX-512 kernels: plain BLAS at the peak
    ("AuthenticAMD", True, True, False),  # MKL runs AVX2 code on AMD's AVX-512 CPUs: oneDNN instead
    ("AuthenticAMD", False, True, True),  # another BLAS dispatches on the CPU's features, not its vendor
    ("GenuineIntel", True, False, False),  # AVX2 CPU
    (None, True, True, True),  # vendor unknown: trust the capability
])
def test_blas_level_reads_the_cpu_kind(monkeypatch, vendor, mkl, avx512, expected):
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", None)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if avx512 else "AVX2")
    assert kernels._blas_avx512() is expected
    assert kernels.use_packed(torch.zeros(4096, 8)) is (not expected)


@pytest.mark.parametrize("blas_avx512", [True, False])
def test_linear_matches_numpy_on_either_kernel(monkeypatch, blas_avx512):
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", blas_avx512)
    calls = []
    real = kernels._lp
    monkeypatch.setattr(kernels, "_lp", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(300, 40, generator=g), torch.randn(70, 40, generator=g), torch.randn(70, generator=g)
    ref = x.double().numpy() @ w.double().numpy().T + b.double().numpy()
    with torch.no_grad():
        out = kernels.linear(x, w, b, out=torch.empty(300, 70))
        no_bias = kernels.linear(x, w)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(no_bias.numpy(), ref - b.double().numpy(), rtol=1e-5, atol=1e-4)
    # which kernel ran is the CPU kind's choice only: oneDNN exactly where the BLAS runs AVX2 code
    assert len(calls) == (0 if blas_avx512 else 2)


@pytest.mark.parametrize("blas_avx512", [True, False])
def test_onednn_linears_train_with_the_plain_gradients(monkeypatch, blas_avx512):
    """onednn_linears: where the BLAS runs AVX2 code every fp32 linear of a model trains on oneDNN, with the
    outputs and gradients of F.linear (float64 autograd reference); on Intel AVX-512 it patches nothing."""
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", blas_avx512)
    model = make_tiny_model(64, n_layers=2, d_model=32, seed=7).train()
    ref = make_tiny_model(64, n_layers=2, d_model=32, seed=7).double().train()
    ids = torch.randint(4, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    n_lin = sum(type(m) is nn.Linear for m in model.modules())
    with kernels.onednn_linears(model) as n:
        assert n == (0 if blas_avx512 else n_lin)
        loss = model(input_ids=ids).logits.float().square().mean()
        loss.backward()
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored
    ref(input_ids=ids).logits.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None or q.grad is not None:
            np.testing.assert_allclose(p.grad.double().numpy(), q.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("blas_avx512", [True, False])
def test_linear_takes_any_bias_layout(monkeypatch, blas_avx512):
    """A strided or 0-d bias gives F.linear's broadcast sum on either kernel (with and without autograd)."""
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", blas_avx512)
    g = torch.Generator().manual_seed(4)
    x, w, full = torch.randn(2, 6, 16, generator=g), torch.randn(17, 16, generator=g), torch.randn(34, generator=g)
    for bias in (full[::2], torch.tensor(1.5)):
        ref = x.double().numpy() @ w.double().numpy().T + bias.double().numpy()
        with torch.no_grad():
            np.testing.assert_allclose(kernels.linear(x, w, bias).numpy(), ref, rtol=1e-5, atol=1e-5)
        wg = w.clone().requires_grad_(True)
        np.testing.assert_allclose(kernels.linear(x, wg, bias).detach().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_onednn_linears_patch_also_when_entered_without_gradients(monkeypatch):
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", False)
    model = make_tiny_model(64, n_layers=1, d_model=32, seed=8)
    n_lin = sum(type(m) is nn.Linear for m in model.modules())
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), kernels.onednn_linears(model) as n:
            assert n == n_lin


@pytest.mark.parametrize("blas_avx512", [True, False])
def test_packed_model_gives_plain_gradients(monkeypatch, blas_avx512):
    """With gradients on (head attribution through a packed model) each packed layer falls back to `linear`: the
    input gradients are F.linear's (float64 autograd reference) on either kernel."""
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", blas_avx512)
    model = make_tiny_model(64, n_layers=2, d_model=32, seed=9).eval()
    ref = make_tiny_model(64, n_layers=2, d_model=32, seed=9).double().eval()
    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = []
    for m, dt in ((model, torch.float32), (ref, torch.float64)):
        emb = m.model.embed_tokens(ids).detach().to(dt).requires_grad_(True)
        with packed_linears(m.model) if m is model else contextlib.nullcontext():
            m(inputs_embeds=emb).logits.square().mean().backward()
        grads.append(emb.grad.double().numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_reused_transposes_train_bit_for_bit_and_are_made_once_per_weight_version(monkeypatch):
    """Inside onednn_linears each weight's transposed copy for the backward is made once per version: AdamW
    steps (in-place, version bumped) get fresh copies, so three steps of two backward passes each end in the
    same weights bit for bit as with a fresh copy per call; a frozen weight is copied once in all."""
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", False)
    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    ids = torch.randint(4, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    real, real_reuse = kernels._weight_t, kernels.reuse_transposes
    made: list[torch.Tensor] = []

    def counting(w: torch.Tensor) -> torch.Tensor:
        out = real(w)
        if not any(out is m for m in made):
            made.append(out)
        return out

    def train(reuse: bool) -> tuple[nn.Module, int]:
        made.clear()
        model = make_tiny_model(64, n_layers=2, d_model=32, seed=7)
        frozen = model.model.layers[0]
        for p in frozen.parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        monkeypatch.setattr(kernels, "reuse_transposes", real_reuse if reuse else contextlib.nullcontext)
        with kernels.onednn_linears(model):
            for _ in range(3):
                opt.zero_grad()
                for half in (ids[:2], ids[2:]):  # two backward passes on the same weights per step
                    model(input_ids=half).logits.square().mean().backward()
                opt.step()
        return model, len(made)

    monkeypatch.setattr(kernels, "_weight_t", counting)
    plain, n_plain = train(False)
    reused, n_reused = train(True)
    for (name, p), q in zip(plain.named_parameters(), reused.parameters()):
        assert torch.equal(p, q), name
    lin = [m for m in reused.modules() if type(m) is nn.Linear]
    n_frozen = sum(1 for m in reused.model.layers[0].modules() if type(m) is nn.Linear)
    n_trained = len(lin) - n_frozen
    # grad_x is needed through every layer above the embedding: frozen layers once in all, trained once per step
    # (plus the one probe of onednn_linears' self-check); without reuse, once per backward call
    assert n_reused == 1 + n_frozen + 3 * n_trained
    assert n_plain == 1 + 6 * (n_frozen + n_trained)
    assert kernels._TRANSPOSES[0] is None  # dropped when the outermost block ends


def test_reused_transposes_follow_a_parameter_whose_storage_is_swapped(monkeypatch):
    """A conversion that swaps a parameter's storage without a version bump (`.to()`, `.float()`, `p.data = ...`)
    gets a fresh transposed copy: the input gradient after it is the new weight's (numpy reference)."""
    from mechdiff.model import kernels

    monkeypatch.setattr(kernels, "_BLAS_AVX512", False)
    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    lin = nn.Linear(16, 8, bias=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 16, generator=g)

    def grad_x() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        kernels._OneDNNLinear.apply(xr, lin.weight, None).sum().backward()
        return xr.grad

    with kernels.reuse_transposes():
        first = grad_x()
        version = lin.weight._version
        lin.weight.data = lin.weight.data * 3.0  # new storage, same version
        assert lin.weight._version == version
        after = grad_x()
    ones = np.ones((4, 8))
    np.testing.assert_allclose(first.numpy(), ones @ (lin.weight.detach().numpy() / 3.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after.numpy(), ones @ lin.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
