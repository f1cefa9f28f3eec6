"""Tests for mechdiff.data.fairness: shared vocabulary, prompt filter, logit masks and aligned logits."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mechdiff.data.corpus import Prompt
from mechdiff.data.fairness import (
    aligned_logits,
    filter_prompts,
    no_prompts_kept,
    shared_vocab,
)
from mechdiff.errors import MechdiffError
from mechdiff.model.tiny import make_tiny_tokenizer

TEXT_A = ["the cat sat on the mat .", "a red bird sang"]
TEXT_B = ["the dog sat on a log .", "the blue cow slept"]
B_EXTRA = ["bird"]  # appended after the sorted words: the id order of shared strings differs from A's


@pytest.fixture(scope="module")
def toks():
    return make_tiny_tokenizer(TEXT_A), make_tiny_tokenizer(TEXT_B, extra_words=B_EXTRA)


@pytest.fixture(scope="module")
def sv(toks):
    return shared_vocab(*toks)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def test_shared_sets_match_python_intersection(toks, sv):
    a, b = toks
    va, vb = a.get_vocab(), b.get_vocab()
    shared = set(va) & set(vb)
    assert not sv.identical
    assert sv.n_shared == len(shared)
    assert sv.allowed_a.dtype == np.int64 and sv.allowed_b.dtype == np.int64
    assert np.all(np.diff(sv.allowed_a) > 0) and np.all(np.diff(sv.allowed_b) > 0)
    assert set(sv.allowed_a.tolist()) == {va[s] for s in shared}
    assert set(sv.allowed_b.tolist()) == {vb[s] for s in shared}
    # the word lists differ, so the same string has different ids on the two sides for some tokens
    assert any(va[s] != vb[s] for s in shared)
    inv_a, inv_b = {i: s for s, i in va.items()}, {i: s for s, i in vb.items()}
    assert [inv_a[i] for i in sv.pair_a] == [inv_b[i] for i in sv.pair_b]
    assert sorted(inv_a[i] for i in sv.pair_a) == sorted(shared)


# hand-computed: shared words are {the, sat, on, a, bird, .}; cat/mat/red/sang only in A, dog/log/blue/cow/slept only in B
CASES = [
    "the cat sat on the mat.",  # 5 of 7 shared on both sides (A: cat, mat; B: two unknown tokens)
    "the sat on the.",  # all shared
    "the dog sat on the log.",  # 5 of 7
    "cat.",  # 1 of 2
    "the the the the the the the the the cat",  # 9 of 10
    "the bird sat.",  # all shared
]


@pytest.mark.parametrize(
    "mode,min_ratio,expected",
    [("strict", 0.9, [1, 5]), ("ratio", 0.7, [0, 1, 2, 4, 5]), ("ratio", 0.9, [1, 4, 5]),
     ("ratio", 0.5, [0, 1, 2, 3, 4, 5]), ("ratio", 0.95, [1, 5])],
)
def test_filter_hand_computed(toks, sv, mode, min_ratio, expected):
    a, b = toks
    assert filter_prompts(CASES, a, b, sv, mode=mode, min_ratio=min_ratio) == expected
    # Prompt objects work the same, and chat rendering does not count the template's tokens
    prompts = [Prompt(pid=i, text=t, dataset="x") for i, t in enumerate(CASES)]
    assert filter_prompts(prompts, a, b, sv, mode=mode, min_ratio=min_ratio, chat=True) == expected


def test_filter_matches_word_reference(toks, sv):
    a, b = toks
    shared = set(_words(" ".join(TEXT_A))) & set(_words(" ".join(TEXT_B + B_EXTRA)))
    rng = np.random.default_rng(0)
    pool = sorted(set(_words(" ".join(TEXT_A + TEXT_B))) | {"zebra"})
    texts = [" ".join(rng.choice(pool, size=int(rng.integers(3, 9)))) for _ in range(60)]
    for mode, thr in (("strict", 1.0), ("ratio", 0.6)):
        ref = [i for i, t in enumerate(texts) if np.mean([w in shared for w in _words(t)]) >= thr]
        assert filter_prompts(texts, a, b, sv, mode=mode, min_ratio=thr) == ref
    assert 0 < len(ref) < len(texts)


def test_chat_template_tokens_are_not_counted(toks):
    a, _ = toks
    # B's template wraps the text in words A does not know; only the prompt's own tokens may be judged
    b = make_tiny_tokenizer(TEXT_B, extra_words=[*B_EXTRA, "speaker", "reply"])
    b.chat_template = ("{% for m in messages %}<|im_start|>speaker\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>reply\n{% endif %}")
    sv2 = shared_vocab(a, b)
    assert "speaker" not in a.get_vocab()
    rendered = b.apply_chat_template([{"role": "user", "content": CASES[1]}], tokenize=False,
                                     add_generation_prompt=True)
    ids = b(rendered, add_special_tokens=False)["input_ids"]
    assert np.isin(ids, sv2.allowed_b).mean() < 1.0  # the whole rendering is not fully shared
    assert filter_prompts(CASES, a, b, sv2, mode="strict", chat=True) == [1, 5]


def test_filter_bad_args(toks, sv):
    a, b = toks
    with pytest.raises(MechdiffError):
        filter_prompts(CASES, a, b, sv, mode="loose")
    with pytest.raises(MechdiffError):
        filter_prompts(CASES, a, b, sv, mode="ratio", min_ratio=1.5)
    with pytest.raises(MechdiffError):
        filter_prompts([], a, b, sv)
    with pytest.raises(MechdiffError):
        filter_prompts(["ok", "  "], a, b, sv)


def test_aligned_logits_pairs_strings(toks, sv):
    a, b = toks
    va, vb = a.get_vocab(), b.get_vocab()
    rng = np.random.default_rng(2)
    la = rng.normal(size=(3, len(va)))
    lb = rng.normal(size=(3, len(vb)))
    for s in set(va) & set(vb):  # plant: model b gives every shared string model a's logit
        lb[:, vb[s]] = la[:, va[s]]
    xa, xb = aligned_logits(la, lb, sv)
    assert xa.shape == (3, sv.n_shared)
    np.testing.assert_array_equal(xa, xb)
    ta, tb = aligned_logits(torch.from_numpy(la), torch.from_numpy(lb), sv)
    assert torch.equal(ta, tb)
    kl = torch.sum(torch.softmax(ta, -1) * (torch.log_softmax(ta, -1) - torch.log_softmax(tb, -1)), -1)
    assert float(kl.abs().max()) == 0.0
    # unaligned columns would not match: the alignment is what makes the comparison fair
    assert not np.array_equal(la[:, sv.allowed_a], lb[:, sv.allowed_b])
    with pytest.raises(MechdiffError):
        aligned_logits(la[:, :3], lb, sv)


class _NoTokenize:
    """A tokenizer stand-in that fails if anything tries to tokenise with it."""

    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenised although the vocabularies are identical")

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("rendered although the vocabularies are identical")


def test_identical_tokenizers_are_noops(toks):
    a, _ = toks
    a2 = make_tiny_tokenizer(TEXT_A)
    sv = shared_vocab(a, a2)
    assert sv.identical and sv.n_shared == len(a.get_vocab())
    np.testing.assert_array_equal(sv.allowed_a, np.arange(len(a)))
    stub = _NoTokenize(a.get_vocab())
    sv_stub = shared_vocab(stub, stub)
    assert sv_stub.identical
    texts = ["anything at all", "zebra zebra", "x"]
    assert filter_prompts(texts, stub, stub, sv_stub, mode="strict") == [0, 1, 2]
    x = torch.randn(2, len(a))
    xa, xb = aligned_logits(x, x, sv)
    assert xa is x and xb is x


def test_no_shared_strings_is_an_error():
    class V:
        def __init__(self, words):
            self.words = words

        def get_vocab(self):
            return {w: i for i, w in enumerate(self.words)}

    with pytest.raises(MechdiffError):
        shared_vocab(V(["a", "b"]), V(["c", "d"]))


def test_nothing_kept_says_what_to_change_per_mode(toks, sv):
    """Prompts made of words only one tokenizer has: both modes keep none, and the error names the param that
    can help under each mode."""
    a, b = toks
    only_a = sorted(set(a.get_vocab()) - set(b.get_vocab()) - {"<unk>"})
    texts = [" ".join(only_a[:3]), " ".join(only_a[3:6])]
    assert filter_prompts(texts, a, b, sv, mode="strict") == []
    assert filter_prompts(texts, a, b, sv, mode="ratio", min_ratio=0.5) == []
    assert "pair.fairness.mode: ratio" in no_prompts_kept("strict", 0.9, sv.n_shared)
    msg = no_prompts_kept("ratio", 0.5, sv.n_shared)
    assert "pair.fairness.min_shared_ratio" in msg and "0.5" in msg and "\n" not in msg
