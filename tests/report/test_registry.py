"""The report registry and dvc.yaml agree: every file a stage declares under metrics/ or plots/ has one entry."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import mechdiff.pipeline as P
from mechdiff.report.registry import STAGES, Figure, all_refs
from mechdiff.report.run import Run

ROOT = Path(__file__).resolve().parents[2]
RUN = Run({"metrics": P.METRICS, "plots": P.PLOTS})


def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _entries(stage: dict) -> list[tuple[str, dict]]:
    """(path, options) of every out / metric / plot a stage declares; matrix items `${item.x}` become `*`."""
    out = []
    for section in ("outs", "metrics", "plots"):
        for entry in stage.get(section) or []:
            path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            out.append((re.sub(r"\$\{item\.\w+\}", "*", path), opts or {}))
    return out


def _declared() -> dict[str, str]:
    """Declared file -> stage, for every file under metrics/ or plots/."""
    roots = (f"{P.METRICS.as_posix()}/", f"{P.PLOTS.as_posix()}/")
    return {path: name for name, stage in _dvc()["stages"].items()
            for path, _ in _entries(stage) if path.startswith(roots)}


def _figures() -> dict[str, Figure]:
    return {RUN.label(f.data): f for st in STAGES for f in st.figures}


def test_registry_matches_dvc_yaml() -> None:
    """Same files, each under the same stage; no file listed twice."""
    registry = [(RUN.label(ref), stage) for stage, ref in all_refs()]
    assert len({p for p, _ in registry}) == len(registry), "a file is listed twice in the registry"
    assert dict(registry) == _declared()


def test_figure_columns_match_dvc_plots() -> None:
    """Where dvc.yaml gives a plot's x / y (stage plots or top-level plots), the registry's figure says the same."""
    figures = _figures()
    checked = 0
    for stage in _dvc()["stages"].values():
        for path, opts in _entries(stage):
            if "x" in opts:
                fig = figures[path]
                assert (fig.x, list(fig.y)) == (opts["x"], [opts["y"]] if isinstance(opts["y"], str) else opts["y"])
                checked += 1
    for spec in _dvc().get("plots") or []:
        _, opts = next(iter(spec.items()))
        if isinstance(opts.get("y"), dict):
            for path, ys in opts["y"].items():
                fig = figures[path]
                assert (fig.x, list(fig.y)) == (opts["x"], [ys] if isinstance(ys, str) else ys), path
                checked += 1
    assert checked >= 4


def test_keys_unique_and_summary_anchors_exist() -> None:
    """Anchors are unique page ids; each summary item links to a figure or table of the registry."""
    keys = [item.key for st in STAGES for item in (*st.figures, *st.tables)]
    assert len(keys) == len(set(keys))
    stages = [st.stage for st in STAGES]
    assert len(stages) == len(set(stages)) and set(stages) <= set(_dvc()["stages"])
    for st in STAGES:
        for item in st.summary:
            assert item.anchor in keys, item.label
