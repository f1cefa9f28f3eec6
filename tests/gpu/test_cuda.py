"""CUDA checks: extraction, SAE training, patching and steering on a GPU agree with the CPU.

Every test is skipped without a CUDA device. fp32 matmuls run at "highest" precision (no TF32) so the fp32
comparisons can be tight. The tiny tokenizer / model are the session fixtures of tests/conftest.py; the CUDA
model is a copy (extract moves a model that is already in the requested dtype to the device in place).
"""

from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import pytest
import torch

from mechdiff.analysis.patching import patched_logits
from mechdiff.analysis.steering import Handle, intervention
from mechdiff.data.corpus import Prompt
from mechdiff.data.extract import extract
from mechdiff.model.sites import Site
from mechdiff.model.tokens import encode, right_pad
from mechdiff.sae.model import TopKSAE
from mechdiff.sae.train import SAEConfig, train_sae
from tests.conftest import SENTENCES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DEV = "cuda"
SITES = [Site(0), Site(1), Site(2), Site(3), Site(1, "mlp_out"), Site(2, "attn_out"), Site(3, "resid_pre")]
VIEWS = {"*": ["last", "mean"], "L0.resid_post": ["last", "mean", "tokens"]}


@pytest.fixture(autouse=True)
def _full_fp32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.fixture(scope="module")
def prompts():
    """30 prompts of varied length (the fixture sentences, suffixed), in two datasets and splits."""
    texts = [s if i < 10 else f"{s} and {SENTENCES[(i * 7) % 10]}" for i, s in enumerate(SENTENCES * 3)]
    return [Prompt(10 + i, t, ["cultural", "control"][i % 2], ["train", "test"][i % 3 == 0])
            for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def gpu_model(tiny_model):
    """A CUDA copy of the tiny fp32 model."""
    return copy.deepcopy(tiny_model).to(DEV).eval()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference over the largest absolute reference value."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def rel_norm(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| (Frobenius)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


@pytest.fixture(scope="module")
def cpu_store(tiny_model, tiny_tok, prompts, tmp_path_factory):
    """The reference store: extract on CPU, fp32."""
    return extract(tiny_model, tiny_tok, prompts, SITES, VIEWS, tmp_path_factory.mktemp("cpu") / "cpu.zarr",
                   batch_size=4, shard_rows=8, store_logits=True, progress=False, resume=False)


def test_extract_cuda_fp32_equals_cpu_store(gpu_model, tiny_tok, prompts, cpu_store, tmp_path):
    gpu = extract(gpu_model, tiny_tok, prompts, SITES, VIEWS, tmp_path / "gpu.zarr", batch_size=4, shard_rows=8,
                  store_logits=True, device=DEV, progress=False, resume=False)
    assert gpu.complete and gpu.n == cpu_store.n == len(prompts)
    assert next(gpu_model.parameters()).device.type == DEV
    for name in ("prompt_id", "n_tokens", "decision", "tok_offset", "tok_id", "dataset", "split"):
        np.testing.assert_array_equal(gpu.index(name), cpu_store.index(name))
    assert gpu.attrs["params"]["token_ids_sha"] == cpu_store.attrs["params"]["token_ids_sha"]
    for s in SITES:
        assert gpu.views(s.name) == cpu_store.views(s.name)
        for v in gpu.views(s.name):
            a, b = gpu.read(s.name, v), cpu_store.read(s.name, v)
            assert a.dtype == np.float32 and np.isfinite(a).all()
            assert rel_err(a, b) <= 1e-4, (s.name, v, rel_err(a, b))
            if v != "tokens":
                (m_g, sd_g), (m_c, sd_c) = gpu.stats(s.name, v), cpu_store.stats(s.name, v)
                assert rel_err(m_g, m_c) <= 1e-4 and rel_err(sd_g, sd_c) <= 1e-4, (s.name, v)
    # logits are stored as float16: allow its rounding (one ulp is ~1e-3 relative)
    assert rel_err(gpu.read_logits(), cpu_store.read_logits()) <= 2e-3


def test_extract_cuda_bf16_runs_and_keeps_float_outputs(tiny_model, tiny_tok, prompts, cpu_store, tmp_path):
    st = extract(tiny_model, tiny_tok, prompts, SITES, VIEWS, tmp_path / "bf16.zarr", batch_size=8, shard_rows=8,
                 dtype="bfloat16", device=DEV, progress=False, resume=False)
    # the caller's fp32 CPU model is untouched: extract ran a cast copy on the GPU
    p = next(tiny_model.parameters())
    assert (p.device.type, p.dtype) == ("cpu", torch.float32)
    assert st.complete and st.attrs["params"]["model_dtype"] == "bfloat16" and st.attrs["dtype"] == "float32"
    for s in SITES:
        for v in st.views(s.name):
            assert np.dtype(st.array(s.name, v).dtype) == np.float32
            x = st.read(s.name, v)
            assert x.dtype == np.float32 and np.isfinite(x).all()
            assert rel_norm(x, cpu_store.read(s.name, v)) < 5e-2, (s.name, v, rel_norm(x, cpu_store.read(s.name, v)))
            if v != "tokens":
                mean, std = st.stats(s.name, v)
                assert mean.dtype in (np.float32, np.float64) and std.dtype in (np.float32, np.float64)
                assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()


def _sae_data(d: int, batch: int, steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, d)).astype(np.float32) / 4

    def one() -> np.ndarray:
        lat = rng.standard_normal((batch, 16)).astype(np.float32)
        return lat @ mix + 0.2 * rng.standard_normal((batch, d)).astype(np.float32) + 0.5

    return [one() for _ in range(steps)], one()


def _held_out_fvu(sae: TopKSAE, x: np.ndarray) -> float:
    sae = copy.deepcopy(sae).cpu().eval()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        r = sae(xt)
    return float(((r - xt) ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum())


def test_train_sae_cuda_matches_cpu_fvu():
    D, W, K, B, S = 64, 256, 8, 256, 80
    xs, held = _sae_data(D, B, S)

    def cfg() -> SAEConfig:  # default dead_tokens: latents die after 8 steps, so AuxK runs too
        return SAEConfig(d_in=D, width=W, k=K, batch_size=B, ckpt_every=0, seed=0)

    cpu = train_sae(xs, cfg(), None, total_tokens=S * B, progress=False, resume=False)
    if "device" in inspect.signature(train_sae).parameters:
        kw: dict = {"device": DEV}
    else:  # no device argument: hand train_sae a model and batches that already live on the GPU
        kw = {"model": TopKSAE(D, W, K, seed=0).to(DEV)}
    try:
        gpu = train_sae([torch.from_numpy(x).to(DEV) for x in xs], cfg(), None, total_tokens=S * B, progress=False,
                        resume=False, **kw)
    except RuntimeError as e:
        pytest.fail(f"train_sae does not run on {DEV} ({', '.join(kw)}=...): {e}")
    assert gpu.dec.device.type == DEV
    assert [r["step"] for r in gpu.train_log] == [r["step"] for r in cpu.train_log]
    f_cpu, f_gpu = cpu.train_log[-1]["fvu"], gpu.train_log[-1]["fvu"]
    assert np.isfinite(f_gpu) and abs(f_gpu - f_cpu) <= 0.01 + 0.05 * f_cpu, (f_gpu, f_cpu)
    h_cpu, h_gpu = _held_out_fvu(cpu, held), _held_out_fvu(gpu, held)
    assert abs(h_gpu - h_cpu) <= 0.01 + 0.05 * h_cpu, (h_gpu, h_cpu)
    assert h_gpu < 0.6  # it learned (a random SAE of this size reconstructs far worse)



def test_resample_dead_on_cuda_with_the_trainers_cpu_generator():
    """Dead-latent resampling draws with train_sae's CPU generator while the SAE lives on the GPU."""
    D, W, K, B, S = 32, 128, 4, 128, 12
    xs, _ = _sae_data(D, B, S)
    cfg = SAEConfig(d_in=D, width=W, k=K, batch_size=B, ckpt_every=0, seed=0, resample_every=4, dead_tokens=B)
    sae = train_sae([torch.from_numpy(x).to(DEV) for x in xs], cfg, None, total_tokens=S * B, progress=False,
                    resume=False, device=DEV)
    assert sae.dec.device.type == DEV and bool(torch.isfinite(sae.dec).all())
    assert torch.allclose(sae.dec.norm(dim=1), torch.ones(W, device=DEV), atol=1e-4)

def test_patched_logits_cuda_equal_cpu(tiny_model, gpu_model, tiny_tok):
    enc = encode(tiny_tok, SENTENCES)
    rows = np.arange(len(SENTENCES))
    site = Site(2, "resid_post")
    vec = np.random.default_rng(1).normal(size=(len(rows), 64)).astype(np.float32)
    for pc in (True, False):
        want = patched_logits(tiny_model, enc, rows, site, vec, prefix_cache=pc, batch_size=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the prefix-cache path must not fall back on CUDA
            got = patched_logits(gpu_model, enc, rows, site, vec, prefix_cache=pc, batch_size=4)
        assert got.dtype == np.float32 and rel_err(got, want) <= 1e-4, (pc, rel_err(got, want))
    unpatched = patched_logits(gpu_model, enc, rows, site, None, batch_size=4)
    assert rel_err(unpatched, got) > 1e-3  # the patch changed something


def test_steering_forward_cuda_equals_cpu(tiny_model, gpu_model, tiny_tok):
    enc = encode(tiny_tok, SENTENCES[:8])
    ids, mask = right_pad(enc.ids, enc.pad)
    start = torch.tensor(enc.decision, dtype=torch.long)
    rng = np.random.default_rng(2)
    V, _ = np.linalg.qr(rng.normal(size=(64, 3)))
    h = Handle(Site(1), V, 0.1 * rng.normal(size=(3, 3)), rng.normal(size=3))
    with torch.no_grad():
        with intervention([h], 2.0)(tiny_model, start):
            want = tiny_model(input_ids=ids, attention_mask=mask).logits
        with intervention([h], 2.0)(gpu_model, start):
            got = gpu_model(input_ids=ids.to(DEV), attention_mask=mask.to(DEV)).logits
        plain = gpu_model(input_ids=ids.to(DEV), attention_mask=mask.to(DEV)).logits
    assert got.device.type == DEV
    real = mask.bool().numpy()
    g, w = got.float().cpu().numpy()[real], want.numpy()[real]
    assert rel_err(g, w) <= 1e-4, rel_err(g, w)
    assert rel_err(plain.cpu().numpy()[real], g) > 1e-3  # the steering changed the logits


def test_diff_heads_cuda_equals_cpu():
    """Head attribution, patching and the cumulative curve on the GPU agree with the CPU on a planted head edit."""
    from mechdiff.analysis.behaviour import greedy_continuations, scored_sequences
    from mechdiff.analysis.heads import diff_heads, make_batches
    from mechdiff.model.recipes import plant_edit
    from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
    from mechdiff.model.tokens import pad_id

    texts = [f"{s} and {SENTENCES[(i * 3) % len(SENTENCES)]}" for i, s in enumerate(SENTENCES * 2)]
    tok = make_tiny_tokenizer(texts)
    base = make_tiny_model(len(tok), n_layers=4, d_model=64, seed=0)
    tuned = copy.deepcopy(base)
    plant_edit(tuned, layer=1, kind="attn_out", rank=4, scale=6.0, seed=3, heads=[2])
    enc = encode(tok, texts)
    conts = greedy_continuations(tuned, tok, enc, np.arange(len(texts)), max_new_tokens=3)
    keep = [i for i, c in enumerate(conts) if c.strip()]
    seqs, n_prompt, _, n_cont = scored_sequences(tok, [texts[i] for i in keep], [conts[i] for i in keep], max_len=96)
    kw = dict(n_patch=6, n_random=2, seed=0)

    def run(dev: str) -> dict:
        b, t = copy.deepcopy(base).to(dev).eval(), copy.deepcopy(tuned).to(dev).eval()
        batches = make_batches(seqs, n_prompt, n_cont, pad=pad_id(tok), batch_size=8, device=dev)
        return diff_heads(b, t, batches, **kw)

    want, got = run("cpu"), run(DEV)
    for key in ("base", "tuned", "pred", "direct"):
        assert np.isfinite(got[key]).all() and rel_err(got[key], want[key]) <= 1e-4, (key, rel_err(got[key], want[key]))
    assert [(r["layer"], r["head"]) for r in got["patched"]] == [(r["layer"], r["head"]) for r in want["patched"]]
    assert (want["patched"][0]["layer"], want["patched"][0]["head"]) == (1, 2)  # the planted head ranks first
    for g, w in zip(got["patched"], want["patched"]):
        for k, v in w.items():
            if isinstance(v, float):
                assert abs(g[k] - v) <= 1e-4 * max(1.0, abs(v)), (k, g[k], v)
