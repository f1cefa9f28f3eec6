"""End to end: `dvc repro` on a tiny pair in a temporary copy of the repo, then experiments and diffs.

The tuned model is the base with a planted rank-2 change at L2.attn_out (the `edit` recipe), so the
pipeline has a known answer: CKA is 1 before layer 2 and the planted site needs k = 2 directions.
The `tiny_repo` fixture (tests/e2e_repo.py) runs the pipeline once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e_repo import sh

pytestmark = pytest.mark.slow


def _metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / name).read_text())


def test_pipeline_outputs(tiny_repo):
    div = _metrics(tiny_repo, "divergence.json")
    # known answer: the edit sits at L2.attn_out, so resid_post is untouched before layer 2
    for layer in (0, 1):
        assert div["cka"][f"L{layer}.resid_post"]["last"] == pytest.approx(1.0, abs=1e-6)
    assert div["cka"]["L2.resid_post"]["last"] < 0.999
    assert div["kl"]["all"] > 0
    tuned = _metrics(tiny_repo, "model_tuned.json")  # the plant, recorded where `dvc exp show` lists it
    assert (tuned["edit_layer"], tuned["edit_site"], tuned["edit_rank"], tuned["edit_heads"]) == (2, "attn_out", 2, "all")
    patch = _metrics(tiny_repo, "patch.json")
    site = patch["L2.attn_out"]
    assert site["kl_drop_full"] > 90  # the map is exact at the planted site
    assert site["min_k"] == 2  # the 80% target is reached at exactly the planted rank
    assert site["k_saturated"] == 2  # and the rank-k drop saturates there (90 % of the sweep's best)
    assert (tiny_repo / "plots/rank_k.csv").read_text().count("L2.attn_out") >= 6
    for f in ("cka.csv", "kl_by_dataset.csv", "layer_patch.csv", "cka.png", "rank_k.png"):
        assert (tiny_repo / "plots" / f).stat().st_size > 0
    assert (tiny_repo / "artifacts/maps/L2.attn_out").is_dir()
    assert (tiny_repo / "report/index.html").stat().st_size > 1000


def test_behaviour_and_steer_outputs(tiny_repo):
    beh = _metrics(tiny_repo, "behaviour.json")
    for ds in ("cultural", "control", "neutral", "trait"):
        assert set(beh[ds]) >= {"signature_rate", "refusal_rate"}
    for ds in ("mc_cultural", "mc_neutral"):  # the scored sets, split like the corpus
        acc = beh[ds]["accuracy"]
        assert 0.0 <= acc["base"]["mean"] <= 1.0 and acc["base"]["lo"] <= acc["base"]["mean"] <= acc["base"]["hi"]
    steer = _metrics(tiny_repo, "steer.json")
    for config in ("L2.attn_out", "layers"):
        for op in ("steer", "ablate"):
            m = steer[config][op]
            assert m["k"] in (1, 2, 3) and m["alpha"] in (0.5, 1.0)
            assert set(m) >= {"min_k", "effect", "kl_share", "ppl_change", "mc_drop", "kl_neutral"}
    # known answer: the edit is rank 2 at L2.attn_out; the k = 2 handle there, at alpha 1, removes most of the KL
    # to the base (not all: the edit also changed the earlier prompt tokens that layer 3 attends to)
    grid = (tiny_repo / "plots/steer_grid.csv").read_text().splitlines()
    head = grid[0].split(",")
    rows = [dict(zip(head, r.split(","))) for r in grid[1:]]
    cell = next(r for r in rows if r["config"] == "L2.attn_out" and r["op"] == "ablate" and r["k"] == "2"
                and float(r["alpha"]) == 1.0)
    assert float(cell["kl_test"]) > 0.6
    for f in ("steer_k.csv", "steer_alpha.csv", "behaviour.csv"):
        assert (tiny_repo / "plots" / f).stat().st_size > 0


def test_geometry_and_hsae_outputs(tiny_repo):
    geo = _metrics(tiny_repo, "geometry.json")
    for which in ("base", "tuned"):
        g = geo[which]
        assert g["coverage"]["share"] == 1.0  # the tiny tokenizer holds every concept word
        assert set(g["controls"]) == {"shuffled", "random_parents", "euclidean", "mean_estimator"}
        assert g["intervention"]["median_effect"] is not None  # a random tiny model has no concept structure to test
        assert g["polytope"]["parents"] >= 1 and 0 <= g["polytope"]["accuracy"] <= 1
        assert g["child_intervention"]["children"] >= 2
    # the edit leaves the LM head alone: the polytopes (unembedding side) are the same in both models
    assert geo["base"]["polytope"] == geo["tuned"]["polytope"]
    # the edit recipe leaves the LM head alone: the unembedding geometry is identical in both models
    assert geo["pair"]["min_cos_unembedding"] == pytest.approx(1.0)
    h = _metrics(tiny_repo, "hsae.json")
    for which in ("base", "tuned"):
        for variant in ("random", "teacher"):
            m = h[which][variant]
            assert 0 < m["l0"] <= 4  # k = 2 parents, each with at most one child
        assert set(h[which]["targets"]["met"]) == {"purity", "leakage", "steering_leakage", "reconstruction_parity"}
    for f in ("geometry_cos.csv", "geometry_summary.csv", "geometry_polytope.csv", "geometry_children.csv",
              "hsae_summary.csv", "hsae_pair.csv"):
        assert (tiny_repo / "plots" / f).stat().st_size > 0
    assert (tiny_repo / "artifacts/hsae/base_teacher/hsae.safetensors").is_file()


def test_heads_outputs(tiny_repo):
    m = _metrics(tiny_repo, "heads.json")
    assert (m["n_layers"], m["n_heads"]) == (4, 4)
    assert m["gap"] > 0 and 0 <= m["churn"] <= 1 and 0 <= m["jaccard_top_k"] <= 1
    # known answer: the edit multiplies the whole of L2.attn_out, so no head before layer 2 changed: their
    # attribution-patching estimates are exactly 0 and the heads ranked first sit at layer 2 or later
    import csv

    rows = list(csv.DictReader((tiny_repo / "plots/heads_attribution.csv").open()))
    assert len(rows) == 16
    assert all(float(r["pred"]) == 0.0 for r in rows if int(r["layer"]) < 2)
    assert all(layer >= 2 for layer, _ in m["top_pred"])
    # only layer 2's heads changed weights: the direct estimate is exactly 0 everywhere else, layer 3 included
    assert {int(r["layer"]) for r in rows if float(r["direct"]) != 0.0} == {2}
    assert m["top_direct"][0][0] == 2
    patched = list(csv.DictReader((tiny_repo / "plots/heads_patch.csv").open()))
    assert len(patched) == 6 and {r["group"] for r in patched} == {"top", "random"}
    curve = list(csv.DictReader((tiny_repo / "plots/heads_curve.csv").open()))
    assert float(curve[-1]["share"]) == pytest.approx(1.0, abs=1e-4)  # every head patched: the whole gap (no MLP changed)
    for key in ("heads-dz", "heads-base", "heads-tuned", "heads-curve"):
        assert (tiny_repo / "report/img/report" / f"{key}.png").stat().st_size > 1000, key


def test_status_clean_and_repro_noop(tiny_repo):
    st = sh(["dvc", "status"], tiny_repo).stdout
    assert "up to date" in st, st
    r = sh(["dvc", "repro"], tiny_repo)
    assert "didn't change" in r.stdout or "up to date" in r.stdout
    assert sh(["dvc", "metrics", "show"], tiny_repo).stdout.count("L2.attn_out") >= 1


def test_exp_run_changes_metric_and_diff_shows_it(tiny_repo):
    before = _metrics(tiny_repo, "patch.json")["L2.attn_out"]["kl_drop"]
    sh(["dvc", "exp", "run", "-S", "rank=1", "--name", "rank1"], tiny_repo)
    after = _metrics(tiny_repo, "patch.json")["L2.attn_out"]["kl_drop"]
    assert after != pytest.approx(before, abs=1e-6)
    show = sh(["dvc", "exp", "show", "--json"], tiny_repo).stdout
    assert "rank1" in show
    diff = sh(["dvc", "metrics", "diff", "HEAD", "--json"], tiny_repo).stdout
    changed = json.loads(diff)
    assert any("kl_drop" in k for entry in changed.values() for k in entry), diff


def test_pipeline_report_renders_in_chromium(tiny_repo, tmp_path):
    """The report `dvc repro` wrote: summary first with the planted answers, every declared figure loads, no errors."""
    import re

    from mechdiff.report.registry import STAGES
    from mechdiff.report.run import Run
    from tests.browser import browse

    index = tiny_repo / "report" / "index.html"
    page = browse(index, tmp_path / "pipeline_report.png")
    assert page["ok"] and not page["errors"], page["errors"]
    assert page["headings"][0] == "Summary", page["headings"]
    run = Run({"metrics": tiny_repo / "metrics", "plots": tiny_repo / "plots"})
    figures = [f for st in STAGES for f in st.figures]
    assert all(run.files(f.data) for f in figures)
    # a figure's table is empty only for the fine-tune loss: the tiny tuned model is a planted edit, not a fine-tune
    empty = {f.key for f in figures if not any(len(p.read_text().splitlines()) > 1 for p in run.files(f.data))}
    assert empty == {"finetune-loss"}
    loaded = {src for src, complete, width in page["images"] if complete and width > 0}
    # plus one image per PNG of the image-gallery tables (the feature pages' token plots)
    gallery = sum(len([p for p in run.files(t.path) if p.suffix == ".png"])
                  for st in STAGES for t in st.tables if t.kind == "images")
    assert gallery > 0, "the tiny run drew no token-activation plots"
    assert len(loaded) == len(page["images"]) == len(figures) - len(empty) + gallery, page["images"]
    html = index.read_text()
    for f in figures:
        if f.key not in empty:
            block = html[html.index(f'<figure id="{f.key}">'):]
            assert re.search(r'<img src="([^"]+)"', block[:block.index("</figure>")]).group(1) in loaded, f.key
    # planted answer: the edit sits at L2.attn_out with rank 2
    assert 'change starts at: <a class="fact" href="#cka">L2</a>' in html
    assert 'layer patch starts at: <a class="fact" href="#layer-patch">L2</a>' in html
    assert 'L2.attn_out: <a class="fact" href="#rank-k">k = 2</a>' in html
    out = Path(__file__).resolve().parents[1] / "_output"
    out.mkdir(exist_ok=True)
    (out / "pipeline_report.png").write_bytes((tmp_path / "pipeline_report.png").read_bytes())


def test_exp_ordering_of_rank_and_heads(tiny_repo):
    """Two experiments planting a change of rank 1 in one head and of rank 8 in all four heads of L2: `dvc exp
    show` orders them as planted (the mapped patch's min k at L2.attn_out, the heads carrying the change)."""
    runs = {"one-head": ["-S", "pair.edit.heads=[1]", "-S", "pair.edit.rank=1"],
            "four-heads": ["-S", "pair.edit.heads=[0,1,2,3]", "-S", "pair.edit.rank=8"]}
    try:
        for name, sets in runs.items():
            sh(["dvc", "exp", "run", "-n", name, *sets, "-S", "pair.edit.scale=4.0", "-S", "heads.abs_threshold=0.02",
                "patch", "heads"], tiny_repo)
        shown = json.loads(sh(["dvc", "exp", "show", "--json"], tiny_repo).stdout)
    finally:
        sh(["git", "checkout", "--", "."], tiny_repo)
        sh(["dvc", "checkout", "-f"], tiny_repo, check=False)
    got = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            name = exp.get("name")
            revs = exp.get("revs") or []
            data = (revs[0] if revs else exp).get("data") or {}
            if name in runs:
                metrics = data.get("metrics") or {}
                got[name] = {Path(k).name: v["data"] for k, v in metrics.items()}
    assert set(got) == set(runs), shown
    one, four = got["one-head"], got["four-heads"]
    assert (one["model_tuned.json"]["edit_heads"], one["model_tuned.json"]["edit_rank"]) == ("1", 1)
    assert (four["model_tuned.json"]["edit_heads"], four["model_tuned.json"]["edit_scale"]) == ("0,1,2,3", 4.0)
    assert one["patch.json"]["L2.attn_out"]["min_k"] == 1
    assert four["patch.json"]["L2.attn_out"]["min_k"] > one["patch.json"]["L2.attn_out"]["min_k"]
    assert one["heads.json"]["heads_for_target"] == 1  # the one planted head closes half the gap alone
    assert four["heads.json"]["churn_pred"] > one["heads.json"]["churn_pred"]


def test_method_options_reach_the_stages(tiny_repo):
    """The rule-form options run through their stages: `steer.ablation=mean` (directional ablation),
    `hsae.metric=euclidean`, `behaviour.mc_score=mean`, `patch.attn_heads=[1]` (one head's part of the attn_out
    patch, through pinv(W_o)), and `steer.layers` reaching a layer before the planted change (L1: no handle
    there, no failure); each moves its stage's metrics, nothing else breaks."""
    before = {name: _metrics(tiny_repo, name) for name in ("steer.json", "hsae.json", "behaviour.json", "patch.json")}
    try:
        sh(["dvc", "exp", "run", "-n", "rule-forms", "-S", "steer.ablation=mean", "-S", "hsae.metric=euclidean",
            "-S", "behaviour.mc_score=mean", "-S", "steer.layers=[1,2,3]", "-S", "patch.attn_heads=[1]",
            "steer", "hsae", "behaviour", "patch"], tiny_repo)
        after = {name: _metrics(tiny_repo, name) for name in before}
    finally:
        sh(["git", "checkout", "--", "."], tiny_repo)
        sh(["dvc", "checkout", "-f"], tiny_repo, check=False)
    assert after["steer.json"]["layers"]["ablate"] != before["steer.json"]["layers"]["ablate"]
    assert after["steer.json"]["L2.attn_out"]["steer"] == before["steer.json"]["L2.attn_out"]["steer"]  # steer unchanged
    assert after["hsae.json"]["base"]["teacher"]["fvu"] != before["hsae.json"]["base"]["teacher"]["fvu"]
    mc = [d for d in before["behaviour.json"] if isinstance(before["behaviour.json"][d], dict)
          and "accuracy" in before["behaviour.json"][d]]
    assert mc and any(after["behaviour.json"][d]["accuracy"] != before["behaviour.json"][d]["accuracy"] for d in mc)
    # one head of four takes its part of each patch vector at the attn_out site (through the full-rank 64 x 64
    # projection); the resid_post site is patched as before
    pb, pa = before["patch.json"]["L2.attn_out"], after["patch.json"]["L2.attn_out"]
    assert pa["attn_pinv_rank"] == 64 and "attn_pinv_rank" not in pb
    assert pa["kl_raw"] > 0 and pa["kl_raw"] != pb["kl_raw"]
    r_b, r_a = before["patch.json"]["L3.resid_post"], after["patch.json"]["L3.resid_post"]
    assert r_a["kl_raw"] == pytest.approx(r_b["kl_raw"], rel=1e-4) and r_a["min_k"] == r_b["min_k"]


def test_two_processes_give_the_same_metrics(tiny_repo):
    """`dvc exp run -S extract.nproc=2 -S sae.nproc=2`: two torchrun processes extract the stores and train the
    SAEs (spread over the ranks); the metrics equal the one-process run's. Each rank runs one torch thread and
    the one-process run two, so matmuls may round differently: float tolerances, not bit equality."""
    before = {name: _metrics(tiny_repo, name) for name in ("divergence.json", "patch.json", "sae.json")}
    try:
        sh(["dvc", "exp", "run", "-n", "nproc2", "-S", "extract.nproc=2", "-S", "sae.nproc=2",
            "divergence", "patch", "sae_eval"], tiny_repo)
        after = {name: _metrics(tiny_repo, name) for name in before}
    finally:
        sh(["git", "checkout", "--", "."], tiny_repo)
        sh(["dvc", "checkout", "-f"], tiny_repo, check=False)

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif isinstance(v, int | float) and not isinstance(v, bool):
                yield f"{prefix}{k}", float(v)

    for name in before:
        a, b = dict(flat(before[name])), dict(flat(after[name]))
        assert a.keys() == b.keys(), name
        for k in a:
            if name == "sae.json":
                # an SAE is a long chain of steps: input rounding moves it a little; counts (dead %, latents
                # by type) and ratios of small differences (ce_recovered) move in steps, so compare the
                # reconstruction itself
                if k.rsplit(".", 1)[-1] in ("fvu", "mse", "l0"):
                    assert b[k] == pytest.approx(a[k], rel=0.05, abs=1e-3), f"{name}: {k} {a[k]} vs {b[k]}"
            else:
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), f"{name}: {k} {a[k]} vs {b[k]}"
