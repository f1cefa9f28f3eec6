"""memo.Memo: least-recently-used within a byte budget, checked against a plain-list model of the same rule."""

import random

import torch

from mechdiff.model.memo import Memo, nbytes


def test_memo_matches_a_reference_lru_and_keeps_its_byte_total():
    rng = random.Random(3)
    budget = 4000
    memo = Memo(budget)
    ref: list[tuple[int, int]] = []  # (key, bytes), oldest first
    for _ in range(400):
        key = rng.randrange(12)
        if rng.random() < 0.4:
            got = memo.get(key)
            hit = [e for e in ref if e[0] == key]
            assert (got is None) == (not hit)
            if hit:
                ref.remove(hit[0])
                ref.append(hit[0])
                assert nbytes(got) == hit[0][1]
            continue
        n = rng.randrange(1, 1400)  # float32 elements: up to 5.6 kB, some over the budget
        value = (torch.zeros(n), [torch.zeros(n // 2, dtype=torch.float64)], "tag")
        size = nbytes(value)
        assert size == 4 * n + 8 * (n // 2)
        ref = [e for e in ref if e[0] != key]
        memo.put(key, value)
        if size <= budget:
            ref.append((key, size))
            while sum(s for _, s in ref) > budget and len(ref) > 1:
                ref.pop(0)
        assert [k for k, _ in memo.items()] == [k for k, _ in ref]
        assert memo.total == sum(s for _, s in ref) == sum(nbytes(v) for v in memo.values())
        assert memo.total <= budget
    assert len(memo) == len(ref) > 0
