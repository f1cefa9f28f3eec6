"""The team loop on real pipeline outputs: push/pull through a remote, queued experiments, branch diffs.

Everything runs on the session fixture `tiny_repo` (the pipeline run on a tiny pair with a planted
rank-2 change at L2.attn_out). That fixture's workspace is changed by other tests, so this module only
clones its HEAD commit and fills the clone's cache from the fixture's cache.

With MECHDIFF_WRITE_DOCS=1 the commands' real outputs are written to docs/SHARING_OUTPUT.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.dvc_helpers import (
    BIN,
    UP_TO_DATE,
    assert_same_tree,
    base_env,
    dvc,
    dvc_outputs,
    git,
    git_clone,
    moto_server,
    push_pull_roundtrip,
    run,
    setup_s3_remote,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_DIR = Path(__file__).resolve().parents[1] / "_output"
DOC = ROOT / "docs" / "SHARING_OUTPUT.md"
ENV = base_env({"MECHDIFF_PROGRESS": "0"})
SITE = "L2.attn_out"  # the planted rank-2 change
SWEEP = (1, 4, 8)
QUEUE_TIMEOUT_S = 540
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# real outputs collected by the tests, written to DOC at the end of the module when asked for
RECORD: dict[str, object] = {}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _clone_with_cache(src: Path, dst: Path) -> Path:
    """git clone src, point the clone's cache at src's cache (--local config) and check the outputs out."""
    clone = git_clone(src, dst)
    dvc(["cache", "dir", "--local", str(src / ".dvc" / "cache")], clone)
    dvc(["checkout"], clone)
    return clone


def _file_counts(repo: Path) -> dict[str, int]:
    """Number of files under artifacts/ (total and per top folder) and report/."""
    counts = {"artifacts": sum(1 for p in (repo / "artifacts").rglob("*") if p.is_file())}
    for sub in sorted(p for p in (repo / "artifacts").iterdir() if p.is_dir()):
        counts[f"artifacts/{sub.name}"] = sum(1 for p in sub.rglob("*") if p.is_file())
    counts["report"] = sum(1 for p in (repo / "report").rglob("*") if p.is_file())
    return counts


def _size_mb(path: Path) -> float:
    """Total size of the files under path, in MiB."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _mechdiff(args: list[str], repo: Path) -> subprocess.CompletedProcess[str]:
    """Run the `mechdiff` console script with --root repo (not checked)."""
    return run([str(BIN / "mechdiff"), "--root", str(repo), *args], repo, env=ENV, check=False)


def _ran_stages(repro_stdout: str) -> set[str]:
    """Names of the stages a `dvc repro` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", repro_stdout))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scratch directory shared by the tests of this module."""
    return tmp_path_factory.mktemp("share")


@pytest.fixture(scope="module")
def producer(tiny_repo: Path, work: Path) -> Iterator[Path]:
    """The machine that ran the pipeline: a clone of the fixture's HEAD with its own full cache, branch `main`."""
    repo = git_clone(tiny_repo, work / "producer")
    git(["branch", "-m", "main"], repo)
    dvc(["remote", "add", "--local", "fixture-cache", str(tiny_repo / ".dvc" / "cache")], repo)
    dvc(["pull", "-r", "fixture-cache"], repo)  # a DVC cache directory is laid out like a local remote
    dvc(["remote", "remove", "--local", "fixture-cache"], repo)
    assert UP_TO_DATE in dvc(["status"], repo).stdout
    yield repo
    if os.environ.get("MECHDIFF_WRITE_DOCS") == "1":
        _write_doc(work)


def test_share_through_local_directory(producer: Path, work: Path) -> None:
    """mechdiff remote add DIR + dvc push; a fresh git clone + dvc pull gets byte-identical, up-to-date outputs."""
    alice = _clone_with_cache(producer, work / "alice")
    store = work / "store"
    added = _mechdiff(["remote", "add", str(store)], alice)
    assert added.returncode == 0, added.stderr
    assert str(store) in added.stdout and "default" in added.stdout
    assert "does not exist yet" in added.stdout  # a local path not there yet is said, and push creates it below
    git(["commit", "--quiet", "-am", "use the shared DVC store"], alice)
    t0 = time.perf_counter()
    push = dvc(["push"], alice, env=ENV)
    t_push = time.perf_counter() - t0
    n_pushed = int(re.search(r"(\d+) files? pushed", push.stdout).group(1))
    assert n_pushed > 0 and sum(1 for f in store.rglob("*") if f.is_file()) == n_pushed
    check = _mechdiff(["remote", "check"], alice)
    assert check.returncode == 0, check.stderr

    bob = git_clone(alice, work / "bob")  # a new machine: the remote comes with .dvc/config
    t0 = time.perf_counter()
    pull = dvc(["pull"], bob, env=ENV)
    t_pull = time.perf_counter() - t0
    outs = dvc_outputs(alice)
    for must in ("artifacts/acts/base.zarr", "artifacts/acts/tuned.zarr", "artifacts/saes/base_L2",
                 f"artifacts/maps/{SITE}", "report"):
        assert must in outs, outs
    n_files = sum(assert_same_tree(alice / rel, bob / rel) for rel in outs)
    n_artifacts = sum(assert_same_tree(alice / rel, bob / rel) for rel in outs if rel.startswith("artifacts/"))
    status = dvc(["status"], bob).stdout
    assert UP_TO_DATE in status, status
    repro = dvc(["repro"], bob, env=ENV).stdout
    assert not _ran_stages(repro), repro
    assert "didn't change, skipping" in repro
    counts = _file_counts(bob)
    assert counts["artifacts"] == n_artifacts  # every file under artifacts/ is a pulled DVC output
    print(f"\n[share/local] pushed {n_pushed} files in {t_push:.1f} s, pulled in {t_pull:.1f} s; "
          f"{n_files} output files compared byte for byte; counts {counts}; "
          f"artifacts {_size_mb(bob / 'artifacts'):.1f} MiB")
    RECORD["local"] = {
        "store": str(store), "add": added.stdout, "push": push.stdout, "check": check.stdout,
        "pull": pull.stdout, "status": status, "repro": repro, "t_push": t_push, "t_pull": t_pull,
        "n_pushed": n_pushed, "n_compared": n_files, "counts": counts,
        "mib": _size_mb(bob / "artifacts"),
    }


def test_share_through_s3(producer: Path, work: Path) -> None:
    """The same round trip through an S3 bucket (moto on loopback), via push_pull_roundtrip."""
    src = _clone_with_cache(producer, work / "s3-src")
    timings: dict[str, float] = {}
    with moto_server() as endpoint:
        clone = push_pull_roundtrip(src, "s3", work / "s3", endpoint=endpoint, timings=timings)
        check = _mechdiff(["remote", "check"], clone)
        assert check.returncode == 0, check.stderr
    counts = _file_counts(clone)
    assert counts == _file_counts(src)
    print(f"\n[share/s3] push {timings['push_s']:.1f} s, pull {timings['pull_s']:.1f} s; counts {counts}")
    RECORD["s3"] = {**timings, "counts": counts}


def _wait_for_queue(repo: Path, timeout: float) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status text."""
    deadline = time.monotonic() + timeout
    while True:
        text = dvc(["queue", "status"], repo).stdout
        tasks = [ln for ln in text.splitlines() if re.search(r"\b(Queued|Running|Success|Failed)\b", ln)]
        if tasks and not any(re.search(r"\b(Queued|Running)\b", ln) for ln in tasks):
            return text
        if time.monotonic() > deadline:
            dvc(["queue", "stop", "--kill"], repo, check=False)
            raise AssertionError(f"queued experiments did not finish in {timeout:.0f} s:\n{text}")
        time.sleep(5)


def test_queued_rank_sweep(producer: Path, work: Path) -> None:
    """dvc exp run --queue -S rank=1,4,8 + dvc queue start: three experiments, kl_drop follows the planted rank."""
    repo = _clone_with_cache(producer, work / "exp")
    baseline = json.loads((repo / "metrics" / "patch.json").read_text())[SITE]["kl_drop"]
    queued = dvc(["exp", "run", "--queue", "-S", "rank=" + ",".join(map(str, SWEEP))], repo, env=ENV)
    assert queued.stdout.count("Queued experiment") == len(SWEEP), queued.stdout
    t0 = time.perf_counter()
    start = dvc(["queue", "start", "-j", "1"], repo, env=ENV)
    try:
        status = _wait_for_queue(repo, QUEUE_TIMEOUT_S)
    finally:
        dvc(["queue", "stop"], repo, check=False)
    t_queue = time.perf_counter() - t0
    if "Failed" in status:
        logs = "\n".join(
            dvc(["queue", "logs", ln.split()[1]], repo, check=False).stdout[-3000:]
            for ln in status.splitlines() if "Failed" in ln
        )
        raise AssertionError(f"queued experiments failed:\n{status}\n{logs}")
    assert status.count("Success") == len(SWEEP), status

    shown = json.loads(dvc(["exp", "show", "--json"], repo).stdout)
    base = next(e for e in shown if e.get("name") == "main")
    drops: dict[int, float] = {}
    for exp in base["experiments"] or []:
        data = exp["revs"][0]["data"]
        rank = data["params"]["params.yaml"]["data"]["rank"]
        patch = data["metrics"]["metrics/patch.json"]["data"]
        assert patch["rank"] == rank  # the stage read the swept value
        drops[rank] = patch[SITE]["kl_drop"]
    assert sorted(drops) == sorted(SWEEP), drops
    assert len({round(v, 6) for v in drops.values()}) == len(SWEEP), drops
    # planted rank 2: one direction misses much of the change, four or eight recover what rank 2 does
    assert drops[1] < 80.0 <= min(drops[4], drops[8]), drops
    assert drops[1] < baseline, (drops, baseline)

    table = dvc(["exp", "show", "--only-changed", "--md", "--drop", ".*", "--keep",
                 r"Experiment|params.yaml:rank$|L2.attn_out.kl_drop$|L3.resid_post.kl_drop$"], repo).stdout
    names = [exp["name"] for exp in base["experiments"]]
    for name in names:
        assert name in table, table
    rows = [ln for ln in table.splitlines() if "[" in ln]
    assert len(rows) == len(SWEEP)
    for ln in rows:  # every row shows its own rank and kl_drop
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(drops[int(cells[3])], abs=1e-3), ln
    print(f"\n[exp] {len(SWEEP)} queued experiments in {t_queue:.0f} s; kl_drop[{SITE}] by rank {drops} "
          f"(baseline rank 2: {baseline:.3f})\n{table}")
    RECORD["exp"] = {"queued": queued.stdout, "start": start.stdout, "status": status, "table": table,
                     "t_queue": t_queue}


def _offline_template(path: Path) -> Path | None:
    """The project's offline template for `dvc plots --html-template` (None without vl-convert-python)."""
    import importlib.util

    from mechdiff.report.dvc_plots import offline_template

    if importlib.util.find_spec("vl_convert") is None:
        return None
    return offline_template(path)


def _specs(page: Path) -> dict[str, dict]:
    """The Vega-Lite spec embedded for each plot div of a DVC plots HTML page: div id -> spec."""
    text = page.read_text(encoding="utf8")
    found = re.findall(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (.*?);\s*\n'
                       r"\s*vegaEmbed\('#\1', spec\);", text, re.S)
    return {div: json.loads(spec) for div, spec in found}


def _render(page: Path, shot: Path, n_plots: int) -> tuple[list[list], list[str]]:
    """Open the page in headless chromium, wait for n_plots charts; per plot div: [id, marks, width, height, text]."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS, headless=True)
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            tab.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            tab.on("requestfailed", lambda r: errors.append(f"requestfailed: {r.url}"))
            tab.goto(page.as_uri(), wait_until="load")
            tab.wait_for_function(
                "n => document.querySelectorAll('body > div[id] .marks').length >= n", arg=n_plots, timeout=30_000
            )
            tab.wait_for_timeout(500)
            divs = tab.evaluate(
                """() => Array.from(document.querySelectorAll('body > div[id]')).map(d => {
                    const m = d.querySelector('svg.marks, canvas.marks');
                    const r = m ? m.getBoundingClientRect() : {width: 0, height: 0};
                    return [d.id, m ? 1 : 0, r.width, r.height, m ? m.textContent || '' : ''];
                })"""
            )
            shot.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return divs, errors


def test_branch_metrics_and_plots_diff(producer: Path, work: Path) -> None:
    """A branch with transport.solver=procrustes: metrics diff shows the kl_drop change, plots diff renders offline."""
    repo = _clone_with_cache(producer, work / "branch")
    git(["checkout", "--quiet", "-b", "procrustes"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["transport"]["solver"] != "procrustes"
    params["transport"]["solver"] = "procrustes"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = dvc(["repro"], repo, env=ENV).stdout
    sites = params["transport"]["sites"]
    # steer declares the maps (its `transport` direction source reads them), so it reruns too
    assert _ran_stages(repro) == {*(f"transport@{s}" for s in sites), "patch", "steer", "report"}, repro
    git(["add", "-A"], repo)
    git(["commit", "--quiet", "-m", "transport.solver=procrustes"], repo)

    diff = json.loads(dvc(["metrics", "diff", "main", "procrustes", "--json"], repo).stdout)
    old = json.loads(git(["show", "main:metrics/patch.json"], repo).stdout)
    new = json.loads((repo / "metrics" / "patch.json").read_text())
    entry = diff["metrics/patch.json"][f"{SITE}.kl_drop"]
    assert entry["old"] == pytest.approx(old[SITE]["kl_drop"])
    assert entry["new"] == pytest.approx(new[SITE]["kl_drop"])
    assert entry["diff"] == pytest.approx(new[SITE]["kl_drop"] - old[SITE]["kl_drop"])
    assert abs(entry["diff"]) > 1e-3, entry
    assert f"metrics/transport/{SITE}.json" in diff
    assert "metrics/divergence.json" not in diff  # divergence does not depend on the transport solver
    text_diff = dvc(["metrics", "diff", "main", "--md"], repo).stdout
    assert f"{SITE}.kl_drop " in text_diff

    # DVC 3.67's default page loads vega, vega-lite and vega-embed from a CDN (no network here)
    default_dir = work / "plots_diff_default"
    shown = dvc(["plots", "diff", "main", "-o", str(default_dir)], repo).stdout
    default_html = (default_dir / "index.html").read_text()
    assert "https://cdn.jsdelivr.net/npm/vega" in default_html
    specs = _specs(default_dir / "index.html")
    assert len(specs) == default_html.count("vegaEmbed('#")
    with_data = {d for d, s in specs.items() if s.get("data", {}).get("values")}
    assert {"cka_by_layer", "kl_by_dataset", "layer_patch"} <= with_data, sorted(specs)
    # the rank-k plot of the planted site carries both revisions, equal to the committed CSVs
    site_div = "plots_rank_k_" + re.sub(r"\W", "_", SITE) + "_csv"
    values = specs[site_div]["data"]["values"]
    for rev, csv in (("main", git(["show", f"main:plots/rank_k/{SITE}.csv"], repo).stdout),
                     ("workspace", (repo / "plots" / "rank_k" / f"{SITE}.csv").read_text())):
        lines = csv.strip().splitlines()
        col = lines[0].split(",").index("kl_drop")
        expected = [float(ln.split(",")[col]) for ln in lines[1:]]
        got = [float(v["kl_drop"]) for v in values if v["rev"] == rev]
        assert got == pytest.approx(expected), (rev, got, expected)

    template = _offline_template(work / "offline_template.html")
    if template is None:
        msg = "vl-convert-python is not installed: no offline Vega bundle for the plots diff page"
        if _ci():
            pytest.fail(msg + " (CI=true): pip install -e '.[dev]'")
        pytest.skip(msg)
    out_dir = work / "plots_diff"
    dvc(["plots", "diff", "main", "procrustes", "-o", str(out_dir), "--html-template", str(template)], repo)
    page = out_dir / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    specs = _specs(page)
    if shutil.which("chromium") is None:
        if _ci():
            pytest.fail("chromium is not installed (CI=true): run `apt-get install -y chromium`")
        pytest.skip("chromium is not installed (set CI=true to make this a failure)")
    shot = work / "plots_diff.png"
    divs, errors = _render(page, shot, sum(1 for s in specs.values() if s))
    assert not errors, errors
    assert [d[0] for d in divs] == list(specs)
    for div, marks, width, height, text in divs:
        if not specs[div]:
            continue  # DVC writes `{}` for a plot file with no rows (finetune_loss.csv under the edit recipe)
        assert marks == 1 and width > 100 and height > 100, (div, width, height)
        assert "main" in text and "procrustes" in text, (div, text[:300])  # the rev legend
    n_rendered = sum(1 for d in divs if d[1] and specs[d[0]])
    n_plots = sum(1 for spec in specs.values() if spec)
    assert n_rendered == n_plots >= 5
    assert shot.stat().st_size > 20_000
    OUTPUT_DIR.mkdir(exist_ok=True)
    shutil.copy(shot, OUTPUT_DIR / "plots_diff.png")
    print(f"\n[branch] ran {sorted(_ran_stages(repro))}; {SITE}.kl_drop {entry['old']:.3f} -> {entry['new']:.3f}; "
          f"plots diff: {n_rendered} of {n_plots} plots rendered offline ({len(divs) - n_plots} with no rows)")
    RECORD["branch"] = {"metrics_diff": text_diff, "plots_diff": shown, "entry": entry,
                        "n_plots": n_plots, "n_rendered": n_rendered, "n_empty": len(divs) - n_plots}


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert the CLI failed with exit code 2 and exactly one stderr line containing every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("mechdiff: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_missing_remote_is_one_actionable_line(producer: Path, work: Path) -> None:
    """dvc pull fails with a long list; `mechdiff remote check` says what is wrong in one line, exit code 2."""
    repo = git_clone(producer, work / "lost")
    pull = dvc(["pull"], repo, check=False)
    assert pull.returncode != 0
    msg = _one_line_error(_mechdiff(["remote", "check"], repo), "no default DVC remote",
                          "dvc remote add -d storage")
    # a remote by name that is not configured
    _one_line_error(_mechdiff(["remote", "check", "--name", "storage"], repo), "no DVC remote 'storage'",
                    "dvc remote add -d storage")
    RECORD["no_remote"] = {"pull": pull.stdout + pull.stderr, "check": msg}

    nowhere = work / "not-mounted" / "store"
    dvc(["remote", "add", "-d", "storage", str(nowhere)], repo)
    pull = dvc(["pull"], repo, check=False)
    assert pull.returncode != 0
    msg = _one_line_error(_mechdiff(["remote", "check"], repo), str(nowhere), "does not exist")
    RECORD["missing_dir"] = {"check": msg}

    with moto_server() as endpoint:
        setup_s3_remote(repo, endpoint, bucket="no-such-bucket")
        _one_line_error(_mechdiff(["remote", "check"], repo), "s3://no-such-bucket/store", "does not exist")
        setup_s3_remote(repo, endpoint, prefix="never-pushed")  # the bucket exists, nothing was pushed
        _one_line_error(_mechdiff(["remote", "check"], repo), "holds nothing yet", "dvc push")


# ---------------------------------------------------------------------------------------------------------
# docs/SHARING_OUTPUT.md


def _block(text: str, max_lines: int = 40) -> str:
    lines = text.rstrip("\n").splitlines()
    if len(lines) > max_lines:
        keep = max_lines // 2
        lines = lines[:keep] + [f"... ({len(lines) - 2 * keep} more lines)"] + lines[-keep:]
    return "```text\n" + "\n".join(lines) + "\n```\n"


def _write_doc(work: Path) -> None:
    """Write the captured outputs to docs/SHARING_OUTPUT.md (only when every part of the module ran)."""
    if not all(k in RECORD for k in ("local", "s3", "exp", "branch")):
        return
    loc, s3, exp, br = RECORD["local"], RECORD["s3"], RECORD["exp"], RECORD["branch"]
    store = "/mnt/shared/mechdiff-store"

    def clean(text: str) -> str:
        text = text.replace(loc["store"], store).replace(str(work), "/tmp")
        return re.sub(r"file:///tmp/\S*plots_diff_default/", "file:///home/me/mechdiff/plots_diff/", text)

    counts = loc["counts"]
    count_rows = "\n".join(f"| `{k}/` | {v} |" for k, v in counts.items())
    kl_rows = [ln for ln in br["metrics_diff"].splitlines()
               if ln.startswith(("| Path", "|---")) or re.search(r"\| (L2\.attn_out|L3\.resid_post)\.kl_drop +\|", ln)]
    doc = f"""## Share results

Real outputs below come from the test suite's run on the tiny test pair (a 4-layer random Llama model
and a copy of it with a planted rank-2 change at `L2.attn_out`), captured by `tests/pipeline/test_share.py`
with `MECHDIFF_WRITE_DOCS=1`. Temporary directories are shown as the paths in the commands.

On the machine that ran the pipeline, point the project at a shared remote, commit that, and push:

```bash
mechdiff remote add s3://my-bucket/mechdiff          # or: dvc remote add -d storage s3://my-bucket/mechdiff
git add .dvc/config && git commit -m "DVC remote" && git push
dvc push
```

With a shared directory as the remote (`mechdiff remote add {store}`):

{_block(clean(loc["add"]))}
`dvc push`:

{_block(clean(loc["push"]))}
`mechdiff remote check` (run it whenever a pull fails):

{_block(clean(loc["check"]))}
On a new machine:

```bash
git clone <your git remote>/mechdiff.git && cd mechdiff && make setup && dvc pull
```

`dvc pull`:

{_block(clean(loc["pull"]), 24)}
`dvc status`:

{_block(clean(loc["status"]))}
`dvc repro` runs nothing (every stage is up to date):

{_block(clean(loc["repro"]), 12)}
Measured on the tiny pair (2 shared CPU cores): {loc["n_compared"]} output files, byte-identical after
the pull; `artifacts/` holds {counts["artifacts"]} files ({loc["mib"]:.1f} MiB).

| where | files |
| --- | --- |
{count_rows}

| remote | `dvc push` | `dvc pull` (fresh clone) |
| --- | --- | --- |
| shared directory | {loc["t_push"]:.1f} s ({loc["n_pushed"]} files) | {loc["t_pull"]:.1f} s |
| S3 (moto server on 127.0.0.1) | {s3["push_s"]:.1f} s | {s3["pull_s"]:.1f} s |

A remote that is not configured, not mounted or empty makes `dvc pull` print a long list of
"Checkout failed" paths; `mechdiff remote check` says what is wrong in one line (exit code 2):

{_block(RECORD["no_remote"]["check"] + chr(10) + clean(RECORD["missing_dir"]["check"]).replace("/tmp/not-mounted/store", "/mnt/shared/mechdiff-store"))}
## Compare experiments

Queue a sweep over the rank of the mapped patch and run it (only `patch` and `report` rerun):

```bash
dvc exp run --queue -S 'rank=1,4,16'
dvc queue start
dvc queue status
dvc exp show --only-changed
```

On the tiny pair the sweep was `rank=1,4,8` (`dvc exp run --queue -S 'rank=1,4,8'`):

{_block(exp["queued"])}
`dvc queue start -j 1`, then `dvc queue status` once the queue is empty ({exp["t_queue"]:.0f} s for the three):

{_block(exp["status"])}
`dvc exp show --only-changed --md --drop '.*' --keep 'Experiment|params.yaml:rank$|L2.attn_out.kl_drop$|L3.resid_post.kl_drop$'`
(plain `dvc exp show --only-changed` shows every changed metric column). The planted change has rank 2:
one direction recovers about half of the KL drop, four or eight about 99 %, as rank 2 does:

{exp["table"].strip()}

For a change you want to keep, use a branch: edit `params.yaml` (here `transport.solver: procrustes`),
`dvc repro` (only `transport@*`, `patch` and `report` rerun), commit, and compare with `main`:

```bash
dvc metrics diff main
dvc plots diff main -o plots_diff
```

`dvc metrics diff main --md`, the `kl_drop` rows (the full table lists every changed metric):

{chr(10).join(kl_rows)}

`dvc plots diff main -o plots_diff`:

{_block(clean(br["plots_diff"]))}
DVC 3.67 writes a page that loads Vega, Vega-Lite and Vega-Embed from cdn.jsdelivr.net, so it needs a
network connection to show the plots. Offline, run `mechdiff plots-offline` once: it writes a page template
that inlines them (`vl_convert.javascript_bundle()`) and sets it as the clone's `plots.html_template`, so
`dvc plots diff` needs no flag (here the test passes the same template as `--html-template`); with it, chromium rendered
all {br["n_rendered"]} plots of `dvc plots diff main procrustes` with both revisions in each legend
(plus {br["n_empty"]} empty one: `plots/finetune_loss.csv` has no rows under the edit recipe, and DVC embeds `{{}}`).
A screenshot is kept at `tests/_output/plots_diff.png`.
"""
    DOC.write_text(doc)
