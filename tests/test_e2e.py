"""End to end: `dvc repro` on a tiny pair in a temporary copy of the repo, then experiments and diffs.

The tuned model is the base with a planted rank-2 change at L2.attn_out (the `edit` recipe), so the
pipeline has a known answer: CKA is 1 before layer 2 and the planted site needs k = 2 directions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def sh(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with the venv first on PATH; raise with its output on failure."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "MECHDIFF_PROGRESS": "0"}
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def copy_repo(dst: Path) -> Path:
    """Copy the tracked files and data/ of the repo into dst and make it a fresh git repo."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    shutil.copytree(ROOT / "data", dst / "data", dirs_exist_ok=True)
    for d in ("metrics", "plots", "report"):
        shutil.rmtree(dst / d, ignore_errors=True)
    sh(["git", "init", "-q"], dst)
    sh(["git", "config", "user.email", "ci@example.com"], dst)
    sh(["git", "config", "user.name", "ci"], dst)
    return dst


def tiny_params(repo: Path, base_dir: Path) -> None:
    """Shrink params.yaml to the tiny pair and small workloads."""
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["pair"]["base"] = {"id": str(base_dir), "gguf_file": None, "revision": None}
    p["pair"]["tuned"] = {"id": None, "recipe": "edit"}
    p["pair"]["edit"] = {"layer": 2, "site": "attn_out", "rank": 2, "scale": 3.0}
    p["data"]["max_per_dataset"] = 60
    p["data"]["max_len"] = 48
    p["extract"].update({"layer_stride": 1, "detail_layers": [2], "batch_size": 16, "shard_rows": 64})
    p["divergence"].update({"n_boot": 50, "layer_patch_prompts": 12})
    p["transport"]["sites"] = ["L2.attn_out", "L3.resid_post"]
    p["patch"].update({"ranks": [0, 1, 2, 4, 8, "full"], "alphas": ["auto", 1.0], "max_prompts": 24,
                       "n_boot": 200, "target_drop": 80.0})
    p["rank"] = 2
    p["alpha"] = 1.0
    p["sae"].update({"layers": [2], "expansion": 2, "k": 4, "batch_size": 256, "epochs": 2, "eval_prompts": 12})
    p["features"].update({"n_perm": 50, "top_examples": 3, "max_themes": 4})
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A repo copy whose pipeline ran to completion on the tiny edited pair."""
    from mechdiff.corpus import load_corpus
    from mechdiff.tiny import save_tiny_pair_dir

    tmp = tmp_path_factory.mktemp("e2e")
    texts = [q.text for q in load_corpus(ROOT / "data")]
    base_dir = save_tiny_pair_dir(tmp / "tiny_base", texts, n_layers=4, d_model=64, seed=0)
    repo = copy_repo(tmp / "repo")
    tiny_params(repo, base_dir)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "tiny"], repo)
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "tiny run"], repo)
    return repo


def _metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / name).read_text())


def test_pipeline_outputs(tiny_repo):
    div = _metrics(tiny_repo, "divergence.json")
    # known answer: the edit sits at L2.attn_out, so resid_post is untouched before layer 2
    for layer in (0, 1):
        assert div["cka"][f"L{layer}.resid_post"]["last"] == pytest.approx(1.0, abs=1e-6)
    assert div["cka"]["L2.resid_post"]["last"] < 0.999
    assert div["kl"]["all"] > 0
    patch = _metrics(tiny_repo, "patch.json")
    site = patch["L2.attn_out"]
    assert site["kl_drop_full"] > 90  # the map is exact at the planted site
    assert site["min_k"] == 2  # the 80% target is reached at exactly the planted rank
    assert (tiny_repo / "plots/rank_k.csv").read_text().count("L2.attn_out") >= 6
    for f in ("cka.csv", "kl_by_dataset.csv", "layer_patch.csv", "cka.png", "rank_k.png"):
        assert (tiny_repo / "plots" / f).stat().st_size > 0
    assert (tiny_repo / "artifacts/maps/L2.attn_out").is_dir()
    assert (tiny_repo / "report/index.html").stat().st_size > 1000


def test_status_clean_and_repro_noop(tiny_repo):
    st = sh(["dvc", "status"], tiny_repo).stdout
    assert "up to date" in st, st
    r = sh(["dvc", "repro"], tiny_repo)
    assert "didn't change" in r.stdout or "up to date" in r.stdout
    assert sh(["dvc", "metrics", "show"], tiny_repo).stdout.count("L2.attn_out") >= 1


def test_exp_run_changes_metric_and_diff_shows_it(tiny_repo):
    before = _metrics(tiny_repo, "patch.json")["L2.attn_out"]["kl_drop"]
    sh(["dvc", "exp", "run", "-S", "rank=1", "--name", "rank1"], tiny_repo)
    after = _metrics(tiny_repo, "patch.json")["L2.attn_out"]["kl_drop"]
    assert after != pytest.approx(before, abs=1e-6)
    show = sh(["dvc", "exp", "show", "--json"], tiny_repo).stdout
    assert "rank1" in show
    diff = sh(["dvc", "metrics", "diff", "HEAD", "--json"], tiny_repo).stdout
    changed = json.loads(diff)
    assert any("kl_drop" in k for entry in changed.values() for k in entry), diff
