"""The registry of detection-benchmark cases: healthy runs that must stay quiet, broken runs that must be caught.

A faulty case lists the check ids that count as a *correct diagnosis*: the run is scored as
caught when at least one warning/error finding it produced has one of those ids.

Example:
    >>> case = get_case("mlp-digits")
    >>> case.healthy, sorted(case.expected)
    (True, [])
    >>> all(case.healthy or case.expected for case in all_cases())
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.detection import zoo

Built = tuple[pl.LightningModule, DataLoader, DataLoader | None]

NON_FINITE_LOSS = "non-finite-loss"
NON_FINITE_GRADIENTS = "non-finite-gradients"
NON_FINITE_WEIGHTS = "non-finite-weights"
NON_FINITE_ACTIVATION = "non-finite-activation"
EXPLODING = "exploding-gradients"
VANISHING = "vanishing-gradients"


@dataclass(frozen=True)
class Case:
    """One benchmark run.

    Args:
        name: unique kebab-case name (``--case NAME``).
        healthy: whether the program is correct (then no warning/error finding is allowed).
        expected: check ids that count as a correct diagnosis (empty for a healthy case).
        build: returns ``(module, train_loader, val_loader or None)``; called after seeding.
        description: one line: what the program does, and for a fault, what the bug is.
        trainer_kwargs: ``Trainer`` arguments of this case (``max_steps``, ``precision``, ...).
        fast: whether the case is in the fast subset that the test suite runs.
        seed: passed to ``pl.seed_everything`` before building.
    """

    name: str
    healthy: bool
    expected: frozenset[str]
    build: Callable[[], Built]
    description: str
    trainer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    fast: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.healthy == bool(self.expected):
            raise ValueError(
                f"case {self.name!r}: a healthy case expects nothing, a faulty one at least one id"
            )
        if "max_steps" not in self.trainer_kwargs:
            raise ValueError(f"case {self.name!r}: trainer_kwargs must set max_steps")


# ====================================================================== healthy builders
def _mlp_digits() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _cnn_digits_dict() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True, val_fraction=0.2, dict_batches=True)
    module = zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adamw", lr=2e-3, weight_decay=1e-2)
    return module, train, val


def _resnet_digits() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    module = zoo.ZooModule(zoo.ResNetDigits(), nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9)
    return module, train, val


def _gru_sequences() -> Built:
    train, val = zoo.sequence_loaders()
    module = zoo.ZooModule(
        zoo.RecurrentClassifier(features=3, cell="gru"), nn.CrossEntropyLoss(), "adam", lr=1e-2
    )
    return module, train, val


def _lstm_sequences() -> Built:
    train, val = zoo.sequence_loaders(seed=1)
    module = zoo.ZooModule(
        zoo.RecurrentClassifier(features=3, cell="lstm"), nn.CrossEntropyLoss(), "adam", lr=1e-2
    )
    return module, train, val


def _transformer_tokens() -> Built:
    train, val = zoo.marker_token_loaders()
    network = zoo.TokenTransformer(vocab=20, length=12)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adamw", lr=2e-3, weight_decay=1e-2), train, val


def _regression_diabetes() -> Built:
    train, val = zoo.diabetes_loaders(batch_size=32, val_fraction=0.2)
    return zoo.ZooModule(zoo.mlp([10, 64, 64, 1]), nn.MSELoss(), "adam", lr=3e-3), train, val


def _bce_breast_cancer() -> Built:
    train, val = zoo.breast_cancer_loaders(batch_size=32)
    return zoo.ZooModule(zoo.mlp([30, 32, 1]), nn.BCEWithLogitsLoss(), "adam", lr=3e-3), train, val


def _embedding_tokens() -> Built:
    train, val = zoo.token_count_loaders()
    network = zoo.BagOfEmbeddings(vocab=30)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-2), train, val


def _tanh_mlp_digits() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64, 64, 64, 64, 64, 10], activation=nn.Tanh)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9), train, val


def _mlp_zero_init_head() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64, 128, 64, 10])
    nn.init.zeros_(network[-1].weight)
    nn.init.zeros_(network[-1].bias)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _frozen_backbone() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = nn.Sequential(zoo.freeze_(zoo.mlp([64, 256, 128], final_activation=True)), nn.Linear(128, 10))
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-2), train, val


def _sgd_plain_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=32)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=0.1), train, val


def _mlp_digits_accumulate() -> Built:
    train, val = zoo.digits_loaders(batch_size=16)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _mlp_digits_bf16() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    module = zoo.ZooModule(zoo.mlp([64, 128, 64, 10], dropout=0.1), nn.CrossEntropyLoss(), "adam", lr=1e-3)
    return module, train, val


def _cnn_digits_bf16() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    return zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


# ====================================================================== fault builders
def _lr_too_high_sgd() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=50.0), train, val


def _lr_too_high_accumulate() -> Built:
    train, val = zoo.digits_loaders(batch_size=16, images=True)
    module = zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "sgd", lr=30.0, momentum=0.9)
    return module, train, val


def _log1p_standardized() -> Built:
    train, val = zoo.diabetes_loaders(batch_size=32, dict_batches=True)
    network = nn.Sequential(zoo.LogFeatures(), zoo.mlp([10, 64, 1]))
    return zoo.ZooModule(network, nn.MSELoss(), "adam", lr=3e-3), train, val


def _sqrt_at_zero_contrastive() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64, 64, 16])
    return zoo.ZooModule(network, zoo.PairwiseContrastiveLoss(), "adam", lr=1e-3), train, val


def _normal_init_deep_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.normal_init_(zoo.mlp([64] + [128] * 7 + [10]), std=1.0)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _deep_sigmoid_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64] + [64] * 15 + [10], activation=nn.Sigmoid)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "sgd", lr=0.1, momentum=0.9), train, val


def _warmup_without_cap() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    module = zoo.ZooModule(
        zoo.mlp([64, 128, 64, 10]),
        nn.CrossEntropyLoss(),
        "sgd",
        lr=0.05,
        momentum=0.9,
        lr_lambda=zoo.warmup_without_cap,
    )
    return module, train, val


def _small_init_deep_tanh() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.normal_init_(zoo.mlp([64] + [64] * 9 + [10], activation=nn.Tanh), std=0.01)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _poisson_unscaled() -> Built:
    train, val = zoo.diabetes_loaders(batch_size=32, scaled=False)
    return zoo.ZooModule(zoo.mlp([10, 32, 1]), nn.PoissonNLLLoss(), "sgd", lr=1e-4), train, val


def _log_softmax_underflow() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, scale="bytes")
    network = nn.Sequential(zoo.mlp([64, 64, 10]), zoo.SoftmaxHead())
    return zoo.ZooModule(network, zoo.NLLOfProbabilities(), "adam", lr=1e-3), train, val


# ====================================================================== the registry
_QUIET: frozenset[str] = frozenset()
# Catalog ids (CHECKS.md) without an implementation yet that would also be a right diagnosis of a
# learning rate that is too high; listed so that the case scores them once they exist.
_LR_TOO_HIGH_IDS = ("loss-divergence", "update-ratio-too-high", "dead-relu")

CORE_CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- healthy
    Case(
        "mlp-digits",
        True,
        _QUIET,
        _mlp_digits,
        "MLP 64-128-64-10 on standardised digits, Adam 1e-3, tuple batches",
        {"max_steps": 150},
        fast=True,
    ),
    Case(
        "cnn-bn-dropout-digits",
        True,
        _QUIET,
        _cnn_digits_dict,
        "CNN with BatchNorm and Dropout on 1x8x8 digits, AdamW, dict batches, validation every epoch",
        {"max_steps": 150},
        fast=True,
    ),
    Case(
        "resnet-digits",
        True,
        _QUIET,
        _resnet_digits,
        "residual CNN (2 blocks, BatchNorm) on 1x8x8 digits, SGD 0.05 momentum 0.9",
        {"max_steps": 120},
    ),
    Case(
        "gru-sequences",
        True,
        _QUIET,
        _gru_sequences,
        "GRU classifier on synthetic float sequences (sign of a channel's sum), Adam 1e-2, clip 1.0",
        {"max_steps": 150, "gradient_clip_val": 1.0},
    ),
    Case(
        "lstm-sequences",
        True,
        _QUIET,
        _lstm_sequences,
        "LSTM classifier on synthetic float sequences, Adam 1e-2, no clipping",
        {"max_steps": 150},
    ),
    Case(
        "transformer-tokens",
        True,
        _QUIET,
        _transformer_tokens,
        "2-layer Transformer encoder with dropout on token ids (is the marker token present?), AdamW 2e-3",
        {"max_steps": 150},
    ),
    Case(
        "regression-diabetes-mse",
        True,
        _QUIET,
        _regression_diabetes,
        "regression MLP with MSE on diabetes, standardised features and target, validation",
        {"max_steps": 150},
        fast=True,
    ),
    Case(
        "bce-breast-cancer",
        True,
        _QUIET,
        _bce_breast_cancer,
        "binary classifier with BCEWithLogits on breast_cancer, standardised features",
        {"max_steps": 150},
    ),
    Case(
        "embedding-tokens",
        True,
        _QUIET,
        _embedding_tokens,
        "nn.Embedding of token ids, mean-pooled, MLP head (most frequent residue class), Adam 1e-2",
        {"max_steps": 150},
    ),
    Case(
        "bce-breast-cancer-long",
        True,
        _QUIET,
        _bce_breast_cancer,
        "the breast_cancer classifier trained on for 400 steps (~24 epochs) to a near-zero training loss",
        {"max_steps": 400},
    ),
    Case(
        "mlp-zero-init-head",
        True,
        _QUIET,
        _mlp_zero_init_head,
        "MLP on digits whose classifier layer starts at zero (a common init trick): no gradient below it at step 0",
        {"max_steps": 150},
    ),
    Case(
        "frozen-backbone-finetune",
        True,
        _QUIET,
        _frozen_backbone,
        "frozen 2-layer feature extractor (requires_grad=False, still passed to Adam) and a trained linear head",
        {"max_steps": 150},
    ),
    Case(
        "sgd-plain-mlp-digits",
        True,
        _QUIET,
        _sgd_plain_mlp,
        "MLP on digits, batch 32, plain SGD lr 0.1 without momentum: noisy but healthy gradient norms",
        {"max_steps": 150},
    ),
    Case(
        "tanh-mlp-digits",
        True,
        _QUIET,
        _tanh_mlp_digits,
        "5-layer tanh MLP (default init) on digits, SGD 0.05 momentum 0.9: saturating but trainable",
        {"max_steps": 150},
    ),
    Case(
        "mlp-digits-accumulate",
        True,
        _QUIET,
        _mlp_digits_accumulate,
        "MLP on digits, micro-batches of 16 with accumulate_grad_batches=4",
        {"max_steps": 60, "accumulate_grad_batches": 4},
    ),
    Case(
        "mlp-digits-bf16",
        True,
        _QUIET,
        _mlp_digits_bf16,
        "MLP with dropout on digits under precision='bf16-mixed' (CPU autocast)",
        {"max_steps": 150, "precision": "bf16-mixed"},
        fast=True,
    ),
    Case(
        "cnn-digits-bf16",
        True,
        _QUIET,
        _cnn_digits_bf16,
        "CNN with BatchNorm on 1x8x8 digits under precision='bf16-mixed'",
        {"max_steps": 120, "precision": "bf16-mixed"},
    ),
    # ---------------------------------------------------------------- faulty
    Case(
        "lr-too-high-sgd",
        False,
        frozenset({NON_FINITE_LOSS, NON_FINITE_WEIGHTS, EXPLODING}),
        _lr_too_high_sgd,
        "MLP on digits with SGD lr=50 (meant 0.05): the weights blow up and the loss turns NaN",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "lr-too-high-bf16",
        False,
        frozenset({NON_FINITE_LOSS, NON_FINITE_WEIGHTS, EXPLODING}),
        _lr_too_high_sgd,
        "the lr=50 SGD bug of lr-too-high-sgd under precision='bf16-mixed'",
        {"max_steps": 60, "precision": "bf16-mixed"},
    ),
    Case(
        "lr-too-high-accumulate",
        False,
        frozenset({NON_FINITE_LOSS, NON_FINITE_WEIGHTS, EXPLODING, "loss-oscillation", *_LR_TOO_HIGH_IDS}),
        _lr_too_high_accumulate,
        "BatchNorm CNN, SGD lr=30 momentum 0.9 with accumulate_grad_batches=4: the loss diverges and jumps",
        {"max_steps": 60, "accumulate_grad_batches": 4},
    ),
    Case(
        "log1p-standardized-features",
        False,
        frozenset({NON_FINITE_LOSS, NON_FINITE_ACTIVATION}),
        _log1p_standardized,
        "regression whose first layer applies log1p, meant for raw counts, to standardised features (< -1: NaN)",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "sqrt-at-zero-contrastive",
        False,
        frozenset({NON_FINITE_GRADIENTS}),
        _sqrt_at_zero_contrastive,
        "embedding MLP with a contrastive loss over all pairs incl. i==j: sqrt(0) has an infinite derivative, "
        "the loss is finite, the gradients NaN",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "normal-init-deep-mlp",
        False,
        frozenset({EXPLODING}),
        _normal_init_deep_mlp,
        "8-layer ReLU MLP with weights drawn from N(0, 1) instead of He/Xavier: huge outputs and gradients",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "warmup-without-cap",
        False,
        frozenset({EXPLODING, *_LR_TOO_HIGH_IDS}),
        _warmup_without_cap,
        "SGD 0.05 momentum 0.9 with a linear warm-up missing its min(1, .): the lr grows 15x over the run, "
        "the loss climbs and spikes near step 95, and the network ends dead at chance level",
        {"max_steps": 150},
    ),
    Case(
        "small-init-deep-tanh",
        False,
        frozenset({VANISHING}),
        _small_init_deep_tanh,
        "10-layer tanh MLP initialised N(0, 0.01^2) regardless of fan-in: the signal and the first layers' "
        "gradients vanish, the loss stays at ln(10)",
        {"max_steps": 100},
    ),
    Case(
        "deep-sigmoid-mlp",
        False,
        frozenset({VANISHING}),
        _deep_sigmoid_mlp,
        "16-layer sigmoid MLP with default init, SGD: the first layers get almost no gradient",
        {"max_steps": 60},
        fast=True,
    ),
    Case(
        "poisson-unscaled-features",
        False,
        frozenset({NON_FINITE_LOSS, NON_FINITE_ACTIVATION, EXPLODING}),
        _poisson_unscaled,
        "Poisson regression (PoissonNLLLoss, log link, SGD 1e-4) on raw diabetes features up to ~300: gradients "
        "of ~1e10, then exp(output) overflows to inf",
        {"max_steps": 60},
    ),
    Case(
        "log-softmax-underflow",
        False,
        frozenset({NON_FINITE_LOSS, NON_FINITE_ACTIVATION}),
        _log_softmax_underflow,
        "MLP on 0-255 pixel digits, loss nll(log(softmax(x))) instead of log_softmax: a probability underflows "
        "to 0, its log is -inf",
        {"max_steps": 60},
    ),
)

# Cases of later checks live in their own modules (one per topic), each exporting ``CASES``.
_EXTENSIONS = (
    "cases_activations",
    "cases_wiring",
    "cases_losses",
    "cases_data",
    "cases_curves",
    "cases_preflight",
    "cases_preflight_init",
    "cases_mixing",
    "cases_real_faults",
    "cases_healthy_more",
    "cases_mutations",
    "cases_architectures",
    "cases_labels",
    "cases_weight_decay",
    "cases_distributed",
    "cases_lm_rules",
    "cases_long",
    "cases_regression",
    "cases_hf",
)


def _extension_cases() -> tuple[Case, ...]:
    found: list[Case] = []
    for name in _EXTENSIONS:
        try:
            module = importlib.import_module(f"benchmarks.detection.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"benchmarks.detection.{name}":
                raise
            continue
        found.extend(module.CASES)
    return tuple(found)


_ALL_CASES: tuple[Case, ...] | None = None


def all_cases() -> tuple[Case, ...]:
    """The core cases followed by every topic module's, built on first use (so a topic module can
    be imported first without a circular-import failure)."""
    global _ALL_CASES
    if _ALL_CASES is None:
        cases = CORE_CASES + _extension_cases()
        if len({case.name for case in cases}) != len(cases):
            raise RuntimeError("two benchmark cases share a name")
        _ALL_CASES = cases
    return _ALL_CASES


def __getattr__(name: str) -> Any:
    if name == "CASES":  # ``from benchmarks.detection.cases import CASES`` builds the list lazily
        return all_cases()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_case(name: str) -> Case:
    """The case called ``name``; ``KeyError`` listing the known names otherwise."""
    by_name = {case.name: case for case in all_cases()}
    try:
        return by_name[name]
    except KeyError:
        raise KeyError(f"unknown case {name!r}; known: {', '.join(by_name)}") from None


def select_cases(names: Iterable[str] | None = None, fast: bool = False) -> list[Case]:
    """The cases named (in the order given), else every case, restricted to the fast subset if ``fast``."""
    chosen = [get_case(name) for name in names] if names else list(all_cases())
    return [case for case in chosen if case.fast] if fast else chosen
