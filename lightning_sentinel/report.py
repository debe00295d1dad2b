"""End-of-run summary of findings: a console report and a markdown table for TensorBoard.

The console report shows each (check, where) once, worst first, with the message and the remedy
in full. When `rich <https://github.com/Textualize/rich>`_ is importable it is drawn as a rich
table; otherwise as plain wrapped text. A run without findings gets one line.

Example:
    >>> from lightning_sentinel.report import format_report
    >>> print(format_report([], ["non-finite-loss", "exploding-gradients"], None))
    lightning-sentinel: all 2 checks passed (exploding-gradients, non-finite-loss).
    >>> from lightning_sentinel.findings import Finding, Severity
    >>> nan = Finding("non-finite-loss", Severity.ERROR, "loss is nan", 12, 0, hint="lower the lr")
    >>> print(format_report([nan], ["non-finite-loss"], None, use_rich=False, width=60))
    lightning-sentinel: 1 finding from 1 check (1 error)
    <BLANKLINE>
      ERROR    non-finite-loss (step 12)
               loss is nan
               try: lower the lr
"""

from __future__ import annotations

import io
import shutil
import textwrap
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sentinel.findings import Finding


def rich_available() -> bool:
    """Whether the optional ``rich`` package can be imported (the console report then uses it)."""
    try:
        import rich.console
        import rich.table  # noqa: F401
    except ImportError:
        return False
    return True


def summarize(findings: Sequence[Finding]) -> list[tuple[Finding, int]]:
    """Each (check, where) once, as (its worst and latest finding, how often it was reported).

    Sorted by severity (errors first), then by the step of the first report.

    Example:
        >>> from lightning_sentinel.findings import Finding, Severity
        >>> a = Finding("dead-relu", Severity.WARNING, "60% dead", 10, 0, where="net.1")
        >>> b = Finding("dead-relu", Severity.ERROR, "100% dead", 40, 0, where="net.1")
        >>> [(f.message, n) for f, n in summarize([a, b])]
        [('100% dead', 2)]
    """
    groups: dict[tuple[str, str | None], list[Finding]] = {}
    for finding in findings:
        groups.setdefault((finding.check, finding.where), []).append(finding)
    summary = []
    for group in groups.values():
        worst = max(group, key=lambda f: (f.severity.rank, f.step))
        summary.append((worst, len(group), min(f.step for f in group)))
    summary.sort(key=lambda item: (-item[0].severity.rank, item[2]))
    return [(finding, count) for finding, count, _ in summary]


def _headline(findings: Sequence[tuple[Finding, int]], n_checks: int) -> str:
    counts: dict[str, int] = {}
    for finding, _ in findings:
        counts[finding.severity.value] = counts.get(finding.severity.value, 0) + 1
    by_severity = ", ".join(
        f"{count} {name}{'s' if count > 1 else ''}"
        for name in ("error", "warning", "info")
        if (count := counts.get(name, 0))
    )
    plural = "s" if len(findings) > 1 else ""
    checks = f"{n_checks} check{'s' if n_checks != 1 else ''}"
    return f"lightning-sentinel: {len(findings)} finding{plural} from {checks} ({by_severity})"


def _place(finding: Finding, count: int) -> str:
    where = f" at {finding.where}" if finding.where else ""
    repeats = f", reported {count} times" if count > 1 else ""
    return f"{finding.check}{where} (step {finding.step}{repeats})"


def _plain(summary: Sequence[tuple[Finding, int]], width: int) -> list[str]:
    indent = " " * 11
    lines: list[str] = []
    for finding, count in summary:
        lines.append(f"  {finding.severity.value.upper():<8} {_place(finding, count)}")
        lines += textwrap.wrap(
            " ".join(finding.message.split()), width, initial_indent=indent, subsequent_indent=indent
        )
        if finding.hint:
            lines += textwrap.wrap(
                "try: " + " ".join(finding.hint.split()),
                width,
                initial_indent=indent,
                subsequent_indent=indent + "     ",
            )
    return lines


def _rich(summary: Sequence[tuple[Finding, int]], width: int) -> list[str]:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=True, expand=True)
    table.add_column("severity", no_wrap=True)
    table.add_column(
        "check / where / step", width=max(22, *(len(f.check) for f, _ in summary)), overflow="fold"
    )
    table.add_column("what was seen, and what to try", ratio=1)
    styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    for finding, count in summary:
        details = Text(" ".join(finding.message.split()))
        if finding.hint:
            details.append("\ntry: ", style="bold")
            details.append(" ".join(finding.hint.split()))
        table.add_row(
            Text(finding.severity.value, style=styles[finding.severity.value]),
            "\n".join(
                [finding.check]
                + ([f"at {finding.where}"] if finding.where else [])
                + [f"step {finding.step}" + (f", reported {count} times" if count > 1 else "")]
            ),
            details,
        )
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip("\n").splitlines()


def format_report(
    findings: Sequence[Finding],
    checks_run: Sequence[str],
    path: str | None,
    *,
    use_rich: bool | None = None,
    width: int | None = None,
    unwatched: Mapping[str, str] | None = None,
    cost: str | None = None,
) -> str:
    """The end-of-fit console report.

    Args:
        findings: every finding of the run, in the order reported.
        checks_run: the check ids that ran.
        path: where ``findings.json`` was written (named at the end), if known.
        use_rich: draw a ``rich`` table; default: when ``rich`` is importable.
        width: text width; default: the terminal's, between 80 and 160 columns.
        unwatched: check ids that stopped watching during the run (their callback failed), with why.
        cost: what the suite measured of its own cost, one phrase (added as a last line).

    One line (``all N checks passed``) when nothing was found and every check watched to the end;
    otherwise each (check, where) once, errors first, with its message and remedy, and the ids that
    were no longer watched, so that silence is never mistaken for health.

    Example:
        >>> print(format_report([], ["dead-relu", "non-finite-loss"], None,
        ...                     unwatched={"dead-relu": "DeadReLUDetector failed in `on_train_batch_end`"}))
        lightning-sentinel: no findings, but 1 of 2 checks stopped watching during the run: dead-relu (DeadReLUDetector failed in `on_train_batch_end`).
    """
    checks = sorted(set(checks_run))
    stopped = _unwatched_line(unwatched or {}, len(checks))
    cost_line = f"\ncost: {cost}." if cost else ""
    if not findings:
        if stopped:
            return f"lightning-sentinel: no findings, but {stopped}.{cost_line}"
        return f"lightning-sentinel: all {len(checks)} checks passed ({', '.join(checks)}).{cost_line}"
    if width is None:
        width = min(max(shutil.get_terminal_size((100, 24)).columns, 80), 160)
    if use_rich is None:
        use_rich = rich_available()
    summary = summarize(findings)
    lines = [_headline(summary, len(checks)), ""]
    lines += _rich(summary, width) if use_rich else _plain(summary, width)
    if stopped:
        lines += ["", *textwrap.wrap(f"Not watched to the end: {stopped}.", width)]
    if path:
        lines += ["", f"findings written to {path}"]
    if cost:
        lines.append(f"cost: {cost}.")
    return "\n".join(lines)


def _unwatched_line(unwatched: Mapping[str, str], n_checks: int) -> str:
    """``"K of N checks stopped watching during the run: ids (why); ..."``, or ``""`` when none did."""
    if not unwatched:
        return ""
    by_reason: dict[str, list[str]] = {}
    for check, reason in unwatched.items():
        by_reason.setdefault(reason, []).append(check)
    parts = "; ".join(f"{', '.join(sorted(ids))} ({reason})" for reason, ids in by_reason.items())
    total = max(n_checks, len(unwatched))
    return f"{len(unwatched)} of {total} check{'s' if total != 1 else ''} stopped watching during the run: {parts}"


def findings_markdown(findings: Sequence[Finding]) -> str:
    """The findings as a markdown table, each (check, where) once, errors first (TensorBoard's Text tab).

    Example:
        >>> from lightning_sentinel.findings import Finding, Severity
        >>> print(findings_markdown([Finding("dead-relu", Severity.WARNING, "60% dead", 10, 0, where="net.1")]))
        | severity | check | message | what to try |
        |---|---|---|---|
        | warning | **dead-relu** at net.1, step 10 | 60% dead | - |
    """
    if not findings:
        return "No findings."
    rows = ["| severity | check | message | what to try |", "|---|---|---|---|"]
    for finding, count in summarize(findings):
        place = f"**{finding.check}**" + (f" at {finding.where}" if finding.where else "")
        place += f", step {finding.step}" + (f" ({count} reports)" if count > 1 else "")
        cells = [finding.severity.value, place, finding.message, finding.hint or "-"]
        rows.append("| " + " | ".join(" ".join(c.split()).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


#: The "sentinel" section of TensorBoard's CUSTOM SCALARS tab: one chart per family of sentinel scalars.
SENTINEL_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "sentinel": {
        "gradient norms": ["Multiline", [r"sentinel/grad_norm/.*"]],
        "update/weight ratios": ["Multiline", [r"sentinel/update_ratio/.*"]],
        "dead and saturated units": ["Multiline", [r"sentinel/(dead_share|dead_relu|saturation)/.*"]],
        "loss": ["Multiline", [r"sentinel/loss/.*"]],
        "data": ["Multiline", [r"sentinel/data/.*"]],
        "other sentinel scalars": [
            "Multiline",
            [r"sentinel/(?!(grad_norm|update_ratio|dead_share|dead_relu|saturation|loss|data)/).*"],
        ],
    }
}

_LAYOUT_WRITTEN: weakref.WeakSet[pl.Trainer] = weakref.WeakSet()


def write_scalar_layout(trainer: pl.Trainer) -> None:
    """Give each TensorBoard logger of ``trainer`` the "sentinel" Custom Scalars layout, once (rank zero).

    It groups every ``sentinel/...`` scalar in one section: gradient norms, update/weight ratios,
    dead and saturated units, loss, data. Other loggers are left alone. A ``HistogramLogger`` on the
    trainer writes the layout itself (its ``custom_scalar_layout`` argument decides).
    """
    if trainer.global_rank != 0 or trainer in _LAYOUT_WRITTEN:
        return
    _LAYOUT_WRITTEN.add(trainer)
    callbacks = [*trainer.callbacks, *(c for cb in trainer.callbacks for c in getattr(cb, "checks", []))]
    if any(getattr(callback, "WRITES_SCALAR_LAYOUT", False) for callback in callbacks):
        return  # a HistogramLogger writes it (its ``custom_scalar_layout`` argument decides)

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(SENTINEL_LAYOUT)
