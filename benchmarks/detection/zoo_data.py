"""Data pipelines, right and wrong, for the ``BatchInspector`` benchmark cases (bundled datasets only).

Example:
    >>> train, val = breast_cancer_raw_loaders()
    >>> inputs, _ = next(iter(train))
    >>> bool(inputs.abs().max() > 100), val is None
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmarks.detection import zoo
from benchmarks.detection.zoo import Loaders, make_loader


def _standardize_with(values: Tensor, reference: Tensor) -> Tensor:
    return (values - reference.mean(0)) / reference.std(0).clamp_min(1e-6)


def _split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(n * val_fraction)
    return order[n_val:], order[:n_val]


def breast_cancer_raw_loaders(batch_size: int = 32, seed: int = 0) -> Loaders:
    """Breast-cancer features as they come (areas up to ~2500, smoothness ~0.1): nobody standardized them."""
    data = load_breast_cancer()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    targets = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    return make_loader(inputs, targets, batch_size, True, seed), None


def breast_cancer_val_unscaled_loaders(batch_size: int = 32, seed: int = 0) -> Loaders:
    """Training features standardized with the training statistics; the validation split left raw
    (the scaler was fitted and applied to the training split only)."""
    data = load_breast_cancer()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    targets = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    train_idx, val_idx = _split(len(inputs), 0.2, seed)
    train_inputs = _standardize_with(inputs[train_idx], inputs[train_idx])
    train = make_loader(train_inputs, targets[train_idx], batch_size, True, seed)
    val = make_loader(inputs[val_idx], targets[val_idx], batch_size, False, seed)
    return train, val


def digits_zeroed_loaders(batch_size: int = 64, seed: int = 0) -> Loaders:
    """Digits whose inputs were multiplied by a mask that is all zeros (a broken augmentation)."""
    train, val = zoo.digits_loaders(batch_size=batch_size, seed=seed)
    dataset = train.dataset
    inputs, targets = dataset.tensors  # type: ignore[attr-defined]
    return make_loader(inputs * torch.zeros(inputs.shape[1]), targets, batch_size, True, seed), val


class FirstBatchDataset(Dataset):
    """Rows served by position ``index % batch_size``: the bug of a ``__getitem__`` that indexes a
    batch-sized buffer instead of the dataset, so every batch is the same ``batch_size`` rows."""

    def __init__(self, inputs: Tensor, targets: Tensor, batch_size: int) -> None:
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        row = index % self.batch_size  # bug: should be ``index``
        return self.inputs[row], self.targets[row]


def digits_same_batch_loaders(batch_size: int = 64, seed: int = 0) -> Loaders:
    """Standardized digits through :class:`FirstBatchDataset`, not shuffled: the same batch every step."""
    train, _ = zoo.digits_loaders(batch_size=batch_size, seed=seed)
    inputs, targets = train.dataset.tensors  # type: ignore[attr-defined]
    return DataLoader(
        FirstBatchDataset(inputs, targets, batch_size), batch_size=batch_size, shuffle=False
    ), None


def digits_sorted_loaders(batch_size: int = 64, seed: int = 0, images: bool = False) -> Loaders:
    """Standardized digits (``1x8x8`` images with ``images=True``) sorted by label, loaded with ``shuffle=False``."""
    train, _ = zoo.digits_loaders(batch_size=batch_size, images=images, seed=seed)
    inputs, targets = train.dataset.tensors  # type: ignore[attr-defined]
    order = torch.argsort(targets, stable=True)
    return DataLoader(list(zip(inputs[order], targets[order], strict=True)), batch_size=batch_size), None


def imbalanced_blobs_loaders(
    n_majority: int = 5000, ratio: int = 50, batch_size: int = 32, seed: int = 0
) -> Loaders:
    """Two overlapping Gaussian classes in 8 standardized features, ``ratio`` : 1 (fraud-detection-like)."""
    generator = torch.Generator().manual_seed(seed)
    n_minority = n_majority // ratio
    majority = torch.randn(n_majority, 8, generator=generator)
    minority = torch.randn(n_minority, 8, generator=generator) + 0.8
    inputs = torch.cat([majority, minority])
    targets = torch.cat([torch.zeros(n_majority), torch.ones(n_minority)]).long()
    return make_loader(_standardize_with(inputs, inputs), targets, batch_size, True, seed), None


def diabetes_missing_loaders(batch_size: int = 32, missing: float = 0.05, seed: int = 0) -> Loaders:
    """Standardized diabetes features with ``missing`` of the values NaN (missing measurements)."""
    data = load_diabetes()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    inputs = _standardize_with(inputs, inputs)
    holes = torch.rand(inputs.shape, generator=torch.Generator().manual_seed(seed)) < missing
    inputs[holes] = float("nan")
    targets = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    return make_loader(inputs, _standardize_with(targets, targets), batch_size, True, seed), None


def iris_full_batch_loaders(seed: int = 0) -> Loaders:
    """Standardized iris, the 150 rows as one shuffled batch per epoch (full-batch training)."""
    data = load_iris()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    targets = torch.tensor(data.target, dtype=torch.long)
    return make_loader(_standardize_with(inputs, inputs), targets, len(inputs), True, seed), None


class XYDictDataset(Dataset):
    """Rows served as ``{"x": features, "y": label}`` dicts."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.inputs[index], "y": self.targets[index]}


def wine_xy_dict_loaders(batch_size: int = 16, seed: int = 0) -> Loaders:
    """Standardized wine (3 classes, 13 features) as ``{"x", "y"}`` dict batches, with a validation split
    standardized with the training statistics."""
    data = load_wine()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    targets = torch.tensor(data.target, dtype=torch.long)
    train_idx, val_idx = _split(len(inputs), 0.25, seed)
    reference = inputs[train_idx]
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        XYDictDataset(_standardize_with(inputs[train_idx], reference), targets[train_idx]),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=True,
    )
    val = DataLoader(
        XYDictDataset(_standardize_with(inputs[val_idx], reference), targets[val_idx]), batch_size=batch_size
    )
    return train, val


class XYModule(zoo.ZooModule):
    """:class:`~benchmarks.detection.zoo.ZooModule` for ``{"x", "y"}`` dict batches."""

    def _step(self, batch: Any, stage: str) -> Tensor:
        loss = self.loss(self(batch["x"]), batch["y"])
        self.log(f"{stage}_loss", loss, batch_size=len(batch["y"]))
        return loss
