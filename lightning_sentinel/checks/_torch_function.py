"""Helpers for the checks that intercept calls with a ``TorchFunctionMode`` (loss inputs, loss at
init, activations): taking a mode off the stack wherever it sits, and naming a loss call's origin.

Example:
    >>> from torch.overrides import TorchFunctionMode
    >>> mode = TorchFunctionMode()
    >>> _ = mode.__enter__()
    >>> remove_mode(mode)
    >>> remove_mode(mode)  # already gone: nothing to do
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class LossCallRecorder(TorchFunctionMode):
    """Runs every call unchanged and hands the calls of ``intercepted`` functions to :meth:`record`.

    ``intercepted`` maps each watched function to a label the subclass understands. An exception in
    :meth:`record` is kept in ``error`` and stops the recording: it never reaches the user's loss.
    """

    intercepted: ClassVar[dict[Callable[..., Any], str]] = {}

    def __init__(self, module_names: dict[int, str]) -> None:
        super().__init__()
        self.module_names = module_names
        self.error: Exception | None = None

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        label = self.intercepted.get(func)
        if label is not None and self.error is None:
            try:
                self.record(func, label, args, kwargs, result)
            except Exception as error:  # the check's failure must never break the user's loss
                self.error = error
        return result

    def record(
        self, func: Callable[..., Any], label: str, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Called for each intercepted call, after it ran (``result`` is what it returned)."""
        raise NotImplementedError


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_CHECKS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LOSS_MODULES_FILE = os.path.join(_TORCH_DIR, "nn", "modules", "loss.py")


def remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off the torch-function mode stack, wherever it sits, leaving the others in order."""
    stack = torch.overrides._get_current_function_mode_stack()
    if not any(entry is mode for entry in stack):
        return
    if stack[-1] is mode:
        mode.__exit__(None, None, None)
        return
    above: list[Any] = []  # modes pushed after ours: popped, then put back in their order
    while True:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for entry in reversed(above):
        torch._C._push_on_torch_function_stack(entry)


def loss_call_site(function: str, module_names: dict[int, str]) -> tuple[str, str]:
    """``(where, call_site)`` of the loss call being intercepted, read from the Python stack.

    ``where`` is the loss module's name in the LightningModule when an ``nn.*Loss`` made the call,
    otherwise ``F.<function> in <caller>``; ``call_site`` is the first frame outside torch, outside
    these checks and outside any mode's ``__torch_function__`` (another mode passing the call on).
    """
    frame = sys._getframe(1)
    loss_module: nn.Module | None = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename == _LOSS_MODULES_FILE and loss_module is None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, nn.Module):
                loss_module = candidate
        elif (
            not filename.startswith(_TORCH_DIR)
            and not os.path.abspath(filename).startswith(_CHECKS_DIR)
            and frame.f_code.co_name != "__torch_function__"
        ):
            break
        frame = frame.f_back
    caller, site = "unknown", "unknown"
    if frame is not None:
        # after a graph break Dynamo runs the rest of a function as ``torch_dynamo_resume_in_<name>_at_<line>``
        caller = re.sub(r"^torch_dynamo_resume_in_(.+)_at_\d+$", r"\1", frame.f_code.co_name)
        site = f"{caller} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
    if loss_module is not None:
        name = module_names.get(id(loss_module))
        return (name or f"{type(loss_module).__name__} in {caller}"), site
    return f"F.{function} in {caller}", site
