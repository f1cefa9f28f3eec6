"""Site capture and replacement against the model's own hidden states."""

import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.model.sites import (
    Site,
    add_at,
    capture,
    edit_at,
    find_blocks,
    plan_sites,
    read_at,
    replace_at,
)
from mechdiff.model.tokens import batches, encode, pad_id
from tests.conftest import SENTENCES


def _batch(tok, n=4):
    enc = encode(tok, SENTENCES[:n])
    return next(batches(enc, range(n), n, pad_id(tok)))


def test_resid_post_equals_hidden_states(tiny_model, tiny_tok):
    _, ids, mask, pos = _batch(tiny_tok)
    sites = [Site(layer, "resid_post") for layer in range(4)] + [Site(0, "resid_pre")]
    acts, _ = capture(tiny_model, ids, mask, sites)
    with torch.no_grad():
        out = tiny_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.allclose(acts["L0.resid_pre"], out.hidden_states[0])
    for layer in range(3):  # the last hidden state is after the final norm in HF
        assert torch.allclose(acts[f"L{layer}.resid_post"], out.hidden_states[layer + 1], atol=1e-6)


def test_attn_and_mlp_sum_to_residual(tiny_model, tiny_tok):
    _, ids, mask, _ = _batch(tiny_tok)
    acts, _ = capture(tiny_model, ids, mask, [Site(1, k) for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")])
    total = acts["L1.resid_pre"] + acts["L1.attn_out"] + acts["L1.mlp_out"]
    assert torch.allclose(total, acts["L1.resid_post"], atol=1e-5)


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_sites_of_other_block_layouts_sum_to_residual(arch):
    """OPT keeps its MLP layers (fc1, fc2) directly in the block, GPT-2 names its attention `attn`: the sites
    still add up to the residual stream, and resid_post is the model's own hidden state."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if arch == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=60, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    model.eval()
    ids = torch.randint(4, 60, (3, 7))
    mask = torch.ones_like(ids)
    acts, _ = capture(model, ids, mask, [Site(1, k) for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")])
    total = acts["L1.resid_pre"] + acts["L1.attn_out"] + acts["L1.mlp_out"]
    assert torch.allclose(total, acts["L1.resid_post"], atol=1e-5)
    assert acts["L1.mlp_out"].abs().max() > 1e-3 and acts["L1.attn_out"].abs().max() > 1e-3
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.allclose(acts["L1.resid_pre"], hidden[1], atol=1e-6)


def test_capture_logits_at_match_full_forward(tiny_model, tiny_tok):
    _, ids, mask, pos = _batch(tiny_tok)
    with torch.no_grad():
        full = tiny_model(input_ids=ids, attention_mask=mask).logits
    _, lg = capture(tiny_model, ids, mask, [Site(1)], logits_at=pos)
    assert torch.allclose(lg, full[torch.arange(len(pos)), pos], atol=1e-5)


def test_early_stop_gives_same_activations(tiny_model, tiny_tok):
    _, ids, mask, _ = _batch(tiny_tok)
    early, _ = capture(tiny_model, ids, mask, [Site(1)])
    late, _ = capture(tiny_model, ids, mask, [Site(1), Site(3)])
    assert torch.equal(early["L1.resid_post"], late["L1.resid_post"])


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_replace_changes_only_decision_position(tiny_model, tiny_tok, kind):
    _, ids, mask, pos = _batch(tiny_tok)
    site = Site(1, kind)
    clean, _ = capture(tiny_model, ids, mask, [site, Site(3)])
    vec = torch.randn(len(pos), 64, generator=torch.Generator().manual_seed(0))
    with replace_at(tiny_model, site, pos, vec):
        patched, _ = capture(tiny_model, ids, mask, [site, Site(3)])
    rows = torch.arange(len(pos))
    assert torch.allclose(patched[site.name][rows, pos], vec)
    diff = (patched[site.name] - clean[site.name]).abs().sum(-1)
    diff[rows, pos] = 0
    assert diff.max() == 0
    # causal: later layers change at the decision position and after it only
    later = (patched["L3.resid_post"] - clean["L3.resid_post"]).abs().sum(-1)
    for b in range(len(pos)):
        assert later[b, : pos[b]].max() == 0 and later[b, pos[b]] > 0
    # hooks are gone afterwards
    again, _ = capture(tiny_model, ids, mask, [site])
    assert torch.equal(again[site.name], clean[site.name])


def test_site_names_and_errors(tiny_model):
    assert Site.parse("L12.attn_out") == Site(12, "attn_out")
    assert Site.parse("L3").kind == "resid_post"
    with pytest.raises(MechdiffError):
        Site.parse("layer3")
    with pytest.raises(MechdiffError):
        Site(1, "bogus")
    assert len(find_blocks(tiny_model)) == 4
    with pytest.raises(MechdiffError, match="out of range"):
        capture(tiny_model, torch.zeros(1, 3, dtype=torch.long), None, [Site(9)])


def test_plan_sites():
    plan = plan_sites(6, stride=2, detail_layers=[3], extra=["L5.attn_out"], token_layers=[2])
    assert plan["L0.resid_post"] == ["last", "mean"] and "L5.resid_post" in plan and "L4.resid_post" in plan
    assert set(plan["L2.resid_post"]) == {"last", "mean", "tokens"}
    assert "L3.mlp_out" in plan and "L5.attn_out" in plan and "L1.resid_post" not in plan
    with pytest.raises(MechdiffError, match="out of range"):
        plan_sites(6, stride=2, extra=["L7.resid_post"])


def test_read_add_and_edit_at(tiny_model, tiny_tok):
    """The public hook API: read_at sees what capture sees; add_at / replace_at / edit_at change exactly their cells."""
    _, ids, mask, pos = _batch(tiny_tok)
    site, probe = Site(1, "mlp_out"), [Site(1, "mlp_out")]
    clean, _ = capture(tiny_model, ids, mask, probe)
    h = clean[site.name]
    seen = []
    with read_at(tiny_model, site, seen.append), torch.no_grad():
        tiny_model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(seen[0], h)
    vec = torch.randn(len(pos), h.shape[-1])
    with add_at(tiny_model, site, pos, vec, scale=0.5):
        got, _ = capture(tiny_model, ids, mask, probe)
    want = h.clone()
    want[torch.arange(len(pos)), pos] += 0.5 * vec
    torch.testing.assert_close(got[site.name], want)
    # positions None: every position of the chosen rows; rows 1 and 3 only
    rows = torch.tensor([1, 3])
    with add_at(tiny_model, site, None, vec[:2], rows=rows):
        got, _ = capture(tiny_model, ids, mask, probe)
    want = h.clone()
    want[rows] += vec[:2, None, :]
    torch.testing.assert_close(got[site.name], want)
    with replace_at(tiny_model, site, torch.tensor([0, 2]), vec[:2], rows=rows):
        got, _ = capture(tiny_model, ids, mask, probe)
    want = h.clone()
    want[rows, torch.tensor([0, 2])] = vec[:2]
    torch.testing.assert_close(got[site.name], want)
    with edit_at(tiny_model, site, lambda t: 2.0 * t):
        got, _ = capture(tiny_model, ids, mask, probe)
    torch.testing.assert_close(got[site.name], 2.0 * h)
    after, _ = capture(tiny_model, ids, mask, probe)  # hooks are gone after the block
    torch.testing.assert_close(after[site.name], h)
    with pytest.raises(MechdiffError, match="one position per"):
        with replace_at(tiny_model, site, torch.tensor([0, 1, 2]), vec[:2], rows=rows):
            capture(tiny_model, ids, mask, probe)


def test_head_logits_of_a_bf16_model_take_float32_hidden_states(tiny_model):
    """pair.dtype bfloat16: statistics hand the LM head float32 hidden states; the head runs in the model's dtype
    and returns float32 logits equal to the bf16 head applied to the bf16-rounded states."""
    import copy

    from mechdiff.model.sites import head_logits

    m = copy.deepcopy(tiny_model).to(torch.bfloat16)
    h = torch.randn(3, m.config.hidden_size, generator=torch.Generator().manual_seed(0))
    got = head_logits(m, h)
    want = m.get_output_embeddings()(h.to(torch.bfloat16)).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(head_logits(tiny_model, h), tiny_model.get_output_embeddings()(h))  # fp32 unchanged
