"""What the report knows about one run: its declared files (read on demand) and the values passed in by the stage."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mechdiff.errors import MechdiffError

ROOTS = ("metrics", "plots")  # the kinds of output folder a stage declares files in


@dataclass(frozen=True)
class Ref:
    """A declared output file, by folder kind (metrics | plots) and name inside it; `*` matches matrix items."""

    root: str
    name: str

    def __post_init__(self) -> None:
        if self.root not in ROOTS:
            raise MechdiffError(f"unknown output folder kind {self.root!r}: choose one of {', '.join(ROOTS)}")

    @property
    def is_glob(self) -> bool:
        """True when the name matches several files (one per matrix item)."""
        return "*" in self.name


def metric(name: str) -> Ref:
    """A file under the run's metrics folder."""
    return Ref("metrics", name)


def plot(name: str) -> Ref:
    """A file under the run's plots folder."""
    return Ref("plots", name)


@dataclass(frozen=True)
class RunInfo:
    """Values the report stage passes in from its declared params: the pair, settings shown on the page, version."""

    pair: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    version: str = ""


class Run:
    """A run's declared files under `roots` ({'metrics': folder, 'plots': folder}), read once each."""

    def __init__(self, roots: dict[str, Path], info: RunInfo | None = None) -> None:
        missing = [k for k in ROOTS if k not in roots]
        if missing:
            raise MechdiffError(f"the report needs a folder for {', '.join(missing)}")
        self.roots = {k: Path(v) for k, v in roots.items()}
        self.info = info or RunInfo()

    def label(self, ref: Ref) -> str:
        """The path of ref as the user sees it, from its folder's name (e.g. 'plots/cka.csv')."""
        return (Path(self.roots[ref.root].name) / ref.name).as_posix()

    def relative(self, path: Path) -> str:
        """A run file's path from its folder's name (e.g. 'plots/rank_k/L2.attn_out.csv')."""
        for root in self.roots.values():
            if path.is_relative_to(root):
                return (Path(root.name) / path.relative_to(root)).as_posix()
        raise MechdiffError(f"{path} is outside the run's folders")

    def files(self, ref: Ref) -> list[Path]:
        """The existing files ref names (sorted; a directory counts as its files)."""
        base = self.roots[ref.root]
        hits = sorted(base.glob(ref.name)) if ref.is_glob else [base / ref.name]
        out: list[Path] = []
        for p in hits:
            out += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        return out

    @functools.cache  # noqa: B019 (one Run per report; the cache lives as long as the run)
    def json(self, ref: Ref) -> Any:
        """The parsed JSON of ref; for a glob, {file stem: parsed JSON}; None when absent."""
        files = self.files(ref)
        if not files:
            return None
        try:
            if ref.is_glob:
                return {p.stem: json.loads(p.read_text()) for p in files}
            return json.loads(files[0].read_text())
        except ValueError as exc:
            raise MechdiffError(f"{self.label(ref)} is not valid JSON ({str(exc).splitlines()[0]}): "
                                "rerun the stage that writes it") from exc

    @functools.cache  # noqa: B019
    def table(self, ref: Ref, stem_column: str = "file") -> pd.DataFrame | None:
        """The CSV of ref (for a glob: all matches stacked, with each file's stem in `stem_column`); None when absent."""
        files = self.files(ref)
        if not files:
            return None
        frames = []
        for p in files:
            try:
                df = pd.read_csv(p)
            except pd.errors.EmptyDataError:  # a stage with nothing to plot writes an empty file
                df = pd.DataFrame()
            except pd.errors.ParserError as exc:
                raise MechdiffError(f"{p} is not a valid CSV ({str(exc).splitlines()[0]}): "
                                    "rerun the stage that writes it") from exc
            if ref.is_glob and not df.empty:
                df.insert(0, stem_column, p.stem)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def text(self, ref: Ref) -> str | None:
        """The text of ref (a markdown file), or None when absent."""
        files = self.files(ref)
        return "\n\n".join(p.read_text(errors="replace") for p in files) if files else None
