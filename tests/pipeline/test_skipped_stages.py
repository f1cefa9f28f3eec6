"""Stages that need one tokenizer (heads, gates) on a pair whose tokenizers differ: they write why they did not
run, with outputs DVC can record, so `dvc repro` goes on through every other stage."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.sae.test_sources import make_store

ROOT = Path(__file__).resolve().parents[2]
LENS = [3, 2, 4]


def _outs(stage: str) -> tuple[str, list[str]]:
    d = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    metric = next(iter(d["metrics"][0]))
    return metric, [next(iter(x)) for x in d["plots"]]


def _header(path: Path) -> list[str]:
    with path.open() as f:
        return next(csv.reader(f), [])


def _run(tmp_path: Path, stage: str, tuned_ids: np.ndarray) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "artifacts/prompts").mkdir(parents=True)
    # the fairness stage's record of two tokenizers that share ids 0-9 under other ids (aligned string by string)
    np.savez(tmp_path / "artifacts/prompts/fairness.npz", identical=np.array(False),
             allowed_base=np.arange(10), allowed_tuned=np.arange(10)[::-1], kept_pids=np.arange(len(LENS)))
    make_store(tmp_path / "artifacts/acts/base.zarr", LENS, np.arange(9))
    make_store(tmp_path / "artifacts/acts/tuned.zarr", LENS, tuned_ids)
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("stage", ["heads", "gates"])
def test_stage_needing_one_tokenizer_is_skipped_with_its_outputs(tmp_path, stage):
    r = _run(tmp_path, stage, np.arange(9)[::-1])  # the prompts' tokens under other ids
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{stage}: skipped: " in r.stdout and "tokenizers differ" in r.stdout
    metric, plots = _outs(stage)
    assert "tokenizers differ" in json.loads((tmp_path / metric).read_text())["skipped"]
    for plot in plots:  # every declared plot exists, with at most its header; where a run writes a header, the same
        with (tmp_path / plot).open() as f:
            assert len(list(csv.reader(f))) <= 1
        committed = _header(ROOT / plot)
        if committed and _header(tmp_path / plot):
            assert _header(tmp_path / plot) == committed, plot
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("plots", []):  # and the columns DVC draws
        (spec,) = entry.values() if isinstance(entry, dict) else (None,)
        if not isinstance(spec, dict) or not isinstance(spec.get("y"), dict):
            continue
        for path, ys in spec["y"].items():
            ys = [ys] if isinstance(ys, str) else ys
            if path in plots:
                assert {spec["x"], *ys} <= set(_header(tmp_path / path)), path


def test_gates_run_when_the_prompts_hold_the_same_token_ids(tmp_path):
    """Tokenizers that differ where no prompt reaches (same ids on every stored token) do not skip the gates."""
    r = _run(tmp_path, "gates", np.arange(9))
    assert "skipped" not in r.stdout
    assert r.returncode == 2 and "prompts.jsonl" in r.stderr  # it went on, to the prompts this test does not make
