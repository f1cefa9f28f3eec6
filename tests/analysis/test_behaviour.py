"""Behavioural metrics: every number against an independent reference on a tiny model, and the intervene protocol."""

import contextlib
import os

import numpy as np
import pytest
import torch

from mechdiff.analysis.behaviour import (
    DEFAULT_REFUSAL_PATTERNS,
    compare,
    continuation_logprobs,
    decision_logits,
    greedy_continuations,
    marker_hits,
    mc_correct,
    mc_text,
    new_token_mass,
    option_logprobs,
    perplexity,
)
from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site, edit_at
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
from mechdiff.model.tokens import encode

N_LAYERS, D = 2, 32
PROMPTS = [
    "the cat sat on the mat",
    "a dog ran",
    "why do birds fly over the big red house near the river in the morning",
    "sun",
    "tell me about the old city and its green hills",
    "which animal swims in the lake",
]
CONTS = ["cat sat", "the dog ran under the tree", "blue", "moon and rain", "red", "fish swim fast in the lake"]
QUESTIONS = [("which animal can fly", ["bird", "fish", "a big dog"], 0),
             ("what falls from the sky", ["rain", "city road"], 1),
             ("the moon is", ["old", "new", "happy", "sad"], 3)]
EXTRA = ("a b c d answer . : bird fish dog tree moon rain snow blue red green old new happy sad city road hill lake "
         "swim swims fast falls from sky is animal can").split()


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    tok = make_tiny_tokenizer(PROMPTS, extra_words=EXTRA)
    model = make_tiny_model(len(tok), n_layers=N_LAYERS, d_model=D, seed=0)
    return tok, model


# --------------------------------------------------------------------------------------------- references


def _prompt_ids(tok, prompt, chat):
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def _ref_logprob(model, tok, prompt, cont, chat=True, max_len=10**6):
    """Sum of log p(continuation tokens): one unpadded forward of the concatenated sequence, log_softmax, gather."""
    p = _prompt_ids(tok, prompt, chat)
    c = tok(cont if chat else " " + cont, add_special_tokens=False)["input_ids"]
    p = p[max(0, len(p) + len(c) - max_len):]
    seq = torch.tensor([p + c])
    lp = torch.log_softmax(model(input_ids=seq).logits[0].double(), dim=-1)
    tgt = torch.tensor(c)
    return float(lp[torch.arange(len(p) - 1, len(p) + len(c) - 1), tgt].sum()), len(c)


@torch.no_grad()
def _ref_greedy(model, tok, ids, n):
    """Unbatched greedy decoding without a cache: argmax of a full forward, appended, until eos or n tokens."""
    seq, new = list(ids), []
    for _ in range(n):
        t = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        seq.append(t)
        new.append(t)
    return tok.decode(new, skip_special_tokens=True)


def _adder(layer, vec, where):
    """An intervene adding `vec` to a block's output: at positions >= start ("from", the protocol: every position
    of a T == 1 decode step) or only at positions < start ("before": nothing on decode steps)."""

    def intervene(model, start):
        def fn(t):
            B, T = t.shape[:2]
            if T == 1:
                m = torch.full((B, 1), where == "from")
            else:
                ar = torch.arange(T)[None, :]
                m = ar >= start[:, None] if where == "from" else ar < start[:, None]
            return t + m[..., None].to(t.dtype) * vec

        return edit_at(model, Site(layer, "resid_post"), fn)

    return intervene


def _recorder(calls):
    """An intervene that changes nothing and records (input_ids, start) of every forward inside it."""

    @contextlib.contextmanager
    def intervene(model, start):
        h = model.get_input_embeddings().register_forward_pre_hook(
            lambda _m, args: calls.append((args[0].clone(), start.clone())))
        try:
            yield
        finally:
            h.remove()

    return intervene


# --------------------------------------------------------------------------------------------- log-probabilities


@pytest.mark.parametrize("chat", [True, False])
def test_continuation_logprobs_equal_unpadded_forward(world, chat):
    tok, model = world
    want = [_ref_logprob(model, tok, p, c, chat) for p, c in zip(PROMPTS, CONTS)]
    for bs in (1, 4, 16):  # different lengths in one batch: right padding must not matter
        lp, n = continuation_logprobs(model, tok, PROMPTS, CONTS, chat=chat, batch_size=bs)
        assert lp.dtype == np.float64 and n.dtype == np.float64
        np.testing.assert_allclose(lp, [w[0] for w in want], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(n, [w[1] for w in want])


def test_continuation_prompt_cut_from_the_left_and_errors(world):
    tok, model = world
    lp, n = continuation_logprobs(model, tok, PROMPTS[2:3], CONTS[2:3], max_len=8)
    np.testing.assert_allclose(lp, [_ref_logprob(model, tok, PROMPTS[2], CONTS[2], max_len=8)[0]], rtol=1e-5)
    assert lp[0] != pytest.approx(_ref_logprob(model, tok, PROMPTS[2], CONTS[2])[0], rel=1e-6)
    with pytest.raises(MechdiffError, match="continuation"):
        continuation_logprobs(model, tok, ["a dog ran"], [""])
    with pytest.raises(MechdiffError, match="max_len"):
        continuation_logprobs(model, tok, ["a dog ran"], ["the dog ran under the tree"], max_len=6)
    with pytest.raises(MechdiffError, match="pair up"):
        continuation_logprobs(model, tok, PROMPTS, CONTS[:2])


def test_mc_text_option_logprobs_and_mc_correct(world):
    tok, model = world
    assert mc_text("Capital of France?", ["Paris", "Rome"]) == "Capital of France?\nA. Paris\nB. Rome\nAnswer:"
    qs, chs, ans = [q for q, _, _ in QUESTIONS], [c for _, c, _ in QUESTIONS], [a for _, _, a in QUESTIONS]
    got = option_logprobs(model, tok, qs, chs, batch_size=3, fmt="listed")
    assert [len(g) for g in got] == [3, 2, 4]
    for g, q, ch in zip(got, qs, chs):
        np.testing.assert_allclose(g, [_ref_logprob(model, tok, mc_text(q, ch), c)[0] for c in ch], rtol=1e-5)
    cloze = option_logprobs(model, tok, qs, chs, batch_size=2)  # default: the question alone is the prompt
    assert mc_text("Capital of France?", ["Paris", "Rome"], "cloze") == "Capital of France?"
    for g, q, ch in zip(cloze, qs, chs):
        np.testing.assert_allclose(g, [_ref_logprob(model, tok, q, c)[0] for c in ch], rtol=1e-5)
    mean = option_logprobs(model, tok, qs, chs, batch_size=2, score="mean")  # length-normalised
    for g, q, ch in zip(mean, qs, chs):
        np.testing.assert_allclose(g, [s / n for s, n in (_ref_logprob(model, tok, q, c) for c in ch)], rtol=1e-5)
    with pytest.raises(MechdiffError, match="option score"):
        option_logprobs(model, tok, qs, chs, score="max")
    with pytest.raises(MechdiffError, match="format"):
        mc_text("q", ["a", "b"], "letters")
    want = np.array([int(np.argmax(g)) == a for g, a in zip(got, ans)])
    np.testing.assert_array_equal(mc_correct(got, ans), want)
    # a tie for the maximum is wrong, even for the right option
    np.testing.assert_array_equal(mc_correct([np.array([-1.0, -1.0, -3.0]), np.array([-2.0, -1.0])], [0, 1]),
                                  [False, True])
    with pytest.raises(MechdiffError, match="answer index"):
        mc_correct([np.array([-1.0, -2.0])], [2])
    with pytest.raises(MechdiffError):
        mc_text("q", [])


def test_perplexity_is_token_weighted():
    s, n = np.array([-2.0, -9.0, -1.0]), np.array([1, 4, 2])
    assert perplexity(s, n) == pytest.approx(np.exp(12.0 / 7.0), rel=1e-12)
    assert perplexity(s, n) != pytest.approx(np.exp(-np.mean(s / n)))
    with pytest.raises(MechdiffError):
        perplexity(s, n[:2])
    with pytest.raises(MechdiffError):
        perplexity([np.nan], [1])


# --------------------------------------------------------------------------------------------- decision / generation


def test_decision_logits_equal_unbatched_forward(world):
    tok, model = world
    enc = encode(tok, PROMPTS)
    rows = [5, 0, 2, 2, 3]
    got = decision_logits(model, enc, rows, batch_size=2)
    assert got.dtype == np.float32 and got.shape == (5, len(tok))
    with torch.no_grad():
        want = np.stack([model(input_ids=torch.tensor([enc.ids[r]])).logits[0, enc.decision[r]].numpy()
                         for r in rows])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_greedy_batched_left_padded_equals_one_at_a_time(world):
    tok, model = world
    enc = encode(tok, PROMPTS)
    rows = [2, 0, 3, 5, 1, 4]
    want = [_ref_greedy(model, tok, enc.ids[r][: enc.decision[r] + 1], 6) for r in rows]
    assert len(set(want)) > 1
    for bs in (1, 4, 16):
        assert greedy_continuations(model, tok, enc, rows, max_new_tokens=6, batch_size=bs) == want


def test_intervene_protocol(world):
    tok, model = world
    enc = encode(tok, PROMPTS)
    rows = list(range(len(PROMPTS)))
    vec = 4.0 * torch.randn(D, generator=torch.Generator().manual_seed(0))
    clean_g = greedy_continuations(model, tok, enc, rows, max_new_tokens=5)
    clean_d = decision_logits(model, enc, rows)
    clean_c = continuation_logprobs(model, tok, PROMPTS, CONTS)[0]

    # steering from the decision token on (every decode step too) changes the output; batched == one at a time
    steer = _adder(0, vec, "from")
    g = greedy_continuations(model, tok, enc, rows, max_new_tokens=5, batch_size=16, intervene=steer)
    g1 = [greedy_continuations(model, tok, enc, [r], max_new_tokens=5, intervene=steer)[0] for r in rows]
    assert g == g1
    assert sum(a != b for a, b in zip(g, clean_g)) >= len(rows) // 2
    c = continuation_logprobs(model, tok, PROMPTS, CONTS, batch_size=16, intervene=steer)[0]
    c1 = [continuation_logprobs(model, tok, [p], [q], intervene=steer)[0][0] for p, q in zip(PROMPTS, CONTS)]
    np.testing.assert_allclose(c, c1, rtol=1e-5)
    assert np.abs(c - clean_c).min() > 1e-3

    # at the last block's output a position only feeds its own logits: acting before the decision token (in the
    # padded frame) changes nothing, acting from it changes the decision logits and what is generated
    last_before, last_from = _adder(N_LAYERS - 1, vec, "before"), _adder(N_LAYERS - 1, vec, "from")
    assert greedy_continuations(model, tok, enc, rows, max_new_tokens=5, intervene=last_before) == clean_g
    np.testing.assert_allclose(decision_logits(model, enc, rows, batch_size=4, intervene=last_before), clean_d,
                               atol=1e-5)
    np.testing.assert_allclose(continuation_logprobs(model, tok, PROMPTS, CONTS, intervene=last_before)[0],
                               clean_c, rtol=1e-6)
    assert np.abs(decision_logits(model, enc, rows, batch_size=4, intervene=last_from) - clean_d).min() > 1e-3
    assert greedy_continuations(model, tok, enc, rows, max_new_tokens=5, intervene=last_from) != clean_g

    # start marks each prompt's decision token in the batch's padded frame; decode steps are T == 1
    dec_tokens = {enc.ids[r][enc.decision[r]] for r in rows}
    calls = []
    decision_logits(model, enc, rows, batch_size=4, intervene=_recorder(calls))
    assert len(calls) == 2
    for ids, st in calls:
        assert st.shape == (ids.shape[0],) and {int(ids[b, st[b]]) for b in range(len(st))} <= dec_tokens
    calls = []
    greedy_continuations(model, tok, enc, rows, max_new_tokens=3, batch_size=4, intervene=_recorder(calls))
    prefill = [(ids, st) for ids, st in calls if ids.shape[1] > 1]
    assert len(prefill) == 2 and len(calls) > 2 and all(ids.shape[1] == 1 for ids, _ in calls if ids.shape[1] < 2)
    for ids, st in prefill:  # left-padded: every prompt ends at its decision token, the last column
        assert (st == ids.shape[1] - 1).all() and {int(t) for t in ids[:, -1]} <= dec_tokens
    calls = []
    continuation_logprobs(model, tok, PROMPTS, CONTS, batch_size=16, intervene=_recorder(calls))
    (ids, st), = calls
    want = {tuple(_prompt_ids(tok, p, True)[-3:]) for p in PROMPTS}  # ..., <|im_start|>, assistant
    assert {tuple(int(x) for x in ids[b, st[b] - 2 : st[b] + 1]) for b in range(len(st))} == want


# --------------------------------------------------------------------------------------------- markers, mass, compare


def test_marker_hits_seed_refusal_patterns():
    assert DEFAULT_REFUSAL_PATTERNS == [r"\bI (can(?:not|'t)|am unable)\b", r"\bI must not\b", r"\bI will not\b"]
    texts = ["I cannot help with that.", "I can help!", "I will not do it", "Sorry, I can't.", "i am unable to",
             "Icannot", "I must not", ""]
    np.testing.assert_array_equal(marker_hits(texts, DEFAULT_REFUSAL_PATTERNS),
                                  [True, False, True, True, True, False, True, False])
    np.testing.assert_array_equal(marker_hits(texts, r"help"), [True, True] + [False] * 6)
    with pytest.raises(MechdiffError, match=r"\(unclosed"):
        marker_hits(texts, ["ok", "(unclosed"])


def test_answer_key_and_hits():
    from mechdiff.analysis.behaviour import answer_hits, answer_key

    refs = ["The answer is 161.", "so 1,200 apples", "... #### 72", "x = -3.5", "Paris.", "  New   York! ", "1/2",
            "It is 3:00", "\\frac{1}{2}", "3,4", "1,2000"]
    assert [answer_key(r) for r in refs] == ["161", "1200", "72", "-3.5", "paris", "new york", "1/2", "3:00",
                                             "\\frac{1}{2}", "4", "2000"]
    cases = [  # (generation, reference, right)
        ("The answer is 161.", "The answer is 161.", True),
        ("65 + 96 = 161", "161", True),  # the last number is the answer
        ("161 apples and 5 pears", "161", False),
        ("It is 1610", "161", False), ("16.5 cm", "16", False), ("1,61", "161", False), ("1,61", "61", True),
        ("1,200 in all", "1200", True), ("about -3.5", "-3.5", True),
        ("She lives in paris!", "Paris.", True), ("I know", "no", False), ("no, it is not", "no", True),
        ("new\nyork", "New York", True), ("the answer is 1 / 2", "1/2", True), ("it is 2", "1/2", False),
        ("at 3:00 pm", "3:00", True), ("at 0 pm", "3:00", False), ("", "7", False), ("x=7", "7", True),
    ]
    got = answer_hits([c[0] for c in cases], [c[1] for c in cases])
    np.testing.assert_array_equal(got, [c[2] for c in cases], err_msg=str([c for c, g in zip(cases, got) if c[2] != g]))
    with pytest.raises(MechdiffError, match="empty"):
        answer_hits(["x"], [" "])
    with pytest.raises(MechdiffError, match="one per text"):
        answer_hits(["x", "y"], ["1"])
    # a number ending a generation cut off at the token limit may be a prefix ("16" of "161"): it counts only when
    # the generation finished there, or a character after it ends it
    cut = ["The answer is 16", "The answer is 16", "The answer is 16.", "16 apples"]
    np.testing.assert_array_equal(answer_hits(cut, ["16"] * 4, [False, True, False, False]), [False, True, True, True])
    np.testing.assert_array_equal(answer_hits(cut, ["16"] * 4), [True] * 4)


def test_greedy_continuations_report_which_finished(world, monkeypatch):
    """finished_out: True where an end-of-sequence id stopped a continuation, False where the token limit did."""
    import mechdiff.analysis.behaviour as B

    tok, model = world
    enc = encode(tok, PROMPTS, chat=True)
    rows = np.arange(len(PROMPTS))
    V = model.get_output_embeddings().weight.shape[0]
    for stop_ids, want in ((set(range(V)), True), (set(), False)):  # every id ends it at once / none ever does
        monkeypatch.setattr(B, "_eos_ids", lambda m, t, ids=stop_ids: ids)
        done = np.zeros(len(rows), dtype=bool) if want else np.ones(len(rows), dtype=bool)
        texts = greedy_continuations(model, tok, enc, rows, max_new_tokens=3, finished_out=done)
        assert (done == want).all()
        assert all(t == "" for t in texts) == want


def test_new_token_mass_against_numpy_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 40)) * 3.0
    logits[0] *= 300.0  # huge logits: must stay stable
    logits[1, 7] = -np.inf
    allowed = np.arange(0, 40, 3)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want = p[:, np.setdiff1d(np.arange(40), allowed)].sum(axis=1)
    np.testing.assert_allclose(new_token_mass(logits, allowed), want, rtol=1e-10, atol=1e-300)
    mask = np.zeros(40, bool)
    mask[allowed] = True
    np.testing.assert_allclose(new_token_mass(torch.tensor(logits, dtype=torch.float32), mask), want, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_array_equal(new_token_mass(logits, None), np.zeros(5))
    np.testing.assert_array_equal(new_token_mass(logits, np.arange(40)), np.zeros(5))
    assert new_token_mass(logits, None).dtype == np.float64


def test_compare_means_and_cis():
    rng = np.random.default_rng(1)
    base = rng.normal(size=80)
    tuned = base + 0.5 + 0.3 * rng.normal(size=80)
    res = compare(base, tuned, n_boot=300)
    assert res["n"] == 80
    for key, x in (("base", base), ("tuned", tuned), ("diff", tuned - base)):
        assert res[key]["mean"] == pytest.approx(float(np.mean(x)), rel=1e-12)
        assert res[key]["lo"] < res[key]["mean"] < res[key]["hi"]
    assert res["diff"]["hi"] - res["diff"]["lo"] < res["tuned"]["hi"] - res["tuned"]["lo"]  # pairing helps
    bools = compare(np.array([True, False, False, True]), np.array([True, True, True, False]), n_boot=200)
    assert bools["base"]["mean"] == 0.5 and bools["tuned"]["mean"] == 0.75 and bools["diff"]["mean"] == 0.25
    un = compare(base, tuned[:50], n_boot=300, paired=False)
    assert un["diff"]["mean"] == pytest.approx(tuned[:50].mean() - base.mean(), rel=1e-12)
    assert un["diff"]["lo"] < un["diff"]["mean"] < un["diff"]["hi"] and un["n_tuned"] == 50
    with pytest.raises(MechdiffError, match="paired"):
        compare(base, tuned[:50])
    with pytest.raises(MechdiffError):
        compare(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(MechdiffError):
        compare(np.array([]), np.array([]))


def test_prefix_cache_gives_the_same_numbers_with_and_without_an_intervention(world):
    """Running only the suffix after cached prefixes equals full forwards (clean, and steered from the decision on)."""
    from mechdiff.analysis.behaviour import PrefixCache

    tok, model = world
    enc = encode(tok, PROMPTS)
    rows = list(range(len(PROMPTS)))
    vec = 4.0 * torch.randn(D, generator=torch.Generator().manual_seed(1))
    cache = PrefixCache(model)
    for iv in (None, _adder(1, vec, "from")):
        np.testing.assert_allclose(decision_logits(model, enc, rows, batch_size=4, intervene=iv, prefix=cache),
                                   decision_logits(model, enc, rows, batch_size=4, intervene=iv), atol=1e-4)
        assert greedy_continuations(model, tok, enc, rows, max_new_tokens=5, intervene=iv, prefix=cache) == \
            greedy_continuations(model, tok, enc, rows, max_new_tokens=5, intervene=iv)
        np.testing.assert_allclose(continuation_logprobs(model, tok, PROMPTS, CONTS, intervene=iv, prefix=cache)[0],
                                   continuation_logprobs(model, tok, PROMPTS, CONTS, intervene=iv)[0], rtol=1e-4)
        qs, chs = [q for q, _, _ in QUESTIONS], [c for _, c, _ in QUESTIONS]
        for a, b in zip(option_logprobs(model, tok, qs, chs, intervene=iv, prefix=cache),
                        option_logprobs(model, tok, qs, chs, intervene=iv)):
            np.testing.assert_allclose(a, b, rtol=1e-4)
    # one entry per distinct prefix, reused, and the opening each batch of prefixes shares (run once)
    keys = list(cache._kv)
    own = [k for k in keys if not any(len(o) > len(k) and o[: len(k)] == k for o in keys)]
    assert 0 < len(own) <= len(PROMPTS) + len(QUESTIONS) and len(keys) > len(own)
    head = min(keys, key=len)  # the chat template's opening, run once, starts every other prefix
    assert all(k[: len(head)] == head for k in keys) and len(head) >= 2


def test_prefix_cache_reuses_the_blocks_below_an_intervention_exactly():
    """Teacher-forced scoring under interventions at block 2 of 4: blocks 0-1 run once per batch (the first
    intervention's forward), later interventions reuse their output, and every number is bit for bit the one
    of recomputing them."""
    from mechdiff.analysis.behaviour import PrefixCache
    from mechdiff.analysis.steering import Handle, intervention
    from mechdiff.model.sites import find_blocks

    tok = make_tiny_tokenizer(PROMPTS, extra_words=EXTRA)
    model = make_tiny_model(len(tok), n_layers=4, d_model=D, seed=0)
    enc, rows = encode(tok, PROMPTS), list(range(len(PROMPTS)))
    qs, chs = [q for q, _, _ in QUESTIONS], [c for _, c, _ in QUESTIONS]
    V = np.linalg.qr(np.random.default_rng(0).normal(size=(D, 2)))[0]
    handles = [Handle(Site(2, "resid_post"), V, np.eye(2), np.ones(2)), Handle(Site(3, "attn_out"), V, -np.eye(2),
                                                                               np.zeros(2))]
    ivs = [intervention(handles, a) for a in (0.5, 2.0, 2.0)]
    assert [iv.first_block for iv in ivs] == [2, 2, 2]
    calls = {0: 0, 2: 0}
    blocks = find_blocks(model)
    hooks = [blocks[i].mlp.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]

    def score(iv, cache):
        return (decision_logits(model, enc, rows, batch_size=4, intervene=iv, prefix=cache),
                continuation_logprobs(model, tok, PROMPTS, CONTS, intervene=iv, prefix=cache)[0],
                np.concatenate(option_logprobs(model, tok, qs, chs, intervene=iv, prefix=cache)))

    try:
        shared, plain = PrefixCache(model), PrefixCache(model)
        got = [score(iv, shared) for iv in ivs]
        n_first = dict(calls)
        want = [score(lambda m, s, iv=iv: iv(m, s), plain) for iv in ivs]  # no first_block: every block runs
    finally:
        for h in hooks:
            h.remove()
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0][0], got[1][0])  # the interventions differ
    # plain: every block in every forward; shared: block 0 in the prefixes' own forwards (P) and the first
    # intervention's F suffix forwards only, block 2 in all 3F
    d0, d2 = calls[0] - n_first[0], calls[2] - n_first[2]
    assert d0 == d2 == n_first[2]
    F, rem = divmod(n_first[2] - n_first[0], 2)
    assert rem == 0 and F > 0 and n_first[0] - F == d2 - 3 * F >= 0


def test_prefix_cache_keeps_padded_batches_within_its_byte_budget(world, monkeypatch):
    """The left-padded key/value batch of a set of prefixes is assembled once and reused by every later scoring
    of the same batch, bit for bit the numbers of assembling it each time; the kept batches stay within
    `keep_bytes` (least recently used dropped), and a forward never writes into a kept batch."""
    from mechdiff.analysis.behaviour import PrefixCache

    tok, model = world
    enc, rows = encode(tok, PROMPTS), list(range(len(PROMPTS)))
    vec = 4.0 * torch.randn(D, generator=torch.Generator().manual_seed(3))
    ivs = [None, _adder(1, vec, "from"), _adder(1, -vec, "from")]
    pads = {"n": 0}
    pad = PrefixCache._pad

    def counting(self, prefixes):
        pads["n"] += 1
        return pad(self, prefixes)

    monkeypatch.setattr(PrefixCache, "_pad", counting)

    def score(cache, iv):
        return (decision_logits(model, enc, rows, batch_size=4, intervene=iv, prefix=cache),
                continuation_logprobs(model, tok, PROMPTS, CONTS, intervene=iv, prefix=cache)[0])

    kept = PrefixCache(model)
    got = [score(kept, iv) for iv in ivs]
    n_once = pads["n"]
    frozen = {k: [t.clone() for t in v[0]] for k, v in kept._padded.items()}
    pads["n"] = 0
    fresh = [score(PrefixCache(model, keep_bytes=0), iv) for iv in ivs]  # keeps nothing: assembles every time
    assert pads["n"] == len(ivs) * n_once > n_once
    for g, f in zip(got, fresh):
        for a, b in zip(g, f):
            np.testing.assert_array_equal(a, b)
    assert len(kept._padded) == n_once
    for k, ks in frozen.items():  # the kept tensors were read, never written
        assert all(torch.equal(a, b) for a, b in zip(ks, kept._padded[k][0]))
    sizes = [sum(t.numel() * t.element_size() for t in v[0] + v[1]) for v in kept._padded.values()]
    small = PrefixCache(model, keep_bytes=max(sizes) + 1)
    score(small, None)
    total = sum(sum(t.numel() * t.element_size() for t in v[0] + v[1]) for v in small._padded.values())
    assert 1 <= len(small._padded) < n_once and total <= max(sizes) + 1


def test_prefix_cache_runs_each_batchs_shared_opening_once(world):
    """Prefixes of a batch that start alike: the opening runs once, as a prefix of its own, and every prefix's
    keys and values equal those of its own unpadded forward."""
    from mechdiff.analysis.behaviour import PrefixCache
    from mechdiff.model.cache import cache_kv, empty_cache
    from mechdiff.model.sites import get_body

    tok, model = world
    ids = encode(tok, [f"the cat sat on the mat and {w}" for w in ("ran", "slept well", "sang", "ate")]).ids
    prefixes = [x[:-1] for x in ids]
    n_in = {"rows": 0}
    h = model.model.layers[0].register_forward_pre_hook(
        lambda _m, a: n_in.__setitem__("rows", n_in["rows"] + int(a[0].shape[0] * a[0].shape[1])))
    cache = PrefixCache(model)
    try:
        cache.fill(prefixes)
    finally:
        h.remove()
    S = len(os.path.commonprefix([tuple(p) for p in prefixes]))
    assert S >= 8 and tuple(prefixes[0][:S]) in cache._kv
    T = max(len(p) for p in prefixes) - S
    distinct = len({tuple(p) for p in prefixes})  # (words the tiny tokenizer lacks encode alike)
    # the opening once, each own (padded) rest, and the check: the first prefix's own unpadded forward
    assert distinct >= 3 and n_in["rows"] == S + distinct * T + len(prefixes[0])
    for p in prefixes:
        c = empty_cache(model)
        with torch.no_grad():
            get_body(model)(input_ids=torch.tensor([p]), cache=c, use_cache=True)
        for (k, v), (k2, v2) in zip(cache.get(p), cache_kv(c)):
            torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-5)


def test_prefix_cache_stops_sharing_the_opening_when_its_check_fails(world, monkeypatch):
    import mechdiff.model.cache as mc
    from mechdiff.analysis.behaviour import PrefixCache

    tok, model = world
    ids = encode(tok, [f"the cat sat on the mat and {w}" for w in ("ran", "slept well", "sang")]).ids
    prefixes = [x[:-1] for x in ids]
    want = PrefixCache(model)
    want._share = False
    want.fill(prefixes)
    monkeypatch.setattr(mc, "cache_check", lambda got, want, dtype: (0.05, 1e-3))
    cache = PrefixCache(model)
    with pytest.warns(RuntimeWarning, match="running whole prefixes"):
        cache.fill(prefixes)
    assert not cache._share
    for p in prefixes:
        for (k, v), (k2, v2) in zip(cache.get(p), want.get(p)):
            assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("window", [12, 20, 64])
def test_prefix_cache_equals_one_prompt_at_a_time_under_a_sliding_window(world, window, monkeypatch):
    """A sliding-window model (Mistral's layout) scored through the prefix cache gives each prompt's own unpadded
    forward: batches whose cache would outgrow the window (the prompts are 6-20 tokens, in batches of 2 sorted
    by length) run full forwards, which attend by position, and the others keep the cache path. At 12 tokens
    only the shortest decision batch fits, at 20 each function mixes both paths, at 64 every batch is cached."""
    from transformers import MistralConfig, MistralForCausalLM

    import mechdiff.analysis.behaviour as behaviour
    from mechdiff.analysis.behaviour import PrefixCache

    tok, _ = world
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=window, max_position_embeddings=256)).eval()
    enc = encode(tok, PROMPTS)
    assert max(enc.decision) + 1 > 12 >= min(enc.decision) + 1
    rows = list(range(len(PROMPTS)))
    vec = 4.0 * torch.randn(D, generator=torch.Generator().manual_seed(1))
    real, used = behaviour._cached_parts, []  # per batch: did it take the cache path

    def spy(*a, **k):
        out = real(*a, **k)
        used.append(out is not None)
        return out

    monkeypatch.setattr(behaviour, "_cached_parts", spy)
    paths = {}
    for iv in (None, _adder(1, vec, "from")):
        cache = PrefixCache(model)
        one = np.concatenate([decision_logits(model, enc, [r], batch_size=1, intervene=iv) for r in rows])
        used.clear()
        np.testing.assert_allclose(decision_logits(model, enc, rows, batch_size=2, intervene=iv, prefix=cache),
                                   one, atol=1e-4)
        paths["decision"] = set(used)
        want = [greedy_continuations(model, tok, enc, [r], max_new_tokens=3, intervene=iv)[0] for r in rows]
        used.clear()
        assert greedy_continuations(model, tok, enc, rows, max_new_tokens=3, batch_size=2, intervene=iv,
                                    prefix=cache) == want
        paths["greedy"] = set(used)
        lp_one = [continuation_logprobs(model, tok, [p], [c], intervene=iv)[0][0] for p, c in zip(PROMPTS, CONTS)]
        used.clear()
        np.testing.assert_allclose(continuation_logprobs(model, tok, PROMPTS, CONTS, batch_size=2, intervene=iv,
                                                         prefix=cache)[0], lp_one, rtol=1e-4)
        paths["logprobs"] = set(used)
    if window == 20:
        assert all(p == {True, False} for p in paths.values()), paths
    elif window == 64:
        assert all(p == {True} for p in paths.values()), paths
    else:
        assert paths["decision"] == {True, False}, paths
