"""The detection benchmark's fast subset: healthy cases stay quiet, faulty cases are diagnosed and located.

Runs ``benchmarks/detection`` cases marked ``fast`` (a few seconds on a CPU) through the same
runner as ``python -m benchmarks.detection``, and checks the runner's scoring and summary line.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import pkgutil
import re
from pathlib import Path

import pytest
import torch

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
from lightning_sentinel.catalog import registered_checks

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


def test_command_line_shards_split_the_selection(tmp_path: Path) -> None:
    names = ["mlp-digits", "cnn-bn-dropout-digits", "lr-too-high-sgd"]
    seen = []
    for shard in ("1/2", "2/2"):
        path = tmp_path / f"{shard.replace('/', '-')}.json"
        assert main(["--case", *names, "--shard", shard, "--json", str(path)]) == 0
        seen.append([record["name"] for record in json.loads(path.read_text())["results"]])
    assert seen == [["mlp-digits", "lr-too-high-sgd"], ["cnn-bn-dropout-digits"]]


@pytest.mark.parametrize(
    "argv", [["--shard", "3/2"], ["--shard", "two"], ["--results", "x.md", "--accelerator", "gpu"]]
)
def test_command_line_refuses_bad_shards_and_gpu_results(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------- mutations, twins, results
DEEPCRIME_OPERATORS = {
    "TCL", "TRD", "TUD", "TAN", "TCO", "HBS", "HLR", "HNE", "HDB", "ACH", "ARM", "AAL",
    "RAW", "RCW", "RRW", "RCD", "WCI", "WAB", "WRB", "LCH", "OCH", "OCG",
}  # fmt: skip


def test_every_deepcrime_operator_has_a_mutation_on_a_healthy_program() -> None:
    from benchmarks.detection import zoo_mutations

    assert {mutation.operator for mutation in zoo_mutations.MUTATIONS.values()} == DEEPCRIME_OPERATORS
    for mutation in zoo_mutations.MUTATIONS.values():
        assert set(mutation.programs) <= set(zoo_mutations.PROGRAMS), mutation.name
        assert set(mutation.expected) <= set(registered_checks()), mutation.name


def test_mutation_registry_verdicts_name_real_mutants() -> None:
    from benchmarks.detection import cases_mutations, zoo_mutations

    pairs = {(mutation.name, twin.name) for mutation, twin, _ in zoo_mutations.mutants()}
    assert pairs >= cases_mutations.HARMLESS
    assert set(cases_mutations.OUT_OF_REACH) <= pairs
    assert not cases_mutations.HARMLESS & set(cases_mutations.OUT_OF_REACH)
    names = {case.name for case in cases_mutations.CASES}
    assert len(names) == len(pairs) - len(cases_mutations.HARMLESS) - len(cases_mutations.OUT_OF_REACH)


def test_data_mutations_touch_the_training_split_only() -> None:
    from benchmarks.detection import zoo_mutations

    program = zoo_mutations.PROGRAMS["digits-mlp"]
    (train_x, train_y), (val_x, val_y) = zoo_mutations.splits(program)
    (wrong_x, wrong_y), (same_x, same_y) = zoo_mutations.splits(
        zoo_mutations.MUTATIONS["tcl-100"].apply(program)
    )
    assert torch.equal(same_x, val_x) and torch.equal(same_y, val_y)
    assert torch.equal(wrong_x, train_x) and bool((wrong_y != train_y).all())
    (_, fewer_y), _ = zoo_mutations.splits(zoo_mutations.MUTATIONS["trd-90"].apply(program))
    assert len(fewer_y) == round(0.1 * len(train_y))
    (_, skewed_y), _ = zoo_mutations.splits(zoo_mutations.MUTATIONS["tud-95"].apply(program))
    counts = torch.bincount(skewed_y, minlength=10).float()
    assert counts.max() / counts.min() > 10


def test_model_and_hyperparameter_mutations() -> None:
    from benchmarks.detection import zoo_mutations

    program = zoo_mutations.PROGRAMS["digits-cnn"]
    mutant = zoo_mutations.MUTATIONS["hlr-x1e-4"].apply(program)
    assert mutant.lr == pytest.approx(program.lr * 1e-4) and mutant.name == "digits-cnn-hlr-x1e-4"
    module, _, _ = zoo_mutations.build(zoo_mutations.MUTATIONS["wab"].apply(program))
    assert all(m.bias is not None for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    module, _, _ = zoo_mutations.build(zoo_mutations.MUTATIONS["ach-sigmoid"].apply(program))
    assert not any(isinstance(m, torch.nn.ReLU) for m in module.modules())
    assert any(isinstance(m, torch.nn.Sigmoid) for m in module.modules())


def test_twin_verdict_needs_a_clear_and_noise_proof_gap() -> None:
    from benchmarks.detection.zoo_mutations import TwinComparison

    assert TwinComparison("m", "HLR", "p", (0.05, 0.06, 0.04), (0.30, 0.31, 0.29)).verdict == "faulty"
    assert TwinComparison("m", "HLR", "p", (0.05, 0.06, 0.04), (0.06, 0.06, 0.06)).verdict == "harmless"
    noisy = TwinComparison("m", "HLR", "p", (0.10, 0.30, 0.20), (0.35, 0.35, 0.35))
    assert noisy.margin == pytest.approx(0.3) and noisy.verdict == "harmless"
    assert TwinComparison("m", "HLR", "p", (0.5, 0.5, 0.5), (math.nan, 0.4, 0.4)).verdict == "faulty"


def test_results_scores_steps_and_per_check_rows() -> None:
    from benchmarks.detection.results import check_table, detection_step, step_summary

    caught = CaseResult(
        "f", False, "", ("dead-relu", "model-ignores-input"), ("model-ignores-input", "dead-relu"), (), OK, 0,
        0.0, 60, 2.3, 2.3, 0,
        findings=[_finding("model-ignores-input", 0), _finding("dead-relu", 30, Severity.WARNING)],
    )  # fmt: skip
    quiet = CaseResult("h", True, "", (), (), (), OK, None, 0.0, 60, 2.3, 0.1, 0)
    alarm = CaseResult("a", True, "", (), ("dead-relu",), (), FALSE_ALARM, 5, 0.0, 60, 2.3, 0.1, 0,
                       findings=[_finding("dead-relu", 5, Severity.WARNING)])  # fmt: skip
    assert detection_step(caught) == (0, 30)
    summary = step_summary([caught, quiet, alarm])
    assert (summary["median_first"], summary["median_runtime"], summary["runtime_within_50"]) == (0, 30, 1)
    rows = {row.check: row for row in check_table([caught, quiet, alarm])}
    dead = rows["dead-relu"]
    assert (dead.reported, dead.expected, dead.healthy, dead.caught) == (2, 1, 1, 1)
    assert dead.precision == 0.5
    assert rows["non-finite-loss"].reported == 0


def test_architectures_per_check_and_the_major_check_gaps() -> None:
    from torch import nn

    from benchmarks.detection import zoo, zoo_architectures
    from benchmarks.detection.results import MAJOR_CHECKS, architecture_gaps, check_table
    from benchmarks.detection.runner import architecture_of

    assert architecture_of(zoo.DigitsCNN()) == "CNN"
    assert architecture_of(zoo.mlp([4, 8, 2])) == "MLP"
    assert architecture_of(zoo.RecurrentClassifier(3)) == "RNN"
    assert architecture_of(zoo_architectures.PaddedTokenTransformer(20, 12)) == "Transformer"
    assert architecture_of(nn.ReLU()) == "other"

    def caught(name: str, architecture: str) -> CaseResult:
        return CaseResult(name, False, "", ("dead-relu",), ("dead-relu",), (), OK, 5, 0.0, 60, 2.3, 2.3, 0,
                          architecture=architecture)  # fmt: skip

    rows = check_table([caught("a", "MLP"), caught("b", "MLP")])
    assert next(r for r in rows if r.check == "dead-relu").architectures == ("MLP",)
    gaps = dict(architecture_gaps(rows))
    assert gaps["dead-relu"] == ("MLP",) and gaps["non-finite-loss"] == ()
    assert set(gaps) == {check for checks in MAJOR_CHECKS.values() for check in checks}
    rows = check_table([caught("a", "MLP"), caught("b", "CNN")])
    assert "dead-relu" not in dict(architecture_gaps(rows))


def test_calibration_probe_records_the_nearest_healthy_value() -> None:
    from benchmarks.detection import calibration
    from lightning_sentinel.checks import gradients

    recorder = calibration.Recorder()
    with calibration.probing(recorder):
        recorder.case = "quiet"
        gradients.exploding_verdict(3.0, [1.0, 1.0, 1.0, 1.0, 1.0], 10.0, 1e4, 5)
        recorder.case = "calm"
        gradients.exploding_verdict(2.0, [1.0, 1.0, 1.0, 1.0, 1.0], 10.0, 1e4, 5)
    assert gradients.exploding_verdict.__module__ == "lightning_sentinel.checks.gradients"  # restored
    spike = next(
        row for row in calibration.margins(recorder) if row.statistic == "grad norm / running median"
    )
    assert (spike.nearest, spike.case, spike.threshold) == (3.0, "quiet", 10.0)
    assert spike.margin == pytest.approx(10.0 / 3.0)


def test_calibration_probes_of_the_scale_rules() -> None:
    from benchmarks.detection import calibration
    from lightning_sentinel.checks import curves, gradients

    recorder = calibration.Recorder()
    with calibration.probing(recorder):
        recorder.case = "converged"
        gradients.exploding_verdict(1.6, [0.06] * 5, 10.0, 1e4, 5, 0.8)  # 27x the running median, 2x early
        recorder.case = "drift"  # 24% above its best, 0.24% of ln 10
        curves.overfitting_verdict(
            [1.8, 0.0229, 0.025, 0.026, 0.0284], [2, 0.01, 0.005, 0.003, 0.002], 3, 0.2, 2.3, 0.075
        )
    rows = {row.statistic: row for row in calibration.margins(recorder)}
    assert rows["grad norm / running median"].nearest == pytest.approx(1.6 / 0.06)
    assert rows["grad norm / max(running median, early median)"].nearest == pytest.approx(2.0)
    assert rows["val loss rise over its best (train falling)"].nearest == pytest.approx(0.0055 / 0.0229)
    scale = rows["val loss rise over its best / starting loss (train falling)"]
    assert scale.nearest == pytest.approx(0.0055 / 2.3) and scale.threshold == 0.075


def test_every_check_id_is_the_expected_diagnosis_of_some_fault() -> None:
    expected = set().union(*(case.expected for case in CASES if not case.healthy))
    assert set(registered_checks()) <= expected


@pytest.mark.parametrize(
    "module_name",
    sorted(
        f"benchmarks.detection.{info.name}"
        for info in pkgutil.iter_modules(importlib.import_module("benchmarks.detection").__path__)
        if info.name != "__main__"
    ),
)
def test_benchmark_docstring_examples_run(module_name: str) -> None:
    """The examples in the benchmark's docstrings (outside the package's own doctest run) still hold."""
    result = doctest.testmod(importlib.import_module(module_name), verbose=False)
    assert result.failed == 0 and result.attempted > 0


def test_a_case_trains_under_the_preset_asked_for(tmp_path, monkeypatch):
    from benchmarks.detection import runner

    monkeypatch.delenv(runner.PRESET_ENV, raising=False)
    seen: list[str] = []
    real = runner.Sentinel

    def recording(*args, **kwargs):
        seen.append(kwargs["preset"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "Sentinel", recording)
    assert main(["--case", "mlp-digits", "--preset", "fast", "--root-dir", str(tmp_path)]) == 0
    assert main(["--case", "mlp-digits", "--root-dir", str(tmp_path / "full")]) == 0
    assert seen == ["fast", "full"] and runner.bench_preset() == "full"
