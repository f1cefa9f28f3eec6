"""Small I/O helpers shared by the stages: JSON metrics, CSV plots, one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mechdiff import trace
from mechdiff.errors import MechdiffError


def to_jsonable(x: Any, *, digits: int | None = None) -> Any:
    """Nested dicts / lists / numpy values as plain Python for json; with `digits`, floats rounded and NaN/inf -> None."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v, digits=digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v, digits=digits) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist(), digits=digits)
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "to_json") and not isinstance(x, str | bytes | int | float | bool):
        return to_jsonable(x.to_json(), digits=digits)
    if digits is not None and isinstance(x, float):
        return None if not math.isfinite(x) else round(x, digits)
    return x


def _clean(x: Any) -> Any:
    return to_jsonable(x, digits=6)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON (numpy-safe, floats rounded to 6 decimals, NaN -> null) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] = ()) -> Path:
    """Write records as CSV (header: `columns`, then the union of the rows' other keys, in first-seen order)
    atomically."""
    rows = [_clean(dict(r)) for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = list(columns)
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    os.replace(tmp, path)
    return path


def write_skipped(stage: str, reason: str, metric: str | Path, plots: Mapping[str | Path, Sequence[str]]) -> None:
    """Outputs of a stage that does not apply to this pair (e.g. one that needs a single tokenizer): the metrics
    file says why (`{"skipped": reason}`) and each plot file holds only its header, so `dvc repro` goes on, DVC
    records the outputs, and `dvc plots` and the report show them empty. Prints one line saying so."""
    write_json(metric, {"skipped": reason})
    for path, cols in plots.items():
        write_csv(path, [], columns=cols)
    print(f"{stage}: skipped: {reason}", flush=True)


def run_stage(fn: Callable[[], Any]) -> None:
    """Run a stage's main (traced when MECHDIFF_TRACE is set); a MechdiffError prints one line and exits 2.
    `-h` / `--help` prints `stage_help` and exits 0 without running or touching anything. A main that returns
    ends the process at once (`exit_now`)."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        module = sys.modules.get(getattr(fn, "__module__", "__main__"))
        from mechdiff.pipeline import stage_help  # the layout's knowledge, needed only here

        print(stage_help(sys.argv[0], getattr(module, "__doc__", None)))
        sys.exit(0)
    from mechdiff import resume  # notes the process that started this one (`resume.parent_gone`)

    trace.start()
    lock, address = None, os.environ.get("DVC_STAGE", "")  # the stage `dvc repro` runs (DVC sets it)
    try:
        lock = stage_lock(sys.argv)  # held while the stage runs
        before = _fingerprint(address)  # what the stage reads, to tell whether it changed by the end
        fn()
        if resume.parent_gone():
            orphan_note(address, before)
    except MechdiffError as e:
        # past the lock, `dvc repro` deleted the stage's earlier outputs before this run: restore them, or say how
        print(f"mechdiff: error: {e}{restored_note(address) if lock is not None else ''}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mechdiff: interrupted; rerun `dvc repro` to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        import shutil

        from mechdiff.errors import disk_full, first_line

        try:
            free = shutil.disk_usage(".").free
        except OSError:
            free = None
        if not disk_full(e, free):
            raise
        print(f"mechdiff: error: the disk is full ({type(e).__name__}: {first_line(e, 120)}): free space (`df -h .`; "
              "`dvc gc -w` drops cached outputs the workspace does not use) and rerun `dvc repro`: finished stages and "
              "this stage's finished units are kept", file=sys.stderr)
        sys.exit(2)
    finally:
        if lock is not None:
            lock.close()
    exit_now(0)


def _fingerprint(address: str, *, now: bool = False) -> str | None:
    """`pipeline.stage_fingerprint` of the stage `dvc repro` runs (None outside DVC or for a stage not in ./dvc.yaml):
    as taken at the start (`pipeline.start_fingerprint`, which the stage's kept units share), or `now`."""
    if not address:
        return None
    from mechdiff.pipeline import stage_fingerprint, start_fingerprint

    try:
        return stage_fingerprint(address) if now else start_fingerprint(address)
    except Exception:  # advice only: never fail a stage over it
        return None


def restored_note(address: str) -> str:
    """Under `dvc repro` (stage `address`), bring back what it deleted of the failed stage's earlier outputs before
    running it, where dvc.lock's record of them can be matched (`pipeline.restore_removed`), and say so; then how
    to restore whatever is still missing (`restore_hint`). "" when nothing was missing or outside DVC."""
    if not address:
        return ""
    try:
        from mechdiff.pipeline import restore_removed

        back = restore_removed(address)
    except Exception:  # noqa: BLE001 - a convenience: never turn the one-line error into a traceback
        back = []
    said = f" (earlier outputs that DVC removed before this stage ran are restored: {', '.join(back)})" \
        if back else ""
    return said + restore_hint(address)


def restore_hint(address: str) -> str:
    """Under `dvc repro` (stage `address`, from DVC_STAGE), how to bring back what it deleted of the failed stage's
    earlier outputs before running it: the committed versions of its git-tracked outputs, its DVC-cached ones;
    "" when nothing is missing or outside DVC."""
    if not address:
        return ""
    try:
        import subprocess

        from mechdiff.pipeline import removed_outputs

        in_git, cached = removed_outputs(address)
        if in_git:  # only paths HEAD has: `git checkout HEAD --` restores nothing when one path is unknown to it
            r = subprocess.run(["git", "ls-tree", "--name-only", "HEAD", "--", *in_git], capture_output=True,
                               text=True, timeout=30)
            known = set(r.stdout.split()) if r.returncode == 0 else set()
            in_git = [p for p in in_git if p in known]
    except Exception:  # advice only: never turn the one-line error into a traceback
        return ""
    how = []
    if in_git:
        how.append(f"`git checkout HEAD -- {' '.join(in_git)}` restores the committed versions")  # every one: to copy
    if cached:
        how.append(f"`dvc checkout {address}` restores the cached ones")
    if not how:
        return ""
    return f" (dvc repro removed this stage's earlier outputs before it ran: {'; '.join(how)})"


def orphan_note(address: str, before: str | None) -> None:
    """Say what to do when the stage finished after the `dvc repro` that started it was killed: DVC recorded nothing,
    so a rerun would run the stage again. `dvc commit` records the finished outputs, which is right only when
    nothing the stage reads changed while it ran (its `pipeline.stage_fingerprint`, `before` it ran, is the same)."""
    from mechdiff.pipeline import PARTIAL

    cmd = f"`python {' '.join(sys.argv)}` finished after the `dvc repro` that started it was stopped"
    same = before is not None and _fingerprint(address, now=True) == before
    if not same:
        print(f"mechdiff: {cmd}, and what it reads changed while it ran (or cannot be checked): rerun `dvc repro`",
              file=sys.stderr, flush=True)
        return
    units = PARTIAL / address
    tidy = f" (then `rm -r {units.as_posix()}`, its units kept for a rerun)" if units.is_dir() else ""
    print(f"mechdiff: {cmd}; its outputs are complete: `dvc commit -f {address}` records them{tidy}, then `dvc repro` "
          "goes on from the next stage", file=sys.stderr, flush=True)


def stage_lock(argv: Sequence[str], root: str | Path = ".") -> Any:
    """An exclusive lock on this stage command in this repository (the same script and arguments under `root`),
    held by the returned open file until the process ends (the OS frees it even on SIGKILL). A second copy of
    the command, e.g. after `dvc repro` was killed but its stage process kept running, stops with a one-line
    error instead of writing into the same outputs. Processes under torchrun take none: on one machine the stage
    process that launched them holds it; ranks started by hand on several machines are not guarded."""
    import fcntl
    import hashlib
    import tempfile

    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # `dist.in_worker`, without importing torch here
        return None
    cmd = " ".join(argv) if argv else "stage"
    script = str(Path(argv[0]).resolve()) if argv else ""
    key = hashlib.sha256("\0".join([str(Path(root).resolve()), script, *argv[1:]]).encode()).hexdigest()[:24]
    d = Path(tempfile.gettempdir()) / f"mechdiff-locks-{os.getuid()}"  # per user: a shared /tmp stays usable
    try:
        d.mkdir(parents=True, exist_ok=True)
        f = open(d / f"{key}.lock", "a+")  # noqa: SIM115 (kept open: the lock lives as long as the process)
    except OSError as e:
        raise MechdiffError(f"cannot create the stage lock in {d}: {e.strerror or e}; set TMPDIR to a writable "
                            "folder") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise MechdiffError(f"`python {cmd}` is already running in this repository (pid {pid}), probably left over "
                            f"from a killed `dvc repro`: wait for it or stop it (kill {pid}), then rerun") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def exit_now(code: int = 0) -> None:
    """End a finished stage process without the interpreter's teardown: the first two steps of a normal exit
    run (threads joined and thread-pool / process-pool shutdown hooks, such as joblib's worker processes, then the
    atexit handlers, the trace's among them) and the standard streams are flushed; what is skipped is freeing
    every object one by one, which took 1-2 s per stage with a model loaded (measured on 2 cores), ~30 s over a
    `dvc repro`. Every output is written and closed before the stage's main returns."""
    import atexit
    import threading

    threading._shutdown()  # what the interpreter runs first at exit (before atexit: pools stop their workers)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # as CPython's own exit when it cannot flush (a full disk, a closed pipe)
    os._exit(code)
