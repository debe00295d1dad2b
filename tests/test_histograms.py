"""HistogramLogger: device-side histograms, the sampled steps read back from the event files, hooks, AMP."""

import glob
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from _models import Classifier, TwoOptimizers, fit
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from lightning_sentinel import findings
from lightning_sentinel.checks.histograms import (
    HistogramLogger,
    _device_summary,
    bucket_limits,
    histogram_summary,
    select_layers,
)


# ---------------------------------------------------------------------- pure functions
def test_select_layers_filters_and_spreads_the_cap_over_depth():
    names = [f"net.{i}" for i in range(10)] + ["head"]
    assert select_layers(names, None, 50) == names
    assert select_layers(names, r"^net\.[0-2]$", 50) == ["net.0", "net.1", "net.2"]
    assert select_layers(names, None, 3) == ["net.0", "net.5", "head"]
    assert select_layers(names, "head|net", 1) == ["net.0"]
    assert select_layers(names, "nothing", 5) == []


def test_histogram_summary_counts_finite_values_and_divides_the_scale():
    values = torch.tensor([0.0, 1.0, 1.0, 4.0, float("nan"), float("inf")])
    low, high, num, total, squares, *counts = histogram_summary(values, bins=4).tolist()
    assert (low, high, num, total, squares, counts) == (0.0, 4.0, 4.0, 6.0, 18.0, [1.0, 2.0, 0.0, 1.0])
    scaled = histogram_summary(values * 1024, bins=4, scale=torch.tensor(1024.0)).tolist()
    assert scaled[:5] == [0.0, 4.0, 4.0, 6.0, 18.0]
    constant = histogram_summary(torch.full((3, 2), 0.5, dtype=torch.bfloat16), bins=8).tolist()
    assert constant[:3] == [0.5, 0.5, 6.0] and constant[5] == 6.0 and sum(constant[5:]) == 6.0
    assert histogram_summary(torch.full((3,), float("nan")), bins=2).tolist()[:3] == [0.0, 0.0, 0.0]
    assert bucket_limits(-1.0, 1.0, 4) == [-0.5, 0.0, 0.5, 1.0] and bucket_limits(3.0, 3.0, 4) == [3.0]


def test_the_device_path_agrees_with_the_cpu_fast_path():
    values = torch.randn(10_000) * 3 + 1
    fast, masked = histogram_summary(values, bins=32), _device_summary(values, bins=32)
    assert torch.allclose(fast[:5], masked[:5], rtol=1e-4)
    assert (fast[5:] - masked[5:]).abs().max() <= 2 and masked[5:].sum() == 10_000  # edges may round apart


@pytest.mark.parametrize(
    ("argument", "kwargs"),
    [
        ("every_n_steps", {"every_n_steps": 0}),
        ("max_layers", {"max_layers": 0}),
        ("bins", {"bins": 1.5}),
        ("name_filter", {"name_filter": "("}),
    ],
)
def test_bad_settings_raise_naming_the_argument(argument, kwargs):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        HistogramLogger(**kwargs)


# ---------------------------------------------------------------------- helpers
def _tensorboard(tmp_path):
    return TensorBoardLogger(str(tmp_path), name="tb", version=0)


def _events(tmp_path) -> EventAccumulator:
    (directory,) = {
        os.path.dirname(f) for f in glob.glob(str(tmp_path / "tb" / "**" / "events.*"), recursive=True)
    }
    accumulator = EventAccumulator(directory, size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _steps(accumulator: EventAccumulator, kind: str) -> dict[str, list[int]]:
    if kind == "histograms":
        return {tag: [e.step for e in accumulator.Histograms(tag)] for tag in accumulator.Tags()[kind]}
    return {tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()[kind]}


def _forward_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def _deep_net(depth: int = 8) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


class GradientProbe(Callback):
    """What the optimizer really sees: ``net.0.weight``'s gradient sum and max in ``on_before_optimizer_step``."""

    def __init__(self):
        self.sums: dict[int, float] = {}
        self.maxima: dict[int, float] = {}
        self.hooks_at_step: dict[int, int] = {}
        self.scales: dict[int, float] = {}
        self.calls = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls += 1
        grad = pl_module.net[0].weight.grad
        self.sums[trainer.global_step] = grad.double().sum().item()
        self.maxima[trainer.global_step] = grad.max().item()
        self.hooks_at_step[trainer.global_step] = _forward_hooks(pl_module)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales[trainer.global_step] = scaler.get_scale() if scaler is not None else 1.0


# ---------------------------------------------------------------------- with a Trainer
def test_histograms_and_ratios_at_exactly_the_sampled_steps(tmp_path):
    probe = GradientProbe()
    trainer = fit(
        Classifier(),
        [HistogramLogger(every_n_steps=4), probe],
        root=tmp_path,
        max_steps=10,
        logger=_tensorboard(tmp_path),
    )
    assert findings(trainer) == [] and trainer.sentinel_warnings == []
    events = _events(tmp_path)
    histograms = _steps(events, "histograms")
    expected = {
        f"sentinel/{kind}/net.{i}.{p}"
        for kind in ("weights", "gradients")
        for i in (0, 2)
        for p in ("weight", "bias")
    } | {f"sentinel/activations/net.{i}" for i in (0, 1, 2)}
    assert set(histograms) == expected
    assert all(steps == [0, 4, 8] for steps in histograms.values()), histograms
    scalars = _steps(events, "scalars")
    assert scalars["sentinel/update_ratio/net.0"] == [0, 4, 8] == scalars["sentinel/update_ratio/net.2"]
    # the gradient histogram is the gradient the optimizer steps with
    for event in events.Histograms("sentinel/gradients/net.0.weight"):
        assert event.histogram_value.num == 8 * 32
        assert math.isclose(event.histogram_value.sum, probe.sums[event.step], rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(event.histogram_value.max, probe.maxima[event.step], rel_tol=1e-6)
    # forward hooks only on the sampled steps, none left after the run
    assert {step for step, hooks in probe.hooks_at_step.items() if hooks} == {0, 4, 8}
    assert _forward_hooks(trainer.lightning_module) == 0
    # the custom-scalar layout groups the sentinel scalars in one section
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "sentinel"
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    for tag, title in [
        ("sentinel/grad_norm/total", "gradient norms"),
        ("sentinel/grad_norm/optimizer_1/total", "gradient norms"),
        ("sentinel/update_ratio/net.0", "update/weight ratios"),
        ("sentinel/dead_share/net.1", "dead and saturated units"),
        ("sentinel/loss/smoothed", "loss"),
        ("sentinel/lr/optimizer_0", "other sentinel scalars"),
    ]:  # every sentinel scalar lands in exactly one chart
        assert [t for t, regexes in charts.items() if any(re.fullmatch(r, tag) for r in regexes)] == [title]


def test_update_ratio_is_the_relative_weight_change(tmp_path):
    class UpdateProbe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.before = pl_module.net[0].weight.detach().clone(), pl_module.net[0].bias.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 1:
                after = pl_module.net[0].weight.detach(), pl_module.net[0].bias.detach()
                delta = math.hypot(*(float((a - b).norm()) for a, b in zip(after, self.before, strict=True)))
                self.ratio = delta / math.hypot(*(float(b.norm()) for b in self.before))

    probe = UpdateProbe()
    fit(
        Classifier(),
        [HistogramLogger(every_n_steps=1), probe],
        root=tmp_path,
        max_steps=2,
        logger=_tensorboard(tmp_path),
    )
    (first, _) = _events(tmp_path).Scalars("sentinel/update_ratio/net.0")
    assert first.step == 0 and math.isclose(first.value, probe.ratio, rel_tol=1e-4)
    assert 1e-5 < first.value < 1.0


def test_filter_and_cap_keep_the_named_layers(tmp_path):
    fit(
        Classifier(net=_deep_net(8)),
        [HistogramLogger(every_n_steps=5, name_filter=r"^net\.\d+$", max_layers=3)],
        root=tmp_path,
        max_steps=6,
        logger=_tensorboard(tmp_path),
    )
    events = _events(tmp_path)
    # 15 layers match (8 Linear, 7 ReLU): the cap keeps the first, the middle (a ReLU) and the last
    assert set(events.Tags()["histograms"]) == {
        "sentinel/activations/net.0",
        "sentinel/activations/net.7",
        "sentinel/activations/net.14",
    } | {
        f"sentinel/{kind}/net.{i}.{p}"
        for kind in ("weights", "gradients")
        for i in (0, 14)
        for p in ("weight", "bias")
    }
    assert set(events.Tags()["scalars"]) == {"sentinel/update_ratio/net.0", "sentinel/update_ratio/net.14"}


def test_activation_filter_names_modules(tmp_path):
    fit(
        Classifier(net=_deep_net(4)),
        [HistogramLogger(every_n_steps=5, name_filter=r"net\.[13]$", log_weights=False, log_gradients=False)],
        root=tmp_path,
        max_steps=6,
        logger=_tensorboard(tmp_path),
    )
    events = _events(tmp_path)
    assert _steps(events, "histograms") == {
        "sentinel/activations/net.1": [0, 5],
        "sentinel/activations/net.3": [0, 5],
    }


class FusedAdam(Classifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)  # unscales inside its own step()


def test_a_filter_that_matches_nothing_says_so(tmp_path):
    trainer = fit(
        Classifier(),
        [HistogramLogger(every_n_steps=1, name_filter="encoder")],
        root=tmp_path,
        max_steps=2,
        logger=_tensorboard(tmp_path),
    )
    (warning,) = trainer.sentinel_warnings
    assert "'encoder' matches none of the model's layers (net.0, net.1, net.2)" in str(warning.message)
    assert _events(tmp_path).Tags()["histograms"] == []


@pytest.mark.parametrize("module_class", [Classifier, FusedAdam])
def test_accumulation_and_16_bit_amp_log_unscaled_gradients_once_per_optimizer_step(tmp_path, module_class):
    probe = GradientProbe()
    trainer = fit(
        module_class(),
        [HistogramLogger(every_n_steps=1), probe],
        root=tmp_path,
        max_steps=4,
        accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
        logger=_tensorboard(tmp_path),
    )
    assert trainer.precision_plugin.scaler.get_scale() > 1000
    assert probe.calls == 4 and trainer.sentinel_warnings == []
    events = _events(tmp_path)
    histograms = _steps(events, "histograms")
    assert histograms["sentinel/gradients/net.0.weight"] == [0, 1, 2, 3]  # once per optimizer step
    assert histograms["sentinel/activations/net.0"] == [0, 1, 2, 3]  # one micro-batch's forward per step
    for event in events.Histograms("sentinel/gradients/net.0.weight"):
        # the accumulated gradient the optimizer steps with, unscaled (fused Adam still holds it scaled)
        scale = probe.scales[event.step] if module_class is FusedAdam else 1.0
        assert math.isclose(
            event.histogram_value.sum, probe.sums[event.step] / scale, rel_tol=1e-3, abs_tol=1e-5
        )
        assert math.isclose(event.histogram_value.max, probe.maxima[event.step] / scale, rel_tol=1e-3)
        assert abs(event.histogram_value.max) < 1.0


def test_bf16_mixed_works(tmp_path):
    trainer = fit(
        Classifier(),
        [HistogramLogger(every_n_steps=3)],
        root=tmp_path,
        max_steps=4,
        precision="bf16-mixed",
        logger=_tensorboard(tmp_path),
    )
    assert trainer.sentinel_warnings == []  # a failure would have disabled it with a warning
    histograms = _steps(_events(tmp_path), "histograms")
    assert histograms["sentinel/activations/net.2"] == [0, 3]  # bf16 logits under autocast
    assert histograms["sentinel/gradients/net.0.weight"] == [0, 3]


def test_no_tensorboard_logger_says_so_once_and_writes_nothing(tmp_path):
    histograms = HistogramLogger(every_n_steps=1)
    module = Classifier()
    csv = CSVLogger(str(tmp_path), name="csv")
    trainer = fit(module, [histograms], root=tmp_path, max_steps=3, logger=csv, log_every_n_steps=1)
    (warning,) = trainer.sentinel_warnings
    assert "no TensorBoardLogger" in str(warning.message) and "CSVLogger" in str(warning.message)
    assert glob.glob(str(tmp_path / "**" / "events.*"), recursive=True) == []
    with open(os.path.join(csv.log_dir, "metrics.csv")) as metrics:
        assert "sentinel/" not in metrics.read()
    assert _forward_hooks(module) == 0
    again = fit(module, [histograms], root=tmp_path, max_steps=3, logger=False)
    (repeated,) = again.sentinel_warnings  # once per fit: a reused instance judges each fit afresh
    assert "no TensorBoardLogger" in str(repeated.message) and "none" in str(repeated.message)


def test_hooks_are_removed_when_training_fails_on_a_sampled_step(tmp_path):
    class Fails(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step == 2:
                assert _forward_hooks(self) > 0  # the sampled step's hooks are attached
                raise RuntimeError("boom")
            return loss

    module = Fails()
    with pytest.raises(RuntimeError, match="boom"):
        fit(
            module,
            [HistogramLogger(every_n_steps=2)],
            root=tmp_path,
            max_steps=5,
            logger=_tensorboard(tmp_path),
        )
    assert _forward_hooks(module) == 0


def test_manual_optimization_with_two_optimizers_logs_both_at_the_batch_step(tmp_path):
    fit(
        TwoOptimizers(),
        [HistogramLogger(every_n_steps=4)],
        root=tmp_path,
        max_steps=10,
        logger=_tensorboard(tmp_path),
    )
    events = _events(tmp_path)
    histograms = _steps(events, "histograms")
    # global_step counts both optimizers' steps: batches start at 0, 2, 4, ...; 0, 4, 8 are sampled
    assert histograms["sentinel/gradients/net.0.weight"] == [0, 4, 8]
    assert histograms["sentinel/gradients/head.weight"] == [0, 4, 8]
    assert _steps(events, "scalars")["sentinel/update_ratio/head"] == [0, 4, 8]


def test_resume_keeps_the_cadence_on_the_global_step(tmp_path):
    first = fit(
        Classifier(),
        [HistogramLogger(every_n_steps=3)],
        root=tmp_path,
        max_steps=4,
        logger=_tensorboard(tmp_path),
        enable_checkpointing=True,
    )
    checkpoint = first.checkpoint_callback.best_model_path
    assert checkpoint
    fit(
        Classifier(),
        [HistogramLogger(every_n_steps=3)],
        root=tmp_path,
        max_steps=7,
        logger=_tensorboard(tmp_path),
        ckpt_path=checkpoint,
    )
    # two event files in one directory (their order within a second is arbitrary)
    assert sorted(_steps(_events(tmp_path), "histograms")["sentinel/weights/net.0.weight"]) == [0, 3, 6]


DDP_SCRIPT = """
import sys
import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
sys.path.insert(0, {tests!r})
from _models import Classifier, classification_loader
from lightning_sentinel.checks.histograms import HistogramLogger

if __name__ == "__main__":
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir={root!r},
        callbacks=[HistogramLogger(every_n_steps=2)], logger=TensorBoardLogger({root!r}, name="tb", version=0),
    )
    module = Classifier()
    trainer.fit(module, classification_loader())
    hooks = sum(len(m._forward_hooks) for m in module.modules())
    print(f"RESULT rank={{trainer.global_rank}} step={{trainer.global_step}} hooks={{hooks}}")
"""


@pytest.mark.slow  # two processes: ~15 s on an idle machine, much more on a loaded one
def test_ddp_writes_on_rank_zero_only_without_collectives(tmp_path):
    script = tmp_path / "ddp_histograms.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), root=str(tmp_path)))
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    results = re.findall(r"RESULT rank=(\d) step=(\d+) hooks=(\d+)", completed.stdout)
    assert sorted(results) == [("0", "4", "0"), ("1", "4", "0")], completed.stdout + completed.stderr
    assert len(glob.glob(str(tmp_path / "tb" / "**" / "events.*"), recursive=True)) == 1
    assert _steps(_events(tmp_path), "histograms")["sentinel/gradients/net.0.weight"] == [0, 2]
