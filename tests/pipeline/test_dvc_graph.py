"""dvc.yaml declares exactly what each stage uses: the code it imports, the params it reads, the files it reads
and writes.

The truth is computed from the code, never from a list kept here: import closures by AST over every import
statement (fast); params keys read, by AST of the stage scripts (fast) and by the recording params accessor during
the tiny pipeline's traced `dvc repro` (slow, `tiny_repo`); files read, written, listed and deleted, and commands
run, by the audit-hook trace of that same repro (mechdiff.trace). Each failure lists, per stage, what to add to or
remove from dvc.yaml.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from mechdiff.params import Params

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("src/", "stages/")
OUTPUT_DIRS = ("metrics", "plots", "report", "artifacts")


# ------------------------------------------------------------------------------------------ dvc.yaml, as DVC reads it


@dataclass
class Stage:
    """One expanded stage of dvc.yaml: its script argv and declared deps, params keys and outputs."""

    name: str
    argv: list[str]  # the command without the interpreter: [script, args...]
    deps: list[str]  # file and directory deps, repo-relative
    params: list[str]  # dotted params.yaml keys
    outs: list[str]  # outs, metrics and plots


def stages(repo: Path) -> dict[str, Stage]:
    """The pipeline stages of `repo` with matrix and ${} expanded by DVC itself."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = {}
    with Repo(str(repo)) as r:
        for st in r.index.stages:
            if not getattr(st, "cmd", None):
                continue  # data.dvc and other non-pipeline stages
            deps, params = [], []
            for d in st.deps:
                if isinstance(d, ParamsDependency):
                    assert d.def_path == "params.yaml", f"{st.name}: params from {d.def_path}"
                    params += list(d.params)
                else:
                    deps.append(Path(d.def_path).as_posix())
            argv = shlex.split(st.cmd if isinstance(st.cmd, str) else " ".join(st.cmd))
            assert argv[0] in ("python", "python3") and argv[1].endswith(".py"), \
                f"{st.name}: cmd {st.cmd!r} is not `python <script>.py ...`"
            out[st.name] = Stage(st.name, argv[1:], deps, params,
                                       [Path(o.def_path).as_posix() for o in st.outs])
    return out


def _under(parent: str, child: str, sep: str = "/") -> bool:
    return child == parent or child.startswith(parent + sep)


def _covered(path: str, declared: list[str]) -> bool:
    return any(_under(d.rstrip("/"), path) for d in declared)


# ------------------------------------------------------------------------------------------------- import closure


def _callee(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module an import anywhere in `path` runs (parents included): import, from-import, import_module("...")."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")  # a name may be a submodule
        elif (isinstance(node, ast.Call) and _callee(node.func) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return {".".join(n.split(".")[:i]) for n in names if n for i in range(1, n.count(".") + 2)}


def _module_file(module: str, roots: list[Path]) -> Path | None:
    for root in roots:
        base = root.joinpath(*module.split("."))
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.with_name(base.name + ".py").is_file():
            return base.with_name(base.name + ".py")
    return None


def import_closure(script: Path, repo: Path) -> set[str]:
    """Repo-relative files of the project that running `script` imports, transitively (package __init__s included)."""
    src = repo / "src"
    seen: set[Path] = set()
    todo = [script.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if f.is_relative_to(src):
            roots, package = [src], ".".join(f.relative_to(src).parent.parts)
        else:  # a script: its own directory comes first on sys.path
            roots, package = [f.parent, src], ""
        for mod in imported_modules(f, package):
            g = _module_file(mod, roots)
            if g is not None:
                todo.append(g.resolve())
    return {f.relative_to(repo.resolve()).as_posix() for f in seen}


def declared_code(stage: Stage, repo: Path) -> set[str]:
    """The Python files a stage's deps under src/ and stages/ name (a directory stands for every .py under it)."""
    out = set()
    for d in stage.deps:
        if not d.startswith(CODE_DIRS):
            continue
        p = repo / d
        if p.is_dir():
            out |= {f.relative_to(repo).as_posix() for f in p.rglob("*.py")}
        elif d.endswith(".py") or not p.exists():
            out.add(d)  # a missing path is reported as declared but not imported
    return out


def code_dep_problems(repo: Path) -> list[str]:
    """Per stage: imported files missing from its deps, declared code files it does not import, directory deps."""
    problems = []
    for name, st in stages(repo).items():
        closure = import_closure(repo / st.argv[0], repo)
        declared = declared_code(st, repo)
        missing, extra = sorted(closure - declared), sorted(declared - closure)
        dirs = [d for d in st.deps if d.startswith(CODE_DIRS) and (repo / d).is_dir()]
        if missing or extra or dirs:
            problems.append(f"{name}:\n    add:    {missing}\n    remove: {extra}"
                            + (f"\n    list files instead of the directories {dirs}" if dirs else ""))
    return problems


def test_import_closure_follows_every_kind_of_import(tmp_path):
    """Planted package: module- and function-level imports, submodules named in from-imports, relative imports."""
    files = {
        "src/pkg/__init__.py": "",
        "src/pkg/a.py": "from pkg import b\n",
        "src/pkg/b.py": "def f():\n    from .sub import c\n",
        "src/pkg/sub/__init__.py": "from . import d\n",
        "src/pkg/sub/c.py": "import importlib\nimportlib.import_module('pkg.e')\n",
        "src/pkg/sub/d.py": "",
        "src/pkg/e.py": "import numpy\n",
        "src/pkg/unused.py": "",
        "stages/run.py": "import os\nimport pkg.a\nfrom helper import x\n",
        "stages/helper.py": "x = 1\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert import_closure(tmp_path / "stages/run.py", tmp_path) == set(files) - {"src/pkg/unused.py"}


def test_code_deps_are_exactly_the_import_closure():
    """Every project file a stage's script imports is a dep of the stage, and no other code file is."""
    problems = code_dep_problems(ROOT)
    assert not problems, "dvc.yaml code deps differ from what the stage scripts import:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------------- params keys


def _param_tree(obj=None, prefix: str = "") -> dict[str, list[str]]:
    """Every params key (sections and leaves) -> the leaf keys under it."""
    obj = Params() if obj is None else obj
    out: dict[str, list[str]] = {}
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sub = _param_tree(value, key + ".")
            out.update(sub)
            out[key] = [k for k in sub if k.startswith(key + ".") and sub[k] == [k]]
        else:
            out[key] = [key]
    return out


KEYS = _param_tree()
KEYS["*"] = [k for k, v in KEYS.items() if v == [k]]  # vars(params): everything


def static_param_reads(script: Path) -> set[str]:
    """Params keys a stage script reads, by AST: attribute chains from load_params() through its aliases.

    Covers branches the tiny run does not take. A section used as a value (vars(s), passed to a call) counts
    as reading the whole section; an alias assignment (`ft = p.pair.finetune`) reads nothing by itself.
    """
    tree = ast.parse(script.read_text(), str(script))
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    alias: dict[str, str] = {}

    def chain(node: ast.expr) -> str | None:
        if isinstance(node, ast.Call) and _callee(node.func) == "load_params":
            return ""
        if isinstance(node, ast.Name):
            return alias.get(node.id)
        if isinstance(node, ast.Attribute):
            base = chain(node.value)
            key = None if base is None else f"{base}.{node.attr}" if base else node.attr
            return key if key in KEYS else None
        return None

    def pairs(node: ast.AST):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            t, v = node.targets[0], node.value
            if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple) and len(t.elts) == len(v.elts):
                yield from zip(t.elts, v.elts)
            else:
                yield t, v

    for _ in range(4):  # aliases of aliases
        for node in ast.walk(tree):
            for t, v in pairs(node):
                if isinstance(t, ast.Name) and (key := chain(v)) is not None:
                    alias[t.id] = key
    reads = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute | ast.Name) or isinstance(getattr(node, "ctx", None), ast.Store):
            continue
        key = chain(node)
        up = parent.get(node)
        if not key or (isinstance(up, ast.Attribute) and chain(up) is not None):
            continue  # not params, the root object itself, or part of a longer chain
        if KEYS[key] != [key] and (isinstance(up, ast.Assign) or isinstance(parent.get(up), ast.Assign)):
            continue  # an alias of a section
        if isinstance(node, ast.Name) and isinstance(up, ast.Attribute):
            continue  # alias.method / alias.non_key
        reads.add(key)
    return reads


def _leaves(keys) -> set[str]:
    return {leaf for k in keys for leaf in KEYS.get(k, [k])}


def param_problems(stage: Stage, reads: set[str], also_read: set[str] | None = None) -> list[str]:
    """Keys in `reads` not declared (as the key or a section above it); given `also_read` (keys read in branches
    the run did not take), declared keys read neither in `reads` nor in `also_read`."""
    unknown = sorted(k for k in stage.params if k not in KEYS)
    declared = _leaves(stage.params)
    undeclared = sorted(k for k in reads if not set(KEYS.get(k, [k])) <= declared)
    out = []
    if unknown:
        out.append(f"declares unknown keys {unknown}")
    if undeclared:
        out.append(f"reads undeclared {undeclared}")
    if also_read is not None:
        read = _leaves(reads | also_read)
        unread = sorted(k for k in stage.params if k in KEYS and not set(KEYS[k]) <= read)
        if unread:
            out.append(f"declares {unread} but never reads {sorted(_leaves(unread) - read)}")
    return out


def test_static_param_reads_follow_aliases(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        p = load_params()
        s, f = p.sae, p.features
        ft = p.pair.finetune
        fp = fingerprint([vars(p.extract), s.layers, p.rank])
        if p.pair.tuned.id:
            g = f.n_perm + len(s.layers.copy())
        for s_ in p.transport.sites:
            pass
        lr = ft.lr
    """))
    assert static_param_reads(script) == {"extract", "sae.layers", "rank", "pair.tuned.id", "features.n_perm",
                                          "transport.sites", "pair.finetune.lr"}


def _by_script(spec: dict[str, Stage]) -> dict[str, Stage]:
    """One pseudo-stage per script, declaring the union of the params of the stages that run it.

    Static reads cannot tell apart the stages of one script (models.py base | tuned): they are checked
    against that union; the run-time reads are checked stage by stage.
    """
    out: dict[str, Stage] = {}
    for st in spec.values():
        s = out.setdefault(st.argv[0], Stage(st.argv[0], [st.argv[0]], [], [], []))
        s.params += [k for k in st.params if k not in s.params]
    return out


def test_stage_scripts_read_only_declared_params():
    """Every params key a stage script reads (in any branch) is declared by the stages that run it."""
    problems = []
    for script, st in _by_script(stages(ROOT)).items():
        problems += [f"{script}: {m}" for m in param_problems(st, static_param_reads(ROOT / script))]
    assert not problems, "dvc.yaml params differ from what the stage scripts read:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------- the trace itself


def test_trace_records_params_files_and_commands(tmp_path):
    """A traced run_stage process records the keys read, Python-level file reads / writes / renames, commands."""
    repo = tmp_path / "repo"
    (repo / "in").mkdir(parents=True)
    (repo / "in" / "a.txt").write_text("a")
    (repo / "old.txt").write_text("someone else's")
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "stages").mkdir()
    (repo / "stages/main.py").write_text(textwrap.dedent("""
        import os, subprocess, sys
        from pathlib import Path
        import numpy as np
        from mechdiff.io import run_stage, write_json
        from mechdiff.params import load_params

        def main():
            p = load_params()
            vars(p.extract); p.pair.fairness.enabled
            Path("in/a.txt").read_text()
            np.save("out.npy", np.zeros(2))
            write_json("m/x.json", {"a": 1})  # written to a temporary file, renamed
            os.listdir("in")
            Path("gone").write_text("x"); os.remove("gone")  # its own temporary: neither written nor deleted
            os.remove("old.txt")
            yaml_text = Path("params.yaml").read_text()  # params.yaml read as a file: an undeclared read
            subprocess.run(["git", "--version"], capture_output=True)

        run_stage(main)
    """))
    env = {**os.environ, "MECHDIFF_TRACE": str(tmp_path / "trace")}
    subprocess.run([sys.executable, "stages/main.py", "x"], cwd=repo, env=env, check=True)
    (trace,) = [json.loads(p.read_text()) for p in (tmp_path / "trace").glob("*.json")]
    assert trace["argv"] == ["stages/main.py", "x"]
    assert trace["params"] == ["extract", "pair.fairness.enabled"]
    # load_params' own read of params.yaml is not recorded (DVC tracks it by key); the direct read is
    assert [r for r in trace["read"] if not _is_code(r)] == ["in/a.txt", "params.yaml"]
    assert trace["write"] == ["m/x.json", "out.npy"]
    assert trace["delete"] == ["old.txt"] and [r for r in trace["list"] if not _is_code(r)] == ["in"]
    assert trace["run"] == [["git", "--version"]]


# ------------------------------------------------------------------------------------ the traced tiny pipeline


def _is_code(path: str) -> bool:
    """Python files and the package directories the import system lists: the import closure test covers them."""
    if path in ("src", "stages"):
        return True
    return path.startswith(CODE_DIRS) and (path.endswith((".py", ".pyc")) or "__pycache__" in path
                                           or (ROOT / path / "__init__.py").is_file())


@pytest.fixture(scope="module")
def traced(tiny_repo):
    """(stage specs, {stage: its trace}) of the tiny repo's traced `dvc repro`."""
    from tests.e2e_repo import trace_dir

    spec = stages(tiny_repo)
    traces = [json.loads(p.read_text()) for p in sorted(trace_dir(tiny_repo).glob("*.json"))]
    by_stage = {name: [t for t in traces if t["argv"] == st.argv] for name, st in spec.items()}
    missing = sorted(n for n, ts in by_stage.items() if len(ts) != 1)
    assert not missing, f"stages without exactly one trace (each stage must call mechdiff.io.run_stage): {missing}"
    stray = [t["argv"] for t in traces if not any(t["argv"] == st.argv for st in spec.values())]
    assert not stray, f"traces of processes that are no stage: {stray}"
    return spec, {n: ts[0] for n, ts in by_stage.items()}


def _report(problems: dict[str, list[str]], what: str) -> str:
    lines = [f"{name}:\n    " + "\n    ".join(msgs) for name, msgs in sorted(problems.items()) if msgs]
    return f"{what}:\n" + "\n".join(lines)


@pytest.mark.slow
def test_params_read_are_exactly_the_declared_params(traced, tiny_repo):
    """Keys read at run time are declared; each declared key is read (at run time, or in a branch of the script)."""
    spec, tr = traced
    problems = {name: param_problems(st, set(tr[name]["params"]), static_param_reads(tiny_repo / st.argv[0]))
                for name, st in spec.items()}
    assert not any(problems.values()), _report(problems, "dvc.yaml params differ from the keys the stages read")


@pytest.mark.slow
def test_files_read_are_declared_deps(traced):
    """Every file a stage reads inside the repo (or its package data) is covered by a dep (or its own output)."""
    spec, tr = traced
    problems = {}
    for name, st in spec.items():
        t = tr[name]
        msgs = []
        reads = sorted(p for p in t["read"] if not _is_code(p) and not _covered(p, st.deps + st.outs))
        if reads:
            msgs.append(f"reads undeclared {reads}")
        lists = sorted(p for p in t["list"] if not _is_code(p) and not _covered(p, st.deps + st.outs))
        if lists:
            msgs.append(f"lists undeclared directories {lists}")
        vcs = [cmd for cmd in t["run"] if Path(cmd[0]).name in ("git", "dvc")]
        if vcs:
            msgs.append(f"runs {vcs}: repository state is no declared dep")
        problems[name] = msgs
    assert not any(problems.values()), _report(problems, "stages read what dvc.yaml does not declare")


@pytest.mark.slow
def test_files_written_are_declared_outputs(traced):
    """Every file a stage writes or deletes inside the repo is covered by its outs / metrics / plots."""
    spec, tr = traced
    problems = {}
    for name, st in spec.items():
        bad = sorted(p for p in tr[name]["write"] + tr[name]["delete"] if not _covered(p, st.outs))
        problems[name] = [f"writes undeclared {bad}"] if bad else []
    assert not any(problems.values()), _report(problems, "stages write what dvc.yaml does not declare")


@pytest.mark.slow
def test_no_undeclared_files_in_output_dirs(traced, tiny_repo):
    """After the repro, every file under metrics/, plots/, report/, artifacts/ belongs to a declared output."""
    spec, _ = traced
    outs = [o for st in spec.values() for o in st.outs]
    files = sorted(p.relative_to(tiny_repo).as_posix() for d in OUTPUT_DIRS for p in (tiny_repo / d).rglob("*")
                   if p.is_file())
    assert files, "the tiny repro wrote no outputs"
    stray = [f for f in files if not _covered(f, outs)]
    assert not stray, f"files no stage declares: {stray}"


def test_committed_results_are_declared_outputs():
    """Every file under metrics/ and plots/ of the repository is an output some stage declares."""
    outs = [o for st in stages(ROOT).values() for o in st.outs]
    files = subprocess.run(["git", "ls-files", "metrics", "plots"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    stray = [f for f in files if (ROOT / f).exists() and not _covered(f, outs)]
    assert not stray, f"committed files no stage declares (remove them or declare them): {stray}"


# ------------------------------------------------------------------------------ dvc status follows the imports


def _changed_deps(repo: Path) -> dict[str, set[str]]:
    """Stage -> deps that `dvc status` reports as changed."""
    from tests.e2e_repo import sh

    status = json.loads(sh(["dvc", "status", "--json"], repo).stdout or "{}")
    out: dict[str, set[str]] = {}
    for name, entries in status.items():
        for e in entries:
            if isinstance(e, dict) and "changed deps" in e:
                out.setdefault(name, set()).update(e["changed deps"])
    return out


@pytest.mark.slow
def test_editing_a_module_changes_exactly_the_stages_that_import_it(tiny_repo):
    """Append a comment to a library module: `dvc status` names exactly the stages whose import closure holds it.

    Two modules, chosen from the closures themselves: one imported by the fewest stages, one by the most (short of
    all stages, where such a module exists).
    """
    spec = stages(tiny_repo)
    closures = {name: import_closure(tiny_repo / st.argv[0], tiny_repo) for name, st in spec.items()}
    users: dict[str, set[str]] = {}
    for name, files in closures.items():
        for f in files:
            if f.startswith("src/"):
                users.setdefault(f, set()).add(name)
    by_count = sorted(users, key=lambda f: (len(users[f]), f))
    below_all = [f for f in by_count if len(users[f]) < len(spec)] or by_count
    before = _changed_deps(tiny_repo)
    for module in dict.fromkeys([by_count[0], below_all[-1]]):
        path = tiny_repo / module
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n# edited by the dependency test\n")
            after = _changed_deps(tiny_repo)
        finally:
            path.write_bytes(original)
        changed = {n for n, deps in after.items() if module in deps}
        newly = {n for n, deps in after.items() if deps - before.get(n, set())}
        assert changed == newly == users[module], (
            f"editing {module}: dvc status reports {sorted(newly)}, its importers are {sorted(users[module])}")
    assert _changed_deps(tiny_repo) == before
