"""The suite's engine: the clock's schedule, the batched reads, the budget, and what quiet steps cost.

These test the schedule (which steps are check steps, what runs on the others), never time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, MetricsRecorder, classification_loader, fit

from benchmarks.host_reads import HostReadCounter
from benchmarks.op_count import SentinelOpCounter
from lightning_sentinel import NonFiniteGuard, Sentinel, findings
from lightning_sentinel.engine import CheckClock, DeviceReads, Persistence, budget_interval


def _checks(clock: CheckClock, cycles: range) -> list[int]:
    return [cycle for cycle in cycles if clock.decide(cycle)]


def test_the_clock_is_dense_at_the_start_then_every_n():
    assert _checks(CheckClock(10), range(45)) == [0, 1, 2, 4, 8, 10, 20, 30, 40]
    assert _checks(CheckClock(1), range(5)) == [0, 1, 2, 3, 4]
    assert _checks(CheckClock(3), range(10)) == [0, 1, 2, 3, 6, 9]
    assert _checks(CheckClock(10, warmup_steps=5), range(30)) == [5, 6, 7, 9, 13, 15, 25]


def test_one_answer_per_cycle_and_a_resume_continues_the_schedule():
    clock = CheckClock(10)
    assert [clock.decide(0), clock.decide(0), clock.decide(1), clock.decide(1)] == [True, True, True, True]
    assert (
        clock.check_steps == 1 and clock.early
    )  # asked twice per cycle; regular ones counted (0), 1 is early
    _checks(clock, range(2, 15))
    resumed = CheckClock(10)
    resumed.load_state_dict(clock.state_dict())
    assert _checks(resumed, range(15, 45)) == _checks(clock, range(15, 45)) == [20, 30, 40]
    assert resumed.check_steps == clock.check_steps
    clock.reset()
    assert _checks(clock, range(3)) == [0, 1, 2]


def test_a_stretched_interval_moves_the_next_check_step():
    clock = CheckClock(10)
    _checks(clock, range(31))  # last check at 30
    clock.stretch(25)
    assert _checks(clock, range(31, 90)) == [55, 80]


def test_the_budget_interval_grows_with_the_measured_share_and_stays_in_bounds():
    assert budget_interval(0.04, 10, 0.01, shortest=10, longest=1000) > 10
    assert budget_interval(0.001, 40, 0.01, shortest=10, longest=1000) < 40
    assert budget_interval(0.5, 10, 0.01, shortest=10, longest=1000) <= 1000
    assert budget_interval(0.0, 10, 0.01, shortest=10, longest=1000) >= 10


def test_device_reads_read_once_per_flush_and_hand_each_their_numbers():
    reads, got = DeviceReads(), {}
    reads.request(torch.tensor([1.0, 2.0]), lambda values: got.__setitem__("a", values))
    reads.request(torch.tensor(3.0), lambda values: got.__setitem__("b", values))
    counter = HostReadCounter()
    with counter:
        reads.flush()
    assert got == {"a": [1.0, 2.0], "b": [3.0]}
    assert counter.total == 1 and len(reads) == 0


def test_persistence_needs_the_condition_over_a_span_of_steps():
    held = Persistence()
    assert not held.update("x", True, step=0, span=20)
    assert not held.update("x", True, step=10, span=20)
    assert held.update("x", True, step=20, span=20)
    assert not held.update("x", False, step=30, span=20)
    assert not held.update("x", True, step=40, span=20)  # started over


class _PerStep(pl.Callback):
    """What the counters saw from the start of one training batch to the start of the next."""

    def __init__(self, reads: HostReadCounter, ops: SentinelOpCounter) -> None:
        self.reads, self.ops, self.rows = reads, ops, []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append((trainer.global_step - 1, self.reads.take(), self.ops.take()))

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append((trainer.global_step - 1, self.reads.take(), self.ops.take()))


@pytest.mark.parametrize("checks", [[NonFiniteGuard()], None], ids=["guard", "fast-preset"])
def test_steps_between_check_steps_read_nothing(checks, tmp_path):
    """On a step that is not a check step of the suite's clock, no check of the default suite reads a
    tensor back; on a check step the suite reads at most 3 times (the whole suite, not per check)."""
    steps = 60
    reads, ops = HostReadCounter(), SentinelOpCounter()
    per_step = _PerStep(reads, ops)
    sentinel = Sentinel(checks=checks) if checks else Sentinel()
    with reads, ops:
        trainer = fit(
            Classifier(),
            [per_step, sentinel],
            classification_loader(n=32 * steps),
            root=tmp_path,
            max_steps=steps,
            logger=MetricsRecorder(),
        )
    assert [f for f in findings(trainer) if f.severity.value != "info"] == []
    due = set(_checks(CheckClock(10), range(steps)))
    rows = per_step.rows[1:]  # [i]: step i (its end hooks included), up to the next batch's start
    assert len(rows) == steps
    quiet = [(step, r, o) for step, r, o in rows if step not in due]
    assert len(quiet) >= 45
    for step, read, _ in quiet:
        allowed = {
            key for key in read if key[0] == "checks/curves.py"
        }  # its own chunks (not yet on the clock)
        assert sum(n for key, n in read.items() if key not in allowed) == 0, (step, read)
    # step 0 judges the initialisation once (loss at init, the first batch): its reads are once per run
    heavy = {step: dict(read) for step, read, _ in rows if sum(read.values()) > 3 and step > 0}

    assert not heavy, heavy
    if checks:  # the NaN guard alone: four constant-size device ops on a quiet step, nothing else
        assert all(sum(op.values()) == 4 for _, _, op in quiet), Counter(
            sum(op.values()) for _, _, op in quiet
        )
