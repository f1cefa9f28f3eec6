"""Tests for mechdiff.data.corpus: deterministic default corpora, loading (JSONL and datasets), grouped splits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from mechdiff.data.corpus import (
    MC_SOURCES,
    Prompt,
    check_scored,
    check_splits,
    load_concepts,
    load_corpus,
    load_prompts,
    save_prompts,
    split_prompts,
    stratified_subsample,
    write_default_corpora,
)
from mechdiff.errors import MechdiffError
from tests.data.conftest import records

FILES = ["cultural.jsonl", "control.jsonl", "neutral.jsonl", "traits.jsonl", "concepts.json"]


def _hashes(d: Path) -> dict[str, str]:
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES}


# ---------------------------------------------------------------- default corpora


def test_default_corpora_are_byte_deterministic(data_dir, tmp_path):
    paths = write_default_corpora(tmp_path / "again")
    assert sorted(p.name for p in paths) == sorted([*FILES, "mc_cultural.jsonl", "mc_neutral.jsonl", "math.jsonl",
                                                   "mc_numbers.jsonl"])
    assert _hashes(tmp_path / "again") == _hashes(data_dir)
    for f in FILES:
        raw = (data_dir / f).read_bytes()
        assert b"\r" not in raw and raw.endswith(b"\n")
    # a fresh interpreter with another hash seed writes the same bytes (no set/dict-order dependence)
    code = "import sys; from mechdiff.data.corpus import write_default_corpora as w; w(sys.argv[1])"
    for hs in ("1", "4242"):
        out = tmp_path / f"hs{hs}"
        env = {**os.environ, "PYTHONHASHSEED": hs}
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, timeout=120)
        assert _hashes(out) == _hashes(data_dir)


def test_cultural_and_control_shape(data_dir):
    cult, ctrl = records(data_dir, "cultural.jsonl"), records(data_dir, "control.jsonl")
    assert 400 <= len(cult) <= 600
    assert 0.8 <= len(ctrl) / len(cult) <= 1.25
    for recs, ds in ((cult, "cultural"), (ctrl, "control")):
        assert {r["dataset"] for r in recs} == {ds}
        assert len({r["text"] for r in recs}) == len(recs)  # no duplicate texts
        assert all(r["label"] == -1 and r["trait"] == "" and r["topic"] and r["group"] for r in recs)
        assert len({r["topic"] for r in recs}) >= 8
        groups = Counter(r["group"] for r in recs)
        assert len(groups) >= 80 and max(groups.values()) <= 8
        # varied forms: questions, instructions, completions and statements all present
        forms = Counter(r["form"] for r in recs)
        assert min(forms[f] for f in ("question", "instruction", "completion", "statement")) >= 10
        q = np.mean([r["text"].endswith("?") for r in recs])
        assert 0.25 <= q <= 0.75
        # no single frame dominates: the first three words vary widely
        starts = Counter(" ".join(r["text"].split()[:3]) for r in recs)
        assert starts.most_common(1)[0][1] / len(recs) < 0.08
    # comparable length distributions (words per text)
    lc = np.array([len(r["text"].split()) for r in cult])
    lk = np.array([len(r["text"].split()) for r in ctrl])
    assert abs(lc.mean() - lk.mean()) / lc.mean() < 0.2
    assert abs(np.median(lc) - np.median(lk)) <= 2


def test_control_has_no_cultural_content(data_dir):
    cult, ctrl = records(data_dir, "cultural.jsonl"), records(data_dir, "control.jsonl")
    entities = {r["entity"].lower() for r in cult}
    markers = {"india", "indian", "hindi", "bollywood", "diwali", "sari", "curry", "temple", "raga", "chai"}
    for r in ctrl + records(data_dir, "neutral.jsonl"):
        t = r["text"].lower()
        assert not any(re.search(rf"\b{re.escape(e)}\b", t) for e in entities), r["text"]
        assert not (set(re.findall(r"[a-z]+", t)) & markers), r["text"]
    # while the cultural corpus does mention them
    assert np.mean([any(m in r["text"].lower() for m in [*markers, *entities]) for r in cult]) > 0.95


def test_neutral_corpus(data_dir):
    neu = records(data_dir, "neutral.jsonl")
    assert 120 <= len(neu) <= 200
    texts = {r["text"] for r in neu}
    assert len(texts) == len(neu)
    assert not texts & {r["text"] for r in records(data_dir, "control.jsonl")}
    assert {r["dataset"] for r in neu} == {"neutral"}


# independent marker lexicons: (markers of the trait, markers of its absence); the score = count of the first
# minus count of the second must grow strictly with the label, on average
_MARKERS = {
    "politeness": (r"\b(please|thank|thanks|sorry|kind|kindly|grateful|appreciate|forgive|apologise|mind|could|"
                   r"would|might|possibly|excuse)\b", r"\b(now|just|already|quick)\b"),
    "formality": (r"\b(hereby|kindly|respectfully|regards|sincerely|faithfully|whom|consideration|advised|advise|"
                  r"notify|obliged|correspondence|note|information|aware|inform|dear)\b",
                  r"\b(lol|omg|yo|gonna|gotta|ugh|cant|fyi|hey|hi|just|quick|whatever|super)\b|!!|'s\b|'re\b"),
    "certainty": (r"\b(certain|absolutely|definitely|doubt whatsoever|no question|fact|percent|confident|sure)\b",
                  r"\b(maybe|perhaps|possibly|guess|think|doubt|not sure|no idea|might|who knows|hard to tell|"
                  r"cannot say|seems|probably|likely|as far as i know|fairly|quite)\b"),
    "sentiment_positive": (r"\b(nice|liked|good|enjoyed|lovely|great|happy|delighted|wonderful|treat|loved|best|joy|"
                           r"magnificent|fantastic|brilliant|adored|unforgettable|incredibly|absolutely|smiling|"
                           r"pleasant|happily|better)\b|!", r"\b(list|notes?|talked|took up|spent)\b"),
}


def test_traits_graded_and_balanced(data_dir):
    recs = records(data_dir, "traits.jsonl")
    by = defaultdict(list)
    for r in recs:
        assert r["dataset"] == "trait" and r["label"] in (0, 1, 2, 3)
        by[r["trait"]].append(r)
    assert len(by) >= 3
    for trait, rs in by.items():
        assert len(rs) >= 100
        counts = Counter(r["label"] for r in rs)
        assert max(counts.values()) - min(counts.values()) <= 1, (trait, counts)
        # every group holds the same core at all four intensities
        groups = defaultdict(set)
        for r in rs:
            groups[r["group"]].add(r["label"])
        assert all(v == {0, 1, 2, 3} for v in groups.values())
    for trait, (pos, neg) in _MARKERS.items():
        rs = by[trait]
        score = [[len(re.findall(pos, r["text"].lower())) - len(re.findall(neg, r["text"].lower())) for r in rs
                  if r["label"] == y] for y in range(4)]
        means = [np.mean(s) for s in score]
        assert np.all(np.diff(means) > 0), (trait, means)
        assert means[3] - means[0] >= 2.0, (trait, means)  # a clear gap between absent and very strong
    # the stylistic traits also get more elaborate (longer) at the strong end
    lens = {t: [np.mean([len(r["text"].split()) for r in by[t] if r["label"] == y]) for y in range(4)]
            for t in ("politeness", "formality")}
    assert all(v[3] > v[0] for v in lens.values())


def test_concepts(data_dir):
    c = load_concepts(data_dir)
    parents = c["parents"]
    assert len(parents) >= 8
    seen: dict[str, str] = {}
    for p, spec in parents.items():
        assert len(spec["children"]) >= 2
        union = [w for ws in spec["children"].values() for w in ws]
        assert sorted(spec["words"]) == sorted(union)
        for child, words in spec["children"].items():
            assert len(words) >= 5, (p, child)
            for w in words:
                assert re.fullmatch(r"[a-z]+", w), w
                assert w not in seen, (w, p, seen.get(w))
                seen[w] = p
    assert len(seen) >= 300


# ---------------------------------------------------------------- loading


def test_load_default_corpus(data_dir):
    ps = load_corpus(data_dir)
    assert [p.pid for p in ps] == list(range(len(ps)))
    n = {f: len(records(data_dir, f)) for f in FILES[:4]}
    assert len(ps) == sum(n.values())
    assert Counter(p.dataset for p in ps) == {"cultural": n["cultural.jsonl"], "control": n["control.jsonl"],
                                              "neutral": n["neutral.jsonl"], "trait": n["traits.jsonl"]}
    # pids follow source order, then file order
    assert ps[0].text == records(data_dir, "cultural.jsonl")[0]["text"]
    traits = [p for p in ps if p.dataset == "trait"]
    assert {p.trait for p in traits} >= {"politeness", "formality", "certainty"}
    assert all(p.label in (0, 1, 2, 3) for p in traits)
    assert all(p.split == "" for p in ps)


def test_max_per_dataset(data_dir):
    a = load_corpus(data_dir, max_per_dataset=50, seed=3)
    b = load_corpus(data_dir, max_per_dataset=50, seed=3)
    c = load_corpus(data_dir, max_per_dataset=50, seed=4)
    assert Counter(p.dataset for p in a) == {"cultural": 50, "control": 50, "neutral": 50, "trait": 50}
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in a] != [p.text for p in c]
    assert [p.pid for p in a] == list(range(200))
    full = {p.text: p.pid for p in load_corpus(data_dir)}
    order = [full[p.text] for p in a]
    assert order == sorted(order)  # the subsample keeps the original order
    with pytest.raises(MechdiffError):
        load_corpus(data_dir, max_per_dataset=0)


@pytest.mark.parametrize("seed", range(8))
def test_max_per_dataset_keeps_every_graded_label(data_dir, seed):
    full = Counter((p.trait, p.label) for p in load_corpus(data_dir) if p.dataset == "trait")
    got = Counter((p.trait, p.label) for p in load_corpus(data_dir, max_per_dataset=60, seed=seed)
                  if p.dataset == "trait")
    assert set(got) == set(full)  # every trait keeps grades 0..3
    assert sum(got.values()) == 60
    # the strata are equally large in the default corpus, so a proportional draw differs by at most one
    assert max(got.values()) - min(got.values()) <= 1


def _largest_remainder(counts: list[int], n: int, floor: int) -> list[int]:
    """Reference allocation: `floor` per stratum, then the rest by the largest-remainder (Hamilton) method."""
    from fractions import Fraction

    rest = [c - floor for c in counts]
    share = [Fraction((n - floor * len(counts)) * r, sum(rest)) for r in rest]
    alloc = [floor + int(q) for q in share]
    for j in sorted(range(len(counts)), key=lambda j: -(share[j] - int(share[j])))[: n - sum(alloc)]:
        alloc[j] += 1
    return alloc


def test_stratified_subsample_matches_largest_remainder():
    counts = [50, 30, 13, 5, 2]  # distinct remainders, so the reference needs no tie-break
    strata = [s for s, c in zip("abcde", counts) for _ in range(c)]
    perm = np.random.default_rng(0).permutation(len(strata))
    strata = [strata[i] for i in perm]  # interleaved, as in a real file
    for n in (5, 17, 40, 99):
        keep = stratified_subsample(strata, n, np.random.default_rng(1))
        assert len(keep) == n and len(set(keep.tolist())) == n and list(keep) == sorted(keep)
        got = Counter(strata[i] for i in keep)
        assert [got[s] for s in "abcde"] == _largest_remainder(counts, n, 1), n
    # fewer slots than strata: plain proportional allocation (50/100 * 3 = 1.5 -> 2, 30/100 * 3 = 0.9 -> 1)
    keep = stratified_subsample(strata, 3, np.random.default_rng(1))
    got = Counter(strata[i] for i in keep)
    assert [got[s] for s in "abcde"] == _largest_remainder(counts, 3, 0) == [2, 1, 0, 0, 0]
    # a budget above the size keeps everything; the draw is seeded
    assert list(stratified_subsample(strata, 500, np.random.default_rng(1))) == list(range(100))
    a, b = (stratified_subsample(strata, 40, np.random.default_rng(s)) for s in (1, 2))
    assert list(a) == list(stratified_subsample(strata, 40, np.random.default_rng(1))) and list(a) != list(b)


def test_empty_source_is_rejected_by_name(data_dir, tmp_path):
    (tmp_path / "blank.jsonl").write_text("")
    sources = [{"name": "cultural", "path": str(data_dir / "cultural.jsonl")},
               {"name": "extra", "path": "blank.jsonl"}]
    msg = _err(load_corpus, tmp_path, sources, match="has no records")
    assert str(tmp_path / "blank.jsonl") in msg and "data.sources" in msg
    # the only source empty: the message names that file, not the data directory
    msg = _err(load_corpus, tmp_path, sources[1:], match="has no records")
    assert "blank.jsonl" in msg
    (tmp_path / "one.jsonl").write_text('{"text": "hi"}\n')
    _err(load_corpus, tmp_path, [{"name": "one", "path": "one.jsonl", "n": 0}], match="one.jsonl")


def test_corpus_fragments_are_package_data(tmp_path):
    import tomllib

    root = Path(__file__).resolve().parents[2]
    pkg = root / "src" / "mechdiff" / "data"
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mechdiff.data"]
    shipped = {f for g in globs for f in pkg.glob(g)}
    assert shipped == set((pkg / "corpora").glob("*.json")) and len(shipped) == 9
    if (root / "data").is_dir():  # the materialised data/ (what data.dvc records) is rebuilt byte for byte
        write_default_corpora(tmp_path)
        assert _hashes(tmp_path) == _hashes(root / "data")


def test_local_sources_and_fields(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"q": "one?", "y": 2}, {"q": "two?", "y": 0.0}]) + "\n")
    ps = load_corpus(tmp_path, [{"name": "mine", "path": "mine.jsonl", "text_field": "q", "label_field": "y",
                                 "trait": "t"},
                                {"name": "abs", "path": str(f), "text_field": "q", "label_field": None, "n": 1}])
    assert [(p.pid, p.text, p.dataset, p.label, p.trait) for p in ps] == [
        (0, "one?", "mine", 2, "t"), (1, "two?", "mine", 0, "t"), (2, "one?", "abs", -1, "")]
    assert ps[0].group != ps[1].group  # no group field: each record is its own group


def test_hf_code_path_on_local_json(tmp_path):
    rows = [{"question": f"what is {i} plus {i}?", "answer": i % 3} for i in range(12)]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = {"name": "qa", "hf": "json", "data_files": "qa.jsonl", "split": "train", "text_field": "question",
           "label_field": "answer", "n": 10, "cache_dir": str(tmp_path / "cache")}
    ps = load_corpus(tmp_path, [src])
    assert [p.text for p in ps] == [r["question"] for r in rows[:10]]
    assert [p.label for p in ps] == [r["answer"] for r in rows[:10]]
    assert {p.dataset for p in ps} == {"qa"}
    with pytest.raises(MechdiffError, match="no column"):
        load_corpus(tmp_path, [{**src, "text_field": "prompt"}])
    with pytest.raises(MechdiffError, match="not an integer"):
        load_corpus(tmp_path, [{**src, "label_field": "question"}])
    neg = tmp_path / "neg.jsonl"  # -1 is "no label"; a grade below it is an error, not silently unlabelled
    neg.write_text('{"text": "a", "label": -1}\n{"text": "b", "label": -2}\n')
    with pytest.raises(MechdiffError, match="record 2: label -2 is negative"):
        load_corpus(tmp_path, [{"name": "neg", "path": "neg.jsonl"}])
    with pytest.raises(MechdiffError, match="missing.jsonl of source 'qa' not found: fix its data_files in data.sources"):
        load_corpus(tmp_path, [{**src, "data_files": "missing.jsonl"}])
    with pytest.raises(MechdiffError, match="of source 'mine' not found: fix its path in data.sources"):
        load_corpus(tmp_path, [{"name": "mine", "path": "nowhere.jsonl"}])
    with pytest.raises(MechdiffError, match="make data"):  # a project corpus missing from data/: make data makes it
        load_corpus(tmp_path / "empty", ["neutral"])


def test_unreachable_hub_dataset(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MechdiffError) as e:
        load_corpus(tmp_path, [{"name": "gsm8k", "hf": "openai/gsm8k", "config": "main", "split": "train",
                                "text_field": "question", "label_field": None, "n": 300}])
    msg = str(e.value)
    assert "\n" not in msg and "gsm8k.jsonl" in msg and "to_json" in msg


def _err(fn, *args, match: str | None = None, **kwargs) -> str:
    with pytest.raises(MechdiffError, match=match) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg  # one actionable line
    return msg


def test_load_errors(tmp_path):
    assert "dvc pull data.dvc" in _err(load_corpus, tmp_path, match="make data")
    (tmp_path / "empty.jsonl").write_text("\n")
    _err(load_corpus, tmp_path, [{"name": "e", "path": "empty.jsonl"}], match="empty")
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"label": 1}\n')
    _err(load_corpus, tmp_path, [{"name": "n", "path": "notext.jsonl"}], match="no text")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    _err(load_corpus, tmp_path, [{"name": "b", "path": "bad.jsonl"}], match="bad.jsonl:2")
    # a Latin-1 file: the line and the byte, not a UnicodeDecodeError traceback
    (tmp_path / "latin.jsonl").write_bytes('{"text": "fine"}\n{"text": "Caf\u00e9 au lait"}\n'.encode("latin-1"))
    _err(load_corpus, tmp_path, [{"name": "l", "path": "latin.jsonl"}],
         match=r"latin\.jsonl:2 is not UTF-8 \(byte 0xe9, byte 14 of the line\): re-save")
    _err(load_corpus, tmp_path, [{"name": "x"}])
    _err(load_corpus, tmp_path, [{"name": "x", "path": "a.jsonl", "hf": "json"}])
    _err(load_corpus, tmp_path, [])
    _err(load_concepts, tmp_path, match="make data")
    (tmp_path / "concepts.json").write_text('{"parents": {"animal": {"children": {"bird": []}}}}')
    _err(load_concepts, tmp_path, match="animal")
    (tmp_path / "concepts.json").write_bytes(b'{"parents": {"caf\xe9": {}}}')
    _err(load_concepts, tmp_path, match=r"concepts\.json is not UTF-8 \(byte 0xe9")


# ---------------------------------------------------------------- splits


def _by_split(ps: list[Prompt]) -> dict[str, str]:
    return {p.group: p.split for p in ps}


def test_split_grouped_stratified_deterministic(data_dir):
    ps = load_corpus(data_dir)
    fr = (0.6, 0.2, 0.2)
    a = split_prompts(ps, fr, seed=0)
    assert [p.pid for p in a] == [p.pid for p in ps] and [p.text for p in a] == [p.text for p in ps]
    assert all(p.split == "" for p in ps)  # inputs untouched
    # groups never straddle splits
    seen = defaultdict(set)
    for p in a:
        seen[p.group].add(p.split)
    assert all(len(v) == 1 for v in seen.values())
    # fractions approximately respected within every dataset
    for ds in {p.dataset for p in ps}:
        sub = [p for p in a if p.dataset == ds]
        got = np.array([np.mean([p.split == s for p in sub]) for s in ("train", "val", "test")])
        assert np.abs(got - fr).max() < 0.05, (ds, got)
    # deterministic under the seed, different for another seed
    assert [p.split for p in split_prompts(ps, fr, seed=0)] == [p.split for p in a]
    assert [p.split for p in split_prompts(ps, fr, seed=1)] != [p.split for p in a]
    # the assignment does not depend on the input order
    rev = split_prompts(ps[::-1], fr, seed=0)
    assert {p.pid: p.split for p in rev} == {p.pid: p.split for p in a}


def test_split_edge_cases():
    ps = [Prompt(pid=i, text=f"t{i}", dataset="d" if i < 60 else "e", group=f"g{i // 3}" if i % 2 else "")
          for i in range(100)]
    out = split_prompts(ps, (1.0, 0.0, 0.0), seed=5)
    assert {p.split for p in out} == {"train"}
    out = split_prompts(ps, (0.5, 0.0, 0.5), seed=5)
    assert {p.split for p in out} == {"train", "test"}
    # empty groups are singletons; named groups stay together
    seen = defaultdict(set)
    for p in out:
        if p.group:
            seen[p.group].add(p.split)
    assert all(len(v) == 1 for v in seen.values())
    for bad in ((0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1), (float("nan"), 0.5, 0.5)):
        with pytest.raises(MechdiffError):
            split_prompts(ps, bad, seed=0)
    with pytest.raises(MechdiffError):
        split_prompts([], (0.8, 0.1, 0.1), seed=0)
    # every dataset needs a prompt in each split with a share: one prompt leaves two splits empty
    check_splits(split_prompts(ps, (0.6, 0.2, 0.2), seed=5), (0.6, 0.2, 0.2))
    check_splits(out, (0.5, 0.0, 0.5))  # val has no share: an empty val split is expected
    lone = split_prompts([*ps, Prompt(pid=100, text="only one", dataset="solo")], (0.6, 0.2, 0.2), seed=5)
    with pytest.raises(MechdiffError, match=r"^data.sources: dataset 'solo' has 1 prompt.*split empty") as e:
        check_splits(lone, (0.6, 0.2, 0.2))
    assert sum(s in str(e.value) for s in ("train", "val", "test")) == 2


def test_save_load_prompts_round_trip(tmp_path, data_dir):
    ps = split_prompts(load_corpus(data_dir, max_per_dataset=20, seed=0), (0.8, 0.1, 0.1), seed=0)
    ps.append(Prompt(pid=len(ps), text="unicode: caf\u00e9 \u0926\u093f\u0935\u093e\u0932\u0940", dataset="x"))
    path = tmp_path / "sub" / "prompts.jsonl"
    save_prompts(path, ps)
    assert load_prompts(path) == ps
    with pytest.raises(MechdiffError):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "no pid"}\n')
    with pytest.raises(MechdiffError):
        load_prompts(tmp_path / "bad.jsonl")


def test_math_corpus_answers_are_right_and_named_sources_load(data_dir):
    import re as _re

    from mechdiff.data.corpus import EXTRA_SOURCES, default_records

    recs = default_records()
    math, mc = recs["math.jsonl"], recs["mc_numbers.jsonl"]
    assert len(math) == 384 and len({r["text"] for r in math}) == 384
    assert len({r["form"] for r in math}) == 24
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    checked = 0
    for r in math:  # the reference is the right number for the plain arithmetic forms
        m = _re.fullmatch(r"What is (\d+) (\+|-|times) (\d+)\?", r["text"])
        if m:
            a, op, b = int(m[1]), m[2], int(m[3])
            want = ops[{"+": "plus", "-": "minus", "times": "times"}[op]](a, b)
            assert r["reference"] == f"The answer is {want}."
            checked += 1
    assert checked >= 48
    assert all(r["reference"].startswith("The answer is ") for r in math)
    assert len(mc) == 72 and all(q["choices"][q["answer"]] in q["reference"] for q in mc)
    assert not {q["text"] for q in mc} & {r["text"] for r in math}  # no test question is a training problem
    names = [s["name"] for s in EXTRA_SOURCES]
    loaded = load_corpus(data_dir, ["cultural", *names])
    assert {p.dataset for p in loaded} == {"cultural", "math"}
    assert all(p.reference for p in loaded if p.dataset == "math")
    with pytest.raises(MechdiffError, match="not a corpus of the project"):
        load_corpus(data_dir, ["cultural", "physics"])


def test_cultural_regions_and_corruptions(tmp_path):
    from mechdiff.data.corpus import (
        CORRUPTIONS,
        Prompt,
        _fragments,
        corruptions,
        cultural_entities,
        default_records,
        load_prompts,
        save_prompts,
    )

    recs = default_records()
    table = cultural_entities()
    assert all(r["region"] == table[r["group"]]["region"] for r in recs["cultural.jsonl"])
    assert not any("region" in r for r in recs["control.jsonl"])
    assert len({r["region"] for r in recs["cultural.jsonl"]} - {"pan-Indian"}) >= 3
    save_prompts(tmp_path / "p.jsonl", [Prompt(0, "x", "control"), Prompt(1, "y", "cultural", region="South")])
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert "region" not in lines[0] and '"region": "South"' in lines[1]
    assert [q.region for q in load_prompts(tmp_path / "p.jsonl")] == ["", "South"]
    r = recs["cultural.jsonl"][5]
    c = corruptions(r["text"], r["group"], seed=3)
    assert list(c) == list(CORRUPTIONS) and c == corruptions(r["text"], r["group"], seed=3)
    other = {n for n, _ in _fragments("counterfactual")["topics"][r["topic"]]}
    assert any(n in c["counterfactual"] for n in other) and r["entity"] not in c["counterfactual"]
    assert r["entity"] not in c["entity"] and r["entity"] in c["paraphrase"] and c["paraphrase"] != r["text"]


def test_scored_set_without_scorable_records_is_rejected(data_dir, tmp_path):
    """A scored set whose answers lost their options (no choices, no reference) is an error, not silently empty."""
    evals = load_corpus(data_dir, MC_SOURCES)
    check_scored(evals)  # the shipped sets are all scorable
    recs = [json.loads(line) for line in (data_dir / "mc_neutral.jsonl").read_text().splitlines()]
    (tmp_path / "mc_neutral.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "choices"}) + "\n" for r in recs))
    broken = load_corpus(tmp_path, [{"name": "mc_neutral", "path": "mc_neutral.jsonl"}])
    assert len(broken) == len(recs) and not any(q.choices or q.reference for q in broken)
    with pytest.raises(MechdiffError, match="'mc_neutral' has no record with choices"):
        check_scored([*(q for q in evals if q.dataset != "mc_neutral"), *broken])
    # one scorable record is enough (a set may mix free-text and scored records)
    fixed = dataclasses.replace(broken[0], choices=["yes", "no"], answer=0)
    check_scored([fixed, *broken[1:]])
