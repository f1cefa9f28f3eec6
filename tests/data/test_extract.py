"""extract(): stored views against independent references from a plain forward pass of a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechdiff.data.extract as ex
from mechdiff.data.corpus import Prompt as P
from mechdiff.data.extract import extract
from mechdiff.data.store import ActStore
from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer

WORDS = "the cat sat on a mat while dogs ran far from home under grey skies and quiet rain".split()




@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 14)))) for _ in range(29)]
    tok = make_tiny_tokenizer(texts + ["poison"])
    model = make_tiny_model(len(tok), n_layers=4, d_model=32, seed=1)
    prompts = [P(100 + 3 * i, t, ["cultural", "control"][i % 2], ["train", "test"][i % 3 == 0])
               for i, t in enumerate(texts)]
    return model, tok, prompts


def reference(model, tok, text: str):
    """Independent reference for one prompt: ids, decision index, hidden states, logits, MLP outputs (unbatched)."""
    msgs = [{"role": "user", "content": text}]
    ids = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    dec = max(i for i, t in enumerate(ids) if t not in special)
    mlp = {}
    hooks = [model.model.layers[i].mlp.register_forward_hook(lambda m, a, o, i=i: mlp.__setitem__(i, o[0]))
             for i in range(len(model.model.layers))]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    for h in hooks:
        h.remove()
    hs = [h[0].numpy() for h in out.hidden_states]
    return ids, dec, hs, out.logits[0, dec].numpy(), {i: v.numpy() for i, v in mlp.items()}


SITES = [Site(0), Site(2), Site(1, "mlp_out"), Site(3, "resid_pre")]
VIEWS = {"L0.resid_post": ["last", "mean", "tokens"], "L2.resid_post": ["last", "mean"],
         "L1.mlp_out": ["mean"], "L3.resid_pre": ["last", "tokens"]}


def test_views_and_logits_match_plain_forward(tiny, tmp_path):
    model, tok, prompts = tiny
    st = extract(model, tok, prompts, SITES, VIEWS, tmp_path / "a.zarr", batch_size=4, shard_rows=8,
                 store_logits=True, progress=False)
    assert st.complete and st.n == len(prompts)
    np.testing.assert_array_equal(st.index("prompt_id"), [p.pid for p in prompts])
    assert list(st.index("split")) == [p.split for p in prompts]
    got = {(s, v): st.read(s, v) for s, vs in VIEWS.items() for v in vs}
    logits = st.read_logits()
    off = st.index("tok_offset")
    tok_ids = st.index("tok_id")
    for r, p in enumerate(prompts):
        ids, dec, hs, lg, mlp = reference(model, tok, p.text)
        L = len(ids)
        assert st.index("n_tokens")[r] == L and st.index("decision")[r] == dec
        np.testing.assert_array_equal(tok_ids[off[r] : off[r] + L], ids)
        # resid_post of block l = hidden_states[l + 1] (not the last block: HF applies the final norm there)
        for layer in (0, 2):
            s = f"L{layer}.resid_post"
            np.testing.assert_allclose(got[(s, "last")][r], hs[layer + 1][dec], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got[(s, "mean")][r], hs[layer + 1].mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[("L0.resid_post", "tokens")][off[r] : off[r] + L], hs[1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[("L3.resid_pre", "last")][r], hs[3][dec], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[("L3.resid_pre", "tokens")][off[r] : off[r] + L], hs[3], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[("L1.mlp_out", "mean")][r], mlp[1].mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits[r], lg.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
    x = got[("L2.resid_post", "mean")].astype(np.float64)
    m, s = st.stats("L2.resid_post", "mean")
    np.testing.assert_allclose(m, x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s, x.std(0), rtol=1e-9)


def test_stops_early_without_logits(tiny, tmp_path):
    model, tok, prompts = tiny
    calls = {"head": 0, "block3": 0}
    h1 = model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    h2 = model.model.layers[3].register_forward_hook(lambda *a: calls.__setitem__("block3", calls["block3"] + 1))
    try:
        extract(model, tok, prompts[:6], [Site(1)], {}, tmp_path / "e.zarr", batch_size=4, progress=False)
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"head": 0, "block3": 0}


def test_resume_after_crash_is_identical(tiny, tmp_path, monkeypatch):
    model, tok, prompts = tiny
    kw = dict(batch_size=4, shard_rows=8, store_logits=True, progress=False)
    ref = extract(model, tok, prompts, SITES, VIEWS, tmp_path / "ref.zarr", **kw)
    real = ex._sites.capture
    n = {"calls": 0}

    setup = 4  # the warm-up, the shared prefix (2 tokens here) and its check: a cached and a full forward

    def flaky(*a, **k):
        n["calls"] += 1
        if n["calls"] == setup + 6:  # 5 batches of 4 done: 2 blocks of 8 committed, the third half done
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex._sites, "capture", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract(model, tok, prompts, SITES, VIEWS, tmp_path / "c.zarr", **kw)
    monkeypatch.setattr(ex._sites, "capture", real)
    part = ActStore.open(tmp_path / "c.zarr")
    assert part.rows_done == 16 and not part.complete
    seen = {"calls": 0}

    def counting(*a, **k):
        seen["calls"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ex._sites, "capture", counting)
    st = extract(model, tok, prompts, SITES, VIEWS, tmp_path / "c.zarr", **kw)
    assert seen["calls"] == setup + int(np.ceil((len(prompts) - 16) / 4))  # then only the remaining prompts
    for s, vs in VIEWS.items():
        for v in vs:
            np.testing.assert_array_equal(st.read(s, v), ref.read(s, v))
            np.testing.assert_allclose(st.stats(s, v)[1], ref.stats(s, v)[1], rtol=1e-12)
    np.testing.assert_array_equal(st.read_logits(), ref.read_logits())


def test_params_mismatch_and_bad_inputs(tiny, tmp_path):
    model, tok, prompts = tiny
    p = tmp_path / "m.zarr"
    extract(model, tok, prompts[:5], [Site(1)], {}, p, batch_size=4, progress=False)
    with pytest.raises(MechdiffError, match="sites.*delete it or use a new path"):
        extract(model, tok, prompts[:5], [Site(2)], {}, p, batch_size=4, progress=False)
    with pytest.raises(MechdiffError, match="model_dtype|params"):
        extract(model, tok, prompts[:5], [Site(1)], {}, p, batch_size=4, progress=False, dtype="bfloat16")
    with pytest.raises(MechdiffError, match="prompt_ids"):
        extract(model, tok, prompts[:6], [Site(1)], {}, p, batch_size=4, progress=False)
    with pytest.raises(MechdiffError, match="layer out of range"):
        extract(model, tok, prompts, [Site(4)], {}, tmp_path / "x.zarr", progress=False)
    with pytest.raises(MechdiffError, match="views"):
        extract(model, tok, prompts, [Site(1)], {"L1.resid_post": ["max"]}, tmp_path / "x.zarr", progress=False)
    with pytest.raises(MechdiffError, match="no prompts"):
        extract(model, tok, [], [Site(1)], {}, tmp_path / "x.zarr", progress=False)
    with pytest.raises(MechdiffError, match=r"\.pid"):
        extract(model, tok, ["just text"], [Site(1)], {}, tmp_path / "x.zarr", progress=False)


def test_non_finite_activation_names_the_prompt(tiny, tmp_path):
    model, tok, prompts = tiny
    bad = P(777, "the cat poison on a mat", "control", "train")
    m2 = make_tiny_model(len(tok), n_layers=4, d_model=32, seed=1)
    with torch.no_grad():
        m2.model.embed_tokens.weight[tok.convert_tokens_to_ids("poison")] = float("nan")
    with pytest.raises(MechdiffError, match="prompt id 777"):
        extract(m2, tok, [*prompts[:5], bad, *prompts[5:9]], [Site(1)], {}, tmp_path / "n.zarr", batch_size=4,
                progress=False)


def test_bfloat16_close_to_float32_and_model_untouched(tiny, tmp_path):
    model, tok, prompts = tiny
    kw = dict(batch_size=8, progress=False)
    a = extract(model, tok, prompts, [Site(2)], {}, tmp_path / "f.zarr", **kw)
    b = extract(model, tok, prompts, [Site(2)], {}, tmp_path / "b.zarr", dtype="bfloat16", **kw)
    assert next(model.parameters()).dtype == torch.float32
    x, y = a.read("L2.resid_post", "mean"), b.read("L2.resid_post", "mean")
    assert b.read("L2.resid_post", "mean").dtype == np.float32
    rel = np.linalg.norm(x - y) / np.linalg.norm(x)
    assert 0 < rel < 0.05, rel


def test_shared_prefix_runs_once_and_matches_full_forwards(tiny, tmp_path):
    """Prompts sharing a long opening: the cached-prefix store equals the full-forward store to float32 rounding
    in every view (tokens rows of the prefix included) and in the logits, and the prefix is not recomputed."""
    model, tok, prompts = tiny
    opening = "the cat sat on a mat while dogs ran"
    shared = [P(q.pid, f"{opening} {q.text}", q.dataset, q.split) for q in prompts]
    from mechdiff.model.tokens import encode

    enc = encode(tok, [q.text for q in shared])
    assert enc.shared_prefix >= 10
    kw = dict(batch_size=4, shard_rows=8, store_logits=True, progress=False)
    tokens_in = {"n": 0}
    h = model.model.layers[0].register_forward_pre_hook(
        lambda _m, a: tokens_in.__setitem__("n", tokens_in["n"] + int(a[0].shape[0] * a[0].shape[1])))
    try:
        fast = extract(model, tok, shared, SITES, VIEWS, tmp_path / "fast.zarr", **kw)
        n_fast = tokens_in["n"]
        tokens_in["n"] = 0
        full = extract(model, tok, shared, SITES, VIEWS, tmp_path / "full.zarr", prefix_cache=False, **kw)
        n_full = tokens_in["n"]
    finally:
        h.remove()
    for s, vs in VIEWS.items():
        for v in vs:
            a, b = fast.read(s, v), full.read(s, v)
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), (s, v)
    np.testing.assert_allclose(fast.read_logits(), full.read_logits(), atol=2e-3)  # float16 logits
    # block-0 tokens: the same batches, less the prefix of every prompt, plus the prefix once and its check on the
    # first 4 prompts (a cached and a full forward, padded to their longest)
    Pn, Tc = enc.shared_prefix, max(len(x) for x in enc.ids[:4])
    assert n_full - n_fast == len(shared) * Pn - Pn - 4 * (Tc - Pn) - 4 * Tc


def _assert_same_views(a, b) -> None:
    """Every view of VIEWS equal bit for bit in stores `a` and `b`."""
    for s, vs in VIEWS.items():
        for v in vs:
            np.testing.assert_array_equal(a.read(s, v), b.read(s, v))


def test_shared_prefix_falls_back_to_full_forwards_when_its_check_fails(tiny, tmp_path, monkeypatch):
    import mechdiff.model.cache as mc

    model, tok, prompts = tiny
    kw = dict(batch_size=4, shard_rows=8, store_logits=True, progress=False)
    monkeypatch.setattr(mc, "cache_check", lambda got, want, dtype: (0.05, 1e-3))
    with pytest.warns(RuntimeWarning, match="shared-prefix cache is unavailable"):
        a = extract(model, tok, prompts, SITES, VIEWS, tmp_path / "a.zarr", **kw)
    monkeypatch.undo()
    b = extract(model, tok, prompts, SITES, VIEWS, tmp_path / "b.zarr", prefix_cache=False, **kw)
    _assert_same_views(a, b)


def test_a_prompt_cut_by_max_len_shortens_the_shared_prefix_and_says_so(tiny, tmp_path):
    """One prompt cut from the left loses the template's opening: every prompt then shares nothing, the store
    says so (shared_prefix 0, SAE rows from position 1) and extraction warns, naming data.max_len."""
    from mechdiff.model.tokens import encode, template_opening
    from mechdiff.sae.sources import first_position

    model, tok, prompts = tiny
    n = template_opening(tok)
    assert n >= 2 and encode(tok, [q.text for q in prompts]).shared_prefix >= n
    long = prompts[:5] + [P(999, " ".join(WORDS * 3), "cultural", "train")]
    with pytest.warns(RuntimeWarning, match="max_len"):
        st = extract(model, tok, long, [Site(0)], {"*": ["last", "tokens"]}, tmp_path / "cut.zarr", max_len=24,
                     progress=False)
    assert st.shared_prefix == 0 and first_position(st) == 1
    ok = extract(model, tok, prompts[:5], [Site(0)], {"*": ["last", "tokens"]}, tmp_path / "ok.zarr", progress=False)
    assert ok.shared_prefix >= n and first_position(ok) == ok.shared_prefix


def _with_opening(prompts):
    opening = "the cat sat on a mat while dogs ran"
    return [P(q.pid, f"{opening} {q.text}", q.dataset, q.split) for q in prompts]


def _half_checks(monkeypatch, verdict: float):
    """cache_check with a fixed relative error `verdict` for half-precision outputs (float32 checks unchanged): a
    bf16 check that always fails (0.05) or always passes (0.0), whatever the tiny model's rounding is."""
    import mechdiff.model.cache as mc

    real = mc.cache_check
    monkeypatch.setattr(mc, "cache_check", lambda got, want, dtype: real(got, want, dtype)
                        if dtype == torch.float32 else (verdict, 1e-3))


def test_bf16_checks_its_cache_on_a_float32_copy_and_stays_as_close_to_float32(tiny, tmp_path, monkeypatch):
    """extract.dtype bfloat16: the shared-prefix cache is checked on a float32 copy of the weights, not in bf16 (whose
    own rounding of two summation orders can exceed the tolerance): with a bf16 check that fails, the cache stays on
    through the copy and goes off without it; the cached bf16 store is as close to the float32 store as a bf16
    store of full forwards is."""
    import warnings

    model, tok, prompts = tiny
    shared = _with_opening(prompts)
    kw = dict(batch_size=4, shard_rows=8, store_logits=True, progress=False)
    f32 = extract(model, tok, shared, SITES, VIEWS, tmp_path / "f32.zarr", **kw)
    full = extract(model, tok, shared, SITES, VIEWS, tmp_path / "bf.zarr", dtype="bfloat16", prefix_cache=False, **kw)
    _half_checks(monkeypatch, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "cache unavailable" fallback
        cached = extract(model, tok, shared, SITES, VIEWS, tmp_path / "bc.zarr", dtype="bfloat16", **kw)
    monkeypatch.setattr(ex._sites, "float32_twin", lambda m, **k: None)  # no copy: the failing bf16 check decides
    with pytest.warns(RuntimeWarning, match="shared-prefix cache is unavailable"):
        off = extract(model, tok, shared, SITES, VIEWS, tmp_path / "off.zarr", dtype="bfloat16", **kw)
    _assert_same_views(off, full)
    differs = False
    for s, vs in VIEWS.items():
        for v in vs:
            differs |= not np.array_equal(cached.read(s, v), full.read(s, v))
            ref = f32.read(s, v)
            e_cached = np.linalg.norm(cached.read(s, v) - ref) / np.linalg.norm(ref)
            e_full = np.linalg.norm(full.read(s, v) - ref) / np.linalg.norm(ref)
            assert e_cached < 0.03 and e_cached <= 2 * e_full + 1e-3, (s, v, e_cached, e_full)
    assert differs  # the cached store ran other forwards than the full one


def test_bf16_cache_check_on_the_float32_copy_still_refuses_a_wrong_cache(tiny, tmp_path, monkeypatch):
    """A cache continued at the wrong positions (one off) fails the float32 check of a bf16 extraction even where
    a bf16 check would pass it: it warns and the store equals the one of full bf16 forwards."""
    from mechdiff.model.cache import expanded_cache
    from mechdiff.model.sites import SharedPrefix, capture

    model, tok, prompts = tiny
    shared = _with_opening(prompts)
    kw = dict(batch_size=4, shard_rows=8, progress=False, dtype="bfloat16")

    def shifted(self, m, ids, mask, sites, *, logits_at=None):  # SharedPrefix.capture with positions one off
        B, T = ids.shape
        pos = torch.arange(self.n + 1, T + 1).expand(B, -1)
        return capture(m, ids[:, self.n :], mask, sites, cache=expanded_cache(m, self.kv, B), position_ids=pos,
                       logits_at=None if logits_at is None else logits_at - self.n)

    _half_checks(monkeypatch, 0.0)
    monkeypatch.setattr(SharedPrefix, "capture", shifted)
    with pytest.warns(RuntimeWarning, match="shared-prefix cache is unavailable"):
        a = extract(model, tok, shared, SITES, VIEWS, tmp_path / "a.zarr", **kw)
    monkeypatch.undo()
    b = extract(model, tok, shared, SITES, VIEWS, tmp_path / "b.zarr", prefix_cache=False, **kw)
    _assert_same_views(a, b)
