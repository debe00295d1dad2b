"""Real faults: re-implementations of bugs that Stack Overflow and GitHub issues report again and again.

Several of the classic ones already have cases elsewhere (labels shuffled apart from the inputs:
``permuted-labels-*``; ReLU output on signed targets: ``clipped-relu-*``; flipped loss sign:
``gradient-ascent-sign-flip``; constant init: ``constant-init-*``; probabilities into a loss that
expects logits: ``softmax-before-ce-*``, ``sigmoid-before-bce-logits-*``). This module adds the rest.

Example:
    >>> [case.name for case in CASES][:2]
    ['softmax-single-unit-bce', 'sigmoid-unscaled-regression']
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_real_faults
from benchmarks.detection.cases import (
    EXPLODING,
    NON_FINITE_ACTIVATION,
    NON_FINITE_GRADIENTS,
    NON_FINITE_LOSS,
    NON_FINITE_WEIGHTS,
    Built,
    Case,
)

NON_FINITE = (NON_FINITE_LOSS, NON_FINITE_GRADIENTS, NON_FINITE_WEIGHTS, NON_FINITE_ACTIVATION)
# right diagnoses of a learning rate far too high (as in the core and wiring cases)
LR_HIGH = frozenset(
    {*NON_FINITE, EXPLODING, "update-ratio-too-high", "loss-divergence", "loss-oscillation", "dead-relu"}
)
# right diagnoses of training that cannot move: no gradient reaches the weights that matter
STUCK = frozenset({"frozen-parameters", "cannot-overfit-batch", "loss-not-decreasing"})


def _softmax_single_unit() -> Built:
    train, val = zoo.breast_cancer_loaders(batch_size=32)
    network = nn.Sequential(zoo.mlp([30, 32, 1]), zoo_real_faults.SoftmaxSingleUnit())
    return zoo.ZooModule(network, nn.BCELoss(), "adam", lr=3e-3), train, val


def _sigmoid_unscaled_regression() -> Built:
    train, val = zoo_real_faults.diabetes_raw_target_loaders()
    network = nn.Sequential(zoo.mlp([10, 64, 1]), nn.Sigmoid())
    return zoo.ZooModule(network, nn.MSELoss(), "adam", lr=3e-3), train, val


def _sgd_unscaled_regression() -> Built:
    train, val = zoo_real_faults.diabetes_raw_target_loaders()
    return zoo.ZooModule(zoo.mlp([10, 64, 1]), nn.MSELoss(), "sgd", lr=0.01), train, val


def _softmax_over_batch() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = nn.Sequential(zoo.mlp([64, 128, 10]), zoo_real_faults.LogSoftmaxOverBatch())
    return zoo.ZooModule(network, nn.NLLLoss(), "adam", lr=1e-3), train, val


def _no_zero_grad() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    module = zoo_real_faults.NoZeroGradModule(
        zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=0.05
    )
    return module, train, val


def _exp_activation() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64, 128, 64, 10], activation=zoo_real_faults.Exp)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-2), train, val


def _only_batch_norm_trains() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo_real_faults.freeze_all_but_batch_norm_(zoo.DigitsCNN())
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


CASES: tuple[Case, ...] = (
    Case(
        "softmax-single-unit-bce",
        False,
        STUCK,
        _softmax_single_unit,
        "binary classifier with one output unit passed through softmax(dim=1) into BCELoss: every output is 1, "
        "no gradient flows",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "sigmoid-unscaled-regression",
        False,
        frozenset({"clipped-output"}),
        _sigmoid_unscaled_regression,
        "regression ending in a sigmoid on the raw diabetes target (25-346): the output can never reach it",
        {"max_steps": 60},
    ),
    Case(
        "sgd-unscaled-regression",
        False,
        LR_HIGH,
        _sgd_unscaled_regression,
        "SGD lr 0.01 with MSE on the raw diabetes target (variance ~6000): the first gradients are huge, "
        "the weights blow up",
        {"max_steps": 60},
    ),
    Case(
        "log-softmax-over-batch",
        False,
        frozenset({"batch-mixing", "nll-on-logits"}),
        _softmax_over_batch,
        "classifier ending in log_softmax(dim=0) into NLLLoss: each class normalised over the batch, "
        "not each row over the classes",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "manual-optimization-no-zero-grad",
        False,
        LR_HIGH | {"gradients-not-zeroed"},
        _no_zero_grad,
        "manual optimization that never calls optimizer.zero_grad(): gradients pile up step after step",
        {"max_steps": 100},
    ),
    Case(
        "exp-activation-overflow",
        False,
        frozenset({*NON_FINITE, EXPLODING}),
        _exp_activation,
        "MLP with torch.exp as hidden activation, Adam 1e-2: pre-activations pass ~88 and exp overflows to inf",
        {"max_steps": 60},
    ),
    Case(
        "only-batch-norm-trains-cnn",
        False,
        STUCK | {"model-ignores-input"},
        _only_batch_norm_trains,
        "CNN whose freezing loop is inverted: every weight frozen except the batch-norm scales and shifts",
        {"max_steps": 100},
    ),
)
