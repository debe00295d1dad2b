"""Benchmark cases of ``WeightDecayMonitor``: weight decay far too strong for the learning rate, and
two healthy recipes with strong but ordinary decay (the nearest a healthy run comes to the threshold).

Example:
    >>> sorted(case.name for case in CASES)
    ['adamw-strong-decay-cnn', 'sgd-decay-copied-from-adamw', 'sgd-decay-resnet']
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo
from benchmarks.detection.cases import Built, Case
from benchmarks.detection.zoo_mutations import CANNOT_FIT

WEIGHT_DECAY_TOO_STRONG = "weight-decay-too-strong"


def _adamw_strong_decay_cnn() -> Built:
    """AdamW at a high lr with a ViT-style weight decay: 1e-3 of each weight decayed per step."""
    train, val = zoo.digits_loaders(batch_size=64, images=True, val_fraction=0.25)
    module = zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adamw", lr=5e-3, weight_decay=0.2)
    return module, train, val


def _sgd_decay_resnet() -> Built:
    """The ImageNet recipe's decay on the residual CNN: SGD 0.05, momentum 0.9, weight decay 5e-4 (2.5e-4 per step)."""
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    module = zoo.ZooModule(
        zoo.ResNetDigits(), nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4
    )
    return module, train, val


def _sgd_decay_copied_from_adamw() -> Built:
    """An MLP moved from AdamW to SGD keeping AdamW's weight decay 0.1: with lr 0.1 and momentum 0.9
    each step decays 10% of every weight."""
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64, 128, 64, 10])
    module = zoo.ZooModule(network, nn.CrossEntropyLoss(), "sgd", lr=0.1, momentum=0.9, weight_decay=0.1)
    return module, train, val


CASES: tuple[Case, ...] = (
    Case(
        "adamw-strong-decay-cnn",
        True,
        frozenset(),
        _adamw_strong_decay_cnn,
        "BatchNorm CNN on digits, AdamW lr 5e-3 with weight decay 0.2 (1e-3 of each weight per step)",
        {"max_steps": 200},
        fast=True,
    ),
    Case(
        "sgd-decay-resnet",
        True,
        frozenset(),
        _sgd_decay_resnet,
        "residual CNN on digits, SGD 0.05 momentum 0.9 with weight decay 5e-4 (2.5e-4 per step)",
        {"max_steps": 200},
    ),
    Case(
        "sgd-decay-copied-from-adamw",
        False,
        CANNOT_FIT | {WEIGHT_DECAY_TOO_STRONG},
        _sgd_decay_copied_from_adamw,
        "MLP on digits, SGD 0.1 momentum 0.9 with AdamW's weight decay 0.1 kept: 10% of each weight decayed per step",
        {"max_steps": 200},
        fast=True,
    ),
)
