"""Pieces of the long-run cases (>= 3000 optimizer steps) and of the foreign architectures: learning-rate
schedules that decay to zero, a tiny Hugging Face causal language model on a synthetic token language, a
Hugging Face ResNet on the digits, recurrent and pre-LN Transformer readers of the digits rows, a synthetic
regression with scaled and unscaled targets, and the late faults (a learning rate that jumps up, labels
memorised late, a small training set overfit).

``transformers`` (a dev extra) is imported only by the builders that need it.

Example:
    >>> factor = schedule_factor(kind="cosine", total_steps=100)
    >>> [round(factor(step), 3) for step in (0, 50, 100, 200)]
    [1.0, 0.5, 0.0, 0.0]
    >>> jump = schedule_factor(kind="constant", total_steps=100, jump_at=60, jump_factor=30.0)
    >>> jump(59), jump(60)
    (1.0, 30.0)
    >>> batch = next(iter(token_language_loaders(n_train=64, n_val=0, batch_size=4)[0]))
    >>> sorted(batch), tuple(batch["input_ids"].shape)
    (['attention_mask', 'input_ids', 'labels'], (4, 32))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.detection import zoo

Schedule = Literal["constant", "cosine"]
PAD = 0  # the padding token of the token language


# ====================================================================== schedules
def _factor(
    step: int, kind: Schedule, total_steps: int, warmup_steps: int, jump_at: int | None, jump_factor: float
) -> float:
    if jump_at is not None and step >= jump_at:
        return jump_factor
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_factor(
    kind: Schedule = "constant",
    total_steps: int = 3000,
    warmup_steps: int = 0,
    jump_at: int | None = None,
    jump_factor: float = 1.0,
) -> Callable[[int], float]:
    """A ``LambdaLR`` factor per optimizer step: constant, or a per-step cosine that reaches 0 at
    ``total_steps`` (after an optional linear warm-up). ``jump_at``/``jump_factor`` is the late-fault
    piece: from that step on the factor is ``jump_factor`` (a step schedule that multiplies where it
    meant to divide)."""
    return functools.partial(
        _factor,
        kind=kind,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        jump_at=jump_at,
        jump_factor=jump_factor,
    )


# ====================================================================== a synthetic token language
def token_language(
    n: int, length: int = 32, vocab: int = 48, min_length: int = 16, seed: int = 0
) -> dict[str, Tensor]:
    """Sequences of a small token language whose next token is uncertain by nature, as in text.

    Each symbol ``1..vocab-1`` has a main successor (taken 60% of the time), a second successor (15%),
    and otherwise the next symbol is drawn uniformly (25%): a model that has learned the language puts
    ~0.6 on one token and gives every uniformly drawn one ~0.005, so about a quarter of the correct
    next tokens get a probability below 0.05. Lengths vary from ``min_length`` to ``length``; the rest
    is padding (``PAD``, ``attention_mask`` 0, ``labels`` -100).
    """
    generator = torch.Generator().manual_seed(seed)
    symbols = vocab - 1
    main = torch.randperm(symbols, generator=generator) + 1
    second = torch.randperm(symbols, generator=generator) + 1
    tokens = torch.zeros(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(1, vocab, (n,), generator=generator)
    draws = torch.rand(n, length, generator=generator)
    uniform = torch.randint(1, vocab, (n, length), generator=generator)
    for position in range(1, length):
        previous = tokens[:, position - 1] - 1
        choice = torch.where(draws[:, position] < 0.6, main[previous], second[previous])
        tokens[:, position] = torch.where(draws[:, position] < 0.75, choice, uniform[:, position])
    lengths = torch.randint(min_length, length + 1, (n,), generator=generator)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    tokens = tokens.masked_fill(~mask, PAD)
    labels = tokens.masked_fill(~mask, -100)
    return {"input_ids": tokens, "attention_mask": mask.long(), "labels": labels}


def token_language_loaders(
    n_train: int = 2048, n_val: int = 256, batch_size: int = 32, vocab: int = 48, seed: int = 0
) -> zoo.Loaders:
    """Dict batches ``{"input_ids", "attention_mask", "labels"}`` of :func:`token_language`."""
    data = token_language(n_train + n_val, vocab=vocab, seed=seed)
    train = _dict_loader({key: value[:n_train] for key, value in data.items()}, batch_size, True, seed)
    if n_val == 0:
        return train, None
    val = _dict_loader({key: value[n_train:] for key, value in data.items()}, batch_size, False, seed)
    return train, val


def _dict_loader(columns: Mapping[str, Tensor], batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        zoo.DictDataset(**columns),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=shuffle,
    )


def tiny_gpt2(vocab: int = 48, length: int = 32, width: int = 32, layers: int = 2) -> nn.Module:
    """``transformers.GPT2LMHeadModel`` from a tiny ``GPT2Config``, random weights (nothing downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=length,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def tiny_hf_resnet(classes: int = 10) -> nn.Module:
    """``transformers.ResNetForImageClassification`` from a tiny ``ResNetConfig`` (basic blocks, batch-norm,
    residuals) for 1-channel images, random weights."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=classes,
    )
    return ResNetForImageClassification(config)


def digits_image_dict_loaders(
    batch_size: int = 64, val_fraction: float = 0.2, size: int = 16, seed: int = 0
) -> zoo.Loaders:
    """The digits as ``{"pixel_values": (1, size, size), "labels"}`` dict batches (bilinear upsampling)."""
    inputs, targets = zoo._digits("standardized")
    images = nn.functional.interpolate(inputs.view(-1, 1, 8, 8), size=(size, size), mode="bilinear")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(images) * val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    train = _dict_loader(
        {"pixel_values": images[train_idx], "labels": targets[train_idx]}, batch_size, True, seed
    )
    val = _dict_loader({"pixel_values": images[val_idx], "labels": targets[val_idx]}, batch_size, False, seed)
    return train, val


class DictBatchModule(pl.LightningModule):
    """A Hugging Face-style model trained on dict batches: ``model(**batch)`` returns an output with
    ``.loss`` (and ``.logits``), as ``GPT2LMHeadModel`` and ``ResNetForImageClassification`` do.

    Args:
        model: the model.
        lr, weight_decay: AdamW's.
        lr_lambda: optional ``LambdaLR`` factor per optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.lr_lambda = lr, weight_decay, lr_lambda

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        loss = self.model(**batch).loss
        self.log(f"{stage}_loss", loss, batch_size=len(next(iter(batch.values()))))
        return loss

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_lambda is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ====================================================================== digits rows: recurrent, pre-LN Transformer
def digits_rows_loaders(batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> zoo.Loaders:
    """The digits as sequences of 8 rows of 8 pixels, ``(N, 8, 8)``."""
    train, val = zoo.digits_loaders(batch_size=batch_size, val_fraction=val_fraction, seed=seed)
    for loader in (train, val):
        if loader is not None:
            inputs, targets = loader.dataset.tensors  # type: ignore[attr-defined]
            loader.dataset.tensors = (inputs.view(-1, 8, 8), targets)  # type: ignore[attr-defined]
    return train, val


class PreNormRowTransformer(nn.Module):
    """A pre-LN Transformer encoder (``nn.TransformerEncoderLayer(norm_first=True)``) over the 8 rows of a
    digit: a linear row embedding, learned positions, mean pooling, a final LayerNorm and a linear head."""

    def __init__(self, width: int = 32, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(0.02 * torch.randn(8, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, rows: Tensor) -> Tensor:
        hidden = self.encoder(self.embed(rows) + self.position)
        return self.head(self.norm(hidden.mean(dim=1)))


# ====================================================================== a synthetic regression
@functools.cache
def _wave_regression(n: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 8, generator=generator)
    clean = torch.sin(2.0 * inputs[:, 0]) + inputs[:, 1] * inputs[:, 2] + 0.5 * inputs[:, 3]
    targets = clean + 0.1 * torch.randn(n, generator=generator)
    return inputs, targets.unsqueeze(1)


def wave_regression_loaders(
    n: int = 4096,
    batch_size: int = 64,
    val_fraction: float = 0.2,
    unscaled: bool = False,
    train_size: int | None = None,
    seed: int = 0,
) -> zoo.Loaders:
    """A smooth nonlinear regression of 8 standard-normal features (noise std 0.1, target std ~1.3).

    ``unscaled=True`` puts the target in clinical-style units, ``150 + 50 y`` (like the raw diabetes
    target: mean 150, std ~65). ``train_size`` keeps only that many training rows (for overfitting).
    """
    inputs, targets = _wave_regression(n, seed)
    if unscaled:
        targets = 150.0 + 50.0 * targets
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(n * val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    if train_size is not None:
        train_idx = train_idx[:train_size]
    train = zoo.make_loader(inputs[train_idx], targets[train_idx], batch_size, True, seed)
    val = zoo.make_loader(inputs[val_idx], targets[val_idx], 256, False, seed)
    return train, val


def centred_head_(network: nn.Sequential, loader: DataLoader) -> nn.Sequential:
    """Set the last linear layer's bias to the mean training target (what ``loss-at-init`` advises for
    unscaled targets); returns ``network``."""
    targets = loader.dataset.tensors[1]  # type: ignore[attr-defined]
    head = [module for module in network if isinstance(module, nn.Linear)][-1]
    with torch.no_grad():
        head.bias.fill_(float(targets.mean()))
    return network


# ====================================================================== labels memorised late
def noisy_small_digits_loaders(
    train_size: int = 300, noise: float = 0.4, batch_size: int = 50, seed: int = 0
) -> zoo.Loaders:
    """``train_size`` training digits of which ``noise`` carry another class's label, and a clean
    validation set of 400: a network without regularisation first learns the digits, then memorises the
    wrong labels, and its validation loss climbs."""
    inputs, targets = zoo._digits("standardized")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)
    train_idx, val_idx = order[:train_size], order[train_size : train_size + 400]
    labels = targets[train_idx].clone()
    wrong = torch.rand(train_size, generator=generator) < noise
    labels[wrong] = (labels[wrong] + torch.randint(1, 10, (int(wrong.sum()),), generator=generator)) % 10
    train = zoo.make_loader(inputs[train_idx], labels, batch_size, True, seed)
    val = zoo.make_loader(inputs[val_idx], targets[val_idx], 200, False, seed)
    return train, val
