"""Safe resumption of persisted stage outputs: resume only our own unfinished work, never write into finished work.

Every output a stage persists across interruptions (DVC `persist: true`) records two things: the fingerprint
of the settings that made it and whether it is complete. A plain output folder keeps them in its mark file
(`mechdiff_run.json`); an activation store keeps them in its own attributes (`store_record`), committed
atomically with its rows. `prepare_output` is the one decision: keep an unfinished output with the same
fingerprint (the run resumes), else remove it. A stage calls it only after its inputs are validated, so a
failed check never destroys a previous output. A stage whose outputs are not persisted keeps its finished units
of work instead (`Units`, in a scratch folder prepared the same way), so a rerun after a kill redoes only the rest.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARK = "mechdiff_run.json"

# what a library function takes as `units`: a `Units`, its `scoped` part, or `compute_all` (keep nothing)
UnitsFn = Callable[[str, Callable[[], Any]], Any]


# this process and the one that started it (`dvc repro`, or a shell), as they were when the stage began
_PID, _PARENT = os.getpid(), os.getppid()


def parent_gone() -> bool:
    """Whether the `dvc repro` that started this stage has gone (this process, the stage DVC started, named in
    DVC_STAGE, was handed to another parent): it was killed while the stage kept running. DVC then records nothing
    of this stage, and its rerun runs the stage again. False outside `dvc repro` and in a forked child."""
    return bool(os.environ.get("DVC_STAGE")) and os.getpid() == _PID and os.getppid() != _PARENT


# libraries whose version can change an output's bits (kernels, rounding, defaults, the store format)
ENV_PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "transformers", "safetensors", "zarr")
_MODULES = {"scikit-learn": "sklearn"}  # the import name where it is not the distribution's
# CPU flags that choose other kernels, so other rounding: x86 AVX2 / AVX-512 code and native bf16 units; Arm's
# NEON, SVE and bf16 / int8 matrix instructions (/proc/cpuinfo "flags" on x86, "Features" on Arm)
ENV_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve", "sve2", "bf16", "i8mm")


def environment() -> dict:
    """The environment that computes a stage's work: Python's and `ENV_PACKAGES`' versions and the CPU kind (machine,
    vendor / Arm implementer and part, `ENV_CPU_FLAGS`). It enters the resume fingerprints of kept units
    (`pipeline.stage_units`), the fine-tune, the SAEs and the H-SAEs, so their unfinished work made under other
    libraries or on another CPU kind (a workspace shared by machines) is recomputed, not mixed with this machine's.
    Not the activation store's: its rows are computed one by one, and the ranks of a multi-node extraction may
    differ in CPU kind. Not covered either: the thread count, kernel-dispatch variables (ATEN_CPU_CAPABILITY,
    ONEDNN_MAX_CPU_ISA, MKL_CBWR) and the GPU model. A fresh copy on each call (callers may change it)."""
    return copy.deepcopy(_environment())


@functools.lru_cache(maxsize=1)
def _environment() -> dict:
    import platform
    from importlib import metadata

    from mechdiff.cpu import cpu_info

    versions = {}
    for name in ENV_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # e.g. a source build: the imported module's own version
            module = sys.modules.get(_MODULES.get(name, name))
            versions[name] = getattr(module, "__version__", None)
    cpu = cpu_info()
    return {"python": platform.python_version(), "packages": versions, "machine": platform.machine(),
            "cpu": cpu.name(),
            "cpu_flags": [f for f in ENV_CPU_FLAGS if f in cpu.flags]}


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able settings (what made an output)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_digest(path: str | Path) -> str:
    """sha256 of a file, or of every file directly in a folder (name, size and contents of each, in name order):
    which inputs (a model's weights, the code) an unfinished output came from."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(x for x in path.iterdir() if x.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode() + b"\0" + f.stat().st_size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_mark(path: str | Path) -> dict:
    """The record in an output folder's mark file: {"fingerprint", "complete"} ({} when there is none)."""
    mark = Path(path) / MARK
    try:
        return json.loads(mark.read_text()) if mark.is_file() else {}
    except (OSError, ValueError):
        return {}


def store_record(path: str | Path) -> dict:
    """The record of an activation store: the fingerprint its writer put in `attrs`, completion and rows done."""
    from mechdiff.data.store import ActStore
    from mechdiff.errors import MechdiffError

    try:
        a = ActStore.open(path).attrs
    except (MechdiffError, OSError, ValueError, KeyError):
        return {}
    return {"fingerprint": a.get("params", {}).get("fingerprint"), "complete": bool(a.get("complete")),
            "rows_done": int(a.get("rows_done", 0))}


def prepare_output(path: str | Path, fp: str, *, record: Callable[[Path], dict] = read_mark,
                   create: bool = True) -> bool:
    """Get `path` ready for a (possibly resumed) run; return True when unfinished work with fingerprint `fp` is kept.

    A finished output (which may be a read-only link into the DVC cache), one made with other settings or one
    without a record is removed, never written into. With `create`, a fresh folder is made with a mark saying
    "unfinished, fingerprint `fp`"; without it (a writer that records its own state, like the activation
    store given `attrs={"fingerprint": fp}`), nothing is created.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        info = record(path) if path.is_dir() and not path.is_symlink() else {}
        if info.get("fingerprint") == fp and info.get("complete") is False:
            return True
        if info.get("complete") is False:  # someone's unfinished work is lost: say so (and why)
            print(f"{path}: unfinished work made with other settings, code or environment is discarded; starting "
                  "over", file=sys.stderr, flush=True)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if create:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARK).write_text(json.dumps({"fingerprint": fp, "complete": False}))
    return False


def finished_output(path: str | Path, fp: str) -> bool:
    """True when `path` is a folder of our own (not a link into the DVC cache) that a run with fingerprint `fp`
    finished: a stage that makes several outputs in turn reuses those and redoes only the rest after an
    interrupt. The fingerprint must then cover everything that made the output, code included."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    info = read_mark(path)
    return info.get("fingerprint") == fp and info.get("complete") is True


def mark_complete(path: str | Path) -> None:
    """Record in the mark file that the output folder at `path` is finished (a later run will not write into it)."""
    mark = Path(path) / MARK
    info = read_mark(path)
    info["complete"] = True
    mark.write_text(json.dumps(info))


class Units:
    """The finished units of one stage's work, kept on disk so that an interrupted stage redoes only the rest.

    `units(key, compute)` returns the unit's result: loaded when an earlier run of the same work (same
    fingerprint) finished it, else computed and at once written to its own file (a temporary file, then an atomic
    rename, so a kill leaves either the whole unit or none). A unit must be a pure function of what the
    fingerprint covers (the stage's inputs, params and code), so a resumed run gives the uninterrupted run's
    outputs bit for bit; results are pickled as they are (numpy arrays, floats, dicts). `path` None (or
    `enabled` False) keeps nothing: every unit is computed. `done()` removes the folder once the stage's outputs
    are written (and, given a `label`, logs what was resumed); a run with another fingerprint replaces it
    (`prepare_output`).
    """

    def __init__(self, path: str | Path | None, fp: str, *, enabled: bool = True, label: str | None = None) -> None:
        self.path = Path(path) if (path is not None and enabled) else None
        self._home, self.label = self.path, label  # path becomes None when units cannot be written
        self.fingerprint = fp  # what the kept units are valid for
        self.loaded = self.computed = 0
        self._seen: set[str] = set()
        if self.path is not None:
            try:
                prepare_output(self.path, fp)
            except OSError as e:  # keeping units only saves time: go on without
                self._stop(e)

    def _stop(self, e: OSError) -> None:
        print(f"mechdiff: warning: cannot keep finished units in {self.path} ({e}); an interrupted run will start "
              "over", file=sys.stderr)
        self.path = None

    def _file(self, key: str) -> Path:
        assert self.path is not None
        return self.path / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".pkl")

    def __call__(self, key: str, compute: Callable[[], Any]) -> Any:
        import pickle

        if key in self._seen:  # a second unit under one key would be answered with the first one's result
            raise RuntimeError(f"resume.Units: unit key {key!r} used twice in one run")
        self._seen.add(key)
        if self.path is None:
            value = compute()
            self.computed += 1
            return value
        f = self._file(key)
        if f.is_file():
            try:
                with f.open("rb") as fh:
                    got_key, value = pickle.load(fh)
                if got_key == key:
                    self.loaded += 1
                    return value
            except Exception:  # unreadable (damaged, or written by other library versions): compute it again
                pass
        value = compute()
        if self.path is not None:
            tmp = f.with_suffix(".tmp")
            try:
                with tmp.open("wb") as fh:
                    pickle.dump((key, value), fh, protocol=pickle.HIGHEST_PROTOCOL)
                tmp.replace(f)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                self._stop(e)
        self.computed += 1
        return value

    def scoped(self, prefix: str) -> UnitsFn:
        """These units under keys that start with `prefix` (one library call's units among the stage's)."""
        return lambda key, compute: self(prefix + key, compute)

    def note(self, what: str) -> str:
        """A line for the stage's log: how many units were resumed and how many computed."""
        return f"{what}: {self.loaded} units resumed from an interrupted run, {self.computed} computed"

    def done(self) -> None:
        """The stage finished: its kept units are no longer needed (with a `label`, say what was resumed). When the
        `dvc repro` that started the stage has gone (`parent_gone`), DVC records nothing and its rerun runs the stage
        again, so the units are kept: a rerun with the same inputs, params and code (the same fingerprint) resumes
        every one of them."""
        if self.label and self.loaded:
            print(self.note(self.label))
        if parent_gone():
            return
        if self._home is not None and self._home.is_dir():
            shutil.rmtree(self._home, ignore_errors=True)


def compute_all(key: str, compute: Callable[[], Any]) -> Any:
    """The `units` of a caller that keeps nothing: compute every unit."""
    return compute()
