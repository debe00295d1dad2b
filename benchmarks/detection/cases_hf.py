"""Cases built from Hugging Face ``transformers`` model classes (tiny configs, random weights) on dict batches:
healthy language models, classifiers and a frozen-backbone fine-tune that must stay quiet, and the faults
of that world (labels not shifted, a decoder that is not causal, labels shuffled against the texts,
samples mixed across the batch). Without ``transformers`` installed the list is empty.

Example:
    >>> all(case.healthy or case.expected for case in CASES)
    True
"""

from __future__ import annotations

from benchmarks.detection import zoo_hf
from benchmarks.detection.cases import Built, Case

LEAKAGE = "target-leakage"
IGNORES_INPUT = "model-ignores-input"
MIXING = "batch-mixing"


# ====================================================================== healthy
def _gpt2_lm() -> Built:
    train, val = zoo_hf.progression_loaders()
    return zoo_hf.HFModule(zoo_hf.tiny_gpt2(), lr=3e-3), train, val


def _bert_decoder_lm() -> Built:
    train, val = zoo_hf.progression_loaders()
    return zoo_hf.HFModule(zoo_hf.tiny_bert_decoder(causal=True), lr=3e-3), train, val


def _bert_classifier() -> Built:
    train, val = zoo_hf.topic_classification_loaders()
    return zoo_hf.HFModule(zoo_hf.tiny_bert_classifier(), lr=3e-3), train, val


def _bert_tagger() -> Built:
    train, val = zoo_hf.token_tagging_loaders()
    return zoo_hf.HFModule(zoo_hf.tiny_bert_tagger(), lr=3e-3), train, val


def _resnet_frozen_finetune() -> Built:
    train, val = zoo_hf.digit_image_loaders()
    return zoo_hf.HFModule(zoo_hf.pretrained_frozen_resnet(), lr=1e-2, parameters="head"), train, val


# ====================================================================== faulty
def _gpt2_unshifted() -> Built:
    train, val = zoo_hf.progression_loaders()
    return zoo_hf.UnshiftedLMModule(zoo_hf.tiny_gpt2(), lr=3e-3), train, val


def _bert_decoder_not_causal() -> Built:
    train, val = zoo_hf.progression_loaders()
    return zoo_hf.HFModule(zoo_hf.tiny_bert_decoder(causal=False), lr=3e-3), train, val


def _bert_permuted_labels() -> Built:
    train, val = zoo_hf.topic_classification_loaders(permute_labels=True)
    return zoo_hf.HFModule(zoo_hf.tiny_bert_classifier(), lr=3e-3), train, val


def _bert_batch_whitened() -> Built:
    train, val = zoo_hf.topic_classification_loaders()
    return zoo_hf.BatchWhitenedClassifier(), train, val


_STEPS = {"max_steps": 120, "val_check_interval": 40, "check_val_every_n_epoch": None}

CASES: tuple[Case, ...] = (
    (
        Case(
            "hf-gpt2-lm",
            True,
            frozenset(),
            _gpt2_lm,
            "transformers GPT2LMHeadModel (2 layers, width 32) on a padded arithmetic-progression language, "
            "labels=input_ids with -100 at padding (shifted inside the model), AdamW",
            _STEPS,
        ),
        Case(
            "hf-bert-decoder-lm",
            True,
            frozenset(),
            _bert_decoder_lm,
            "transformers BertLMHeadModel with is_decoder=True (causal) as a language model on the progressions",
            _STEPS,
        ),
        Case(
            "hf-bert-sequence-classifier",
            True,
            frozenset(),
            _bert_classifier,
            "transformers BertForSequenceClassification: the topic of a padded token text, dict batches with "
            "token_type_ids and attention_mask",
            _STEPS,
        ),
        Case(
            "hf-bert-token-classifier",
            True,
            frozenset(),
            _bert_tagger,
            "transformers BertForTokenClassification: a tag per token (its band of the vocabulary), -100 at padding",
            _STEPS,
        ),
        Case(
            "hf-resnet-frozen-finetune",
            True,
            frozenset(),
            _resnet_frozen_finetune,
            "transformers ResNetForImageClassification pretrained on digits 0-4, backbone frozen (requires_grad "
            "False, batch-norm kept in eval mode), only a fresh head trained on all 10 digits",
            _STEPS,
        ),
        Case(
            "hf-gpt2-unshifted-labels",
            False,
            frozenset({LEAKAGE}),
            _gpt2_unshifted,
            "GPT2LMHeadModel trained with a custom loss that forgets the shift: logits at t scored against "
            "token t, which the model is given",
            _STEPS,
        ),
        Case(
            "hf-bert-decoder-not-causal",
            False,
            frozenset({LEAKAGE}),
            _bert_decoder_not_causal,
            "BertLMHeadModel trained as a causal LM without is_decoder=True: bidirectional attention lets "
            "position t see token t+1, its own label",
            _STEPS,
        ),
        Case(
            "hf-bert-permuted-labels",
            False,
            frozenset({IGNORES_INPUT}),
            _bert_permuted_labels,
            "BertForSequenceClassification whose label column was shuffled apart from the texts",
            _STEPS,
        ),
        Case(
            "hf-bert-batch-whitened-pooler",
            False,
            frozenset({MIXING}),
            _bert_batch_whitened,
            "BertModel + linear head, the pooled output standardised with batch statistics (dim 0) also in "
            "eval mode: predictions depend on the other samples",
            _STEPS,
        ),
    )
    if zoo_hf.AVAILABLE
    else ()
)
