"""Which parameters an optimizer steps, under which names, and whether its gradients are still scaled."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor


@dataclass
class OptimizerView:
    """The parameters of one optimizer with their names in the LightningModule.

    ``key`` is ``""`` when the trainer has one optimizer, else ``"optimizer_<index>"``; it prefixes
    logged metric names and ``where`` so that several optimizers are told apart.
    """

    key: str
    names: list[str]
    parameters: list[Tensor]


def optimizer_view(
    trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
) -> OptimizerView:
    """Build the :class:`OptimizerView` of ``optimizer`` (call once per optimizer and cache it)."""
    names_by_id = {id(parameter): name for name, parameter in pl_module.named_parameters()}
    names: list[str] = []
    parameters: list[Tensor] = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            names.append(names_by_id.get(id(parameter), f"<unnamed parameter {len(names)}>"))
            parameters.append(parameter)
    return OptimizerView(key=optimizer_key(trainer, optimizer), names=names, parameters=parameters)


def optimizer_key(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> str:
    """``""`` when the trainer has one optimizer, else ``"optimizer_<index>"`` (see :class:`OptimizerView`)."""
    optimizers = list(trainer.optimizers)
    if len(optimizers) <= 1:
        return ""
    real = unwrap_optimizer(optimizer)
    index = next((i for i, candidate in enumerate(optimizers) if unwrap_optimizer(candidate) is real), 0)
    return f"optimizer_{index}"


def unwrap_optimizer(optimizer: object) -> object:
    """The torch optimizer inside a ``LightningOptimizer`` (any other object as it is)."""
    return getattr(optimizer, "_optimizer", optimizer)


def gradient_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The GradScaler scale still applied to ``optimizer``'s gradients in ``on_before_optimizer_step``.

    Lightning unscales before that hook, except for optimizers that unscale inside their own ``step()``
    (``_step_supports_amp_scaling``, e.g. fused Adam): their gradients are still multiplied by the
    scale. Returns that scale as a device tensor (no sync), or ``None`` when gradients are unscaled.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else None


def scaler_of(trainer: pl.Trainer) -> object | None:
    """The precision plugin's GradScaler, if 16-bit mixed precision uses one."""
    return getattr(trainer.precision_plugin, "scaler", None)
