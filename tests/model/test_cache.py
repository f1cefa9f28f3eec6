"""KV cache helpers: a prefilled cache (views, no copy; a spare slot taken in place) equals an update-filled one."""

import torch

from mechdiff.model.cache import cache_kv, empty_cache, prefilled_cache
from mechdiff.model.sites import get_body


def _prefix_kv(model, ids):
    cache = empty_cache(model)
    with torch.no_grad():
        out = get_body(model)(input_ids=ids, cache=cache, use_cache=True)
    return [(k.clone(), v.clone()) for k, v in cache_kv(getattr(out, "cache", None) or cache)]


def _next_logits(model, cache, tok, pos):
    with torch.no_grad():
        out = model(input_ids=tok, position_ids=pos, cache=cache, use_cache=True)
    return out.logits[:, -1]


def test_prefilled_cache_equals_update_filled_and_leaves_its_tensors(tiny_model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 9), generator=g)
    kv = _prefix_kv(tiny_model, ids)  # 9 slots per layer
    P = 8
    tok, pos = ids[:, P:], torch.full((3, 1), P)
    ref_cache = empty_cache(tiny_model)
    for li, (k, v) in enumerate(kv):
        ref_cache.update(k[:, :, :P].clone(), v[:, :, :P].clone(), li)
    want = _next_logits(tiny_model, ref_cache, tok, pos)
    # the full prefix forward's logit at the last token, the reference of both
    with torch.no_grad():
        torch.testing.assert_close(want, tiny_model(input_ids=ids).logits[:, -1], rtol=1e-5, atol=1e-5)

    # no spare slot: views of the given tensors, which a forward never writes
    exact = [(k[:, :, :P].contiguous(), v[:, :, :P].contiguous()) for k, v in kv]
    before = [(k.clone(), v.clone()) for k, v in exact]
    c = prefilled_cache(tiny_model, exact)
    assert c.layers[0].keys.data_ptr() == exact[0][0].data_ptr()  # no copy
    torch.testing.assert_close(_next_logits(tiny_model, c, tok, pos), want, rtol=0, atol=0)
    for (k, v), (k0, v0) in zip(exact, before):
        assert torch.equal(k, k0) and torch.equal(v, v0)

    # a spare slot at index P: the one-token forward writes its keys / values there, no concatenation
    spare = [(torch.cat([k[:, :, :P], torch.full_like(k[:, :, :1], 7.0)], 2),
              torch.cat([v[:, :, :P], torch.full_like(v[:, :, :1], 7.0)], 2)) for k, v in kv]
    c = prefilled_cache(tiny_model, spare, P)
    assert c.get_seq_length() == P
    torch.testing.assert_close(_next_logits(tiny_model, c, tok, pos), want, rtol=0, atol=0)
    for (k, v), (k9, v9) in zip(spare, kv):  # the slot now holds the decoded token's keys / values
        torch.testing.assert_close(k, k9, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, v9, rtol=1e-5, atol=1e-6)
    assert spare[0][0].data_ptr() == c.layers[0].keys.data_ptr()
