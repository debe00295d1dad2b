"""ParameterUpdateMonitor: parameters that are not trained, or trained at the wrong speed.

- ``parameters-not-in-optimizer``: trainable parameters that no optimizer param group holds.
- ``unused-parameters``: trainable parameters in an optimizer that never get a gradient (not in the graph).
- ``frozen-parameters``: parameters that get gradients but do not change when their optimizer steps.
- ``update-ratio-too-high`` / ``update-ratio-too-low``: a layer's ``||delta W|| / ||W||`` per optimizer
  step far from the ~1e-3 rule of thumb.
- ``gradients-not-zeroed``: gradients that are never zeroed between optimizer steps, so each step
  applies the sum of every gradient so far.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_sentinel._stats import LayerGrouping, shards_gradients, tensor_norms
from lightning_sentinel._validate import require_bool, require_int, require_number, require_order
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._optimizers import OptimizerView, optimizer_view, scaler_of
from lightning_sentinel.findings import Severity

UNUSED = "unused-parameters"
NOT_IN_OPTIMIZER = "parameters-not-in-optimizer"
FROZEN = "frozen-parameters"
RATIO_HIGH = "update-ratio-too-high"
RATIO_LOW = "update-ratio-too-low"
NOT_ZEROED = "gradients-not-zeroed"

register(
    CheckSpec(
        NOT_IN_OPTIMIZER,
        "ParameterUpdateMonitor",
        Severity.WARNING,
        "a parameter with requires_grad=True is in no optimizer param group (it never trains)",
        "at train start",
    ),
    CheckSpec(
        UNUSED,
        "ParameterUpdateMonitor",
        Severity.WARNING,
        "a trainable parameter in an optimizer gets no gradient (not in the graph, e.g. a .detach() in forward)",
        "no gradient in any backward over 50 optimizer steps (conditional branches get their chance)",
    ),
    CheckSpec(
        FROZEN,
        "ParameterUpdateMonitor",
        Severity.WARNING,
        "a parameter gets gradients but does not change when its optimizer steps (lr 0, gradients always zero)",
        "update exactly 0 on 3 checked steps in a row (checked every 10 steps), not once the lr decayed below half "
        "its peak",
    ),
    CheckSpec(
        RATIO_HIGH,
        "ParameterUpdateMonitor",
        Severity.WARNING,
        "a layer's update/weight norm ratio per step is far above ~1e-3 (learning rate too high)",
        "||dW||/||W|| > 0.5 on 3 checked steps in a row, or > 2 on one (a weight layer of ordinary scale); checked "
        "every 10 steps; weights with RMS < 1e-3 (near-zero inits) not judged",
    ),
    CheckSpec(
        RATIO_LOW,
        "ParameterUpdateMonitor",
        Severity.WARNING,
        "a layer's update/weight norm ratio per step is far below ~1e-3 (learning rate too low)",
        "||dW||/||W|| < 1e-6 on 3 checked steps in a row, not while the lr warms up or has decayed below half its peak",
    ),
    CheckSpec(
        NOT_ZEROED,
        "ParameterUpdateMonitor",
        Severity.ERROR,
        "gradients are never zeroed between optimizer steps (manual optimization without zero_grad, an "
        "optimizer_zero_grad override that does nothing): each step applies the sum of every gradient so far",
        "every backward pass between a checked optimizer step and the step before it finds a sampled parameter's "
        ".grad still holding the last step's gradient (never None, never zero), on 2 checked steps in a row (every "
        "10 steps); accumulation over micro-batches between two steps is not judged",
    ),
)


# ---------------------------------------------------------------------- pure rules
def module_groups(names: Iterable[str], universe: Iterable[str]) -> list[str]:
    """Collapse parameter ``names`` into the largest modules all of whose ``universe`` parameters are in ``names``.

    ``universe`` holds every parameter name considered (e.g. all trainable ones). A name that no
    module covers on its own stays as it is. The order follows ``names``.

    Example:
        >>> universe = ["enc.0.weight", "enc.0.bias", "enc.2.weight", "head.weight", "head.bias", "scale"]
        >>> module_groups(["enc.0.weight", "enc.0.bias", "enc.2.weight"], universe)
        ['enc']
        >>> module_groups(["enc.0.bias", "scale"], universe)
        ['enc.0.bias', 'scale']
    """
    chosen = list(dict.fromkeys(names))
    members = set(chosen)
    everything = list(universe)
    groups: list[str] = []
    for name in chosen:
        parts = name.split(".")
        group = name
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if all(other in members for other in everything if other.startswith(prefix + ".")):
                group = prefix
                break
        if group not in groups:
            groups.append(group)
    return groups


TINY_WEIGHT_RMS = 1e-3  # layers whose weights are smaller (near-zero inits) are not judged too fast
_ZEROING_SAMPLE = 4  # parameters watched per optimizer for gradients-not-zeroed, spread over its list
_ZEROING_CHECKS = 2  # checked steps in a row whose gradients were carried over before it is reported


def ratio_streak(ratio: float, streak: int, high: float, low: float) -> tuple[int, int]:
    """Update the (high, low) streaks of one layer from its update/weight ratio.

    ``streak`` is positive while the ratio stays above ``high``, negative while below ``low``
    (exactly-zero and non-finite ratios reset it: those belong to other checks).

    Example:
        >>> ratio_streak(2.0, 1, 0.5, 1e-6), ratio_streak(1e-8, 1, 0.5, 1e-6), ratio_streak(1e-3, -2, 0.5, 1e-6)
        ((2, 0), (0, 1), (0, 0))
        >>> ratio_streak(1e-8, -2, 0.5, 1e-6)
        (0, 3)
    """
    if not math.isfinite(ratio) or ratio <= 0:
        return 0, 0
    if ratio > high:
        return max(streak, 0) + 1, 0
    if ratio < low:
        return 0, max(-streak, 0) + 1
    return 0, 0


def burst_verdict(ratio: float, weight_rms: float, is_weight_layer: bool, burst: float) -> bool:
    """Whether one optimizer step moved a weight layer by more than ``burst`` times its own norm.

    Only layers holding a matrix/kernel (``is_weight_layer``) of ordinary scale (root-mean-square
    weight >= :data:`TINY_WEIGHT_RMS`) are judged: gains that start near 0 on purpose (LayerScale,
    ReZero, a head initialised at 1e-5) legitimately grow many times over in their first steps.

    Example:
        >>> burst_verdict(2.7, 0.07, True, 2.0)  # Adam lr 0.2 on a default-initialised Linear
        True
        >>> burst_verdict(2.7, 1e-6, False, 2.0), burst_verdict(0.2, 0.07, True, 2.0)
        (False, False)
    """
    return is_weight_layer and weight_rms >= TINY_WEIGHT_RMS and math.isfinite(ratio) and ratio > burst


# what a parameter's .grad held just before a backward pass accumulated into it (see ``carried_over``)
GRAD_WAS_NONE, GRAD_WAS_ZERO, GRAD_WAS_NONZERO = 0.0, 1.0, 2.0


def carried_over(held_before: Sequence[float]) -> bool:
    """Whether a parameter's gradient survived from one optimizer step into the next.

    ``held_before`` holds, for each backward pass that accumulated into the parameter between two steps of
    its optimizer, what its ``.grad`` held just before: ``GRAD_WAS_NONE`` (``zero_grad()`` set it to
    ``None``), ``GRAD_WAS_ZERO`` (``zero_grad(set_to_none=False)``) or ``GRAD_WAS_NONZERO``. Zeroing once
    anywhere between the steps (before the first of k accumulated micro-batches, or for one of two losses
    that share parameters) shows as a ``None`` or zero before some backward; a gradient never zeroed is
    non-zero before every one of them. No backward pass: nothing to judge.

    Example:
        >>> carried_over([GRAD_WAS_NONZERO])  # manual optimization without zero_grad
        True
        >>> carried_over([GRAD_WAS_NONE, GRAD_WAS_NONZERO, GRAD_WAS_NONZERO])  # 3 micro-batches accumulated
        False
        >>> carried_over([GRAD_WAS_NONZERO, GRAD_WAS_ZERO]), carried_over([])
        (False, False)
    """
    return bool(held_before) and all(state == GRAD_WAS_NONZERO for state in held_before)


def lr_excuses_low_ratio(
    lr: float, previous_lr: float | None, peak_lr: float, decayed_fraction: float
) -> bool:
    """Whether the learning-rate schedule explains a low update ratio: it is warming up (rising since
    the last check) or has decayed below ``decayed_fraction`` of its peak.

    Example:
        >>> lr_excuses_low_ratio(1e-4, 5e-5, 1e-4, 0.5), lr_excuses_low_ratio(1e-8, 1e-8, 1e-8, 0.5)
        (True, False)
        >>> lr_excuses_low_ratio(1e-5, 1e-4, 1e-3, 0.5)
        True
    """
    rising = previous_lr is not None and lr > previous_lr * (1 + 1e-6)
    return rising or lr < decayed_fraction * peak_lr


def _low_ratio_hint(ratios: list[float], low_layers: list[int], low_ratio: float) -> str:
    """What to try for slow layers: the learning rate if the whole model is slow, else the gradient path."""
    moving = sorted(r for i, r in enumerate(ratios) if i not in low_layers and math.isfinite(r) and r > 0)
    if moving and moving[len(moving) // 2] > 100 * low_ratio:
        return (
            f"only some layers are this slow while the others move ~{moving[len(moving) // 2]:.2g} per step: their "
            "gradients vanish or die on the way down (see vanishing-gradients, dead-relu): use ReLU-family "
            "activations, normalisation or residual connections, He/Xavier initialisation"
        )
    return (
        "raise the learning rate (a learning-rate range test finds a good one); check for a typo such as 1e-8 "
        "for 1e-3, and a scheduler that starts at 0 and never rises"
    )


def _listing(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------- state
SAMPLE_STRIDE = 8  # the update ratios look at every 8th element of a large parameter (1/8 of its memory)
SAMPLE_MIN_NUMEL = 4096  # smaller parameters are copied whole


def sample_stride(parameter: Tensor) -> int:
    """The stride of the update sample of ``parameter``: every ``stride``-th element of its flat view.

    At most ``SAMPLE_STRIDE`` and at most the elements per output unit (per row of a matrix, per filter of
    a convolution), so every unit keeps at least one element: an embedding whose step moves only the rows
    of the batch's tokens still shows a non-zero update. Parameters under ``SAMPLE_MIN_NUMEL`` elements
    and vectors are kept whole.

    Example:
        >>> sample_stride(torch.zeros(512, 256)), sample_stride(torch.zeros(4096, 4)), sample_stride(torch.zeros(64))
        (8, 4, 1)
    """
    if parameter.dim() < 2 or parameter.numel() < SAMPLE_MIN_NUMEL:
        return 1
    return max(1, min(SAMPLE_STRIDE, parameter.numel() // max(parameter.shape[0], 1)))


def _sampled(parameters: list[Tensor], strides: list[int]) -> list[Tensor]:
    """The strided samples of ``parameters`` (views: nothing is copied here)."""
    return [p.reshape(-1)[::k] if k > 1 else p for p, k in zip(parameters, strides, strict=True)]


def _sampled_numel(parameter: Tensor, stride: int) -> int:
    return -(-parameter.numel() // stride)


@dataclass
class _Snapshot:
    indices: list[int]  # positions in the view's parameters
    strides: list[int]  # every stride-th element of each parameter is kept (see sample_stride)
    before: list[Tensor]  # those elements before the step (become -delta in place)
    weight_norms: Tensor  # norms of the whole parameters before the step
    grouping: LayerGrouping
    lr: float
    scale: Tensor | None


@dataclass
class _Candidate:
    """A parameter that had no gradient at a check: watched by a gradient hook until it gets one."""

    name: str
    since: int  # optimizer step index (of its optimizer) at which it was first seen without a gradient
    handle: RemovableHandle | None = None
    got_gradient: bool = False


@dataclass
class _ZeroingWatch:
    """Gradient hooks on a few parameters of one optimizer, from the step before a checked step to the
    checked step: before each backward pass accumulates into a watched parameter, what its ``.grad``
    held is recorded. ``close`` removes the hooks and stacks the device flags for the check's one read."""

    names: list[str]
    handles: list[RemovableHandle]
    held: list[list[Tensor | float]]  # per watched parameter, per backward: GRAD_WAS_NONE or a device flag
    flags: Tensor | None = None  # after ``close``: the device flags in order (1: non-zero), or None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def close(self) -> None:
        self.remove()
        flags = [value for held in self.held for value in held if isinstance(value, Tensor)]
        self.flags = torch.stack(flags).float() if flags else None

    def held_before(self, flag_values: Sequence[float]) -> list[list[float]]:
        """Per watched parameter, what ``.grad`` held before each backward pass, given the flags read back."""
        read = iter(flag_values)
        states: list[list[float]] = []
        for held in self.held:
            row: list[float] = []
            for value in held:
                if isinstance(value, Tensor):
                    row.append(GRAD_WAS_NONZERO if next(read) > 0 else GRAD_WAS_ZERO)
                else:
                    row.append(value)
            states.append(row)
        return states


@dataclass
class _OptimizerState:
    view: OptimizerView
    steps_seen: int = 0
    snapshot: _Snapshot | None = None
    zeroing: _ZeroingWatch | None = None  # hooks on, until the next (checked) step
    zeroing_closed: _ZeroingWatch | None = None  # closed at a checked step, read with its check
    carry_streak: int = 0
    previous_lr: float | None = None
    peak_lr: float = 0.0
    frozen_streak: dict[str, int] = field(default_factory=dict)
    ratio_streak: dict[str, int] = field(default_factory=dict)


def _max_lr(optimizer: torch.optim.Optimizer) -> float:
    values = [group.get("lr", 0.0) for group in optimizer.param_groups]
    return max((float(v) for v in values), default=0.0)


class ParameterUpdateMonitor(SentinelCallback):
    """Checks that every trainable parameter is optimized, gets gradients, and moves at a sane speed.

    - ``parameters-not-in-optimizer`` (at train start): parameters with ``requires_grad=True`` in no
      optimizer param group, named by module (e.g. only the head was passed to the optimizer).
    - ``unused-parameters``: on a check step, parameters of an optimizer with ``requires_grad=True``
      and no gradient become candidates; a gradient hook is attached to those only (no cost for the
      others) and a candidate that gets no gradient in any backward for ``unused_patience`` optimizer
      steps is reported, grouped by module. Conditional branches (mixture-of-experts, auxiliary
      heads used on some steps) get a gradient within that window and are dropped.
    - ``frozen-parameters``, ``update-ratio-too-high`` / ``-too-low``: on every ``every_n_steps``-th
      optimizer step a strided sample of each parameter that has a gradient (every 8th element of a large
      one at most, at least one per row or filter: :func:`sample_stride`; never a copy of the model) is
      kept on the device (one fused op) in ``on_before_optimizer_step`` and compared after the step
      (``on_train_batch_end``, or the next step of the same optimizer under manual optimization): per
      layer (module owning the parameters) ``||delta W|| / ||W||``, the sampled update norm scaled to the
      whole parameter, with fused norms, one host read per check, the sample freed at once.
      A parameter whose sampled update is exactly zero and whose whole norm did not change, on ``patience``
      checks in a row, is frozen (not judged once
      the lr decayed below ``decayed_fraction`` of its peak: at the end of a cosine schedule to 0, lr x
      update falls below the weights' float resolution, as for the batch-norm weights of a Hugging Face
      ResNet at lr 2.7e-8, step 2991 of 3000; lr 0 from the start has a peak of 0 and is judged); a layer
      whose ratio stays above ``high_ratio`` (below ``low_ratio``) on ``patience`` checks in a row
      moves too fast (too slow). A low ratio is excused while the learning rate rises (warm-up) or
      after it decayed below ``decayed_fraction`` of its peak (an intended schedule). Steps that a
      GradScaler skipped are not judged. A weight layer (a matrix or kernel of ordinary scale, RMS >= 1e-3)
      moved by more than ``burst_ratio`` times its own norm in a single checked step is reported at once
      (``update-ratio-too-high``): no healthy schedule takes a step twice the size of the weights. Under
      Adam the first step moves every weight by about ``lr``, so this fires when ``lr`` exceeds twice
      the weights' RMS (default init: ``lr > 2 / sqrt(3 fan_in)``, e.g. 0.036 for fan-in 1024). Layers
      whose weights start near 0 on purpose (RMS < 1e-3: LayerScale/ReZero gains, a head initialised at
      1e-5) grow many times over in their first steps and are judged by neither high-ratio rule.
    - ``gradients-not-zeroed`` (error): from the optimizer step before each checked step to the checked
      step, up to 4 of the optimizer's parameters (spread over its list) carry a tensor hook. The hook
      runs before each backward pass adds into ``.grad`` and records what ``.grad`` holds: ``None``
      (no device work), or one on-device flag "non-zero"; the flags join the checked step's one read
      (nothing is read between checks). A gradient that was never ``None`` and never all zero before
      every backward pass between the two steps was never zeroed; reported after 2 checked steps in a
      row (step 21 at the default cadence), named by the layer of the first such parameter. Zeroing once anywhere in the window is enough to stay quiet: accumulation over
      micro-batches (``accumulate_grad_batches``, or by hand: the first micro-batch after
      ``zero_grad()`` sees ``None``), ``zero_grad(set_to_none=False)`` (zeros), and two optimizers that
      each zero before their own backward while the second loss also reaches the first one's body. Not
      run where gradients are sharded (FSDP, DeepSpeed).

    Defaults, calibrated on the healthy zoo of ``benchmarks/detection`` (32 runs: Adam/AdamW 1e-3..1e-2,
    SGD 0.05..0.1, MLP/CNN/ResNet/GRU/LSTM/Transformer/embeddings/mixture of experts, bf16, accumulation,
    warm-up and cosine schedules, checked every 10 steps): the largest layer ratio sustained over 3
    checks is 0.047 (a freshly initialised head on a frozen backbone; 0.2 on a single check), the
    smallest 2e-5 (a Transformer's slowly moving embeddings). ``high_ratio=0.5`` and ``low_ratio=1e-6``
    leave margins of 10x and 20x and still catch SGD lr=5..20 (ratios 0.3..13) and lr=1e-8 (8e-8 under
    Adam, 1e-9 under SGD). The published bands are 1e-4..1e-1 (TheDeepChecker: its 1e-1 is only 2x above
    single healthy checks here) and 1e-8..10 (SageMaker: misses lr=1e-8 under Adam, ratio 8e-8).
    Adam with a far too high lr has a ratio that decays like 1/step as the weights grow (0.5, 0.3,
    0.2, ...), so the sustained rule misses it; its first steps are what ``burst_ratio`` catches
    (digits MLP with Adam lr 0.2: 2.7-3.9 on the first check; CNN with Adam lr 0.1: 3.9).

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the largest healthy
    update/weight ratio was 0.2 (``frozen-backbone-finetune``'s head; threshold 0.5, margin 2.5x);
    the smallest, 3.7e-7 (< 1e-6), came from ``warmup-cosine-transformer`` while its lr warmed up or
    had decayed, where the low-ratio rule does not judge; every other healthy ratio is above 1e-6.
    The single-check ``burst_ratio`` (2.0 by default) is 10x above that largest healthy ratio (0.2, on
    any layer); the zoo's faults it catches move a layer 3.9-87x its norm in their first step (Adam at
    lr 0.1-2, SGD at lr 20-30), so their first check reports them.

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        every_n_steps: check every n-th optimizer step (per optimizer); an integer >= 1.
        warmup_steps: optimizer steps before the first check; an integer >= 0.
        unused_patience: optimizer steps without any gradient before a parameter is reported unused;
            an integer >= 1.
        patience: consecutive checks a frozen parameter or an out-of-band ratio must persist; >= 1.
        high_ratio: per-layer update/weight norm ratio above which the update is too large; a finite
            number > 0.
        low_ratio: per-layer update/weight norm ratio below which the update is too small; a finite
            number > 0, below ``high_ratio``.
        decayed_fraction: a low ratio (or a zero update) is not judged once the lr fell below this fraction of its peak;
            in (0, 1].
        log_ratios: log the largest and smallest layer ratio of each check under ``sentinel/update_ratio/``.
        burst_ratio: per-layer ratio that is too high on a single check (weight layers of ordinary scale
            only); a finite number >= ``high_ratio``, or ``None`` (default): 2.0, or ``high_ratio`` if larger.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.parameters import ParameterUpdateMonitor
        >>> monitor = ParameterUpdateMonitor(every_n_steps=20, high_ratio=1.0)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
    """

    CHECKS = (NOT_IN_OPTIMIZER, UNUSED, FROZEN, RATIO_HIGH, RATIO_LOW, NOT_ZEROED)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 10,
        warmup_steps: int = 0,
        unused_patience: int = 50,
        patience: int = 3,
        high_ratio: float = 0.5,
        low_ratio: float = 1e-6,
        decayed_fraction: float = 0.5,
        log_ratios: bool = True,
        burst_ratio: float | None = None,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        self.unused_patience = require_int("unused_patience", unused_patience)
        self.patience = require_int("patience", patience)
        self.high_ratio = require_number("high_ratio", high_ratio, above=0)
        self.low_ratio = require_number("low_ratio", low_ratio, above=0)
        require_order("low_ratio", self.low_ratio, "high_ratio", self.high_ratio)
        if burst_ratio is None:
            self.burst_ratio = max(2.0, self.high_ratio)
        else:
            self.burst_ratio = require_number("burst_ratio", burst_ratio, above=0)
            require_order("high_ratio", self.high_ratio, "burst_ratio", self.burst_ratio, or_equal=True)
        self.decayed_fraction = require_number("decayed_fraction", decayed_fraction, above=0, at_most=1)
        self.log_ratios = require_bool("log_ratios", log_ratios)
        self._optimizers: dict[int, _OptimizerState] = {}
        self._candidates: dict[int, _Candidate] = {}
        self._reported_unused: set[str] = set()
        self._saved: dict[str, Any] = {}

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {
            **super()._state_key_settings(),
            "high_ratio": self.high_ratio,
            "low_ratio": self.low_ratio,
            "unused_patience": self.unused_patience,
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        optimizers = {
            state.view.key: {
                "steps_seen": state.steps_seen,
                "peak_lr": state.peak_lr,
                "previous_lr": state.previous_lr,
                "frozen_streak": dict(state.frozen_streak),
                "ratio_streak": dict(state.ratio_streak),
                "carry_streak": state.carry_streak,
            }
            for state in self._optimizers.values()
        }
        return {"optimizers": optimizers or self._saved.get("optimizers", {})}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._saved = {"optimizers": dict(state.get("optimizers", {}))}

    # ------------------------------------------------------------------ lifecycle
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(trainer)
        self._optimizers = {}
        self._reported_unused = set()

    @override
    def _release(self, trainer: pl.Trainer) -> None:
        for candidate in self._candidates.values():
            if candidate.handle is not None:
                candidate.handle.remove()
        self._candidates = {}
        for state in self._optimizers.values():
            state.snapshot = None
            if state.zeroing is not None:
                state.zeroing.remove()
                state.zeroing = None
            state.zeroing_closed = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if NOT_IN_OPTIMIZER in self.active_checks:
            self._run_optimizer_coverage_check(trainer, pl_module)
        self._settle(trainer)

    def _state_of(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> _OptimizerState:
        state = self._optimizers.get(id(optimizer))
        if state is None:
            state = _OptimizerState(view=optimizer_view(trainer, pl_module, optimizer))
            saved = self._saved.get("optimizers", {}).get(state.view.key)
            if saved:
                state.steps_seen = int(saved.get("steps_seen", 0))
                state.peak_lr = float(saved.get("peak_lr", 0.0))
                previous = saved.get("previous_lr")
                state.previous_lr = None if previous is None else float(previous)
                state.frozen_streak = {k: int(v) for k, v in saved.get("frozen_streak", {}).items()}
                state.ratio_streak = {k: int(v) for k, v in saved.get("ratio_streak", {}).items()}
                state.carry_streak = int(saved.get("carry_streak", 0))
            self._optimizers[id(optimizer)] = state
        return state

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        state = self._state_of(trainer, pl_module, optimizer)
        judged = state.snapshot is not None
        if state.snapshot is not None:  # manual optimization: this optimizer steps again in the same batch
            self._run_update_check(trainer, pl_module, state)
        if state.zeroing is not None:  # the backward passes since the previous step: judged with this check
            state.zeroing.close()
            state.zeroing, state.zeroing_closed = None, state.zeroing
        step_index = state.steps_seen
        state.steps_seen += 1
        # gradients-not-zeroed watches the window that ends at a checked step, so that its flags are read
        # with that step's one read (the hooks go on one step before: host work only)
        watch_next = (
            NOT_ZEROED in self.active_checks
            and self._clock.next_is_due(trainer)
            and not shards_gradients(trainer.strategy)
        )
        if not self._due(trainer):
            if state.zeroing_closed is not None:  # not expected (the window ends at a checked step)
                self._run_zeroing_check(trainer, state)
                judged = True
            if watch_next:
                self._watch_zeroing(state)
            if judged:
                self._settle(trainer)
            return
        if sum(len(group["params"]) for group in optimizer.param_groups) != len(state.view.parameters):
            state.view = optimizer_view(trainer, pl_module, optimizer)  # add_param_group (e.g. unfreezing)
        if UNUSED in self.active_checks:
            self._run_unused_check(trainer, pl_module, state, step_index)
        if {FROZEN, RATIO_HIGH, RATIO_LOW} & set(self.active_checks):
            self._take_snapshot(trainer, optimizer, state)
        if (
            state.zeroing_closed is not None and state.snapshot is None
        ):  # no update check to share a read with
            self._run_zeroing_check(trainer, state)
        if watch_next:
            self._watch_zeroing(state)
        self._settle(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending = [state for state in self._optimizers.values() if state.snapshot is not None]
        if not pending:
            return
        for state in pending:
            self._run_update_check(trainer, pl_module, state)
        self._settle(trainer)

    # ------------------------------------------------------------------ parameters-not-in-optimizer
    def _run_optimizer_coverage_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimized = {
            id(parameter)
            for optimizer in trainer.optimizers
            for group in optimizer.param_groups
            for parameter in group["params"]
        }
        trainable = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if not trainable or not trainer.optimizers:
            return
        missing = [(name, p) for name, p in trainable if id(p) not in optimized]
        if not missing:
            return
        groups = module_groups([name for name, _ in missing], [name for name, _ in trainable])
        elements = sum(p.numel() for _, p in missing)
        total = sum(p.numel() for _, p in trainable)
        self._report(
            trainer,
            NOT_IN_OPTIMIZER,
            Severity.WARNING,
            f"{len(missing)} of {len(trainable)} trainable parameters ({elements:,} of {total:,} elements) are in no "
            f"optimizer param group and will never be updated: {_listing(groups)}",
            where=groups[0],
            evidence={"parameters": len(missing), "elements": elements, "trainable_elements": total},
            hint="pass all of them to the optimizer (e.g. torch.optim.Adam(self.parameters())), not only the head; "
            "to freeze them on purpose set requires_grad_(False)",
            dedupe_as=NOT_IN_OPTIMIZER,
        )

    # ------------------------------------------------------------------ unused-parameters
    def _run_unused_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: _OptimizerState, step_index: int
    ) -> None:
        view = state.view
        matured: list[str] = []
        for parameter in view.parameters:
            candidate = self._candidates.get(id(parameter))
            if candidate is None:
                continue
            if candidate.got_gradient or parameter.grad is not None or not parameter.requires_grad:
                self._drop_candidate(id(parameter))
            elif step_index - candidate.since >= self.unused_patience:
                matured.append(candidate.name)
                self._reported_unused.add(candidate.name)
                self._drop_candidate(id(parameter))
        for name, parameter in zip(view.names, view.parameters, strict=True):
            if (
                parameter.requires_grad
                and parameter.grad is None
                and id(parameter) not in self._candidates
                and name not in self._reported_unused
            ):
                candidate = _Candidate(name=name, since=step_index)
                if hasattr(parameter, "register_post_accumulate_grad_hook"):
                    candidate.handle = parameter.register_post_accumulate_grad_hook(
                        self._make_hook(candidate)
                    )
                self._candidates[id(parameter)] = candidate
        if matured:
            self._report_unused(trainer, state, matured)

    @staticmethod
    def _make_hook(candidate: _Candidate) -> Any:
        def hook(parameter: Tensor) -> None:
            candidate.got_gradient = True

        return hook

    def _drop_candidate(self, key: int) -> None:
        candidate = self._candidates.pop(key)
        if candidate.handle is not None:
            candidate.handle.remove()

    def _report_unused(self, trainer: pl.Trainer, state: _OptimizerState, names: list[str]) -> None:
        view = state.view
        trainable = [n for n, p in zip(view.names, view.parameters, strict=True) if p.requires_grad]
        sizes = {n: p.numel() for n, p in zip(view.names, view.parameters, strict=True)}
        groups = module_groups(names, trainable)
        prefix = f"{view.key}:" if view.key else ""
        elements = sum(sizes[name] for name in names)
        self._report(
            trainer,
            UNUSED,
            Severity.WARNING,
            f"{len(names)} trainable parameters ({elements:,} elements) got no gradient in any backward pass over "
            f"{self.unused_patience} optimizer steps: {_listing(groups)} (not part of the loss's graph)",
            where=prefix + groups[0],
            evidence={
                "parameters": len(names),
                "elements": elements,
                "steps_without_gradient": self.unused_patience,
            },
            hint="look for a .detach(), .item()/.numpy() round trip, torch.no_grad() or a module built but never called "
            "in forward; if the branch is unused on purpose, set requires_grad_(False) on it (DDP also needs "
            "find_unused_parameters=True otherwise)",
        )

    # ------------------------------------------------------------------ gradients-not-zeroed
    def _watch_zeroing(self, state: _OptimizerState) -> None:
        """Hook up to ``_ZEROING_SAMPLE`` parameters (spread over the optimizer's) until its next step."""
        if state.zeroing is not None:
            state.zeroing.remove()
            state.zeroing = None
        view = state.view
        present = [i for i, p in enumerate(view.parameters) if p.requires_grad and p.grad is not None]
        if not present:
            return
        count = min(_ZEROING_SAMPLE, len(present))
        chosen = sorted({present[(j * (len(present) - 1)) // max(count - 1, 1)] for j in range(count)})
        watch = _ZeroingWatch(names=[view.names[i] for i in chosen], handles=[], held=[[] for _ in chosen])
        for index, held in zip(chosen, watch.held, strict=True):
            watch.handles.append(
                view.parameters[index].register_hook(self._make_zeroing_hook(view.parameters[index], held))
            )
        state.zeroing = watch

    @staticmethod
    def _make_zeroing_hook(parameter: Tensor, held: list[Tensor | float]) -> Any:
        def hook(gradient: Tensor) -> None:
            # runs before the incoming gradient is added to parameter.grad: what does .grad hold now?
            before = parameter.grad
            held.append(GRAD_WAS_NONE if before is None else before.detach().ne(0).any())

        return hook

    def _run_zeroing_check(self, trainer: pl.Trainer, state: _OptimizerState) -> None:
        """Judge the closed window on its own read (when no update check reads at this step)."""
        watch = state.zeroing_closed
        assert watch is not None
        self._judge_zeroing(trainer, state, watch.flags.tolist() if watch.flags is not None else [])

    def _judge_zeroing(
        self,
        trainer: pl.Trainer,
        state: _OptimizerState,
        flag_values: Sequence[float],
        watch: _ZeroingWatch | None = None,
    ) -> None:
        if watch is None:
            watch, state.zeroing_closed = state.zeroing_closed, None
        assert watch is not None
        held_before = watch.held_before(flag_values)
        judged = [(name, held) for name, held in zip(watch.names, held_before, strict=True) if held]
        if not judged:
            return  # no backward pass reached the watched parameters: nothing to say
        carried = [name for name, held in judged if carried_over(held)]
        state.carry_streak = state.carry_streak + 1 if carried else 0
        if state.carry_streak < _ZEROING_CHECKS:
            return
        view = state.view
        prefix = f"{view.key}:" if view.key else ""
        backward_passes = max(len(held) for _, held in judged)
        layer = carried[0].rsplit(".", 1)[0] if "." in carried[0] else carried[0]
        self._report(
            trainer,
            NOT_ZEROED,
            Severity.ERROR,
            f"{len(carried)} of {len(judged)} sampled parameters ({_listing(carried)}) still held the previous optimizer "
            f"step's gradient before every backward pass up to this step ({backward_passes} pass"
            f"{'es' if backward_passes != 1 else ''}; never set to None or zeroed), on {state.carry_streak} checked steps "
            "in a row: the gradients are never zeroed, so each step applies the sum of every gradient so far",
            where=prefix + layer,
            evidence={
                "parameters_carried": float(len(carried)),
                "parameters_sampled": float(len(judged)),
                "backward_passes": float(backward_passes),
                "checks": float(state.carry_streak),
            },
            hint="call optimizer.zero_grad() once per optimizer step: under manual optimization before "
            "self.manual_backward(loss) (or right after optimizer.step()); to accumulate over k micro-batches, zero "
            "after each k-th step; an optimizer_zero_grad override must still zero the gradients",
            dedupe_as=f"{prefix}{NOT_ZEROED}",
        )

    # ------------------------------------------------------------------ updates
    def _take_snapshot(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, state: _OptimizerState
    ) -> None:
        view = state.view
        indices = [i for i, p in enumerate(view.parameters) if p.requires_grad and p.grad is not None]
        if not indices:
            return
        parameters = [view.parameters[i].detach() for i in indices]
        strides = [sample_stride(p) for p in parameters]
        with torch.no_grad():  # a strided sample of each parameter, not a copy of the model
            before = list(torch._foreach_mul(_sampled(parameters, strides), 1.0))
        scaler = scaler_of(trainer)
        scale = getattr(scaler, "_scale", None)
        state.snapshot = _Snapshot(
            indices=indices,
            strides=strides,
            before=before,
            weight_norms=tensor_norms([view.parameters[i] for i in indices]),  # shared with other checks
            grouping=LayerGrouping.from_named_parameters(
                (view.names[i], view.parameters[i]) for i in indices
            ),
            lr=_max_lr(optimizer),
            scale=scale.detach().clone() if isinstance(scale, Tensor) else None,
        )

    def _run_update_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: _OptimizerState
    ) -> None:
        snapshot, state.snapshot = state.snapshot, None
        assert snapshot is not None
        view = state.view
        current = [view.parameters[i].detach() for i in snapshot.indices]
        with torch.no_grad():
            torch._foreach_sub_(snapshot.before, _sampled(current, snapshot.strides))  # now -delta, in place
        device = snapshot.weight_norms.device
        sampled_norms = tensor_norms(snapshot.before, device=device)
        snapshot.before = []
        # the whole update's norm, estimated from the sample's; a parameter whose sample did not move but whose
        # norm did (an update elsewhere in it) counts as moved: frozen-parameters needs an exact zero
        full = [
            float(p.numel()) / max(_sampled_numel(p, k), 1)
            for p, k in zip(current, snapshot.strides, strict=True)
        ]
        moved_elsewhere = (tensor_norms(current, device=device) != snapshot.weight_norms).float()
        update_norms = sampled_norms * torch.tensor(full, device=device).sqrt()
        update_norms = torch.where(
            (sampled_norms == 0) & (moved_elsewhere > 0),
            torch.full_like(update_norms, math.nan),
            update_norms,
        )
        grouping = snapshot.grouping
        layer_update = grouping.layer_norms(update_norms.nan_to_num(0.0))
        layer_weight = grouping.layer_norms(snapshot.weight_norms)
        skipped = torch.zeros(1, device=device)
        scaler = scaler_of(trainer)
        scale_now = getattr(scaler, "_scale", None)
        if snapshot.scale is not None and isinstance(scale_now, Tensor):
            skipped = (scale_now < snapshot.scale).float().view(1).to(device)
        # gradients-not-zeroed's window closed at this step: its flags join the read
        zeroing, state.zeroing_closed = state.zeroing_closed, None  # judged with this read
        flags = zeroing.flags if zeroing is not None and zeroing.flags is not None else skipped[:0]
        # the one host read of this check (batched with the suite's other reads of this hook)
        n_flags = flags.numel()
        self._read(
            trainer,
            torch.cat([skipped, update_norms, layer_update, layer_weight, flags.to(device)]),
            lambda values: self._judge_update(trainer, pl_module, state, snapshot, zeroing, n_flags, values),
        )

    def _judge_update(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        state: _OptimizerState,
        snapshot: _Snapshot,
        zeroing: _ZeroingWatch | None,
        n_flags: int,
        values: list[float],
    ) -> None:
        try:
            view, grouping = state.view, snapshot.grouping
            if zeroing is not None:
                self._judge_zeroing(trainer, state, values[len(values) - n_flags :], zeroing)
            values = values[: len(values) - n_flags]
            if values[0] > 0:
                return  # the GradScaler skipped this step: nothing moved on purpose
            n_params, n_layers = len(snapshot.indices), len(grouping.layer_names)
            param_updates = values[1 : 1 + n_params]
            layer_updates = values[1 + n_params : 1 + n_params + n_layers]
            layer_weights = values[1 + n_params + n_layers :]
            ratios = [
                u / w if w > 0 and math.isfinite(u) and math.isfinite(w) else float("nan")
                for u, w in zip(layer_updates, layer_weights, strict=True)
            ]
            finite = [r for r in ratios if math.isfinite(r) and r > 0]
            key = f"{view.key}/" if view.key else ""
            if self.log_ratios and finite:
                self._log_scalars(
                    trainer,
                    pl_module,
                    {
                        f"sentinel/update_ratio/{key}max": max(finite),
                        f"sentinel/update_ratio/{key}min": min(finite),
                    },
                )
            if FROZEN in self.active_checks:
                self._judge_frozen(trainer, state, snapshot, param_updates)
            # per-layer weight RMS, host-side and only when some ratio is high (the near-zero-init guard needs it)
            rms = (
                self._layer_rms(state, snapshot, layer_weights)
                if any(r > self.high_ratio for r in finite)
                else None
            )
            self._judge_ratios(trainer, state, snapshot, ratios, layer_updates, layer_weights, rms)
            if (
                rms is not None
                and RATIO_HIGH in self.active_checks
                and any(r > self.burst_ratio for r in finite)
            ):
                self._judge_burst(trainer, state, snapshot, ratios, layer_updates, layer_weights, rms)
        finally:
            self._settle(trainer)  # a stop or raise acts on what was found

    def _judge_frozen(
        self, trainer: pl.Trainer, state: _OptimizerState, snapshot: _Snapshot, updates: list[float]
    ) -> None:
        view = state.view
        if snapshot.lr < self.decayed_fraction * max(state.peak_lr, snapshot.lr):
            # at the end of a schedule that decays to 0 (cosine, linear) lr x update falls below the float
            # resolution of large weights (a bias at 150 under lr 4e-5, a ResNet's batch-norm weights at lr
            # 2.7e-8): that is the schedule, not a fault; lr 0 from the start has a peak of 0 and is judged
            state.frozen_streak.clear()
            return
        names = [view.names[i] for i in snapshot.indices]
        seen = set(names)
        for name in list(state.frozen_streak):
            if name not in seen:
                state.frozen_streak.pop(name)  # no gradient this time: unused-parameters' business
        frozen: list[str] = []
        for name, update in zip(names, updates, strict=True):
            streak = state.frozen_streak.get(name, 0) + 1 if update == 0.0 else 0
            state.frozen_streak[name] = streak
            if streak >= self.patience:
                frozen.append(name)
        if not frozen:
            return
        trainable = [n for n, p in zip(view.names, view.parameters, strict=True) if p.requires_grad]
        groups = module_groups(frozen, trainable)
        prefix = f"{view.key}:" if view.key else ""
        lr = snapshot.lr
        cause = (
            "the learning rate is 0"
            if lr == 0
            else "their gradients are exactly zero, or lr x gradient is below the floating-point resolution of the weights"
        )
        self._report(
            trainer,
            FROZEN,
            Severity.WARNING,
            f"{len(frozen)} of {len(names)} parameters with gradients did not change at all on {self.patience} checked "
            f"optimizer steps in a row (lr {lr:.3g}; likely {cause}): {_listing(groups)}",
            where=prefix + groups[0],
            evidence={"parameters": len(frozen), "lr": lr, "checks": self.patience},
            hint="check the learning rate and its schedule (a LambdaLR returning 0, lr=0 in a param group), that the "
            "loss depends on these parameters through differentiable ops (no argmax/round/comparison), and the "
            "optimizer's param groups; to freeze them on purpose set requires_grad_(False)",
            dedupe_as=f"{prefix}{FROZEN}",
        )

    @staticmethod
    def _layer_rms(state: _OptimizerState, snapshot: _Snapshot, weights: list[float]) -> list[float]:
        """Root-mean-square weight per layer, from the layer norms and element counts."""
        sizes = [0] * len(snapshot.grouping.layer_names)
        for index, layer in zip(snapshot.indices, snapshot.grouping.parameter_layer, strict=True):
            sizes[layer] += state.view.parameters[index].numel()
        return [norm / math.sqrt(max(size, 1)) for norm, size in zip(weights, sizes, strict=True)]

    def _judge_burst(
        self,
        trainer: pl.Trainer,
        state: _OptimizerState,
        snapshot: _Snapshot,
        ratios: list[float],
        updates: list[float],
        weights: list[float],
        rms: list[float],
    ) -> None:
        """One check with a layer moved by more than ``burst_ratio`` of its norm (rare)."""
        grouping = snapshot.grouping
        bursting = [
            index
            for index in range(len(grouping.layer_names))
            if burst_verdict(ratios[index], rms[index], grouping.is_weight_layer[index], self.burst_ratio)
        ]
        if not bursting:
            return
        worst = max(bursting, key=lambda i: ratios[i])
        self._report_high(
            trainer,
            state,
            snapshot,
            bursting,
            (ratios, updates, weights),
            f"changed by {ratios[worst]:.3g} times its own norm in one optimizer step (> {self.burst_ratio:g}; ~1e-3 "
            f"is typical), lr {snapshot.lr:.3g}: the step is larger than the weights themselves",
            "lower the learning rate (try 10x lower) or add warm-up; Adam-type optimizers move every weight by "
            "about lr per step, so lr should stay well below the weights' own scale (1/sqrt(fan_in))",
        )

    def _report_high(
        self,
        trainer: pl.Trainer,
        state: _OptimizerState,
        snapshot: _Snapshot,
        layers: list[int],
        norms: tuple[list[float], list[float], list[float]],
        how: str,
        hint: str,
    ) -> None:
        """Report ``update-ratio-too-high`` for ``layers`` (indices), naming the one with the largest ratio."""
        ratios, updates, weights = norms
        names = snapshot.grouping.layer_names
        worst = max(layers, key=lambda i: ratios[i])
        prefix = f"{state.view.key}:" if state.view.key else ""
        self._report(
            trainer,
            RATIO_HIGH,
            Severity.WARNING,
            f"layer '{names[worst]}' {how}; {len(layers)} of {len(names)} layers above: "
            f"{_listing([names[i] for i in layers])}",
            where=prefix + names[worst],
            evidence={
                "update_ratio": ratios[worst],
                "update_norm": updates[worst],
                "weight_norm": weights[worst],
                "lr": snapshot.lr,
                "layers_above": len(layers),
            },
            hint=hint,
            magnitude=ratios[worst],
            dedupe_as=f"{prefix}{RATIO_HIGH}",
        )

    def _judge_ratios(
        self,
        trainer: pl.Trainer,
        state: _OptimizerState,
        snapshot: _Snapshot,
        ratios: list[float],
        updates: list[float],
        weights: list[float],
        rms: list[float] | None,
    ) -> None:
        lr = snapshot.lr
        excused = lr_excuses_low_ratio(lr, state.previous_lr, max(state.peak_lr, lr), self.decayed_fraction)
        state.previous_lr = lr
        state.peak_lr = max(state.peak_lr, lr)
        high_layers: list[int] = []
        low_layers: list[int] = []
        for index, name in enumerate(snapshot.grouping.layer_names):
            streak = state.ratio_streak.get(name, 0)
            ratio = ratios[index]
            if rms is not None and ratio > self.high_ratio and rms[index] < TINY_WEIGHT_RMS:
                ratio = math.nan  # a near-zero init growing into its scale: not judged
            high, low = ratio_streak(ratio, streak, self.high_ratio, self.low_ratio)
            if low and excused:
                low = 0
            state.ratio_streak[name] = high if high else -low
            if high >= self.patience:
                high_layers.append(index)
            if low >= self.patience:
                low_layers.append(index)
        prefix = f"{state.view.key}:" if state.view.key else ""
        names = snapshot.grouping.layer_names
        if high_layers and RATIO_HIGH in self.active_checks:
            worst = max(high_layers, key=lambda i: ratios[i])
            self._report_high(
                trainer,
                state,
                snapshot,
                high_layers,
                (ratios, updates, weights),
                f"changes by {ratios[worst]:.3g} of its norm per step (> {self.high_ratio:g}; ~1e-3 is typical) on "
                f"{self.patience} checks in a row, lr {lr:.3g}",
                "lower the learning rate (try 10x lower) or add warm-up; check the lr schedule (a warm-up factor "
                "without its cap) and that inputs/targets are normalised",
            )
        if low_layers and RATIO_LOW in self.active_checks:
            worst = min(low_layers, key=lambda i: ratios[i])
            self._report(
                trainer,
                RATIO_LOW,
                Severity.WARNING,
                f"layer '{names[worst]}' changes by only {ratios[worst]:.3g} of its norm per step "
                f"(< {self.low_ratio:g}; ~1e-3 is typical) on {self.patience} checks in a row, lr {lr:.3g}; "
                f"{len(low_layers)} of {len(names)} layers below: {_listing([names[i] for i in low_layers])}",
                where=prefix + names[worst],
                evidence={
                    "update_ratio": ratios[worst],
                    "update_norm": updates[worst],
                    "weight_norm": weights[worst],
                    "lr": lr,
                    "layers_below": len(low_layers),
                },
                hint=_low_ratio_hint(ratios, low_layers, self.low_ratio),
                magnitude=1.0 / max(ratios[worst], 1e-300),
                dedupe_as=f"{prefix}{RATIO_LOW}",
            )


add_to_presets(ParameterUpdateMonitor, ("fast", "full"), order=50)
