"""Resumable units of a stage's work (`resume.Units`) and the fingerprint they are kept under
(`pipeline.stage_fingerprint`): an interrupted run resumes only the same stage's finished units."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from mechdiff.pipeline import stage_fingerprint
from mechdiff.resume import MARK, Units, compute_all


class Interrupt(Exception):
    pass


def _work(units, calls: list[str], stop_after: int | None = None) -> dict:
    """Six units of deterministic work (arrays, floats, dicts); raises Interrupt after `stop_after` computed units."""
    out = {}
    for i in range(6):
        def compute(i=i):
            if stop_after is not None and len(calls) >= stop_after:
                raise Interrupt
            calls.append(f"u{i}")
            rng = np.random.default_rng(i)
            return {"x": rng.standard_normal(5).astype(np.float32), "s": float(rng.random()), "i": i}
        out[f"u{i}"] = units(f"u{i}", compute)
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        assert np.array_equal(a[k]["x"], b[k]["x"]) and a[k]["x"].dtype == b[k]["x"].dtype
        assert a[k]["s"] == b[k]["s"] and a[k]["i"] == b[k]["i"]


def test_interrupted_units_resume_and_give_the_uninterrupted_result(tmp_path):
    whole = _work(compute_all, [])
    path = tmp_path / "partial" / "stage"
    calls: list[str] = []
    with pytest.raises(Interrupt):
        _work(Units(path, "fp1"), calls, stop_after=4)
    assert calls == ["u0", "u1", "u2", "u3"] and len(list(path.glob("*.pkl"))) == 4
    # the rerun loads the four finished units and computes only the last two
    calls = []
    units = Units(path, "fp1")
    _same(_work(units, calls), whole)
    assert calls == ["u4", "u5"] and (units.loaded, units.computed) == (4, 2)
    assert "4 units resumed" in units.note("stage")
    units.done()
    assert not path.exists()


def test_other_fingerprint_or_damaged_unit_is_computed_again(tmp_path):
    path = tmp_path / "partial"
    with pytest.raises(Interrupt):
        _work(Units(path, "fp1"), [], stop_after=3)
    # other settings: nothing is reused and the old units are gone
    calls: list[str] = []
    units = Units(path, "fp2")
    assert not list(path.glob("*.pkl"))
    _work(units, calls)
    assert len(calls) == 6 and units.loaded == 0
    # a truncated unit file (a crash of the disk, not of the process: writes are atomic) and a stray temporary file
    files = sorted(path.glob("*.pkl"))
    files[0].write_bytes(files[0].read_bytes()[:10])
    (path / "stray.tmp").write_bytes(b"half")
    calls = []
    units = Units(path, "fp2")
    _same(_work(units, calls), _work(compute_all, []))
    assert len(calls) == 1 and units.loaded == 5


def test_finished_output_or_disabled_units_keep_nothing(tmp_path):
    path = tmp_path / "partial"
    path.mkdir()
    (path / MARK).write_text('{"fingerprint": "fp1", "complete": true}')  # never resumed into
    calls: list[str] = []
    _work(Units(path, "fp1"), calls)
    assert len(calls) == 6
    calls = []
    units = Units(tmp_path / "off", "fp1", enabled=False)
    _work(units, calls)
    assert len(calls) == 6 and not (tmp_path / "off").exists()
    units.done()  # nothing to remove
    calls = []
    _work(Units(None, ""), calls)
    assert len(calls) == 6


def _stage_repo(tmp: Path) -> Path:
    (tmp / "inputs").mkdir(parents=True)
    (tmp / "inputs" / "a.txt").write_text("alpha")
    (tmp / "inputs" / "sub").mkdir()
    (tmp / "inputs" / "sub" / "b.bin").write_bytes(b"\0" * 100)
    (tmp / "code.py").write_text("print(1)\n")
    (tmp / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "s": {"cmd": "python code.py", "deps": ["code.py", "inputs", "absent.txt"], "params": ["x.y", "z"],
              "outs": ["out"]},
        "t": {"cmd": "python code.py", "deps": ["code.py"], "params": [{"params.yaml": ["z"]}]}}}))
    (tmp / "params.yaml").write_text(yaml.safe_dump({"x": {"y": 1, "other": 5}, "z": [1, 2], "unrelated": 0}))
    return tmp


def test_stage_fingerprint_follows_exactly_what_the_stage_declares(tmp_path, monkeypatch):
    repo = _stage_repo(tmp_path)
    monkeypatch.chdir(repo)
    fp = stage_fingerprint("s")
    assert fp is not None and stage_fingerprint("s") == fp
    assert stage_fingerprint("missing") is None
    assert stage_fingerprint("t") not in (None, fp)

    def changed(edit) -> bool:
        before = stage_fingerprint("s")
        edit()
        return stage_fingerprint("s") != before

    params = yaml.safe_load(Path("params.yaml").read_text())

    def set_param(path: list[str], value) -> None:
        d = params
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
        Path("params.yaml").write_text(yaml.safe_dump(params))

    # params it reads change it; params it does not read do not
    assert not changed(lambda: set_param(["unrelated"], 7))
    assert not changed(lambda: set_param(["x", "other"], 6))
    assert changed(lambda: set_param(["x", "y"], 2))
    assert changed(lambda: set_param(["z"], [1, 3]))
    # values read as DVC reads them (YAML 1.2): 2e-4 is the number 0.0002, not a string
    set_param(["x", "y"], 0.0002)
    as_decimal = stage_fingerprint("s")
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("0.0002", "2e-4"))
    assert "2e-4" in Path("params.yaml").read_text() and stage_fingerprint("s") == as_decimal
    # the contents of a dependency file, a file inside a dependency folder, a new file there, a missing dep appearing
    assert changed(lambda: Path("code.py").write_text("print(2)\n"))
    assert changed(lambda: Path("inputs/sub/b.bin").write_bytes(b"\1" + b"\0" * 99))
    assert changed(lambda: Path("inputs/new.txt").write_text("n"))
    assert changed(lambda: Path("absent.txt").write_text("here"))
    # a file the stage does not declare does not
    assert not changed(lambda: Path("notes.txt").write_text("x"))


def test_start_fingerprint_is_taken_once_and_shared_by_the_kept_units(tmp_path, monkeypatch):
    """run_stage's fingerprint at the start and the stage's kept units use one hash; a later check takes it anew."""
    import mechdiff.pipeline as P

    repo = _stage_repo(tmp_path)
    monkeypatch.chdir(repo)
    monkeypatch.setattr(P, "_AT_START", {})
    start = P.start_fingerprint("s")
    assert start == stage_fingerprint("s")
    Path("code.py").write_text("print(3)\n")  # an input changes while the stage runs
    assert P.start_fingerprint("s") == start  # the start's value, not computed again
    assert P.stage_units("s").fingerprint == start
    assert stage_fingerprint("s") != start  # what the end-of-run check sees


def test_stage_fingerprint_takes_large_files_by_size_and_time(tmp_path, monkeypatch):
    import mechdiff.pipeline as P

    repo = _stage_repo(tmp_path)
    monkeypatch.chdir(repo)
    monkeypatch.setattr(P, "BIG_FILE", 50)  # b.bin (100 bytes) is now "large"
    before = stage_fingerprint("s")
    f = Path("inputs/sub/b.bin")
    st = f.stat()
    f.write_bytes(b"\1" + b"\0" * 99)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and time: a large file's contents are not read
    assert stage_fingerprint("s") == before
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert stage_fingerprint("s") != before


def test_a_key_used_twice_in_one_run_is_refused(tmp_path):
    units = Units(tmp_path / "p", "fp")
    units("a", lambda: 1)
    with pytest.raises(RuntimeError, match="used twice"):
        units("a", lambda: 2)
    with pytest.raises(RuntimeError, match="used twice"):  # also when nothing is kept
        compute = Units(None, "")
        compute("b", lambda: 1)
        compute("b", lambda: 1)


def test_a_unit_file_of_another_key_is_not_taken(tmp_path):
    path = tmp_path / "p"
    u = Units(path, "fp")
    u("a", lambda: "value of a")
    other = Units(path, "fp")
    other._file("a").rename(other._file("b"))  # b's file now holds a's result
    calls: list[str] = []
    assert other("b", lambda: calls.append("b") or "value of b") == "value of b" and calls == ["b"]


def test_units_that_cannot_be_written_warn_and_compute(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    units = Units(blocker / "p", "fp")  # cannot make a folder under a file
    assert units("a", lambda: 3) == 3 and units.path is None
    assert "cannot keep finished units" in capsys.readouterr().err
    path = tmp_path / "full"
    units = Units(path, "fp")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pickle, "dump", no_space)  # the disk fills up while a unit is written
    assert units("a", lambda: 4) == 4 and units.path is None
    assert units("b", lambda: 5) == 5 and units.computed == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not list(path.glob("*.tmp"))


def test_stage_fingerprint_takes_earlier_stages_outputs_by_time(tmp_path, monkeypatch):
    repo = _stage_repo(tmp_path)
    monkeypatch.chdir(repo)
    (repo / "artifacts" / "m").mkdir(parents=True)
    f = repo / "artifacts" / "m" / "w.bin"
    f.write_bytes(b"\0" * 10)
    spec = yaml.safe_load(Path("dvc.yaml").read_text())
    spec["stages"]["s"]["deps"].append("artifacts/m")
    Path("dvc.yaml").write_text(yaml.safe_dump(spec))
    before = stage_fingerprint("s")
    st = f.stat()
    f.write_bytes(b"\1" * 10)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stage_fingerprint("s") == before  # contents are not read under artifacts/
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert stage_fingerprint("s") != before


def test_environment_reads_the_installed_versions_and_the_cpu_kind():
    import platform
    from importlib import metadata

    from mechdiff.resume import ENV_CPU_FLAGS, ENV_PACKAGES, environment

    env = environment()
    assert set(env["packages"]) == set(ENV_PACKAGES)
    assert env["packages"]["numpy"] == np.__version__ == metadata.version("numpy")
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["python"] == platform.python_version() and env["machine"] == platform.machine()
    if Path("/proc/cpuinfo").is_file():
        lines = [line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines()]
        fields = {}
        for key, _, value in lines:
            fields.setdefault(key.strip(), value.strip())
        flags = set((fields.get("flags") or fields.get("Features") or "").split())  # x86 | Arm
        assert env["cpu_flags"] == [f for f in ENV_CPU_FLAGS if f in flags]
        named = [fields[k] for k in ("CPU implementer", "CPU part", "vendor_id") if k in fields]
        assert sorted((env["cpu"] or "").split()) == sorted(" ".join(named).split())
    env["packages"]["torch"] = "changed"  # each call gives a fresh copy: a caller's edit changes no fingerprint
    assert environment()["packages"]["torch"] == metadata.version("torch")


def test_units_kept_under_another_environment_are_recomputed(tmp_path, monkeypatch):
    """Units kept before a library upgrade (or on another CPU kind, in a shared workspace) are not resumed: the
    stage fingerprint holds `resume.environment`, so the rerun computes them here."""
    import copy

    import mechdiff.resume as R

    repo = _stage_repo(tmp_path)
    monkeypatch.chdir(repo)
    here = R.environment()
    fp = stage_fingerprint("s")
    calls: list[str] = []
    with pytest.raises(Interrupt):
        _work(Units(repo / "partial" / "s", fp), calls, stop_after=3)
    assert stage_fingerprint("s") == fp  # same environment: the same fingerprint, the units resume
    for change in (("packages", "torch", "0.0.1"), ("cpu_flags", None, ["avx2"]), ("cpu", None, "OtherVendor")):
        other = copy.deepcopy(here)
        key, sub, value = change
        if sub is None:
            other[key] = value if value != here[key] else value + ["x"]
        else:
            other[key][sub] = value
        monkeypatch.setattr(R, "environment", lambda other=other: other)
        assert stage_fingerprint("s") != fp, change
    calls = []
    units = Units(repo / "partial" / "s", stage_fingerprint("s"))  # the upgraded run: nothing of the old one loads
    _work(units, calls)
    assert calls == [f"u{i}" for i in range(6)] and units.loaded == 0


def test_every_trained_output_is_kept_under_the_environment():
    """The fine-tune's, the SAEs' and the H-SAEs' resume fingerprints hold `resume.environment()`: each
    `fingerprint([...])` call of a stage script that marks an output has it among its items, but for the
    activation store's (README, "A pipeline you can trust": rows computed one by one, ranks may differ in CPU
    kind), an imported SAE's (nothing is computed) and `code_hash` (a digest of files, not a fingerprint of work)."""
    import ast

    root = Path(__file__).resolve().parents[2] / "stages"
    found, missing = [], []
    for script in sorted(root.glob("*.py")):
        tree = ast.parse(script.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or fn.name in ("code_hash",):
                continue
            for call in ast.walk(fn):
                if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "fingerprint"):
                    continue
                items = call.args[0].elts if call.args and isinstance(call.args[0], ast.List) else []
                if script.name == "extract.py" or (items and isinstance(items[0], ast.Constant)
                                                   and items[0].value == "pretrained"):
                    continue
                has_env = any(isinstance(i, ast.Call) and getattr(i.func, "id", None) == "environment" for i in items)
                (found if has_env else missing).append(f"{script.name}:{call.lineno}")
    assert not missing, f"fingerprints without environment(): {missing}"
    assert {f.split(":")[0] for f in found} == {"models.py", "sae.py", "hsae.py"}


def test_stage_def_fills_a_matrix_stage_and_removed_outputs_reads_it(tmp_path, monkeypatch):
    from mechdiff.pipeline import removed_outputs, stage_def

    root = Path(__file__).resolve().parents[2]
    y = root / "dvc.yaml"
    sae = stage_def("sae@base-20", y)
    assert sae["cmd"] == "python stages/sae.py base 20" and "${" not in str(sae) and "matrix" not in sae
    assert stage_def("transport@L24.resid_post", y)["cmd"] == "python stages/transport.py L24.resid_post"
    assert stage_def("patch", y)["cmd"] == "python stages/patch.py"
    assert stage_def("sae@base-99", y) is None and stage_def("patch@x", y) is None and stage_def("nothing", y) is None
    monkeypatch.chdir(tmp_path)  # nothing exists here: every output counts as removed
    in_git, cached = removed_outputs("transport@L20.attn_out", y)
    assert in_git == ["metrics/transport/L20.attn_out.json"] and cached  # the map folder is DVC-cached
    assert removed_outputs("sae@base-20", y) == (["plots/sae/base_L20.csv"], False)  # the SAE itself persists
    assert removed_outputs("patch", y)[0][0] == "metrics/patch.json"
    assert removed_outputs("nothing", y) == ([], False)


_ORPHAN_STAGE = """
import os, sys, time
from pathlib import Path
from mechdiff.io import run_stage
from mechdiff.resume import Units

def main():
    units = Units(Path("artifacts/partial/toy"), "fp", label="toy")
    units("a", lambda: 1)
    Path("started").write_text("x")
    for _ in range(600):  # the launcher (standing in for `dvc repro`) is killed meanwhile
        if Path("launcher-gone").exists():
            break
        time.sleep(0.05)
    units("b", lambda: 2)
    Path("out.txt").write_text("done")
    units.done()

run_stage(main)
"""

_LAUNCHER = """
import os, subprocess, sys, time
err = open("stage.err", "w")
subprocess.Popen([sys.executable, "stages/toy.py"], stderr=err, env={**os.environ, "DVC_STAGE": "toy"})
time.sleep(600)
"""


def _orphan_run(tmp_path: Path, *, touch: bool) -> str:
    """Run stages/toy.py from a launcher that is killed (SIGKILL) while the stage runs; `touch` rewrites the
    stage's declared input meanwhile. Returns the stage's stderr once it finished."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "toy.py").write_text(_ORPHAN_STAGE)
    (tmp_path / "launcher.py").write_text(_LAUNCHER)
    (tmp_path / "in.txt").write_text("1")
    (tmp_path / "params.yaml").write_text("x: 1\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"toy": {
        "cmd": "python stages/toy.py", "deps": ["in.txt", "stages/toy.py"], "outs": ["out.txt"]}}}))
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    launcher = subprocess.Popen([sys.executable, "launcher.py"], cwd=tmp_path, env=env)
    for _ in range(600):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.05)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    if touch:
        time.sleep(0.02)
        (tmp_path / "in.txt").write_text("2")
    (tmp_path / "launcher-gone").write_text("x")
    for _ in range(600):
        if (tmp_path / "out.txt").exists() and "dvc repro" in (tmp_path / "stage.err").read_text():
            break
        time.sleep(0.05)
    return (tmp_path / "stage.err").read_text()


def test_a_stage_that_outlives_a_killed_dvc_keeps_its_units_and_says_how_to_record_it(tmp_path):
    """`dvc repro` killed while its stage runs: the stage finishes as an orphan. DVC records nothing, so the units
    are kept (the rerun resumes them) and the stage says how to record its outputs instead (`dvc commit`)."""
    err = _orphan_run(tmp_path, touch=False)
    assert "`python stages/toy.py` finished after the `dvc repro` that started it was stopped" in err, err
    assert "`dvc commit -f toy` records them (then `rm -r artifacts/partial/toy`" in err and err.count("\n") == 1, err
    assert len(list((tmp_path / "artifacts/partial/toy").glob("*.pkl"))) == 2  # both units kept for the rerun
    calls: list[str] = []
    again = Units(tmp_path / "artifacts/partial/toy", "fp")
    assert again("a", lambda: calls.append("a")) == 1 and again("b", lambda: calls.append("b")) == 2 and not calls
    again.done()  # an ordinary finish (this process's parent is alive) removes them
    assert not (tmp_path / "artifacts/partial/toy").exists()


def test_an_orphan_stage_whose_input_changed_asks_for_a_rerun_not_a_commit(tmp_path):
    err = _orphan_run(tmp_path, touch=True)
    assert "what it reads changed while it ran (or cannot be checked): rerun `dvc repro`" in err, err
    assert "dvc commit" not in err and err.count("\n") == 1, err
