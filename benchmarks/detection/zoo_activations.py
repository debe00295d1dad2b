"""Networks and broken initialisations of the activation cases (dead ReLUs, saturation, poor init).

Every network is small and trains on a CPU in seconds on scikit-learn's bundled digits or on the
synthetic token data of :mod:`benchmarks.detection.zoo`.

Example:
    >>> import torch
    >>> net = constant_init_(mlp_net([64, 32, 10]), 0.05)
    >>> bool((net[0].weight == 0.05).all())
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.detection import zoo


def mlp_net(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """:func:`benchmarks.detection.zoo.mlp` (``Linear`` layers with ``activation`` between them)."""
    return zoo.mlp(sizes, activation=activation)


class PlainCNN(nn.Module):
    """``depth`` conv-activation layers (no normalisation) on ``1x8x8`` digits, pooling and a linear head.

    The activation is ``activation`` (a module class), or the functional ``F.relu`` when ``None``.
    """

    def __init__(
        self,
        channels: int = 16,
        depth: int = 2,
        activation: type[nn.Module] | None = nn.ReLU,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(1 if index == 0 else channels, channels, 3, padding=1) for index in range(depth)
        )
        self.activations = (
            nn.ModuleList(activation() for _ in range(depth)) if activation is not None else None
        )
        self.head = nn.Linear(channels * 16, classes)

    def forward(self, images: Tensor) -> Tensor:
        hidden = images
        for index, conv in enumerate(self.convs):
            hidden = conv(hidden)
            hidden = self.activations[index](hidden) if self.activations is not None else F.relu(hidden)
        return self.head(F.max_pool2d(hidden, 2).flatten(1))


class GeluTokenTransformer(nn.Module):
    """:class:`benchmarks.detection.zoo.TokenTransformer` with GELU feed-forward blocks and pre-norm."""

    def __init__(self, vocab: int, length: int, width: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=2 * width,
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(dim=1))


# ====================================================================== broken initialisations
def negative_bias_(network: nn.Module, bias: float) -> nn.Module:
    """Set the bias of every hidden ``Linear``/``Conv2d`` (all but the last weight layer) to ``bias``.

    The bug it carries: a large negative bias (a gate-bias trick applied to the wrong layers, or a
    sign slip) puts every ReLU below zero for every input, so its units never fire nor learn.
    """
    layers = [module for module in network.modules() if isinstance(module, nn.Linear | nn.Conv2d)]
    for layer in layers[:-1]:
        nn.init.constant_(layer.bias, bias)
    return network


def large_init_(network: nn.Module, std: float) -> nn.Module:
    """Initialise every ``Linear``/``Conv2d`` weight from ``N(0, std^2)`` (biases at 0), ignoring fan-in.

    The bug it carries: with tanh or sigmoid, pre-activations of size ``std * sqrt(fan_in)`` pin the
    units at +-1 (or 0/1), where their gradient is ~0.
    """
    for module in network.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
    return network


def constant_init_(network: nn.Module, value: float) -> nn.Module:
    """Set every ``Linear``/``Conv2d`` weight to ``value`` and every bias to 0.

    The bug it carries: all units of a layer compute the same function and receive the same gradient
    (the next layer reads them with identical weights), so the layer acts as a single unit forever.
    """
    for module in network.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.constant_(module.weight, value)
            nn.init.zeros_(module.bias)
    return network
