"""BatchIndependenceCheck: the pure rule, mixing bugs caught and named, healthy models silent, the real run untouched."""

import random

import numpy as np
import pytest
import torch
from _models import Classifier, classification_loader, fit
from torch import nn

from benchmarks.detection import zoo, zoo_mixing
from benchmarks.detection.cases import get_case
from benchmarks.detection.runner import run_case
from lightning_sentinel import findings
from lightning_sentinel.checks._copy_probe import differentiable_in_eval
from lightning_sentinel.checks.batch_mixing import BatchIndependenceCheck, leaking_samples, per_sample_norms


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models slow down many times with two threads on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _mixing(trainer):
    return [f for f in findings(trainer) if f.check == "batch-mixing"]


def test_rule():
    assert leaking_samples([0.0, 2.0, 0.0], sample=1) == []
    assert leaking_samples([0.5, 2.0, 1e-9, 0.1], sample=1) == [0, 3]
    assert leaking_samples([0.0, 0.0], sample=0) == []  # no gradient at all: not this check's business
    assert leaking_samples([float("nan"), 1.0, 0.0], sample=1) == []
    norms = per_sample_norms([torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[0.0], [2.0]])])
    assert norms.tolist() == [5.0, 2.0]


@pytest.mark.parametrize(
    "kwargs", [{"input_key": 1.5}, {"sample_index": -1}, {"tolerance": 0.0}, {"on_detect": "explode"}]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BatchIndependenceCheck(**kwargs)


def test_healthy_models_are_silent(tmp_path):
    digits, _ = zoo.digits_loaders(batch_size=32, images=True, dict_batches=True)
    trainer = fit(
        zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss()),
        [BatchIndependenceCheck()],
        digits,
        root=tmp_path,
        max_steps=2,
    )  # batch-norm mixes in train mode; the check runs in eval mode
    assert findings(trainer) == []
    tokens, _ = zoo.token_count_loaders(batch_size=16)
    trainer = fit(
        zoo.ZooModule(zoo.BagOfEmbeddings(vocab=30), nn.CrossEntropyLoss()),
        [BatchIndependenceCheck()],
        tokens,
        root=tmp_path,
        max_steps=2,
    )
    assert findings(trainer) == []


def test_reshape_bug_is_caught_and_named(tmp_path):
    digits, _ = zoo.digits_loaders(batch_size=32)
    module = zoo.ZooModule(zoo_mixing.ReshapeMixMLP(), nn.CrossEntropyLoss())
    trainer = fit(module, [BatchIndependenceCheck()], digits, root=tmp_path, max_steps=3)
    [finding] = _mixing(trainer)
    assert finding.severity.value == "error" and finding.where == "batch[0]" and finding.step == 0
    assert finding.evidence["sample"] == 31 and finding.evidence["leaked_samples"] >= 1
    assert finding.evidence["leaked_grad_norm"] > 0 and "reshape" in finding.hint


class _TokenMixer(nn.Module):
    """Embedding, then a 'normalisation' over dim 0 (the batch) by mistake."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        hidden = self.embed(tokens).mean(dim=1)
        return self.head(hidden - hidden.mean(dim=0))


def test_token_inputs_are_checked_through_the_embedding(tmp_path):
    tokens, _ = zoo.token_count_loaders(batch_size=16)
    check = BatchIndependenceCheck(sample_index=3)
    trainer = fit(
        zoo.ZooModule(_TokenMixer(), nn.CrossEntropyLoss()), [check], tokens, root=tmp_path, max_steps=2
    )
    [finding] = _mixing(trainer)
    assert finding.where == "batch[0]" and "embedding `net.embed`" in finding.message
    assert finding.evidence["sample"] == 3 and finding.evidence["leaked_samples"] == 15


def test_the_real_run_is_untouched(tmp_path):
    def run(callbacks):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        module = Classifier(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)))
        fit(module, callbacks, classification_loader(), root=tmp_path, max_steps=3)
        return (
            [p.detach().clone() for p in module.parameters()],
            torch.rand(1),
            np.random.rand(),
            random.random(),
        )

    plain, checked = run([]), run([BatchIndependenceCheck()])
    assert all(torch.equal(a, b) for a, b in zip(plain[0], checked[0], strict=True))
    assert torch.equal(plain[1], checked[1]) and plain[2:] == checked[2:]  # torch, numpy, python RNG


class _TwoInputs(zoo_mixing.Seq2SeqModule):
    pass


class _MixedSeq2Seq(zoo_mixing.Seq2SeqModule):
    """A seq2seq model whose decoder input is, by mistake, rolled along the batch (sample i decodes with
    sample i-1's target)."""

    def training_step(self, batch, batch_idx):
        source, target = batch
        start = torch.full_like(target[:, :1], zoo_mixing.BOS)
        decoder_input = torch.cat([start, source.roll(1, dims=0)[:, :-1]], dim=1)  # the bug: roll over dim 0
        logits = self(source, decoder_input)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def test_a_forward_that_needs_two_inputs_is_probed_through_training_step(tmp_path):
    loader, _ = zoo_mixing.reversal_loaders(n=64, batch_size=16)
    check = BatchIndependenceCheck(on_detect="raise")
    trainer = fit(_TwoInputs(zoo_mixing.GRUSeq2Seq()), [check], loader, root=tmp_path, max_steps=2)
    assert _mixing(trainer) == []  # forward(source, decoder_input): perturbation through training_step, quiet
    restored = BatchIndependenceCheck(on_detect="raise")
    restored.load_state_dict(check.state_dict())
    assert restored._done
    trainer = fit(_MixedSeq2Seq(zoo_mixing.GRUSeq2Seq()), [BatchIndependenceCheck()], loader, root=tmp_path)
    [finding] = _mixing(trainer)
    assert finding.severity.value == "error" and finding.where == "batch[0]"
    assert "perturbing sample 15" in finding.message and finding.evidence["first_leaked_sample"] == 0


class _NoInterceptedLoss(_TwoInputs):
    def training_step(self, batch, batch_idx):
        source, target = batch
        logits = self(source, target)
        return -(logits.log_softmax(-1).gather(-1, target[..., None])).mean()  # a loss by hand


def test_what_cannot_be_probed_gives_one_info(tmp_path):
    loader, _ = zoo_mixing.reversal_loaders(n=64, batch_size=16)
    trainer = fit(
        _NoInterceptedLoss(zoo_mixing.GRUSeq2Seq()),
        [BatchIndependenceCheck(on_detect="raise")],
        loader,
        root=tmp_path,
        max_steps=2,
    )
    [finding] = _mixing(trainer)
    assert finding.severity.value == "info" and "forward" in finding.message
    assert finding.message.startswith("batch-independence check skipped") and "input_key=" in finding.hint


@pytest.mark.parametrize("name", ["reshape-mixes-batch-mlp", "gru-not-batch-first"])
def test_harness_cases(name, tmp_path):
    result = run_case(get_case(name), root_dir=str(tmp_path))
    assert result.verdict == "ok", result
    assert "batch-mixing" in result.reported and result.first_detection_step == 0


def test_the_probe_of_a_recurrent_model_runs_without_cudnn():
    """cuDNN's RNN kernels refuse backward in eval mode: the probe switches cuDNN off for recurrent models only
    (the CUDA run itself: ``test_cuda.py``)."""
    assert torch.backends.cudnn.enabled
    with differentiable_in_eval(nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4))):
        assert not torch.backends.cudnn.enabled
    assert torch.backends.cudnn.enabled
    with differentiable_in_eval(nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(4, 4))):
        assert torch.backends.cudnn.enabled
