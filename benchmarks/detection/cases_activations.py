"""Activation cases: dead ReLUs, saturated tanh/sigmoid, poor initialisation (MLP and CNN each), and
healthy networks that must not look dead (GELU Transformer, a wide ReLU layer before the head, a CNN
calling ``F.relu`` in its forward).

Example:
    >>> sorted({case.name.rsplit("-", 1)[-1] for case in CASES if not case.healthy})
    ['cnn', 'mlp']
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_activations
from benchmarks.detection.cases import VANISHING, Built, Case

DEAD_RELU = "dead-relu"
SATURATED = "saturated-activation"
POOR_INIT = "poor-weight-init"
_QUIET: frozenset[str] = frozenset()


# ---------------------------------------------------------------------- healthy
def _gelu_transformer() -> Built:
    train, val = zoo.marker_token_loaders()
    network = zoo_activations.GeluTokenTransformer(vocab=20, length=12)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adamw", lr=2e-3, weight_decay=1e-2), train, val


def _wide_relu_head() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return zoo.ZooModule(zoo.mlp([64, 512, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _functional_relu_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo_activations.PlainCNN(activation=None)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


# ---------------------------------------------------------------------- faulty
def _negative_bias_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_activations.negative_bias_(zoo.mlp([64, 128, 64, 10]), -3.0)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _negative_bias_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo_activations.negative_bias_(zoo_activations.PlainCNN(activation=None), -3.0)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


def _large_init_tanh_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_activations.large_init_(zoo.mlp([64, 64, 64, 10], activation=nn.Tanh), std=2.0)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9), train, val


def _large_init_tanh_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo_activations.large_init_(zoo_activations.PlainCNN(activation=nn.Tanh), std=2.0)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9), train, val


def _deep_sigmoid_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64] + [128] * 10 + [10], activation=nn.Sigmoid)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _deep_sigmoid_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo_activations.PlainCNN(depth=8, activation=nn.Sigmoid)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9), train, val


def _constant_init_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_activations.constant_init_(zoo.mlp([64, 128, 64, 10]), 0.05)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _constant_init_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo_activations.constant_init_(zoo_activations.PlainCNN(activation=nn.ReLU), 0.05)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


CASES: tuple[Case, ...] = (
    Case(
        "gelu-transformer-tokens",
        True,
        _QUIET,
        _gelu_transformer,
        "2-layer pre-norm Transformer encoder with GELU feed-forward blocks on token ids, AdamW 2e-3",
        {"max_steps": 150},
    ),
    Case(
        "wide-relu-before-head-digits",
        True,
        _QUIET,
        _wide_relu_head,
        "MLP 64-512-10 on digits: a wide ReLU layer right before the classifier, many units rarely active",
        {"max_steps": 150},
    ),
    Case(
        "functional-relu-cnn-digits",
        True,
        _QUIET,
        _functional_relu_cnn,
        "CNN without normalisation calling F.relu inside forward, on 1x8x8 digits, Adam 2e-3",
        {"max_steps": 120},
    ),
    Case(
        "negative-bias-dead-relu-mlp",
        False,
        frozenset({DEAD_RELU, POOR_INIT}),
        _negative_bias_mlp,
        "MLP on digits whose hidden biases start at -3 (sign slip): every ReLU is off for every input",
        {"max_steps": 60},
    ),
    Case(
        "negative-bias-dead-relu-cnn",
        False,
        frozenset({DEAD_RELU, POOR_INIT}),
        _negative_bias_cnn,
        "CNN (F.relu, no normalisation) on digits whose conv biases start at -3: every channel is off",
        {"max_steps": 60},
    ),
    Case(
        "large-init-tanh-mlp",
        False,
        frozenset({SATURATED, POOR_INIT}),
        _large_init_tanh_mlp,
        "tanh MLP on digits initialised N(0, 2^2) regardless of fan-in: the units are pinned at +-1",
        {"max_steps": 60},
    ),
    Case(
        "large-init-tanh-cnn",
        False,
        frozenset({SATURATED, POOR_INIT}),
        _large_init_tanh_cnn,
        "tanh CNN on digits initialised N(0, 2^2) regardless of fan-in: the channels are pinned at +-1",
        {"max_steps": 60},
    ),
    Case(
        "deep-sigmoid-stack-mlp",
        False,
        frozenset({POOR_INIT, SATURATED, VANISHING}),
        _deep_sigmoid_mlp,
        "10 sigmoid layers of 128 units (default init) on digits: the signal fades with depth",
        {"max_steps": 60},
    ),
    Case(
        "deep-sigmoid-stack-cnn",
        False,
        frozenset({POOR_INIT, SATURATED, VANISHING}),
        _deep_sigmoid_cnn,
        "8 conv-sigmoid layers (default init, no normalisation) on digits: the signal fades with depth",
        {"max_steps": 60},
    ),
    Case(
        "constant-init-mlp",
        False,
        frozenset({POOR_INIT}),
        _constant_init_mlp,
        "MLP on digits with every weight set to 0.05: the units of a layer stay identical forever",
        {"max_steps": 60},
    ),
    Case(
        "constant-init-cnn",
        False,
        frozenset({POOR_INIT}),
        _constant_init_cnn,
        "CNN on digits with every weight set to 0.05: the channels of a layer stay identical forever",
        {"max_steps": 60},
    ),
)
