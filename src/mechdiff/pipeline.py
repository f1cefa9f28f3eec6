"""Glue shared by the stages: kept prompts, encodings and row selections (no params reading)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mechdiff.errors import MechdiffError
from mechdiff.tokens import Encoded, encode

PROMPTS = Path("artifacts/prompts/prompts.jsonl")
FAIRNESS = Path("artifacts/prompts/fairness.npz")


def kept_prompts(prompts_path: Path = PROMPTS, fairness_path: Path = FAIRNESS) -> list:
    """Prompts that passed the fairness filter, in store row order."""
    from mechdiff.corpus import load_prompts

    keep = set(np.load(fairness_path)["kept_pids"].tolist())
    prompts = [q for q in load_prompts(prompts_path) if q.pid in keep]
    if not prompts:
        raise MechdiffError("no prompts left after the fairness filter: relax pair.fairness.mode to ratio")
    return prompts


def allowed_ids(fairness_path: Path = FAIRNESS) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Shared token ids (base, tuned), aligned string by string, or (None, None) when the tokenizers are identical."""
    f = np.load(fairness_path)
    if bool(f["identical"]):
        return None, None
    return f["allowed_base"], f["allowed_tuned"]


def encode_prompts(tokenizer, prompts: list, *, chat: bool, max_len: int) -> Encoded:
    """Encode prompts exactly as `extract` did (same chat template, truncation, decision token)."""
    return encode(tokenizer, [q.text for q in prompts], chat=chat, max_len=max_len)


def pick_rows(prompts: list, *, split: str | None = None, datasets: tuple[str, ...] | None = None,
              n: int | None = None, seed: int = 0) -> np.ndarray:
    """Row indices of prompts in `split` / `datasets`, a seeded subsample of at most `n` (sorted)."""
    rows = np.array([i for i, q in enumerate(prompts)
                     if (split is None or q.split == split) and (datasets is None or q.dataset in datasets)],
                    dtype=np.int64)
    if len(rows) == 0:
        raise MechdiffError(f"no prompts in split={split!r} datasets={datasets}: check data.splits and the corpora")
    if n is not None and 0 < n < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    return rows
