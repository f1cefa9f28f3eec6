"""Pretrained SAEs (Gemma Scope params.npz, SAELens folders) imported as mechdiff SAEs: the same latents and
reconstructions as each format's own formula, written out in numpy here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.sae.model import load_sae, save_sae
from mechdiff.sae.pretrained import digest, load_pretrained

D, W = 16, 48


def _weights(seed: int = 0, unit: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(W, D)) * rng.uniform(0.2, 3.0, size=(W, 1))  # decoder rows of many norms
    if unit:
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {"W_enc": rng.normal(size=(D, W)) / np.sqrt(D), "W_dec": W_dec, "b_enc": rng.normal(size=W) * 0.3,
            "b_dec": rng.normal(size=D), "threshold": rng.uniform(0.05, 0.8, size=W)}


def _reference(t: dict, x: np.ndarray, *, arch: str, b_dec_to_input: bool, k: int | None = None):
    """Latents and reconstruction by the source format's own formula (float64)."""
    pre = (x - t["b_dec"] if b_dec_to_input else x) @ t["W_enc"] + t["b_enc"]
    if arch == "jumprelu":
        z = np.maximum(pre, 0) * (pre > t["threshold"])
    elif arch == "standard":
        z = np.maximum(pre, 0)
    else:
        z = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=1)[:, :k]
        np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    return z, z @ t["W_dec"] + t["b_dec"]


def _check(sae, t, x, **kw) -> None:
    z_ref, x_ref = _reference(t, x, **kw)
    xt = torch.from_numpy(x).float()
    with torch.no_grad():
        z, x_hat = sae.encode(xt).double().numpy(), sae(xt).double().numpy()
    np.testing.assert_allclose(x_hat, x_ref, rtol=1e-4, atol=1e-4)
    assert ((z > 0) == (z_ref > 0)).mean() > 0.999  # the same latents fire (ties at a threshold aside)
    norms = np.linalg.norm(t["W_dec"], axis=1) if kw["arch"] != "topk" else np.ones(W)
    np.testing.assert_allclose(z, z_ref * norms, rtol=1e-4, atol=1e-4)  # each latent carries its decoder norm
    assert 0 < (z_ref > 0).mean() < 0.9  # the case is not trivial: some latents fire, most do not


def _saelens(tmp_path, t: dict, cfg: dict):
    from safetensors.numpy import save_file

    d = tmp_path / f"sl_{cfg['architecture']}"
    d.mkdir()
    keep = {k: v.astype(np.float32) for k, v in t.items() if k != "threshold" or cfg["architecture"] == "jumprelu"}
    save_file(keep, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": W, "normalize_activations": "none", **cfg}))
    return d


@pytest.fixture
def x():
    return np.random.default_rng(9).normal(size=(400, D)) * 1.5


def test_gemma_scope_params_npz_imports_exactly(tmp_path, x):
    t = _weights()
    np.savez(tmp_path / "params.npz", **{k: v.astype(np.float32) for k, v in t.items()})
    t = {k: v.astype(np.float32).astype(np.float64) for k, v in t.items()}
    for spec in (tmp_path / "params.npz", tmp_path):  # the file or its folder
        sae = load_pretrained(str(spec), d_in=D)
        _check(sae, t, x, arch="jumprelu", b_dec_to_input=False)
    # the project's convention: unit-norm decoder columns; saved and loaded, the same SAE
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=0).numpy(), 1.0, atol=1e-6)
    save_sae(sae, tmp_path / "out", meta={"pretrained": "x"})
    back = load_sae(tmp_path / "out")
    xt = torch.from_numpy(x).float()
    with torch.no_grad():
        assert torch.equal(back.encode(xt), sae.encode(xt))
    assert back.topk_codes(xt) is None and back.config_dict()["architecture"] == "jumprelu"
    assert len(digest(str(tmp_path / "params.npz"))) == 64


@pytest.mark.parametrize("arch,b_dec_to_input", [("jumprelu", True), ("jumprelu", False), ("standard", True),
                                                  ("topk", True)])
def test_saelens_folders_import_exactly(tmp_path, x, arch, b_dec_to_input):
    t = _weights(1, unit=arch == "topk")
    cfg = {"architecture": arch, "apply_b_dec_to_input": b_dec_to_input, **({"k": 5} if arch == "topk" else {})}
    d = _saelens(tmp_path, t, cfg)
    t = {k: v.astype(np.float32).astype(np.float64) for k, v in t.items()}
    _check(load_pretrained(str(d), d_in=D), t, x, arch=arch, b_dec_to_input=b_dec_to_input,
           k=cfg.get("k"))


def test_saelens_log_threshold_and_mechdiff_folders(tmp_path, x):
    from safetensors.numpy import save_file

    t = _weights(2)
    d = tmp_path / "old"
    d.mkdir()
    save_file({**{k: v.astype(np.float32) for k, v in t.items() if k != "threshold"},
               "log_threshold": np.log(t["threshold"]).astype(np.float32)}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D, "d_sae": W}))
    t32 = {k: v.astype(np.float32).astype(np.float64) for k, v in t.items()}
    t32["threshold"] = np.exp(np.log(t["threshold"]).astype(np.float32).astype(np.float64))
    sae = load_pretrained(str(d))
    _check(sae, t32, x, arch="jumprelu", b_dec_to_input=True)
    save_sae(sae, tmp_path / "mine")
    _check(load_pretrained(str(tmp_path / "mine")), t32, x, arch="jumprelu", b_dec_to_input=True)


def test_bad_pretrained_saes_fail_in_one_line(tmp_path):
    t = _weights(3)
    cases = []
    with pytest.raises(MechdiffError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    bad = dict(t, W_enc=t["W_enc"].copy())
    bad["W_enc"][0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **bad)
    cases.append((tmp_path / "nan.npz", "NaN"))
    np.savez(tmp_path / "shape.npz", **dict(t, b_dec=np.zeros(D + 1)))
    cases.append((tmp_path / "shape.npz", "inconsistent shapes"))
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in t.items() if k != "threshold"})
    cases.append((tmp_path / "missing.npz", "lacks 'threshold'"))
    cases.append((_saelens(tmp_path, _weights(4), {"architecture": "topk", "k": 3}), "unit-norm"))
    (tmp_path / "ln").mkdir()
    (tmp_path / "ln" / "sae_weights.safetensors").write_bytes(b"")
    (tmp_path / "ln" / "cfg.json").write_text(json.dumps({"architecture": "standard", "normalize_activations": "layer_norm"}))
    cases.append((tmp_path / "ln", "normalize_activations"))
    (tmp_path / "gated").mkdir()
    (tmp_path / "gated" / "sae_weights.safetensors").write_bytes(b"")
    (tmp_path / "gated" / "cfg.json").write_text(json.dumps({"architecture": "gated"}))
    cases.append((tmp_path / "gated", "not supported"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "holds none of"))
    for spec, needle in cases:
        with pytest.raises(MechdiffError, match=needle) as e:
            load_pretrained(str(spec))
        assert "\n" not in str(e.value)
    np.savez(tmp_path / "params.npz", **t)
    with pytest.raises(MechdiffError, match="the site has width 17"):
        load_pretrained(str(tmp_path / "params.npz"), d_in=17)
    with pytest.raises(MechdiffError, match="hf:<org>/<repo>"):
        load_pretrained("hf:just-a-name")


def test_older_saelens_configs_scaling_factors_and_bf16_weights(tmp_path, x):
    from safetensors.torch import save_file

    # SAELens before 6: topk as an activation of a "standard" SAE, k in activation_fn_kwargs
    t = _weights(5, unit=True)
    d = _saelens(tmp_path, t, {"architecture": "standard", "activation_fn_str": "topk",
                               "activation_fn_kwargs": {"k": 6}})
    t32 = {k: v.astype(np.float32).astype(np.float64) for k, v in t.items()}
    _check(load_pretrained(str(d)), t32, x, arch="topk", b_dec_to_input=True, k=6)
    # a fine-tuning scaling factor multiplies the latents before W_dec: the same as scaled decoder rows
    t = _weights(6)
    sf = np.random.default_rng(1).uniform(0.5, 2.0, size=W)
    d = tmp_path / "sf"
    d.mkdir()
    save_file({**{k: torch.from_numpy(v.astype(np.float32)) for k, v in t.items()},
               "finetuning_scaling_factor": torch.from_numpy(sf.astype(np.float32))}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "finetuning_scaling_factor": True}))
    ref = {k: v.astype(np.float32).astype(np.float64) for k, v in t.items()}
    ref["W_dec"] = ref["W_dec"] * sf.astype(np.float32).astype(np.float64)[:, None]
    _check(load_pretrained(str(d)), ref, x, arch="jumprelu", b_dec_to_input=True)
    # bf16 weights read through torch, imported from their bf16 values
    d = tmp_path / "bf16"
    d.mkdir()
    tb = {k: torch.from_numpy(v.astype(np.float32)).bfloat16() for k, v in _weights(7).items()}
    save_file(tb, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"architecture": "jumprelu"}))
    _check(load_pretrained(str(d)), {k: v.double().numpy() for k, v in tb.items()}, x, arch="jumprelu",
           b_dec_to_input=True)


def test_unreadable_files_fail_in_one_line(tmp_path):
    (tmp_path / "params.npz").write_bytes(b"not a zip")
    (tmp_path / "sl").mkdir()
    (tmp_path / "sl" / "sae_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps({"architecture": "jumprelu"}))
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "sae_weights.safetensors").write_bytes(b"")
    (tmp_path / "k" / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": None}))
    for spec, needle in ((tmp_path / "params.npz", "not a readable npz"), (tmp_path / "sl", "cannot read"),
                         (tmp_path / "k", "integer k")):
        with pytest.raises(MechdiffError, match=needle) as e:
            load_pretrained(str(spec))
        assert "\n" not in str(e.value)
