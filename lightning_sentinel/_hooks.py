"""Forward hooks that reduce what they see to device-side flags, and release themselves.

Example:
    >>> import torch
    >>> probe = FiniteProbe(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> with probe:
    ...     _ = probe.root(torch.ones(1, 2))
    >>> probe.first_failure() is None
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_sentinel._eager import eager_while_observed, stop_observing


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def silence_logging(module: nn.Module) -> None:
    """Make ``module.log``/``log_dict`` no-ops (instance attributes shadowing the LightningModule's).

    A check that runs ``training_step`` itself (a replay, a trial on a copy) must not feed the user's
    ``self.log`` calls into the run's metrics, nor fail because the current hook is not a step.
    """
    module.log = _no_op  # type: ignore[method-assign,assignment]
    module.log_dict = _no_op  # type: ignore[method-assign,assignment]


def uncompile_copy(module: nn.Module) -> None:
    """Make a deep copy of a ``torch.compile``'d LightningModule run its own, eager ``forward``.

    Lightning compiles a LightningModule by replacing its ``forward`` and ``*_step`` methods with
    instance attributes wrapping the *original* module's bound methods (``_compiler_ctx``);
    ``copy.deepcopy`` keeps them, so without this the copy would compute with the real model's
    weights, not its own.
    """
    if getattr(module, "_compiler_ctx", None) is not None:
        for name in ("forward", "training_step", "validation_step", "test_step", "predict_step"):
            module.__dict__.pop(name, None)
        module._compiler_ctx = None


@contextlib.contextmanager
def logging_silenced(module: nn.Module) -> Iterator[None]:
    """:func:`silence_logging` for the body only, on the real module."""
    silence_logging(module)
    try:
        yield
    finally:
        del module.log
        del module.log_dict


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def all_finite(value: Any, device: torch.device) -> Tensor:
    """A device bool: every floating-point tensor inside ``value`` (nested lists/tuples/dicts) is finite."""
    flags = [
        torch.isfinite(t).all().to(device) for t in _tensors(value) if t.is_floating_point() or t.is_complex()
    ]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack(flags).all()


@dataclass(frozen=True)
class ModuleFailure:
    """The first module, in execution order, whose output became non-finite while its input was finite.

    ``parameters_finite`` says whether that module's own parameters were finite (if not, the
    weights, not the operation, are the cause).
    """

    module: str
    module_type: str
    parameters_finite: bool
    first_bad_parameter: str | None


class FiniteProbe:
    """Forward hooks on every submodule of ``root`` recording, per call, whether inputs, outputs and
    the module's own parameters are finite. Used as a context manager; hooks are removed on exit.

    Forward hooks fire when a module's forward *returns*, so children come before their parents:
    the first recorded call with finite inputs and non-finite outputs is the innermost module that
    produced the first non-finite value.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._handles: list[RemovableHandle] = []
        self._records: list[tuple[str, Tensor, Tensor, Tensor]] = []
        self._device = next((p.device for p in root.parameters()), torch.device("cpu"))
        self.first_input_finite = True

    def __enter__(self) -> FiniteProbe:
        self.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        eager_while_observed(self)  # hooks added after compilation would be traced into the graph
        self._records = []
        root_name = type(self.root).__name__
        for name, module in self.root.named_modules():
            self._handles.append(
                module.register_forward_hook(self._make_hook(name or root_name), with_kwargs=True)
            )

    def remove(self) -> None:
        """Remove every hook (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        stop_observing(self)

    @property
    def attached(self) -> bool:
        """Whether hooks are currently registered."""
        return bool(self._handles)

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            device = self._device
            inputs_ok = torch.stack([all_finite(args, device), all_finite(kwargs, device)]).all()
            params = [p for p in module.parameters(recurse=False)]
            params_ok = all_finite(params, device)
            self._records.append((name, inputs_ok, all_finite(output, device), params_ok))

        return hook

    def first_failure(self) -> ModuleFailure | None:
        """Read the records back (one host read) and name the first failing module, or ``None``."""
        if not self._records:
            return None
        flags = torch.stack([torch.stack([i, o, p]) for _, i, o, p in self._records]).tolist()
        records, self._records = self._records, []
        self.first_input_finite = bool(flags[0][0])
        for (name, *_), (inputs_ok, output_ok, params_ok) in zip(records, flags, strict=True):
            if inputs_ok and not output_ok:
                module = self.root.get_submodule("" if name == type(self.root).__name__ else name)
                bad = None
                if not params_ok:
                    prefix = "" if name == type(self.root).__name__ else name + "."
                    bad = next(
                        (
                            prefix + n
                            for n, p in module.named_parameters(recurse=False)
                            if not torch.isfinite(p).all()
                        ),
                        None,
                    )
                return ModuleFailure(name, type(module).__name__, bool(params_ok), bad)
        return None
