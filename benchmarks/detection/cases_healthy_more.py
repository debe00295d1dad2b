"""More healthy runs that must stay quiet: long runs (2000 steps), an LR warm-up followed by cosine
annealing with restarts, and manual optimization with two optimizers.

Example:
    >>> all(case.healthy for case in CASES)
    True
    >>> max(case.trainer_kwargs["max_steps"] for case in CASES) >= 2000
    True
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_real_faults
from benchmarks.detection.cases import Built, Case

_QUIET: frozenset[str] = frozenset()


def _long_tiny_breast_cancer() -> Built:
    train, val = zoo.breast_cancer_loaders(batch_size=32)
    return zoo.ZooModule(zoo.mlp([30, 8, 1]), nn.BCEWithLogitsLoss(), "adam", lr=1e-3), train, val


def _long_tiny_digits_validation() -> Built:
    train, val = zoo.digits_loaders(batch_size=32, val_fraction=0.25)
    network = zoo.mlp([64, 32, 10], dropout=0.2)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adamw", lr=1e-3, weight_decay=1e-2), train, val


def _warmup_cosine_restarts() -> Built:
    train, val = zoo.digits_loaders(batch_size=32)
    module = zoo_real_faults.WarmupCosineRestartsModule(
        zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9, warmup=30, period=100
    )
    return module, train, val


def _two_optimizers() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    body = zoo.mlp([64, 128, 64], final_activation=True)
    module = zoo_real_faults.TwoOptimizerModule(body, nn.Linear(64, 10), nn.CrossEntropyLoss())
    return module, train, val


CASES: tuple[Case, ...] = (
    Case(
        "long-2000-tiny-bce",
        True,
        _QUIET,
        _long_tiny_breast_cancer,
        "tiny 30-8-1 classifier on breast_cancer, Adam 1e-3, 2000 steps (~114 epochs) to a near-zero loss",
        {"max_steps": 2000},
    ),
    Case(
        "long-2000-tiny-digits-validation",
        True,
        _QUIET,
        _long_tiny_digits_validation,
        "64-32-10 MLP with dropout 0.2 and weight decay on 75% of digits, validation every epoch, 2000 steps",
        {"max_steps": 2000},
    ),
    Case(
        "warmup-cosine-restarts-sgd",
        True,
        _QUIET,
        _warmup_cosine_restarts,
        "SGD 0.05 momentum 0.9 with a 30-step linear warm-up from 1%, then cosine annealing restarting every "
        "100 steps",
        {"max_steps": 430},
    ),
    Case(
        "two-optimizers-manual",
        True,
        _QUIET,
        _two_optimizers,
        "manual optimization with two optimizers (AdamW body, SGD momentum head), both zeroed and stepped, "
        "validation every epoch",
        {"max_steps": 150},
        fast=True,
    ),
)
