"""The end-of-fit console report: one line when healthy, each finding once with its remedy, rich or plain."""

from __future__ import annotations

import sys

import pytest

from lightning_sentinel import Sentinel, findings
from lightning_sentinel.findings import Finding, Severity
from lightning_sentinel.report import findings_markdown, format_report, rich_available, summarize
from tests._models import Classifier, fit


def _finding(
    check="dead-relu", severity=Severity.WARNING, step=10, where="net.1", message="60% dead", hint=""
):
    return Finding(check, severity, message, step, 0, where=where, hint=hint)


FINDINGS = [
    _finding(step=10, hint="lower the learning rate; use LeakyReLU"),
    _finding("non-finite-loss", Severity.ERROR, 30, None, "loss is nan at batch 3", "clip gradients"),
    _finding(
        step=40, severity=Severity.ERROR, message="100% dead", hint="lower the learning rate; use LeakyReLU"
    ),
    _finding("loss-oscillation", Severity.INFO, 50, None, "swings", ""),
]


@pytest.fixture
def no_rich(monkeypatch):
    """Make ``import rich`` fail, as on a machine without it."""
    for name in [name for name in sys.modules if name == "rich" or name.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)


def test_summary_keeps_each_check_and_place_once_worst_first():
    summary = summarize(FINDINGS)
    assert [(f.check, f.severity.value, f.step, n) for f, n in summary] == [
        ("dead-relu", "error", 40, 2),  # the worst of its two reports; errors sorted by first report
        ("non-finite-loss", "error", 30, 1),
        ("loss-oscillation", "info", 50, 1),
    ]


def test_healthy_run_is_one_line():
    assert (
        format_report([], ["b", "a", "a"], "/x/findings.json")
        == "lightning-sentinel: all 2 checks passed (a, b)."
    )


def test_plain_report_without_rich(no_rich):
    assert not rich_available()
    text = format_report(
        FINDINGS, ["dead-relu", "non-finite-loss", "loss-oscillation"], "/x/f.json", width=80
    )
    lines = text.splitlines()
    assert lines[0] == "lightning-sentinel: 3 findings from 3 checks (2 errors, 1 info)"
    assert lines[2] == "  ERROR    dead-relu at net.1 (step 40, reported 2 times)"
    assert text.count("dead-relu") == 1 and text.count("lower the learning rate") == 1
    assert "           try: clip gradients" in lines
    assert text.index("non-finite-loss") < text.index("loss-oscillation")
    assert lines[-1] == "findings written to /x/f.json"
    assert max(len(line) for line in lines) <= 80
    assert "┃" not in text


def test_long_messages_are_wrapped_whole_not_cut():
    message = " ".join(f"word{i}" for i in range(60))
    text = format_report([_finding(message=message)], ["dead-relu"], None, use_rich=False, width=70)
    assert "word59" in text and "..." not in text
    assert max(len(line) for line in text.splitlines()) <= 70


def test_rich_table_when_rich_is_importable():
    pytest.importorskip("rich")
    assert rich_available()
    text = format_report(FINDINGS, ["dead-relu", "non-finite-loss"], "/x/f.json", width=100)
    assert "┃ severity" in text and "\x1b[" not in text  # a table, no colour codes in logs
    assert text.count("dead-relu") == 1 and "reported 2" in text and "try: clip gradients" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_markdown_table_has_each_finding_once_with_its_remedy():
    markdown = findings_markdown([*FINDINGS, _finding("repeated-batch", message="a | b")])
    rows = markdown.splitlines()
    assert rows[0] == "| severity | check | message | what to try |"
    assert len(rows) == 2 + 4
    assert rows[2].startswith("| error | **dead-relu** at net.1, step 40 (2 reports) | 100% dead | lower the")
    assert "a \\| b" in markdown
    assert findings_markdown([]) == "No findings."


def test_end_of_fit_report_names_the_finding_and_its_remedy(tmp_path, capfd, no_rich):
    module = Classifier(transform=lambda logits, step: logits / 0.0 if step >= 3 else logits)
    trainer = fit(module, [Sentinel()], root=tmp_path, max_steps=10)
    assert [f.check for f in findings(trainer)][:1] == ["non-finite-loss"]
    err = capfd.readouterr().err
    report = err[err.index("lightning-sentinel: ") :]
    assert "ERROR    non-finite-loss" in report and "try: " in report
    assert f"findings written to {tmp_path}" in report
