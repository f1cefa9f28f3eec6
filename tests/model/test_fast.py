"""pack_for_inference: the stages' forwards on packed CPU kernels equal the plain model's."""

from __future__ import annotations

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
