"""Reusable helpers for tests that drive real git, DVC and an S3 server (moto) as subprocesses.

Nothing runs at import time. Typical use::

    with moto_server() as endpoint:
        clone = push_pull_roundtrip(repo, "s3", tmp_path, endpoint=endpoint)
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
TEST_BUCKET = "mechdiff-test"
S3_CREDS = {"access_key_id": "testing", "secret_access_key": "testing"}
UP_TO_DATE = "Data and pipelines are up to date"


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for child git/dvc processes: no analytics, a git identity, fake AWS creds, no IMDS."""
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="mechdiff-test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="mechdiff-test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.pop("AWS_PROFILE", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if extra:
        env.update(extra)
    return env


def run(
    cmd: Sequence[str | os.PathLike[str]],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run a command; when check and it fails, raise AssertionError carrying its stdout and stderr."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(
        args, cwd=cwd, env=dict(env) if env is not None else base_env(), capture_output=True, text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed (rc={proc.returncode}) in {cwd}: {shlex.join(args)}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def dvc(
    args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the venv's `dvc ARGS` in cwd."""
    return run([str(BIN / "dvc"), *args], cwd, env=env, check=check)


def git(args: Sequence[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `git ARGS` in cwd with a fixed identity."""
    return run(["git", *args], cwd, check=check)


def git_clone(src: Path, dst: Path) -> Path:
    """Clone the git repo at src into dst (a plain local clone, no hard links) and return dst."""
    run(["git", "clone", "--quiet", "--no-hardlinks", str(src), str(dst)], Path(dst).parent)
    return Path(dst)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto_command(port: int) -> list[str]:
    """Command that starts moto's standalone server on 127.0.0.1:port."""
    script = BIN / "moto_server"
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def moto_server(bucket: str | None = TEST_BUCKET, timeout: float = 30.0) -> Iterator[str]:
    """Start moto's S3 server on loopback, create `bucket` (unless None), yield its endpoint URL, stop it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        _moto_command(port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=base_env()
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto server exited with rc={proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"moto server did not answer on {endpoint} in {timeout} s:\n{log.read()}") from None
                time.sleep(0.2)
        if bucket:
            make_bucket(endpoint, bucket)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def make_bucket(endpoint: str, bucket: str) -> None:
    """Create an S3 bucket on the given endpoint with the test credentials."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=S3_CREDS["access_key_id"], aws_secret_access_key=S3_CREDS["secret_access_key"],
    )
    client.create_bucket(Bucket=bucket)


def drop_local_remote_settings(repo: Path, name: str = "storage") -> None:
    """Remove remote NAME's section from .dvc/config.local (old credentials may not fit a new remote type)."""
    local = Path(repo) / ".dvc" / "config.local"
    if local.exists() and f'remote "{name}"' in local.read_text():
        dvc(["remote", "remove", "--local", name], repo)


def setup_s3_remote(repo: Path, endpoint: str, bucket: str = TEST_BUCKET, prefix: str = "store",
                    name: str = "storage") -> str:
    """Make an S3 remote the repo's default: URL + endpoint in .dvc/config, test keys in config.local."""
    url = f"s3://{bucket}/{prefix}"
    drop_local_remote_settings(repo, name)
    dvc(["remote", "add", "--force", "-d", name, url], repo)
    dvc(["remote", "modify", name, "endpointurl", endpoint], repo)
    for key, value in S3_CREDS.items():
        dvc(["remote", "modify", "--local", name, key, value], repo)
    return url


def setup_local_remote(repo: Path, store: Path, name: str = "storage") -> str:
    """Make a local directory (created if missing) the repo's default remote."""
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    drop_local_remote_settings(repo, name)
    dvc(["remote", "add", "--force", "-d", name, str(store)], repo)
    return str(store)


def init_repo(path: Path) -> Path:
    """`git init` + `dvc init` + first commit in path (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    git(["init", "--quiet", "-b", "main"], path)
    dvc(["init", "--quiet"], path)
    dvc(["config", "core.autostage", "true"], path)
    git(["add", "-A"], path)
    git(["commit", "--quiet", "-m", "init"], path)
    return path


_GEN = """
import os, random
random.seed(0)
os.makedirs('data/raw', exist_ok=True)
for i in range(4):
    with open(f'data/raw/part{i}.bin', 'wb') as f:
        f.write(bytes(random.getrandbits(8) for _ in range(2000 * (i + 1))))
with open('data/raw/README.txt', 'w') as f:
    f.write('four random parts\\n')
"""

_STATS = """
import hashlib, json, os
os.makedirs('data/stats', exist_ok=True)
os.makedirs('metrics', exist_ok=True)
sizes = {}
for name in sorted(os.listdir('data/raw')):
    blob = open(os.path.join('data/raw', name), 'rb').read()
    sizes[name] = len(blob)
    with open(os.path.join('data/stats', name + '.sha256'), 'w') as f:
        f.write(hashlib.sha256(blob).hexdigest() + '\\n')
json.dump({'n_files': len(sizes), 'total_bytes': sum(sizes.values())}, open('metrics/toy.json', 'w'), indent=2)
"""


def make_toy_pipeline(repo: Path, *, no_push: Sequence[str] = ()) -> dict[str, object]:
    """Write gen.py, stats.py and a two-stage dvc.yaml: `gen` -> data/raw/, `stats` -> data/stats/ + metrics/toy.json.

    Paths listed in ``no_push`` are declared ``push: false``. Returns the dvc.yaml dict.
    """
    repo = Path(repo)
    (repo / "gen.py").write_text(_GEN.lstrip())
    (repo / "stats.py").write_text(_STATS.lstrip())

    def out(path: str) -> str | dict[str, dict[str, bool]]:
        return {path: {"push": False}} if path in no_push else path

    spec = {
        "stages": {
            "gen": {"cmd": "python gen.py", "deps": ["gen.py"], "outs": [out("data/raw")]},
            "stats": {
                "cmd": "python stats.py",
                "deps": ["stats.py", "data/raw"],
                "outs": [out("data/stats")],
                "metrics": [{"metrics/toy.json": {"cache": False}}],
            },
        }
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec


def dvc_outputs(repo: Path) -> list[str]:
    """Paths of every output recorded in dvc.lock and in the git-tracked *.dvc files of the repo."""
    repo = Path(repo)
    paths: list[str] = []
    lock = repo / "dvc.lock"
    if lock.exists():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            paths += [o["path"] for o in stage.get("outs", [])]
    for rel in git(["ls-files", "*.dvc"], repo).stdout.split():
        f = repo / rel
        for o in (yaml.safe_load(f.read_text()) or {}).get("outs", []):
            paths.append(str((f.parent / o["path"]).relative_to(repo)))
    return sorted(set(paths))


def assert_same_tree(a: Path, b: Path) -> int:
    """Assert a file or directory is byte-identical at a and b; returns the number of files compared."""
    a, b = Path(a), Path(b)
    if a.is_file():
        assert b.is_file(), f"{b} missing"
        assert filecmp.cmp(a, b, shallow=False), f"{a} and {b} differ"
        return 1
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert names_a == names_b, f"file lists differ under {a} and {b}: {names_a} vs {names_b}"
    for rel in names_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), f"{a / rel} and {b / rel} differ"
    return len(names_a)


def push_pull_roundtrip(
    repo: Path,
    remote_kind: str,
    tmp: Path,
    *,
    endpoint: str | None = None,
    bucket: str = TEST_BUCKET,
    timings: dict[str, float] | None = None,
    skip: Sequence[str] = (),
) -> Path:
    """Push the committed repo's DVC outputs to a fresh remote, clone it, pull, and check the clone.

    ``remote_kind`` is "local" (a directory under tmp) or "s3" (moto; started here unless an
    ``endpoint`` is given). The clone must hold identical outputs (except paths in ``skip``, e.g.
    push: false outputs), `dvc status` must be clean and `dvc repro` must run nothing. Returns the
    clone; ``timings`` (if given) receives push_s / pull_s.
    """
    repo, tmp = Path(repo), Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    if remote_kind == "s3" and endpoint is None:
        with moto_server(bucket) as ep:
            return push_pull_roundtrip(repo, "s3", tmp, endpoint=ep, bucket=bucket, timings=timings, skip=skip)
    prefix = f"roundtrip-{time.monotonic_ns()}"

    def configure(where: Path) -> None:
        if remote_kind == "local":
            setup_local_remote(where, tmp / f"{prefix}-store")
        elif remote_kind == "s3":
            setup_s3_remote(where, str(endpoint), bucket, prefix=prefix)
        else:
            raise ValueError(f"remote_kind must be 'local' or 's3', not {remote_kind!r}")

    configure(repo)
    t0 = time.perf_counter()
    dvc(["push"], repo)
    t_push = time.perf_counter() - t0

    clone = git_clone(repo, tmp / f"{prefix}-clone")
    configure(clone)
    t0 = time.perf_counter()
    dvc(["pull", "--allow-missing"] if skip else ["pull"], clone)
    t_pull = time.perf_counter() - t0
    if timings is not None:
        timings.update(push_s=t_push, pull_s=t_pull)

    outs = dvc_outputs(repo)
    assert outs, f"no DVC outputs recorded in {repo}"
    for rel in outs:
        if rel in skip:
            continue
        assert_same_tree(repo / rel, clone / rel)
    if not skip:
        status = dvc(["status"], clone).stdout
        assert UP_TO_DATE in status, f"dvc status in the clone is not clean:\n{status}"
    repro = dvc(["repro"], clone).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", repro))
    allowed = set(stages_producing(repo, skip))
    assert ran <= allowed, f"dvc repro in the clone re-ran {sorted(ran - allowed)}:\n{repro}"
    if not allowed:
        assert UP_TO_DATE in repro or "didn't change, skipping" in repro, f"unexpected dvc repro output:\n{repro}"
    status = dvc(["status"], clone).stdout
    assert UP_TO_DATE in status, f"dvc status in the clone is not clean after repro:\n{status}"
    return clone


def stages_producing(repo: Path, paths: Sequence[str]) -> list[str]:
    """Names of the stages (from dvc.lock) that produce any of the given output paths."""
    lock = Path(repo) / "dvc.lock"
    if not paths or not lock.exists():
        return []
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return [name for name, st in stages.items() if any(o["path"] in paths for o in st.get("outs", []))]
