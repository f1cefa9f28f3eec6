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

ROOT = Path(__file__).resolve().parents[2]


def _outs(stage: str) -> tuple[str, list[str]]:
    d = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    metric = next(iter(d["metrics"][0]))
    return metric, [next(iter(x)) for x in d["plots"]]


@pytest.mark.parametrize("stage", ["heads", "gates"])
def test_stage_needing_one_tokenizer_is_skipped_with_its_outputs(tmp_path, stage):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "artifacts/prompts").mkdir(parents=True)
    # the fairness stage's record of two tokenizers that share ids 0-9 under other ids (aligned string by string)
    np.savez(tmp_path / "artifacts/prompts/fairness.npz", identical=np.array(False),
             allowed_base=np.arange(10), allowed_tuned=np.arange(10)[::-1])
    r = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{stage}: skipped: this pair's tokenizers differ" in r.stdout
    metric, plots = _outs(stage)
    assert "tokenizers differ" in json.loads((tmp_path / metric).read_text())["skipped"]
    for plot in plots:  # every declared plot exists; those DVC draws keep the columns dvc.yaml plots by
        with (tmp_path / plot).open() as f:
            rows = list(csv.reader(f))
        assert len(rows) <= 1
    top = yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("plots", [])
    for entry in top:
        (spec,) = entry.values() if isinstance(entry, dict) else (None,)
        if not isinstance(spec, dict) or not isinstance(spec.get("y"), dict):
            continue
        for path, ys in spec["y"].items():
            ys = [ys] if isinstance(ys, str) else ys
            if path in plots:
                with (tmp_path / path).open() as f:
                    header = next(csv.reader(f))
                assert {spec["x"], *ys} <= set(header), (path, header)
