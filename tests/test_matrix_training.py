"""The single-process rows of the test matrix: every check of ``Sentinel(preset="full")`` under the real
Trainer's precision, accumulation, clipping, schedulers, manual optimization, ``torch.compile``,
checkpoint/resume, crashes and loop variants. Healthy runs stay silent; faults are found at the right
step. (DDP rows: ``test_matrix_ddp.py``.)
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, classification_loader, deep_mlp, fit
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_sentinel import (
    DeadReLUDetector,
    GradientNormMonitor,
    LossInputCheck,
    NonFiniteGuard,
    Sentinel,
    SentinelWarning,
    findings,
    load_findings,
)


def _nan_from(step: int):
    return lambda logits, global_step: logits / 0.0 if global_step >= step else logits


class Quiet(Classifier):
    """``Classifier`` without ``self.log`` (Dynamo cannot trace Lightning's ``log``; not our business)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.transform is not None:
            logits = self.transform(logits, self.global_step)
        return nn.functional.cross_entropy(logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch)


class WarmupClassifier(Quiet):
    """Linear learning-rate warmup over 10 steps, then constant."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _serious(trainer: pl.Trainer) -> list[tuple[str, str | None, int]]:
    return [(f.check, f.where, f.step) for f in findings(trainer) if f.severity.value != "info"]


def _compiled(module: pl.LightningModule) -> Any:
    return torch.compile(module, backend="aot_eager")


# name -> (module factory taking a transform, Trainer settings)
CONFIGS: dict[str, tuple[Any, dict[str, Any]]] = {
    "plain": (lambda t: Quiet(transform=t), {}),
    "bf16-mixed": (lambda t: Quiet(transform=t), {"precision": "bf16-mixed"}),
    "accumulate-2": (lambda t: Quiet(transform=t), {"accumulate_grad_batches": 2}),
    "accumulate-4": (lambda t: Quiet(transform=t), {"accumulate_grad_batches": 4}),
    "clip-norm": (lambda t: Quiet(transform=t), {"gradient_clip_val": 0.05}),
    "warmup-scheduler": (lambda t: WarmupClassifier(transform=t), {}),
    "compile-aot-eager": (lambda t: _compiled(Quiet(transform=t)), {}),
    "64-true": (lambda t: Quiet(transform=t), {"precision": "64-true"}),
    # 16-bit AMP needs a GPU in Lightning's Trainer flags; on CPU a real GradScaler is plugged in by hand
    "16-mixed-cpu-scaler": (
        lambda t: Quiet(transform=t),
        {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]},
    ),
}


# the full preset's trials take seconds on 2 shared cores: two configurations in the default run
FAST_HEALTHY = ("plain", "bf16-mixed")


@pytest.mark.parametrize(
    "config", [c if c in FAST_HEALTHY else pytest.param(c, marks=pytest.mark.slow) for c in CONFIGS]
)
def test_healthy_full_preset_is_silent(tmp_path, config):
    make, settings = CONFIGS[config]
    trainer = fit(make(None), [Sentinel(preset="full")], root=tmp_path, max_steps=24, **settings)
    assert trainer.global_step == 24
    assert _serious(trainer) == []
    assert [f.check for f in findings(trainer)] == []  # not even an info: every check could look


@pytest.mark.parametrize(
    "config", [pytest.param(c, marks=pytest.mark.slow) if c.startswith("compile") else c for c in CONFIGS]
)
def test_a_nan_loss_is_found_at_its_step_and_stops_the_run(tmp_path, config):
    make, settings = CONFIGS[config]
    trainer = fit(make(_nan_from(5)), [Sentinel()], root=tmp_path, max_steps=30, **settings)
    first = findings(trainer)[0]
    # read at the next check step (0, 1, 2, 4, 8, ...), naming the step and batch where it began
    assert (first.check, first.step, first.evidence["first_step"]) == ("non-finite-loss", 8, 5)
    assert first.where is not None and first.where.startswith("batch ")
    assert math.isnan(first.evidence["loss"])
    assert trainer.global_step <= 9  # NonFiniteGuard's default on_detect="stop"
    assert (tmp_path / "sentinel" / "findings.json").exists()


def overflowing_scaler_run(
    root: Any, device: str, **trainer_kwargs: Any
) -> tuple[pl.Trainer, torch.amp.GradScaler]:
    """The full preset on a healthy model under a GradScaler whose scale starts absurdly high (2**40): it
    overflows and skips steps, halving its scale, which is normal fp16 AMP. ``device``: the scaler's."""
    scaler = torch.amp.GradScaler(device, init_scale=2.0**40)
    plugin = MixedPrecision("16-mixed", device, scaler=scaler)
    trainer = fit(
        Quiet(), [Sentinel(preset="full")], root=root, max_steps=24, plugins=[plugin], **trainer_kwargs
    )
    return trainer, scaler


def test_fp16_scaler_skipped_steps_are_not_faults(tmp_path):
    trainer, scaler = overflowing_scaler_run(tmp_path, "cpu")
    assert scaler.get_scale() < 2.0**40  # steps were skipped
    assert _serious(trainer) == []


def fp16_exploding_run(
    root: Any, device: str, **trainer_kwargs: Any
) -> tuple[pl.Trainer, torch.amp.GradScaler]:
    """A randn-initialised 7-layer MLP under fp16 AMP, gradient norms checked every step: its scaled
    gradients overflow, so the GradScaler skips and halves (no finding on those steps) until they fit."""
    scaler = torch.amp.GradScaler(device)
    trainer = fit(
        Classifier(net=deep_mlp(7, randn_init=True), lr=1e-6),
        [GradientNormMonitor(every_n_steps=1)],
        root=root,
        max_steps=24,
        plugins=[MixedPrecision("16-mixed", device, scaler=scaler)],
        **trainer_kwargs,
    )
    return trainer, scaler


def test_fp16_exploding_gradients_are_judged_unscaled_once_the_scaler_stops_skipping(tmp_path):
    trainer, scaler = fp16_exploding_run(tmp_path, "cpu")
    found = [f for f in findings(trainer) if f.check == "exploding-gradients"]
    assert scaler.get_scale() < 2.0**16  # steps were skipped
    assert found and found[0].step > 0 and found[0].where.startswith("net.")
    # unscaled: ~2.2e4 here; still multiplied by the scale (8 or more by then) it would be above 1.7e5
    assert 1e4 < found[0].evidence["grad_norm"] < 1e5


def test_exploding_gradients_are_reported_pre_clip(tmp_path):
    """Clipping to 0.05 hides nothing: the reported norm is the one before clipping."""
    monitor = GradientNormMonitor(every_n_steps=1, max_norm=10.0)
    blow_up = lambda logits, step: logits * 1e4 if step >= 3 else logits  # noqa: E731
    trainer = fit(Quiet(transform=blow_up), [monitor], root=tmp_path, max_steps=8, gradient_clip_val=0.05)
    found = [f for f in findings(trainer) if f.check == "exploding-gradients"]
    assert found and found[0].step == 3
    assert "pre-clip" in (GradientNormMonitor.__doc__ or "")
    assert found[0].evidence["grad_norm"] > 10.0  # far above the 0.05 it was clipped to


class TwoOptimizers(Quiet):
    """Manual optimization: a body and a head, each with its own optimizer, stepped in one batch."""

    def __init__(self, transform=None) -> None:
        super().__init__(transform=transform)
        self.automatic_optimization = False
        self.head = nn.Linear(3, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        body, head = self.optimizers()
        x, y = batch
        logits = self.head(self.net(x))
        if self.transform is not None:
            logits = self.transform(logits, self.global_step // 2)  # global_step counts both optimizers
        loss = nn.functional.cross_entropy(logits, y)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()
        return loss

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9),
            torch.optim.Adam(self.head.parameters(), lr=1e-3),
        ]


def test_manual_optimization_with_two_optimizers(tmp_path):
    trainer = fit(TwoOptimizers(), [Sentinel(preset="full")], root=tmp_path, max_steps=40)
    assert _serious(trainer) == []
    # the preflight trials say, as info, that they cannot replay manual optimization; nothing else
    assert {f.check for f in findings(trainer)} >= {"cannot-overfit-batch", "model-ignores-input"}
    assert {f.severity.value for f in findings(trainer)} == {"info"}
    broken = fit(TwoOptimizers(_nan_from(4)), [Sentinel()], root=tmp_path / "nan", max_steps=40)
    first = _serious(broken)[0]
    assert first[0] == "non-finite-loss" and first[2] in (8, 9)  # batch 4: optimizer steps 8 and 9
    assert broken.global_step <= 10


# ---------------------------------------------------------------------- torch.compile
def test_compiled_module_trials_train_their_own_copy(tmp_path):
    """Lightning's compiled forward is bound to the real module: a deep copy used to compute with the
    real weights, so the trials saw a loss that never moved (false cannot-overfit / model-ignores-input)."""
    trainer = fit(_compiled(Quiet()), [Sentinel(preset="full")], root=tmp_path, max_steps=4)
    assert findings(trainer) == []


@pytest.mark.parametrize("compiled", [False, True])
def test_compiled_module_with_a_dead_relu_is_still_seen(tmp_path, compiled):
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    nn.init.constant_(net[0].bias, -10.0)
    module = _compiled(Quiet(net=net)) if compiled else Quiet(net=net)
    trainer = fit(module, [DeadReLUDetector(every_n_steps=1, window=3)], root=tmp_path, max_steps=6)
    assert [(f.check, f.where, f.step) for f in findings(trainer)] == [("dead-relu", "net.1", 3)]


def test_compiled_module_softmax_before_cross_entropy_is_seen_and_named_like_eager(tmp_path):
    """Lightning compiles training_step; the loss runs after a graph break, in a Dynamo resume function
    whose name (``torch_dynamo_resume_in_training_step_at_N``) must not leak into ``where``."""
    softmax = lambda logits, step: torch.softmax(logits, dim=-1)  # noqa: E731
    trainer = fit(_compiled(Quiet(transform=softmax)), [LossInputCheck()], root=tmp_path, max_steps=3)
    found = [(f.check, f.severity.value, f.where) for f in findings(trainer)]
    assert found == [("softmax-before-cross-entropy", "error", "F.cross_entropy in training_step")]


@pytest.mark.slow  # inductor compiles C++ on the CPU: tens of seconds
def test_inductor_compiled_module_healthy_and_nan(tmp_path):
    healthy = fit(torch.compile(Quiet()), [Sentinel(preset="full")], root=tmp_path, max_steps=12)
    assert _serious(healthy) == []
    broken = fit(
        torch.compile(Quiet(transform=_nan_from(5))), [Sentinel()], root=tmp_path / "b", max_steps=30
    )
    assert _serious(broken)[0][::2] == ("non-finite-loss", 5)


# ---------------------------------------------------------------------- checkpoint and resume
def _state_equal(left: Any, right: Any) -> bool:
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        return isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor) and torch.equal(left, right)
    if isinstance(left, dict):
        return (
            isinstance(right, dict)
            and left.keys() == right.keys()
            and all(_state_equal(left[k], right[k]) for k in left)
        )
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(_state_equal(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left):
        return math.isnan(right)
    return left == right


def test_every_stateful_check_round_trips_through_a_checkpoint(tmp_path):
    sentinel = Sentinel(preset="full")
    transform = lambda logits, step: logits * 30.0  # noqa: E731  (something to find: loss at init, ...)
    trainer = fit(Quiet(transform=transform), [sentinel], root=tmp_path, max_steps=10)
    assert findings(trainer)  # the state holds findings, not only counters
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"][sentinel.state_key]
    assert set(saved) == {check.state_key for check in sentinel.checks} | {"__clock__"}
    restored = Sentinel(preset="full")
    restored.load_state_dict(saved)
    for before, after in zip(sentinel.checks, restored.checks, strict=True):
        assert _state_equal(before.state_dict(), after.state_dict()), type(before).__name__


def _resumable(step_nan: int) -> Quiet:
    """An overconfident init (loss-at-init at the first step) and a NaN later."""

    def transform(logits: torch.Tensor, step: int) -> torch.Tensor:
        return logits / 0.0 if step >= step_nan else logits * 30.0

    return Quiet(transform=transform)


def test_a_resumed_run_reports_what_an_uninterrupted_one_does(tmp_path):
    """The fast preset: the full preset's trials run under a wall-clock budget, so their verdicts on a
    loaded machine are not reproducible run to run (and they run once, before step 0, anyway)."""

    def callbacks() -> list[pl.Callback]:
        return [Sentinel(preset="fast", on_detect="warn"), DeadReLUDetector(every_n_steps=2, window=2)]

    pl.seed_everything(0, verbose=False)
    whole = fit(_resumable(14), callbacks(), root=tmp_path / "whole", max_steps=20)
    pl.seed_everything(0, verbose=False)
    first = fit(_resumable(14), callbacks(), root=tmp_path / "part", max_steps=8)  # one epoch: 8 batches
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = fit(
        _resumable(14),
        callbacks(),
        root=tmp_path / "part",
        max_steps=20,
        ckpt_path=str(tmp_path / "half.ckpt"),
    )
    # (check, step): Lightning's batch_idx after a resume at an epoch's last step may differ by one
    expected = [(f.check, f.step) for f in findings(whole)]
    # the NaN from step 14 is read at the end of fit (no check step after it), naming step 14
    assert ("non-finite-loss", 20) in expected and expected[0][0] == "loss-at-init"
    nan = next(f for f in findings(whole) if f.check == "non-finite-loss")
    assert nan.evidence["first_step"] == 14
    assert [(f.check, f.step) for f in findings(resumed)] == expected
    written = load_findings(tmp_path / "part" / "sentinel" / "findings.json")
    assert [(f.check, f.step) for f in written] == expected


def test_two_instances_of_one_check_coexist_and_resume_apart(tmp_path):
    every, sparse = GradientNormMonitor(every_n_steps=1), GradientNormMonitor(every_n_steps=5)
    assert every.state_key != sparse.state_key
    trainer = fit(Quiet(), [every, sparse], root=tmp_path, max_steps=10)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert {every.state_key, sparse.state_key} <= set(states)
    again = [GradientNormMonitor(every_n_steps=1), GradientNormMonitor(every_n_steps=5)]
    resumed = fit(Quiet(), again, root=tmp_path, max_steps=12, ckpt_path=str(tmp_path / "two.ckpt"))
    assert resumed.global_step == 12
    for original, copy in zip((every, sparse), again, strict=True):
        before, after = (
            original.state_dict()["extra"]["history"][""],
            copy.state_dict()["extra"]["history"][""],
        )
        assert len(after) > len(before) and after[: len(before)] == before  # its own history, continued
    assert (
        len(every.state_dict()["extra"]["history"][""])
        == 10
        != len(sparse.state_dict()["extra"]["history"][""])
    )


# ---------------------------------------------------------------------- crashes
class Crashes(Quiet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 3:
            self.error = KeyError("user code failed")
            raise self.error
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("preset", ["fast", "full"])
def test_a_crash_in_user_code_propagates_unchanged_and_leaves_nothing_behind(tmp_path, preset):
    module = Crashes(transform=lambda logits, step: logits * 30.0)  # a loss-at-init finding to write
    with pytest.raises(KeyError) as raised:
        fit(module, [Sentinel(preset=preset, checks=None)], root=tmp_path, max_steps=10)
    assert raised.value is module.error
    assert torch._C._len_torch_function_stack() == 0
    for submodule in module.modules():
        assert not submodule._forward_hooks and not submodule._forward_pre_hooks
        assert not submodule._forward_hooks_with_kwargs and not submodule._backward_hooks
    written = load_findings(tmp_path / "sentinel" / "findings.json")
    assert "loss-at-init" in {f.check for f in written}


# ---------------------------------------------------------------------- loops
def _loader(n: int = 64, seed: int = 1) -> DataLoader:
    return classification_loader(n=n, seed=seed)


def test_validate_test_predict_with_the_full_preset_attached(tmp_path):
    module, sentinel = Quiet(), Sentinel(preset="full")
    trainer = pl.Trainer(
        callbacks=[sentinel],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        max_steps=6,
    )
    trainer.fit(module, classification_loader(), _loader())
    assert trainer.validate(module, _loader())[0] == {}  # validation_step logs nothing
    trainer.test(module, _loader())
    predictions = trainer.predict(module, DataLoader(torch.randn(16, 8), batch_size=4))
    assert len(predictions) == 4 and predictions[0].shape == (4, 3)
    fresh = pl.Trainer(callbacks=[Sentinel(preset="full")], logger=False, enable_progress_bar=False)
    fresh.validate(module, _loader())
    fresh.predict(module, DataLoader(torch.randn(8, 8), batch_size=4))
    assert _serious(trainer) == [] and _serious(fresh) == []


class Stream(IterableDataset):
    """An iterable dataset without ``__len__``."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(400):
            x = torch.randn(8, generator=generator)
            yield x, (x[0] > 0).long() + (x[1] > 0.5).long()


LOOPS: dict[str, dict[str, Any]] = {
    "fast_dev_run": {"fast_dev_run": True},
    "overfit_batches": {"overfit_batches": 2},
    "limit_train_batches": {"limit_train_batches": 3, "max_steps": -1, "max_epochs": 3},
    "iterable-without-len": {"loader": DataLoader(Stream(), batch_size=16)},
    "barebones": {"barebones": True, "enable_progress_bar": None, "enable_model_summary": None},
}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_loop_variants_run_healthy_and_still_catch_a_nan(tmp_path, loop):
    settings = {**LOOPS[loop]}
    loader = settings.pop("loader", None)
    for key in [key for key, value in settings.items() if value is None]:
        del settings[key]  # barebones refuses these flags
    healthy = fit(Quiet(), [Sentinel(preset="full")], loader=loader, root=tmp_path, **settings)
    assert _serious(healthy) == []
    nan_step = 0 if loop == "fast_dev_run" else 2
    broken = fit(
        Quiet(transform=_nan_from(nan_step)), [NonFiniteGuard()], loader=loader, root=tmp_path, **settings
    )
    assert [(f.check, f.step) for f in findings(broken)][:1] == [("non-finite-loss", nan_step)]


def test_findings_are_warned_once_under_accumulation(tmp_path):
    """Accumulation calls the per-batch hooks 4x per step: a finding is still reported once."""
    trainer = fit(
        Quiet(transform=lambda logits, step: logits * 30.0),
        [Sentinel(preset="full")],
        root=tmp_path,
        max_steps=6,
        accumulate_grad_batches=4,
    )
    messages = [str(w.message) for w in trainer.sentinel_warnings if issubclass(w.category, SentinelWarning)]
    assert len(messages) == len(set(messages)) and any("loss-at-init" in m for m in messages)
