"""DVC remotes end to end: push, clone, pull through a local directory and an S3 (moto) remote."""

from __future__ import annotations

import configparser
import hashlib
import shutil
from pathlib import Path

import pytest

from mechdiff import MechdiffError
from mechdiff.remote import (
    check_remote,
    configure_remote,
    default_remote,
    list_remotes,
    pull,
    push,
    remote_plugin_for,
)
from tests.dvc_helpers import (
    TEST_BUCKET,
    UP_TO_DATE,
    dvc,
    free_port,
    git,
    git_clone,
    init_repo,
    make_toy_pipeline,
    moto_server,
    push_pull_roundtrip,
    setup_s3_remote,
)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _toy_repo(path: Path, no_push: tuple[str, ...] = ()) -> Path:
    """A committed git+DVC repo whose two-stage toy pipeline has been reproduced."""
    init_repo(path)
    make_toy_pipeline(path, no_push=no_push)
    dvc(["repro"], path)
    git(["add", "-A"], path)
    git(["commit", "--quiet", "-m", "toy pipeline"], path)
    return path


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One reproduced toy repo shared by the tests of this module (they only add remotes to it)."""
    return _toy_repo(tmp_path_factory.mktemp("toy") / "repo")


def test_toy_pipeline_outputs(toy_repo: Path) -> None:
    """The toy pipeline produced a directory output and a metric that matches its files."""
    import json

    raw = sorted((toy_repo / "data/raw").iterdir())
    assert [p.name for p in raw] == ["README.txt", "part0.bin", "part1.bin", "part2.bin", "part3.bin"]
    m = json.loads((toy_repo / "metrics/toy.json").read_text())
    assert m == {"n_files": 5, "total_bytes": sum(p.stat().st_size for p in raw)}
    assert UP_TO_DATE in dvc(["status"], toy_repo).stdout


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_push_pull_roundtrip(toy_repo: Path, tmp_path: Path, kind: str) -> None:
    """Push, fresh clone, configure the same remote, pull: identical files, clean status, nothing re-runs."""
    timings: dict[str, float] = {}
    clone = push_pull_roundtrip(toy_repo, kind, tmp_path, timings=timings)
    assert (clone / "data/raw/part3.bin").read_bytes() == (toy_repo / "data/raw/part3.bin").read_bytes()
    assert (clone / "data/stats/part0.bin.sha256").exists()
    # credentials stay out of git: the clone's tracked config holds no secret
    assert "testing" not in (clone / ".dvc/config").read_text()
    print(f"{kind}: push {timings['push_s']:.2f} s, pull {timings['pull_s']:.2f} s")


def test_push_false_output_is_recomputed(tmp_path: Path) -> None:
    """An output declared push: false is not in the remote; `dvc repro` after pull re-creates only it."""
    repo = _toy_repo(tmp_path / "repo", no_push=("data/raw",))
    clone = push_pull_roundtrip(repo, "local", tmp_path / "rt", skip=["data/raw"])
    assert (clone / "data/raw/part0.bin").read_bytes() == (repo / "data/raw/part0.bin").read_bytes()
    (store,) = (tmp_path / "rt").glob("*-store")

    def in_store(f: Path) -> bool:
        md5 = hashlib.md5(f.read_bytes()).hexdigest()
        return (store / "files" / "md5" / md5[:2] / md5[2:]).is_file()

    assert all(in_store(f) for f in (repo / "data/stats").iterdir())
    assert not any(in_store(f) for f in (repo / "data/raw").iterdir())


def test_configure_remote_keeps_credentials_local(tmp_path: Path) -> None:
    """URL and endpoint go to .dvc/config; keys and profile only to .dvc/config.local."""
    repo = init_repo(tmp_path / "repo")
    configure_remote(
        repo, "s3://bucket/prefix", endpoint_url="http://127.0.0.1:9", access_key_id="AKIDX",
        secret_access_key="SECRETX", profile="myprof",
    )
    shared = configparser.ConfigParser()
    shared.read(repo / ".dvc/config")
    local = configparser.ConfigParser()
    local.read(repo / ".dvc/config.local")
    sec = "'remote \"storage\"'"
    assert shared["core"]["remote"] == "storage"
    assert shared[sec]["url"] == "s3://bucket/prefix"
    assert shared[sec]["endpointurl"] == "http://127.0.0.1:9"
    assert not {"access_key_id", "secret_access_key", "profile"} & set(shared[sec])
    assert dict(local[sec]) == {"access_key_id": "AKIDX", "secret_access_key": "SECRETX", "profile": "myprof"}
    assert "config.local" in (repo / ".dvc/.gitignore").read_text()
    assert list_remotes(repo) == {"storage": "s3://bucket/prefix"}
    assert default_remote(repo) == "storage"
    with pytest.raises(MechdiffError, match="apply to s3"):
        configure_remote(repo, "/some/dir", endpoint_url="http://x")


@pytest.mark.parametrize(
    ("url", "plugin"),
    [
        ("s3://b/p", "dvc-s3"),
        ("gs://b/p", "dvc-gs"),
        ("azure://container/p", "dvc-azure"),
        ("ssh://user@host/srv/store", "dvc-ssh"),
        ("/mnt/shared/store", None),
        ("file:///mnt/shared/store", None),
        ("relative/store", None),
        ("https://example.org/store", None),
    ],
)
def test_remote_plugin_for(url: str, plugin: str | None) -> None:
    """Each URL scheme maps to the DVC plugin that serves it."""
    assert remote_plugin_for(url) == plugin


def test_remote_plugin_for_rejects_unknown() -> None:
    """Unknown schemes and empty URLs fail with a one-line message."""
    with pytest.raises(MechdiffError, match="unsupported remote URL scheme"):
        remote_plugin_for("foo://x")
    with pytest.raises(MechdiffError, match="empty"):
        remote_plugin_for("  ")


def test_check_remote_messages(toy_repo: Path, tmp_path: Path) -> None:
    """A clone with no / a wrong / an unreachable / an empty remote gets an actionable one-liner."""
    clone = git_clone(toy_repo, tmp_path / "clone")
    with pytest.raises(MechdiffError, match=r"no DVC remote 'storage'.*dvc remote add -d storage <url>"):
        check_remote(clone)

    configure_remote(clone, str(tmp_path / "store"))
    with pytest.raises(MechdiffError, match=r"which does not exist"):
        check_remote(clone)
    check_remote(clone, for_pull=False)  # a push would create it
    (tmp_path / "store").mkdir()  # there, but nothing pushed yet: a pull would find nothing
    with pytest.raises(MechdiffError, match=r"\(.*store\) is reachable but holds nothing yet: run `dvc push`"):
        check_remote(clone)
    check_remote(clone, for_pull=False)
    (tmp_path / "afile").write_text("x")  # a push could not create a directory under a file
    configure_remote(clone, str(tmp_path / "afile" / "store"))
    with pytest.raises(MechdiffError, match=r"which is a file, not a directory"):
        check_remote(clone, for_pull=False)
    if Path("/proc/self").is_dir():  # a folder where nothing can be made, even by root (os.access says yes there)
        configure_remote(clone, "/proc/mechdiff-nope/store")
        with pytest.raises(MechdiffError, match=r"is not writable here"):
            check_remote(clone, for_pull=False)
    assert not list(tmp_path.glob(".mechdiff-probe-*"))  # the write probe leaves nothing behind

    with pytest.raises(MechdiffError, match=r"no DVC remote 'other' \(configured: storage\)"):
        check_remote(clone, "other")

    keys = {"access_key_id": "testing", "secret_access_key": "testing"}
    port = free_port()  # nothing listens there
    configure_remote(clone, f"s3://{TEST_BUCKET}/x", endpoint_url=f"http://127.0.0.1:{port}", **keys)
    with pytest.raises(MechdiffError, match=r"cannot reach DVC remote 'storage' \(s3://"):
        check_remote(clone, timeout=60)
    # an HTTP remote whose host does not resolve is unreachable, not "missing" (.invalid never resolves)
    configure_remote(clone, "https://mechdiff-remote.invalid/dvc")
    with pytest.raises(MechdiffError, match=r"cannot reach DVC remote 'storage' \(https://.*gaierror"):
        check_remote(clone, timeout=60)
    # ... and so is one whose server refuses the connection
    configure_remote(clone, f"http://127.0.0.1:{free_port()}/dvc")
    for for_pull in (True, False):
        with pytest.raises(MechdiffError, match=r"cannot reach DVC remote 'storage' \(http://.*Connection refused"):
            check_remote(clone, for_pull=for_pull, timeout=60)

    with moto_server() as endpoint:
        configure_remote(clone, "s3://no-such-bucket/x", endpoint_url=endpoint, **keys)
        with pytest.raises(MechdiffError, match="bucket/location does not exist"):
            check_remote(clone)
        configure_remote(clone, f"s3://{TEST_BUCKET}/fresh", endpoint_url=endpoint, **keys)
        with pytest.raises(MechdiffError, match="holds nothing yet"):
            check_remote(clone)
        check_remote(clone, for_pull=False)
        # after a push from the original repo, the clone's check passes and a pull brings the data
        setup_s3_remote(toy_repo, endpoint, prefix="fresh")
        dvc(["push"], toy_repo)
        check_remote(clone)
        pull(clone)
        assert (clone / "data/raw/part1.bin").read_bytes() == (toy_repo / "data/raw/part1.bin").read_bytes()


def test_push_pull_wrappers(toy_repo: Path, tmp_path: Path) -> None:
    """mechdiff.remote.push / pull move the data through a local remote configured by configure_remote."""
    store = tmp_path / "store"
    configure_remote(toy_repo, str(store))
    out = push(toy_repo)
    assert "pushed" in out
    assert any(p.is_file() for p in store.rglob("*"))
    clone = git_clone(toy_repo, tmp_path / "clone")
    with pytest.raises(MechdiffError, match="no DVC remote 'storage'"):
        pull(clone)
    configure_remote(clone, str(store))
    pull(clone)
    assert (clone / "data/raw/part2.bin").read_bytes() == (toy_repo / "data/raw/part2.bin").read_bytes()
    assert UP_TO_DATE in dvc(["status"], clone).stdout
