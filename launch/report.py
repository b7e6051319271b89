"""Draw runs' curves into one PNG: `llm-report RUN_DIR [RUN_DIR ...] [--out PATH]` (or python launch/report.py).

Training loss, each validation set's loss and bits per byte, learning rate, gradient norm, tokens/s, MFU
and memory against tokens seen, from each run folder's metrics.jsonl; resumes, rollbacks and checkpoints
marked; several runs overlaid, one colour each (train/observe/report.py). Written to the first RUN_DIR's
report.png unless --out names another file; prints the path.
"""

import argparse
import logging
import sys
from pathlib import Path


def error(message: str) -> None:
    """Exit 2 (argparse's status for bad arguments) with one line."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a run folder (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: the first RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not run.is_dir():
            error(f"{run}: no such run folder")
        if not (run / "metrics.jsonl").is_file():
            error(f"{run}: no metrics.jsonl in this folder (not a run folder, or a run that has not logged a step)")
    from train.observe.report import write_report  # after the checks: matplotlib takes a second to import

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")  # damaged lines of a metrics.jsonl

    try:
        print(write_report(args.runs, args.out or args.runs[0] / "report.png"))
    except (OSError, ValueError) as e:
        error(str(e))


if __name__ == "__main__":
    main()
