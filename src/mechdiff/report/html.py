"""Self-contained HTML report of a run: a one-minute summary, then each stage's figures and folded tables.

`build_report(roots, out_dir, info)` renders exactly the entries of `mechdiff.report.registry.STAGES` from the
run's metrics and plots folders (`roots`), with the pair, settings and code version passed in as values
(`RunInfo`). It writes `out_dir/index.html`, the figures (`out_dir/img/`) and copies of the files it shows
(`out_dir/files/`), so the folder can be moved or served as is. No external resources and no JavaScript.
"""

from __future__ import annotations

import html
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from markdown_it import MarkdownIt

from mechdiff.errors import MechdiffError
from mechdiff.io import to_jsonable
from mechdiff.report.plots import plot_frame
from mechdiff.report.registry import STAGES, Figure, StageReport, Table
from mechdiff.report.run import Ref, Run, RunInfo

MAX_ROWS = 50  # rows shown of a long table (the whole file is linked)
MAX_GRID_COLS = 8  # a grid wider than this and than it is tall is shown transposed
_ROW = ' scope="row"'


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


def _e(text: Any) -> str:
    return html.escape(str(text))


def _cell(value: Any) -> str:
    """A <td> with the readable value, the exact value in its title, numbers right-aligned."""
    text = _e(format_value(value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num" title="{_e(repr(value))}">{text}</td>'
    if isinstance(value, list | tuple) and 0 < len(value) <= 20 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        # e.g. [value, lo, hi]: each number keeps its exact value in its own title
        items = ", ".join(f'<span title="{_e(repr(v))}">{_e(format_value(v))}</span>' for v in value)
        return f'<td class="num">[{items}]</td>'
    return f"<td>{text}</td>"


def _head(key: str, hints: dict[str, str], tag: str = "th", attrs: str = "") -> str:
    """A header cell with the entry's reading hint for exactly this key, if any."""
    hint = hints.get(key)
    extra = f'<br><span class="hint">{_e(hint)}</span>' if hint else ""
    return f"<{tag}{attrs}>{_e(key)}{extra}</{tag}>"


def _kv_table(values: dict[str, Any], hints: dict[str, str]) -> str:
    """Two-column table key -> value."""
    rows = "".join(f"<tr>{_head(k, hints, attrs=_ROW)}{_cell(v)}</tr>" for k, v in values.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _grid_table(records: dict[str, dict[str, Any]], hints: dict[str, str]) -> str:
    """Rows x columns table of {row: {column: value}}, transposed when much wider than tall."""
    cols: list[str] = []
    for rec in records.values():
        cols += [c for c in rec if c not in cols]
    rows = list(records)
    if len(cols) > max(MAX_GRID_COLS, len(rows)):
        records = {c: {r: records[r].get(c) for r in rows} for c in cols}
        rows, cols = cols, rows
    head = "<tr><th></th>" + "".join(_head(c, hints) for c in cols) + "</tr>"
    body = "".join(
        f"<tr>{_head(r, hints, attrs=_ROW)}"
        + "".join(_cell(records[r][c]) if c in records[r] else "<td></td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f'<div class="scroll"><table class="grid"><thead>{head}</thead><tbody>{body}</tbody></table></div>'


def _json_html(obj: Any, hints: dict[str, str]) -> str:
    """A metrics JSON as tables: its scalars as key -> value, flat records as one grid, deeper levels recursively."""
    if not isinstance(obj, dict):
        return _kv_table({"value": obj}, hints)
    scalars = {k: v for k, v in obj.items() if not isinstance(v, dict)}
    records = {k: v for k, v in obj.items() if isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values())}
    parts = [_kv_table(scalars, hints)] if scalars else []
    if records:
        parts.append(_grid_table(records, hints))
    for key, value in obj.items():
        if isinstance(value, dict) and key not in records:
            parts.append(f'<p class="sub">{_e(key)}</p>' + _json_html(value, hints))
    return "".join(parts)


def _records_table(df: pd.DataFrame, hints: dict[str, str]) -> str:
    """A DataFrame as a table of its first MAX_ROWS rows."""
    if df.empty:
        return '<p class="note">No rows in this run.</p>'
    records = to_jsonable(df.head(MAX_ROWS).to_dict("records"))
    head = "<tr>" + "".join(_head(str(c), hints) for c in df.columns) + "</tr>"
    body = "".join("<tr>" + "".join(_cell(r.get(str(c))) for c in df.columns) + "</tr>" for r in records)
    note = f'<p class="note">The first {MAX_ROWS} of {len(df)} rows; the whole file is linked above.</p>' \
        if len(df) > MAX_ROWS else ""
    return f'<div class="scroll"><table class="grid"><thead>{head}</thead><tbody>{body}</tbody></table></div>{note}'


def markdown_to_html(text: str) -> str:
    """Markdown (CommonMark + tables, raw HTML escaped) as HTML, headings moved below the report's own (h4+)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for tok in tokens:
        if tok.type in ("heading_open", "heading_close"):
            tok.tag = f"h{min(int(tok.tag[1]) + 3, 6)}"
    return md.renderer.render(tokens, md.options, {})


class _Page:
    """Output folder bookkeeping: copies of the shown files and figure images."""

    def __init__(self, run: Run, out_dir: Path) -> None:
        self.run, self.out = run, out_dir

    def copy(self, src: Path, sub: str) -> str:
        """Copy a run file into out/sub/<its path>; return the link relative to out."""
        rel = Path(sub) / self.run.relative(src)
        dst = self.out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return rel.as_posix()

    def links(self, ref: Ref) -> str:
        """Links to the copied files of ref."""
        return ", ".join(f'<a href="{_e(self.copy(p, "files"))}">{_e(self.run.relative(p))}</a>'
                         for p in self.run.files(ref))

    def figure(self, fig: Figure) -> str:
        """A figure block: the stage's image or one drawn from its table, caption, data link and folded data."""
        run = self.run
        df = run.table(fig.data, stem_column=fig.group or "file")
        label = run.label(fig.data)
        if df is None:
            body = f'<p class="note">{_e(label)} was not produced in this run.</p>'
        elif df.empty:
            body = f'<p class="note">{_e(label)} has no rows in this run.</p>'
        else:
            missing = [c for c in (fig.x, *fig.y, *([fig.group] if fig.group else []), *(fig.band or ()))
                       if c not in df.columns]
            if missing:
                raise MechdiffError(f"figure {fig.key!r}: {label} has no column {missing[0]!r}: update its entry "
                                    "in mechdiff/report/registry.py or the stage that writes it")
            images = run.files(fig.image) if fig.image is not None else []
            if fig.image is not None and not images:
                body = f'<p class="note">{_e(run.label(fig.image))} was not produced in this run.</p>'
            else:
                if images:
                    src = self.copy(images[0], "img")
                else:
                    png = plot_frame(df, self.out / "img" / "report" / f"{fig.key}.png", fig.x, fig.y,
                                     group=fig.group, title=fig.title, logx=fig.logx, kind=fig.kind, band=fig.band)
                    src = png.relative_to(self.out).as_posix()
                body = f'<img src="{_e(src)}" alt="{_e(fig.title)}">'
        data = "" if df is None else (
            f"<details><summary>Data: {self.links(fig.data)}"
            + (f" ({len(df)} rows)" if not df.empty else "") + f"</summary>{_records_table(df, {})}</details>"
        )
        return (f'<figure id="{_e(fig.key)}"><figcaption><strong>{_e(fig.title)}.</strong> {_e(fig.caption)}'
                f"</figcaption>{body}{data}</figure>")

    def table(self, tab: Table) -> str:
        """A folded table block (JSON, CSV, markdown or a folder's files)."""
        run = self.run
        files = run.files(tab.path)
        if not files:
            body = f'<p class="note">{_e(run.label(tab.path))} was not produced in this run.</p>'
        elif tab.kind == "json":
            body = _json_html(to_jsonable(run.json(tab.path)), tab.columns)
        elif tab.kind == "csv":
            body = _records_table(run.table(tab.path), tab.columns)
        elif tab.kind == "markdown":
            body = f'<div class="fragment">{markdown_to_html(run.text(tab.path))}</div>'
        elif tab.kind == "images":
            body = "".join(f'<figure><img src="{_e(self.copy(p, "img"))}" alt="{_e(p.stem)}">'
                           f"<figcaption>{_e(p.stem)}</figcaption></figure>" for p in files if p.suffix == ".png")
        else:
            body = f"<p>{len(files)} files.</p>"
        where = self.links(tab.path) if files else _e(run.label(tab.path))
        return (f'<details id="{_e(tab.key)}"><summary><strong>{_e(tab.title)}</strong> '
                f'<span class="meta">{where}</span></summary><p class="explain">{_e(tab.caption)}</p>{body}</details>')

    def summary(self, stages: tuple[StageReport, ...]) -> str:
        """The summary table: one row per summary item with facts, each number linked to its figure or table."""
        rows = []
        for st in stages:
            for item in st.summary:
                facts = item.facts(self.run)
                if not facts:
                    continue
                lines = "".join(
                    f'<li>{_e(f.label)}: <a class="fact" href="#{_e(item.anchor)}">{_e(f.value)}</a>'
                    + (f' <span class="meta">{_e(f.note)}</span>' if f.note else "") + "</li>"
                    for f in facts
                )
                rows.append(f'<tr><th scope="row">{_e(item.label)}</th><td><ul>{lines}</ul></td></tr>')
        if not rows:
            return '<p class="warn">No results yet under the metrics and plots folders: run `dvc repro` first.</p>'
        return f'<table class="summary"><tbody>{"".join(rows)}</tbody></table>'


def describe_pair(pair: dict[str, Any]) -> tuple[str, str]:
    """(base, tuned) one-line descriptions of the pair params (ids, or the recipe that made the tuned model)."""
    base = pair.get("base") or {}
    tuned = pair.get("tuned") or {}
    base_text = str(base.get("id") or "-") + (f" ({base['gguf_file']})" if base.get("gguf_file") else "")
    if tuned.get("id"):
        tuned_text = str(tuned["id"])
    elif tuned.get("recipe") == "edit":
        e = pair.get("edit") or {}
        tuned_text = (f"the base with a planted edit at L{e.get('layer')}.{e.get('site')} "
                      f"(rank {e.get('rank')}, scale {e.get('scale')})")
    elif tuned.get("recipe"):
        ft = pair.get("finetune") or {}
        tuned_text = f"the base fine-tuned on {ft.get('dataset')} ({ft.get('steps')} steps, lr {ft.get('lr')})"
    else:
        tuned_text = "-"
    return base_text, tuned_text


_CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d232b;
 background:#fafbfc;margin:0}
main{max-width:1080px;margin:0 auto;padding:24px 28px 60px;background:#fff;box-shadow:0 0 0 1px #e3e7ec}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:20px;margin:36px 0 8px;padding-bottom:4px;border-bottom:2px solid #d9e1ea}
.lead{color:#505a66;margin:0 0 12px}
.explain{background:#f3f7fb;border-left:4px solid #6b9bd1;padding:6px 12px;margin:8px 0 12px;color:#2c3846}
nav{font-size:14px;color:#505a66}
nav a{color:#1a5fb4;margin-right:12px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13.5px}
th,td{padding:3px 10px;border-bottom:1px solid #e6eaef;text-align:left;vertical-align:top}
thead th{background:#eef2f6;font-weight:600}
tbody tr:nth-child(even){background:#fafbfd}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:"DejaVu Sans Mono",Menlo,monospace}
table.kv th{font-weight:500;color:#2b3440;min-width:220px}
table.summary{width:100%;font-size:14.5px}
table.summary th{width:240px;font-weight:600;color:#2b3440}
table.summary tbody tr:nth-child(even){background:none}
table.summary ul{margin:0;padding-left:18px}
a.fact{font-weight:700;color:#1a5fb4;text-decoration:none;font-variant-numeric:tabular-nums}
.hint,.meta{color:#7a8592;font-size:12px;font-weight:400}
.meta a{color:#1a5fb4}
.note{color:#7a8592;font-size:12.5px;margin:4px 0 10px}
.sub{font-weight:600;margin:10px 0 2px;color:#2c3846}
.warn{background:#fff4e5;border-left:4px solid #e69a28;padding:6px 10px}
.scroll{overflow-x:auto;max-width:100%}
figure{margin:14px 0 22px;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #e3e7ec;border-radius:3px;display:block;margin-top:6px}
figcaption{font-size:13.5px;color:#2c3846}
details{margin:6px 0 10px}
summary{cursor:pointer;color:#2c3846;font-size:14px}
.fragment{border:1px solid #e3e7ec;border-radius:3px;padding:4px 12px;margin:6px 0 14px;overflow-x:auto}
code,pre{font-family:"DejaVu Sans Mono",Menlo,monospace;font-size:12.5px}
footer{margin-top:40px;color:#8a94a0;font-size:12px}
"""


def build_report(roots: dict[str, Path], out_dir: Path, info: RunInfo | None = None, *,
                 title: str = "mechdiff report", stages: tuple[StageReport, ...] = STAGES) -> Path:
    """Write out_dir/index.html (+ img/, files/) for the run under roots {'metrics', 'plots'}; return the page path."""
    run = Run(roots, info)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("img", "files"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    page = _Page(run, out_dir)
    sections, toc = [], []
    for st in stages:
        if not any(run.files(ref) for ref in st.refs):
            continue
        anchor = f"stage-{st.stage}"
        toc.append(f'<a href="#{anchor}">{_e(st.title)}</a>')
        sections.append(
            f'<section id="{anchor}"><h2>{_e(st.title)}</h2><p class="explain">{_e(st.about)}</p>'
            + "".join(page.figure(f) for f in st.figures) + "".join(page.table(t) for t in st.tables) + "</section>"
        )
    info = run.info
    base, tuned = describe_pair(info.pair)
    settings = " · ".join(f"{k} = {format_value(v)}" for k, v in info.settings.items())
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request (a 404 in the browser console otherwise)
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1>"
        f'<p class="lead">What tuning changed inside the model, where, and in how many directions.<br>'
        f"Base: <code>{_e(base)}</code> · tuned: <code>{_e(tuned)}</code>"
        + (f"<br>{_e(settings)}" if settings else "") + "</p>"
        f'<section id="summary"><h2>Summary</h2>{page.summary(stages)}'
        '<p class="note">Each number links to the figure or table it comes from; hover a table number for its '
        "exact value.</p></section>"
        + (f"<nav>Stages: {''.join(toc)}</nav>" if toc else "")
        + "\n".join(sections)
        + f"<footer>Generated by mechdiff {_e(info.version or '-')}.</footer></main></body></html>\n"
    )
    index = out_dir / "index.html"
    index.write_text(doc, encoding="utf-8")
    return index
