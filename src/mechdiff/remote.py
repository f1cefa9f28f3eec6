"""DVC remote helpers: configure the shared remote, check it answers, push and pull.

Thin wrappers over the ``dvc`` command line (the one installed next to the running
Python). Credentials only ever go to ``.dvc/config.local`` (``--local``), which git
ignores; the remote's URL and endpoint go to ``.dvc/config`` so a clone shares them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from mechdiff.errors import MechdiffError

DEFAULT_REMOTE = "storage"
DOCS = "docs/REMOTES.md"

# URL scheme -> (pip distribution of the DVC plugin, importable module, pyproject extra or None)
_PLUGINS: dict[str, tuple[str, str, str | None]] = {
    "s3": ("dvc-s3", "dvc_s3", "s3"),
    "gs": ("dvc-gs", "dvc_gs", "gs"),
    "gcs": ("dvc-gs", "dvc_gs", "gs"),
    "azure": ("dvc-azure", "dvc_azure", "azure"),
    "az": ("dvc-azure", "dvc_azure", "azure"),
    "ssh": ("dvc-ssh", "dvc_ssh", "ssh"),
    "hdfs": ("dvc-hdfs", "dvc_hdfs", None),
    "webhdfs": ("dvc-webhdfs", "dvc_webhdfs", None),
    "webdav": ("dvc-webdav", "dvc_webdav", None),
    "webdavs": ("dvc-webdav", "dvc_webdav", None),
    "oss": ("dvc-oss", "dvc_oss", None),
    "gdrive": ("dvc-gdrive", "dvc_gdrive", None),
}
# Schemes that DVC handles without a plugin (dvc-http is one of dvc's own dependencies).
_BUILTIN = {"", "file", "http", "https", "remote"}


def _scheme(url: str) -> str:
    """URL scheme in lower case; '' for a plain (or Windows drive) path."""
    if not isinstance(url, str) or not url.strip():
        raise MechdiffError("remote URL is empty: give e.g. s3://bucket/mechdiff or /mnt/shared/mechdiff-store")
    parsed = urlparse(url.strip())
    scheme = parsed.scheme.lower()
    return "" if len(scheme) == 1 else scheme  # C:\... is a path


def is_local_url(url: str) -> bool:
    """True when the remote URL is a directory on this machine (plain path or file://)."""
    return _scheme(url) in ("", "file")


def local_remote_path(url: str, repo: Path) -> Path:
    """Directory of a local remote; relative paths are resolved against the repo's .dvc/ folder."""
    if _scheme(url) == "file":
        path = Path(urlparse(url).path)
    else:
        path = Path(os.path.expanduser(url))
    return path if path.is_absolute() else (Path(repo) / ".dvc" / path).resolve()


def remote_plugin_for(url: str) -> str | None:
    """Pip distribution DVC needs for this remote URL (s3:// -> 'dvc-s3'); None when none is needed."""
    scheme = _scheme(url)
    if scheme in _BUILTIN:
        return None
    if scheme not in _PLUGINS:
        raise MechdiffError(f"unsupported remote URL scheme '{scheme}://' in {url!r}: see {DOCS} for the supported ones")
    return _PLUGINS[scheme][0]


def plugin_install_hint(url: str) -> str | None:
    """The pip command that installs the plugin for this URL, or None when none is needed."""
    scheme = _scheme(url)
    if scheme in _BUILTIN:
        return None
    dist, _module, extra = _PLUGINS[scheme]
    return f"pip install -e '.[{extra}]'" if extra else f"pip install {dist}"


def _require_plugin(url: str) -> None:
    """Raise when the DVC plugin for the URL is not importable in this environment."""
    dist = remote_plugin_for(url)
    if dist is None:
        return
    module = _PLUGINS[_scheme(url)][1]
    if importlib.util.find_spec(module) is None:
        raise MechdiffError(f"remote {url!r} needs the DVC plugin {dist}: run `{plugin_install_hint(url)}`")


def dvc_executable() -> str:
    """Path of the `dvc` command: next to the running Python first, then on PATH."""
    here = Path(sys.executable).parent / "dvc"
    if here.exists():
        return str(here)
    found = shutil.which("dvc")
    if found is None:
        raise MechdiffError("the `dvc` command is not installed: run `pip install -e .` in the project venv")
    return found


def _check_repo(repo: Path) -> Path:
    """Resolve and validate a DVC repository root."""
    repo = Path(repo)
    if not (repo / ".dvc").is_dir():
        raise MechdiffError(f"{repo} is not a DVC repository (no .dvc/): run `dvc init` there or pass the repo root")
    return repo


def _last_line(text: str) -> str:
    """Last non-empty line of a command's output, for one-line error messages."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def run_dvc(
    repo: Path, args: list[str], *, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `dvc ARGS` in the repo; with check=True a failure raises MechdiffError with dvc's last line."""
    repo = Path(repo)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    try:
        proc = subprocess.run(
            [dvc_executable(), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise MechdiffError(f"`dvc {' '.join(args)}` did not finish within {timeout:.0f} s in {repo}") from exc
    if check and proc.returncode != 0:
        msg = _last_line(proc.stderr or proc.stdout)
        raise MechdiffError(f"`dvc {' '.join(args)}` failed in {repo}: {msg}")
    return proc


def _load_config(repo: Path) -> dict:
    """The repo's DVC config, all levels (system, global, repo, local) merged, local paths made absolute."""
    from dvc.config import Config, ConfigError

    try:
        return Config(dvc_dir=str(Path(repo) / ".dvc"))
    except ConfigError as exc:
        raise MechdiffError(f"bad DVC config in {repo}/.dvc: {str(exc).splitlines()[0]}") from exc


def list_remotes(repo: Path) -> dict[str, str]:
    """Remotes configured for the repo (project, local and user config merged): name -> URL."""
    conf = _load_config(_check_repo(repo))
    return {name: str(spec.get("url", "")) for name, spec in conf.get("remote", {}).items()}


def default_remote(repo: Path) -> str | None:
    """Name of the repo's default remote, or None when none is set."""
    conf = _load_config(_check_repo(repo))
    name = conf.get("core", {}).get("remote")
    return str(name) if name else None


def configure_remote(
    repo: Path,
    url: str,
    *,
    name: str = DEFAULT_REMOTE,
    default: bool = True,
    endpoint_url: str | None = None,
    profile: str | None = None,
    credentialpath: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region: str | None = None,
) -> str:
    """Add (or replace) remote NAME -> URL; endpoint/region in .dvc/config, credentials in .dvc/config.local.
    Returns the URL as stored (a plain local path made absolute against the current directory)."""
    repo = _check_repo(repo)
    if not name or any(c.isspace() for c in name):
        raise MechdiffError(f"bad remote name {name!r}: use a plain word such as '{DEFAULT_REMOTE}'")
    _require_plugin(url)
    scheme = _scheme(url)
    if scheme != "s3" and (endpoint_url or access_key_id or secret_access_key or region):
        raise MechdiffError(
            f"endpoint_url / access_key_id / secret_access_key / region apply to s3:// remotes, not {url!r}"
        )
    url = url.strip()
    if _scheme(url) == "":
        url = os.path.abspath(os.path.expanduser(url))
    shared: dict[str, str] = {"url": url}
    if endpoint_url:
        shared["endpointurl"] = endpoint_url
    if region:
        shared["region"] = region
    candidates = {
        "profile": profile,
        "credentialpath": credentialpath,
        "access_key_id": access_key_id,
        "secret_access_key": secret_access_key,
    }
    secret = {k: v for k, v in candidates.items() if v}
    from dvc.config import ConfigError

    conf = _load_config(repo)
    try:
        # drop the old remote's machine-local settings first: keys valid for its old type may not be for the new
        with conf.edit("local") as local:
            local["remote"].pop(name, None)
        with conf.edit("repo") as project:
            project["remote"][name] = shared
            if default:
                project["core"]["remote"] = name
        if secret:
            with conf.edit("local") as local:
                local["remote"][name] = secret
    except ConfigError as exc:
        raise MechdiffError(f"cannot configure DVC remote '{name}' -> {url}: {str(exc).splitlines()[0]}") from exc
    return url


# Runs in a child process (bounded by a timeout, so a black-holed endpoint cannot hang the caller).
_PROBE = r"""
import json, os, sys
repo, name = sys.argv[1], sys.argv[2]
out = {}
try:
    from dvc.repo import Repo
    r = Repo(repo)
    remotes = r.config.get("remote", {})
    if name not in remotes:
        out = {"state": "no_remote", "remotes": sorted(remotes)}
    else:
        out["url"] = remotes[name].get("url", "")
        import socket
        from urllib.parse import urlsplit
        u = urlsplit(out["url"])
        proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"))
        if u.scheme in ("http", "https", "webdav", "webdavs") and u.hostname and not proxied:
            socket.getaddrinfo(u.hostname, u.port or None)  # a host that does not resolve: "error", not "missing"
            port = u.port or (443 if u.scheme in ("https", "webdavs") else 80)
            socket.create_connection((u.hostname, port), timeout=10).close()  # refused: "error", not "missing"
        from dvc.fs import get_cloud_fs
        cls, config, path = get_cloud_fs(r.config, name=name)
        fs = cls(**config)
        top = path.rstrip("/")
        probe, state = top, "missing_root"
        while probe:
            if fs.exists(probe):
                state = "ok" if probe == top else "empty"
                break
            parent = fs.parent(probe).rstrip("/")
            if not parent or parent == probe:
                break
            probe = parent
        out["state"] = state
except Exception as exc:  # reported to the parent as one line
    out["state"] = "error"
    out["detail"] = (type(exc).__name__ + ": " + str(exc)).splitlines()[0][:300]
print(json.dumps(out))
"""


def check_remote(
    repo: Path, name: str | None = DEFAULT_REMOTE, *, for_pull: bool = True, timeout: float = 60.0
) -> None:
    """Raise MechdiffError with one actionable line when remote NAME is missing, unreachable or empty.

    ``for_pull=True`` (the default) also requires the remote location to exist (something was
    pushed there); ``for_pull=False`` (before a push) only requires its parent/bucket to exist.
    ``name=None`` checks the repo's default remote.
    """
    repo = _check_repo(repo)
    if name is None:
        name = default_remote(repo)
        if name is None:
            raise MechdiffError(
                f"no default DVC remote: run `dvc remote add -d {DEFAULT_REMOTE} <url>` or see {DOCS}"
            )
    remotes = list_remotes(repo)
    if name not in remotes:
        others = f" (configured: {', '.join(sorted(remotes))})" if remotes else ""
        raise MechdiffError(f"no DVC remote '{name}'{others}: run `dvc remote add -d {name} <url>` or see {DOCS}")
    url = remotes[name]
    _require_plugin(url)
    if is_local_url(url):
        path = local_remote_path(url, repo)
        if for_pull and not path.is_dir():
            raise MechdiffError(
                f"DVC remote '{name}' is the directory {path}, which does not exist: "
                f"mount/create it or fix it with `dvc remote modify {name} url <path>`"
            )
        try:
            empty = for_pull and not any(path.iterdir())
        except OSError as e:
            raise MechdiffError(f"DVC remote '{name}' ({path}) cannot be read here ({e.strerror or e}): fix its "
                                "permissions or the URL") from e
        if empty:
            raise MechdiffError(
                f"DVC remote '{name}' ({path}) is reachable but holds nothing yet: "
                "run `dvc push` where the data was produced, or check the URL"
            )
        if not for_pull:
            anc = path
            while not anc.exists() and anc != anc.parent:
                anc = anc.parent
            if not anc.is_dir():
                raise MechdiffError(f"DVC remote '{name}' ({path}) lies under {anc}, which is a file, not a directory: "
                                    f"fix it with `dvc remote modify {name} url <path>`")
            try:  # a real write, not os.access: root passes that on folders where nothing can be made (/proc)
                import tempfile

                os.rmdir(tempfile.mkdtemp(prefix=".mechdiff-probe-", dir=anc))
            except OSError as e:
                raise MechdiffError(f"DVC remote '{name}' ({path}) is not writable here ({e.strerror or e}): fix "
                                    "permissions or the URL") from None
        return
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(Path(repo).resolve()), name],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"AWS_MAX_ATTEMPTS": "2", **os.environ, "DVC_NO_ANALYTICS": "1"},  # a probe: fail fast
        )
    except subprocess.TimeoutExpired as exc:
        raise MechdiffError(
            f"DVC remote '{name}' ({url}) did not answer within {timeout:.0f} s: check the network, "
            f"endpointurl and credentials (see {DOCS})"
        ) from exc
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise MechdiffError(f"could not probe DVC remote '{name}' ({url}): {_last_line(proc.stderr)}") from exc
    state = res.get("state")
    if state == "ok" or (state == "empty" and not for_pull):
        return
    if state == "empty":
        raise MechdiffError(
            f"DVC remote '{name}' ({url}) is reachable but holds nothing yet: "
            "run `dvc push` where the data was produced, or check the URL"
        )
    if state == "missing_root":
        raise MechdiffError(
            f"DVC remote '{name}' ({url}): the bucket/location does not exist or is not visible with these "
            f"credentials: create it or fix `dvc remote modify {name} url ...` (see {DOCS})"
        )
    if state == "no_remote":
        raise MechdiffError(f"no DVC remote '{name}': run `dvc remote add -d {name} <url>` or see {DOCS}")
    raise MechdiffError(
        f"cannot reach DVC remote '{name}' ({url}): {res.get('detail', 'unknown error')}; check endpointurl and "
        f"credentials in .dvc/config.local (see {DOCS})"
    )


def push(repo: Path, *, remote: str | None = DEFAULT_REMOTE, targets: list[str] | None = None,
         jobs: int | None = None) -> str:
    """Check the remote, then `dvc push`; returns dvc's output."""
    check_remote(repo, remote, for_pull=False)
    args = ["push"] + (["-r", remote] if remote else []) + (["-j", str(jobs)] if jobs else []) + list(targets or [])
    return run_dvc(repo, args).stdout


def pull(repo: Path, *, remote: str | None = DEFAULT_REMOTE, targets: list[str] | None = None,
         allow_missing: bool = True, jobs: int | None = None) -> str:
    """Check the remote, then `dvc pull` (by default --allow-missing, for outputs declared push: false)."""
    check_remote(repo, remote, for_pull=True)
    args = ["pull"] + (["-r", remote] if remote else []) + (["--allow-missing"] if allow_missing else [])
    args += (["-j", str(jobs)] if jobs else []) + list(targets or [])
    return run_dvc(repo, args).stdout
