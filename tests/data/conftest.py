"""Shared fixtures of the data tests: the default corpora written once per module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechdiff.data.corpus import write_default_corpora


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_default_corpora(d)
    return d


def records(d: Path, name: str) -> list[dict]:
    """The JSON records of one JSONL corpus file."""
    return [json.loads(line) for line in (d / name).read_text(encoding="utf-8").splitlines()]
