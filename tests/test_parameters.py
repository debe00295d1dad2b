"""ParameterUpdateMonitor: pure rules, optimizer coverage, unused and frozen parameters, update ratios."""

import pytest
import torch
from _models import Classifier, MetricsRecorder, fit
from torch import nn

from lightning_sentinel import findings
from lightning_sentinel.checks.parameters import (
    ParameterUpdateMonitor,
    burst_verdict,
    lr_excuses_low_ratio,
    module_groups,
    ratio_streak,
)


def _ids(trainer):
    return [f.check for f in findings(trainer)]


def test_pure_rules():
    universe = ["a.0.weight", "a.0.bias", "a.1.weight", "b.weight", "c"]
    assert module_groups(["a.0.weight", "a.0.bias"], universe) == ["a.0"]
    assert module_groups(["a.0.weight", "a.0.bias", "a.1.weight", "b.weight", "c"], universe) == [
        "a",
        "b",
        "c",
    ]
    assert module_groups(["a.0.bias"], universe) == ["a.0.bias"]
    assert ratio_streak(float("nan"), 5, 0.5, 1e-6) == (0, 0)
    assert ratio_streak(0.0, -5, 0.5, 1e-6) == (0, 0)  # exactly zero: frozen-parameters' business
    assert ratio_streak(1.0, 2, 0.5, 1e-6) == (3, 0)
    assert not lr_excuses_low_ratio(1e-3, 1e-3, 1e-3, 0.5)
    assert lr_excuses_low_ratio(2e-4, 1e-4, 2e-4, 0.5)  # warming up
    assert lr_excuses_low_ratio(1e-4, 1e-4, 1e-3, 0.5)  # decayed
    assert burst_verdict(3.0, 0.1, True, 2.0)
    assert not burst_verdict(3.0, 1e-5, True, 2.0)  # a weight initialised near 0 on purpose
    assert not burst_verdict(3.0, 0.1, False, 2.0)  # a gain/bias-only layer (LayerScale, norms)
    assert not burst_verdict(1.9, 0.1, True, 2.0)


@pytest.mark.parametrize(
    ("argument", "kwargs"),
    [
        ("patience", {"patience": 0}),
        ("high_ratio", {"high_ratio": -1.0}),
        ("low_ratio", {"low_ratio": 1.0, "high_ratio": 0.5}),
        ("decayed_fraction", {"decayed_fraction": 2.0}),
        ("unused_patience", {"unused_patience": 0}),
    ],
)
def test_arguments_are_validated(argument, kwargs):
    with pytest.raises(ValueError, match=argument):
        ParameterUpdateMonitor(**kwargs)


def test_healthy_run_is_silent_logs_ratios_and_releases_everything(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2, unused_patience=10)
    recorder = MetricsRecorder()
    trainer = fit(Classifier(), [monitor], root=tmp_path, max_steps=40, logger=recorder)
    assert findings(trainer) == []
    assert 1e-4 < recorder.metrics["sentinel/update_ratio/max"] < 0.5
    assert not monitor._candidates and all(s.snapshot is None for s in monitor._optimizers.values())


class _HeadOnly(Classifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[2].parameters(), lr=0.05)


def test_only_the_head_in_the_optimizer(tmp_path):
    trainer = fit(_HeadOnly(), [ParameterUpdateMonitor()], root=tmp_path, max_steps=3)
    (found,) = findings(trainer)
    assert found.check == "parameters-not-in-optimizer" and found.where == "net.0" and found.step == 0
    assert found.evidence["parameters"] == 2 and "torch.optim.Adam(self.parameters())" in found.hint


class _DetachedEncoder(Classifier):
    def __init__(self, every=None):
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU()))
        self.aux = nn.Linear(32, 3)
        self.head = nn.Linear(32, 3)
        self.every = every

    def forward(self, x):
        features = self.net(x)
        if self.every is None:
            return self.head(features.detach())  # the bug: the encoder never trains
        if self.global_step % self.every == 0:  # an auxiliary head used on some steps only
            return self.head(features) + self.aux(features)
        return self.head(features)


def test_detached_encoder_is_unused_and_named_by_module(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2, unused_patience=10)
    trainer = fit(_DetachedEncoder(), [monitor], root=tmp_path, max_steps=20)
    (found,) = findings(trainer)
    assert found.check == "unused-parameters" and found.where == "net" and found.step == 10
    assert found.evidence["parameters"] == 4 and "'net', 'aux'" in found.message  # aux is never called


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_branch_used_on_some_steps_is_not_unused(tmp_path, accumulate):
    monitor = ParameterUpdateMonitor(every_n_steps=1, unused_patience=10)
    trainer = fit(
        _DetachedEncoder(every=4), [monitor], root=tmp_path, max_steps=25, accumulate_grad_batches=accumulate
    )
    assert findings(trainer) == []
    assert monitor._optimizers and next(iter(monitor._optimizers.values())).steps_seen == 25


def test_lr_zero_freezes_the_parameters(tmp_path):
    trainer = fit(Classifier(lr=0.0), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=10)
    (found,) = findings(trainer)
    assert found.check == "frozen-parameters" and found.where == "net" and found.step == 5
    assert found.evidence["lr"] == 0.0 and "learning rate is 0" in found.message


class _DecayToNearZero(Classifier):
    """SGD whose lr decays from 0.05 to 1e-12 after step 10 (the tail of a schedule that ends at 0)."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 10 else 2e-11)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_updates_below_float_resolution_at_the_end_of_a_decay_are_not_frozen(tmp_path):
    # lr 1e-12: every update rounds away in float32 (exactly 0), as a bias of 150 does under lr 4e-5 near the
    # end of a cosine decay; a schedule did that, so frozen-parameters stays quiet (lr 0 from the start is not
    # excused: test_lr_zero_freezes_the_parameters)
    trainer = fit(_DecayToNearZero(), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=30)
    assert "frozen-parameters" not in _ids(trainer)


def test_tiny_learning_rate_is_too_low_but_a_warmup_is_not(tmp_path):
    trainer = fit(Classifier(lr=1e-8), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=10)
    # (a bias's update may even round away in float32: frozen-parameters, also a right diagnosis)
    assert set(_ids(trainer)) <= {"update-ratio-too-low", "frozen-parameters"}
    (found,) = [f for f in findings(trainer) if f.check == "update-ratio-too-low"]
    assert found.where in {"net.0", "net.2"}
    assert found.evidence["update_ratio"] < 1e-6

    class _Warmup(Classifier):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: min(1.0, (step + 1e-5) / 30)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    trainer = fit(_Warmup(lr=1e-3), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=30)
    assert findings(trainer) == []


def test_huge_learning_rate_is_too_high(tmp_path):
    module = Classifier(lr=20.0)  # SGD: meant 0.02
    trainer = fit(module, [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=10)
    found = [f for f in findings(trainer) if f.check == "update-ratio-too-high"]
    assert found and found[0].where in {"net.0", "net.2"} and found[0].evidence["update_ratio"] > 0.5


def test_adam_learning_rate_far_too_high_is_caught_on_its_first_steps(tmp_path):
    # Adam moves every weight by ~lr per step: at lr 0.5 the first step is several times the weights of
    # a default-initialised Linear, then the ratio decays as the weights grow (no 3 checks in a row)
    trainer = fit(
        Classifier(lr=0.5, optimizer="adam"), [ParameterUpdateMonitor()], root=tmp_path, max_steps=30
    )
    found = [f for f in findings(trainer) if f.check == "update-ratio-too-high"]
    assert found and found[0].where in {"net.0", "net.2"} and found[0].evidence["update_ratio"] > 2.0
    assert "in one optimizer step" in found[0].message


class _LayerScaled(Classifier):
    """A tiny gain initialised at 1e-6 (LayerScale): it grows many times over in its first steps."""

    def __init__(self):
        super().__init__(lr=1e-3, optimizer="adam")
        self.gain = nn.Parameter(torch.full((3,), 1e-6))
        self.head_tiny = nn.Linear(3, 3)
        nn.init.normal_(self.head_tiny.weight, std=1e-6)  # a head initialised near 0 (as ConvNeXt's)
        nn.init.zeros_(self.head_tiny.bias)

    def forward(self, x):
        return self.head_tiny(self.net(x) * self.gain) + self.net(x)


def test_near_zero_initialised_layers_are_not_a_burst(tmp_path):
    # the first check is the first optimizer step: gain and head move ~1000x their norm there
    trainer = fit(_LayerScaled(), [ParameterUpdateMonitor()], root=tmp_path, max_steps=40)
    assert "update-ratio-too-high" not in _ids(trainer)
    # checked every step, their ratio decays like 1/step (1000, 1, 0.5, 0.33, ...): no sustained alarm either
    trainer = fit(_LayerScaled(), [ParameterUpdateMonitor(every_n_steps=1)], root=tmp_path, max_steps=20)
    assert "update-ratio-too-high" not in _ids(trainer)


class _TwoOptimizers(Classifier):
    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU()))
        self.head = nn.Linear(32, 3)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        x, y = batch
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.head(self.net(x)), y))
        body.step()
        head.step()
        head.zero_grad()  # the head steps twice per batch
        self.manual_backward(nn.functional.cross_entropy(self.head(self.net(x).detach()), y))
        head.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05), torch.optim.SGD(
            self.head.parameters(), lr=1e-6
        )


def test_manual_optimization_is_keyed_per_optimizer(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2)
    trainer = fit(_TwoOptimizers(), [monitor], root=tmp_path, max_steps=24)
    assert [(f.check, f.where) for f in findings(trainer)] == [("update-ratio-too-low", "optimizer_1:head")]
    assert sorted(state.steps_seen for state in monitor._optimizers.values()) == [
        8,
        16,
    ]  # 8 batches: body 1 step, head 2 steps each


def test_bf16_mixed_run_is_silent(tmp_path):
    trainer = fit(
        Classifier(),
        [ParameterUpdateMonitor(every_n_steps=2)],
        root=tmp_path,
        max_steps=20,
        precision="bf16-mixed",
    )
    assert findings(trainer) == []


def test_resume_keeps_streaks_and_cadence(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2, patience=4)
    trainer = fit(Classifier(lr=1e-6), [monitor], root=tmp_path, max_steps=4, enable_checkpointing=True)
    assert findings(trainer) == []  # 2 of the 4 checks needed so far
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    resumed = ParameterUpdateMonitor(every_n_steps=2, patience=4)
    trainer = fit(Classifier(lr=1e-6), [resumed], root=tmp_path, max_steps=8, ckpt_path=str(path))
    (found,) = findings(trainer)
    assert found.check == "update-ratio-too-low" and found.step == 7
    assert next(iter(resumed._optimizers.values())).steps_seen == 8


def test_detection_harness_head_only_optimizer():
    import benchmarks.detection.cases as cases
    from benchmarks.detection.runner import run_case

    result = run_case(cases.get_case("head-only-optimizer-mlp"))
    (found,) = [f for f in result.findings if f.check == "parameters-not-in-optimizer"]
    assert found.where == "net.0" and "'net.0', 'net.2'" in found.message


def test_low_ratio_hint_tells_a_slow_model_from_slow_layers():
    from lightning_sentinel.checks.parameters import _low_ratio_hint

    assert "raise the learning rate" in _low_ratio_hint([1e-8, 1e-8, 1e-9], [0, 1, 2], 1e-6)
    assert "vanish" in _low_ratio_hint([1e-9, 1e-3, 2e-3], [0], 1e-6)


class _Unfreezing(Classifier):
    """Fine-tuning that unfreezes the body at step 6 and adds it to the optimizer as a new param group."""

    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[2].parameters(), lr=0.05)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 6:
            self.net[0].requires_grad_(True)
            self.optimizers().optimizer.add_param_group({"params": self.net[0].parameters(), "lr": 0.0})


def test_a_param_group_added_later_is_watched(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2)
    trainer = fit(_Unfreezing(), [monitor], root=tmp_path, max_steps=16)
    found = [(f.check, f.where) for f in findings(trainer)]
    assert found == [("frozen-parameters", "net.0")]  # the new group's lr is 0
