"""The steer stage on a cognitive-style target: accuracy as the behaviour and directions from the prompts the
tuned model answers right vs wrong (steer.measure accuracy, steer.contrast correct), on planted references."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _run(repo: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "stages" / "steer.py")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_steer_stage_scores_accuracy_and_splits_by_the_tuned_models_answers(tiny_repo, tmp_path, monkeypatch):
    from mechdiff.analysis.behaviour import greedy_continuations
    from mechdiff.data.corpus import load_prompts, save_prompts
    from mechdiff.model.load import load_saved
    from mechdiff.pipeline import encode_prompts, kept_prompts

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, ignore=shutil.ignore_patterns(".git"))
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["steer"].update({"sites": ["L2.attn_out"], "k_sweep": [1, 2], "alpha_grid": [1.0], "measure": "accuracy",
                       "contrast": "correct", "source": "delta", "max_new_tokens": 2, "max_prompts": 12})
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    s = p["steer"]

    # plant the references: the tuned model's own answers (right), on the odd train prompts a word it never writes
    monkeypatch.chdir(repo)
    prompts = kept_prompts()
    model, tok = load_saved(repo / "artifacts" / "models" / "tuned")
    enc = encode_prompts(tok, prompts, chat=p["data"]["chat"], max_len=p["data"]["max_len"])
    target = np.array([i for i, q in enumerate(prompts) if q.dataset == s["target"]])
    said = dict(zip(target.tolist(), greedy_continuations(model, tok, enc, target, max_new_tokens=2,
                                                             batch_size=s["batch_size"])))
    path = repo / "artifacts" / "prompts" / "prompts.jsonl"
    records = load_prompts(path)
    by_pid = {q.pid: i for i, q in enumerate(prompts)}
    right, wrong = set(), set()
    for q in records:
        i = by_pid.get(q.pid)
        # (a continuation with a digit is left out: a number it ends with may be cut off, and does not count)
        if i is None or i not in said or not said[i].strip(" .!?;:\n") or any(c.isdigit() for c in said[i]):
            continue
        if q.split == "train" and q.pid % 2:
            q.reference, _ = "zzqx", wrong.add(q.pid)
        else:
            q.reference = said[i]
            if q.split == "train":
                right.add(q.pid)
    save_prompts(path, records)
    assert len(right) >= 2 and len(wrong) >= 2

    r = _run(repo)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((repo / "metrics" / "steer.json").read_text())
    assert m["measure"] == "accuracy" and m["contrast"] == "correct"
    assert m["correct_split"] == {"right": len(right), "wrong": len(wrong)}
    # the conditional gate still tells the target prompts from the controls (neutral among them): gated, the
    # handle leaves the neutral prompts nearly alone
    cond = m["L2.attn_out"]["conditional"]
    assert cond["gated"]["kl_neutral"] <= 0.5 * cond["ungated"]["kl_neutral"], cond
    assert m["baseline"]["ablate"]["rate_own"] == 1.0  # the tuned model gives every planted test answer
    assert m["baseline"]["steer"]["rate_goal"] == 1.0
    assert m["baseline"]["steer"]["rate_own"] < 1.0  # the planted edit changes the base's answers

    # a target without reference answers: a one-line error before the models load, earlier outputs kept
    before = (repo / "metrics" / "steer.json").read_text()
    p["steer"]["target"] = "control"
    p["steer"]["controls"] = [c for c in p["steer"]["controls"] if c != "control"]
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    r = _run(repo)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "need reference answers" in r.stderr and "steer.target" in r.stderr
    assert (repo / "metrics" / "steer.json").read_text() == before
