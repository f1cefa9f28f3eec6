"""Where a change starts: the shared onset rule against hand-made CKA and KL curves."""
import numpy as np

from mechdiff.analysis.onset import CKA_TOL, cka_onset, kl_onset, most_changed_layers


def test_cka_onset_first_changed_layer_and_lowest_site():
    cka = {"L0.resid_post": {"last": 1.0}, "L2.resid_post": {"last": 1 - CKA_TOL / 2},
           "L4.attn_out": {"last": 0.97}, "L4.resid_post": {"last": 0.99}, "L6.resid_post": {"last": 0.8},
           "L8.resid_post": {"last": None}}
    assert cka_onset(cka) == ("L4.attn_out", "L6.resid_post")
    # within the first changed layer the first site in forward order, not the lowest CKA: a change planted at
    # attn_out passes through mlp_out and resid_post, which can show a larger drop
    cka.update({"L4.mlp_out": {"last": 0.9}, "L4.resid_post": {"last": 0.95}, "L4.resid_pre": {"last": 1.0}})
    assert cka_onset(cka) == ("L4.attn_out", "L6.resid_post")
    cka["L4.attn_out"] = {"last": 1 - CKA_TOL / 2}  # unchanged within the tolerance: the next site in order
    assert cka_onset(cka)[0] == "L4.mlp_out"
    assert cka_onset({"L0.resid_post": {"last": 1.0}}) == (None, None)


def test_kl_onset():
    assert kl_onset({"L10": 0.0, "L2": 0.0, "L12": 0.5, "L11": 2e-4}) == 11
    assert kl_onset({"L0": 0.0, "L1": 5e-5}) is None


def test_most_changed_layers_are_the_lowest_cka_resid_post_layers():
    rng = np.random.default_rng(0)
    vals = rng.uniform(0.5, 1.0, size=10)
    cka = {f"L{i}.resid_post": {"last": float(v), "mean": 1.0} for i, v in enumerate(vals)}
    cka["L3.attn_out"] = {"last": 0.0}  # other kinds of site do not count
    cka["L11.resid_post"] = {"last": None}  # no CKA: skipped
    cka["L12.resid_post"] = {"last": float("nan")}  # a constant side: skipped
    assert most_changed_layers(cka) == np.argsort(vals)[:2].tolist()
    assert most_changed_layers(cka, k=3, view="mean") == [0, 1, 2]  # all tied at 1: the lower layers
    assert most_changed_layers({}, k=2) == []
