"""Input checks shared by the statistics modules: numeric, finite, 2-D arrays with one-line errors."""

from __future__ import annotations

from typing import Any

import numpy as np

from mechdiff.errors import MechdiffError


def as_f64(x: Any, what: str) -> np.ndarray:
    """A float64 numpy copy of a numpy array or torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MechdiffError(f"{what} must be a numeric array or tensor, got {type(x).__name__}") from exc


def matrix(x: Any, what: str, min_rows: int = 1) -> np.ndarray:
    """`x` as a finite float64 (rows x features) matrix with at least `min_rows` rows."""
    a = as_f64(x, what)
    if a.ndim != 2:
        raise MechdiffError(f"{what} must be a 2-D (rows x features) array, got shape {a.shape}")
    if a.shape[0] < min_rows or a.shape[1] == 0:
        raise MechdiffError(f"{what} has shape {a.shape}: need at least {min_rows} rows and 1 column")
    if not np.isfinite(a).all():
        raise MechdiffError(f"{what} contains NaN or inf: a model run in float16/bfloat16 can overflow (run it in "
                            "float32); rows read from an activation store mean a damaged store (delete it and rerun "
                            "its extract stage)")
    return a
