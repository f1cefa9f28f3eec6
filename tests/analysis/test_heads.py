"""Head attribution, churn and head patching: planted head edits, finite differences, IG completeness, a GPT-2
layout, and the ranking statistics against hand numbers and scipy."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from mechdiff.analysis.behaviour import greedy_continuations, scored_sequences
from mechdiff.analysis.heads import (
    _score,
    attribution,
    churn,
    cumulative,
    diff_heads,
    make_batches,
    top_heads,
    topk_jaccard,
    zscores,
)
from mechdiff.errors import MechdiffError
from mechdiff.model.recipes import plant_edit
from mechdiff.model.sites import Site, attention_heads, edit_at, edit_heads_at
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
from mechdiff.model.tokens import encode, pad_id
from tests.analysis.conftest import WORDS, random_texts


@pytest.fixture(scope="module")
def world():
    texts = random_texts(40, seed=3)
    tok = make_tiny_tokenizer(texts, extra_words=WORDS)
    base = make_tiny_model(len(tok), n_layers=4, d_model=64, seed=0)
    return tok, base, texts


def _batches(tok, tuned, texts, batch_size=8, n_new=3):
    enc = encode(tok, texts)
    conts = greedy_continuations(tuned, tok, enc, np.arange(len(texts)), max_new_tokens=n_new)
    keep = [i for i, c in enumerate(conts) if c.strip()]
    seqs, n_prompt, _, n_cont = scored_sequences(tok, [texts[i] for i in keep], [conts[i] for i in keep],
                                                 max_len=96)
    return make_batches(seqs, n_prompt, n_cont, pad=pad_id(tok), batch_size=batch_size)


def _planted(world, heads, layer=1, rank=4, scale=6.0, seed=3):
    tok, base, texts = world
    tuned = copy.deepcopy(base)
    plant_edit(tuned, layer=layer, kind="attn_out", rank=rank, scale=scale, seed=seed, heads=heads)
    batches = _batches(tok, tuned, texts)
    return base, tuned, batches, diff_heads(base, tuned, batches, n_patch=16, n_random=0, seed=0)


@pytest.mark.parametrize(("layer", "heads"), [(1, [2]), (1, [0, 3]), (2, [1])])
def test_planted_heads_are_found_and_patching_them_closes_the_gap(world, layer, heads):
    base, tuned, batches, res = _planted(world, heads, layer=layer)
    planted = {(layer, h) for h in heads}
    pred = np.abs(res["pred"])
    # the planted heads rank first by the attribution-patching estimate; every other head at or before the edited
    # layer has an estimate of exactly 0 (its output and weights are the base's)
    assert set(top_heads(pred, len(heads))) == planted
    for lay, h in np.ndindex(pred.shape):
        if lay <= layer and (lay, h) not in planted:
            assert pred[lay, h] == 0.0
    # churn_pred counts exactly the planted heads at a threshold between them and the rest
    others = max(pred[lh] for lh in np.ndindex(pred.shape) if lh not in planted)
    lowest = min(pred[lh] for lh in planted)
    assert lowest > 2 * others
    by = {(r["layer"], r["head"]): r for r in res["patched"]}
    assert len(by) == 16  # every head of the 4 x 4 model was patched one at a time
    if len(heads) == 1:
        assert by[(layer, heads[0])]["patch_share"] >= 0.9
    for lh, r in by.items():
        if lh in planted:
            continue
        if lh[0] <= layer:  # nothing changed at or before the edited layer but the planted heads
            assert r["patch_share"] == pytest.approx(0.0, abs=1e-6)
        else:  # later heads relay a little of the change (they read the edited write): at most 10 %, 15 % with
            # two planted heads in this 4-layer random model (measured 6.7 % / 7.7 % for one head, 13 % for two)
            assert abs(r["patch_share"]) < (0.1 if len(heads) == 1 else 0.15), (lh, r["patch_share"])
    assert res["metrics"]["heads_for_target"] <= len(heads)
    assert [tuple(x) for x in res["metrics"]["top_pred"][: len(heads)]] == top_heads(res["pred"], len(heads))
    # the direct estimate (each head's own change, read on the base's inputs) is exactly 0 for every head but the
    # planted ones, after the edited layer too (those heads only relay), and equals pred there (same inputs)
    direct = np.abs(res["direct"])
    assert {lh for lh in np.ndindex(direct.shape) if direct[lh] != 0.0} == planted
    for lh in planted:
        assert res["direct"][lh] == pytest.approx(res["pred"][lh], rel=1e-9, abs=1e-12)
    # top_direct lists the planted heads and nothing else (every other head's direct estimate is exactly 0)
    assert [tuple(x) for x in res["metrics"]["top_direct"]] == top_heads(res["direct"], len(heads))
    assert {tuple(x) for x in res["metrics"]["top_direct"]} == planted
    from mechdiff.analysis.heads import Patcher

    bs, ts = attribution(base, batches), attribution(tuned, batches)
    p = Patcher(base, tuned, batches, bs, ts)
    together = p.patch(sorted(planted))
    assert together["share"] == pytest.approx(1.0, abs=1e-4)
    assert together["kl"] == pytest.approx(0.0, abs=1e-6)
    # the delta of each model's own attribution also moves for heads the edit never touched (their gradient runs
    # through the edited head's write): why heads are ranked by the estimate by default
    assert np.abs(res["delta"][:layer]).max() > 0


def test_the_gap_carries_a_paired_ci_that_flags_noise(world):
    """A planted head edit opens a gap whose CI excludes 0; a 600x smaller one leaves a gap above the 1e-9 floor
    whose CI reaches 0, so its shares are flagged as noise. The CI is a percentile bootstrap of the per-prompt
    (tuned - base) scores: it holds their mean, and lies within scipy's percentile bootstrap of the same mean to
    a tenth of the interval (the two draw different resamples)."""
    from scipy.stats import bootstrap

    from mechdiff.analysis.heads import Patcher

    tok, base, texts = world
    for scale, significant in ((6.0, True), (0.01, False)):
        tuned = copy.deepcopy(base)
        plant_edit(tuned, layer=1, kind="attn_out", rank=4, scale=scale, seed=3, heads=[2])
        batches = _batches(tok, tuned, texts)
        m = diff_heads(base, tuned, batches, n_patch=1, n_random=0, seed=0)["metrics"]
        bs, ts = attribution(base, batches), attribution(tuned, batches)
        d = ts.scores - bs.scores
        assert m["gap"] == pytest.approx(d.mean(), rel=1e-9) == pytest.approx(Patcher(base, tuned, batches, bs, ts).gap)
        assert m["gap_lo"] < m["gap"] < m["gap_hi"]
        ref = bootstrap((d,), np.mean, n_resamples=20000, method="percentile", random_state=0).confidence_interval
        width = ref.high - ref.low
        assert abs(m["gap_lo"] - ref.low) < 0.1 * width and abs(m["gap_hi"] - ref.high) < 0.1 * width
        assert m["gap_significant"] is significant
    # one prompt: no spread to judge the gap by, so a gap is never called significant (its CI is [gap, gap])
    tuned = copy.deepcopy(base)
    plant_edit(tuned, layer=1, kind="attn_out", rank=4, scale=6.0, seed=3, heads=[2])
    one = diff_heads(base, tuned, _batches(tok, tuned, texts[:1]), n_patch=1, n_random=0, seed=0)["metrics"]
    assert one["n_prompts"] == 1 and one["gap_lo"] == one["gap"] == one["gap_hi"] != 0
    assert one["gap_significant"] is False


def test_churn_pred_at_a_threshold_counts_the_planted_heads(world):
    from mechdiff.analysis.heads import diff_heads as run

    base, tuned, batches, res = _planted(world, [0, 3])
    pred = np.abs(res["pred"])
    thr = (min(pred[1, 0], pred[1, 3]) + max(pred[lh] for lh in np.ndindex(4, 4) if lh not in {(1, 0), (1, 3)})) / 2
    again = run(base, tuned, batches, abs_threshold=thr, n_patch=0, n_random=0)
    assert again["metrics"]["churn_pred"] == pytest.approx(2 / 16)


def test_rank_by_direct_puts_the_planted_heads_first_then_the_relays(world):
    """rank_by direct: the planted heads first; the heads tied at a direct estimate of 0 follow by |pred| (those
    relaying the change before the untouched ones), not by index."""
    base, tuned, batches, res = _planted(world, [0, 3])
    again = diff_heads(base, tuned, batches, rank_by="direct", n_patch=6, n_random=0)
    order = [(r["layer"], r["head"]) for r in again["patched"]]
    assert set(order[:2]) == {(1, 0), (1, 3)}
    rest = [lh for lh in np.ndindex(4, 4) if lh not in {(1, 0), (1, 3)}]
    by_pred = sorted(rest, key=lambda lh: (-abs(res["pred"][lh]), lh))
    assert order[2:] == by_pred[:4]
    assert abs(res["pred"][order[2]]) > 0 and order[2][0] > 1  # a relay after the planted layer
    assert again["metrics"]["rank_by"] == "direct"


def test_block_reuse_gives_the_full_forward(world, monkeypatch):
    """Patching with the blocks before the first patched layer skipped equals running every block."""
    import mechdiff.analysis.heads as H

    base, tuned, batches, _ = _planted(world, [1], layer=2)
    p = H.Patcher(base, tuned, batches, attribution(base, batches), attribution(tuned, batches))
    fast, fast_zero = p.patch([(2, 1), (3, 0)]), p.zero([(3, 2)])
    monkeypatch.setattr(H, "reuse_blocks", lambda model, outputs, upto: contextlib.nullcontext())
    slow, slow_zero = p.patch([(2, 1), (3, 0)]), p.zero([(3, 2)])
    for a, b in ((fast, slow), (fast_zero, slow_zero)):
        assert a["share"] == pytest.approx(b["share"], rel=1e-5, abs=1e-7)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-5, abs=1e-9)


def _f(model, batches, cache=None, edit=None):
    """Mean over prompts of the summed continuation log-prob. With `cache` (a scan's z), every layer's head
    outputs are set to the cached ones, passed through `edit(layer, z)` first: F as a function of the heads'
    outputs taken as independent inputs."""
    heads = attention_heads(model)
    tot, n = 0.0, 0
    with torch.no_grad():
        for bn, b in enumerate(batches):
            with contextlib.ExitStack() as st:
                for layer in range(heads.n_layers if cache is not None else 0):
                    z = cache.z[bn][layer]
                    st.enter_context(edit_heads_at(model, heads, layer, lambda _z, z=z, layer=layer: edit(layer, z)))
                s, _ = _score(model, b)
            tot += float(s.sum())
            n += len(b.rows)
    return tot / n


def test_grad_x_act_matches_finite_differences(world):
    """grad x act of a head = d/ds F(heads' outputs, head h scaled by 1 + s) at s = 0, other heads held."""
    tok, base, texts = world
    batches = _batches(tok, base, texts)
    scan = attribution(base, batches)
    heads = attention_heads(base)
    eps = 1e-3
    assert _f(base, batches, scan, lambda layer, z: z) == pytest.approx(_f(base, batches), rel=1e-9)
    for layer, h in [(0, 1), (2, 3), (3, 0)]:
        sl = heads.block(h)

        def scaled(s, layer=layer, sl=sl):
            def fn(lay, z):
                if lay != layer:
                    return z
                z = z.clone()
                z[..., sl] = z[..., sl] * (1 + s)
                return z

            return fn

        fd = (_f(base, batches, scan, scaled(eps)) - _f(base, batches, scan, scaled(-eps))) / (2 * eps)
        assert scan.attr[layer, h] == pytest.approx(fd, rel=2e-3, abs=1e-5)
    assert scan.scores.mean() == pytest.approx(_f(base, batches), rel=1e-9)


def test_integrated_gradients_are_complete(world):
    """IG over every head output together adds up to F(z) - F(all head outputs 0)."""
    tok, base, texts = world
    batches = _batches(tok, base, texts[:16])
    ig = attribution(base, batches, ig_steps=48)
    f0 = _f(base, batches, ig, lambda layer, z: torch.zeros_like(z))
    assert ig.attr.sum() == pytest.approx(_f(base, batches) - f0, rel=2e-3)
    gx = attribution(base, batches)
    assert not np.allclose(ig.attr, gx.attr, rtol=1e-3)  # the path average differs from the endpoint gradient


def test_gpt2_heads_layout_adds_up_to_the_projection():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    heads = attention_heads(model)
    assert (heads.n_layers, heads.n_heads, heads.head_dim) == (2, 4, 8)
    seen = {}
    with edit_heads_at(model, heads, 1, lambda z: seen.setdefault("z", z)), \
            edit_at(model, Site(1, "attn_out"), lambda t: seen.setdefault("out", t)), torch.no_grad():
        model(input_ids=torch.arange(10)[None])
    z = seen["z"]
    parts = sum(z[..., heads.block(h)] @ heads.weight(1, h).T for h in range(4))
    bias = heads.projections[1].bias
    torch.testing.assert_close(parts + bias, seen["out"], rtol=1e-5, atol=1e-5)


def test_ranking_statistics_against_hand_numbers():
    a = np.array([[1.0, -3.0], [0.5, 2.0]])
    z = zscores(a)
    np.testing.assert_allclose(z, (a - a.mean()) / a.std())
    assert top_heads(a, 2) == [(0, 1), (1, 1)]
    b = np.array([[-4.0, 0.0], [0.1, 2.0]])  # top-2: (0, 0), (1, 1)
    assert topk_jaccard(a, b, 2) == pytest.approx(1 / 3)
    assert churn(np.zeros((2, 2)), np.array([[0.0, 2.5], [-3.0, 1.0]]), 2.0) == 0.5
    with pytest.raises(MechdiffError, match="same attribution"):
        zscores(np.ones((3, 3)))


class _FakePatcher:
    """share(n) = n / 10: the 50 % target is first reached at n = 5."""

    def __init__(self):
        self.calls = []

    def patch(self, heads):
        self.calls.append(len(heads))
        return {"share": len(heads) / 10, "kl_share": 0.0, "effect": 0.0}


def test_cumulative_bisects_to_the_fewest_heads():
    order = [(0, i) for i in range(12)]
    fake = _FakePatcher()
    rows, n = cumulative(fake, order, 0.5)
    assert n == 5
    assert [r["n_heads"] for r in rows] == sorted(set(fake.calls))
    assert {1, 2, 4, 8, 12} <= {r["n_heads"] for r in rows}
    rows, n = cumulative(_FakePatcher(), order, 1.5)  # never reached
    assert n is None


def test_spearman_against_hand_ranks(world):
    from mechdiff.analysis.heads import _spearman

    # ranks of x: 1, 3, 2, 4; of y: 2, 3, 1, 4 -> d^2 = 1 + 0 + 1 + 0 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert _spearman([0.1, 0.9, 0.5, 2.0], [10.0, 30.0, 5.0, 40.0]) == pytest.approx(0.8)
    assert _spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # constant: undefined
    _, _, _, res = _planted(world, [2])
    pr = res["patched"]
    ref = spearmanr(np.abs([r["delta_attr"] for r in pr]), np.abs([r["patch_share"] for r in pr])).statistic
    assert res["metrics"]["spearman_patch"] == pytest.approx(ref)


def test_zero_matches_a_manual_ablation_and_models_are_left_as_they_were(world):
    import mechdiff.analysis.heads as H

    base, tuned, batches, _ = _planted(world, [1], layer=2)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    bs, ts = attribution(base, batches), attribution(tuned, batches)
    assert all(p.grad is None for p in [*base.parameters(), *tuned.parameters()])  # no parameter gradients
    p = H.Patcher(base, tuned, batches, bs, ts)
    got = p.zero([(2, 1), (0, 3)])
    heads = attention_heads(tuned)

    def ablate(layer, h):
        def fn(z):
            z = z.clone()
            z[..., heads.block(h)] = 0
            return z
        return edit_heads_at(tuned, heads, layer, fn)

    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            with ablate(2, 1), ablate(0, 3):
                s, _ = _score(tuned, b)
            tot, n = tot + float(s.sum()), n + len(b.rows)
    assert got["effect"] == pytest.approx(ts.scores.mean() - tot / n, rel=1e-6, abs=1e-9)
    assert all(torch.equal(q, before[k]) for k, q in tuned.named_parameters())
    # no hook or replaced forward is left behind: a plain run scores as before
    assert _f(tuned, batches) == pytest.approx(ts.scores.mean(), rel=1e-9)
    with pytest.raises(MechdiffError, match="out of range"):
        p.patch([(2, 9)])
    with pytest.raises(MechdiffError, match="twice"):
        p.zero([(2, 1), (2, 1)])
    with pytest.raises(MechdiffError, match="rank_by"):
        H.diff_heads(base, tuned, batches, rank_by="size")


def test_identical_models_and_bad_edits_fail_cleanly(world):
    tok, base, texts = world
    batches = _batches(tok, base, texts[:8])
    with pytest.raises(MechdiffError, match="alike"):
        diff_heads(base, copy.deepcopy(base), batches)
    m = copy.deepcopy(base)
    with pytest.raises(MechdiffError, match="heads"):
        plant_edit(m, layer=1, kind="attn_out", rank=2, scale=2.0, seed=0, heads=[7])
    with pytest.raises(MechdiffError, match="attn_out"):
        plant_edit(m, layer=1, kind="mlp_out", rank=2, scale=2.0, seed=0, heads=[0])


def test_head_edit_touches_only_the_chosen_heads_columns(world):
    _, base, _ = world
    m = copy.deepcopy(base)
    info = plant_edit(m, layer=2, kind="attn_out", rank=2, scale=3.0, seed=1, heads=[1])
    hb, hm = attention_heads(base), attention_heads(m)
    U = torch.from_numpy(info.directions)
    M = torch.eye(64, dtype=torch.float64) + 3.0 * U @ U.T
    for h in range(4):
        want = (M @ hb.weight(2, h).double()).float() if h == 1 else hb.weight(2, h)
        torch.testing.assert_close(hm.weight(2, h), want, rtol=1e-5, atol=1e-6)
    assert info.heads == [1]


def test_direct_estimate_is_the_first_order_effect_of_each_heads_own_change(world):
    """A small change to every weight of layer 2's attention (queries, keys, values, output): the direct estimate is
    0 outside layer 2, and for each layer-2 head it matches the measured effect of patching that head (the first
    changed layer: its tuned output there is its own change on the base's input) to first order; heads of layer 3
    relay the change, so their pred is not 0 but their direct estimate is."""
    from mechdiff.analysis.heads import Patcher
    from mechdiff.model.sites import find_blocks

    tok, base, texts = world
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for prm in find_blocks(tuned)[2].self_attn.parameters():
            prm.add_(2e-3 * prm.abs().mean() * torch.randn(prm.shape, generator=g))
    batches = _batches(tok, base, texts)
    res = diff_heads(base, tuned, batches, n_patch=0, n_random=0)
    direct = res["direct"]
    assert np.all(direct[[0, 1, 3]] == 0.0)
    assert np.abs(res["pred"][3]).max() > 0
    p = Patcher(base, tuned, batches, attribution(base, batches), attribution(tuned, batches))
    measured = np.array([p.patch([(2, h)])["effect"] for h in range(direct.shape[1])])
    assert np.abs(measured).max() > 1e-5
    # measured within 0.3-0.7 %; with the gradient of grad x act (later heads held fixed) it was off by up to 31 %
    np.testing.assert_allclose(direct[2], measured, rtol=0.02)
    np.testing.assert_allclose(res["pred"][2], measured, rtol=0.02)


def _gqa_llama(seed=0):
    """A Llama with grouped-query attention unlike the tiny model: 8 query heads over 2 key/value heads, head_dim 6."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=60, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return m.eval()


@pytest.mark.parametrize("plant", ["o_proj", "q_proj", "v_proj"])
def test_direct_finds_planted_heads_under_grouped_query_attention(plant):
    """Planted in the output columns of two heads, the query rows of one head, or the value rows of one key/value
    group (whose answer is every query head sharing it): the direct estimate is nonzero exactly there and
    `top_direct` lists exactly those heads, even where a later head relaying the change outranks them by pred."""
    from mechdiff.model.sites import find_blocks

    base = _gqa_llama()
    tuned = copy.deepcopy(base)
    hd, layer = attention_heads(base).head_dim, 1
    attn = find_blocks(tuned)[layer].self_attn
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if plant == "o_proj":
            plant_edit(tuned, layer=layer, kind="attn_out", rank=4, scale=6.0, seed=3, heads=[7, 1])
            planted = {(layer, 1), (layer, 7)}
        elif plant == "q_proj":
            attn.q_proj.weight[7 * hd:8 * hd] += 0.5 * torch.randn(hd, 48, generator=gen)
            planted = {(layer, 7)}
        else:  # key/value group 1 serves query heads 4-7
            attn.v_proj.weight[hd:2 * hd] += 0.5 * torch.randn(hd, 48, generator=gen)
            planted = {(layer, h) for h in range(4, 8)}
    rng = np.random.default_rng(1)
    seqs, n_prompt = [], []
    for _ in range(24):
        t = int(rng.integers(6, 14))
        seqs.append(rng.integers(4, 60, size=t + 3).tolist())
        n_prompt.append(t)
    batches = make_batches(seqs, n_prompt, [3] * 24, pad=0, batch_size=8)
    res = diff_heads(base, tuned, batches, n_patch=4, n_random=0)
    direct = res["direct"]
    assert {lh for lh in np.ndindex(direct.shape) if direct[lh] != 0.0} == planted
    assert {tuple(x) for x in res["metrics"]["top_direct"]} == set(top_heads(direct, min(5, len(planted))))
    assert set(top_heads(direct, len(planted))) == planted
    pred_top = top_heads(res["pred"], 4)  # where pred ranks them (README "Attention heads")
    if plant == "o_proj":  # a later head relaying the change first, one planted head outside the top 4
        assert pred_top[0] == (2, 2) and (layer, 1) not in pred_top
    elif plant == "q_proj":
        assert pred_top[0] == (layer, 7)
    from mechdiff.analysis.heads import Patcher

    p = Patcher(base, tuned, batches, attribution(base, batches), attribution(tuned, batches))
    assert p.patch(sorted(planted))["share"] == pytest.approx(1.0, abs=1e-4)
