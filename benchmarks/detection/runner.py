"""Train benchmark cases under ``Sentinel(preset="full", on_detect="warn")`` and score what it reports.

Verdicts:

- ``ok``: a healthy case with no warning/error finding, or a faulty case with at least one
  warning/error finding whose check id is in the case's expected set;
- ``MISSED``: a faulty case with no warning/error finding;
- ``FALSE-ALARM``: a healthy case with a warning/error finding;
- ``WRONG-DIAGNOSIS``: a faulty case whose warning/error findings all have unexpected ids;
- ``CRASHED``: a healthy case whose training raised (a faulty case is scored on its findings).

``info`` findings never count either way; they are listed apart.

Example:
    >>> from benchmarks.detection.cases import get_case
    >>> result = run_case(get_case("bce-breast-cancer"))  # doctest: +SKIP
    >>> result.verdict  # doctest: +SKIP
    'ok'
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.detection.cases import Case
from lightning_sentinel import Finding, Sentinel, SentinelWarning, Severity, findings

OK = "ok"
MISSED = "MISSED"
FALSE_ALARM = "FALSE-ALARM"
WRONG_DIAGNOSIS = "WRONG-DIAGNOSIS"
CRASHED = "CRASHED"

# ids whose findings must name a place (a module, parameter, layer, param group or batch): ``where`` set
LOCATING_CHECKS = frozenset(
    {
        "non-finite-activation",
        "non-finite-gradients",
        "non-finite-weights",
        "exploding-gradients",
        "vanishing-gradients",
        "dead-relu",
        "saturated-activation",
        "module-in-eval-during-training",
        "module-in-train-during-eval",
        "parameters-not-in-optimizer",
        "unused-parameters",
        "frozen-parameters",
        "update-ratio-too-high",
        "update-ratio-too-low",
        "weight-decay-too-strong",
        "replicas-out-of-sync",
    }
)

_LOSS_WINDOW = 5  # micro-batches averaged for the start and end loss
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


@dataclass
class CaseResult:
    """What one case produced and how it is scored.

    Attributes:
        name, healthy, description: copied from the case.
        expected: the case's expected check ids, sorted.
        reported: ids of warning/error findings, in order of first report, each once.
        info: ids of info findings, each once.
        verdict: ``ok``, ``MISSED``, ``FALSE-ALARM``, ``WRONG-DIAGNOSIS`` or ``CRASHED``.
        first_detection_step: ``step`` of the first finding that decided the verdict (the first
            expected one for a faulty case, the first warning/error for a false alarm), else ``None``.
        seconds: wall time of building and training.
        steps: optimizer steps run (``trainer.global_step``).
        loss_start, loss_end: mean training loss of the first and last few micro-batches (NaN if none).
        sentinel_warnings: number of ``SentinelWarning`` warnings caught.
        findings: every finding of the run, in order.
        error: the exception training raised, if any, as ``Type: message``.
        architecture: the model family (:func:`architecture_of`), e.g. ``"CNN"``.
    """

    name: str
    healthy: bool
    description: str
    expected: tuple[str, ...]
    reported: tuple[str, ...]
    info: tuple[str, ...]
    verdict: str
    first_detection_step: int | None
    seconds: float
    steps: int
    loss_start: float
    loss_end: float
    sentinel_warnings: int
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    architecture: str = ""

    @property
    def detected(self) -> bool:
        """For a faulty case: whether it was correctly diagnosed."""
        return not self.healthy and self.verdict == OK

    @property
    def false_alarm(self) -> bool:
        """For a healthy case: whether any warning/error finding was reported."""
        return self.healthy and bool(self.reported)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible record (non-finite losses become strings)."""
        return {
            "name": self.name,
            "healthy": self.healthy,
            "description": self.description,
            "expected": list(self.expected),
            "reported": list(self.reported),
            "info": list(self.info),
            "verdict": self.verdict,
            "first_detection_step": self.first_detection_step,
            "seconds": round(self.seconds, 3),
            "steps": self.steps,
            "loss_start": _json_float(self.loss_start),
            "loss_end": _json_float(self.loss_end),
            "sentinel_warnings": self.sentinel_warnings,
            "findings": [finding.to_dict() for finding in self.findings],
            "error": self.error,
            "architecture": self.architecture,
        }


def _json_float(value: float) -> float | str:
    return round(value, 6) if math.isfinite(value) else str(value)


# ---------------------------------------------------------------------- scoring (pure)
def _unique(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ids))


def alarms(run_findings: Sequence[Finding]) -> list[Finding]:
    """The warning/error findings (the ones that count), in order."""
    return [finding for finding in run_findings if finding.severity in (Severity.WARNING, Severity.ERROR)]


def score(
    healthy: bool, expected: Iterable[str], run_findings: Sequence[Finding], crashed: bool = False
) -> tuple[str, int | None]:
    """``(verdict, first_detection_step)`` of a run from its findings.

    Example:
        >>> nan = Finding("non-finite-loss", Severity.ERROR, "loss is nan", 7, 0)
        >>> score(False, {"non-finite-loss"}, [nan])
        ('ok', 7)
        >>> score(False, {"vanishing-gradients"}, [nan])
        ('WRONG-DIAGNOSIS', None)
        >>> score(True, set(), [nan])
        ('FALSE-ALARM', 7)
    """
    counted = alarms(run_findings)
    if healthy:
        if counted:
            return FALSE_ALARM, counted[0].step
        return (CRASHED if crashed else OK), None
    if not counted:
        return MISSED, None
    wanted = set(expected)
    matching = [finding for finding in counted if finding.check in wanted]
    if matching:
        return OK, matching[0].step
    return WRONG_DIAGNOSIS, None


def tally(results: Sequence[CaseResult]) -> tuple[int, int, int, int]:
    """``(R, N, F, H)``: R of the N faulty cases correctly diagnosed, F of the H healthy ones with an alarm."""
    faulty = [result for result in results if not result.healthy]
    healthy = [result for result in results if result.healthy]
    recall = sum(result.detected for result in faulty)
    return recall, len(faulty), sum(result.false_alarm for result in healthy), len(healthy)


def summary_line(results: Sequence[CaseResult]) -> str:
    """``recall R/N, false alarms F/H`` over faulty (N) and healthy (H) cases."""
    recall, faulty, false_alarms, healthy = tally(results)
    return f"recall {recall}/{faulty}, false alarms {false_alarms}/{healthy}"


# ---------------------------------------------------------------------- architectures
_FAMILIES: tuple[tuple[str, tuple[type[torch.nn.Module], ...]], ...] = (
    (
        "Transformer",
        (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer),
    ),
    ("RNN", (torch.nn.RNNBase,)),
    ("CNN", (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)),
    ("embedding", (torch.nn.Embedding, torch.nn.EmbeddingBag)),
    ("MLP", (torch.nn.Linear,)),
)


def architecture_of(model: torch.nn.Module) -> str:
    """The model family, by the most specific layer type it holds: ``"Transformer"`` (attention),
    ``"RNN"`` (LSTM/GRU/RNN), ``"CNN"`` (convolutions), ``"embedding"`` (an embedding table and linear
    layers), ``"MLP"`` (linear layers only), else ``"other"``.

    Example:
        >>> architecture_of(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)))
        'CNN'
        >>> architecture_of(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)))
        'MLP'
    """
    modules = list(model.modules())
    for family, types in _FAMILIES:
        if any(isinstance(module, types) for module in modules):
            return family
    return "other"


# ---------------------------------------------------------------------- running
class LossRecorder(Callback):
    """Keeps the training loss of every micro-batch (to show that healthy cases really learn)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # Lightning hands over the loss divided by accumulate_grad_batches
            self.losses.append(float(loss.detach().float()) * trainer.accumulate_grad_batches)

    def start_and_end(self, window: int = _LOSS_WINDOW) -> tuple[float, float]:
        """Mean loss of the first and of the last ``window`` micro-batches (NaN when nothing was recorded)."""
        if not self.losses:
            return math.nan, math.nan
        head, tail = self.losses[:window], self.losses[-window:]
        return sum(head) / len(head), sum(tail) / len(tail)


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Catch every warning (returned in a list) and silence Lightning's info logging."""
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _trainer(case: Case, root_dir: str, callbacks: list[Callback], accelerator: str = "cpu") -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": 1,
        "logger": False,
        "default_root_dir": root_dir,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(case.trainer_kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (``None``: leave torch's setting alone)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


PRESET_ENV = "SENTINEL_BENCH_PRESET"  # the suite's preset for the zoo's runs (the DDP ranks inherit it)


def bench_preset() -> str:
    """The preset the zoo trains under: ``"full"`` (the published numbers), or ``"fast"`` (the default
    ``Sentinel()``) while :func:`under_preset` is active."""
    return os.environ.get(PRESET_ENV, "full")


@contextlib.contextmanager
def under_preset(preset: str) -> Iterator[None]:
    """Train the zoo's cases, DDP ranks included, under ``Sentinel(preset=preset)`` inside the block."""
    previous = os.environ.get(PRESET_ENV)
    os.environ[PRESET_ENV] = preset
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PRESET_ENV, None)
        else:
            os.environ[PRESET_ENV] = previous


def run_case(
    case: Case, root_dir: str | None = None, threads: int | None = 1, accelerator: str = "cpu"
) -> CaseResult:
    """Train ``case`` with ``Sentinel(preset="full", on_detect="warn")`` and score its findings.

    Findings are also written to ``<root_dir>/sentinel/findings.json``; ``root_dir`` defaults to a
    temporary directory removed afterwards. ``threads`` defaults to one intra-op thread: the zoo's
    models are too small to gain from more, and on a busy machine several threads per process
    fight for the cores and make a run tens of times slower. ``accelerator`` is the Trainer's (the
    benchmark's numbers are the CPU's; ``"gpu"`` reruns the zoo on CUDA). A case on several devices
    (DDP) runs in subprocesses, one per rank (:func:`benchmarks.detection.cases_distributed.run_distributed_case`).
    """
    from benchmarks.detection import cases_distributed

    if cases_distributed.is_distributed(case):
        return cases_distributed.run_distributed_case(case, root_dir, threads, accelerator)
    with _torch_threads(threads):
        if root_dir is not None:
            return _run_in(case, root_dir, accelerator)
        with tempfile.TemporaryDirectory(prefix=f"sentinel-bench-{case.name}-") as temporary:
            return _run_in(case, temporary, accelerator)


def _run_in(case: Case, root_dir: str, accelerator: str = "cpu") -> CaseResult:
    recorder = LossRecorder()
    error: str | None = None
    started = time.perf_counter()
    with _quiet() as caught:
        pl.seed_everything(case.seed, verbose=False)
        module, train_loader, val_loader = case.build()
        architecture = architecture_of(module)
        trainer = _trainer(
            case, root_dir, [Sentinel(preset=bench_preset(), on_detect="warn"), recorder], accelerator
        )
        try:
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        except Exception as exception:  # a benchmark row, not a crash of the whole benchmark
            error = f"{type(exception).__name__}: {exception}"
            traceback.print_exc()
    seconds = time.perf_counter() - started
    run_findings = findings(trainer)
    verdict, first_step = score(case.healthy, case.expected, run_findings, crashed=error is not None)
    loss_start, loss_end = recorder.start_and_end()
    return CaseResult(
        name=case.name,
        healthy=case.healthy,
        description=case.description,
        expected=tuple(sorted(case.expected)),
        reported=_unique(finding.check for finding in alarms(run_findings)),
        info=_unique(finding.check for finding in run_findings if finding.severity is Severity.INFO),
        verdict=verdict,
        first_detection_step=first_step,
        seconds=seconds,
        steps=int(trainer.global_step),
        loss_start=loss_start,
        loss_end=loss_end,
        sentinel_warnings=sum(issubclass(w.category, SentinelWarning) for w in caught),
        findings=run_findings,
        error=error,
        architecture=architecture,
    )


def run_cases(
    cases: Iterable[Case],
    root_dir: str | None = None,
    progress: Callable[[CaseResult], None] | None = None,
    threads: int | None = 1,
    accelerator: str = "cpu",
) -> list[CaseResult]:
    """Run every case in order (each under ``<root_dir>/<case name>`` when ``root_dir`` is given).

    ``progress`` is called with each result as soon as its case finishes; ``threads`` and
    ``accelerator`` as in :func:`run_case`.
    """
    from benchmarks.detection import cases_distributed

    cases = list(cases)
    cases_distributed.prefetch(
        cases, root_dir, threads, accelerator
    )  # the DDP cases: one launch of the ranks
    results: list[CaseResult] = []
    for case in cases:
        case_dir = None if root_dir is None else os.path.join(root_dir, case.name)
        result = run_case(case, case_dir, threads, accelerator)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


# ---------------------------------------------------------------------- presenting
_COLUMNS = (
    "case",
    "kind",
    "verdict",
    "expected",
    "reported",
    "info",
    "first step",
    "loss start->end",
    "seconds",
)


def _loss_cell(result: CaseResult) -> str:
    return f"{result.loss_start:.3g}->{result.loss_end:.3g}"


def table_rows(results: Sequence[CaseResult]) -> list[tuple[str, ...]]:
    """One tuple of cells per result, in the order of ``_COLUMNS``."""
    return [
        (
            result.name,
            "healthy" if result.healthy else "faulty",
            result.verdict,
            ",".join(result.expected) or "-",
            ",".join(result.reported) or "-",
            ",".join(result.info) or "-",
            "-" if result.first_detection_step is None else str(result.first_detection_step),
            _loss_cell(result),
            f"{result.seconds:.1f}",
        )
        for result in results
    ]


def format_table(results: Sequence[CaseResult]) -> str:
    """A plain-text table, one row per case, followed by any crash and the summary line."""
    rows = [_COLUMNS, *table_rows(results)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.extend(f"{result.name} raised {result.error}" for result in results if result.error)
    lines.append(summary_line(results))
    return "\n".join(lines)
