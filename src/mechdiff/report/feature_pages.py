"""One static HTML page per reported SAE feature, an index of them, and token-by-token activation plots.

`feature_page_data` computes everything a page shows for one feature from arrays it is given (the feature's
activation on each token row of its source, which prompt each row belongs to, the token ids, the prompts, the
decoder direction, the unembedding, the feature's activations on the base and tuned stores and its gate
results); `render_feature_page` turns that into a self-contained HTML page (inline CSS, inline SVG and a
base64 PNG, no JavaScript, no external resources, every text escaped); `token_activation_png` draws the
token-by-token activation of the top prompts (matplotlib Agg); `index_page` lists the pages.

Definitions:

- a feature *fires* on a token row when its activation is > 0; token firing rate = share of a group's token
  rows where it fires, prompt firing rate = share of the group's prompts with at least one firing token.
- top contexts: the prompts ranked by their largest activation (ties: the earlier row first), at most
  `n_contexts` with a positive maximum; each shows the tokens within `window` of its peak, a token's
  background opacity = its activation / the feature's largest activation over all rows (clipped to [0, 1]).
- histogram: `numpy.histogram` of the positive activations in `bins` equal bins; zeros are counted apart.
- logit lens of the decoder direction d: logits = W_U (w * d), where w is the final norm's elementwise weight
  (the residual stream passes through the final RMSNorm / LayerNorm before the unembedding; the norm's
  per-token scalar scale and a LayerNorm's centring and bias are dropped, as in the usual logit lens of
  feature directions). Promoted tokens: the `n_logit_tokens` largest logits; suppressed: the smallest.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mechdiff.errors import NON_FINITE_ACTS, MechdiffError
from mechdiff.resume import UnitsFn, compute_all
from mechdiff.sae.sources import SparseCodes, encode_sparse

if TYPE_CHECKING:
    import pandas as pd

HIGHLIGHT = (255, 140, 0)  # RGB of the activation highlight; opacity carries the activation


@dataclass
class FeaturePage:
    """What one feature page shows (`feature_page_data`)."""

    source: str
    layer: int
    feature: int
    reasons: list[str]
    headline: dict[str, Any]
    contexts: list[dict]
    histogram: dict
    firing: list[dict]
    base_tuned: list[dict]
    promoted: list[dict]
    suppressed: list[dict]
    gates: dict[str, Any]
    max_activation: float
    token_png: bytes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The page's file stem, `<source>_L<layer>_f<feature>`."""
        return page_name(self.source, self.layer, self.feature)

    @property
    def title(self) -> str:
        return f"{self.source} SAE L{self.layer} feature {self.feature}"


def page_name(source: str, layer: int, feature: int) -> str:
    """File stem of a feature's page and plot: `<source>_L<layer>_f<feature>`."""
    return f"{source}_L{int(layer)}_f{int(feature)}"


def _vec(a: Any, name: str, *, n: int | None = None, dtype: Any = np.float64) -> np.ndarray:
    arr = np.asarray(a, dtype=dtype).reshape(-1) if np.ndim(a) <= 1 else np.asarray(a, dtype=dtype)
    if arr.ndim != 1:
        raise MechdiffError(f"{name} must be one value per token row, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise MechdiffError(f"{name} has {arr.shape[0]} entries, expected {n} (one per token row)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise MechdiffError(f"{name} contains NaN or inf: {NON_FINITE_ACTS}")
    return arr


def _prompt_index(row_prompt: Any, n_rows: int, n_prompts: int, name: str) -> np.ndarray:
    rp = _vec(row_prompt, name, n=n_rows, dtype=np.int64)
    if rp.size and (rp.min() < 0 or rp.max() >= n_prompts):
        raise MechdiffError(f"{name} must index the {n_prompts} prompts, got values {rp.min()}..{rp.max()}")
    return rp


def _region(p: Any) -> str:
    return str(getattr(p, "region", "") or "")


def firing_table(acts: np.ndarray, row_prompt: np.ndarray, prompts: Sequence[Any]) -> list[dict]:
    """Per dataset, and per dataset / region where prompts have a region: prompts, token rows, token and prompt
    firing rate (activation > 0) and mean activation; an `all` row first."""
    datasets = np.array([str(p.dataset) for p in prompts], dtype=object)
    regions = np.array([_region(p) for p in prompts], dtype=object)
    groups: list[tuple[str, np.ndarray]] = [("all", np.ones(len(prompts), dtype=bool))]
    for d in sorted(set(datasets.tolist())):
        groups.append((d, datasets == d))
        for r in sorted(set(regions[datasets == d].tolist()) - {""}):
            groups.append((f"{d} / {r}", (datasets == d) & (regions == r)))
    fires = acts > 0
    fired_prompts = np.zeros(len(prompts), dtype=bool)
    fired_prompts[row_prompt[fires]] = True
    has_rows = np.zeros(len(prompts), dtype=bool)
    has_rows[row_prompt] = True
    out = []
    for name, pm in groups:
        rows = pm[row_prompt]
        n_tok, n_pr = int(rows.sum()), int((pm & has_rows).sum())
        if n_tok == 0:
            continue
        out.append({"group": name, "prompts": n_pr, "tokens": n_tok,
                    "token_rate": float(fires[rows].mean()),
                    "prompt_rate": float((fired_prompts & pm & has_rows).sum() / n_pr),
                    "mean": float(acts[rows].mean())})
    return out


def base_tuned_table(base_acts: np.ndarray, base_prompt: np.ndarray, tuned_acts: np.ndarray,
                     tuned_prompt: np.ndarray, prompts: Sequence[Any]) -> list[dict]:
    """Per dataset (and `all`): the feature's mean activation and token firing rate on the base store's and on
    the tuned store's rows of the same prompts, and the tuned - base difference of the means."""
    datasets = np.array([str(p.dataset) for p in prompts], dtype=object)
    out = []
    for name in ["all", *sorted(set(datasets.tolist()))]:
        pm = np.ones(len(prompts), dtype=bool) if name == "all" else datasets == name
        b, t = base_acts[pm[base_prompt]], tuned_acts[pm[tuned_prompt]]
        if b.size == 0 and t.size == 0:
            continue
        mb = float(b.mean()) if b.size else float("nan")
        mt = float(t.mean()) if t.size else float("nan")
        out.append({"dataset": name, "mean_base": mb, "mean_tuned": mt, "tuned_minus_base": mt - mb,
                    "rate_base": float((b > 0).mean()) if b.size else float("nan"),
                    "rate_tuned": float((t > 0).mean()) if t.size else float("nan")})
    return out


def logit_lens(direction: Any, unembedding: Any, norm_weight: Any | None, decode: Callable[[int], str], *,
               n: int) -> tuple[list[dict], list[dict]]:
    """Tokens a decoder direction promotes and suppresses: the largest and smallest of W_U (w * d) (module doc)."""
    d = np.asarray(direction, dtype=np.float64).reshape(-1)
    W = np.asarray(unembedding)
    if W.ndim != 2 or W.shape[1] != d.size:
        raise MechdiffError(f"unembedding must be (vocab, {d.size}) for a direction of width {d.size}, got {W.shape}")
    if norm_weight is not None:
        w = np.asarray(norm_weight, dtype=np.float64).reshape(-1)
        if w.size != d.size:
            raise MechdiffError(f"final norm weight has {w.size} entries, expected {d.size}")
        d = d * w
    logits = W.astype(np.float64, copy=False) @ d
    if not np.isfinite(logits).all():
        raise MechdiffError("the logit lens of the decoder direction is not finite: check the unembedding")
    order = np.argsort(-logits, kind="stable")
    k = min(n, logits.size)

    def rows(ids: np.ndarray) -> list[dict]:
        return [{"id": int(i), "token": str(decode(int(i))), "logit": float(logits[i])} for i in ids]

    return rows(order[:k]), rows(np.argsort(logits, kind="stable")[:k])


def top_contexts(acts: np.ndarray, row_prompt: np.ndarray, token_ids: np.ndarray, decode: Callable[[int], str],
                 prompts: Sequence[Any], *, n: int, window: int, scale: float) -> list[dict]:
    """The `n` prompts with the largest peak activation (> 0), each with the tokens within `window` of its peak
    (module doc). Rows of one prompt must be contiguous and in order."""
    if acts.size == 0:
        return []
    order = np.argsort(-acts, kind="stable")
    seen: set[int] = set()
    out: list[dict] = []
    for row in order:
        if len(out) >= n or acts[row] <= 0:
            break
        pi = int(row_prompt[row])
        if pi in seen:
            continue
        seen.add(pi)
        lo = row
        while lo > 0 and row_prompt[lo - 1] == pi and row - lo < window:
            lo -= 1
        hi = row
        while hi + 1 < acts.size and row_prompt[hi + 1] == pi and hi - row < window:
            hi += 1
        p = prompts[pi]
        toks = [{"row": int(r), "token": str(decode(int(token_ids[r]))), "act": float(acts[r]),
                 "alpha": float(np.clip(acts[r] / scale, 0.0, 1.0)) if scale > 0 else 0.0, "peak": bool(r == row)}
                for r in range(lo, hi + 1)]
        out.append({"rank": len(out) + 1, "prompt": pi, "pid": getattr(p, "pid", pi), "text": str(p.text),
                    "dataset": str(p.dataset), "region": _region(p), "max_act": float(acts[row]),
                    "peak_row": int(row), "tokens": toks,
                    "cut_left": bool(lo > 0 and row_prompt[lo - 1] == pi),
                    "cut_right": bool(hi + 1 < acts.size and row_prompt[hi + 1] == pi)})
    return out


def feature_page_data(*, source: str, layer: int, feature: int, acts: Any, row_prompt: Any, token_ids: Any,
                      decode: Callable[[int], str], prompts: Sequence[Any], direction: Any, unembedding: Any,
                      norm_weight: Any | None = None, decode_unembedding: Callable[[int], str] | None = None,
                      base_acts: Any | None = None, base_row_prompt: Any | None = None,
                      tuned_acts: Any | None = None, tuned_row_prompt: Any | None = None,
                      gates: Mapping[str, Any] | None = None, reasons: Sequence[str] = (),
                      headline: Mapping[str, Any] | None = None, n_contexts: int = 8, n_logit_tokens: int = 10,
                      bins: int = 20, window: int = 24) -> FeaturePage:
    """Everything one feature's page shows.

    acts (n_rows,): the feature's activation on each token row of its SAE's source; row_prompt (n_rows,): the
    index into `prompts` of each row (a prompt's rows contiguous and in order); token_ids (n_rows,): each row's
    token id, `decode` maps one to its text. prompts: objects with text, dataset (pid and region optional).
    direction (d,): the decoder direction; unembedding (V, d) and norm_weight (d,) or None: the model whose
    logits the direction is read through, `decode_unembedding` its token decoder (default `decode`).
    base_acts / tuned_acts with their row_prompt: the feature (same SAE) on the base and tuned stores' rows.
    gates: the feature's gate results, shown as key / value. reasons and headline: why it was reported and its
    numbers from that (the page adds its largest activation and token firing rate).
    """
    if n_contexts < 1 or n_logit_tokens < 1 or bins < 1 or window < 0:
        raise MechdiffError(f"feature page: n_contexts ({n_contexts}), n_logit_tokens ({n_logit_tokens}) and bins "
                            f"({bins}) must be >= 1 and window ({window}) >= 0")
    if not prompts:
        raise MechdiffError("feature page: no prompts")
    a = _vec(acts, "acts")
    rp = _prompt_index(row_prompt, a.size, len(prompts), "row_prompt")
    ids = _vec(token_ids, "token_ids", n=a.size, dtype=np.int64)
    if a.size == 0:
        raise MechdiffError(f"feature page of {page_name(source, layer, feature)}: no token rows")
    top = float(a.max())
    pos = a[a > 0]
    counts, edges = np.histogram(pos, bins=bins) if pos.size else (np.zeros(bins, dtype=np.int64),
                                                                     np.linspace(0.0, 1.0, bins + 1))
    hist = {"edges": edges.tolist(), "counts": counts.astype(int).tolist(), "n_zero": int((a <= 0).sum()),
            "n_rows": int(a.size)}
    promoted, suppressed = logit_lens(direction, unembedding, norm_weight, decode_unembedding or decode,
                                      n=n_logit_tokens)
    bt: list[dict] = []
    notes: list[str] = []
    if base_acts is not None and tuned_acts is not None:
        ba, ta = _vec(base_acts, "base_acts"), _vec(tuned_acts, "tuned_acts")
        if base_row_prompt is None or tuned_row_prompt is None:
            raise MechdiffError("feature page: base_acts and tuned_acts need base_row_prompt and tuned_row_prompt")
        bp = _prompt_index(base_row_prompt, ba.size, len(prompts), "base_row_prompt")
        tp = _prompt_index(tuned_row_prompt, ta.size, len(prompts), "tuned_row_prompt")
        bt = base_tuned_table(ba, bp, ta, tp, prompts)
    else:
        notes.append("No base-vs-tuned activations were given.")
    head = {"max activation": top, "token firing rate": float((a > 0).mean()), **dict(headline or {})}
    return FeaturePage(source=str(source), layer=int(layer), feature=int(feature), reasons=list(reasons),
                       headline=head, contexts=top_contexts(a, rp, ids, decode, prompts, n=n_contexts,
                                                            window=window, scale=top),
                       histogram=hist, firing=firing_table(a, rp, prompts), base_tuned=bt, promoted=promoted,
                       suppressed=suppressed, gates=dict(gates or {}), max_activation=top, notes=notes)


# --------------------------------------------------------------------------------------------------- the figure


def _tick(tok: str) -> str:
    """A token as a matplotlib tick label: visible whitespace, no mathtext."""
    return tok.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$") or "''"


def token_activation_png(contexts: Sequence[Mapping], path: str | Path | None = None, *, title: str = "",
                         max_prompts: int = 4) -> bytes:
    """Token-by-token activation bars of one feature on its top prompts (`FeaturePage.contexts`), one panel per
    prompt, the peak token's bar darker; returns the PNG bytes (and writes them to `path` when given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ctx = list(contexts)[:max_prompts]
    if not ctx:
        raise MechdiffError("token_activation_png: no contexts (the feature never fires on these prompts)")
    fig = Figure(figsize=(9.0, 1.9 * len(ctx) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    ymax = max(max(t["act"] for t in c["tokens"]) for c in ctx) or 1.0
    for i, c in enumerate(ctx):
        ax = fig.add_subplot(len(ctx), 1, i + 1)
        acts = [t["act"] for t in c["tokens"]]
        colours = ["#b35900" if t["peak"] else "#ff8c00" for t in c["tokens"]]
        ax.bar(range(len(acts)), acts, color=colours, width=0.8)
        ax.set_xticks(range(len(acts)))
        ax.set_xticklabels([_tick(t["token"]) for t in c["tokens"]], rotation=70, fontsize=7, ha="right")
        ax.set_xlim(-0.6, len(acts) - 0.4)
        ax.set_ylim(0, ymax * 1.05)
        ax.set_ylabel("act", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        label = f"#{c['rank']} prompt {c['pid']} ({c['dataset']}{' / ' + c['region'] if c['region'] else ''}), " \
                f"max {c['max_act']:.3g}"
        ax.set_title(_tick(label), fontsize=8, loc="left")
    if title:
        fig.suptitle(_tick(title), fontsize=10)
    with warnings.catch_warnings():  # glyphs DejaVu lacks (e.g. Devanagari) draw as boxes
        warnings.simplefilter("ignore")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    png = buf.getvalue()
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(png)
    return png


# --------------------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fff}
main{max-width:1100px;margin:0 auto;padding:1.2rem 1.5rem 3rem}
h1{font-size:1.45rem;margin:.4rem 0 .6rem}h2{font-size:1.15rem;margin:1.8rem 0 .5rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f6f6}
.reason{display:inline-block;background:#eef3ff;border:1px solid #c8d6ff;border-radius:3px;padding:0 .4rem;
margin-right:.3rem;font-size:.85rem}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85rem;line-height:1.9;white-space:pre-wrap;
word-break:break-word}
.tok{border-radius:2px}.tok.peak{outline:2px solid #b35900}
.note{color:#666;font-size:.85rem}.cols{display:flex;gap:2rem;flex-wrap:wrap}
img.plot{max-width:100%;border:1px solid #eee}svg{display:block}
a{color:#0645ad}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v).lower()
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        v = float(v)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.3e}" if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3) else f"{v:.4g}"
    return str(v)


def _td(v: Any) -> str:
    if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool):
        return f'<td class="num" title="{_e(repr(v))}">{_e(_fmt(v))}</td>'
    return f"<td>{_e(_fmt(v))}</td>"


def _table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str] | None = None) -> str:
    if not rows:
        return '<p class="note">No rows.</p>'
    cols = list(cols or rows[0].keys())
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_td(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(values: Mapping[str, Any]) -> str:
    if not values:
        return '<p class="note">None.</p>'
    rows = "".join(f'<tr><th scope="row">{_e(k)}</th>{_td(v)}</tr>' for k, v in values.items())
    return f"<table><tbody>{rows}</tbody></table>"


def _shown(tok: str) -> str:
    """A token's text for the page: newlines and tabs made visible, escaped."""
    return _e(tok.replace("\n", "\u23ce").replace("\t", "\u21e5"))


def _context_html(c: Mapping) -> str:
    r, g, b = HIGHLIGHT
    spans = []
    for t in c["tokens"]:
        cls = "tok peak" if t["peak"] else "tok"
        style = f' style="background:rgba({r},{g},{b},{t["alpha"]:.3f})"' if t["act"] > 0 else ""
        spans.append(f'<span class="{cls}" data-act="{t["act"]!r}" title="{_e(_fmt(t["act"]))}"{style}>'
                     f'{_shown(t["token"])}</span>')
    dots = ("\u2026" if c["cut_left"] else "", "\u2026" if c["cut_right"] else "")
    where = _e(c["dataset"] + (f" / {c['region']}" if c["region"] else ""))
    return (f'<tr><td class="num">{c["rank"]}</td><td class="num" title="{_e(repr(c["max_act"]))}">'
            f'{_e(_fmt(c["max_act"]))}</td><td>{_e(c["pid"])}<br><span class="note">{where}</span></td>'
            f'<td><div class="ctx">{dots[0]}{"".join(spans)}{dots[1]}</div>'
            f'<details><summary class="note">prompt</summary><div class="ctx">{_e(c["text"])}</div></details></td></tr>')


def histogram_svg(hist: Mapping, *, width: int = 420, height: int = 180) -> str:
    """Inline SVG bars of `FeaturePage.histogram` (positive activations), axis ends labelled."""
    counts, edges = list(hist["counts"]), list(hist["edges"])
    top = max(counts) if counts and max(counts) > 0 else 1
    pad_l, pad_b, pad_t = 40, 22, 8
    w, h = width - pad_l - 8, height - pad_b - pad_t
    bw = w / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{pad_l + i * bw:.1f}" y="{pad_t + h - h * c / top:.1f}" width="{max(bw - 1, 0.5):.1f}" '
        f'height="{h * c / top:.1f}" fill="#ff8c00"><title>{_e(_fmt(edges[i]))} to {_e(_fmt(edges[i + 1]))}: '
        f"{c}</title></rect>" for i, c in enumerate(counts))
    axis = (f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#555"/>'
            f'<text x="{pad_l}" y="{height - 6}" font-size="10">{_e(_fmt(edges[0]))}</text>'
            f'<text x="{pad_l + w}" y="{height - 6}" font-size="10" text-anchor="end">{_e(_fmt(edges[-1]))}</text>'
            f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="10" text-anchor="end">{top}</text>'
            f'<text x="{pad_l - 4}" y="{pad_t + h}" font-size="10" text-anchor="end">0</text>')
    return (f'<svg width="{width}" height="{height}" role="img" '
            f'aria-label="activation histogram">{bars}{axis}</svg>')


def _doc(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'  # no favicon request (a 404 in the browser console otherwise)
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def render_feature_page(data: FeaturePage, *, index_href: str = "index.html") -> str:
    """A feature's page as one self-contained static HTML document."""
    d = data
    reasons = "".join(f'<span class="reason">{_e(r)}</span>' for r in d.reasons)
    parts = [f'<p><a href="{_e(index_href)}">All reported features</a></p>', f"<h1>{_e(d.title)}</h1>",
             f"<p>{reasons}</p>", _kv(d.headline)]
    parts += [f'<p class="note">{_e(n)}</p>' for n in d.notes]
    parts.append("<h2>Top-activating contexts</h2>")
    if d.contexts:
        parts.append('<p class="note">Token background opacity = activation / the largest activation of the '
                     "feature; the peak token is outlined. Hover a token for its activation.</p>")
        rows = "".join(_context_html(c) for c in d.contexts)
        parts.append(f"<table><thead><tr><th>#</th><th>max act</th><th>prompt</th><th>context</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    else:
        parts.append('<p class="note">The feature never fires on these prompts.</p>')
    if d.token_png:
        src = "data:image/png;base64," + base64.b64encode(d.token_png).decode("ascii")
        parts.append(f'<h2>Token-by-token activation</h2><img class="plot" src="{src}" '
                     f'alt="token-by-token activation of {_e(d.title)}">')
    h = d.histogram
    parts.append("<h2>Activation histogram</h2>"
                 f'<p class="note">Positive activations of {h["n_rows"] - h["n_zero"]} of {h["n_rows"]} token rows '
                 f'({h["n_zero"]} rows at 0 not drawn).</p>' + histogram_svg(h))
    parts.append("<h2>Firing rate per dataset and region</h2>" + _table(d.firing))
    parts.append("<h2>Base vs tuned activation</h2>"
                 '<p class="note">The same SAE on the base and on the tuned model\'s rows of the same prompts.</p>'
                 + _table(d.base_tuned))
    lens = ('<p class="note">Logit lens of the decoder direction: W_U (w * d), w the final norm\'s weight.</p>'
            '<div class="cols"><div><h3>Promoted</h3>' + _table(d.promoted, ("token", "id", "logit"))
            + "</div><div><h3>Suppressed</h3>" + _table(d.suppressed, ("token", "id", "logit")) + "</div></div>")
    parts.append("<h2>Tokens the decoder direction promotes and suppresses</h2>" + lens)
    parts.append("<h2>Gate results</h2>" + (_kv(d.gates) if d.gates else
                                              '<p class="note">The feature did not enter the gates.</p>'))
    return _doc(d.title, "".join(parts))


def index_page(entries: Sequence[Mapping[str, Any]], *, title: str = "Reported features",
               note: str = "") -> str:
    """The list of feature pages: entries with href, source, layer, feature, reasons (list) and headline (dict)."""
    rows = []
    for en in entries:
        reasons = "".join(f'<span class="reason">{_e(r)}</span>' for r in en.get("reasons", ()))
        head = "; ".join(f"{k} {_fmt(v)}" for k, v in dict(en.get("headline", {})).items())
        label = f"{en['source']} L{en['layer']} f{en['feature']}"
        rows.append(f'<tr><td><a href="{_e(en["href"])}">{_e(label)}</a></td><td>{reasons}</td>'
                    f"<td>{_e(head)}</td></tr>")
    body = [f"<h1>{_e(title)}</h1>"]
    if note:
        body.append(f'<p class="note">{_e(note)}</p>')
    if rows:
        body.append("<table><thead><tr><th>feature</th><th>reported as</th><th>headline</th></tr></thead>"
                    f"<tbody>{''.join(rows)}</tbody></table>")
    else:
        body.append('<p class="note">No features were reported in this run.</p>')
    return _doc(title, "".join(body))


# --------------------------------------------------------------------------------------------------- what gets a page

PAGE_SOURCES = ("base", "tuned", "delta")  # a crosscoder's features read two stores at once: no token pages
GATE_KEYS = ("source", "layer", "feature")
PASSED_ALL = ("causal", "consistent", "side_ok")  # gates_features.csv columns a survivor of every gate has true
PickKey = tuple[str, int, int]  # (source, layer, feature)


@dataclass
class Pick:
    """Why one feature is reported: its reasons, their numbers (headline) and its gate results."""

    reasons: list[str] = field(default_factory=list)
    headline: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)


@dataclass
class PageSettings:
    """Sizes of the reported set and of each page (params `feature_pages.*`)."""

    n_top: int = 3
    max_gated: int = 20
    n_contexts: int = 8
    n_logit_tokens: int = 12
    hist_bins: int = 30
    plot_prompts: int = 4


def view_note(view: str) -> str:
    """Why there are no feature pages for an SAE view ('' for 'tokens', the one view they need)."""
    if view == "tokens":
        return ""
    return f"Feature pages need token-level activations (sae.view tokens); this run's SAEs read sae.view {view}."


def _plain(v: Any) -> Any:
    """A table cell as a plain Python value (None for NaN)."""
    import pandas as pd

    if pd.isna(v):
        return None
    return v.item() if hasattr(v, "item") else v


def top_cultural(means: np.ndarray, is_cultural: np.ndarray, n_top: int) -> list[tuple[int, float]]:
    """The `n_top` features with the largest cultural - control difference of per-prompt mean activations
    (means (n_prompts, width) of the tuned SAE; ranked by `cultural_features`, as the features stage ranks them),
    each with its difference of the float means, largest first."""
    from mechdiff.analysis.features import FeatureSettings, cultural_features

    A = np.asarray(means)
    is_c = np.asarray(is_cultural, dtype=bool)
    # the top list is the order of the observed difference: the permutations do not change it
    _, top, _ = cultural_features({"tuned": A}, is_c, FeatureSettings(n_top_cultural=n_top, n_perm=1))
    diff = A[is_c].mean(0) - A[~is_c].mean(0)
    return [(int(f), float(diff[f])) for f in top]


def pick_features(*, sources: Sequence[str], layers: Sequence[int],
                  cultural: Mapping[int, list[tuple[int, float]]] | None = None,
                  graded: pd.DataFrame | None = None, gates: pd.DataFrame | None = None, max_gated: int = 20, gates_table: str = "gates_features.csv",
                  warn: Callable[[str], None] = print) -> dict[PickKey, Pick]:
    """The reported features, {(source, layer, feature): Pick}; a feature reported for several reasons is picked
    once with the union of its reasons (in the order: top cultural, top graded, gated).

    cultural: per layer the tuned SAE's `top_cultural` features ("top cultural"); graded: a DataFrame with columns
    source, layer, trait, best_feature, score, r, one row per best graded feature ("top graded <trait>"); gates:
    a DataFrame with columns source, layer, feature and any others (the gate results, shown as they are), its
    first `max_gated` rows ("passed the gates" when its causal, consistent and side_ok columns are all
    true, else "measured by the gates"); its layer column may be left out when there is one layer. Rows whose source
    is not in `sources` or layer not in `layers` get no pick (a gated one with a warning)."""
    picks: dict[PickKey, Pick] = {}
    shown_layers, layers = layers, [int(x) for x in layers]

    def pick(key: PickKey) -> Pick:
        return picks.setdefault(key, Pick())

    if "tuned" in sources:
        for layer, top in (cultural or {}).items():
            if int(layer) not in layers:
                continue
            for f, diff in top:
                pk = pick(("tuned", int(layer), int(f)))
                pk.reasons.append("top cultural")
                pk.headline["cultural - control mean"] = float(diff)
    if graded is not None and not graded.empty:
        for r in graded.to_dict("records"):
            if int(r["layer"]) in layers and r["source"] in sources:
                pk = pick((r["source"], int(r["layer"]), int(r["best_feature"])))
                pk.reasons.append(f"top graded {r['trait']}")
                pk.headline[f"graded {r['trait']} score"] = float(r["score"])
                pk.headline[f"graded {r['trait']} r"] = float(r["r"])
    if gates is not None and not gates.empty:
        if "layer" not in gates.columns and len(layers) == 1:  # SAEs exist at one layer only: the gates' layer
            gates = gates.copy()
            gates.insert(1, "layer", layers[0])
        missing = [c for c in GATE_KEYS if c not in gates.columns]
        if missing:
            raise MechdiffError(f"{gates_table} has no column {missing[0]!r}: rerun the gates stage")
        for r in gates.head(max_gated).to_dict("records"):
            key = (str(r["source"]), int(r["layer"]), int(r["feature"]))
            if key[0] not in sources or key[1] not in layers:
                warn(f"feature_pages: warning: gated feature {page_name(*key)} has no SAE here "
                     f"(sae.sources {sources}, sae.layers {shown_layers}): no page")
                continue
            pk = pick(key)
            passed = all(str(r.get(c)) == "True" for c in PASSED_ALL)  # the survivors of every gate
            pk.reasons.append("passed the gates" if passed else "measured by the gates")
            pk.gates = {k: _plain(v) for k, v in r.items() if k not in GATE_KEYS}
    return picks


def page_order(picks: Mapping[PickKey, Any]) -> list[PickKey]:
    """The pages' order: by layer, then source (base, tuned, delta), then feature."""
    return sorted(picks, key=lambda k: (k[1], PAGE_SOURCES.index(k[0]), k[2]))


# --------------------------------------------------------------------------------------------------- encodings


def prompt_means(codes: SparseCodes, row_prompt: np.ndarray, prompt_rows: np.ndarray, *,
                 chunk_prompts: int = 256) -> np.ndarray:
    """Per-prompt mean activations (len(prompt_rows), width) over each prompt's encoded rows, as
    `prompt_feature_means` computes them (same chunks of prompts, same sums); row_prompt: each encoded row's prompt
    index, the rows of a prompt contiguous and in prompt order."""
    rp = np.asarray(row_prompt, dtype=np.int64)
    out = []
    for s in range(0, len(prompt_rows), chunk_prompts):
        pr = np.asarray(prompt_rows[s : s + chunk_prompts], dtype=np.int64)
        at = np.flatnonzero(np.isin(rp, pr))
        out.append(codes.run_means(rp[at], len(pr), rows=at))
    return np.concatenate(out)


def row_prompt_index(tok_prompt: np.ndarray, prompt_pids: np.ndarray) -> np.ndarray:
    """Index into the prompts (their ids `prompt_pids`) of each token row, given the rows' prompt ids."""
    pids = np.asarray(prompt_pids)
    order = np.argsort(pids)
    pos = np.searchsorted(pids, np.asarray(tok_prompt), sorter=order)
    return order[np.minimum(pos, len(order) - 1)]


# --------------------------------------------------------------------------------------------------- the pages


@dataclass
class FeaturePages:
    """What the feature_pages stage writes: {name: page HTML}, {name: token plot PNG}, the index entries."""

    pages: dict[str, str] = field(default_factory=dict)
    pngs: dict[str, bytes] = field(default_factory=dict)
    entries: list[dict] = field(default_factory=list)
    note: str = ""

    def index(self) -> str:
        """The index page."""
        return index_page(self.entries, note=self.note)


def build_feature_pages(*, base: Any, tuned: Any, saes: Mapping[tuple[str, int], Any], prompts: Sequence[Any],
                        sources: Sequence[str], layers: Sequence[int], graded: pd.DataFrame | None = None,
                        gates: pd.DataFrame | None = None,
                        lens: Callable[[str], tuple[Any, Any | None]],
                        decoders: Mapping[str, Callable[[int], str]], settings: PageSettings,
                        gates_table: str = "gates_features.csv", warn: Callable[[str], None] = print,
                        progress: bool = True, units: UnitsFn = compute_all) -> FeaturePages:
    """Every reported feature's page and token plot (site L<layer>.resid_post, view tokens).

    base / tuned: the activation stores, holding `prompts` (objects with pid, text, dataset, region) in order;
    saes: {(source, layer): SAE} for every source in `sources` (base, tuned, delta; others get no pages) and layer;
    graded / gates: the tables `pick_features` reads; lens(model) -> (unembedding, final norm weight) of 'base' or
    'tuned' (called when a page needs it); decoders: {'base' | 'tuned': token id -> text}.

    Each (SAE, rows) pair is encoded once: the SAE of each picked source on the base and the tuned store's token
    rows, the delta SAE also on tuned - base; the tuned SAE's encoding of the tuned store also gives the cultural
    ranking (`top_cultural` of the cultural and control prompts' means). `units` (`resume.Units`) keeps each
    layer's cultural ranking and each SAE's finished pages, so an interrupted run redoes only the rest.
    """
    from tqdm import tqdm

    from mechdiff.analysis.features import decoder_dirs
    from mechdiff.sae.sources import read_source, rows_of, source_rows

    sources = [s for s in sources if s in PAGE_SOURCES]
    pids = np.array([q.pid for q in prompts])
    if not np.array_equal(base.index("prompt_id"), pids) or not np.array_equal(tuned.index("prompt_id"), pids):
        raise MechdiffError("the activation stores do not hold the kept prompts in order: rerun the extract stages")
    datasets = np.array([q.dataset for q in prompts])
    cc = np.flatnonzero(np.isin(datasets, ["cultural", "control"]))
    every = np.arange(len(prompts))
    stores = {"base": base, "tuned": tuned}
    rows = {w: source_rows(st, "tokens", every) for w, st in stores.items()}
    rprompt = {w: row_prompt_index(st.index("tok_prompt")[rows[w]], pids) for w, st in stores.items()}
    X: dict = {}
    codes: dict[tuple[str, int, str], SparseCodes] = {}

    def read(layer: int, w: str) -> np.ndarray:
        """A store's token rows at the layer, read once per layer."""
        if X.get("layer") != layer:
            X.clear()
            X["layer"] = layer
        if w not in X:
            site = f"L{layer}.resid_post"
            if w == "delta":  # tuned - base on the base store's rows (rows_of checks that they pair)
                own_rows = rows_of("delta", base, tuned, "tokens", every)
                X[w] = read(layer, "tuned") - read(layer, "base") if np.array_equal(rows["base"], rows["tuned"]) \
                    else read_source("delta", base, tuned, site, "tokens", own_rows)
            else:
                X[w] = stores[w].read(site, "tokens", rows[w])
        return X[w]

    def encoded(src: str, layer: int, w: str) -> SparseCodes:
        """The SAE (src, layer) on rows w (base, tuned or delta), encoded once."""
        if (src, layer, w) not in codes:
            codes[src, layer, w] = encode_sparse(saes[src, layer], read(layer, w))
        return codes[src, layer, w]

    cultural: dict[int, list[tuple[int, float]]] = {}
    is_c = datasets[cc] == "cultural"
    if "tuned" in sources and is_c.any() and (~is_c).any():
        for layer in layers:
            cultural[layer] = units(f"cultural/L{layer}", lambda layer=layer: top_cultural(
                prompt_means(encoded("tuned", layer, "tuned"), rprompt["tuned"], cc), is_c, settings.n_top))
    picks = pick_features(sources=sources, layers=layers, cultural=cultural, graded=graded, gates=gates,
                          max_gated=settings.max_gated, gates_table=gates_table, warn=warn)
    by_sae: dict[tuple[str, int], list[int]] = {}
    for key in page_order(picks):
        by_sae.setdefault(key[:2], []).append(key[2])
    def sae_pages(src: str, layer: int, feats: list[int]) -> list[tuple[str, bytes | None, str, dict]]:
        """(name, token plot or None, page, index entry) of each picked feature of the SAE (src, layer)."""
        sae, fi = saes[src, layer], np.array(feats)
        Z = {w: encoded(src, layer, w).columns(fi) for w in stores}
        own_store = "tuned" if src == "tuned" else "base"
        if src == "delta":
            own_rows = rows_of("delta", base, tuned, "tokens", every)
            Z_own = encoded(src, layer, "delta").columns(fi)
        else:
            own_rows, Z_own = rows[own_store], Z[own_store]
        own_prompt = row_prompt_index(stores[own_store].index("tok_prompt")[own_rows], pids)
        own_ids = stores[own_store].index("tok_id")[own_rows]
        lens_model = "base" if src == "base" else "tuned"  # a delta direction acts on the tuned model
        W_U, norm_w = lens(lens_model)
        dirs = decoder_dirs(sae)
        done = []
        for j, f in enumerate(feats):
            pk = picks[src, layer, f]
            data = feature_page_data(
                source=src, layer=layer, feature=f, acts=Z_own[:, j], row_prompt=own_prompt, token_ids=own_ids,
                decode=decoders[own_store], prompts=prompts, direction=dirs[f], unembedding=W_U, norm_weight=norm_w,
                decode_unembedding=decoders[lens_model], base_acts=Z["base"][:, j], base_row_prompt=rprompt["base"],
                tuned_acts=Z["tuned"][:, j], tuned_row_prompt=rprompt["tuned"], gates=pk.gates,
                reasons=pk.reasons, headline=pk.headline, n_contexts=settings.n_contexts,
                n_logit_tokens=settings.n_logit_tokens, bins=settings.hist_bins)
            if data.contexts:
                data.token_png = token_activation_png(data.contexts, title=data.title,
                                                      max_prompts=settings.plot_prompts)
            done.append((data.name, data.token_png, render_feature_page(data),
                         {"href": f"{data.name}.html", "source": src, "layer": layer, "feature": f,
                          "reasons": data.reasons, "headline": data.headline}))
            bar.update(1)
        for w in ("base", "tuned", "delta"):  # this SAE's encodings are done with
            codes.pop((src, layer, w), None)
        return done

    out = FeaturePages()
    bar = tqdm(total=len(picks), desc="feature_pages", unit="feature", disable=not progress)
    for (src, layer), feats in by_sae.items():
        before = bar.n
        for name, png, page, entry in units(f"pages/{src}/L{layer}", lambda src=src, layer=layer, feats=feats:
                                            sae_pages(src, layer, feats)):
            if png is not None:
                out.pngs[name] = png
            out.pages[name] = page
            out.entries.append(entry)
        bar.update(len(feats) - (bar.n - before))  # a resumed SAE's pages count too
    bar.close()
    return out
