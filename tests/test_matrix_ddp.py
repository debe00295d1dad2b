"""The DDP rows of the test matrix: 2 CPU processes (gloo), every run bounded by a timeout.

Each scenario of ``tests/scripts/ddp_matrix.py`` runs in its own process group, killed as a whole on
timeout (a hung collective would otherwise leave the second rank behind). A few scenarios run by
default; the rest are marked slow (``-m slow``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from _launch import launch

from lightning_sentinel import load_findings

SCRIPT = Path(__file__).parent / "scripts" / "ddp_matrix.py"
TIMEOUT_S = 180


def run_scenario(
    scenario: str, root: Path, strategy: str = "ddp", ranks: frozenset[int] = frozenset({0, 1})
) -> tuple[dict[int, dict[str, Any]], str]:
    """Run one scenario; return each rank's result record and the combined output (for messages)."""
    output = launch(
        [sys.executable, str(SCRIPT), scenario, str(root), strategy], TIMEOUT_S, f"DDP scenario {scenario!r}"
    )
    results = {}
    for path in root.glob("result-*.json"):
        record = json.loads(path.read_text())
        results[record["rank"]] = record
    assert set(results) == ranks, output[-3000:]
    return results, output


def _checks(record: dict[str, Any]) -> set[str]:
    return {check for check, *_ in record["findings"]}


def test_a_check_failing_on_one_rank_does_not_hang_the_others_and_both_still_stop(tmp_path):
    """Open problem (a): GradientNormMonitor fails (and disables itself) on rank 1 only; the stop/raise
    agreement must not depend on it, and a NaN on rank 1 at step 6 (read at the check step 8) still stops
    both ranks together."""
    results, output = run_scenario("crash-rank1", tmp_path)
    assert {r["outcome"] for r in results.values()} == {"stopped"}, output[-3000:]
    assert results[0]["step"] == results[1]["step"] == 9  # acted at the end of check step 8's batch
    assert any("GradientNormMonitor failed" in w for w in results[1]["warnings"])
    assert not any("failed" in w for w in results[0]["warnings"])
    # rank zero never saw a NaN itself, yet records and writes rank 1's finding
    assert ["non-finite-loss", "batch 2", 8, "error"] in results[0]["findings"]  # step 6 is batch 2
    written = load_findings(tmp_path / "sentinel" / "findings.json")
    # the update after step 6 carried the NaN into the weights before the check read it
    assert (written[0].check, written[0].step) == ("non-finite-loss", 8)
    assert {f.check for f in written} <= {"non-finite-loss", "non-finite-weights"}


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_in_the_same_step(tmp_path):
    """Open problem (b): with every check in stop mode the agreement runs after every check step (0, 1, 2, 4,
    8, ...): the NaN of step 3 is read at step 4 on rank 1, and both ranks stop after that step."""
    results, output = run_scenario("nan-stop", tmp_path)
    assert {r["outcome"] for r in results.values()} == {"stopped"}, output[-3000:]
    assert results[0]["step"] == results[1]["step"] == 5
    assert "non-finite-loss" in _checks(results[0])
    assert _checks(results[0]) <= {"non-finite-loss", "non-finite-weights"}  # the step-3 update spread it


@pytest.mark.slow
def test_warn_mode_findings_of_any_rank_reach_rank_zero_at_the_end(tmp_path):
    results, output = run_scenario("nan-warn", tmp_path)
    assert {r["outcome"] for r in results.values()} == {"finished"}, output[-3000:]
    assert results[0]["step"] == results[1]["step"] == 8
    # rank 1's own NaN at step 3, read at the check step 4 (rank 0 sees NaN weights from step 4 on)
    assert ["non-finite-loss", "batch 3", 4, "error"] in results[0]["findings"]
    written = load_findings(tmp_path / "sentinel" / "findings.json")
    assert ("non-finite-loss", "batch 3", 4) in {(f.check, f.where, f.step) for f in written}


@pytest.mark.slow
def test_raise_with_a_check_failing_on_one_rank_raises_on_both(tmp_path):
    results, output = run_scenario("crash-rank1-raise", tmp_path)
    assert {r["outcome"] for r in results.values()} == {"raised:non-finite-loss"}, output[-3000:]
    assert results[0]["step"] == results[1]["step"]


@pytest.mark.slow
def test_default_suite_acts_within_the_guards_interval(tmp_path):
    """``Sentinel()``: only NonFiniteGuard stops, so the ranks agree on the suite's check steps (0, 1, 2, 4, 8,
    then every 10th): the NaN of step 3 is read and acted on at step 4."""
    results, output = run_scenario("nan-default", tmp_path)
    assert {r["outcome"] for r in results.values()} == {"stopped"}, output[-3000:]
    assert results[0]["step"] == results[1]["step"] == 5


@pytest.mark.slow
def test_full_preset_healthy_run_with_validation_raises_nothing(tmp_path):
    results, output = run_scenario("full-healthy", tmp_path)
    assert {r["outcome"] for r in results.values()} == {"finished"}, output[-3000:]
    assert results[0]["step"] == results[1]["step"] == 16
    for record in results.values():
        assert [f for f in record["findings"] if f[3] != "info"] == []


@pytest.mark.slow
def test_preflight_trials_run_on_both_ranks_without_desync_and_raise_together(tmp_path):
    """Open problem (d): every rank runs the trials (no collectives inside), and the verdicts meet at
    the agreement; a model that ignores its input raises the same finding on both ranks."""
    results, output = run_scenario("preflight-raise", tmp_path)
    outcomes = {r["outcome"] for r in results.values()}
    assert len(outcomes) == 1 and outcomes.pop().startswith("raised:"), output[-3000:]
    assert results[0]["step"] == results[1]["step"] == 0
    assert "model-ignores-input" in _checks(results[0]) | _checks(results[1])


@pytest.mark.slow
def test_input_statistics_are_pooled_over_ranks(tmp_path):
    """Open problem (c): rank 1's inputs are 1000x larger; rank 0's own statistics look normal, the
    pooled ones do not, and both ranks report it."""
    results, output = run_scenario("scaled-rank1", tmp_path)
    for record in results.values():  # 160 rows per rank are below min_samples=256; the pooled 320 are not
        found = [(check, step) for check, _, step, _ in record["findings"] if check == "unnormalized-inputs"]
        # the first window of 5 sampled batches: check steps 0, 1, 2, 4, 8 (BatchInspector takes the early ones)
        assert found == [("unnormalized-inputs", 8)], output[-3000:]


@pytest.mark.slow
def test_ddp_spawn_stops_both_ranks(tmp_path):
    """Under ddp_spawn only the launching process prints (its trainer learns nothing back from the spawned
    ranks); the spawned rank zero writes the file."""
    _, output = run_scenario("nan-stop", tmp_path, strategy="ddp_spawn", ranks=frozenset({0}))
    assert "Traceback" not in output, output[-3000:]
    written = load_findings(tmp_path / "sentinel" / "findings.json")
    assert (written[0].check, written[0].step) == ("non-finite-loss", 4)
