"""Stage report: report/index.html with every figure and table of the run."""

from pathlib import Path

import mechdiff.pipeline as P
from mechdiff.io import run_stage
from mechdiff.report.html import build_report


def main() -> None:
    out = build_report(Path("."), P.REPORT)
    print(f"report: {out}")


if __name__ == "__main__":
    run_stage(main)
