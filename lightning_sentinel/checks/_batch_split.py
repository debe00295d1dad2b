"""The batch convention's former home, kept so that existing imports work; it lives in
:mod:`lightning_sentinel.checks._batches` (inputs, targets, masks; mappings, dataclasses, nested batches).

Example:
    >>> import torch
    >>> split_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.ones(2)}).input_name
    "batch['input_ids']"
"""

from __future__ import annotations

from lightning_sentinel._validate import require_key
from lightning_sentinel.checks._batches import (
    INPUT_KEYS,
    MASK_KEYS,
    TARGET_KEYS,
    BatchParts,
    Key,
    named_tensors,
)
from lightning_sentinel.checks._batches import find_parts as split_batch

__all__ = [
    "INPUT_KEYS",
    "MASK_KEYS",
    "TARGET_KEYS",
    "BatchParts",
    "Key",
    "named_tensors",
    "split_batch",
    "validate_key",
]


def validate_key(argument: str, value: Key | None) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a key name, an index or ``None``."""
    require_key(argument, value)
