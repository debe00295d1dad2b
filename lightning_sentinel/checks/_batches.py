"""Where the inputs, targets and masks are in a batch, and the loss and logits in an output: one convention
for every batch check and preflight trial.

Batches may be tensors, tuples and lists (nested too), mappings (``dict``, Hugging Face ``BatchEncoding``),
dataclasses, named tuples and plain objects with attributes. The convention:

- a tensor: the inputs, no targets;
- a mapping, a dataclass, a named tuple or an object: the inputs are the first of :data:`INPUT_KEYS`
  present (the Hugging Face names ``input_ids``, ``pixel_values``, ``input_values``, ``input_features``,
  ``inputs_embeds``, then ``x``, ``input``, ``inputs``, ``features``, ``image``, ``images``, ``tokens``);
  the targets the first of :data:`TARGET_KEYS` (``labels``, ``label``, ``y``, ``target``, ``targets``);
  the padding mask the first of :data:`MASK_KEYS` (``attention_mask``, ``padding_mask``). An input key
  holding a nested mapping (``{"inputs": {"input_ids": ...}, "labels": ...}``) is searched the same way;
- a tuple or list: ``(inputs, targets, ...)``, where ``inputs`` may itself be a nested tuple or mapping
  (``((tokens, mask), labels)``: the inputs are its first tensor, a mask is found by name);
- ``input_key`` / ``target_key``: a key (mapping), an index (tuple/list) or an attribute name, or a dotted
  path through nested batches (``"encoder.input_ids"``, ``"0.1"``), that overrides the convention.

Everything here is cheap host-side bookkeeping: no tensor is read back, nothing is copied but the
containers that :func:`replace_parts` rebuilds.

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
    ...          "labels": torch.zeros(2, 5, dtype=torch.long)}
    >>> parts = find_parts(batch)
    >>> parts.input_name, parts.target_name, parts.mask_name, parts.tokens
    ("batch['input_ids']", "batch['labels']", "batch['attention_mask']", True)
    >>> new = replace_parts(batch, parts, targets=torch.ones(2, 5, dtype=torch.long))
    >>> int(new["labels"].sum()), int(batch["labels"].sum())
    (10, 0)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

Key = str | int
Path = tuple[Key, ...]

INPUT_KEYS: tuple[str, ...] = (
    "input_ids",
    "pixel_values",
    "input_values",
    "input_features",
    "inputs_embeds",
    "x",
    "input",
    "inputs",
    "features",
    "image",
    "images",
    "tokens",
)
TARGET_KEYS: tuple[str, ...] = ("labels", "label", "y", "target", "targets")
MASK_KEYS: tuple[str, ...] = ("attention_mask", "padding_mask")

_MISSING = object()
_MAX_DEPTH = 4


# ---------------------------------------------------------------------- containers
def _is_named_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _has_attributes(value: Any) -> bool:
    """A dataclass instance or a plain object whose attributes may hold tensors (not a tensor or a scalar)."""
    if isinstance(value, (Tensor, str, bytes, int, float, bool, type(None), Mapping, tuple, list)):
        return False
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) or hasattr(value, "__dict__")


def children(value: Any) -> list[tuple[Key, Any, bool]]:
    """``(key, child, by_attribute)`` for every item of a container (an empty list for a leaf).

    Example:
        >>> [(key, by_attribute) for key, _, by_attribute in children({"a": 1, "b": 2})]
        [('a', False), ('b', False)]
    """
    if isinstance(value, Mapping):
        return [(key, item, False) for key, item in value.items()]
    if _is_named_tuple(value):
        return [(name, getattr(value, name), True) for name in value._fields]
    if isinstance(value, (tuple, list)):
        return [(index, item, False) for index, item in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name), True) for f in dataclasses.fields(value)]
    if _has_attributes(value):
        return [(name, item, True) for name, item in vars(value).items() if not name.startswith("_")]
    return []


def child(value: Any, key: Key) -> Any:
    """The item ``key`` of ``value`` (mapping key, index or attribute), or ``_MISSING``."""
    if isinstance(value, Mapping):
        return value.get(key, _MISSING)
    if isinstance(value, (tuple, list)) and isinstance(key, int):
        return value[key] if -len(value) <= key < len(value) else _MISSING
    if isinstance(key, str) and not isinstance(value, (Tensor, str, bytes)) and hasattr(value, key):
        try:
            return getattr(value, key)
        except Exception:  # a property that fails: not a batch item
            return _MISSING
    return _MISSING


def _by_attribute(value: Any) -> bool:
    return not isinstance(value, (Mapping, list)) and not (
        isinstance(value, tuple) and not _is_named_tuple(value)
    )


def path_name(batch: Any, path: Path) -> str:
    """How ``path`` reads in messages: ``batch['input_ids']``, ``batch[0][1]``, ``batch.pixels``.

    Example:
        >>> path_name({"a": [0, 1]}, ("a", 1))
        "batch['a'][1]"
    """
    name, value = "batch", batch
    for key in path:
        attribute = isinstance(key, str) and _by_attribute(value)
        name += f".{key}" if attribute else f"[{key!r}]"
        value = child(value, key)
    return name


def get_path(batch: Any, path: Path) -> Any:
    """The item at ``path`` inside ``batch``, or ``None`` if it is not there."""
    value = batch
    for key in path:
        value = child(value, key)
        if value is _MISSING:
            return None
    return value


def _with_child(container: Any, key: Key, value: Any) -> Any:
    """A shallow copy of ``container`` with the item ``key`` replaced (the original is untouched)."""
    if isinstance(container, Mapping):
        items = dict(container)
        items[key] = value
        if type(container) is dict:
            return items
        try:
            return type(container)(items)  # a dict subclass, an OrderedDict, a BatchEncoding (UserDict)
        except Exception:
            try:
                duplicate = copy.copy(container)
                duplicate[key] = value  # type: ignore[index]
                return duplicate
            except Exception:
                return items
    if _is_named_tuple(container):
        return container._replace(**{str(key) if isinstance(key, str) else container._fields[key]: value})
    if isinstance(container, (tuple, list)):
        items = list(container)
        items[key] = value  # type: ignore[index]
        if type(container) in (tuple, list):
            return type(container)(items)
        try:
            return type(container)(items)
        except Exception:
            return tuple(items) if isinstance(container, tuple) else items
    duplicate = copy.copy(container)
    try:
        setattr(duplicate, str(key), value)
    except Exception:  # a frozen dataclass
        object.__setattr__(duplicate, str(key), value)
    return duplicate


def set_path(batch: Any, path: Path, value: Any) -> Any:
    """A copy of ``batch`` with the item at ``path`` replaced by ``value``; only the containers on the path are
    rebuilt (of the same types), every other item is shared.

    Example:
        >>> set_path({"a": (1, 2), "b": 3}, ("a", 0), 9)
        {'a': (9, 2), 'b': 3}
    """
    if not path:
        return value
    head, rest = path[0], path[1:]
    return _with_child(batch, head, set_path(child(batch, head), rest, value))


def map_tensors(value: Any, function: Callable[[Tensor], Any], depth: int = 0) -> Any:
    """``value`` rebuilt with ``function`` applied to every tensor inside (containers keep their types)."""
    if isinstance(value, Tensor):
        return function(value)
    if depth >= _MAX_DEPTH:
        return value
    result = value
    for key, item, _ in children(value):
        mapped = map_tensors(item, function, depth + 1)
        if mapped is not item:
            result = _with_child(result, key, mapped)
    return result


def named_tensors(value: Any, name: str = "batch", depth: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside ``value`` (nested tuples, lists, mappings, dataclasses, objects), with its name.

    Example:
        >>> import torch
        >>> [name for name, _ in named_tensors({"a": torch.zeros(1), "b": [torch.ones(1)]})]
        ["batch['a']", "batch['b'][0]"]
    """
    if isinstance(value, Tensor):
        yield name, value
        return
    if depth >= _MAX_DEPTH:
        return
    for key, item, attribute in children(value):
        yield from named_tensors(item, f"{name}.{key}" if attribute else f"{name}[{key!r}]", depth + 1)


def slice_batch(batch: Any, start: int, stop: int, leading: int) -> Any:
    """Every tensor of ``batch`` whose first dimension is ``leading`` cut to its rows ``start:stop``.

    Example:
        >>> import torch
        >>> part = slice_batch((torch.arange(6), torch.zeros(3)), 2, 4, leading=6)
        >>> part[0].tolist(), tuple(part[1].shape)
        ([2, 3], (3,))
    """

    def cut(tensor: Tensor) -> Tensor:
        return tensor[start:stop] if tensor.dim() > 0 and tensor.shape[0] == leading else tensor

    return map_tensors(batch, cut)


# ---------------------------------------------------------------------- finding the parts
@dataclass(frozen=True)
class BatchParts:
    """The inputs, targets and padding mask of a batch (``None`` where absent), where they are and why not.

    ``reason`` is empty when the inputs were found; otherwise it says why not, and what to set.
    """

    inputs: Tensor | None
    targets: Tensor | None
    mask: Tensor | None = None
    input_path: Path | None = None
    target_path: Path | None = None
    mask_path: Path | None = None
    input_name: str = ""
    target_name: str = ""
    mask_name: str = ""
    reason: str = ""
    target_reason: str = ""

    @property
    def tokens(self) -> bool:
        """Whether the inputs are integer ids (tokens, categories): they cannot be zeroed or differentiated."""
        return self.inputs is not None and is_token_ids(self.inputs)

    @property
    def batch_size(self) -> int:
        """The leading dimension of the inputs (0 without inputs)."""
        if self.inputs is None or self.inputs.dim() == 0:
            return 0
        return int(self.inputs.shape[0])


def is_token_ids(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds integer ids (not floats, complex numbers or booleans).

    Example:
        >>> import torch
        >>> is_token_ids(torch.ones(2, dtype=torch.long)), is_token_ids(torch.ones(2)), is_token_ids(torch.ones(2) > 0)
        (True, False, False)
    """
    import torch

    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _as_path(key: Key, batch: Any) -> Path:
    """A user's key as a path: itself, or a dotted path through nested items (``"0.1"``, ``"inputs.ids"``)."""
    if isinstance(key, int) or child(batch, key) is not _MISSING or "." not in key:
        return (key,)
    return tuple(int(part) if part.lstrip("-").isdigit() else part for part in key.split("."))


def _keys_of(value: Any) -> list[Any]:
    return [key for key, _, _ in children(value)][:10]


def _first_named(value: Any, keys: tuple[str, ...]) -> Key | None:
    present = {key for key, _, _ in children(value)}
    return next((key for key in keys if key in present), None)


def _first_tensor(value: Any, path: Path, depth: int = 0) -> Path | None:
    """The path of the first tensor inside ``value`` (depth first), for positional containers."""
    if isinstance(value, Tensor):
        return path
    if depth >= _MAX_DEPTH:
        return None
    for key, item, _ in children(value):
        found = _first_tensor(item, (*path, key), depth + 1)
        if found is not None:
            return found
    return None


def _named_container(value: Any) -> bool:
    return bool(children(value)) and not (isinstance(value, (tuple, list)) and not _is_named_tuple(value))


def _conventional_inputs(value: Any, path: Path, depth: int = 0) -> Path | None:
    """Where the convention puts the inputs inside ``value`` (found at ``path``): a tensor's path, or the path
    of what stands where the inputs should be (then not a tensor), or ``None`` for a top level without inputs."""
    if isinstance(value, Tensor) or depth >= _MAX_DEPTH:
        return path
    if _named_container(value):
        key = _first_named(value, INPUT_KEYS)
        if key is None:
            return path if depth else None
        return _conventional_inputs(child(value, key), (*path, key), depth + 1)
    items = children(value)
    if not items:
        return path if depth else None
    return _conventional_inputs(items[0][1], (*path, items[0][0]), depth + 1)


def _conventional_targets(batch: Any) -> Path | None:
    if _named_container(batch):
        key = _first_named(batch, TARGET_KEYS)
        if key is None:
            return None
        target = child(batch, key)
        if isinstance(target, Tensor) or not children(target):
            return (key,)  # a tensor, or something else that find_parts reports as not a tensor
        return _first_tensor(target, (key,)) or (key,)
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return _first_tensor(batch[1], (1,))
    return None


def target_path(batch: Any, target_key: Key | None = None) -> Path | None:
    """Where the targets of ``batch`` are (``target_key``'s path, else the convention's), or ``None``.

    Example:
        >>> target_path({"x": 1, "label": 2}), target_path([1, 2, 3], 2), target_path(object())
        (('label',), (2,), None)
    """
    if target_key is None:
        return _conventional_targets(batch)
    path = _as_path(target_key, batch)
    return path if get_path(batch, path) is not None else None


def _conventional_mask(batch: Any, input_path: Path) -> Path | None:
    """A padding mask by name next to the inputs (the innermost named container first), else at the top."""
    for cut in range(len(input_path) - 1, -1, -1):
        container = get_path(batch, input_path[:cut])
        if container is not None and _named_container(container):
            key = _first_named(container, MASK_KEYS)
            if key is not None and isinstance(child(container, key), Tensor):
                return (*input_path[:cut], key)
    return None


def find_parts(batch: Any, input_key: Key | None = None, target_key: Key | None = None) -> BatchParts:
    """Find the inputs, targets and padding mask of ``batch`` (see the module docstring for the convention).

    Example:
        >>> import torch
        >>> parts = find_parts((torch.zeros(4, 2), torch.zeros(4)))
        >>> parts.input_name, parts.target_name, parts.reason
        ('batch[0]', 'batch[1]', '')
        >>> find_parts({"pixels": torch.zeros(2), "cls": torch.zeros(2)}).reason.startswith("a mapping batch")
        True
    """
    kind = type(batch).__name__
    if input_key is not None:
        input_path: Path | None = _as_path(input_key, batch)
        if get_path(batch, input_path) is None:
            return BatchParts(
                None,
                None,
                reason=f"`input_key={input_key!r}` is not in the batch (a {kind}; items: {_keys_of(batch)})",
            )
    else:
        input_path = _conventional_inputs(batch, ())
        if input_path is None:
            if _named_container(batch):
                what = "a mapping batch" if isinstance(batch, Mapping) else f"a batch of type {kind}"
                reason = (
                    f"{what} with none of the input names {list(INPUT_KEYS)} (items: {_keys_of(batch)}): "
                    "pass `input_key=` (and `target_key=`) naming them"
                )
            elif isinstance(batch, (tuple, list)) and not batch:
                reason = "the batch is an empty sequence"
            else:
                reason = (
                    f"a batch of type {kind} is neither a tensor, a tuple/list, a mapping, a dataclass nor an "
                    "object with tensor attributes: pass `input_key=` naming the attribute of the inputs"
                )
            return BatchParts(None, None, reason=reason)
    assert input_path is not None
    inputs = get_path(batch, input_path)
    input_name = path_name(batch, input_path)
    if not isinstance(inputs, Tensor):
        return BatchParts(
            None,
            None,
            reason=f"the inputs {input_name} are a {type(inputs).__name__}, not a tensor: pass `input_key=` "
            "naming the tensor the model reads (a dotted path for nested batches, e.g. 'inputs.input_ids')",
        )
    target_reason = ""
    targets_at = target_path(batch, target_key)
    if target_key is not None and targets_at is None:
        target_reason = f"`target_key={target_key!r}` is not in the batch (items: {_keys_of(batch)})"
    targets = get_path(batch, targets_at) if targets_at is not None else None
    if not isinstance(targets, Tensor) or targets_at == input_path:
        if targets_at is not None and not target_reason and targets_at != input_path:
            target_reason = (
                f"the targets {path_name(batch, targets_at)} are a {type(targets).__name__}, not a tensor"
            )
        targets, targets_at = None, None
    if targets is None and not target_reason:
        target_reason = f"no targets in the batch (items: {_keys_of(batch)}): pass `target_key=` naming them"
    mask_path = _conventional_mask(batch, input_path)
    mask = get_path(batch, mask_path) if mask_path is not None else None
    return BatchParts(
        inputs,
        targets,
        mask,
        input_path,
        targets_at,
        mask_path,
        input_name,
        path_name(batch, targets_at) if targets_at is not None else "",
        path_name(batch, mask_path) if mask_path is not None else "",
        "",
        target_reason,
    )


def parts_at(batch: Any, like: BatchParts) -> BatchParts:
    """The parts of another batch of the same layout as ``like`` (the same paths, this batch's tensors)."""

    def tensor_at(path: Path | None) -> Tensor | None:
        value = get_path(batch, path) if path is not None else None
        return value if isinstance(value, Tensor) else None

    return dataclasses.replace(
        like,
        inputs=tensor_at(like.input_path),
        targets=tensor_at(like.target_path),
        mask=tensor_at(like.mask_path),
    )


def replace_parts(
    batch: Any,
    parts: BatchParts,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
) -> Any:
    """A copy of ``batch`` with its inputs and/or targets replaced where ``parts`` found them (the original
    is untouched; containers keep their types: dicts, ``BatchEncoding``, dataclasses, named tuples...)."""
    new = batch
    if inputs is not None and parts.input_path is not None:
        new = set_path(new, parts.input_path, inputs)
    if targets is not None and parts.target_path is not None:
        new = set_path(new, parts.target_path, targets)
    return new


# ---------------------------------------------------------------------- outputs
def loss_of(output: Any) -> Tensor | None:
    """The scalar loss in what ``training_step`` or a model returned: a tensor, a mapping with ``"loss"``,
    or an object with a ``.loss`` attribute (a Hugging Face ``ModelOutput``); ``None`` if there is none.

    Example:
        >>> import torch
        >>> float(loss_of({"loss": torch.tensor(2.0), "logits": torch.zeros(2, 3)}))
        2.0
        >>> loss_of(torch.zeros(2, 3)) is None
        True
    """
    if isinstance(output, Mapping):
        output = output.get("loss")
    elif not isinstance(output, Tensor) and hasattr(output, "loss"):
        output = output.loss
    if isinstance(output, Tensor) and output.numel() == 1:
        return output.reshape(())
    return None


def logits_of(output: Any, batch_size: int) -> Tensor | None:
    """The model's batch-first float output: ``output`` itself, its ``logits`` (mapping key or attribute), or the
    first float tensor inside it whose first dimension is ``batch_size``.

    Example:
        >>> import torch
        >>> tuple(logits_of({"loss": torch.tensor(1.0), "logits": torch.zeros(4, 3)}, 4).shape)
        (4, 3)
    """

    def usable(value: Any) -> bool:
        return (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and value.dim() >= 1
            and value.shape[0] == batch_size
        )

    if usable(output):
        return output
    named = child(output, "logits") if not isinstance(output, Tensor) else _MISSING
    if usable(named):
        return named
    return next((tensor for _, tensor in named_tensors(output, "output") if usable(tensor)), None)
