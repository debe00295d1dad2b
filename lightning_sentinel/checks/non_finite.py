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
from lightning_sentinel._stats import on_host, tensor_norms
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
        "every step (on an accelerator: flagged on device, read every 10 steps)",
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


class NonFiniteGuard(SentinelCallback):
    """Catches NaN/Inf in the loss, gradients and weights, and names the module that produced it.

    Cost: each micro-batch the loss is tested with one tiny device op. A loss on the CPU is read at
    once (no device to sync with); a loss on an accelerator is folded into a device flag and read on
    check steps only. Every ``every_n_steps``-th optimizer step, the gradients (read in
    ``on_before_optimizer_step``, i.e. after AMP unscaling) and weights are reduced with fused
    norms and read back once. Forward hooks are attached only after something non-finite was seen.

    Localisation: when the loss turns non-finite on a step where the weights are still finite (the
    usual first NaN), the guard replays that batch through ``training_step`` under ``no_grad`` with
    forward hooks (single process, automatic optimization; the user's ``self.log`` calls are
    silenced, buffers and the RNG restored) and reports ``non-finite-activation`` for the first
    module, in execution order, whose output is non-finite while its input is finite. Otherwise
    hooks are armed for the next training batch. On an accelerator the loss of a check step is read
    with its norms, so a NaN that appears on a check step (step 0 included: NaN in the data, an
    overflowing first forward) is localised the same way; one that appears between check steps is
    reported at the next one, where an SGD update has usually made the weights NaN already
    (``every_n_steps=1`` localises every first NaN there too, at the price of one sync per step).

    Under a GradScaler (``precision="16-mixed"``), non-finite gradients make the scaler skip the step
    and halve its scale; that is normal, so ``non-finite-gradients`` is reported only once the scale
    has fallen below ``scaler_min_scale`` (1.0 by default: from the default 65536 that takes 16
    skipped steps, and the gradients then overflow even unscaled).

    Each of its ids is reported once per run, for its first occurrence: after the first NaN,
    everything downstream is NaN too.

    Args:
        on_detect: ``"stop"`` (default: a non-finite run is worthless), ``"warn"`` or ``"raise"``.
        every_n_steps: check gradients and weights every n-th optimizer step; an integer >= 1.
        scaler_min_scale: under a GradScaler, non-finite gradients are reported once its scale is below
            this; a finite number > 0.
        localize: replay or hook the forward pass to name the module that produced the first NaN/Inf.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import NonFiniteGuard
        >>> trainer = pl.Trainer(callbacks=[NonFiniteGuard(on_detect="raise")], logger=False)
    """

    CHECKS = (LOSS, GRADIENTS, WEIGHTS, ACTIVATION)

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
        self._steps_seen = 0
        self._loss_flag: Tensor | None = None  # accumulated on an accelerator until a check reads it
        self._loss_bad_now: float | None = None  # a CPU loss found non-finite on this optimizer step
        self._loss_now: Tensor | None = None  # an accelerator loss of this step, read only if a check is due
        self._loss_flag_earlier: Tensor | None = None  # the flag before that loss was folded in
        self._batch: Any = None
        self._batch_idx = 0
        self._probe: FiniteProbe | None = None
        self._armed = False
        self._localized = False
        # after an error of its own: only the loss is watched, with nothing that can fail on a dtype
        self._minimal = False
        self._minimal_flag: Tensor | None = None

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
        if self._minimal:
            self._fold_loss_minimally(trainer, loss)
            return
        detached = loss.detach()
        if on_host(detached):  # a host read of a CPU tensor: no device to sync with
            value = detached.item() if detached.numel() == 1 else float(detached.float().sum())
            if not math.isfinite(value) and self._loss_bad_now is None:
                self._loss_bad_now = value
            return
        bad = ~torch.isfinite(detached).all()  # stays on the accelerator until a check step reads it
        self._loss_flag_earlier = self._loss_flag
        self._loss_flag = bad if self._loss_flag is None else (self._loss_flag | bad)
        self._loss_now = detached

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
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._minimal:
            self._read_loss_minimally(trainer)
            return
        view = self._views.get(id(optimizer))
        if view is None:
            view = self._views[id(optimizer)] = optimizer_view(trainer, pl_module, optimizer)
        step_index = self._steps_seen
        self._steps_seen += 1
        loss_bad_now, self._loss_bad_now = self._loss_bad_now, None
        loss_now, self._loss_now = self._loss_now, None
        due = self._is_due(step_index)
        if loss_bad_now is None and not due:
            return
        self._run_non_finite_check(trainer, pl_module, optimizer, view, loss_bad_now, loss_now)
        if due or trainer.world_size == 1:  # the stop/raise collective runs only on steps every rank checks
            self._settle(trainer)

    # ------------------------------------------------------------------ the minimal path
    @override
    def _disable_after_error(self, trainer: pl.Trainer | None, hook: str, error: Exception) -> None:
        """The last line of defence does not switch itself off: it falls back to the minimal path.

        After an error in its own code (an odd dtype, an unforeseen model), the guard goes on testing
        the training loss for NaN/Inf with one ``torch.isfinite`` per micro-batch (read at once on a
        CPU, folded into a device flag and read every ``every_n_steps`` steps on an accelerator) and
        still stops or raises as configured. Gradients, weights and localisation are no longer
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

    def _fold_loss_minimally(self, trainer: pl.Trainer, loss: Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        if on_host(bad):
            if bool(bad) and self._loss_bad_now is None:
                self._loss_bad_now = float("nan")
            return
        self._minimal_flag = bad if self._minimal_flag is None else (self._minimal_flag | bad)

    def _read_loss_minimally(self, trainer: pl.Trainer) -> None:
        step_index = self._steps_seen
        self._steps_seen += 1
        bad_now, self._loss_bad_now = self._loss_bad_now is not None, None
        due = self._is_due(step_index)
        if not bad_now and not due:
            return
        flag, self._minimal_flag = self._minimal_flag, None
        if bad_now or (flag is not None and bool(flag)):  # bool(): the read of a check step
            self._report(
                trainer,
                LOSS,
                Severity.ERROR,
                f"training loss is NaN/Inf at step {trainer.global_step} (batch {self._batch_idx})"
                if bad_now
                else f"training loss became non-finite in the {self.every_n_steps} steps before step "
                f"{trainer.global_step}",
                where=f"batch {self._batch_idx}" if bad_now else None,
                evidence={"loss": float("nan"), "batch_idx": float(self._batch_idx)},
                hint=_LOSS_HINT,
            )
        if due or trainer.world_size == 1:
            self._settle(trainer)

    @override
    def _release(self, trainer: pl.Trainer) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        self._batch = None

    # ------------------------------------------------------------------ the check
    def _run_non_finite_check(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        view: OptimizerView,
        loss_bad_now: float | None,
        loss_now: Tensor | None,
    ) -> None:
        """``loss_bad_now``: this step's CPU loss, already read and non-finite. ``loss_now``: this step's
        accelerator loss, read with the norms so that a NaN of the check step itself is localised as on a CPU."""
        parameters = view.parameters
        with_grad = [i for i, p in enumerate(parameters) if p.grad is not None]
        weight_norms = tensor_norms(parameters)
        grad_norms = tensor_norms([parameters[i].grad for i in with_grad], device=weight_norms.device)  # type: ignore[misc]
        device = weight_norms.device
        # (all since the last check, all but this step's last micro-batch, that micro-batch's loss), on device
        loss_state = torch.zeros(3, dtype=torch.float32, device=device)
        if self._loss_flag is not None:
            loss_state[0] = self._loss_flag.to(device)
        if self._loss_flag_earlier is not None:
            loss_state[1] = self._loss_flag_earlier.to(device)
        if loss_now is not None:
            loss_state[2] = loss_now.float().sum().to(device)
        self._loss_flag = self._loss_flag_earlier = None
        # the one host read of this check
        values = torch.cat([loss_state, weight_norms, grad_norms]).tolist()
        bad_before_now = values[1] > 0  # an earlier micro-batch since the last check had a non-finite loss
        if loss_bad_now is None and not math.isfinite(values[2]):
            loss_bad_now = values[2]  # the check step's own loss: its batch is still here to replay
        loss_bad = loss_bad_now is not None or values[0] > 0
        weights = values[3 : 3 + len(parameters)]
        grads = values[3 + len(parameters) :]
        bad_weights = [view.names[i] for i, norm in enumerate(weights) if not math.isfinite(norm)]
        bad_grads = [view.names[with_grad[k]] for k, norm in enumerate(grads) if not math.isfinite(norm)]

        if loss_bad:
            value = loss_bad_now if loss_bad_now is not None else float("nan")
            first_now = loss_bad_now is not None and not bad_before_now
            now = f"loss is {value:g} at step {trainer.global_step} (batch {self._batch_idx})"
            since_check = f"training loss became non-finite in the {self.every_n_steps} steps before step {trainer.global_step}"
            if first_now:
                message = f"training {now}"
            else:
                message = f"{since_check}; {now}" if loss_bad_now is not None else since_check
            self._report(
                trainer,
                LOSS,
                Severity.ERROR,
                message,
                where=f"batch {self._batch_idx}" if first_now else None,
                evidence={"loss": value, "batch_idx": float(self._batch_idx)},
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
        if (loss_bad or grads_reported) and not bad_weights and self.localize and not self._localized:
            if loss_bad_now is not None and self._replay(trainer, pl_module):
                return
            self._armed = True

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
