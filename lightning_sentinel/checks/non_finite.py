"""NonFiniteGuard: NaN/Inf in the loss, the gradients, the weights, and the first module that made one."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._hooks import FiniteProbe, ModuleFailure, logging_silenced
from lightning_sentinel._stats import tensor_norms
from lightning_sentinel._validate import require_bool, require_number
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._optimizers import OptimizerView, optimizer_view, scaler_of
from lightning_sentinel.findings import Finding, SentinelWarning, Severity, finding_log

LOSS = "non-finite-loss"
GRADIENTS = "non-finite-gradients"
WEIGHTS = "non-finite-weights"
ACTIVATION = "non-finite-activation"

register(
    CheckSpec(
        LOSS,
        "NonFiniteGuard",
        Severity.ERROR,
        "the training loss is NaN or Inf",
        "every loss flagged on the device, read on check steps (0, 1, 2, 4, 8, then every 10th) and at train end",
    ),
    CheckSpec(
        GRADIENTS,
        "NonFiniteGuard",
        Severity.ERROR,
        "a gradient holds NaN/Inf after AMP unscaling (a GradScaler's occasional skipped step is not a fault)",
        "checked every 10 steps; under a GradScaler once its scale fell below 1",
    ),
    CheckSpec(
        WEIGHTS, "NonFiniteGuard", Severity.ERROR, "a parameter became NaN or Inf", "checked every 10 steps"
    ),
    CheckSpec(
        ACTIVATION,
        "NonFiniteGuard",
        Severity.ERROR,
        "a module's forward output is NaN/Inf while its input is finite (first module in execution order)",
        "localised once something non-finite is seen",
    ),
)

_LOSS_HINT = (
    "look for log/sqrt/division of values that can reach 0 or below, exp overflow, fp16 overflow (try bf16 or "
    "a lower learning rate), and NaN in the data; Trainer(detect_anomaly=True) traces the backward op"
)


_MAX_SEEN = 1 << 16  # backwards remembered between two checks (beyond: the first bad one is not named)


def _first_bad(seen: list[tuple[int, int]], finite_run: float) -> tuple[int, int] | None:
    """The (global step, batch index) of the first backward whose loss was non-finite, from the count of
    backwards before it (``None`` where that count does not index ``seen``)."""
    if not math.isfinite(finite_run):
        return None
    index = int(finite_run)
    return seen[index] if 0 <= index < len(seen) else None


def _first_evidence(loss: float, first: tuple[int, int] | None) -> dict[str, float]:
    if first is None:
        return {"loss": loss}
    return {"loss": loss, "first_step": float(first[0]), "batch_idx": float(first[1])}


class NonFiniteGuard(SentinelCallback):
    """Catches NaN/Inf in the loss, gradients and weights, and names the module that produced it.

    Cost: on a step where no check is due, one device op per micro-batch: the loss is added to a
    running sum on its own device (float64: finite losses cannot overflow it; NaN/Inf in any loss
    makes it non-finite), and nothing is read. On check steps (the suite's clock, or
    ``every_n_steps`` on its own: the first steps densely, then every n-th) the gradients (read in
    ``on_before_optimizer_step``, i.e. after AMP unscaling) and weights are reduced with fused norms
    and read back once, together with the running sum and that step's own loss. Forward hooks are
    attached only after something non-finite was seen.

    Localisation: when the loss of a check step itself is the first non-finite one (step 0 included:
    NaN in the data, an overflowing first forward), the weights are still finite, and the guard
    replays that batch through ``training_step`` under ``no_grad`` with forward hooks (single
    process, automatic optimization; the user's ``self.log`` calls are silenced, buffers and the RNG
    restored) and reports ``non-finite-activation`` for the first module, in execution order, whose
    output is non-finite while its input is finite. Otherwise hooks are armed for the next training
    batch. A NaN that first appears between two check steps is reported at the next one, as having
    appeared after the previous check step and by this one; by then an update has usually made the
    weights NaN, and the module cannot be named (``every_n_steps=1`` on a guard of its own localises
    every first NaN, at the price of one read per step).

    Under a GradScaler (``precision="16-mixed"``), non-finite gradients make the scaler skip the step
    and halve its scale; that is normal, so ``non-finite-gradients`` is reported only once the scale
    has fallen below ``scaler_min_scale`` (1.0 by default: from the default 65536 that takes 16
    skipped steps, and the gradients then overflow even unscaled).

    Each of its ids is reported once per run, for its first occurrence: after the first NaN,
    everything downstream is NaN too.

    Args:
        on_detect: ``"stop"`` (default: a non-finite run is worthless), ``"warn"`` or ``"raise"``.
        every_n_steps: the interval of its check steps after the dense start; an integer >= 1 (inside
            ``Sentinel``, the suite's clock replaces it).
        scaler_min_scale: under a GradScaler, non-finite gradients are reported once its scale is below
            this; a finite number > 0.
        localize: replay or hook the forward pass to name the module that produced the first NaN/Inf.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import NonFiniteGuard
        >>> trainer = pl.Trainer(callbacks=[NonFiniteGuard(on_detect="raise")], logger=False)
    """

    CHECKS = (LOSS, GRADIENTS, WEIGHTS, ACTIVATION)
    LOOKS_EARLY = True  # a NaN needs no patience: read on the clock's early check steps too

    def __init__(
        self,
        on_detect: OnDetect = "stop",
        every_n_steps: int = 10,
        scaler_min_scale: float = 1.0,
        localize: bool = True,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps)
        self.scaler_min_scale = require_number("scaler_min_scale", scaler_min_scale, above=0)
        self.localize = require_bool("localize", localize)
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._views: dict[int, OptimizerView] = {}
        # the running sum of every micro-batch's loss since the last check, on the loss's device: NaN/Inf
        # in any loss makes it non-finite (float64, so finite losses cannot overflow it)
        self._loss_sum: Tensor | None = None
        # backward passes since the last check whose running sum was still finite: the index of the first
        # non-finite loss among ``_seen`` once the sum has turned (on the device, never read between checks)
        self._finite_run: Tensor | None = None
        self._seen: list[tuple[int, int]] = []  # (global step, batch index) of each backward since the check
        self._loss_now: Tensor | None = None  # this check step's last micro-batch loss (a reference)
        self._previous_check = -1  # the global step of the previous check (-1: none yet)
        self._this_check = -1
        self._trainer_step = 0
        self._batch: Any = None
        self._batch_idx = 0
        self._probe: FiniteProbe | None = None
        self._armed = False
        self._localized = False
        # after an error of its own: only the loss is watched, with nothing that can fail on a dtype
        self._minimal = False

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "localize": self.localize}

    @override
    def _report(self, trainer: pl.Trainer, check: str, *args: Any, **kwargs: Any) -> Finding | None:
        """Each id at most once per run: after the first NaN, everything downstream is NaN too."""
        if any(reported == check for reported, _ in self._reported):
            return None
        return super()._report(trainer, check, *args, **kwargs)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_run_state()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch  # a reference only, for a possible replay
        self._batch_idx = batch_idx
        if self._armed and not self._localized and not self._minimal:
            self._probe = FiniteProbe(pl_module)
            self._probe.attach()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if LOSS not in self.active_checks and ACTIVATION not in self.active_checks:
            return
        if self._loss_sum is None:
            dtype = torch.float32 if loss.device.type == "mps" else torch.float64
            self._loss_sum = torch.zeros((), dtype=dtype, device=loss.device)
            self._finite_run = torch.zeros((), dtype=dtype, device=loss.device)
        # the only work on a step where no check is due: four constant-size device ops, no read (abs < inf
        # is False for NaN and Inf alike; torch.isfinite dispatches four ops on its own)
        with torch.no_grad():
            self._loss_sum.add_(loss if loss.numel() == 1 else loss.sum())
            self._finite_run.add_(self._loss_sum.abs() < math.inf)  # type: ignore[union-attr]
        if len(self._seen) < _MAX_SEEN:  # host work only; a check step empties it
            self._seen.append((int(trainer.global_step), int(self._batch_idx)))
        if not self._minimal and self._due(trainer):
            self._loss_now = loss.detach()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.remove()
            self._armed = False  # one hooked step; a later non-finite check arms it again
            self._report_localization(trainer, probe.first_failure())
        self._batch = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the backwards after the last check step are read once more: a NaN in the last steps of a run
        # is reported, not lost with the running sum
        if self._seen and LOSS in self.active_checks:
            self._trainer_step = int(trainer.global_step)
            self._read_loss_minimally(trainer)
        super().on_train_end(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._due(trainer):
            return
        self._trainer_step = int(trainer.global_step)
        if self._minimal:
            self._read_loss_minimally(trainer)
            return
        view = self._views.get(id(optimizer))
        if view is None:
            view = self._views[id(optimizer)] = optimizer_view(trainer, pl_module, optimizer)
        self._run_non_finite_check(trainer, pl_module, view)

    # ------------------------------------------------------------------ the minimal path
    @override
    def _disable_after_error(self, trainer: pl.Trainer | None, hook: str, error: Exception) -> None:
        """The last line of defence does not switch itself off: it falls back to the minimal path.

        After an error in its own code (an odd dtype, an unforeseen model), the guard goes on adding
        each micro-batch's loss to its running sum and reading that one number on check steps, and
        still stops or raises when it turns non-finite. Gradients, weights and localisation are no longer
        watched, and the report says so. Only if that path fails too does the guard switch off.
        """
        if self._minimal or LOSS not in self.active_checks:
            super()._disable_after_error(trainer, hook, error)
            return
        self._minimal = True
        self._release(trainer)  # type: ignore[arg-type]  (it only removes hooks)
        lost = [check for check in self.active_checks if check != LOSS]
        reason = f"NonFiniteGuard failed in `{hook}` ({type(error).__name__}: {error})"
        if trainer is not None:
            finding_log(trainer).stop_watching(lost, f"{reason}; non-finite-loss is still watched")
        warnings.warn(
            SentinelWarning(
                f"{reason}; it goes on watching the training loss for NaN/Inf (non-finite-loss) on a minimal "
                f"path, and these checks are no longer watched: {', '.join(lost) or 'none'}. Please report "
                "this with the traceback."
            ),
            stacklevel=3,
        )

    def _read_loss_minimally(self, trainer: pl.Trainer) -> None:
        state, seen = self._take_loss_state()
        self._read(
            trainer,
            torch.stack([part.to(torch.float64) for part in state[:2]]),
            lambda values: self._judge_loss_minimally(trainer, values, seen),
        )

    def _judge_loss_minimally(
        self, trainer: pl.Trainer, values: list[float], seen: list[tuple[int, int]]
    ) -> None:
        if not math.isfinite(values[0]):
            first = _first_bad(seen, values[1])
            self._report(
                trainer,
                LOSS,
                Severity.ERROR,
                f"training loss became non-finite {self._since_last_check(trainer, first)}",
                where=None if first is None else f"batch {first[1]}",
                evidence=_first_evidence(float("nan"), first),
                hint=_LOSS_HINT,
            )
        self._settle(trainer)

    def _since_last_check(self, trainer: pl.Trainer, first: tuple[int, int] | None) -> str:
        """``"at step 5 (batch 5), read at the check of step 8"``, or ``"after step 4, by step 8"`` where the
        first non-finite batch is not known: where a NaN that appeared between two check steps lies."""
        if first is not None:
            return f"at step {first[0]} (batch {first[1]}), read at the check of step {trainer.global_step}"
        if self._previous_check < 0:
            return f"by step {trainer.global_step}"
        return f"after step {self._previous_check}, by step {trainer.global_step}"

    def _take_loss_state(self) -> tuple[tuple[Tensor, Tensor, Tensor], list[tuple[int, int]]]:
        """((sum since the last check, backwards before it turned non-finite, this step's loss), the steps
        and batches of those backwards); the running state starts afresh. Check steps only."""
        self._previous_check, self._this_check = self._this_check, self._trainer_step
        zero = torch.zeros((), dtype=torch.float64)
        loss_sum = self._loss_sum if self._loss_sum is not None else zero
        run = self._finite_run if self._finite_run is not None else torch.zeros_like(loss_sum)
        now = self._loss_now if self._loss_now is not None else torch.zeros_like(loss_sum)
        state = (loss_sum.clone(), run.clone(), now)
        if self._loss_sum is not None and self._finite_run is not None:
            self._loss_sum.zero_()
            self._finite_run.zero_()
        seen, self._seen = self._seen, []
        self._loss_now = None
        return state, seen

    @override
    def _release(self, trainer: pl.Trainer) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        self._batch = None

    # ------------------------------------------------------------------ the check
    def _run_non_finite_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, view: OptimizerView
    ) -> None:
        """On a check step: the loss since the last check, this step's own loss, and the norms of the
        weights and gradients, in one read. A NaN of the check step itself is replayed and localised."""
        parameters = view.parameters
        with_grad = [i for i, p in enumerate(parameters) if p.grad is not None]
        weight_norms = tensor_norms(parameters)
        grad_norms = tensor_norms([parameters[i].grad for i in with_grad], device=weight_norms.device)  # type: ignore[misc]
        device = weight_norms.device
        state, seen = self._take_loss_state()
        loss_state = torch.stack([part.to(device=device, dtype=torch.float32) for part in state])
        packed = torch.cat([loss_state, weight_norms, grad_norms])
        self._read(
            trainer,
            packed,
            lambda values: self._judge_non_finite(trainer, pl_module, view, with_grad, values, seen),
        )

    def _judge_non_finite(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        view: OptimizerView,
        with_grad: list[int],
        values: list[float],
        seen: list[tuple[int, int]],
    ) -> None:
        parameters = view.parameters
        loss_sum, finite_run, loss_now = values[0], values[1], values[2]
        loss_bad = not math.isfinite(loss_sum)
        first = _first_bad(seen, finite_run) if loss_bad else None
        # an earlier batch since the last check went non-finite (not the check step's own)
        bad_before_now = loss_bad and (first is None or finite_run < len(seen) - 1)
        loss_bad_now: float | None = loss_now if not math.isfinite(loss_now) else None
        weights = values[3 : 3 + len(parameters)]
        grads = values[3 + len(parameters) :]
        bad_weights = [view.names[i] for i, norm in enumerate(weights) if not math.isfinite(norm)]
        bad_grads = [view.names[with_grad[k]] for k, norm in enumerate(grads) if not math.isfinite(norm)]

        if loss_bad:
            value = loss_bad_now if loss_bad_now is not None else float("nan")
            first_now = loss_bad_now is not None and not bad_before_now
            now = f"loss is {value:g} at step {trainer.global_step} (batch {self._batch_idx})"
            since_check = f"training loss became non-finite {self._since_last_check(trainer, first)}"
            if first_now:
                message = f"training {now}"
                first = (int(trainer.global_step), int(self._batch_idx))
            else:
                message = f"{since_check}; {now}" if loss_bad_now is not None else since_check
            self._report(
                trainer,
                LOSS,
                Severity.ERROR,
                message,
                where=None if first is None else f"batch {first[1]}",
                evidence=_first_evidence(value, first),
                hint=_LOSS_HINT,
            )
        if bad_weights:
            self._report(
                trainer,
                WEIGHTS,
                Severity.ERROR,
                f"{len(bad_weights)} of {len(parameters)} parameters hold NaN/Inf, first '{bad_weights[0]}'",
                where=bad_weights[0],
                evidence={"non_finite_parameters": float(len(bad_weights))},
                hint="an earlier update was non-finite: find the first non-finite loss or gradient; lower the learning "
                "rate, clip gradients, and check optimizer eps (eps=0 divides by zero)",
            )
        grads_reported = False
        if bad_grads and not loss_bad and not bad_weights:
            grads_reported = self._report_gradients(trainer, bad_grads, len(with_grad))
        localizable = (
            (loss_bad or grads_reported) and not bad_weights and self.localize and not self._localized
        )
        if localizable and not (loss_bad_now is not None and self._replay(trainer, pl_module)):
            self._armed = True
        self._settle(trainer)

    def _report_gradients(self, trainer: pl.Trainer, bad_grads: list[str], n_grads: int) -> bool:
        scaler = scaler_of(trainer)
        scale = float("nan")
        if scaler is not None:
            scale = float(scaler.get_scale())  # type: ignore[attr-defined]  (a sync, on this failure path only)
            if scale >= self.scaler_min_scale:
                return False  # the GradScaler skips this step and halves its scale: normal in fp16
        self._report(
            trainer,
            GRADIENTS,
            Severity.ERROR,
            f"{len(bad_grads)} of {n_grads} gradients hold NaN/Inf while the loss is finite, first '{bad_grads[0]}'",
            where=bad_grads[0],
            evidence={"non_finite_gradients": float(len(bad_grads)), "grad_scale": scale},
            hint="an operation with an infinite derivative at the current value (sqrt or norm at 0, pow with a "
            "negative base, acos at 1); add an epsilon, e.g. torch.sqrt(x + 1e-12); Trainer(detect_anomaly=True) "
            "names the backward op",
        )
        return True

    def _replay(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Re-run this step's ``training_step`` under ``no_grad`` with hooks, leaving no trace on the run.

        Returns whether the replay localised the non-finite value (and reported it).
        """
        if self._batch is None or trainer.world_size > 1 or not pl_module.automatic_optimization:
            return False
        buffers = {name: buffer.detach().clone() for name, buffer in pl_module.named_buffers()}
        probe = FiniteProbe(pl_module)
        try:
            with logging_silenced(pl_module), torch.random.fork_rng(devices=[]), torch.no_grad(), probe:
                output = pl_module.training_step(self._batch, self._batch_idx)
        finally:
            with torch.no_grad():
                for name, buffer in pl_module.named_buffers():
                    if name in buffers:
                        buffer.copy_(buffers[name])
        failure = probe.first_failure()
        if failure is not None:
            self._report_localization(trainer, failure)
            return True
        loss = output.get("loss") if isinstance(output, dict) else output
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss).all()) and probe.first_input_finite:
            # every module's output was finite: the NaN/Inf comes from training_step's own code
            self._localized = True
            self._report(
                trainer,
                ACTIVATION,
                Severity.ERROR,
                "every module output is finite, yet training_step returns a non-finite loss: the NaN/Inf arises "
                "in training_step's own code (the loss computation or an op outside any module)",
                where=f"{type(pl_module).__name__}.training_step",
                evidence={},
                hint="check the operations between the model output and the loss: log of a non-positive value, "
                "division by zero, log of softmax instead of log_softmax",
            )
            return True
        return False

    def _report_localization(self, trainer: pl.Trainer, failure: ModuleFailure | None) -> None:
        if failure is None:
            return
        self._localized = True
        self._armed = False
        if not failure.parameters_finite:
            where = failure.first_bad_parameter or failure.module
            self._report(
                trainer,
                WEIGHTS,
                Severity.ERROR,
                f"module '{failure.module}' ({failure.module_type}) outputs NaN/Inf because its parameter '{where}' "
                "is non-finite",
                where=where,
                evidence={},
                hint="an earlier update was non-finite: lower the learning rate or clip gradients",
            )
            return
        self._report(
            trainer,
            ACTIVATION,
            Severity.ERROR,
            f"module '{failure.module}' ({failure.module_type}) is the first, in execution order, to output "
            "NaN/Inf from finite inputs",
            where=failure.module,
            evidence={},
            hint="inspect that module's forward: log/sqrt/pow/division/exp on values that reach 0, negatives or "
            "large magnitudes; clamp or add an epsilon",
        )


add_to_presets(NonFiniteGuard, ("fast", "full"), order=0)
