"""Long runs (3000 optimizer steps) of the detection zoo under both presets: a converged model that stays
converged is quiet, and a late fault is still caught. Each takes one to two minutes: marked slow (the
default run tests the same rules on recorded and hand-made curves in test_gradients.py and test_curves.py).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from benchmarks.detection import runner
from benchmarks.detection.cases import get_case
from lightning_sentinel import Sentinel, Severity, findings

pytestmark = pytest.mark.slow


def _run(name: str, preset: str, root) -> list:
    case = get_case(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with runner._quiet():
            pl.seed_everything(case.seed, verbose=False)
            module, train, val = case.build()
            trainer = runner._trainer(case, str(root), [Sentinel(preset=preset, on_detect="warn")])
            trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    finally:
        torch.set_num_threads(threads)
    assert trainer.global_step == case.trainer_kwargs["max_steps"]
    return [finding for finding in findings(trainer) if finding.severity is not Severity.INFO]


@pytest.mark.parametrize("preset", ["fast", "full"])
@pytest.mark.parametrize("name", ["long-3000-digits-mlp-adamw-constant", "long-3000-digits-mlp-adamw-cosine"])
def test_a_long_converged_digits_mlp_is_quiet(tmp_path, name, preset):
    # before the rules weighed the size of what moved: overfitting (val 0.068 -> 0.119 on a loss that started
    # at 2.3) and exploding-gradients (a hard batch 26x the running median of a converged model)
    alarms = _run(name, preset, tmp_path)
    assert alarms == [], [finding.format() for finding in alarms]


def test_a_learning_rate_jump_late_in_a_long_run_is_caught(tmp_path):
    alarms = _run("late-lr-jump-digits-mlp", "fast", tmp_path)
    late = [(finding.check, finding.where) for finding in alarms if finding.step >= 2000]
    assert ("loss-divergence", "loss") in late
    assert any(check == "exploding-gradients" and where.startswith("net.") for check, where in late)
    assert all(finding.step >= 2000 for finding in alarms if finding.check != "overfitting")
