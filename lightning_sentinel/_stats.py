"""Device-side statistics shared by the checks: fused norms, layer grouping, robust medians.

Everything here returns tensors on the device; callers read results back once per check.

Example:
    >>> import torch
    >>> tensor_norms([torch.ones(4), torch.zeros(3)])
    tensor([2., 0.])
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def on_host(tensor: Tensor) -> bool:
    """Whether ``tensor`` lives in host memory, so reading it at once costs no host-device sync.

    The checks that read a value at once on the CPU (the NaN guard's loss, a batch's NaN count) and
    keep it on the device otherwise ask this; the sync-count test patches it to exercise their
    accelerator path on a CPU-only machine.
    """
    return tensor.device.type == "cpu"


@contextlib.contextmanager
def float32_default() -> Iterator[None]:
    """Within the block, tensors made without a ``dtype`` are float32, whatever the run's default.

    Lightning's ``precision="64-true"``/``"bf16-true"``/``"16-true"`` set the default dtype for the
    length of ``training_step``, and a user may set it for a whole script; the checks' own counters
    and flags must not follow it (``index_add_`` and friends refuse mixed dtypes). The recorders that
    run inside the user's forward wrap their work in this block; it costs nothing when the default
    is float32 already.

    Example:
        >>> torch.set_default_dtype(torch.float64)
        >>> with float32_default():
        ...     torch.zeros(1).dtype
        torch.float32
        >>> torch.zeros(1).dtype
        torch.float64
        >>> torch.set_default_dtype(torch.float32)
    """
    previous = torch.get_default_dtype()
    if previous is torch.float32:
        yield
        return
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# set by ``shared_norms`` for the length of one hook call: (output device, the tensors, their norms)
_shared: list[tuple[torch.device, list[Tensor], Tensor]] | None = None


@contextlib.contextmanager
def shared_norms() -> Iterator[None]:
    """Within the block, :func:`tensor_norms` of the very same tensors (the same objects in the same
    order, to the same device) is computed once and shared.

    ``Sentinel`` wraps each ``on_before_optimizer_step`` call in it: its NaN guard, gradient monitor and
    update monitor all take the norms of the same weights and gradients on their check steps. Only for
    a block in which those tensors do not change; callers never modify the norms in place.

    Example:
        >>> weights = [torch.ones(4), torch.ones(9)]
        >>> with shared_norms():
        ...     tensor_norms(weights) is tensor_norms(weights)
        True
    """
    global _shared
    if _shared is not None:  # nested: the outer block shares
        yield
        return
    _shared = []
    try:
        yield
    finally:
        _shared = None


def tensor_norms(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """The 2-norm of each tensor as one float32 vector, in input order, without leaving the device.

    Tensors are grouped by device and dtype and reduced with the fused ``torch._foreach_norm``
    (accumulating in float32, so fp16 values cannot overflow the norm). NaN or Inf in a tensor
    gives a NaN or Inf norm. No autograd graph is recorded.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float32, device=device)
    out_device = device if device is not None else tensors[0].device
    shared = _shared
    if shared is not None:
        for shared_device, shared_tensors, norms in shared:
            if (
                shared_device == out_device
                and len(shared_tensors) == len(tensors)
                and all(a is b for a, b in zip(shared_tensors, tensors, strict=True))
            ):
                return norms
    with torch.no_grad():
        norms = _tensor_norms(tensors, out_device)
    if shared is not None:
        shared.append((out_device, list(tensors), norms))  # holds the tensors: no id is reused meanwhile
    return norms


def _tensor_norms(tensors: Sequence[Tensor], out_device: torch.device) -> Tensor:
    first = tensors[0]
    if all(
        t.device == first.device and t.dtype == first.dtype for t in tensors
    ):  # usual case: one fused call
        return _fused_norms(list(tensors), first.dtype).to(out_device)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    result = torch.empty(len(tensors), dtype=torch.float32, device=out_device)
    for (group_device, dtype), indices in groups.items():
        norms = _fused_norms([tensors[i].detach() for i in indices], dtype)
        index_tensor = torch.tensor(indices, dtype=torch.long, device=out_device)
        result.index_copy_(0, index_tensor, norms.to(out_device) if group_device != out_device else norms)
    return result


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _fused_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """float32 norms of same-dtype tensors, for every floating dtype torch trains in.

    Half types accumulate in float32 (fp16 values cannot overflow the norm); float64 accumulates in
    float64 (``_foreach_norm`` refuses to narrow) and a finite norm beyond float32's range is kept
    finite (saturated), so only a real NaN/Inf reads as non-finite.

    Example:
        >>> _fused_norms([torch.full((4,), 1e100, dtype=torch.float64)], torch.float64)
        tensor([3.4028e+38])
        >>> _fused_norms([torch.tensor([3.0, 4.0], dtype=torch.bfloat16)], torch.bfloat16)
        tensor([5.])
    """
    if dtype == torch.float64:
        norms = torch.stack(torch._foreach_norm(tensors, 2))
        return torch.where(torch.isfinite(norms), norms.clamp(max=_FLOAT32_MAX), norms).float()
    if not dtype.is_floating_point:  # integer or bool buffers: exact enough in float32
        tensors = [t.float() for t in tensors]
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def shard_norms(tensors: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """:func:`tensor_norms` where a missing tensor (``None``: this rank holds no shard of it) counts as 0.

    Example:
        >>> shard_norms([torch.ones(4), None], torch.device("cpu"))
        tensor([2., 0.])
    """
    present = [i for i, tensor in enumerate(tensors) if tensor is not None and tensor.numel() > 0]
    result = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    if present:
        norms = tensor_norms([tensors[i] for i in present], device=device)  # type: ignore[misc]
        result.index_copy_(0, torch.tensor(present, dtype=torch.long, device=device), norms)
    return result


def global_norms(local_norms: Tensor) -> Tensor:
    """The 2-norms of tensors sharded across the ranks, from each rank's norms of its own shards.

    Sums the squares over the default process group (every rank must call this, with the same
    tensors in the same order) and takes the root; NaN or Inf on any rank gives NaN or Inf. Without
    an initialised process group the norms are returned as they are.

    Example:
        >>> global_norms(torch.tensor([3.0, 4.0]))  # one process: nothing to reduce
        tensor([3., 4.])
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_norms
    squares = local_norms.float().square()
    dist.all_reduce(squares)
    return squares.sqrt()


def shards_gradients(strategy: object) -> bool:
    """Whether ``strategy`` shards parameters and gradients across ranks (FSDP, DeepSpeed, model parallel).

    Under these ``p.grad`` (and ``p``) hold this rank's shard only: norms must go through
    :func:`global_norms`.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> shards_gradients(DDPStrategy())
        False
    """
    names = {klass.__name__ for klass in type(strategy).__mro__}
    return bool(names & {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"})


@dataclass(frozen=True)
class LayerGrouping:
    """Parameters grouped into layers (the module that owns them).

    Attributes:
        layer_names: one name per layer, in parameter registration order.
        parameter_names: every parameter's full name.
        parameter_layer: for each parameter, the index of its layer.
        is_weight_layer: per layer, whether it holds a parameter with two or more dimensions.
    """

    layer_names: tuple[str, ...]
    parameter_names: tuple[str, ...]
    parameter_layer: tuple[int, ...]
    is_weight_layer: tuple[bool, ...]
    # ``parameter_layer`` as a long tensor per device, built on first use (one host-to-device copy)
    _index: dict[torch.device, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_named_parameters(cls, named: Iterable[tuple[str, Tensor]]) -> LayerGrouping:
        """Group ``(name, parameter)`` pairs by the owning module's name (the name less its last part)."""
        layer_names: list[str] = []
        positions: dict[str, int] = {}
        parameter_names: list[str] = []
        parameter_layer: list[int] = []
        weight_layer: list[bool] = []
        for name, parameter in named:
            layer = name.rpartition(".")[0] or name
            if layer not in positions:
                positions[layer] = len(layer_names)
                layer_names.append(layer)
                weight_layer.append(False)
            position = positions[layer]
            if parameter.dim() >= 2:
                weight_layer[position] = True
            parameter_names.append(name)
            parameter_layer.append(position)
        return cls(tuple(layer_names), tuple(parameter_names), tuple(parameter_layer), tuple(weight_layer))

    def layer_norms(self, parameter_norms: Tensor) -> Tensor:
        """Combine per-parameter 2-norms into per-layer 2-norms (sqrt of summed squares), on device."""
        index = self._index.get(parameter_norms.device)
        if index is None:
            index = self._index[parameter_norms.device] = torch.tensor(
                self.parameter_layer, dtype=torch.long, device=parameter_norms.device
            )
        squares = torch.zeros(
            len(self.layer_names), dtype=parameter_norms.dtype, device=parameter_norms.device
        )
        squares.index_add_(0, index, parameter_norms.square())
        return squares.sqrt()


def median(values: Iterable[float]) -> float:
    """Median of the finite values (NaN if there are none)."""
    finite = [value for value in values if value == value and abs(value) != float("inf")]
    return statistics.median(finite) if finite else float("nan")
