"""HTML report: every metric value and figure is on the page, and a real headless browser renders it cleanly."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from mechdiff import MechdiffError
from mechdiff.report.html import build_report, classify, markdown_to_html, plot_series
from tests.browser import browse

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "_output"
def _png(path: Path, seed: int) -> None:
    """A small matplotlib figure saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(4, 3), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.arange(8), rng.normal(size=8).cumsum(), marker="o")
    ax.set_title(path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _leaves(obj: object) -> list[object]:
    """Every scalar leaf of a JSON object."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _leaves(v)]
    return [obj]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake run folder: params.yaml, dvc.lock, metric JSONs, plot CSVs, PNGs and a markdown table."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("run")
    params = {
        "seed": 3,
        "rank": 8,
        "pair": {"base": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                 "tuned": {"recipe": "edit", "layer": 2, "site": "resid_post", "rank": 4}},
        "sae": {"k": 16, "expansion": 4, "lr": 0.0003},
        "transport": {"solver": "procrustes_scaled", "shrink": 0.05},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    lock = {"schema": "2.0", "stages": {
        "extract@base": {"cmd": "python stages/extract.py base",
                         "outs": [{"path": "artifacts/acts/base.zarr", "md5": "0123456789abcdef.dir",
                                   "size": 123456, "nfiles": 12}]},
        "report": {"cmd": "python stages/report.py", "outs": [{"path": "report", "md5": "fedcba98.dir"}]},
    }}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))

    def r() -> float:
        return float(rng.uniform(0, 1))

    metrics = {
        "divergence.json": {
            "cka": {f"L{i}.resid_post": {"cka": r(), "ci_lo": r(), "ci_hi": r()} for i in range(4)},
            "kl_cultural": r(), "kl_control": r(), "n_prompts": 48,
        },
        "transport/L2.resid_post.json": {"r2_val": r(), "r2_train": r(), "r2_shuffled": -r(), "alpha": 1 + r()},
        "patch.json": {"kl_drop_pct": 100 * r(), "min_k": 4, "kl_raw": r(), "kl_mapped": r()},
        "sae/delta_L2.json": {"fvu": r(), "l0": 16.0, "dead_pct": 100 * r(), "ce_recovered": r()},
        "features.json": {"types": {"A": 3, "B": 5, "C": 2},
                          "enrichment": {"cultural": {"E": 1 + r(), "p_bh": r() / 100},
                                         "control": {"E": r(), "p_bh": r()}}},
        "graded.json": {"n_kept": 2, "best": {"feature": 17, "pearson_r": r(), "tpr": r(), "fpr": r() / 5}},
        "misc.json": {"nested": {"deep": {"value": r()}}, "flag": True, "note": "ok", "bad": float("nan")},
    }
    for rel, obj in metrics.items():
        path = root / "metrics" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1))
    plots = root / "plots"
    plots.mkdir()
    rows = [{"layer": layer, "site": site, "cka": r()} for site in ("resid_post", "mlp_out") for layer in range(4)]
    (plots / "cka.csv").write_text("layer,site,cka\n" + "".join(f"{d['layer']},{d['site']},{d['cka']}\n" for d in rows))
    (plots / "rank_k.csv").write_text("k,kl_drop_pct\n" + "".join(f"{k},{100 * r()}\n" for k in (1, 2, 4, 8)))
    _png(plots / "rank_k.png", 1)
    _png(plots / "sae" / "fvu_by_layer.png", 2)
    (plots / "heads.csv").write_text(
        "layer,head,z_base,z_tuned\n" + "".join(f"{i // 8},{i % 8},{rng.normal()},{rng.normal()}\n" for i in range(120))
    )
    (plots / "top_examples_f17.md").write_text(
        "## Feature 17\n\n| rank | text | act |\n|---|---|---|\n| 1 | the <b>festival</b> of lights | 3.2 |\n"
        "| 2 | lamps in every street | 2.9 |\n"
    )
    (metrics_html := root / "metrics" / "themes.html").write_text(
        "<html><body><table><tr><td>theme-food</td></tr></table><script>alert(1)</script></body></html>"
    )
    assert metrics_html.exists()
    return root


@pytest.fixture(scope="module")
def report(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report built from run_dir."""
    return build_report(run_dir, tmp_path_factory.mktemp("report") / "out", title="test report")


def test_every_metric_value_is_on_the_page(run_dir: Path, report: Path) -> None:
    """Each metric leaf appears (exact value in a title attribute for numbers, text otherwise)."""
    page = report.read_text()
    for path in sorted((run_dir / "metrics").rglob("*.json")):
        for leaf in _leaves(json.loads(path.read_text())):
            if isinstance(leaf, bool):
                assert ("true" if leaf else "false") in page
            elif isinstance(leaf, float) and leaf != leaf:
                assert ">NaN<" in page
            elif isinstance(leaf, int | float):
                assert f'title="{leaf!r}"' in page, (path.name, leaf)
            else:
                assert html.escape(str(leaf)) in page
    for key in ("kl_cultural", "r2_shuffled", "ce_recovered", "nested.deep.value", "enrichment"):
        assert key in page


def test_params_pair_and_lock(report: Path) -> None:
    """The pair spec, top-level knobs, SAE params and the dvc.lock stages are shown."""
    page = report.read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in page
    assert "recipe=edit" in page and "layer=2" in page
    for key in ("sae.k", "sae.expansion", "transport.solver", "procrustes_scaled"):
        assert key in page
    assert "extract@base" in page and "python stages/extract.py base" in page and "01234567" in page


def test_images_tables_and_links(run_dir: Path, report: Path) -> None:
    """Every PNG is copied and embedded, known series get a drawn figure, long tables are truncated."""
    out = report.parent
    page = report.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    for png in (run_dir / "plots").rglob("*.png"):
        rel = png.relative_to(run_dir).as_posix()
        assert f"img/{rel}" in srcs
        assert (out / "img" / rel).read_bytes() == png.read_bytes()
    # cka.csv has no PNG: one is drawn; rank_k.csv has one: none is drawn
    assert "img/generated/plots/cka.png" in srcs
    assert not (out / "img/generated/plots/rank_k.png").exists()
    import matplotlib.image as mpimg

    drawn = mpimg.imread(out / "img/generated/plots/cka.png")
    assert drawn.shape[0] > 100 and drawn.shape[1] > 100 and drawn[..., :3].std() > 0.01
    for src in srcs:
        assert (out / src).is_file() and not src.startswith(("http:", "https:", "/"))
    for href in re.findall(r'href="(?!data:)([^"#]+)"', page):
        assert (out / html.unescape(href)).is_file(), href
    # heads.csv: 120 rows, 50 shown with a note
    heads = page[page.index("plots/heads.csv"):]
    heads = heads[: heads.index("</details>")]
    assert heads.count("<tr>") == 51 and "first 50 of 120 rows" in heads
    # markdown and HTML fragments embedded, escaped, without scripts
    assert "<th>text</th>" in page and "the &lt;b&gt;festival&lt;/b&gt; of lights" in page
    assert "theme-food" in page and "<script" not in page and "alert(1)" not in page


def test_sections_in_order(report: Path) -> None:
    """Sections come in the documented order, each with its reading guide."""
    page = report.read_text()
    titles = re.findall(r"<h2>([^<]+)</h2>", page)
    assert titles == [
        "Pair &amp; params", "Divergence", "Transport &amp; rank-k", "SAE quality", "Features &amp; enrichment",
        "Graded concepts", "Head attribution", "Other",
    ]
    div = page[page.index('id="divergence"'):page.index('id="transport"')]
    assert "metrics/divergence.json" in div and "plots/cka.csv" in div and "Linear CKA" in div
    sae = page[page.index('id="sae"'):page.index('id="features"')]
    assert "metrics/sae/delta_L2.json" in sae and "img/plots/sae/fvu_by_layer.png" in sae


@pytest.mark.parametrize(
    ("rel", "section"),
    [
        ("metrics/divergence.json", "divergence"),
        ("plots/cka.csv", "divergence"),
        ("plots/layer_patch.csv", "divergence"),
        ("metrics/transport/L12.resid_post.json", "transport"),
        ("plots/rank_k.csv", "transport"),
        ("metrics/sae/delta_L2.json", "sae"),
        ("metrics/features.json", "features"),
        ("plots/top_examples_f3.md", "features"),
        ("metrics/graded.json", "graded"),
        ("metrics/steer.json", "steer"),
        ("plots/heads.csv", "heads"),
        ("metrics/geometry.json", "geometry"),
        ("metrics/fairness.json", "pair"),
        ("plots/finetune_loss.csv", "pair"),
        ("plots/alpha.csv", "transport"),
        ("metrics/bench.json", "other"),
    ],
)
def test_classify(rel: str, section: str) -> None:
    """Files land in the section of their family."""
    assert classify(rel) == section


def test_empty_and_missing_run(tmp_path: Path) -> None:
    """An empty run folder gives a page saying so; a missing one a one-line error."""
    (tmp_path / "run").mkdir()
    page = build_report(tmp_path / "run", tmp_path / "out").read_text()
    assert "run `dvc repro` first" in page and "<h2>" not in page
    with pytest.raises(MechdiffError, match="does not exist"):
        build_report(tmp_path / "nope", tmp_path / "out2")


def test_plot_series(tmp_path: Path) -> None:
    """plot_series writes a PNG of the requested size and rejects missing or non-numeric columns."""
    import matplotlib.image as mpimg

    csv = tmp_path / "s.csv"
    csv.write_text("k,drop,drop_lo,drop_hi,site\n1,10,8,12,a\n2,30,25,35,a\n1,5,4,6,b\n2,9,8,10,b\n")
    png = plot_series(csv, tmp_path / "s.png", "k", "drop", group="site", title="t")
    img = mpimg.imread(png)
    assert img.shape[:2] == (396, 704)
    with pytest.raises(MechdiffError, match="no column 'nope'"):
        plot_series(csv, tmp_path / "x.png", "k", "nope")
    with pytest.raises(MechdiffError, match="not numeric"):
        plot_series(csv, tmp_path / "x.png", "k", "site")
    with pytest.raises(MechdiffError, match="does not exist"):
        plot_series(tmp_path / "none.csv", tmp_path / "x.png", "k", "drop")


def test_markdown_to_html_escapes() -> None:
    """Markdown tables become HTML tables; raw HTML in markdown is escaped."""
    out = markdown_to_html("# T\n\n| a | b |\n|---|---|\n| 1 | <script>x</script> |\n\n- item `c`\n")
    assert "<th>a</th><th>b</th>" in out and "<td>1</td>" in out
    assert "&lt;script&gt;" in out and "<script>" not in out
    assert "<li>item <code>c</code></li>" in out


def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """Chromium loads the page over HTTP with no console errors, failed requests or broken images."""
    shot = tmp_path / "report.png"
    page = browse(report, shot)
    assert page["title"] == "test report"
    html_srcs = re.findall(r'<img src="([^"]+)"', report.read_text())
    assert [im[0] for im in page["images"]] == html_srcs and len(page["images"]) == 3
    broken = [im for im in page["images"] if not (im[1] and im[2] > 0)]
    assert not broken, broken
    assert page["headings"][0] == "Pair & params" and "Divergence" in page["headings"]
    assert not page["errors"], page["errors"]
    assert shot.stat().st_size > 10_000
    OUTPUT_DIR.mkdir(exist_ok=True)
    shutil.copy(shot, OUTPUT_DIR / "report.png")
