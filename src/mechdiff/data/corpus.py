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
#: the multiple-choice corpora `write_default_corpora` also writes (not part of the extraction corpus above); the
#: prepare stage loads them with `load_corpus(data_dir, MC_SOURCES)` when `data.eval_sources` is null
MC_SOURCES: list[dict[str, Any]] = [
    {"name": "mc_cultural", "path": "mc_cultural.jsonl"},
    {"name": "mc_neutral", "path": "mc_neutral.jsonl"},
    {"name": "mc_numbers", "path": "mc_numbers.jsonl"},
]
#: corpora `write_default_corpora` writes that the default extraction corpus leaves out; `data.sources` names
#: them (or any of `DEFAULT_SOURCES`) by their name: the math problems of a cognitive fine-tune
EXTRA_SOURCES: list[dict[str, Any]] = [
    {"name": "math", "path": "math.jsonl"},
]
CONCEPTS_FILE = "concepts.json"
TRAITS = ("politeness", "formality", "certainty", "sentiment_positive")
SPLITS = ("train", "val", "test")

_GEN_SEED = 1729  # the only randomness of the default corpora
N_CHOICES = 4  # options per question of the default multiple-choice corpora
_INSTRUCTION_VERBS = ("write", "describe", "explain", "tell", "give", "list", "plan", "compare", "suggest",
                      "name", "recommend", "imagine", "narrate", "as", "in")
_MISSING_HINT = "run `make data` (or `dvc pull data.dvc`) to create the corpora"


@dataclass
class Prompt:
    """One prompt of the corpus: dense id, text, dataset, split, group (shares a split), graded label, trait.

    Multiple-choice prompts also carry `choices` (the options; `text` is the question stem only) and `answer`
    (the index of the right option, -1 when unknown); `reference` is a reference answer text (e.g. GSM8K's).
    `region` is the region or subculture of a cultural prompt's entity (`cultural.json` `regions`), "" otherwise.
    """

    pid: int
    text: str
    dataset: str
    split: str = ""
    group: str = ""
    label: int = -1
    trait: str = ""
    choices: list[str] | None = None
    answer: int = -1
    reference: str = ""
    region: str = ""


def has_reference(prompt: Prompt) -> bool:
    """Whether a prompt carries a usable (non-blank) reference answer."""
    return isinstance(prompt.reference, str) and bool(prompt.reference.strip())


# the optional fields and their defaults: `save_prompts` leaves a field out while it has its default, so prompt
# files of corpora without them are byte-identical to those written before the fields existed
_OPTIONAL_DEFAULTS: dict[str, Any] = {"choices": None, "answer": -1, "reference": "", "region": ""}


# ---------------------------------------------------------------- default corpora


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def prompt_form(text: str) -> str:
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
                   n_topic_frames: int = 3, n_generic: int = 1,
                   regions: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Compose `n_topic_frames + n_generic` prompts per entity, each from a different frame (with `regions`, each
    record carries its entity's `region`)."""
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
                rec = {"text": text, "dataset": dataset, "group": f"{dataset}:{_slug(name)}", "label": -1,
                       "trait": "", "topic": topic, "entity": name, "form": prompt_form(text)}
                if regions is not None:
                    rec["region"] = regions[name]
                out.append(rec)
    return out


def _neutral_records(rng: random.Random, per_act: int = 2) -> list[dict[str, Any]]:
    out = []
    frag = _fragments("neutral")
    for i, act in enumerate(frag["acts"]):
        for frame in rng.sample(frag["frames"], per_act):
            text = frame.format(act=act, Act=_cap(act))
            out.append({"text": text, "dataset": "neutral", "group": f"neutral:{i:03d}", "label": -1, "trait": "",
                        "topic": "everyday", "form": prompt_form(text)})
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


# ---------------------------------------------------------------- default multiple-choice corpora


def _mc_question(dataset: str, form: str, text: str, topic: str, group_key: str, right: str,
                 wrong: Sequence[str], **extra: Any) -> dict[str, Any]:
    """A question before its options are ordered: `_place_answers` sets `choices` and `answer`."""
    options = [right, *wrong]
    if len(options) != N_CHOICES or len(set(options)) != N_CHOICES or not all(options):
        raise ValueError(f"bad options for {text!r}: {options!r}")  # a fragment bug, caught by the tests
    return {"dataset": dataset, "text": text, "right": right, "wrong": list(wrong), "group": f"{dataset}:{group_key}",
            "form": form, "topic": topic, "label": -1, "trait": "", **extra}


def _place_answers(questions: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Shuffle each question's wrong options and put the right one at a seeded position balanced over A..D."""
    seen: set[str] = set()
    for q in questions:
        if q["text"] in seen:
            raise ValueError(f"duplicate question {q['text']!r}")
        seen.add(q["text"])
    slots = [i % N_CHOICES for i in range(len(questions))]
    rng.shuffle(slots)
    out = []
    for q, slot in zip(questions, slots):
        q = dict(q)
        right, choices = q.pop("right"), q.pop("wrong")
        rng.shuffle(choices)
        choices.insert(slot, right)
        out.append({**q, "choices": choices, "answer": slot})
    return out


def _balanced(options: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """`n` picks from `options`, each used equally often (up to one), in a seeded order."""
    picks = [options[i % len(options)] for i in range(n)]
    rng.shuffle(picks)
    return picks


def _mc_cultural_records(rng: random.Random) -> list[dict[str, Any]]:
    """Four-option questions about the entities of `cultural.json` (the cues and templates of `mc_cultural.json`).

    Per entity: one question asking for the entity from one of its details (`assoc_entity`, `linked_entity`,
    `fill_entity`; the other options are entities of the same topic), one asking for a detail of the entity
    (`assoc_detail`, `fill_detail`; other options: details of other entities of the topic) and, for topics with a
    description, one asking for that description (`describe`); per topic of `not_topics`, `not_per_topic`
    odd-one-out questions (`not_topic`: three entities of the topic and one of another). Topic pairs in
    `confusable` never share a `describe` question; `avoid_topics` keeps an entity out of the given topics'
    `describe` options and odd-one-out questions (e.g. "Christmas in Goa" out of places). A detail in
    `skip_details` is never used; a detail never appears with an entity its `conflicts` list names; a detail used as
    a cue is worded as `cue_wording` says where it has an entry (details starting with "its", "his").
    """
    topics, mc = _fragments("cultural")["topics"], _fragments("mc_cultural")
    tpl, meta, skip, conflicts = mc["templates"], mc["topics"], set(mc["skip_details"]), mc["conflicts"]
    confusable, avoid = {frozenset(pair) for pair in mc["confusable"]}, mc["avoid_topics"]
    ds = "mc_cultural"

    def clash(detail: str, entity: str) -> bool:
        return entity in conflicts.get(detail, ())

    entities = [(topic, name, [d for d in details if d not in skip])
                for topic, spec in topics.items() for name, details in spec["entities"]]
    cue_forms = _balanced(["assoc_entity", "linked_entity", "fill_entity"], len(entities), rng)
    detail_forms = _balanced(["assoc_detail", "fill_detail"], len(entities), rng)
    out: list[dict[str, Any]] = []
    for (topic, name, details), cue_form, detail_form in zip(entities, cue_forms, detail_forms):
        if not details:
            raise ValueError(f"{name!r} has no usable detail")
        same = [e for e in entities if e[0] == topic and e[1] != name]
        cue, own = rng.sample(details, 2) if len(details) > 1 else details * 2
        plural, slug = meta[topic]["plural"], _slug(name)
        # the entity from one of its details
        text = rng.choice(tpl[cue_form]).format(detail=mc["cue_wording"].get(cue, cue), plural=plural)
        wrong = rng.sample([e[1] for e in same if not clash(cue, e[1])], N_CHOICES - 1)
        out.append(_mc_question(ds, cue_form, text, topic, slug, name, wrong, entity=name))
        # a detail of the entity
        text = rng.choice(tpl[detail_form]).format(name=name, Name=_cap(name))
        wrong = rng.sample([d for e in same for d in e[2] if not clash(d, name)], N_CHOICES - 1)
        out.append(_mc_question(ds, detail_form, text, topic, slug, own, wrong, entity=name))
        # what kind of thing the entity is
        if "describe" in meta[topic]:
            text = rng.choice(tpl["describe"]).format(name=name, Name=_cap(name))
            pool = [spec["describe"] for t, spec in meta.items() if t != topic and "describe" in spec
                    and frozenset((t, topic)) not in confusable and t not in avoid.get(name, ())]
            wrong = rng.sample(pool, N_CHOICES - 1)
            out.append(_mc_question(ds, "describe", text, topic, slug, meta[topic]["describe"], wrong, entity=name))
    # odd one out: three entities of a topic and one of another topic (the answer)
    nots = mc["not_topics"]
    for topic in nots:
        members = [n for n, _ in topics[topic]["entities"]]
        anchors = rng.sample(members, mc["not_per_topic"])
        odd_topics = _balanced([t for t in nots if t != topic], len(anchors), rng)
        for anchor, odd_topic in zip(anchors, odd_topics):
            odd = rng.choice([n for n, _ in topics[odd_topic]["entities"] if topic not in avoid.get(n, ())])
            wrong = rng.sample([n for n in members if n != anchor], N_CHOICES - 1)
            text = rng.choice(tpl["not_topic"]).format(name=anchor, plural=meta[topic]["plural"])
            out.append(_mc_question(ds, "not_topic", text, topic, _slug(odd), odd, wrong, entity=odd))
    return _place_answers(out, rng)


def _style(text: str) -> str:
    return "fill_blank" if text.startswith("Fill in the blank") else "question"


def _mc_neutral_records(rng: random.Random) -> list[dict[str, Any]]:
    """General-knowledge four-option questions from `mc_neutral.json` (no cultural content).

    `categories`: one question per item `[x, y]`, asking y from x (`ask` templates) or, where the category has
    `reverse` templates, x from y for half of the items; the wrong options are other answers of the category.
    `sequences`: the item after and the item before each item of a cycle (days, months). `arithmetic`: `per_op`
    distinct sums, differences and products with near-miss wrong options (`offsets`). `form` is the wording
    style (`question` or `fill_blank`); `topic` the category.
    """
    frag = _fragments("mc_neutral")
    ds = "mc_neutral"
    out: list[dict[str, Any]] = []
    for cat, spec in frag["categories"].items():
        items = spec["items"]
        ways = _balanced(["ask", "reverse"] if "reverse" in spec else ["ask"], len(items), rng)
        ys = list(dict.fromkeys(y for _, y in items))
        for (x, y), way in zip(items, ways):
            text = rng.choice(spec[way]).format(x=x, X=_cap(x), y=y, Y=_cap(y))
            key = _slug(x if spec.get("group_by", "x") == "x" else y)
            if way == "ask":
                right, pool = y, [v for v in ys if v != y]
            else:
                right, pool = x, [u for u, v in items if v != y]
            out.append(_mc_question(ds, _style(text), text, cat, f"{cat}:{key}", right,
                                    rng.sample(pool, N_CHOICES - 1)))
    for cat, spec in frag["sequences"].items():
        items = spec["items"]
        for i, x in enumerate(items):
            for way, right in (("after", items[(i + 1) % len(items)]), ("before", items[i - 1])):
                text = rng.choice(spec[way]).format(x=x)
                pool = [v for v in items if v not in (x, right)]
                out.append(_mc_question(ds, _style(text), text, cat, f"{cat}:{_slug(x)}", right,
                                        rng.sample(pool, N_CHOICES - 1)))
    arith = frag["arithmetic"]
    for op, spec in arith["ops"].items():
        lo, hi = spec["range"]
        pairs: list[tuple[int, int]] = []
        while len(pairs) < arith["per_op"]:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if op == "minus":
                a, b = max(a, b), min(a, b)
            if a == b or (a, b) in pairs or (op != "minus" and (b, a) in pairs):
                continue
            pairs.append((a, b))
        for a, b in pairs:
            value = a + b if op == "plus" else a - b if op == "minus" else a * b
            text = rng.choice(spec["templates"]).format(a=a, b=b)
            wrong = [str(value + o) for o in rng.sample([o for o in arith["offsets"] if value + o >= 0],
                                                        N_CHOICES - 1)]
            out.append(_mc_question(ds, _style(text), text, "arithmetic", f"arithmetic:{op}-{a}-{b}", str(value),
                                    wrong))
    return _place_answers(out, rng)


def _math_value(op: str, a: int, b: int) -> int:
    return a + b if op == "plus" else a - b if op == "minus" else a * b if op == "times" else a // b


def _math_operands(t: dict[str, Any], rng: random.Random) -> tuple[int, int]:
    lo, hi = t["range"]
    b = t.get("fixed_b")
    if t["op"] == "divide":  # a = b * q, the answer q
        b = b if b is not None else rng.randint(lo, hi)
        return b * rng.randint(lo, hi), b
    a = rng.randint(lo, hi)
    if b is None:
        b = rng.randint(lo, hi)
        while b == a:
            b = rng.randint(lo, hi)
    if t["op"] == "minus" and a < b:
        a, b = b, a
    return a, b


def _math_problems(frag: dict[str, Any], templates: list[dict[str, Any]], n: int, rng: random.Random,
                   seen: set[str]) -> list[tuple[dict[str, Any], str, int, int]]:
    """`n` distinct problems per template: (template, text, answer, draw index)."""
    out = []
    for t in templates:
        k = 0
        while k < n:
            a, b = _math_operands(t, rng)
            name, item = rng.choice(frag["names"]), rng.choice(frag["items"])
            text = t["text"].format(a=a, b=b, name=name, item=item)
            if text in seen:
                continue
            seen.add(text)
            out.append((t, text, _math_value(t["op"], a, b), k))
            k += 1
    return out


def _math_records(rng: random.Random) -> list[dict[str, Any]]:
    """Arithmetic and word problems from `math.json`: `per_template` per template, each with its `reference`
    answer ("The answer is N."), grouped `group_size` at a time within a template (splits keep groups whole)."""
    frag = _fragments("math")
    return [{"text": text, "dataset": "math", "group": f"math:{t['id']}:{k // frag['group_size']}", "label": -1,
             "trait": "", "topic": t["op"], "form": t["id"], "reference": frag["answer"].format(n=value)}
            for t, text, value, k in _math_problems(frag, frag["templates"], frag["per_template"], rng, set())]


def _mc_math_records(rng: random.Random) -> list[dict[str, Any]]:
    """Four-option math questions (the `mc` templates of `math.json`, new numbers): near-miss wrong options
    (`offsets`), the reference answer text as well."""
    frag = _fragments("math")
    mc = frag["mc"]
    by_id = {t["id"]: t for t in frag["templates"]}
    seen = {r["text"] for r in _math_records(random.Random(_GEN_SEED + 6))}  # never a training problem
    out = []
    for t, text, value, _ in _math_problems(frag, [by_id[i] for i in mc["templates"]], mc["per_template"], rng,
                                            seen):
        wrong = [str(value + o) for o in rng.sample([o for o in mc["offsets"] if value + o >= 0], N_CHOICES - 1)]
        out.append(_mc_question("mc_numbers", "question", text, t["op"], f"{t['id']}:{value}:{len(out)}", str(value),
                                wrong, reference=frag["answer"].format(n=value)))
    return _place_answers(out, rng)


def default_records() -> dict[str, list[dict[str, Any]]]:
    """The records of each default corpus file (deterministic: a fixed seed per file)."""
    cultural, control = _fragments("cultural"), _fragments("control")
    return {
        "cultural.jsonl": _topic_records(cultural["topics"], cultural["generic_frames"], "cultural",
                                         random.Random(_GEN_SEED), regions=cultural["regions"]),
        "control.jsonl": _topic_records(control["topics"], control["generic_frames"], "control",
                                        random.Random(_GEN_SEED + 1)),
        "neutral.jsonl": _neutral_records(random.Random(_GEN_SEED + 2)),
        "traits.jsonl": _trait_records(random.Random(_GEN_SEED + 3)),
        "mc_cultural.jsonl": _mc_cultural_records(random.Random(_GEN_SEED + 4)),
        "mc_neutral.jsonl": _mc_neutral_records(random.Random(_GEN_SEED + 5)),
        "math.jsonl": _math_records(random.Random(_GEN_SEED + 6)),
        "mc_numbers.jsonl": _mc_math_records(random.Random(_GEN_SEED + 7)),
    }


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def write_default_corpora(data_dir: str | Path) -> list[Path]:
    """Write cultural / control / neutral / traits / math / mc_cultural / mc_neutral / mc_numbers JSONL and
    concepts.json into `data_dir`.

    Byte-deterministic. The `mc_*` files are the multiple-choice corpora of `MC_SOURCES`; `math` is in
    `EXTRA_SOURCES` (named in `data.sources` to extract it), not in `DEFAULT_SOURCES`.
    """
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


# ---------------------------------------------------------------- regions and corruptions of cultural prompts

#: the corruption methods of `corruptions`, in order
CORRUPTIONS = ("entity", "counterfactual", "paraphrase")
#: the region label of entities shared across India (not one subculture)
PAN_INDIAN = "pan-Indian"


@cache
def cultural_entities() -> dict[str, dict[str, Any]]:
    """The cultural corpus's entities by group (`cultural:<slug>`): {"entity", "topic", "region", "details"}.

    A prompt's group names its entity, so prompts saved before `region` existed find their region here.
    """
    frag = _fragments("cultural")
    return {f"cultural:{_slug(name)}": {"entity": name, "topic": topic, "region": frag["regions"][name],
                                        "details": list(details)}
            for topic, spec in frag["topics"].items() for name, details in spec["entities"]}


def corruptible(text: str, group: str) -> bool:
    """Whether `corruptions` can corrupt the prompt: a cultural prompt whose text names its entity (a few frames
    speak of a detail only)."""
    ent = cultural_entities().get(group)
    return ent is not None and (ent["entity"] in text or _cap(ent["entity"]) in text)


def _swap_entity(text: str, old: str, new: str) -> str:
    """`text` with the entity `old` (as written or capitalised, as the frames' {name} / {Name} put it) replaced."""
    if old not in text and _cap(old) not in text:
        raise MechdiffError(f"entity {old!r} does not occur in the prompt {text[:60]!r}: it is not a prompt of that "
                            "entity")
    if _cap(old) != old:
        text = text.replace(_cap(old), _cap(new))
    return text.replace(old, new)


def corruptions(text: str, group: str, *, seed: int) -> dict[str, str]:
    """Three corruptions of a cultural prompt (of entity group `group`), deterministic given `seed` and the text.

    - `entity`: the same text with the entity replaced by an entity of the control corpus (no cultural content);
    - `counterfactual`: the same text with the entity replaced by an entity of another culture in the same topic
      (`counterfactual.json`);
    - `paraphrase`: the same entity in another frame of its topic (a frame whose text differs from `text`;
      {detail} is one of the entity's details, {other} another entity of the topic).
    """
    ent = cultural_entities().get(group)
    if ent is None:
        raise MechdiffError(f"group {group!r} is not an entity of the cultural corpus: corruptions need cultural "
                            "prompts (see `corruptible`)")
    rng = random.Random(f"{seed}:{group}:{text}")
    name, topic = ent["entity"], ent["topic"]
    control = [n for spec in _fragments("control")["topics"].values() for n, _ in spec["entities"]]
    other_culture = [n for n, _ in _fragments("counterfactual")["topics"][topic]]
    spec = _fragments("cultural")["topics"][topic]
    others = [n for n, _ in spec["entities"] if n != name]
    paraphrases = sorted({f.format(name=name, Name=_cap(name), detail=ent["details"][0], other=others[0])
                          for f in spec["frames"]} - {text})
    return {"entity": _swap_entity(text, name, rng.choice(control)),
            "counterfactual": _swap_entity(text, name, rng.choice(other_culture)),
            "paraphrase": rng.choice(paraphrases)}


# ---------------------------------------------------------------- loading


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__


def _utf8(raw: bytes, path: Path, line: int | None = None) -> str:
    """`raw` decoded as UTF-8, or a one-line error naming the file (and line) and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{line}" if line is not None else str(path)
        raise MechdiffError(f"{where} is not UTF-8 (byte 0x{raw[e.start]:02x}, byte {e.start + 1} of the "
                            f"{'line' if line is not None else 'file'}): re-save the file as UTF-8") from e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise MechdiffError(f"corpus file {path} not found: {_MISSING_HINT}")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = _utf8(raw, path, n)
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


def hf_offline_hint(hf: str, name: str) -> str:
    """How to use hub dataset `hf` (source `name`) without network: a local JSONL copy."""
    return (f"without network, run datasets.load_dataset({hf!r}).to_json('{name}.jsonl') on a connected machine, "
            f"copy it into data/ and use {{\"name\": \"{name}\", \"path\": \"{name}.jsonl\"}}")


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
            raise MechdiffError(f"data file {missing[0]} of source {name!r} not found: fix its data_files in "
                                f"data.sources (a relative path is read under data.dir, {data_dir})")
    if src.get("cache_dir") is not None:
        kwargs["cache_dir"] = str(src["cache_dir"])
    try:
        ds = datasets.load_dataset(hf, src.get("config"), **kwargs)
    except Exception as e:
        raise MechdiffError(f"cannot load dataset {hf!r} for source {name!r} ({_one_line(e)}); "
                            + hf_offline_hint(hf, name)) from e
    cols = ds.column_names
    # optional fields: explicit names must exist; the default names are read only where the columns exist (the
    # answer only together with choices)
    choices_field = src.get("choices_field", "choices" if "choices" in cols else None)
    fields_ = {
        "text": src.get("text_field", "text"),
        "label": src.get("label_field"),
        "choices": choices_field,
        "answer": src.get("answer_field", "answer" if choices_field is not None and "answer" in cols else None),
        "reference": src.get("reference_field", "reference" if "reference" in cols else None),
    }
    for field in fields_.values():
        if field is not None and field not in cols:
            raise MechdiffError(f"source {name!r} has no column {field!r}; columns: {', '.join(cols)}")
    n = src.get("n")
    if n is not None:
        ds = ds.select(range(min(int(n), len(ds))))
    columns = {key: ds[field] for key, field in fields_.items() if field is not None}
    columns.setdefault("label", [None] * len(ds))
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _to_label(v: Any, where: str) -> int:
    if v is None:
        return -1
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or f != int(f):
        raise MechdiffError(f"{where}: label {v!r} is not an integer: set label_field to an integer column or null")
    if f < -1:  # a label is a grade (0, 1, 2, ...); -1 or null = none
        raise MechdiffError(f"{where}: label {v!r} is negative: a label is a grade 0, 1, 2, ... (-1 or null for none)")
    return int(f)


def _to_choices(v: Any, where: str, field: str) -> tuple[list[str], list | None]:
    """The options of a multiple-choice record, and their labels when given as {"text": [...], "label": [...]}."""
    labels = None
    if isinstance(v, dict) and "text" in v:  # e.g. ARC's {"text": [...], "label": ["A", ...]}
        labels = v.get("label")
        v = v["text"]
    if not isinstance(v, list | tuple) or len(v) < 2:
        got = f"{len(v)} choice(s)" if isinstance(v, list | tuple) else f"{type(v).__name__} {v!r}"[:80]
        raise MechdiffError(f"{where}: field {field!r} needs a list of at least 2 choices, got {got}: fix the record "
                            f"or set choices_field")
    for j, c in enumerate(v):
        if not isinstance(c, str) or not c.strip():
            raise MechdiffError(f"{where}: choice {j} ({str(c)[:40]!r}) in field {field!r} is not a non-empty string: "
                                f"fix the record")
    if labels is not None and (not isinstance(labels, list | tuple) or len(labels) != len(v)):
        labels = None
    return list(v), labels


def _to_answer(v: Any, choices: list[str], labels: list | None, where: str, field: str) -> int:
    """The index of the right choice: an integer index, a letter "A".."Z", or one of the choices' labels."""
    k = len(choices)
    idx = None
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v == int(v):
        idx = int(v)
    elif isinstance(v, str):
        t = v.strip()
        if labels is not None and t in [str(lab) for lab in labels]:
            idx = [str(lab) for lab in labels].index(t)
        elif len(t) == 1 and t.isascii() and t.isalpha():
            idx = ord(t.upper()) - ord("A")
        elif re.fullmatch(r"[0-9]+", t):
            idx = int(t)
    if idx is None or not 0 <= idx < k:
        raise MechdiffError(f"{where}: answer {v!r} in field {field!r} is not one of the {k} choices (an index "
                            f"0..{k - 1} or a letter A..{chr(ord('A') + k - 1)}): fix the record or set answer_field")
    return idx


def _to_reference(v: Any, where: str, field: str) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    raise MechdiffError(f"{where}: reference {str(v)[:60]!r} in field {field!r} is not a string: fix the record or "
                        f"set reference_field")


def _mc_fields(rec: dict[str, Any], where: str, fields_: dict[str, str | None],
               explicit_answer: bool) -> dict[str, Any]:
    """The optional `choices` / `answer` / `reference` of one record, validated (only the ones present)."""
    out: dict[str, Any] = {}
    cf, af, rf = fields_["choices"], fields_["answer"], fields_["reference"]
    raw = rec.get(cf) if cf else None
    ans = rec.get(af) if af else None
    if raw is not None:
        out["choices"], labels = _to_choices(raw, where, cf)
        if ans is None:
            raise MechdiffError(f"{where}: has choices but no answer in field {af!r}: add the answer (index or "
                                f"letter) or set answer_field")
        out["answer"] = _to_answer(ans, out["choices"], labels, where, af)
    elif ans is not None and explicit_answer:
        raise MechdiffError(f"{where}: has an answer in field {af!r} but no choices in field {cf!r}: add the "
                            f"choices, set choices_field, or use reference_field for a free-text answer")
    ref = rec.get(rf) if rf else None
    if ref is not None:
        out["reference"] = _to_reference(ref, where, rf)
    return out


_PROJECT_SOURCES = [*DEFAULT_SOURCES, *EXTRA_SOURCES, *MC_SOURCES]  # the corpora the project ships


def _named_source(src: Any) -> Any:
    """A shipped corpus named by a string (`cultural`, `math`, ...) as its source dict; anything else as is."""
    if not isinstance(src, str):
        return src
    known = {s["name"]: s for s in _PROJECT_SOURCES}
    if src not in known:
        raise MechdiffError(f"corpus source {src!r} is not a corpus of the project ({', '.join(known)}): name one "
                            "of them or give {\"name\", \"path\"} / {\"name\", \"hf\"}")
    return known[src]


def _source_prompts(src: Any, data_dir: Path) -> list[Prompt]:
    # a user's {name, path} / {name, hf}, not one of the project's corpora (by name or as their own dicts)
    own = isinstance(src, dict) and src not in _PROJECT_SOURCES
    src = _named_source(src)
    if not isinstance(src, dict) or not isinstance(src.get("name"), str) or not src["name"]:
        raise MechdiffError(f"corpus source {src!r} needs a non-empty \"name\" and a \"path\" or \"hf\" key")
    name = src["name"]
    if ("path" in src) == ("hf" in src):
        raise MechdiffError(f"corpus source {name!r} needs exactly one of \"path\" (local JSONL) or \"hf\"")
    if "path" in src:
        path = _resolve(src["path"], data_dir)
        if own and not path.is_file():
            raise MechdiffError(f"corpus file {path} of source {name!r} not found: fix its path in data.sources (or data.eval_sources) "
                                f"(a relative path is read under data.dir, {data_dir})")
        rows = _read_jsonl(path)
        where = str(path)
        text_field = src.get("text_field", "text")
        label_field = src.get("label_field", "label")
        mc_fields = {"choices": src.get("choices_field", "choices"), "answer": src.get("answer_field", "answer"),
                     "reference": src.get("reference_field", "reference")}
        n = src.get("n")
        if n is not None:
            rows = rows[: int(n)]
    else:
        rows = _read_hf(src, data_dir)
        where, text_field, label_field = f"source {name!r}", "text", "label"
        mc_fields = {"choices": "choices", "answer": "answer", "reference": "reference"}
    if not rows:
        origin = where if "path" in src else f"hf {src['hf']!r}"
        raise MechdiffError(f"corpus source {name!r} ({origin}) has no records: fill it or remove it from data.sources (or data.eval_sources)")
    out = []
    for i, rec in enumerate(rows):
        text = rec.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise MechdiffError(f"{where}: record {i + 1} has no text in field {text_field!r}: fix the record or set "
                                f"text_field")
        dataset = str(rec.get("dataset") or name)
        label = _to_label(rec.get(label_field) if label_field else None, f"{where} record {i + 1}")
        group = str(rec.get("group") or f"{name}:{i}")
        trait = str(rec.get("trait") or src.get("trait") or "")
        rec_where = f"source {name!r} ({where}) record {i + 1}" if "path" in src else f"{where} record {i + 1}"
        extra = _mc_fields(rec, rec_where, mc_fields, "answer_field" in src)
        region = rec.get("region")
        if region is not None and not isinstance(region, str):
            raise MechdiffError(f"{rec_where}: region {region!r} is not a string: fix the record")
        out.append(Prompt(pid=-1, text=text, dataset=dataset, group=group, label=label, trait=trait,
                          region=region or "", **extra))
    return out


def load_corpus(data_dir: str | Path, sources: list[dict] | None = None, *, max_per_dataset: int | None = None,
                seed: int = 0) -> list[Prompt]:
    """Load prompts from local JSONL files and/or `datasets` sources, with dense pids in source/file order.

    A source is the name of a corpus the project ships (`cultural`, `control`, `neutral`, `trait`, `math`,
    `mc_*`), `{"name", "path"}` (JSONL relative to `data_dir` or absolute; optional `text_field`,
    `label_field`, `n`) or `{"name", "hf", "config", "split", "data_files", "text_field", "label_field", "n"}`
    (first `n` rows). A record's `dataset` field wins over the source name; its label (`label_field`) is a grade
    0, 1, 2, ... of its `trait` (-1 or null: none; other negative numbers are refused). Multiple-choice records carry their
    options in `choices` (a list of >= 2 non-empty strings, or `{"text": [...], "label": [...]}`) and the right
    one in `answer` (an index, a letter "A".."Z", or one of the labels); a `reference` answer text is optional;
    `choices_field` / `answer_field` / `reference_field` rename them (for `hf` sources the default names are read
    when the columns exist). An answer without choices is ignored unless `answer_field` is set. `max_per_dataset`
    keeps a seeded
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


def check_scored(prompts: list[Prompt]) -> None:
    """Raise when a dataset of scored sets (data.eval_sources) has no record that can be scored: neither
    `choices` + `answer` (multiple choice) nor a `reference` answer, e.g. a file whose answers lost their options
    (an answer without choices is ignored unless `answer_field` is set). Checked before the split: a stage that scores
    val or test prompts says so itself when its split has none."""
    scorable: dict[str, bool] = {}
    for q in prompts:
        scorable[q.dataset] = scorable.get(q.dataset, False) or bool(q.choices) or has_reference(q)
    empty = sorted(d for d, ok in scorable.items() if not ok)
    if empty:
        raise MechdiffError(f"scored set {', '.join(map(repr, empty))} has no record with choices + answer or a "
                            "reference answer: fix its records (or choices_field / answer_field / reference_field "
                            "in data.eval_sources)")


def source_datasets(data_dir: str | Path, sources: list[dict] | None = None) -> set[str]:
    """The dataset names the sources provide, checking that every local file exists and has records.

    Hub (`hf`) sources are not fetched: each counts as the dataset of its name, as `load_corpus` loads it.
    """
    data_dir = Path(data_dir)
    names: set[str] = set()
    for src in DEFAULT_SOURCES if sources is None else [_named_source(s) for s in sources]:
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


def check_splits(prompts: Sequence[Prompt], fractions: Sequence[float], *, key: str = "data.sources") -> None:
    """Raise when a dataset has no prompt in a split whose fraction is > 0 (the stages that read that split would
    find nothing, several stages later); the message names the dataset, its size and the empty splits."""
    counts: dict[str, dict[str, int]] = {}
    for p in prompts:
        counts.setdefault(p.dataset, dict.fromkeys(SPLITS, 0))[p.split] += 1
    for ds in sorted(counts):
        empty = [s for s, f in zip(SPLITS, fractions) if f > 0 and counts[ds][s] == 0]
        if empty:
            n = sum(counts[ds].values())
            raise MechdiffError(f"{key}: dataset {ds!r} has {n} prompt(s) and data.splits {list(fractions)} leave its "
                                f"{' and '.join(empty)} split empty: give it more prompts (or groups), or raise data.max_per_dataset if it caps them")


def prepared_prompts(data_dir: str | Path, sources: list | None, *, max_per_dataset: int | None,
                     splits: Sequence[float], seed: int) -> list[Prompt]:
    """The pipeline's prompts: the sources loaded (each dataset capped at `max_per_dataset`), split by group and
    checked for empty splits (`check_splits`, its message naming data.sources or data.dir). What the prepare
    stage writes, and what `mechdiff params --check` builds to find an empty split before any stage runs."""
    prompts = load_corpus(data_dir, sources, max_per_dataset=max_per_dataset, seed=seed)
    prompts = split_prompts(prompts, tuple(splits), seed=seed)
    check_splits(prompts, splits, key="data.sources" if sources is not None else "data.dir")
    return prompts


# ---------------------------------------------------------------- prompt files


def _prompt_record(p: Prompt) -> dict[str, Any]:
    rec = asdict(p)
    for key, default in _OPTIONAL_DEFAULTS.items():
        if rec[key] == default:
            del rec[key]
    return rec


def save_prompts(path: str | Path, prompts: list[Prompt]) -> None:
    """Write prompts as JSONL (one object per line: pid, text, dataset, split, group, label, trait).

    `choices`, `answer`, `reference` and `region` follow where they differ from their defaults (so files of corpora without
    them are the same bytes as before those fields existed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, "".join(json.dumps(_prompt_record(p), ensure_ascii=False) + "\n" for p in prompts))


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read prompts written by `save_prompts`."""
    path = Path(path)
    if not path.is_file():
        raise MechdiffError(f"prompts file {path} not found: run the prepare stage (`dvc repro prepare`) first")
    names = {f.name for f in fields(Prompt)}
    out = []
    for n, rec in enumerate(_read_jsonl(path), 1):
        if not {"pid", "text", "dataset"} <= rec.keys():
            raise MechdiffError(f"{path}: record {n} lacks pid/text/dataset: rerun the prepare stage (`dvc repro prepare`)")
        p = Prompt(**{k: v for k, v in rec.items() if k in names})
        p.pid, p.label, p.answer = int(p.pid), int(p.label), int(p.answer)
        if p.choices is not None:
            p.choices = [str(c) for c in p.choices]
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
        obj = json.loads(_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as e:
        raise MechdiffError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): regenerate it "
                            "with `make data`") from e
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
