"""Benchmark cases of the preflight trials: LabelShuffleCheck and OverfitBatchCheck.

Example:
    >>> sorted({case.healthy for case in CASES})
    [False, True]
    >>> all(case.healthy or case.expected for case in CASES)
    True
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_preflight
from benchmarks.detection.cases import Built, Case

IGNORES_INPUT = "model-ignores-input"
CANNOT_OVERFIT = "cannot-overfit-batch"


# ====================================================================== healthy
def _dropout_half_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, dict_batches=True)
    network = zoo_preflight.mlp([64, 128, 64, 10], dropout=0.5)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adamw", lr=1e-3, weight_decay=1e-2), train, val


# ====================================================================== faulty
def _permuted_labels_mlp() -> Built:
    train, val = zoo_preflight.permuted_label_digits_loaders()
    return (
        zoo.ZooModule(zoo_preflight.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3),
        train,
        val,
    )


def _permuted_labels_cnn() -> Built:
    train, val = zoo_preflight.permuted_label_digits_loaders(images=True)
    return zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


def _masked_inputs_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_preflight.mlp([64, 128, 64, 10])
    return zoo_preflight.MaskedInputModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _masked_inputs_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    module = zoo_preflight.MaskedInputModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adam", lr=2e-3)
    return module, train, val


def _over_regularised_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_preflight.mlp([64, 128, 64, 10], dropout=0.97)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3, weight_decay=1.0), train, val


def _over_regularised_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo_preflight.DropoutCNN(dropout=0.97)
    module = zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=2e-3, weight_decay=1.0)
    return module, train, val


CASES: tuple[Case, ...] = (
    Case(
        "dropout-half-mlp-dicts",
        True,
        frozenset(),
        _dropout_half_mlp,
        "MLP with dropout 0.5 after each hidden layer on dict batches of digits, AdamW",
        {"max_steps": 60},
    ),
    Case(
        "permuted-labels-mlp",
        False,
        frozenset({IGNORES_INPUT}),
        _permuted_labels_mlp,
        "MLP on digits whose labels were permuted independently of the images (arrays shuffled separately)",
        {"max_steps": 40},
    ),
    Case(
        "permuted-labels-cnn",
        False,
        frozenset({IGNORES_INPUT}),
        _permuted_labels_cnn,
        "CNN on digit images whose labels were permuted independently of the images",
        {"max_steps": 40},
    ),
    Case(
        "masked-inputs-mlp",
        False,
        frozenset({IGNORES_INPUT}),
        _masked_inputs_mlp,
        "MLP whose training_step multiplies the inputs by a padding mask of the wrong polarity (all zeros)",
        {"max_steps": 40},
    ),
    Case(
        "masked-inputs-cnn",
        False,
        frozenset({IGNORES_INPUT}),
        _masked_inputs_cnn,
        "CNN whose training_step multiplies the images by a padding mask of the wrong polarity (all zeros)",
        {"max_steps": 40},
    ),
    Case(
        "over-regularised-mlp",
        False,
        frozenset({CANNOT_OVERFIT}),
        _over_regularised_mlp,
        "MLP with dropout 0.97 after each hidden layer and Adam weight decay 1.0: it cannot fit even 16 samples",
        {"max_steps": 40},
    ),
    Case(
        "over-regularised-cnn",
        False,
        frozenset({CANNOT_OVERFIT}),
        _over_regularised_cnn,
        "CNN with dropout 0.97 after each conv block and Adam weight decay 1.0: it cannot fit even 16 samples",
        {"max_steps": 40},
    ),
)
