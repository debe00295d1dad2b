"""Learning-curve cases: loss not decreasing, diverging, oscillating, overfitting, and healthy curves
that must not alarm (noisy small batches, cosine warm restarts, long runs with validation).

Example:
    >>> [case.name for case in CASES if case.fast]
    ['lr-1e-8-no-progress', 'gradient-ascent-sign-flip']
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_curves
from benchmarks.detection.cases import EXPLODING, Built, Case

NOT_DECREASING = "loss-not-decreasing"
DIVERGENCE = "loss-divergence"
OSCILLATION = "loss-oscillation"
OVERFITTING = "overfitting"
_QUIET: frozenset[str] = frozenset()


# ---------------------------------------------------------------------- healthy
def _noisy_small_batches() -> Built:
    train, val = zoo.digits_loaders(batch_size=8)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _noisy_small_batches_sgd() -> Built:
    train, val = zoo.digits_loaders(batch_size=8)
    module = zoo.ZooModule(zoo.mlp([64, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=0.01, momentum=0.9)
    return module, train, val


def _warm_restarts() -> Built:
    train, val = zoo.digits_loaders(batch_size=32)
    module = zoo_curves.WarmRestartModule(
        zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9, period=60
    )
    return module, train, val


def _long_with_validation() -> Built:
    train, val = zoo.digits_loaders(batch_size=32, val_fraction=0.25)
    network = zoo.mlp([64, 128, 64, 10], dropout=0.2)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adamw", lr=1e-3, weight_decay=1e-2), train, val


def _regression_validation() -> Built:
    train, val = zoo.diabetes_loaders(batch_size=16, val_fraction=0.25)
    return zoo.ZooModule(zoo.mlp([10, 32, 1]), nn.MSELoss(), "adam", lr=1e-3, weight_decay=1e-3), train, val


# ---------------------------------------------------------------------- faulty
def _lr_tiny() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-8), train, val


def _gradient_ascent() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return (
        zoo_curves.AscentModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3),
        train,
        val,
    )


def _sgd_bce_too_fast() -> Built:
    train, val = zoo.breast_cancer_loaders(batch_size=32)
    module = zoo.ZooModule(zoo.mlp([30, 32, 1]), nn.BCEWithLogitsLoss(), "sgd", lr=0.5, momentum=0.9)
    return module, train, val


def _tiny_train_set() -> Built:
    train, val = zoo_curves.small_digits_loaders(train_size=40, val_size=400, batch_size=8)
    return zoo.ZooModule(zoo.mlp([64, 256, 256, 10]), nn.CrossEntropyLoss(), "adam", lr=3e-3), train, val


CASES: tuple[Case, ...] = (
    Case(
        "noisy-batch8-adam-long",
        True,
        _QUIET,
        _noisy_small_batches,
        "MLP on digits with batches of 8 (noisy losses), Adam 1e-3, 600 steps",
        {"max_steps": 600},
    ),
    Case(
        "noisy-batch8-sgd-long",
        True,
        _QUIET,
        _noisy_small_batches_sgd,
        "MLP on digits with batches of 8, SGD 0.01 momentum 0.9, 600 steps: very noisy but learning",
        {"max_steps": 600},
    ),
    Case(
        "cosine-warm-restarts",
        True,
        _QUIET,
        _warm_restarts,
        "MLP on digits, SGD 0.05 momentum 0.9, cosine schedule restarting every 60 steps (loss bumps at restarts)",
        {"max_steps": 300},
    ),
    Case(
        "long-run-with-validation",
        True,
        _QUIET,
        _long_with_validation,
        "MLP with dropout and weight decay on 75% of digits, validation every epoch, 500 steps",
        {"max_steps": 500},
    ),
    Case(
        "regression-validation-long",
        True,
        _QUIET,
        _regression_validation,
        "small regression MLP on diabetes with validation every epoch, Adam 1e-3, 400 steps",
        {"max_steps": 400},
    ),
    Case(
        "lr-1e-8-no-progress",
        False,
        frozenset({NOT_DECREASING}),
        _lr_tiny,
        "MLP on digits with Adam lr=1e-8 (meant 1e-3): the loss stays at ln(10)",
        {"max_steps": 150},
        fast=True,
    ),
    Case(
        "gradient-ascent-sign-flip",
        False,
        frozenset({DIVERGENCE}),
        _gradient_ascent,
        "manual optimization that back-propagates -loss while logging loss: gradient ascent, the loss climbs",
        {"max_steps": 150},
        fast=True,
    ),
    Case(
        "sgd-bce-lr-too-high",
        False,
        frozenset({DIVERGENCE, OSCILLATION, EXPLODING}),
        _sgd_bce_too_fast,
        "BCE classifier on breast_cancer with SGD lr=0.5 momentum 0.9 (meant 0.005): finite but the loss jumps "
        "and climbs back from 0.1 to ~1",
        {"max_steps": 150},
    ),
    Case(
        "tiny-train-set-overfits",
        False,
        frozenset({OVERFITTING}),
        _tiny_train_set,
        "MLP trained 150 epochs on 40 digits with a 400-sample validation set every 5 epochs: validation loss "
        "turns up while the training loss goes to 0",
        {"max_steps": 750, "max_epochs": 150, "check_val_every_n_epoch": 5},
    ),
)
