"""``python -m benchmarks.detection [--fast] [--case NAME ...] [--shard K/N] [--accelerator gpu] [--json PATH]
[--root-dir DIR] [--threads N]``.

Trains the selected cases under ``Sentinel(preset="full", on_detect="warn")``, prints one row per
case and the line ``recall R/N, false alarms F/H``. Exits with 1 only with ``--strict`` and a
verdict other than ``ok``.

``--twins`` instead trains every mutant and its healthy twin without the sentinel and prints the
comparison; ``--shard K/N`` runs every N-th selected case from the K-th (1-based), so that N processes
share the zoo; ``--results PATH`` runs the whole zoo (recording the calibration margins) and the twins,
and writes the markdown report (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence

from benchmarks.detection import calibration, cases_distributed
from benchmarks.detection.cases import CASES, select_cases
from benchmarks.detection.results import TwinRow, run_twins, twin_lines, write_results
from benchmarks.detection.runner import (
    OK,
    CaseResult,
    _torch_threads,
    format_table,
    run_case,
    run_cases,
    summary_line,
    under_preset,
)


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
    parser.add_argument(
        "--shard",
        type=_shard,
        metavar="K/N",
        help="run only every N-th selected case, from the K-th (1-based): N processes share the zoo",
    )
    parser.add_argument(
        "--accelerator",
        choices=("cpu", "gpu"),
        default="cpu",
        help="the Trainer's accelerator (default: cpu, where the published numbers come from)",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--twins",
        action="store_true",
        help="compare every mutant with its healthy twin (no sentinel) and exit",
    )
    parser.add_argument(
        "--results",
        metavar="PATH",
        help="run every case and the twin comparison, write the markdown report to PATH",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[],
        metavar="SEED",
        help="with --results: also run the whole zoo with these seeds (model init, dropout; data fixed), report "
        "recall and false alarms per seed, and count their healthy runs in the calibration margins",
    )
    parser.add_argument(
        "--preset",
        choices=("full", "fast"),
        default="full",
        help="the preset the cases train under (default: full; --results also reruns the healthy cases under fast)",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 unless every verdict is ok")
    return parser


def _shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 2/4, got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"K/N needs 1 <= K <= N, got {text!r}")
    return index, count


def _progress(result: CaseResult) -> None:
    print(f"  {result.name}: {result.verdict} ({result.seconds:.1f}s)", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.twins or args.results) and (
        args.shard is not None or args.accelerator != "cpu" or args.preset != "full"
    ):
        parser.error(
            "--shard, --accelerator and --preset apply to plain runs, not to --twins or --results (CPU numbers)"
        )
    if args.list:
        for case in CASES:
            kind = "healthy" if case.healthy else "faulty "
            print(f"{case.name:32} {kind} {'fast' if case.fast else '    '}  {case.description}")
        return 0
    if args.twins:
        return _twins(args.strict)
    if args.results:
        return _results(args.results, args.threads, args.strict, argv, args.seeds)
    try:
        cases = select_cases(args.case, fast=args.fast)
    except KeyError as error:
        print(error.args[0], file=sys.stderr)
        return 2
    if args.shard is not None:
        index, count = args.shard
        cases = cases[index - 1 :: count]
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with under_preset(args.preset):
        results = run_cases(
            cases,
            root_dir=args.root_dir,
            progress=_progress,
            threads=args.threads,
            accelerator=args.accelerator,
        )
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


def _twin_progress(row: TwinRow) -> None:
    c = row.comparison
    mark = "" if row.agrees else "  MISMATCH"
    print(
        f"  {c.mutation:14} {c.program:18} twin {statistics.fmean(c.twin):.3f} mutant "
        f"{statistics.fmean(c.mutant):.3f} needed +{c.margin:.3f}: {c.verdict} (declared {row.declared}){mark}",
        file=sys.stderr,
        flush=True,
    )


def _twins(strict: bool) -> int:
    with _torch_threads(1):
        rows = run_twins(progress=_twin_progress)
    print("\n".join(twin_lines(rows)))
    mismatches = sum(not row.agrees for row in rows)
    print(
        f"{sum(row.comparison.faulty for row in rows)}/{len(rows)} mutants faulty, {mismatches} disagree with the registry"
    )
    return 1 if strict and mismatches else 0


def _results(
    path: str, threads: int, strict: bool, argv: Sequence[str] | None, seeds: Sequence[int] = ()
) -> int:
    recorder = calibration.Recorder()
    runs: dict[int | None, list[CaseResult]] = {}  # None: each case's own seed
    started = time.perf_counter()
    with calibration.probing(recorder):
        for seed in (None, *seeds):
            runs[seed] = []
            seeded = [case if seed is None else dataclasses.replace(case, seed=seed) for case in CASES]
            cases_distributed.prefetch(seeded, threads=threads)  # the DDP cases: one launch of the ranks
            for case in CASES:
                tag = case.name if seed is None else f"{case.name}@{seed}"
                recorder.case = tag if case.healthy else ""
                result = run_case(
                    case if seed is None else dataclasses.replace(case, seed=seed), threads=threads
                )
                runs[seed].append(result)
                _progress(result)
    results = runs.pop(None)
    by_seed = {seed: seeded for seed, seeded in runs.items() if seed is not None}
    seconds = time.perf_counter() - started
    fast_healthy: list[CaseResult] = []
    with under_preset("fast"):  # the default Sentinel() on every healthy case (not in the margins)
        healthy = [case for case in CASES if case.healthy]
        cases_distributed.prefetch(healthy, threads=threads)
        for case in healthy:
            result = run_case(case, threads=threads)
            fast_healthy.append(result)
            print(
                f"  [Sentinel()] {result.name}: {result.verdict} ({result.seconds:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
    recorder_rows = calibration.margins(_healthy_only(recorder))
    started = time.perf_counter()
    with _torch_threads(1):
        twins = run_twins(progress=_twin_progress)
    twin_seconds = time.perf_counter() - started
    command = "python -m benchmarks.detection " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(
        path,
        results,
        twins,
        recorder_rows,
        command.strip(),
        seconds,
        twin_seconds,
        threads,
        by_seed,
        fast_healthy,
    )
    print(format_table(results))
    print(f"zoo {seconds:.1f}s, twins {twin_seconds:.1f}s; wrote {path}")
    failed = any(result.verdict != OK for result in (*results, *fast_healthy)) or any(
        not row.agrees for row in twins
    )
    return 1 if strict and failed else 0


def _healthy_only(recorder: calibration.Recorder) -> calibration.Recorder:
    """The recorder without the values recorded while a faulty case ran (tagged with an empty case)."""
    kept = calibration.Recorder()
    for index, values in recorder.values.items():
        kept.values[index] = [pair for pair in values if pair[1]]
    return kept


if __name__ == "__main__":
    sys.exit(main())
