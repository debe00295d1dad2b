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
import json
import logging
import os
import platform
import shutil
import sys
import textwrap
from collections.abc import Iterator, Sequence

from lightning_sentinel import __version__
from lightning_sentinel.catalog import default_action, registered_checks


def _checks_table(width: int | None = None) -> str:
    """Every check id, its callback, severity and default action, then its meaning and default rule."""
    if width is None:
        width = max(shutil.get_terminal_size((120, 24)).columns, 100)
    specs = list(registered_checks().values())
    rows = [("check id", "callback", "severity", "action")]
    rows += [(s.check, s.callback, s.severity.value, default_action(s)) for s in specs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    indent = " " * (sum(widths) + 2 * len(widths))
    lines = [
        "  ".join(value.ljust(w) for value, w in zip(rows[0], widths, strict=True))
        + "  meaning / default rule"
    ]
    for row, spec in zip(rows[1:], specs, strict=True):
        head = "  ".join(value.ljust(w) for value, w in zip(row, widths, strict=True)) + "  "
        text = textwrap.wrap(spec.meaning, width, initial_indent=head, subsequent_indent=indent)
        text += textwrap.wrap(
            "rule: " + spec.threshold, width, initial_indent=indent, subsequent_indent=indent
        )
        lines += text
    return "\n".join(lines)


def _checks_records() -> list[dict[str, str]]:
    return [
        {
            "check": spec.check,
            "callback": spec.callback,
            "severity": spec.severity.value,
            "default_action": default_action(spec),
            "default_rule": spec.threshold,
            "meaning": spec.meaning,
        }
        for spec in registered_checks().values()
    ]


def _command_checks(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(_checks_records(), indent=2))
    else:
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

    if not os.path.isfile(config):
        return _error(f"doctor: no such config file: {config}")
    print(f"lightning-sentinel doctor: preflight trials and first-batch checks of {config}")
    with _quiet_lightning():
        try:
            diagnosis = diagnose_config(config, root_dir)
        except ImportError as error:
            return _error(f"doctor: {error}")
    print(format_report(diagnosis.findings, diagnosis.checks, diagnosis.path))
    return 1 if has_errors(diagnosis.findings) else 0


def _error(message: str) -> int:
    """Print ``lightning-sentinel: error: message`` to stderr; the usage-error exit status (2)."""
    print(f"lightning-sentinel: error: {message}", file=sys.stderr)
    return 2


_EXIT_STATUS = "exit status: 0 success, 1 a check failed (see the output), 2 usage error"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightning-sentinel`` command."""
    parser = argparse.ArgumentParser(
        prog="lightning-sentinel",
        description="PyTorch Lightning callbacks that catch training pathologies while they happen. "
        "Run `lightning-sentinel COMMAND --help` for the options of a command.",
        epilog=_EXIT_STATUS,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo_help = "train a healthy model and two broken ones on synthetic data (a few seconds each) and show what is found"
    commands.add_parser(
        "demo",
        help=demo_help,
        description=demo_help + ".",
        epilog="exit status: 0 when the healthy run is quiet and both broken runs are caught, else 1",
    ).set_defaults(handler=_command_demo)
    doctor = commands.add_parser(
        "doctor",
        help="report versions and run a quick self-check; with --config, run the preflight trials of a "
        "LightningCLI config",
        description="Without --config: print the versions of torch, Lightning, torchmetrics and TensorBoard "
        "and run a 20-step self-check that must find nothing. With --config: build the model and data of "
        "a LightningCLI config and run Sentinel(preset='full') for one optimizer step (the preflight "
        "trials on copies of the model, the first-batch checks), print the report and write findings.json.",
        epilog="exit status: 0 no error finding, 1 an error finding (or a failed self-check), 2 usage error",
    )
    doctor.add_argument(
        "--config", metavar="YAML", help="a LightningCLI config with model and data (class_path)"
    )
    doctor.add_argument(
        "--root-dir", default="sentinel_doctor", help="where findings.json is written (default: %(default)s)"
    )
    doctor.set_defaults(handler=_command_doctor)
    checks_help = "list every check id with its callback, severity, default action, default rule and meaning"
    checks = commands.add_parser(
        "checks", help=checks_help, description=checks_help + ".", epilog="exit status: 0"
    )
    checks.add_argument("--json", action="store_true", help="print a JSON list of records instead of a table")
    checks.set_defaults(handler=_command_checks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-sentinel`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except BrokenPipeError:  # e.g. `lightning-sentinel checks | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("lightning-sentinel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
