"""Probing a throw-away copy of the LightningModule: the real model, its RNG streams and optimizer stay untouched.

Used by :class:`~lightning_sentinel.checks.batch_mixing.BatchIndependenceCheck` and
:class:`~lightning_sentinel.checks.target_leakage.TargetLeakageCheck`.

Example:
    >>> import torch
    >>> before = torch.get_rng_state()
    >>> with preserved_rng():
    ...     _ = torch.rand(3)
    >>> torch.equal(before, torch.get_rng_state())
    True
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from lightning_sentinel._hooks import silence_logging, uncompile_copy
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.checks._step import step_context
from lightning_sentinel.findings import Severity


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Save the torch (CPU and CUDA), numpy and python RNG states, and restore them on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def differentiable_in_eval(module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """A context in which an eval-mode ``module`` can be differentiated.

    cuDNN's recurrent kernels refuse a backward pass in eval mode ("cudnn RNN backward can only be
    called in training mode"); for a module holding a recurrent layer, cuDNN is switched off for the
    probe (PyTorch's own kernels differentiate in either mode). Anything else runs unchanged.
    """
    if any(isinstance(child, nn.RNNBase) for child in module.modules()):
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


def eval_copy(pl_module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy of ``pl_module`` (without its trainer) in eval mode, with ``log``/``log_dict`` silenced.

    Module hooks are removed from the copy: those of other callbacks must not record the probe's passes.

    The copy's parameters are detached copies: gradients computed on it never reach the real model.
    """
    duplicate = copy.deepcopy(pl_module)
    uncompile_copy(duplicate)
    duplicate.eval()
    for child in duplicate.modules():
        # hooks other callbacks attached to the real modules were copied along: they must not see the probe
        for hooks in (
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            registry = getattr(child, hooks, None)
            if isinstance(registry, dict):
                registry.clear()
    for parameter in duplicate.parameters():
        parameter.grad = None
    silence_logging(duplicate)
    return duplicate


# the losses whose (input, target) pairs the probes compare; class scores sit on dim 1 for the first two
CLASS_LOSSES = (F.cross_entropy, F.nll_loss)
INTERCEPTED_LOSSES = (
    *CLASS_LOSSES,
    F.binary_cross_entropy_with_logits,
    F.binary_cross_entropy,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
)


@dataclass
class LossRecord:
    """What one functional loss call received (detached copies)."""

    function: Callable[..., Any]
    scores: Tensor
    target: Tensor


class LossRecorder(TorchFunctionMode):
    """Keeps detached copies of what the functional losses receive (:data:`INTERCEPTED_LOSSES`, and the
    ``nn.*Loss`` modules and Hugging Face loss functions that call them); every call runs unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[LossRecord] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in INTERCEPTED_LOSSES:
            scores = args[0] if args else kwargs.get("input")
            target = args[1] if len(args) > 1 else kwargs.get("target")
            if isinstance(scores, Tensor) and isinstance(target, Tensor):
                self.records.append(LossRecord(func, scores.detach().clone(), target.detach().clone()))
        return func(*args, **kwargs)


def recorded_losses(
    duplicate: pl.LightningModule, batch: Any, batch_idx: int, trainer: pl.Trainer | None
) -> list[LossRecord]:
    """Run the copy's ``training_step`` on ``batch`` under ``torch.no_grad`` and the trainer's precision context,
    with the RNG seeded (the same draws on every call), and return what its losses received.

    Raises :class:`SkipCheck` when ``training_step`` fails on the copy.
    """
    torch.manual_seed(0)  # the same random draws in every run (the real RNG state is restored by the caller)
    recorder = LossRecorder()
    try:
        with torch.no_grad(), step_context(trainer), recorder:
            duplicate.training_step(batch, batch_idx)
    except Exception as error:
        raise SkipCheck(
            f"training_step failed on the eval-mode copy ({type(error).__name__}: {str(error)[:120]})"
        ) from None
    return recorder.records


def input_embeddings(module: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """Every ``nn.Embedding`` of ``module`` with its qualified name, the model's input embedding first
    (``get_input_embeddings()`` of a Hugging Face model), then in registration order.

    Example:
        >>> [name for name, _ in input_embeddings(nn.Sequential(nn.Embedding(4, 2), nn.Embedding(5, 3)))]
        ['0', '1']
    """
    found = [(name, child) for name, child in module.named_modules() if isinstance(child, nn.Embedding)]
    for child in module.modules():
        getter = getattr(child, "get_input_embeddings", None)
        if callable(getter):
            try:
                chosen = getter()
            except Exception:
                continue
            if isinstance(chosen, nn.Embedding):
                found.sort(key=lambda item: item[1] is not chosen)
                break
    return found


def first_embedding(module: nn.Module) -> tuple[str, nn.Embedding] | None:
    """The first ``nn.Embedding`` of ``module`` in registration order, with its qualified name.

    Example:
        >>> first_embedding(nn.Sequential(nn.Linear(2, 2), nn.Embedding(5, 3)))[0]
        '1'
    """
    for name, child in module.named_modules():
        if isinstance(child, nn.Embedding):
            return name, child
    return None


class SkipCheck(Exception):
    """The check cannot run on this model or batch (reported once as info)."""


class FirstBatchCheck(SentinelCallback):
    """A check that runs once, on the real first training batch (global step 0), never again after
    a resume (the ``done`` flag is checkpointed). Subclasses implement ``_run_first_batch_check``; a
    :class:`SkipCheck` it raises becomes one ``info`` finding under the first id in ``CHECKS``, named
    ``SKIP_NAME`` and followed by ``SKIP_HINT``."""

    SKIP_NAME = "first-batch"
    SKIP_HINT = ""

    def __init__(self, on_detect: OnDetect = "warn") -> None:
        super().__init__(on_detect=on_detect)
        self._done = False

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"done": self._done}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._done = bool(state.get("done", False))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._done or trainer.global_step != 0:
            return
        self._done = True
        try:
            self._run_first_batch_check(trainer, pl_module, batch, batch_idx)
        except SkipCheck as skip:
            self._report(
                trainer,
                self.CHECKS[0],
                Severity.INFO,
                f"{self.SKIP_NAME} check skipped: {skip}",
                hint=self.SKIP_HINT,
            )
        self._settle(trainer)

    def _run_first_batch_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        raise NotImplementedError
