"""SAE training inputs: the one base/tuned token-pairing check on real activation stores."""

from __future__ import annotations

import numpy as np
import pytest

from mechdiff.data.store import ActStore
from mechdiff.errors import MechdiffError
from mechdiff.sae.sources import check_paired, tokens_paired

SITE = "L0.resid_post"


def make_store(path, lens, tok_ids, *, attrs=None, d: int = 4) -> ActStore:
    """A complete store of len(lens) prompts with a tokens view of SITE (random activations)."""
    lens = np.asarray(lens)
    n = len(lens)
    st = ActStore.create(path, prompt_ids=np.arange(n), n_tokens=lens, datasets=["x"] * n, splits=["train"] * n,
                         sites={SITE: d}, views={SITE: ["tokens"]}, attrs=attrs or {},
                         tok_ids=None if tok_ids is None else np.asarray(tok_ids))
    X = np.random.default_rng(0).normal(size=(int(lens.sum()), d)).astype(np.float32)
    with st.writer() as w:
        w.append({}, {SITE: X}, n=n)
    return ActStore.open(path)


def test_tokens_paired_compares_the_given_prompts(tmp_path):
    lens = [3, 2, 4]
    ids = np.arange(9)
    base = make_store(tmp_path / "b.zarr", lens, ids)
    assert tokens_paired(base, make_store(tmp_path / "same.zarr", lens, ids))
    other = ids.copy()
    other[5] = 99  # prompt 2's first token (prompts 0, 1 hold tokens 0..4)
    tuned = make_store(tmp_path / "t.zarr", lens, other)
    assert not tokens_paired(base, tuned)
    assert not tokens_paired(base, tuned, np.array([2]))
    assert tokens_paired(base, tuned, np.array([0, 1]))
    with pytest.raises(MechdiffError, match="sae.view"):
        check_paired(base, tuned, "tokens")
    check_paired(base, tuned, "last")  # per-prompt rows pair up whatever the tokens
    longer = make_store(tmp_path / "l.zarr", [3, 3, 3], ids)
    assert not tokens_paired(base, longer, np.array([0]) + 1)
    assert tokens_paired(base, longer, np.array([0]))


def test_tokens_paired_needs_token_ids_or_matching_fingerprints(tmp_path):
    lens = [2, 2]
    base = make_store(tmp_path / "b.zarr", lens, None)
    tuned = make_store(tmp_path / "t.zarr", lens, None)
    assert not tokens_paired(base, tuned)  # nothing shows the tokens are the same
    sha = {"token_ids_sha": "abc"}
    assert tokens_paired(make_store(tmp_path / "b2.zarr", lens, None, attrs=sha),
                         make_store(tmp_path / "t2.zarr", lens, None, attrs=sha))
    assert not tokens_paired(base, make_store(tmp_path / "short.zarr", [2], None))


def test_tokens_paired_on_encodings():
    from mechdiff.model.tokens import Encoded

    a = Encoded(ids=[[1, 2, 3], [4, 5]], decision=[2, 1])
    assert tokens_paired(a, Encoded(ids=[[1, 2, 3], [4, 5]], decision=[2, 1]))
    b = Encoded(ids=[[1, 2, 3], [4, 6]], decision=[2, 1])
    assert not tokens_paired(a, b) and tokens_paired(a, b, np.array([0]))
    assert not tokens_paired(a, Encoded(ids=[[1, 2, 3], [4, 5]], decision=[2, 0]))
    with pytest.raises(MechdiffError, match="two ActStores or two Encoded"):
        tokens_paired(a, [[1, 2, 3]])
