"""The tiny end-to-end repository: a copy of this repo whose pipeline ran on a tiny edited pair.

Used by the session fixture `tiny_repo` (tests/conftest.py). The tuned model is the base with a planted
rank-2 change at L2.attn_out, so known answers exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from mechdiff.trace import ENV as TRACE_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(args: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with the venv first on PATH (plus `env`); raise with its output on failure."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "MECHDIFF_PROGRESS": "0", **(env or {})}
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def copy_repo(dst: Path) -> Path:
    """Copy the working tree (tracked and untracked, not ignored files) and data/ into dst; make it a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
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
    p["pair"]["edit"] = {"layer": 2, "site": "attn_out", "rank": 2, "scale": 3.0, "heads": None}
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
    p["behaviour"].update({"max_prompts": 12, "max_new_tokens": 4, "n_boot": 100})
    p["steer"].update({"sites": ["L2.attn_out", "layers"], "layers": [2, 3], "k_sweep": [1, 2, 3],
                       "alpha_grid": [0.5, 1.0], "max_prompts": 12, "mc_questions": 8, "max_new_tokens": 2,
                       "n_boot": 50})
    p["hsae"].update({"layer": 2, "width": 16, "k": 2, "batch_size": 256, "epochs": 2, "freeze_steps": 5,
                      "eval_prompts": 12})
    p["heads"].update({"max_prompts": 12, "n_patch": 3, "n_random": 3, "batch_size": 8, "max_new_tokens": 3})
    p["gates"].update({"layer": 2, "max_features": 2, "max_prompts": 8, "neutral_prompts": 8, "mc_questions": 6,
                       "n_perm": 200})
    p["probes"].update({"n_trees": 10, "n_features": 4})
    p["feature_pages"].update({"n_top": 2, "max_gated": 4, "n_contexts": 4})
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def trace_dir(repo: Path) -> Path:
    """Where each stage process of the tiny repo's `dvc repro` wrote its trace (mechdiff.trace), one JSON each."""
    return repo.parent / "trace"


def build_tiny_repo(tmp: Path) -> Path:
    """Copy the repo into tmp, point params at a tiny edited pair, run a traced `dvc repro` and commit the results."""
    from mechdiff.analysis.geometry import hierarchy
    from mechdiff.data.corpus import MC_SOURCES, load_concepts, load_corpus
    from mechdiff.model.tiny import save_tiny_pair_dir

    texts = [q.text for q in load_corpus(ROOT / "data")]
    texts += [" ".join([q.text, *(q.choices or [])]) for q in load_corpus(ROOT / "data", MC_SOURCES)]
    texts += [" ".join(c.words) for c in hierarchy(load_concepts(ROOT / "data"))]  # the geometry's words
    base_dir = save_tiny_pair_dir(tmp / "tiny_base", texts, n_layers=4, d_model=64, seed=0)
    repo = copy_repo(tmp / "repo")
    tiny_params(repo, base_dir)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "tiny"], repo)
    sh(["dvc", "repro"], repo, env={TRACE_ENV: str(trace_dir(repo))})
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "tiny run"], repo)
    return repo


