"""Device-side statistics of batches for :class:`~lightning_sentinel.checks.data.BatchInspector`.

Everything returns tensors on the batch's device; nothing here reads a value back to the host.

Example:
    >>> import torch
    >>> moments = FeatureMoments()
    >>> moments.update(torch.tensor([[0.0, 10.0], [2.0, 10.0]]))
    >>> moments.update(torch.tensor([[4.0, 10.0]]))
    >>> moments.mean.tolist(), moments.std.tolist(), moments.count.item()
    ([2.0, 10.0], [1.632993221282959, 0.0], 3.0)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def feature_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions reduced to get per-feature statistics: images ``(N, C, H, W[, D])`` per channel,
    tabular ``(N, F)`` per feature, sequences ``(N, T, F)`` per last-dim feature, ``(N,)`` as one feature.

    Example:
        >>> feature_dims(torch.zeros(8, 3, 4, 4)), feature_dims(torch.zeros(8, 5)), feature_dims(torch.zeros(8, 2, 3))
        ((0, 2, 3), (0,), (0, 1))
    """
    if x.dim() in (4, 5):
        return (0, *range(2, x.dim()))
    if x.dim() == 3:
        return (0, 1)
    if x.dim() <= 2:
        return (0,)
    return tuple(range(x.dim()))


def feature_axis(x: Tensor) -> str:
    """What one feature of ``x`` is called in messages: ``channel`` for images, else ``feature``."""
    return "channel" if x.dim() in (4, 5) else "feature"


def non_finite_count(x: Tensor) -> Tensor:
    """The number of NaN/Inf values in ``x``, as a device scalar.

    ``x - x`` is 0 for every finite value and NaN for NaN and +-Inf: on the CPU this is about twice
    as fast as ``(~torch.isfinite(x)).sum()``.

    Example:
        >>> int(non_finite_count(torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])))
        3
    """
    x = x.detach()
    return torch.isnan(x - x).sum()


class FeatureMoments:
    """Per-feature count, mean, std and max ``|x|``, accumulated batch by batch on the device.

    Sums of ``x - shift`` and of its square are accumulated, ``shift`` being the first batch's mean
    (which keeps float32 sums accurate for data far from zero). A batch holding NaN/Inf is left out.
    """

    _FIELDS = ("count", "shift", "sums", "absmax")

    def __init__(self) -> None:
        self.count: Tensor | None = None  # a device scalar: samples merged per feature
        self.shift: Tensor | None = None  # (F,)
        self.sums: Tensor | None = None  # (2, F): sum of (x - shift), sum of (x - shift)^2
        self.absmax: Tensor | None = None  # (F,)

    @property
    def features(self) -> int:
        return 0 if self.shift is None else int(self.shift.numel())

    @property
    def mean(self) -> Tensor | None:
        if self.sums is None:
            return None
        assert self.count is not None and self.shift is not None
        return self.shift + self.sums[0] / self.count.clamp_min(1.0)

    @property
    def std(self) -> Tensor:
        assert self.sums is not None and self.count is not None
        n = self.count.clamp_min(1.0)
        centred = self.sums[0] / n
        return (self.sums[1] / n - centred.square()).clamp_min(0.0).sqrt()

    def update(self, x: Tensor) -> None:
        """Merge the batch ``x`` (reduced over :func:`feature_dims`)."""
        values = x.detach().float()
        if values.dim() == 1:
            values = values.unsqueeze(1)
        dims = feature_dims(values)
        width = values.numel() // max(1, math.prod(values.shape[d] for d in dims))
        self.to(values.device)
        if self.shift is None or self.shift.numel() != width:
            self.shift = torch.nan_to_num(values.mean(dim=dims).reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
            self.count = torch.zeros((), device=values.device)
            self.sums = torch.zeros(2, width, device=values.device)
            self.absmax = torch.zeros(width, device=values.device)
        assert self.count is not None and self.sums is not None and self.absmax is not None
        shape = [1] * values.dim()
        kept = [d for d in range(values.dim()) if d not in dims]
        if kept:
            shape[kept[0]] = width
        centred = values - self.shift.view(shape)
        batch = torch.stack([centred.sum(dim=dims).reshape(-1), centred.square().sum(dim=dims).reshape(-1)])
        finite = torch.isfinite(batch).all()
        self.sums += torch.where(finite, batch, 0.0)
        self.count += finite.float() * float(values.numel() // width)
        self.absmax = torch.where(
            finite, torch.maximum(self.absmax, values.abs().amax(dim=dims).reshape(-1)), self.absmax
        )

    def state(self) -> dict[str, Any]:
        """CPU copies for a checkpoint."""
        if self.shift is None:
            return {}
        return {name: getattr(self, name).detach().cpu() for name in self._FIELDS}

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (moved to the device of the next batch as it merges)."""
        if state:
            for name in self._FIELDS:
                setattr(self, name, state[name])

    def to(self, device: torch.device) -> None:
        """Move the accumulators to ``device`` (after a resume onto an accelerator)."""
        if self.shift is not None and self.shift.device != device:
            for name in self._FIELDS:
                setattr(self, name, getattr(self, name).to(device))


def pooled_moments(moments: FeatureMoments, device: torch.device) -> FeatureMoments:
    """``moments`` pooled over every rank of the default process group (all ranks must call this together).

    Each rank contributes its count, ``count * mean`` and ``count * E[x^2]`` (summed, in float64) and
    its ``max |x|`` (maxed); a rank that has seen no float inputs contributes zeros but still takes
    part. Returns a new :class:`FeatureMoments` (its shift is the pooled mean); the local accumulators
    are left as they are, so the next window pools them again without counting anything twice.
    """
    import torch.distributed as dist

    width = torch.tensor([float(moments.features)], device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)  # every rank learns the feature count, even an empty one
    features = int(width.item())
    packed = torch.zeros(1 + 2 * features, dtype=torch.float64, device=device)
    absmax = torch.zeros(features, device=device)
    if features and moments.features == features and moments.count is not None:
        assert moments.mean is not None and moments.absmax is not None
        count = moments.count.to(device, torch.float64).view(1)
        mean = moments.mean.to(device, torch.float64)
        second = moments.std.to(device, torch.float64).square() + mean.square()
        packed = torch.cat([count, count * mean, count * second])
        absmax = moments.absmax.to(device)
    dist.all_reduce(packed)
    dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
    total = packed[0]
    mean = packed[1 : 1 + features] / total.clamp_min(1.0)
    variance = (packed[1 + features :] / total.clamp_min(1.0) - mean.square()).clamp_min(0.0)
    pooled = FeatureMoments()
    pooled.count = total.float()
    pooled.shift = mean.float()
    pooled.sums = torch.stack([torch.zeros_like(variance), variance * total]).float()
    pooled.absmax = absmax
    return pooled


_WEIGHTS: dict[tuple[int, torch.device], Tensor] = {}


def fingerprint(x: Tensor) -> Tensor:
    """Four floats that summarise the *content* of a batch, whatever the order of its samples.

    Each sample is projected on a fixed pseudo-random positive vector; the batch's fingerprint is the
    sum, sum of squares, min and max of those projections. Identical content (also reshuffled) gives an
    identical fingerprint; different data practically never does.

    Example:
        >>> a = torch.arange(12.0).view(4, 3)
        >>> torch.equal(fingerprint(a), fingerprint(a.flip(0))), torch.equal(fingerprint(a), fingerprint(a + 1))
        (True, False)
    """
    flat = x.detach().reshape(x.shape[0] if x.dim() else 1, -1).float()
    width = flat.shape[1]
    key = (width, flat.device)
    weights = _WEIGHTS.get(key)
    if weights is None:
        positions = torch.arange(width, dtype=torch.float64)
        weights = (1.0 + torch.frac(positions * 0.6180339887498949)).float().to(flat.device) / max(width, 1)
        _WEIGHTS[key] = weights
    projections = flat @ weights
    return torch.stack(
        [projections.sum(), projections.square().sum(), projections.amin(), projections.amax()]
    )


def label_counts(labels: Tensor, bins: int) -> Tensor:
    """Counts of the labels ``0..bins-1`` and, last, of labels ``>= bins``; negative labels
    (``ignore_index``) are not counted.

    Example:
        >>> label_counts(torch.tensor([0, 2, 2, -100, 7]), bins=4).tolist()
        [1.0, 0.0, 2.0, 0.0, 1.0]
    """
    flat = labels.detach().reshape(-1).long()
    index = flat.clamp(min=-1, max=bins) + 1  # -1: ignored, bins: overflow
    counts = torch.zeros(bins + 2, dtype=torch.float32, device=flat.device)
    counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
    return counts[1:]
