"""Models and data of ``cases_lm_rules.py``: Hugging Face language models and BERT heads built from tiny
configs with random weights (nothing downloaded; ``transformers`` is a dev extra, imported only by the
builders that need it) on synthetic token data in dict batches; regression heads whose output range
does or does not cover their targets; and LightningModules that zero their gradients in the ways a
real program does (by hand, accumulating, two optimizers) or fails to.

Example:
    >>> train, _ = markov_text_loaders(n=64, length=16, batch_size=8)
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
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.detection import zoo
from benchmarks.detection.zoo_real_faults import TwoOptimizerModule

IGNORE_INDEX = -100
PAD = 0  # token id 0 pads every sequence and never follows another token


# ====================================================================== schedules
def warmup_cosine(total_steps: int, warmup: int = 20) -> Callable[[int], float]:
    """The ``LambdaLR`` factor of a linear warm-up over ``warmup`` steps, then a cosine to 0 at ``total_steps``.

    Example:
        >>> factor = warmup_cosine(120, warmup=20)
        >>> factor(0), factor(19), round(factor(70), 3), factor(120)
        (0.05, 1.0, 0.5, 0.0)
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ====================================================================== token data
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
    rows[:, PAD] = 0.0
    return rows / rows.sum(dim=1, keepdim=True)


def _sample_chain(chain: Tensor, n: int, length: int, generator: torch.Generator) -> Tensor:
    vocab = chain.shape[0]
    tokens = torch.zeros(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(1, vocab, (n,), generator=generator)
    for position in range(1, length):
        tokens[:, position] = torch.multinomial(
            chain[tokens[:, position - 1]], 1, generator=generator
        ).squeeze(1)
    return tokens


def _padding_mask(n: int, length: int, short_share: float, generator: torch.Generator) -> Tensor:
    """``(n, length)`` attention mask: ``short_share`` of the rows end early (between half and all of ``length``)."""
    lengths = torch.full((n,), length)
    short = torch.rand(n, generator=generator) < short_share
    lengths[short] = torch.randint(length // 2, length, (int(short.sum()),), generator=generator)
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()


def markov_text(
    n: int, length: int, vocab: int = 32, seed: int = 0, short_share: float = 0.3
) -> dict[str, Tensor]:
    """``n`` token sequences of up to ``length`` tokens drawn from :func:`_markov_chain`, as a Hugging Face
    causal-LM batch: ``input_ids`` (right-padded with id 0), ``attention_mask`` and ``labels``
    (``input_ids`` with the padding set to -100; the model shifts them)."""
    generator = torch.Generator().manual_seed(seed + 1)
    mask = _padding_mask(n, length, short_share, generator)
    tokens = _sample_chain(_markov_chain(vocab, 0), n, length, generator) * mask
    return {
        "input_ids": tokens,
        "attention_mask": mask,
        "labels": tokens.masked_fill(mask == 0, IGNORE_INDEX),
    }


def masked_text(
    n: int, length: int, vocab: int = 32, seed: int = 0, share: float = 0.15
) -> dict[str, Tensor]:
    """:func:`markov_text` as a masked-LM batch (BERT's recipe): ``share`` of the real tokens are chosen;
    of those 80% become the mask token (id ``vocab``), 10% a random token, 10% stay; ``labels`` hold the
    original token at the chosen positions and -100 everywhere else."""
    text = markov_text(n, length, vocab, seed)
    tokens, mask = text["input_ids"], text["attention_mask"]
    generator = torch.Generator().manual_seed(seed + 2)
    chosen = (torch.rand(tokens.shape, generator=generator) < share) & (mask == 1)
    draw = torch.rand(tokens.shape, generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(tokens, vocab), tokens)
    random_tokens = torch.randint(1, vocab, tokens.shape, generator=generator)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, inputs)
    return {"input_ids": inputs, "attention_mask": mask, "labels": tokens.masked_fill(~chosen, IGNORE_INDEX)}


def tagged_text(n: int, length: int, vocab: int = 32, tags: int = 5, seed: int = 0) -> dict[str, Tensor]:
    """:func:`markov_text` with one tag per token (a token-classification batch, as for named entities): the
    tag is the token's class (id mod ``tags - 1``), except after token 1, a "title" word, where it is the
    last tag: the tag needs the previous token as well. Padding is tagged -100."""
    text = markov_text(n, length, vocab, seed)
    tokens, mask = text["input_ids"], text["attention_mask"]
    tag = tokens % (tags - 1)
    after_title = torch.zeros_like(tokens, dtype=torch.bool)
    after_title[:, 1:] = tokens[:, :-1] == 1
    tag = torch.where(after_title, torch.full_like(tag, tags - 1), tag)
    return {"input_ids": tokens, "attention_mask": mask, "labels": tag.masked_fill(mask == 0, IGNORE_INDEX)}


def topic_text(
    n: int,
    length: int,
    vocab: int = 48,
    topics: int = 10,
    seed: int = 0,
    wrong_share: float = 0.0,
    keyword_share: float = 0.25,
) -> dict[str, Tensor]:
    """Sequences of :func:`markov_text`'s kind labelled with one of ``topics`` topics (a sequence
    classification batch): each topic owns 3 keywords, and about ``keyword_share`` of a sequence's
    tokens are its topic's keywords; every sequence starts with a ``[CLS]`` token (id ``vocab``).
    ``wrong_share`` of the labels are moved to another topic, fixed once (annotation errors in the
    label column)."""
    keywords = torch.randperm(vocab - 1, generator=torch.Generator().manual_seed(0))[: 3 * topics] + 1
    keywords = keywords.view(topics, 3)  # the same for every seed: training and validation share them
    generator = torch.Generator().manual_seed(seed + 3)
    text = markov_text(n, length, vocab, seed)
    tokens, mask = text["input_ids"], text["attention_mask"]
    topic = torch.randint(0, topics, (n,), generator=generator)
    pick = torch.randint(0, 3, tokens.shape, generator=generator)
    topical = (torch.rand(tokens.shape, generator=generator) < keyword_share) & (mask == 1)
    tokens = torch.where(topical, keywords[topic.unsqueeze(1).expand_as(pick), pick], tokens)
    tokens = torch.cat([torch.full((n, 1), vocab), tokens[:, :-1]], dim=1)
    mask = torch.cat([torch.ones(n, 1, dtype=mask.dtype), mask[:, :-1]], dim=1)
    labels = topic.clone()
    if wrong_share > 0:
        moved = torch.rand(n, generator=generator) < wrong_share
        shift = torch.randint(1, topics, (n,), generator=generator)
        labels = torch.where(moved, (labels + shift) % topics, labels)
    return {"input_ids": tokens, "attention_mask": mask, "labels": labels}


def dict_loaders(
    make: Callable[..., dict[str, Tensor]],
    n: int = 1024,
    val_n: int = 256,
    batch_size: int = 16,
    **kwargs: Any,
) -> zoo.Loaders:
    """A shuffled training loader of ``make(n, seed=0, **kwargs)`` dict batches and a validation loader of
    ``make(val_n, seed=100, **kwargs)`` (clean: without ``wrong_share``)."""
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(
        zoo.DictDataset(**make(n, seed=0, **kwargs)),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=True,
    )
    clean = {key: value for key, value in kwargs.items() if key != "wrong_share"}
    val = DataLoader(zoo.DictDataset(**make(val_n, seed=100, **clean)), batch_size=128)
    return train, val


def markov_text_loaders(
    n: int = 1024, length: int = 24, vocab: int = 32, batch_size: int = 16
) -> zoo.Loaders:
    """Training and validation loaders of :func:`markov_text` (causal-LM) dict batches."""
    return dict_loaders(markov_text, n=n, batch_size=batch_size, length=length, vocab=vocab)


# ====================================================================== Hugging Face models
def tiny_gpt2(
    vocab: int = 32,
    length: int = 24,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    initializer_range: float = 0.02,
) -> nn.Module:
    """``transformers.GPT2LMHeadModel`` from a tiny ``GPT2Config`` (random weights, no dropout).
    ``initializer_range`` is the std of its (tied) embeddings and weights: 0.02 is GPT-2's own."""
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
        pad_token_id=PAD,
        initializer_range=initializer_range,
        loss_type="ForCausalLM",
    )
    return GPT2LMHeadModel(config)


def _tiny_bert_config(vocab: int, length: int, width: int = 32, heads: int = 2, **kwargs: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=2 * width,
        max_position_embeddings=length,
        pad_token_id=PAD,
        **kwargs,
    )


def tiny_bert_mlm(vocab: int = 33, length: int = 24) -> nn.Module:
    """``transformers.BertForMaskedLM`` from a tiny ``BertConfig`` (2 layers, width 32, dropout 0.1)."""
    from transformers import BertForMaskedLM

    return BertForMaskedLM(_tiny_bert_config(vocab, length))


def tiny_bert_classifier(
    kind: str, labels: int, vocab: int = 32, length: int = 24, width: int = 32, heads: int = 2
) -> nn.Module:
    """``BertForTokenClassification`` (``kind="token"``) or ``BertForSequenceClassification``
    (``kind="sequence"``) from a tiny ``BertConfig`` (2 layers, dropout 0.1) with ``labels`` classes. A
    sequence classifier reads the ``[CLS]`` position through BERT's pooler; at width 32 with 2 heads it
    does not learn :func:`topic_text` in 300 steps (stuck at ln 5), at width 64 with 4 heads it does."""
    from transformers import BertForSequenceClassification, BertForTokenClassification

    model = BertForTokenClassification if kind == "token" else BertForSequenceClassification
    return model(_tiny_bert_config(vocab, length, width, heads, num_labels=labels))


class HFModule(pl.LightningModule):
    """A Hugging Face model on dict batches (``input_ids``, ``attention_mask``, ``labels``): the model
    computes its own loss (``outputs.loss``; a causal LM shifts the labels itself), as every Hugging Face
    training loop does. AdamW with warm-up and a cosine to 0 over ``total_steps``.

    Example:
        >>> module = HFModule(nn.Linear(2, 2), total_steps=10)
        >>> type(module.configure_optimizers()["optimizer"]).__name__
        'AdamW'
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        total_steps: int = 200,
        warmup: int = 20,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.factor = warmup_cosine(total_steps, warmup)

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
    scale: float = 1.0, shift: float = 0.0, n: int = 2048, batch_size: int = 64, seed: int = 0
) -> zoo.Loaders:
    """Training (3/4) and validation (1/4) loaders of a smooth synthetic regression whose target is
    ``shift + scale * y`` with ``y`` standardised: ``scale=1, shift=0`` standardised, ``scale=50,
    shift=200`` unscaled (raw units, roughly 50-400)."""
    x, y = _smooth_regression(n, seed)
    y = shift + scale * (y - y.mean()) / y.std()
    split = 3 * n // 4
    train = zoo.make_loader(x[:split], y[:split], batch_size, True, seed)
    val = zoo.make_loader(x[split:], y[split:], 256, False, seed)
    return train, val


def centre_head_(network: nn.Sequential, loader: DataLoader) -> nn.Sequential:
    """Initialise the bias of the network's last ``Linear`` at the mean training target (in place; returns
    it): the recipe for a regression head on unscaled targets ("init well")."""
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


class ManualZeroingModule(zoo.ZooModule):
    """Manual optimization that zeroes its gradients with ``zero_grad(set_to_none=False)`` (they stay
    allocated, filled with 0) before each backward pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=False)  # type: ignore[union-attr]
        loss = self._step(batch, "train")
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss


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


class WrongOptimizerZeroedModule(TwoOptimizerModule):
    """Manual optimization with two optimizers (body, head) that zeroes the head's twice and the body's
    never (a copy-paste slip): the body's gradients pile up step after step."""

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
