"""WeightDecayMonitor: the per-step decay read off each optimizer, on real Trainers, and what it leaves alone."""

import math

import pytest
import torch
from _models import Classifier, TwoOptimizers, classification_loader, fit
from torch import nn

from lightning_sentinel import Sentinel, WeightDecayMonitor, findings
from lightning_sentinel.checks.weight_decay import decay_per_step, steps_to_halve

TOO_STRONG = "weight-decay-too-strong"


def _own(trainer):
    return [finding for finding in findings(trainer) if finding.check == TOO_STRONG]


def _weights():
    return [nn.Parameter(torch.ones(3))]


class Decayed(Classifier):
    """The MLP classifier with a configurable optimizer, decay and learning-rate schedule."""

    def __init__(self, make_optimizer, schedule=None):
        super().__init__()
        self.make_optimizer = make_optimizer
        self.schedule = schedule

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self)
        if self.schedule is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Lion(torch.optim.Optimizer):
    """Stands for a third-party optimizer with decoupled decay (lion-pytorch, bitsandbytes, timm)."""

    def __init__(self, params, lr=1e-4, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})


# ---------------------------------------------------------------------- the pure rule
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=10.0), 0.02),
        (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.5, decoupled_weight_decay=True), 5e-4),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3), 1e-4),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1), 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1), 0.05),
        (lambda p: torch.optim.AdamW(p, lr=torch.tensor(0.01), weight_decay=2.0), 0.02),
        (lambda p: Lion(p, lr=1e-3, weight_decay=3.0), 3e-3),
    ],
    ids=["adamw", "adam-decoupled", "sgd", "sgd-momentum", "sgd-dampening", "tensor-lr", "lion-by-name"],
)
def test_decay_per_step_follows_how_each_optimizer_applies_decay(make, expected):
    optimizer = make(_weights())
    assert decay_per_step(optimizer, optimizer.param_groups[0]) == pytest.approx(expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1.0),  # coupled L2 through Adam's normalisation
        lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=1.0),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
        lambda p: torch.optim.SGD(p, lr=0.0, weight_decay=1.0),
    ],
    ids=["adam-coupled", "rmsprop", "no-decay", "zero-lr"],
)
def test_decay_per_step_is_none_where_the_settings_do_not_tell(make):
    optimizer = make(_weights())
    assert decay_per_step(optimizer, optimizer.param_groups[0]) is None


def test_steps_to_halve():
    assert steps_to_halve(0.5) == pytest.approx(1.0)
    assert steps_to_halve(0.01) == pytest.approx(68.97, abs=0.01)
    assert steps_to_halve(0.0) == math.inf and steps_to_halve(2.0) == 1.0


# ---------------------------------------------------------------------- on a Trainer
def test_decay_far_too_strong_is_reported_after_patience_checks():
    monitor = WeightDecayMonitor(every_n_steps=5)
    module = Decayed(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1))
    trainer = fit(module, [monitor], max_steps=30)
    (finding,) = _own(trainer)
    assert finding.where == "param_groups[0]"
    assert finding.step == 10  # checks at steps 0, 1, 2, 4, 5, 10: on every one over 2 intervals of 5
    assert finding.evidence["decay_per_step"] == pytest.approx(0.1)
    assert finding.evidence["momentum"] == pytest.approx(0.9)
    assert finding.evidence["steps_to_halve"] == pytest.approx(6.58, abs=0.01)
    assert "net.0.weight" in finding.message and "lower weight_decay" in finding.hint
    assert trainer.sentinel_warnings  # warned


def test_the_message_states_the_formula_of_the_rate():
    def dampened(module):
        return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1)

    (finding,) = _own(fit(Decayed(dampened), [WeightDecayMonitor(every_n_steps=5)], max_steps=12))
    assert finding.evidence["decay_per_step"] == pytest.approx(0.05)
    assert "(lr 0.1 x weight_decay 0.1 x (1 - dampening 0.5) / (1 - momentum 0.9))" in finding.message


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-2),
    ],
    ids=["adamw", "sgd-imagenet-recipe", "adam-coupled"],
)
def test_ordinary_decay_stays_quiet(make):
    trainer = fit(Decayed(make), [WeightDecayMonitor(every_n_steps=2)], max_steps=30)
    assert _own(trainer) == []


def test_only_the_decayed_group_is_named():
    def two_groups(module):
        decayed = [p for name, p in module.named_parameters() if name.endswith("weight")]
        plain = [p for name, p in module.named_parameters() if name.endswith("bias")]
        return torch.optim.AdamW(
            [{"params": plain, "weight_decay": 0.0}, {"params": decayed, "weight_decay": 20.0}], lr=1e-3
        )

    trainer = fit(Decayed(two_groups), [WeightDecayMonitor(every_n_steps=2)], max_steps=12)
    (finding,) = _own(trainer)
    assert finding.where == "param_groups[1]"
    assert "net.0.weight, net.2.weight" in finding.message and "bias" not in finding.message


def test_a_schedule_that_lowers_the_rate_before_patience_resets_the_streak():
    def adamw(module):
        return torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=2.0)  # 0.02 per step

    decaying = Decayed(adamw, schedule=lambda step: 1.0 if step < 8 else 0.01)  # too strong until step 8 only
    assert _own(fit(decaying, [WeightDecayMonitor(every_n_steps=5)], max_steps=40)) == []
    steady = Decayed(adamw)
    assert len(_own(fit(steady, [WeightDecayMonitor(every_n_steps=5)], max_steps=40))) == 1


def _head_decays_too_much(module):
    return (
        torch.optim.AdamW(module.net.parameters(), lr=1e-3, weight_decay=0.01),
        torch.optim.AdamW(module.head.parameters(), lr=1e-2, weight_decay=5.0),
    )


def test_manual_optimization_with_two_optimizers_names_the_optimizer():
    trainer = fit(TwoOptimizers(_head_decays_too_much), [WeightDecayMonitor(every_n_steps=2)], max_steps=10)
    (finding,) = _own(trainer)
    assert finding.where == "optimizer_1:param_groups[0]"
    assert "head.weight, head.bias" in finding.message


def test_frozen_groups_are_not_judged():
    def frozen(module):
        for parameter in module.net[0].parameters():
            parameter.requires_grad_(False)
        return torch.optim.AdamW(
            [
                {"params": module.net[0].parameters(), "weight_decay": 50.0},
                {"params": module.net[2].parameters()},
            ],
            lr=1e-3,
        )

    assert _own(fit(Decayed(frozen), [WeightDecayMonitor(every_n_steps=1)], max_steps=6)) == []


def test_the_streak_survives_a_resume(tmp_path):
    def sgd(module):
        return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)

    first = WeightDecayMonitor(every_n_steps=4, patience=5)
    fit(Decayed(sgd), [first], root=tmp_path, max_steps=9, enable_checkpointing=True)  # checks 0, 1, 2, 4, 8
    assert first._too_strong.since == {"param_groups[0]": 0} and _own_of(first) == []
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    resumed = WeightDecayMonitor(every_n_steps=4, patience=5)
    trainer = fit(Decayed(sgd), [resumed], root=tmp_path, max_steps=20, ckpt_path=str(checkpoint))
    (finding,) = _own(trainer)
    assert finding.step == 16  # too strong on every check from step 0: 4 intervals of 4 at step 16


def _own_of(monitor):
    return [finding for finding in monitor._own_findings if finding.check == TOO_STRONG]


def test_the_fast_preset_runs_it():
    module = Decayed(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=5.0))
    trainer = fit(module, [Sentinel(preset="fast")], classification_loader(n=32 * 40), max_steps=40)
    assert [finding.where for finding in _own(trainer)] == ["param_groups[0]"]
