"""Prompt corpora: write the default corpora, load corpora (local JSONL or `datasets`), grouped seeded splits.

The default corpora are composed from the hand-written fragments in the package data files
`mechdiff/data/corpora/*.json` (see the README there) with a fixed seed, so `write_default_corpora` is a pure
function of the package (byte-identical files on every machine).
Chat rendering and the decision position live in `mechdiff.model.tokens`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mechdiff.errors import MechdiffError

#: the files `write_default_corpora` writes and `load_corpus(sources=None)` reads, in pid order
DEFAULT_SOURCES: list[dict[str, Any]] = [
    {"name": "cultural", "path": "cultural.jsonl"},
    {"name": "control", "path": "control.jsonl"},
    {"name": "neutral", "path": "neutral.jsonl"},
    {"name": "trait", "path": "traits.jsonl"},
]
CONCEPTS_FILE = "concepts.json"
TRAITS = ("politeness", "formality", "certainty", "sentiment_positive")
SPLITS = ("train", "val", "test")

_GEN_SEED = 1729  # the only randomness of the default corpora
_INSTRUCTION_VERBS = ("write", "describe", "explain", "tell", "give", "list", "plan", "compare", "suggest",
                      "name", "recommend", "imagine", "narrate", "as", "in")
_MISSING_HINT = "run `make data` (or `dvc pull data.dvc`) to create the corpora"


@dataclass
class Prompt:
    """One prompt of the corpus: dense id, text, dataset, split, group (shares a split), graded label, trait."""

    pid: int
    text: str
    dataset: str
    split: str = ""
    group: str = ""
    label: int = -1
    trait: str = ""


# ---------------------------------------------------------------- default corpora


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _form(text: str) -> str:
    """Rough form of a prompt: question, instruction, completion (unfinished) or statement."""
    if text.endswith("?"):
        return "question"
    if not text.endswith((".", "!", "?")):
        return "completion"
    if text.split()[0].lower().strip(",") in _INSTRUCTION_VERBS:
        return "instruction"
    return "statement"


@cache
def _fragments(name: str) -> Any:
    """One package data file of corpus fragments, `mechdiff/data/corpora/<name>.json`."""
    return json.loads(resources.files("mechdiff.data").joinpath("corpora", f"{name}.json").read_text("utf-8"))


def _topic_records(topics: dict[str, dict[str, list]], generic: list[str], dataset: str, rng: random.Random,
                   n_topic_frames: int = 3, n_generic: int = 1) -> list[dict[str, Any]]:
    """Compose `n_topic_frames + n_generic` prompts per entity, each from a different frame."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for topic, spec in topics.items():
        entities = spec["entities"]
        for name, details in entities:
            others = [e[0] for e in entities if e[0] != name]
            frames = rng.sample(spec["frames"], n_topic_frames) + rng.sample(generic, n_generic)
            k = rng.randrange(len(details))
            for frame in frames:
                detail = details[k % len(details)]
                if "{detail}" in frame:
                    k += 1
                text = frame.format(name=name, Name=_cap(name), detail=detail, other=rng.choice(others))
                if text in seen:
                    continue
                seen.add(text)
                out.append({"text": text, "dataset": dataset, "group": f"{dataset}:{_slug(name)}", "label": -1,
                            "trait": "", "topic": topic, "entity": name, "form": _form(text)})
    return out


def _neutral_records(rng: random.Random, per_act: int = 2) -> list[dict[str, Any]]:
    out = []
    frag = _fragments("neutral")
    for i, act in enumerate(frag["acts"]):
        for frame in rng.sample(frag["frames"], per_act):
            text = frame.format(act=act, Act=_cap(act))
            out.append({"text": text, "dataset": "neutral", "group": f"neutral:{i:03d}", "label": -1, "trait": "",
                        "topic": "everyday", "form": _form(text)})
    return out


def _trait_records(rng: random.Random) -> list[dict[str, Any]]:
    """Graded sentences: every core sentence at every intensity 0..3 (minimal sets share a group)."""
    frag = _fragments("traits")
    out = []
    for trait in TRAITS:
        cores, levels = frag[trait]["cores"], frag[trait]["levels"]
        for i, core in enumerate(cores):
            for label, templates in enumerate(levels):
                tpl = rng.choice(templates)
                if isinstance(core, list):  # [casual wording, formal wording]
                    text = tpl.format(casual=core[0], formal=core[1])
                else:
                    text = tpl.format(core=core, Core=_cap(core))
                out.append({"text": text, "dataset": "trait", "group": f"trait:{trait}:{i:03d}", "label": label,
                            "trait": trait, "topic": trait})
    return out


def default_concepts() -> dict:
    """The concept hierarchy: {"parents": {parent: {"words": [...], "children": {child: [...]}}}}."""
    parents = {}
    for parent, children in _fragments("concepts").items():
        words = [w for ws in children.values() for w in ws]
        parents[parent] = {"words": words, "children": {c: list(ws) for c, ws in children.items()}}
    return {"parents": parents}


def default_records() -> dict[str, list[dict[str, Any]]]:
    """The records of each default corpus file (deterministic: a fixed seed per file)."""
    cultural, control = _fragments("cultural"), _fragments("control")
    return {
        "cultural.jsonl": _topic_records(cultural["topics"], cultural["generic_frames"], "cultural",
                                         random.Random(_GEN_SEED)),
        "control.jsonl": _topic_records(control["topics"], control["generic_frames"], "control",
                                        random.Random(_GEN_SEED + 1)),
        "neutral.jsonl": _neutral_records(random.Random(_GEN_SEED + 2)),
        "traits.jsonl": _trait_records(random.Random(_GEN_SEED + 3)),
    }


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def write_default_corpora(data_dir: str | Path) -> list[Path]:
    """Write cultural / control / neutral / traits JSONL and concepts.json into `data_dir` (byte-deterministic)."""
    out_dir = Path(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, recs in default_records().items():
        p = out_dir / name
        _write_text(p, "".join(json.dumps(r, sort_keys=True, ensure_ascii=True) + "\n" for r in recs))
        paths.append(p)
    p = out_dir / CONCEPTS_FILE
    _write_text(p, json.dumps(default_concepts(), sort_keys=True, ensure_ascii=True, indent=2) + "\n")
    paths.append(p)
    return paths


# ---------------------------------------------------------------- loading


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise MechdiffError(f"corpus file {path} not found: {_MISSING_HINT}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MechdiffError(f"{path}:{n} is not valid JSON ({e.msg}): fix or regenerate the file") from e
            if not isinstance(rec, dict):
                raise MechdiffError(f"{path}:{n} is not a JSON object: each line must be {{\"text\": ...}}")
            rows.append(rec)
    return rows


def _resolve(p: str | Path, data_dir: Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else data_dir / p


def _read_hf(src: dict[str, Any], data_dir: Path) -> list[dict[str, Any]]:
    """Rows of a `datasets.load_dataset` source (hub id, or "json"/"parquet"/"csv" with data_files)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise MechdiffError("the `datasets` package is needed for hf sources: pip install datasets") from e
    hf, name = src["hf"], src["name"]
    kwargs: dict[str, Any] = {"split": src.get("split", "train")}
    if src.get("data_files") is not None:
        df = src["data_files"]
        if isinstance(df, dict):
            kwargs["data_files"] = {k: [str(_resolve(x, data_dir)) for x in (v if isinstance(v, list) else [v])]
                                    for k, v in df.items()}
            files = [f for v in kwargs["data_files"].values() for f in v]
        else:
            files = [str(_resolve(x, data_dir)) for x in (df if isinstance(df, list) else [df])]
            kwargs["data_files"] = files
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise MechdiffError(f"data file {missing[0]} of source {name!r} not found: {_MISSING_HINT}")
    if src.get("cache_dir") is not None:
        kwargs["cache_dir"] = str(src["cache_dir"])
    try:
        ds = datasets.load_dataset(hf, src.get("config"), **kwargs)
    except Exception as e:
        raise MechdiffError(
            f"cannot load dataset {hf!r} for source {name!r} ({_one_line(e)}); without network, run "
            f"datasets.load_dataset({hf!r}).to_json('{name}.jsonl') on a connected machine, copy it into data/ and "
            f"use {{\"name\": \"{name}\", \"path\": \"{name}.jsonl\"}}"
        ) from e
    text_field = src.get("text_field", "text")
    label_field = src.get("label_field")
    for field in (text_field, label_field):
        if field is not None and field not in ds.column_names:
            raise MechdiffError(f"source {name!r} has no column {field!r}; columns: {', '.join(ds.column_names)}")
    n = src.get("n")
    if n is not None:
        ds = ds.select(range(min(int(n), len(ds))))
    texts = ds[text_field]
    labels = ds[label_field] if label_field is not None else [None] * len(texts)
    return [{"text": t, "label": y} for t, y in zip(texts, labels)]


def _to_label(v: Any, where: str) -> int:
    if v is None:
        return -1
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or f != int(f):
        raise MechdiffError(f"{where}: label {v!r} is not an integer: set label_field to an integer column or null")
    return int(f)


def _source_prompts(src: Any, data_dir: Path) -> list[Prompt]:
    if not isinstance(src, dict) or not isinstance(src.get("name"), str) or not src["name"]:
        raise MechdiffError(f"corpus source {src!r} needs a non-empty \"name\" and a \"path\" or \"hf\" key")
    name = src["name"]
    if ("path" in src) == ("hf" in src):
        raise MechdiffError(f"corpus source {name!r} needs exactly one of \"path\" (local JSONL) or \"hf\"")
    if "path" in src:
        path = _resolve(src["path"], data_dir)
        rows = _read_jsonl(path)
        where = str(path)
        text_field = src.get("text_field", "text")
        label_field = src.get("label_field", "label")
        n = src.get("n")
        if n is not None:
            rows = rows[: int(n)]
    else:
        rows = _read_hf(src, data_dir)
        where, text_field, label_field = f"source {name!r}", "text", "label"
    if not rows:
        origin = where if "path" in src else f"hf {src['hf']!r}"
        raise MechdiffError(f"corpus source {name!r} ({origin}) has no records: fill it or remove it from data.sources")
    out = []
    for i, rec in enumerate(rows):
        text = rec.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise MechdiffError(f"{where}: record {i} has no text in field {text_field!r}: fix the record or set "
                                f"text_field")
        dataset = str(rec.get("dataset") or name)
        label = _to_label(rec.get(label_field) if label_field else None, f"{where} record {i}")
        group = str(rec.get("group") or f"{name}:{i}")
        trait = str(rec.get("trait") or src.get("trait") or "")
        out.append(Prompt(pid=-1, text=text, dataset=dataset, group=group, label=label, trait=trait))
    return out


def load_corpus(data_dir: str | Path, sources: list[dict] | None = None, *, max_per_dataset: int | None = None,
                seed: int = 0) -> list[Prompt]:
    """Load prompts from local JSONL files and/or `datasets` sources, with dense pids in source/file order.

    A source is `{"name", "path"}` (JSONL relative to `data_dir` or absolute; optional `text_field`,
    `label_field`, `n`) or `{"name", "hf", "config", "split", "data_files", "text_field", "label_field", "n"}`
    (first `n` rows). A record's `dataset` field wins over the source name. `max_per_dataset` keeps a seeded
    subset of each dataset (in its original order), stratified by (trait, label) so every graded label of every
    trait stays when the budget allows. A source without records is an error naming it.
    """
    data_dir = Path(data_dir)
    sources = DEFAULT_SOURCES if sources is None else sources
    if not isinstance(sources, list | tuple) or not sources:
        raise MechdiffError("no corpus sources given: pass a list of {\"name\", \"path\"} or {\"name\", \"hf\"} dicts")
    if max_per_dataset is not None and (not isinstance(max_per_dataset, int) or max_per_dataset < 1):
        raise MechdiffError(f"max_per_dataset must be a positive integer or None, got {max_per_dataset!r}")
    prompts: list[Prompt] = []
    for src in sources:
        prompts.extend(_source_prompts(src, data_dir))
    if max_per_dataset is not None:
        by_ds: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            by_ds.setdefault(p.dataset, []).append(i)
        rng = np.random.default_rng(seed)
        keep: list[int] = []
        for ds in sorted(by_ds):
            idx = np.asarray(by_ds[ds])
            strata = [(prompts[i].trait, prompts[i].label) for i in idx]
            keep.extend(idx[stratified_subsample(strata, max_per_dataset, rng)].tolist())
        prompts = [prompts[i] for i in sorted(keep)]
    return [replace(p, pid=i) for i, p in enumerate(prompts)]


def source_datasets(data_dir: str | Path, sources: list[dict] | None = None) -> set[str]:
    """The dataset names the sources provide, checking that every local file exists and has records.

    Hub (`hf`) sources are not fetched: each counts as the dataset of its name, as `load_corpus` loads it.
    """
    data_dir = Path(data_dir)
    names: set[str] = set()
    for src in DEFAULT_SOURCES if sources is None else sources:
        if isinstance(src, dict) and "hf" in src and "path" not in src and isinstance(src.get("name"), str):
            names.add(src["name"])
        else:
            names.update(p.dataset for p in _source_prompts(src, data_dir))
    return names


def stratified_subsample(strata: Sequence[Any], n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded subsample of at most `n` items, proportional to the strata (sortable keys).

    Every stratum keeps at least one item when `n` allows it (`n` >= the number of strata); the rest of the
    budget is shared in proportion to the strata's remaining sizes by largest remainder (ties broken by `rng`).
    Written here because scikit-learn's stratified splitters may drop a small stratum entirely.
    """
    code = {s: k for k, s in enumerate(sorted(set(strata)))}
    inv = np.asarray([code[s] for s in strata], dtype=np.int64)
    counts = np.bincount(inv, minlength=len(code))
    if n >= len(inv):
        return np.arange(len(inv))
    floor = np.ones_like(counts) if n >= len(counts) else np.zeros_like(counts)
    share = (n - floor.sum()) * (counts - floor) / (counts - floor).sum()
    alloc = floor + np.floor(share).astype(np.int64)
    order = rng.permutation(len(counts))
    frac = (share - np.floor(share))[order]
    alloc[order[np.argsort(-frac, kind="stable")[: n - alloc.sum()]]] += 1
    keep = [rng.choice(np.flatnonzero(inv == k), size=a, replace=False) for k, a in enumerate(alloc) if a]
    return np.sort(np.concatenate(keep))


# ---------------------------------------------------------------- splits


def split_prompts(prompts: list[Prompt], fractions: tuple[float, float, float], seed: int) -> list[Prompt]:
    """Seeded train/val/test split, grouped by `group` and stratified by dataset; returns copies in input order.

    Within each dataset the groups are shuffled and laid end to end; a group goes to the split whose share of
    the dataset contains the group's midpoint. A group spanning datasets belongs to the dataset of its first
    prompt. Prompts with an empty group are their own group.
    """
    fr = tuple(float(f) for f in fractions) if isinstance(fractions, Sequence) else ()
    if len(fr) != 3 or not all(math.isfinite(f) and f >= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise MechdiffError(f"split fractions must be three numbers >= 0 summing to 1 (train, val, test), got "
                            f"{fractions!r}")
    if not prompts:
        raise MechdiffError("no prompts to split: the corpus is empty")
    keys = [p.group if p.group else f"\x00{i}" for i, p in enumerate(prompts)]
    size: dict[str, int] = {}
    home: dict[str, str] = {}
    for k, p in zip(keys, prompts):
        size[k] = size.get(k, 0) + 1
        home.setdefault(k, p.dataset)
    by_ds: dict[str, list[str]] = {}
    for k, ds in home.items():
        by_ds.setdefault(ds, []).append(k)
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for ds in sorted(by_ds):
        groups = sorted(by_ds[ds])
        total = sum(size[g] for g in groups)
        b1, b2 = fr[0] * total, (fr[0] + fr[1]) * total
        cum = 0.0
        for j in rng.permutation(len(groups)):
            g = groups[j]
            mid = cum + size[g] / 2
            assign[g] = SPLITS[0] if mid < b1 else SPLITS[1] if mid < b2 else SPLITS[2]
            cum += size[g]
    return [replace(p, split=assign[k]) for k, p in zip(keys, prompts)]


# ---------------------------------------------------------------- prompt files


def save_prompts(path: str | Path, prompts: list[Prompt]) -> None:
    """Write prompts as JSONL (one object per line: pid, text, dataset, split, group, label, trait)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in prompts))


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read prompts written by `save_prompts`."""
    path = Path(path)
    if not path.is_file():
        raise MechdiffError(f"prompts file {path} not found: run the prepare stage (`dvc repro prepare`) first")
    names = {f.name for f in fields(Prompt)}
    out = []
    for n, rec in enumerate(_read_jsonl(path), 1):
        if not {"pid", "text", "dataset"} <= rec.keys():
            raise MechdiffError(f"{path}: record {n} lacks pid/text/dataset: regenerate it with save_prompts")
        p = Prompt(**{k: v for k, v in rec.items() if k in names})
        p.pid, p.label = int(p.pid), int(p.label)
        out.append(p)
    if not out:
        raise MechdiffError(f"prompts file {path} is empty: rerun the prepare stage")
    return out


def load_concepts(data_dir: str | Path) -> dict:
    """The concept hierarchy of data_dir/concepts.json, validated: {"parents": {p: {"words", "children"}}}."""
    path = Path(data_dir) / CONCEPTS_FILE
    if not path.is_file():
        raise MechdiffError(f"concept file {path} not found: {_MISSING_HINT}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MechdiffError(f"{path} is not valid JSON ({e.msg}): regenerate it with `make data`") from e
    parents = obj.get("parents") if isinstance(obj, dict) else None
    if not isinstance(parents, dict) or not parents:
        raise MechdiffError(f"{path} needs a non-empty \"parents\" object: regenerate it with `make data`")
    for name, spec in parents.items():
        children = spec.get("children") if isinstance(spec, dict) else None
        if not isinstance(children, dict) or not children or not all(
            isinstance(ws, list) and ws and all(isinstance(w, str) and w for w in ws) for ws in children.values()
        ):
            raise MechdiffError(f"{path}: parent {name!r} needs \"children\" mapping names to non-empty word lists")
        if not isinstance(spec.get("words"), list) or not spec["words"]:
            spec["words"] = [w for ws in children.values() for w in ws]
    return obj
