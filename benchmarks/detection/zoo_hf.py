"""Hugging Face ``transformers`` models from tiny configs (random weights, nothing downloaded), dict batches as the
library's collators make them, and the data they learn: the zoo's language models, sequence and token
classifiers and a frozen-backbone fine-tune.

The data are synthetic token languages that a tiny model learns in a hundred steps, and scikit-learn's
bundled digits as images. Every LightningModule here is written the way Hugging Face users write them:
``self.model(**batch)`` inside ``training_step``, the loss from the ``ModelOutput``.

``transformers`` is a dev extra: without it :data:`AVAILABLE` is ``False`` and the cases are left out.

Example:
    >>> train, _ = progression_loaders(n=64, batch_size=8)
    >>> batch = next(iter(train))
    >>> sorted(batch), tuple(batch["input_ids"].shape)
    (['attention_mask', 'input_ids', 'labels'], (8, 16))
    >>> bool((batch["labels"][batch["attention_mask"] == 0] == -100).all())
    True
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.detection import zoo

try:
    import transformers

    transformers.logging.set_verbosity_error()
    AVAILABLE = True
except ImportError:  # pragma: no cover - transformers is a dev extra
    transformers = None  # type: ignore[assignment]
    AVAILABLE = False

PAD, MASK, FIRST = 0, 1, 2  # token ids: padding, [MASK], then the language's tokens
VOCAB = 32
IGNORE = -100


# ====================================================================== data
def _progressions(n: int, length: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Arithmetic progressions modulo ``VOCAB - FIRST`` (a random start and a step in 1..4), right-padded to
    ``length`` from random lengths in ``[length // 2, length]``: ``(tokens, mask, step - 1)``. After its first
    two tokens every token of a sequence follows from the two before it."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB - FIRST, (n, 1), generator=generator)
    step = torch.randint(1, 5, (n, 1), generator=generator)
    tokens = (start + step * torch.arange(length)) % (VOCAB - FIRST) + FIRST
    lengths = torch.randint(length // 2, length + 1, (n,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return torch.where(mask.bool(), tokens, torch.full_like(tokens, PAD)), mask, step[:, 0] - 1


def _loader(
    rows: list[dict[str, Tensor]], batch_size: int, shuffle: bool, seed: int, collate: Any = None
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        rows,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=shuffle,
        collate_fn=collate,
    )


def progression_loaders(
    n: int = 768, length: int = 16, batch_size: int = 16, seed: int = 0, val_fraction: float = 0.25
) -> zoo.Loaders:
    """Causal-LM batches as ``DataCollatorForLanguageModeling(mlm=False)`` makes them: ``input_ids``,
    ``attention_mask`` and ``labels`` = ``input_ids`` with ``-100`` at padding (the model shifts them)."""
    tokens, mask, _ = _progressions(n, length, seed)
    labels = torch.where(mask.bool(), tokens, torch.full_like(tokens, IGNORE))
    rows = [{"input_ids": tokens[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]
    cut = int(n * (1 - val_fraction))
    val = _loader(rows[cut:], 64, False, seed) if val_fraction else None
    return _loader(rows[:cut], batch_size, True, seed), val


def _topics(n: int, length: int, seed: int, topics: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Padded "texts" about one of ``topics`` topics: 60% of the tokens come from the topic's own band of the
    vocabulary, the rest from anywhere: ``(tokens, mask, topic)``."""
    generator = torch.Generator().manual_seed(seed)
    topic = torch.randint(0, topics, (n,), generator=generator)
    width = (VOCAB - FIRST) // topics
    own = torch.randint(0, width, (n, length), generator=generator) + FIRST + topic[:, None] * width
    anywhere = torch.randint(FIRST, VOCAB, (n, length), generator=generator)
    tokens = torch.where(torch.rand(n, length, generator=generator) < 0.6, own, anywhere)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return torch.where(mask.bool(), tokens, torch.full_like(tokens, PAD)), mask, topic


def topic_classification_loaders(
    n: int = 768, length: int = 16, batch_size: int = 16, seed: int = 0, permute_labels: bool = False
) -> zoo.Loaders:
    """Sequence classification of the topic texts, with ``token_type_ids`` as a BERT tokenizer gives them.
    ``permute_labels``: the bug of shuffling the label column apart from the texts."""
    tokens, mask, topic = _topics(n, length, seed)
    if permute_labels:
        topic = topic[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))]
    rows = [
        {
            "input_ids": tokens[i],
            "token_type_ids": torch.zeros_like(tokens[i]),
            "attention_mask": mask[i],
            "labels": topic[i],
        }
        for i in range(n)
    ]
    cut = int(n * 0.75)
    return _loader(rows[:cut], batch_size, True, seed), _loader(rows[cut:], 64, False, seed)


def token_tagging_loaders(n: int = 768, length: int = 16, batch_size: int = 16, seed: int = 0) -> zoo.Loaders:
    """Per-token classification of the topic texts: each token's band of the vocabulary (4 tags), ``-100`` at
    padding, as ``DataCollatorForTokenClassification`` pads them."""
    tokens, mask, _ = _topics(n, length, seed)
    tags = torch.where(mask.bool(), (tokens - FIRST) // 8, torch.full_like(tokens, IGNORE))
    rows = [{"input_ids": tokens[i], "attention_mask": mask[i], "labels": tags[i]} for i in range(n)]
    cut = int(n * 0.75)
    return _loader(rows[:cut], batch_size, True, seed), _loader(rows[cut:], 64, False, seed)


def masked_lm_collate(rows: list[dict[str, Tensor]], probability: float = 0.15) -> dict[str, Tensor]:
    """Dynamic masking as ``DataCollatorForLanguageModeling(mlm=True)`` does it: 15% of the real tokens become
    targets; of those 80% are replaced by ``[MASK]``, 10% by a random token, 10% kept; ``-100`` elsewhere."""
    input_ids = torch.stack([row["input_ids"] for row in rows])
    attention_mask = torch.stack([row["attention_mask"] for row in rows])
    chosen = (torch.rand(input_ids.shape) < probability) & attention_mask.bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    draw = torch.rand(input_ids.shape)
    masked = chosen & (draw < 0.8)
    randomised = chosen & (draw >= 0.8) & (draw < 0.9)
    random_tokens = torch.randint(FIRST, VOCAB, input_ids.shape)
    corrupted = torch.where(masked, torch.full_like(input_ids, MASK), input_ids)
    corrupted = torch.where(randomised, random_tokens, corrupted)
    return {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}


def masked_lm_loaders(n: int = 768, length: int = 16, batch_size: int = 16, seed: int = 0) -> zoo.Loaders:
    """Masked-LM batches of the progressions (dynamic masking, drawn from torch's global RNG in the collator)."""
    tokens, mask, _ = _progressions(n, length, seed)
    rows = [{"input_ids": tokens[i], "attention_mask": mask[i]} for i in range(n)]
    cut = int(n * 0.75)
    return (
        _loader(rows[:cut], batch_size, True, seed, masked_lm_collate),
        _loader(rows[cut:], 64, False, seed, masked_lm_collate),
    )


def _digit_images(size: int = 16) -> tuple[Tensor, Tensor]:
    """The digits as ``(N, 1, size, size)`` standardised images and their labels, shuffled once."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    images = nn.functional.interpolate(((images - 0.3) / 0.4)[:, None], size=size, mode="bilinear")
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def digit_image_loaders(batch_size: int = 32, seed: int = 0) -> zoo.Loaders:
    """``{"pixel_values", "labels"}`` batches of the digits, as an image processor and a dataset map make them."""
    images, labels = _digit_images()
    rows = [{"pixel_values": images[i], "labels": labels[i]} for i in range(len(labels))]
    cut = 1400
    return _loader(rows[:cut], batch_size, True, seed), _loader(rows[cut:], 128, False, seed)


# ====================================================================== models
def tiny_gpt2() -> nn.Module:
    """``GPT2LMHeadModel`` with 2 layers of width 32 (random weights)."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, pad_token_id=PAD
    )
    return transformers.GPT2LMHeadModel(config)


def _bert_config(**kwargs: Any) -> Any:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=PAD,
        **kwargs,
    )


def tiny_bert_classifier(classes: int = 4) -> nn.Module:
    """``BertForSequenceClassification`` with 2 layers of width 32."""
    return transformers.BertForSequenceClassification(_bert_config(num_labels=classes))


def tiny_bert_masked_lm() -> nn.Module:
    """``BertForMaskedLM`` with 2 layers of width 32."""
    return transformers.BertForMaskedLM(_bert_config())


def tiny_bert_tagger(tags: int = 4) -> nn.Module:
    """``BertForTokenClassification`` with 2 layers of width 32."""
    return transformers.BertForTokenClassification(_bert_config(num_labels=tags))


def tiny_bert_decoder(causal: bool) -> nn.Module:
    """``BertLMHeadModel``: a causal decoder with ``is_decoder=True``; with ``False`` (the bug) its attention
    stays bidirectional, so the logits at ``t`` see token ``t + 1``, the very label they are scored on."""
    return transformers.BertLMHeadModel(_bert_config(is_decoder=causal))


def tiny_resnet(classes: int = 10) -> nn.Module:
    """``ResNetForImageClassification`` (batch-norm, residual stages of width 16 and 32) for 1-channel images."""
    config = transformers.ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_labels=classes,
        downsample_in_first_stage=False,
    )
    return transformers.ResNetForImageClassification(config)


def pretrained_frozen_resnet(steps: int = 150, seed: int = 0) -> nn.Module:
    """A tiny ResNet "pretrained" on the digits 0-4 (``steps`` Adam steps), its backbone then frozen
    (``requires_grad=False``, batch-norm in eval mode) and a fresh head for all 10 digits: a fine-tune's start."""
    generator = torch.Generator().manual_seed(seed)
    network = tiny_resnet()
    images, labels = _digit_images()
    images, labels = images[:1400], labels[:1400]
    keep = labels < 5
    images, labels = images[keep], labels[keep]
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    for _ in range(steps):
        index = torch.randint(0, len(labels), (64,), generator=generator)
        loss = network(pixel_values=images[index], labels=labels[index]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head = network.classifier[-1]
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    network.resnet.requires_grad_(False)
    network.resnet.eval()  # batch-norm statistics stay those of the pretraining
    return network


# ====================================================================== modules
class HFModule(pl.LightningModule):
    """A Hugging Face model trained as its users write it: ``loss = self.model(**batch).loss``.

    Args:
        model: a ``transformers`` model (it computes the loss from ``labels``).
        lr: AdamW learning rate.
        parameters: ``"all"``, or ``"head"`` for a fine-tune that optimizes only the ``classifier`` module.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self, model: nn.Module, lr: float = 3e-3, parameters: str = "all", weight_decay: float = 0.01
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.parameters_trained = parameters
        self.weight_decay = weight_decay

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        output = self.model(**batch)
        self.log("val_loss", output.loss, batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trained = (
            self.model.classifier.parameters() if self.parameters_trained == "head" else self.parameters()
        )
        return torch.optim.AdamW(trained, lr=self.lr, weight_decay=self.weight_decay)


class UnshiftedLMModule(HFModule):
    """A causal LM whose custom loss forgets the shift: the logits at ``t`` are scored against token ``t``,
    which the model is given at ``t`` (the bug: a copy task, no next-token prediction)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())  # no shift
        self.log("train_loss", loss)
        return loss


class BatchWhitenedClassifier(HFModule):
    """BERT's pooled output standardised with the statistics of the *batch* (mean and std over dim 0) before a
    linear head, also in eval mode: each sample's prediction depends on the other samples of its batch."""

    def __init__(self, classes: int = 4, lr: float = 3e-3) -> None:
        super().__init__(transformers.BertModel(_bert_config()), lr=lr)
        self.classifier = nn.Linear(32, classes)

    def _logits(self, batch: Any) -> Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        pooled = self.model(**inputs).pooler_output
        pooled = (pooled - pooled.mean(dim=0)) / (pooled.std(dim=0) + 1e-5)  # the bug: batch statistics
        return self.classifier(pooled)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = nn.functional.cross_entropy(self._logits(batch), batch["labels"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self._logits(batch), batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
