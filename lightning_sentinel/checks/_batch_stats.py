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


class FeatureMoments:
    """Per-feature count, mean and sum of squared deviations, merged batch by batch on the device
    (Chan et al.'s parallel update, stable in float32). A batch holding NaN/Inf is left out."""

    def __init__(self) -> None:
        self.count: Tensor | None = None
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.absmax: Tensor | None = None

    @property
    def features(self) -> int:
        return 0 if self.mean is None else int(self.mean.numel())

    @property
    def std(self) -> Tensor:
        assert self.m2 is not None and self.count is not None
        return (self.m2 / self.count.clamp_min(1.0)).clamp_min(0.0).sqrt()

    def update(self, x: Tensor) -> None:
        """Merge the batch ``x`` (reduced over :func:`feature_dims`)."""
        dims = feature_dims(x)
        values = x.detach().float()
        if values.dim() == 1:
            values = values.unsqueeze(1)
        var, mean = torch.var_mean(values, dim=dims, correction=0)
        mean, var = mean.reshape(-1), var.reshape(-1)
        absmax = values.abs().amax(dim=dims).reshape(-1)
        n = float(values.numel() // max(mean.numel(), 1))
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
        weight = finite.float() * n
        self.to(mean.device)
        if self.mean is None or self.mean.shape != mean.shape:
            zero = torch.zeros_like(mean)
            self.count = weight
            self.mean = torch.where(finite, mean, zero)
            self.m2 = torch.where(finite, var * n, zero)
            self.absmax = torch.where(finite, absmax, zero)
            return
        assert self.count is not None and self.m2 is not None and self.absmax is not None
        total = self.count + weight
        delta = torch.where(finite, mean - self.mean, torch.zeros_like(mean))
        share = weight / total.clamp_min(1.0)
        self.m2 = (
            self.m2
            + torch.where(finite, var * n, torch.zeros_like(var))
            + delta.square() * self.count * share
        )
        self.mean = self.mean + delta * share
        self.absmax = torch.where(finite, torch.maximum(self.absmax, absmax), self.absmax)
        self.count = total

    def state(self) -> dict[str, Any]:
        """CPU copies for a checkpoint."""
        if self.mean is None:
            return {}
        assert self.count is not None and self.m2 is not None and self.absmax is not None
        return {name: getattr(self, name).detach().cpu() for name in ("count", "mean", "m2", "absmax")}

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (tensors go to the device of the next batch as they merge)."""
        if state:
            self.count, self.mean, self.m2, self.absmax = (
                state[k] for k in ("count", "mean", "m2", "absmax")
            )

    def to(self, device: torch.device) -> None:
        """Move the accumulators to ``device`` (after a resume onto an accelerator)."""
        if self.mean is not None and self.mean.device != device:
            for name in ("count", "mean", "m2", "absmax"):
                setattr(self, name, getattr(self, name).to(device))


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
