"""The HTML report on the repository's committed run: summary first, each declared figure once, every metric shown.

These fast tests read the real metrics/ and plots/ the pipeline wrote (real metric and column names); the
tiny pipeline's report is checked end to end in tests/pipeline/test_e2e.py.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from mechdiff import MechdiffError
from mechdiff.report import summary as S
from mechdiff.report.html import build_report, markdown_to_html
from mechdiff.report.plots import plot_series
from mechdiff.report.registry import STAGES, Figure, StageReport
from mechdiff.report.run import Run, RunInfo, metric, plot
from tests.browser import browse

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_DIR = ROOT / "tests" / "_output"
INFO = RunInfo(pair={"base": {"id": "org/base-model"}, "tuned": {"id": None, "recipe": "edit"},
                     "edit": {"layer": 2, "site": "attn_out", "rank": 2, "scale": 3.0}},
               settings={"seed": 3, "rank": 8, "patch.target_drop": 50.0}, version="9.9.9")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the committed run's metrics/ and plots/, with params.yaml and dvc.lock next to them."""
    root = tmp_path_factory.mktemp("run")
    for d in ("metrics", "plots"):
        shutil.copytree(ROOT / d, root / d)
    for f in ("params.yaml", "dvc.lock"):
        shutil.copy(ROOT / f, root / f)
    return root


def _roots(root: Path) -> dict[str, Path]:
    return {"metrics": root / "metrics", "plots": root / "plots"}


@pytest.fixture(scope="module")
def report(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of run_dir, recording every file opened under run_dir while it is built."""
    opened: list[str] = []
    recording = [True]

    def hook(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], str | Path) and str(args[0]).startswith(str(run_dir)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)
    try:
        out = build_report(_roots(run_dir), tmp_path_factory.mktemp("report") / "out", INFO, title="test report")
    finally:
        recording[0] = False
    (out.parent / "opened.json").write_text(json.dumps(opened))
    return out


def _figures_with_rows(run: Run) -> list[Figure]:
    return [f for st in STAGES for f in st.figures
            if (df := run.table(f.data, stem_column=f.group or "file")) is not None and not df.empty]


def _gallery(run: Run) -> list[Path]:
    """The PNGs the image-gallery tables show (one <img> each)."""
    return [p for st in STAGES for t in st.tables if t.kind == "images" for p in run.files(t.path) if p.suffix == ".png"]


def _leaves(obj: object) -> list[object]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _leaves(v)]
    return [obj]


def test_reads_only_metrics_and_plots(run_dir: Path, report: Path) -> None:
    """Nothing outside the declared metrics/ and plots/ folders is opened (no params.yaml, no dvc.lock)."""
    opened = json.loads((report.parent / "opened.json").read_text())
    assert opened, "the audit hook saw no reads"
    outside = [p for p in opened if not p.startswith((str(run_dir / "metrics"), str(run_dir / "plots")))]
    assert not outside, outside
    assert str(run_dir / "metrics" / "patch.json") in opened


def test_summary_first_and_linked(report: Path) -> None:
    """The summary is the first section; every summary number links to an id on the page."""
    page = report.read_text()
    assert re.findall(r"<h2>([^<]+)</h2>", page)[0] == "Summary"
    summary = page[page.index('id="summary"'):page.index("<nav>")]
    links = re.findall(r'<a class="fact" href="#([^"]+)">', summary)
    assert len(links) >= 8
    ids = set(re.findall(r' id="([^"]+)"', page))
    assert set(links) <= ids
    assert "org/base-model" in page and "planted edit at L2.attn_out" in page and "9.9.9" in page


def test_summary_numbers_match_metrics(run_dir: Path) -> None:
    """Summary facts restate the metric files (read here with json, independently of the report)."""
    run = Run(_roots(run_dir), INFO)
    patch = json.loads((run_dir / "metrics/patch.json").read_text())
    facts = {f.label: f.value for f in S.directions(run)}
    assert facts == {s: f"k = {m['min_k']}" if m["min_k"] >= 0 else "not reached"
                     for s, m in patch.items() if isinstance(m, dict)}
    sae = json.loads((run_dir / "metrics/sae.json").read_text())
    assert {f.label: f.value for f in S.sae_fit(run)} == {k: f"FVU {m['fvu']:.3f}" for k, m in sae.items()}
    maps = {p.stem: json.loads(p.read_text()) for p in (run_dir / "metrics/transport").glob("*.json")}
    assert {f.label: f.value for f in S.map_fit(run)} == {k: f"R² {m['r2_val']:.3f}" for k, m in maps.items()}


def test_geometry_fact_states_the_orthogonality_verdict(tmp_path: Path) -> None:
    """The geometry fact says whether the verdict holds and how many plain-mean angles lie within 80-100 deg (read
    from a geometry.json written here); a metrics file from before the verdict existed reads as before."""
    shutil.copytree(ROOT / "metrics", tmp_path / "metrics")
    path = tmp_path / "metrics" / "geometry.json"
    m = json.loads(path.read_text())
    m["base"]["orthogonality"] = {"estimator": True, "mean_estimator": False, "random_parents_breaks": True,
                                  "separates": True, "holds": False}
    m["base"]["controls"]["mean_estimator"]["share_80_100"] = 1 / 3
    path.write_text(json.dumps(m))
    fact = S.geometry(Run({"metrics": tmp_path / "metrics", "plots": ROOT / "plots"}))[0]
    assert fact.note.startswith("orthogonality does not hold (plain means 33% within 80-100 deg); ")
    del m["base"]["orthogonality"]
    path.write_text(json.dumps(m))
    fact = S.geometry(Run({"metrics": tmp_path / "metrics", "plots": ROOT / "plots"}))[0]
    assert fact.note.startswith(f"{m['base']['share_80_100']:.0%} within 80-100 deg")


def test_each_declared_figure_once(run_dir: Path, report: Path) -> None:
    """One <img> per registered figure with data, none other; the layer-patch figure is drawn from its real columns."""
    page = report.read_text()
    figures = _figures_with_rows(Run(_roots(run_dir)))
    srcs = re.findall(r'<img src="([^"]+)"', page)
    gallery = _gallery(Run(_roots(run_dir)))
    assert len(srcs) == len(set(srcs)) == len(figures) + len(gallery)
    for p in gallery:  # each gallery image is a copy of its plot file
        assert f"img/plots/{p.parent.name}/{p.name}" in srcs, p
    for fig in figures:
        block = page[page.index(f'<figure id="{fig.key}">'):]
        assert "<img " in block[:block.index("</figure>")], fig.key
    import matplotlib.image as mpimg

    drawn = mpimg.imread(report.parent / "img/report/layer-patch.png")
    assert drawn.shape[0] > 100 and drawn[..., :3].std() > 0.01


def test_every_metric_value_is_on_the_page(run_dir: Path, report: Path) -> None:
    """Each metric leaf appears, numbers with their exact value in a title attribute."""
    page = report.read_text()
    for path in sorted((run_dir / "metrics").rglob("*.json")):
        for leaf in _leaves(json.loads(path.read_text())):
            if isinstance(leaf, bool):
                assert ("true" if leaf else "false") in page
            elif leaf is None:
                assert "<td>-</td>" in page  # null renders as a dash cell
            elif isinstance(leaf, int | float):
                assert f'title="{leaf!r}"' in page, (path.name, leaf)
            else:
                assert html.escape(str(leaf)) in page


def test_hints_only_where_they_belong(report: Path) -> None:
    """The SAE 'l0' hint is in the SAE table only, never beside the layer-patch rows named L0."""
    page = report.read_text()
    hint = "mean active latents per token"
    sae = page[page.index('<details id="sae-metrics">'):]
    sae = sae[:sae.index("</details>")]
    assert page.count(hint) == sae.count(hint) == 1
    div = page[page.index('<details id="divergence">'):]
    div = div[:div.index("</details>")]
    assert '<th scope="row">L0</th>' in div and "latents" not in div


def test_markdown_tables_escaped(report: Path) -> None:
    """The features' markdown renders as HTML tables below the page's headings, raw HTML escaped."""
    page = report.read_text()
    themes = page[page.index('<details id="themes">'):]
    assert "<table>" in themes[:themes.index("</details>")] and "<h4>" in themes
    out = markdown_to_html("# T\n\n| a | b |\n|---|---|\n| 1 | <script>x</script> |\n\n- item `c`\n")
    assert "<h4>T</h4>" in out and "<th>a</th>" in out and "<td>1</td>" in out
    assert "&lt;script&gt;" in out and "<script>" not in out
    assert "<li>item <code>c</code></li>" in out


def test_summary_planted_answers(run_dir: Path, tmp_path: Path) -> None:
    """On metric files edited to a known answer, the summary finds where the change starts and what is not reached."""
    for d in ("metrics", "plots"):
        shutil.copytree(run_dir / d, tmp_path / d)
    path = tmp_path / "metrics/divergence.json"
    div = json.loads(path.read_text())
    target = sorted(div["cka"])[len(div["cka"]) // 2]
    div["cka"] = {s: {"last": 0.5 if s == target else 1.0 - 1e-6, "mean": 1.0} for s in div["cka"]}
    layers = sorted(div["layer_patch"]["base_into_tuned"], key=lambda k: int(k[1:]))
    div["layer_patch"]["base_into_tuned"] = {k: 0.0 if i < 3 else 0.1 * i for i, k in enumerate(layers)}
    path.write_text(json.dumps(div))
    patch = json.loads((tmp_path / "metrics/patch.json").read_text())
    site = next(k for k, v in patch.items() if isinstance(v, dict))
    patch[site]["min_k"] = -1
    (tmp_path / "metrics/patch.json").write_text(json.dumps(patch))
    run = Run(_roots(tmp_path), INFO)
    start, largest = S.change_location(run)
    assert start.value == f"L{int(target[1:].split('.')[0])}" and largest.value == target
    assert S.layer_patch_onset(run)[0].value == layers[3]
    assert next(f for f in S.directions(run) if f.label == site).value == "not reached"
    div["cka"] = {s: {"last": 1.0, "mean": 1.0} for s in div["cka"]}
    path.write_text(json.dumps(div))
    assert [f.value for f in S.change_location(Run(_roots(tmp_path)))] == ["unchanged"]


def test_empty_run_and_absent_files(tmp_path: Path) -> None:
    """No files: a page saying to run the pipeline; an empty table: a note instead of a figure."""
    roots = {"metrics": tmp_path / "metrics", "plots": tmp_path / "plots"}
    page = build_report(roots, tmp_path / "out").read_text()
    assert "run `dvc repro` first" in page and re.findall(r"<h2>([^<]+)</h2>", page) == ["Summary"]
    roots["plots"].mkdir()
    (roots["plots"] / "finetune_loss.csv").write_text("\n")
    page = build_report(roots, tmp_path / "out").read_text()
    assert "plots/finetune_loss.csv has no rows in this run" in page and "<img" not in page


def test_figure_columns_checked(tmp_path: Path) -> None:
    """A registered figure whose table lacks its column fails with a one-line error naming the figure."""
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/layer_patch.csv").write_text("layer,kl_base_to_tuned\n0,0.0\n1,0.5\n")
    stage = StageReport("divergence", "Divergence", "", figures=(
        Figure("layer-patch", "Layer patch", plot("layer_patch.csv"), "layer", ("kl_base_into_tuned",), ""),))
    with pytest.raises(MechdiffError, match="figure 'layer-patch'.*no column 'kl_base_into_tuned'"):
        build_report({"metrics": tmp_path / "metrics", "plots": tmp_path / "plots"}, tmp_path / "out",
                     stages=(stage,))
    with pytest.raises(MechdiffError, match="needs a folder for plots"):
        Run({"metrics": tmp_path})
    assert Run({"metrics": tmp_path, "plots": tmp_path / "plots"}).json(metric("none.json")) is None


def test_plot_series(tmp_path: Path) -> None:
    """plot_series writes a PNG of the requested size and rejects missing or non-numeric columns."""
    import matplotlib.image as mpimg

    csv = tmp_path / "s.csv"
    csv.write_text("k,drop,drop_lo,drop_hi,site\n1,10,8,12,a\n2,30,25,35,a\n1,5,4,6,b\n2,9,8,10,b\n")
    img = mpimg.imread(plot_series(csv, tmp_path / "s.png", "k", "drop", group="site", title="t"))
    assert img.shape[:2] == (396, 704)
    with pytest.raises(MechdiffError, match="no column 'nope'"):
        plot_series(csv, tmp_path / "x.png", "k", "nope")
    with pytest.raises(MechdiffError, match="not numeric"):
        plot_series(csv, tmp_path / "x.png", "k", "site")
    with pytest.raises(MechdiffError, match="does not exist"):
        plot_series(tmp_path / "none.csv", tmp_path / "x.png", "k", "drop")


def test_report_in_headless_chromium(run_dir: Path, report: Path, tmp_path: Path) -> None:
    """Chromium loads the page with no console errors; every figure loads; the summary is the first heading."""
    shot = tmp_path / "report.png"
    page = browse(report, shot)
    assert page["ok"] and page["title"] == "test report"
    run = Run(_roots(run_dir))
    assert len(page["images"]) == len(_figures_with_rows(run)) + len(_gallery(run))
    assert all(im[1] and im[2] > 0 for im in page["images"]), page["images"]
    assert page["headings"][0] == "Summary"
    assert not page["errors"], page["errors"]
    OUTPUT_DIR.mkdir(exist_ok=True)
    shutil.copy(shot, OUTPUT_DIR / "report.png")


def test_summary_null_metrics_read_undefined(run_dir: Path, tmp_path: Path) -> None:
    """A null R² or FVU (NaN in the stage: a constant site) reads "undefined" instead of stopping the report."""
    for d in ("metrics", "plots"):
        shutil.copytree(run_dir / d, tmp_path / d)
    tpath = next((tmp_path / "metrics/transport").glob("*.json"))
    t = json.loads(tpath.read_text())
    t["r2_val"], t["r2_val_shuffled"] = None, None
    tpath.write_text(json.dumps(t))
    spath = tmp_path / "metrics/sae.json"
    s = json.loads(spath.read_text())
    first = next(iter(s))
    s[first]["fvu"] = None
    spath.write_text(json.dumps(s))
    run = Run(_roots(tmp_path), INFO)
    fit = {f.label: f for f in S.map_fit(run)}[tpath.stem]
    assert fit.value == "R² undefined" and "shuffled pairs undefined" in fit.note
    assert {f.label: f.value for f in S.sae_fit(run)}[first] == "FVU undefined"
    assert "R² undefined" in build_report(_roots(tmp_path), tmp_path / "out", INFO).read_text()


def test_unstable_themes_are_not_a_finding(tmp_path: Path) -> None:
    """The summary names the strongest enriched theme only when its clustering is stable."""
    (tmp_path / "plots").mkdir()
    rows = ("layer,by,theme,enrichment,q,significant,top_words,stable\n"
            "20,text,0,1.65,0.001,True,social scenes,{s}\n20,text,1,0.8,0.5,False,food,{s}\n")
    run = Run({"metrics": tmp_path / "metrics", "plots": tmp_path / "plots"})
    (tmp_path / "plots/enrichment.csv").write_text(rows.format(s="False"))
    (fact,) = S.theme_enrichment(run)
    assert fact.value == "1 of 2 enriched" and "not stable" in fact.note and "1.65" not in fact.note
    run = Run({"metrics": tmp_path / "metrics", "plots": tmp_path / "plots"})
    (tmp_path / "plots/enrichment.csv").write_text(rows.format(s="True"))
    (fact,) = S.theme_enrichment(run)
    assert "theme 0, E = 1.65" in fact.note and "social scenes" in fact.note
