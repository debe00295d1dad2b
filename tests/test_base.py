"""The SentinelCallback contract: on_detect policies, de-duplication, isolation, files, state."""

import json

import lightning.pytorch as pl
import pytest
from _models import Classifier, MetricsRecorder, fit
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sentinel import (
    GradientNormMonitor,
    NonFiniteGuard,
    Sentinel,
    SentinelCallback,
    SentinelError,
    Severity,
    findings,
)


class StepCheck(SentinelCallback):
    """Reports one finding per training batch from ``at_step`` on, with growing ``magnitudes``."""

    CHECKS = ("exploding-gradients",)

    def __init__(self, at_step=3, magnitudes=None, severities=None, explode=False, **kwargs):
        super().__init__(**kwargs)
        self.at_step = at_step
        self.magnitudes = magnitudes or [1.0]
        self.severities = severities or [Severity.WARNING]
        self.explode = explode
        self.calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.explode:
            raise ZeroDivisionError("bug in the check")
        if trainer.global_step >= self.at_step:
            index = min(self.calls, len(self.magnitudes) - 1)
            self._report(
                trainer,
                "exploding-gradients",
                self.severities[min(self.calls, len(self.severities) - 1)],
                f"toy finding {self.calls}",
                where="layer.x",
                evidence={"value": self.magnitudes[index]},
                hint="do something",
                magnitude=self.magnitudes[index],
            )
            self.calls += 1
        self._settle(trainer)


def test_warn_reports_once_and_training_goes_on(tmp_path):
    trainer = fit(Classifier(), [StepCheck(at_step=3)], root=tmp_path, max_steps=12)
    assert trainer.global_step == 12
    found = findings(trainer)
    assert [(f.check, f.where, f.step) for f in found] == [("exploding-gradients", "layer.x", 3)]
    assert len(trainer.sentinel_warnings) == 1
    assert "exploding-gradients" in str(trainer.sentinel_warnings[0].message)
    written = json.loads((tmp_path / "sentinel" / "findings.json").read_text())
    assert [record["check"] for record in written] == ["exploding-gradients"]
    assert written[0]["evidence"] == {"value": 1.0} and written[0]["hint"] == "do something"


def test_repeat_is_reported_again_only_when_worse(tmp_path):
    check = StepCheck(at_step=0, magnitudes=[1.0, 5.0, 12.0, 13.0])
    trainer = fit(Classifier(), [check], root=tmp_path, max_steps=6)
    assert [f.evidence["value"] for f in findings(trainer)] == [1.0, 12.0]

    check = StepCheck(at_step=0, severities=[Severity.INFO, Severity.INFO, Severity.ERROR])
    trainer = fit(Classifier(), [check], root=tmp_path, max_steps=6)
    assert [f.severity for f in findings(trainer)] == [Severity.INFO, Severity.ERROR]


def test_stop_stops_the_run_and_writes_findings(tmp_path):
    trainer = fit(Classifier(), [StepCheck(at_step=4, on_detect="stop")], root=tmp_path, max_steps=50)
    assert trainer.should_stop
    assert trainer.global_step == 4  # found at the end of the 4th step: no further step runs
    assert (tmp_path / "sentinel" / "findings.json").exists()


def test_raise_raises_sentinel_error_with_the_finding(tmp_path):
    with pytest.raises(SentinelError) as raised:
        fit(Classifier(), [StepCheck(at_step=2, on_detect="raise")], root=tmp_path, max_steps=50)
    assert raised.value.finding.check == "exploding-gradients"
    assert raised.value.finding.where == "layer.x"
    records = json.loads((tmp_path / "sentinel" / "findings.json").read_text())
    assert [record["step"] for record in records] == [2]


def test_a_failing_check_disables_itself_and_training_goes_on(tmp_path):
    check = StepCheck(explode=True)
    trainer = fit(Classifier(), [check], root=tmp_path, max_steps=8)
    assert trainer.global_step == 8
    messages = [str(w.message) for w in trainer.sentinel_warnings]
    assert len(messages) == 1 and "StepCheck failed in `on_train_batch_end`" in messages[0]
    assert check._failed


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: NonFiniteGuard(on_detect="explode"), "on_detect"),
        (lambda: GradientNormMonitor(every_n_steps=0), "every_n_steps"),
        (lambda: GradientNormMonitor(warmup_steps=-1), "warmup_steps"),
        (lambda: GradientNormMonitor(spike_factor=-1.0), "spike_factor"),
        (lambda: GradientNormMonitor(max_norm=float("inf")), "max_norm"),
        (lambda: GradientNormMonitor(window=3, min_history=5), "min_history"),
        (lambda: NonFiniteGuard(scaler_min_scale=0.0), "scaler_min_scale"),
        (lambda: Sentinel(preset="slow"), "preset"),
        (lambda: Sentinel(disable=["no-such-check"]), "disable"),
        (lambda: Sentinel(on_detect="halt"), "on_detect"),
        (lambda: Sentinel(checks=[pl.callbacks.EarlyStopping("x")]), "checks"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(factory, argument):
    with pytest.raises(ValueError, match=argument):
        factory()


def test_state_keys_tell_instances_apart_and_both_run(tmp_path):
    first, second = GradientNormMonitor(every_n_steps=1), GradientNormMonitor(every_n_steps=2)
    assert first.state_key != second.state_key
    assert GradientNormMonitor().state_key == GradientNormMonitor().state_key
    trainer = fit(Classifier(), [first, second], root=tmp_path, max_steps=4)
    assert trainer.global_step == 4


def test_state_dict_round_trip_keeps_dedup_and_findings(tmp_path):
    check = StepCheck(at_step=1)
    fit(Classifier(), [check], root=tmp_path, max_steps=3)
    state = check.state_dict()
    restored = StepCheck(at_step=1)
    restored.load_state_dict(json.loads(json.dumps(state)))  # checkpoint state must be plain data
    assert restored._reported == check._reported
    assert [f.check for f in restored._restored_findings] == ["exploding-gradients"]


def test_findings_go_to_tensorboard_text_and_scalars_to_the_logger(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    checks = [StepCheck(at_step=1), GradientNormMonitor(every_n_steps=1)]
    trainer = fit(Classifier(), checks, max_steps=6, logger=logger, log_every_n_steps=1)
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "sentinel/grad_norm/total" in tags["scalars"]
    assert any(tag.startswith("sentinel/findings") for tag in tags["tensors"])
    assert (tmp_path / "tb" / "version_0" / "sentinel" / "findings.json").exists()
    assert trainer.global_step == 6


def test_scalars_are_written_once_per_log_every_n_steps_interval(tmp_path):
    class Recorder(MetricsRecorder):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[int] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "sentinel/grad_norm/total" in metrics:
                self.steps.append(step)

    recorder, monitor = Recorder(), GradientNormMonitor(every_n_steps=3)
    fit(Classifier(), [monitor], max_steps=25, logger=recorder, log_every_n_steps=10)
    assert recorder.steps == [0, 12, 21]  # the first check step (every 3) of each 10-step interval
    recorder.steps.clear()
    fit(Classifier(), [monitor], max_steps=4, logger=recorder, log_every_n_steps=10)
    assert recorder.steps == [0]  # a new fit of the same callback starts over


def test_info_findings_never_stop_or_raise(tmp_path):
    check = StepCheck(at_step=1, severities=[Severity.INFO], on_detect="raise")
    trainer = fit(Classifier(), [check], root=tmp_path, max_steps=5)
    assert trainer.global_step == 5
    assert [f.severity for f in findings(trainer)] == [Severity.INFO]
