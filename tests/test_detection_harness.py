"""The detection benchmark's fast subset: healthy cases stay quiet, faulty cases are diagnosed and located.

Runs ``benchmarks/detection`` cases marked ``fast`` (a few seconds on a CPU) through the same
runner as ``python -m benchmarks.detection``, and checks the runner's scoring and summary line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks.detection.__main__ import main
from benchmarks.detection.cases import CASES, select_cases
from benchmarks.detection.runner import (
    FALSE_ALARM,
    LOCATING_CHECKS,
    MISSED,
    OK,
    WRONG_DIAGNOSIS,
    CaseResult,
    alarms,
    format_table,
    run_cases,
    score,
    summary_line,
)
from lightning_sentinel import Finding, Severity

FAST_CASES = select_cases(fast=True)
SUMMARY = re.compile(r"^recall (\d+)/(\d+), false alarms (\d+)/(\d+)$")
# Every healthy fast case ends far below this fraction of its starting loss; a faulty one never
# gets below this absolute loss (it diverges, turns NaN, or stays near chance).
HEALTHY_LOSS_DROP = 0.5


@pytest.fixture(scope="module")
def fast_results() -> dict[str, CaseResult]:
    return {result.name: result for result in run_cases(FAST_CASES)}


def _healthy_names() -> list[str]:
    return [case.name for case in FAST_CASES if case.healthy]


def _faulty_names() -> list[str]:
    return [case.name for case in FAST_CASES if not case.healthy]


def test_fast_subset_covers_both_kinds() -> None:
    assert len(_healthy_names()) >= 4
    assert len(_faulty_names()) >= 4
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name", _healthy_names())
def test_healthy_case_trains_without_alarm(fast_results: dict[str, CaseResult], name: str) -> None:
    result = fast_results[name]
    assert result.error is None
    assert result.steps == dict(next(c for c in CASES if c.name == name).trainer_kwargs)["max_steps"]
    assert math.isfinite(result.loss_end) and result.loss_end < HEALTHY_LOSS_DROP * result.loss_start, (
        f"{name} does not learn: loss {result.loss_start:.3g} -> {result.loss_end:.3g}"
    )
    assert alarms(result.findings) == [], [finding.format() for finding in alarms(result.findings)]
    assert result.verdict == OK


@pytest.mark.parametrize("name", _faulty_names())
def test_faulty_case_is_diagnosed_and_located(fast_results: dict[str, CaseResult], name: str) -> None:
    result = fast_results[name]
    expected = set(result.expected)
    matching = [finding for finding in alarms(result.findings) if finding.check in expected]
    assert matching, f"{name}: expected one of {sorted(expected)}, got {list(result.reported)}"
    assert result.verdict == OK
    assert result.first_detection_step == matching[0].step
    for finding in alarms(result.findings):
        if finding.check in LOCATING_CHECKS:
            assert finding.where is not None, finding.format()


def test_summary_line_counts_the_fast_run(fast_results: dict[str, CaseResult]) -> None:
    results = list(fast_results.values())
    line = summary_line(results)
    match = SUMMARY.match(line)
    assert match is not None, line
    recall, faulty, false_alarms, healthy = map(int, match.groups())
    assert (faulty, healthy) == (len(_faulty_names()), len(_healthy_names()))
    assert recall == sum(result.verdict == OK for result in results if not result.healthy)
    assert false_alarms == sum(bool(alarms(result.findings)) for result in results if result.healthy)
    table = format_table(results).splitlines()
    assert table[-1] == line
    assert all(any(row.startswith(name + " ") for row in table) for name in fast_results)


def _finding(check: str, step: int, severity: Severity = Severity.ERROR) -> Finding:
    return Finding(check, severity, f"{check} at {step}", step, 0, "net.0")


def test_score_verdicts() -> None:
    nan_loss = _finding("non-finite-loss", 4)
    exploding = _finding("exploding-gradients", 9, Severity.WARNING)
    advice = _finding("loss-at-init", 0, Severity.INFO)
    assert score(False, {"exploding-gradients"}, [nan_loss, exploding]) == (OK, 9)
    assert score(False, {"vanishing-gradients"}, [nan_loss]) == (WRONG_DIAGNOSIS, None)
    assert score(False, {"non-finite-loss"}, [advice]) == (MISSED, None)
    assert score(True, set(), [advice]) == (OK, None)
    assert score(True, set(), [advice, exploding]) == (FALSE_ALARM, 9)


def test_summary_line_format() -> None:
    def result(healthy: bool, verdict: str, reported: tuple[str, ...]) -> CaseResult:
        return CaseResult("c", healthy, "", (), reported, (), verdict, None, 0.0, 0, 1.0, 1.0, 0)

    results = [
        result(False, OK, ("non-finite-loss",)),
        result(False, MISSED, ()),
        result(False, WRONG_DIAGNOSIS, ("exploding-gradients",)),
        result(True, OK, ()),
        result(True, FALSE_ALARM, ("exploding-gradients",)),
    ]
    assert summary_line(results) == "recall 1/3, false alarms 1/2"


def test_command_line_prints_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.json"
    assert main(["--case", "mlp-digits", "--json", str(path), "--root-dir", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "recall 0/0, false alarms 0/1"
    assert lines[0].split()[:3] == ["case", "kind", "verdict"]
    payload = json.loads(path.read_text())
    assert payload["summary"] == "recall 0/0, false alarms 0/1"
    assert [record["name"] for record in payload["results"]] == ["mlp-digits"]
    assert (tmp_path / "runs" / "mlp-digits" / "sentinel" / "findings.json").is_file()


def test_command_line_rejects_unknown_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--case", "no-such-case"]) == 2
    assert "unknown case" in capsys.readouterr().err
