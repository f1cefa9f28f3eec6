"""SAE training inputs: the one base/tuned token-pairing check on real activation stores."""

from __future__ import annotations

import numpy as np
import pytest

from mechdiff.analysis.features import analyse_features
from mechdiff.data.store import ActStore
from mechdiff.errors import MechdiffError
from mechdiff.sae.sources import (
    check_finite,
    check_paired,
    prompt_feature_means,
    read_source,
    rows_of,
    source_batches,
    source_rows,
    tokens_paired,
)

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


def planted_store(path, lens, tag: int) -> ActStore:
    """A store of len(lens) prompts with 'tokens' and 'last' views of SITE; token row = [prompt, position, tag, 0]."""
    lens = np.asarray(lens)
    n = len(lens)
    pos = np.concatenate([np.arange(k) for k in lens])
    X = np.stack([np.repeat(np.arange(n), lens), pos, np.full(pos.size, tag), np.zeros(pos.size)], 1).astype(np.float32)
    st = ActStore.create(path, prompt_ids=np.arange(n), n_tokens=lens, datasets=["x"] * n, splits=["train"] * n,
                         sites={SITE: 4}, views={SITE: ["tokens", "last"]}, tok_ids=100 * tag + np.arange(pos.size))
    with st.writer() as w:
        w.append({SITE: {"last": X[np.cumsum(lens) - 1]}}, {SITE: X}, n=n)
    return ActStore.open(path)


class _Identity:
    """A stand-in SAE whose latents are its inputs."""

    width = 4

    def encode(self, x):
        return x


def test_each_source_reads_its_own_store_rows_and_pairing_is_required(tmp_path):
    """Two tokenizers: prompts have different token counts per model. The tuned source reads the tuned store's
    rows (all of its tokens but position 0), never the base store's indices; sources that set base beside tuned
    rows refuse the tokens view with one line naming sae.view, and pair on the per-prompt views."""
    lens = {"base": [3, 2, 4], "tuned": [5, 2, 3]}
    base = planted_store(tmp_path / "b.zarr", lens["base"], 1)
    tuned = planted_store(tmp_path / "t.zarr", lens["tuned"], 2)
    pr = np.array([0, 2])
    for src, st, tag in (("base", base, 1), ("tuned", tuned, 2)):
        want = [[p, k, tag] for p in pr for k in range(1, lens[src][p])]
        rows = rows_of(src, base, tuned, "tokens", pr)
        np.testing.assert_array_equal(rows, source_rows(st, "tokens", pr))
        assert read_source(src, base, tuned, SITE, "tokens", rows)[:, :3].tolist() == want
        got = np.concatenate(list(source_batches(src, base, tuned, SITE, "tokens", rows, batch_size=2, seed=0,
                                                 epochs=1)))
        assert sorted(got[:, :3].tolist()) == want
        check_finite(src, base, tuned, SITE, "tokens", rows)
        means = prompt_feature_means(_Identity(), src, base, tuned, SITE, "tokens", pr)
        ref = [[p, np.mean(np.arange(1, lens[src][p])), tag, 0] for p in pr]
        np.testing.assert_allclose(means, ref)
    for src in ("delta", "crosscoder"):
        with pytest.raises(MechdiffError, match=f"token-level {src} rows do not pair up: set sae.view to last or mean"):
            rows_of(src, base, tuned, "tokens", pr)
        with pytest.raises(MechdiffError, match="sae.view"):
            prompt_feature_means(_Identity(), src, base, tuned, SITE, "tokens", pr)
    with pytest.raises(MechdiffError, match="Type A/B/C statistics do not pair up: set sae.view to last or mean"):
        analyse_features([0], lambda layer: {}, base, tuned, [], str, view="tokens")
    # per-prompt rows always pair: the delta of the last view is tuned - base of each prompt's last token
    rows = rows_of("delta", base, tuned, "last", pr)
    np.testing.assert_array_equal(rows, pr)
    want = [[0, lens["tuned"][p] - lens["base"][p], 1, 0] for p in pr]
    np.testing.assert_allclose(read_source("delta", base, tuned, SITE, "last", rows), want)


def test_holdout_prompts_is_a_seeded_disjoint_partition():
    from mechdiff.sae.sources import holdout_prompts

    rows = np.arange(100, 180)
    trained, held = holdout_prompts(rows, 0.05, seed=3)
    assert len(held) == 4 and len(trained) == 76  # ceil(0.05 x 80)
    assert np.array_equal(np.sort(np.concatenate([trained, held])), rows) and not set(trained) & set(held)
    again = holdout_prompts(rows, 0.05, seed=3)
    assert np.array_equal(again[1], held) and not np.array_equal(holdout_prompts(rows, 0.05, seed=4)[1], held)
    t0, h0 = holdout_prompts(rows, 0.0, seed=3)
    assert np.array_equal(t0, rows) and len(h0) == 0
    t1, h1 = holdout_prompts(rows[:2], 0.9, seed=3)  # never holds out every prompt
    assert len(t1) == 1 and len(h1) == 1


def test_source_rows_leave_out_the_sink_and_the_prompts_shared_prefix(tmp_path):
    """Token rows before the prompts' common opening ends (the same activations for every prompt) are not SAE
    data; a store without token ids or decisions drops position 0 only."""
    from mechdiff.model.tokens import shared_prefix
    from mechdiff.sae.sources import first_position

    ids = [[7, 8, 9, 1, 2], [7, 8, 9, 3], [7, 8, 9, 4, 5, 6]]
    dec = [4, 3, 4]
    lens = np.array([len(x) for x in ids])
    pos_all = np.concatenate([np.arange(n) for n in lens]).astype(np.float32)
    X = np.c_[pos_all, pos_all, pos_all, pos_all]  # every column: the token's position
    st = ActStore.create(tmp_path / "s.zarr", prompt_ids=np.arange(3), n_tokens=lens, datasets=["x"] * 3,
                         splits=["train"] * 3, sites={SITE: 4}, views={SITE: ["tokens"]}, attrs={},
                         tok_ids=np.concatenate(ids), decision=np.array(dec))
    with st.writer() as w:
        w.append({}, {SITE: X}, n=3)
    st = ActStore.open(tmp_path / "s.zarr")
    assert st.shared_prefix == shared_prefix(ids, dec) == 3 and first_position(st) == 3
    pos = st.index("tok_pos")[source_rows(st, "tokens", np.array([2, 0]))]
    assert pos.tolist() == [3, 4, 5, 3, 4]
    # per-prompt SAE means over the same rows: positions 3.. of each prompt
    means = prompt_feature_means(_Identity(), "base", st, st, SITE, "tokens", np.array([0, 1, 2]))
    np.testing.assert_allclose(means[:, 0], [3.5, 3.0, 4.0])
    plain = make_store(tmp_path / "p.zarr", lens, None)
    assert plain.shared_prefix == 0 and first_position(plain) == 1


def test_a_delta_of_identical_models_is_named(tmp_path):
    """Two stores of the same activations (pair.tuned = the base): the delta SAE's check says so in one line instead
    of failing later on an all-zero input scale; a store whose activations differ at one row passes."""
    base = planted_store(tmp_path / "b.zarr", [3, 2, 4], 1)
    same = planted_store(tmp_path / "s.zarr", [3, 2, 4], 1)
    rows = rows_of("delta", base, same, "last", np.arange(3))
    with pytest.raises(MechdiffError, match=r"activations at .*last equal the base's .* pair.tuned is the base itself"):
        check_finite("delta", base, same, SITE, "last", rows)
    check_finite("crosscoder", base, same, SITE, "last", rows)  # a crosscoder of one model is still defined
    other = planted_store(tmp_path / "o.zarr", [3, 2, 4], 2)
    check_finite("delta", base, other, SITE, "last", rows)
