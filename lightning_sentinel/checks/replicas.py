"""ReplicaSyncMonitor: data-parallel replicas whose parameters drift apart (``replicas-out-of-sync``).

Under DDP every rank holds a full copy of the model, and the strategy keeps the copies equal by
broadcasting rank 0's weights once, when it wraps the model, and by averaging the gradients of
every step. Anything that changes a replica outside that scheme (an in-place edit or a running
statistic computed from the rank's own batch, a backward left inside ``no_sync()`` when the
optimizer steps, a layer re-initialised with a per-rank seed after the wrap) makes the ranks train
different models while every rank's loss looks fine; nothing heals it later, because each rank goes
on applying the same averaged update to its own, different weights.

On its check steps each rank takes two numbers of every parameter and buffer on the device, its
2-norm and its largest absolute value (two fused ``torch._foreach_norm`` calls), the ranks exchange
these vectors in one ``all_gather``, and the host reads the result once. Healthy DDP replicas are
bitwise identical, so these numbers are too.

Example:
    >>> rows = [[3.0, 4.0], [3.0, 4.5]]  # rank 0, rank 1: 2-norms of two parameters
    >>> [(d.index, round(d.relative, 3), d.rank_groups) for d in replica_differences(rows, rtol=1e-5)]
    [(1, 0.111, ((0,), (1,)))]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._stats import shards_gradients, tensor_norms
from lightning_sentinel._validate import require_list, require_number, require_regex
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.engine import ends_cycle
from lightning_sentinel.findings import SentinelError, SentinelWarning, Severity

REPLICAS_OUT_OF_SYNC = "replicas-out-of-sync"

DEFAULT_RTOL = 1e-5

register(
    CheckSpec(
        REPLICAS_OUT_OF_SYNC,
        "ReplicaSyncMonitor",
        Severity.ERROR,
        "under data parallelism (DDP) a parameter differs between ranks: the replicas train different models (a "
        "rank-local in-place edit or EMA, gradients not all-reduced, a layer re-initialised on one rank); "
        "differing buffers are info",
        "a parameter's 2-norm or largest |value| differs across ranks by > 1e-5 of its size (healthy DDP replicas: "
        "bitwise equal); every 10 optimizer steps, one all_gather of two floats per tensor; nothing at world size 1, "
        "info under sharded strategies",
    ),
)

_FLOAT32_MAX = torch.finfo(torch.float32).max
_PARAMETER = "parameter"
_BUFFER = "buffer"
_RUNNING_STATISTICS = ("running_mean", "running_var")


# ---------------------------------------------------------------------- pure rules
@dataclass(frozen=True)
class ReplicaDifference:
    """One tensor whose fingerprint differs between ranks.

    Attributes:
        index: its position in the fingerprint vector.
        largest, smallest: the largest and smallest value over the ranks.
        rank_groups: the ranks grouped by equal value (within the tolerance), each group in rank order,
            the groups ordered by their first rank (so rank 0's group comes first).
        group_values: one value per group (its first rank's).
    """

    index: int
    largest: float
    smallest: float
    rank_groups: tuple[tuple[int, ...], ...]
    group_values: tuple[float, ...]

    @property
    def absolute(self) -> float:
        """``largest - smallest``."""
        return self.largest - self.smallest

    @property
    def relative(self) -> float:
        """The difference over the larger magnitude (1.0 when one rank holds 0 and another not)."""
        scale = max(abs(self.largest), abs(self.smallest))
        return self.absolute / scale if scale > 0 else 0.0


def _apart(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) > rtol * max(abs(a), abs(b))


def _groups(column: Sequence[float], rtol: float) -> tuple[tuple[tuple[int, ...], ...], tuple[float, ...]]:
    """Ranks grouped by value: each rank joins the first group whose first value it is within ``rtol`` of."""
    groups: list[list[int]] = []
    values: list[float] = []
    for rank, value in enumerate(column):
        for group, reference in zip(groups, values, strict=True):
            if not _apart(value, reference, rtol):
                group.append(rank)
                break
        else:
            groups.append([rank])
            values.append(value)
    return tuple(tuple(group) for group in groups), tuple(values)


def replica_differences(fingerprints: Sequence[Sequence[float]], rtol: float) -> list[ReplicaDifference]:
    """The tensors whose fingerprint differs between ranks by more than ``rtol`` of its magnitude.

    ``fingerprints[r][i]`` is tensor ``i``'s fingerprint (its 2-norm) on rank ``r``. A tensor counts
    as different when ``largest - smallest > rtol * max(|largest|, |smallest|)``. Tensors with a
    non-finite value on some rank are not judged (NaN weights are ``non-finite-weights``' business,
    and a NaN marks a tensor a rank no longer has). Results come in tensor order.

    Example:
        >>> rows = [[1.0, 2.0, 5.0], [1.0, 2.0 + 1e-9, 5.5], [1.0, 2.0, 5.0]]
        >>> [(d.index, d.rank_groups, d.group_values) for d in replica_differences(rows, rtol=1e-5)]
        [(2, ((0, 2), (1,)), (5.0, 5.5))]
        >>> replica_differences([[0.0, float("nan")], [0.0, 1.0]], rtol=1e-5)
        []
    """
    return _differences(fingerprints, rtol)


def _differences(fingerprints: Sequence[Sequence[float]], rtol: float) -> list[ReplicaDifference]:
    if not fingerprints:
        return []
    width = len(fingerprints[0])
    differences = []
    for index in range(width):
        column = [row[index] for row in fingerprints]
        if not all(math.isfinite(value) for value in column):
            continue
        largest, smallest = max(column), min(column)
        if not _apart(largest, smallest, rtol):
            continue
        groups, values = _groups(column, rtol)
        differences.append(ReplicaDifference(index, largest, smallest, groups, values))
    return differences


def largest_relative_difference(fingerprints: Sequence[Sequence[float]]) -> float:
    """The largest relative spread over the ranks of any finite column (0.0 for identical replicas).

    Example:
        >>> largest_relative_difference([[2.0, 4.0], [2.0, 5.0]])
        0.2
    """
    largest = 0.0
    for index in range(len(fingerprints[0]) if fingerprints else 0):
        column = [row[index] for row in fingerprints]
        if all(math.isfinite(value) for value in column):
            scale = max(abs(value) for value in column)
            if scale > 0:
                largest = max(largest, (max(column) - min(column)) / scale)
    return largest


@dataclass(frozen=True)
class TensorDifference:
    """A tensor that differs between ranks in its 2-norm, its largest magnitude, or both (``None``: equal)."""

    index: int
    norm: ReplicaDifference | None
    peak: ReplicaDifference | None

    @property
    def relative(self) -> float:
        """The larger of the two relative differences."""
        return max(d.relative for d in (self.norm, self.peak) if d is not None)

    @property
    def rank_groups(self) -> int:
        """How many different values the ranks hold (of the statistic that differs more)."""
        return len(
            max((d for d in (self.norm, self.peak) if d is not None), key=lambda d: d.relative).rank_groups
        )

    def describe(self) -> str:
        """``"2-norm 3.2 on rank 0, 3.3 on rank 1 (0.03 relative), largest |value| equal on every rank"``."""
        parts = []
        for label, difference in (("2-norm", self.norm), ("largest |value|", self.peak)):
            if difference is None:
                parts.append(f"{label} equal on every rank")
            else:
                parts.append(f"{label} {_by_rank(difference)} ({difference.relative:.3g} relative)")
        return ", ".join(parts)


def _merge(norms: list[ReplicaDifference], peaks: list[ReplicaDifference]) -> list[TensorDifference]:
    """The tensors differing in either statistic, in tensor order.

    Example:
        >>> norms = replica_differences([[1.0, 2.0], [1.0, 2.5]], 1e-5)
        >>> peaks = replica_differences([[0.5, 1.0], [0.6, 1.0]], 1e-5)
        >>> [(d.index, d.norm is not None, d.peak is not None) for d in _merge(norms, peaks)]
        [(0, False, True), (1, True, False)]
    """
    by_norm = {d.index: d for d in norms}
    by_peak = {d.index: d for d in peaks}
    return [TensorDifference(i, by_norm.get(i), by_peak.get(i)) for i in sorted({*by_norm, *by_peak})]


def largest_magnitudes(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """The largest absolute value of each tensor (0 for an empty one) as one float32 vector on ``device``.

    One fused ``torch._foreach_norm(..., inf)``; a maximum involves no rounding, so it is bitwise the same on
    every rank for the same tensor whatever the hardware or summation order, and it moves by a whole element's
    change where the 2-norm averages a scattered change over all elements.

    Example:
        >>> largest_magnitudes([torch.tensor([1.0, -3.0]), torch.zeros(0), torch.tensor([2, -5])], torch.device("cpu"))
        tensor([3., 0., 5.])
    """
    result = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    present = [i for i, tensor in enumerate(tensors) if tensor.numel() > 0]
    if not present:
        return result
    members = [
        tensors[i] if tensors[i].is_floating_point() or tensors[i].is_complex() else tensors[i].float()
        for i in present
    ]
    with torch.no_grad():
        maxima = torch._foreach_norm(members, math.inf)
        if all(m.dtype == torch.float32 and m.device == device for m in maxima):
            stacked = torch.stack(list(maxima))
        else:
            stacked = torch.stack([_as_float32(m, device) for m in maxima])
    result.index_copy_(0, torch.tensor(present, dtype=torch.long, device=device), stacked)
    return result


def _as_float32(value: Tensor, device: torch.device) -> Tensor:
    """``value`` as float32 on ``device``; a finite float64 beyond float32's range saturates instead of reading as Inf."""
    if value.dtype == torch.float64:
        value = torch.where(torch.isfinite(value), value.clamp(max=_FLOAT32_MAX), value)
    return value.to(device=device, dtype=torch.float32)


def _by_rank(difference: ReplicaDifference, limit: int = 4) -> str:
    """``"2-norm 3.2 on rank 0, 3.3 on rank 1"`` (ranks listed compactly, at most ``limit`` groups)."""
    parts = []
    for group, value in list(zip(difference.rank_groups, difference.group_values, strict=True))[:limit]:
        ranks = ", ".join(str(rank) for rank in group[:6]) + (
            f" and {len(group) - 6} more" if len(group) > 6 else ""
        )
        parts.append(f"{value:.7g} on rank{'s' if len(group) > 1 else ''} {ranks}")
    more = len(difference.rank_groups) - limit
    return ", ".join(parts) + (f" and {more} other values" if more > 0 else "")


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------- what is compared
def buffers_synced_each_forward(trainer: pl.Trainer) -> bool:
    """Whether the strategy copies rank 0's buffers to every rank at the start of each forward.

    DDP does so unless it was built with ``broadcast_buffers=False`` (``forward_sync_buffers=False``
    in torch >= 2.13); a strategy that does not say is taken to sync them (the cautious answer: its
    batch-norm running statistics are then never judged).
    """
    model = trainer.strategy.model
    synced = getattr(model, "forward_sync_buffers", None)
    if synced is None:
        synced = getattr(model, "broadcast_buffers", True)
    return bool(synced)


def _running_statistics(module: torch.nn.Module) -> bool:
    """Whether ``module`` updates running statistics from the rank's own batch (batch/instance norm, not SyncBatchNorm)."""
    from torch.nn.modules.batchnorm import _NormBase

    return (
        isinstance(module, _NormBase)
        and not isinstance(module, torch.nn.SyncBatchNorm)
        and bool(getattr(module, "track_running_stats", False))
    )


def compared_tensors(
    pl_module: torch.nn.Module, ignore: Sequence[re.Pattern[str]], buffers_synced: bool
) -> list[tuple[str, str, bool]]:
    """``(name, kind, trainable)`` of every tensor to compare across ranks, parameters first, in registration order.

    Left out: names matching an ``ignore`` pattern or listed in the module's
    ``_ddp_params_and_buffers_to_ignore`` (DDP leaves those alone: rank-local by design), and, when
    the strategy re-syncs buffers at every forward (``buffers_synced``), the running statistics of
    batch/instance norms that are not ``SyncBatchNorm``: DDP overwrites them with rank 0's before
    each synchronised forward and each rank's forward then updates them from its own batch, so at any
    callback hook they legitimately differ by that last rank-local update.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> [name for name, _, _ in compared_tensors(net, [], buffers_synced=True)]
        ['0.weight', '0.bias', '1.weight', '1.bias', '1.num_batches_tracked']
        >>> [name for name, kind, _ in compared_tensors(net, [re.compile("^1")], buffers_synced=False)]
        ['0.weight', '0.bias']
    """
    rank_local = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()) or ())

    def kept(name: str) -> bool:
        return name not in rank_local and not any(pattern.search(name) for pattern in ignore)

    chosen = [
        (name, _PARAMETER, bool(parameter.requires_grad))
        for name, parameter in pl_module.named_parameters()
        if kept(name)
    ]
    seen: set[int] = set()
    for module_name, module in pl_module.named_modules():
        local_statistics = buffers_synced and _running_statistics(module)
        for buffer_name, buffer in module.named_buffers(recurse=False):
            name = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if (
                id(buffer) in seen
                or (local_statistics and buffer_name in _RUNNING_STATISTICS)
                or not kept(name)
            ):
                continue
            seen.add(id(buffer))
            chosen.append((name, _BUFFER, False))
    return chosen


# ---------------------------------------------------------------------- the callback
class ReplicaSyncMonitor(SentinelCallback):
    """Checks that data-parallel replicas hold the same weights (``replicas-out-of-sync``).

    On every check step (the suite's clock, which counts Lightning's optimizer-step cycles, so every
    rank checks at the same batch whatever its own optimizer did), at the end of the batch that
    stepped, every rank computes the 2-norm and the largest absolute value of
    each parameter and buffer on the device (two fused ``torch._foreach_norm`` calls) into one
    vector, the ranks exchange it in **one** ``all_gather`` (``2n + 1`` floats per rank for ``n``
    tensors) and the host reads the gathered matrix once. The first parameter, in registration
    order, one of whose two numbers differs between ranks by more than ``rtol`` of its size is
    reported (error), with the values per rank, the relative differences, and how many other
    parameters differ. Differing buffers are said as info: the strategy may not keep them equal
    (below). The 2-norm sees a change anywhere in the tensor but averages a scattered one over all
    its elements; the largest value moves by a whole element's change (5x more than the norm for an
    encoder stepped on rank-local gradients in the tests). A change that keeps both (a permutation
    of the elements, a sign flip) is not seen.

    Why the numbers should match exactly: DDP broadcasts rank 0's weights when it wraps the model and
    all-reduces the gradients of every step, so each rank applies the same update to the same
    weights with the same kernels: healthy replicas are bitwise identical (every healthy DDP run of
    the tests and of the detection benchmark: difference exactly 0). ``rtol=1e-5`` still tolerates
    what legitimately varies: a norm summed in float32 in another order (ranks on unlike hardware,
    or CPU ranks with different thread counts) moves by ~1e-7 relative (100x below ``rtol``; a
    maximum involves no rounding at all), and ulp-level update differences average out far below
    that. The faults of the tests and of the detection benchmark leave 3e-4 to 0.7 at the first check
    that sees them (30x ``rtol`` and more; 2e-5 to 0.6 with the 2-norm alone, which the largest value
    lifts 5-17x for scattered changes). Stochastic-rounding optimizers seeded per rank or
    deliberately rank-local weights need a larger ``rtol`` or ``ignore``.

    What may legitimately differ, and is not an error:

    - under sharded strategies (FSDP, DeepSpeed, ``ModelParallelStrategy``) ranks hold shards, not
      replicas: nothing is compared, and one info finding says so;
    - buffers: DDP copies rank 0's buffers to all ranks before each synchronised forward
      (``broadcast_buffers=True``, the default) and the forward then updates them from each rank's
      batch, so at any callback hook a buffer updated in the forward differs by that step's
      rank-local update; batch/instance-norm running statistics (not ``SyncBatchNorm``, which keeps
      them equal) are therefore left out, and any other differing buffer is reported as info (only
      rank 0's updates survive in it); with ``broadcast_buffers=False`` no buffer is kept equal, and
      differing ones (the norms' running statistics included) are info as well;
    - names matching an ``ignore`` pattern, and those in ``_ddp_params_and_buffers_to_ignore``.

    The check costs nothing at world size 1 (no tensor work, no collective). It never leaves a rank
    out of a collective: every rank reaches the ``all_gather`` at the same batches whatever it found,
    and a rank whose own computation failed still joins it (sending a failure flag, upon which every
    rank switches the check off together).

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        every_n_steps: check every n-th optimizer step; an integer >= 1. The default 10 is the cadence
            of the suite's other per-step monitors; a drift never heals, so a sparser check only
            delays the report, and one all_gather of a few hundred floats per 10 steps is far below
            a DDP step's own gradient all-reduce.
        warmup_steps: optimizer steps before the first check; an integer >= 0.
        rtol: relative tolerance on a tensor's 2-norm across ranks; a finite number >= 0 (0: bitwise).
        ignore: regular expressions of parameter/buffer names that are rank-local by design (a list of
            strings, matched with ``re.search``), never compared.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import ReplicaSyncMonitor
        >>> monitor = ReplicaSyncMonitor(ignore=[r"^rank_local\\."], on_detect="stop")
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
    """

    CHECKS = (REPLICAS_OUT_OF_SYNC,)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 10,
        warmup_steps: int = 0,
        rtol: float = DEFAULT_RTOL,
        ignore: list[str] | None = None,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        self.rtol = require_number("rtol", rtol, at_least=0)
        self.ignore = [
            require_regex("ignore", pattern) for pattern in require_list("ignore", ignore, str, "strings")
        ]
        self._ignore = [re.compile(pattern) for pattern in self.ignore]
        self._mode = "off"  # "off" (one process), "sharded" (nothing to compare) or "compare"
        self._tensors: list[tuple[str, str, bool]] = []  # (name, kind, trainable), fixed at fit start
        self._buffers_synced = True
        # this rank's own failure, told to the other ranks at the next gather
        self._local_error: Exception | None = None

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "rtol": self.rtol, "ignore": self.ignore}

    # ------------------------------------------------------------------ lifecycle
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the strategy has wrapped the model (DDP verified that every rank holds the same parameters);
        # nothing here may fail on one rank only, or that rank would stop joining the gather
        if trainer.world_size <= 1 or REPLICAS_OUT_OF_SYNC not in self.active_checks:
            self._mode = "off"
            return
        if shards_gradients(trainer.strategy):
            self._mode = "sharded"
            return
        self._mode = "compare"
        try:
            self._buffers_synced = buffers_synced_each_forward(trainer)
            self._tensors = compared_tensors(pl_module, self._ignore, self._buffers_synced)
        except Exception as error:  # joins the first gather as a failure flag
            self._local_error = error
            self._tensors = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._mode == "sharded":
            self._report(
                trainer,
                REPLICAS_OUT_OF_SYNC,
                Severity.INFO,
                f"replicas are not compared under {type(trainer.strategy).__name__}: each rank holds a shard of the "
                "parameters, not a full copy",
                hint="nothing to do; under DDP every rank's copy is compared",
                dedupe_as="sharded",
            )
            self._settle(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._mode != "compare" or not ends_cycle(trainer) or not self._due(trainer):
            return  # every rank decides alike: the clock counts the optimizer-step cycles Lightning counts
        self._run_replica_check(trainer, pl_module)

    # ------------------------------------------------------------------ the check
    def _fingerprint(self, pl_module: pl.LightningModule, device: torch.device) -> Tensor:
        """``[0, 2-norms..., largest |values|...]`` of the compared tensors, on ``device``.

        NaN for a tensor this rank no longer has under its name.
        """
        current: dict[str, Tensor] = dict(pl_module.named_parameters())
        current.update(pl_module.named_buffers())
        tensors = [current.get(name) for name, _, _ in self._tensors]
        count = len(tensors)
        present = [index for index, tensor in enumerate(tensors) if tensor is not None]
        values = torch.full((1 + 2 * count,), math.nan, dtype=torch.float32, device=device)
        values[0] = 0.0
        if present:
            chosen = [tensors[i].detach() for i in present]  # type: ignore[union-attr]
            positions = torch.tensor(present, dtype=torch.long, device=device)
            values.index_copy_(0, 1 + positions, tensor_norms(chosen, device=device))
            values.index_copy_(0, 1 + count + positions, largest_magnitudes(chosen, device))
        return values

    def _run_replica_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        width = 1 + 2 * len(self._tensors)
        local: Tensor | None = None
        if self._local_error is None:
            try:
                local = self._fingerprint(pl_module, device)
            except (SentinelError, SentinelWarning):
                raise
            except Exception as error:  # still join the gather, flagged, so that no rank waits alone
                self._local_error = error
        if local is None:
            local = torch.full((width,), math.nan, dtype=torch.float32, device=device)
            local[0] = 1.0
        with torch.no_grad():
            gathered = trainer.strategy.all_gather(local)  # the one collective: (world size, 1 + 2n)
        self._read(  # the one host read (batched with the suite's other reads of this hook)
            trainer,
            gathered,
            lambda values: self._judge_rows(
                trainer, pl_module, [values[i : i + width] for i in range(0, len(values), width)]
            ),
        )

    def _judge_rows(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, rows: list[list[float]]
    ) -> None:
        failed = [rank for rank, row in enumerate(rows) if row[0] != 0.0]
        if failed:
            error = self._local_error or RuntimeError(f"it failed on rank {', '.join(map(str, failed))}")
            self._disable_after_error(trainer, "on_train_batch_end", error)  # on every rank alike
            return
        self._judge(trainer, pl_module, rows)
        self._settle(trainer)

    def _judge(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rows: list[list[float]]) -> None:
        count = len(self._tensors)
        parameters = [i for i, (_, kind, _) in enumerate(self._tensors) if kind == _PARAMETER]
        buffers = [i for i, (_, kind, _) in enumerate(self._tensors) if kind == _BUFFER]

        def columns(indices: list[int], offset: int) -> list[list[float]]:
            return [[row[offset + i] for i in indices] for row in rows]

        norms, maxima = columns(parameters, 1), columns(parameters, 1 + count)
        self._log_scalars(
            trainer,
            pl_module,
            {
                "sentinel/replicas/max_relative_difference": max(
                    largest_relative_difference(norms), largest_relative_difference(maxima)
                )
            },
        )
        differing = _merge(replica_differences(norms, self.rtol), replica_differences(maxima, self.rtol))
        if differing:
            self._report_parameters(trainer, [self._tensors[i] for i in parameters], differing, len(rows))
        differing_buffers = _merge(
            _buffer_differences(columns(buffers, 1), self.rtol),
            _buffer_differences(columns(buffers, 1 + count), self.rtol),
        )
        if differing_buffers:
            self._report_buffers(trainer, [self._tensors[i][0] for i in buffers], differing_buffers)

    def _report_parameters(
        self,
        trainer: pl.Trainer,
        entries: list[tuple[str, str, bool]],
        differing: list[TensorDifference],
        world_size: int,
    ) -> None:
        first = differing[0]
        name, _, trainable = entries[first.index]
        names = [entries[d.index][0] for d in differing]
        trained = [entry for entry in entries if entry[2]]
        trained_differing = [entries[d.index] for d in differing if entries[d.index][2]]
        if not trainable:
            cause = (
                "it is not trained (requires_grad=False), so code changes it in place on some ranks only: an EMA or "
                "statistic of the rank's own batch, an edit under `if self.global_rank == 0`/`trainer.is_global_zero`; "
                "all_reduce what it is computed from (or register it as a buffer, which DDP re-broadcasts), or list it "
                "in `ignore` if it is rank-local by design"
            )
        elif trained and len(trained_differing) == len(trained):
            cause = (
                "every trained parameter differs: the gradients are not all-reduced (a backward inside `no_sync()` on "
                "the batch where the optimizer steps, in manual optimization only the accumulating micro-batches go in "
                "`no_sync()`), or the model was re-initialised per rank after the strategy wrapped it"
            )
        else:
            cause = (
                "look for what touches these parameters on some ranks only: an in-place edit, clamp or renorm under a "
                "rank condition or from the rank's own batch; a re-initialisation after the strategy set the model up "
                "(in on_train_start/on_fit_start, with a per-rank seed): initialise in __init__ or configure_model; "
                "an optimizer stepped inside `no_sync()` (manual optimization); modules replaced after the wrap"
            )
        self._report(
            trainer,
            REPLICAS_OUT_OF_SYNC,
            Severity.ERROR,
            f"parameter '{name}' differs between data-parallel ranks: {first.describe()} (> rtol {self.rtol:g}); "
            f"{len(differing)} of {len(entries)} compared parameters differ: {_listing(names)}. The replicas now "
            "train different models",
            where=name,
            evidence={
                "relative_difference": first.relative,
                "norm_relative_difference": first.norm.relative if first.norm else 0.0,
                "max_abs_relative_difference": first.peak.relative if first.peak else 0.0,
                "parameters_differing": len(differing),
                "parameters_compared": len(entries),
                "rank_groups": first.rank_groups,
                "world_size": world_size,
            },
            hint=cause,
            magnitude=first.relative,
            dedupe_as=f"{REPLICAS_OUT_OF_SYNC}:parameters",
        )

    def _report_buffers(
        self, trainer: pl.Trainer, names: list[str], differing: list[TensorDifference]
    ) -> None:
        first = differing[0]
        if self._buffers_synced:
            why = (
                "the strategy copies rank 0's buffers to every rank before each synchronised forward, and the "
                "forward then updates it from each rank's own batch: only rank 0's updates last"
            )
        else:
            why = (
                "the strategy does not keep buffers equal (broadcast_buffers=False): each rank keeps its own"
            )
        self._report(
            trainer,
            REPLICAS_OUT_OF_SYNC,
            Severity.INFO,
            f"buffer '{names[first.index]}' differs between data-parallel ranks: {first.describe()}; "
            f"{len(differing)} buffers differ: {_listing([names[d.index] for d in differing])}; {why}",
            where=names[first.index],
            evidence={"relative_difference": first.relative, "buffers_differing": len(differing)},
            hint="if the buffer should pool every rank's data, all_reduce its update (batch norm: "
            "Trainer(sync_batchnorm=True)); if it is rank-local by design, list it in `ignore`",
            magnitude=first.relative,
            dedupe_as=f"{REPLICAS_OUT_OF_SYNC}:buffers",
        )


def _buffer_differences(fingerprints: Sequence[Sequence[float]], rtol: float) -> list[ReplicaDifference]:
    """:func:`replica_differences` for buffers (apart, so that the benchmark's calibration probe sees parameters only)."""
    return _differences(fingerprints, rtol)


add_to_presets(ReplicaSyncMonitor, ("fast", "full"), order=70)
