"""Batches and outputs as users have them, through every preflight trial and batch check: dict batches with the
Hugging Face names, dataclasses, nested tuples, models called with keyword arguments, outputs with
``.loss``/``.logits``; the trials in the trainer's precision; the real run untouched."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _models import fit
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_sentinel import Sentinel, findings
from lightning_sentinel.checks._batches import find_parts, logits_of, loss_of, replace_parts, slice_batch
from lightning_sentinel.checks.batch_mixing import BatchIndependenceCheck
from lightning_sentinel.checks.data import BatchInspector
from lightning_sentinel.checks.preflight import LabelShuffleCheck, OverfitBatchCheck
from lightning_sentinel.checks.target_leakage import TargetLeakageCheck

TRIAL_IDS = {"cannot-overfit-batch", "model-ignores-input", "batch-mixing", "target-leakage"}
VOCAB, LENGTH, CLASSES = 24, 10, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine two threads make an embedding's backward 40x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------- data: token texts with a topic
def _texts(n: int = 384, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Padded token texts whose tokens mostly come from their topic's band of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    topic = torch.randint(0, CLASSES, (n,), generator=generator)
    band = (VOCAB - 1) // CLASSES
    own = 1 + topic[:, None] * band + torch.randint(0, band, (n, LENGTH), generator=generator)
    anywhere = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
    tokens = torch.where(torch.rand(n, LENGTH, generator=generator) < 0.7, own, anywhere)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=generator)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    return tokens * mask, mask, topic


@dataclass
class TextBatch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


def _rows(permute: bool = False) -> list[dict[str, Tensor]]:
    tokens, mask, topic = _texts()
    if permute:
        topic = topic[torch.randperm(len(topic), generator=torch.Generator().manual_seed(1))]
    return [
        {"input_ids": tokens[i], "attention_mask": mask[i], "labels": topic[i]} for i in range(len(topic))
    ]


def _collate(form: str):
    def collate(rows: list[dict[str, Tensor]]) -> Any:
        ids, mask, labels = (
            torch.stack([row[key] for row in rows]) for key in ("input_ids", "attention_mask", "labels")
        )
        if form == "dict":
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if form == "dataclass":
            return TextBatch(ids, mask, labels)
        return ((ids, mask), labels)  # nested tuple

    return collate


def _loader(form: str = "dict", permute: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        _rows(permute),
        batch_size=32,
        shuffle=True,
        generator=generator,
        collate_fn=_collate(form),  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------- models
@dataclass
class Output:
    """What a Hugging Face model returns, in miniature: an object with ``.loss`` and ``.logits``."""

    loss: Tensor | None
    logits: Tensor


class TextModel(nn.Module):
    """Embedding, masked mean over tokens, MLP head; called with keyword arguments like a Hugging Face model."""

    def __init__(self, dropout: float = 0.0, mix_batch: bool = False, leak: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32, padding_idx=0)
        self.head = nn.Sequential(
            nn.Linear(32 + leak, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, CLASSES)
        )
        self.mix_batch = mix_batch
        self.leak = leak

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> Output:
        weights = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * weights).sum(1) / weights.sum(1).clamp(min=1)
        if self.mix_batch:
            pooled = pooled - pooled.mean(dim=0)  # the bug: centred with the batch's statistics
        if self.leak and labels is not None:
            pooled = torch.cat(
                [pooled, labels[:, None].to(pooled.dtype)], dim=1
            )  # the bug: the label as a feature
        elif self.leak:
            pooled = torch.cat([pooled, torch.zeros_like(pooled[:, :1])], dim=1)
        logits = self.head(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return Output(loss, logits)


def _as_kwargs(batch: Any) -> dict[str, Tensor]:
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, TextBatch):
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    (ids, mask), labels = batch
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TextModule(pl.LightningModule):
    """``self.model(**batch).loss`` in ``training_step``, no ``forward`` of its own (the Hugging Face idiom)."""

    def __init__(self, weight_decay: float = 0.0, lr: float = 1e-2, **model: Any) -> None:
        super().__init__()
        self.model = TextModel(**model)
        self.weight_decay = weight_decay
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        output = self.model(**_as_kwargs(batch))
        self.log("train_loss", output.loss)
        return {"loss": output.loss, "logits": output.logits}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def _every_check() -> list[pl.Callback]:
    return [
        OverfitBatchCheck(max_seconds=120.0),
        LabelShuffleCheck(max_seconds=120.0),
        BatchIndependenceCheck(),
        TargetLeakageCheck(),
        BatchInspector(every_n_steps=1, window_batches=2),
    ]


def _found(trainer: pl.Trainer) -> list[tuple[str, str, str | None]]:
    return [(f.check, f.severity.value, f.where) for f in findings(trainer)]


# ---------------------------------------------------------------------- the adapter
def test_parts_of_every_batch_form():
    ids, mask, labels = torch.ones(4, 5, dtype=torch.long), torch.ones(4, 5), torch.zeros(4, dtype=torch.long)
    forms = {
        "dict": ({"input_ids": ids, "attention_mask": mask, "labels": labels}, "batch['input_ids']"),
        "dataclass": (TextBatch(ids, mask, labels), "batch.input_ids"),
        "nested": (((ids, mask), labels), "batch[0][0]"),
        "nested dict": ({"inputs": {"input_ids": ids, "attention_mask": mask}, "labels": labels}, None),
    }
    for name, (batch, input_name) in forms.items():
        parts = find_parts(batch)
        assert parts.reason == "" and parts.inputs is ids and parts.targets is labels and parts.tokens, name
        assert input_name is None or parts.input_name == input_name, name
    assert find_parts(forms["dict"][0]).mask is mask and find_parts(forms["dataclass"][0]).mask is mask
    assert find_parts(forms["nested dict"][0]).mask_name == "batch['inputs']['attention_mask']"
    assert find_parts(forms["nested dict"][0], input_key="inputs.input_ids").input_name == (
        "batch['inputs']['input_ids']"
    )
    changed = replace_parts(forms["dataclass"][0], find_parts(forms["dataclass"][0]), targets=labels + 1)
    assert isinstance(changed, TextBatch) and int(changed.labels.sum()) == 4 and int(labels.sum()) == 0
    assert isinstance(slice_batch(forms["dataclass"][0], 0, 2, 4), TextBatch)
    assert slice_batch(forms["nested"][0], 0, 2, 4)[0][1].shape == (2, 5)


def test_losses_and_logits_of_every_output_form():
    logits = torch.zeros(4, 3)
    for output in (
        torch.tensor(1.5),
        {"loss": torch.tensor(1.5), "logits": logits},
        Output(torch.tensor(1.5), logits),
    ):
        assert float(loss_of(output)) == 1.5
    assert logits_of(Output(None, logits), 4) is logits and logits_of({"logits": logits}, 4) is logits
    assert loss_of(logits) is None and logits_of(torch.tensor(1.0), 4) is None


# ---------------------------------------------------------------------- healthy: every check runs, none skips
@pytest.mark.parametrize("form", ["dict", "dataclass", "nested"])
def test_every_trial_and_batch_check_runs_on_the_batch_form(tmp_path, form):
    trainer = fit(TextModule(), _every_check(), loader=_loader(form), root=tmp_path, max_steps=4)
    assert _found(trainer) == []  # no warning, and no info: nothing skipped


# ---------------------------------------------------------------------- faults, found with id and where
def test_labels_shuffled_against_dict_inputs_are_found(tmp_path):
    trainer = fit(
        TextModule(),
        [LabelShuffleCheck(max_seconds=120.0)],
        loader=_loader(permute=True),
        root=tmp_path,
        max_steps=2,
    )
    assert _found(trainer) == [("model-ignores-input", "error", "batch['labels']")]


def test_an_over_regularised_kwargs_model_cannot_overfit(tmp_path):
    module = TextModule(weight_decay=20.0, dropout=0.97)  # AdamW: 20% of every weight decayed per step
    trainer = fit(
        module,
        [OverfitBatchCheck(max_seconds=120.0)],
        loader=_loader("dataclass"),
        root=tmp_path,
        max_steps=2,
    )
    assert _found(trainer) == [("cannot-overfit-batch", "warning", "batch[0]")]


@pytest.mark.parametrize("form", ["dict", "nested"])
def test_batch_statistics_in_a_kwargs_model_are_batch_mixing(tmp_path, form):
    trainer = fit(
        TextModule(mix_batch=True),
        [BatchIndependenceCheck()],
        loader=_loader(form),
        root=tmp_path,
        max_steps=2,
    )
    [finding] = findings(trainer)
    assert (finding.check, finding.severity.value) == ("batch-mixing", "error")
    assert finding.where == ("batch['input_ids']" if form == "dict" else "batch[0][0]")
    assert finding.evidence["leaked_samples"] == 31


def test_a_label_fed_to_a_kwargs_model_is_target_leakage(tmp_path):
    trainer = fit(
        TextModule(leak=True), [TargetLeakageCheck()], loader=_loader("dataclass"), root=tmp_path, max_steps=2
    )
    [finding] = findings(trainer)
    assert (finding.check, finding.severity.value) == ("target-leakage", "error")
    assert finding.where == "batch.labels -> cross_entropy input (32, 3)"


def test_batch_inspector_names_dict_and_dataclass_inputs(tmp_path):
    rows = _rows()
    for row in rows:
        row["input_ids"] = torch.full_like(row["input_ids"], 5)  # one token everywhere
    loader = DataLoader(rows, batch_size=32, collate_fn=_collate("dataclass"))  # type: ignore[arg-type]
    trainer = fit(
        TextModule(),
        [BatchInspector(every_n_steps=1, window_batches=2)],
        loader=loader,
        root=tmp_path,
        max_steps=6,
    )
    assert ("constant-inputs", "error", "batch.input_ids") in _found(trainer)
    assert all(f.check != "unnormalized-inputs" for f in findings(trainer))  # token ids are not features


# ---------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "bf16-mixed"])
def test_healthy_full_preset_under_the_trainers_precision_skips_nothing(tmp_path, precision):
    trainer = fit(
        TextModule(),
        [Sentinel(preset="full")],
        loader=_loader(),
        root=tmp_path,
        max_steps=4,
        precision=precision,
    )
    mine = [f for f in findings(trainer) if f.check in TRIAL_IDS]
    assert mine == [], [f.message for f in mine]
    assert [f.check for f in findings(trainer) if f.severity.value != "info"] == []


def test_a_fault_is_still_found_under_64_true(tmp_path):
    trainer = fit(
        TextModule(mix_batch=True),
        [BatchIndependenceCheck()],
        loader=_loader(),
        root=tmp_path,
        precision="64-true",
        max_steps=2,
    )
    assert _found(trainer) == [("batch-mixing", "error", "batch['input_ids']")]


# ---------------------------------------------------------------------- the real run is untouched
class _RandomTextModule(TextModule):
    """Consumes every RNG in its step, with dropout: a changed RNG state would change the weights."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        noise = torch.rand(()) * 0.0 + float(np.random.rand()) * 0.0 + random.random() * 0.0
        return {"loss": out["loss"] + noise}


def test_the_real_run_on_dict_batches_is_exactly_as_without_the_trials(tmp_path):
    def run(callbacks: list[pl.Callback]) -> list[Tensor]:
        pl.seed_everything(7, verbose=False)
        module = _RandomTextModule(dropout=0.3)
        fit(module, callbacks, loader=_loader(), root=tmp_path, max_steps=8)
        return [p.detach().clone() for p in module.parameters()]

    plain = run([])
    checked = run([Sentinel(preset="full")])
    assert all(torch.equal(a, b) for a, b in zip(plain, checked, strict=True))
