"""Shared tiny world of the analysis tests: random word prompts, a word-level tokenizer and a 4-layer model."""

from __future__ import annotations

import numpy as np
import pytest

from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
from mechdiff.model.tokens import encode

WORDS = ("the a cat dog bird fish sat ran flew swam on under near mat tree river house red blue green big small "
         "old new fast slow happy sad sun moon rain snow city road hill lake").split()


def random_texts(n: int, *, seed: int = 0, lo: int = 4, hi: int = 14) -> list[str]:
    """n seeded prompts of lo..hi-1 words drawn from WORDS."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def world():
    """(tokenizer, base model of width 64, 150 encoded prompts); a test module may define its own `world`."""
    texts = random_texts(150)
    tok = make_tiny_tokenizer(texts[:60], extra_words=WORDS)
    base = make_tiny_model(len(tok), n_layers=4, d_model=64, seed=0)
    return tok, base, encode(tok, texts)
