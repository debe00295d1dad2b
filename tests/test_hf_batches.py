"""Hugging Face models (tiny configs, random weights) on their own dict batches: every preflight trial and batch
check runs (no skip), healthy language models stay quiet under both presets, a language model's leaks are
``target-leakage``, and a frozen fine-tune the trials cannot judge gets an inconclusive ``info``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import fit
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

from benchmarks.detection import zoo_hf  # noqa: E402
from lightning_sentinel import Sentinel, findings  # noqa: E402
from lightning_sentinel.checks.batch_mixing import BatchIndependenceCheck  # noqa: E402
from lightning_sentinel.checks.data import BatchInspector  # noqa: E402
from lightning_sentinel.checks.preflight import LabelShuffleCheck, OverfitBatchCheck  # noqa: E402
from lightning_sentinel.checks.target_leakage import TargetLeakageCheck  # noqa: E402

TRIAL_IDS = {"cannot-overfit-batch", "model-ignores-input", "batch-mixing", "target-leakage"}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _lm_data():
    return zoo_hf.progression_loaders(n=320, batch_size=16, val_fraction=0.0)[0]


def _every_check() -> list[pl.Callback]:
    """Every trial (on short budgets: these tests ask whether they run; the presets' budgets are tried below)."""
    return [
        OverfitBatchCheck(max_steps=60, max_fraction=0.8, max_seconds=120.0),
        LabelShuffleCheck(max_steps=30, max_seconds=120.0),
        BatchIndependenceCheck(),
        TargetLeakageCheck(),
        BatchInspector(every_n_steps=1, window_batches=2),
    ]


def _found(trainer: pl.Trainer) -> list[tuple[str, str, str | None]]:
    return [(f.check, f.severity.value, f.where) for f in findings(trainer)]


# ---------------------------------------------------------------------- every check runs on HF batches
def test_a_causal_lm_dict_batch_goes_through_every_trial_and_batch_check(tmp_path):
    trainer = fit(
        zoo_hf.HFModule(zoo_hf.tiny_gpt2()), _every_check(), loader=_lm_data(), root=tmp_path, max_steps=4
    )
    assert _found(trainer) == []  # nothing skipped (no info), nothing flagged


def test_a_sequence_classifier_dict_batch_goes_through_every_trial_and_batch_check(tmp_path):
    train, _ = zoo_hf.topic_classification_loaders(n=320)
    trainer = fit(
        zoo_hf.HFModule(zoo_hf.tiny_bert_classifier()),
        _every_check(),
        loader=train,
        root=tmp_path,
        max_steps=4,
    )
    assert _found(trainer) == []


@pytest.mark.parametrize("preset", ["fast", "full"])
def test_a_healthy_tiny_gpt2_is_quiet_under_both_presets(tmp_path, preset):
    train, _ = zoo_hf.progression_loaders(n=320, batch_size=16)
    trainer = fit(
        zoo_hf.HFModule(zoo_hf.tiny_gpt2()),
        [Sentinel(preset=preset)],
        loader=train,
        root=tmp_path,
        max_steps=40,
    )
    assert [f for f in findings(trainer) if f.severity.value != "info"] == []
    assert [f.message for f in findings(trainer) if f.check in TRIAL_IDS] == []


# ---------------------------------------------------------------------- a language model's leaks
def test_an_lm_whose_loss_forgets_the_shift_leaks(tmp_path):
    trainer = fit(
        zoo_hf.UnshiftedLMModule(zoo_hf.tiny_gpt2()),
        [TargetLeakageCheck()],
        loader=_lm_data(),
        root=tmp_path,
        max_steps=1,
    )
    [finding] = findings(trainer)
    assert (finding.check, finding.severity.value) == ("target-leakage", "error")
    assert finding.where == "batch['labels'] -> cross_entropy input (256, 32)"
    assert finding.evidence["token_offset"] == 0 and finding.evidence["leaked_positions"] == 16
    assert "input_ids" in finding.message and "shift" in finding.hint


def test_a_decoder_that_is_not_causal_leaks_and_a_causal_one_does_not(tmp_path):
    leaky = fit(
        zoo_hf.HFModule(zoo_hf.tiny_bert_decoder(causal=False)),
        [TargetLeakageCheck()],
        loader=_lm_data(),
        root=tmp_path,
        max_steps=1,
    )
    [finding] = findings(leaky)
    assert (finding.check, finding.where) == (
        "target-leakage",
        "batch['labels'] -> cross_entropy input (256, 32)",
    )
    causal = fit(
        zoo_hf.HFModule(zoo_hf.tiny_bert_decoder(causal=True)),
        [TargetLeakageCheck()],
        loader=_lm_data(),
        root=tmp_path,
        max_steps=1,
    )
    assert findings(causal) == []


class _LabelsFromInputs(zoo_hf.HFModule):
    """A causal LM whose batches carry no labels: ``training_step`` passes ``labels=input_ids``; ``shift=False``
    is the custom loss that forgets the shift."""

    def __init__(self, shift: bool) -> None:
        super().__init__(zoo_hf.tiny_gpt2())
        self.shift = shift

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.shift:
            return self.model(input_ids=ids, attention_mask=mask, labels=ids).loss
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def test_labels_made_in_training_step_from_the_tokens_are_probed_too(tmp_path):
    rows = [
        {"input_ids": row["input_ids"], "attention_mask": row["attention_mask"]} for row in _lm_data().dataset
    ]
    loader = torch.utils.data.DataLoader(rows, batch_size=16)  # type: ignore[arg-type]
    healthy = fit(
        _LabelsFromInputs(shift=True), [TargetLeakageCheck()], loader=loader, root=tmp_path, max_steps=1
    )
    assert findings(healthy) == []
    leaky = fit(
        _LabelsFromInputs(shift=False), [TargetLeakageCheck()], loader=loader, root=tmp_path, max_steps=1
    )
    [finding] = findings(leaky)
    assert finding.check == "target-leakage" and finding.where.startswith("batch['input_ids'] (as labels)")


# ---------------------------------------------------------------------- other faults on HF batches
def test_labels_shuffled_against_a_bert_classifiers_texts_are_found(tmp_path):
    train, _ = zoo_hf.topic_classification_loaders(n=320, permute_labels=True)
    trainer = fit(
        zoo_hf.HFModule(zoo_hf.tiny_bert_classifier()),
        [LabelShuffleCheck(max_seconds=120.0)],
        loader=train,
        root=tmp_path,
        max_steps=1,
    )
    assert _found(trainer) == [("model-ignores-input", "error", "batch['labels']")]


class _WhitenedWithForward(zoo_hf.BatchWhitenedClassifier):
    """The batch-statistics pooler, behind a ``forward(**batch)`` returning an object with ``.logits``."""

    def forward(self, **batch: Tensor) -> Any:
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=self._logits(batch))


@pytest.mark.parametrize("module", [zoo_hf.BatchWhitenedClassifier, _WhitenedWithForward])
def test_a_pooler_with_batch_statistics_is_batch_mixing(tmp_path, module):
    train, _ = zoo_hf.topic_classification_loaders(n=320)
    trainer = fit(module(), [BatchIndependenceCheck()], loader=train, root=tmp_path, max_steps=1)
    [finding] = findings(trainer)
    assert (finding.check, finding.severity.value, finding.where) == (
        "batch-mixing",
        "error",
        "batch['input_ids']",
    )
    via = (
        "embedding `model.embeddings.word_embeddings`"
        if module is _WhitenedWithForward
        else "perturbing sample 15"
    )
    assert via in finding.message


# ---------------------------------------------------------------------- a frozen fine-tune
def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 2000)


class _WarmedUpFineTune(zoo_hf.HFModule):
    """The frozen-backbone fine-tune with a 2000-step linear warm-up, stepped every step (as
    ``get_linear_schedule_with_warmup`` is used): the trials' budget ends while the learning rate is still tiny."""

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_frozen_batch_norm_backbone_stays_frozen_in_the_trials(tmp_path):
    network = zoo_hf.pretrained_frozen_resnet(steps=40)
    train, _ = zoo_hf.digit_image_loaders()
    module = zoo_hf.HFModule(network, lr=1e-2, parameters="head")
    before = {name: value.clone() for name, value in network.resnet.state_dict().items()}
    trainer = fit(
        module,
        [OverfitBatchCheck(max_seconds=120.0), LabelShuffleCheck(max_seconds=120.0)],
        loader=train,
        root=tmp_path,
        max_steps=3,
    )
    assert _found(trainer) == []
    assert not network.resnet.training  # the user's eval mode is kept
    assert all(torch.equal(before[name], value) for name, value in network.resnet.state_dict().items())


def test_a_frozen_fine_tune_the_trials_cannot_judge_is_inconclusive_not_an_error(tmp_path):
    network = zoo_hf.pretrained_frozen_resnet(steps=40)
    train, _ = zoo_hf.digit_image_loaders()
    module = _WarmedUpFineTune(network, lr=1e-2, parameters="head")
    trainer = fit(
        module,
        [OverfitBatchCheck(max_seconds=120.0), LabelShuffleCheck(max_seconds=120.0)],
        loader=train,
        root=tmp_path,
        max_steps=1,
    )
    found = findings(trainer)
    assert found and {f.severity.value for f in found} == {"info"}, _found(trainer)
    assert all("inconclusive" in f.message and "max_steps" in f.hint for f in found)


# ---------------------------------------------------------------------- the zoo's HF cases
@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "hf-gpt2-lm",
        "hf-bert-decoder-lm",
        "hf-bert-sequence-classifier",
        "hf-bert-token-classifier",
        "hf-resnet-frozen-finetune",
        "hf-gpt2-unshifted-labels",
        "hf-bert-decoder-not-causal",
        "hf-bert-permuted-labels",
        "hf-bert-batch-whitened-pooler",
    ],
)
def test_harness_hf_cases(name, tmp_path):
    from benchmarks.detection.cases import get_case
    from benchmarks.detection.runner import run_case

    case = get_case(name)
    result = run_case(case, root_dir=str(tmp_path))
    assert result.verdict == "ok", (result.verdict, result.reported, result.error)
    assert case.healthy or set(result.reported) & case.expected
