"""GradientNormMonitor: pure rules, exploding and vanishing gradients, and Lightning's loop variants."""

import math

import pytest
import torch
from _models import Classifier, MetricsRecorder, deep_mlp, fit
from torch import nn

from lightning_sentinel import GradientNormMonitor, findings
from lightning_sentinel.checks._optimizers import gradient_scale
from lightning_sentinel.checks.gradients import depth_ratio, exploding_verdict, vanishing_layers


def test_exploding_rule():
    history = [1.0, 1.1, 0.9, 1.2, 1.0]
    assert exploding_verdict(11.0, history, 10.0, 1e4, 5)[0]
    assert not exploding_verdict(9.0, history, 10.0, 1e4, 5)[0]
    assert not exploding_verdict(50.0, history[:4], 10.0, 1e4, 5)[0]  # too little history for the spike rule
    assert exploding_verdict(2e4, [], 10.0, 1e4, 5)[:2] == (True, "above the absolute bound 10000")
    assert not exploding_verdict(float("nan"), history, 10.0, 1e4, 5)[0]


def test_exploding_rule_weighs_the_gradients_of_the_first_checks():
    # a 3000-step digits MLP (AdamW, dropout): converged, its running median is 0.06 and a hard batch gives 1.6,
    # 26x the median but 2.2x the median of its first 20 checks (0.72) while it learned
    converged = [0.05, 0.07, 0.06, 0.06, 0.05, 0.08, 0.06]
    assert exploding_verdict(1.6, converged, 10.0, 1e4, 5)[0]  # the running median alone: a false alarm
    assert not exploding_verdict(1.6, converged, 10.0, 1e4, 5, early_reference=0.72)[0]
    # the same run with its lr x100 at step 2000: 86, 120x the early median
    exploding, reason, reference = exploding_verdict(86.0, converged, 10.0, 1e4, 5, early_reference=0.72)
    assert exploding and reference == 0.72 and reason == "119x the early median 0.72"
    # early in a run the early median is the running median (it is frozen once `window` checks exist)
    assert exploding_verdict(11.0, [1.0] * 5, 10.0, 1e4, 5, early_reference=None)[0]
    assert exploding_verdict(2e4, converged, 10.0, 1e4, 5, early_reference=1e3)[0]  # the bound stays absolute


class _LossScaled(Classifier):
    """A classifier whose loss is multiplied by ``scale(step)``: the gradient norm follows the script."""

    def __init__(self, scale):
        super().__init__(lr=1e-4)
        self.scale = scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.scale(self.global_step) * nn.functional.cross_entropy(self(x), y)


def _late_run(step, spike):
    """Learning for 25 steps, then converged (gradients 100x smaller), one spike at step 60."""
    if step < 25:
        return 1.0
    return spike if step == 60 else 0.01


def test_a_converged_models_hard_batch_is_quiet_and_a_late_explosion_is_caught(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=1)
    trainer = fit(_LossScaled(lambda step: _late_run(step, 0.3)), [monitor], root=tmp_path, max_steps=70)
    (state,) = monitor._optimizers.values()
    # frozen after 20 checks (steps 0-19, learning): ~50x the converged gradients of the last 20 checks
    assert state.early_reference > 30 * sorted(state.history)[len(state.history) // 2]
    assert [
        f for f in findings(trainer) if f.check == "exploding-gradients"
    ] == []  # 30x the median, 0.3x early
    monitor = GradientNormMonitor(every_n_steps=1)
    trainer = fit(_LossScaled(lambda step: _late_run(step, 30.0)), [monitor], root=tmp_path, max_steps=70)
    found = [f for f in findings(trainer) if f.check == "exploding-gradients"]
    assert [f.step for f in found] == [60] and found[0].where.startswith("net.")
    assert "the early median" in found[0].message
    assert found[0].evidence["grad_norm"] > 10 * found[0].evidence["reference"]


def test_the_early_median_survives_a_resume(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=1)
    fit(Classifier(), [monitor], root=tmp_path, max_steps=30)
    (state,) = monitor._optimizers.values()
    assert state.early_reference is not None and len(state.history) == 20
    restored = GradientNormMonitor(every_n_steps=1)
    restored.load_state_dict(monitor.state_dict())
    assert restored._saved_early == {"": state.early_reference}


def test_vanishing_rules():
    assert vanishing_layers([1e-3, 1e-12, 0.0, 1e-12], [1.0, 1.0, 1.0, 0.0], 1e-7) == [
        1
    ]  # 0 grad/weight: skipped
    assert math.isclose(depth_ratio([1e-6, 5.0, 2.0], [2.0, 1.0, 4.0], [0, 2]), (1e-6 / 2.0) / (2.0 / 4.0))
    assert math.isnan(depth_ratio([1.0], [1.0], [0]))
    assert math.isnan(depth_ratio([0.0, 1.0], [1.0, 1.0], [0, 1]))  # a dead first layer is not "vanishing"


def test_healthy_run_is_silent_and_logs_the_total_norm(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=1)
    recorder = MetricsRecorder()
    trainer = fit(Classifier(), [monitor], root=tmp_path, max_steps=60, logger=recorder)
    assert findings(trainer) == []
    assert 0 < recorder.metrics["sentinel/grad_norm/total"] < 100


def test_bad_init_explodes_and_names_a_layer(tmp_path):
    net = deep_mlp(8, randn_init=True)  # the classic: randn weights instead of 1/sqrt(fan_in)
    trainer = fit(Classifier(net=net, lr=1e-6), [GradientNormMonitor()], root=tmp_path, max_steps=5)
    found = [f for f in findings(trainer) if f.check == "exploding-gradients"]
    assert found and found[0].step == 0
    assert found[0].where in {f"net.{i}" for i, layer in enumerate(net) if isinstance(layer, nn.Linear)}
    assert found[0].evidence["grad_norm"] > 1e4


def test_a_spike_over_the_running_median_is_caught(tmp_path):
    spike = lambda logits, step: logits * 300.0 if step == 40 else logits  # noqa: E731
    monitor = GradientNormMonitor(every_n_steps=1)
    trainer = fit(Classifier(transform=spike, lr=1e-3), [monitor], root=tmp_path, max_steps=45)
    found = [f for f in findings(trainer) if f.check == "exploding-gradients"]
    assert [f.step for f in found] == [40]
    assert (
        found[0].where.startswith("net.")
        and found[0].evidence["grad_norm"] > 10 * found[0].evidence["reference"]
    )


def test_deep_sigmoid_net_has_vanishing_gradients(tmp_path):
    net = deep_mlp(16, nn.Sigmoid)
    trainer = fit(Classifier(net=net, lr=0.01), [GradientNormMonitor()], root=tmp_path, max_steps=30)
    found = [f for f in findings(trainer) if f.check == "vanishing-gradients"]
    assert found and found[0].where == "net.0"
    assert (
        found[0].evidence.get("depth_ratio", 0.0) < 1e-5
        and found[0].evidence.get("grad_weight_ratio", 0.0) < 1e-7
    )


def test_relu_net_of_the_same_depth_with_he_init_is_silent(tmp_path):
    # (with PyTorch's default Linear init, 16 plain ReLU layers really do shrink the first layer's
    # gradient ~1e-6x relative to the last: He initialisation is the cure)
    net = deep_mlp(16, nn.ReLU)
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    trainer = fit(Classifier(net=net, lr=0.01), [GradientNormMonitor()], root=tmp_path, max_steps=30)
    assert findings(trainer) == []


def test_accumulation_checks_once_per_optimizer_step_and_clipping_is_pre_clip(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=1)
    recorder = MetricsRecorder()
    fit(
        Classifier(),
        [monitor],
        root=tmp_path,
        max_steps=6,
        accumulate_grad_batches=4,
        gradient_clip_val=1e-4,
        logger=recorder,
    )
    (state,) = monitor._optimizers.values()
    assert state.steps_seen == 6  # 24 micro-batches, 6 optimizer steps
    assert recorder.metrics["sentinel/grad_norm/total"] > 1e-3  # norm before clipping to 1e-4


class TwoOptimizers(Classifier):
    """Manual optimization: the head's optimizer gets a huge spike at step 30."""

    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU()))
        self.head = nn.Linear(32, 3)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body_optimizer, head_optimizer = self.optimizers()
        x, y = batch
        features = self.net(x)
        body_optimizer.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.head(features), y))
        body_optimizer.step()
        head_optimizer.zero_grad()
        logits = self.head(features.detach()) * (1e4 if batch_idx == 6 else 1.0)
        self.manual_backward(nn.functional.cross_entropy(logits, y))
        head_optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.01), torch.optim.SGD(
            self.head.parameters(), lr=1e-4
        )


def test_manual_optimization_with_two_optimizers_is_keyed_per_optimizer(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=1, min_history=3)
    recorder = MetricsRecorder()
    trainer = fit(TwoOptimizers(), [monitor], root=tmp_path, max_steps=16, logger=recorder)
    assert {"sentinel/grad_norm/optimizer_0/total", "sentinel/grad_norm/optimizer_1/total"} <= set(
        recorder.metrics
    )
    found = [f for f in findings(trainer) if f.check == "exploding-gradients"]
    assert found and all(f.where == "optimizer_1:head" for f in found)


def test_bf16_mixed_run_is_silent(tmp_path):
    trainer = fit(
        Classifier(),
        [GradientNormMonitor(every_n_steps=1)],
        root=tmp_path,
        max_steps=40,
        precision="bf16-mixed",
    )
    assert findings(trainer) == []


def test_gradient_scale_of_a_fused_optimizer_is_divided_out():
    class _Scaler:
        _scale = torch.tensor(1024.0)

    class _Plugin:
        scaler = _Scaler()

    class _Trainer:
        precision_plugin = _Plugin()

    parameter = nn.Parameter(torch.ones(2))
    plain = torch.optim.SGD([parameter], lr=0.1)
    assert gradient_scale(_Trainer(), plain) is None
    plain._step_supports_amp_scaling = True  # what fused Adam/AdamW set
    assert gradient_scale(_Trainer(), plain).item() == 1024.0


@pytest.mark.parametrize("every_n_steps", [1, 7])
def test_cadence(tmp_path, every_n_steps):
    monitor = GradientNormMonitor(every_n_steps=every_n_steps)
    calls = []
    original = monitor._run_gradient_check
    monitor._run_gradient_check = lambda *args: calls.append(1) or original(*args)
    fit(Classifier(), [monitor], root=tmp_path, max_steps=21)
    assert len(calls) == len(range(0, 21, every_n_steps))
