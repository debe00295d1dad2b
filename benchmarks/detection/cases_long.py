"""Long runs (3000 optimizer steps) that converge and stay converged, on foreign architectures too (a
Hugging Face causal LM and ResNet from tiny configs, an LSTM, a pre-LN Transformer, regression with
scaled and unscaled targets), under a constant learning rate and under schedules that decay to zero; and
the faults that show up late in such runs (a learning rate that jumps up, labels memorised, real
overfitting) or that only a manual loop has (gradients never zeroed).

None is in the ``--fast`` subset: each takes 15-60 s on one thread.

Example:
    >>> min(case.trainer_kwargs["max_steps"] for case in CASES if case.healthy and "3000" in case.name)
    3000
    >>> any(case.fast for case in CASES)
    False
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_long
from benchmarks.detection.cases import Built, Case
from benchmarks.detection.cases_real_faults import LR_HIGH

LONG = 3000
NOT_ZEROED = "gradients-not-zeroed"
OVERFITTING = "overfitting"
_QUIET: frozenset[str] = frozenset()


# ---------------------------------------------------------------------- healthy
def _digits_mlp_adamw(schedule: zoo_long.Schedule) -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    module = zoo.ZooModule(
        zoo.mlp([64, 128, 64, 10], dropout=0.1),
        nn.CrossEntropyLoss(),
        "adamw",
        lr=1e-3,
        weight_decay=1e-2,
        lr_lambda=zoo_long.schedule_factor(schedule, LONG),
    )
    return module, train, val


def _tiny_gpt2(schedule: zoo_long.Schedule) -> Built:
    train, val = zoo_long.token_language_loaders()
    module = zoo_long.DictBatchModule(
        zoo_long.tiny_gpt2(layers=2 if schedule == "cosine" else 1),
        lr=3e-3,
        lr_lambda=zoo_long.schedule_factor(schedule, LONG, warmup_steps=100),
    )
    return module, train, val


def _hf_resnet_digits() -> Built:
    train, val = zoo_long.digits_image_dict_loaders()
    module = zoo_long.DictBatchModule(
        zoo_long.tiny_hf_resnet(), lr=2e-3, lr_lambda=zoo_long.schedule_factor("cosine", LONG)
    )
    return module, train, val


def _lstm_digits_rows() -> Built:
    train, val = zoo_long.digits_rows_loaders()
    network = zoo.RecurrentClassifier(features=8, hidden=64, classes=10, cell="lstm")
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=3e-3), train, val


def _pre_ln_transformer_digits_rows() -> Built:
    train, val = zoo_long.digits_rows_loaders()
    module = zoo.ZooModule(
        zoo_long.PreNormRowTransformer(),
        nn.CrossEntropyLoss(),
        "adamw",
        lr=1e-3,
        weight_decay=1e-2,
        lr_lambda=zoo_long.schedule_factor("cosine", LONG, warmup_steps=200),
    )
    return module, train, val


def _wave_regression(unscaled: bool) -> Built:
    train, val = zoo_long.wave_regression_loaders(unscaled=unscaled)
    network = zoo.mlp([8, 64, 64, 1])
    if unscaled:
        zoo_long.centred_head_(network, train)
    lr = 3e-2 if unscaled else 1e-3  # unscaled targets (std ~65) need a larger step to move the head
    module = zoo.ZooModule(
        network, nn.MSELoss(), "adam", lr=lr, lr_lambda=zoo_long.schedule_factor("cosine", LONG)
    )
    return module, train, val


# ---------------------------------------------------------------------- faulty
def _digits_lr_jump() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    module = zoo.ZooModule(
        zoo.mlp([64, 128, 64, 10], dropout=0.1),
        nn.CrossEntropyLoss(),
        "adamw",
        lr=1e-3,
        weight_decay=1e-2,
        lr_lambda=zoo_long.schedule_factor("constant", LONG, jump_at=2000, jump_factor=100.0),
    )
    return module, train, val


def _noisy_labels_memorised() -> Built:
    train, val = zoo_long.noisy_small_digits_loaders()
    module = zoo.ZooModule(zoo.mlp([64, 256, 256, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3)
    return module, train, val


def _small_regression_overfits() -> Built:
    train, val = zoo_long.wave_regression_loaders(train_size=64, batch_size=16)
    return zoo.ZooModule(zoo.mlp([8, 256, 256, 1]), nn.MSELoss(), "adam", lr=1e-3), train, val


def _no_zero_grad_automatic() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    module = zoo_long.NoZeroGradAutomaticModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam")
    return module, train, val


def _zero_grad_head_only() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    module = zoo_long.ZeroGradHeadOnlyModule(
        zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=0.05
    )
    return module, train, val


# ---------------------------------------------------------------------- healthy twins of the not-zeroed faults
def _manual_accumulation(set_to_none: bool) -> Built:
    train, val = zoo.digits_loaders(batch_size=16, val_fraction=0.2)
    module = zoo_long.ManualAccumulationModule(
        zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", accumulate=4, set_to_none=set_to_none
    )
    return module, train, val


def _shared_body_two_losses() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    body = zoo.mlp([64, 128, 64], final_activation=True)
    module = zoo_long.SharedBackboneTwoLossesModule(body, nn.Linear(64, 10), nn.CrossEntropyLoss())
    return module, train, val


CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- long healthy runs
    Case(
        "long-3000-digits-mlp-adamw-constant",
        True,
        _QUIET,
        lambda: _digits_mlp_adamw("constant"),
        "MLP 64-128-64-10 with dropout 0.1 on 80% of digits, AdamW 1e-3 at a constant lr, validation every "
        "epoch, 3000 steps (~136 epochs; val acc ~0.98): the loss nears 0 and stays there",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-digits-mlp-adamw-cosine",
        True,
        _QUIET,
        lambda: _digits_mlp_adamw("cosine"),
        "the same MLP under a per-step cosine schedule that decays the lr to 0 at step 3000",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-gpt2-tiny-lm-cosine",
        True,
        _QUIET,
        lambda: _tiny_gpt2("cosine"),
        "transformers GPT2LMHeadModel (2 layers, width 32, random init) on a synthetic token language whose "
        "next token is uncertain by nature; dict batches with padding (labels -100), AdamW 3e-3, warm-up + "
        "cosine to 0",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-gpt2-tiny-lm-constant",
        True,
        _QUIET,
        lambda: _tiny_gpt2("constant"),
        "the tiny causal LM with one layer, after a warm-up at a constant lr",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-hf-resnet-digits",
        True,
        _QUIET,
        _hf_resnet_digits,
        "transformers ResNetForImageClassification (basic residual blocks, batch-norm, random init) on 16x16 "
        "digits, pixel_values/labels dict batches, AdamW 2e-3 with cosine to 0",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-lstm-digits-rows",
        True,
        _QUIET,
        _lstm_digits_rows,
        "LSTM reading the digits row by row (8 steps of 8 pixels), Adam 3e-3 at a constant lr, validation",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-pre-ln-transformer-digits-rows",
        True,
        _QUIET,
        _pre_ln_transformer_digits_rows,
        "pre-LN Transformer encoder (nn.TransformerEncoderLayer(norm_first=True)) over the digits rows, AdamW, "
        "warm-up + cosine to 0",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-regression-scaled",
        True,
        _QUIET,
        lambda: _wave_regression(unscaled=False),
        "MLP with a linear head on a smooth synthetic regression (standardised scale), MSE, Adam with cosine "
        "to 0, validation",
        {"max_steps": LONG},
    ),
    Case(
        "long-3000-regression-unscaled",
        True,
        _QUIET,
        lambda: _wave_regression(unscaled=True),
        "the same regression with its target in raw units (mean 150, std ~65: MSE ~4000 at the start), the "
        "linear head's bias set to the target mean, Adam 3e-2 with cosine to 0",
        {"max_steps": LONG},
    ),
    # ---------------------------------------------------------------- late faults
    Case(
        "late-lr-jump-digits-mlp",
        False,
        LR_HIGH,
        _digits_lr_jump,
        "the converged digits MLP of long-3000-digits-mlp-adamw-constant whose step schedule multiplies the lr "
        "by 100 at step 2000 (meant to divide): the converged model is thrown out of its minimum",
        {"max_steps": LONG},
    ),
    Case(
        "late-noisy-labels-memorised",
        False,
        frozenset({OVERFITTING, "noisy-labels"}),
        _noisy_labels_memorised,
        "MLP 64-256-256-10 without regularisation on 300 digits, 40% of them with a wrong label, 3000 steps: "
        "it learns the digits, then memorises the wrong labels and its clean validation loss climbs",
        {"max_steps": LONG, "check_val_every_n_epoch": 5},
    ),
    Case(
        "late-small-regression-overfits",
        False,
        frozenset({OVERFITTING}),
        _small_regression_overfits,
        "MLP 8-256-256-1 on 64 samples of the synthetic regression for 3000 steps: the validation MSE turns up "
        "while the training MSE goes to ~0",
        {"max_steps": LONG, "check_val_every_n_epoch": 10},
    ),
    # ---------------------------------------------------------------- gradients never zeroed, and healthy twins
    Case(
        "no-zero-grad-automatic-hook",
        False,
        frozenset({NOT_ZEROED, *LR_HIGH}),
        _no_zero_grad_automatic,
        "automatic optimization whose optimizer_zero_grad hook is overridden to do nothing: every step uses "
        "the sum of all gradients so far",
        {"max_steps": 150},
    ),
    Case(
        "zero-grad-head-only-manual",
        False,
        frozenset({NOT_ZEROED, *LR_HIGH}),
        _zero_grad_head_only,
        "manual optimization that zeroes only the classifier layer's gradients (self.net[-1].zero_grad()): the "
        "body's gradients accumulate over all steps",
        {"max_steps": 150},
    ),
    Case(
        "manual-accumulation-4-zeroed",
        True,
        _QUIET,
        lambda: _manual_accumulation(set_to_none=True),
        "manual optimization accumulating 4 micro-batches of 16 before each step on purpose, zero_grad() after "
        "the step",
        {"max_steps": 150},
    ),
    Case(
        "manual-accumulation-4-zeroed-in-place",
        True,
        _QUIET,
        lambda: _manual_accumulation(set_to_none=False),
        "the same deliberate accumulation with zero_grad(set_to_none=False) (gradients zeroed in place)",
        {"max_steps": 150},
    ),
    Case(
        "two-optimizers-shared-backward",
        True,
        _QUIET,
        _shared_body_two_losses,
        "two optimizers where the body's backward also reaches the head's not-yet-zeroed gradients, and the "
        "head zeroes right before its own backward (GAN-like ordering)",
        {"max_steps": 150},
    ),
)
