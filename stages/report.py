"""Stage report: report/index.html, a summary of the run and each stage's declared figures and tables."""

import dataclasses

import mechdiff
import mechdiff.pipeline as P
from mechdiff.io import run_stage
from mechdiff.params import load_params
from mechdiff.report.html import build_report
from mechdiff.report.run import RunInfo


def main() -> None:
    p = load_params()
    info = RunInfo(
        pair=dataclasses.asdict(p.pair),
        settings={"seed": p.seed, "rank": p.rank, "alpha": p.alpha, "patch.target_drop": p.patch.target_drop},
        version=mechdiff.__version__,
    )
    out = build_report({"metrics": P.METRICS, "plots": P.PLOTS}, P.REPORT, info)
    print(f"report: {out}")


if __name__ == "__main__":
    run_stage(main)
