"""Shared-vocabulary fairness between two tokenizers: shared ids, prompt filter and logit alignment.

The shared vocabulary is the intersection of the two vocabularies as token strings (as `get_vocab()`
spells them). When both tokenizers map every string to the same id, everything here is a no-op that costs
nothing: the filter keeps every prompt without tokenizing and `aligned_logits` returns its inputs as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mechdiff.errors import MechdiffError
from mechdiff.model.tokens import render
from mechdiff.stats.kl import allowed_index

MODES = ("strict", "ratio")


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class SharedVocab:
    """Shared token strings of two tokenizers: sorted allowed ids per side and one-to-one aligned id pairs."""

    identical: bool
    n_shared: int
    allowed_a: np.ndarray
    allowed_b: np.ndarray
    pair_a: np.ndarray = field(default_factory=_empty)  # pair_a[i] (side a) and pair_b[i] (side b): one string
    pair_b: np.ndarray = field(default_factory=_empty)


def _vocab(tok: Any, side: str) -> dict[str, int]:
    get = getattr(tok, "get_vocab", None)
    if get is None:
        raise MechdiffError(f"tokenizer {side} has no get_vocab(): pass a transformers tokenizer")
    v = get()
    if not v:
        raise MechdiffError(f"tokenizer {side} has an empty vocabulary: check the model directory")
    return v


def shared_vocab(tok_a: Any, tok_b: Any) -> SharedVocab:
    """Intersect the two vocabularies as token strings; `identical` when both map every string to the same id."""
    va = _vocab(tok_a, "a")
    vb = va if tok_b is tok_a else _vocab(tok_b, "b")
    if va is vb or va == vb:
        ids = np.unique(np.fromiter(va.values(), dtype=np.int64, count=len(va)))
        return SharedVocab(True, len(va), ids, ids.copy(), ids.copy(), ids.copy())
    shared = sorted(va.keys() & vb.keys())
    if not shared:
        raise MechdiffError("the two tokenizers share no token string: their outputs cannot be compared")
    seen_a: set[int] = set()
    seen_b: set[int] = set()
    pa, pb = [], []
    for s in shared:  # one-to-one pairs (a string aliasing an id already used is skipped)
        ia, ib = int(va[s]), int(vb[s])
        if ia in seen_a or ib in seen_b:
            continue
        seen_a.add(ia)
        seen_b.add(ib)
        pa.append(ia)
        pb.append(ib)
    allowed_a = np.unique(np.array([va[s] for s in shared], dtype=np.int64))
    allowed_b = np.unique(np.array([vb[s] for s in shared], dtype=np.int64))
    return SharedVocab(False, len(shared), allowed_a, allowed_b, np.array(pa, dtype=np.int64),
                       np.array(pb, dtype=np.int64))


def _texts(items: Sequence[Any]) -> list[str]:
    out = []
    for x in items:
        t = x if isinstance(x, str) else getattr(x, "text", None)
        if not isinstance(t, str):
            raise MechdiffError(f"filter_prompts takes texts or Prompt objects, got {type(x).__name__}")
        out.append(t)
    return out


def _content_ids(tok: Any, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt's own text, tokenised in context (as rendered by the chat template with `chat`).

    Tokens of the template around the text are left out; when the content cannot be located in the rendered
    prompt (or the tokenizer gives no offsets), the text is tokenised on its own.
    """
    rendered = [render(tok, t, chat) for t in texts]
    spans = []
    for t, r in zip(texts, rendered):
        i = r.rfind(t)
        spans.append((i, i + len(t)) if i >= 0 and r != t else None)
    out: list[list[int]] = [[] for _ in texts]
    plain = [j for j, sp in enumerate(spans) if sp is None]
    ctx = [j for j, sp in enumerate(spans) if sp is not None]
    if ctx:
        try:
            enc = tok([rendered[j] for j in ctx], add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):
            plain, ctx = sorted(plain + ctx), []
        else:
            for j, ids, offs in zip(ctx, enc["input_ids"], enc["offset_mapping"]):
                a, b = spans[j]
                out[j] = [int(t) for t, (s, e) in zip(ids, offs) if e > s and s < b and e > a]
    if plain:
        enc = tok([texts[j] for j in plain], add_special_tokens=False)
        for j, ids in zip(plain, enc["input_ids"]):
            out[j] = [int(t) for t in ids]
    return out


def _content_ratios(tok: Any, texts: list[str], allowed: np.ndarray, chat: bool) -> np.ndarray:
    """Per prompt, the share of content tokens (special tokens skipped, unknown tokens never shared) in `allowed`."""
    for t in texts:
        if not t.strip():
            raise MechdiffError(f"empty prompt {t!r}: remove it from the corpus")
    ids_list = _content_ids(tok, texts, chat)
    unk = getattr(tok, "unk_token_id", None)
    skip = {int(i) for i in (getattr(tok, "all_special_ids", None) or []) if i is not None and i != unk}
    top = max([int(allowed.max()) if allowed.size else 0] + [max(ids) for ids in ids_list if ids]) + 1
    lookup = np.zeros(top, dtype=bool)
    lookup[allowed] = True
    if unk is not None and unk < top:
        lookup[unk] = False
    out = np.zeros(len(texts))
    for i, ids in enumerate(ids_list):
        content = np.array([t for t in ids if t not in skip], dtype=np.int64)
        out[i] = lookup[content].mean() if content.size else 0.0
    return out


def filter_prompts(texts_or_prompts: Sequence[Any], tok_a: Any, tok_b: Any, sv: SharedVocab, *,
                   mode: str = "strict", min_ratio: float = 0.9, chat: bool = False) -> list[int]:
    """Indices of prompts whose content tokens are shared on both sides (strict: all; ratio: >= min_ratio).

    Only the prompt's own text counts: the chat template's tokens and special tokens are skipped, an unknown
    token counts as not shared. With `chat`, the text is tokenised in place inside the chat-templated prompt.
    """
    if mode not in MODES:
        raise MechdiffError(f"fairness mode must be one of {MODES}, got {mode!r}")
    if not (0.0 <= float(min_ratio) <= 1.0):
        raise MechdiffError(f"min_ratio must be in [0, 1], got {min_ratio!r}")
    n = len(texts_or_prompts)
    if n == 0:
        raise MechdiffError("no prompts to filter: the corpus is empty")
    if sv.identical:
        return list(range(n))
    texts = _texts(texts_or_prompts)
    thr = 1.0 if mode == "strict" else float(min_ratio)
    keep = np.ones(n, dtype=bool)
    for tok, allowed in ((tok_a, sv.allowed_a), (tok_b, sv.allowed_b)):
        keep &= _content_ratios(tok, texts, np.asarray(allowed, dtype=np.int64), chat) >= thr - 1e-12
    return np.flatnonzero(keep).tolist()


def no_prompts_kept(mode: str, min_ratio: float, n_shared: int) -> str:
    """The one-line error when `filter_prompts` kept nothing, with the change that can help under `mode`."""
    why = f"the tokenizers share {n_shared} tokens and no prompt's tokens are all among them"
    if mode == "strict":
        return f"no prompt passes the fairness filter ({why}): set pair.fairness.mode: ratio"
    return (f"no prompt passes the fairness filter in ratio mode (shared-token share >= {min_ratio}; the tokenizers "
            f"share {n_shared} tokens): lower pair.fairness.min_shared_ratio, or diff a model against a fine-tune "
            "that kept most of its tokenizer")


def _check_ids(ids: np.ndarray, width: int, what: str) -> None:
    """One-line error unless `ids` is a non-empty set of ids within the logits' vocabulary (`allowed_index`)."""
    try:
        allowed_index(ids, width)
    except MechdiffError as exc:
        raise MechdiffError(f"{what}: {exc}") from None


def _take(x: torch.Tensor | np.ndarray, ids: np.ndarray) -> torch.Tensor | np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.index_select(-1, torch.as_tensor(ids, device=x.device))
    if isinstance(x, np.ndarray):
        return np.take(x, ids, axis=-1)
    raise MechdiffError(f"aligned_logits takes torch tensors or numpy arrays, got {type(x).__name__}")


def aligned_logits(logits_a: torch.Tensor | np.ndarray, logits_b: torch.Tensor | np.ndarray,
                   sv: SharedVocab) -> tuple:
    """Both sides' logits restricted to the shared strings, columns in the same order (inputs as is if identical)."""
    if sv.identical:
        return logits_a, logits_b
    if len(sv.pair_a) != len(sv.pair_b):
        raise MechdiffError("SharedVocab pairs differ in length: rebuild it with shared_vocab()")
    _check_ids(np.asarray(sv.pair_a), int(logits_a.shape[-1]), "aligned_logits (model a)")
    _check_ids(np.asarray(sv.pair_b), int(logits_b.shape[-1]), "aligned_logits (model b)")
    return _take(logits_a, np.asarray(sv.pair_a, dtype=np.int64)), _take(logits_b, np.asarray(sv.pair_b,
                                                                                               dtype=np.int64))
