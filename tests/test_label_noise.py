"""LabelNoiseMonitor: the pure rule, noisy and clean labels on a real Trainer, what it leaves alone, resume."""

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sentinel import LabelNoiseMonitor, Sentinel, findings
from lightning_sentinel.checks.label_noise import (
    LabelCounts,
    flattened_from_sequence,
    label_counts,
    pool_recent,
    vocabulary_sizes,
)

NOISY = "noisy-labels"


def clusters_loader(
    noise: float = 0.0, classes: int = 10, n: int = 1024, seed: int = 0, batch_size: int = 64
) -> DataLoader:
    """``classes`` well separated Gaussian clusters in 16 dimensions; ``noise`` of the labels moved to another class."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 16, generator=generator) * 3
    y = torch.randint(classes, (n,), generator=generator)
    x = centers[y] + torch.randn(n, 16, generator=generator)
    moved = torch.rand(n, generator=generator) < noise
    shift = torch.randint(1, classes, (n,), generator=generator)
    y = torch.where(moved, (y + shift) % classes, y)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)


def _net(classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, classes))


def _own(trainer):
    return [finding for finding in findings(trainer) if finding.check == NOISY]


# ---------------------------------------------------------------------- pure rule and device counts
def test_pool_recent_takes_the_newest_batches_until_it_has_enough():
    history = [LabelCounts(64, 60, 0), LabelCounts(64, 50, 10), LabelCounts(64, 52, 12)]
    pooled = pool_recent(history, min_batches=2, min_samples=128)
    assert (pooled.batches, pooled.labelled, pooled.contradicted) == (2, 128, 22)
    assert pooled.contradicted_share == pytest.approx(22 / 128) and pooled.accuracy == pytest.approx(
        102 / 128
    )
    assert pool_recent(history, min_batches=2, min_samples=129).batches == 3  # small batches: more of them
    assert pool_recent(history, min_batches=4, min_samples=1) is None
    assert pool_recent(history, min_batches=1, min_samples=193) is None
    assert LabelCounts(0, 0, 0).accuracy == 0.0 == LabelCounts(0, 0, 0).contradicted_share


def test_label_counts_read_logits_and_log_probabilities_alike():
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0]])
    targets = torch.tensor([0, 1, 2, -100])
    assert label_counts(logits, targets, -100, 0.05).tolist() == [3.0, 2.0, 1.0]
    assert label_counts(logits.log_softmax(1), targets, -100, 0.05).tolist() == [3.0, 2.0, 1.0]
    assert label_counts(logits, torch.tensor([0, 1, 2, 1]), 1, 0.05).tolist() == [2.0, 2.0, 0.0]


@pytest.mark.parametrize(
    ("argument", "value"),
    [("low_probability", 1.0), ("max_share", 0.0), ("min_accuracy", 1.5), ("window", 0), ("min_classes", 2)],
)
def test_bad_settings_name_the_argument(argument, value):
    with pytest.raises(ValueError, match=argument):
        LabelNoiseMonitor(**{argument: value})


# ---------------------------------------------------------------------- on a Trainer
def _fit_on_clusters(root, noise, monitor=None, max_steps=120):
    """An Adam MLP on the cluster data with a share ``noise`` of wrong labels, watched by ``monitor``."""
    return fit(
        Classifier(_net(), lr=1e-2, optimizer="adam"),
        [monitor if monitor is not None else LabelNoiseMonitor(every_n_steps=4)],
        root=root,
        max_steps=max_steps,
        loader=clusters_loader(noise=noise),
    )


def test_wrong_labels_are_reported_and_clean_ones_are_not(tmp_path):
    found = _own(_fit_on_clusters(tmp_path / "noisy", noise=0.3))
    assert [finding.check for finding in found] == [NOISY]
    assert found[0].where == "F.cross_entropy in training_step"
    assert 0.1 <= found[0].evidence["contradicted_share"] <= 0.35
    assert found[0].evidence["accuracy"] >= 0.5
    assert _own(_fit_on_clusters(tmp_path / "clean", noise=0.0)) == []


class _Mixup(Classifier):
    """Mixup written as two losses on one prediction: the minor label set is mostly contradicted."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        order = torch.randperm(len(y))
        lam = float(torch.distributions.Beta(0.4, 0.4).sample())
        logits = self(lam * x + (1 - lam) * x[order])
        return lam * nn.functional.cross_entropy(logits, y) + (1 - lam) * nn.functional.cross_entropy(
            logits, y[order]
        )


def test_small_batches_pool_more_of_them(tmp_path):
    trainer = fit(
        Classifier(_net(), lr=3e-3, optimizer="adam"),
        [LabelNoiseMonitor(every_n_steps=2)],
        root=tmp_path,
        max_steps=240,
        loader=clusters_loader(noise=0.3, batch_size=16),
    )
    found = _own(trainer)
    assert [finding.check for finding in found] == [NOISY]
    assert found[0].evidence["labels"] >= 256 and found[0].evidence["sampled_batches"] >= 16


def test_mixup_with_two_label_sets_stays_quiet(tmp_path):
    trainer = fit(
        _Mixup(_net(), lr=1e-2, optimizer="adam"),
        [LabelNoiseMonitor(every_n_steps=2)],
        root=tmp_path,
        max_steps=120,
        loader=clusters_loader(),
    )
    assert _own(trainer) == []


def test_two_classes_and_token_labels_are_never_judged(tmp_path):
    calls = []

    class Spy(LabelNoiseMonitor):
        def _judge_calls(self, trainer, recorder, batch_idx):
            calls.extend(recorder.calls)
            super()._judge_calls(trainer, recorder, batch_idx)

    class Tokens(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            binary = nn.functional.cross_entropy(logits[:, :2], (y % 2))
            tokens = nn.functional.cross_entropy(
                logits.unsqueeze(2).expand(-1, -1, 3), y.unsqueeze(1).expand(-1, 3)
            )
            return binary + tokens

    trainer = fit(
        Tokens(_net(), lr=1e-2, optimizer="adam"),
        [Spy()],
        root=tmp_path,
        max_steps=20,
        loader=clusters_loader(),
    )
    assert calls == [] and _own(trainer) == []


class _ColumnLabels(Classifier):
    """Labels kept as an (N, 1) column and viewed as (N,) in the step: still one label per sample."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        column = y.unsqueeze(1).clone()
        return nn.functional.cross_entropy(self(x), column.view(-1))


def test_labels_viewed_from_a_column_are_still_judged(tmp_path):
    trainer = fit(
        _ColumnLabels(_net(), lr=1e-2, optimizer="adam"),
        [LabelNoiseMonitor(every_n_steps=4)],
        root=tmp_path,
        max_steps=120,
        loader=clusters_loader(noise=0.3),
    )
    assert [f.where for f in _own(trainer)] == ["F.cross_entropy in training_step"]


def test_the_window_survives_a_resume(tmp_path):
    monitor = LabelNoiseMonitor(every_n_steps=4)
    _fit_on_clusters(tmp_path, noise=0.3, monitor=monitor, max_steps=60)
    restored = LabelNoiseMonitor(every_n_steps=4)
    restored.load_state_dict(monitor.state_dict())
    assert restored._history == monitor._history and restored._history
    assert restored._batches_seen == 60


# ---------------------------------------------------------------------- language models and token targets
class _CausalLM(pl.LightningModule):
    """A tiny ``GPT2LMHeadModel`` (random weights) on dict batches; the model shifts the labels itself."""

    def __init__(self):
        super().__init__()
        from benchmarks.detection.zoo_lm_rules import tiny_gpt2

        self.model = tiny_gpt2(vocab=32, length=24, width=32, layers=1)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _text_loader():
    from benchmarks.detection.zoo_lm_rules import markov_text_loaders

    return markov_text_loaders(n=1024, length=24, vocab=32, batch_size=16)[0]


def _fit_lm(root, callbacks, max_steps=90):
    return fit(_CausalLM(), callbacks, root=root, max_steps=max_steps, loader=_text_loader())


@pytest.mark.parametrize("preset", ["fast", "full"])
def test_a_healthy_causal_lm_is_quiet_on_labels_and_loss_at_init(tmp_path, preset):
    pytest.importorskip("transformers")
    trainer = _fit_lm(tmp_path, [Sentinel(preset=preset)])
    assert [f for f in findings(trainer) if f.check in (NOISY, "loss-at-init")] == []


def test_next_token_targets_judged_as_annotations_would_be_noisy(tmp_path, monkeypatch):
    """Without the language-model exclusion the healthy LM above alarms: the test above can fail."""
    pytest.importorskip("transformers")
    from lightning_sentinel.checks import label_noise

    monkeypatch.setattr(label_noise, "flattened_from_sequence", lambda scores, targets: False)
    monkeypatch.setattr(label_noise, "vocabulary_sizes", lambda module: frozenset())
    found = _own(_fit_lm(tmp_path, [LabelNoiseMonitor(every_n_steps=2)]))
    assert [f.where for f in found] == ["F.cross_entropy in fixed_cross_entropy"]
    assert found[0].evidence["contradicted_share"] > 0.2


class _NextTokenOfWindow(Classifier):
    """A window of 8 token ids -> the next token (one label per sample), classes = the embedding's rows."""

    def __init__(self, vocab=32):
        super().__init__(net=nn.Sequential(nn.Embedding(vocab, 16), nn.Flatten(), nn.Linear(8 * 16, vocab)))


def test_a_language_model_over_its_input_vocabulary_is_not_judged(tmp_path):
    calls = []

    class Spy(LabelNoiseMonitor):
        def _judge_calls(self, trainer, recorder, batch_idx):
            calls.extend(recorder.calls)
            super()._judge_calls(trainer, recorder, batch_idx)

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (512, 9), generator=generator)
    loader = DataLoader(TensorDataset(tokens[:, :8], tokens[:, 8]), batch_size=64, shuffle=True)
    trainer = fit(_NextTokenOfWindow(), [Spy(every_n_steps=2)], root=tmp_path, max_steps=12, loader=loader)
    assert calls == [] and _own(trainer) == []


def test_flattened_sequence_scores_are_recognised():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    assert flattened_from_sequence(logits.float().view(-1, 7), labels.view(-1))  # as Hugging Face flattens
    assert flattened_from_sequence(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert flattened_from_sequence(logits.flatten(0, 1).double(), labels.flatten())
    assert not flattened_from_sequence(torch.randn(10, 7, requires_grad=True) + 0, torch.randint(0, 7, (10,)))
    # one label per sample: labels kept as (N, 1), scores as (N, 1, C), a selected position
    column = torch.randint(0, 7, (10, 1))
    assert not flattened_from_sequence(torch.randn(10, 7, requires_grad=True) * 2, column.view(-1))
    assert not flattened_from_sequence(torch.randn(10, 7, requires_grad=True) * 2, column.squeeze(1))
    assert not flattened_from_sequence(
        (torch.randn(10, 1, 7, requires_grad=True) * 2).view(-1, 7), column.view(-1)
    )
    assert not flattened_from_sequence((logits * 2)[:, 0], labels[:, 0])
    assert vocabulary_sizes(nn.Sequential(nn.Embedding(30, 4), nn.Linear(4, 3))) == frozenset({30})
