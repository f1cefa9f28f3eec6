"""Self-contained HTML report of a run: params, every metric, every plot table and figure.

`build_report(root, out_dir)` reads `root/params.yaml`, `root/dvc.lock`, `root/metrics/**` and
`root/plots/**` (whatever of them exists) and writes `out_dir/index.html` plus copies of the
figures (`out_dir/img/`) and of the metric/plot files it links to (`out_dir/files/`), so the
folder can be moved or served as is. No external resources and no JavaScript.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mechdiff.errors import MechdiffError

MAX_ROWS = 50
IMAGE_EXTS = (".png", ".svg", ".jpg", ".jpeg", ".gif")
FRAGMENT_EXTS = (".md", ".html", ".htm")

# (key, title, how to read it); the page shows the sections in this order and skips empty ones.
SECTIONS: list[tuple[str, str, str]] = [
    ("pair", "Pair & params", "The two models compared, the parameters that produced this run, and how the "
     "prompts and the tuned model were prepared."),
    (
        "divergence",
        "Divergence",
        "Linear CKA between base and tuned activations, per layer and site: 1 means the same representation "
        "up to rotation and scale; the lower it is, the more fine-tuning changed that layer. KL is the "
        "next-token divergence between the models at the decision token; KL on cultural (target-domain) "
        "prompts well above KL on control prompts means the change is specific to what the model was tuned on.",
    ),
    (
        "transport",
        "Transport & rank-k",
        "A linear map from base to tuned activations is fitted on train prompts and scored on held-out ones. "
        "R^2 is the share of tuned variance the mapped base activations explain (compare with the shuffled "
        "baseline). KL drop % is how much of the output gap closes when the mapped base activation is patched "
        "into the tuned model instead of the raw re-coloured one (100 = fully closed, 0 = no better). min_k is "
        "the smallest map rank whose KL drop reaches the target: how many directions the change needs.",
    ),
    (
        "sae",
        "SAE quality",
        "Sparse autoencoders on base / tuned / delta activations. FVU is the fraction of variance left "
        "unexplained by the reconstruction (lower is better; below ~0.1 is good). L0 is the mean number of "
        "active latents per token. Dead % is the share of latents that never fired in the evaluation window "
        "(wasted capacity). CE / KL recovered is the share of the next-token loss gap closed when the "
        "reconstruction is spliced into the model (1 = as good as the real activation, 0 = as bad as ablation).",
    ),
    (
        "features",
        "Features & enrichment",
        "Per-feature Cohen's d between base and tuned activations (pooled SD). Type A = active on base and "
        "suppressed on tuned, B = amplified on tuned, C = only on tuned / only in the delta SAE. Enrichment "
        "E = (share of changed features in a group) / (overall share): E > 1 with a Benjamini-Hochberg "
        "adjusted p below 0.05 means the group is over-represented among the changed features.",
    ),
    (
        "graded",
        "Graded concepts",
        "Features scored against graded labels 0-3. r / rho: Pearson / Spearman correlation with the grade; "
        "monotonic: class means rise with the grade; separation = (mean at 3 - mean at 0) / std; TPR / FPR at "
        "the 95th percentile of grade-0 activations. A feature is kept when r >= 0.4, monotonic, TPR >= 0.5 "
        "and FPR <= 0.2; score = 0.4 r + 0.3 separation + 0.3 (TPR - FPR).",
    ),
    (
        "steer",
        "Steering & ablation",
        "Adding (steer) or removing (ablate) the difference-of-means direction(s): the effect on the target "
        "behaviour against side effects, which should stay small (perplexity change <= 5%, neutral-task "
        "accuracy drop <= 5 points).",
    ),
    (
        "heads",
        "Head attribution",
        "Attribution of each attention head to the reference continuation, z-scored per model. Churn is the "
        "share of heads whose z changed by more than 2; top-k Jaccard compares the heads that matter most in "
        "each model (1 = the same heads).",
    ),
    (
        "geometry",
        "Concept geometry",
        "Concept vectors under the causal inner product. Hierarchical orthogonality: the angle between "
        "(child - parent) and parent should be near 90 degrees (median >= 80) and clearly above the shuffled "
        "and random-parent controls.",
    ),
    ("other", "Other", "Files that match no known family."),
]
_SECTION_TITLES = {key: title for key, title, _ in SECTIONS}

# First matching rule wins: (section, tokens any of which in the file's path selects it).
_RULES: list[tuple[str, frozenset[str]]] = [
    ("graded", frozenset({"graded", "grade", "concept", "concepts", "trait", "traits"})),
    ("geometry", frozenset({"geometry", "hsae", "orthogonality", "hierarchy"})),
    ("divergence", frozenset({"divergence", "cka", "kl", "similarity", "layer_patch"})),
    ("transport", frozenset({"transport", "patch", "patching", "rank", "rank_k", "map", "maps", "alpha"})),
    ("sae", frozenset({"sae", "saes", "crosscoder"})),
    ("features", frozenset({"features", "feature", "enrichment", "themes", "theme", "top", "examples"})),
    ("steer", frozenset({"steer", "steering", "ablate", "ablation"})),
    ("heads", frozenset({"heads", "head", "attribution", "churn"})),
    ("pair", frozenset({"prepare", "fairness", "model", "models", "finetune", "pair", "prompts"})),
]

# Reading hints for well-known metric keys (matched on the last dotted component).
KEY_HINTS: dict[str, str] = {
    "cka": "1 = same representation",
    "kl": "nats; 0 = same next-token distribution",
    "kl_cultural": "KL on target-domain prompts",
    "kl_control": "KL on control prompts",
    "r2": "share of variance explained",
    "r2_val": "held-out R^2",
    "r2_train": "train R^2",
    "r2_shuffled": "baseline: shuffled pairs",
    "kl_drop_pct": "100 = gap fully closed",
    "min_k": "fewest directions reaching the target",
    "alpha": "output scale of the map",
    "fvu": "lower is better",
    "l0": "active latents per token",
    "dead_pct": "% latents never firing",
    "ce_recovered": "1 = perfect splice",
    "kl_recovered": "1 = perfect splice",
    "cohen_d": "effect size, pooled SD",
    "enrichment": "> 1 = over-represented",
    "p_bh": "BH-adjusted p-value",
    "pearson_r": "correlation with grade",
    "spearman_rho": "rank correlation with grade",
    "separation": "(m3 - m0) / std",
    "tpr": "hit rate on grade 3",
    "fpr": "false alarms on grade 0",
    "churn": "share of heads with |dz| > 2",
    "jaccard": "1 = same top heads",
    "median_angle": "degrees; >= 80 = orthogonal",
}

# Known plot series: stem -> (x candidates, y candidates, group candidates).
KNOWN_SERIES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "cka": (("layer",), ("cka",), ("site", "kind", "view")),
    "rank_k": (("k", "rank"), ("kl_drop_pct", "kl_drop", "drop_pct", "r2_val", "r2"), ("site", "solver")),
    "kl": (("layer",), ("kl", "kl_mean"), ("dataset", "site")),
    "layer_patch": (("layer",), ("kl", "kl_mean", "kl_base_to_tuned", "kl_tuned_to_base"), ("direction", "site")),
    "steer": (("alpha", "strength", "k"), ("effect", "target", "kl", "ppl_change_pct"), ("direction", "mode")),
    "sae_training": (("step", "tokens"), ("fvu", "loss", "dead_pct"), ("source", "sae")),
    "finetune_loss": (("step",), ("loss",), ()),
    "alpha": (("alpha",), ("kl_drop_pct", "kl", "r2_val"), ("site",)),
}
_X_CANDIDATES = ("layer", "k", "rank", "alpha", "step", "epoch", "tokens", "threshold")
_GROUP_CANDIDATES = ("site", "kind", "source", "model", "dataset", "direction", "solver", "method", "group", "sae")
_MAX_LINES = 12


def format_value(value: Any) -> str:
    """Human-readable cell text for a metric value (4 significant digits for floats)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        items = [format_value(v) for v in value[:20]]
        return "[" + ", ".join(items) + (", ..." if len(value) > 20 else "") + "]"
    return str(value)


def _cell(value: Any) -> str:
    """A <td> with the readable value, the exact value in its title, numbers right-aligned."""
    text = html.escape(format_value(value))
    if isinstance(value, bool) or value is None:
        return f"<td>{text}</td>"
    if isinstance(value, int | float):
        return f'<td class="num" title="{html.escape(repr(value))}">{text}</td>'
    return f"<td>{text}</td>"


def _is_scalar(value: Any) -> bool:
    """True for JSON leaves (numbers, strings, booleans, null)."""
    return value is None or isinstance(value, str | int | float | bool)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys; lists of scalars stay lists, other lists become indexed keys."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                out.update(flatten(value, name))
            elif isinstance(value, list) and value and not all(_is_scalar(v) for v in value):
                for i, item in enumerate(value):
                    out.update(flatten(item, f"{name}[{i}]"))
            else:
                out[name] = value
    elif prefix:
        out[prefix] = obj
    else:
        out["value"] = obj
    return out


def _hint(key: str) -> str:
    """Reading hint for a dotted metric key, or ''."""
    last = key.rsplit(".", 1)[-1].lower()
    if last not in KEY_HINTS and last.endswith(("_base", "_tuned")):  # per-model crosscoder keys
        last = last.rsplit("_", 1)[0]
    return KEY_HINTS.get(last, "")


def _kv_table(flat: dict[str, Any]) -> str:
    """Two-column table metric -> value with reading hints."""
    rows = []
    for key, value in flat.items():
        hint = _hint(key)
        hint_html = f' <span class="hint">{html.escape(hint)}</span>' if hint else ""
        rows.append(f"<tr><th scope=\"row\">{html.escape(key)}{hint_html}</th>{_cell(value)}</tr>")
    return '<table class="kv"><tbody>' + "".join(rows) + "</tbody></table>"


def _matrix(obj: Any) -> tuple[list[str], list[str], dict[str, dict[str, Any]]] | None:
    """If obj is {row: {col: scalar}} with shared columns, return (rows, cols, flat rows); else None."""
    if not isinstance(obj, dict) or len(obj) < 2 or not all(isinstance(v, dict) and v for v in obj.values()):
        return None
    flat_rows = {str(k): flatten(v) for k, v in obj.items()}
    if not all(_is_scalar(x) for row in flat_rows.values() for x in row.values()):
        return None
    cols: list[str] = []
    for row in flat_rows.values():
        cols += [c for c in row if c not in cols]
    if len(cols) > 14 or any(len(r) < 0.6 * len(cols) for r in flat_rows.values()):
        return None  # too wide or too sparse to read as a grid
    return list(flat_rows), cols, flat_rows


def _grid_table(rows: list[str], cols: list[str], data: dict[str, dict[str, Any]]) -> str:
    """Rows x columns table for a two-level metric dict."""
    head = "<tr><th></th>" + "".join(
        f"<th>{html.escape(c)}" + (f'<br><span class="hint">{html.escape(_hint(c))}</span>' if _hint(c) else "")
        + "</th>"
        for c in cols
    ) + "</tr>"
    body = "".join(
        f'<tr><th scope="row">{html.escape(r)}</th>' + "".join(
            _cell(data[r][c]) if c in data[r] else "<td></td>" for c in cols
        ) + "</tr>"
        for r in rows
    )
    return f'<table class="grid"><thead>{head}</thead><tbody>{body}</tbody></table>'


def _records_table(records: list[dict[str, Any]], note_total: int | None = None) -> str:
    """Table of records (list of flat dicts), at most MAX_ROWS rows."""
    cols: list[str] = []
    for rec in records:
        cols += [c for c in rec if c not in cols]
    shown = records[:MAX_ROWS]
    head = "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr>"
    body = "".join("<tr>" + "".join(_cell(rec.get(c)) for c in cols) + "</tr>" for rec in shown)
    total = note_total if note_total is not None else len(records)
    note = (
        f'<p class="note">Showing the first {len(shown)} of {total} rows; the full file is linked above.</p>'
        if total > len(shown) else ""
    )
    return f'<div class="scroll"><table class="grid"><thead>{head}</thead><tbody>{body}</tbody></table></div>{note}'


def _json_html(obj: Any) -> str:
    """Render a metrics JSON object as readable tables."""
    grid = _matrix(obj)
    if grid is not None:
        return _grid_table(*grid)
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return _records_table([flatten(r) for r in obj])
    if isinstance(obj, dict):
        # nested two-level blocks (e.g. {"per_site": {...}, "summary": {...}}) get a grid each when they fit
        parts, rest = [], {}
        for key, value in obj.items():
            sub = _matrix(value)
            if sub is not None:
                parts.append(f'<p class="sub">{html.escape(str(key))}</p>' + _grid_table(*sub))
            else:
                rest[key] = value
        head = _kv_table(flatten(rest)) if rest else ""
        return head + "".join(parts)
    return _kv_table(flatten(obj))


def _tokens(rel: str) -> set[str]:
    """Lower-case word tokens of a relative path (and its underscore-joined pairs)."""
    words = [w for w in re.split(r"[^a-z0-9]+", rel.lower()) if w]
    return set(words) | {f"{a}_{b}" for a, b in zip(words, words[1:])}


def classify(rel: str) -> str:
    """Report section key for a file path relative to the run root (e.g. 'metrics/sae/delta_L2.json')."""
    parts = Path(rel).parts
    tokens = _tokens("/".join(parts[1:]) if parts and parts[0] in ("metrics", "plots") else rel)
    for section, words in _RULES:
        if tokens & words:
            return section
    return "other"


@dataclass
class _Section:
    """What one report section will show."""

    blocks: list[str] = field(default_factory=list)


def _read_table(path: Path) -> pd.DataFrame:
    """Load a plot CSV, or a JSON array of records, as a DataFrame."""
    if path.suffix == ".csv":
        return pd.read_csv(path)
    data = json.loads(path.read_text())
    if isinstance(data, dict):  # DVC also accepts {"key": [records]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError("not a list of records")
    return pd.DataFrame([flatten(r) for r in data])


def _pick(cols: Sequence[str], candidates: Sequence[str]) -> str | None:
    """First candidate present among cols (case-insensitive), as spelled in cols."""
    lower = {c.lower(): c for c in cols}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _series_spec(stem: str, df: pd.DataFrame) -> tuple[str, list[str], str | None] | None:
    """(x, ys, group) to plot a table with, or None when it is not a recognisable series."""
    cols = [str(c) for c in df.columns]
    numeric = [c for c in cols if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    known = KNOWN_SERIES.get(stem.lower())
    x = _pick(cols, known[0] if known else _X_CANDIDATES)
    if x is None or x not in numeric or df[x].nunique() < 2:
        return None
    group = _pick(cols, (known[2] if known else ()) + _GROUP_CANDIDATES)
    if group is not None and (group in numeric or df[group].nunique() > _MAX_LINES):
        group = None
    if df.duplicated([x] + ([group] if group else [])).any():
        return None  # several rows per x value: a table, not a series
    band = re.compile(r"(_lo|_hi|_low|_high|_std|_se|_n)$|^(ci_|n$|seed$|head$|pid$)")
    if known:
        y0 = _pick(numeric, known[1])
        ys = [y0] if y0 else []
    else:
        ys = [c for c in numeric if c != x and not band.search(c.lower()) and c.lower() not in _X_CANDIDATES][:4]
    if not ys:
        return None
    return x, ys, group


def _plot_frame(
    df: pd.DataFrame, png_path: Path, x: str, ys: Sequence[str], group: str | None, title: str, logx: bool = False
) -> Path:
    """Draw one line per (group, y) against x into png_path with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    groups = [(None, df)] if group is None else list(df.groupby(group, sort=True))
    n_lines = 0
    for gname, part in groups:
        part = part.sort_values(x)
        for y in ys:
            if n_lines >= _MAX_LINES:
                break
            label = " / ".join(str(v) for v in (gname, y if len(ys) > 1 else None) if v is not None) or y
            ax.plot(part[x], part[y], marker="o", markersize=3, linewidth=1.4, label=label)
            lo, hi = _band_cols(list(df.columns), y) if len(ys) == 1 else (None, None)
            if lo and hi:
                ax.fill_between(part[x], part[lo], part[hi], alpha=0.18)
            n_lines += 1
    if logx:  # symmetric log keeps x = 0 (e.g. rank 0) on the axis
        ax.set_xscale("symlog", linthresh=1)
    elif pd.api.types.is_integer_dtype(df[x]):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(ys[0] if len(ys) == 1 else "value")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if n_lines > 1:
        ax.legend(fontsize=7, frameon=False, loc="best")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png", metadata={"Software": None})
    return png_path


def _band_cols(cols: list[str], y: str) -> tuple[str | None, str | None]:
    """Columns holding a confidence band for y ({y}_lo/{y}_hi or ci_lo/ci_hi), if present."""
    for lo, hi in ((f"{y}_lo", f"{y}_hi"), (f"{y}_low", f"{y}_high"), ("ci_lo", "ci_hi"), ("ci_low", "ci_high")):
        if lo in cols and hi in cols:
            return lo, hi
    return None, None


def plot_series(
    csv_path: Path,
    png_path: Path,
    x: str,
    y: str | Sequence[str],
    group: str | None = None,
    title: str | None = None,
    logx: bool = False,
) -> Path:
    """Plot column(s) y against x from a CSV (one line per group value) into a PNG; returns png_path."""
    csv_path, png_path = Path(csv_path), Path(png_path)
    if not csv_path.is_file():
        raise MechdiffError(f"plot data {csv_path} does not exist: run the stage that writes it first")
    try:
        df = pd.read_csv(csv_path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise MechdiffError(f"cannot read {csv_path} as CSV: {str(exc).splitlines()[0]}") from exc
    if df.empty:
        raise MechdiffError(f"{csv_path} has no rows to plot: check the stage that writes it")
    ys = [y] if isinstance(y, str) else list(y)
    if not ys:
        raise MechdiffError("plot_series needs at least one y column")
    for col in [x, *ys] + ([group] if group else []):
        if col not in df.columns:
            raise MechdiffError(f"{csv_path} has no column '{col}' (columns: {', '.join(map(str, df.columns))})")
    for col in [x, *ys]:
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise MechdiffError(f"column '{col}' of {csv_path} is not numeric: it cannot be plotted")
    return _plot_frame(df, png_path, x, ys, group, title or f"{', '.join(ys)} by {x}", logx)


def _md_inline(text: str) -> str:
    """Escape text and apply inline markdown: `code`, **bold**, *em*."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<!\*)\*([^*\s][^*]*)\*(?!\*)", r"<em>\1</em>", out)


def markdown_to_html(text: str) -> str:
    """Minimal markdown: headings, pipe tables, bullet lists, code fences and paragraphs (all escaped)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append("<p>" + _md_inline(" ".join(para)) + "</p>")
            para.clear()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            out.append("<pre>" + html.escape("\n".join(block)) + "</pre>")
        elif m := re.match(r"^(#{1,6})\s+(.*)$", stripped):
            flush()
            level = min(len(m.group(1)) + 3, 6)
            out.append(f"<h{level}>{_md_inline(m.group(2))}</h{level}>")
        elif (stripped.startswith("|") and i + 1 < len(lines)
              and re.match(r"^\|?\s*:?-{2,}", lines[i + 1].strip())):
            flush()
            head = cells(stripped)
            i += 2
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            thead = "<tr>" + "".join(f"<th>{_md_inline(c)}</th>" for c in head) + "</tr>"
            tbody = "".join("<tr>" + "".join(f"<td>{_md_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f'<div class="scroll"><table class="grid"><thead>{thead}</thead><tbody>{tbody}</tbody></table></div>')
            continue
        elif re.match(r"^[-*]\s+", stripped):
            flush()
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append("<li>" + _md_inline(re.sub(r"^\s*[-*]\s+", "", lines[i])) + "</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    return "\n".join(out)


def _html_fragment(text: str) -> str:
    """Body of an HTML file with scripts, external links and event handlers removed."""
    m = re.search(r"<body[^>]*>(.*)</body>", text, flags=re.S | re.I)
    body = m.group(1) if m else text
    body = re.sub(r"<script\b.*?</script>", "", body, flags=re.S | re.I)
    body = re.sub(r"<(link|meta|base|iframe)\b[^>]*>", "", body, flags=re.I)
    return re.sub(r"\son\w+\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s>]+)", "", body, flags=re.I)


def _copy(src: Path, root: Path, out_dir: Path, sub: str) -> str:
    """Copy a run file into out_dir/sub/<relative path>; return the link relative to out_dir."""
    rel = src.relative_to(root)
    dst = out_dir / sub / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return f"{sub}/{rel.as_posix()}"


def _file_head(rel: str, link: str, extra: str = "") -> str:
    """Heading line for one file: its path as a link to the copied file."""
    return (
        f'<h3 class="file"><a href="{html.escape(link)}">{html.escape(rel)}</a>'
        + (f' <span class="meta">{html.escape(extra)}</span>' if extra else "")
        + "</h3>"
    )


def _figure(link: str, caption: str) -> str:
    """An <img> figure with a caption."""
    return (
        f'<figure><img src="{html.escape(link)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _warn(text: str) -> str:
    """A visible warning box."""
    return f'<p class="warn">{html.escape(text)}</p>'


def _spec_text(spec: Any) -> str:
    """One-line description of a model spec (string or dict)."""
    if isinstance(spec, dict):
        return ", ".join(f"{k}={format_value(v) if not isinstance(v, dict) else json.dumps(v)}" for k, v in spec.items())
    return format_value(spec)


def _git_commit(root: Path) -> str | None:
    """Short git commit of root (with '+dirty' when the tree has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _pair_section(root: Path, out_dir: Path) -> list[str]:
    """Blocks for the pair and params section (params.yaml, dvc.lock, git commit)."""
    blocks: list[str] = []
    params_path = root / "params.yaml"
    glance: dict[str, Any] = {}
    params: Any = None
    if params_path.is_file():
        try:
            params = yaml.safe_load(params_path.read_text()) or {}
        except yaml.YAMLError as exc:
            blocks.append(_warn(f"params.yaml could not be parsed: {str(exc).splitlines()[0]}"))
    if isinstance(params, dict):
        pair = params.get("pair")
        if isinstance(pair, dict):
            for side in ("base", "tuned"):
                if side in pair:
                    glance[f"{side} model"] = _spec_text(pair[side])
            glance.update({f"pair.{k}": _spec_text(v) for k, v in pair.items() if k not in ("base", "tuned")})
        for key, value in params.items():
            if _is_scalar(value):
                glance[key] = value
        sae = params.get("sae")
        if isinstance(sae, dict):
            glance.update({f"sae.{k}": v for k, v in flatten(sae).items() if _is_scalar(v)})
    commit = _git_commit(root)
    if commit:
        glance["git commit"] = commit
    if glance:
        blocks.append(_kv_table(glance))
    if isinstance(params, dict) and params:
        link = _copy(params_path, root, out_dir, "files")
        blocks.append(
            f'<details><summary>All parameters (<a href="{html.escape(link)}">params.yaml</a>)</summary>'
            + _kv_table(flatten(params)) + "</details>"
        )
    lock_path = root / "dvc.lock"
    if lock_path.is_file():
        try:
            lock = yaml.safe_load(lock_path.read_text()) or {}
        except yaml.YAMLError:
            lock = {}
            blocks.append(_warn("dvc.lock could not be parsed"))
        stages = lock.get("stages", {}) if isinstance(lock, dict) else {}
        if stages:
            link = _copy(lock_path, root, out_dir, "files")
            rows = []
            for name, st in stages.items():
                outs = []
                for o in st.get("outs", []) or []:
                    md5 = str(o.get("md5", ""))[:8]
                    size = o.get("size")
                    nfiles = o.get("nfiles")
                    bits = [md5] + ([f"{size:,} B"] if isinstance(size, int) else [])
                    bits += [f"{nfiles} files"] if nfiles else []
                    outs.append(f"{html.escape(str(o.get('path')))} <span class=\"meta\">"
                                f"{html.escape(', '.join(b for b in bits if b))}</span>")
                rows.append(
                    f'<tr><th scope="row">{html.escape(str(name))}</th>'
                    f"<td><code>{html.escape(str(st.get('cmd', '')))}</code></td><td>{'<br>'.join(outs)}</td></tr>"
                )
            blocks.append(
                f'<details><summary>Pipeline stages as recorded in <a href="{html.escape(link)}">dvc.lock</a> '
                f"({len(stages)} stages)</summary>"
                '<div class="scroll"><table class="grid"><thead><tr><th>stage</th><th>command</th>'
                "<th>outputs (md5, size)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div></details>"
            )
    return blocks


_CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d232b;
 background:#fafbfc;margin:0}
main{max-width:1080px;margin:0 auto;padding:24px 28px 60px;background:#fff;box-shadow:0 0 0 1px #e3e7ec}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:20px;margin:36px 0 8px;padding-bottom:4px;border-bottom:2px solid #d9e1ea}
h3.file{font-size:14px;font-weight:600;margin:20px 0 6px;font-family:"DejaVu Sans Mono",Menlo,monospace}
h3.file a{color:#1a5fb4;text-decoration:none}
.lead{color:#505a66;margin:0 0 12px}
.explain{background:#f3f7fb;border-left:4px solid #6b9bd1;padding:8px 12px;margin:8px 0 14px;color:#2c3846}
nav ol{columns:2;margin:8px 0 0;padding-left:20px}
nav a{color:#1a5fb4}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13.5px}
th,td{padding:3px 10px;border-bottom:1px solid #e6eaef;text-align:left;vertical-align:top}
thead th{background:#eef2f6;font-weight:600}
tbody tr:nth-child(even){background:#fafbfd}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:"DejaVu Sans Mono",Menlo,monospace}
table.kv th{font-weight:500;color:#2b3440;min-width:220px}
.hint{color:#7a8592;font-size:12px;font-weight:400}
.meta{color:#7a8592;font-size:12px;font-weight:400}
.note{color:#7a8592;font-size:12.5px;margin:0 0 10px}
.sub{font-weight:600;margin:10px 0 2px;color:#2c3846}
.warn{background:#fff4e5;border-left:4px solid #e69a28;padding:6px 10px}
.scroll{overflow-x:auto;max-width:100%}
figure{margin:10px 0 18px;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #e3e7ec;border-radius:3px}
figcaption{font-size:12px;color:#6a7480;font-family:"DejaVu Sans Mono",Menlo,monospace}
details{margin:6px 0 12px}
summary{cursor:pointer;color:#2c3846;font-size:14px}
.fragment{border:1px solid #e3e7ec;border-radius:3px;padding:4px 12px;margin:6px 0 14px;overflow-x:auto}
code,pre{font-family:"DejaVu Sans Mono",Menlo,monospace;font-size:12.5px}
footer{margin-top:40px;color:#8a94a0;font-size:12px}
"""


def build_report(root: Path, out_dir: Path, *, title: str = "mechdiff report") -> Path:
    """Write out_dir/index.html (+ img/ and files/) describing the run in root; returns the page's path."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise MechdiffError(f"run folder {root} does not exist: pass the repository root that holds metrics/ and plots/")
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("img", "files"):
        if (out_dir / sub).is_dir():
            shutil.rmtree(out_dir / sub)
    sections: dict[str, _Section] = {key: _Section() for key, _, _ in SECTIONS}
    sections["pair"].blocks += _pair_section(root, out_dir)

    def walk(folder: str) -> list[Path]:
        base = root / folder
        if not base.is_dir():
            return []
        skip = out_dir.resolve()
        return sorted(p for p in base.rglob("*") if p.is_file() and skip not in p.resolve().parents)

    metric_files = walk("metrics")
    plot_files = walk("plots")
    images = {p for p in plot_files if p.suffix.lower() in IMAGE_EXTS}
    image_stems = {p.stem.lower() for p in images}
    n_items = 0

    for path in metric_files:
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() != ".json":
            continue
        link = _copy(path, root, out_dir, "files")
        try:
            obj = json.loads(path.read_text())
            body = _json_html(obj)
        except (ValueError, UnicodeDecodeError) as exc:
            body = _warn(f"could not parse {rel}: {str(exc).splitlines()[0]}")
        sections[classify(rel)].blocks.append(_file_head(rel, link) + body)
        n_items += 1

    for path in plot_files:
        rel = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".json", ".tsv"):
            continue
        link = _copy(path, root, out_dir, "files")
        block = ""
        try:
            df = pd.read_csv(path, sep="\t") if suffix == ".tsv" else _read_table(path)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            try:  # a JSON plot file that is not a list of records: show it like a metric
                body = _json_html(json.loads(path.read_text())) if suffix == ".json" else None
            except (ValueError, UnicodeDecodeError):
                body = None
            body = body if body is not None else _warn(f"could not read {rel}: {str(exc).splitlines()[0]}")
            sections[classify(rel)].blocks.append(_file_head(rel, link) + body)
            n_items += 1
            continue
        spec = _series_spec(path.stem, df) if not df.empty else None
        if spec is not None and path.stem.lower() not in image_stems:
            x, ys, group = spec
            png = out_dir / "img" / "generated" / Path(rel).with_suffix(".png")
            try:
                _plot_frame(df, png, x, ys, group, f"{path.stem}: {', '.join(ys)} by {x}")
                block += _figure(png.relative_to(out_dir).as_posix(), f"{rel} (drawn for this report)")
            except (ValueError, TypeError) as exc:
                block += _warn(f"could not plot {rel}: {exc}")
        records = [{str(k): _py(v) for k, v in r.items()} for r in df.head(MAX_ROWS).to_dict("records")]
        table = _records_table(records, note_total=len(df)) if records else '<p class="note">(no rows)</p>'
        block += (
            f"<details><summary>Table: {len(df)} rows x {len(df.columns)} columns</summary>{table}</details>"
        )
        sections[classify(rel)].blocks.append(_file_head(rel, link, f"{len(df)} rows") + block)
        n_items += 1

    for path in sorted(images):
        rel = path.relative_to(root).as_posix()
        link = _copy(path, root, out_dir, "img")
        sections[classify(rel)].blocks.append(_figure(link, rel))
        n_items += 1

    for path in metric_files + plot_files:
        if path.suffix.lower() not in FRAGMENT_EXTS:
            continue
        rel = path.relative_to(root).as_posix()
        link = _copy(path, root, out_dir, "files")
        text = path.read_text(errors="replace")
        body = markdown_to_html(text) if path.suffix.lower() == ".md" else _html_fragment(text)
        sections[classify(rel)].blocks.append(_file_head(rel, link) + f'<div class="fragment">{body}</div>')
        n_items += 1

    toc, parts = [], []
    for key, sec_title, explain in SECTIONS:
        blocks = sections[key].blocks
        if not blocks:
            continue
        toc.append(f'<li><a href="#{key}">{html.escape(sec_title)}</a></li>')
        parts.append(
            f'<section id="{key}"><h2>{html.escape(sec_title)}</h2><p class="explain">{html.escape(explain)}</p>'
            + "\n".join(blocks) + "</section>"
        )
    if n_items == 0:
        parts.append(_warn("No metrics or plots found yet under metrics/ and plots/: run `dvc repro` first."))
    from mechdiff import __version__

    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request (a 404 in the browser console otherwise)
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="lead">What fine-tuning changed inside the model, where, and in how many directions. '
        f"Run folder: <code>{html.escape(root.resolve().name)}</code>. Hover a number for its exact value.</p>"
        + (f"<nav><ol>{''.join(toc)}</ol></nav>" if toc else "")
        + "\n".join(parts)
        + f"<footer>Generated by mechdiff {html.escape(__version__)}.</footer></main></body></html>\n"
    )
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _py(value: Any) -> Any:
    """Convert numpy / pandas scalars to plain Python values for formatting."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return value
    return value
