"""BatchInspector: the batch convention, the pure rules, each fault on a tiny run, quiet healthy runs."""

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, MetricsRecorder, classification_loader, fit
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.detection.cases import get_case
from benchmarks.detection.runner import run_case
from lightning_sentinel import SentinelError, Severity, findings
from lightning_sentinel.checks import data
from lightning_sentinel.checks._batch_split import split_batch
from lightning_sentinel.checks._batch_stats import FeatureMoments, fingerprint
from lightning_sentinel.checks.data import (
    BatchInspector,
    imbalance_ratio,
    shifted_features,
    single_label_verdict,
    unnormalized_features,
)

DATA_CHECKS = set(BatchInspector.CHECKS)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models slow down many times with two threads on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _mine(trainer, severities=(Severity.WARNING, Severity.ERROR)):
    return [f for f in findings(trainer) if f.check in DATA_CHECKS and f.severity in severities]


def _loader(x, y, batch_size=32, shuffle=True):
    return DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(0),
    )


def _blobs(n=512, features=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


# ====================================================================== pure parts
def test_split_batch_conventions():
    x, y = torch.zeros(4, 3), torch.zeros(4)
    assert split_batch((x, y)).input_name == "batch[0]"
    assert split_batch([x, y, x]).target_name == "batch[1]"
    parts = split_batch({"image": x, "labels": y})
    assert (parts.input_name, parts.target_name) == ("batch['image']", "batch['labels']")
    assert split_batch(x).targets is None
    assert (
        split_batch({"pixels": x, "cls": y}, input_key="pixels", target_key="cls").target_name
        == "batch['cls']"
    )
    assert split_batch((y, x), input_key=1, target_key=0).input_name == "batch[1]"
    assert (
        split_batch(SimpleNamespace(src=x, tgt=y), input_key="src", target_key="tgt").input_name
        == "batch.src"
    )
    assert (
        "none of the input names" in split_batch({"a": x}).reason
        and "input_key" in split_batch({"a": x}).reason
    )
    assert split_batch(object()).reason
    assert "not a tensor" in split_batch({"x": [1, 2]}).reason
    assert split_batch(([x], y)).input_name == "batch[0][0]"  # nested: the first tensor of the inputs


def test_moments_merge_like_one_pass_and_skip_non_finite_batches():
    data = torch.randn(300, 5) * 3 + 7
    moments = FeatureMoments()
    for chunk in data.split(64):
        moments.update(chunk)
    moments.update(torch.full((8, 5), float("nan")))
    torch.testing.assert_close(moments.mean, data.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments.std, data.std(0, correction=0), rtol=1e-4, atol=1e-4)
    images = torch.rand(6, 3, 4, 4)
    per_channel = FeatureMoments()
    per_channel.update(images)
    assert per_channel.features == 3


def test_fingerprint_is_order_free_and_content_sensitive():
    x = torch.randn(16, 10)
    assert torch.equal(fingerprint(x), fingerprint(x[torch.randperm(16)])) or torch.allclose(
        fingerprint(x), fingerprint(x[torch.randperm(16)])
    )
    y = x.clone()
    y[3, 4] += 1e-2
    assert not torch.allclose(fingerprint(x), fingerprint(y), rtol=1e-5, atol=1e-8)


def test_unnormalized_rule():
    assert unnormalized_features([0.0, 0.1], [1.0, 0.9], [3.0, 3.0], 5, 5, 0.01) == []
    assert unnormalized_features([0.0, 130.0], [1.0, 70.0], [3.0, 255.0], 5, 5, 0.01) == [1]
    assert unnormalized_features([4.9], [6.0], [16.0], 5, 5, 0.01) == [0]  # 0..16 pixels: std 6
    assert unnormalized_features([0.0, 3.0], [0.0, 0.0], [0.0, 3.0], 5, 5, 0.01) == []  # constant: not scale
    tiny = unnormalized_features([0.002] * 3 + [0.0], [0.001] * 3 + [1.0], [0.004] * 3 + [2.0], 5, 5, 0.01)
    assert tiny == [0, 1, 2]
    assert unnormalized_features([0.002, 0.0, 0.0], [0.001, 1.0, 1.0], [0.004, 2, 2], 5, 5, 0.01) == []
    assert unnormalized_features([float("nan")], [1.0], [1.0], 5, 5, 0.01) == []


def test_shift_rule():
    assert shifted_features([0.0, 0.0], [1.0, 1.0], [0.5, -0.4], [1.2, 0.8], 3.0) == []
    assert shifted_features([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [4.0, 0.0, 0.0], [1.0, 4.0, 0.2], 3.0) == [
        0,
        1,
        2,
    ]
    assert shifted_features([2.0], [0.0], [50.0], [9.0], 3.0) == []  # constant in training


def test_label_rules():
    sorted_window = [(1, 0, 64), (1, 0, 64), (1, 1, 64), (2, 1, 64), (1, 2, 64)]
    assert single_label_verdict(sorted_window, [128.0, 128.0, 64.0], 3)[0]
    dominant = [(1, 0, 16)] * 5
    assert not single_label_verdict(dominant, [800.0, 16.0], 3)[0]  # one class only: imbalance, not order
    tiny_batches = [(1, 0, 2), (1, 1, 2), (1, 0, 2), (2, 0, 2)]
    assert not single_label_verdict(tiny_batches, [10.0, 10.0], 3)[0]  # batches of 2: chance
    assert imbalance_ratio([500.0, 10.0, 0.0]) == (50.0, 0, 1)
    assert math.isnan(imbalance_ratio([5.0, 0.0])[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_steps": 0},
        {"window_batches": 0},
        {"input_key": 1.5},
        {"target_key": True},
        {"mean_bound": -1.0},
        {"imbalance_ratio": 1.0},
        {"shift_std": 0.5},
        {"shift_fraction": 0.0},
        {"min_samples": 0},
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BatchInspector(**kwargs)


# ====================================================================== tiny runs
class DictClassifier(Classifier):
    """The test classifier reading ``{"pixels", "cls"}`` (or any given keys) dict batches."""

    def __init__(self, input_key="pixels", target_key="cls", **kwargs):
        super().__init__(**kwargs)
        self.keys = (input_key, target_key)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[self.keys[0]]), batch[self.keys[1]])


class TokenClassifier(Classifier):
    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 6, 3)))


def _dict_loader(x, y, keys=("pixels", "cls"), batch_size=32):
    rows = [{keys[0]: a, keys[1]: b} for a, b in zip(x, y, strict=True)]
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_healthy_runs_are_silent(tmp_path):
    inspector = BatchInspector(every_n_steps=1)
    recorder = MetricsRecorder()
    trainer = fit(
        Classifier(),
        [inspector],
        classification_loader(n=512),
        root=tmp_path,
        max_steps=60,
        logger=[CSVLogger(tmp_path), recorder],
    )
    assert findings(trainer) == []
    assert 0.5 < recorder.metrics["sentinel/data/input_std_max"] < 2
    assert inspector._train_samples > 256 and inspector._labels_usable  # it did look
    # integer token ids (skipped by the scale checks), bf16-mixed and gradient accumulation
    tokens = torch.randint(0, 20, (512, 6), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, 0] % 3
    trainer = fit(
        TokenClassifier(),
        [BatchInspector(every_n_steps=1)],
        _loader(tokens, labels, batch_size=16),
        root=tmp_path,
        max_steps=20,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
    )
    assert findings(trainer) == []


def test_unnormalized_pixels_are_named(tmp_path):
    x, y = _blobs()
    pixels = (x * 40 + 120).clamp(0, 255)  # 0..255 grey levels
    trainer = fit(Classifier(lr=1e-4), [BatchInspector()], _loader(pixels, y), root=tmp_path, max_steps=40)
    found = _mine(trainer)
    assert [f.check for f in found] == ["unnormalized-inputs"]
    assert found[0].where == "batch[0]"
    assert found[0].evidence["flagged"] == 8 and found[0].evidence["worst_mean"] > 100
    assert "standardize" in found[0].hint


def test_images_are_judged_per_channel(tmp_path):
    images = torch.rand(256, 3, 4, 4)
    images[:, 2] *= 255  # one channel left in bytes
    labels = torch.randint(0, 3, (256,), generator=torch.Generator().manual_seed(0))
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    trainer = fit(
        Classifier(net=net, lr=1e-4),
        [BatchInspector(every_n_steps=1)],
        _loader(images, labels),
        root=tmp_path,
        max_steps=10,
    )
    found = _mine(trainer)
    assert [(f.check, f.evidence["worst_index"], f.evidence["flagged"]) for f in found] == [
        ("unnormalized-inputs", 2.0, 1.0)
    ]
    assert "channel 2" in found[0].message


def test_zeroed_inputs_are_constant_not_repeated(tmp_path):
    _, y = _blobs()
    trainer = fit(
        Classifier(), [BatchInspector()], _loader(torch.zeros(512, 8), y), root=tmp_path, max_steps=25
    )
    assert [(f.check, f.where) for f in _mine(trainer)] == [("constant-inputs", "batch[0]")]
    assert "all zeros" in _mine(trainer)[0].message


def test_nan_in_the_data_is_reported_at_its_batch(tmp_path):
    x, y = _blobs()
    x[::7, 3] = float("nan")
    trainer = fit(Classifier(), [BatchInspector()], _loader(x, y), root=tmp_path, max_steps=5)
    found = _mine(trainer)
    assert found[0].check == "non-finite-inputs" and found[0].where == "batch[0]"
    assert found[0].step == 0 and found[0].severity == Severity.ERROR and found[0].evidence["non_finite"] >= 1
    # on_detect="raise" raises before the batch reaches the model
    with pytest.raises(SentinelError, match="non-finite-inputs"):
        fit(Classifier(), [BatchInspector(on_detect="raise")], _loader(x, y), root=tmp_path, max_steps=5)


def test_same_batch_every_step_and_full_batch_training(tmp_path):
    x, y = _blobs()
    same = DataLoader(TensorDataset(x[:32].repeat(16, 1), y[:32].repeat(16)), batch_size=32)
    trainer = fit(Classifier(), [BatchInspector()], same, root=tmp_path, max_steps=25)
    # the one batch the model sees also holds its classes 14:17:1, a true imbalance of what it trains on
    assert sorted((f.check, f.where) for f in _mine(trainer)) == [
        ("class-imbalance", "batch[1]"),
        ("repeated-batch", "batch[0]"),
    ]
    # one batch per epoch (full-batch gradient descent) repeats by design
    full = _loader(x[:64], y[:64], batch_size=64)
    trainer = fit(Classifier(), [BatchInspector(every_n_steps=1)], full, root=tmp_path, max_steps=25)
    assert _mine(trainer) == []


def test_label_sorted_data_without_shuffle(tmp_path):
    x, y = _blobs(n=768)
    order = torch.argsort(y, stable=True)
    loader = _loader(x[order], y[order], shuffle=False)
    trainer = fit(Classifier(), [BatchInspector()], loader, root=tmp_path, max_steps=40)
    found = _mine(trainer)
    assert [(f.check, f.where) for f in found] == [("single-label-batch", "batch[1]")]
    assert "shuffle=True" in found[0].hint


def test_imbalance_warns_without_and_informs_with_class_weights(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2040, 8, generator=generator)
    y = torch.cat([torch.zeros(2000), torch.ones(40)]).long()
    trainer = fit(Classifier(), [BatchInspector(every_n_steps=1)], _loader(x, y), root=tmp_path, max_steps=25)
    found = _mine(trainer)
    assert [(f.check, f.where) for f in found] == [("class-imbalance", "batch[1]")]
    assert found[0].evidence["ratio"] > 10 and found[0].evidence["majority_class"] == 0

    weighted = Classifier()
    weighted.criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 50.0, 1.0]))
    trainer = fit(weighted, [BatchInspector(every_n_steps=1)], _loader(x, y), root=tmp_path, max_steps=25)
    assert _mine(trainer) == []
    assert [f.severity for f in findings(trainer) if f.check == "class-imbalance"] == [Severity.INFO]


def test_dict_batches_custom_keys_and_unsplittable_layouts(tmp_path):
    x, y = _blobs()
    # the convention does not know "pixels"/"cls": one info finding, nothing else, no crash
    trainer = fit(DictClassifier(), [BatchInspector()], _dict_loader(x * 300, y), root=tmp_path, max_steps=25)
    assert [(f.check, f.severity, f.where) for f in findings(trainer)] == [
        ("unnormalized-inputs", Severity.INFO, "batch layout")
    ]
    assert "input_key" in findings(trainer)[0].hint
    # told where the inputs are, it finds the scale problem
    inspector = BatchInspector(input_key="pixels", target_key="cls", every_n_steps=1)
    trainer = fit(DictClassifier(), [inspector], _dict_loader(x * 300, y), root=tmp_path, max_steps=25)
    assert [(f.check, f.where) for f in _mine(trainer)] == [("unnormalized-inputs", "batch['pixels']")]
    # conventional keys need no settings
    module = DictClassifier(input_key="features", target_key="label")
    trainer = fit(
        module, [BatchInspector()], _dict_loader(x, y, ("features", "label")), root=tmp_path, max_steps=25
    )
    assert findings(trainer) == []


class ValClassifier(Classifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


def _val_trainer(tmp_path):
    return pl.Trainer(
        callbacks=[BatchInspector()],
        max_steps=32,
        val_check_interval=16,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )


def test_train_val_shift(tmp_path):
    x, y = _blobs(n=640)
    train = _loader(x[:512], y[:512])
    trainer = _val_trainer(tmp_path)
    trainer.fit(ValClassifier(), train, DataLoader(TensorDataset(x[512:] * 25 + 40, y[512:]), batch_size=64))
    found = _mine(trainer)
    assert [(f.check, f.where) for f in found] == [("train-val-shift", "batch[0]")]
    assert found[0].evidence["shifted"] == 8 and found[0].evidence["val_mean"] > 20
    # the same split, preprocessed alike: quiet
    trainer = _val_trainer(tmp_path)
    trainer.fit(ValClassifier(), train, DataLoader(TensorDataset(x[512:], y[512:]), batch_size=64))
    assert _mine(trainer) == []


def test_state_survives_a_checkpoint_resume(tmp_path):
    x, y = _blobs()
    inspector = BatchInspector(every_n_steps=1)
    trainer = fit(Classifier(), [inspector], _loader(x, y), root=tmp_path, max_steps=20)
    path = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(path)
    samples = inspector._train_samples
    counts = inspector._class_counts.clone()
    resumed = BatchInspector(every_n_steps=1)
    fit(Classifier(), [resumed], _loader(x, y), root=tmp_path, max_steps=24, ckpt_path=str(path))
    assert resumed._train_samples == samples + 4 * 32  # restored, then 4 more batches
    assert resumed._class_counts.sum() == counts.sum() + 4 * 32


class ManualClassifier(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization_sees_the_same_fault(tmp_path):
    x, y = _blobs()
    trainer = fit(
        ManualClassifier(), [BatchInspector()], _loader(x * 50 + 500, y), root=tmp_path, max_steps=45
    )
    assert [(f.check, f.where) for f in _mine(trainer)] == [("unnormalized-inputs", "batch[0]")]


@pytest.mark.parametrize(
    "name",
    ["data-wine-xy-dicts", "data-same-batch-every-step", "data-sorted-labels", "data-val-not-standardized"],
)
def test_detection_harness_cases(name):
    from benchmarks.detection.cases import get_case
    from benchmarks.detection.runner import run_case

    case = get_case(name)
    result = run_case(case)
    assert result.verdict == "ok", (name, result.reported, result.error)
    mine = [f for f in result.findings if f.check in DATA_CHECKS and f.severity != Severity.INFO]
    if case.healthy:
        assert mine == []
    else:
        assert {f.check for f in mine} == set(case.expected)
        assert all(f.where for f in mine)


@pytest.mark.parametrize("case", ["data-missing-values-nan", "cnn-per-image-standardize-blanks"])
def test_accelerator_path_reads_the_first_batch_nan_counts_at_once(case, monkeypatch):
    """On an accelerator NaN counts wait for the window's read, except the fit's first sampled batch: data
    broken from the start is named at step 0, as on a CPU (on an H100 these cases waited until step 16)."""
    monkeypatch.setattr(data, "on_host", lambda tensor: False)
    result = run_case(get_case(case))
    first = next(f for f in result.findings if f.check == "non-finite-inputs")
    assert (first.step, first.where, first.severity.value) == (0, "batch[0]", "error")
