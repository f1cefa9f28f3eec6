"""Both models of a pair read the same prompts: a tokenizer saved without a chat template (a base model beside its
chat tune, or a tune saved without its base's template) takes the other model's, in the model stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mechdiff.errors import MechdiffError
from mechdiff.model.load import (
    load_spec_tokenizer,
    load_tokenizer,
    pair_template_warning,
    shared_chat_template,
    take_pair_template,
    template_fits,
    templates_differ,
)
from mechdiff.model.tiny import CHAT_TEMPLATE, make_tiny_tokenizer, save_tiny_pair_dir
from mechdiff.model.tokens import encode

ROOT = Path(__file__).resolve().parents[2]
OTHER = CHAT_TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>system")  # another generation prompt
TEXTS = ["what do people eat for breakfast ?", "name a festival of lights .", "how many legs has a spider ?"]


def _tok(template: str | None):
    tok = make_tiny_tokenizer(TEXTS)
    tok.chat_template = template
    return tok


def test_a_tokenizer_without_a_template_takes_the_others():
    with_t, without = _tok(CHAT_TEMPLATE), _tok(None)
    assert shared_chat_template(without, with_t) == CHAT_TEMPLATE
    assert shared_chat_template(with_t, without) is None  # it keeps its own
    assert shared_chat_template(with_t, _tok(OTHER)) is None
    assert shared_chat_template(without, _tok(None)) is None  # neither: both read the raw text
    # before, the two read other tokens (raw text after a BOS vs the templated prompt); after, the same
    assert encode(without, TEXTS, chat=True).ids != encode(with_t, TEXTS, chat=True).ids
    without.chat_template = shared_chat_template(without, with_t)
    a, b = encode(without, TEXTS, chat=True), encode(with_t, TEXTS, chat=True)
    assert a.ids == b.ids and a.decision == b.decision


@pytest.mark.parametrize("mode, base_after, tuned_after", [
    ("auto", CHAT_TEMPLATE, CHAT_TEMPLATE),  # the base has none: it takes the tuned one's
    ("own", None, CHAT_TEMPLATE),
    ("base", None, CHAT_TEMPLATE),  # the base has nothing to give; it cannot take under "base"
    ("tuned", CHAT_TEMPLATE, CHAT_TEMPLATE),
])
def test_take_pair_template_follows_the_mode(mode, base_after, tuned_after):
    base, tuned = _tok(None), _tok(CHAT_TEMPLATE)
    took = take_pair_template(base, tuned, "base", mode)
    assert (took is not None) == (base_after is not None)
    take_pair_template(tuned, base, "tuned", mode)
    assert (base.chat_template, tuned.chat_template) == (base_after, tuned_after)
    assert (pair_template_warning(base, tuned) is None) == (base_after is not None)


def test_a_named_model_replaces_the_others_different_template():
    base, tuned = _tok(CHAT_TEMPLATE), _tok(OTHER)
    assert "different chat templates" in pair_template_warning(base, tuned)
    assert take_pair_template(base, tuned, "base", "auto") is None  # auto keeps two templates apart
    assert "data.chat_template: base" in take_pair_template(tuned, base, "tuned", "base")
    assert tuned.chat_template == CHAT_TEMPLATE and pair_template_warning(base, tuned) is None


def _plain_tokenizer():
    """A word-level tokenizer of TEXTS without the template's markers (<|im_start|>, <|im_end|>) in its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()} | {"user", "assistant"})
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_a_template_whose_tokens_the_vocabulary_lacks_is_not_shared():
    plain, with_t = _plain_tokenizer(), _tok(CHAT_TEMPLATE)
    assert not template_fits(plain, with_t) and template_fits(_tok(None), with_t)
    assert shared_chat_template(plain, with_t) is None  # it would read the markers as unknown pieces


def test_a_template_that_cannot_render_a_user_message_is_not_shared():
    broken = _tok("{{ raise_exception('a system message first') }}")
    assert shared_chat_template(_tok(None), broken) is None
    assert templates_differ(_tok(CHAT_TEMPLATE), broken)


def test_templates_differ_compares_rendered_tokens():
    assert not templates_differ(_tok(CHAT_TEMPLATE), _tok(CHAT_TEMPLATE))
    assert not templates_differ(_tok(CHAT_TEMPLATE), _tok(None))  # a missing one is shared, not different
    # the same rendering from another template text is no difference; another role name is
    assert not templates_differ(_tok(CHAT_TEMPLATE), _tok(CHAT_TEMPLATE.replace("{{", "{{ ").replace("}}", " }}")))
    assert templates_differ(_tok(CHAT_TEMPLATE), _tok(OTHER))


def _model_dir(path: Path, template: str | None) -> Path:
    d = save_tiny_pair_dir(path, TEXTS, n_layers=2, d_model=16, seed=0)
    tok = load_tokenizer(d)
    if template is None:
        for f in d.glob("chat_template*"):
            f.unlink()
        tok.chat_template = None
        tok.save_pretrained(d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        assert load_tokenizer(d).chat_template is None
    return d


def _run(repo: Path, which: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "models.py"), which], cwd=repo, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _pair(tmp_path: Path, templates: dict, mode: str = "auto") -> tuple[Path, str]:
    """Run model_base and model_tuned on two tiny model folders with these chat templates (None = none) under
    data.chat_template `mode`; (repo, both stages' output)."""
    dirs = {w: _model_dir(tmp_path / f"src_{w}", None if templates[w] is None else CHAT_TEMPLATE)
            for w in ("base", "tuned")}
    for w, t in templates.items():
        if t not in (None, CHAT_TEMPLATE):
            tok = load_tokenizer(dirs[w])
            tok.chat_template = t
            tok.save_pretrained(dirs[w])
    repo = _repo(tmp_path, dirs["base"], dirs["tuned"], mode)
    return repo, _run(repo, "base").stdout + _run(repo, "tuned").stdout


def _repo(tmp_path: Path, base: Path, tuned: Path, mode: str = "auto") -> Path:
    """A folder with the project's params.yaml pointed at the two model folders, under data.chat_template `mode`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["pair"]["base"] = {"id": str(base), "gguf_file": None, "revision": None}
    p["pair"]["tuned"] = {"id": str(tuned), "recipe": None}
    p["data"]["chat_template"] = mode
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return repo


def _saved(repo: Path) -> dict:
    return {w: load_tokenizer(repo / "artifacts" / "models" / w) for w in ("base", "tuned")}


@pytest.mark.parametrize("missing", ["base", "tuned"])
def test_model_stages_give_the_pair_one_template(tmp_path, missing):
    repo, out = _pair(tmp_path, {"base": CHAT_TEMPLATE, "tuned": CHAT_TEMPLATE, missing: None})
    assert f"the {missing} tokenizer takes the" in out and "it has none" in out
    assert "warning" not in out
    saved = _saved(repo)
    assert saved["base"].chat_template == saved["tuned"].chat_template == CHAT_TEMPLATE
    a, b = (encode(saved[w], TEXTS, chat=True) for w in ("base", "tuned"))
    assert a.ids == b.ids and a.decision == b.decision
    meta = json.loads((repo / "artifacts" / "models" / missing / "mechdiff_model.json").read_text())
    assert "chat_template" in meta


@pytest.mark.parametrize("mode", ["base", "tuned"])
def test_chat_template_param_gives_both_models_the_named_ones(tmp_path, mode):
    templates = {"base": CHAT_TEMPLATE, "tuned": OTHER}
    repo, out = _pair(tmp_path, templates, mode)
    assert f"data.chat_template: {mode}" in out and "warning" not in out
    saved = _saved(repo)
    assert saved["base"].chat_template == saved["tuned"].chat_template == templates[mode]
    assert encode(saved["base"], TEXTS).ids == encode(saved["tuned"], TEXTS).ids


def test_different_templates_are_kept_with_a_warning_under_auto(tmp_path):
    repo, out = _pair(tmp_path, {"base": CHAT_TEMPLATE, "tuned": OTHER})
    assert "different chat templates" in out and "data.chat_template: base or tuned" in out
    saved = _saved(repo)
    assert (saved["base"].chat_template, saved["tuned"].chat_template) == (CHAT_TEMPLATE, OTHER)


def test_own_keeps_a_missing_template_missing_with_a_warning(tmp_path):
    repo, out = _pair(tmp_path, {"base": None, "tuned": CHAT_TEMPLATE}, "own")
    assert "only the tuned tokenizer has a chat template" in out
    assert not _saved(repo)["base"].chat_template


def test_a_model_folder_without_a_tokenizer_is_one_line(tmp_path):
    d = _model_dir(tmp_path / "m", CHAT_TEMPLATE)
    for f in [*d.glob("tokenizer*"), *d.glob("chat_template*"), *d.glob("special_tokens*")]:
        f.unlink()
    with pytest.raises(MechdiffError, match="no usable tokenizer"):
        load_spec_tokenizer(str(d))


def test_a_base_that_cannot_take_the_template_keeps_reading_raw_text_with_a_warning(tmp_path):
    from mechdiff.model.tiny import make_tiny_model

    plain = _plain_tokenizer()
    base = tmp_path / "src_base"
    make_tiny_model(len(plain), n_layers=2, d_model=16, seed=0).save_pretrained(base)
    plain.save_pretrained(base)
    repo = _repo(tmp_path, base, _model_dir(tmp_path / "src_tuned", CHAT_TEMPLATE))
    base_out, tuned_out = _run(repo, "base").stdout, _run(repo, "tuned").stdout
    assert "takes the" not in base_out
    assert "only the tuned tokenizer has a chat template" in tuned_out and "lacks the template's tokens" in tuned_out
    assert not load_tokenizer(repo / "artifacts" / "models" / "base").chat_template
