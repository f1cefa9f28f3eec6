"""params.yaml loading: types, choices, one-line errors naming full keys, defaults, the recording accessor."""

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from mechdiff import trace
from mechdiff.errors import MechdiffError
from mechdiff.params import Params, load_params

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repo_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.seed == 17 and p.transport.sites and p.pair.base.id


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["extract"].__setitem__("batch_size", "abc"), "extract.batch_size must be int"),
    (lambda r: r["extract"].__setitem__("batch_size", 0), "extract.batch_size must be >= 1"),
    (lambda r: r.__setitem__("rank", -3), "rank must be"),
    (lambda r: r.__setitem__("rank", "most"), "rank must be"),
    (lambda r: r["transport"].__setitem__("solver", "magic"), "choose one of"),
    (lambda r: r["data"].__setitem__("splits", [0.5, 0.5, 0.5]), "sum"),
    (lambda r: r["data"].__setitem__("splits", [0.5, 0.5, 0.0]), "three positive fractions"),
    (lambda r: r["data"].__setitem__("sources", []), "data.sources is empty"),
    (lambda r: r["data"].__setitem__("chat_template", "chatml"),
     "data.chat_template = 'chatml'; choose one of auto, own, base, tuned"),
    (lambda r: r["extract"].__setitem__("bogus", 1), "unknown key extract.bogus"),
    (lambda r: r["extract"].__setitem__("store_dtype", "int8"), "extract.store_dtype = 'int8'; choose one of float32, float16"),
    (lambda r: r["extract"].__setitem__("compressor", "gzip"), "extract.compressor = 'gzip'; choose one of null, lz4, zstd"),
    (lambda r: r["transport"].__setitem__("sites", ["layer3"]), "bad site name"),
    (lambda r: r.__setitem__("alpha", -1), "alpha"),
    (lambda r: r["sae"].__setitem__("sources", ["base", "chat"]), "sae.sources"),
    (lambda r: r["sae"].__setitem__("pretrained", {"delta-20": "x.npz"}), "sae.pretrained key 'delta-20'"),
    (lambda r: r["features"].__setitem__("embeddings", ["tfidf", "bert"]), "features.embeddings entry 'bert'"),
    (lambda r: r["sae"].__setitem__("pretrained", {"base-7": "x.npz"}), "names no SAE of sae.sources x sae.layers"),
    (lambda r: r["sae"].__setitem__("pretrained", {"base-20": ""}), "must be a path or hf:"),
    (lambda r: r["sae"].__setitem__("pretrained", {"base-020": "x.npz"}), "sae.pretrained key 'base-020'"),
    (lambda r: r["sae"].__setitem__("pretrained", ["base-20"]), "sae.pretrained"),
    (lambda r: r["sae"].__setitem__("select_dtype", "float16"), "sae.select_dtype = 'float16'; choose one of float32, bfloat16"),
    (lambda r: r["behaviour"]["markers"].__setitem__("signature", "(unclosed"), "not a valid regex"),
    (lambda r: r["behaviour"].__setitem__("markers", {"signature": 3}), r"behaviour.markers.signature must be str"),
    (lambda r: r["steer"].__setitem__("marker", "style"), "steer.marker 'style' is not a key"),
    (lambda r: r["steer"].__setitem__("k", 5), "steer.k must be 'auto' or one of"),
    (lambda r: r["steer"].__setitem__("alpha_grid", [1.0, -2.0]), "steer.alpha_grid"),
    (lambda r: r["steer"].__setitem__("source", "pca"), "choose one of"),
    (lambda r: r["steer"].__setitem__("sites", ["L3x"]), "bad site name"),
    (lambda r: r["pair"]["finetune"].__setitem__("objective", "dpo"), "choose one of"),
    (lambda r: r["pair"]["tuned"].__setitem__("recipe", None), r"pair.tuned needs an id \(a tuned model\) or a recipe"),
    (lambda r: r.__setitem__("seed", -1), "seed must be >= 0"),
    (lambda r: r.__setitem__("seed", 2**40), r"seed must be below 2\*\*31"),
    (lambda r: (r["steer"].__setitem__("sites", ["layers"]), r["steer"].__setitem__("layers", [])),
     "steer.layers is empty, but steer.sites has the 'layers' configuration"),
    (lambda r: r["patch"].__setitem__("ranks", []), "patch.ranks is empty"),
    (lambda r: r["transport"].__setitem__("sites", []), "transport.sites is empty"),
    (lambda r: r["features"].__setitem__("fdr", 2), r"features.fdr must lie in \(0, 1\]"),
    (lambda r: r["pair"]["fairness"].__setitem__("min_shared_ratio", 2), r"min_shared_ratio must lie in \[0, 1\]"),
    (lambda r: r["pair"]["fairness"].__setitem__("min_shared_ratio", -1), r"min_shared_ratio must lie in \[0, 1\]"),
    (lambda r: r["features"].__setitem__("n_perm", 0), "features.n_perm must be >= 1"),
    (lambda r: r["divergence"].__setitem__("n_boot", 1), r"divergence.n_boot must be >= 20 \(resamples"),
    (lambda r: r["steer"].__setitem__("sites", []), "steer.sites is empty"),
    (lambda r: r["steer"].__setitem__("controls", []), "steer.controls is empty"),
    (lambda r: r["steer"].__setitem__("controls", ["cultural", "control"]),
     "steer.target 'cultural' is also among steer.controls"),
    (lambda r: r["behaviour"].__setitem__("datasets", []), "behaviour.datasets is empty"),
    (lambda r: r["data"].__setitem__("eval_sources", []), "data.eval_sources is empty"),
    (lambda r: r["features"].__setitem__("cohens_d", -1), r"features.cohens_d .* must be > 0"),
    (lambda r: r["features"].__setitem__("theme_points", 1), "features.theme_points must be >= 10"),
    (lambda r: r["pair"]["edit"].__setitem__("scale", 0), "pair.edit.scale is 0"),
    (lambda r: r["probes"].__setitem__("estimators", []), "probes.estimators is empty"),
    (lambda r: r["gates"].__setitem__("n_perm", 19), r"gates.n_perm must be >= 20"),
    (lambda r: r["features"].__setitem__("max_themes", 1), "features.max_themes must be >= 2"),
    (lambda r: r["sae"].__setitem__("eval_prompts", 0), "sae.eval_prompts must be >= 1"),
    (lambda r: r["sae"].__setitem__("k_aux", 0), "sae.k_aux must be >= 1"),
    (lambda r: r["divergence"].__setitem__("layer_patch_prompts", -1), "divergence.layer_patch_prompts must be >= 0"),
    (lambda r: r["pair"]["finetune"].__setitem__("lr", float("nan")), "pair.finetune.lr must be a finite number"),
    (lambda r: r["steer"].__setitem__("target_effect", float("nan")), "steer.target_effect must be a finite"),
    (lambda r: r["patch"].__setitem__("target_drop", -5), "patch.target_drop"),
    (lambda r: r["geometry"].__setitem__("steer_scale", -1), "geometry.steer_scale must be > 0"),
    (lambda r: r["gates"].__setitem__("max_prompts", 0), "gates.max_prompts must be >= 1"),
    (lambda r: r["data"].__setitem__("max_per_dataset", 0), "data.max_per_dataset must be >= 1 or null"),
    (lambda r: r["data"].__setitem__("max_len", 2), "data.max_len must be >= 8"),
    (lambda r: r["steer"].__setitem__("ablation", "zero"), "choose one of"),
    (lambda r: r["behaviour"].__setitem__("mc_score", "max"), "choose one of"),
    (lambda r: r["hsae"].__setitem__("metric", "cosine"), "choose one of"),
    (lambda r: r["patch"].__setitem__("attn_heads", "some"), "patch.attn_heads must be null"),
    (lambda r: r["patch"].__setitem__("attn_heads", [1, 1]), "patch.attn_heads must be null"),
    (lambda r: r["patch"].__setitem__("attn_heads", []), "patch.attn_heads must be null"),
    (lambda r: r["patch"].__setitem__("attn_heads", [-1]), "patch.attn_heads must be null"),
    (lambda r: r["patch"].__setitem__("attn_heads", [True]), "patch.attn_heads must be str or a list of int"),
    (lambda r: r["patch"].__setitem__("attn_heads", 2), "patch.attn_heads must be str or a list of int or null"),
    (lambda r: r["features"].__setitem__("graded_top", 0), "features.graded_top must be >= 1"),
    (lambda r: r["sae"].__setitem__("layers", [20, 24, 20]), "sae.layers lists 20 twice"),
    (lambda r: r["pair"]["edit"].__setitem__("heads", []), "pair.edit.heads must be null"),
    (lambda r: r["pair"]["edit"].__setitem__("heads", [0, -1]), "pair.edit.heads must be null"),
    (lambda r: r["transport"].__setitem__("sites", ["L24.resid_post"] * 2), "transport.sites lists 'L24.resid_post' twice"),
    (lambda r: r["patch"].__setitem__("ranks", [0, 8, "full", "full"]), "patch.ranks lists 'full' twice"),
    (lambda r: r["steer"].__setitem__("k_sweep", [1, 2, 2]), "steer.k_sweep lists 2 twice"),
    (lambda r: r["data"].__setitem__("sources", ["control", {"name": "x", "path": "x.jsonl"}, "control"]),
     "data.sources lists 'control' twice"),
    (lambda r: r["data"].__setitem__("eval_sources", [{"name": "x", "path": "x.jsonl"}] * 2),
     "data.eval_sources lists {'name': 'x', 'path': 'x.jsonl'} twice"),
    (lambda r: r["steer"].__setitem__("target_effect", 2), "steer.target_effect"),
    (lambda r: r["transport"].__setitem__("sites", ["L3.foo"]), r"^params.yaml: transport.sites: .*unknown site kind 'foo'"),
    (lambda r: r["steer"].__setitem__("sites", ["L3.foo"]), r"^params.yaml: steer.sites: .*unknown site kind 'foo'"),
    (lambda r: r["steer"].__setitem__("mc_budget", 1.5), "steer.mc_budget"),
    (lambda r: r["pair"]["finetune"].__setitem__("layers", []), "pair.finetune.layers is empty"),
    (lambda r: r["pair"]["finetune"].__setitem__("signature", " "), "pair.finetune.signature must be a non-empty"),
])
def test_bad_params_give_one_line_errors(tmp_path, mutate, match):
    with pytest.raises(MechdiffError, match=match) as e:
        load_params(_write(tmp_path, mutate))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,match", [
    ("min_effect", -1, "gates.min_effect must be >= 0"),
    ("min_kl", -1, "gates.min_kl must be >= 0"),
    ("sd_max", -1, "gates.sd_max must be > 0"),
    ("max_freq", -1, r"gates.max_freq must lie in \(0, 1\]"),
    # the gates' own rules (GateSettings), not a looser copy: these passed the check and failed the stage before
    ("match_cos", 0.0, r"gates.match_cos must lie in \(0, 1\]"),
    ("alpha", 1.0, r"gates.alpha must lie in \(0, 1\)"),
    ("min_regions", 0, r"gates.min_regions must be >= 1"),
    ("side_budget", 5.0, r"gates.side_budget must lie in \[0, 1\]"),
])
def test_gates_params_are_checked_by_the_gates_rules(tmp_path, key, value, match):
    from mechdiff.analysis.gate_settings import GateSettings

    with pytest.raises(MechdiffError, match="^params.yaml: " + match) as e:  # every stage's params check
        load_params(_write(tmp_path, lambda r: r["gates"].__setitem__(key, value)))
    assert "\n" not in str(e.value)
    with pytest.raises(MechdiffError, match="^" + match):  # the stage's settings: the same rule, the same words
        GateSettings(**{key: value})


def test_lists_that_may_repeat_values_load(tmp_path):
    """Equal fractions, prompts or patterns are not duplicates of one thing."""
    def mutate(r):
        r["data"]["splits"] = [0.4, 0.3, 0.3]
        r["geometry"]["prompts"] = [r["geometry"]["prompts"][0]] * 2
        # two subsets of one benchmark under one name: one dataset, not a repeated entry
        r["data"]["eval_sources"] = [{"name": "mmlu", "hf": "cais/mmlu", "config": c, "split": "test"}
                                     for c in ("astronomy", "anatomy")]
    p = load_params(_write(tmp_path, mutate))
    assert p.data.splits == [0.4, 0.3, 0.3] and len(p.data.eval_sources) == 2


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(MechdiffError, match="no "):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("rank: [1,\n")
    with pytest.raises(MechdiffError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("seed: 17\nrank: 8\npair:\n  base: {id: x\n  dtype: float32\n")  # unclosed flow mapping
    with pytest.raises(MechdiffError, match=r"not valid YAML \(line \d+, column \d+\)") as e:
        load_params(bad)
    assert "\n" not in str(e.value)
    # a key given twice (DVC's parser refuses the file; PyYAML alone would keep the last value), top level or nested
    for text, line, first in (("seed: 17\nrank: 8\nrank: 3\n", 3, 2),
                              ("seed: 17\nsae:\n  k: 32\n  layers: [1]\n  k: 16\n", 5, 3),
                              ("seed: 17\nsae: {k: 32, k: 16}\n", 2, 2)):
        bad.write_text(text)
        with pytest.raises(MechdiffError, match=rf"\(line {line}, column \d+\): key '(rank|k)' is given twice "
                                                rf"\(first on line {first}\): keep one$"):
            load_params(bad)
    # YAML's own overrides are no duplicates: an anchor merged in (`<<`) and a key of it set again; nor are keys
    # that only compare equal in Python (yes = True and 1)
    text = (ROOT / "params.yaml").read_text().replace("\nsae:\n", "\nsae_defaults: &sd {k: 16, expansion: 4}\nsae:\n  <<: *sd\n", 1)
    assert "<<: *sd" in text
    bad.write_text(text.replace("sae_defaults: &sd", "x-sae: &sd"))
    with pytest.raises(MechdiffError, match="unknown key"):  # the anchor's own section is not a params section
        load_params(bad)
    merged = yaml.safe_load(text)
    assert merged["sae"]["k"] == 32 and merged["sae"]["expansion"] == 8  # the explicit keys win over the merged ones
    import mechdiff.params as P

    assert yaml.load(text, Loader=P._UniqueKeyLoader) == merged
    assert yaml.load("a: {yes: 1, 1: 2}\n", Loader=P._UniqueKeyLoader)["a"][1] == 2  # refused before: one dict key


def test_a_tuned_model_needs_no_recipe(tmp_path):
    """pair.tuned.recipe is read only when pair.tuned.id is null: beside an id it may be null."""
    def given(r):
        r["pair"]["tuned"].update({"id": "org/tuned", "recipe": None})
    p = load_params(_write(tmp_path, given))
    assert p.pair.tuned.id == "org/tuned" and p.pair.tuned.recipe is None


def test_steer_groups_rule_is_the_largest_k_against_the_groups():
    """Difference-in-means directions of rank k need k prompt groups: the rule the steer stage and the check share."""
    s = Params().steer
    assert s.source == "dim" and max(s.k_sweep) == 8
    assert s.groups_problem(8) is None and s.groups_problem(40) is None
    assert s.groups_problem(7) == ("steer.k_sweep: k 8 needs at least as many prompt groups among the cultural train "
                                   "prompts; there are 7: lower steer.k_sweep or add groups")
    assert "prompts right; there are 3 at most:" in s.groups_problem(3, which=" right", at_most=True)
    assert dataclasses.replace(s, source="delta").groups_problem(1) is None  # only the dim directions need groups


def test_int_accepted_for_float(tmp_path):
    p = load_params(_write(tmp_path, lambda r: r["pair"]["finetune"].__setitem__("lr", 1)))
    assert p.pair.finetune.lr == 1.0 and isinstance(p.pair.finetune.lr, float)


def test_numbers_read_as_dvc_reads_them(tmp_path):
    """A hand-written 2e-4 is a number to DVC's YAML 1.2 reader (ruamel): the params read it the same, not as the
    string PyYAML's 1.1 rules give, and every other scalar keeps its type."""
    from ruamel.yaml import YAML

    from mechdiff.params import read_raw

    text = "a: 2e-4\nb: 17\nc: 1.5\nd: -3E+2\ne: 2.0e-4\nf: v1e5\ng: .5\nh: '2e-4'\ni: 1e3\n"
    (tmp_path / "x.yaml").write_text(text)
    ours, dvc = read_raw(tmp_path / "x.yaml"), YAML(typ="safe").load(text)
    assert ours == dvc and [type(v) for v in ours.values()] == [type(v) for v in dvc.values()]
    assert ours["a"] == 2e-4 and ours["h"] == "2e-4" and ours["b"] == 17
    yml = (ROOT / "params.yaml").read_text().replace("lr: 0.0002", "lr: 2e-4").replace("shrink: 0.05", "shrink: 5e-2")
    (tmp_path / "params.yaml").write_text(yml)
    p = load_params(tmp_path / "params.yaml")
    assert p.pair.finetune.lr == 2e-4 and p.transport.shrink == 0.05


def test_defaults_are_params_yaml():
    """Every default lives in one place: the dataclass defaults are exactly params.yaml."""
    assert load_params(ROOT / "params.yaml") == Params()


def test_loaded_params_record_the_keys_read(monkeypatch):
    monkeypatch.setattr(trace, "_params", set())
    p = load_params(ROOT / "params.yaml")
    assert trace.params_read() == set()  # loading and validating read nothing on a stage's behalf
    _ = p.extract.batch_size, p.pair.fairness, p.rank
    assert trace.params_read() == {"extract.batch_size", "rank"}  # a section object alone is no read
    vars(p.sae)
    dataclasses.asdict(p.pair.edit)
    assert trace.params_read() == {"extract.batch_size", "rank", "sae", "pair.edit.layer", "pair.edit.site",
                                   "pair.edit.rank", "pair.edit.scale", "pair.edit.heads"}
    assert json.loads(json.dumps(vars(p.extract))) == dataclasses.asdict(Params().extract)  # nothing extra in vars
    monkeypatch.setattr(trace, "_params", set())
    _ = Params().seed, Params().pair.base.id  # objects not made by load_params record nothing
    assert trace.params_read() == set()


def _param_keys(obj=None, prefix=""):
    obj = Params() if obj is None else obj
    for f in dataclasses.fields(obj):
        yield prefix + f.name
        if dataclasses.is_dataclass(getattr(obj, f.name)):
            yield from _param_keys(getattr(obj, f.name), f"{prefix}{f.name}.")


def test_messages_name_params_keys_in_full():
    """No string in the library or the stages names a params key by a tail of its path (fairness.enabled)."""
    full = set(_param_keys())
    bad = []
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "stages").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for word in re.findall(r"(?<![\w.])[a-z_]+(?:\.[a-z_]+)+", node.value):
                    if word not in full and any(k.endswith("." + word) for k in full):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {word}")
    assert not bad, "write the full params key:\n" + "\n".join(bad)


def test_tokenizer_mismatch_names_the_full_fairness_key(tiny_tok):
    from mechdiff.model.load import check_pair
    from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
    from tests.conftest import SENTENCES

    other = make_tiny_tokenizer(SENTENCES, extra_words=["sherkala"])
    a = make_tiny_model(len(tiny_tok), n_layers=2, d_model=16, seed=0)
    b = make_tiny_model(len(other), n_layers=2, d_model=16, seed=0)
    with pytest.raises(MechdiffError, match=r"set pair\.fairness\.enabled: true in params\.yaml") as e:
        check_pair(a, tiny_tok, b, other, fairness=False)
    assert "\n" not in str(e.value)
