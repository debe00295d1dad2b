"""Models and data of the learning-curve cases: gradient ascent, a tiny train set, warm restarts.

Example:
    >>> train, val = small_digits_loaders(train_size=40)
    >>> len(train.dataset), len(val.dataset)
    (40, 400)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.detection import zoo


def small_digits_loaders(train_size: int = 40, val_size: int = 400, batch_size: int = 8, seed: int = 0):
    """A ``train_size``-sample digits training set and a ``val_size``-sample validation set (standardised)."""
    inputs, targets = zoo._digits("standardized")
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx = order[:train_size], order[train_size : train_size + val_size]
    train = zoo.make_loader(inputs[train_idx], targets[train_idx], batch_size, True, seed)
    val = zoo.make_loader(inputs[val_idx], targets[val_idx], 100, False, seed)
    return train, val


class AscentModule(zoo.ZooModule):
    """Manual optimization that back-propagates ``-loss`` (a sign flipped when porting a "maximise the
    log-likelihood" objective) while returning and logging the loss itself: gradient ascent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = self._step(batch, "train")
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(-loss)  # the bug
        optimizer.step()  # type: ignore[union-attr]
        return loss


class WarmRestartModule(zoo.ZooModule):
    """``ZooModule`` with SGD and a cosine schedule with warm restarts every ``period`` optimizer steps."""

    def __init__(self, *args: Any, period: int = 60, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.period = period

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=self.period)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def mlp_classifier(sizes: list[int], dropout: float = 0.0) -> nn.Module:
    """``zoo.mlp`` (kept here so the cases read as one place)."""
    return zoo.mlp(sizes, dropout=dropout)


__all__ = ["AscentModule", "DataLoader", "WarmRestartModule", "mlp_classifier", "small_digits_loaders"]
