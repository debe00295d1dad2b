"""Data, networks and loss wrappers of the loss-input cases (``cases_losses.py``).

Example:
    >>> import torch
    >>> SoftTargetCrossEntropy(classes=3)(torch.zeros(2, 3), torch.tensor([0, 2])).item() > 0
    True
"""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from benchmarks.detection import zoo


# ====================================================================== data
def squeezed_diabetes_loaders(batch_size: int = 32, seed: int = 0) -> zoo.Loaders:
    """Standardised diabetes regression with targets of shape ``(N,)`` (not ``(N, 1)``)."""
    train, _ = zoo.diabetes_loaders(batch_size=batch_size, seed=seed)
    inputs, targets = train.dataset.tensors  # type: ignore[attr-defined]
    return zoo.make_loader(inputs, targets.squeeze(1), batch_size, True, seed), None


def positive_diabetes_loaders(batch_size: int = 32, seed: int = 0) -> zoo.Loaders:
    """Diabetes with standardised features and the raw target divided by 100 (0.25-3.5: non-negative)."""
    standardized, _ = zoo.diabetes_loaders(batch_size=batch_size, seed=seed)
    raw, _ = zoo.diabetes_loaders(batch_size=batch_size, scaled=False, seed=seed)
    inputs = standardized.dataset.tensors[0]  # type: ignore[attr-defined]
    targets = raw.dataset.tensors[1] / 100.0  # type: ignore[attr-defined]
    return zoo.make_loader(inputs, targets, batch_size, True, seed), None


def unit_diabetes_loaders(batch_size: int = 32, seed: int = 0) -> zoo.Loaders:
    """Diabetes with standardised features and the target min-max scaled into [0, 1]."""
    train, _ = zoo.diabetes_loaders(batch_size=batch_size, seed=seed)
    inputs, targets = train.dataset.tensors  # type: ignore[attr-defined]
    scaled = (targets - targets.min()) / (targets.max() - targets.min())
    return zoo.make_loader(inputs, scaled, batch_size, True, seed), None


@functools.cache
def _digit_parity() -> tuple[Tensor, Tensor]:
    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    inputs = (inputs - inputs.mean(0)) / inputs.std(0).clamp_min(1e-6)
    return inputs.view(-1, 1, 8, 8), torch.tensor(data.target % 2, dtype=torch.float32).unsqueeze(1)


def digit_parity_loaders(batch_size: int = 64, seed: int = 0) -> zoo.Loaders:
    """Is the digit odd? ``1x8x8`` standardised images, float targets ``(N, 1)``."""
    inputs, targets = _digit_parity()
    return zoo.make_loader(inputs, targets, batch_size, True, seed), None


def sequence_sum_loaders(n: int = 1024, length: int = 16, batch_size: int = 32, seed: int = 0) -> zoo.Loaders:
    """Synthetic float sequences ``(N, length, 3)``; the target ``(N,)`` is channel 0's standardised sum."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, length, 3, generator=generator)
    targets = inputs[:, :, 0].sum(dim=1) / length**0.5
    return zoo.make_loader(inputs, targets, batch_size, True, seed), None


# ====================================================================== networks and losses
class DigitsBinaryCNN(nn.Module):
    """A small conv net for ``1x8x8`` digits with one output (a logit, unless ``head`` adds more)."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 1)
        )
        self.head = head if head is not None else nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(images))


class SequenceRegressor(nn.Module):
    """A GRU over ``(N, T, F)`` sequences and a linear head with one output ``(N, 1)``."""

    def __init__(self, features: int = 3, hidden: int = 32, head: nn.Module | None = None) -> None:
        super().__init__()
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)
        self.head = head if head is not None else nn.Identity()

    def forward(self, sequences: Tensor) -> Tensor:
        outputs, _ = self.rnn(sequences)
        return self.head(self.out(outputs[:, -1]))


class SoftTargetCrossEntropy(nn.Module):
    """``cross_entropy`` against soft targets: the one-hot labels smoothed towards uniform (legitimate)."""

    def __init__(self, classes: int, smoothing: float = 0.2) -> None:
        super().__init__()
        self.classes = classes
        self.smoothing = smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        soft = nn.functional.one_hot(targets, self.classes).float() * (1 - self.smoothing)
        return nn.functional.cross_entropy(logits, soft + self.smoothing / self.classes)


class IgnoreSomeCrossEntropy(nn.Module):
    """``cross_entropy`` with class weights, label smoothing and ``ignore_index`` for every 4th label."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.linspace(0.5, 1.5, classes))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        masked = targets.clone()
        masked[::4] = -100
        return nn.functional.cross_entropy(
            logits, masked, weight=self.weight, ignore_index=-100, label_smoothing=0.1
        )
