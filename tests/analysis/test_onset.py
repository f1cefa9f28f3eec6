"""Where a change starts: the shared onset rule against hand-made CKA and KL curves."""

from mechdiff.analysis.onset import CKA_TOL, cka_onset, kl_onset


def test_cka_onset_first_changed_layer_and_lowest_site():
    cka = {"L0.resid_post": {"last": 1.0}, "L2.resid_post": {"last": 1 - CKA_TOL / 2},
           "L4.attn_out": {"last": 0.97}, "L4.resid_post": {"last": 0.99}, "L6.resid_post": {"last": 0.8},
           "L8.resid_post": {"last": None}}
    assert cka_onset(cka) == ("L4.attn_out", "L6.resid_post")  # tie at L4: the lower CKA first
    assert cka_onset({"L0.resid_post": {"last": 1.0}}) == (None, None)


def test_kl_onset():
    assert kl_onset({"L10": 0.0, "L2": 0.0, "L12": 0.5, "L11": 2e-4}) == 11
    assert kl_onset({"L0": 0.0, "L1": 5e-5}) is None
