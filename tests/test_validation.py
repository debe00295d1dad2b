"""Every public argument of every public callback is validated at construction, by name.

The table below holds, for each class exported from :mod:`lightning_sentinel`, bad values for each
argument of its ``__init__``; :func:`test_every_argument_has_bad_values` fails when a new argument is
added without entries here. Wrong types raise ``TypeError`` (an ``ArgumentTypeError``, which is also
a ``ValueError``), values out of range raise ``ValueError``; the message names the argument and shows
the value.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest

import lightning_sentinel
from lightning_sentinel import (
    ArgumentTypeError,
    BatchIndependenceCheck,
    BatchInspector,
    DeadReLUDetector,
    GradientNormMonitor,
    HistogramLogger,
    LabelNoiseMonitor,
    LabelShuffleCheck,
    LearningCurveMonitor,
    LossAtInitCheck,
    LossInputCheck,
    NonFiniteGuard,
    OverfitBatchCheck,
    ParameterUpdateMonitor,
    ReplicaSyncMonitor,
    Sentinel,
    SentinelCallback,
    TargetLeakageCheck,
    TrainEvalModeChecker,
    WeightDecayMonitor,
)
from lightning_sentinel._validate import require_number

NAN, INF = math.nan, math.inf

Bad = list[tuple[Any, type[Exception]]]

ON_DETECT: Bad = [("shout", ValueError), (None, ValueError), (1, ValueError)]
# a count beyond sys.maxsize would overflow the deque or range it sizes
INT_1: Bad = [
    (0, ValueError),
    (-3, ValueError),
    ("3", TypeError),
    (2.5, TypeError),
    (True, TypeError),
    (2**63, ValueError),
]
INT_0: Bad = [(-1, ValueError), ("3", TypeError), (1.0, TypeError), (None, TypeError), (2**63, ValueError)]
POSITIVE: Bad = [
    (0.0, ValueError),
    (-1.0, ValueError),
    (NAN, ValueError),
    (INF, ValueError),
    ("1", TypeError),
    (True, TypeError),
    (None, TypeError),
]
ABOVE_1: Bad = [(1.0, ValueError), (0.5, ValueError), (NAN, ValueError), (INF, ValueError), ("2", TypeError)]
SHARE_CLOSED: Bad = [*POSITIVE, (1.5, ValueError)]  # (0, 1]
SHARE_OPEN: Bad = [*POSITIVE, (1.0, ValueError)]  # (0, 1)
FLAG: Bad = [(1, TypeError), ("yes", TypeError), (None, TypeError)]
KEY: Bad = [(1.5, TypeError), (True, TypeError), (["x"], TypeError)]
COMMON = {"on_detect": ON_DETECT, "every_n_steps": INT_1, "warmup_steps": INT_0}

BAD_VALUES: dict[type, dict[str, Bad]] = {
    SentinelCallback: COMMON,
    NonFiniteGuard: {
        "on_detect": ON_DETECT,
        "every_n_steps": INT_1,
        "scaler_min_scale": POSITIVE,
        "localize": FLAG,
    },
    GradientNormMonitor: {
        **COMMON,
        "spike_factor": ABOVE_1,
        "max_norm": POSITIVE,
        "window": [*INT_1, (4, ValueError)],  # below the default min_history (5)
        "min_history": [*INT_1, (21, ValueError)],  # above the default window (20)
        "vanishing_ratio": POSITIVE,
        "depth_ratio_threshold": POSITIVE,
        "patience": INT_1,
        "converged_fraction": SHARE_CLOSED,
        "log_per_layer": FLAG,
        "track_peak": FLAG,
    },
    DeadReLUDetector: {
        "on_detect": ON_DETECT,
        "every_n_steps": INT_1,
        "window": INT_1,
        "dead_threshold": SHARE_CLOSED,
        "saturated_threshold": SHARE_CLOSED,
        "saturated_sample_fraction": SHARE_CLOSED,
        "init_scale_low": [*POSITIVE, (20.0, ValueError)],  # above the default init_scale_high (10)
        "init_scale_high": [*POSITIVE, (0.05, ValueError)],  # below the default init_scale_low (0.1)
        "max_leaky_slope": [(-0.1, ValueError), (1.0, ValueError), (NAN, ValueError), ("0", TypeError)],
        "sample_validation": FLAG,
    },
    HistogramLogger: {
        "every_n_steps": INT_1,
        "name_filter": [("(", ValueError), (5, TypeError), (["enc"], TypeError)],
        "max_layers": INT_1,
        "bins": INT_1,
        "log_weights": FLAG,
        "log_gradients": FLAG,
        "log_activations": FLAG,
        "log_update_ratio": FLAG,
        "custom_scalar_layout": FLAG,
    },
    BatchInspector: {
        "on_detect": ON_DETECT,
        "every_n_steps": INT_1,
        "window_batches": INT_1,
        "input_key": KEY,
        "target_key": KEY,
        "mean_bound": POSITIVE,
        "std_bound": POSITIVE,
        "min_std": POSITIVE,
        "min_samples": INT_1,
        "single_label_batches": INT_1,
        "imbalance_ratio": ABOVE_1,
        "imbalance_min_samples": INT_1,
        "shift_std": ABOVE_1,
        "shift_fraction": SHARE_CLOSED,
    },
    LossAtInitCheck: {
        "on_detect": ON_DETECT,
        "expected_loss": [(-1.0, ValueError), (NAN, ValueError), (INF, ValueError), ("2.3", TypeError)],
        "max_ratio": ABOVE_1,
        "max_excess": POSITIVE,
        "max_regression_ratio": ABOVE_1,
    },
    LossInputCheck: {
        **COMMON,
        "tolerance": POSITIVE,
        "patience": INT_1,
        "min_target_share": SHARE_CLOSED,
        "min_pinned_share": SHARE_CLOSED,
    },
    LabelNoiseMonitor: {
        **COMMON,
        "low_probability": SHARE_OPEN,
        "max_share": SHARE_CLOSED,
        "min_accuracy": SHARE_CLOSED,
        "window": INT_1,
        "min_samples": INT_1,
        "min_classes": [*INT_1, (2, ValueError)],
    },
    WeightDecayMonitor: {
        **COMMON,
        "max_decay_per_step": SHARE_OPEN,
        "patience": INT_1,
    },
    ReplicaSyncMonitor: {
        **COMMON,
        "rtol": [
            (-1e-5, ValueError),
            (NAN, ValueError),
            (INF, ValueError),
            ("1e-5", TypeError),
            (None, TypeError),
        ],
        "ignore": [("ema", TypeError), (["("], ValueError), ([3], TypeError), (5, TypeError)],
    },
    TrainEvalModeChecker: {
        "on_detect": ON_DETECT,
        "every_n_steps": INT_1,
        # one string is refused, not split into one-letter patterns
        "allow": [("dropout", TypeError), (["("], ValueError), ([3], TypeError), (5, TypeError)],
        "use_hooks": FLAG,
    },
    ParameterUpdateMonitor: {
        **COMMON,
        "unused_patience": INT_1,
        "patience": INT_1,
        # below the default low_ratio (1e-6)
        "high_ratio": [*POSITIVE, (1e-7, ValueError)],
        "low_ratio": [*POSITIVE, (0.6, ValueError)],  # above the default high_ratio (0.5)
        # below the default high_ratio (0.5); None means max(2.0, high_ratio)
        "burst_ratio": [*[bad for bad in POSITIVE if bad[0] is not None], (0.4, ValueError)],
        "decayed_fraction": SHARE_CLOSED,
        "log_ratios": FLAG,
    },
    LearningCurveMonitor: {
        **COMMON,
        "monitor": [("", ValueError), (None, TypeError), (3, TypeError)],
        "smoothing": INT_1,
        "patience_steps": INT_1,
        "min_improvement": SHARE_OPEN,
        "divergence_factor": ABOVE_1,
        "oscillation_factor": POSITIVE,
        "overfit_patience": INT_1,
        "overfit_min_rise": POSITIVE,
        "overfit_min_scale_rise": [(-0.1, ValueError), ("0.1", TypeError), (float("nan"), ValueError)],
    },
    OverfitBatchCheck: {
        "on_detect": ON_DETECT,
        "batch_size": INT_1,
        "max_steps": INT_1,
        "max_seconds": POSITIVE,
        "max_fraction": SHARE_OPEN,
        "input_key": KEY,
        "target_key": KEY,
    },
    LabelShuffleCheck: {
        "on_detect": ON_DETECT,
        "batches": [*INT_1, (1, ValueError)],
        "max_steps": INT_1,
        "max_seconds": POSITIVE,
        "margin": SHARE_OPEN,
        "input_key": KEY,
        "target_key": KEY,
    },
    BatchIndependenceCheck: {
        "on_detect": ON_DETECT,
        "input_key": KEY,
        "sample_index": [(-1, ValueError), (1.5, TypeError), ("0", TypeError)],
        "tolerance": POSITIVE,
        "target_key": KEY,
    },
    TargetLeakageCheck: {"on_detect": ON_DETECT, "target_key": KEY, "tolerance": POSITIVE, "input_key": KEY},
    Sentinel: {
        "preset": [("slow", ValueError), (None, ValueError), (["fast"], ValueError)],
        "checks": [
            (NonFiniteGuard(), TypeError),  # one callback, not a list
            ([pl.callbacks.EarlyStopping("x")], TypeError),
            ([1], TypeError),
            ([NonFiniteGuard(), NonFiniteGuard()], ValueError),  # same settings twice
        ],
        "disable": [("dead-relu", TypeError), (["no-such-check"], ValueError), ([1], TypeError)],
        "on_detect": [("halt", ValueError), (1, ValueError)],
        "every_n_steps": INT_1,
        "budget": [
            (0, ValueError),
            (1.0, ValueError),
            (-0.01, ValueError),
            ("1%", TypeError),
            (float("nan"), ValueError),
        ],
    },
}

CASES = [
    pytest.param(cls, argument, value, error, id=f"{cls.__name__}-{argument}-{value!r:.20}")
    for cls, arguments in BAD_VALUES.items()
    for argument, bad in arguments.items()
    for value, error in bad
]


def _exported_callbacks() -> list[type]:
    exported = (getattr(lightning_sentinel, name) for name in lightning_sentinel.__all__)
    return [obj for obj in exported if inspect.isclass(obj) and issubclass(obj, pl.Callback)]


def _arguments(cls: type) -> set[str]:
    return {name for name in inspect.signature(cls.__init__).parameters if name != "self"}


def test_every_exported_callback_is_in_the_table():
    assert set(_exported_callbacks()) == set(BAD_VALUES)


@pytest.mark.parametrize("cls", list(BAD_VALUES), ids=lambda cls: cls.__name__)
def test_every_argument_has_bad_values(cls):
    assert set(BAD_VALUES[cls]) == _arguments(cls)


@pytest.mark.parametrize(("cls", "argument", "value", "error"), CASES)
def test_bad_value_raises_naming_the_argument_and_value(cls, argument, value, error):
    with pytest.raises(error) as raised:
        cls(**{argument: value})
    message = str(raised.value)
    assert f"`{argument}`" in message
    assert "must" in message
    if isinstance(value, (int, float, str)) or value is None:
        assert repr(value) in message
    # every bad setting is a ValueError, wrong types are also TypeErrors
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, ArgumentTypeError) == (error is TypeError)


@pytest.mark.parametrize("cls", list(BAD_VALUES), ids=lambda cls: cls.__name__)
def test_defaults_construct(cls):
    cls()


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (DeadReLUDetector, {"dead_threshold": 1, "saturated_threshold": 1.0, "max_leaky_slope": 0}),
        (GradientNormMonitor, {"window": 5, "min_history": 5, "converged_fraction": 1.0, "warmup_steps": 0}),
        (BatchInspector, {"shift_fraction": 1.0, "input_key": 0, "target_key": "label"}),
        (LossAtInitCheck, {"expected_loss": 0.0}),
        (LossAtInitCheck, {"expected_loss": None}),
        (LabelShuffleCheck, {"batches": 2, "margin": 0.999}),
        (BatchIndependenceCheck, {"sample_index": 0, "input_key": -1}),
        (TrainEvalModeChecker, {"allow": ("mc_dropout", r"^head\.")}),
        (HistogramLogger, {"name_filter": "", "bins": 1, "max_layers": 1}),
        (Sentinel, {"checks": [], "disable": ()}),
        (Sentinel, {"preset": "full", "on_detect": None}),
    ],
)
def test_boundary_values_are_accepted(cls, kwargs):
    cls(**kwargs)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    monitor = GradientNormMonitor(every_n_steps=np.int64(3), spike_factor=np.float32(4.0), window=np.int32(8))
    assert type(monitor.every_n_steps) is int and monitor.every_n_steps == 3
    assert type(monitor.window) is int and type(monitor.spike_factor) is float
    assert monitor.state_key == GradientNormMonitor(every_n_steps=3, spike_factor=4.0, window=8).state_key
    assert type(BatchIndependenceCheck(input_key=np.int64(1)).input_key) is int


def test_interval_message_names_the_bounds():
    with pytest.raises(ValueError, match=r"`margin` must be a number in \(0, 1\], got 2"):
        require_number("margin", 2, above=0, at_most=1)
    with pytest.raises(ValueError, match=r"`slope` must be a number in \[0, 1\), got -0.5"):
        require_number("slope", -0.5, at_least=0, below=1)
    with pytest.raises(ValueError, match=r"`scale` must be a finite number >= 2, got inf"):
        require_number("scale", INF, at_least=2)
    with pytest.raises(ValueError, match=r"`scale` must be a finite number >= 2, got 1000"):
        require_number("scale", 10**400, at_least=2)  # beyond the float range
    with pytest.raises(TypeError, match=r"`scale` must be a finite number or None, got '1' \(type str\)"):
        require_number("scale", "1", allow_none=True)
