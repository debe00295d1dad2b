import json
import math
import warnings

import pytest

from lightning_sentinel import Finding, SentinelError, SentinelWarning, Severity, load_findings
from lightning_sentinel.findings import FindingLog
from lightning_sentinel.report import findings_markdown, format_report


def _finding(**overrides):
    fields = dict(
        check="non-finite-loss",
        severity=Severity.ERROR,
        message="loss is nan",
        step=3,
        epoch=0,
        where="batch 3",
        evidence={"loss": float("nan"), "lr": 0.1},
        hint="lower the lr",
    )
    fields.update(overrides)
    return Finding(**fields)


def test_finding_is_frozen_and_round_trips_through_json(tmp_path):
    finding = _finding()
    with pytest.raises(AttributeError):
        finding.step = 4  # type: ignore[misc]
    record = finding.to_dict()
    assert set(record) == {"check", "severity", "message", "step", "epoch", "where", "evidence", "hint"}
    assert record["severity"] == "error"
    assert record["evidence"]["loss"] == "nan"  # JSON has no NaN literal
    restored = Finding.from_dict(json.loads(json.dumps(record)))
    assert restored.check == finding.check and restored.where == "batch 3"
    assert math.isnan(restored.evidence["loss"]) and restored.evidence["lr"] == 0.1


def test_finding_log_writes_every_field(tmp_path):
    log = FindingLog()
    assert log.write() is None  # no directory known yet: nothing written
    log.directory = str(tmp_path)
    log.add(_finding())
    log.add(_finding(check="exploding-gradients", severity=Severity.WARNING, where=None))
    path = log.write()
    assert path == str(tmp_path / "sentinel" / "findings.json")
    loaded = load_findings(path)
    assert [f.check for f in loaded] == ["non-finite-loss", "exploding-gradients"]
    assert loaded[1].severity is Severity.WARNING and loaded[1].where is None


def test_warning_and_error_types():
    assert issubclass(SentinelWarning, UserWarning)
    error = SentinelError(_finding())
    assert isinstance(error, RuntimeError)
    assert error.finding.check == "non-finite-loss"
    assert "non-finite-loss" in str(error) and "lower the lr" in str(error)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=SentinelWarning)
        with pytest.raises(SentinelWarning):
            warnings.warn(SentinelWarning("x"), stacklevel=1)


def test_severity_order():
    assert Severity.INFO.rank < Severity.WARNING.rank < Severity.ERROR.rank


def test_report_formats():
    assert format_report([], ["a", "b"], None) == "lightning-sentinel: all 2 checks passed (a, b)."
    text = format_report([_finding()], ["non-finite-loss"], "/x/findings.json")
    assert (
        "non-finite-loss" in text
        and "batch 3" in text
        and "lower the lr" in text
        and "/x/findings.json" in text
    )
    markdown = findings_markdown([_finding(message="a | b")])
    assert markdown.startswith("| severity | check |") and "a \\| b" in markdown
