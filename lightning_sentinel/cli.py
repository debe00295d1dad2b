"""The ``lightning-sentinel`` command: ``demo``, ``doctor`` and ``checks``.

Example:
    >>> from lightning_sentinel.cli import main
    >>> main(["checks"])  # doctest: +ELLIPSIS
    check id ...
    0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import platform
import sys
from collections.abc import Iterator, Sequence

from lightning_sentinel import __version__
from lightning_sentinel.catalog import default_action, registered_checks


def _checks_table() -> str:
    specs = registered_checks().values()
    rows = [("check id", "callback", "severity", "action", "default rule", "meaning")]
    rows += [
        (s.check, s.callback, s.severity.value, default_action(s), s.threshold, s.meaning) for s in specs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        lines.append(
            "  ".join(value.ljust(width) for value, width in zip(row[:5], widths, strict=True))
            + "  "
            + row[5]
        )
    return "\n".join(lines)


def _command_checks(args: argparse.Namespace) -> int:
    print(_checks_table())
    return 0


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's INFO chatter (device banners, per-run reports) while the demo prints its own."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _command_demo(args: argparse.Namespace) -> int:
    from lightning_sentinel.demo import run_demo

    print("lightning-sentinel demo: three short trainings on synthetic data, each watched by Sentinel().")
    with _quiet_lightning():
        results = run_demo()
    healthy_quiet = not results[0].findings
    broken_caught = all(result.findings for result in results[1:])
    print(f"\nhealthy run quiet: {healthy_quiet}; broken runs caught: {broken_caught}")
    return 0 if healthy_quiet and broken_caught else 1


def _command_doctor(args: argparse.Namespace) -> int:
    if args.config is not None:
        return _doctor_config(args.config, args.root_dir)
    print(f"lightning-sentinel {__version__} on Python {platform.python_version()} ({platform.platform()})")
    status = 0
    for package in ("torch", "lightning", "torchmetrics", "tensorboard"):
        try:
            module = importlib.import_module(package)
            print(f"  {package:<13} {getattr(module, '__version__', '?')}")
        except ImportError as error:
            print(f"  {package:<13} MISSING ({error})")
            status = 1
    import torch

    print(
        f"  {'cuda':<13} {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
    )
    print(f"  {'bf16 on cpu':<13} {'yes' if hasattr(torch, 'bfloat16') else 'no'}")
    print(f"  {'checks':<13} {len(registered_checks())} registered")
    if status == 0:
        from lightning_sentinel.demo import run_one

        with _quiet_lightning():
            result = run_one("self-check", None, max_steps=20)
        verdict = (
            "ok" if not result.findings else f"UNEXPECTED findings: {[f.check for f in result.findings]}"
        )
        print(f"  {'self-check':<13} {verdict} ({result.steps} steps, {result.seconds:.1f}s)")
        status = 0 if not result.findings else 1
    return status


def _doctor_config(config: str, root_dir: str) -> int:
    from lightning_sentinel.doctor import diagnose_config, has_errors
    from lightning_sentinel.report import format_report

    print(f"lightning-sentinel doctor: preflight trials and first-batch checks of {config}")
    with _quiet_lightning():
        diagnosis = diagnose_config(config, root_dir)
    print(format_report(diagnosis.findings, diagnosis.checks, diagnosis.path))
    for finding in diagnosis.findings:
        if finding.hint:
            print(f"  {finding.check}: try {finding.hint}")
    return 1 if has_errors(diagnosis.findings) else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightning-sentinel`` command."""
    parser = argparse.ArgumentParser(
        prog="lightning-sentinel",
        description="PyTorch Lightning callbacks that catch training pathologies while they happen.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "demo", help="train a healthy and two broken models and show what is found"
    ).set_defaults(handler=_command_demo)
    doctor = commands.add_parser(
        "doctor",
        help="report versions and run a quick self-check; with --config, run the preflight trials of a "
        "LightningCLI config (exit 1 on an error finding)",
    )
    doctor.add_argument(
        "--config", metavar="YAML", help="a LightningCLI config with model and data (class_path)"
    )
    doctor.add_argument(
        "--root-dir", default="sentinel_doctor", help="where findings.json is written (default: %(default)s)"
    )
    doctor.set_defaults(handler=_command_doctor)
    commands.add_parser("checks", help="list every check id with its callback and default rule").set_defaults(
        handler=_command_checks
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-sentinel`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
