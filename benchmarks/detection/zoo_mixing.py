"""Models and data of the batch-mixing and target-leakage cases: small, seeded, CPU-fast.

The broken pieces are plausible bugs: a ``reshape`` that regroups the batch dimension, a flatten
through ``view(-1, batch)``, a recurrent layer without ``batch_first=True``, and a sequence-to-sequence
decoder fed the targets it is scored on (no shift).

Example:
    >>> train, _ = reversal_loaders(n=64, batch_size=16)
    >>> source, target = next(iter(train))
    >>> bool((target == source.flip(1)).all())
    True
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from benchmarks.detection import zoo

BOS = 0  # decoder start token; data tokens are 2..vocab-1


# ====================================================================== batch mixing
class ReshapeMixMLP(nn.Module):
    """An MLP whose hidden layer goes through ``h.reshape(features, batch).T`` (meant: ``h.T``-free code)."""

    def __init__(self, sizes: tuple[int, int, int, int] = (64, 128, 64, 10)) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU())
        self.rest = nn.Sequential(nn.Linear(sizes[1], sizes[2]), nn.ReLU(), nn.Linear(sizes[2], sizes[3]))

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.first(inputs)
        hidden = hidden.reshape(hidden.shape[1], hidden.shape[0]).T  # the bug: regroups samples
        return self.rest(hidden)


class ViewFlattenCNN(zoo.DigitsCNN):
    """The digits CNN flattened with ``features.view(-1, batch).t()`` instead of ``view(batch, -1)``."""

    def forward(self, images: Tensor) -> Tensor:
        features = self.features(images)
        flat = features.view(-1, features.shape[0]).t()  # the bug: (N, 512) built from every sample
        return self.head[2](self.head[1](flat))


class SeqFirstGRUClassifier(nn.Module):
    """A GRU classifier over ``(N, T, F)`` batches that forgot ``batch_first=True``: it runs along the batch."""

    def __init__(self, features: int, hidden: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.rnn = nn.GRU(features, hidden)  # the bug: batch_first=False on batch-first data
        self.head = nn.Linear(hidden, classes)

    def forward(self, sequences: Tensor) -> Tensor:
        outputs, _ = self.rnn(sequences)
        return self.head(outputs[:, -1])


# ====================================================================== target leakage
def reversal_loaders(
    n: int = 1024, length: int = 8, vocab: int = 12, batch_size: int = 32, seed: int = 0
) -> zoo.Loaders:
    """Token sequences ``(N, length)`` from ``2..vocab-1`` and their reversal as the target sequence."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(2, vocab, (n, length), generator=generator)
    return zoo.make_loader(source, source.flip(1), batch_size, True, seed), None


class GRUSeq2Seq(nn.Module):
    """Embedding + GRU encoder, embedding + GRU decoder started from the encoder state, linear head."""

    def __init__(self, vocab: int = 12, width: int = 32) -> None:
        super().__init__()
        self.source_embed = nn.Embedding(vocab, width)
        self.target_embed = nn.Embedding(vocab, width)
        self.encoder = nn.GRU(width, width, batch_first=True)
        self.decoder = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, source: Tensor, decoder_input: Tensor) -> Tensor:
        _, state = self.encoder(self.source_embed(source))
        outputs, _ = self.decoder(self.target_embed(decoder_input), state)
        return self.head(outputs)


class TransformerSeq2Seq(nn.Module):
    """A 1-layer ``nn.Transformer`` with learned positions and a causal mask on the decoder."""

    def __init__(self, vocab: int = 12, length: int = 8, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.transformer = nn.Transformer(
            width, heads, 1, 1, dim_feedforward=2 * width, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, source: Tensor, decoder_input: Tensor) -> Tensor:
        length = decoder_input.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=decoder_input.device)
        hidden = self.transformer(
            self.embed(source) + self.position[: source.shape[1]],
            self.embed(decoder_input) + self.position[:length],
            tgt_mask=mask,
            tgt_is_causal=True,
        )
        return self.head(hidden)


class Seq2SeqModule(pl.LightningModule):
    """Teacher-forced sequence-to-sequence training on ``(source, target)`` batches.

    ``shift=True`` feeds the decoder ``[BOS, target[:-1]]`` (correct); ``shift=False`` feeds it the
    target itself, so the decoder sees the very token it is scored on (the leak).
    """

    def __init__(self, net: nn.Module, shift: bool = True, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = net
        self.shift = shift
        self.lr = lr

    def forward(self, source: Tensor, decoder_input: Tensor) -> Tensor:
        return self.net(source, decoder_input)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        source, target = batch
        if self.shift:
            start = torch.full_like(target[:, :1], BOS)
            decoder_input = torch.cat([start, target[:, :-1]], dim=1)
        else:
            decoder_input = target  # the bug: no shift
        logits = self(source, decoder_input)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
