"""Benchmark cases of BatchIndependenceCheck (``batch-mixing``) and TargetLeakageCheck (``target-leakage``).

Example:
    >>> sorted({case.healthy for case in CASES})
    [False, True]
    >>> all(case.healthy or case.expected for case in CASES)
    True
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_mixing
from benchmarks.detection.cases import Built, Case

BATCH_MIXING = "batch-mixing"
TARGET_LEAKAGE = "target-leakage"
_QUIET: frozenset[str] = frozenset()


# ====================================================================== healthy builders
def _gru_seq2seq_shifted() -> Built:
    train, val = zoo_mixing.reversal_loaders()
    return zoo_mixing.Seq2SeqModule(zoo_mixing.GRUSeq2Seq(), shift=True), train, val


def _transformer_seq2seq_shifted() -> Built:
    train, val = zoo_mixing.reversal_loaders(seed=1)
    return zoo_mixing.Seq2SeqModule(zoo_mixing.TransformerSeq2Seq(), shift=True, lr=2e-3), train, val


# ====================================================================== fault builders
def _reshape_mix_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    return zoo.ZooModule(zoo_mixing.ReshapeMixMLP(), nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _view_flatten_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True, dict_batches=True)
    return zoo.ZooModule(zoo_mixing.ViewFlattenCNN(), nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


def _seq_first_gru() -> Built:
    train, val = zoo.sequence_loaders()
    module = zoo.ZooModule(
        zoo_mixing.SeqFirstGRUClassifier(features=3), nn.CrossEntropyLoss(), "adam", lr=1e-2
    )
    return module, train, val


def _gru_seq2seq_unshifted() -> Built:
    train, val = zoo_mixing.reversal_loaders()
    return zoo_mixing.Seq2SeqModule(zoo_mixing.GRUSeq2Seq(), shift=False), train, val


def _transformer_seq2seq_unshifted() -> Built:
    train, val = zoo_mixing.reversal_loaders(seed=1)
    return zoo_mixing.Seq2SeqModule(zoo_mixing.TransformerSeq2Seq(), shift=False, lr=2e-3), train, val


_MIXING = frozenset({BATCH_MIXING})
_LEAKAGE = frozenset({TARGET_LEAKAGE})

CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- healthy
    Case(
        "gru-seq2seq-shifted",
        True,
        _QUIET,
        _gru_seq2seq_shifted,
        "GRU encoder-decoder reversing token sequences, teacher forcing with the decoder input shifted by BOS",
        {"max_steps": 60},
    ),
    Case(
        "transformer-seq2seq-shifted",
        True,
        _QUIET,
        _transformer_seq2seq_shifted,
        "1-layer nn.Transformer encoder-decoder (causal mask) reversing tokens, decoder input shifted by BOS",
        {"max_steps": 60},
    ),
    # ---------------------------------------------------------------- faulty
    Case(
        "reshape-mixes-batch-mlp",
        False,
        _MIXING,
        _reshape_mix_mlp,
        "digits MLP whose hidden layer goes through h.reshape(features, batch).T: every row mixes samples",
        {"max_steps": 40},
    ),
    Case(
        "view-flatten-mixes-batch-cnn",
        False,
        _MIXING,
        _view_flatten_cnn,
        "BatchNorm CNN on dict batches flattened with features.view(-1, batch).t() instead of view(batch, -1)",
        {"max_steps": 40},
    ),
    Case(
        "gru-not-batch-first",
        False,
        _MIXING,
        _seq_first_gru,
        "GRU classifier fed (N, T, F) batches without batch_first=True: it recurs along the batch",
        {"max_steps": 40},
    ),
    Case(
        "gru-seq2seq-unshifted",
        False,
        _LEAKAGE,
        _gru_seq2seq_unshifted,
        "GRU encoder-decoder whose decoder is fed the target itself (no BOS shift): it sees the token it predicts",
        {"max_steps": 60},
    ),
    Case(
        "transformer-seq2seq-unshifted",
        False,
        _LEAKAGE,
        _transformer_seq2seq_unshifted,
        "nn.Transformer encoder-decoder (causal mask) fed the unshifted target: position p sees target p",
        {"max_steps": 60},
    ),
)
