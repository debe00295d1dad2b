"""Models and data of the loss-at-init cases (:mod:`benchmarks.detection.cases_preflight_init`).

Example:
    >>> network = scale_final_layer_(mlp_for_digits(), 50.0)
    >>> type(network[-1]).__name__
    'Linear'
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.detection import zoo


def final_linear(network: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``network`` in registration order (its output layer)."""
    layers = [module for module in network.modules() if isinstance(module, nn.Linear)]
    if not layers:
        raise ValueError("the network has no nn.Linear layer")
    return layers[-1]


def scale_final_layer_(network: nn.Module, factor: float) -> nn.Module:
    """Multiply the output layer's weight and bias by ``factor`` (in place; returns ``network``).

    The fault: a final layer initialised ``factor`` times too large, so the network starts with huge,
    confident logits and a loss far above ``ln C``.
    """
    layer = final_linear(network)
    with torch.no_grad():
        layer.weight.mul_(factor)
        if layer.bias is not None:
            layer.bias.mul_(factor)
    return network


def mlp_for_digits() -> nn.Sequential:
    """The healthy digits MLP of the core zoo (64-128-64-10, ReLU)."""
    return zoo.mlp([64, 128, 64, 10])


def shifted_diabetes_loaders(shift: float = 100.0, batch_size: int = 32, seed: int = 0) -> zoo.Loaders:
    """Diabetes with standardised features and the standardised target moved to mean ``shift`` (std 1).

    A regression head that starts at 0 is ``shift`` target standard deviations away from every target.
    """
    train, _ = zoo.diabetes_loaders(batch_size=batch_size, seed=seed)
    inputs, targets = train.dataset.tensors  # type: ignore[attr-defined]
    return zoo.make_loader(inputs, targets + shift, batch_size, True, seed), None
