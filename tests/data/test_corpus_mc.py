"""Tests for the multiple-choice corpora of mechdiff.data.corpus and the choices/answer/reference fields."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from mechdiff.data.corpus import (
    DEFAULT_SOURCES,
    MC_SOURCES,
    N_CHOICES,
    Prompt,
    _fragments,
    load_corpus,
    load_prompts,
    save_prompts,
    split_prompts,
    write_default_corpora,
)
from mechdiff.errors import MechdiffError
from tests.data.conftest import records

MC_FILES = ["mc_cultural.jsonl", "mc_neutral.jsonl", "mc_numbers.jsonl"]


def _hashes(d: Path, files: list[str]) -> dict[str, str]:
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in files}


def _err(fn, *args, match: str | None = None, **kwargs) -> str:
    with pytest.raises(MechdiffError, match=match) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg  # one actionable line
    return msg


# ---------------------------------------------------------------- the default multiple-choice corpora


def test_mc_sources_are_separate_from_the_extraction_corpus():
    assert [s["name"] for s in DEFAULT_SOURCES] == ["cultural", "control", "neutral", "trait"]
    assert MC_SOURCES == [{"name": "mc_cultural", "path": "mc_cultural.jsonl"},
                          {"name": "mc_neutral", "path": "mc_neutral.jsonl"},
                          {"name": "mc_numbers", "path": "mc_numbers.jsonl"}]
    # mc_numbers sorts after mc_neutral, so adding it left the seeded splits of the other two as they were
    assert sorted(s["name"] for s in MC_SOURCES) == [s["name"] for s in MC_SOURCES]


def test_mc_files_byte_deterministic(data_dir, tmp_path):
    write_default_corpora(tmp_path / "again")
    assert _hashes(tmp_path / "again", MC_FILES) == _hashes(data_dir, MC_FILES)
    for f in MC_FILES:
        raw = (data_dir / f).read_bytes()
        assert raw.isascii() and b"\r" not in raw and raw.endswith(b"\n")
    code = "import sys; from mechdiff.data.corpus import write_default_corpora as w; w(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "777"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "hs")], check=True, env=env, timeout=120)
    assert _hashes(tmp_path / "hs", MC_FILES) == _hashes(data_dir, MC_FILES)


@pytest.mark.parametrize("name,lo,hi", [("mc_cultural.jsonl", 300, 420), ("mc_neutral.jsonl", 300, 420)])
def test_mc_shape(data_dir, name, lo, hi):
    recs = records(data_dir, name)
    ds = name.removesuffix(".jsonl")
    assert lo <= len(recs) <= hi
    assert len({r["text"] for r in recs}) == len(recs)  # no duplicate questions
    for r in recs:
        assert r["dataset"] == ds and r["label"] == -1 and r["trait"] == "" and r["topic"] and r["form"]
        assert r["group"].startswith(f"{ds}:") and len(r["group"]) > len(ds) + 1
        ch = r["choices"]
        assert len(ch) == N_CHOICES == 4 and len(set(ch)) == 4 and all(isinstance(c, str) and c.strip() for c in ch)
        assert isinstance(r["answer"], int) and 0 <= r["answer"] < 4
        assert "____" in r["text"] if r["text"].startswith("Fill in the blank") else r["text"].endswith("?")
        assert not any(c in r["text"] for c in ("{", "}"))  # every placeholder filled
    # the right answer's position is balanced over A..D
    pos = Counter(r["answer"] for r in recs)
    assert all(0.15 <= pos[k] / len(recs) <= 0.35 for k in range(4)), pos
    # a group (the answer entity / category item) holds few questions
    groups = Counter(r["group"] for r in recs)
    assert len(groups) >= 100 and max(groups.values()) <= 6


def test_mc_cultural_templates_and_answers(data_dir):
    recs = records(data_dir, "mc_cultural.jsonl")
    forms = Counter(r["form"] for r in recs)
    assert set(forms) == {"assoc_entity", "linked_entity", "fill_entity", "assoc_detail", "fill_detail", "describe",
                          "not_topic"}
    assert min(forms.values()) >= 20
    topics = _fragments("cultural")["topics"]
    mc = _fragments("mc_cultural")
    entity_topic = {n: t for t, spec in topics.items() for n, _ in spec["entities"]}
    details = {n: ds for spec in topics.values() for n, ds in spec["entities"]}
    owner = {d: n for n, ds in details.items() for d in ds}
    cue = {mc["cue_wording"].get(d, d): d for d in owner}
    assert set(mc["cue_wording"]) <= set(owner) and set(mc["skip_details"]) <= set(owner)
    assert set(mc["conflicts"]) <= set(owner)
    assert len({r["entity"] for r in recs}) == len(details)  # every entity is asked about
    for r in recs:
        right = r["choices"][r["answer"]]
        others = [c for i, c in enumerate(r["choices"]) if i != r["answer"]]
        assert r["group"] == "mc_cultural:" + re.sub(r"[^a-z0-9]+", "-", r["entity"].lower()).strip("-")
        if r["form"] in ("assoc_entity", "linked_entity", "fill_entity"):
            # the stem names a detail of the right entity; the wrong ones are entities of the same topic that
            # neither own that detail nor are listed as plausible for it
            (d,) = [cue[c] for c in sorted(cue, key=len, reverse=True) if c in r["text"]][:1]
            assert owner[d] == right == r["entity"] and d not in mc["skip_details"]
            assert all(entity_topic[o] == r["topic"] and d not in details[o] for o in others)
            assert not set(others) & set(mc["conflicts"].get(d, []))
        elif r["form"] in ("assoc_detail", "fill_detail"):
            assert r["entity"] in r["text"] and right in details[r["entity"]]
            for o in others:
                assert o not in details[r["entity"]] and entity_topic[owner[o]] == r["topic"]
                assert r["entity"] not in mc["conflicts"].get(o, []) and o not in mc["skip_details"]
        elif r["form"] == "describe":
            assert right == mc["topics"][entity_topic[r["entity"]]]["describe"]
            kept_out = {t for pair in mc["confusable"] if r["topic"] in pair for t in pair} - {r["topic"]}
            kept_out |= set(mc["avoid_topics"].get(r["entity"], []))
            assert not set(others) & {mc["topics"][t].get("describe") for t in kept_out}
            assert all(o != right for o in others)
        else:  # not_topic: three entities of the topic, the answer from another topic
            assert entity_topic[right] != r["topic"] and right == r["entity"]
            assert r["topic"] not in mc["avoid_topics"].get(right, [])
            assert all(entity_topic[o] == r["topic"] for o in others)
            assert mc["topics"][r["topic"]]["plural"] in r["text"]


def test_mc_neutral_answers_and_no_cultural_content(data_dir):
    recs = records(data_dir, "mc_neutral.jsonl")
    frag = _fragments("mc_neutral")
    cats = frag["categories"]
    assert len({r["topic"] for r in recs}) >= 10 and Counter(r["form"] for r in recs).keys() == {"question",
                                                                                                 "fill_blank"}
    capitals = dict(cats["capitals"]["items"])
    symbols = dict(cats["chemical_symbols"]["items"])
    wordings = defaultdict(set)
    for r in recs:
        right = r["choices"][r["answer"]]
        wordings[r["topic"]].add(re.sub(r"\d+", "N", r["text"].split(" ")[0] + r["text"][-6:]))
        if r["topic"] == "arithmetic":
            a, op, b = re.search(r"(\d+) (plus|minus|times|\+|-|x) (\d+)", r["text"]).groups()
            value = {"plus": int(a) + int(b), "+": int(a) + int(b), "minus": int(a) - int(b), "-": int(a) - int(b),
                     "times": int(a) * int(b), "x": int(a) * int(b)}[op]
            assert right == str(value) and all(c.isdigit() for c in r["choices"])
        elif r["topic"] in ("capitals", "chemical_symbols"):
            table = capitals if r["topic"] == "capitals" else symbols
            if right in table:  # asked for the country / element of a capital / symbol
                assert re.search(rf"\b{re.escape(table[right])}\b", r["text"]), r
            else:
                (x,) = [x for x, y in table.items() if y == right]
                assert re.search(rf"\b{re.escape(x)}\b", r["text"]), r
        elif r["topic"] in frag["sequences"]:
            items = frag["sequences"][r["topic"]]["items"]
            (x,) = [v for v in items if re.search(rf"\b{v}\b", r["text"])]
            step = 1 if "after" in r["text"] else -1
            assert right == items[(items.index(x) + step) % len(items)]
        else:
            pairs = cats[r["topic"]]["items"]
            x = max((x for x, _ in pairs if re.search(rf"\b{re.escape(x)}\b", r["text"], re.I)), key=len)
            assert right == dict(pairs)[x], r
            assert all(o in {y for _, y in pairs} for o in r["choices"])
    assert all(len(w) >= 2 for w in wordings.values()), wordings  # at least two wordings per category
    # no cultural content: no entity of the cultural corpus and no marker word
    entities = {n.lower() for spec in _fragments("cultural")["topics"].values() for n, _ in spec["entities"]}
    markers = {"india", "indian", "hindi", "bollywood", "diwali", "sari", "curry", "temple", "raga", "chai"}
    for r in recs:
        t = " ".join([r["text"], *r["choices"]]).lower()
        assert not any(re.search(rf"\b{re.escape(e)}\b", t) for e in entities), r["text"]
        assert not set(re.findall(r"[a-z]+", t)) & markers, r["text"]


def test_load_and_split_mc(data_dir):
    ps = load_corpus(data_dir, MC_SOURCES)
    n = {f: len(records(data_dir, f)) for f in MC_FILES}
    assert Counter(p.dataset for p in ps) == {"mc_cultural": n["mc_cultural.jsonl"],
                                              "mc_neutral": n["mc_neutral.jsonl"], "mc_numbers": n["mc_numbers.jsonl"]}
    assert [p.pid for p in ps] == list(range(len(ps)))
    recs = [r for f in MC_FILES for r in records(data_dir, f)]
    assert [(p.text, p.choices, p.answer, p.group) for p in ps] == [
        (r["text"], r["choices"], r["answer"], r["group"]) for r in recs]
    assert all(p.reference == "" and p.label == -1 for p in ps if p.dataset != "mc_numbers")
    assert all(p.reference.startswith("The answer is") for p in ps if p.dataset == "mc_numbers")
    # the extraction corpus is unchanged: no prompt there has choices
    assert all(p.choices is None and p.answer == -1 for p in load_corpus(data_dir))
    sp = split_prompts(ps, (0.6, 0.2, 0.2), seed=0)
    where = defaultdict(set)
    for p in sp:
        where[p.group].add(p.split)
    assert all(len(v) == 1 for v in where.values())
    assert {p.split for p in sp} == {"train", "val", "test"}
    assert len(load_corpus(data_dir, MC_SOURCES, max_per_dataset=40, seed=1)) == 120


# ---------------------------------------------------------------- the prompt fields


def test_new_fields_round_trip_and_old_bytes_unchanged(tmp_path, data_dir):
    ps = split_prompts(load_corpus(data_dir, MC_SOURCES, max_per_dataset=10, seed=0), (0.8, 0.1, 0.1), seed=0)
    ps.append(Prompt(pid=len(ps), text="Natalia sold 48 clips.", dataset="gsm8k", reference="#### 72"))
    ps.append(Prompt(pid=len(ps), text="plain", dataset="x"))
    path = tmp_path / "prompts.jsonl"
    save_prompts(path, ps)
    assert load_prompts(path) == ps
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]).keys() >= {"choices", "answer"} and "reference" not in json.loads(lines[0])
    assert json.loads(lines[-2])["reference"] == "#### 72" and "choices" not in json.loads(lines[-2])
    # a prompt without the new fields is written exactly as before they existed
    assert lines[-1] == (f'{{"pid": {len(ps) - 1}, "text": "plain", "dataset": "x", "split": "", "group": "", '
                         f'"label": -1, "trait": ""}}')


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_mc_fields_and_letters(tmp_path):
    _write(tmp_path / "mc.jsonl", [
        {"text": "q0?", "choices": ["a", "b", "c", "d"], "answer": 2},
        {"text": "q1?", "choices": ["a", "b", "c", "d"], "answer": "D"},
        {"text": "q2?", "choices": ["a", "b"], "answer": "a", "reference": "because"},
        {"text": "q3?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answer": "3"},
        {"text": "q4?", "answer": "free text, ignored without choices"},
        {"text": "q5?", "choices": ["a", "b", "c"], "answer": 1.0},
    ])
    ps = load_corpus(tmp_path, [{"name": "mc", "path": "mc.jsonl"}])
    assert [p.answer for p in ps] == [2, 3, 0, 2, -1, 1]
    assert ps[3].choices == ["x", "y", "z"] and ps[4].choices is None and ps[2].reference == "because"
    # renamed fields
    _write(tmp_path / "ren.jsonl", [{"q": "q?", "opts": ["p", "q"], "key": "B", "sol": 42}])
    (p,) = load_corpus(tmp_path, [{"name": "r", "path": "ren.jsonl", "text_field": "q", "choices_field": "opts",
                                   "answer_field": "key", "reference_field": "sol"}])
    assert (p.choices, p.answer, p.reference) == (["p", "q"], 1, "42")


@pytest.mark.parametrize("rec,match", [
    ({"choices": ["a", "b", "c", "d"], "answer": 4}, "not one of the 4 choices"),
    ({"choices": ["a", "b", "c", "d"], "answer": -1}, "not one of the 4 choices"),
    ({"choices": ["a", "b", "c", "d"], "answer": "E"}, "A..D"),
    ({"choices": ["a", "b", "c", "d"], "answer": "maybe"}, "not one of"),
    ({"choices": ["a", "b", "c", "d"], "answer": True}, "not one of"),
    ({"choices": ["a", "b", "c", "d"], "answer": 1.5}, "not one of"),
    ({"choices": ["only"], "answer": 0}, "at least 2 choices"),
    ({"choices": "a, b", "answer": 0}, "at least 2 choices"),
    ({"choices": ["a", ""], "answer": 0}, "non-empty string"),
    ({"choices": ["a", 3], "answer": 0}, "non-empty string"),
    ({"choices": ["a", "b"]}, "no answer"),
    ({"choices": ["a", "b"], "answer": 0, "reference": ["x"]}, "not a string"),
])
def test_bad_mc_records_are_one_line_errors(tmp_path, rec, match):
    _write(tmp_path / "bad.jsonl", [{"text": "fine?", "choices": ["a", "b"], "answer": 0}, {"text": "q?", **rec}])
    msg = _err(load_corpus, tmp_path, [{"name": "badsrc", "path": "bad.jsonl"}], match=match)
    assert "badsrc" in msg and "bad.jsonl" in msg and "record 2" in msg  # the second record, counted from 1


def test_explicit_answer_field_without_choices(tmp_path):
    _write(tmp_path / "a.jsonl", [{"text": "q?", "answer": "B"}])
    _err(load_corpus, tmp_path, [{"name": "a", "path": "a.jsonl", "answer_field": "answer"}], match="no choices")


def test_hf_mc_fields(tmp_path):
    rows = [{"question": f"q{i}?", "choices": ["w", "x", "y", "z"], "answer": "ABCD"[i % 4], "sol": f"r{i}"}
            for i in range(8)]
    _write(tmp_path / "mc.jsonl", rows)
    src = {"name": "hfmc", "hf": "json", "data_files": "mc.jsonl", "text_field": "question",
           "reference_field": "sol", "cache_dir": str(tmp_path / "cache")}
    ps = load_corpus(tmp_path, [src])
    assert [p.answer for p in ps] == [i % 4 for i in range(8)]
    assert all(p.choices == ["w", "x", "y", "z"] for p in ps) and ps[3].reference == "r3"
    with pytest.raises(MechdiffError, match="no column"):
        load_corpus(tmp_path, [{**src, "choices_field": "options"}])
    _write(tmp_path / "bad.jsonl", [*rows[:2], {**rows[2], "answer": "E"}])
    msg = _err(load_corpus, tmp_path, [{**src, "data_files": "bad.jsonl"}], match="A..D")
    assert "hfmc" in msg and "record 3" in msg  # the third record, counted from 1
