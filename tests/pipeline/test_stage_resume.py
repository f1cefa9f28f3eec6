"""Stage-level resume and output safety: a killed `extract` resumes, no stage destroys an output before its inputs pass.

Each test lays out a temporary directory like the repository (params.yaml, artifacts/models, artifacts/prompts)
with a tiny model and runs the real stage scripts there as subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from mechdiff.data.corpus import Prompt, save_prompts, split_prompts
from mechdiff.data.store import ActStore
from mechdiff.model.load import save_model
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
from mechdiff.resume import MARK

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the festival lamps river train rice kites music office paper cats water dances south sky winter "
         "grandmother family street wedding printer sides angles sunrise lentils").split()
SITE = "L2.resid_post"


def _params(**extract) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["pair"]["base"]["id"] = "tiny"
    p["extract"].update({"batch_size": 2, "shard_rows": 8, "layer_stride": 1, "detail_layers": [2],
                         "store_logits": True, "pack_weights": False, **extract})
    p["transport"]["sites"] = [SITE]
    p["sae"].update({"layers": [2], "expansion": 2, "k": 4, "batch_size": 256, "epochs": 1})
    return p


def _repo(tmp: Path, n_prompts: int, **extract) -> Path:
    """A directory laid out like the repository after the models and fairness stages, on a tiny pair."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 24)))) for _ in range(n_prompts)]
    tok = make_tiny_tokenizer(texts)
    for which, seed in (("base", 0), ("tuned", 1)):
        save_model(make_tiny_model(len(tok), n_layers=4, d_model=64, seed=seed), tok,
                   tmp / "artifacts" / "models" / which, {"role": which})
    prompts = split_prompts([Prompt(pid=i, text=t, dataset="cultural" if i % 2 else "control", group=str(i))
                             for i, t in enumerate(texts)], (0.6, 0.2, 0.2), seed=0)
    save_prompts(tmp / "artifacts" / "prompts" / "prompts.jsonl", prompts)
    np.savez(tmp / "artifacts" / "prompts" / "fairness.npz", identical=True,
             kept_pids=np.arange(n_prompts, dtype=np.int64), allowed_base=np.zeros(0), allowed_tuned=np.zeros(0))
    (tmp / "params.yaml").write_text(yaml.safe_dump(_params(**extract)))
    return tmp


def _stage(repo: Path, *args: str, wait: bool = True, env: dict[str, str] | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(ROOT / "stages" / f"{args[0]}.py"), *args[1:]]
    if wait:  # output to files, and the process group killed at the end: worker processes a killed stage leaves
        # behind (joblib's loky pool waits minutes for its parent) would hold pipes open and keep the test waiting
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
            try:
                rc = proc.wait(timeout=600)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows_done(store: Path) -> int:
    try:
        return int(json.loads((store / "zarr.json").read_text())["attributes"].get("rows_done", 0))
    except (OSError, ValueError, KeyError):
        return 0


def _contents(path: Path) -> dict:
    """Every array of a store (or file of a folder), for exact comparison."""
    if (path / "zarr.json").is_file():
        st = ActStore.open(path)
        out = {f"{s}/{v}": st.read(s, v) for s in st.sites for v in st.views(s)}
        out["logits"] = st.read_logits()
        out["stats"] = json.dumps(dict(zarr.open_group(str(path), mode="r").attrs)["stats"], sort_keys=True)
        return out
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=True) if isinstance(a[k], np.ndarray) else a[k] == b[k], k


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("mechdiff:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr


@pytest.mark.slow
def test_killed_extract_stage_resumes_and_matches_an_uninterrupted_run(tmp_path):
    n = 480
    repo = _repo(tmp_path / "killed", n)
    store = repo / "artifacts" / "acts" / "base.zarr"
    proc = _stage(repo, "extract", "base", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _rows_done(store) < n // 4:
        time.sleep(0.01)
    assert proc.poll() is None, "the stage finished before it could be killed: give it more prompts"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _rows_done(store)
    assert 0 < killed_at < n
    r = _stage(repo, "extract", "base")
    assert r.returncode == 0, r.stderr
    resumed = [x for x in r.stdout.splitlines() if "resuming" in x]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= killed_at > 0, r.stdout
    assert ActStore.open(store).complete
    # the resumed store equals one written in a single run
    clean = _repo(tmp_path / "clean", n)
    r = _stage(clean, "extract", "base")
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stderr
    _same(_contents(store), _contents(clean / "artifacts" / "acts" / "base.zarr"))
    # a finished store is never resumed into
    r = _stage(repo, "extract", "base")
    assert r.returncode == 0 and "resuming" not in r.stdout
    _same(_contents(store), _contents(clean / "artifacts" / "acts" / "base.zarr"))
    # an unfinished store made with other settings is replaced, not resumed
    (repo / "params.yaml").write_text(yaml.safe_dump(_params(shard_rows=16)))
    proc = _stage(repo, "extract", "base", wait=False)
    deadline = time.time() + 300
    # the finished store (n rows) is replaced first: wait until the new one is part-way
    while time.time() < deadline and proc.poll() is None and not n // 4 <= _rows_done(store) < n:
        time.sleep(0.01)
    assert proc.poll() is None, "the stage finished before it could be killed: give it more prompts"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < _rows_done(store) < n
    (repo / "params.yaml").write_text(yaml.safe_dump(_params()))
    r = _stage(repo, "extract", "base")
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stdout
    _same(_contents(store), _contents(clean / "artifacts" / "acts" / "base.zarr"))


def _finetune_params(p: dict) -> dict:
    p["pair"]["tuned"] = {"id": None, "recipe": "finetune"}
    p["pair"]["finetune"].update({"layers": [2, 3], "steps": 150, "batch_size": 4, "max_len": 32,
                                  "retain": ["control"]})
    return p


@pytest.mark.slow
def test_killed_finetune_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL during the model_tuned stage's fine-tune; the rerun resumes from the saved state (the stage saves it
    every MECHDIFF_CHECKPOINT_S seconds, here before every step) and ends with the uninterrupted run's weights and
    losses; a rerun after a finished fine-tune starts over."""
    from safetensors.numpy import load_file

    def repo(name: str) -> Path:
        r = _repo(tmp_path / name, 96)
        (r / "params.yaml").write_text(yaml.safe_dump(_finetune_params(_params())))
        return r

    env = {"MECHDIFF_CHECKPOINT_S": "0"}
    killed = repo("killed")
    out = killed / "artifacts" / "models" / "tuned"
    proc = _stage(killed, "models", "tuned", wait=False, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "finetune_state.pt").is_file():
        time.sleep(0.01)
    time.sleep(1.0)
    assert proc.poll() is None, "the fine-tune finished before it could be killed: give it more steps"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = _stage(killed, "models", "tuned", env=env)
    assert r.returncode == 0, r.stderr
    at = [int(x.split("resuming at step ")[1].split()[0]) for x in r.stdout.splitlines() if "resuming at step" in x]
    assert at and 0 < at[0] < 150, r.stdout
    assert not (out / "finetune_state.pt").exists() and not (out / MARK).exists()  # the saved model replaced them
    clean = repo("clean")
    r = _stage(clean, "models", "tuned", env=env)
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stdout
    a, b = load_file(out / "model.safetensors"), load_file(clean / "artifacts/models/tuned/model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (killed / "plots/finetune_loss.csv").read_text() == (clean / "plots/finetune_loss.csv").read_text()
    # a finished fine-tune is never resumed into: the rerun trains again and ends the same
    r = _stage(killed, "models", "tuned", env=env)
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stdout
    a = load_file(out / "model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # a bad fine-tune param or checkpoint interval fails in one line before the finished model is touched
    before = _contents(out)
    bad = _finetune_params(_params())
    bad["pair"]["finetune"]["layers"] = [9]
    (killed / "params.yaml").write_text(yaml.safe_dump(bad))
    _one_line_error(_stage(killed, "models", "tuned", env=env), "pair.finetune.layers [9] invalid")
    (killed / "params.yaml").write_text(yaml.safe_dump(_finetune_params(_params())))
    _one_line_error(_stage(killed, "models", "tuned", env={"MECHDIFF_CHECKPOINT_S": "often"}), "MECHDIFF_CHECKPOINT_S")
    _same(_contents(out), before)


@pytest.mark.slow
def test_stages_validate_inputs_before_replacing_outputs(tmp_path):
    repo = _repo(tmp_path, 96)
    for which in ("base", "tuned"):
        r = _stage(repo, "extract", which)
        assert r.returncode == 0, r.stderr
    r = _stage(repo, "sae", "base", "2")
    assert r.returncode == 0, r.stderr
    sae_dir = repo / "artifacts" / "saes" / "base_L2"
    assert json.loads((sae_dir / MARK).read_text())["complete"] is True
    before = _contents(sae_dir)
    # a NaN in the store: the rerun fails with one line and the finished SAE is untouched
    store = repo / "artifacts" / "acts" / "base.zarr"
    arr = zarr.open_array(str(store / SITE / "tokens"), mode="r+")
    arr[3, 5] = np.nan
    r = _stage(repo, "sae", "base", "2")
    _one_line_error(r, "NaN", str(Path("artifacts/acts/base.zarr")))
    _same(_contents(sae_dir), before)
    # extract: a broken input (no saved model) fails before the finished store is touched
    acts = _contents(store)
    (repo / "artifacts" / "models" / "base" / "config.json").unlink()
    r = _stage(repo, "extract", "base")
    _one_line_error(r, "no saved model")
    _same(_contents(store), acts)


def test_prepare_rejects_an_empty_source_by_name(tmp_path):
    from mechdiff.data.corpus import write_default_corpora

    write_default_corpora(tmp_path / "data")
    (tmp_path / "data" / "extra.jsonl").write_text("")
    p = _params()
    p["data"]["sources"] = [{"name": "cultural", "path": "cultural.jsonl"}, {"name": "extra", "path": "extra.jsonl"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    t0 = time.time()
    r = _stage(tmp_path, "prepare")
    _one_line_error(r, str(Path("data") / "extra.jsonl"), "no records")
    assert time.time() - t0 < 60 and not (tmp_path / "artifacts" / "prompts" / "prompts.jsonl").exists()


def test_prepare_output_keeps_only_own_unfinished_work(tmp_path, capsys):
    from mechdiff.resume import mark_complete, prepare_output, read_mark

    out = tmp_path / "out"
    assert prepare_output(out, "fp1") is False and read_mark(out) == {"fingerprint": "fp1", "complete": False}
    (out / "ckpt").write_text("step 3")
    assert prepare_output(out, "fp1") is True and (out / "ckpt").read_text() == "step 3"  # resumed
    assert capsys.readouterr().err == ""
    assert prepare_output(out, "fp2") is False and not (out / "ckpt").exists()  # other settings: replaced
    assert capsys.readouterr().err == f"{out}: unfinished work made with other settings, code or environment is " \
                                      "discarded; starting over\n"  # and it says so
    (out / "ckpt").write_text("done")
    mark_complete(out)
    assert prepare_output(out, "fp2") is False and not (out / "ckpt").exists()  # finished: never written into
    assert capsys.readouterr().err == ""  # a finished output is replaced without a word: no work is lost
    (out / "mechdiff_run.json").unlink()
    (out / "foreign").write_text("x")
    assert prepare_output(out, "fp2") is False and not (out / "foreign").exists()  # no record: not ours
    # a writer that records its own state (the activation store): nothing is created for a fresh run
    assert prepare_output(tmp_path / "store.zarr", "fp", record=lambda p: {}, create=False) is False
    assert not (tmp_path / "store.zarr").exists()


def test_extract_stage_store_dtype_and_compressor_params(tmp_path):
    """extract.store_dtype float16 + extract.compressor zstd: a smaller float16 store with the float32 store's values
    (to float16 rounding), and the sae stage trains from it."""
    r32, r16 = _repo(tmp_path / "f32", 64), _repo(tmp_path / "f16", 64, store_dtype="float16", compressor="zstd")
    for repo in (r32, r16):
        r = _stage(repo, "extract", "base")
        assert r.returncode == 0, r.stderr
    a32, a16 = (ActStore.open(r / "artifacts" / "acts" / "base.zarr") for r in (r32, r16))
    x32, x16 = a32.read(SITE, "tokens"), a16.read(SITE, "tokens")
    assert zarr.open_array(str(r16 / "artifacts" / "acts" / "base.zarr" / SITE / "tokens")).dtype == np.float16
    np.testing.assert_allclose(np.asarray(x16, dtype=np.float32), x32, rtol=2e-3, atol=2e-3)
    size = {r: sum(f.stat().st_size for f in (r / "artifacts" / "acts" / "base.zarr").rglob("*") if f.is_file())
            for r in (r32, r16)}
    assert size[r16] < 0.6 * size[r32]
    r = _stage(r16, "extract", "tuned")
    assert r.returncode == 0, r.stderr
    r = _stage(r16, "sae", "base", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((r16 / "artifacts" / "saes" / "base_L2" / MARK).read_text())["complete"] is True


def test_sae_stage_imports_a_pretrained_sae_and_keeps_it_on_a_bad_one(tmp_path):
    from mechdiff.sae.model import load_sae
    from mechdiff.sae.pretrained import load_pretrained

    repo = _repo(tmp_path, 64)
    for which in ("base", "tuned"):
        assert _stage(repo, "extract", which).returncode == 0
    # a Gemma Scope style JumpReLU SAE for the tiny model's width (64), planted with random weights
    rng = np.random.default_rng(0)
    w = 96
    gs = {"W_enc": rng.normal(size=(64, w)).astype(np.float32) / 8, "W_dec": rng.normal(size=(w, 64)).astype(np.float32),
          "b_enc": np.zeros(w, np.float32), "b_dec": np.zeros(64, np.float32),
          "threshold": np.full(w, 0.1, np.float32)}
    np.savez(tmp_path / "params.npz", **gs)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["sae"]["pretrained"] = {"base-2": str(tmp_path / "params.npz")}
    (repo / "params.yaml").write_text(yaml.safe_dump(p))
    r = _stage(repo, "sae", "base", "2")
    assert r.returncode == 0, r.stderr
    assert "imported" in r.stdout
    sae_dir = repo / "artifacts" / "saes" / "base_L2"
    got, ref = load_sae(sae_dir), load_pretrained(str(tmp_path / "params.npz"))
    x = torch.from_numpy(ActStore.open(repo / "artifacts" / "acts" / "base.zarr").read(SITE, "tokens")[:200]).float()
    with torch.no_grad():
        assert torch.equal(got.encode(x), ref.encode(x)) and torch.equal(got(x), ref(x))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["pretrained"] == str(tmp_path / "params.npz")
    log = json.loads((sae_dir / "train_log.json").read_text())
    assert len(log) == 1 and 0 < log[0]["fvu"] and log[0]["tokens"] == 0
    # a file of another width: one line, before the imported SAE is touched
    before = _contents(sae_dir)
    np.savez(tmp_path / "wide.npz", **{**gs, "W_enc": np.zeros((65, w), np.float32),
                                       "W_dec": np.zeros((w, 65), np.float32), "b_dec": np.zeros(65, np.float32)})
    p["sae"]["pretrained"] = {"base-2": str(tmp_path / "wide.npz")}
    (repo / "params.yaml").write_text(yaml.safe_dump(p))
    _one_line_error(_stage(repo, "sae", "base", "2"), "65-wide inputs", "width 64")
    _same(_contents(sae_dir), before)


def test_files_digest_follows_names_and_contents(tmp_path):
    """The digest that ties an unfinished fine-tune to its base model: sha256 over names, sizes and bytes, in name
    order."""
    import hashlib

    from mechdiff.resume import files_digest

    d = tmp_path / "model"
    d.mkdir()
    (d / "b.bin").write_bytes(b"\x00\x01" * 1000)
    (d / "a.json").write_text("{}")
    (d / "sub").mkdir()  # folders inside are not part of it
    def entry(name: bytes, data: bytes) -> bytes:
        return name + b"\0" + len(data).to_bytes(8, "little") + data
    ref = hashlib.sha256(entry(b"a.json", b"{}") + entry(b"b.bin", b"\x00\x01" * 1000)).hexdigest()[:16]
    assert files_digest(d) == ref
    assert files_digest(d / "a.json") == hashlib.sha256(entry(b"a.json", b"{}")).hexdigest()[:16]
    (d / "b.bin").write_bytes(b"\x00\x01" * 999 + b"\x00\x02")
    assert files_digest(d) != ref


def _declared_outputs(repo: Path, stage: str) -> list[Path]:
    st = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    return [repo / (next(iter(o)) if isinstance(o, dict) else o) for kind in ("outs", "metrics", "plots")
            for o in st.get(kind) or []]


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    return [_without_seconds(v) for v in obj] if isinstance(obj, list) else obj


def _outputs(repo: Path, stage: str) -> dict:
    """Every file of the stage's declared outputs (JSON without its `seconds` fields, the rest as bytes)."""
    out = {}
    for o in _declared_outputs(repo, stage):
        for f in sorted(o.rglob("*")) if o.is_dir() else [o]:
            if f.is_file():
                key = str(f.relative_to(repo))
                out[key] = _without_seconds(json.loads(f.read_text())) if f.suffix == ".json" else f.read_bytes()
    return out


def _remove_outputs(repo: Path, stage: str) -> None:
    """What DVC does before it runs a stage: remove its (non-persistent) outputs."""
    import shutil

    for o in _declared_outputs(repo, stage):
        shutil.rmtree(o) if o.is_dir() else o.unlink(missing_ok=True)


KILLER = """
import os, signal
from mechdiff import resume
_after = int(os.environ["KILL_AFTER_UNITS"])
_log = os.environ.get("UNITS_LOG")
_call = resume.Units.__call__
def _killing_call(self, key, compute):
    value = _call(self, key, compute)
    if _log:
        with open(_log, "a") as f:
            f.write(key + "\\n")
    if _after and self.computed >= _after:
        os.kill(os.getpid(), signal.SIGKILL)
    return value
resume.Units.__call__ = _killing_call
"""


def _with_killer(repo: Path, stage: str, n: int, tmp: Path, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run `stage` and SIGKILL it right after its n-th computed unit is written (n 0: never; `log` lists the keys
    of the units), through a sitecustomize on PYTHONPATH that wraps resume.Units, so the kill lands at the same
    point on any machine."""
    (tmp / "killer").mkdir(exist_ok=True)
    (tmp / "killer" / "sitecustomize.py").write_text(KILLER)
    path = os.pathsep.join(x for x in (str(tmp / "killer"), os.environ.get("PYTHONPATH")) if x)
    env = {"PYTHONPATH": path, "KILL_AFTER_UNITS": str(n), **({"UNITS_LOG": str(log)} if log else {})}
    r = _stage(repo, stage, env=env)
    if n:
        assert r.returncode == -signal.SIGKILL, f"{stage} was not killed: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    return r


# the tiny pair's SAE features fail the cheap gates: loosen them so that six features reach the model gates, and
# min_kl so that some of those go on to the corruption and side-effect measurements
UNIT_PARAMS = {"gates": {"max_freq": 1.0, "min_regions": 1, "top_share": 0.5, "min_kl": 0.0002}}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["steer", "behaviour", "heads", "sae_eval", "features", "divergence", "patch",
                                   "geometry", "probes", "gates", "feature_pages"])
def test_killed_analysis_stage_resumes_its_finished_units(tiny_repo, tmp_path, stage):
    """SIGKILL a stage that keeps its finished units (resume.Units) after its third unit (its first, when it has
    fewer than four) and before its last; each rerun loads them, computes the rest and writes exactly the outputs
    of an uninterrupted run, then removes the kept units; a changed param starts over."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, ignore=shutil.ignore_patterns(".git"))
    if stage in UNIT_PARAMS:  # settings under which the stage has units to keep on the tiny pair
        p = yaml.safe_load((repo / "params.yaml").read_text())
        p[stage].update(UNIT_PARAMS[stage])
        (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    keys = tmp_path / "keys.txt"
    r = _with_killer(repo, stage, 0, tmp_path, log=keys)
    assert r.returncode == 0 and "resumed" not in r.stdout, r.stderr
    n_units = len(keys.read_text().splitlines())
    assert n_units >= 2, keys.read_text()
    first = 3 if n_units >= 4 else 1
    clean = _outputs(repo, stage)
    assert clean
    partial = repo / "artifacts" / "partial" / stage
    assert not partial.exists()  # an uninterrupted run leaves nothing behind
    for kill_at in sorted({first, n_units - 1}):  # one kill point where the stage has two units
        _remove_outputs(repo, stage)
        _with_killer(repo, stage, kill_at, tmp_path)
        assert len(list(partial.glob("*.pkl"))) == kill_at
        r = _stage(repo, stage)
        assert r.returncode == 0, r.stderr
        assert f"{stage}: {kill_at} units resumed from an interrupted run, {n_units - kill_at} computed" in r.stdout, \
            r.stdout
        assert not partial.exists()
        got = _outputs(repo, stage)
        assert got.keys() == clean.keys()
        assert [k for k in clean if got[k] != clean[k]] == []
    # a changed param the stage reads: the kept units of the old settings are not reused
    _with_killer(repo, stage, first, tmp_path)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    if stage == "feature_pages":  # it reads no seed
        p["feature_pages"]["n_contexts"] = int(p["feature_pages"]["n_contexts"]) + 1
    else:
        p["seed"] = int(p["seed"]) + 1
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    r = _stage(repo, stage)
    assert r.returncode == 0 and "units resumed" not in r.stdout, r.stdout
    assert not partial.exists()


@pytest.mark.slow
def test_hsae_stage_names_a_store_with_nan_and_keeps_its_outputs(tiny_repo, tmp_path):
    """A NaN in the base store at the H-SAE's site fails the stage in one line that names the store, before any
    H-SAE output is touched."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, ignore=shutil.ignore_patterns(".git"))
    before = _outputs(repo, "hsae")
    assert before
    h = yaml.safe_load((repo / "params.yaml").read_text())["hsae"]
    store = repo / "artifacts" / "acts" / "base.zarr"
    arr = zarr.open_array(store / f"L{h['layer']}.resid_post" / h["view"], mode="r+")
    x = arr[:]
    x[::2] = np.nan  # every other row: some of them are training rows
    arr[:] = x
    r = _stage(repo, "hsae")
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    err = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]  # (progress bars besides)
    assert len(err) == 1 and err[0].startswith("mechdiff: error: artifacts/acts/base.zarr has NaN or inf at "
                                               f"L{h['layer']}.resid_post/{h['view']}"), r.stderr[-2000:]
    assert _outputs(repo, "hsae") == before
