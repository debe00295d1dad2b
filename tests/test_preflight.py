"""Preflight trials: pure rules, detection, silence on healthy runs, and an untouched real run."""

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, classification_loader, fit
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sentinel import findings
from lightning_sentinel.checks._batches import find_parts, replace_parts
from lightning_sentinel.checks._trial import (
    TrialUnavailable,
    first_optimizer,
    forked_random_state,
    step_schedulers,
)
from lightning_sentinel.checks.preflight import (
    LabelShuffleCheck,
    OverfitBatchCheck,
    ignores_input_verdict,
    overfit_verdict,
)

PREFLIGHT = {"model-ignores-input", "cannot-overfit-batch"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the trials' hundreds of tiny steps slow down many times with two on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _mine(trainer: pl.Trainer, severity: str | None = None) -> list:
    return [
        f
        for f in findings(trainer)
        if f.check in PREFLIGHT and (severity is None or f.severity.value == severity)
    ]


def _checks() -> list[pl.Callback]:
    # a generous time budget: on a loaded CI machine the default budget can cut a trial short (-> info)
    return [OverfitBatchCheck(max_seconds=60.0), LabelShuffleCheck(max_seconds=60.0)]


# ---------------------------------------------------------------------- pure parts
def test_overfit_rule():
    assert overfit_verdict(2.3, 0.01, 0.55) == (False, 0.01 / 2.3)
    assert overfit_verdict(2.3, 2.0, 0.55)[0]
    assert overfit_verdict(2.3, math.nan, 0.55) == (True, math.inf)
    assert overfit_verdict(0.0, 0.0, 0.55) == (False, 0.0)


def test_ignores_input_rule():
    assert ignores_input_verdict(0.5, 2.3, 2.3, 0.05) == (False, "")
    assert ignores_input_verdict(2.29, 2.5, 2.3, 0.05) == (True, "zeroed inputs")
    assert ignores_input_verdict(2.29, 2.3, 2.6, 0.05) == (True, "shuffled labels")
    assert ignores_input_verdict(math.nan, 2.3, 2.3, 0.05) == (False, "")


def test_optimizer_forms_and_step_schedulers():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    forms = [
        optimizer,
        [optimizer],
        ([optimizer], [scheduler]),
        {"optimizer": optimizer, "lr_scheduler": scheduler},
    ]
    assert all(first_optimizer(form) is optimizer for form in forms)
    with pytest.raises(TrialUnavailable):
        first_optimizer(None)
    stepped = ([optimizer], [{"scheduler": scheduler, "interval": "step"}])
    assert step_schedulers(stepped, optimizer) == [scheduler]
    assert step_schedulers(([optimizer], [scheduler]), optimizer) == []


def test_batch_layouts():
    x, y = torch.ones(4, 2), torch.arange(4)
    assert find_parts([x, y]).target_path == (1,)
    assert find_parts({"features": x, "label": y}).input_path == ("features",)
    assert find_parts({"a": x, "b": y}, "a", "b").target_path == ("b",)
    for bad in (object(), {"a": x}, ([1, 2], y)):
        assert find_parts(bad).reason
    parts = find_parts((x, y))
    replaced = replace_parts((x, y), parts, targets=y.flip(0))
    assert isinstance(replaced, tuple) and replaced[1].tolist() == [3, 2, 1, 0] and y.tolist() == [0, 1, 2, 3]


def test_forked_random_state_restores_everything():
    import random

    import numpy

    loader = classification_loader()
    generator = loader.generator
    torch.manual_seed(0)
    random.seed(0)
    numpy.random.seed(0)
    state = generator.get_state()
    with forked_random_state([loader]):
        next(iter(loader))
        torch.rand(5), random.random(), numpy.random.rand()
    assert torch.equal(generator.get_state(), state)
    assert random.random() == random.Random(0).random()
    assert numpy.random.rand() == numpy.random.RandomState(0).rand()
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    with forked_random_state():
        torch.rand(3)
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("max_steps", 0), ("max_seconds", -1.0), ("batch_size", 0), ("max_fraction", 1.5), ("input_key", 1.5)],
)
def test_bad_arguments_raise(argument, value):
    with pytest.raises(ValueError, match=argument):
        OverfitBatchCheck(**{argument: value})


def test_label_shuffle_bad_arguments_raise():
    with pytest.raises(ValueError, match="batches"):
        LabelShuffleCheck(batches=1)
    with pytest.raises(ValueError, match="margin"):
        LabelShuffleCheck(margin=0.0)
    with pytest.raises(ValueError, match="on_detect"):
        LabelShuffleCheck(on_detect="shout")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the real run is untouched
class _Recording(Classifier):
    """Records the first sample of every training batch (the real run's batch order)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen.append(batch[0][0].clone())
        loss = super().training_step(batch, batch_idx)
        # consume the global RNG in the step: a changed RNG state would change the weights
        return loss + 0.0 * torch.rand(()) + 0.0 * nn.functional.dropout(loss, 0.5)


def _run(tmp_path, callbacks):
    pl.seed_everything(3, verbose=False)
    module = _Recording(optimizer="adam", lr=0.01)
    trainer = fit(module, callbacks, root=tmp_path, max_steps=12)
    return module, trainer


def test_the_real_run_is_exactly_as_without_the_checks(tmp_path):
    plain, _ = _run(tmp_path / "plain", [])
    checked, trainer = _run(tmp_path / "checked", _checks())
    assert _mine(trainer) == []
    assert len(plain.seen) == len(checked.seen) == 12
    assert all(torch.equal(a, b) for a, b in zip(plain.seen, checked.seen, strict=True))
    for (name, a), b in zip(plain.state_dict().items(), checked.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_worker_loaders_and_bf16_stay_silent_and_untouched(tmp_path):
    def run(callbacks):
        pl.seed_everything(5, verbose=False)
        x, y = _digits_like()
        loader = DataLoader(
            TensorDataset(x, y), batch_size=32, shuffle=True, num_workers=1, persistent_workers=True
        )
        module = _Net()
        trainer = fit(module, callbacks, loader=loader, root=tmp_path, max_steps=6, precision="bf16-mixed")
        return module, trainer

    plain, _ = run([])
    checked, trainer = run(_checks())
    assert _mine(trainer) == []
    for a, b in zip(plain.state_dict().values(), checked.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- detection
def _digits_like(n: int = 256, features: int = 16, classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=generator) * 2
    y = torch.randint(0, classes, (n,), generator=generator)
    x = centres[y] + torch.randn(n, features, generator=generator)
    return x, y


def _loader(x: Tensor, y: Tensor, dicts: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    if dicts:
        rows = [{"pixels": x[i], "cls": y[i]} for i in range(len(x))]
        return DataLoader(rows, batch_size=32, shuffle=True, generator=generator)  # type: ignore[arg-type]
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=generator)


class _Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.0, weight_decay: float = 0.0, zero_inputs: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 4))
        self.weight_decay = weight_decay
        self.zero_inputs = zero_inputs

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = (batch["pixels"], batch["cls"]) if isinstance(batch, Mapping) else batch
        if self.zero_inputs:
            x = x * 0  # the bug
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return {"loss": loss}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=3e-3, weight_decay=self.weight_decay)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 100)]


def test_unknown_dict_keys_give_an_info_naming_them(tmp_path):
    x, y = _digits_like()
    trainer = fit(_Net(), _checks(), loader=_loader(x, y, dicts=True), root=tmp_path, max_steps=2)
    found = _mine(trainer)
    assert {f.severity.value for f in found} == {"info"} and len(found) == 2
    assert all("'pixels'" in f.message and "input_key" in f.hint for f in found)


def test_explicit_keys(tmp_path):
    x, y = _digits_like()
    callbacks = [
        OverfitBatchCheck(input_key="pixels", target_key="cls", max_seconds=60.0),
        LabelShuffleCheck(input_key="pixels", target_key="cls", max_seconds=60.0),
    ]
    trainer = fit(_Net(), callbacks, loader=_loader(x, y, dicts=True), root=tmp_path, max_steps=2)
    assert _mine(trainer) == []


def test_permuted_labels_are_caught(tmp_path):
    x, y = _digits_like()
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    trainer = fit(_Net(), _checks(), loader=_loader(x, y), root=tmp_path, max_steps=2)
    found = _mine(trainer, "error")
    assert [f.check for f in found] == ["model-ignores-input"]
    assert found[0].where == "batch[1]"
    assert found[0].evidence["real_loss"] > 0.95 * found[0].evidence["shuffled_loss"]
    assert found[0].evidence["seconds"] > 0 and "paired" in found[0].hint


def test_inputs_zeroed_in_training_step_are_caught(tmp_path):
    x, y = _digits_like()
    trainer = fit(_Net(zero_inputs=True), _checks(), loader=_loader(x, y), root=tmp_path, max_steps=2)
    by_check = {f.check: f for f in _mine(trainer)}
    assert by_check["model-ignores-input"].where == "batch[0]"
    assert by_check["model-ignores-input"].severity.value == "error"
    assert by_check["cannot-overfit-batch"].severity.value == "warning"


def test_over_regularised_model_cannot_overfit(tmp_path):
    x, y = _digits_like()
    trainer = fit(
        _Net(dropout=0.97, weight_decay=1.0),
        [OverfitBatchCheck(max_seconds=60.0)],
        loader=_loader(x, y),
        root=tmp_path,
        max_steps=2,
    )
    found = _mine(trainer)
    assert [(f.check, f.where, f.severity.value) for f in found] == [
        ("cannot-overfit-batch", "batch[0]", "warning")
    ]
    assert found[0].evidence["fraction"] > 0.55 and found[0].evidence["samples"] == 16, found[0].evidence
    assert "dropout" in found[0].hint


def test_raise_policy(tmp_path):
    from lightning_sentinel import SentinelError

    x, y = _digits_like()
    with pytest.raises(SentinelError, match="cannot-overfit-batch"):
        fit(
            _Net(zero_inputs=True),
            [OverfitBatchCheck(on_detect="raise", max_seconds=60.0)],
            loader=_loader(x, y),
            root=tmp_path,
        )


# ---------------------------------------------------------------------- what cannot be tried
class _Manual(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_is_skipped_with_an_info(tmp_path):
    trainer = fit(_Manual(), _checks(), root=tmp_path, max_steps=2)
    assert {(f.check, f.severity.value) for f in _mine(trainer)} == {
        ("cannot-overfit-batch", "info"),
        ("model-ignores-input", "info"),
    }
    assert all("manual optimization" in f.message for f in _mine(trainer))


class _Box:
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y


class _Pair:
    def __init__(self, src: Tensor, tgt: Tensor) -> None:
        self.src, self.tgt = src, tgt


class _BoxModule(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = (batch.x, batch.y) if isinstance(batch, _Box) else (batch.src, batch.tgt)
        return nn.functional.cross_entropy(self(x), y)


def _object_loader(box: type) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(
        list(zip(x, y, strict=True)),
        batch_size=32,
        shuffle=True,
        generator=generator,
        collate_fn=lambda rows: box(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])),
    )


def test_object_batches_are_tried_and_unknown_attributes_give_an_info_naming_them(tmp_path):
    trainer = fit(_BoxModule(), _checks(), loader=_object_loader(_Box), root=tmp_path / "box", max_steps=2)
    assert _mine(trainer) == []  # batch.x / batch.y by the convention
    trainer = fit(_BoxModule(), _checks(), loader=_object_loader(_Pair), root=tmp_path / "pair", max_steps=2)
    found = _mine(trainer)
    assert {f.severity.value for f in found} == {"info"} and len(found) == 2
    assert all("_Pair" in f.message and "'src'" in f.message and "input_key" in f.message for f in found)


def test_runs_once_and_not_again_on_resume(tmp_path):
    check = OverfitBatchCheck()
    trainer = fit(Classifier(), [check], root=tmp_path, max_steps=4, enable_checkpointing=True)
    assert check.state_dict()["extra"] == {"done": True}
    path = trainer.checkpoint_callback.best_model_path
    resumed = OverfitBatchCheck()
    fit(Classifier(), [resumed], root=tmp_path, max_steps=6, ckpt_path=path)
    assert resumed._done


# ---------------------------------------------------------------------- harness
@pytest.mark.parametrize("name", ["permuted-labels-mlp", "over-regularised-mlp"])
def test_harness_fast_cases(name):
    from benchmarks.detection.cases import get_case
    from benchmarks.detection.runner import run_case

    case = get_case(name)
    result = run_case(case)
    assert result.verdict == "ok", (result.verdict, result.reported, result.error)
    assert set(result.reported) & case.expected


class _Uncopyable(Classifier):
    def __init__(self) -> None:
        import threading

        super().__init__()
        self.lock = threading.Lock()  # cannot be deep-copied


def test_a_model_that_cannot_be_copied_gives_an_info(tmp_path):
    trainer = fit(_Uncopyable(), _checks(), root=tmp_path, max_steps=2)
    found = _mine(trainer)
    assert {f.severity.value for f in found} == {"info"} and len(found) == 2
    assert all("TypeError" in f.message for f in found)
    assert trainer.global_step == 2


# ---------------------------------------------------------------------- the trials train what the user trains
class _FrozenBackbone(pl.LightningModule):
    """A batch-norm backbone frozen and kept in eval mode, a trained head; records what each step sees."""

    seen: list[
        tuple[bool, bool]
    ] = []  # (backbone in train mode, backbone weights unchanged), shared by copies

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.head = nn.Linear(32, 4)
        self.initial = self.backbone[0].weight.detach().clone()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        unchanged = torch.equal(self.backbone[0].weight, self.initial)
        _FrozenBackbone.seen.append((self.backbone.training, unchanged))
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)  # frozen parameters in the optimizer too


def test_the_trials_keep_eval_mode_modules_and_frozen_parameters(tmp_path):
    _FrozenBackbone.seen = []
    x, y = _digits_like()
    module = _FrozenBackbone()
    running_mean = module.backbone[1].running_mean.clone()
    trainer = fit(module, _checks(), loader=_loader(x, y), root=tmp_path, max_steps=1)
    assert _mine(trainer) == []
    assert len(_FrozenBackbone.seen) > 300  # the trials' steps and evaluations, then the real step
    assert all(not training and unchanged for training, unchanged in _FrozenBackbone.seen)
    assert torch.equal(module.backbone[1].running_mean, running_mean)  # eval mode: statistics never updated
