"""LearningCurveMonitor: the shape of the training and validation loss curves.

The training loss comes from the loop's ``outputs`` in ``on_train_batch_end`` (kept on the device as
detached 0-d tensors, read back once per ``every_n_steps`` optimizer steps); the validation loss is
read from ``trainer.callback_metrics[monitor]`` at the end of each validation run. The rules work on
*chunks* of ``every_n_steps`` optimizer steps: each chunk gives its mean loss and its swing (largest
minus smallest per-step loss), and a smoothed loss is the median of the last ``smoothing`` chunk means,
so minibatch noise, warm-up and learning-rate restarts do not alarm.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._validate import require_int, require_number, require_text
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.findings import Severity

NOT_DECREASING = "loss-not-decreasing"
DIVERGENCE = "loss-divergence"
OSCILLATION = "loss-oscillation"
OVERFITTING = "overfitting"

register(
    CheckSpec(
        NOT_DECREASING,
        "LearningCurveMonitor",
        Severity.WARNING,
        "the training loss has not improved from its start",
        "smoothed loss not 5% below the first 5-step mean after 100 optimizer steps",
    ),
    CheckSpec(
        DIVERGENCE,
        "LearningCurveMonitor",
        Severity.WARNING,
        "the training loss climbs away from its best value (learning rate too high, gradient ascent)",
        "smoothed loss >= 2x its best and back up >= 25% of its descent, on 2 checks in a row",
    ),
    CheckSpec(
        OSCILLATION,
        "LearningCurveMonitor",
        Severity.WARNING,
        "the training loss swings from step to step far beyond minibatch noise",
        "median swing (max-min around the trend within 5 steps) of the last 5 chunks > 0.8x the loss scale (max of start, level now)",
    ),
    CheckSpec(
        OVERFITTING,
        "LearningCurveMonitor",
        Severity.WARNING,
        "the validation loss rises while the training loss falls (the train/val gap grows)",
        "val loss >= 20% above its best and back up >= 7.5% of the starting loss, 3+ validation runs after it, "
        "while the training loss kept falling (or sat converged)",
    ),
)

_LR_HINT_HIGH = (
    "lower the learning rate 10x (or add warm-up with a cap, gradient clipping), check the sign of the loss "
    "and that the scheduler does not keep increasing the learning rate"
)


# ---------------------------------------------------------------------- pure rules
def smoothed_loss(chunk_means: Sequence[float], width: int) -> float:
    """Median of the last ``width`` finite chunk means (NaN if none): the noise-robust loss level.

    Example:
        >>> smoothed_loss([3.0, 2.0, 9.0, 1.0, 1.5], 3)
        1.5
    """
    finite = [value for value in list(chunk_means)[-width:] if math.isfinite(value)]
    return statistics.median(finite) if finite else math.nan


def chunk_statistics(step_losses: Sequence[float]) -> tuple[float, float]:
    """``(mean, swing)`` of the finite per-step losses of one chunk.

    The swing is the range (largest minus smallest) of the losses around their least-squares line, so
    a loss that falls (or climbs) steadily inside the chunk has no swing; only the back-and-forth does.

    Example:
        >>> [round(value, 6) for value in chunk_statistics([1.0, 3.0, float("nan"), 1.0, 3.0, 1.0])]
        [1.8, 2.0]
        >>> chunk_statistics([5.0, 4.0, 3.0, 2.0])  # a steady fall: no swing
        (3.5, 0.0)
    """
    finite = [value for value in step_losses if math.isfinite(value)]
    if not finite:
        return math.nan, math.nan
    count = len(finite)
    mean = sum(finite) / count
    if count < 3:
        return mean, math.nan
    centre = (count - 1) / 2
    spread = sum((index - centre) ** 2 for index in range(count))
    slope = sum((index - centre) * (value - mean) for index, value in enumerate(finite)) / spread
    residuals = [value - mean - slope * (index - centre) for index, value in enumerate(finite)]
    return mean, max(residuals) - min(residuals)


def divergence_verdict(
    current: float, best: float, start: float, factor: float, rise_fraction: float
) -> tuple[bool, float]:
    """Whether the smoothed loss ``current`` climbed away from its ``best`` smoothed value.

    Diverging means: the rise above the best is at least ``(factor - 1) * |best|`` (for a positive
    loss: ``current >= factor * best``) and at least ``rise_fraction`` of the way the loss had come
    down from its ``start`` (so a converged loss near 0 wobbling from 0.001 to 0.003, or the bump after
    a learning-rate restart, is not divergence). Returns ``(diverging, current / best)``.

    Example:
        >>> divergence_verdict(4.6, 2.3, 2.3, 2.0, 0.25)  # gradient ascent: up from the start
        (True, 2.0)
        >>> divergence_verdict(0.003, 0.001, 0.7, 2.0, 0.25)[0]  # converged, tiny wobble
        False
    """
    if not (math.isfinite(current) and math.isfinite(best) and math.isfinite(start)):
        return False, math.nan
    rise = current - best
    ratio = current / best if best > 0 else math.inf
    needed = max((factor - 1.0) * abs(best), rise_fraction * max(start - best, 0.0), 1e-12)
    return rise >= needed, ratio


def not_decreasing_verdict(start: float, best: float, min_improvement: float) -> tuple[bool, float]:
    """Whether the best smoothed loss is not ``min_improvement`` (relative) below the ``start`` loss.

    Returns ``(not_decreasing, relative_improvement)``.

    Example:
        >>> not_decreasing_verdict(2.0, 1.99, 0.05)[0]
        True
        >>> not_decreasing_verdict(2.30, 1.20, 0.05)[0]
        False
    """
    if not (math.isfinite(start) and math.isfinite(best)) or abs(start) < 1e-8:
        return False, math.nan
    improvement = (start - best) / abs(start)
    return improvement < min_improvement, improvement


def oscillation_verdict(
    swings: Sequence[float], scale: float, factor: float, window: int
) -> tuple[bool, float]:
    """Whether the median swing of the last ``window`` chunks exceeds ``factor`` x ``scale``.

    ``scale`` is the loss at the start of training (its problem-specific size, e.g. ln C for
    cross-entropy): minibatch noise of a learning run stays well below it, a learning rate that throws
    the weights around makes the loss jump by more than it. Returns ``(oscillating, median_swing / scale)``.

    Example:
        >>> oscillation_verdict([3.0, 2.5, 4.0, 0.2, 3.5], 0.5, 1.5, 5)
        (True, 6.0)
        >>> oscillation_verdict([0.1, 0.2, 0.1, 0.3, 0.1], 0.7, 1.5, 5)[0]
        False
    """
    recent = [value for value in list(swings)[-window:] if math.isfinite(value)]
    if len(recent) < window or not math.isfinite(scale) or abs(scale) < 1e-8:
        return False, math.nan
    ratio = statistics.median(recent) / abs(scale)
    return ratio > factor, ratio


_TRAIN_RISE_SHARE = 0.25  # how much of the validation loss's rise the training loss may share (noise at 0)


def overfitting_verdict(
    val_losses: Sequence[float],
    train_losses: Sequence[float],
    patience: int,
    min_rise: float,
    loss_scale: float = math.nan,
    min_scale_rise: float = 0.0,
) -> tuple[bool, int]:
    """Whether validation loss rose while training loss fell, over ``patience`` validation runs.

    ``val_losses[i]`` and ``train_losses[i]`` are the losses at the i-th validation run (the training
    loss smoothed over the steps before it). Overfitting: the best validation loss is at least
    ``patience`` runs old, the latest is ``min_rise`` (relative) above it, and the training loss did
    not climb with it: it is lower now than at the best validation run, or higher by less than a quarter
    of the validation loss's rise (a training loss converged near 0 wobbles; one that climbs as much as
    the validation loss is diverging). With a finite ``loss_scale`` (the size of the loss at
    the start of training) the rise must also be at least ``min_scale_rise`` x ``loss_scale``: a model
    that has come down from 2.3 to 0.02 and drifts to 0.03 (50% above its best, 0.4% of the scale)
    stays converged; one that climbs back by a tenth of its starting loss has overfit. Returns
    ``(overfitting, index_of_best)``.

    Example:
        >>> overfitting_verdict([1.0, 0.8, 0.9, 1.0, 1.1], [1.0, 0.6, 0.4, 0.2, 0.1], 3, 0.1)
        (True, 1)
        >>> overfitting_verdict([1.0, 0.8, 0.7, 0.65, 0.6], [1.0, 0.6, 0.4, 0.2, 0.1], 3, 0.1)[0]
        False
        >>> converged = [1.8, 0.03, 0.023, 0.026, 0.027, 0.028]  # 22% above its best, 0.2% of ln(10)
        >>> overfitting_verdict(converged, [2.0, 0.1, 0.01, 0.005, 0.004, 0.003], 3, 0.2, 2.3, 0.05)[0]
        False
    """
    pairs = [(index, val) for index, val in enumerate(val_losses) if math.isfinite(val)]
    if len(pairs) <= patience:
        return False, -1
    best_index, best_val = min(pairs, key=lambda pair: pair[1])
    latest_val = val_losses[-1]
    last = len(val_losses) - 1
    if last - best_index < patience or not math.isfinite(latest_val):
        return False, best_index
    rise = latest_val - best_val
    rose = rise >= min_rise * max(abs(best_val), 1e-8)
    if math.isfinite(loss_scale):
        rose = rose and rise >= min_scale_rise * abs(loss_scale)
    train_best, train_now = train_losses[best_index], train_losses[-1]
    # the training loss fell, or sat converged (a rise of a small share of the validation's is noise at its
    # floor); a training loss that climbs with the validation loss is divergence, not overfitting
    train_held = (
        math.isfinite(train_best)
        and math.isfinite(train_now)
        and train_now - train_best <= _TRAIN_RISE_SHARE * max(rise, 0.0)
    )
    return rose and train_held, best_index


def loss_from_outputs(outputs: Any) -> Tensor | None:
    """The loss tensor in a ``training_step``'s output (a tensor, or a mapping with ``"loss"``).

    Example:
        >>> loss_from_outputs({"loss": torch.tensor(0.5), "extra": 1})
        tensor(0.5000)
        >>> loss_from_outputs(None) is None
        True
    """
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, Tensor) and outputs.numel() == 1:
        # Lightning hands the loss over detached: then keeping it costs no device op at all
        loss = outputs.detach() if outputs.requires_grad else outputs
        return loss if loss.dim() == 0 else loss.reshape(())
    return None


# ---------------------------------------------------------------------- the callback
class LearningCurveMonitor(SentinelCallback):
    """Reports a training loss that does not fall, climbs, or jumps around, and validation overfitting.

    Cost: each micro-batch keeps a reference to its detached loss (no device work); every
    ``every_n_steps`` optimizer steps those are stacked and read back once (inside ``Sentinel``, on the
    suite's next check step, in its one read of the hook), and the rules run on the host over a few
    floats per chunk. The validation loss is read once per validation run.

    Rules (calibrated on ``benchmarks/detection``: the healthy zoo, incl. noisy batch-8 runs and cosine
    warm restarts, stays silent; lr 1e-8, gradient ascent, SGD far too fast and a 40-sample train set
    are caught):

    - ``loss-not-decreasing``: after ``patience_steps`` optimizer steps the best smoothed loss is not
      ``min_improvement`` (5%) below the first chunk's mean. Judged until the loss once improves.
    - ``loss-divergence``: the smoothed loss (median of the last ``smoothing`` chunk means) is
      >= ``divergence_factor`` (2x) its best smoothed value and has climbed back >= 25% of its descent
      from the start, on 2 checks in a row.
    - ``loss-oscillation``: the median swing (max - min of the per-step losses around the chunk's
      linear trend) of the last
      ``smoothing`` chunks is > ``oscillation_factor`` (0.8x) the loss scale (the first chunk's mean, or
      the smoothed level now if larger in magnitude). Minibatch noise of the healthy zoo stays at or below
      0.33x (LSTM, diabetes regression, batch-8 runs); BCE with SGD lr 0.5 momentum 0.9 reaches 1.1x.
    - ``overfitting``: the ``monitor`` validation loss is >= ``overfit_min_rise`` (20%) above its best
      and back up by >= ``overfit_min_scale_rise`` (7.5%) of the loss scale (the larger of the first
      training chunk's mean and the first validation loss: ln C for a fresh classifier, the target
      variance for MSE) for ``overfit_patience`` (3) validation runs, while the smoothed training loss
      kept falling or sat converged (it rose by less than a quarter of the validation loss's rise).
      The scale keeps a converged model quiet: 0.0229 -> 0.0284 is 24% above its best but 0.24% of
      ln 10. ``evidence`` gives the train/val gap now and at the best validation run, and the scale.

    A warm-up that holds the learning rate near 0 for longer than ``patience_steps`` looks like a loss that
    does not decrease: raise ``patience_steps`` (or ``warmup_steps``) to cover it. A loss that returns
    nothing to the loop (manual optimization returning ``None``) is not watched.

    ``where`` is ``"loss"`` (the training loss) or the ``monitor`` key. Under gradient accumulation each
    optimizer step's loss is the mean of its micro-batches; under manual optimization a step ends at
    the first ``optimizer.step()`` of a batch; under DDP the losses are averaged over ranks at the check.

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the healthy smoothed
    loss rose at most 0.57 of the way to a divergence (``lstm-sequences``; margin 1.8x); the largest
    median swing was 0.66 of the loss scale (``regression-validation-long``; threshold 0.8, 1.2x); the
    largest validation rise over its best with the training loss falling was 16% (threshold 20%,
    1.25x; ``regression-diabetes-mse``, 15%, whose rise is 8.6% of its starting loss, stays below on
    this rule); in the 3000-step runs of ``cases_long.py`` the validation loss of converged models rose
    up to 3x its best (a pre-LN Transformer under cosine: 0.054 -> 0.165, 4.6% of its starting loss;
    the digits MLP: 76%, 2.3%), so the scale rule (7.5%) keeps them quiet with a margin of 1.6x, and
    the overfitting faults reach 13% (``tiny-train-set-overfits``, 1.8x), 15% (``tan-1``), 23-24%
    (``tcl-100``), 33% (``trd-90``), 46% (``hdb``) and 57% (wrong labels memorised). Divergence and
    oscillation already carry the loss's own scale (the descent from the start, the start itself): the
    long runs reach 0.18 of the rise a divergence needs and a swing of 0.55 of the loss scale (the
    synthetic regression), the lr jumped x100 at step 2000 5.7x that rise; the slowest
    healthy run got 5% below its starting loss after 35 steps
    (``warmup-cosine-transformer``; patience 100 steps, 2.9x).

    Args:
        on_detect: ``"warn"`` (default), ``"stop"`` or ``"raise"``.
        every_n_steps: optimizer steps per chunk (one host read per chunk; inside ``Sentinel`` the chunks
            stay this long and are read on the suite's check steps); an integer >= 1.
        warmup_steps: optimizer steps measured but not judged (a warm-up that is meant to be erratic);
            an integer >= 0.
        monitor: the validation loss key in ``trainer.callback_metrics`` (``self.log("val_loss", ...)``);
            a non-empty string.
        smoothing: chunks in the median that smooths the loss curve; an integer >= 1.
        patience_steps: optimizer steps before ``loss-not-decreasing`` is judged; an integer >= 1.
        min_improvement: relative drop of the smoothed loss below its start that counts as learning;
            in (0, 1).
        divergence_factor: how far above its best smoothed value the smoothed loss may climb; > 1.
        oscillation_factor: largest median in-chunk swing, in units of the loss scale; > 0.
        overfit_patience: validation runs since the best validation loss before ``overfitting``; >= 1.
        overfit_min_rise: relative rise of the validation loss above its best that counts; > 0.
        overfit_min_scale_rise: rise of the validation loss above its best, as a share of the loss scale
            at the start, that counts; >= 0 (0: the relative rise alone).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.curves import LearningCurveMonitor
        >>> monitor = LearningCurveMonitor(monitor="val/loss", patience_steps=200)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
    """

    CHECKS = (NOT_DECREASING, DIVERGENCE, OSCILLATION, OVERFITTING)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 5,
        warmup_steps: int = 0,
        monitor: str = "val_loss",
        smoothing: int = 5,
        patience_steps: int = 100,
        min_improvement: float = 0.05,
        divergence_factor: float = 2.0,
        oscillation_factor: float = 0.8,
        overfit_patience: int = 3,
        overfit_min_rise: float = 0.2,
        overfit_min_scale_rise: float = 0.075,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        # the chunk is the rules' unit of time (their thresholds are calibrated on it): it stays when ``Sentinel``
        # sets the cadence of the reads to its clock's
        self.chunk_steps = self.every_n_steps
        self.monitor = require_text("monitor", monitor)
        self.smoothing = require_int("smoothing", smoothing)
        self.patience_steps = require_int("patience_steps", patience_steps)
        self.min_improvement = require_number("min_improvement", min_improvement, above=0, below=1)
        self.divergence_factor = require_number("divergence_factor", divergence_factor, above=1)
        self.oscillation_factor = require_number("oscillation_factor", oscillation_factor, above=0)
        self.overfit_patience = require_int("overfit_patience", overfit_patience)
        self.overfit_min_rise = require_number("overfit_min_rise", overfit_min_rise, above=0)
        self.overfit_min_scale_rise = require_number(
            "overfit_min_scale_rise", overfit_min_scale_rise, at_least=0
        )
        self.rise_fraction = 0.25
        self.divergence_patience = 2
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        # the open chunk (device tensors, not read yet)
        self._micro: list[Tensor] = []
        self._step_ends: list[int] = []
        # the chunks closed but not read yet: (steps in ``_step_ends`` at its end, optimizer steps seen then)
        self._closed: list[tuple[int, int]] = []
        self._stepped = False
        # the curve so far (host floats, checkpointed)
        self._steps_seen = 0
        self._start = math.nan  # mean loss of the first chunk
        self._best = math.nan  # lowest smoothed loss
        self._means: deque[float] = deque(maxlen=self.smoothing)
        self._swings: deque[float] = deque(maxlen=self.smoothing)
        self._improved = False
        self._divergence_streak = 0
        self._val_losses: list[float] = []
        self._val_train_losses: list[float] = []
        self._monitor_missing_reported = False

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "monitor": self.monitor}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {
            "steps_seen": self._steps_seen,
            "start": self._start,
            "best": self._best,
            "means": list(self._means),
            "swings": list(self._swings),
            "improved": self._improved,
            "divergence_streak": self._divergence_streak,
            "val_losses": list(self._val_losses),
            "val_train_losses": list(self._val_train_losses),
        }

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._steps_seen = int(state.get("steps_seen", 0))
        self._start = float(state.get("start", math.nan))
        self._best = float(state.get("best", math.nan))
        self._means = deque((float(v) for v in state.get("means", [])), maxlen=self.smoothing)
        self._swings = deque((float(v) for v in state.get("swings", [])), maxlen=self.smoothing)
        self._improved = bool(state.get("improved", False))
        self._divergence_streak = int(state.get("divergence_streak", 0))
        self._val_losses = [float(v) for v in state.get("val_losses", [])]
        self._val_train_losses = [float(v) for v in state.get("val_train_losses", [])]

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # before a checkpoint's state is restored: a resumed run reloads it after
            self._reset_run_state()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = loss_from_outputs(outputs)
        if loss is not None:
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                loss = loss * trainer.accumulate_grad_batches  # Lightning hands over loss / accumulation
            self._micro.append(loss)
        if not self._stepped:
            return
        self._stepped = False
        self._step_ends.append(len(self._micro))
        self._steps_seen += 1
        if self._steps_seen % self.chunk_steps == 0:
            self._closed.append((len(self._step_ends), self._steps_seen))
        # on its own the check reads a chunk when it closes; inside ``Sentinel`` on the suite's next check
        # step, in the suite's one read of that hook
        if self._closed and (self._own_clock or self._due(trainer)):
            self._read_closed_chunks(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.active_checks:
            return
        if self._closed:  # the training curve up to this validation first (a read at validation only)
            self._read_closed_chunks(trainer, pl_module, now=True)
        self._run_overfitting_check(trainer)
        self._settle(trainer)

    # ------------------------------------------------------------------ the training-loss checks
    def _read_closed_chunks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: bool = False
    ) -> None:
        """Read the closed chunks' losses back (one host read) and judge each chunk, oldest first."""
        closed, self._closed = self._closed, []
        steps_in_closed = closed[-1][0]
        micro_in_closed = self._step_ends[steps_in_closed - 1]
        micro, ends = self._micro[:micro_in_closed], self._step_ends[:steps_in_closed]
        self._micro = self._micro[micro_in_closed:]
        self._step_ends = [end - micro_in_closed for end in self._step_ends[steps_in_closed:]]
        if not micro:
            return
        stacked = torch.stack([loss.float() for loss in micro])
        if trainer.world_size > 1:  # every rank reaches this check at the same step: lockstep
            stacked = trainer.strategy.reduce(stacked, reduce_op="mean")

        def judge(values: list[float]) -> None:
            begin, first = 0, 0
            for steps_at_end, steps_seen in closed:
                chunk = []  # the chunk's per-step losses: the mean of each optimizer step's micro-batches
                for end in ends[first:steps_at_end]:
                    if end > begin:
                        part = values[begin:end]
                        chunk.append(sum(part) / len(part))
                    begin = end
                first = steps_at_end
                self._run_curve_check(trainer, pl_module, chunk, steps_seen)
            self._settle(trainer)

        if now:
            judge(stacked.tolist())
        else:
            self._read(trainer, stacked, judge)

    def _run_curve_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step_losses: list[float], steps_seen: int
    ) -> None:
        mean, swing = chunk_statistics(step_losses)
        if not math.isfinite(mean):
            return  # no loss in the outputs, or a non-finite one (NonFiniteGuard's business)
        if not math.isfinite(self._start):
            self._start = mean
        self._means.append(mean)
        self._swings.append(swing)
        smoothed = smoothed_loss(self._means, self.smoothing)
        if not math.isfinite(self._best) or smoothed < self._best:
            self._best = smoothed
        self._log_scalars(
            trainer, pl_module, {"sentinel/loss/smoothed": smoothed, "sentinel/loss/swing": swing}
        )
        if steps_seen <= self.warmup_steps:
            return
        steps = f"{steps_seen} optimizer steps"
        diverging = self._judge_divergence(trainer, smoothed, steps)
        if not diverging:
            self._judge_not_decreasing(trainer, smoothed, steps, steps_seen)
        if not diverging:  # a climbing loss is diverging; its swings say nothing more
            self._judge_oscillation(trainer, smoothed)

    def _judge_divergence(self, trainer: pl.Trainer, smoothed: float, steps: str) -> bool:
        if DIVERGENCE not in self.active_checks:
            return False
        diverging, ratio = divergence_verdict(
            smoothed, self._best, self._start, self.divergence_factor, self.rise_fraction
        )
        self._divergence_streak = self._divergence_streak + 1 if diverging else 0
        if self._divergence_streak >= self.divergence_patience:
            ratio_text = f"{ratio:.3g}x" if math.isfinite(ratio) else "far above"
            self._report(
                trainer,
                DIVERGENCE,
                Severity.WARNING,
                f"the smoothed training loss climbed to {smoothed:.4g}, {ratio_text} its best {self._best:.4g} "
                f"(start {self._start:.4g}) after {steps}",
                where="loss",
                evidence={
                    "smoothed_loss": smoothed,
                    "best_loss": self._best,
                    "start_loss": self._start,
                    "ratio_to_best": ratio,
                },
                hint=_LR_HINT_HIGH,
                magnitude=ratio if math.isfinite(ratio) else 1.0,
                dedupe_as=DIVERGENCE,
            )
        return diverging

    def _judge_not_decreasing(
        self, trainer: pl.Trainer, smoothed: float, steps: str, steps_seen: int
    ) -> None:
        if self._improved or NOT_DECREASING not in self.active_checks:
            return
        stuck, improvement = not_decreasing_verdict(self._start, self._best, self.min_improvement)
        if not stuck and math.isfinite(improvement):
            self._improved = True  # it learns: later plateaus are convergence, not this fault
            return
        if stuck and steps_seen >= self.patience_steps:
            self._report(
                trainer,
                NOT_DECREASING,
                Severity.WARNING,
                f"the training loss has not improved after {steps}: best smoothed {self._best:.4g} vs "
                f"{self._start:.4g} at the start ({improvement:+.1%}, needs {self.min_improvement:.0%})",
                where="loss",
                evidence={
                    "start_loss": self._start,
                    "best_loss": self._best,
                    "smoothed_loss": smoothed,
                    "relative_improvement": improvement,
                    "steps": float(steps_seen),
                },
                hint="raise the learning rate 10x (or check that the scheduler/warm-up does not hold it near 0), "
                "check that the optimizer holds the model's parameters and that inputs and labels match; "
                "try overfitting a single batch first",
                dedupe_as=NOT_DECREASING,
            )

    def _judge_oscillation(self, trainer: pl.Trainer, smoothed: float) -> None:
        if OSCILLATION not in self.active_checks:
            return
        # the loss's own scale: its start, or its level now if that is larger (a loss falling without
        # bound below 0, e.g. NLL fed logits, is not an oscillation)
        scale = max(abs(self._start), abs(smoothed))
        oscillating, ratio = oscillation_verdict(self._swings, scale, self.oscillation_factor, self.smoothing)
        if oscillating:
            swing = statistics.median([value for value in self._swings if math.isfinite(value)])
            self._report(
                trainer,
                OSCILLATION,
                Severity.WARNING,
                f"the training loss swings by {swing:.4g} within {self.chunk_steps} steps (median of the last "
                f"{self.smoothing} chunks), {ratio:.3g}x the loss scale {scale:.4g} (its start, or its level now if larger)",
                where="loss",
                evidence={
                    "median_swing": swing,
                    "start_loss": self._start,
                    "swing_to_scale": ratio,
                    "scale": scale,
                    "smoothed_loss": smoothed,
                },
                hint="lower the learning rate 10x or use a larger batch; add gradient clipping or a schedule "
                "that decays the learning rate; with momentum, lower it",
                magnitude=ratio,
                dedupe_as=OSCILLATION,
            )

    # ------------------------------------------------------------------ validation
    def _loss_scale(self) -> float:
        """The size of the loss at the start: the larger of the first training chunk and the first validation."""
        starts = [abs(value) for value in (self._start, *self._val_losses[:1]) if math.isfinite(value)]
        return max(starts) if starts else math.nan

    def _run_overfitting_check(self, trainer: pl.Trainer) -> None:
        if OVERFITTING not in self.active_checks:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._monitor_missing_reported:
                self._monitor_missing_reported = True
                logged = sorted(trainer.callback_metrics)
                self._report(
                    trainer,
                    OVERFITTING,
                    Severity.INFO,
                    f"validation ran but `{self.monitor}` was never logged, so overfitting cannot be judged "
                    f"(logged: {logged[:8]})",
                    where=self.monitor,
                    hint=f"log the validation loss with self.log('{self.monitor}', loss) in validation_step, or "
                    f"pass LearningCurveMonitor(monitor=...) with the key you log",
                    dedupe_as="monitor-missing",
                )
            return
        val = float(value.detach().float().mean()) if isinstance(value, Tensor) else float(value)
        train = smoothed_loss(self._means, self.smoothing)
        self._val_losses.append(val)
        self._val_train_losses.append(train)
        overfitting, best_index = overfitting_verdict(
            self._val_losses,
            self._val_train_losses,
            self.overfit_patience,
            self.overfit_min_rise,
            self._loss_scale(),
            self.overfit_min_scale_rise,
        )
        if not overfitting:
            return
        best_val, train_at_best = self._val_losses[best_index], self._val_train_losses[best_index]
        runs = len(self._val_losses) - 1 - best_index
        gap, gap_at_best = val - train, best_val - train_at_best
        scale = self._loss_scale()
        of_scale = f" ({(val - best_val) / scale:.0%} of the starting loss {scale:.4g})" if scale > 0 else ""
        self._report(
            trainer,
            OVERFITTING,
            Severity.WARNING,
            f"`{self.monitor}` rose from its best {best_val:.4g} to {val:.4g}{of_scale} over {runs} validation "
            f"runs while the training loss fell from {train_at_best:.4g} to {train:.4g}: the gap grew "
            f"{gap_at_best:.3g} -> {gap:.3g}",
            where=self.monitor,
            evidence={
                "loss_scale": scale,
                "val_loss": val,
                "best_val_loss": best_val,
                "train_loss": train,
                "train_loss_at_best": train_at_best,
                "gap": gap,
                "gap_at_best": gap_at_best,
                "runs_since_best": float(runs),
            },
            hint="regularize (weight decay, dropout, data augmentation), get more data or a smaller model, and "
            "use early stopping (EarlyStopping(monitor=...)) or keep the checkpoint of the best validation loss; if it "
            "rose from the first epochs, check that validation data are preprocessed like the training data",
            magnitude=gap / max(abs(gap_at_best), 1e-8) if gap > 0 else 1.0,
            dedupe_as=OVERFITTING,
        )


add_to_presets(LearningCurveMonitor, ("fast", "full"), order=60)
