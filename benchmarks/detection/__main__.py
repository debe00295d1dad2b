"""``python -m benchmarks.detection [--fast] [--case NAME ...] [--json PATH] [--root-dir DIR] [--threads N]``.

Trains the selected cases under ``Sentinel(preset="full", on_detect="warn")``, prints one row per
case and the line ``recall R/N, false alarms F/H``. Exits with 1 only with ``--strict`` and a
verdict other than ``ok``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from benchmarks.detection.cases import CASES, select_cases
from benchmarks.detection.runner import OK, CaseResult, format_table, run_cases, summary_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.detection",
        description="Detection benchmark of lightning-sentinel: healthy and faulty training runs.",
    )
    parser.add_argument(
        "--fast", action="store_true", help="run only the fast subset (the one the tests run)"
    )
    parser.add_argument("--case", nargs="+", action="extend", metavar="NAME", help="run only these cases")
    parser.add_argument("--json", metavar="PATH", help="also write every result (with its findings) as JSON")
    parser.add_argument(
        "--root-dir",
        metavar="DIR",
        help="keep each case's findings.json under DIR/<case> (default: a temp dir)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, metavar="N", help="torch intra-op threads per case (default: 1)"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 unless every verdict is ok")
    return parser


def _progress(result: CaseResult) -> None:
    print(f"  {result.name}: {result.verdict} ({result.seconds:.1f}s)", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.list:
        for case in CASES:
            kind = "healthy" if case.healthy else "faulty "
            print(f"{case.name:32} {kind} {'fast' if case.fast else '    '}  {case.description}")
        return 0
    try:
        cases = select_cases(args.case, fast=args.fast)
    except KeyError as error:
        print(error.args[0], file=sys.stderr)
        return 2
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run_cases(cases, root_dir=args.root_dir, progress=_progress, threads=args.threads)
    total = time.perf_counter() - started
    print(format_table(results))
    print(f"total {total:.1f}s")
    if args.json:
        payload = {
            "summary": summary_line(results),
            "seconds": round(total, 3),
            "results": [result.to_dict() for result in results],
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    if args.strict and any(result.verdict != OK for result in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
