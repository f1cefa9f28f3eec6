"""pack_for_inference: the stages' forwards on packed CPU kernels equal the plain model's."""

from __future__ import annotations

import pytest
import torch

from mechdiff.model.fast import pack_for_inference, unpack
from mechdiff.model.kernels import onednn_linear_available
from mechdiff.model.sites import Site, replace_at
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer


def test_packed_model_equals_plain_and_unpacks():
    tok = make_tiny_tokenizer(["the cat sat on a mat while dogs ran far"])
    model = make_tiny_model(len(tok), n_layers=3, d_model=64, seed=0)
    x = torch.randint(0, len(tok), (4, 9))
    vec = torch.randn(4, 64)
    pos = torch.tensor([3, 5, 8, 2])
    with torch.no_grad():
        ref = model(x).logits
        with replace_at(model, Site(1, "mlp_out"), pos, vec):
            ref_patched = model(x).logits
    assert pack_for_inference(model) is model
    packed = sum("forward" in m.__dict__ for m in model.modules())
    assert packed > 0 or not onednn_linear_available()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)
        with replace_at(model, Site(1, "mlp_out"), pos, vec):  # hooks on the fused MLP still act
            torch.testing.assert_close(model(x).logits, ref_patched, rtol=1e-5, atol=1e-5)
    pack_for_inference(model)  # idempotent
    assert sum("forward" in m.__dict__ for m in model.modules()) == packed
    model(x).logits.sum().backward()  # with gradients the plain layers run
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    unpack(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("avx512_fp32", [True, False])
@pytest.mark.parametrize("blas_avx512", [True, False])
def test_head_packs_only_where_the_blas_is_slow_and_avx512_fp32_keeps_the_plain_path(monkeypatch, blas_avx512,
                                                                                      avx512_fp32):
    """The LM head joins the packed layers where the BLAS runs AVX2 code; on an AVX-512 BLAS (Intel) in fp32 the
    head is left as it is, and with avx512_fp32=False the whole model: logits bit for bit the unpacked model's."""
    from mechdiff.model import kernels

    if not onednn_linear_available():
        pytest.skip("no oneDNN linear in this torch build")
    monkeypatch.setattr(kernels, "_BLAS_AVX512", blas_avx512)
    calls = {"plain": 0}
    real = torch.nn.functional.linear

    def counting(*a, **k):
        calls["plain"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    tok = make_tiny_tokenizer(["the cat sat on a mat while dogs ran far"])
    model = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=3).eval()
    head = model.get_output_embeddings()
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())  # the body's and the head
    x = torch.randint(0, len(tok), (3, 7))  # 21 rows: in the packed range of use_packed on either CPU kind
    with torch.no_grad():
        ref = model(x).logits
    pack_for_inference(model, avx512_fp32=avx512_fp32)
    calls["plain"] = 0
    with torch.no_grad():
        out = model(x).logits
    if blas_avx512:
        assert "forward" not in head.__dict__  # never packed there: no packed copy kept
        if avx512_fp32:
            assert calls["plain"] == 1  # the body packs at these rows; the head runs the plain BLAS call
        else:
            assert calls["plain"] == n_linear and not any("forward" in m.__dict__ for m in model.modules())
            assert torch.equal(out, ref)
    else:
        assert calls["plain"] == 0 and "forward" in head.__dict__  # every linear on a packed weight
        with torch.no_grad():
            h = model.model(x).last_hidden_state.double()
        torch.testing.assert_close(out.double(), h @ head.weight.detach().double().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    unpack(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
