"""Helpers for the checks that intercept calls with a ``TorchFunctionMode`` (loss inputs, label noise,
loss at init, activations): taking a mode off the stack wherever it sits, naming a loss call's origin,
and the sampling lifecycle shared by the checks that read loss calls on sampled training batches.

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
from typing import Any, ClassVar, Generic, TypeVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from lightning_sentinel._eager import eager_while_observed, stop_observing
from lightning_sentinel._stats import float32_default
from lightning_sentinel.base import OnDetect, SentinelCallback


class ObservingMode(TorchFunctionMode):
    """A torch-function mode of a check: while it is on the stack, compiled code runs eagerly.

    See :mod:`lightning_sentinel._eager`; :func:`remove_mode` ends the observation.
    """

    def __enter__(self) -> ObservingMode:
        eager_while_observed(self)
        try:
            return super().__enter__()
        except BaseException:
            stop_observing(self)
            raise


class LossCallRecorder(ObservingMode):
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
                with float32_default():  # the run's default dtype may be float64 or bf16 here
                    self.record(func, label, args, kwargs, result)
            except Exception as error:  # the check's failure must never break the user's loss
                self.error = error
        return result

    def record(
        self, func: Callable[..., Any], label: str, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Called for each intercepted call, after it ran (``result`` is what it returned)."""
        raise NotImplementedError


# position of ``ignore_index`` in the signatures of cross_entropy and nll_loss
IGNORE_INDEX_POSITION = 4


def call_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, default: Any
) -> Any:
    """An intercepted call's argument ``name``, passed by keyword or at ``position``, else ``default``.

    Example:
        >>> call_argument(("logits", "target"), {}, 1, "target", None)
        'target'
        >>> call_argument(("logits",), {"ignore_index": 0}, IGNORE_INDEX_POSITION, "ignore_index", -100)
        0
    """
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_CHECKS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LOSS_MODULES_FILE = os.path.join(_TORCH_DIR, "nn", "modules", "loss.py")


def remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off the torch-function mode stack, wherever it sits, leaving the others in order."""
    stop_observing(mode)
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


RecorderT = TypeVar("RecorderT", bound=LossCallRecorder)


class InterceptingCheck(SentinelCallback, Generic[RecorderT]):
    """Base of the checks that keep a loss-call recorder active during some training batches.

    Holds the active recorder in ``_mode`` (``None`` when none is); :meth:`_release` takes it off the
    torch-function mode stack, and runs at epoch end as well as on exception and teardown (the base
    class), so a recorder whose batch never ended is never left active.
    """

    def __init__(self, on_detect: OnDetect = "warn", every_n_steps: int = 1, warmup_steps: int = 0) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        self._mode: RecorderT | None = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(trainer)

    @override
    def _release(self, trainer: pl.Trainer) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            remove_mode(mode)

    def _take_recorder(self, trainer: pl.Trainer) -> RecorderT | None:
        """At batch end: the active recorder taken off the stack (``None`` if none was), or the error
        it kept, raised (the base class turns it into "disabled itself", once)."""
        mode = self._mode
        if mode is None:
            return None
        self._release(trainer)
        if mode.error is not None:
            raise mode.error
        return mode


class SampledLossCallCheck(InterceptingCheck[RecorderT]):
    """Base of the checks that read the loss calls of sampled training batches.

    On every ``every_n_steps``-th training batch (micro-batch, after ``warmup_steps``) the recorder
    made by :meth:`_new_recorder` is entered in ``on_train_batch_start``; it is removed in
    ``on_before_backward`` under automatic optimization (backward and the optimizer step are not
    intercepted), otherwise at batch end, and always on exception, epoch end and teardown, so it is
    never left active. At batch end :meth:`_judge_calls` gets the recorder. Other batches cost a
    counter.
    """

    def __init__(self, on_detect: OnDetect = "warn", every_n_steps: int = 10, warmup_steps: int = 0) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        self._batches_seen = 0
        self._module_names: dict[int, str] | None = None

    def _new_recorder(self, module_names: dict[int, str]) -> RecorderT:
        """The recorder to enter on a sampled batch (override)."""
        raise NotImplementedError

    def _judge_calls(self, trainer: pl.Trainer, recorder: RecorderT, batch_idx: int) -> None:
        """Judge what ``recorder`` saw on the sampled batch ``batch_idx`` (override)."""
        raise NotImplementedError

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"batches_seen": self._batches_seen}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._batches_seen = int(state.get("batches_seen", 0))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module_names = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._release(trainer)  # a batch whose end hook never ran (an epoch cut short) leaves nothing behind
        self._batches_seen += 1
        if not self._due_batch(trainer) or not self.active_checks:
            return
        if self._module_names is None:
            self._module_names = {id(module): name for name, module in pl_module.named_modules() if name}
        self._mode = self._new_recorder(self._module_names)
        self._mode.__enter__()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mode = self._take_recorder(trainer)
        if mode is None:
            return
        self._judge_calls(trainer, mode, batch_idx)
        self._settle(trainer)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # automatic optimization: the loss of this batch is computed; backward and the optimizer step
        # need not pay for the interception (the calls recorded so far are judged at batch end)
        if self._mode is not None and pl_module.automatic_optimization:
            remove_mode(self._mode)
