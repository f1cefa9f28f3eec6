"""The one KL: against scipy's rel_entr on softmaxes, for numpy and torch, full and restricted vocabularies."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as sp_log_softmax
from scipy.special import rel_entr, softmax

from mechdiff.errors import MechdiffError
from mechdiff.stats.kl import allowed_index, kl_divergence, log_softmax


def _ref(p, q):
    return rel_entr(softmax(p, axis=1), softmax(q, axis=1)).sum(axis=1)


def test_numpy_and_torch_agree_with_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(5, 40)) * 3, rng.normal(size=(5, 40)) * 3
    got = kl_divergence(p, q)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (5,)
    np.testing.assert_allclose(got, _ref(p, q), rtol=1e-10)
    t = kl_divergence(torch.tensor(p, dtype=torch.float32), torch.tensor(q, dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), _ref(p.astype(np.float32), q.astype(np.float32)), rtol=1e-6)
    np.testing.assert_allclose(kl_divergence(p[0], q[0]), _ref(p[:1], q[:1]), rtol=1e-10)  # one row as (V,)
    np.testing.assert_allclose(log_softmax(p), sp_log_softmax(p, axis=1), rtol=1e-12)
    np.testing.assert_allclose(log_softmax(torch.tensor(p)).numpy(), sp_log_softmax(p, axis=1), rtol=1e-12)


def test_allowed_ids_renormalise_on_the_subset():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(4, 25)), rng.normal(size=(4, 25))
    ids = np.array([1, 4, 7, 20])
    want = _ref(p[:, ids], q[:, ids])
    np.testing.assert_allclose(kl_divergence(p, q, ids), want, rtol=1e-10)
    mask = np.zeros(25, bool)
    mask[ids] = True
    np.testing.assert_allclose(kl_divergence(p, q, mask), want, rtol=1e-10)
    np.testing.assert_allclose(kl_divergence(torch.tensor(p), torch.tensor(q), ids).numpy(), want, rtol=1e-10)
    assert allowed_index(np.arange(25)[::-1], 25) is None  # the whole vocabulary: a no-op
    np.testing.assert_array_equal(allowed_index(mask, 25), ids)


def test_masked_and_degenerate_logits():
    p = np.array([[0.0, -np.inf, 1.0]])
    q = np.array([[0.0, 2.0, 1.0]])
    np.testing.assert_allclose(kl_divergence(p, q), _ref(np.array([[0.0, -50.0, 1.0]]), q), atol=1e-12)
    assert np.isposinf(kl_divergence(q, p)).all()  # q puts mass where p has none
    with pytest.raises(MechdiffError, match="entirely -inf"):
        kl_divergence(np.full((1, 3), -np.inf), q)


def test_bad_input_is_one_line_error():
    with pytest.raises(MechdiffError, match="p_logits"):
        kl_divergence(np.array([[np.nan, 1.0]]), np.zeros((1, 2)))
    with pytest.raises(MechdiffError, match="same shape"):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(MechdiffError, match="both"):
        kl_divergence(np.zeros((2, 3)), torch.zeros(2, 3))
    with pytest.raises(MechdiffError, match="empty"):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 3)), np.array([], dtype=int))
    with pytest.raises(MechdiffError, match="out of range"):
        allowed_index([0, 5], 5)


def test_kl_against_scipy_and_masking():
    rng = np.random.default_rng(3)
    p, q = rng.normal(size=(6, 30)) * 2, rng.normal(size=(6, 30)) * 2
    ref = rel_entr(softmax(p, axis=1), softmax(q, axis=1)).sum(axis=1)
    np.testing.assert_allclose(kl_divergence(p, q), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kl_divergence(torch.tensor(p), torch.tensor(q)), ref, rtol=1e-10)
    np.testing.assert_allclose(kl_divergence(p, p), 0.0, atol=1e-14)
    allowed = np.array([0, 3, 4, 10, 29])
    ref_m = rel_entr(softmax(p[:, allowed], axis=1), softmax(q[:, allowed], axis=1)).sum(axis=1)
    np.testing.assert_allclose(kl_divergence(p, q, allowed=allowed), ref_m, rtol=1e-10)
    mask = np.zeros(30, bool)
    mask[allowed] = True
    np.testing.assert_allclose(kl_divergence(p, q, allowed=mask), ref_m, rtol=1e-10)
    # -inf (masked) logits on p contribute zero mass
    p2 = p.copy()
    p2[:, 5] = -np.inf
    assert np.isfinite(kl_divergence(p2, q)).all()
    np.testing.assert_allclose(np.exp(log_softmax(p)).sum(axis=1), 1.0)


def test_kl_bad_input():
    with pytest.raises(MechdiffError):
        kl_divergence(np.array([[np.nan, 1.0]]), np.zeros((1, 2)))
    with pytest.raises(MechdiffError):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(MechdiffError):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 3)), allowed=np.array([], dtype=int))
