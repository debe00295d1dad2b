"""Running a copy's ``training_step`` the way the trainer runs the real one.

The training loop converts each batch with ``trainer.precision_plugin.convert_input`` (float64 for
``"64-true"``, bf16/fp16 for ``"*-true"``), passes it through the module's ``on_before_batch_transfer``,
``transfer_batch_to_device`` and ``on_after_batch_transfer`` hooks, and runs ``training_step`` inside
``precision_plugin.train_step_context()`` (the default dtype of ``*-true``, ``torch.autocast`` of
``*-mixed``). The trials and probes do the same, so that a model trained in float64 or bf16 is tried in
float64 or bf16, and one trained under autocast is tried under autocast.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    >>> net[1].eval()
    Dropout(p=0.5, inplace=False)
    >>> modes = module_modes(net)
    >>> _ = net.train()
    >>> restore_modes(net, modes)
    >>> net[0].training, net[1].training
    (True, False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import nn


def prepare_batch(trainer: pl.Trainer | None, batch: Any, device: torch.device) -> Any:
    """``batch`` (as a dataloader yields it) converted and moved exactly as the training loop does it."""
    if trainer is None:
        return move_data_to_device(batch, device)
    batch = trainer.precision_plugin.convert_input(batch)
    module = trainer.lightning_module
    if module is None:  # pragma: no cover - a trainer in fit always has its module
        return move_data_to_device(batch, device)
    batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def step_context(trainer: pl.Trainer | None) -> contextlib.AbstractContextManager[Any]:
    """The precision plugin's training-step context (default dtype, autocast), or nothing without a trainer."""
    if trainer is None:
        return contextlib.nullcontext()
    return trainer.precision_plugin.train_step_context()


def grad_scaler(trainer: pl.Trainer | None) -> Any:
    """A fresh gradient scaler for a trial when the run scales its fp16 gradients, else ``None``.

    A trial must not share the run's scaler: its scale and growth tracker are part of the real run.
    """
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or trainer is None:
        return None
    return torch.amp.GradScaler(trainer.strategy.root_device.type)


def clip_gradients(trainer: pl.Trainer | None, optimizer: torch.optim.Optimizer) -> None:
    """Clip the trial's gradients as the trainer clips the real ones (``gradient_clip_val``/``_algorithm``)."""
    value = getattr(trainer, "gradient_clip_val", None)
    if not value:
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if getattr(trainer, "gradient_clip_algorithm", "norm") == "value":
        nn.utils.clip_grad_value_(parameters, float(value))
    else:
        nn.utils.clip_grad_norm_(parameters, float(value))


def module_modes(module: nn.Module) -> dict[str, bool]:
    """The train/eval flag of every submodule (the modes the user set, which a trial keeps)."""
    return {name: child.training for name, child in module.named_modules()}


def restore_modes(module: nn.Module, modes: dict[str, bool]) -> None:
    """Set every submodule back to the flag :func:`module_modes` recorded."""
    for name, child in module.named_modules():
        if name in modes:
            child.training = modes[name]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the body, every submodule's own mode restored after."""
    modes = module_modes(module)
    module.eval()
    try:
        yield
    finally:
        restore_modes(module, modes)
