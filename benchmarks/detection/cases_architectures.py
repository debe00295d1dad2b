"""The major checks on a second model family: non-finite values in a Transformer, input faults and a
learning rate far too high on the batch-norm CNN (the first family of each being an MLP).

Example:
    >>> [case.name for case in CASES if case.healthy]
    ['transformer-padded-attention-pool']
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_architectures, zoo_data
from benchmarks.detection.cases import Built, Case
from benchmarks.detection.cases_real_faults import LR_HIGH, NON_FINITE


def _padded_transformer(inverted: bool) -> Built:
    train, val = zoo_architectures.padded_marker_loaders()
    network = zoo_architectures.PaddedTokenTransformer(vocab=20, length=12, inverted_pool_mask=inverted)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adamw", lr=2e-3, weight_decay=1e-2), train, val


def _normalized_transformer() -> Built:
    train, val = zoo_architectures.padded_marker_loaders()
    network = zoo_architectures.NormalizedTokenTransformer(vocab=20, length=12)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adamw", lr=2e-3, weight_decay=1e-2), train, val


def _cnn(loaders: zoo.Loaders, optimizer: zoo.OptimizerName = "adamw", lr: float = 2e-3) -> Built:
    train, val = loaders
    module = zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), optimizer, lr=lr, weight_decay=1e-2)
    return module, train, val


CASES: tuple[Case, ...] = (
    Case(
        "transformer-padded-attention-pool",
        True,
        frozenset(),
        lambda: _padded_transformer(inverted=False),
        "Transformer over padded token sequences (half cut short), padding masked in the encoder and in a "
        "hand-written attention pooling",
        {"max_steps": 96},
    ),
    Case(
        "transformer-inverted-pool-mask",
        False,
        frozenset(NON_FINITE),
        lambda: _padded_transformer(inverted=True),
        "the same Transformer with the pooling mask inverted (keeps the padding): every unpadded sequence "
        "pools over nothing, softmax of all -inf is NaN",
        {"max_steps": 40},
    ),
    Case(
        "transformer-sqrt-norm-at-padding",
        False,
        frozenset({"non-finite-gradients", "non-finite-weights"}),
        _normalized_transformer,
        "Transformer that zeroes the padding's embeddings, then unit-normalises tokens with sqrt(sum x^2) + eps: "
        "the loss stays finite but sqrt's gradient at 0 makes the embedding gradient NaN",
        {"max_steps": 40},
        fast=True,
    ),
    Case(
        "cnn-sorted-labels",
        False,
        frozenset({"single-label-batch"}),
        lambda: _cnn(zoo_data.digits_sorted_loaders(images=True)),
        "batch-norm CNN on digit images sorted by label, loaded with shuffle=False: one digit per batch",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "cnn-per-image-standardize-blanks",
        False,
        frozenset({"non-finite-inputs"}),
        lambda: _cnn(zoo_architectures.per_image_standardized_with_blanks_loaders()),
        "batch-norm CNN on digit images standardised per image, 3% of them blank: 0/0 gives NaN images",
        {"max_steps": 40},
    ),
    Case(
        "cnn-adam-lr-too-high",
        False,
        LR_HIGH,
        lambda: _cnn(zoo.digits_loaders(batch_size=64, images=True, val_fraction=0.2), "adam", 0.1),
        "batch-norm CNN with Adam at lr 0.1 (meant 1e-3): the first steps move the weights several times "
        "their own size, and the ReLUs die",
        {"max_steps": 100},
    ),
)
