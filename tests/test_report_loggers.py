"""Where the scalars and the findings table go with each logger: TensorBoard, CSV, none, wandb, MLflow."""

from __future__ import annotations

import csv
import importlib.util

import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from lightning_sentinel import Sentinel, findings
from tests._models import Classifier, fit


def _nan_after(step):
    return Classifier(transform=lambda logits, s: logits / 0.0 if s >= step else logits)


def test_csv_logger_gets_the_sentinel_scalars_and_no_crash(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    trainer = fit(
        _nan_after(25), [Sentinel()], root=tmp_path, max_steps=30, logger=logger, log_every_n_steps=1
    )
    assert [f.check for f in findings(trainer)][:1] == ["non-finite-loss"]
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    assert "sentinel/grad_norm/total" in columns
    assert (tmp_path / "run" / "version_0" / "sentinel" / "findings.json").is_file()


def test_no_logger_still_reports_and_writes_findings(tmp_path):
    trainer = fit(_nan_after(3), [Sentinel()], root=tmp_path, max_steps=10, logger=False)
    assert [f.check for f in findings(trainer)][:1] == ["non-finite-loss"]
    assert (tmp_path / "sentinel" / "findings.json").is_file()


class RecordingLogger(Logger):
    """A logger that only takes scalars through ``log_metrics``, as wandb's and MLflow's do."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_log_metrics_only_logger_gets_the_scalars(tmp_path):
    logger = RecordingLogger()
    trainer = fit(
        _nan_after(25), [Sentinel()], root=tmp_path, max_steps=30, logger=logger, log_every_n_steps=1
    )
    assert [f.check for f in findings(trainer)][:1] == ["non-finite-loss"]
    logged = {name for _, metrics in logger.metrics for name in metrics}
    assert "sentinel/grad_norm/total" in logged
    assert all(isinstance(value, (int, float)) for _, metrics in logger.metrics for value in metrics.values())


def _tensorboard_tags(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_gets_scalars_under_sentinel_and_the_findings_text(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    fit(_nan_after(25), [Sentinel()], root=tmp_path, max_steps=30, logger=logger, log_every_n_steps=1)
    events = _tensorboard_tags(logger.log_dir)
    scalars = events.Tags()["scalars"]
    assert "sentinel/grad_norm/total" in scalars
    assert all(tag.startswith("sentinel/") for tag in scalars if "norm" in tag or "ratio" in tag)
    text = events.Tensors("sentinel/findings/text_summary")
    table = text[-1].tensor_proto.string_val[0].decode()
    assert "| **non-finite-loss**" in table and table.startswith("| severity | check |")
    (layout,) = events.Tensors("custom_scalars__config__")  # written once, without HistogramLogger
    assert b"sentinel/grad_norm" in layout.tensor_proto.string_val[0]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_gets_the_scalars(tmp_path, monkeypatch):  # pragma: no cover - optional package
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    logged = []
    original = logger.log_metrics
    monkeypatch.setattr(
        logger, "log_metrics", lambda metrics, step=None: (logged.append(metrics), original(metrics, step))
    )
    fit(_nan_after(25), [Sentinel()], root=tmp_path, max_steps=30, logger=logger, log_every_n_steps=1)
    assert any("sentinel/grad_norm/total" in metrics for metrics in logged)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_file_store_gets_the_scalars(tmp_path):  # pragma: no cover - optional package
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    fit(_nan_after(25), [Sentinel()], root=tmp_path, max_steps=30, logger=logger, log_every_n_steps=1)
    metrics = logger.experiment.get_run(logger.run_id).data.metrics
    assert any(name.startswith("sentinel") for name in metrics)
