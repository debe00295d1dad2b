"""Models, data and schedules of the long and foreign-architecture cases (``cases_long.py``,
``cases_regression.py``): runs of thousands of steps that converge and stay converged, Hugging Face
models built from tiny configs with random weights (nothing downloaded; ``transformers`` is a dev
extra, imported only by the builders that need it), and the late faults that must still be caught
once a run has converged (a learning rate that jumps up, noise labels memorised).

Example:
    >>> train, val = markov_text_loaders(n=64, length=16, batch_size=8)
    >>> batch = next(iter(train))
    >>> sorted(batch), tuple(batch["input_ids"].shape)
    (['attention_mask', 'input_ids', 'labels'], (8, 16))
    >>> bool((batch["labels"][batch["attention_mask"] == 0] == -100).all())
    True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.detection import zoo

Schedule = Literal["constant", "cosine", "warmup-cosine"]
IGNORE_INDEX = -100


# ====================================================================== schedules
def lr_factor(
    schedule: Schedule, total_steps: int, warmup: int = 100, jump_at: int | None = None, jump: float = 1.0
) -> Callable[[int], float]:
    """The ``LambdaLR`` factor of a schedule: ``"constant"``, ``"cosine"`` (per step, from 1 to exactly 0 at
    ``total_steps``) or ``"warmup-cosine"`` (linear warm-up over ``warmup`` steps, then cosine to 0); times
    ``jump`` from step ``jump_at`` on (a late fault: the learning rate jumps up).

    Example:
        >>> factor = lr_factor("cosine", 100)
        >>> factor(0), round(factor(50), 3), factor(100)
        (1.0, 0.5, 0.0)
        >>> lr_factor("constant", 100, jump_at=60, jump=30.0)(70)
        30.0
    """

    def factor(step: int) -> float:
        if schedule == "constant":
            value = 1.0
        elif schedule == "warmup-cosine" and step < warmup:
            value = (step + 1) / warmup
        else:
            start = warmup if schedule == "warmup-cosine" else 0
            progress = min(max(step - start, 0) / max(total_steps - start, 1), 1.0)
            value = 0.5 * (1.0 + math.cos(math.pi * progress))
        if jump_at is not None and step >= jump_at:
            value *= jump
        return value

    return factor


class ScheduledModule(zoo.ZooModule):
    """``ZooModule`` whose learning rate follows :func:`lr_factor` (stepped every optimizer step).

    Args:
        net, loss, optimizer, lr, weight_decay, momentum: as for ``ZooModule``.
        schedule: ``"constant"``, ``"cosine"`` or ``"warmup-cosine"``.
        total_steps: the run's length (where a cosine reaches 0).
        warmup: warm-up steps of ``"warmup-cosine"``.
        jump_at, jump: from optimizer step ``jump_at`` the learning rate is multiplied by ``jump``.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: zoo.OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        schedule: Schedule = "constant",
        total_steps: int = 3000,
        warmup: int = 100,
        jump_at: int | None = None,
        jump: float = 1.0,
    ) -> None:
        scheduled = schedule != "constant" or jump_at is not None
        factor = lr_factor(schedule, total_steps, warmup, jump_at, jump) if scheduled else None
        super().__init__(net, loss, optimizer, lr, weight_decay, momentum, factor)


# ====================================================================== data
def digits_row_loaders(batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> zoo.Loaders:
    """Standardised digits as sequences of 8 rows of 8 pixels ``(N, 8, 8)`` (for recurrent and attention
    models), with a validation split."""
    train, val = zoo.digits_loaders(batch_size=batch_size, val_fraction=val_fraction, seed=seed)
    for loader in (train, val):
        if loader is not None:
            inputs, targets = loader.dataset.tensors  # type: ignore[attr-defined]
            loader.dataset.tensors = (inputs.view(-1, 8, 8), targets)  # type: ignore[attr-defined]
    return train, val


def small_noisy_digits_loaders(
    train_size: int = 300, noise: float = 0.4, batch_size: int = 32, seed: int = 0
) -> zoo.Loaders:
    """A ``train_size``-sample digits training set with ``noise`` of its labels moved to another class
    (fixed once, so a model can memorise them), and a clean validation set of the other samples."""
    inputs, targets = zoo._digits("standardized")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)
    train_idx, val_idx = order[:train_size], order[train_size:]
    labels = targets[train_idx].clone()
    moved = torch.rand(train_size, generator=generator) < noise
    shift = torch.randint(1, 10, (train_size,), generator=generator)
    labels = torch.where(moved, (labels + shift) % 10, labels)
    train = zoo.make_loader(inputs[train_idx], labels, batch_size, True, seed)
    val = zoo.make_loader(inputs[val_idx], targets[val_idx], 256, False, seed)
    return train, val


@functools.cache
def _markov_chain(vocab: int, seed: int) -> Tensor:
    """A ``(vocab, vocab)`` next-token distribution like text's: from every token one likely successor
    (p ~0.55), three plausible ones (~0.1 each) and a long tail (15% spread over the whole vocabulary), so
    that a model which learned it exactly still gives about a fifth of the correct tokens p < 0.05.
    Token 0 is the padding and never follows another."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.full((vocab, vocab), 0.15 / (vocab - 1), dtype=torch.float32)
    for token in range(vocab):
        successors = torch.randperm(vocab - 1, generator=generator)[:4] + 1
        rows[token, successors] += torch.tensor([0.55, 0.1, 0.1, 0.1])
    rows[:, 0] = 0.0
    return rows / rows.sum(dim=1, keepdim=True)


def markov_text(
    n: int, length: int, vocab: int = 32, seed: int = 0, short_share: float = 0.3
) -> dict[str, Tensor]:
    """``n`` token sequences of up to ``length`` tokens drawn from :func:`_markov_chain`, as a Hugging Face
    causal-LM batch: ``input_ids`` (right-padded with id 0), ``attention_mask`` and ``labels``
    (``input_ids`` with the padding set to -100; the model shifts them). ``short_share`` of the rows end
    early (between half and all of ``length``)."""
    generator = torch.Generator().manual_seed(seed + 1)
    chain = _markov_chain(vocab, 0)
    tokens = torch.zeros(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(1, vocab, (n,), generator=generator)
    for position in range(1, length):
        previous = chain[tokens[:, position - 1]]
        tokens[:, position] = torch.multinomial(previous, 1, generator=generator).squeeze(1)
    lengths = torch.full((n,), length)
    short = torch.rand(n, generator=generator) < short_share
    lengths[short] = torch.randint(length // 2, length, (int(short.sum()),), generator=generator)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    tokens = tokens * mask
    return {
        "input_ids": tokens,
        "attention_mask": mask,
        "labels": tokens.masked_fill(mask == 0, IGNORE_INDEX),
    }


def markov_text_loaders(
    n: int = 2048, length: int = 24, vocab: int = 32, batch_size: int = 16, val_n: int = 256, seed: int = 0
) -> zoo.Loaders:
    """Training and validation loaders of :func:`markov_text` dict batches."""
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        zoo.DictDataset(**markov_text(n, length, vocab, seed)),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=True,
    )
    val = DataLoader(zoo.DictDataset(**markov_text(val_n, length, vocab, seed + 100)), batch_size=128)
    return train, val


# ====================================================================== models
def tiny_gpt2(
    vocab: int = 32, length: int = 24, width: int = 32, layers: int = 2, heads: int = 2
) -> nn.Module:
    """``transformers.GPT2LMHeadModel`` from a tiny ``GPT2Config`` (random weights, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=length,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        loss_type="ForCausalLM",
    )
    return GPT2LMHeadModel(config)


def tiny_hf_resnet(classes: int = 10) -> nn.Module:
    """``transformers.ResNetForImageClassification`` from a tiny ``ResNetConfig`` for ``1x8x8`` images: a
    16-channel stem and two stages of basic residual blocks with batch-norm (random weights)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=classes,
    )
    return ResNetForImageClassification(config)


class PreLNRowTransformer(nn.Module):
    """Reads the 8 rows of a digit as 8 tokens: a linear embedding, learned positions, pre-LayerNorm
    encoder layers (``nn.TransformerEncoderLayer(norm_first=True)``), a final LayerNorm, mean pooling, a head."""

    def __init__(self, features: int = 8, length: int = 8, width: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, rows: Tensor) -> Tensor:
        hidden = self.norm(self.encoder(self.embed(rows) + self.position))
        return self.head(hidden.mean(dim=1))


class HFImageClassifier(ScheduledModule):
    """A Hugging Face image classifier (``pixel_values`` in, an output object with ``.logits``) trained with
    cross-entropy on ``(images, labels)`` batches."""

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(pixel_values=inputs).logits


class CausalLMModule(pl.LightningModule):
    """A Hugging Face causal LM on dict batches (``input_ids``, ``attention_mask``, ``labels``): the model
    shifts the labels and computes its own loss (``outputs.loss``), as every HF training loop does.

    Args:
        model: e.g. :func:`tiny_gpt2`.
        lr, weight_decay: AdamW's.
        schedule, total_steps, warmup: as :func:`lr_factor`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        schedule: Schedule = "warmup-cosine",
        total_steps: int = 3000,
        warmup: int = 100,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.factor = lr_factor(schedule, total_steps, warmup)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("val_loss", loss, batch_size=len(batch["input_ids"]))
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ====================================================================== regression
@functools.cache
def _smooth_regression(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` rows of 8 standard-normal features and a smooth target with a little noise (std 0.1 of ~1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = torch.sin(x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3].square() - 0.5 + 0.3 * x[:, 4]
    y = y + 0.1 * torch.randn(n, generator=generator)
    return x, y.unsqueeze(1)


def smooth_regression_loaders(
    scale: float = 1.0, shift: float = 0.0, n: int = 4096, batch_size: int = 64, seed: int = 0
) -> zoo.Loaders:
    """Training (3/4) and validation (1/4) loaders of a smooth synthetic regression whose target is
    ``shift + scale * y`` with ``y`` of unit scale: ``scale=1, shift=0`` standardised, ``scale=50,
    shift=200`` unscaled (raw units, roughly 50-400)."""
    x, y = _smooth_regression(n, seed)
    y = shift + scale * (y - y.mean()) / y.std()
    split = 3 * n // 4
    train = zoo.make_loader(x[:split], y[:split], batch_size, True, seed)
    val = zoo.make_loader(x[split:], y[split:], 256, False, seed)
    return train, val


def centre_head_(network: nn.Sequential, loader: DataLoader) -> nn.Sequential:
    """Initialise the bias of the network's last ``Linear`` at the mean training target (in place;
    returns it): the recipe for a regression head on unscaled targets ("init well")."""
    targets = torch.cat([targets for _, targets in loader])
    last = [layer for layer in network if isinstance(layer, nn.Linear)][-1]
    with torch.no_grad():
        last.bias.fill_(float(targets.mean()))
    return network


class Activation(nn.Module):
    """A function as a module (``Activation(torch.exp)``), for heads built from functional calls."""

    def __init__(self, function: Callable[[Tensor], Tensor], name: str = "") -> None:
        super().__init__()
        self.function = function
        self.name = name or getattr(function, "__name__", "function")

    def forward(self, values: Tensor) -> Tensor:
        return self.function(values)

    def extra_repr(self) -> str:
        return self.name


# ====================================================================== gradient zeroing
class SkippedZeroGradModule(zoo.ZooModule):
    """Automatic optimization whose ``optimizer_zero_grad`` override does nothing (meant to save time, or
    to accumulate by hand): Lightning never zeroes, so each step applies the sum of all gradients so far."""

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        pass  # the bug: nothing zeroes the gradients


class WrongOptimizerZeroedModule(zoo.ZooModule):
    """Manual optimization with two optimizers (body, head) that zeroes the head's twice and the body's
    never (a copy-paste slip): the body's gradients pile up step after step."""

    def __init__(self, body: nn.Module, head: nn.Module, loss: nn.Module) -> None:
        super().__init__(nn.Sequential(body, head), loss)
        self.body, self.head = body, head
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        body_optimizer, head_optimizer = self.optimizers()  # type: ignore[misc]
        loss = self._step(batch, "train")
        head_optimizer.zero_grad()
        head_optimizer.zero_grad()  # the bug: meant body_optimizer.zero_grad()
        self.manual_backward(loss)
        body_optimizer.step()
        head_optimizer.step()
        return loss

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.Adam(self.body.parameters(), lr=1e-3),
            torch.optim.Adam(self.head.parameters(), lr=1e-3),
        )


class ManualAccumulationModule(zoo.ZooModule):
    """Manual optimization that accumulates ``every`` micro-batches into one step (loss / every), stepping
    and zeroing after each ``every``-th: gradients pile up on purpose between steps, never across them."""

    def __init__(self, *args: Any, every: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.every = every
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = self._step(batch, "train")
        self.manual_backward(loss / self.every)
        if (batch_idx + 1) % self.every == 0:
            optimizer.step()  # type: ignore[union-attr]
            optimizer.zero_grad()  # type: ignore[union-attr]
        return loss


class SharedBodyTwoLossesModule(zoo.ZooModule):
    """Manual optimization in the GAN / actor-critic style: two optimizers (body + head A, head B), each
    zeroed just before its own backward pass; loss B also flows into the body, whose gradient therefore
    holds something between A's step and A's next zeroing (as in a GAN whose fake batch is not detached)."""

    def __init__(self, body: nn.Module, head_a: nn.Module, head_b: nn.Module, loss: nn.Module) -> None:
        super().__init__(nn.Sequential(body, head_a), loss)
        self.body, self.head_a, self.head_b = body, head_a, head_b
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer_a, optimizer_b = self.optimizers()  # type: ignore[misc]
        inputs, targets = zoo.split_batch(batch)
        optimizer_a.zero_grad()
        loss_a = self.loss(self.head_a(self.body(inputs)), targets)
        self.manual_backward(loss_a)
        optimizer_a.step()
        optimizer_b.zero_grad()
        loss_b = self.loss(self.head_b(self.body(inputs)), targets)
        self.manual_backward(loss_b)  # also reaches the body's parameters, which optimizer B does not hold
        optimizer_b.step()
        self.log("train_loss", loss_a, batch_size=len(targets))
        return loss_a

    def configure_optimizers(self) -> Any:
        parameters_a = [*self.body.parameters(), *self.head_a.parameters()]
        return torch.optim.Adam(parameters_a, lr=1e-3), torch.optim.Adam(self.head_b.parameters(), lr=1e-3)
