"""The activation probe of :mod:`lightning_sentinel.checks.activations`.

On a sampled training batch the probe (1) keeps a stack of the modules whose ``forward`` is running,
through a forward pre-hook and an ``always_call`` forward hook on every submodule, and (2) pushes a
:class:`torch.overrides.TorchFunctionMode` that sees every call of a watched activation, whether a
module (``nn.ReLU`` calls ``F.relu``) or a functional form inside a ``forward`` (``F.relu``,
``torch.relu``, ``Tensor.relu``, their in-place forms, ``torch.tanh``, ``torch.sigmoid``, ...).
Each call is named by the innermost running module and reduced at once, on the device, to per-unit
counts; nothing is read back here. :meth:`ActivationProbe.remove` takes both away again.

Calls made while autograd runs a backward pass (the forward that activation checkpointing replays)
are skipped, so nothing is counted twice.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> probe = ActivationProbe(net, {})
    >>> probe.attach()
    >>> _ = net(torch.randn(8, 3))
    >>> probe.remove()
    >>> [(site.name, site.kind, site.units, site.after) for site in probe.sites.values()]
    [('1', 'relu', 4, '0')]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from lightning_sentinel._eager import eager_while_observed
from lightning_sentinel._stats import float32_default
from lightning_sentinel.checks._torch_function import ObservingMode, remove_mode

RELU = "relu"  # ReLU family: a unit is active where its output is > 0
TANH = "tanh"  # saturated where |y| > 0.99
SIGMOID = "sigmoid"  # saturated where y < 0.01 or y > 0.99
SMOOTH = "smooth"  # GELU/SiLU/ELU/Mish: measured for the depth scale only, never "dead"

TANH_LIMIT = 0.99
SIGMOID_LIMIT = 0.01

_ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Mish,
)
_WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fixed_kinds() -> dict[Any, tuple[str, str]]:
    """Watched callables whose kind does not depend on their arguments: ``func -> (kind, label)``."""
    kinds: dict[Any, tuple[str, str]] = {}
    for label, kind, funcs in (
        ("relu", RELU, (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6)),
        ("tanh", TANH, (F.tanh, torch.tanh, torch.tanh_, Tensor.tanh, Tensor.tanh_)),
        ("sigmoid", SIGMOID, (F.sigmoid, torch.sigmoid, torch.sigmoid_, Tensor.sigmoid, Tensor.sigmoid_)),
        ("gelu", SMOOTH, (F.gelu,)),
        ("silu", SMOOTH, (F.silu,)),
        ("elu", SMOOTH, (F.elu,)),
        ("mish", SMOOTH, (F.mish,)),
    ):
        for func in funcs:
            kinds[func] = (kind, label)
    return kinds


_FIXED_KINDS = _fixed_kinds()
_LEAKY = (F.leaky_relu, F.leaky_relu_)
_HARDTANH = (F.hardtanh, F.hardtanh_)


def activation_kind(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], max_leaky_slope: float
) -> tuple[str, str] | None:
    """``(kind, label)`` of a watched activation call, or ``None``.

    ``leaky_relu`` counts as ReLU family only when its slope is at most ``max_leaky_slope``;
    ``hardtanh`` only when its lower limit is 0 (``ReLU6`` and relatives).

    Example:
        >>> activation_kind(torch.relu, (torch.ones(1),), {}, 0.01)
        ('relu', 'relu')
        >>> activation_kind(F.leaky_relu, (torch.ones(1), 0.2), {}, 0.01) is None
        True
        >>> activation_kind(torch.add, (), {}, 0.01) is None
        True
    """
    try:
        known = _FIXED_KINDS.get(func)
    except TypeError:  # an unhashable callable
        return None
    if known is not None:
        return known
    if func in _LEAKY:
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return (RELU, "leaky_relu") if float(slope) <= max_leaky_slope else None
    if func in _HARDTANH:
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        return (RELU, "relu6") if float(low) == 0.0 else None
    return None


@dataclass
class Site:
    """One activation call site, accumulated over the sampled batches of a window (on the device).

    Attributes:
        name: the innermost module running the call, e.g. ``net.1`` for an ``nn.ReLU``, or
            ``blocks.0:relu`` for a functional call inside ``blocks.0``'s forward; a ``#k`` suffix
            numbers further calls of the same site in one batch.
        kind: ``relu``, ``tanh``, ``sigmoid`` or ``smooth``.
        label: the operation (``relu``, ``leaky_relu``, ``tanh``, ...).
        units: features (last dimension) or channels (dimension 1 of a convolution's output).
        after: the weight layer (``Linear``/``Conv``) that last returned before the call, if any.
        counts: per unit, the samples where it was active (ReLU) or saturated (tanh/sigmoid).
        samples: samples per unit counted into ``counts`` (batch x positions).
        batches: sampled batches that reached this site.
        scale: the first recorded batch's standard deviation over the batch of each output element
            (RMS over the elements).
        order: position of the site's first call in the first recorded batch's execution order.
        weights_before: weight layers that had returned before the site's first call.
        hidden: whether a weight layer returned after the site's first call (otherwise it is an output
            activation, e.g. a sigmoid head, whose saturation is the goal of training).
        chain: which connected chain of weight layers the site belongs to: a weight layer whose input
            carries no gradient (the data, or a ``.detach()``ed tensor such as a critic fed with a
            classifier's detached logits) starts a new chain, so scales are compared along one network.
    """

    name: str
    kind: str
    label: str
    units: int
    after: str | None
    counts: Tensor | None = None
    samples: int = 0
    batches: int = 0
    scale: Tensor | None = None
    chain: int = 0
    order: int = 0
    weights_before: int = 0
    hidden: bool = True


@dataclass
class _Frame:
    module_id: int
    calls: dict[str, int] = field(default_factory=dict)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread (e.g. a checkpoint's replay)."""
    return torch._C._current_graph_task_id() != -1


class _Mode(ObservingMode):
    def __init__(self, probe: ActivationProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        probe = self.probe
        if probe.recording and isinstance(result, Tensor) and result.is_floating_point():
            kind = activation_kind(func, args, kwargs, probe.max_leaky_slope)
            if kind is not None and not _in_backward():
                with float32_default():  # the run's default dtype may be float64 or bf16 here
                    probe.record(kind[0], kind[1], result)
        return result


class ActivationProbe:
    """Hooks and a function mode that fold watched activations into :class:`Site` statistics.

    Args:
        root: the model (all its submodules get the stack hooks while attached).
        sites: the window's sites by name, updated in place (created on first sight).
        max_leaky_slope: a ``leaky_relu`` with a larger slope is not watched.
        measure_scale: also record each site's per-unit standard deviation (first batch only).
        record_order: record the execution order of weight layers (first batch only).
    """

    def __init__(
        self,
        root: nn.Module,
        sites: dict[str, Site],
        max_leaky_slope: float = 0.01,
        measure_scale: bool = False,
        record_order: bool = False,
    ) -> None:
        self.root = root
        self.sites = sites
        self.max_leaky_slope = max_leaky_slope
        self.measure_scale = measure_scale
        self.record_order = record_order
        self.weight_order: list[str] = []
        self.recording = False
        self._names: dict[int, str] = {}
        self._activation_ids: set[int] = set()
        self._conv_ids: set[int] = set()
        self._weight_ids: set[int] = set()
        self._handles: list[RemovableHandle] = []
        self._stack: list[_Frame] = []
        self._root_frame = _Frame(id(root))
        self._mode: _Mode | None = None
        self._last_weight: str | None = None
        self._last_conv_shape: torch.Size | None = None
        self._seen_this_batch: set[str] = set()
        self._order = 0
        self.weight_calls = 0  # weight-layer forwards that returned while attached
        self._created: list[Site] = []
        self._chain = 0  # the connected chain of weight layers now running (see ``Site.chain``)
        self._weights_entered = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        """Whether hooks or the mode are in place."""
        return bool(self._handles) or self._mode is not None

    def attach(self) -> None:
        """Register the stack hooks on every submodule and push the function mode (idempotent)."""
        if self.attached:
            return
        root_name = type(self.root).__name__
        for name, module in self.root.named_modules():
            key = id(module)
            self._names[key] = name or root_name
            if isinstance(module, _ACTIVATION_MODULES):
                self._activation_ids.add(key)
            if isinstance(module, _WEIGHT_MODULES):
                self._weight_ids.add(key)
            if isinstance(module, _CONV_MODULES):
                self._conv_ids.add(key)
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        self._stack = []
        self._root_frame = _Frame(id(self.root))
        self._seen_this_batch = set()
        self._mode = _Mode(self)
        eager_while_observed(self._mode)  # pushed by hand, not entered: count it as observing here
        torch._C._push_on_torch_function_stack(self._mode)
        self.recording = True

    def remove(self) -> None:
        """Remove the hooks and take the mode off the mode stack, wherever it sits (safe to call twice)."""
        self.recording = False
        for site in self._created:
            site.hidden = site.weights_before < self.weight_calls
        self._created = []
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack = []
        mode, self._mode = self._mode, None
        if mode is not None:
            remove_mode(mode)

    # ------------------------------------------------------------------ module stack
    def _enter(self, module: nn.Module, args: Any) -> None:
        if not self.recording or _in_backward():
            return
        self._stack.append(_Frame(id(module)))
        if self.measure_scale and id(module) in self._weight_ids:
            first = args[0] if args else None
            detached_input = (
                isinstance(first, Tensor) and first.is_floating_point() and not first.requires_grad
            )
            if detached_input and self._weights_entered and torch.is_grad_enabled():
                self._chain += 1  # a network fed with data or detached outputs: a new chain
            self._weights_entered += 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.recording or _in_backward():
            return
        key = id(module)
        if self._stack and self._stack[-1].module_id == key:
            self._stack.pop()
        if key in self._weight_ids:
            name = self._names[key]
            self._last_weight = name
            self.weight_calls += 1
            if self.record_order and name not in self.weight_order:
                self.weight_order.append(name)
            if key in self._conv_ids and isinstance(output, Tensor):
                self._last_conv_shape = output.shape

    # ------------------------------------------------------------------ recording
    def _site_name(self, label: str) -> str:
        frame = self._stack[-1] if self._stack else self._root_frame
        module_name = self._names.get(frame.module_id, type(self.root).__name__)
        base = module_name if frame.module_id in self._activation_ids else f"{module_name}:{label}"
        count = frame.calls.get(base, 0) + 1
        frame.calls[base] = count
        name = base if count == 1 else f"{base}#{count}"
        # a module called several times per batch (a shared nn.ReLU) is a new frame per call
        while name in self._seen_this_batch:
            count += 1
            frame.calls[base] = count
            name = f"{base}#{count}"
        self._seen_this_batch.add(name)
        return name

    def record(self, kind: str, label: str, output: Tensor) -> None:
        """Fold one activation output into its site's device-side counts."""
        with torch.no_grad():
            values = output.detach()
            if values.dim() == 0:
                return
            if values.dim() == 1:
                values = values.unsqueeze(1)
            channels_first = values.dim() >= 3 and (
                values.shape == self._last_conv_shape or values.dim() in (4, 5)
            )
            unit_dim = 1 if channels_first else values.dim() - 1
            units = values.shape[unit_dim]
            # reduce over every other dimension in place: no transposed copy of the activation
            other_dims = tuple(dim for dim in range(values.dim()) if dim != unit_dim)
            samples = values.numel() // max(units, 1)
            name = self._site_name(label)
            site = self.sites.get(name)
            if site is None or site.units != units or site.kind != kind:
                site = self.sites[name] = Site(
                    name,
                    kind,
                    label,
                    units,
                    self._last_weight,
                    order=self._order,
                    weights_before=self.weight_calls,
                    chain=self._chain,
                )
                self._order += 1
                self._created.append(site)
            if kind == RELU:
                hits = (values > 0).sum(other_dims, dtype=torch.float32)
            elif kind == TANH:
                hits = (values.abs() > TANH_LIMIT).sum(other_dims, dtype=torch.float32)
            elif kind == SIGMOID:
                saturated = (values < SIGMOID_LIMIT) | (values > 1.0 - SIGMOID_LIMIT)
                hits = saturated.sum(other_dims, dtype=torch.float32)
            else:
                hits = None
            if hits is not None:
                site.counts = hits if site.counts is None else site.counts + hits.to(site.counts.device)
            site.samples += samples
            site.batches += 1
            if self.measure_scale and site.scale is None and output.shape[0] > 1:
                # the input-dependent signal: each element's spread over the batch (dimension 0), RMS over
                # the rest, so position patterns a convolution's zero padding adds do not count as signal
                site.scale = output.detach().float().var(0, unbiased=False).mean().sqrt()
