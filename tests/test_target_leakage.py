"""TargetLeakageCheck: pure rules, unshifted decoders caught and named, shifted ones and classifiers silent."""

import random
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import Classifier, classification_loader, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.detection import zoo, zoo_mixing
from benchmarks.detection.cases import get_case
from benchmarks.detection.runner import run_case
from lightning_sentinel import findings
from lightning_sentinel.checks.target_leakage import (
    TargetLeakageCheck,
    leaked_change,
    perturb_one_per_sample,
    replace_targets,
    scored_outputs,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models slow down many times with two threads on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _leaks(trainer):
    return [f for f in findings(trainer) if f.check == "target-leakage"]


def test_perturbation_changes_exactly_one_valid_element_per_sample():
    tokens = torch.randint(2, 12, (16, 8))
    tokens[3, :] = -100  # ignore_index rows stay as they are
    changed = perturb_one_per_sample(tokens) != tokens
    assert changed.sum(dim=1).tolist() == [0 if i == 3 else 1 for i in range(16)]
    assert set(perturb_one_per_sample(tokens)[tokens >= 0].tolist()) <= set(tokens[tokens >= 0].tolist())
    floats = torch.randn(5, 3)
    assert ((perturb_one_per_sample(floats) != floats).sum(dim=1) == 1).all()
    assert perturb_one_per_sample(torch.tensor([True, False])).tolist() == [False, True]
    probabilities = torch.rand(8, 4)
    perturbed = perturb_one_per_sample(probabilities)  # BCE targets stay inside [0, 1]
    assert (
        ((perturbed != probabilities).sum(dim=1) == 1).all() and perturbed.min() >= 0 and perturbed.max() <= 1
    )


def test_scored_outputs_and_change():
    assert scored_outputs(F.cross_entropy, torch.zeros(6, 4), torch.zeros(6, dtype=torch.long)).shape == (
        6,
        4,
    )
    assert scored_outputs(F.mse_loss, torch.zeros(3, 2), torch.zeros(3, 2)).shape == (3, 2)
    assert scored_outputs(F.cross_entropy, torch.zeros(6, 4), torch.zeros(3, dtype=torch.long)) is None
    before = torch.zeros(2, 3, 4)
    after = before.clone()
    after[1, 2, 0] = 0.5
    changed = torch.zeros(2, 3, dtype=torch.bool)
    changed[1, 2] = changed[0, 0] = True
    changes, scale = leaked_change(before, after, changed)
    assert changes.tolist() == [0.0, 0.5] and scale.item() == 0.0


def test_replace_targets_keeps_the_batch_type():
    Pair = namedtuple("Pair", "x y")
    replaced = replace_targets(Pair(torch.zeros(2), torch.zeros(2)), torch.ones(2))
    assert isinstance(replaced, Pair) and replaced.y.tolist() == [1.0, 1.0]
    assert replace_targets([1, 2, 3], torch.ones(1), target_key=2)[2].tolist() == [1.0]
    with pytest.raises(TypeError):
        replace_targets(object(), torch.ones(1))


@pytest.mark.parametrize("kwargs", [{"target_key": 1.0}, {"tolerance": -1.0}, {"on_detect": "x"}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TargetLeakageCheck(**kwargs)


@pytest.mark.parametrize("net", [zoo_mixing.GRUSeq2Seq, zoo_mixing.TransformerSeq2Seq])
def test_unshifted_decoder_is_caught_and_shifted_is_silent(net, tmp_path):
    loader, _ = zoo_mixing.reversal_loaders(n=64, batch_size=16)
    torch.manual_seed(0)
    trainer = fit(
        zoo_mixing.Seq2SeqModule(net(), shift=True),
        [TargetLeakageCheck()],
        loader,
        root=tmp_path,
        max_steps=1,
    )
    assert findings(trainer) == []
    torch.manual_seed(0)
    trainer = fit(
        zoo_mixing.Seq2SeqModule(net(), shift=False),
        [TargetLeakageCheck()],
        loader,
        root=tmp_path,
        max_steps=1,
    )
    [finding] = _leaks(trainer)
    assert finding.severity.value == "error" and finding.step == 0
    assert finding.where == "batch[1] -> cross_entropy input (128, 12)"
    assert finding.evidence["leaked_positions"] == finding.evidence["perturbed_positions"] == 16
    assert finding.evidence["first_leaked_sample"] == 0 and finding.evidence["first_leaked_position"] == 4
    assert "shift" in finding.hint


def test_classifiers_and_regression_are_silent(tmp_path):
    trainer = fit(
        Classifier(), [TargetLeakageCheck()], root=tmp_path, max_steps=2
    )  # its self.log still works
    assert findings(trainer) == []
    loader, _ = zoo.diabetes_loaders(batch_size=32, dict_batches=True)
    trainer = fit(
        zoo.ZooModule(zoo.mlp([10, 16, 1]), nn.MSELoss()),
        [TargetLeakageCheck()],
        loader,
        root=tmp_path,
        max_steps=2,
    )
    assert findings(trainer) == []


class _LabelAsFeature(Classifier):
    """A classifier that, by mistake, appends its label to the features (a leak without any sequence)."""

    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(torch.cat([x, y[:, None].float()], dim=1)), y)
        self.log("train_loss", loss)
        return loss


def test_a_label_fed_as_a_feature_is_caught(tmp_path):
    trainer = fit(_LabelAsFeature(), [TargetLeakageCheck()], root=tmp_path, max_steps=1)
    [finding] = _leaks(trainer)
    assert finding.where == "batch[1] -> cross_entropy input (32, 3)"


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

    plain, checked = run([]), run([TargetLeakageCheck()])
    assert all(torch.equal(a, b) for a, b in zip(plain[0], checked[0], strict=True))
    assert torch.equal(plain[1], checked[1]) and plain[2:] == checked[2:]


class _Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_what_cannot_be_checked_gives_one_info_and_never_raises(tmp_path):
    check = TargetLeakageCheck(on_detect="raise")
    trainer = fit(_Manual(), [check], root=tmp_path, max_steps=2)
    [finding] = _leaks(trainer)
    assert finding.severity.value == "info" and "manual optimization" in finding.message
    assert finding.message.startswith("target-leakage check skipped") and "target_key=" in finding.hint
    restored = TargetLeakageCheck(on_detect="raise")
    restored.load_state_dict(check.state_dict())
    assert restored._done

    class _Inputs(Classifier):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

    loader = DataLoader(TensorDataset(torch.randn(64, 8)), batch_size=16)
    trainer = fit(_Inputs(), [TargetLeakageCheck(on_detect="raise")], loader, root=tmp_path, max_steps=1)
    assert [f.severity.value for f in _leaks(trainer)] == ["info"]


@pytest.mark.parametrize("name", ["transformer-seq2seq-unshifted"])
def test_harness_cases(name, tmp_path):
    result = run_case(get_case(name), root_dir=str(tmp_path))
    assert result.verdict == "ok", result
    assert "target-leakage" in result.reported and result.first_detection_step == 0
