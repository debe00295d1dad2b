"""Long runs (3000 optimizer steps) that converge and stay converged, on foreign architectures too (a
Hugging Face causal LM and ResNet from tiny configs, an LSTM, a pre-LN Transformer), under a constant
learning rate and under schedules that decay to zero; and the faults that show up late in such runs (a
learning rate that jumps up, wrong labels memorised: real overfitting). The regression runs are in
:mod:`benchmarks.detection.cases_regression`.

None is in the ``--fast`` subset: each takes 30-120 s on one thread (the Hugging Face models the most).

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
)
