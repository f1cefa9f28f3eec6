"""params.yaml loading: types, choices and one-line errors."""

from pathlib import Path

import pytest
import yaml

from mechdiff.errors import MechdiffError
from mechdiff.params import load_params, rank_value

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
    assert rank_value("full") is None and rank_value(8) == 8


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["extract"].__setitem__("batch_size", "abc"), "extract.batch_size must be int"),
    (lambda r: r["extract"].__setitem__("batch_size", 0), "extract.batch_size must be >= 1"),
    (lambda r: r.__setitem__("rank", -3), "rank must be"),
    (lambda r: r.__setitem__("rank", "most"), "rank must be"),
    (lambda r: r["transport"].__setitem__("solver", "magic"), "choose one of"),
    (lambda r: r["data"].__setitem__("splits", [0.5, 0.5, 0.5]), "sum"),
    (lambda r: r["extract"].__setitem__("bogus", 1), "unknown key extract.bogus"),
    (lambda r: r["transport"].__setitem__("sites", ["layer3"]), "bad site name"),
    (lambda r: r.__setitem__("alpha", -1), "alpha"),
    (lambda r: r["sae"].__setitem__("sources", ["base", "chat"]), "sae.sources"),
])
def test_bad_params_give_one_line_errors(tmp_path, mutate, match):
    with pytest.raises(MechdiffError, match=match) as e:
        load_params(_write(tmp_path, mutate))
    assert "\n" not in str(e.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(MechdiffError, match="no "):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("rank: [1,\n")
    with pytest.raises(MechdiffError, match="not valid YAML"):
        load_params(bad)


def test_int_accepted_for_float(tmp_path):
    p = load_params(_write(tmp_path, lambda r: r["pair"]["finetune"].__setitem__("lr", 1)))
    assert p.pair.finetune.lr == 1.0 and isinstance(p.pair.finetune.lr, float)
