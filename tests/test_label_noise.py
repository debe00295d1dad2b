"""LabelNoiseMonitor: the pure rule, noisy and clean labels on a real Trainer, what it leaves alone, resume."""

import pytest
import torch
from _models import Classifier, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sentinel import LabelNoiseMonitor, findings
from lightning_sentinel.checks.label_noise import LabelCounts, label_counts, pool_recent

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


def test_the_window_survives_a_resume(tmp_path):
    monitor = LabelNoiseMonitor(every_n_steps=4)
    _fit_on_clusters(tmp_path, noise=0.3, monitor=monitor, max_steps=60)
    restored = LabelNoiseMonitor(every_n_steps=4)
    restored.load_state_dict(monitor.state_dict())
    assert restored._history == monitor._history and restored._history
    assert restored._batches_seen == 60
