"""Right padding: the one padder used by extraction batches and patching."""

import numpy as np
import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.model.tokens import Encoded, batches, right_pad


def test_right_pad_against_numpy():
    seqs = [[5, 6, 7], [1], [2, 3]]
    ids, mask = right_pad(seqs, pad=0)
    want = np.zeros((3, 3), np.int64)
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
