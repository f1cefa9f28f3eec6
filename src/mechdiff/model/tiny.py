"""Tiny random Llama-style models and word-level tokenizers for tests and smoke runs."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def _words(texts: Iterable[str]) -> list[str]:
    """Distinct lower-cased word and punctuation pieces of the texts, sorted."""
    seen: set[str] = set()
    for t in texts:
        seen.update(re.findall(r"\w+|[^\w\s]", t.lower()))
    return sorted(seen)


def make_tiny_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()):
    """A word-level fast tokenizer covering the words of `texts`, with a ChatML template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in [*_words(texts), "user", "assistant", "system", *extra_words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<|im_start|>", "isolated"), pre_tokenizers.Split("<|im_end|>", "isolated"),
         pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(vocab_size: int, n_layers: int = 4, d_model: int = 64, seed: int = 0):
    """A random Llama-style causal LM (width `d_model`, `n_layers` blocks), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than default init so layers differ visibly in tiny tests
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def save_tiny_pair_dir(out_dir: str | Path, texts: Iterable[str], n_layers: int = 4, d_model: int = 64,
                       seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a HF directory (safetensors) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(list(texts))
    model = make_tiny_model(len(tok), n_layers=n_layers, d_model=d_model, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
