"""The CUDA rows of the test matrix: real fp16 AMP with its GradScaler, bf16, ``torch.compile`` with
Inductor, and no host-device sync on steps where no check is due.

Skipped without a CUDA GPU (CI has none); on a GPU machine run ``python -m pytest tests/test_cuda.py``.
The CPU rows of the same matrix are in ``test_matrix_training.py``.

Last run on one H100 (torch 2.11+cu130, Lightning 2.6.6) on 2026-11-24, where the rows that existed
then passed (the NaN rows once their expected step was set to the accelerator's read at step 10). Not yet run on a GPU: rows written after that run (fp16 exploding gradients at depth 7, which
passes on the CPU with a real GradScaler in ``test_matrix_training.py``; the fast zoo subset as a test,
whose cases all passed in the zoo's CUDA run; the zoo cases whose CUDA run differed from the CPU's),
and the NonFiniteGuard/BatchInspector accelerator-path changes made after it (checked on the CPU with
the accelerator path forced, ``test_non_finite.py`` / ``test_data.py``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, MetricsRecorder, deep_mlp, fit
from test_matrix_training import Quiet, _nan_from, _serious, fp16_exploding_run, overflowing_scaler_run
from torch import nn

from benchmarks.detection.cases import get_case, select_cases
from benchmarks.detection.runner import OK, run_case, run_cases
from benchmarks.overhead import Workload, _vectors, gpu_sync_debug
from lightning_sentinel import GradientNormMonitor, Sentinel, findings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU: dict[str, Any] = {"accelerator": "gpu", "devices": 1}
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_healthy_full_preset_is_silent_on_cuda(tmp_path, precision):
    trainer = fit(Quiet(), [Sentinel(preset="full")], root=tmp_path, max_steps=24, precision=precision, **GPU)
    assert trainer.global_step == 24
    assert [f.check for f in findings(trainer)] == []


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_nan_loss_is_found_at_its_step_on_cuda(tmp_path, precision):
    trainer = fit(
        Quiet(transform=_nan_from(5)), [Sentinel()], root=tmp_path, max_steps=30, precision=precision, **GPU
    )
    # on an accelerator the loss is folded into a device flag, read on check steps (every 10th)
    first = findings(trainer)[0]
    assert (first.check, first.step) == ("non-finite-loss", 10), (first.check, first.step, first.message)
    assert "in the 10 steps before step 10" in first.message
    assert trainer.global_step <= 11


def test_fp16_overflow_steps_skipped_by_the_scaler_are_not_faults_on_cuda(tmp_path):
    trainer, scaler = overflowing_scaler_run(tmp_path, "cuda", **GPU)
    assert scaler.get_scale() < 2.0**40  # steps were skipped
    assert _serious(trainer) == []


def test_gradient_norm_is_reported_unscaled_under_fp16(tmp_path):
    """The norm judged under 16-mixed is the fp32 run's, not 65536 times it (the GradScaler's scale)."""
    norms = {}
    for precision in ("32-true", "16-mixed"):
        pl.seed_everything(0, verbose=False)  # the same weights and the same first batch
        recorder = MetricsRecorder()
        monitor = GradientNormMonitor(every_n_steps=1)
        fit(
            Classifier(),
            [monitor],
            root=tmp_path / precision,
            max_steps=1,
            logger=recorder,
            precision=precision,
            **GPU,
        )
        norms[precision] = recorder.metrics["sentinel/grad_norm/total"]
    assert norms["16-mixed"] == pytest.approx(norms["32-true"], rel=0.02)


def test_exploding_gradients_are_found_under_bf16(tmp_path):
    trainer = fit(
        Classifier(net=deep_mlp(8, randn_init=True), lr=1e-6),
        [GradientNormMonitor()],
        root=tmp_path,
        max_steps=5,
        precision="bf16-mixed",
        **GPU,
    )
    found = [f for f in findings(trainer) if f.check == "exploding-gradients"]
    assert found and found[0].step == 0 and found[0].where.startswith("net.")


def test_exploding_gradients_are_found_under_fp16_once_the_scaler_stops_overflowing(tmp_path):
    trainer, scaler = fp16_exploding_run(tmp_path, "cuda", **GPU)
    found = [f for f in findings(trainer) if f.check == "exploding-gradients"]
    assert scaler.get_scale() < 2.0**16  # the skipped steps happened
    assert found and found[0].step > 0 and found[0].where.startswith("net.")
    assert found[0].evidence["grad_norm"] > 1e4  # unscaled: the absolute bound


def test_compiled_with_inductor_healthy_is_silent_and_a_nan_is_found(tmp_path):
    healthy = fit(torch.compile(Quiet()), [Sentinel()], root=tmp_path / "healthy", max_steps=24, **GPU)
    assert [f.check for f in findings(healthy)] == []
    broken = fit(
        torch.compile(Quiet(transform=_nan_from(5))), [Sentinel()], root=tmp_path / "nan", max_steps=30, **GPU
    )
    first = findings(broken)[0]
    assert (first.check, first.step) == ("non-finite-loss", 10), (first.check, first.step, first.message)


def test_softmax_before_cross_entropy_is_found_on_cuda_as_on_the_cpu(tmp_path):
    softmax = lambda logits, step: logits.softmax(dim=-1)  # noqa: E731
    runs = {}
    for device, settings in (("cpu", {"accelerator": "cpu"}), ("gpu", {**GPU, "precision": "16-mixed"})):
        pl.seed_everything(0, verbose=False)
        trainer = fit(
            Classifier(transform=softmax), [Sentinel()], root=tmp_path / device, max_steps=10, **settings
        )
        runs[device] = [a for a in _serious(trainer) if a[0] == "softmax-before-cross-entropy"]
    assert runs["cpu"] and runs["cpu"][0][1] == "F.cross_entropy in training_step"
    assert runs["gpu"] == runs["cpu"]


@pytest.mark.parametrize("precision", ("32-true", "16-mixed"))
def test_no_host_sync_on_steps_where_no_check_is_due(precision):
    """``torch.cuda.set_sync_debug_mode("error")`` around every hook of the fast preset on those steps."""
    workload = Workload(
        "mlp-gpu",
        "MLP 64-256-256-10",
        lambda: nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        ),
        _vectors(64),
        64,
        60,
        "gpu",
        precision,
    )
    assert gpu_sync_debug(workload, 60) == []


def test_fast_zoo_subset_on_cuda():
    """The detection benchmark's fast subset gives the CPU's verdicts on CUDA (TF32 convolutions included)."""
    results = run_cases(select_cases(fast=True), accelerator="gpu")
    assert {r.name: r.verdict for r in results if r.verdict != OK} == {}


# the zoo cases whose H100 run differed from the CPU's: (case, check, step, where) now expected as on a CPU
CUDA_FIXES = [
    ("gru-not-batch-first", "batch-mixing", 0, "batch[0]"),  # cuDNN's GRU refused backward in eval mode
    ("data-missing-values-nan", "non-finite-inputs", 0, "batch[0]"),  # was found at step 16
    ("cnn-per-image-standardize-blanks", "non-finite-inputs", 0, "batch[0]"),  # was found at step 16
    ("exp-activation-overflow", "non-finite-activation", 0, "net.3"),  # was not localised
]


@pytest.mark.parametrize(("case", "check", "step", "where"), CUDA_FIXES, ids=[c[0] for c in CUDA_FIXES])
def test_zoo_cases_are_diagnosed_on_cuda_as_on_the_cpu(case, check, step, where):
    result = run_case(get_case(case), accelerator="gpu")
    assert result.verdict == OK, [(f.check, f.step, f.message) for f in result.findings]
    assert (check, step, where) in {(f.check, f.step, f.where) for f in result.findings}
