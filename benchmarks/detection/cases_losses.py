"""Detection cases of :class:`~lightning_sentinel.checks.loss_inputs.LossInputCheck`: what the loss receives.

Example:
    >>> sorted({case.name for case in CASES if case.fast})[:2]
    ['broadcast-mse-mlp', 'clipped-relu-regression']
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_losses
from benchmarks.detection.cases import Built, Case

SOFTMAX_BEFORE_CE = "softmax-before-cross-entropy"
NLL_ON_LOGITS = "nll-on-logits"
SIGMOID_BEFORE_BCE = "sigmoid-before-bce-with-logits"
LOSS_BROADCAST = "loss-broadcast"
CLIPPED_OUTPUT = "clipped-output"
_QUIET: frozenset[str] = frozenset()


# ====================================================================== healthy builders
def _ce_smoothing_weights_ignore() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    loss = zoo_losses.IgnoreSomeCrossEntropy(classes=10)
    return zoo.ZooModule(zoo.mlp([64, 128, 10]), loss, "adam", lr=1e-3), train, val


def _ce_soft_targets() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    loss = zoo_losses.SoftTargetCrossEntropy(classes=10)
    return zoo.ZooModule(zoo.DigitsCNN(), loss, "adam", lr=2e-3), train, val


def _bce_on_probabilities() -> Built:
    train, val = zoo.breast_cancer_loaders(batch_size=32)
    network = nn.Sequential(zoo.mlp([30, 32, 1]), nn.Sigmoid())
    return zoo.ZooModule(network, nn.BCELoss(), "adam", lr=3e-3), train, val


def _log_softmax_nll() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = nn.Sequential(zoo.mlp([64, 128, 10]), nn.LogSoftmax(dim=1))
    return zoo.ZooModule(network, nn.NLLLoss(), "adam", lr=1e-3), train, val


def _relu_non_negative_targets() -> Built:
    train, val = zoo_losses.positive_diabetes_loaders()
    network = zoo.mlp([10, 64, 1], final_activation=True)
    return zoo.ZooModule(network, nn.SmoothL1Loss(), "adam", lr=3e-3), train, val


def _sigmoid_unit_targets() -> Built:
    train, val = zoo_losses.unit_diabetes_loaders()
    network = nn.Sequential(zoo.mlp([10, 64, 1]), nn.Sigmoid())
    return zoo.ZooModule(network, nn.MSELoss(), "adam", lr=3e-3), train, val


def _gru_regression() -> Built:
    train, val = zoo_losses.sequence_sum_loaders()
    network = nn.Sequential(zoo_losses.SequenceRegressor(), nn.Flatten(0))
    return zoo.ZooModule(network, nn.HuberLoss(), "adam", lr=3e-3), train, val


# ====================================================================== fault builders
def _softmax_ce_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = nn.Sequential(zoo.mlp([64, 128, 64, 10]), zoo.SoftmaxHead())
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _softmax_ce_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = nn.Sequential(zoo.DigitsCNN(), nn.Softmax(dim=1))
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adamw", lr=2e-3), train, val


def _nll_on_logits_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.NLLLoss(), "adam", lr=1e-3), train, val


def _nll_on_logits_gru() -> Built:
    train, val = zoo.sequence_loaders()
    network = zoo.RecurrentClassifier(features=3, cell="gru")
    return zoo.ZooModule(network, nn.NLLLoss(), "adam", lr=1e-2), train, val


def _sigmoid_bce_mlp() -> Built:
    train, val = zoo.breast_cancer_loaders(batch_size=32)
    network = nn.Sequential(zoo.mlp([30, 32, 1]), nn.Sigmoid())
    return zoo.ZooModule(network, nn.BCEWithLogitsLoss(), "adam", lr=3e-3), train, val


def _sigmoid_bce_cnn() -> Built:
    train, val = zoo_losses.digit_parity_loaders()
    network = zoo_losses.DigitsBinaryCNN(head=nn.Sigmoid())
    return zoo.ZooModule(network, nn.BCEWithLogitsLoss(), "adam", lr=2e-3), train, val


def _broadcast_mlp() -> Built:
    train, val = zoo_losses.squeezed_diabetes_loaders()
    return zoo.ZooModule(zoo.mlp([10, 64, 64, 1]), nn.MSELoss(), "adam", lr=3e-3), train, val


def _broadcast_gru() -> Built:
    train, val = zoo_losses.sequence_sum_loaders()
    return zoo.ZooModule(zoo_losses.SequenceRegressor(), nn.L1Loss(), "adam", lr=3e-3), train, val


def _relu_regression_mlp() -> Built:
    train, val = zoo.diabetes_loaders(batch_size=32)
    network = zoo.mlp([10, 64, 64, 1], final_activation=True)
    return zoo.ZooModule(network, nn.MSELoss(), "adam", lr=3e-3), train, val


def _relu_regression_gru() -> Built:
    train, val = zoo_losses.sequence_sum_loaders()
    network = nn.Sequential(zoo_losses.SequenceRegressor(head=nn.ReLU()), nn.Flatten(0))
    return zoo.ZooModule(network, nn.MSELoss(), "adam", lr=3e-3), train, val


def _tanh_regression_mlp() -> Built:
    train, val = zoo.diabetes_loaders(batch_size=32)
    network = nn.Sequential(zoo.mlp([10, 64, 64, 1]), nn.Tanh())
    return zoo.ZooModule(network, nn.MSELoss(), "adam", lr=3e-3), train, val


CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- healthy (legitimate loss inputs)
    Case(
        "ce-smoothing-weights-ignore",
        True,
        _QUIET,
        _ce_smoothing_weights_ignore,
        "MLP on digits, cross_entropy with class weights, label_smoothing=0.1 and ignore_index on every 4th label",
        {"max_steps": 100},
    ),
    Case(
        "ce-soft-targets-cnn",
        True,
        _QUIET,
        _ce_soft_targets,
        "CNN on digits, cross_entropy against soft (smoothed one-hot probability) targets",
        {"max_steps": 100},
    ),
    Case(
        "bce-on-probabilities",
        True,
        _QUIET,
        _bce_on_probabilities,
        "breast_cancer MLP ending in a sigmoid with BCELoss (binary_cross_entropy on real probabilities)",
        {"max_steps": 100},
    ),
    Case(
        "log-softmax-nll",
        True,
        _QUIET,
        _log_softmax_nll,
        "MLP on digits ending in LogSoftmax with NLLLoss",
        {"max_steps": 100},
    ),
    Case(
        "relu-non-negative-targets",
        True,
        _QUIET,
        _relu_non_negative_targets,
        "diabetes regression with a final ReLU on non-negative targets (raw target / 100), SmoothL1Loss",
        {"max_steps": 100},
    ),
    Case(
        "sigmoid-unit-targets",
        True,
        _QUIET,
        _sigmoid_unit_targets,
        "diabetes regression with a final sigmoid on targets min-max scaled into [0, 1], MSE",
        {"max_steps": 100},
    ),
    Case(
        "gru-regression-huber",
        True,
        _QUIET,
        _gru_regression,
        "GRU regression of a standardised sequence sum, output flattened to (N,) like the target, HuberLoss",
        {"max_steps": 100},
    ),
    # ---------------------------------------------------------------- faulty
    Case(
        "softmax-before-ce-mlp",
        False,
        frozenset({SOFTMAX_BEFORE_CE}),
        _softmax_ce_mlp,
        "MLP on digits ending in torch.softmax, fed to CrossEntropyLoss (softmax applied twice)",
        {"max_steps": 40},
        fast=True,
    ),
    Case(
        "softmax-before-ce-cnn",
        False,
        frozenset({SOFTMAX_BEFORE_CE}),
        _softmax_ce_cnn,
        "BatchNorm CNN on digits ending in nn.Softmax(dim=1), fed to CrossEntropyLoss",
        {"max_steps": 40},
    ),
    Case(
        "nll-on-logits-mlp",
        False,
        frozenset({NLL_ON_LOGITS}),
        _nll_on_logits_mlp,
        "MLP on digits without LogSoftmax, fed to NLLLoss: the loss is unbounded below",
        {"max_steps": 40},
        fast=True,
    ),
    Case(
        "nll-on-logits-gru",
        False,
        frozenset({NLL_ON_LOGITS}),
        _nll_on_logits_gru,
        "GRU sequence classifier whose raw logits go to NLLLoss",
        {"max_steps": 40},
    ),
    Case(
        "sigmoid-before-bce-logits-mlp",
        False,
        frozenset({SIGMOID_BEFORE_BCE}),
        _sigmoid_bce_mlp,
        "breast_cancer MLP ending in a sigmoid, fed to BCEWithLogitsLoss (sigmoid applied twice)",
        {"max_steps": 60},
    ),
    Case(
        "sigmoid-before-bce-logits-cnn",
        False,
        frozenset({SIGMOID_BEFORE_BCE}),
        _sigmoid_bce_cnn,
        "CNN on digit parity ending in a sigmoid, fed to BCEWithLogitsLoss",
        {"max_steps": 60},
    ),
    Case(
        "broadcast-mse-mlp",
        False,
        frozenset({LOSS_BROADCAST}),
        _broadcast_mlp,
        "diabetes regression: (N, 1) output against (N,) targets in MSELoss, an N x N loss of every pair",
        {"max_steps": 40},
        fast=True,
    ),
    Case(
        "broadcast-l1-gru",
        False,
        frozenset({LOSS_BROADCAST}),
        _broadcast_gru,
        "GRU regression: (N, 1) output against (N,) targets in L1Loss",
        {"max_steps": 40},
    ),
    Case(
        "clipped-relu-regression",
        False,
        frozenset({CLIPPED_OUTPUT}),
        _relu_regression_mlp,
        "diabetes regression MLP with a ReLU after its output layer on standardised (half negative) targets",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "clipped-relu-gru",
        False,
        frozenset({CLIPPED_OUTPUT}),
        _relu_regression_gru,
        "GRU regression of a standardised sum with a ReLU on its output",
        {"max_steps": 60},
    ),
    Case(
        "clipped-tanh-regression",
        False,
        frozenset({CLIPPED_OUTPUT}),
        _tanh_regression_mlp,
        "diabetes regression MLP ending in tanh while ~40% of the standardised targets lie beyond +-1",
        {"max_steps": 80},
    ),
)
