"""Property-based tests (hypothesis): arbitrary settings and arbitrary batches.

- Settings: any value for any argument of any exported callback either constructs or raises the
  documented error (``ValueError``, or ``TypeError`` for a wrong type) naming the argument.
- Batches: nested tuples/lists/dicts/dataclasses/namedtuples, batch size 1, empty and integer
  tensors, float64/float16 inputs, huge and tiny values, NaN and Inf. With every check running on every step, no check fails
  (a failing check would disable itself with a warning), nothing but a ``SentinelWarning`` escapes,
  and the batches the model receives in ``training_step`` are identical, value for value, to those
  of the same run without the callbacks.

The example counts are small so that the default run stays fast; ``-m slow`` runs a larger profile.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections import namedtuple
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_sentinel
from lightning_sentinel import (
    ArgumentTypeError,
    BatchIndependenceCheck,
    BatchInspector,
    DeadReLUDetector,
    GradientNormMonitor,
    HistogramLogger,
    LabelShuffleCheck,
    LearningCurveMonitor,
    LossAtInitCheck,
    LossInputCheck,
    NonFiniteGuard,
    OverfitBatchCheck,
    ParameterUpdateMonitor,
    Sentinel,
    SentinelCallback,
    SentinelError,
    TargetLeakageCheck,
    TrainEvalModeChecker,
)

CALLBACKS = [  # every callback class lightning_sentinel exports
    obj
    for obj in (getattr(lightning_sentinel, name) for name in lightning_sentinel.__all__)
    if inspect.isclass(obj) and issubclass(obj, pl.Callback)
]
ARGUMENTS = [
    (cls, name) for cls in CALLBACKS for name in inspect.signature(cls.__init__).parameters if name != "self"
]

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),  # beyond the float range too
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["warn", "stop", "raise", "fast", "full", "val_loss", "x", "(", "dead-relu"]),
    st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3),
    st.tuples(st.text(max_size=4)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.sampled_from(ARGUMENTS), ANY_VALUE)
def test_any_setting_constructs_or_raises_the_documented_error(argument, value):
    cls, name = argument
    try:
        callback = cls(**{name: value})
    except ArgumentTypeError as error:  # a wrong type: a TypeError that is also a ValueError
        assert f"`{name}`" in str(error)
    except ValueError as error:
        assert f"`{name}`" in str(error)
    else:
        # a setting that was accepted is stored and usable
        assert isinstance(callback.state_key, str)
        stored = getattr(callback, name, None)
        if isinstance(value, float) and stored is not None:
            assert math.isfinite(value)  # NaN/Inf never pass


# ---------------------------------------------------------------------- batches
@dataclasses.dataclass
class Sample:
    inputs: Tensor
    targets: Any
    extra: Any = None


Pair = namedtuple("Pair", "x y")

LAYOUTS = ("tensor", "tuple", "list", "dict", "nested", "dataclass", "namedtuple")
EXTRAS = ("none", "empty", "int", "string", "nested", "nothing")
VALUES = ("normal", "huge", "tiny", "constant", "nan", "inf", "integer", "zeros_row", "float64", "half")
TARGETS = ("classes", "one_class", "regression", "binary")


@dataclasses.dataclass(frozen=True)
class Layout:
    layout: str
    extra: str
    values: str
    targets: str
    batch_size: int
    features: int
    on_detect: str = "warn"


def _inputs(layout: Layout, generator: torch.Generator, seed: int) -> Tensor:
    n, f = layout.batch_size, layout.features
    x = torch.randn(n, f, generator=generator)
    if layout.values == "huge":
        x = x * 1e30
    elif layout.values == "tiny":
        x = x * 1e-30
    elif layout.values == "constant":
        x = torch.full((n, f), 3.0)
    elif layout.values == "nan" and seed > 0:  # a clean first batch, then a broken one
        x[0, 0] = math.nan
    elif layout.values == "inf" and seed > 0:
        x[-1, -1] = math.inf
    elif layout.values == "integer":
        x = torch.randint(0, 255, (n, f), generator=generator)
    elif layout.values == "zeros_row":
        x[0] = 0.0
    elif layout.values == "float64":
        x = x.double()
    elif layout.values == "half":
        x = x.half()
    return x


def _targets(layout: Layout, generator: torch.Generator) -> Tensor:
    n = layout.batch_size
    if layout.targets == "classes":
        return torch.randint(0, 3, (n,), generator=generator)
    if layout.targets == "one_class":
        return torch.zeros(n, dtype=torch.long)
    if layout.targets == "binary":
        return torch.randint(0, 2, (n, 1), generator=generator).float()
    return torch.randn(n, 1, generator=generator)


def _extra(kind: str, generator: torch.Generator) -> Any:
    return {
        "none": None,
        "empty": torch.empty(0),
        "int": torch.randint(0, 10, (3, 2), generator=generator),
        "string": "meta",
        "nested": {"ids": (torch.arange(2), [torch.zeros(1, 0)]), "name": "b"},
        "nothing": (),
    }[kind]


def make_batch(layout: Layout, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    x, y, extra = (
        _inputs(layout, generator, seed),
        _targets(layout, generator),
        _extra(layout.extra, generator),
    )
    if layout.layout == "tensor":
        return x
    if layout.layout == "tuple":
        return (x, y, extra)
    if layout.layout == "list":
        return [x, y]
    if layout.layout == "dict":
        return {"x": x, "y": y, "extra": extra}
    if layout.layout == "nested":
        return {"features": x, "labels": y, "meta": {"extra": extra, "pair": (y, x)}}
    if layout.layout == "dataclass":
        return Sample(x, y, extra)
    return Pair(x, y)


def inputs_and_targets(batch: Any) -> tuple[Tensor, Tensor | None]:
    """How the test model reads its own batches (it knows every layout it is fed)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Sample):
        return batch.inputs, batch.targets
    if isinstance(batch, dict):
        return (batch["x"], batch["y"]) if "x" in batch else (batch["features"], batch["labels"])
    return batch[0], batch[1]


def snapshot(value: Any) -> Any:
    """A deep copy of a batch that keeps types (tensors cloned, containers rebuilt)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{f.name: snapshot(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(snapshot(item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(snapshot(item) for item in value)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    return value


def assert_same_batch(seen: Any, expected: Any, path: str = "batch") -> None:
    assert type(seen) is type(expected), f"{path}: {type(seen).__name__} != {type(expected).__name__}"
    if isinstance(expected, Tensor):
        assert seen.dtype == expected.dtype and seen.shape == expected.shape, path
        assert torch.equal(seen.isnan(), expected.isnan()), path
        assert torch.equal(seen.nan_to_num(), expected.nan_to_num()), path
    elif dataclasses.is_dataclass(expected):
        for field in dataclasses.fields(expected):
            assert_same_batch(
                getattr(seen, field.name), getattr(expected, field.name), f"{path}.{field.name}"
            )
    elif isinstance(expected, (tuple, list)):
        assert len(seen) == len(expected), path
        for index, (a, b) in enumerate(zip(seen, expected, strict=True)):
            assert_same_batch(a, b, f"{path}[{index}]")
    elif isinstance(expected, dict):
        assert list(seen) == list(expected), path
        for key in expected:
            assert_same_batch(seen[key], expected[key], f"{path}[{key!r}]")
    else:
        assert seen == expected, path


class Recorder(pl.LightningModule):
    """Records every batch its own ``training_step`` receives (not those of copies or no-grad replays)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, 3))
        self.received: list[Any] = []
        self.after_step: list[Any] = []
        self._owner = id(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        record = id(self) == self._owner and torch.is_grad_enabled()  # the real step, not a trial
        if record:
            self.received.append(snapshot(batch))
        x, y = inputs_and_targets(batch)
        output = self(x)
        if y is None:
            loss = output.pow(2).mean()
        elif y.dtype == torch.long:
            loss = nn.functional.cross_entropy(output, y)
        elif y.shape[-1] == 1 and bool(((y == 0) | (y == 1)).all()):
            loss = nn.functional.binary_cross_entropy_with_logits(output[:, :1], y)
        else:
            loss = nn.functional.mse_loss(output[:, :1], y)
        if record:
            self.after_step.append(snapshot(batch))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def every_check_every_step(on_detect: str = "warn", attributes: bool = False) -> list[pl.Callback]:
    """Each check with its cheapest settings and on every step (so every one of them sees the batches).

    ``attributes``: name the inputs and targets of :class:`Sample` batches (attributes, not the convention).
    """
    inputs: Any = "inputs" if attributes else None
    targets: Any = "targets" if attributes else None
    checks: list[SentinelCallback] = [
        NonFiniteGuard(every_n_steps=1),
        GradientNormMonitor(every_n_steps=1, min_history=1),
        BatchInspector(
            every_n_steps=1,
            window_batches=1,
            min_samples=1,
            imbalance_min_samples=1,
            input_key=inputs,
            target_key=targets,
        ),
        DeadReLUDetector(every_n_steps=1, window=1),
        LossInputCheck(every_n_steps=1),
        LossAtInitCheck(),
        TrainEvalModeChecker(every_n_steps=1),
        ParameterUpdateMonitor(every_n_steps=1, unused_patience=1, patience=1),
        LearningCurveMonitor(every_n_steps=1, smoothing=1, patience_steps=1),
        OverfitBatchCheck(max_steps=3, input_key=inputs, target_key=targets),
        LabelShuffleCheck(batches=2, max_steps=2, input_key=inputs, target_key=targets),
        BatchIndependenceCheck(input_key=inputs),
        TargetLeakageCheck(target_key=targets),
    ]
    return [Sentinel(checks=checks, on_detect=on_detect), HistogramLogger(every_n_steps=1)]  # type: ignore[arg-type]


def run(
    layout: Layout, callbacks: list[pl.Callback], root: Any
) -> tuple[Recorder, list[warnings.WarningMessage]]:
    torch.manual_seed(0)
    module = Recorder(layout.features)
    batches = [make_batch(layout, seed) for seed in range(3)]
    loader = DataLoader(batches, batch_size=None, shuffle=False, collate_fn=lambda batch: batch)
    logger: Any = False
    if callbacks:
        logger = pl.loggers.TensorBoardLogger(str(root), name="tb")
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(root),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, loader)
        except SentinelError:  # the one error a check may raise, with on_detect="raise"
            assert layout.on_detect == "raise"
    return module, caught


LAYOUT = st.builds(
    Layout,
    layout=st.sampled_from(LAYOUTS),
    extra=st.sampled_from(EXTRAS),
    values=st.sampled_from(VALUES),
    targets=st.sampled_from(TARGETS),
    batch_size=st.sampled_from([1, 2, 5]),
    features=st.sampled_from([1, 3]),
    on_detect=st.sampled_from(["warn", "warn", "raise"]),
)


def check_batches_are_untouched(layout: Layout, root: Any) -> None:
    plain, _ = run(layout, [], root / "plain")
    watched, caught = run(
        layout, every_check_every_step(layout.on_detect, layout.layout == "dataclass"), root / "watched"
    )
    failures = [str(w.message) for w in caught if "disabled itself" in str(w.message)]
    assert failures == [], failures
    # the guard may stop a NaN run early, a finding with on_detect="raise" ends it: compare the steps
    # both runs took
    assert len(watched.received) <= len(plain.received)
    for step, (seen, expected) in enumerate(zip(watched.received, plain.received, strict=False)):
        assert_same_batch(seen, expected, f"step {step}: batch")
    for step, (after, before) in enumerate(zip(watched.after_step, watched.received, strict=False)):
        assert_same_batch(after, before, f"step {step} (after training_step): batch")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=LAYOUT)
def test_callbacks_never_fail_or_change_the_batch(layout, tmp_path_factory):
    check_batches_are_untouched(layout, tmp_path_factory.mktemp("run"))


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=LAYOUT)
def test_callbacks_never_fail_or_change_the_batch_many(layout, tmp_path_factory):
    check_batches_are_untouched(layout, tmp_path_factory.mktemp("run"))
