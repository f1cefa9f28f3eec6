"""The one bootstrap: scipy percentile CIs checked against an independent numpy resampling loop."""

import json

import numpy as np
import pytest

from mechdiff.errors import MechdiffError
from mechdiff.io import write_json
from mechdiff.stats.bootstrap import KL_NOISE_FLOOR, drop_pct, drop_pct_ci, mean_ci, rows_ci


def _numpy_boot(stat, n, n_boot, seed, chunk):
    """Resample index rows with numpy directly (chunks of `chunk` draws) and take 2.5/97.5 percentiles."""
    rng = np.random.default_rng(seed)
    vals = []
    for s in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - s), n))
        vals.extend(stat(i) for i in idx)
    v = np.array(vals)
    v = v[np.isfinite(v)]
    return np.percentile(v, [2.5, 97.5])


def test_mean_ci_matches_numpy_resampling():
    x = np.random.default_rng(0).gamma(2.0, size=57)
    m, lo, hi = mean_ci(x, n_boot=700, seed=4)
    assert m == pytest.approx(x.mean())
    np.testing.assert_allclose([lo, hi], _numpy_boot(lambda i: x[i].mean(), x.size, 700, 4, 256), rtol=1e-12)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert mean_ci([2.5]) == (2.5, 2.5, 2.5)
    with pytest.raises(MechdiffError):
        mean_ci([])
    with pytest.raises(MechdiffError):
        mean_ci([1.0, np.nan])
    with pytest.raises(MechdiffError):
        mean_ci([1.0, 2.0], n_boot=0)


def test_drop_pct_ci_paired_and_planted():
    rng = np.random.default_rng(1)
    raw = rng.exponential(size=120) + 0.1
    mapped = raw * rng.uniform(0.2, 0.9, size=120)
    d = drop_pct_ci(raw, mapped, n_boot=500, seed=2)
    assert d["drop_pct"] == pytest.approx(100 * (raw.mean() - mapped.mean()) / raw.mean())
    ref = _numpy_boot(lambda i: 100 * (raw[i].mean() - mapped[i].mean()) / raw[i].mean(), raw.size, 500, 2, 256)
    np.testing.assert_allclose([d["ci_low"], d["ci_high"]], ref, rtol=1e-12)
    planted = drop_pct_ci(raw, 0.25 * raw, n_boot=200)
    assert planted["drop_pct"] == pytest.approx(75.0)
    assert planted["ci_low"] == pytest.approx(75.0) and planted["ci_high"] == pytest.approx(75.0)
    one = drop_pct_ci([2.0], [0.5])
    assert one["drop_pct"] == one["ci_low"] == one["ci_high"] == pytest.approx(75.0)
    with pytest.raises(MechdiffError, match="paired"):
        drop_pct_ci(raw, mapped[:5])


def test_drop_pct_of_float_noise_is_undefined(tmp_path):
    """A raw KL within float noise of zero (an unchanged site) gives an undefined drop, written as null."""
    rng = np.random.default_rng(3)
    raw = rng.uniform(0, 2e-8, size=64)  # float32 rounding-level KLs
    mapped = raw * 1.0099  # the -0.99% a percentage of noise would report
    d = drop_pct_ci(raw, mapped, n_boot=100)
    assert np.isnan(d["drop_pct"]) and np.isnan(d["ci_low"]) and np.isnan(d["ci_high"])
    assert d["kl_raw"] == pytest.approx(raw.mean())
    write_json(tmp_path / "m.json", d)
    assert json.loads((tmp_path / "m.json").read_text())["drop_pct"] is None
    assert np.isnan(drop_pct(KL_NOISE_FLOOR, 0.0)) and np.isnan(drop_pct(0.0, 0.0))
    assert drop_pct(10 * KL_NOISE_FLOOR, 5 * KL_NOISE_FLOOR) == pytest.approx(50.0)  # small but real
    assert drop_pct_ci([0.01, 0.02], [0.005, 0.01], n_boot=50)["drop_pct"] == pytest.approx(50.0)


def test_rows_ci_matches_per_replicate_loop():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(33, 3))
    Y = X[:, 0] + rng.normal(size=33)

    def corr(i):
        return float(np.corrcoef(X[i, 0], Y[i])[0, 1])

    lo, hi = rows_ci(corr, 33, n_boot=150, seed=7)
    np.testing.assert_allclose([lo, hi], _numpy_boot(corr, 33, 150, 7, 1), rtol=1e-12)
    with pytest.raises(MechdiffError):
        rows_ci(corr, 1)


def test_mean_ci():
    rng = np.random.default_rng(4)
    x = rng.exponential(size=400)
    m, lo, hi = mean_ci(x, n_boot=500, seed=1)
    assert m == pytest.approx(x.mean())
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)
    with pytest.raises(MechdiffError):
        mean_ci([])
