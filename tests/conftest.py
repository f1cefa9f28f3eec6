"""Shared fixtures: a tiny tokenizer and Llama-style model built in memory (no network)."""

from __future__ import annotations

import pytest
import torch

from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer

SENTENCES = [
    "the festival of lights fills every street with lamps",
    "grandmother cooks rice and lentils for the family",
    "the train crossed the river before sunrise",
    "a square has four equal sides and four right angles",
    "why do people fly kites in the winter sky",
    "describe the music played at a wedding",
    "the printer in the office needs new paper",
    "cats sleep for most of the day",
    "tell me about the dances of the south",
    "water boils at one hundred degrees",
]


@pytest.fixture(scope="session")
def tiny_tok():
    """A word-level tokenizer covering SENTENCES, with a ChatML template."""
    return make_tiny_tokenizer(SENTENCES)


@pytest.fixture(scope="session")
def tiny_model(tiny_tok):
    """A 4-layer width-64 random Llama model matching tiny_tok."""
    torch.set_num_threads(1)
    return make_tiny_model(len(tiny_tok), n_layers=4, d_model=64, seed=0)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """A repo copy whose DVC pipeline ran to completion on the tiny edited pair (committed in its own git).

    The repro is traced (mechdiff.trace): tests/e2e_repo.trace_dir(repo) holds one JSON per stage process.
    """
    from tests.e2e_repo import build_tiny_repo

    return build_tiny_repo(tmp_path_factory.mktemp("e2e"))
