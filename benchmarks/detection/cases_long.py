"""Long runs (3000 steps) that converge and stay converged, on architectures the rest of the zoo lacks
(Hugging Face GPT-2 and ResNet from tiny configs, an LSTM, a pre-LN Transformer), with constant learning
rates and schedules that decay to zero; and the late faults a relative rule must still catch once the
loss is near zero (a learning rate that jumps up at step 2000, noise labels memorised). None is in the
fast subset.

Example:
    >>> all(case.trainer_kwargs["max_steps"] >= 3000 for case in CASES if case.healthy)
    True
    >>> any(case.fast for case in CASES)
    False
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_long
from benchmarks.detection.cases import EXPLODING, Built, Case
from benchmarks.detection.cases_real_faults import LR_HIGH, NON_FINITE

_QUIET: frozenset[str] = frozenset()
LONG = 3000
OVERFITTING = "overfitting"
NOISY_LABELS = "noisy-labels"
# a learning rate that jumps up late: every id that names a learning rate far too high
LATE_LR_HIGH = LR_HIGH | {EXPLODING, "update-ratio-too-high", *NON_FINITE}


def _digits_mlp(schedule: zoo_long.Schedule, jump_at: int | None = None, jump: float = 1.0) -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    module = zoo_long.ScheduledModule(
        zoo.mlp([64, 128, 64, 10]),
        nn.CrossEntropyLoss(),
        "adamw",
        lr=1e-3,
        weight_decay=1e-2,
        schedule=schedule,
        total_steps=LONG,
        jump_at=jump_at,
        jump=jump,
    )
    return module, train, val


def _memorised_noise() -> Built:
    train, val = zoo_long.small_noisy_digits_loaders(train_size=300, noise=0.4)
    module = zoo_long.ScheduledModule(zoo.mlp([64, 256, 256, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3)
    return module, train, val


def _tiny_lm(schedule: zoo_long.Schedule) -> Built:
    train, val = zoo_long.markov_text_loaders()
    return zoo_long.CausalLMModule(zoo_long.tiny_gpt2(), schedule=schedule, total_steps=LONG), train, val


CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- healthy, long
    Case(
        "long-digits-mlp-adamw-constant",
        True,
        _QUIET,
        lambda: _digits_mlp("constant"),
        "MLP 64-128-64-10 on digits, AdamW 1e-3 constant, 3000 steps (~134 epochs, validation every epoch): "
        "converges to ~98% validation accuracy and stays there",
        {"max_steps": LONG},
    ),
    Case(
        "long-digits-mlp-adamw-cosine",
        True,
        _QUIET,
        lambda: _digits_mlp("cosine"),
        "the same MLP with a per-step cosine schedule that decays the learning rate to 0 at step 3000",
        {"max_steps": LONG},
    ),
    Case(
        "long-gpt2-tiny-lm",
        True,
        _QUIET,
        lambda: _tiny_lm("warmup-cosine"),
        "transformers.GPT2LMHeadModel (2 layers, width 32, random weights) on a synthetic Markov language with "
        "a long tail, dict batches with padding (labels -100), warm-up + cosine to 0, 3000 steps",
        {"max_steps": LONG},
    ),
    # ---------------------------------------------------------------- faulty, late
    Case(
        "long-digits-mlp-lr-jump-at-2000",
        False,
        LATE_LR_HIGH,
        lambda: _digits_mlp("constant", jump_at=2000, jump=100.0),
        "the converged digits MLP whose learning rate jumps 100x (1e-3 -> 0.1) at step 2000 (a schedule bug): "
        "the loss leaves its floor and the weights are thrown around",
        {"max_steps": LONG},
    ),
    Case(
        "long-memorised-noise-overfit",
        False,
        frozenset({OVERFITTING, NOISY_LABELS}),
        _memorised_noise,
        "MLP 64-256-256-10 on 300 digits with 40% wrong labels, Adam, 3000 steps: it learns the clean signal, "
        "then memorises the wrong labels and the validation loss climbs",
        {"max_steps": LONG},
    ),
)
