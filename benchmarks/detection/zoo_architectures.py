"""Pieces of the cases that put the major checks on a second model family (CNN, Transformer).

Example:
    >>> pool = AttentionPool(4)
    >>> hidden = torch.randn(2, 3, 4)
    >>> keep = torch.tensor([[True, True, False], [True, True, True]])
    >>> pool(hidden, keep).shape
    torch.Size([2, 4])
    >>> bool(pool(hidden, ~keep)[1].isnan().all())  # the second row keeps nothing: 0/0
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmarks.detection import zoo

PAD = 0  # the padding token id


# ====================================================================== a padded-token Transformer
class AttentionPool(nn.Module):
    """Attention pooling over a sequence, written by hand: the positions where ``keep`` is False get
    ``-inf`` scores before the softmax. A row that keeps nothing is ``softmax`` of all ``-inf``: NaN."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.score = nn.Linear(width, 1)

    def forward(self, hidden: Tensor, keep: Tensor) -> Tensor:
        scores = self.score(hidden).squeeze(-1).masked_fill(~keep, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return (weights.unsqueeze(-1) * hidden).sum(dim=1)


class PaddedTokenTransformer(nn.Module):
    """Embeddings, a Transformer encoder that ignores the padding, attention pooling, a linear head.

    ``inverted_pool_mask=True`` is the bug: the pooling keeps the padding positions (``tokens == PAD``)
    instead of the real ones, so every sequence without padding has nothing to pool over.
    """

    def __init__(
        self, vocab: int, length: int, width: int = 32, heads: int = 4, inverted_pool_mask: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=PAD)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.encoder = zoo.token_encoder(width, heads)
        self.pool = AttentionPool(width)
        self.head = nn.Linear(width, 2)
        self.inverted_pool_mask = inverted_pool_mask

    def forward(self, tokens: Tensor) -> Tensor:
        padding = tokens == PAD
        hidden = self.encoder(self.embed(tokens) + self.position, src_key_padding_mask=padding)
        keep = padding if self.inverted_pool_mask else ~padding
        return self.head(self.pool(hidden, keep))


class NormalizedTokenTransformer(nn.Module):
    """A Transformer over padded tokens that zeroes the padding's embeddings, then scales every token
    vector to unit length with a hand-written ``x / (sqrt(sum(x**2)) + eps)``.

    The bug: at a zeroed (padding) position the forward pass is a finite 0, but the gradient of
    ``sqrt`` at 0 is infinite and ``0 * inf`` is NaN, so the embedding table's gradient turns NaN while
    the loss stays finite (the eps belongs inside the sqrt, or use ``F.normalize``).
    """

    def __init__(self, vocab: int, length: int, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.encoder = zoo.token_encoder(width, heads)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        real = (tokens != PAD).unsqueeze(-1).float()
        vectors = self.embed(tokens) * real
        vectors = vectors / (vectors.pow(2).sum(dim=-1, keepdim=True).sqrt() + 1e-6)
        hidden = self.encoder(vectors + self.position, src_key_padding_mask=tokens == PAD)
        return self.head((hidden * real).sum(dim=1) / real.sum(dim=1))


def padded_marker_loaders(
    n: int = 1024, length: int = 12, vocab: int = 20, batch_size: int = 32, seed: int = 0
) -> zoo.Loaders:
    """:func:`zoo.marker_token_loaders` data with variable lengths: half the sequences are cut to 4..11
    tokens and padded with :data:`PAD`; the class says whether the marker token is among the real ones."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (n, length), generator=generator)
    has_marker = torch.rand(n, generator=generator) < 0.5
    lengths = torch.where(
        torch.rand(n, generator=generator) < 0.5,
        torch.full((n,), length),
        torch.randint(4, length, (n,), generator=generator),
    )
    positions = (torch.rand(n, generator=generator) * lengths).long()
    rows = torch.arange(n)[has_marker]
    tokens[rows, positions[has_marker]] = 1
    tokens[torch.arange(length).expand(n, length) >= lengths.unsqueeze(1)] = PAD
    return zoo._train_val(tokens, has_marker.long(), batch_size, 0.0, seed, dict_batches=False)


# ====================================================================== CNN data faults
def per_image_standardized_with_blanks_loaders(
    batch_size: int = 64, blank: float = 0.03, seed: int = 0
) -> zoo.Loaders:
    """Raw ``1x8x8`` digits with ``blank`` of the images empty (all 0: a scanner's blank pages, labelled
    0), each image standardised by its *own* mean and std: ``0 / 0`` makes every blank image NaN."""
    inputs, targets = zoo._digits("raw")
    inputs, targets = inputs.clone(), targets.clone()
    generator = torch.Generator().manual_seed(seed)
    blanks = torch.rand(len(inputs), generator=generator) < blank
    inputs[blanks] = 0.0
    targets[blanks] = 0
    flat = inputs.view(len(inputs), -1)
    standardized = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True)
    return zoo._train_val(standardized.view(-1, 1, 8, 8), targets, batch_size, 0.0, seed, dict_batches=False)
