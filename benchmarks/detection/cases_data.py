"""Benchmark cases of ``BatchInspector``: broken data pipelines, and healthy layouts that must stay quiet.

Example:
    >>> sorted(case.name for case in CASES if case.fast)
    ['data-same-batch-every-step', 'data-sorted-labels', 'data-val-not-standardized', 'data-wine-xy-dicts']
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.detection import zoo, zoo_data
from benchmarks.detection.cases import Built, Case

NON_FINITE_INPUTS = "non-finite-inputs"
UNNORMALIZED = "unnormalized-inputs"
CONSTANT = "constant-inputs"
REPEATED = "repeated-batch"
SINGLE_LABEL = "single-label-batch"
IMBALANCE = "class-imbalance"
SHIFT = "train-val-shift"


def _classifier(sizes: list[int], lr: float = 1e-3) -> zoo.ZooModule:
    return zoo.ZooModule(zoo.mlp(sizes), nn.CrossEntropyLoss(), "adam", lr=lr)


# ====================================================================== healthy
def _digits_unit_pixels_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True, scale="raw")
    for loader in (train,):
        loader.dataset.tensors = (loader.dataset.tensors[0] / 16.0, loader.dataset.tensors[1])  # type: ignore[attr-defined]
    return zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


def _iris_full_batch() -> Built:
    train, val = zoo_data.iris_full_batch_loaders()
    return _classifier([4, 32, 3], lr=1e-2), train, val


def _wine_xy_dicts() -> Built:
    train, val = zoo_data.wine_xy_dict_loaders()
    module = zoo_data.XYModule(zoo.mlp([13, 32, 3]), nn.CrossEntropyLoss(), "adam", lr=3e-3)
    return module, train, val


def _imbalanced_weighted() -> Built:
    train, val = zoo_data.imbalanced_blobs_loaders(ratio=20)
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 20.0]))
    return zoo.ZooModule(zoo.mlp([8, 32, 2]), loss, "adam", lr=3e-3), train, val


# ====================================================================== faulty
def _breast_cancer_raw() -> Built:
    train, val = zoo_data.breast_cancer_raw_loaders()
    return zoo.ZooModule(zoo.mlp([30, 32, 1]), nn.BCEWithLogitsLoss(), "adam", lr=3e-3), train, val


def _digits_raw_pixels() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, scale="raw")
    return _classifier([64, 128, 64, 10]), train, val


def _digits_byte_images() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True, scale="bytes")
    return zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


def _zeroed_inputs() -> Built:
    train, val = zoo_data.digits_zeroed_loaders()
    return _classifier([64, 128, 64, 10]), train, val


def _same_batch() -> Built:
    train, val = zoo_data.digits_same_batch_loaders()
    return _classifier([64, 128, 64, 10]), train, val


def _sorted_labels() -> Built:
    train, val = zoo_data.digits_sorted_loaders()
    return _classifier([64, 128, 64, 10]), train, val


def _imbalanced() -> Built:
    train, val = zoo_data.imbalanced_blobs_loaders()
    return _classifier([8, 32, 2], lr=3e-3), train, val


def _val_not_standardized() -> Built:
    train, val = zoo_data.breast_cancer_val_unscaled_loaders()
    return zoo.ZooModule(zoo.mlp([30, 32, 1]), nn.BCEWithLogitsLoss(), "adam", lr=3e-3), train, val


def _missing_values() -> Built:
    train, val = zoo_data.diabetes_missing_loaders()
    return zoo.ZooModule(zoo.mlp([10, 64, 1]), nn.MSELoss(), "adam", lr=3e-3), train, val


CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- healthy
    Case(
        "data-digits-unit-pixels-cnn",
        True,
        frozenset(),
        _digits_unit_pixels_cnn,
        "CNN on 1x8x8 digits scaled to [0, 1] (divided by 16, not standardized): a normal scale",
        {"max_steps": 100},
    ),
    Case(
        "data-iris-full-batch",
        True,
        frozenset(),
        _iris_full_batch,
        "full-batch training: all 150 standardized iris rows in one shuffled batch per epoch",
        {"max_steps": 60},
    ),
    Case(
        "data-wine-xy-dicts",
        True,
        frozenset(),
        _wine_xy_dicts,
        "wine classifier on {'x', 'y'} dict batches of 16, validation standardized with the training statistics",
        {"max_steps": 80},
        fast=True,
    ),
    Case(
        "data-imbalance-weighted-loss",
        True,
        frozenset(),
        _imbalanced_weighted,
        "20:1 imbalanced blobs with CrossEntropyLoss(weight=[1, 20]): the imbalance is handled (an info only)",
        {"max_steps": 100},
    ),
    # ---------------------------------------------------------------- faulty
    Case(
        "data-breast-cancer-raw-features",
        False,
        frozenset({UNNORMALIZED}),
        _breast_cancer_raw,
        "binary classifier on breast_cancer features as they come (areas ~650, smoothness ~0.1): not standardized",
        {"max_steps": 60},
    ),
    Case(
        "data-digits-raw-pixels",
        False,
        frozenset({UNNORMALIZED}),
        _digits_raw_pixels,
        "MLP on digits pixels 0..16 as they come from load_digits, not scaled",
        {"max_steps": 60},
    ),
    Case(
        "data-digits-byte-images",
        False,
        frozenset({UNNORMALIZED}),
        _digits_byte_images,
        "CNN on 1x8x8 digit images with 0..255 pixel values: ToTensor-style scaling forgotten",
        {"max_steps": 60},
    ),
    Case(
        "data-zeroed-inputs",
        False,
        frozenset({CONSTANT}),
        _zeroed_inputs,
        "digits multiplied by a feature mask that is all zeros: every input is 0",
        {"max_steps": 60},
    ),
    Case(
        "data-same-batch-every-step",
        False,
        frozenset({REPEATED}),
        _same_batch,
        "Dataset.__getitem__ indexes a batch-sized buffer (index % batch_size): the same 64 rows every step",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "data-sorted-labels",
        False,
        frozenset({SINGLE_LABEL}),
        _sorted_labels,
        "digits sorted by label and loaded with shuffle=False: each batch holds one digit",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "data-imbalance-1-to-50",
        False,
        frozenset({IMBALANCE}),
        _imbalanced,
        "binary classifier on 50:1 imbalanced blobs with an unweighted cross-entropy",
        {"max_steps": 100},
    ),
    Case(
        "data-val-not-standardized",
        False,
        frozenset({SHIFT}),
        _val_not_standardized,
        "breast_cancer with the scaler applied to the training split only: validation inputs are raw",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "data-missing-values-nan",
        False,
        frozenset({NON_FINITE_INPUTS}),
        _missing_values,
        "diabetes regression with 5% of the feature values missing as NaN",
        {"max_steps": 40},
    ),
)
