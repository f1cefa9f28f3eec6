"""Behavioural metrics of a model: continuation and multiple-choice log-probabilities, perplexity, decision-token
logits, greedy continuations, refusal markers, new-token mass, and base-vs-tuned comparisons with bootstrap CIs.

Every model-running function takes an optional `intervene` (the protocol shared with
`mechdiff.analysis.steering`): ``intervene(model, start)`` with `start` a (B,) long tensor of positions in the
batch's padded frame returns a context manager; inside it, forward passes of that batch are modified at every
position ``>= start[b]`` of row b when the call's sequence length T > 1 (a whole prompt, right- or left-padded)
and at every position when T == 1 (a KV-cache decode step). Here `start` is always each prompt's decision token
(`mechdiff.model.tokens.encode`: the last non-special token of the chat-rendered prompt), shifted by the left-pad
offset where batches are left-padded. None means no intervention.

All log-probabilities are natural logs, summed in float64 from float32 logits.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff.errors import MechdiffError
from mechdiff.model.cache import cache_kv, empty_cache, expanded_cache, fits_window, prefilled_cache
from mechdiff.model.memo import Memo
from mechdiff.model.sites import find_blocks, get_body, head_logits, reuse_blocks
from mechdiff.model.tokens import Encoded, batches, encode, pad_id, right_pad, shared_prefix
from mechdiff.resume import UnitsFn, compute_all
from mechdiff.stats.bootstrap import check_boot, mean_ci, mean_diff_ci
from mechdiff.stats.checks import as_f64
from mechdiff.stats.kl import allowed_index, log_softmax

Intervene = Callable[[nn.Module, torch.Tensor], contextlib.AbstractContextManager]

# The seed's refusal markers (matched case-insensitively by `marker_hits`, as the seed's `refusal_score` does).
DEFAULT_REFUSAL_PATTERNS: list[str] = [r"\bI (can(?:not|'t)|am unable)\b", r"\bI must not\b", r"\bI will not\b"]

# Positions whose (V,) float64 log-softmax rows are held at once: about 2**26 numbers (512 MiB) per chunk.
_LOGPROB_CELLS = 2**26


# --------------------------------------------------------------------------------------------- helpers


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _ctx(intervene: Intervene | None, model: nn.Module, start: torch.Tensor):
    return contextlib.nullcontext() if intervene is None else intervene(model, start)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled)


def _hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _check_batch(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise MechdiffError(f"batch_size must be a positive integer, got {batch_size!r}")


def _rows(enc: Encoded, rows: Any) -> np.ndarray:
    if not isinstance(enc, Encoded):
        raise MechdiffError(f"enc must be a mechdiff.model.tokens.Encoded, got {type(enc).__name__}")
    r = np.asarray(rows, dtype=np.int64).ravel()
    if r.size == 0:
        raise MechdiffError("no prompts to run: the row selection is empty")
    if r.min() < 0 or r.max() >= len(enc):
        raise MechdiffError(f"prompt rows out of range: the encoded corpus has {len(enc)} prompts")
    return r


def _sub(enc: Encoded, r: np.ndarray) -> Encoded:
    return Encoded([enc.ids[i] for i in r], [enc.decision[i] for i in r], enc.pad)


# --------------------------------------------------------------------------------------------- prefix cache


class PrefixCache:
    """Unintervened KV caches of prompt prefixes (every token before the one preceding the decision token), per
    prompt, computed once and reused by every intervention that acts from the decision token on.

    An intervention starting at the decision token leaves the prefix's keys and values unchanged, so a sweep of
    many interventions runs only the last prompt token, the decision token and what follows. The suffix keeps
    one token before the decision token so that every suffix forward has T >= 2 (an intervention's gate decides
    at the decision token of a T > 1 call). Missing prefixes are computed together in left-padded batches with
    position ids counted from each row's first real token (equal to an unpadded forward within float rounding).
    """

    def __init__(self, model: nn.Module, *, keep_bytes: int = 1 << 30) -> None:
        self.model = model
        self._kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # what a sweep asks for again and again, kept up to `keep_bytes` each (least recently used dropped first):
        # the left-padded key/value batches (`batch`) and the lower blocks' outputs (`lower_blocks`)
        self.keep_bytes = int(keep_bytes)
        self._padded = Memo(self.keep_bytes)  # key -> (keys, values, prefix mask, lengths)
        self._lower = Memo(self.keep_bytes)
        self._share, self._checked = True, False  # run each batch's shared opening once (`fill`), checked once

    def __len__(self) -> int:
        return len(self._kv)

    @torch.no_grad()
    def get(self, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) (1, heads, P, head_dim) of the prefix (computed on first use)."""
        key = tuple(int(t) for t in prefix)
        if key not in self._kv:
            if not key:
                raise MechdiffError("an empty prefix has no cache")
            self._kv[key] = [(k.clone(), v.clone()) for k, v in self._own_kv(key)]
        return self._kv[key]

    def _own_kv(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of one prefix from its own unpadded forward (views of the forward's cache)."""
        cache = empty_cache(self.model)
        ids = torch.tensor([prefix], dtype=torch.long, device=_device(self.model))
        out = get_body(self.model)(input_ids=ids, cache=cache, use_cache=True)
        return cache_kv(getattr(out, "cache", None) or cache)

    @torch.no_grad()
    def fill(self, prefixes: Sequence[Sequence[int]], batch_size: int = 64) -> None:
        """Compute the missing prefixes in left-padded batches. The tokens every prefix of a batch starts with
        (`tokens.shared_prefix`, e.g. a chat template's system prompt) run once, as a prefix of their own
        (kept like any other), and the batch continues from their keys and values: the left padding then sits
        between that opening and each row's own tokens, masked, with positions counted on from the opening.
        The first such batch is checked against an unpadded forward of its first prefix (`cache.cache_check`);
        a model that fails it runs whole prefixes from then on (with a warning)."""
        todo = list(dict.fromkeys(tuple(int(t) for t in x) for x in prefixes if len(x)))
        todo = [x for x in todo if x not in self._kv]
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            S = shared_prefix(chunk) if len(chunk) > 1 and self._share else 0
            got = self._chunk(chunk, S if S >= 2 else 0)
            if S >= 2 and not self._checked:
                self._checked = True
                err, tol = self._check(chunk[0], got[chunk[0]])
                if not err <= tol:
                    import warnings

                    warnings.warn(f"PrefixCache: continuing from the prompts' shared opening differs from a full "
                                  f"forward by {err:.3g} (relative) for {type(self.model).__name__}; running whole "
                                  "prefixes", RuntimeWarning, stacklevel=2)
                    self._share = False
                    got = self._chunk(chunk, 0)
            self._kv.update(got)

    def _chunk(self, chunk: list[tuple[int, ...]], S: int) -> dict:
        """Keys and values of the prefixes `chunk` in one left-padded batch, continuing from the kept keys and
        values of their first S tokens (computed first when missing) when S > 0."""
        dev = _device(self.model)
        head = self.get(chunk[0][:S]) if S else None
        rest = [x[S:] for x in chunk]
        T = max(len(x) for x in rest)
        ids = torch.zeros((len(chunk), T), dtype=torch.long, device=dev)
        mask = torch.zeros((len(chunk), S + T), dtype=torch.long, device=dev)
        mask[:, :S] = 1
        for b, x in enumerate(rest):
            ids[b, T - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[b, S + T - len(x) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, S:]
        cache = expanded_cache(self.model, head, len(chunk)) if head is not None else empty_cache(self.model)
        out = get_body(self.model)(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                                   use_cache=True)
        kv = cache_kv(getattr(out, "cache", None) or cache)
        return {chunk[b]: [(torch.cat([k[b : b + 1, :, :S], k[b : b + 1, :, S + T - len(x) :]], dim=2),
                            torch.cat([v[b : b + 1, :, :S], v[b : b + 1, :, S + T - len(x) :]], dim=2))
                           for k, v in kv]
                for b, x in enumerate(rest)}

    def _check(self, prefix: tuple[int, ...], got: list) -> tuple[float, float]:
        """(relative error, tolerance) of a prefix's keys (every layer) against its own unpadded forward."""
        from mechdiff.model.cache import cache_check

        want = self._own_kv(prefix)
        return cache_check(torch.cat([k.flatten() for k, _ in got]), torch.cat([k.flatten() for k, _ in want]),
                           want[0][0].dtype)

    def batch(self, prefixes: Sequence[Sequence[int]]):
        """(a DynamicCache of the left-padded prefixes or None when all are empty, prefix mask (B, P), lengths (B,)).

        The padded keys and values of a batch are assembled once and kept (within `keep_bytes`): every further
        intervention on the same batch gets a new cache over the same tensors (a forward appends to a cache by
        concatenation, so the kept tensors are never written)."""
        key = tuple(tuple(int(t) for t in x) for x in prefixes)
        hit = self._padded.get(key)
        if hit is None:
            hit = self._pad(prefixes)
            self._padded.put(key, hit)
        Ks, Vs, mask, lens = hit
        if not Ks:
            return None, mask.clone(), lens.clone()
        return prefilled_cache(self.model, list(zip(Ks, Vs))), mask.clone(), lens.clone()

    def _pad(self, prefixes: Sequence[Sequence[int]]) -> tuple[list, list, torch.Tensor, torch.Tensor]:
        """(per layer padded keys, per layer padded values, prefix mask (B, P), lengths (B,)); no layers when every
        prefix is empty."""
        self.fill(prefixes)
        dev = _device(self.model)
        lens = torch.tensor([len(x) for x in prefixes], dtype=torch.long, device=dev)
        P = int(lens.max()) if len(prefixes) else 0
        mask = torch.zeros((len(prefixes), P), dtype=torch.long, device=dev)
        if P == 0:
            return [], [], mask, lens
        kvs = [self.get(x) if len(x) else None for x in prefixes]
        ref = next(kv for kv in kvs if kv is not None)
        Ks, Vs = [], []
        for li, (k0, v0) in enumerate(ref):
            K = k0.new_zeros((len(prefixes), k0.shape[1], P, k0.shape[3]))
            Vv = v0.new_zeros((len(prefixes), v0.shape[1], P, v0.shape[3]))
            for b, kv in enumerate(kvs):
                if kv is not None:
                    n = int(lens[b])
                    K[b, :, P - n :] = kv[li][0][0]
                    Vv[b, :, P - n :] = kv[li][1][0]
            Ks.append(K)
            Vs.append(Vv)
        for b in range(len(prefixes)):
            mask[b, P - int(lens[b]) :] = 1
        return Ks, Vs, mask, lens


    @contextlib.contextmanager
    def lower_blocks(self, prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]], upto: int
                     ) -> Iterator[None]:
        """Within the block, a teacher-forced suffix forward of this batch reuses the output of decoder blocks
        0..upto-1 kept from its first forward under any intervention that reads and changes nothing below block
        `upto` (those blocks compute the same tensors every time: exact, not an approximation). Not for a forward
        whose KV cache is used afterwards (the skipped blocks add no keys and values)."""
        if upto <= 0:
            yield
            return
        key = (int(upto), tuple(tuple(int(t) for t in x) for x in prefixes),
               tuple(tuple(int(t) for t in x) for x in suffixes))
        kept = self._lower.get(key)
        if kept is not None:
            with reuse_blocks(self.model, [kept] * int(upto), int(upto)):
                yield
            return
        store: list = []
        handle = find_blocks(self.model)[int(upto) - 1].register_forward_hook(lambda _m, _a, out: store.append(out))
        try:
            yield
        finally:
            handle.remove()
        if store:
            self._lower.put(key, store[-1])


def first_block(intervene: Intervene | None) -> int:
    """The first decoder block an intervention reads or changes (its `first_block` attribute; 0 when it does not
    say): every block below it computes the same tensors with or without it."""
    return 0 if intervene is None else max(0, int(getattr(intervene, "first_block", 0) or 0))


def _split_at_decision(seq: Sequence[int], decision: int) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the suffix starts one token before the decision token (at the start when decision = 0)."""
    cut = max(0, int(decision) - 1)
    return list(seq[:cut]), list(seq[cut:])


def _cached_parts(prefix: PrefixCache | None, model: nn.Module, seqs: Sequence[Sequence[int]],
                  decisions: Sequence[int], extra: int = 0) -> list[tuple[list[int], list[int]]] | None:
    """The batch's (prefix, suffix) splits (`_split_at_decision`) when `prefix` can serve it: None without a
    prefix cache, or when the batch's cache (its longest prefix, longest suffix and `extra` generated tokens)
    would outgrow the model's sliding window (`cache.fits_window`), where the caller runs full forwards."""
    if prefix is None:
        return None
    parts = [_split_at_decision(x, d) for x, d in zip(seqs, decisions)]
    slots = max(len(a) for a, _ in parts) + max(len(b) for _, b in parts) + int(extra)
    return parts if fits_window(model, slots) else None


def _suffix_forward(model: nn.Module, prefix: PrefixCache, prefixes: list[list[int]], suffixes: list[list[int]],
                    starts: Sequence[int], pad: int, intervene: Intervene | None):
    """Forward right-padded `suffixes` after cached left-padded `prefixes`; returns (output, attention mask,
    position ids of the last real suffix token). The intervention starts at `starts` (suffix frame). Teacher
    forced only: blocks below the intervention's `first_block` are reused from the batch's first forward."""
    dev = _device(model)
    cache, pmask, plen = prefix.batch(prefixes)
    sids, smask = right_pad(suffixes, pad, dev)
    pos = plen[:, None] + torch.arange(sids.shape[1], device=dev)[None, :]
    mask = torch.cat([pmask, smask], dim=1)
    start = torch.as_tensor(list(starts), dtype=torch.long, device=dev)
    with _ctx(intervene, model, start), prefix.lower_blocks(prefixes, suffixes, first_block(intervene)):
        out = get_body(model)(input_ids=sids, attention_mask=mask, position_ids=pos, cache=cache,
                              use_cache=cache is not None)
    return out, mask, pos


# --------------------------------------------------------------------------------------------- log-probabilities


MC_FORMATS = ("cloze", "listed")


def mc_text(question: str, choices: Sequence[str], fmt: str = "listed") -> str:
    """The user message of a multiple-choice question.

    "listed": the question, one line per option, then "Answer:"; for example
    ``mc_text("Capital of France?", ["Paris", "Rome"])`` is ``"Capital of France?\\nA. Paris\\nB. Rome\\nAnswer:"``
    (options lettered A, B, C, ... in the given order). "cloze": the question alone (the options are only
    scored as answers), the formulation small models answer best.
    """
    if fmt not in MC_FORMATS:
        raise MechdiffError(f"multiple-choice format {fmt!r}: choose one of {', '.join(MC_FORMATS)}")
    if not isinstance(question, str) or not question.strip():
        raise MechdiffError(f"empty or non-text question {question!r}: remove it from the dataset")
    if isinstance(choices, str) or len(choices) == 0:
        raise MechdiffError(f"question {question[:40]!r} needs a list of at least one option")
    if len(choices) > 26:
        raise MechdiffError(f"question {question[:40]!r} has {len(choices)} options: at most 26 (A-Z) are supported")
    lines = [question.strip()]
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise MechdiffError(f"question {question[:40]!r} has an empty or non-text option {c!r}")
        lines.append(f"{chr(ord('A') + i)}. {c.strip()}")
    if fmt == "cloze":
        return lines[0]
    lines.append("Answer:")
    return "\n".join(lines)


def _cont_ids(tokenizer, text: str, chat: bool) -> list[int]:
    if not isinstance(text, str) or not text:
        raise MechdiffError(f"empty or non-text continuation {text!r}: every continuation needs at least one token")
    templated = chat and getattr(tokenizer, "chat_template", None)
    if not templated and not text[0].isspace():
        text = " " + text
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise MechdiffError(f"continuation {text!r} has no tokens: every continuation needs at least one token")
    return ids


def _token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 log p(targets[i] | hidden[i]) for (N, d) final hidden states, in chunks that bound memory."""
    head = model.get_output_embeddings()
    V = int(head.weight.shape[0]) if head is not None and hasattr(head, "weight") else 1
    step = max(1, _LOGPROB_CELLS // V)
    out = []
    for s in range(0, hidden.shape[0], step):
        lp = log_softmax(head_logits(model, hidden[s : s + step]))
        out.append(lp.gather(1, targets[s : s + step, None].to(lp.device))[:, 0])
    return torch.cat(out)


def scored_sequences(tokenizer, prompts: Sequence[str], continuations: Sequence[str], *, chat: bool = True,
                     max_len: int = 256) -> tuple[list[list[int]], list[int], list[int], list[int]]:
    """Token sequences prompt + continuation as `continuation_logprobs` scores them: (sequences, prompt lengths,
    decision positions, continuation lengths). The prompt is rendered and encoded as by `tokens.encode` and cut
    from the left so the whole fits in `max_len`; the continuation is tokenised on its own (`_cont_ids`)."""
    if len(prompts) != len(continuations):
        raise MechdiffError(f"prompts and continuations must pair up, got {len(prompts)} and {len(continuations)}")
    if len(prompts) == 0:
        raise MechdiffError("no prompts to score: the dataset is empty")
    uniq = list(dict.fromkeys(prompts))
    enc = encode(tokenizer, uniq, chat=chat, max_len=10**9)
    where = {p: i for i, p in enumerate(uniq)}
    seqs, n_prompt, dec, n_cont = [], [], [], []
    for p, c in zip(prompts, continuations):
        cid = _cont_ids(tokenizer, c, chat)
        if len(cid) >= max_len:
            raise MechdiffError(f"continuation {c[:40]!r} has {len(cid)} tokens, leaving no room for its prompt in "
                                f"max_len={max_len}: raise max_len")
        pid, d = enc.ids[where[p]], enc.decision[where[p]]
        cut = max(0, len(pid) + len(cid) - max_len)
        if d - cut < 0:
            raise MechdiffError(f"prompt {p[:40]!r} loses its decision token when cut to fit max_len={max_len}: "
                                "raise max_len")
        seqs.append(list(pid[cut:]) + cid)
        n_prompt.append(len(pid) - cut)
        dec.append(d - cut)
        n_cont.append(len(cid))
    return seqs, n_prompt, dec, n_cont


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *, chat: bool = True,
    max_len: int = 256, batch_size: int = 16, intervene: Intervene | None = None, progress: bool = False,
    prefix: PrefixCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probs, number of tokens) float64 (n,) of each continuation after its rendered prompt.

    The prompt is rendered (`tokens.render`, chat template when `chat`) and tokenised as by `tokens.encode`; the
    continuation is tokenised on its own (without a chat template a leading space is put before it unless it
    starts with whitespace) and appended. The prompt is cut from the left so prompt + continuation fit in
    `max_len` tokens. Right-padded batches, one forward each; `intervene` starts at each prompt's decision token.
    With a `prefix` cache (of this model) only the tokens from the one before the decision token on are run.
    """
    _check_batch(batch_size)
    seqs, n_prompt, dec, n_cont = scored_sequences(tokenizer, prompts, continuations, chat=chat, max_len=max_len)
    sums = np.zeros(len(seqs), dtype=np.float64)
    dev, body, pad = _device(model), get_body(model), pad_id(tokenizer)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    bar = _progress(len(seqs), progress, "logprobs")
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        parts = _cached_parts(prefix, model, [seqs[r] for r in rows], [dec[r] for r in rows])
        if parts is None:
            ids, mask = right_pad([seqs[r] for r in rows], pad, dev)
            start = torch.tensor([dec[r] for r in rows], dtype=torch.long, device=dev)
            with _ctx(intervene, model, start):
                hidden = _hidden(body(input_ids=ids, attention_mask=mask, use_cache=False))
            shift = [0] * len(rows)
        else:
            shift = [len(a) for a, _ in parts]
            out, _, _ = _suffix_forward(model, prefix, [a for a, _ in parts], [b for _, b in parts],
                                        [dec[r] - sh for r, sh in zip(rows, shift)], pad, intervene)
            hidden = _hidden(out)
            ids, _ = right_pad([b for _, b in parts], pad, dev)
        bi = torch.cat([torch.full((n_cont[r],), b, dtype=torch.long) for b, r in enumerate(rows)]).to(dev)
        ti = torch.cat([torch.arange(n_prompt[r] - sh, n_prompt[r] - sh + n_cont[r])
                        for r, sh in zip(rows, shift)]).to(dev)
        lp = _token_logprobs(model, hidden[bi, ti - 1], ids[bi, ti]).cpu()
        seg = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([n_cont[r] for r in rows]))
        sums[rows] = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, seg, lp).numpy()
        bar.update(len(rows))
    bar.close()
    return sums, np.asarray(n_cont, dtype=np.float64)


MC_SCORES = ("sum", "mean")  # how `option_logprobs` scores an option: summed or mean token log-prob


def option_logprobs(
    model: nn.Module, tokenizer, questions: Sequence[str], choices: Sequence[Sequence[str]], *, chat: bool = True,
    max_len: int = 256, batch_size: int = 16, intervene: Intervene | None = None, progress: bool = False,
    fmt: str = "cloze", prefix: PrefixCache | None = None, score: str = "sum",
) -> list[np.ndarray]:
    """Per question, the float64 log-prob of each option's text as the answer to `mc_text(question, choices, fmt)`
    (default cloze: the question alone): summed over the option's tokens (`score="sum"`) or their mean
    (`"mean"`, length-normalised)."""
    if len(questions) != len(choices):
        raise MechdiffError(f"questions and choices must pair up, got {len(questions)} and {len(choices)}")
    if score not in MC_SCORES:
        raise MechdiffError(f"option score {score!r}: use one of {', '.join(MC_SCORES)}")
    prompts, conts, sizes = [], [], []
    for q, ch in zip(questions, choices):
        text = mc_text(q, ch, fmt)
        prompts.extend([text] * len(ch))
        conts.extend(c.strip() for c in ch)
        sizes.append(len(ch))
    lp, n = continuation_logprobs(model, tokenizer, prompts, conts, chat=chat, max_len=max_len,
                                  batch_size=batch_size, intervene=intervene, progress=progress, prefix=prefix)
    if score == "mean":
        lp = lp / n
    return [a.copy() for a in np.split(lp, np.cumsum(sizes)[:-1])]


def mc_correct(option_lp: Sequence[np.ndarray], answers: Sequence[int]) -> np.ndarray:
    """bool (n,): whether the correct option has the strictly highest log-prob; a tie for the maximum is wrong."""
    if len(option_lp) != len(answers):
        raise MechdiffError(f"option log-probs and answers must pair up, got {len(option_lp)} and {len(answers)}")
    out = np.zeros(len(answers), dtype=bool)
    for i, (lp, a) in enumerate(zip(option_lp, answers)):
        x = as_f64(lp, "option log-probs").ravel()
        if x.size == 0 or not np.isfinite(x).all():
            raise MechdiffError(f"question {i}: option log-probs are empty or not finite")
        if isinstance(a, bool) or not isinstance(a, int | np.integer) or not 0 <= int(a) < x.size:
            raise MechdiffError(f"question {i}: answer index {a!r} is not an option index 0..{x.size - 1}")
        top = x.max()
        out[i] = bool(x[int(a)] == top and np.count_nonzero(x == top) == 1)
    return out


def perplexity(sum_lp: Any, n_tokens: Any) -> float:
    """Token-weighted perplexity ``exp(-sum(sum_lp) / sum(n_tokens))`` of texts scored by `continuation_logprobs`."""
    s, n = as_f64(sum_lp, "sum_lp").ravel(), as_f64(n_tokens, "n_tokens").ravel()
    if s.shape != n.shape or s.size == 0:
        raise MechdiffError(f"sum_lp and n_tokens must be non-empty and pair up, got {s.size} and {n.size} values")
    if not (np.isfinite(s).all() and np.isfinite(n).all()) or (n < 0).any() or n.sum() <= 0:
        raise MechdiffError("sum_lp must be finite and n_tokens non-negative with a positive total")
    return float(np.exp(-s.sum() / n.sum()))


# --------------------------------------------------------------------------------------------- decision / generation


@torch.no_grad()
def decision_logits(
    model: nn.Module, enc: Encoded, rows: Any, *, batch_size: int = 16, intervene: Intervene | None = None,
    progress: bool = False, prefix: PrefixCache | None = None,
) -> np.ndarray:
    """(len(rows), V) float32 next-token logits at each prompt's decision token, in `rows` order (with a
    `prefix` cache, only the last two prompt tokens are run)."""
    r = _rows(enc, rows)
    _check_batch(batch_size)
    sub, dev, body = _sub(enc, r), _device(model), get_body(model)
    out: np.ndarray | None = None
    bar = _progress(len(r), progress, "logits")
    for i, ids, mask, pos in batches(sub, np.arange(len(r)), batch_size, sub.pad, dev, sort_by_length=True):
        parts = _cached_parts(prefix, model, [sub.ids[j][: sub.decision[j] + 1] for j in i],
                              [sub.decision[j] for j in i])
        if parts is None:
            with _ctx(intervene, model, pos):
                hidden = _hidden(body(input_ids=ids, attention_mask=mask, use_cache=False))
            at = pos
        else:
            o, _, _ = _suffix_forward(model, prefix, [a for a, _ in parts], [b for _, b in parts],
                                      [len(b) - 1 for _, b in parts], sub.pad, intervene)
            hidden = _hidden(o)
            at = torch.tensor([len(b) - 1 for _, b in parts], dtype=torch.long, device=hidden.device)
        lg = head_logits(model, hidden[torch.arange(len(i), device=hidden.device), at]).float().cpu().numpy()
        if out is None:
            out = np.empty((len(r), lg.shape[1]), dtype=np.float32)
        out[i] = lg
        bar.update(len(i))
    bar.close()
    return out


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for v in (getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if v is None:
            continue
        ids.update(int(x) for x in (v if isinstance(v, list | tuple) else [v]))
    return ids


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, tokenizer, enc: Encoded, rows: Any, *, max_new_tokens: int = 8, batch_size: int = 16,
    intervene: Intervene | None = None, progress: bool = False, prefix: PrefixCache | None = None,
    logits_out: np.ndarray | None = None, finished_out: np.ndarray | None = None,
) -> list[str]:
    """Greedy (argmax) continuations of up to `max_new_tokens` tokens of prompts `rows`, in `rows` order.

    With `logits_out` (a float32 (len(rows), V) array) the decision-token logits of the same pass are written
    into it (what `decision_logits` returns, without a second forward); with `finished_out` (a bool (len(rows),)
    array), whether each continuation ended at an end-of-sequence id rather than at the token limit.

    Each prompt is its tokens up to and including the decision token. Batches are left-padded with position ids
    counted from each row's first real token, so a batch gives the tokens of one-at-a-time decoding; decoding
    uses a KV cache and stops at an end-of-sequence id (the tokenizer's or the model's generation config's),
    which is not part of the text. Texts are decoded with ``skip_special_tokens=True``. This is a small loop
    rather than ``model.generate`` so that it is exactly greedy: ``generate`` would also apply the model's
    generation-config defaults (e.g. a repetition penalty). `intervene` wraps the whole generation of a batch
    (prefill and decode steps), starting at each prompt's decision token in the left-padded frame. With a
    `prefix` cache the prefill runs only the last two prompt tokens after the cached prefixes.
    """
    r = _rows(enc, rows)
    _check_batch(batch_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise MechdiffError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    dev, body = _device(model), get_body(model)
    eos = torch.tensor(sorted(_eos_ids(model, tokenizer)), dtype=torch.long, device=dev)
    seqs = [list(enc.ids[i][: enc.decision[i] + 1]) for i in r]
    order = np.argsort([len(s) for s in seqs], kind="stable")
    texts: list[str] = [""] * len(r)
    bar = _progress(len(r), progress, "generate")
    for s in range(0, len(order), batch_size):
        rows_b = order[s : s + batch_size]
        new = torch.full((len(rows_b), max_new_tokens), -1, dtype=torch.long, device=dev)
        done = torch.zeros(len(rows_b), dtype=torch.bool, device=dev)
        parts = _cached_parts(prefix, model, [seqs[i] for i in rows_b], [len(seqs[i]) - 1 for i in rows_b],
                              extra=max_new_tokens)
        if parts is not None and len({len(b) for _, b in parts}) == 1:
            cache, pmask, plen = prefix.batch([a for a, _ in parts])
            if cache is None:
                cache = empty_cache(model)
            ids = torch.tensor([b for _, b in parts], dtype=torch.long, device=dev)
            mask = torch.cat([pmask, torch.ones_like(ids)], dim=1)
            pos = plen[:, None] + torch.arange(ids.shape[1], device=dev)[None, :]
            start = torch.full((len(rows_b),), ids.shape[1] - 1, dtype=torch.long, device=dev)
        else:
            T = max(len(seqs[i]) for i in rows_b)
            ids = torch.full((len(rows_b), T), int(enc.pad), dtype=torch.long)
            mask = torch.zeros((len(rows_b), T), dtype=torch.long)
            for b, i in enumerate(rows_b):
                ids[b, T - len(seqs[i]) :] = torch.as_tensor(seqs[i], dtype=torch.long)
                mask[b, T - len(seqs[i]) :] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            start = torch.full((len(rows_b),), T - 1, dtype=torch.long, device=dev)  # offset + decision = T - 1
            cache = empty_cache(model)
        with _ctx(intervene, model, start):
            out = body(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            for step in range(max_new_tokens):
                lg = head_logits(model, _hidden(out)[:, -1])
                if step == 0 and logits_out is not None:
                    logits_out[rows_b] = lg.float().cpu().numpy()
                nxt = lg.argmax(-1)
                done = done | torch.isin(nxt, eos)
                new[:, step] = torch.where(done, -1, nxt)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                for key in ("cache", "past_key_values"):
                    if getattr(out, key, None) is not None:
                        cache = getattr(out, key)
                        break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                feed = torch.where(done, int(enc.pad), nxt)[:, None]
                out = body(input_ids=feed, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        for b, i in enumerate(rows_b):
            toks = [int(t) for t in new[b].tolist() if t >= 0]
            texts[i] = tokenizer.decode(toks, skip_special_tokens=True)
        if finished_out is not None:
            finished_out[rows_b] = done.cpu().numpy()
        bar.update(len(rows_b))
    bar.close()
    return texts


# --------------------------------------------------------------------------------------------- markers and mass


def marker_hits(texts: Sequence[str], patterns: Sequence[str] | str, *, ignore_case: bool = True) -> np.ndarray:
    """bool (n,): True where any regex in `patterns` matches the text (`re.search`; case-insensitive by default,
    as the seed's refusal score)."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    if not pats:
        raise MechdiffError("no marker patterns given: pass at least one regex (e.g. DEFAULT_REFUSAL_PATTERNS)")
    compiled = []
    for p in pats:
        try:
            compiled.append(re.compile(p, re.IGNORECASE if ignore_case else 0))
        except (re.error, TypeError) as exc:
            raise MechdiffError(f"invalid marker regex {p!r} ({exc}): fix the pattern") from exc
    out = np.zeros(len(texts), dtype=bool)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise MechdiffError(f"text {i} is {type(t).__name__}, not a string: marker_hits needs generated texts")
        out[i] = any(c.search(t) for c in compiled)
    return out


# a number as written in a reference or a generation: sign, digits (thousands as comma groups of three), decimals;
# not the tail of a word or a decimal ("3,4" is 3 and 4, not 34)
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# a fraction or a time ("1/2", "3:00"): matched as text, not by its last number
_RATIO = re.compile(r"-?\d+\s*[/:]\s*\d+")


def _fold(text: str) -> str:
    """Lower case, whitespace collapsed, no spaces around / and :."""
    return re.sub(r"\s*([/:])\s*", r"\1", " ".join(text.lower().split()))


def _answer_key(reference: str) -> tuple[str, float | None]:
    """(the key as text, its value when the key is a number): see `answer_key`."""
    if not isinstance(reference, str) or not reference.strip():
        raise MechdiffError(f"reference answer {reference!r} is empty: every scored prompt needs a reference answer")
    nums = list(_NUMBER.finditer(reference))
    ratios = list(_RATIO.finditer(reference))
    if "\\frac" in reference or (ratios and nums and ratios[-1].end() >= nums[-1].end()):
        return (_fold(ratios[-1].group()) if ratios and "\\frac" not in reference
                else _fold(reference).strip(" .!?;")), None
    if nums:
        x = float(nums[-1].group().replace(",", ""))
        return (str(int(x)) if x.is_integer() else repr(x)), x
    return _fold(reference).strip(" .!?;:"), None


def answer_key(reference: str) -> str:
    """What a generation must give to answer like the reference: the reference's last number ("The answer is
    1,200." -> "1200", GSM8K's "... #### 72" -> "72"); a fraction or time that ends it ("1/2", "3:00") or a LaTeX
    \\frac reference as text; else its text, lower-cased, whitespace collapsed and end punctuation stripped. An
    empty reference is an error (no answer to check)."""
    return _answer_key(reference)[0]


def answer_hits(texts: Sequence[str], references: Sequence[str], finished: Sequence[bool] | None = None
                ) -> np.ndarray:
    """bool (n,): whether each generation gives its reference's answer (`answer_key`), the exact-answer accuracy
    seed 002 reports for a cognitive fine-tune (no chain of thought). A numeric key must equal the **last** number
    of the text, as lm-eval's flexible extraction reads an answer ("65 + 96 = 161" and "The answer is 161." give
    161; "1,61" reads as 1 and 61, "16.5" and "1610" are not 16); a text key must appear as a whole word or phrase
    of the folded text (case, whitespace; "no" is not in "know").

    `finished` (one per text: the generation ended at an end-of-sequence id, `greedy_continuations(finished_out=)`):
    a last number that ends an unfinished generation may have been cut off by the token limit ("... is 16" of
    161), so the answer is not counted; a character after it ("... is 16.") ends it. Without `finished` every
    number counts as complete."""
    if len(texts) != len(references) or (finished is not None and len(finished) != len(texts)):
        raise MechdiffError(f"answer_hits: {len(texts)} texts, {len(references)} references"
                            f"{'' if finished is None else f' and {len(finished)} finished flags'}: one per text")
    out = np.zeros(len(texts), dtype=bool)
    for i, (t, ref) in enumerate(zip(texts, references)):
        if not isinstance(t, str):
            raise MechdiffError(f"text {i} is {type(t).__name__}, not a string: answer_hits needs generated texts")
        key, value = _answer_key(ref)
        if value is None:
            out[i] = re.search(rf"(?<!\w){re.escape(key)}(?!\w)", _fold(t)) is not None
            continue
        nums = list(_NUMBER.finditer(t))
        if not nums or (finished is not None and not finished[i] and nums[-1].end() == len(t)):
            continue
        out[i] = float(nums[-1].group().replace(",", "")) == value
    return out


def generated_answers(model: nn.Module, tokenizer, enc: Encoded, rows: Any, references: Sequence[str], *,
                      max_new_tokens: int, batch_size: int = 16, **greedy: Any) -> np.ndarray:
    """bool (len(rows),): whether the model's greedy continuation of each prompt gives its reference answer
    (`greedy_continuations`, then `answer_hits` with the continuations' finished flags); `greedy` passes on
    `intervene`, `prefix`, `logits_out`, `progress`."""
    finished = np.zeros(len(rows), dtype=bool)
    texts = greedy_continuations(model, tokenizer, enc, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 finished_out=finished, **greedy)
    return answer_hits(texts, list(references), finished)


def new_token_mass(logits: Any, allowed: Any | None) -> np.ndarray:
    """float64 (n,): the softmax mass of each logits row on token ids NOT in `allowed` (ids or a boolean vocabulary
    mask: the tokens both tokenizers share), i.e. on tokens the other model lacks; zeros when `allowed` is None or
    the whole vocabulary (identical tokenizers)."""
    lp = log_softmax(logits)
    if isinstance(lp, torch.Tensor):
        lp = lp.cpu().numpy()
    ids = allowed_index(allowed, lp.shape[1])
    if ids is None:
        return np.zeros(lp.shape[0], dtype=np.float64)
    rest = np.ones(lp.shape[1], dtype=bool)
    rest[ids] = False
    x = lp[:, rest]
    m = x.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mass = np.exp(m[:, 0]) * np.exp(x - m).sum(axis=1)
    return np.where(np.isfinite(m[:, 0]), mass, 0.0)


# --------------------------------------------------------------------------------------------- comparison


def _summary(mean: float, lo: float, hi: float) -> dict:
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi)}


def _metric(x: Any, what: str) -> np.ndarray:
    a = as_f64(x, what).ravel()
    if a.size == 0:
        raise MechdiffError(f"{what} is empty: no records were evaluated")
    if not np.isfinite(a).all():
        raise MechdiffError(f"{what} contains NaN or inf: check the per-record metric")
    return a


def compare(base: Any, tuned: Any, *, n_boot: int = 1000, seed: int = 0, paired: bool = True) -> dict:
    """Means of a per-record metric for both models and their difference, with 95% percentile bootstrap CIs.

    Returns ``{"base": {"mean", "lo", "hi"}, "tuned": {...}, "diff": {...}, "n": len(base)}``. `diff` is
    tuned - base: per record when `paired` (the same records, equal lengths), else the difference of means of
    independent resamples of each (then "n_tuned" gives the size of `tuned` too).
    """
    check_boot(n_boot)
    a, b = _metric(base, "base metric"), _metric(tuned, "tuned metric")
    out = {"base": _summary(*mean_ci(a, n_boot=n_boot, seed=seed)),
           "tuned": _summary(*mean_ci(b, n_boot=n_boot, seed=seed))}
    if paired:
        if a.shape != b.shape:
            raise MechdiffError(f"paired comparison needs one value per record for both models, got {a.size} and "
                                f"{b.size}: pass paired=False for independent samples")
        out["diff"] = _summary(*mean_ci(b - a, n_boot=n_boot, seed=seed))
        out["n"] = int(a.size)
        return out
    if min(a.size, b.size) < 2:
        raise MechdiffError(f"an unpaired comparison needs at least 2 records per model, got {a.size} and {b.size}")
    out["diff"] = _summary(*mean_diff_ci(a, b, n_boot=n_boot, seed=seed))
    out["n"], out["n_tuned"] = int(a.size), int(b.size)
    return out


# --------------------------------------------------------------------------------------------- one model, all metrics


def score_model(
    model: nn.Module, tokenizer, enc: Encoded, gen_rows: dict[str, np.ndarray], patterns: dict[str, Sequence[str]],
    *, mc: dict[str, tuple[list[str], list[list[str]], list[int]]] | None = None,
    refs: dict[str, tuple[list[str], list[str]]] | None = None, answers: dict[str, Sequence[str]] | None = None,
    allowed: Any | None = None, chat: bool = True, max_len: int = 256, max_new_tokens: int = 8, batch_size: int = 16,
    progress: bool = False, mc_score: str = "sum", units: UnitsFn = compute_all,
) -> dict[tuple[str, str], np.ndarray]:
    """Per-record behaviour of one model: {(dataset, metric): values}.

    - `<marker>_rate` (and `refusal_rate` when `patterns` names "refusal"): whether the greedy continuation of
      each prompt of `gen_rows[dataset]` matches any of the marker's patterns (0/1);
    - `answer_accuracy` for each dataset of `answers` (its reference answers, one per row of `gen_rows[dataset]`):
      whether the greedy continuation gives the reference answer (`answer_hits`);
    - `new_token_mass` (only with `allowed`, the model's ids the other model shares): the decision-token mass
      on tokens the other model lacks;
    - `accuracy` for each multiple-choice dataset of `mc` (questions, choices, answers), by option log-prob
      (`mc_score`: summed or mean over the option's tokens, `option_logprobs`);
    - `ref_logprob` and `ref_logprob_per_token` for each dataset of `refs` (prompts, reference answers).
    `units` (`resume.Units`) keeps each dataset's scores as they finish, so an interrupted run resumes.
    """
    out: dict[tuple[str, str], np.ndarray] = {}

    def cache() -> PrefixCache:  # one per dataset (freed after it); single passes keep no padded batches
        return PrefixCache(model, keep_bytes=0)

    def generated(ds: str, rows: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        got = {}
        logits = np.empty((len(rows), model.get_output_embeddings().weight.shape[0]), dtype=np.float32)
        finished = np.zeros(len(rows), dtype=bool)
        texts = greedy_continuations(model, tokenizer, enc, rows, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress, logits_out=logits, prefix=cache(),
                                     finished_out=finished)
        for name, pats in patterns.items():
            got[(ds, f"{name}_rate")] = marker_hits(texts, list(pats)).astype(np.float64)
        if answers and ds in answers:
            got[(ds, "answer_accuracy")] = answer_hits(texts, list(answers[ds]), finished).astype(np.float64)
        if allowed is not None:
            got[(ds, "new_token_mass")] = new_token_mass(logits, allowed)
        return got

    def multiple_choice(ds: str, questions: list[str], choices: list[list[str]], answers: list[int]):
        lp = option_logprobs(model, tokenizer, questions, choices, chat=chat, max_len=max_len,
                             batch_size=batch_size, progress=progress, prefix=cache(), score=mc_score)
        return {(ds, "accuracy"): mc_correct(lp, answers).astype(np.float64)}

    def referenced(ds: str, prompts: list[str], answers: list[str]):
        s, n = continuation_logprobs(model, tokenizer, prompts, answers, chat=chat, max_len=max_len,
                                     batch_size=batch_size, progress=progress, prefix=cache())
        return {(ds, "ref_logprob"): s, (ds, "ref_logprob_per_token"): s / n}

    for ds, refs_ds in (answers or {}).items():
        if ds not in gen_rows or len(refs_ds) != len(gen_rows[ds]):
            raise MechdiffError(f"answers[{ds!r}] needs one reference per generated row of {ds!r}")
    for ds, rows in gen_rows.items():
        out.update(units(f"generate/{ds}", lambda ds=ds, rows=rows: generated(ds, rows)))
    for ds, (questions, choices, answers) in (mc or {}).items():
        out.update(units(f"mc/{ds}", lambda ds=ds, q=questions, c=choices, a=answers: multiple_choice(ds, q, c, a)))
    for ds, (prompts, answers) in (refs or {}).items():
        out.update(units(f"ref/{ds}", lambda ds=ds, q=prompts, a=answers: referenced(ds, q, a)))
    return out


def behaviour_table(base: dict[tuple[str, str], np.ndarray], tuned: dict[tuple[str, str], np.ndarray], *,
                    n_boot: int = 1000, seed: int = 0) -> tuple[list[dict], dict]:
    """Compare the two models' per-record scores: (CSV rows, {dataset: {metric: compare(...)}}).

    Metrics only one model has (new_token_mass: a property of the tuned model's extra tokens) are reported
    for that model alone, with null for the other and for the difference.
    """
    rows: list[dict] = []
    out: dict[str, dict] = {}
    for key in sorted(set(base) | set(tuned)):
        ds, metric = key
        if key in base and key in tuned:
            c = compare(base[key], tuned[key], n_boot=n_boot, seed=seed)
        else:
            side = "tuned" if key in tuned else "base"
            only = tuned.get(key, base.get(key))
            none = {"mean": None, "lo": None, "hi": None}
            c = {"base": none, "tuned": none, "diff": none, "n": int(len(only))}
            c[side] = _summary(*mean_ci(_metric(only, metric), n_boot=n_boot, seed=seed))
        out.setdefault(ds, {})[metric] = c
        row = {"dataset": ds, "metric": metric, "label": f"{ds} {metric}", "n": c["n"]}
        for side in ("base", "tuned", "diff"):
            row[side], row[f"{side}_lo"], row[f"{side}_hi"] = c[side]["mean"], c[side]["lo"], c[side]["hi"]
        rows.append(row)
    return rows, out


__all__ = [
    "DEFAULT_REFUSAL_PATTERNS",
    "Intervene",
    "answer_hits",
    "answer_key",
    "generated_answers",
    "behaviour_table",
    "compare",
    "continuation_logprobs",
    "decision_logits",
    "greedy_continuations",
    "marker_hits",
    "mc_correct",
    "mc_text",
    "new_token_mass",
    "option_logprobs",
    "perplexity",
    "PrefixCache",
    "score_model",
]
