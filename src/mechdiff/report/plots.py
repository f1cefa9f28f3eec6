"""Figures drawn with matplotlib's Agg canvas: the stages' declared PNGs and the report's own figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mechdiff.errors import MechdiffError

MAX_LINES = 12  # more lines than this make a legend unreadable: the rest are left out
KINDS = ("line", "barh", "heatmap")


def band_columns(cols: Sequence[str], y: str) -> tuple[str | None, str | None]:
    """Columns holding a confidence band for y ({y}_lo/{y}_hi, {y}_low/{y}_high, ci_lo/ci_hi, ci_low/ci_high)."""
    for lo, hi in ((f"{y}_lo", f"{y}_hi"), (f"{y}_low", f"{y}_high"), ("ci_lo", "ci_hi"), ("ci_low", "ci_high")):
        if lo in cols and hi in cols:
            return lo, hi
    return None, None


def _new_axes(height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, png_path: Path, title: str) -> Path:
    fig.axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png", metadata={"Software": None})
    return png_path


def _lines(df: pd.DataFrame, png_path: Path, x: str, ys: Sequence[str], group: str | None, title: str,
           logx: bool, band: tuple[str, str] | None) -> Path:
    """One line per (group, y) against x, with the band columns (lo, hi) shaded when there is a single y."""
    fig, ax = _new_axes()
    groups = [(None, df)] if group is None else list(df.groupby(group, sort=True))
    n_lines = 0
    for gname, part in groups:
        part = part.sort_values(x)
        for y in ys:
            if n_lines >= MAX_LINES:
                break
            label = " / ".join(str(v) for v in (gname, y if len(ys) > 1 else None) if v is not None) or y
            ax.plot(part[x], part[y], marker="o", markersize=3, linewidth=1.4, label=label)
            if band is not None and len(ys) == 1:
                ax.fill_between(part[x], part[band[0]], part[band[1]], alpha=0.18)
            n_lines += 1
    if logx:  # symmetric log keeps x = 0 (e.g. rank 0) on the axis
        ax.set_xscale("symlog", linthresh=1)
    elif pd.api.types.is_integer_dtype(df[x]):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(ys[0] if len(ys) == 1 else "value")
    ax.grid(True, alpha=0.3)
    if n_lines > 1:
        ax.legend(fontsize=7, frameon=False, loc="best")
    return _save(fig, png_path, title)


def _barh(df: pd.DataFrame, png_path: Path, x: str, label: str, title: str, band: tuple[str, str] | None) -> Path:
    """Horizontal bars of the value column x, one per row labelled by column `label`, the band (lo, hi) as error bars."""
    fig, ax = _new_axes(height=max(2.0, 0.9 + 0.35 * len(df)))
    err = None if band is None else [(df[x] - df[band[0]]).clip(lower=0), (df[band[1]] - df[x]).clip(lower=0)]
    pos = range(len(df))
    ax.barh(list(pos), df[x], xerr=err, color="#6b9bd1", ecolor="#2c3846", capsize=3)
    ax.set_yticks(list(pos), [str(v) for v in df[label]])
    ax.invert_yaxis()
    ax.set_xlabel(x)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, png_path, title)


def _heatmap(df: pd.DataFrame, png_path: Path, col: str, value: str, row: str, title: str) -> Path:
    """A matrix from long-form rows (row label, column label, value), in the rows' first-seen order."""
    rows = list(dict.fromkeys(df[row].astype(str)))
    cols = list(dict.fromkeys(df[col].astype(str)))
    m = df.assign(**{row: df[row].astype(str), col: df[col].astype(str)}).pivot_table(
        index=row, columns=col, values=value, aggfunc="mean").reindex(index=rows, columns=cols)
    size = min(9.0, 2.5 + 0.12 * max(len(rows), len(cols)))
    fig, ax = _new_axes(height=size)
    fig.set_figwidth(size + 1.2)
    a = m.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 1.0
    lim = lim if lim > 0 else 1.0
    im = ax.imshow(a, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    fs = max(3.5, min(8.0, 300 / max(len(rows), 1) / 4))
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=fs)
    ax.set_yticks(range(len(rows)), rows, fontsize=fs)
    fig.colorbar(im, ax=ax, fraction=0.04, label=value)
    return _save(fig, png_path, title)


def plot_frame(df: pd.DataFrame, png_path: Path, x: str, y: str | Sequence[str], *, group: str | None = None,
               title: str | None = None, logx: bool = False, kind: str = "line",
               band: tuple[str, str] | None = None) -> Path:
    """Draw a table into a PNG: `line` (y column(s) against x, one line per group), `barh` (x per y label) or
    `heatmap` (value y[0] at row `group`, column x, from long-form rows; a colour scale symmetric about 0).

    `band` names the (lo, hi) columns of a confidence band around the single y (line) or x (barh).
    """
    ys = [y] if isinstance(y, str) else list(y)
    if kind not in KINDS:
        raise MechdiffError(f"unknown figure kind {kind!r}: choose one of {', '.join(KINDS)}")
    if not ys:
        raise MechdiffError("a figure needs at least one y column")
    if kind == "heatmap" and not group:
        raise MechdiffError("a heatmap needs `group` (the row-label column)")
    for col in [x, *ys, *([group] if group else []), *(band or ())]:
        if col not in df.columns:
            raise MechdiffError(f"the table has no column '{col}' (columns: {', '.join(map(str, df.columns))})")
    numeric = {"line": [x, *ys], "barh": [x], "heatmap": ys[:1]}[kind] + list(band or ())
    for col in numeric:
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise MechdiffError(f"column '{col}' is not numeric: it cannot be plotted")
    png_path = Path(png_path)
    if kind == "barh":
        return _barh(df, png_path, x, ys[0], title or f"{x} by {ys[0]}", band)
    if kind == "heatmap":
        return _heatmap(df, png_path, x, ys[0], group, title or f"{ys[0]} by {group} and {x}")
    return _lines(df, png_path, x, ys, group, title or f"{', '.join(ys)} by {x}", logx, band)


def plot_series(csv_path: Path, png_path: Path, x: str, y: str | Sequence[str], group: str | None = None,
                title: str | None = None, logx: bool = False) -> Path:
    """Plot column(s) y against x from a CSV (one line per group value) into a PNG; returns png_path.

    A single y is drawn with its confidence band when the CSV has one ({y}_lo/{y}_hi, ci_low/ci_high, ...).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MechdiffError(f"plot data {csv_path} does not exist: run the stage that writes it first")
    try:
        df = pd.read_csv(csv_path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise MechdiffError(f"cannot read {csv_path} as CSV: {str(exc).splitlines()[0]}") from exc
    if df.empty:
        raise MechdiffError(f"{csv_path} has no rows to plot: check the stage that writes it")
    ys = [y] if isinstance(y, str) else list(y)
    lo, hi = band_columns(list(df.columns), ys[0]) if len(ys) == 1 else (None, None)
    try:
        return plot_frame(df, png_path, x, ys, group=group, title=title, logx=logx,
                          band=(lo, hi) if lo and hi else None)
    except MechdiffError as exc:
        raise MechdiffError(f"{csv_path}: {exc}") from exc
