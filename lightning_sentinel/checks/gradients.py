"""GradientNormMonitor: total and per-layer gradient norms; exploding and vanishing gradients.

Norms are read in ``on_before_optimizer_step``: once per optimizer step (after gradient
accumulation), after AMP unscaling, and *before* gradient clipping (the logged norms are pre-clip).
Under a sharding strategy (FSDP, DeepSpeed, model parallel) ``p.grad`` is this rank's shard: every
rank sums its shards' squared norms into the global norms (one all-reduce per check, and per step
while the peak is tracked), so the verdicts are those of the whole model.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._stats import (
    LayerGrouping,
    global_norms,
    median,
    shard_norms,
    shards_gradients,
    tensor_norms,
)
from lightning_sentinel._validate import require_bool, require_int, require_number, require_order
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._optimizers import OptimizerView, gradient_scale, optimizer_view
from lightning_sentinel.findings import Severity

EXPLODING = "exploding-gradients"
VANISHING = "vanishing-gradients"

register(
    CheckSpec(
        EXPLODING,
        "GradientNormMonitor",
        Severity.WARNING,
        "total (unscaled, pre-clip) gradient norm jumps far above its running median, or passes an absolute bound",
        "norm > 10x the median of the last 20 checks (after 5) and, once 20 checks exist, > 10x the median of "
        "the first 20 (the gradients while it learned); or norm > 1e4",
    ),
    CheckSpec(
        VANISHING,
        "GradientNormMonitor",
        Severity.WARNING,
        "a layer's gradients are ~0 relative to its weights, or the first layer's are ~0 relative to the last's, "
        "while the loss has not converged",
        "grad/weight norm ratio < 1e-7, or first/last layer ratio < 1e-5, on 3 checks in a row",
    ),
)


# ---------------------------------------------------------------------- pure rules
def exploding_verdict(
    norm: float,
    history: list[float],
    spike_factor: float,
    max_norm: float,
    min_history: int,
    early_reference: float | None = None,
) -> tuple[bool, str, float]:
    """Whether a total gradient norm is exploding, given the norms of earlier checks.

    A spike must be ``spike_factor`` times the running median of ``history`` and, once the run is past
    its first checks, ``spike_factor`` times ``early_reference`` too: the median norm of the first checks,
    while the model was still learning. Late in a run whose loss has neared 0 most batches give tiny
    gradients, and an ordinary batch holding one hard sample is many times the running median; it is
    not an explosion unless it is also far above the gradients the model had while it learned. Returns
    ``(exploding, reason, reference)``: the reference is the larger of the two medians (or the absolute
    bound) the norm was compared with.

    Example:
        >>> exploding_verdict(50.0, [1.0, 1.2, 0.9, 1.1, 1.0], 10.0, 1e4, 5)[0]
        True
        >>> exploding_verdict(2.0, [1.0, 1.2, 0.9, 1.1, 1.0], 10.0, 1e4, 5)[0]
        False
        >>> converged = [0.05, 0.06, 0.05, 0.07, 0.06]  # late in a run: the loss is near 0
        >>> exploding_verdict(1.6, converged, 10.0, 1e4, 5, early_reference=0.8)[0]  # one hard batch
        False
        >>> exploding_verdict(40.0, converged, 10.0, 1e4, 5, early_reference=0.8)[:2]  # a real explosion
        (True, '50x the early median 0.8')
    """
    if not math.isfinite(norm):
        return False, "", float("nan")
    if norm > max_norm:
        return True, f"above the absolute bound {max_norm:g}", max_norm
    running = median(history)
    early = early_reference if early_reference is not None and math.isfinite(early_reference) else 0.0
    reference = max(running, early) if math.isfinite(running) else running
    if (
        len(history) >= min_history
        and math.isfinite(reference)
        and reference > 0
        and norm > spike_factor * reference
    ):
        which = "the early median" if early > running else "the running median"
        return True, f"{norm / reference:.0f}x {which} {reference:.3g}", reference
    return False, "", reference


def vanishing_layers(grad_norms: list[float], weight_norms: list[float], ratio_threshold: float) -> list[int]:
    """Indices of layers whose gradient/weight norm ratio is below ``ratio_threshold``.

    Layers with zero weight norm (e.g. zero-initialised biases alone) are skipped, and so are
    gradients that are exactly zero: those come from dead units or a branch cut off the graph, not
    from a gradient shrinking through depth (other checks own them).

    Example:
        >>> vanishing_layers([1e-3, 1e-12, 0.0], [1.0, 1.0, 1.0], 1e-7)
        [1]
    """
    return [
        index
        for index, (grad, weight) in enumerate(zip(grad_norms, weight_norms, strict=True))
        if weight > 0 and math.isfinite(grad) and 0 < grad / weight < ratio_threshold
    ]


def depth_ratio(grad_norms: list[float], weight_norms: list[float], weight_layers: list[int]) -> float:
    """Relative gradient size of the first weight layer over the last one (NaN if undefined).

    Example:
        >>> depth_ratio([1e-9, 1.0, 1.0], [1.0, 1.0, 1.0], [0, 2])
        1e-09
    """
    if len(weight_layers) < 2:
        return float("nan")
    first, last = weight_layers[0], weight_layers[-1]
    if weight_norms[first] <= 0 or weight_norms[last] <= 0 or grad_norms[last] <= 0 or grad_norms[first] <= 0:
        return float("nan")  # an exactly-zero gradient is a dead or cut-off layer, not a vanishing one
    return (grad_norms[first] / weight_norms[first]) / (grad_norms[last] / weight_norms[last])


@dataclass
class _OptimizerState:
    view: OptimizerView
    steps_seen: int = 0
    history: deque[float] = field(default_factory=deque)
    vanishing_streak: dict[str, int] = field(default_factory=dict)
    depth_streak: int = 0
    peak: Tensor | None = None  # largest finite total norm of the steps since the last check (device)
    peak_parameters: Tensor | None = None  # per-parameter largest finite norms since the last check (device)
    early_reference: float | None = None  # median of the first `window` checks, frozen once they exist
    exploded: bool = False  # after an explosion, grad/weight ratios say nothing about vanishing
    grouping: LayerGrouping | None = None  # rebuilt only when the set of parameters with gradients changes
    pending_norms: list[Tensor] = field(default_factory=list)  # per-step norms not yet folded into the peaks


# steps of per-parameter norms kept on the device before they are folded into the peaks
_FOLD_AFTER = 16


def _fold_peaks(state: _OptimizerState) -> None:
    """Fold the kept per-step norms into ``state.peak`` (total norm) and ``state.peak_parameters`` (device ops).

    Non-finite norms count as 0: NaN/Inf gradients are NonFiniteGuard's business.
    """
    if not state.pending_norms:
        return
    stacked = torch.stack(state.pending_norms)
    state.pending_norms = []
    total = torch.nan_to_num(torch.linalg.vector_norm(stacked, dim=1), nan=0.0, posinf=0.0).amax()
    norms = torch.nan_to_num(stacked, nan=0.0, posinf=0.0).amax(dim=0)
    if state.peak is None or state.peak_parameters is None or state.peak_parameters.shape != norms.shape:
        state.peak, state.peak_parameters = total, norms
    else:
        state.peak = torch.maximum(state.peak, total)
        state.peak_parameters = torch.maximum(state.peak_parameters, norms)


class GradientNormMonitor(SentinelCallback):
    """Logs gradient norms and reports ``exploding-gradients`` and ``vanishing-gradients``.

    On every ``every_n_steps``-th optimizer step it computes, on the device with fused kernels, the
    2-norm of each parameter's gradient and weight, combines them per layer (the module owning the
    parameters) and in total, and reads them back once. Norms are unscaled (after AMP's
    ``unscale_``; gradients a fused optimizer still holds scaled are divided by the scale) and
    **pre-clip**. With several optimizers (or manual optimization) each optimizer is tracked apart.

    Rules (calibrated on the healthy zoo of ``benchmarks/detection``):

    - ``exploding-gradients``: total norm > ``spike_factor`` x the median of the last ``window``
      checks (once ``min_history`` checks exist) and, once ``window`` checks exist, also
      > ``spike_factor`` x the median of the first ``window`` checks (frozen then, checkpointed), or
      > ``max_norm``. ``where`` is the layer with the largest gradient norm. The early median gives
      the rule a sense of scale: once the loss nears 0 most batches give tiny gradients and an
      ordinary batch with one hard sample is many times the running median, yet no larger than the
      gradients the model had while it learned; a real explosion late in a run is far above both.
    - ``vanishing-gradients``: a layer's grad/weight norm ratio < ``vanishing_ratio``, or the first
      weight layer's ratio < ``depth_ratio_threshold`` x the last one's, on ``patience`` checks in a
      row, while the loss is above ``converged_fraction`` of its first value.

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the largest healthy
    spike was 7.7x the running median (``lstm-sequences``; threshold 10x, margin 1.3x), the largest
    total norm 45 (bound 1e4, 223x). The 3000-step runs of ``cases_long.py`` spike far above their
    running median once converged (the digits MLP with AdamW: 26x at a constant lr, 13x under cosine;
    a pre-LN Transformer 19x) but at most 4.0x their early median (pre-LN Transformer; the short zoo
    4.6x, ``noisy-batch8-sgd-long``: margin 2.2x), while the digits MLP whose lr jumps x100 at step
    2000 reaches 107x its early median (``warmup-without-cap``, the mildest fault judged after the
    early median exists, 11.7x). The smallest layer grad/weight ratio 2.2e-4 (threshold 1e-7,
    2150x), the smallest first/last-layer ratio 7.8e-4 (``mlp-zero-init-head``; threshold 1e-5, 78x).

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        every_n_steps: check every n-th optimizer step (one host read per check); an integer >= 1.
        warmup_steps: optimizer steps to skip before the first check; an integer >= 0.
        spike_factor: how far above its running median the total norm may go; a finite number > 1.
        max_norm: absolute bound on the total gradient norm; a finite number > 0.
        window: number of earlier checks in the running median; an integer >= 1.
        min_history: checks needed before the spike rule applies; an integer in [1, ``window``].
        vanishing_ratio: per-layer grad/weight ratio below which a layer's gradient has vanished; > 0.
        depth_ratio_threshold: first-layer/last-layer relative gradient ratio below which gradients
            vanish with depth; > 0.
        patience: consecutive checks a vanishing condition must hold; an integer >= 1.
        converged_fraction: no vanishing finding once the loss is below this fraction of its first
            value; a number in (0, 1].
        log_per_layer: also log each layer's gradient norm (off by default: no per-layer clutter).
        track_peak: on the steps between checks, keep the gradient norms on the device (one fused norm
            per step, no host read) and fold them into peaks at the next check, so a one-step spike
            between checks is judged there. Off by default: it is work on every step, where the suite's
            rule is that steps between check steps touch no tensor (a spike that lasts is judged at the
            next check step anyway).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import GradientNormMonitor
        >>> monitor = GradientNormMonitor(every_n_steps=5, spike_factor=20.0)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
    """

    CHECKS = (EXPLODING, VANISHING)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 5,
        warmup_steps: int = 0,
        spike_factor: float = 10.0,
        max_norm: float = 1e4,
        window: int = 20,
        min_history: int = 5,
        vanishing_ratio: float = 1e-7,
        depth_ratio_threshold: float = 1e-5,
        patience: int = 3,
        converged_fraction: float = 0.05,
        log_per_layer: bool = False,
        track_peak: bool = False,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        self.spike_factor = require_number("spike_factor", spike_factor, above=1)
        self.max_norm = require_number("max_norm", max_norm, above=0)
        self.window = require_int("window", window)
        self.min_history = require_int("min_history", min_history)
        require_order("min_history", self.min_history, "window", self.window, or_equal=True)
        self.vanishing_ratio = require_number("vanishing_ratio", vanishing_ratio, above=0)
        self.depth_ratio_threshold = require_number("depth_ratio_threshold", depth_ratio_threshold, above=0)
        self.patience = require_int("patience", patience)
        self.converged_fraction = require_number("converged_fraction", converged_fraction, above=0, at_most=1)
        self.log_per_layer = require_bool("log_per_layer", log_per_layer)
        self.track_peak = require_bool("track_peak", track_peak)
        self._optimizers: dict[int, _OptimizerState] = {}
        self._saved_history: dict[str, list[float]] = {}
        self._saved_early: dict[str, float] = {}
        self._first_loss: Tensor | None = None
        self._latest_loss: Tensor | None = None

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {
            **super()._state_key_settings(),
            "spike_factor": self.spike_factor,
            "max_norm": self.max_norm,
            "vanishing_ratio": self.vanishing_ratio,
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        history = {state.view.key: list(state.history) for state in self._optimizers.values()}
        early = {
            state.view.key: state.early_reference
            for state in self._optimizers.values()
            if state.early_reference is not None
        }
        return {"history": history or self._saved_history, "early_reference": early or self._saved_early}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._saved_history = {
            key: [float(v) for v in values] for key, values in state.get("history", {}).items()
        }
        self._saved_early = {key: float(value) for key, value in state.get("early_reference", {}).items()}

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizers = {}
        self._first_loss = None
        self._latest_loss = None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._first_loss is None:
            self._first_loss = loss.detach()
        if self._due(trainer):  # the loss of a check step (steps between checks touch nothing)
            self._latest_loss = loss.detach()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        state = self._optimizers.get(id(optimizer))
        if state is None:
            view = optimizer_view(trainer, pl_module, optimizer)
            state = _OptimizerState(
                view=view,
                history=deque(self._saved_history.get(view.key, []), maxlen=self.window),
                early_reference=self._saved_early.get(view.key),
            )
            self._optimizers[id(optimizer)] = state
        step_index = state.steps_seen
        state.steps_seen += 1
        if not self.active_checks:
            return
        if self._due(trainer):
            self._run_gradient_check(trainer, pl_module, optimizer, state)
            self._settle(trainer)
        elif self.track_peak and EXPLODING in self.active_checks and step_index >= self.warmup_steps:
            self._track_peak(trainer, optimizer, state)

    def _track_peak(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, state: _OptimizerState
    ) -> None:
        """Keep this step's per-parameter norms for the next check (one fused norm, no host read).

        The reduction to peaks waits for the check step (or for ``_FOLD_AFTER`` kept steps), so a step
        between checks costs one fused norm and a list append. Under FSDP/DeepSpeed every rank joins
        and the norms are global.
        """
        if shards_gradients(trainer.strategy):
            norms = global_norms(
                shard_norms([p.grad for p in state.view.parameters], trainer.strategy.root_device)
            )
        else:
            grads = [p.grad for p in state.view.parameters if p.grad is not None]
            if not grads:
                return
            norms = tensor_norms(grads)
        scale = gradient_scale(trainer, optimizer)
        if scale is not None:
            norms = norms / scale.to(norms.device, torch.float32)
        pending = state.pending_norms
        if pending and pending[-1].shape != norms.shape:  # other parameters have gradients now: start over
            pending.clear()
            state.peak, state.peak_parameters = None, None
        pending.append(norms)
        if len(pending) >= _FOLD_AFTER:
            _fold_peaks(state)

    # ------------------------------------------------------------------ the check
    def _run_gradient_check(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        state: _OptimizerState,
    ) -> None:
        # sharded (FSDP/DeepSpeed): p.grad is this rank's shard (or None); every rank reduces every
        # parameter's squared norm, in the same order, into the global norm
        sharded = shards_gradients(trainer.strategy)
        present = [
            (n, p)
            for n, p in zip(state.view.names, state.view.parameters, strict=True)
            if p.grad is not None or sharded
        ]
        if not present:
            return
        names = tuple(name for name, _ in present)
        if state.grouping is None or state.grouping.parameter_names != names:
            state.grouping = LayerGrouping.from_named_parameters(present)
        grouping = state.grouping
        if sharded:
            device = trainer.strategy.root_device
            grad_norms = global_norms(shard_norms([p.grad for _, p in present], device))
            weight_norms = global_norms(shard_norms([p for _, p in present], device))
        else:
            grad_norms = tensor_norms([p.grad for _, p in present])  # type: ignore[misc]
            weight_norms = tensor_norms([p for _, p in present], device=grad_norms.device)
        scale = gradient_scale(trainer, optimizer)
        if scale is not None:
            grad_norms = grad_norms / scale.to(grad_norms.device, torch.float32)
        layer_grad = grouping.layer_norms(grad_norms)
        layer_weight = grouping.layer_norms(weight_norms)
        total = grad_norms.square().sum().sqrt().view(1)
        losses = torch.full((2,), float("nan"), device=grad_norms.device)
        if self._first_loss is not None and self._latest_loss is not None:
            losses = torch.stack([self._first_loss, self._latest_loss]).float().to(grad_norms.device)
        _fold_peaks(state)
        peak = torch.zeros(1, device=total.device)
        layer_peak = torch.zeros_like(layer_grad)
        if state.peak is not None and state.peak_parameters is not None:
            peak = state.peak.view(1).to(total.device)
            if state.peak_parameters.shape == grad_norms.shape:  # the same parameters had gradients
                layer_peak = grouping.layer_norms(state.peak_parameters.to(total.device))
        state.peak, state.peak_parameters = None, None
        # the one host read of this check (batched with the suite's other reads of this hook)
        self._read(
            trainer,
            torch.cat([total, peak, losses, layer_grad, layer_weight, layer_peak]),
            lambda values: self._judge_gradients(trainer, pl_module, state, grouping, values),
        )

    def _judge_gradients(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        state: _OptimizerState,
        grouping: LayerGrouping,
        values: list[float],
    ) -> None:
        n_layers = len(grouping.layer_names)
        total_norm, peak_between, first_loss, latest_loss = values[0], values[1], values[2], values[3]
        layer_grads = values[4 : 4 + n_layers]
        layer_weights = values[4 + n_layers : 4 + 2 * n_layers]
        layer_peaks = values[4 + 2 * n_layers :]

        prefix = f"sentinel/grad_norm/{state.view.key + '/' if state.view.key else ''}"
        metrics: dict[str, float] = {prefix + "total": total_norm}
        if self.log_per_layer:
            metrics.update(
                {prefix + name: norm for name, norm in zip(grouping.layer_names, layer_grads, strict=True)}
            )
        self._log_scalars(trainer, pl_module, metrics)
        finite_now = math.isfinite(total_norm)  # non-finite gradients are NonFiniteGuard's business
        where_prefix = f"{state.view.key}:" if state.view.key else ""
        judged = max(total_norm, peak_between) if finite_now else peak_between
        exploding, reason, reference = exploding_verdict(
            judged,
            list(state.history),
            self.spike_factor,
            self.max_norm,
            self.min_history,
            state.early_reference,
        )
        if finite_now:
            # like is compared with like: the history holds what was judged (the largest norm of each
            # check interval), so the max of a few noisy small-batch steps is not held against a
            # median of single steps
            state.history.append(judged)
            if state.early_reference is None and len(state.history) >= self.window:
                state.early_reference = median(list(state.history))  # the gradients while it learned
        if exploding:
            at_peak = judged != total_norm  # the spike happened between checks
            sizes = layer_peaks if at_peak else layer_grads
            finite_layers = [i for i in range(n_layers) if math.isfinite(sizes[i]) and sizes[i] > 0]
            worst = max(finite_layers, key=lambda i: sizes[i]) if finite_layers else None
            when = f"peak of the {self.every_n_steps - 1} steps before" if at_peak else "at this step"
            place = (
                f"; largest in layer '{grouping.layer_names[worst]}' ({sizes[worst]:.3g})"
                if worst is not None
                else "; the gradients are non-finite by now"
            )
            evidence = {"grad_norm": judged, "reference": reference}
            if worst is not None:
                evidence["layer_grad_norm"] = sizes[worst]
            self._report(
                trainer,
                EXPLODING,
                Severity.WARNING,
                f"total gradient norm {judged:.3g} ({when}) is {reason}{place}",
                where=where_prefix + grouping.layer_names[worst]
                if worst is not None
                else state.view.key or None,
                evidence=evidence,
                hint="lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)), check the weight "
                "initialisation and normalise inputs/targets",
                magnitude=judged / max(reference, 1e-30) if math.isfinite(reference) else judged,
                dedupe_as=state.view.key,  # one report per optimizer, whichever layer is largest
            )
        if exploding:
            state.exploded = True
        if finite_now and not state.exploded:
            self._judge_vanishing(
                trainer, state, grouping, layer_grads, layer_weights, first_loss, latest_loss
            )
        self._settle(trainer)

    def _judge_vanishing(
        self,
        trainer: pl.Trainer,
        state: _OptimizerState,
        grouping: LayerGrouping,
        layer_grads: list[float],
        layer_weights: list[float],
        first_loss: float,
        latest_loss: float,
    ) -> None:
        converged = math.isfinite(latest_loss) and (
            abs(latest_loss) < 1e-3 or (first_loss > 0 and latest_loss < self.converged_fraction * first_loss)
        )
        if converged:
            state.vanishing_streak.clear()
            state.depth_streak = 0
            return
        where_prefix = f"{state.view.key}:" if state.view.key else ""
        vanished = set(vanishing_layers(layer_grads, layer_weights, self.vanishing_ratio))
        for index, name in enumerate(grouping.layer_names):
            streak = state.vanishing_streak.get(name, 0) + 1 if index in vanished else 0
            state.vanishing_streak[name] = streak
            if streak >= self.patience:
                ratio = layer_grads[index] / layer_weights[index]
                self._report(
                    trainer,
                    VANISHING,
                    Severity.WARNING,
                    f"layer '{name}' gradient/weight norm ratio {ratio:.2g} < {self.vanishing_ratio:g} for {streak} "
                    f"checks while the loss ({latest_loss:.4g}) has not converged",
                    where=where_prefix + name,
                    evidence={
                        "grad_weight_ratio": ratio,
                        "grad_norm": layer_grads[index],
                        "loss": latest_loss,
                    },
                    hint="use ReLU-family activations instead of sigmoid/tanh in deep stacks, add normalisation "
                    "or residual connections, use He/Xavier initialisation; check for a detached branch",
                )
        weight_layers = [i for i, is_weight in enumerate(grouping.is_weight_layer) if is_weight]
        ratio = depth_ratio(layer_grads, layer_weights, weight_layers)
        state.depth_streak = state.depth_streak + 1 if ratio < self.depth_ratio_threshold else 0
        if state.depth_streak >= self.patience:
            first = grouping.layer_names[weight_layers[0]]
            last = grouping.layer_names[weight_layers[-1]]
            self._report(
                trainer,
                VANISHING,
                Severity.WARNING,
                f"first layer '{first}' gets {ratio:.2g}x the relative gradient of the last layer '{last}' "
                f"(< {self.depth_ratio_threshold:g}) for {state.depth_streak} checks: gradients vanish with depth",
                where=where_prefix + first,
                evidence={"depth_ratio": ratio, "loss": latest_loss},
                hint="use ReLU-family activations instead of sigmoid/tanh in deep stacks, add normalisation "
                "or residual connections, use He/Xavier initialisation",
            )


add_to_presets(GradientNormMonitor, ("fast", "full"), order=10)
