"""End-of-run summary of findings: a console table and a markdown table for TensorBoard.

Example:
    >>> from lightning_sentinel.report import format_report
    >>> print(format_report([], ["non-finite-loss", "exploding-gradients"], None))
    lightning-sentinel: all 2 checks passed (exploding-gradients, non-finite-loss).
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_sentinel.findings import Finding

_COLUMNS = ("severity", "check", "where", "step", "message", "hint")
_MAX_CELL = 90


def _cell(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 3] + "..."


def _rows(findings: Sequence[Finding]) -> list[tuple[str, ...]]:
    return [
        (f.severity.value, f.check, f.where or "-", str(f.step), _cell(f.message), _cell(f.hint or "-"))
        for f in findings
    ]


def format_report(findings: Sequence[Finding], checks_run: Sequence[str], path: str | None) -> str:
    """A plain-text report: one line when nothing was found, else a table of every finding."""
    checks = sorted(set(checks_run))
    if not findings:
        return f"lightning-sentinel: all {len(checks)} checks passed ({', '.join(checks)})."
    rows = [_COLUMNS, *_rows(findings)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    lines = [f"lightning-sentinel: {len(findings)} finding(s) from {len(checks)} checks"]
    for index, row in enumerate(rows):
        lines.append("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    if path:
        lines.append(f"findings written to {path}")
    return "\n".join(lines)


def findings_markdown(findings: Sequence[Finding]) -> str:
    """The findings as a markdown table (rendered by TensorBoard's text dashboard)."""
    if not findings:
        return "No findings."
    header = "| " + " | ".join(_COLUMNS) + " |\n|" + "---|" * len(_COLUMNS) + "\n"
    body = "\n".join(
        "| " + " | ".join(value.replace("|", "\\|") for value in row) + " |" for row in _rows(findings)
    )
    return header + body
