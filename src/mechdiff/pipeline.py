"""The one place that knows the pipeline's file layout, and the glue shared by the stages.

Every artifact, metric and plot path of the DVC pipeline is defined here (dvc.yaml declares the same paths);
the rest of the library takes paths and arrays as arguments. Also: kept prompts, encodings, row selections.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mechdiff.errors import MechdiffError
from mechdiff.model.tokens import Encoded, encode

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORT = Path("report")
PROMPTS = ARTIFACTS / "prompts" / "prompts.jsonl"
FAIRNESS = ARTIFACTS / "prompts" / "fairness.npz"
EVAL_PROMPTS = ARTIFACTS / "prompts" / "eval.jsonl"  # scored sets (multiple choice, reference answers), split
PARTIAL = ARTIFACTS / "partial"  # finished units of interrupted stages (resume.Units), removed when a stage ends
BIG_FILE = 1 << 24  # stage_fingerprint: files above this size (or under ARTIFACTS) enter by size and time


def model_dir(which: str) -> Path:
    """Saved model `which` (base | tuned)."""
    return ARTIFACTS / "models" / which


def acts_path(which: str) -> Path:
    """Activation store of model `which` (base | tuned)."""
    return ARTIFACTS / "acts" / f"{which}.zarr"


def map_dir(site: str) -> Path:
    """Transport map of one site."""
    return ARTIFACTS / "maps" / site


def sae_dir(source: str, layer: int) -> Path:
    """Checkpoint folder of one SAE (source base | tuned | delta | crosscoder)."""
    return ARTIFACTS / "saes" / f"{source}_L{layer}"


def geometry_file(which: str) -> Path:
    """Concept vectors, whitening and teacher directions of model `which` (geometry stage)."""
    return ARTIFACTS / "geometry" / f"{which}.npz"


def hsae_dir(which: str, variant: str) -> Path:
    """Checkpoint folder of one hierarchical SAE (model base | tuned, variant random | teacher)."""
    return ARTIFACTS / "hsae" / f"{which}_{variant}"


def metric(name: str) -> Path:
    """A metrics file, e.g. metric("patch.json") or metric("transport/L20.attn_out.json")."""
    return METRICS / name


def plot(name: str) -> Path:
    """A plots file, e.g. plot("cka.csv")."""
    return PLOTS / name


def open_stores():
    """The base and tuned activation stores, checked to hold the same prompts (`store.check_pair_stores`)."""
    from mechdiff.data.store import ActStore, check_pair_stores

    base, tuned = ActStore.open(acts_path("base")), ActStore.open(acts_path("tuned"))
    check_pair_stores(base, tuned, one_vocab=FAIRNESS.exists() and tokenizers_identical())
    return base, tuned


def kept_prompts(prompts_path: Path = PROMPTS, fairness_path: Path = FAIRNESS) -> list:
    """Prompts that passed the fairness filter, in store row order."""
    from mechdiff.data.corpus import load_prompts

    keep = set(np.load(fairness_path)["kept_pids"].tolist())
    prompts = [q for q in load_prompts(prompts_path) if q.pid in keep]
    if not prompts:
        raise MechdiffError("no prompts left after the fairness filter: rerun the fairness stage, which says why")
    return prompts


def tokenizers_identical(fairness_path: Path = FAIRNESS) -> bool:
    """Whether base and tuned have one tokenizer (the fairness stage's record)."""
    return bool(np.load(fairness_path)["identical"])


def allowed_ids(fairness_path: Path = FAIRNESS) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Shared token ids (base, tuned), aligned string by string, or (None, None) when the tokenizers are identical."""
    f = np.load(fairness_path)
    if bool(f["identical"]):  # as `tokenizers_identical`, from the one open file
        return None, None
    return f["allowed_base"], f["allowed_tuned"]


def encode_prompts(tokenizer, prompts: list, *, chat: bool, max_len: int) -> Encoded:
    """Encode prompts exactly as `extract` did (same chat template, truncation, decision token)."""
    return encode(tokenizer, [q.text for q in prompts], chat=chat, max_len=max_len)


def eval_sets(prompts: list, *, split: str, n: int | None = None, seed: int = 0
              ) -> tuple[dict[str, tuple[list[str], list[list[str]], list[int]]], dict[str, tuple[list[str], list[str]]]]:
    """The scored sets of `split`: ({dataset: (questions, choices, answers)} for records with choices,
    {dataset: (prompts, references)} for records with a reference answer), each a seeded subsample of at most n."""
    from mechdiff.data.corpus import has_reference

    mc: dict = {}
    refs: dict = {}
    for ds in sorted({q.dataset for q in prompts}):
        qs = [q for q in prompts if q.dataset == ds and q.split == split]
        if n is not None and 0 < n < len(qs):
            keep = np.sort(np.random.default_rng(seed).choice(len(qs), size=n, replace=False))
            qs = [qs[i] for i in keep]
        with_choices = [q for q in qs if q.choices]
        with_ref = [q for q in qs if has_reference(q)]
        if with_choices:
            mc[ds] = ([q.text for q in with_choices], [list(q.choices) for q in with_choices],
                      [int(q.answer) for q in with_choices])
        if with_ref:
            refs[ds] = ([q.text for q in with_ref], [q.reference for q in with_ref])
    return mc, refs


def pick_rows(prompts: list, *, split: str | None = None, datasets: tuple[str, ...] | None = None,
              n: int | None = None, seed: int = 0) -> np.ndarray:
    """Row indices of prompts in `split` / `datasets`, a seeded subsample of at most `n` (sorted)."""
    rows = np.array([i for i, q in enumerate(prompts)
                     if (split is None or q.split == split) and (datasets is None or q.dataset in datasets)],
                    dtype=np.int64)
    if len(rows) == 0:
        raise MechdiffError(f"no prompts in split={split!r} datasets={datasets}: check data.splits and the corpora")
    if n is not None and 0 < n < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    return rows


def stage_help(script: str | Path, doc: str | None, dvc_yaml: str | Path = "dvc.yaml") -> str:
    """The `--help` text of a stage script: its docstring, then for each dvc.yaml stage that runs it, the command,
    the params it reads and what it writes (read from `dvc_yaml` when it is there)."""
    import yaml

    script = Path(script)
    lines = [(doc or f"Stage script {script.name}.").strip(), ""]
    stages = {}
    try:
        stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        pass
    found = False
    for name, st in stages.items():
        if not isinstance(st, dict) or f"stages/{script.name}" not in str(st.get("cmd", "")):
            continue
        found = True
        matrix = st.get("matrix")
        keys = name + (f" (every {' x '.join(matrix)}; one of them: dvc repro {name}@<"
                       + "-".join(matrix) + ">, e.g. from `dvc stage list`)" if isinstance(matrix, dict) else "")
        params = [p if isinstance(p, str) else ", ".join(map(str, p)) for p in st.get("params") or []]
        outs = [next(iter(o)) if isinstance(o, dict) else str(o) for kind in ("outs", "metrics", "plots")
                for o in st.get(kind) or []]
        lines += [f"Run it through DVC: dvc repro {keys}", f"  command: {st.get('cmd', '')}",
                  f"  params read (params.yaml): {', '.join(params) or 'none'}", f"  writes: {', '.join(outs)}"]
    if not found:
        lines.append(f"Run it from the project root through DVC (dvc repro), which runs `python stages/{script.name}`.")
    return "\n".join(lines)


def stage_def(address: str, dvc_yaml: str | Path = "dvc.yaml") -> dict | None:
    """The definition of the dvc.yaml stage `address` (`patch`, or a matrix stage's `sae@base-20`: its values joined
    by "-" in the order of its matrix keys, as DVC names it), with a matrix stage's `${item.<key>}` filled in;
    None when there is no such stage."""
    import itertools
    import re

    import yaml

    from mechdiff import trace

    name, _, item = str(address).partition("@")
    try:
        with trace.quiet():  # the stage's definition, not an input of its results
            st = ((yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}).get(name)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(st, dict):
        return None
    matrix = st.get("matrix")
    if not isinstance(matrix, dict):
        return None if item else st
    keys = list(matrix)

    params: list = []  # params.yaml (DVC's default vars, next to dvc.yaml), read at most once

    def values_of(v):  # a list, or `${a.b}`: a list from params.yaml
        m = re.fullmatch(r"\$\{\s*([\w.]+)\s*\}", v) if isinstance(v, str) else None
        if m is None:
            return v if isinstance(v, list) else []
        if not params:
            try:
                with trace.quiet():
                    params.append(yaml.safe_load((Path(dvc_yaml).parent / "params.yaml").read_text()) or {})
            except (OSError, yaml.YAMLError):
                params.append({})
        v = params[0]
        for part in m.group(1).split("."):
            v = v.get(part) if isinstance(v, dict) else None
        return v if isinstance(v, list) else []

    for values in itertools.product(*(values_of(matrix[k]) for k in keys)):
        if "-".join(str(v) for v in values) == item:
            fill = dict(zip(keys, values))

            def sub(x, fill=fill):
                if isinstance(x, str):
                    return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(fill.get(m.group(1), m.group(0))), x)
                if isinstance(x, list):
                    return [sub(v) for v in x]
                if isinstance(x, dict):
                    return {sub(k): sub(v) for k, v in x.items()}
                return x

            return sub({k: v for k, v in st.items() if k != "matrix"})
    return None


def stage_outputs(address: str, dvc_yaml: str | Path = "dvc.yaml") -> list[tuple[str, bool, bool]]:
    """Every output dvc.yaml declares for stage `address` (metrics, plots, outs): (path, cached, persist), where
    `cached` is False for `cache: false` outputs (kept in git). [] when there is no such stage."""
    st = stage_def(address, dvc_yaml) or {}
    out = []
    for kind in ("metrics", "plots", "outs"):
        for o in st.get(kind) or []:
            path, opts = next(iter(o.items())) if isinstance(o, dict) and o else (o, None)
            opts = opts if isinstance(opts, dict) else {}
            out.append((str(path), bool(opts.get("cache", True)), bool(opts.get("persist"))))
    return out


def removed_outputs(address: str, dvc_yaml: str | Path = "dvc.yaml") -> tuple[list[str], bool]:
    """What `dvc repro` deleted of stage `address`'s earlier outputs before running it (every output not `persist`),
    as far as the workspace shows: (its missing git-tracked outputs (`cache: false`), whether any DVC-cached one is
    missing). ([], False) when there is no such stage."""
    gone = [(p, c) for p, c, keep in stage_outputs(address, dvc_yaml) if not keep and not Path(p).exists()]
    return [p for p, c in gone if not c], any(c for _, c in gone)


def _dir_digest(files: dict[str, bytes]) -> str:
    """DVC's hash of a directory from its files {relative path: contents}: the md5 of its sorted JSON manifest."""
    import hashlib
    import json

    ents = [{"md5": hashlib.md5(files[k]).hexdigest(), "relpath": k} for k in sorted(files)]
    return hashlib.md5(json.dumps(ents, sort_keys=True).encode()).hexdigest() + ".dir"


def _from_git(path: str, md5: str, root: Path) -> dict[str, bytes] | None:
    """HEAD's version of a git-tracked output {relative path: contents} ({"": bytes} for a file), when its DVC hash
    is `md5` (what dvc.lock records); else None."""
    import hashlib
    import subprocess

    def blob(p: str) -> bytes | None:
        r = subprocess.run(["git", "show", f"HEAD:./{p}"], cwd=root, capture_output=True, timeout=60)
        return r.stdout if r.returncode == 0 else None

    if not md5.endswith(".dir"):
        data = blob(path)
        return {"": data} if data is not None and hashlib.md5(data).hexdigest() == md5 else None
    r = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD", "--", path], cwd=root, capture_output=True,
                       text=True, timeout=60)
    names = r.stdout.split("\n") if r.returncode == 0 else []
    files = {}
    for n in filter(None, names):
        data = blob(n)
        if data is None:
            return None
        files[Path(n).relative_to(path).as_posix()] = data
    return files if files and _dir_digest(files) == md5 else None


def _from_cache(md5: str, root: Path) -> dict[str, Path] | None:
    """The DVC cache's files of an output whose hash is `md5` {relative path: cache file} ({"": file} for a file);
    None when the cache lacks any of them."""
    import json

    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            odb = repo.cache.local
            where = Path(odb.oid_to_path(md5))
            if not md5.endswith(".dir"):
                return {"": where} if where.is_file() else None
            files = {e["relpath"]: Path(odb.oid_to_path(e["md5"])) for e in json.loads(where.read_text())}
    except Exception:  # noqa: BLE001 - no cache, no manifest, another layout: nothing to restore from
        return None
    return files if all(f.is_file() for f in files.values()) else None


def _restore_one(path: str, md5: str, cached: bool, root: Path) -> bool:
    """Write output `path` (inside `root`) back as dvc.lock records it (hash `md5`): from the DVC cache (`cached`) or
    from git HEAD where HEAD's version has that hash. Written beside it and renamed into place, so an interrupted
    restore leaves no half output. True when restored."""
    import shutil
    import tempfile

    dst = (root / path).resolve()
    if not dst.is_relative_to(root.resolve()):
        return False
    found = _from_cache(md5, root) if cached else _from_git(path, md5, root)
    if found is None:
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.restore-", dir=dst.parent))
    try:
        for rel, src in found.items():
            f = (tmp / "out" / rel) if rel else tmp / "out"
            if not f.resolve().is_relative_to(tmp.resolve()):
                return False
            f.parent.mkdir(parents=True, exist_ok=True)
            if cached:
                shutil.copyfile(src, f)
            else:
                f.write_bytes(src)
        os.replace(tmp / "out", dst)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_removed(address: str, root: str | Path = ".") -> list[str]:
    """Bring back the earlier outputs of stage `address` that `dvc repro` / `dvc exp run` deleted before running it,
    exactly as dvc.lock records them, so that a stage failing on bad input loses nothing: DVC-cached outputs from
    the DVC cache, git-tracked ones (`cache: false`) from HEAD where HEAD's version has the recorded hash. Outputs
    DVC keeps (`persist`), outputs still there and outputs of other stages are left alone. Returns the paths
    restored (an output that fails to restore is skipped: the caller's hint names it)."""
    import yaml

    from mechdiff import trace

    root = Path(root)
    try:
        with trace.quiet():  # what the last run recorded, not an input of this stage's results
            locked = ((yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages") or {}).get(address) or {}
    except (OSError, yaml.YAMLError):
        return []
    recorded = {str(o.get("path")): str(o.get("md5") or "") for o in locked.get("outs") or [] if isinstance(o, dict)}
    done = []
    for path, cached, keep in stage_outputs(address, root / "dvc.yaml"):
        if keep or not recorded.get(path) or (root / path).exists():
            continue
        try:
            if _restore_one(path, recorded[path], cached, root):
                done.append(path)
        except OSError:
            continue
    return done


def stage_fingerprint(stage: str, dvc_yaml: str | Path = "dvc.yaml", params_yaml: str | Path = "params.yaml"
                      ) -> str | None:
    """A hash of everything dvc.yaml says `stage` reads (a matrix stage by its full name, `sae@base-20`): each
    dependency's files (name and size, and the contents of files up to `BIG_FILE`; the modification time of larger
    ones and of every file under ARTIFACTS, the outputs of earlier stages, which a rerun of theirs rewrites), the
    values of its params and `resume.environment`. None when the stage is not in `dvc_yaml`. Work kept under it is
    reused only when DVC would see the same stage."""
    import hashlib

    from mechdiff.params import read_raw
    from mechdiff.resume import environment, fingerprint

    st = stage_def(stage, dvc_yaml)
    if st is None:
        return None
    try:  # the declared params' values as DVC and the stage read them (2e-4 a number)
        values = read_raw(params_yaml)
    except (OSError, MechdiffError):
        return None
    files: list[list] = []
    for dep in st.get("deps") or []:
        path = Path(str(dep))
        if not path.exists():
            files.append([path.as_posix(), "missing"])
        by_time = path.parts[:1] == (ARTIFACTS.name,)  # earlier stages' outputs: by modification time
        for f in [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()):
            info = f.stat()
            big = by_time or info.st_size > BIG_FILE
            files.append([f.as_posix(), info.st_size,
                          info.st_mtime_ns if big else hashlib.sha256(f.read_bytes()).hexdigest()])
    params = {}
    for entry in st.get("params") or []:
        for key in [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks]:
            v = values
            for part in str(key).split("."):
                v = v.get(part) if isinstance(v, dict) else None
            params[str(key)] = v
    return fingerprint([st.get("cmd", ""), files, params, environment()])


_AT_START: dict[tuple[str, str], str | None] = {}


def start_fingerprint(stage: str) -> str | None:
    """`stage_fingerprint(stage)` as first taken in this process (by `io.run_stage` before the stage runs, or by
    `stage_units`): one hash serves both. A later check of whether the inputs changed calls `stage_fingerprint`."""
    key = (stage, os.getcwd())
    if key not in _AT_START:
        _AT_START[key] = stage_fingerprint(stage)
    return _AT_START[key]


def stage_units(stage: str, *, enabled: bool = True):
    """The kept units of `stage`'s work (`resume.Units` in PARTIAL/<stage>, under `stage_fingerprint`): an
    interrupted run of the same stage resumes them; a stage dvc.yaml does not declare keeps nothing."""
    from mechdiff.resume import Units

    fp = start_fingerprint(stage)
    return Units(PARTIAL / stage if fp is not None else None, fp or "", enabled=enabled, label=stage)
