"""DeadReLUDetector: pure rules, each id on its fault, silence on healthy models, hook hygiene."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, classification_loader, fit
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from benchmarks.detection.cases import get_case
from benchmarks.detection.runner import OK, alarms, run_case
from lightning_sentinel import Sentinel, SentinelError, SentinelWarning, findings
from lightning_sentinel.checks._activation_probe import RELU, ActivationProbe, activation_kind
from lightning_sentinel.checks.activations import (
    DEAD_RELU,
    POOR_INIT,
    SATURATED,
    DeadReLUDetector,
    dead_share,
    depth_scale_ratio,
    identical_inputs,
    identical_rows,
    saturated_share,
)

IDS = {DEAD_RELU, SATURATED, POOR_INIT}


def _ours(trainer: pl.Trainer) -> list[Any]:
    return [finding for finding in findings(trainer) if finding.check in IDS]


def _no_hooks_left(module: nn.Module) -> bool:
    return torch._C._len_torch_function_stack() == 0 and all(
        not m._forward_hooks and not m._forward_pre_hooks for m in module.modules()
    )


def _dead_mlp(bias: float = -10.0) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    nn.init.constant_(net[0].bias, bias)
    return net


# ---------------------------------------------------------------------- pure rules
def test_rules():
    assert dead_share([0.0, 0.0, 1.0, 5.0]) == (0.5, 2)
    assert dead_share([]) == (0.0, 0)
    assert saturated_share([10.0, 8.0, 7.9], 10, 0.8) == (2 / 3, 2)
    assert depth_scale_ratio([2.0, 1.0, 0.1]) == pytest.approx(0.05)
    assert depth_scale_ratio([1.0]) != depth_scale_ratio([1.0])  # NaN: no depth
    assert depth_scale_ratio([1.0, 0.0]) == 0.0
    assert depth_scale_ratio([1.0, 0.0], last_is_relu=True) != 0.0  # NaN: a dead ReLU, not a scale
    assert bool(identical_rows(torch.ones(4, 3), torch.zeros(4)))
    assert not bool(identical_rows(torch.ones(4, 3), torch.arange(4.0)))  # biases tell the units apart
    assert bool(identical_rows(torch.zeros(3, 2)))
    assert bool(identical_inputs(torch.full((5, 4, 3, 3), 0.2), 4))  # a conv reading 4 channels alike
    assert not bool(identical_inputs(torch.randn(5, 8), 4))
    assert identical_inputs(torch.ones(5, 7), 4) is None
    assert activation_kind(F.relu, (torch.ones(1),), {}, 0.01) == (RELU, "relu")
    assert activation_kind(F.leaky_relu, (torch.ones(1),), {"negative_slope": 0.001}, 0.01) == (
        RELU,
        "leaky_relu",
    )
    assert activation_kind(F.hardtanh, (torch.ones(1), 0.0, 6.0), {}, 0.01) == (RELU, "relu6")
    assert activation_kind(F.hardtanh, (torch.ones(1),), {}, 0.01) is None


@pytest.mark.parametrize(
    ("argument", "value"),
    [("window", 0), ("dead_threshold", 1.5), ("saturated_sample_fraction", 0.0), ("max_leaky_slope", 1.0)],
)
def test_bad_arguments_are_refused_by_name(argument, value):
    with pytest.raises(ValueError, match=argument):
        DeadReLUDetector(**{argument: value})
    with pytest.raises(ValueError, match="init_scale_low"):
        DeadReLUDetector(init_scale_low=20.0)


# ---------------------------------------------------------------------- each id on its fault
def test_dead_relu_layer_is_an_error_named_by_its_module(tmp_path):
    net = _dead_mlp()
    detector = DeadReLUDetector(every_n_steps=1, window=3)
    trainer = fit(Classifier(net=net), [detector], root=tmp_path, max_steps=4)
    found = [f for f in _ours(trainer) if f.check == DEAD_RELU]
    assert [(f.where, f.severity.value, f.step) for f in found] == [("net.1", "error", 3)]
    assert found[0].evidence["dead_share"] == 1.0 and found[0].evidence["window_batches"] == 3
    assert found[0].evidence["window_samples"] == 96 and "'net.0'" in found[0].message
    assert _no_hooks_left(net)


class FunctionalNet(nn.Module):
    """Calls the functional forms no module hook can see, three times in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 3)
        nn.init.constant_(self.fc2.bias, -20.0)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(self.fc1(x))
        hidden = torch.relu(self.fc2(hidden))
        return self.fc3(hidden.relu())


def test_functional_relu_is_seen_and_named_by_the_enclosing_module(tmp_path):
    net = FunctionalNet()
    detector = DeadReLUDetector(every_n_steps=1, window=2)
    trainer = fit(Classifier(net=net), [detector], root=tmp_path, max_steps=2)
    found = {f.where: f for f in _ours(trainer)}
    assert set(found) == {"net:relu#2", "net:relu#3"}  # the second call is dead, and so is the third
    assert found["net:relu#2"].severity.value == "error" and "after 'net.fc2'" in found["net:relu#2"].message


def test_saturated_tanh(tmp_path):
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    nn.init.normal_(net[0].weight, std=10.0)
    trainer = fit(
        Classifier(net=net, lr=1e-4),
        [DeadReLUDetector(every_n_steps=1, window=2)],
        root=tmp_path,
        max_steps=2,
    )
    found = [f for f in _ours(trainer) if f.check == SATURATED]
    assert [f.where for f in found] == ["net.1"] and found[0].evidence["saturated_share"] > 0.5


def test_constant_init_is_symmetric_but_a_zero_head_is_fine(tmp_path):
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    for layer in (net[0], net[2]):
        nn.init.constant_(layer.weight, 0.1)
        nn.init.zeros_(layer.bias)
    trainer = fit(Classifier(net=net), [DeadReLUDetector()], root=tmp_path, max_steps=2)
    found = [f for f in _ours(trainer) if f.check == POOR_INIT]
    # net.2 is read by a random head, which tells its units apart: only net.0 is locked
    assert [(f.where, f.step) for f in found] == [("net.0", 0)]
    assert found[0].evidence["units"] == 16
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.init.zeros_(net[2].weight)  # a zero-initialised head after a random layer: a common, healthy trick
    nn.init.zeros_(net[2].bias)
    trainer = fit(Classifier(net=net), [DeadReLUDetector()], root=tmp_path, max_steps=2)
    assert _ours(trainer) == []


def test_scale_collapsing_with_depth(tmp_path):
    layers: list[nn.Module] = [nn.Linear(8, 32), nn.Sigmoid()]
    for _ in range(8):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.Linear(32, 3))
    trainer = fit(Classifier(net=net), [DeadReLUDetector()], root=tmp_path, max_steps=2)
    found = [f for f in _ours(trainer) if f.check == POOR_INIT]
    assert [f.where for f in found] == ["net.17"] and found[0].evidence["scale_ratio"] < 0.1


class WithCritic(Classifier):
    """A classifier and a critic that predicts each sample's loss from the classifier's *detached* logits:
    two networks, so the critic's activations are no deeper layers of the classifier."""

    def __init__(self, critic: nn.Module) -> None:
        super().__init__(net=nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3)))
        self.critic = critic

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        predicted = self.critic(logits.detach() * 0.01).squeeze(1)  # a small input: a small critic signal
        return losses.mean() + F.mse_loss(predicted, losses.detach())


def test_scale_is_compared_along_one_network_not_across_a_detached_critic(tmp_path):
    healthy = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    trainer = fit(WithCritic(healthy), [DeadReLUDetector()], root=tmp_path, max_steps=2)
    assert _ours(trainer) == []  # the critic's small signal is not a collapse of the classifier's
    layers: list[nn.Module] = [nn.Linear(3, 32), nn.Sigmoid()]
    for _ in range(8):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    collapsing = nn.Sequential(*layers, nn.Linear(32, 1))
    trainer = fit(WithCritic(collapsing), [DeadReLUDetector()], root=tmp_path / "deep", max_steps=2)
    found = [f for f in _ours(trainer) if f.check == POOR_INIT]
    assert [f.where for f in found] == ["critic.17"] and found[0].evidence["scale_ratio"] < 0.1


# ---------------------------------------------------------------------- healthy models stay silent
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8 * 16, 3)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(F.max_pool2d(F.relu(self.features(images)), 2).flatten(1))


class GeluTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(1, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.project(x.unsqueeze(-1))).mean(dim=1))


class Images(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.repeat(1, 8).view(-1, 1, 8, 8))


@pytest.mark.parametrize("kind", ["mlp", "bn-cnn", "gelu-transformer"])
def test_healthy_models_are_silent(tmp_path, kind):
    net = {"mlp": lambda: None, "bn-cnn": lambda: Images(SmallCNN()), "gelu-transformer": GeluTransformer}[
        kind
    ]()
    detector = DeadReLUDetector(every_n_steps=2, window=3)
    trainer = fit(Classifier(net=net, lr=0.01), [detector], root=tmp_path, max_steps=12)
    assert _ours(trainer) == []
    assert detector._init_judged


# ---------------------------------------------------------------------- hooks and what is counted
class HookSpy(Classifier):
    """Records, inside each training step, whether the probe is attached."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attached: list[bool] = []
        self.fail_at: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.attached.append(torch._C._len_torch_function_stack() > 0 and bool(self.net[0]._forward_hooks))
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        return loss


def test_hooks_only_on_sampled_steps_and_removed_after_and_on_exception(tmp_path):
    module = HookSpy()
    fit(module, [DeadReLUDetector(every_n_steps=3)], root=tmp_path, max_steps=7)
    assert module.attached == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]  # every 3rd step (regular checks)
    assert _no_hooks_left(module)
    module = HookSpy()
    module.fail_at = 0
    with pytest.raises(RuntimeError, match="boom"):
        fit(module, [DeadReLUDetector()], root=tmp_path, max_steps=3)
    assert _no_hooks_left(module)


class WithValidation(Classifier):
    """Validation runs a dead ReLU that training never uses: it must not be counted."""

    def __init__(self) -> None:
        super().__init__()
        self.val_only = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        nn.init.constant_(self.val_only[0].bias, -50.0)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        return self.val_only(self(x)).sum()


@pytest.mark.parametrize("sample_validation", [False, True])
def test_validation_batches_are_counted_only_when_asked(tmp_path, sample_validation):
    detector = DeadReLUDetector(every_n_steps=1, window=4, sample_validation=sample_validation)
    trainer = pl.Trainer(
        callbacks=[detector],
        max_steps=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    module = WithValidation()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SentinelWarning)
        trainer.fit(module, classification_loader(n=128), classification_loader(n=64, seed=1))
    found = [(f.check, f.where) for f in _ours(trainer)]
    assert found == ([(DEAD_RELU, "val_only.1")] if sample_validation else [])
    assert _no_hooks_left(module)


def test_resume_from_checkpoint_keeps_the_cadence_and_does_not_judge_init_again(tmp_path):
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.init.constant_(net[0].weight, 0.1)
    nn.init.zeros_(net[0].bias)
    nn.init.constant_(net[2].weight, 0.1)
    first = DeadReLUDetector()
    fit(Classifier(net=net), [first], root=tmp_path, max_steps=3, enable_checkpointing=True)
    assert [f.where for f in first._own_findings] == ["net.0"]
    checkpoint_path = next(tmp_path.rglob("*.ckpt"))
    resumed = DeadReLUDetector()
    trainer = fit(Classifier(net=net), [resumed], root=tmp_path, max_steps=5, ckpt_path=str(checkpoint_path))
    assert resumed._clock.last_check is not None and resumed._init_judged  # the clock went on
    assert [(f.check, f.where, f.step) for f in _ours(trainer)] == [
        (POOR_INIT, "net.0", 0)
    ]  # restored, not new


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_not_counted_twice(reentrant):
    block = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    sites: dict[str, Any] = {}
    probe = ActivationProbe(block, sites)
    probe.attach()
    inputs = torch.randn(5, 4, requires_grad=True)
    checkpoint(block, inputs, use_reentrant=reentrant).sum().backward()
    probe.remove()
    assert list(sites) == ["1"] and sites["1"].samples == 5
    assert torch._C._len_torch_function_stack() == 0


def test_state_round_trip_skips_init_after_resume():
    detector = DeadReLUDetector()
    for cycle in range(17):
        detector._clock.decide(cycle)
    detector._init_judged = True
    restored = DeadReLUDetector()
    restored.load_state_dict(detector.state_dict())
    assert (restored._clock.state_dict(), restored._init_judged) == (detector._clock.state_dict(), True)
    assert [cycle for cycle in range(17, 40) if restored._clock.decide(cycle)] == [20, 30]


# ---------------------------------------------------------------------- Lightning loop variants
@pytest.mark.parametrize(
    "settings", [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}], ids=["bf16", "accumulate"]
)
def test_dead_relu_under_loop_variants(tmp_path, settings):
    detector = DeadReLUDetector(every_n_steps=1, window=2)
    trainer = fit(Classifier(net=_dead_mlp()), [detector], root=tmp_path, max_steps=2, **settings)
    assert [(f.check, f.where) for f in _ours(trainer)] == [(DEAD_RELU, "net.1")]


class Manual(Classifier):
    def __init__(self) -> None:
        super().__init__(
            net=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        )
        for layer in (self.net[0], self.net[2]):
            nn.init.constant_(layer.weight, 0.1)
        nn.init.zeros_(self.net[0].bias)
        nn.init.constant_(self.net[2].bias, -30.0)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_and_raise(tmp_path):
    detector = DeadReLUDetector(on_detect="raise", every_n_steps=1, window=2)
    with pytest.raises(SentinelError) as raised:
        fit(Manual(), [detector], root=tmp_path, max_steps=4)
    assert raised.value.finding.check == POOR_INIT and raised.value.finding.where == "net.0"


_DDP_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
import lightning.pytorch as pl, torch
from torch import nn
from _models import Classifier, classification_loader
from lightning_sentinel import SentinelError, findings
from lightning_sentinel.checks.activations import DeadReLUDetector

torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
nn.init.constant_(net[0].bias, -40.0)
detector = DeadReLUDetector(on_detect="raise", every_n_steps=1, window=2)
trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=2, strategy="ddp", logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    callbacks=[detector], default_root_dir={out!r})
outcome = "finished"
try:
    trainer.fit(Classifier(net=net), classification_loader())
except SentinelError as error:
    outcome = error.finding.check + ":" + str(error.finding.where)
samples = [f.evidence.get("window_samples") for f in findings(trainer)]
print(f"RESULT rank={{trainer.global_rank}} outcome={{outcome}} step={{trainer.global_step}} samples={{samples}}", flush=True)
"""


@pytest.mark.slow  # two processes: ~15 s; run with -m slow
def test_ddp_counts_are_summed_over_ranks_and_both_ranks_raise(tmp_path):
    tests = Path(__file__).resolve().parent
    script = tmp_path / "ddp_dead.py"
    script.write_text(
        textwrap.dedent(_DDP_SCRIPT.format(tests=str(tests), root=str(tests.parent), out=str(tmp_path)))
    )
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    results = re.findall(r"RESULT rank=(\d) outcome=(\S+) step=(\d+) samples=(\[[^\]]*\])", completed.stdout)
    assert sorted(rank for rank, *_ in results) == ["0", "1"], completed.stdout + completed.stderr
    # both ranks stop at the same window with the same finding; 2 ranks x 2 batches x 32 samples
    assert {tuple(result[1:]) for result in results} == {("dead-relu:net.1", "2", "[128.0]")}


# ---------------------------------------------------------------------- detection harness
@pytest.mark.parametrize("name", ["negative-bias-dead-relu-cnn", "wide-relu-before-head-digits"])
def test_harness_cases(name):
    result = run_case(get_case(name))
    assert result.verdict == OK, [f.format() for f in alarms(result.findings)]
    if name.startswith("negative-bias"):
        assert any(f.check == DEAD_RELU and f.where == "net:relu#2" for f in result.findings)


def test_suite_runs_the_detector():
    assert any(isinstance(check, DeadReLUDetector) for check in Sentinel(preset="fast").checks)
