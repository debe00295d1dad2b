"""LearningCurveMonitor: pure rules, scripted loss curves through the real Trainer, and real fault cases."""

from __future__ import annotations

import math
import random

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, classification_loader, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.detection.cases import get_case
from benchmarks.detection.runner import alarms, run_case
from lightning_sentinel import Sentinel, findings
from lightning_sentinel.checks.curves import (
    DIVERGENCE,
    NOT_DECREASING,
    OSCILLATION,
    OVERFITTING,
    LearningCurveMonitor,
    chunk_statistics,
    divergence_verdict,
    loss_from_outputs,
    not_decreasing_verdict,
    oscillation_verdict,
    overfitting_verdict,
    smoothed_loss,
)

CURVE_CHECKS = {NOT_DECREASING, DIVERGENCE, OSCILLATION, OVERFITTING}


def _ours(trainer: pl.Trainer, check: str | None = None) -> list:
    return [f for f in findings(trainer) if f.check in CURVE_CHECKS and (check is None or f.check == check)]


# ---------------------------------------------------------------------- pure rules
def test_smoothing_and_chunk_statistics():
    assert smoothed_loss([9.0, 1.0, 2.0, 100.0, 3.0], 3) == 3.0
    assert math.isnan(smoothed_loss([], 3))
    mean, swing = chunk_statistics([2.0, 1.5, 1.0, 0.5, 0.0])  # a steady fall is not a swing
    assert mean == 1.0 and swing == pytest.approx(0.0, abs=1e-12)
    assert chunk_statistics([1.0, 5.0, 1.0, 5.0, 1.0])[1] == pytest.approx(4.0)
    assert math.isnan(chunk_statistics([float("nan")])[0])


def test_divergence_rule():
    assert divergence_verdict(5.0, 2.3, 2.3, 2.0, 0.25)[0]  # climbing from the start
    assert divergence_verdict(1.0, 0.1, 0.7, 2.0, 0.25)[0]  # came down to 0.1, back up to 1.0
    assert not divergence_verdict(0.003, 0.001, 0.7, 2.0, 0.25)[0]  # converged: a tiny wobble
    assert not divergence_verdict(0.3, 0.1, 2.3, 2.0, 0.25)[0]  # a restart bump, far below the start
    assert not divergence_verdict(3.0, 2.0, 2.3, 2.0, 0.25)[0]
    assert divergence_verdict(0.5, -3.0, 0.0, 2.0, 0.25)[0]  # a negative loss (e.g. an NLL) rising by |best|


def test_not_decreasing_rule():
    stuck, improvement = not_decreasing_verdict(2.30, 2.28, 0.05)
    assert stuck and improvement == pytest.approx(0.02 / 2.30)
    assert not not_decreasing_verdict(2.30, 1.0, 0.05)[0]
    assert not not_decreasing_verdict(0.0, 0.0, 0.05)[0]  # nothing to improve on


def test_oscillation_rule():
    assert oscillation_verdict([3.0, 2.0, 4.0, 0.1, 3.0], 1.0, 1.5, 5) == (True, 3.0)
    assert not oscillation_verdict([3.0, 2.0, 4.0, 0.1], 1.0, 1.5, 5)[0]  # too few chunks
    assert not oscillation_verdict([0.5, 3.5, 0.4, 0.5, 0.6], 2.3, 1.5, 5)[0]  # one noisy chunk


def test_overfitting_rule():
    val = [1.0, 0.8, 0.85, 0.9, 0.95]
    train = [1.0, 0.6, 0.4, 0.3, 0.2]
    assert overfitting_verdict(val, train, 3, 0.1) == (True, 1)
    assert not overfitting_verdict(val, train, 4, 0.1)[0]  # best is only 3 runs old
    assert not overfitting_verdict(val, [1.0, 0.6, 0.7, 0.8, 0.9], 3, 0.1)[
        0
    ]  # train rising too: not overfitting
    assert not overfitting_verdict([1.0, 0.8, 0.82, 0.83, 0.84], train, 3, 0.1)[0]  # within 10%


def test_overfitting_rule_weighs_the_rise_against_the_starting_loss():
    # the 3000-step digits MLP: 0.0229 -> 0.0284 (24% above its best) on a loss that started at ln(10)
    val = [1.8, 0.2, 0.05, 0.0229, 0.025, 0.026, 0.027, 0.0284]
    train = [2.0, 0.3, 0.05, 0.01, 0.005, 0.003, 0.002, 0.001]
    assert overfitting_verdict(val, train, 3, 0.2)[0]  # the relative rule alone alarms
    assert not overfitting_verdict(val, train, 3, 0.2, math.log(10), 0.075)[0]  # 0.24% of the scale
    # wrong labels memorised: back up by a third of the starting loss
    memorised = [1.8, 0.6, 0.45, 0.5, 0.7, 0.9, 1.1, 1.3]
    assert overfitting_verdict(memorised, train, 3, 0.2, math.log(10), 0.075) == (True, 2)
    # a regression in raw units (MSE ~4000 at the start): the scale comes with the loss
    assert not overfitting_verdict([x * 4000 for x in val], train, 3, 0.2, 4000.0, 0.075)[0]
    assert overfitting_verdict([x * 4000 for x in memorised], train, 3, 0.2, 4000.0, 0.075)[0]
    # a training loss sitting converged near 0 (wobbling 1e-5 -> 1.3e-5) while the validation loss climbs
    at_floor = [2.0, 0.3, 0.01, 1e-5, 1.1e-5, 1.2e-5, 1.3e-5, 1.3e-5]
    assert overfitting_verdict(memorised, at_floor, 3, 0.2, math.log(10), 0.075)[0]
    # both climbing together is divergence, not overfitting
    assert not overfitting_verdict(memorised, [2.0, 0.3, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9], 3, 0.2, 2.3, 0.05)[0]
    # no scale known (validation before any training chunk): the relative rule alone
    assert overfitting_verdict(val, train, 3, 0.2, math.nan, 0.05)[0]


def test_loss_from_outputs():
    assert loss_from_outputs(torch.tensor(2.0)).item() == 2.0
    assert loss_from_outputs({"loss": torch.tensor([3.0])}).item() == 3.0
    assert loss_from_outputs({"other": 1}) is None
    assert loss_from_outputs(torch.ones(3)) is None


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("every_n_steps", 0),
        ("smoothing", 0),
        ("patience_steps", -1),
        ("min_improvement", 0.0),
        ("min_improvement", 1.5),
        ("divergence_factor", 1.0),
        ("oscillation_factor", float("inf")),
        ("overfit_patience", 0),
        ("overfit_min_rise", -0.1),
        ("overfit_min_scale_rise", -0.01),
        ("monitor", ""),
    ],
)
def test_bad_arguments_are_refused_by_name(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        LearningCurveMonitor(**{argument: value})


# ---------------------------------------------------------------------- scripted curves, real Trainer
class Scripted(pl.LightningModule):
    """Returns a scripted training loss per micro-batch (and logs a scripted ``val_loss`` per validation)."""

    def __init__(self, losses, val_losses=None, manual=False, val_key="val_loss"):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.losses = list(losses)
        self.val_losses = val_losses
        self.val_key = val_key
        self.calls = 0
        self.validations = 0
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        value = self.losses[min(self.calls, len(self.losses) - 1)]
        self.calls += 1
        loss = self.w * 0.0 + value
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def validation_step(self, batch, batch_idx):
        if self.val_losses is not None:
            self.log(self.val_key, self.val_losses[min(self.validations, len(self.val_losses) - 1)])

    def on_validation_epoch_end(self):
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader(n=1000):
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def _noisy(levels, noise=0.05, seed=0):
    rng = random.Random(seed)
    return [level * (1 + rng.uniform(-noise, noise)) for level in levels]


def test_flat_loss_is_not_decreasing(tmp_path):
    monitor = LearningCurveMonitor()
    trainer = fit(Scripted(_noisy([2.3] * 200)), [monitor], loader=_loader(), root=tmp_path, max_steps=150)
    found = _ours(trainer)
    assert [f.check for f in found] == [NOT_DECREASING]
    assert found[0].step == 100 and found[0].where == "loss"
    assert (
        abs(found[0].evidence["relative_improvement"]) < 0.05 and "raise the learning rate" in found[0].hint
    )


def test_healthy_decay_with_noise_and_a_restart_is_silent(tmp_path):
    levels = [2.3 * math.exp(-i / 40) + 0.05 for i in range(300)]
    levels[150:] = [0.6 * math.exp(-i / 30) + 0.05 for i in range(150)]  # a warm restart bumps the loss
    trainer = fit(
        Scripted(_noisy(levels, noise=0.3)),
        [LearningCurveMonitor()],
        loader=_loader(),
        root=tmp_path,
        max_steps=300,
    )
    assert _ours(trainer) == []


def test_real_healthy_training_is_silent(tmp_path):
    monitor = LearningCurveMonitor()
    trainer = fit(
        Classifier(lr=0.05), [monitor], loader=classification_loader(n=512), root=tmp_path, max_steps=200
    )
    assert _ours(trainer) == []
    assert math.isfinite(monitor._best) and monitor._best < 0.5 * monitor._start


@pytest.mark.parametrize("variant", ["automatic", "accumulate", "manual", "bf16"])
def test_divergence_same_verdict_under_loop_variants(tmp_path, variant):
    levels = [2.3 - 0.02 * i for i in range(60)] + [1.1 + 0.1 * i for i in range(400)]
    kwargs = {"max_steps": 120}
    if variant == "accumulate":
        levels = [value for value in levels for _ in range(2)]  # two micro-batches per optimizer step
        kwargs["accumulate_grad_batches"] = 2
    if variant == "bf16":
        kwargs["precision"] = "bf16-mixed"
    module = Scripted(_noisy(levels, noise=0.02), manual=variant == "manual")
    monitor = LearningCurveMonitor()
    trainer = fit(module, [monitor], loader=_loader(), root=tmp_path, **kwargs)
    found = _ours(trainer)
    assert [f.check for f in found] == [DIVERGENCE], [f.format() for f in found]
    assert (
        found[0].where == "loss" and found[0].evidence["smoothed_loss"] >= 2 * found[0].evidence["best_loss"]
    )
    assert 85 <= found[0].step <= 100
    assert monitor._start == pytest.approx(2.26, abs=0.06)  # the per-step loss, not loss / accumulation


def test_oscillating_loss(tmp_path):
    levels = [1.0] * 10 + [0.2 if i % 2 else 3.5 for i in range(300)]
    trainer = fit(Scripted(levels), [LearningCurveMonitor()], loader=_loader(), root=tmp_path, max_steps=60)
    found = _ours(trainer, OSCILLATION)
    assert found and found[0].where == "loss" and found[0].evidence["swing_to_scale"] > 0.8
    assert "lower the learning rate" in found[0].hint


class _WithVal(Scripted):
    def val_dataloader(self):
        return _loader(2)


def test_overfitting_names_the_monitored_key_and_gives_the_gap(tmp_path):
    levels = [2.0 * math.exp(-i / 30) + 0.01 for i in range(400)]
    val = [1.5, 1.0, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1, 1.2, 1.3]
    monitor = LearningCurveMonitor()
    trainer = fit(
        _WithVal(levels, val_losses=val),
        [monitor],
        loader=_loader(),
        root=tmp_path,
        max_steps=200,
        limit_train_batches=20,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    found = _ours(trainer)
    assert [f.check for f in found] == [OVERFITTING]
    assert found[0].where == "val_loss" and found[0].evidence["best_val_loss"] == pytest.approx(0.8)
    assert (
        found[0].evidence["runs_since_best"] >= 3
        and found[0].evidence["gap"] > found[0].evidence["gap_at_best"]
    )
    assert found[0].step == 140  # the 7th validation: 1.0 >= 1.2 x 0.8, 4 runs after the best
    assert "early stopping" in found[0].hint


def test_a_converged_model_that_stays_converged_is_quiet_and_a_late_overfit_is_caught(tmp_path):
    # 60 validations of a model converged near 0 whose validation loss drifts 0.03 -> 0.045 (50% above its
    # best, 0.7% of its starting loss), then the same run memorising wrong labels: val back to 0.6
    levels = [2.3 * math.exp(-i / 20) + 1e-4 for i in range(1300)]
    converged = [1.5, 0.3, 0.08, 0.03] + [0.03 + 0.00025 * i for i in range(60)]
    late = converged[:40] + [0.04 + 0.02 * i for i in range(30)]
    settings = {
        "max_steps": 1280,
        "limit_train_batches": 20,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
    }
    trainer = fit(
        _WithVal(levels, val_losses=converged),
        [LearningCurveMonitor()],
        loader=_loader(),
        root=tmp_path,
        **settings,
    )
    assert _ours(trainer) == []
    trainer = fit(
        _WithVal(levels, val_losses=late),
        [LearningCurveMonitor()],
        loader=_loader(),
        root=tmp_path,
        **settings,
    )
    found = _ours(trainer)
    assert [(f.check, f.where) for f in found] == [(OVERFITTING, "val_loss")]
    # the starting loss is the first 5-step chunk's mean, ~2.07: caught once the rise passes 7.5% of it, 0.155,
    # at 0.04 + 0.02 x 8 - 0.03 = 0.17 (the 49th validation, at step 20 x 49)
    assert found[0].step == 980
    assert found[0].evidence["loss_scale"] == pytest.approx(2.07, abs=0.05)
    assert "of the starting loss" in found[0].message


def test_late_divergence_after_convergence_is_caught_and_a_converged_wobble_is_not(tmp_path):
    # converged at ~1e-3 after 300 steps; a 3x wobble stays quiet; the loss thrown back to ~2 late is diverging
    levels = [2.3 * math.exp(-i / 30) + 1e-3 for i in range(300)]
    wobble = levels + [1e-3 * (1 + 2 * (i % 7 == 0)) for i in range(900)]
    jump = levels + [1e-3] * 600 + [2.0 + 0.01 * i for i in range(300)]
    trainer = fit(
        Scripted(_noisy(wobble)), [LearningCurveMonitor()], loader=_loader(), root=tmp_path, max_steps=1200
    )
    assert _ours(trainer) == []
    trainer = fit(
        Scripted(_noisy(jump)), [LearningCurveMonitor()], loader=_loader(), root=tmp_path, max_steps=1200
    )
    found = _ours(trainer)
    assert [f.check for f in found] == [DIVERGENCE] and found[0].where == "loss"
    assert 900 < found[0].step <= 930


def test_healthy_validation_is_silent_and_a_missing_key_is_an_info(tmp_path):
    levels = [2.0 * math.exp(-i / 30) + 0.01 for i in range(400)]
    val = [1.5, 1.0, 0.8, 0.75, 0.78, 0.74, 0.76, 0.75, 0.77, 0.76]
    settings = {
        "max_steps": 200,
        "limit_train_batches": 20,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
    }
    trainer = fit(
        _WithVal(levels, val_losses=val),
        [LearningCurveMonitor()],
        loader=_loader(),
        root=tmp_path,
        **settings,
    )
    assert _ours(trainer) == []
    trainer = fit(
        _WithVal(levels, val_losses=val, val_key="valid/loss"),
        [LearningCurveMonitor()],
        loader=_loader(),
        root=tmp_path,
        **settings,
    )
    found = _ours(trainer)
    assert [(f.check, f.severity.value, f.where) for f in found] == [(OVERFITTING, "info", "val_loss")]
    assert "valid/loss" in found[0].message


def test_state_survives_checkpoint_resume(tmp_path):
    levels = _noisy([2.3] * 400)
    first = LearningCurveMonitor()
    trainer = fit(Scripted(levels), [first], loader=_loader(), root=tmp_path, max_steps=60)
    assert _ours(trainer) == []
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    resumed = LearningCurveMonitor()
    trainer = fit(
        Scripted(levels), [resumed], loader=_loader(), root=tmp_path, max_steps=120, ckpt_path=str(path)
    )
    found = _ours(trainer)
    # the start and history came back from the checkpoint: judged at step 100, not 100 steps after resuming
    assert [(f.check, f.step) for f in found] == [(NOT_DECREASING, 100)]
    assert resumed._start == pytest.approx(first._start)


def test_runs_inside_the_presets():
    assert any(isinstance(check, LearningCurveMonitor) for check in Sentinel(preset="fast").checks)
    assert any(isinstance(check, LearningCurveMonitor) for check in Sentinel(preset="full").checks)


# ---------------------------------------------------------------------- detection harness (real faults)
@pytest.mark.parametrize(
    ("name", "check"), [("lr-1e-8-no-progress", NOT_DECREASING), ("gradient-ascent-sign-flip", DIVERGENCE)]
)
def test_fast_fault_cases_are_diagnosed(name, check):
    result = run_case(get_case(name))
    ours = [f for f in alarms(result.findings) if f.check in CURVE_CHECKS]
    assert ours and ours[0].check == check and ours[0].where == "loss", [f.format() for f in ours]
    assert result.verdict == "ok"
