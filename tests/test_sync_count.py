"""Host reads of tensors (host-device syncs on an accelerator) made by ``Sentinel(preset="fast")``, per step.

The cost rule (DESIGN.md): on a step where no check runs, a check reads nothing back from the device;
on a check step it reads at most once. On a CPU-only machine nothing actually waits, so the reads are
counted instead (:class:`benchmarks.host_reads.HostReadCounter`: ``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``bool/float/int/index`` of a tensor made by lightning_sentinel code), per training step
and per check module, against each check's own cadence.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from _models import Classifier, fit

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
from lightning_sentinel.checks import non_finite

STEPS = 60

# What the default suite reads per step against the suite's one clock is tested in tests/test_engine.py
# (test_steps_between_check_steps_read_nothing); this file keeps the counter's own test and the shared norms.


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
    # per step alone: 2 (NaN guard) + 2 (gradients) + 3 (weights before, the sampled update, weights after)
    # norms; shared: the weights before once and the gradients once, + the update and the weights after
    assert (alone, len(calls)) == (4 * 7, 4 * 4)
