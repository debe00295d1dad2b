"""Benchmark cases of ``LabelNoiseMonitor``: wrong training labels among right ones, on a recurrent model
(the digits CNN and MLP carry the same fault as the ``tcl-30`` mutation), and its clean twin.

Example:
    >>> sorted(case.name for case in CASES)
    ['gru-digits-rows', 'gru-digits-rows-wrong-labels']
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.detection import zoo
from benchmarks.detection.cases import Built, Case
from benchmarks.detection.zoo_mutations import change_labels

NOISY_LABELS = "noisy-labels"


def _gru_digits_rows(wrong_share: float) -> Built:
    """A GRU reading the 8x8 digits row by row (8 steps of 8 pixels); ``wrong_share`` of the training
    labels moved to another class (annotation errors), as DeepCrime's TCL mutation does."""
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.25)
    for loader in (train, val):
        inputs, targets = loader.dataset.tensors  # type: ignore[attr-defined]
        loader.dataset.tensors = (inputs.view(-1, 8, 8), targets)  # type: ignore[attr-defined]
    if wrong_share > 0:
        edit = change_labels(wrong_share)
        tensors = train.dataset.tensors  # type: ignore[attr-defined]
        train.dataset.tensors = edit(*tensors, "multiclass", torch.Generator().manual_seed(7))  # type: ignore[attr-defined]
    net = zoo.RecurrentClassifier(features=8, hidden=64, classes=10)
    return zoo.ZooModule(net, nn.CrossEntropyLoss(), "adam", lr=1e-2), train, val


CASES: tuple[Case, ...] = (
    Case(
        "gru-digits-rows",
        True,
        frozenset(),
        lambda: _gru_digits_rows(0.0),
        "GRU reading the 8x8 digits row by row (10 classes), Adam, clean labels",
        {"max_steps": 200},
    ),
    Case(
        "gru-digits-rows-wrong-labels",
        False,
        frozenset({NOISY_LABELS, "model-ignores-input"}),
        lambda: _gru_digits_rows(0.3),
        "the same GRU with 30% of its training labels replaced by another class (annotation errors)",
        {"max_steps": 200},
    ),
)
