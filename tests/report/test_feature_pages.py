"""Feature pages: page data against independent numpy computations on a planted synthetic case, escaping, no
external resources, the token plot, the index, and one page loaded in headless chromium."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mechdiff import MechdiffError
from mechdiff.report.feature_pages import (
    encode_sparse,
    feature_page_data,
    index_page,
    page_order,
    pick_features,
    prompt_means,
    render_feature_page,
    token_activation_png,
    top_cultural,
)
from tests.browser import browse

HOSTILE = '<script>alert("x")</script> & "quotes"'
VOCAB, D = 60, 8


def _decode(i: int) -> str:
    return "<script>" if i == 7 else f" t{i}"


@pytest.fixture(scope="module")
def case() -> dict:
    """8 prompts (cultural with regions, control, trait), ragged token rows, sparse activations with a planted top."""
    rng = np.random.default_rng(0)
    spec = [("cultural", "south_asia"), ("cultural", "south_asia"), ("cultural", "east_asia"), ("cultural", ""),
            ("control", ""), ("control", ""), ("trait", ""), ("trait", "")]
    prompts = [SimpleNamespace(pid=100 + i, text=HOSTILE if i == 2 else f"prompt {i}", dataset=d, region=r)
               for i, (d, r) in enumerate(spec)]
    lens = rng.integers(4, 40, size=len(prompts))
    row_prompt = np.repeat(np.arange(len(prompts)), lens)
    n = row_prompt.size
    acts = np.where(rng.random(n) < 0.3, rng.gamma(2.0, 1.0, n), 0.0)
    acts[row_prompt == 5] = 0.0  # a prompt on which the feature never fires
    ids = rng.integers(0, VOCAB, n)
    peak = np.flatnonzero(row_prompt == 2)[3]
    acts[peak] = acts.max() + 2.0  # the planted top token, in the hostile prompt
    ids[peak] = 7
    b_lens = lens + rng.integers(0, 3, size=len(prompts))  # the other store: its own row layout
    base_prompt = np.repeat(np.arange(len(prompts)), b_lens)
    tuned_prompt = row_prompt.copy()
    return {"prompts": prompts, "acts": acts, "row_prompt": row_prompt, "ids": ids, "peak": peak,
            "direction": rng.normal(size=D), "W_U": rng.normal(size=(VOCAB, D)), "w": rng.uniform(0.5, 2.0, D),
            "base_acts": np.maximum(rng.normal(size=base_prompt.size), 0), "base_prompt": base_prompt,
            "tuned_acts": np.maximum(rng.normal(0.5, 1, size=tuned_prompt.size), 0), "tuned_prompt": tuned_prompt}


def _data(c: dict, **kw):
    return feature_page_data(
        source="tuned", layer=20, feature=42, acts=c["acts"], row_prompt=c["row_prompt"], token_ids=c["ids"],
        decode=_decode, prompts=c["prompts"], direction=c["direction"], unembedding=c["W_U"], norm_weight=c["w"],
        base_acts=c["base_acts"], base_row_prompt=c["base_prompt"], tuned_acts=c["tuned_acts"],
        tuned_row_prompt=c["tuned_prompt"], gates={"passed": True, "ablation_kl": 0.25, "note": "<b>x</b>"},
        reasons=["top cultural", "measured by the gates"], headline={"cultural - control mean": 0.5},
        **{"n_contexts": 5, "n_logit_tokens": 6, "bins": 7, "window": 4, **kw})


def test_page_data_matches_numpy(case: dict) -> None:
    """Histogram, firing rates, logit lens, contexts and base-vs-tuned means equal direct numpy computations."""
    c, d = case, _data(case)
    a, rp = c["acts"], c["row_prompt"]
    counts, edges = np.histogram(a[a > 0], bins=7)
    assert d.histogram["counts"] == counts.tolist() and np.allclose(d.histogram["edges"], edges)
    assert d.histogram["n_zero"] == int((a == 0).sum()) and d.histogram["n_rows"] == a.size
    assert d.max_activation == a.max() == d.headline["max activation"]
    assert d.headline["cultural - control mean"] == 0.5

    firing = {r["group"]: r for r in d.firing}
    expected_groups = {"all": range(8), "cultural": [0, 1, 2, 3], "cultural / east_asia": [2],
                       "cultural / south_asia": [0, 1], "control": [4, 5], "trait": [6, 7]}
    assert set(firing) == set(expected_groups)
    for g, members in expected_groups.items():
        m = np.isin(rp, list(members))
        fired = [i for i in members if (a[rp == i] > 0).any()]
        assert firing[g]["tokens"] == m.sum() and firing[g]["prompts"] == len(members)
        assert firing[g]["token_rate"] == pytest.approx((a[m] > 0).mean())
        assert firing[g]["prompt_rate"] == pytest.approx(len(fired) / len(members))
        assert firing[g]["mean"] == pytest.approx(a[m].mean())

    logits = c["W_U"] @ (c["w"] * c["direction"])
    assert [t["id"] for t in d.promoted] == np.argsort(-logits)[:6].tolist()
    assert [t["id"] for t in d.suppressed] == np.argsort(logits)[:6].tolist()
    assert [t["token"] for t in d.promoted] == [_decode(int(i)) for i in np.argsort(-logits)[:6]]
    assert d.promoted[0]["logit"] == pytest.approx(logits.max())

    peaks = np.array([a[rp == i].max() for i in range(8)])
    order = [i for i in np.argsort(-peaks, kind="stable") if peaks[i] > 0][:5]
    assert [ctx["prompt"] for ctx in d.contexts] == order
    assert d.contexts[0]["peak_row"] == c["peak"] and d.contexts[0]["text"] == HOSTILE
    for ctx in d.contexts:
        rows = [t["row"] for t in ctx["tokens"]]
        assert all(rp[r] == ctx["prompt"] for r in rows) and rows == list(range(rows[0], rows[-1] + 1))
        pk = next(t for t in ctx["tokens"] if t["peak"])
        assert pk["act"] == ctx["max_act"] == peaks[ctx["prompt"]]
        assert max(abs(r - pk["row"]) for r in rows) <= 4
        for t in ctx["tokens"]:
            assert t["act"] == a[t["row"]] and t["alpha"] == pytest.approx(a[t["row"]] / a.max())

    bt = {r["dataset"]: r for r in d.base_tuned}
    for name, members in (("all", range(8)), ("cultural", [0, 1, 2, 3]), ("control", [4, 5])):
        bm, tm = np.isin(c["base_prompt"], list(members)), np.isin(c["tuned_prompt"], list(members))
        assert bt[name]["mean_base"] == pytest.approx(c["base_acts"][bm].mean())
        assert bt[name]["mean_tuned"] == pytest.approx(c["tuned_acts"][tm].mean())
        assert bt[name]["rate_tuned"] == pytest.approx((c["tuned_acts"][tm] > 0).mean())
        assert bt[name]["tuned_minus_base"] == pytest.approx(bt[name]["mean_tuned"] - bt[name]["mean_base"])


def _spans(page: str) -> list[tuple[str, float, str]]:
    return [(cls, float(act), style) for cls, act, style in
            re.findall(r'<span class="(tok(?: peak)?)" data-act="([^"]+)" title="[^"]*"( style="[^"]*")?>', page)]


def test_render_highlights_escapes_and_is_self_contained(case: dict) -> None:
    """Highlighted tokens are the firing ones with opacity = act / max, the outlined one each context's top; hostile
    text is escaped; nothing is loaded from outside the page."""
    page = render_feature_page(_data(case))
    spans = _spans(page)
    assert spans
    a = case["acts"]
    for _cls, act, style in spans:
        assert (style != "") == (act > 0)
        if act > 0:
            alpha = float(re.search(r"rgba\(\d+,\d+,\d+,([0-9.]+)\)", style).group(1))
            assert alpha == pytest.approx(act / a.max(), abs=1e-3)
    peaks = [act for cls, act, _ in spans if cls == "tok peak"]
    assert peaks[0] == a.max() and peaks == sorted(peaks, reverse=True) and len(peaks) == 5
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "ablation_kl" in page  # gate results, escaped
    assert not re.search(r"(?:src|href|url)\s*[=(]\s*[\"']?\s*(?:https?:)?//", page, re.I)
    assert "http" not in page.lower() and "<script" not in page.lower()
    for head in ("Top-activating contexts", "Activation histogram", "Firing rate per dataset and region",
                 "Base vs tuned activation", "promotes and suppresses", "Gate results"):
        assert head in page


def test_token_png_and_index(case: dict, tmp_path: Path) -> None:
    """The token plot is a real PNG with one panel row per prompt; the index links each page, text escaped."""
    import matplotlib.image as mpimg

    d = _data(case)
    png = token_activation_png(d.contexts, tmp_path / "f.png", title="t $x$ <y>", max_prompts=3)
    img = mpimg.imread(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes() == png and img.shape[0] > 300 and img[..., :3].std() > 0.01
    with pytest.raises(MechdiffError, match="no contexts"):
        token_activation_png([])
    idx = index_page([{"href": f"{d.name}.html", "source": "tuned", "layer": 20, "feature": 42,
                       "reasons": ["top graded <politeness>"], "headline": d.headline}])
    assert f'<a href="{d.name}.html">tuned L20 f42</a>' in idx and "&lt;politeness&gt;" in idx
    assert "No features were reported" in index_page([])


def test_bad_inputs_fail_in_one_line(case: dict) -> None:
    """Mismatched lengths, out-of-range prompt indices and a wrong unembedding width give one-line errors."""
    c = case
    with pytest.raises(MechdiffError, match="token_ids has"):
        _data({**c, "ids": c["ids"][:-1]})
    with pytest.raises(MechdiffError, match="must index the 8 prompts"):
        _data({**c, "row_prompt": c["row_prompt"] + 1})
    with pytest.raises(MechdiffError, match="unembedding must be"):
        _data({**c, "W_U": c["W_U"][:, :-1]})
    with pytest.raises(MechdiffError, match="NaN"):
        _data({**c, "acts": np.where(c["acts"] > 0, np.nan, 0.0)})


def test_feature_page_in_headless_chromium(case: dict, tmp_path: Path) -> None:
    """Chromium loads a page and the index with no errors or failed requests; the token plot image decodes."""
    d = _data(case)
    d.token_png = token_activation_png(d.contexts, title=d.title)
    (tmp_path / f"{d.name}.html").write_text(render_feature_page(d), encoding="utf-8")
    (tmp_path / "index.html").write_text(index_page([{"href": f"{d.name}.html", "source": "tuned", "layer": 20,
                                                      "feature": 42, "reasons": d.reasons,
                                                      "headline": d.headline}]), encoding="utf-8")
    page = browse(tmp_path / f"{d.name}.html", tmp_path / "page.png")
    assert page["ok"] and page["title"] == d.title and not page["errors"], page["errors"]
    assert len(page["images"]) == 1 and all(im[1] and im[2] > 0 for im in page["images"])
    assert page["headings"][:2] == ["Top-activating contexts", "Token-by-token activation"]
    index = browse(tmp_path / "index.html", tmp_path / "index.png")
    assert index["ok"] and not index["errors"], index["errors"]


# ----------------------------------------------------------------------------------------- what gets a page


def test_top_cultural_is_the_largest_numpy_differences() -> None:
    """top cultural = the n_top largest cultural - control differences of per-prompt means, with those numbers."""
    rng = np.random.default_rng(1)
    A = rng.gamma(1.0, 1.0, size=(30, 50))
    is_c = np.arange(30) % 3 == 0
    A[is_c, 17] += 5.0  # planted: the largest gap
    A[is_c, 4] += 3.0  # the second
    diff = A[is_c].mean(0) - A[~is_c].mean(0)
    top = top_cultural(A, is_c, 4)
    assert [f for f, _ in top] == np.argsort(-diff)[:4].tolist() and [f for f, _ in top][:2] == [17, 4]
    assert np.allclose([d for _, d in top], diff[np.argsort(-diff)[:4]])


def test_pick_features_union_of_reasons_and_gate_layers() -> None:
    """A feature picked twice gets one pick with both reasons; gated rows with a layer column, without one (one
    layer), unknown sources or layers (warned), and a missing column (one-line error)."""
    graded = pd.DataFrame({"source": ["tuned", "base", "crosscoder"], "layer": [20, 20, 20],
                           "trait": ["formal", "polite", "formal"], "best_feature": [7, 3, 9],
                           "score": [1.5, 0.5, 2.0], "r": [0.8, 0.4, 0.9], "tpr": [1, 1, 1]})
    gates = pd.DataFrame({"source": ["tuned", "delta", "delta"], "layer": [20, 20, 24], "feature": [7, 11, 12],
                          "passed": [True, False, True], "kl": [0.25, float("nan"), 0.1]})
    warnings: list[str] = []
    picks = pick_features(sources=["base", "tuned", "delta"], layers=[20], cultural={20: [(7, 0.3), (2, 0.2)]},
                          graded=graded, gates=gates, max_gated=20, warn=warnings.append)
    assert page_order(picks) == [("base", 20, 3), ("tuned", 20, 2), ("tuned", 20, 7), ("delta", 20, 11)]
    pk = picks["tuned", 20, 7]
    assert pk.reasons == ["top cultural", "top graded formal", "measured by the gates"]
    assert pk.headline == {"cultural - control mean": 0.3, "graded formal score": 1.5, "graded formal r": 0.8}
    assert pk.gates == {"passed": True, "kl": 0.25}
    assert picks["delta", 20, 11].gates == {"passed": False, "kl": None} and picks["delta", 20, 11].reasons == ["measured by the gates"]
    assert picks["base", 20, 3].reasons == ["top graded polite"] and picks["tuned", 20, 2].gates == {}
    assert len(warnings) == 1 and "delta_L24_f12" in warnings[0]

    no_layer = gates.drop(columns="layer")  # one layer: the gates' layer is it
    picks1 = pick_features(sources=["tuned", "delta"], layers=[20], gates=no_layer, max_gated=2, warn=warnings.append)
    assert list(picks1) == [("tuned", 20, 7), ("delta", 20, 11)]  # max_gated: the first rows only
    assert picks1["tuned", 20, 7].reasons == ["measured by the gates"] and "layer" not in picks1["tuned", 20, 7].gates
    assert "layer" not in no_layer.columns  # the caller's table is left as it was
    with pytest.raises(MechdiffError, match="has no column 'layer'"):  # several layers: the layer is needed
        pick_features(sources=["tuned"], layers=[20, 24], gates=no_layer)
    assert pick_features(sources=["base"], layers=[20], cultural={20: [(7, 0.3)]}, graded=pd.DataFrame(),
                         gates=pd.DataFrame()) == {}  # top cultural is the tuned SAE's


class _TopK:
    """A tiny TopK encoder with the SAE's encode / width."""

    def __init__(self, W: np.ndarray, k: int) -> None:
        import torch

        self.W, self.k, self.width = torch.as_tensor(W, dtype=torch.float32), k, W.shape[1]

    def encode(self, x):
        import torch

        pre = x @ self.W
        vals, idx = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())


def test_sparse_codes_and_prompt_means_equal_dense() -> None:
    """Encoded once and kept sparse: feature columns, row blocks and per-prompt means equal the dense encoding."""
    from mechdiff.sae.sources import encode_rows

    rng = np.random.default_rng(2)
    sae = _TopK(rng.normal(size=(6, 20)), k=3)
    row_prompt = np.repeat(np.arange(9), rng.integers(2, 7, size=9))
    X = rng.normal(size=(row_prompt.size, 6)).astype(np.float32)
    Z = encode_rows(sae, X, chunk=7)  # the same chunks: a BLAS may round a row differently in another batch size
    codes = encode_sparse(sae, X, chunk=7)
    assert np.array_equal(codes.columns([5, 0, 13]), Z[:, [5, 0, 13]])
    assert np.array_equal(codes.dense(np.array([3, 0, 3])), Z[[3, 0, 3]])
    chosen = np.array([1, 2, 5, 8])
    m = prompt_means(codes, row_prompt, chosen, chunk_prompts=3)
    assert np.allclose(m, np.stack([Z[row_prompt == p].mean(0) for p in chosen]))
    with pytest.raises(MechdiffError, match="one owner per row"):  # an owner too many would skew the last mean
        codes.run_means(np.r_[row_prompt, row_prompt[-1]], 9)


def test_sparse_codes_of_a_topk_sae_equal_its_dense_encoding() -> None:
    """`topk_codes` (never dense) gives the codes np.nonzero finds in `encode`'s dense latents, value for value."""
    import torch

    from mechdiff.sae.model import TopKSAE
    from mechdiff.sae.sources import encode_rows

    rng = np.random.default_rng(4)
    sae = TopKSAE(8, 40, 5, seed=3)
    X = rng.normal(size=(53, 8)).astype(np.float32)
    with torch.no_grad():  # half of the top k pre-activations negative: encode leaves them 0
        top = sae.pre_acts(sae.normalize(torch.as_tensor(X))).topk(5, dim=1).values
        sae.b_enc.sub_(top.median())
    Z = encode_rows(sae, X, chunk=16)
    assert 0 < (Z > 0).sum() < 53 * 5
    codes = encode_sparse(sae, X, chunk=16)
    r, f = np.nonzero(Z)
    assert np.array_equal(codes.feats, f) and np.array_equal(codes.vals, Z[r, f])
    assert np.array_equal(codes.dense(np.arange(53)), Z)


def test_gate_survivors_are_named_so():
    """A gates row whose causal, consistent and side_ok columns are all true reads "passed the gates"."""
    from mechdiff.report.feature_pages import pick_features

    gates = pd.DataFrame({"source": ["tuned", "tuned"], "layer": [20, 20], "feature": [1, 2],
                          "causal": [True, True], "consistent": [True, False], "side_ok": [True, True]})
    picks = pick_features(sources=["tuned"], layers=[20], gates=gates, max_gated=5, warn=lambda m: None)
    assert picks["tuned", 20, 1].reasons == ["passed the gates"]
    assert picks["tuned", 20, 2].reasons == ["measured by the gates"]
