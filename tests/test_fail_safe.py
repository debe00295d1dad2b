"""Fail-safe: nothing on the side switches detection off, and a reused suite judges each fit afresh.

Each test is a situation in which detection used to go quiet: a float64 or bfloat16 run, an output
directory that cannot be written, a logger that raises, a check's own failure, a ``Sentinel`` used
for a second fit, a whole LightningModule compiled. In each, a NaN from step 5 under
``on_detect="raise"`` must still raise before step 10, and a healthy run must say what went wrong
once, as what it is.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, fit
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_sentinel import (
    LossInputCheck,
    NonFiniteGuard,
    Sentinel,
    SentinelError,
    findings,
    load_findings,
)
from lightning_sentinel.findings import FindingLog, finding_log
from lightning_sentinel.report import format_report


@pytest.fixture
def console() -> Any:
    """What Lightning's rank-zero logger prints, heard on the logger itself.

    ``caplog`` sees only records that propagate to the root logger, and whether Lightning's logger
    propagates depends on what had configured logging when ``lightning`` was first imported.
    """
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    target = logging.getLogger("lightning.pytorch")
    handler, level = _Collect(logging.INFO), target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    yield messages
    target.removeHandler(handler)
    target.setLevel(level)


class Quiet(Classifier):
    """``Classifier`` without ``self.log``: the only logger calls in these runs are the suite's own."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        if self.transform is not None:
            logits = self.transform(logits, self.global_step)
        return nn.functional.cross_entropy(logits, y)


def _nan_from(step: int):
    return lambda logits, global_step: logits * float("nan") if global_step >= step else logits


def _raises_nan_before_step_10(root: Any, callbacks: list[pl.Callback] | None = None, **settings: Any):
    """Fit a model whose loss is NaN from step 5; return (the trainer, the SentinelError)."""
    module = Quiet(transform=_nan_from(5))
    callbacks = callbacks if callbacks is not None else [Sentinel(on_detect="raise")]
    trainer = None
    with pytest.raises(SentinelError) as raised:
        trainer = fit(module, callbacks, root=root, max_steps=40, **settings)
    assert trainer is None  # fit did not return: it raised
    assert raised.value.finding.check == "non-finite-loss"
    assert 5 <= raised.value.finding.step < 10
    return raised.value


def _disabled_warnings(trainer: pl.Trainer) -> list[str]:
    return [str(w.message) for w in trainer.sentinel_warnings if "disabled itself" in str(w.message)]


# ---------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_a_nan_raises_under_true_precision(tmp_path, precision):
    error = _raises_nan_before_step_10(tmp_path, precision=precision)
    assert (
        "at step 5 (batch 5), read at the check of step 8" in error.finding.message
    )  # checks: 0, 1, 2, 4, 8, ...


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_healthy_true_precision_runs_are_quiet_and_no_check_fails(tmp_path, precision):
    trainer = fit(Quiet(lr=0.01), [Sentinel()], root=tmp_path, max_steps=30, precision=precision)
    assert _disabled_warnings(trainer) == []
    assert [(f.check, f.where) for f in findings(trainer) if f.severity.value != "info"] == []
    assert finding_log(trainer).unwatched == {}


def test_a_double_model_under_a_float64_default_dtype(tmp_path):
    """A script that sets float64 as torch's default and trains a ``.double()`` model (no precision flag)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        healthy = fit(Quiet(lr=0.01).double(), [Sentinel()], loader=_double_loader(), root=tmp_path)
        assert _disabled_warnings(healthy) == []
        assert [f.check for f in findings(healthy) if f.severity.value != "info"] == []
        module = Quiet(transform=_nan_from(5)).double()
        with pytest.raises(SentinelError) as raised:
            fit(module, [Sentinel(on_detect="raise")], loader=_double_loader(), root=tmp_path / "nan")
        assert (raised.value.finding.check, raised.value.finding.step) == ("non-finite-loss", 8)
    finally:
        torch.set_default_dtype(previous)


def _double_loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)


# ---------------------------------------------------------------------- an output directory that cannot be written
def _unwritable(tmp_path: Any) -> Any:
    """A directory path below a regular file: no one, root included, can create it."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the run's directory should be")
    return blocker / "run"


def test_a_nan_raises_when_the_output_directory_cannot_be_written(tmp_path):
    _raises_nan_before_step_10(_unwritable(tmp_path))


def test_stop_still_stops_when_the_output_directory_cannot_be_written(tmp_path):
    trainer = fit(
        Quiet(transform=_nan_from(5)), [Sentinel(on_detect="stop")], root=_unwritable(tmp_path), max_steps=40
    )
    assert trainer.global_step <= 9  # found at check step 8
    assert findings(trainer)[0].check == "non-finite-loss"
    written = finding_log(trainer).written_to
    assert written is not None and written != finding_log(trainer).path
    assert [f.check for f in load_findings(written)][:1] == ["non-finite-loss"]


def test_a_healthy_run_with_an_unwritable_directory_warns_once_and_says_where_the_file_went(tmp_path):
    trainer = fit(Quiet(lr=0.01), [Sentinel()], root=_unwritable(tmp_path), max_steps=20)
    assert findings(trainer) == []
    messages = [str(w.message) for w in trainer.sentinel_warnings]
    (message,) = messages  # one clear warning, not one per check
    log = finding_log(trainer)
    assert "could not write" in message and log.path in message and log.fallback_path() in message
    assert "Detection goes on" in message
    assert log.written_to == log.fallback_path()
    with open(log.written_to) as written:
        assert json.load(written) == []


def test_when_no_file_can_be_written_the_findings_go_to_the_console(tmp_path, monkeypatch, console):
    (tmp_path / "tmp").mkdir()
    elsewhere = _unwritable(tmp_path / "tmp")
    monkeypatch.setattr(FindingLog, "fallback_path", lambda self: str(elsewhere / "findings.json"))
    trainer = fit(
        Quiet(transform=lambda logits, step: logits * 30.0), [Sentinel()], root=_unwritable(tmp_path)
    )
    assert "loss-at-init" in {f.check for f in findings(trainer)}
    assert finding_log(trainer).written_to is None
    assert len(trainer.sentinel_warnings) >= 2  # the finding, and the two writes that failed (once each)
    printed = [m for m in console if "findings (JSON" in m]
    assert printed and '"check": "loss-at-init"' in printed[-1]


# ---------------------------------------------------------------------- a logger whose methods raise
class _BrokenExperiment:
    def __getattr__(self, name: str) -> Any:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise OSError(f"experiment.{name}: disk quota exceeded")

        return broken


class BrokenLogger(TensorBoardLogger):
    """A TensorBoard logger whose writes all fail (as on a full disk or a dead remote)."""

    @property
    def experiment(self) -> Any:
        return _BrokenExperiment()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        raise OSError("log_metrics: disk quota exceeded")

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def save(self) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


def test_a_nan_raises_when_the_logger_raises(tmp_path):
    logger = BrokenLogger(str(tmp_path), name="broken")
    _raises_nan_before_step_10(tmp_path, logger=logger, log_every_n_steps=1)


def test_a_logger_that_raises_is_said_once_per_method_and_no_check_switches_off(tmp_path):
    logger = BrokenLogger(str(tmp_path), name="broken")
    transform = lambda logits, step: logits * 30.0  # noqa: E731  (loss-at-init: a finding to log as text)
    trainer = fit(Quiet(transform=transform), [Sentinel()], root=tmp_path, logger=logger, log_every_n_steps=1)
    assert _disabled_warnings(trainer) == []
    assert "loss-at-init" in {f.check for f in findings(trainer)}
    failures = [str(w.message) for w in trainer.sentinel_warnings if "could not write" in str(w.message)]
    outputs = sorted(finding_log(trainer).failed_outputs)
    assert len(failures) == len(outputs) == len(set(outputs)) >= 2  # each failing output said once
    assert any("log_metrics" in output for output in outputs)
    assert any("add_text" in output for output in outputs)


# ---------------------------------------------------------------------- a check's own failure
def test_a_failed_check_switches_off_alone_and_the_report_names_what_is_no_longer_watched(tmp_path, console):
    sentinel = Sentinel()
    broken = next(check for check in sentinel.checks if type(check).__name__ == "GradientNormMonitor")

    def fail(*args: Any) -> None:
        raise KeyError("an unforeseen model")

    broken._run_gradient_check = fail  # type: ignore[method-assign]
    trainer = fit(Quiet(lr=0.01), [sentinel], root=tmp_path, max_steps=12)
    assert len(_disabled_warnings(trainer)) == 1
    unwatched = finding_log(trainer).unwatched
    assert set(unwatched) == set(broken.CHECKS)
    report = next(m for m in console if m.startswith("lightning-sentinel:"))
    assert "passed" not in report and "exploding-gradients" in report and "stopped watching" in report
    assert "GradientNormMonitor failed" in report


def test_the_nan_guard_falls_back_to_its_minimal_path_and_still_raises(tmp_path):
    guard = NonFiniteGuard(on_detect="raise")

    def fail(*args: Any) -> None:
        raise TypeError("a dtype the norms cannot take")

    guard._run_non_finite_check = fail  # type: ignore[method-assign]
    error = _raises_nan_before_step_10(tmp_path, [guard])
    assert (error.finding.step, error.finding.where) == (
        8,
        "batch 5",
    )  # read at step 8, named from the device count
    assert guard._minimal and not guard._failed


def test_report_without_findings_but_with_unwatched_checks_does_not_claim_a_pass():
    text = format_report([], ["a", "b"], None, unwatched={"b": "X failed in `setup` (OSError: no)"})
    assert "passed" not in text and "1 of 2 checks stopped watching" in text and "X failed" in text


# ---------------------------------------------------------------------- a reused instance
def _softmax(logits: Tensor, step: int) -> Tensor:
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("same_trainer", [False, True])
def test_a_reused_sentinel_reports_the_same_bug_in_a_second_fit(tmp_path, same_trainer):
    sentinel = Sentinel()
    first = fit(Quiet(transform=_softmax), [sentinel], root=tmp_path / "one", max_steps=6)
    assert "softmax-before-cross-entropy" in [f.check for f in findings(first)]
    if same_trainer:
        first.fit_loop.epoch_loop.max_steps = 12
        first.fit(Quiet(transform=_softmax), _loader())
        second = [f for f in findings(first) if f.step >= 6]
    else:
        second = findings(fit(Quiet(transform=_softmax), [sentinel], root=tmp_path / "two", max_steps=6))
    assert "softmax-before-cross-entropy" in [f.check for f in second]


def test_a_reused_nan_guard_raises_again(tmp_path):
    sentinel = Sentinel(on_detect="raise")
    _raises_nan_before_step_10(tmp_path / "one", [sentinel])
    _raises_nan_before_step_10(tmp_path / "two", [sentinel])


def test_a_reused_check_forgets_its_failure_but_a_resume_keeps_what_it_loads(tmp_path):
    check = LossInputCheck()
    check._failed = True  # as if the last fit's model had broken it
    trainer = fit(Quiet(transform=_softmax), [check], root=tmp_path, max_steps=4)
    assert [f.check for f in findings(trainer)] == ["softmax-before-cross-entropy"]
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    resumed = fit(
        Quiet(transform=_softmax), [check], root=tmp_path, max_steps=8, ckpt_path=str(tmp_path / "run.ckpt")
    )
    # restored: the finding is known already, so it is not reported a second time after the resume
    assert [f.check for f in findings(resumed)] == ["softmax-before-cross-entropy"]


def _loader() -> torch.utils.data.DataLoader:
    from _models import classification_loader

    return classification_loader()


# ---------------------------------------------------------------------- odd launchers and compilers
def test_a_process_where_no_check_ran_prints_no_report(console):
    """The launcher process of ``ddp_spawn`` sees ``on_exception`` without having run a check."""
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    guard = NonFiniteGuard()
    guard._finish(trainer, print_report=True)
    assert not [m for m in console if "lightning-sentinel" in m]


def test_a_compiled_lightning_module_does_not_trace_the_suite(tmp_path):
    """Observed steps run eagerly: Dynamo never compiles a frame of lightning_sentinel (which used to
    recompile on every sampled step until Dynamo's recompile limit)."""
    from torch._dynamo import convert_frame

    package = os.path.dirname(os.path.dirname(os.path.abspath(__import__("lightning_sentinel").__file__)))
    package = os.path.join(package, "lightning_sentinel")
    compiled: list[str] = []
    handle = convert_frame.register_bytecode_hook(lambda code, new: compiled.append(code.co_filename))
    torch._dynamo.reset()
    try:
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
        module = torch.compile(Quiet(net=net, lr=0.01), backend="eager")
        trainer = fit(module, [Sentinel()], root=tmp_path, max_steps=60)
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert compiled  # the model itself was compiled
    assert [name for name in compiled if name.startswith(package)] == []
    assert [f.check for f in findings(trainer) if f.severity.value != "info"] == []
