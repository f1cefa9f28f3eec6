"""The `mechdiff` console script: data materialisation, inspection and remotes.

The pipeline itself runs through DVC (`dvc repro`); this script covers what
sits around it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from mechdiff.errors import MechdiffError

EPILOG = """\
typical use:
  make run                        # venv + data + dvc repro on the default pair
  mechdiff data                   # materialise data/ (dvc pull, else rebuild from the package's corpora)
  mechdiff params                 # validate params.yaml and print the effective values
  mechdiff sites                  # which sites/views `extract` stores for the current params
  mechdiff remote add s3://bucket/path [--endpoint-url URL]   # configure the default DVC remote
  mechdiff remote check           # is the remote configured and reachable?
"""


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else (shutil.which("dvc") or "dvc")


def _sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True)


def cmd_data(ns: argparse.Namespace) -> int:
    """Materialise data/ so that `dvc status data.dvc` is clean."""
    root = Path(ns.root)
    data_dir = root / "data"
    dvcfile = root / "data.dvc"
    if dvcfile.exists() and data_dir.exists():
        st = _sh([_dvc(), "status", "data.dvc"], root)
        if st.returncode == 0 and "changed" not in st.stdout and "deleted" not in st.stdout:
            print("data/ is up to date")
            return 0
    pulled = False
    if dvcfile.exists() and not ns.rebuild:
        remotes = _sh([_dvc(), "remote", "list"], root).stdout.strip()
        if remotes:
            r = _sh([_dvc(), "pull", "-q", "data.dvc"], root)
            pulled = r.returncode == 0
            print("pulled data/ from the DVC remote" if pulled else "DVC remote did not answer; rebuilding data/")
    if not pulled:
        from mechdiff.data.corpus import write_default_corpora

        if data_dir.exists():
            shutil.rmtree(data_dir)
        files = write_default_corpora(data_dir)
        print(f"wrote {len(files)} corpus files into {data_dir}")
    if dvcfile.exists():
        recorded = dvcfile.read_text()
        _sh([_dvc(), "commit", "-f", "-q", "data.dvc"], root)  # hash the files and put them into the local cache
        if dvcfile.read_text() != recorded:
            dvcfile.write_text(recorded)
            raise MechdiffError(
                "the rebuilt data/ differs from data.dvc (the corpus code changed): run `dvc add data` and commit data.dvc"
            )
    else:
        r = _sh([_dvc(), "add", "-q", "data"], root)
        if r.returncode != 0:
            raise MechdiffError(f"`dvc add data` failed: {r.stderr.strip().splitlines()[-1] if r.stderr else ''}")
        print("created data.dvc: commit it with git")
    print("data/ ready (dvc status data.dvc is clean)")
    return 0


def cmd_params(ns: argparse.Namespace) -> int:
    """Validate params.yaml and print it back as typed values."""
    import dataclasses
    import json

    from mechdiff.params import load_params

    p = load_params(Path(ns.root) / "params.yaml")
    print(json.dumps(dataclasses.asdict(p), indent=2))
    return 0


def cmd_sites(ns: argparse.Namespace) -> int:
    """Print the sites and views `extract` stores for the current params and model."""
    from mechdiff.model.sites import plan_sites
    from mechdiff.params import load_params

    p = load_params(Path(ns.root) / "params.yaml")
    n = ns.n_layers
    if n is None:
        cfg = Path(ns.root) / "artifacts/models/base/config.json"
        if not cfg.exists():
            raise MechdiffError("no artifacts/models/base yet: run `dvc repro model_base` or pass --n-layers")
        import json

        c = json.loads(cfg.read_text())
        n = c.get("num_hidden_layers") or c.get("n_layer")
    plan = plan_sites(n, stride=p.extract.layer_stride, detail_layers=p.extract.detail_layers,
                      extra=p.transport.sites, token_layers=p.sae.layers)
    for site, views in plan.items():
        print(f"{site:20s} {', '.join(views)}")
    return 0


def cmd_remote(ns: argparse.Namespace) -> int:
    """Configure or check the default DVC remote."""
    from mechdiff import remote

    root = Path(ns.root)
    if ns.action == "add":
        if not ns.url:
            raise MechdiffError("usage: mechdiff remote add URL [--name storage] [--endpoint-url URL]")
        remote.configure_remote(root, ns.url, name=ns.name, endpoint_url=ns.endpoint_url)
        print(f"remote {ns.name!r} -> {ns.url} (default)")
        plugin = remote.remote_plugin_for(ns.url)
        if plugin:
            import importlib.util

            if importlib.util.find_spec(plugin.replace("-", "_")) is None:
                print(f"this remote needs the DVC plugin {plugin}: {remote.plugin_install_hint(ns.url)}")
    else:
        remote.check_remote(root, ns.name, for_pull=not ns.for_push)
        print(f"remote {ns.name!r} is configured and reachable")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per task."""
    ap = argparse.ArgumentParser(
        prog="mechdiff",
        description="Reproducible model diffing: what did fine-tuning change inside a language model, where, "
        "and in how many directions? The pipeline runs with `dvc repro`; this tool prepares and inspects it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--root", default=".", help="repository root (default: .)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="materialise data/ (dvc pull when a remote answers, else rebuild)")
    d.add_argument("--rebuild", action="store_true", help="rebuild from the package's corpora without pulling")
    d.set_defaults(fn=cmd_data)
    sub.add_parser("params", help="validate params.yaml and print the effective values").set_defaults(fn=cmd_params)
    s = sub.add_parser("sites", help="list the sites and views extract stores")
    s.add_argument("--n-layers", type=int, default=None, help="number of decoder blocks (default: read the base model)")
    s.set_defaults(fn=cmd_sites)
    r = sub.add_parser("remote", help="configure (add) or check the DVC remote")
    r.add_argument("action", choices=["add", "check"])
    r.add_argument("url", nargs="?", help="remote URL: s3://, gs://, azure://, ssh://, or a directory")
    r.add_argument("--name", default="storage", help="remote name (default: storage)")
    r.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, moto, ...)")
    r.add_argument("--for-push", action="store_true",
                   help="check: only that the remote is reachable (an empty remote is fine before the first push)")
    r.set_defaults(fn=cmd_remote)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mechdiff` console script."""
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.fn(ns) or 0)
    except MechdiffError as e:
        print(f"mechdiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
