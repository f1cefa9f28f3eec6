"""Stage report: report/index.html with every figure and table of the run."""

from pathlib import Path

from mechdiff.io import run_stage
from mechdiff.report import build_report


def main() -> None:
    out = build_report(Path("."), Path("report"))
    print(f"report: {out}")


if __name__ == "__main__":
    run_stage(main)
