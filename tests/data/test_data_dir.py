"""A fresh clone with no DVC cache and no remote materialises data/ with `mechdiff data`, hash-identical to data.dvc."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_fresh_clone_materialises_data(tmp_path):
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    # the working tree's data.dvc / dvc.yaml may be newer than the last commit: use them
    for f in ("data.dvc", ".dvc/config"):
        if (ROOT / f).exists():
            shutil.copy2(ROOT / f, repo / f)
    shutil.copytree(ROOT / "src", repo / "src", dirs_exist_ok=True)
    assert not (repo / "data").exists()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for line in subprocess.run(["git", "config", "--file", ".dvc/config", "--list"], cwd=repo,
                               capture_output=True, text=True).stdout.splitlines():
        if line.startswith("core.remote"):  # no reachable remote in this test
            subprocess.run([str(BIN / "dvc"), "remote", "default", "--unset"], cwd=repo, env=env)
    r = subprocess.run([str(BIN / "mechdiff"), "data"], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    st = subprocess.run([str(BIN / "dvc"), "status", "data.dvc"], cwd=repo, env=env, capture_output=True, text=True)
    assert st.returncode == 0 and "up to date" in st.stdout, st.stdout + st.stderr
    assert sorted(p.name for p in (repo / "data").iterdir()) == sorted(p.name for p in (ROOT / "data").iterdir())
    # and again: idempotent
    r2 = subprocess.run([str(BIN / "mechdiff"), "data"], cwd=repo, env=env, capture_output=True, text=True)
    assert r2.returncode == 0 and "up to date" in r2.stdout
