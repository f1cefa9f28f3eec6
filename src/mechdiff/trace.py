"""What a stage process touches: the params keys it reads, the files it reads and writes, the commands it runs.

Params keys are recorded always (by the objects `mechdiff.params.load_params` returns). Files and commands are
recorded only when the environment variable MECHDIFF_TRACE names a directory: `start()` (called by
`mechdiff.io.run_stage`) then installs an audit hook (Python-level opens, renames, links, removals, directory
listings, subprocesses) and, at exit, writes one JSON per process into that directory. The pipeline tests
compare these records with what dvc.yaml declares. Opens made outside Python (e.g. safetensors' memory maps) are
not seen.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ENV = "MECHDIFF_TRACE"

_params: set[str] = set()
_events: list[tuple[str, str]] = []  # (kind, absolute path or command)
_state = {"started": False, "quiet": 0, "done": False}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def read_param(key: str) -> None:
    """Record that the dotted params key (or section) `key` was read."""
    _params.add(key)


def params_read() -> set[str]:
    """The dotted params keys read so far in this process."""
    return set(_params)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Opens inside this block are not recorded (load_params reading params.yaml, which DVC tracks by key)."""
    _state["quiet"] += 1
    try:
        yield
    finally:
        _state["quiet"] -= 1


def _path(p: object, dir_fd: object = None) -> str | None:
    """Absolute path of an audited path argument (relative to dir_fd when given), or None when unknown."""
    if isinstance(p, int) or p is None:
        return None
    try:
        p = os.fsdecode(p)  # type: ignore[arg-type]
    except TypeError:
        return None
    if isinstance(dir_fd, int) and dir_fd >= 0:  # shutil.rmtree walks by directory descriptors
        try:
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        except OSError:
            return None
    return os.path.abspath(p)


def _hook(event: str, args: tuple) -> None:
    if _state["quiet"] or _state["done"]:
        return
    if event == "open":
        path, mode, flags = args
        p = _path(path)
        if p is None:
            return
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        if mode is None and not writes and not os.path.isfile(p):
            return  # os.open of a directory, or of a name relative to an unreported dir_fd (shutil.rmtree)
        _events.append(("write" if writes else "read", p))
    elif event in ("os.rename", "os.link"):  # os.replace raises os.rename; a move deletes its source
        src, dst = _path(args[0]), _path(args[1])
        if src and dst:
            _events.append(("delete" if event == "os.rename" else "read", src))
            _events.append(("write", dst))
    elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
        if (p := _path(args[0], args[1])) is not None and os.path.lexists(p):
            _events.append(("delete", p))
    elif event == "os.mkdir":
        if (p := _path(args[0])) is not None and not os.path.lexists(p):
            _events.append(("mkdir", p))
    elif event in ("os.listdir", "os.scandir"):
        if (p := _path(args[0] if args and args[0] is not None else ".")) is not None:
            _events.append(("list", p))
    elif event == "subprocess.Popen":
        argv = args[1]
        argv = [os.fsdecode(a) for a in argv] if isinstance(argv, list | tuple) else [os.fsdecode(argv)]
        _events.append(("run", json.dumps(argv)))


def _roots() -> list[tuple[str, str]]:
    """(absolute root, prefix) pairs: the repository (cwd) and, when imported from a src/ layout, the package source."""
    roots = [(os.getcwd(), "")]
    src = Path(__file__).resolve().parents[1]
    if src.name == "src":
        roots.append((str(src), "src/"))
    return roots


def _relative(p: str, roots: list[tuple[str, str]]) -> str | None:
    for root, prefix in roots:
        if p == root:
            return prefix.rstrip("/") or "."
        if p.startswith(root + os.sep):
            return prefix + os.path.relpath(p, root)
    return None


def summary() -> dict:
    """This process's record: argv, params keys read, and the repository-relative paths it touched.

    `write`: files written that exist at exit (a temporary renamed onto its destination counts as the
    destination; created folders are not listed). `delete`: paths removed or moved away, except the process's own
    temporaries. `read`, `list`: files opened for reading and folders listed, except its own temporaries.
    """
    roots = _roots()
    seen: dict[str, set[str]] = {"read": set(), "write": set(), "delete": set(), "list": set(), "mkdir": set()}
    runs = []
    for kind, p in _events:
        if kind == "run":
            runs.append(json.loads(p))
        elif (rel := _relative(p, roots)) is not None:
            seen[kind].add(rel)
    made = seen["write"] | seen["mkdir"]
    root = roots[0][0]

    def kept(rel: str) -> bool:  # exists at exit, or was not made by this process (nor inside a folder it made)
        parts = rel.split("/")
        return os.path.lexists(os.path.join(root, rel)) or not any(
            "/".join(parts[:i]) in made for i in range(1, len(parts) + 1))

    return {
        "argv": sys.argv,
        "params": sorted(_params),
        "read": sorted(filter(kept, seen["read"])),
        "write": sorted(w for w in seen["write"] if os.path.lexists(os.path.join(root, w))),
        "delete": sorted(filter(kept, seen["delete"])),
        "list": sorted(filter(kept, seen["list"])),
        "run": runs,
    }


def _write() -> None:
    _state["done"] = True
    d = Path(os.environ[ENV])
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{os.getpid()}.json").write_text(json.dumps(summary(), indent=1) + "\n")


def start() -> None:
    """When MECHDIFF_TRACE is set, record this process's file accesses and write them there at exit (once)."""
    if _state["started"] or not os.environ.get(ENV):
        return
    _state["started"] = True
    sys.addaudithook(_hook)
    atexit.register(_write)
