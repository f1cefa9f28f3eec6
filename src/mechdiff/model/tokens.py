"""Chat rendering, tokenisation with the decision position, and right-padded batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechdiff.errors import MechdiffError


@dataclass
class Encoded:
    """Token ids per prompt, the index of each prompt's decision token, and the id that right-pads them in a batch
    (`pad_id` of the tokenizer that encoded them; padded positions are masked, so any id in the vocabulary works)."""

    ids: list[list[int]]
    decision: list[int]
    pad: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens per prompt."""
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    @property
    def shared_prefix(self) -> int:
        """`shared_prefix` of these prompts: how many leading tokens every one of them has in common."""
        return shared_prefix(self.ids, self.decision)


def template_opening(tokenizer, chat: bool = True) -> int:
    """How many tokens the chat template puts before every user message (the common start of two rendered
    messages; 0 without `chat` or a template): what `shared_prefix` finds when no prompt is cut."""
    if not (chat and getattr(tokenizer, "chat_template", None)):
        return 0
    a, b = ([int(t) for t in tokenizer(render(tokenizer, x, True), add_special_tokens=False)["input_ids"]]
            for x in ("a", "z q"))
    return shared_prefix([a, b])


def shared_prefix(ids: Sequence[Sequence[int]], decision: Sequence[int] | None = None) -> int:
    """Length of the longest token prefix common to every prompt of `ids` (0 for none), at most each prompt's
    `decision` position (so every decision token stays after it) and at most its length - 1.

    A causal model computes the same activations at these positions for every prompt (a chat template's
    constant opening, e.g. SmolLM2's 24-token system prompt): they are computed once (`extract`) and are
    not data about any one prompt (`sae.sources.source_rows` leaves them out).
    """
    if len(ids) == 0:
        return 0
    first = ids[0]
    n = min(len(x) for x in ids) - 1
    if decision is not None and len(decision):
        n = min(n, int(min(decision)))
    n = max(n, 0)
    for x in ids[1:]:
        i = 0
        while i < n and x[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def render(tokenizer, text: str, chat: bool = True) -> str:
    """The prompt as the model sees it: chat-templated with a generation prompt when `chat` and a template exist."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def decision_position(ids: Sequence[int], special_ids: set[int]) -> int:
    """Index of the last non-special token (the decision token)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] not in special_ids:
            return i
    raise MechdiffError("a prompt has no non-special token: check the corpus for empty texts")


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    # chat-template role markers ("assistant", newline) are ordinary tokens; only true specials are skipped
    return {int(i) for i in ids if i is not None}


def encode(tokenizer, texts: Sequence[str], *, chat: bool = True, max_len: int = 256) -> Encoded:
    """Tokenise prompts (chat-templated), keeping the last `max_len` tokens, and find each decision token."""
    if len(texts) == 0:
        raise MechdiffError("no prompts to encode: the corpus or split is empty")
    special = _special_ids(tokenizer)
    out_ids, dec = [], []
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise MechdiffError(f"empty or non-text prompt {t!r}: remove it from the corpus")
        ids = tokenizer(render(tokenizer, t, chat), add_special_tokens=False)["input_ids"]
        templated = chat and getattr(tokenizer, "chat_template", None)
        if not templated and getattr(tokenizer, "bos_token_id", None) is not None \
                and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id, *ids]
        ids = list(ids)[-max_len:]
        out_ids.append(ids)
        dec.append(decision_position(ids, special))
    return Encoded(out_ids, dec, pad_id(tokenizer))


def pad_id(tokenizer) -> int:
    """The id used for right padding (pad, else eos, else 0)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def right_pad(seqs: Sequence[Sequence[int]], pad: int, device: str | torch.device = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, T) long tensors of token sequences right-padded with `pad` to the longest."""
    if len(seqs) == 0:
        raise MechdiffError("no sequences to pad: the batch is empty")
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for j, x in enumerate(seqs):
        ids[j, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask[j, : len(x)] = 1
    return ids.to(device), mask.to(device)


def batches(
    enc: Encoded, idx: Sequence[int] | np.ndarray, batch_size: int, pad: int, device: str | torch.device = "cpu",
    sort_by_length: bool = True,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (rows, input_ids, attention_mask, decision positions) right-padded batches over prompts `idx`.

    With `sort_by_length`, prompts of similar length share a batch (less padding); `rows` says which prompts.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if batch_size < 1:
        raise MechdiffError(f"batch_size must be >= 1, got {batch_size}")
    order = idx[np.argsort(enc.lengths[idx], kind="stable")] if sort_by_length else idx
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids, mask = right_pad([enc.ids[r] for r in rows], pad, device)
        pos = torch.tensor([enc.decision[r] for r in rows], dtype=torch.long)
        yield rows, ids, mask, pos.to(device)
