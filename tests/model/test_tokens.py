"""Right padding: the one padder used by extraction batches and patching."""

import numpy as np
import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.model.tokens import Encoded, batches, encode, pad_id, right_pad
from tests.conftest import SENTENCES


def test_right_pad_against_numpy():
    """The one right-padder (batches, patching and the fine-tune use it): ids padded with `pad`, mask 1 on tokens."""
    seqs = [[5, 6, 7], [1], [2, 3]]
    for pad in (0, 9):
        ids, mask = right_pad(seqs, pad=pad)
        want = np.full((3, 3), pad, np.int64)
        want_m = np.zeros((3, 3), np.int64)
        for i, s in enumerate(seqs):
            want[i, : len(s)] = s
            want_m[i, : len(s)] = 1
        np.testing.assert_array_equal(ids.numpy(), want)
        np.testing.assert_array_equal(mask.numpy(), want_m)
        assert ids.dtype == torch.long and mask.dtype == torch.long
    with pytest.raises(MechdiffError):
        right_pad([], pad=0)


def test_batches_use_the_padder_and_sort_by_length():
    enc = Encoded(ids=[[1, 2, 3, 4], [5], [6, 7]], decision=[3, 0, 1])
    got = list(batches(enc, [0, 1, 2], 2, pad=9))
    rows0, ids0, mask0, pos0 = got[0]
    np.testing.assert_array_equal(rows0, [1, 2])
    np.testing.assert_array_equal(ids0.numpy(), [[5, 9], [6, 7]])
    np.testing.assert_array_equal(mask0.numpy(), [[1, 0], [1, 1]])
    np.testing.assert_array_equal(pos0.numpy(), [0, 1])


def test_encode_records_the_tokenizers_pad_id(tiny_tok):
    """The pad id travels with the encoding (patching and SAE splicing pad with it): pad, else eos, else 0."""
    enc = encode(tiny_tok, SENTENCES[:3])
    assert enc.pad == pad_id(tiny_tok) and Encoded([[1]], [0]).pad == 0

    class Tok:
        pad_token_id, eos_token_id = None, 7

    assert pad_id(Tok()) == 7
    Tok.eos_token_id = None
    assert pad_id(Tok()) == 0


def test_shared_prefix_against_a_brute_force_reference():
    from mechdiff.model.tokens import shared_prefix

    rng = np.random.default_rng(3)
    for _ in range(200):
        head = list(rng.integers(0, 3, size=int(rng.integers(0, 6))))
        ids = [head + list(rng.integers(0, 3, size=int(rng.integers(1, 6)))) for _ in range(int(rng.integers(1, 5)))]
        dec = [int(rng.integers(0, len(x))) for x in ids]
        want = 0
        while (all(len(x) > want + 1 for x in ids) and want < min(dec)
               and all(x[want] == ids[0][want] for x in ids)):
            want += 1
        assert shared_prefix(ids, dec) == want == Encoded(ids, dec).shared_prefix
        assert shared_prefix(ids) >= want
    assert shared_prefix([]) == 0
    assert shared_prefix([[5, 6, 7], [5, 6, 7]]) == 2  # identical prompts keep their last token
    assert shared_prefix([[5, 6, 7, 8], [5, 6, 7, 9]], [1, 3]) == 1  # never past a decision token


def test_the_chat_templates_constant_opening_is_the_shared_prefix(tiny_tok):
    enc = encode(tiny_tok, SENTENCES[:6])
    opening = tiny_tok(tiny_tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    n = enc.shared_prefix
    assert n >= 1 and all(x[:n] == opening[:n] for x in enc.ids)
    assert len({x[n] for x in enc.ids}) > 1  # the prompts differ right after it
