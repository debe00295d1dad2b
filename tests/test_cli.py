"""The lightning-sentinel command."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lightning_sentinel.catalog import registered_checks
from lightning_sentinel.cli import main


def test_checks_lists_every_registered_id(capsys):
    assert main(["checks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["check", "id", "callback", "severity"]
    rows = [line.split() for line in lines[1:] if not line.startswith(" ")]  # wrapped lines are indented
    assert [row[0] for row in rows] == list(registered_checks())
    assert rows[0][:4] == ["non-finite-loss", "NonFiniteGuard", "error", "stop"]
    assert sum("rule: " in line for line in lines) == len(registered_checks())


def test_checks_json_has_every_field_of_every_id(capsys):
    assert main(["checks", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [record["check"] for record in records] == list(registered_checks())
    by_id = {record["check"]: record for record in records}
    assert by_id["exploding-gradients"]["callback"] == "GradientNormMonitor"
    assert by_id["exploding-gradients"]["default_action"] == "warn"
    assert by_id["non-finite-loss"]["default_action"] == "stop"
    assert all(record["meaning"] and record["default_rule"] and record["severity"] for record in records)


def test_demo_is_quiet_on_the_healthy_model_and_catches_both_broken_ones(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    healthy, log_fault, lr_fault = out.split("=== ")[1:4]
    assert "no findings: all checks passed." in healthy
    assert "non-finite-activation at net.3" in log_fault and "SafeLogNormalizer" in log_fault
    # the update is far larger than the weights from step 1, and they turn NaN (the loss is still finite)
    assert "update-ratio-too-high" in lr_fault and "non-finite-weights" in lr_fault and "try:" in lr_fault


def test_doctor_self_check_passes(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "lightning" in out and "self-check" in out and " ok " in out


@pytest.mark.parametrize("command", [[], ["demo"], ["doctor"], ["checks"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lightning-sentinel {' '.join(command)}".rstrip()) and "exit status" in out


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["checks", "--bogus"], ["doctor", "--config"]])
def test_usage_errors_exit_2_on_stderr(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error:" in captured.err


def test_doctor_missing_config_is_a_usage_error(tmp_path, capsys):
    assert main(["doctor", "--config", str(tmp_path / "missing.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no such config file" in captured.err


@pytest.mark.skipif(shutil.which("lightning-sentinel") is None, reason="console script not installed")
def test_console_script_is_installed():
    result = subprocess.run(["lightning-sentinel", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("lightning-sentinel ")


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_doctor_config_passes_a_healthy_config(tmp_path, capsys):
    assert main(["doctor", "--config", str(EXAMPLES / "doctor.yaml"), "--root-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "checks passed" in out and "cannot-overfit-batch" in out  # the preflight trials ran
    assert json.loads((tmp_path / "sentinel" / "findings.json").read_text()) == []


def test_doctor_config_fails_on_permuted_labels(tmp_path, capsys):
    config = EXAMPLES / "doctor_broken_labels.yaml"
    assert main(["doctor", "--config", str(config), "--root-dir", str(tmp_path)]) == 1
    assert "model-ignores-input" in capsys.readouterr().out
    records = json.loads((tmp_path / "sentinel" / "findings.json").read_text())
    assert [(r["check"], r["severity"]) for r in records] == [("model-ignores-input", "error")]
