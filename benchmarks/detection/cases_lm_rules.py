"""Cases of the rules that judge labels, outputs and gradients on tasks beyond ``(x, y)`` classifiers:
Hugging Face language models and BERT heads from tiny configs (dict batches, ``-100`` padding, the model's
own loss) that ``noisy-labels`` and ``loss-at-init`` must leave alone, an overconfident LM init and a
corrupted label column of a BERT sequence classifier that they must catch; regression heads whose
output range cannot reach their targets (``clipped-output``) and their healthy twins (linear heads,
bounded heads that cover the targets); gradients never zeroed (``gradients-not-zeroed``) and the
healthy programs whose gradients pile up on purpose. Short runs (40-300 steps), none in the fast subset.

Example:
    >>> faults = {case.name: case.expected for case in CASES if not case.healthy}
    >>> sorted(faults["relu6-head-unscaled-targets"]), sorted(faults["optimizer-zero-grad-override-skips"])
    (['clipped-output'], ['gradients-not-zeroed'])
    >>> any(case.fast for case in CASES)
    False
"""

from __future__ import annotations

import math

import torch
from torch import nn

from benchmarks.detection import zoo, zoo_lm_rules
from benchmarks.detection.cases import Built, Case

CLIPPED = frozenset({"clipped-output"})
NOT_ZEROED = frozenset({"gradients-not-zeroed"})
NOISY = frozenset({"noisy-labels"})
LOSS_AT_INIT = frozenset({"loss-at-init"})
_QUIET: frozenset[str] = frozenset()
LM_STEPS = 200


# ====================================================================== language models and BERT heads
def _gpt2(initializer_range: float = 0.02) -> Built:
    train, val = zoo_lm_rules.markov_text_loaders()
    model = zoo_lm_rules.tiny_gpt2(initializer_range=initializer_range)
    return zoo_lm_rules.HFModule(model, total_steps=LM_STEPS), train, val


def _bert_mlm() -> Built:
    train, val = zoo_lm_rules.dict_loaders(zoo_lm_rules.masked_text, length=24, vocab=32)
    return zoo_lm_rules.HFModule(zoo_lm_rules.tiny_bert_mlm(vocab=33), total_steps=LM_STEPS), train, val


def _bert_tokens() -> Built:
    train, val = zoo_lm_rules.dict_loaders(zoo_lm_rules.tagged_text, length=24, vocab=32, tags=5)
    model = zoo_lm_rules.tiny_bert_classifier("token", labels=5)
    return zoo_lm_rules.HFModule(model, total_steps=LM_STEPS), train, val


def _bert_topics(wrong_share: float) -> Built:
    train, val = zoo_lm_rules.dict_loaders(
        zoo_lm_rules.topic_text,
        n=4096,
        batch_size=32,
        length=24,
        vocab=48,
        topics=10,
        wrong_share=wrong_share,
        keyword_share=0.5,
    )
    model = zoo_lm_rules.tiny_bert_classifier("sequence", labels=10, vocab=49, width=64, heads=4)
    return zoo_lm_rules.HFModule(model, lr=1e-3, total_steps=300), train, val


# ====================================================================== regression heads
def _regression(
    head: nn.Module | None,
    scale: float = 1.0,
    shift: float = 0.0,
    centred: bool = False,
    bias: float | None = None,
) -> Built:
    """MLP 8-64-64-1 on the smooth synthetic regression (target ``shift + scale * y``), then ``head``;
    ``centred``: the last linear layer's bias starts at the target mean (``bias``: at that value)."""
    train, val = zoo_lm_rules.smooth_regression_loaders(scale=scale, shift=shift)
    network = zoo.mlp([8, 64, 64, 1])
    if centred:
        zoo_lm_rules.centre_head_(network, train)
    if bias is not None:
        with torch.no_grad():
            network[-1].bias.fill_(bias)
    if head is not None:
        network.append(head)
    return zoo.ZooModule(network, nn.MSELoss(), "adamw", lr=3e-3, weight_decay=1e-4), train, val


def _scaled_sigmoid(factor: float) -> nn.Module:
    return zoo_lm_rules.Activation(lambda x: factor * torch.sigmoid(x), f"{factor:g} * sigmoid")


# ====================================================================== gradient zeroing
def _digits_mlp_module(kind: type[zoo.ZooModule], batch_size: int = 64, **kwargs: object) -> Built:
    train, val = zoo.digits_loaders(batch_size=batch_size, val_fraction=0.2)
    return kind(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3, **kwargs), train, val


def _automatic_accumulation() -> Built:
    train, val = zoo.digits_loaders(batch_size=16, val_fraction=0.2)
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _two_optimizers(kind: type[zoo.ZooModule]) -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    body = zoo.mlp([64, 128, 64], final_activation=True)
    if kind is zoo_lm_rules.SharedBodyTwoLossesModule:
        module = kind(body, nn.Linear(64, 10), nn.Linear(64, 10), nn.CrossEntropyLoss())
    else:
        module = kind(body, nn.Linear(64, 10), nn.CrossEntropyLoss())
    return module, train, val


CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- healthy: Hugging Face models, dict batches
    Case(
        "hf-gpt2-tiny-causal-lm",
        True,
        _QUIET,
        _gpt2,
        "transformers.GPT2LMHeadModel (2 layers, width 32, random weights, GPT-2's init) on a synthetic Markov "
        "language with a long tail, dict batches with padding (labels -100, shifted inside the model's loss), "
        "AdamW 3e-3 with warm-up and cosine to 0",
        {"max_steps": LM_STEPS},
    ),
    Case(
        "hf-bert-tiny-masked-lm",
        True,
        _QUIET,
        _bert_mlm,
        "transformers.BertForMaskedLM (2 layers, width 32, dropout 0.1) on the Markov language with 15% of the "
        "tokens masked BERT's way (labels -100 elsewhere), AdamW with warm-up and cosine to 0",
        {"max_steps": LM_STEPS},
    ),
    Case(
        "hf-bert-tiny-token-classifier",
        True,
        _QUIET,
        _bert_tokens,
        "transformers.BertForTokenClassification (5 tags, one per token, one of them set by the previous token; "
        "padding -100), AdamW with warm-up and cosine to 0",
        {"max_steps": LM_STEPS},
    ),
    Case(
        "hf-bert-tiny-sequence-classifier",
        True,
        _QUIET,
        lambda: _bert_topics(0.0),
        "transformers.BertForSequenceClassification (width 64, 4 heads) on 10 topics (3 keywords each, half the "
        "tokens of a sequence; [CLS] first), clean labels, batches of 32, AdamW with warm-up and cosine to 0",
        {"max_steps": 300},
    ),
    # ---------------------------------------------------------------- faulty: language models and BERT heads
    Case(
        "hf-gpt2-tiny-overconfident-init",
        False,
        LOSS_AT_INIT,
        lambda: _gpt2(initializer_range=1.0),
        "the same GPT-2 with initializer_range 1.0 (embeddings N(0, 1), a custom init copied from another "
        "model): the tied output layer starts confidently wrong, far above ln(vocabulary)",
        {"max_steps": 60},
    ),
    Case(
        "hf-bert-tiny-sequence-classifier-wrong-labels",
        False,
        NOISY,
        lambda: _bert_topics(0.3),
        "the BERT topic classifier with 30% of its training labels moved to another topic (a corrupted label "
        "column); its validation labels are clean",
        {"max_steps": 300},
    ),
    # ---------------------------------------------------------------- healthy: regression heads
    Case(
        "linear-head-standardized-targets",
        True,
        _QUIET,
        lambda: _regression(None),
        "MLP 8-64-64-1 with a linear head on a smooth synthetic regression, standardised target, AdamW",
        {"max_steps": 150},
    ),
    Case(
        "linear-head-unscaled-targets",
        True,
        _QUIET,
        lambda: _regression(None, scale=50.0, shift=200.0, centred=True),
        "the same regression on unscaled targets (mean 200, std 50) with a linear head whose bias starts at the "
        "target mean (the twin of the ReLU6, clamp and sigmoid heads below)",
        {"max_steps": 150},
    ),
    Case(
        "relu6-head-targets-in-range",
        True,
        _QUIET,
        lambda: _regression(nn.ReLU6(), scale=0.5, shift=3.0, centred=True),
        "a ReLU6 head on targets inside its range (mean 3, std 0.5, all within [0.19, 5.8]), bias at the target "
        "mean",
        {"max_steps": 150},
    ),
    Case(
        "softplus-head-positive-targets",
        True,
        _QUIET,
        lambda: _regression(nn.Softplus(), scale=0.5, shift=2.5, centred=True),
        "a softplus head (a positive output) on positive targets (mean 2.5, std 0.5)",
        {"max_steps": 150},
    ),
    Case(
        "scaled-sigmoid-head-covers-targets",
        True,
        _QUIET,
        lambda: _regression(_scaled_sigmoid(600.0), scale=50.0, shift=200.0, bias=math.log(200.0 / 400.0)),
        "600 * sigmoid as the head of the unscaled regression (targets ~50-400 inside (0, 600)), its bias at the "
        "logit of the target mean: bounded, but the bounds cover the targets",
        {"max_steps": 150},
    ),
    # ---------------------------------------------------------------- faulty: the range cannot reach the targets
    Case(
        "relu6-head-unscaled-targets",
        False,
        CLIPPED,
        lambda: _regression(nn.ReLU6(), scale=50.0, shift=200.0),
        "regression ending in ReLU6 (an activation copied from a MobileNet block) on unscaled targets (~50-400): "
        "the output is capped at 6, and every capped output gets no gradient",
        {"max_steps": 100},
    ),
    Case(
        "clamp-head-unscaled-targets",
        False,
        CLIPPED,
        lambda: _regression(
            zoo_lm_rules.Activation(lambda x: x.clamp(0.0, 10.0), "clamp(0, 10)"), 50.0, 200.0
        ),
        "regression whose output is clamped to [0, 10] (a range meant for another target) on targets ~50-400",
        {"max_steps": 100},
    ),
    Case(
        "sigmoid-head-unscaled-targets",
        False,
        CLIPPED,
        lambda: _regression(nn.Sigmoid(), scale=50.0, shift=200.0),
        "regression ending in a sigmoid (a classifier's head kept) on unscaled targets (~50-400)",
        {"max_steps": 100},
    ),
    Case(
        "relu-head-unscaled-negative-targets",
        False,
        CLIPPED,
        lambda: _regression(nn.ReLU(), scale=50.0, shift=-100.0),
        "regression ending in a ReLU on unscaled signed targets (mean -100, std 50, mostly negative: e.g. a "
        "log-likelihood or a temperature below zero)",
        {"max_steps": 100},
    ),
    Case(
        "gelu-head-standardized-targets",
        False,
        CLIPPED,
        lambda: _regression(nn.GELU()),
        "regression MLP built with its activation after the last layer too (GELU, >= -0.17) on standardised "
        "targets: the ~40% of targets below -0.17 cannot be reached",
        {"max_steps": 100},
    ),
    Case(
        "elu-head-standardized-targets",
        False,
        CLIPPED,
        lambda: _regression(nn.ELU()),
        "the same with ELU (>= -1) last: the targets below -1 (~13%) cannot be reached",
        {"max_steps": 100},
    ),
    Case(
        "exp-head-standardized-targets",
        False,
        CLIPPED,
        lambda: _regression(zoo_lm_rules.Activation(torch.exp, "exp")),
        "regression whose output goes through exp (meant for a log-scale target) on standardised, signed targets",
        {"max_steps": 100},
    ),
    # ---------------------------------------------------------------- healthy: gradients zeroed, or piled up on purpose
    Case(
        "manual-zero-grad-set-to-none-false",
        True,
        _QUIET,
        lambda: _digits_mlp_module(zoo_lm_rules.ManualZeroingModule),
        "manual optimization zeroing with zero_grad(set_to_none=False) before each backward (the gradients "
        "stay allocated, filled with 0)",
        {"max_steps": 100},
    ),
    Case(
        "manual-accumulation-4-micro-batches",
        True,
        _QUIET,
        lambda: _digits_mlp_module(zoo_lm_rules.ManualAccumulationModule, batch_size=16),
        "manual optimization accumulating 4 micro-batches of 16 into each step, zeroed after every step",
        {"max_steps": 60},
    ),
    Case(
        "automatic-accumulation-4-micro-batches",
        True,
        _QUIET,
        _automatic_accumulation,
        "automatic optimization with accumulate_grad_batches=4 (micro-batches of 16): Lightning zeroes after "
        "every 4th",
        {"max_steps": 60, "accumulate_grad_batches": 4},
    ),
    Case(
        "shared-body-two-optimizers-zeroed-before-backward",
        True,
        _QUIET,
        lambda: _two_optimizers(zoo_lm_rules.SharedBodyTwoLossesModule),
        "two optimizers in the GAN style, each zeroed right before its own backward; the second loss also reaches "
        "the first optimizer's body, whose gradient holds it until that optimizer zeroes again",
        {"max_steps": 150},
    ),
    # ---------------------------------------------------------------- faulty: gradients never zeroed
    Case(
        "optimizer-zero-grad-override-skips",
        False,
        NOT_ZEROED,
        lambda: _digits_mlp_module(zoo_lm_rules.SkippedZeroGradModule),
        "automatic optimization whose optimizer_zero_grad override does nothing (meant to save time): Adam "
        "steps on the sum of every gradient so far",
        {"max_steps": 150},
    ),
    Case(
        "manual-zero-grad-on-the-wrong-optimizer",
        False,
        NOT_ZEROED,
        lambda: _two_optimizers(zoo_lm_rules.WrongOptimizerZeroedModule),
        "manual optimization with a body and a head optimizer that zeroes the head's twice and the body's never "
        "(a copy-paste slip): the body's gradients pile up",
        {"max_steps": 150},
    ),
)
