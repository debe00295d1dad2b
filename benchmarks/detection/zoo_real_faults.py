"""Pieces of the real-fault cases: bugs reported again and again on Stack Overflow and GitHub,
re-implemented on the zoo's small models and bundled data (and pieces of the extra healthy runs).

Example:
    >>> head = SoftmaxSingleUnit()
    >>> head(torch.tensor([[-3.0], [5.0]])).tolist()
    [[1.0], [1.0]]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.detection import zoo


# ====================================================================== broken pieces
class SoftmaxSingleUnit(nn.Module):
    """``softmax(dim=1)`` over a binary classifier's *single* output unit: every output is exactly 1,
    so ``BCELoss`` is constant and no gradient flows (the classic "my binary model predicts 1 for
    everything" question)."""

    def forward(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1)


class LogSoftmaxOverBatch(nn.Module):
    """``log_softmax(dim=0)``: normalises each class over the *batch* instead of each row over the
    classes (``dim`` left at 0 for ``(N, C)`` outputs)."""

    def forward(self, logits: Tensor) -> Tensor:
        return torch.log_softmax(logits, dim=0)


class Exp(nn.Module):
    """``torch.exp`` as a hidden activation (meant to keep features positive): it overflows to inf once
    a pre-activation passes ~88 in float32."""

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.exp(inputs)


def freeze_all_but_batch_norm_(network: nn.Module) -> nn.Module:
    """The inverted freezing loop: meant to freeze the batch-norm layers of a network, it freezes
    everything else (``requires_grad = isinstance(module, BatchNorm)``); returns ``network``."""
    for module in network.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(is_norm)
    return network


class NoZeroGradModule(zoo.ZooModule):
    """Manual optimization whose ``training_step`` never calls ``optimizer.zero_grad()``: each step's
    gradient is the sum of every gradient so far, so the steps grow and keep pointing the old way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = self._step(batch, "train")
        self.manual_backward(loss)  # the bug: no optimizer.zero_grad() before (or after) this
        optimizer.step()  # type: ignore[union-attr]
        return loss


# ====================================================================== healthy pieces
class TwoOptimizerModule(zoo.ZooModule):
    """Manual optimization with two optimizers: AdamW for the body, SGD with momentum for the head,
    each zeroed, stepped and scheduled by hand (as in GAN or actor-critic code)."""

    def __init__(self, body: nn.Module, head: nn.Module, loss: nn.Module) -> None:
        super().__init__(nn.Sequential(body, head), loss)
        self.body, self.head = body, head
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        body_optimizer, head_optimizer = self.optimizers()  # type: ignore[misc]
        loss = self._step(batch, "train")
        body_optimizer.zero_grad()
        head_optimizer.zero_grad()
        self.manual_backward(loss)
        body_optimizer.step()
        head_optimizer.step()
        return loss

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.AdamW(self.body.parameters(), lr=1e-3, weight_decay=1e-2),
            torch.optim.SGD(self.head.parameters(), lr=0.05, momentum=0.9),
        )


class WarmupCosineRestartsModule(zoo.ZooModule):
    """SGD with a linear warm-up from 1% over ``warmup`` steps, then cosine annealing restarting every
    ``period`` steps (``SequentialLR`` of ``LinearLR`` and ``CosineAnnealingWarmRestarts``)."""

    def __init__(self, *args: Any, warmup: int = 30, period: int = 100, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup, self.period = warmup, period

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=self.warmup)
        restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=self.period)
        scheduler = torch.optim.lr_scheduler.SequentialLR(
            optimizer, [warmup, restarts], milestones=[self.warmup]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ====================================================================== data
def diabetes_raw_target_loaders(batch_size: int = 32, seed: int = 0) -> zoo.Loaders:
    """Diabetes with standardised features but the raw target (disease progression 25-346, shape ``(N, 1)``)."""
    features, _ = zoo._diabetes(True)
    _, raw_targets = zoo._diabetes(False)
    return zoo.make_loader(features, raw_targets, batch_size, True, seed), None
