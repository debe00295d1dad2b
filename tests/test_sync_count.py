"""Host reads of tensors (host-device syncs on an accelerator) made by ``Sentinel(preset="fast")``, per step.

The cost rule (DESIGN.md): on a step where no check runs, a check reads nothing back from the device;
on a check step it reads at most once. On a CPU-only machine nothing actually waits, so the reads are
counted instead (:class:`benchmarks.host_reads.HostReadCounter`: ``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``bool/float/int/index`` of a tensor made by lightning_sentinel code), per training step
and per check module, against each check's own cadence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, MetricsRecorder, classification_loader, fit

from benchmarks.host_reads import HostReadCounter
from lightning_sentinel import (
    GradientNormMonitor,
    NonFiniteGuard,
    ParameterUpdateMonitor,
    Sentinel,
    _stats,
    findings,
)
from lightning_sentinel._hooks import FiniteProbe
from lightning_sentinel.checks import data, non_finite

STEPS = 60

# per check module: on which 0-based optimizer steps it may read, given its every_n_steps (n)
DUE: dict[str, Callable[[int, int], bool]] = {
    "checks/non_finite.py": lambda i, n: i % n == 0,
    "checks/gradients.py": lambda i, n: i % n == 0,
    "checks/data.py": lambda i, n: i % n == 0,  # one batch per step here: micro-batch index == step
    "checks/loss_at_init.py": lambda i, n: i == 0,
    "checks/activations.py": lambda i, n: i % n == 0,
    "checks/loss_inputs.py": lambda i, n: i % n == 0,
    "checks/label_noise.py": lambda i, n: i % n == 0,
    "checks/modes.py": lambda i, n: i == 0 or i % n == 0,
    "checks/parameters.py": lambda i, n: i % n == 0,
    "checks/curves.py": lambda i, n: (i + 1) % n == 0,  # judges after its n-th step
    "checks/weight_decay.py": lambda i, n: i % n == 0,  # reads plain floats off the optimizer: nothing
    "checks/replicas.py": lambda i, n: (
        i % n == 0
    ),  # under DDP only (one gather, one read); one process: nothing
}
# the reads a CPU tensor gets at once by design (no device to sync with): (module, function) -> at most per step
CPU_READS_AT_ONCE = {
    ("checks/non_finite.py", "on_before_backward"): 1,
    ("checks/data.py", "_count_non_finite"): 1,
}


class _PerStep(pl.Callback):
    """Collects the counter's reads per training step (first in the callback list)."""

    def __init__(self, counter: HostReadCounter) -> None:
        self.counter = counter
        self.steps: list[Counter[tuple[str, str, str]]] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps.append(self.counter.take())  # the reads since the previous batch started

    def on_train_end(self, *args: Any) -> None:
        self.steps.append(self.counter.take())


def _count(accelerator_path: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> tuple[Sentinel, list]:
    if accelerator_path:  # what a GPU run does: the loss flag and batch NaN counts stay on the device
        monkeypatch.setattr(non_finite, "on_host", lambda tensor: False)
        monkeypatch.setattr(data, "on_host", lambda tensor: False)
    counter = HostReadCounter()
    per_step = _PerStep(counter)
    sentinel = Sentinel()
    with counter:
        trainer = fit(
            Classifier(),
            [per_step, sentinel],
            classification_loader(n=32 * STEPS),
            root=tmp_path,
            max_steps=STEPS,
            logger=MetricsRecorder(),
        )
    assert findings(trainer) == []
    assert per_step.steps[0] == Counter()  # nothing read before the first batch
    return sentinel, per_step.steps[1:]  # [i]: from the start of step i to the start of step i + 1


def _cadences(sentinel: Sentinel) -> dict[str, int]:
    return {
        "checks/" + type(check).__module__.rsplit(".", 1)[1] + ".py": check.every_n_steps
        for check in sentinel.checks
    }


@pytest.mark.parametrize("accelerator_path", [False, True], ids=["cpu", "accelerator-path"])
def test_fast_preset_reads_nothing_between_checks_and_once_per_check(accelerator_path, monkeypatch, tmp_path):
    sentinel, steps = _count(accelerator_path, monkeypatch, tmp_path)
    assert len(steps) == STEPS
    cadence = _cadences(sentinel)
    assert set(cadence) == set(DUE)
    off_check_steps = 0
    for i, reads in enumerate(steps):
        at_once = Counter({(module, function): n for (module, function, _), n in reads.items()})
        for key, allowed in CPU_READS_AT_ONCE.items():
            if not accelerator_path:
                assert at_once[key] <= allowed, (i, key, reads)
                at_once.pop(key, None)
        per_module: Counter[str] = Counter()
        for (module, _), n in at_once.items():
            per_module[module] += n
        for module, n in per_module.items():
            assert module in DUE, f"step {i}: {module} read a tensor: {reads}"
            assert DUE[module](i, cadence[module]), f"step {i}: {module} is not due but read {reads}"
            assert n <= 1, f"step {i}: {module} read {n} times: {reads}"
        if not any(due(i, cadence[module]) for module, due in DUE.items()):
            off_check_steps += 1
            assert not per_module, (i, reads)
    assert off_check_steps >= 20  # the test saw steps where no check is due
    # and the checks did run and read: every module with a host decision read on some step
    modules = {module for reads in steps for (module, _, _) in reads}
    assert {
        "checks/non_finite.py",
        "checks/gradients.py",
        "checks/data.py",
        "checks/loss_at_init.py",
        "checks/parameters.py",
        "checks/curves.py",
    } <= modules


def test_cpu_loss_is_read_at_once_and_only_there(monkeypatch, tmp_path):
    _, steps = _count(False, monkeypatch, tmp_path)
    loss_reads = [reads[("checks/non_finite.py", "on_before_backward", "item")] for reads in steps]
    assert loss_reads == [1] * STEPS  # one read of the CPU loss per micro-batch


def test_counter_charges_a_read_to_lightning_sentinel_code_only():
    original = torch.Tensor.item
    probe = FiniteProbe(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    counter = HostReadCounter()
    with counter:
        assert torch.ones(()).item() == 1.0  # this test file: not lightning_sentinel code
        assert float(torch.ones(())) == 1.0
        non_finite.tensor_norms([torch.ones(4)])  # a helper that does not read
        assert counter.total == 0
        with probe:
            probe.root(torch.ones(1, 2))
        assert probe.first_failure() is None  # reads its records back with one .tolist()
    assert counter.reads == Counter({("_hooks.py", "first_failure", "tolist"): 1})
    assert torch.Tensor.item is original  # restored on exit


def test_sentinel_checks_share_the_norms_of_one_optimizer_step(monkeypatch, tmp_path):
    calls: list[int] = []
    compute = _stats._tensor_norms

    def counting(tensors: Any, out_device: Any) -> torch.Tensor:
        calls.append(len(tensors))
        return compute(tensors, out_device)

    monkeypatch.setattr(_stats, "_tensor_norms", counting)

    def make() -> list:
        return [
            NonFiniteGuard(every_n_steps=1),
            GradientNormMonitor(every_n_steps=1),
            ParameterUpdateMonitor(every_n_steps=1),
        ]

    fit(Classifier(), make(), root=tmp_path, max_steps=4)
    alone = len(calls)
    calls.clear()
    trainer = fit(Classifier(), [Sentinel(checks=make(), every_n_steps=1)], root=tmp_path, max_steps=4)
    assert findings(trainer) == []
    # per step alone: 2 (NaN guard) + 2 (gradients) + 2 (snapshot weights, update) norms; shared: the
    # weights once and the gradients once, + the update
    assert (alone, len(calls)) == (4 * 6, 4 * 3)
