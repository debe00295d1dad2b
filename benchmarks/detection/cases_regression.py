"""Long regression runs (3000 optimizer steps) with a linear head, on standardised and on raw-unit
targets, that converge and stay converged; and a late fault: a training set so small that the network
overfits it (the validation MSE climbs while the training MSE goes to 0).

The relative rules (divergence, oscillation, overfitting, gradient spikes) must not depend on the
target's units: the unscaled run's MSE starts near 4000, the scaled one's near 1.7.

Example:
    >>> sorted(case.name for case in CASES if case.healthy)
    ['long-3000-regression-scaled', 'long-3000-regression-unscaled']
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.detection import zoo, zoo_long
from benchmarks.detection.cases import Built, Case

LONG = 3000
_QUIET: frozenset[str] = frozenset()


def _wave_regression(unscaled: bool) -> Built:
    train, val = zoo_long.wave_regression_loaders(unscaled=unscaled)
    network = zoo.mlp([8, 64, 64, 1])
    if unscaled:
        zoo_long.centred_head_(network, train)
    lr = 1e-2 if unscaled else 1e-3  # unscaled targets (std ~65) need a larger step to scale the output
    module = zoo.ZooModule(
        network, nn.MSELoss(), "adam", lr=lr, lr_lambda=zoo_long.schedule_factor("cosine", LONG)
    )
    return module, train, val


def _small_regression_overfits() -> Built:
    train, val = zoo_long.wave_regression_loaders(train_size=64, batch_size=16)
    targets = train.dataset.tensors[1]  # type: ignore[attr-defined]
    # measurement noise of the target's own size: 64 samples are memorised noise and all
    targets.add_(torch.randn(targets.shape, generator=torch.Generator().manual_seed(1)) * targets.std())
    return zoo.ZooModule(zoo.mlp([8, 256, 256, 1]), nn.MSELoss(), "adam", lr=1e-3), train, val


CASES: tuple[Case, ...] = (
    Case(
        "long-3000-regression-scaled",
        True,
        _QUIET,
        lambda: _wave_regression(unscaled=False),
        "MLP with a linear head on a smooth synthetic regression (standardised scale), MSE, Adam with cosine "
        "to 0, validation every epoch, 3000 steps",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-regression-unscaled",
        True,
        _QUIET,
        lambda: _wave_regression(unscaled=True),
        "the same regression with its target in raw units (mean 150, std ~65: MSE ~4000 at the start), the "
        "linear head's bias set to the target mean, Adam 1e-2 with cosine to 0",
        {"max_steps": LONG},
    ),
    Case(
        "late-small-regression-overfits",
        False,
        frozenset({"overfitting"}),
        _small_regression_overfits,
        "MLP 8-256-256-1 on 64 noisy samples (target noise as large as the target) of the synthetic regression "
        "for 3000 steps: the validation MSE turns up while the training MSE goes to ~0",
        {"max_steps": LONG, "check_val_every_n_epoch": 10},
    ),
)
