"""Benchmark cases of the wiring checks: TrainEvalModeChecker and ParameterUpdateMonitor.

Example:
    >>> sorted({case.healthy for case in CASES})
    [False, True]
    >>> all(case.healthy or case.expected for case in CASES)
    True
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_wiring
from benchmarks.detection.cases import (
    EXPLODING,
    NON_FINITE_ACTIVATION,
    NON_FINITE_GRADIENTS,
    NON_FINITE_LOSS,
    NON_FINITE_WEIGHTS,
    Built,
    Case,
)

EVAL_IN_TRAINING = "module-in-eval-during-training"
TRAIN_IN_EVAL = "module-in-train-during-eval"
NOT_IN_OPTIMIZER = "parameters-not-in-optimizer"
UNUSED = "unused-parameters"
FROZEN = "frozen-parameters"
RATIO_HIGH = "update-ratio-too-high"
RATIO_LOW = "update-ratio-too-low"
# other checks' ids that are also a right diagnosis of a learning rate far too high / low
_LR_HIGH_ALSO = (
    NON_FINITE_LOSS,
    NON_FINITE_WEIGHTS,
    NON_FINITE_GRADIENTS,
    NON_FINITE_ACTIVATION,
    EXPLODING,
    "loss-divergence",
    "loss-oscillation",
)
_LR_LOW_ALSO = ("loss-not-decreasing",)
_QUIET: frozenset[str] = frozenset()


# ====================================================================== healthy builders
def _frozen_bn_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=32, images=True, val_fraction=0.2)
    network = zoo_wiring.freeze_batch_norm_(zoo.DigitsCNN())
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


def _moe_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_wiring.HardMixtureOfExperts(64, 10)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


def _warmup_cosine_transformer() -> Built:
    train, val = zoo.marker_token_loaders()
    network = zoo.TokenTransformer(vocab=20, length=12)
    module = zoo.ZooModule(
        network,
        nn.CrossEntropyLoss(),
        "adamw",
        lr=2e-3,
        weight_decay=1e-2,
        lr_lambda=zoo_wiring.warmup_cosine,
    )
    return module, train, val


# ====================================================================== fault builders
def _eval_in_step_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    module = zoo_wiring.EvalInTrainingStep(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adam", lr=2e-3)
    return module, train, val


def _eval_in_step_transformer() -> Built:
    train, val = zoo.marker_token_loaders()
    network = zoo.TokenTransformer(vocab=20, length=12)
    module = zoo_wiring.EvalInTrainingStep(network, nn.CrossEntropyLoss(), "adamw", lr=2e-3)
    return module, train, val


def _loaded_in_eval_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64, 128, 64, 10], dropout=0.3)
    network.eval()  # as after load_state_dict on a model put in eval mode for export
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _loaded_in_eval_resnet() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo.ResNetDigits().eval()
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9), train, val


def _no_eval_in_validation_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True, val_fraction=0.2)
    module = zoo_wiring.NoEvalInValidation(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adam", lr=2e-3)
    return module, train, val


def _train_in_validation_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    network = zoo.mlp([64, 128, 64, 10], dropout=0.3)
    return zoo_wiring.TrainInValidationStep(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _head_only_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo.mlp([64, 128, 64, 10])
    return zoo_wiring.HeadOnlyOptimizer(network, nn.CrossEntropyLoss(), lr=1e-3, head="4"), train, val


def _head_only_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    return (
        zoo_wiring.HeadOnlyOptimizer(zoo.DigitsCNN(), nn.CrossEntropyLoss(), lr=2e-3, head="head"),
        train,
        val,
    )


def _detached_encoder_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_wiring.DetachedEncoder(zoo.mlp([64, 128, 64], final_activation=True), nn.Linear(64, 10))
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _detached_encoder_gru() -> Built:
    train, val = zoo.sequence_loaders()
    network = zoo_wiring.LastStepEncoder(features=3)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-2), train, val


def _integer_warmup_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    module = zoo.ZooModule(
        zoo.mlp([64, 128, 64, 10]),
        nn.CrossEntropyLoss(),
        "adam",
        lr=1e-3,
        lr_lambda=zoo_wiring.integer_warmup,
    )
    return module, train, val


def _rounded_regression() -> Built:
    train, val = zoo.diabetes_loaders(batch_size=32)
    network = zoo_wiring.RoundedRegression(zoo.mlp([10, 64, 64, 1]))
    return zoo.ZooModule(network, nn.MSELoss(), "adam", lr=3e-3), train, val


def _lr_tiny_adam_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-8), train, val


def _lr_tiny_sgd_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    module = zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "sgd", lr=1e-8, momentum=0.9)
    return module, train, val


def _lr_20_sgd_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=20.0), train, val


def _lr_20_sgd_gru() -> Built:
    train, val = zoo.sequence_loaders()
    network = zoo.RecurrentClassifier(features=3, cell="gru")
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "sgd", lr=20.0), train, val


CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- healthy
    Case(
        "frozen-bn-cnn",
        True,
        _QUIET,
        _frozen_bn_cnn,
        "CNN on digits whose batch-norm layers are deliberately frozen (requires_grad=False, eval mode), "
        "batch 32, validation every epoch",
        {"max_steps": 120},
    ),
    Case(
        "moe-top1-mlp",
        True,
        _QUIET,
        _moe_mlp,
        "top-1 mixture of 4 MLP experts on digits: an expert gets no sample (no gradient) on some steps",
        {"max_steps": 150},
    ),
    Case(
        "warmup-cosine-transformer",
        True,
        _QUIET,
        _warmup_cosine_transformer,
        "Transformer on tokens, AdamW with a 30-step linear warm-up from ~0 then cosine decay to 0 at step 150",
        {"max_steps": 150},
    ),
    # ---------------------------------------------------------------- faulty
    Case(
        "eval-in-training-step-cnn",
        False,
        frozenset({EVAL_IN_TRAINING}),
        _eval_in_step_cnn,
        "BatchNorm/Dropout CNN whose training_step calls self.eval(): dropout off, batch-norm on stale statistics",
        {"max_steps": 60},
    ),
    Case(
        "eval-in-training-step-transformer",
        False,
        frozenset({EVAL_IN_TRAINING}),
        _eval_in_step_transformer,
        "Transformer with dropout whose training_step calls self.eval()",
        {"max_steps": 40},
    ),
    Case(
        "loaded-in-eval-mlp",
        False,
        frozenset({EVAL_IN_TRAINING}),
        _loaded_in_eval_mlp,
        "dropout MLP put in eval mode before fit (as after loading for export): Lightning never calls .train()",
        {"max_steps": 40},
    ),
    Case(
        "loaded-in-eval-resnet",
        False,
        frozenset({EVAL_IN_TRAINING}),
        _loaded_in_eval_resnet,
        "residual CNN in eval mode at fit start: batch-norm never uses batch statistics",
        {"max_steps": 40},
    ),
    Case(
        "no-eval-in-validation-cnn",
        False,
        frozenset({TRAIN_IN_EVAL}),
        _no_eval_in_validation_cnn,
        "CNN whose on_validation_model_eval override forgets self.eval(): validation with dropout on and "
        "batch-norm statistics updated from validation data",
        {"max_steps": 40},
    ),
    Case(
        "train-in-validation-step-mlp",
        False,
        frozenset({TRAIN_IN_EVAL}),
        _train_in_validation_mlp,
        "dropout MLP whose validation_step starts with self.train()",
        {"max_steps": 40},
    ),
    Case(
        "head-only-optimizer-mlp",
        False,
        frozenset({NOT_IN_OPTIMIZER}),
        _head_only_mlp,
        "MLP whose optimizer gets only the last layer's parameters; the body is trainable but never updated",
        {"max_steps": 30},
    ),
    Case(
        "head-only-optimizer-cnn",
        False,
        frozenset({NOT_IN_OPTIMIZER}),
        _head_only_cnn,
        "CNN whose optimizer gets only the head's parameters",
        {"max_steps": 30},
    ),
    Case(
        "detached-encoder-mlp",
        False,
        frozenset({UNUSED}),
        _detached_encoder_mlp,
        "MLP encoder whose output is .detach()ed before the head: the encoder never gets a gradient",
        {"max_steps": 70},
    ),
    Case(
        "detached-encoder-gru",
        False,
        frozenset({UNUSED}),
        _detached_encoder_gru,
        "GRU encoder whose last output is .detach()ed before the head",
        {"max_steps": 70},
    ),
    Case(
        "integer-warmup-lr-zero",
        False,
        frozenset({FROZEN, *_LR_LOW_ALSO}),
        _integer_warmup_mlp,
        "LambdaLR warm-up factor step // 1000 (integer division): lr is exactly 0 for the whole run",
        {"max_steps": 60},
    ),
    Case(
        "rounded-regression-output",
        False,
        frozenset({FROZEN, *_LR_LOW_ALSO}),
        _rounded_regression,
        "regression MLP whose forward rounds the prediction: zero gradient everywhere, nothing moves",
        {"max_steps": 60},
    ),
    Case(
        "lr-1e-8-adam-mlp",
        False,
        frozenset({RATIO_LOW, FROZEN, *_LR_LOW_ALSO}),
        _lr_tiny_adam_mlp,
        "MLP on digits with Adam lr=1e-8 (meant 1e-3): updates of ~1e-7 of the weights, nothing is learned",
        {"max_steps": 60},
    ),
    Case(
        "lr-1e-8-sgd-cnn",
        False,
        frozenset({RATIO_LOW, FROZEN, *_LR_LOW_ALSO}),
        _lr_tiny_sgd_cnn,
        "CNN on digits with SGD lr=1e-8 momentum 0.9",
        {"max_steps": 60},
    ),
    Case(
        "lr-20-sgd-mlp",
        False,
        frozenset({RATIO_HIGH, *_LR_HIGH_ALSO}),
        _lr_20_sgd_mlp,
        "MLP on digits with SGD lr=20 (meant 0.02): every step changes the weights by more than their size",
        {"max_steps": 60},
    ),
    Case(
        "lr-20-sgd-gru",
        False,
        frozenset({RATIO_HIGH, *_LR_HIGH_ALSO}),
        _lr_20_sgd_gru,
        "GRU classifier with SGD lr=20",
        {"max_steps": 60},
    ),
)
