"""Data and modules of the preflight cases: labels that do not belong to their inputs, inputs lost in
``training_step``, and a model regularised so hard that it cannot fit anything.

Example:
    >>> train, _ = permuted_label_digits_loaders()
    >>> inputs, targets = next(iter(train))
    >>> tuple(inputs.shape), int(targets.max()) <= 9
    ((64, 64), True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.detection import zoo


def permuted_label_digits_loaders(images: bool = False, seed: int = 0) -> zoo.Loaders:
    """Digits whose labels were permuted once across the data set, independently of the inputs
    (the bug: shuffling the label array and the feature array separately)."""
    train, _ = zoo.digits_loaders(batch_size=64, images=images, seed=seed)
    inputs, targets = train.dataset.tensors  # type: ignore[attr-defined]
    permuted = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed + 1))]
    return zoo.make_loader(inputs, permuted, batch_size=64, seed=seed), None


class MaskedInputModule(zoo.ZooModule):
    """A ``ZooModule`` whose ``training_step`` applies a padding mask built with the wrong polarity:
    ``inputs * (inputs == pad)`` with ``pad=-100`` keeps nothing, so every input reaching the network is 0."""

    pad_value = -100.0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = zoo.split_batch(batch)
        mask = (inputs == self.pad_value).to(inputs.dtype)  # the bug: should be ``inputs != pad``
        loss = self.loss(self(inputs * mask), targets)
        self.log("train_loss", loss, batch_size=len(targets))
        return loss


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """A fresh (uncached) ReLU MLP with dropout after each hidden layer."""
    layers: list[nn.Module] = []
    for index in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[index], sizes[index + 1]))
        if index < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class DropoutCNN(nn.Module):
    """Two conv-ReLU-dropout blocks, max-pooling and a linear head for ``1x8x8`` digits (no BatchNorm)."""

    def __init__(self, channels: int = 16, classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 16, classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)
