"""Safe resumption of persisted stage outputs: resume only our own unfinished work."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

MARK = "mechdiff_run.json"


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able settings (what made an output)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_output(path: str | Path, fp: str) -> bool:
    """Get `path` ready for a (possibly resumed) run; return True when unfinished work with the same settings is kept.

    A finished output (which may be a read-only link into the DVC cache) or one made with other settings is
    removed, never written into; an unfinished one with the same fingerprint is kept so the run resumes.
    """
    path = Path(path)
    mark = path / MARK
    if path.exists():
        info = json.loads(mark.read_text()) if mark.exists() else {}
        if info.get("fingerprint") == fp and not info.get("complete", True):
            return True
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"fingerprint": fp, "complete": False}))
    return False


def mark_complete(path: str | Path) -> None:
    """Record that the output at `path` is finished (a later run will not write into it)."""
    mark = Path(path) / MARK
    info = json.loads(mark.read_text()) if mark.exists() else {}
    info["complete"] = True
    mark.write_text(json.dumps(info))
