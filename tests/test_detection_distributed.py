"""The detection benchmark's DDP cases: registered, launched in subprocesses, scored on rank 0's findings.

The real 2-process runs are slow (two Python processes importing Lightning): one healthy and one faulty
case run under ``-m slow``. The parent-side logic (scoring a rank's record, the one-launch prefetch, the
watchdog that kills hung ranks, calibration values shipped back) is tested here without launching ranks.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.detection import calibration, cases_distributed
from benchmarks.detection.cases import CASES, get_case
from benchmarks.detection.runner import CRASHED, MISSED, OK, run_case, run_cases
from lightning_sentinel import Finding, Severity

REPLICAS = "replicas-out-of-sync"
DISTRIBUTED = [case for case in CASES if cases_distributed.is_distributed(case)]


def test_the_ddp_cases_are_in_the_zoo_with_the_replica_check_as_their_diagnosis() -> None:
    names = {case.name for case in DISTRIBUTED}
    assert names == {case.name for case in cases_distributed.CASES}
    healthy = [case for case in DISTRIBUTED if case.healthy]
    faulty = [case for case in DISTRIBUTED if not case.healthy]
    assert len(healthy) >= 5 and len(faulty) >= 3
    assert all(case.expected == frozenset({REPLICAS}) for case in faulty)
    for case in DISTRIBUTED:
        strategy = case.trainer_kwargs["strategy"]
        assert strategy.startswith("ddp"), case.name  # a Lightning name or one of the module's own
        assert not case.fast  # two processes each: never in the harness's fast run


def _record(findings: list[Finding], **extra: Any) -> dict[str, Any]:
    return {"findings": [finding.to_dict() for finding in findings], "steps": 60, "seconds": 3.0,
            "loss_start": 2.3, "loss_end": 0.4, "architecture": "MLP", **extra}  # fmt: skip


def _drift(step: int = 1) -> Finding:
    return Finding(REPLICAS, Severity.ERROR, "parameter differs", step, 0, "net.0.mean")


def test_a_rank_record_is_scored_like_an_in_process_run() -> None:
    fault = get_case("ddp-running-mean-in-parameter")
    caught = cases_distributed._result(fault, _record([_drift(step=1)]))
    assert (caught.verdict, caught.first_detection_step, caught.reported) == (OK, 1, (REPLICAS,))
    assert caught.findings[0].where == "net.0.mean" and caught.architecture == "MLP"
    advice = Finding(REPLICAS, Severity.INFO, "buffers differ", 10, 0, "net.1.running_mean")
    assert cases_distributed._result(fault, _record([advice])).verdict == MISSED
    healthy = get_case("ddp-cnn-bn-no-broadcast")
    quiet = cases_distributed._result(healthy, _record([advice]))
    assert quiet.verdict == OK and quiet.info == (REPLICAS,)
    assert cases_distributed._result(healthy, {"error": "TimeoutError: killed"}).verdict == CRASHED


def test_prefetch_trains_every_ddp_case_in_one_launch_and_run_case_returns_them(monkeypatch) -> None:
    launches: list[list[str]] = []

    def fake_train(cases, dirs, threads, accelerator):
        launches.append([case.name for case in cases])
        return [(cases_distributed._result(case, _record([])), []) for case in cases]

    monkeypatch.setattr(cases_distributed, "_train", fake_train)
    monkeypatch.setattr(cases_distributed, "_PREFETCHED", {})
    chosen = [get_case("mlp-digits"), *DISTRIBUTED[:3]]
    cases_distributed.prefetch(chosen)
    assert launches == [[case.name for case in DISTRIBUTED[:3]]]  # one launch, the DDP cases only
    results = [run_case(case) for case in DISTRIBUTED[:3]]
    assert [result.name for result in results] == [case.name for case in DISTRIBUTED[:3]]
    assert len(launches) == 1 and cases_distributed._PREFETCHED == {}
    run_case(DISTRIBUTED[0])  # not prefetched any more: launched on its own
    assert launches[-1] == [DISTRIBUTED[0].name]


def test_a_case_that_hangs_is_scored_crashed_and_the_cases_after_it_run_again(monkeypatch, tmp_path) -> None:
    cases = DISTRIBUTED[:3]
    calls: list[list[str]] = []

    def fake_launch(chosen, roots, threads, accelerator):
        calls.append([case.name for case in chosen])
        if len(calls) == 1:  # the second case hangs: the first wrote its result, the others did not
            return [_record([]), None, None], "TimeoutError: killed", "output"
        return [_record([]) for _ in chosen], "", ""

    monkeypatch.setattr(cases_distributed, "_launch", fake_launch)
    outcomes = cases_distributed._train(cases, [None] * 3, 1, "cpu")
    assert calls == [[c.name for c in cases], [cases[2].name]]
    assert [result.error for result, _ in outcomes] == [None, "TimeoutError: killed", None]


def test_the_watchdog_kills_both_ranks_of_a_hung_case(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cases_distributed, "TIMEOUT_S", 0.5)
    # a process that starts a child and both sleep: like rank 0 and the rank 1 it launched
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(child_pid)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    failure = cases_distributed._watch(process, [tmp_path / "never-written.json"])
    assert failure.startswith("TimeoutError") and process.returncode == -signal.SIGKILL
    if child_pid.is_file():  # the child had started: it went with its parent's group
        status = Path(f"/proc/{child_pid.read_text()}/status")
        for _ in range(50):
            if not status.is_file() or "zombie" in status.read_text():
                break
            time.sleep(0.1)
        assert not status.is_file() or "zombie" in status.read_text()


def test_calibration_values_of_the_ranks_join_the_open_recorder_under_the_current_case() -> None:
    statistic = next(probe for probe in calibration.PROBES if probe.check == REPLICAS).statistic
    recorder = calibration.Recorder()
    with calibration.probing(recorder):
        assert calibration.active_recorder() is recorder
        recorder.case = "ddp-mlp-digits"
        cases_distributed._add_calibration([[REPLICAS, statistic, 0.0], ["no-such-check", "x", 1.0]])
    assert calibration.active_recorder() is None
    row = next(row for row in calibration.margins(recorder) if row.check == REPLICAS)
    assert (row.nearest, row.case, row.threshold, row.margin) == (0.0, "ddp-mlp-digits", 1e-5, float("inf"))


@pytest.mark.slow  # two processes importing Lightning, two cases: ~30 s on a quiet core, minutes on a busy one
def test_a_healthy_and_a_faulty_ddp_case_run_for_real(tmp_path) -> None:
    names = ["ddp-mlp-digits", "ddp-running-mean-in-parameter"]
    results = {
        result.name: result for result in run_cases([get_case(n) for n in names], root_dir=str(tmp_path))
    }
    healthy, faulty = results["ddp-mlp-digits"], results["ddp-running-mean-in-parameter"]
    assert healthy.error is None and healthy.verdict == OK and healthy.reported == ()
    assert healthy.steps == 60 and healthy.loss_end < 0.5 * healthy.loss_start
    assert faulty.verdict == OK and faulty.first_detection_step == 1
    drift = next(f for f in faulty.findings if f.check == REPLICAS)
    assert drift.where == "net.0.mean" and drift.severity is Severity.ERROR
    assert (tmp_path / "ddp-running-mean-in-parameter" / "sentinel" / "findings.json").is_file()
