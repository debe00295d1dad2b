"""The batch convention of :class:`~lightning_sentinel.checks.data.BatchInspector`: where inputs and targets are.

- a tensor: the inputs, no targets;
- a tuple or list: ``(inputs, targets, ...)``;
- a mapping: the first of ``x``, ``input``, ``inputs``, ``features``, ``image``, ``images`` and the
  first of ``y``, ``target``, ``targets``, ``label``, ``labels`` present;
- ``input_key`` / ``target_key``: a key (mapping), an index (tuple/list) or an attribute name
  (any other object) that overrides the convention.

Example:
    >>> import torch
    >>> parts = split_batch({"features": torch.zeros(2, 3), "label": torch.ones(2)})
    >>> parts.input_name, parts.target_name
    ("batch['features']", "batch['label']")
    >>> split_batch(object()).reason
    'a batch of type object is neither a tensor, a tuple/list nor a mapping'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_sentinel._validate import require_key

INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "features", "image", "images")
TARGET_KEYS: tuple[str, ...] = ("y", "target", "targets", "label", "labels")

Key = str | int


@dataclass(frozen=True)
class BatchParts:
    """Inputs and targets found in a batch (``None`` where absent), their names, or why none was found."""

    inputs: Tensor | None
    targets: Tensor | None
    input_name: str
    target_name: str
    reason: str = ""


def validate_key(argument: str, value: Key | None) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a key name, an index or ``None``."""
    require_key(argument, value)


def _name(key: Key, attribute: bool = False) -> str:
    if attribute:
        return f"batch.{key}"
    return f"batch[{key!r}]"


def _pick(batch: Any, key: Key) -> tuple[Any, str] | None:
    """The item ``key`` of ``batch`` (index, mapping key or attribute) and its name, or ``None``."""
    if isinstance(batch, Mapping):
        return (batch[key], _name(key)) if key in batch else None
    if isinstance(batch, (tuple, list)) and isinstance(key, int):
        return (batch[key], _name(key)) if -len(batch) <= key < len(batch) else None
    if isinstance(key, str) and hasattr(batch, key):
        return getattr(batch, key), _name(key, attribute=True)
    return None


def _first_key(batch: Mapping[Any, Any], keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key in batch), None)


def split_batch(batch: Any, input_key: Key | None = None, target_key: Key | None = None) -> BatchParts:
    """Find the inputs and targets of ``batch`` by the convention (see the module docstring).

    Example:
        >>> import torch
        >>> parts = split_batch((torch.zeros(4, 2), torch.zeros(4)))
        >>> parts.input_name, parts.target_name, parts.reason
        ('batch[0]', 'batch[1]', '')
    """
    inputs: Any = None
    targets: Any = None
    input_name = target_name = ""
    if input_key is not None:
        picked = _pick(batch, input_key)
        if picked is None:
            return BatchParts(
                None,
                None,
                "",
                "",
                f"`input_key={input_key!r}` is not in a batch of type {type(batch).__name__}",
            )
        inputs, input_name = picked
    if target_key is not None:
        picked = _pick(batch, target_key)
        if picked is not None:
            targets, target_name = picked
    if input_key is None:
        if isinstance(batch, Tensor):
            inputs, input_name = batch, "batch"
        elif isinstance(batch, (tuple, list)):
            if not batch:
                return BatchParts(None, None, "", "", "the batch is an empty sequence")
            inputs, input_name = batch[0], _name(0)
            if target_key is None and len(batch) > 1:
                targets, target_name = batch[1], _name(1)
        elif isinstance(batch, Mapping):
            key = _first_key(batch, INPUT_KEYS)
            if key is None:
                return BatchParts(
                    None,
                    None,
                    "",
                    "",
                    f"a mapping batch with none of the keys {list(INPUT_KEYS)} (keys: {list(batch)[:8]})",
                )
            inputs, input_name = batch[key], _name(key)
            if target_key is None:
                target = _first_key(batch, TARGET_KEYS)
                if target is not None:
                    targets, target_name = batch[target], _name(target)
        else:
            return BatchParts(
                None,
                None,
                "",
                "",
                f"a batch of type {type(batch).__name__} is neither a tensor, a tuple/list nor a mapping",
            )
    if not isinstance(inputs, Tensor):
        return BatchParts(
            None, None, "", "", f"the inputs {input_name} are a {type(inputs).__name__}, not a tensor"
        )
    if not isinstance(targets, Tensor):
        targets, target_name = None, ""
    return BatchParts(inputs, targets, input_name, target_name)


def named_tensors(value: Any, name: str = "batch", depth: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside ``value`` (nested tuples, lists, mappings), with its name in the batch.

    Example:
        >>> import torch
        >>> [name for name, _ in named_tensors({"a": torch.zeros(1), "b": [torch.ones(1)]})]
        ["batch['a']", "batch['b'][0]"]
    """
    if isinstance(value, Tensor):
        yield name, value
    elif depth >= 4:
        return
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from named_tensors(item, f"{name}[{index}]", depth + 1)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from named_tensors(item, f"{name}[{key!r}]", depth + 1)
