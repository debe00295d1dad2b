"""HistogramLogger: TensorBoard histograms of weights, gradients and activations, update/weight ratios.

A logging callback: it owns no check id and never reports a finding. It derives from
:class:`~lightning_sentinel.base.SentinelCallback` only so that a failure of its own is isolated
(one warning, then it switches itself off) like a check's.

Histograms are binned on the device (one fused pass per tensor, float32, so bf16 and fp16 work) and
read back once per sampled step, then written with ``add_histogram_raw``: the host never copies a
whole weight, gradient or activation tensor.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_sentinel._eager import eager_while_observed, stop_observing
from lightning_sentinel._stats import LayerGrouping, tensor_norms
from lightning_sentinel._validate import require_bool, require_int, require_regex
from lightning_sentinel.base import SentinelCallback
from lightning_sentinel.checks._optimizers import gradient_scale
from lightning_sentinel.findings import SentinelWarning
from lightning_sentinel.report import SENTINEL_LAYOUT

_SUMMARY_HEAD = 5  # min, max, num, sum, sum_squares, then the bucket counts


# ---------------------------------------------------------------------- pure functions
def select_layers(names: list[str], name_filter: str | None, max_layers: int) -> list[str]:
    """The layer names to log: those matching ``name_filter`` (``re.search``), at most ``max_layers``.

    When more match than the cap allows, the kept layers are spread evenly over the model's depth,
    always keeping the first and the last one.

    Example:
        >>> select_layers(["enc.0", "enc.1", "dec.0", "dec.1", "head"], r"^dec|head", 10)
        ['dec.0', 'dec.1', 'head']
        >>> select_layers([f"l{i}" for i in range(10)], None, 4)
        ['l0', 'l3', 'l6', 'l9']
    """
    pattern = re.compile(name_filter) if name_filter is not None else None
    matched = [name for name in names if pattern is None or pattern.search(name)]
    if len(matched) <= max_layers:
        return matched
    if max_layers == 1:
        return matched[:1]
    picks = sorted({round(i * (len(matched) - 1) / (max_layers - 1)) for i in range(max_layers)})
    return [matched[i] for i in picks]


@torch.no_grad()
def histogram_summary(values: Tensor, bins: int, scale: Tensor | None = None) -> Tensor:
    """A histogram of the finite entries of ``values`` as one float32 device vector (no host read).

    Layout: ``[min, max, num, sum, sum_squares, count_0, ..., count_{bins-1}]`` with ``bins``
    equal-width buckets between min and max. NaN and Inf entries are left out (``num`` counts the
    finite ones). ``scale`` divides the values first (a GradScaler scale still on the gradients).

    On the CPU, where reading a value back is free, finite tensors take a faster path
    (``torch.histc``); elsewhere everything stays on the device.

    Example:
        >>> histogram_summary(torch.tensor([0.0, 1.0, 1.0, 4.0]), bins=4).tolist()
        [0.0, 4.0, 4.0, 6.0, 18.0, 1.0, 2.0, 0.0, 1.0]
        >>> histogram_summary(torch.tensor([0.0, 1.0, 1.0, 4.0, float("nan")]), bins=4).tolist()
        [0.0, 4.0, 4.0, 6.0, 18.0, 1.0, 2.0, 0.0, 1.0]
    """
    x = values.detach().reshape(-1).float()
    if scale is not None:
        x = x / scale.to(x.device, torch.float32)
    if x.numel() == 0:
        return torch.zeros(_SUMMARY_HEAD + bins, dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":  # reading min and max costs no sync here: use the fast binning kernel
        low_value, high_value = (float(v) for v in torch.aminmax(x))
        if math.isfinite(low_value) and math.isfinite(high_value):
            if high_value > low_value:
                counts = torch.histc(x, bins, low_value, high_value)
            else:
                counts = torch.zeros(bins, dtype=torch.float32)
                counts[0] = x.numel()
            head = torch.stack([x.new_tensor(low_value), x.new_tensor(high_value), x.new_tensor(x.numel())])
            return torch.cat([head, x.sum().view(1), torch.dot(x, x).view(1), counts])
    return _device_summary(x, bins)  # on an accelerator, or with NaN/Inf


def _device_summary(x: Tensor, bins: int) -> Tensor:
    """:func:`histogram_summary` of a flat float32 tensor by masked binning that never leaves the device."""
    finite = torch.isfinite(x)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    clean = torch.where(finite, x, zero)
    num = finite.sum().float()
    low = torch.where(finite, x, math.inf).amin()
    high = torch.where(finite, x, -math.inf).amax()
    low = torch.where(num > 0, low, zero)
    high = torch.where(num > 0, high, zero)
    width = (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    index = ((clean - low) / width * bins).floor().clamp_(0, bins - 1).long()
    counts = torch.zeros(bins, dtype=torch.float32, device=x.device).index_add_(0, index, finite.float())
    head = torch.stack([low, high, num, clean.sum(), clean.square().sum()])
    return torch.cat([head, counts])


def bucket_limits(low: float, high: float, bins: int) -> list[float]:
    """Right edges of ``bins`` equal-width buckets over ``[low, high]`` (one bucket if ``low == high``).

    Example:
        >>> bucket_limits(0.0, 4.0, 4)
        [1.0, 2.0, 3.0, 4.0]
        >>> bucket_limits(2.0, 2.0, 4)
        [2.0]
    """
    if not high > low:
        return [high]
    return [low + (high - low) * (i + 1) / bins for i in range(bins - 1)] + [high]


# ---------------------------------------------------------------------- per-run bookkeeping
@dataclass
class _Sample:
    """What one sampled training step has gathered on the device so far."""

    step: int
    histograms: list[tuple[str, Tensor]] = field(default_factory=list)
    seen_modules: set[str] = field(default_factory=set)
    stepped_optimizers: set[int] = field(default_factory=set)
    snapshots: list[tuple[list[str], list[Tensor], list[Tensor]]] = field(default_factory=list)
    update_norms: list[tuple[tuple[str, ...], Tensor, Tensor]] = field(default_factory=list)


class HistogramLogger(SentinelCallback):
    """TensorBoard histograms of weights, gradients and activations, and per-layer update/weight ratios.

    Every ``every_n_steps``-th training step (``trainer.global_step % every_n_steps == 0`` when the
    batch starts, so the histograms line up with Lightning's own scalars) it logs, for at most
    ``max_layers`` layers whose names match ``name_filter``:

    - ``sentinel/weights/<parameter>`` and ``sentinel/gradients/<parameter>`` histograms, read in
      ``on_before_optimizer_step``: once per optimizer step (after gradient accumulation), after
      AMP unscaling (gradients a fused optimizer still holds scaled are divided by the scale), and
      before gradient clipping;
    - ``sentinel/activations/<module>`` histograms of each selected module's output, from forward
      hooks attached at the start of the sampled step's first micro-batch and removed at its end
      (and on exception);
    - ``sentinel/update_ratio/<layer>`` scalars: ``||W_after - W_before|| / ||W_before||`` of the
      sampled optimizer step, computed with fused ``foreach`` ops on the device (healthy training
      is typically around 1e-3);

    and once per fit a custom-scalar layout that groups every ``sentinel/...`` scalar (gradient
    norms, update ratios, dead-unit shares, the rest) in one "sentinel" section of TensorBoard's
    CUSTOM SCALARS tab.

    Histograms are binned on the device into ``bins`` equal-width buckets and read back with one
    host read per sampled step; nothing happens on the other steps. It writes only on rank zero (under
    DDP, gradients and weights are the same on every rank; activations are rank zero's batch) and
    uses no collectives. Without a :class:`~lightning.pytorch.loggers.TensorBoardLogger` among the
    trainer's loggers it emits one :class:`~lightning_sentinel.SentinelWarning` and does nothing.

    Cost (``python -m benchmarks.overhead``, ``benchmarks/OVERHEAD.md``: CPU, one thread, with a
    TensorBoard logger): sampling every step makes a step 2.5-4.8x as long (a sampled step adds 1.5-3.8
    training steps on the 1.5-8.6 ms MLP and CNN workloads), so the default ``every_n_steps=200``
    costs 0.7-1.9% of training time. Steps that are not sampled do no tensor work (a few attribute
    tests per hook). On a GPU, binning stays on the device and the
    sampled step does one host read.

    Args:
        every_n_steps: log on every n-th training step (by ``trainer.global_step``); an integer >= 1.
        name_filter: regular expression searched (``re.search``) in layer names, e.g. ``"encoder"``;
            ``None`` keeps every layer. A layer is a module that owns parameters or has no children.
        max_layers: at most this many layers are logged, spread evenly over depth (first and last
            kept); an integer >= 1.
        bins: number of equal-width buckets of each histogram; an integer >= 1.
        log_weights: log weight histograms.
        log_gradients: log gradient histograms.
        log_activations: log activation histograms.
        log_update_ratio: log per-layer update/weight ratios.
        custom_scalar_layout: write the "sentinel" custom-scalar layout.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from lightning_sentinel.checks.histograms import HistogramLogger
        >>> histograms = HistogramLogger(every_n_steps=100, name_filter=r"^net\\.", max_layers=16)
        >>> trainer = pl.Trainer(callbacks=[histograms], logger=TensorBoardLogger("tb_logs"))
    """

    CHECKS = ()
    FOLLOWS_SUITE_CLOCK = False  # its own, sparser cadence: a histogram every few hundred steps
    WRITES_SCALAR_LAYOUT = True  # the suite leaves TensorBoard's custom scalar layout to it

    def __init__(
        self,
        every_n_steps: int = 200,
        name_filter: str | None = None,
        max_layers: int = 24,
        bins: int = 64,
        log_weights: bool = True,
        log_gradients: bool = True,
        log_activations: bool = True,
        log_update_ratio: bool = True,
        custom_scalar_layout: bool = True,
    ) -> None:
        super().__init__(on_detect="warn", every_n_steps=every_n_steps)
        self.name_filter = require_regex("name_filter", name_filter, allow_none=True)
        self.max_layers = require_int("max_layers", max_layers)
        self.bins = require_int("bins", bins)
        self.log_weights = require_bool("log_weights", log_weights)
        self.log_gradients = require_bool("log_gradients", log_gradients)
        self.log_activations = require_bool("log_activations", log_activations)
        self.log_update_ratio = require_bool("log_update_ratio", log_update_ratio)
        self.custom_scalar_layout = require_bool("custom_scalar_layout", custom_scalar_layout)
        self._said_no_tensorboard = False
        self._tensorboard: TensorBoardLogger | None = None
        self._layers: list[str] = []
        self._layer_of_parameter: dict[int, tuple[str, str]] = {}  # id(parameter) -> (name, layer)
        self._hook_modules: list[tuple[str, nn.Module]] = []
        self._handles: list[RemovableHandle] = []
        self._sample: _Sample | None = None

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {
            "every_n_steps": self.every_n_steps,
            "name_filter": self.name_filter,
            "max_layers": self.max_layers,
        }

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self._tensorboard is None and not self._said_no_tensorboard and trainer.global_rank == 0:
            self._said_no_tensorboard = True
            warnings.warn(
                SentinelWarning(
                    "HistogramLogger: the trainer has no TensorBoardLogger "
                    f"(loggers: {[type(lg).__name__ for lg in trainer.loggers] or 'none'}), so it logs nothing; "
                    "pass `logger=lightning.pytorch.loggers.TensorBoardLogger(...)` to the Trainer."
                ),
                stacklevel=2,
            )

    def _active(self, trainer: pl.Trainer) -> bool:
        return self._tensorboard is not None and trainer.global_rank == 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sample = None
        if not self._active(trainer):
            return
        self._select(pl_module)
        if self.custom_scalar_layout:
            assert self._tensorboard is not None
            logger = self._tensorboard
            self._emit(
                trainer,
                "TensorBoard's custom scalar layout",
                lambda: logger.experiment.add_custom_scalars(SENTINEL_LAYOUT),
            )

    def _select(self, pl_module: pl.LightningModule) -> None:
        """Choose the layers to log (modules that own parameters or have no children; root params too)."""
        candidates: list[str] = []
        modules: dict[str, nn.Module] = {}
        for name, module in pl_module.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if name == "":
                candidates.extend(n for n, _ in own)  # parameters of the root itself: one "layer" each
                continue
            if own or next(module.children(), None) is None:
                candidates.append(name)
                modules[name] = module
        self._layers = select_layers(candidates, self.name_filter, self.max_layers)
        if not self._layers and candidates:
            shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
            warnings.warn(
                SentinelWarning(
                    f"HistogramLogger: `name_filter` {self.name_filter!r} matches none of the model's layers "
                    f"({shown}), so it logs no histogram."
                ),
                stacklevel=2,
            )
        chosen = set(self._layers)
        self._layer_of_parameter = {}
        for name, parameter in pl_module.named_parameters():
            layer = name.rpartition(".")[0] or name
            if layer in chosen and parameter.requires_grad:
                self._layer_of_parameter[id(parameter)] = (name, layer)
        self._hook_modules = [(name, modules[name]) for name in self._layers if name in modules]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active(trainer):
            return
        step = int(trainer.global_step)
        if self._sample is not None and self._sample.step == step:
            return  # a later micro-batch of a step being sampled: activations were taken on the first one
        if not self._is_due(step):
            return
        self._sample = _Sample(step=step)
        if self.log_activations:
            self._attach()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        sample = self._sample
        if sample is None or id(optimizer) in sample.stepped_optimizers:
            return
        sample.stepped_optimizers.add(id(optimizer))
        named = [
            (self._layer_of_parameter[id(p)], p)
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) in self._layer_of_parameter
        ]
        if not named:
            return
        scale = gradient_scale(trainer, optimizer)
        for (name, _), parameter in named:
            if self.log_weights:
                sample.histograms.append(
                    (f"sentinel/weights/{name}", histogram_summary(parameter, self.bins))
                )
            if self.log_gradients and parameter.grad is not None:
                sample.histograms.append(
                    (f"sentinel/gradients/{name}", histogram_summary(parameter.grad, self.bins, scale))
                )
        if self.log_update_ratio:
            parameters = [p for _, p in named]
            before = [p.detach().clone() for p in parameters]
            sample.snapshots.append(([layer for (_, layer), _ in named], parameters, before))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._detach()
        sample = self._sample
        if sample is None or int(trainer.global_step) == sample.step:
            return  # no optimizer step yet (accumulating): wait for it
        self._measure_updates(sample)
        self._flush(trainer, sample)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        if self._sample is not None:  # a sampled step whose optimizer step never came
            self._measure_updates(self._sample)
            self._flush(trainer, self._sample)

    @override
    def _finish(self, trainer: pl.Trainer, print_report: bool) -> None:
        """Nothing to write or print: a logger has no findings (the checks beside it print the report)."""

    @override
    def _release(self, trainer: pl.Trainer) -> None:
        self._detach()
        if self._sample is not None:
            self._sample.snapshots = []

    # ------------------------------------------------------------------ activations
    def _attach(self) -> None:
        if self._handles:
            return
        eager_while_observed(self)  # hooks added after compilation would be traced into the graph
        for name, module in self._hook_modules:
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        stop_observing(self)

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            sample = self._sample
            if sample is None or name in sample.seen_modules:  # e.g. activation checkpointing re-runs forward
                return
            tensor = _first_floating(output)
            if tensor is None or tensor.numel() == 0:
                return
            sample.seen_modules.add(name)
            sample.histograms.append((f"sentinel/activations/{name}", histogram_summary(tensor, self.bins)))

        return hook

    # ------------------------------------------------------------------ update ratios and writing
    def _measure_updates(self, sample: _Sample) -> None:
        """Per-layer ``||W_after - W_before||`` and ``||W_before||`` of the sampled step, on the device."""
        for layers, parameters, before in sample.snapshots:
            after = [p.detach() for p in parameters]
            deltas = torch._foreach_sub(after, before)
            # LayerGrouping names a parameter's layer by its name less the last part: pass "<layer>.p"
            grouping = LayerGrouping.from_named_parameters(
                (f"{layer}.p", p) for layer, p in zip(layers, parameters, strict=True)
            )
            update_norms = grouping.layer_norms(tensor_norms(deltas))
            weight_norms = grouping.layer_norms(tensor_norms(before, device=update_norms.device))
            sample.update_norms.append((grouping.layer_names, update_norms, weight_norms))
        sample.snapshots = []

    def _flush(self, trainer: pl.Trainer, sample: _Sample) -> None:
        """One host read of everything the sampled step gathered, then write it to TensorBoard."""
        self._sample = None
        assert self._tensorboard is not None
        parts = [summary for _, summary in sample.histograms]
        for _, update_norms, weight_norms in sample.update_norms:
            parts.extend([update_norms, weight_norms])
        if not parts:
            return
        device = parts[0].device
        values = torch.cat([part.to(device) for part in parts]).tolist()  # the one host read
        logger = self._tensorboard
        offset = 0
        width = _SUMMARY_HEAD + self.bins
        for tag, _ in sample.histograms:
            low, high, num, total, squares = values[offset : offset + _SUMMARY_HEAD]
            counts = values[offset + _SUMMARY_HEAD : offset + width]
            offset += width
            if num <= 0:
                continue  # nothing finite to show (NaN/Inf are NonFiniteGuard's business)
            limits = bucket_limits(low, high, self.bins)
            self._emit(
                trainer,
                f"{type(self._tensorboard).__name__}.experiment.add_histogram_raw",
                functools.partial(
                    _add_histogram_raw,
                    logger,
                    tag,
                    min=low,
                    max=high,
                    num=int(num),
                    sum=total,
                    sum_squares=squares,
                    bucket_limits=limits,
                    bucket_counts=counts if len(limits) == self.bins else [num],
                    global_step=sample.step,
                ),
            )
        ratios: dict[str, float] = {}
        for layer_names, _, _ in sample.update_norms:
            n = len(layer_names)
            update_norms = values[offset : offset + n]
            weight_norms = values[offset + n : offset + 2 * n]
            offset += 2 * n
            for layer, update, weight in zip(layer_names, update_norms, weight_norms, strict=True):
                if weight > 0 and math.isfinite(update):
                    ratios[f"sentinel/update_ratio/{layer}"] = update / weight
        if ratios:
            for logger in trainer.loggers:
                self._emit(
                    trainer, f"{type(logger).__name__}.log_metrics", logger.log_metrics, ratios, sample.step
                )


def _add_histogram_raw(logger: TensorBoardLogger, tag: str, **fields: Any) -> None:
    logger.experiment.add_histogram_raw(tag, **fields)


def _first_floating(value: Any) -> Tensor | None:
    """The first floating-point tensor in a module output (a tensor, or nested tuples/lists/dicts)."""
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        found = _first_floating(item)
        if found is not None:
            return found
    return None
