"""Benchmark cases under 2-process DDP on the CPU (gloo): replicas that drift apart, and healthy DDP runs.

Each case trains with ``Trainer(devices=2, strategy=...)``. The runner cannot train them in its own
process (Lightning's DDP launcher re-runs the launching command for rank 1), so
:func:`run_distributed_case` starts ``python -m benchmarks.detection.cases_distributed CASE ...`` as a
subprocess (rank 0, which launches rank 1), bounded by a timeout that kills both ranks. Each rank
writes its result as JSON; the case is scored on rank 0's, whose findings hold every rank's (the
ranks share their findings at the end of training).

The faults are the ways replicas go out of sync in real code: a running statistic kept in an
``nn.Parameter(requires_grad=False)`` and updated from each rank's own batch (DDP never syncs a
parameter that gets no gradient), DDP's ``no_sync()`` around a backward whose gradients are then
stepped (a critic's update in manual optimization; a hand-written accumulation that syncs the first
micro-batch instead of the last), and a head re-initialised in ``on_train_start`` after a per-rank
seed (DDP broadcast rank 0's weights earlier, when it wrapped the model). The healthy runs cover
what a replica check must not mistake for drift: batch-norm running statistics (rank-local between
DDP's buffer broadcasts), ``broadcast_buffers=False``, a synchronised batch norm, gradient
accumulation, manual optimization with two optimizers, a correct hand-written ``no_sync``
accumulation.

Example:
    >>> sorted(case.name for case in CASES if not case.healthy)
    ['ddp-accumulation-syncs-first-micro-batch', 'ddp-critic-step-in-no-sync', 'ddp-head-reinit-per-rank-seed', 'ddp-running-mean-in-parameter']
    >>> all(is_distributed(case) for case in CASES)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from benchmarks.detection import zoo
from benchmarks.detection.cases import Built, Case

if TYPE_CHECKING:
    from benchmarks.detection.runner import CaseResult

REPLICAS_OUT_OF_SYNC = "replicas-out-of-sync"
WORLD_SIZE = 2
TIMEOUT_S = 300  # a hung collective must not hang the benchmark: both ranks are killed after this
_ROOT = Path(__file__).resolve().parents[2]
_RESULT = "distributed-result-{rank}.json"
_DDP_ENVIRONMENT = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
)


def is_distributed(case: Case) -> bool:
    """Whether ``case`` trains on several devices (then :func:`run_distributed_case` runs it).

    Example:
        >>> is_distributed(Case("c", True, frozenset(), lambda: None, "", {"max_steps": 1, "devices": 2}))
        True
    """
    return int(case.trainer_kwargs.get("devices", 1)) > 1


# ====================================================================== the pieces
class RunningInputCentering(nn.Module):
    """Subtracts a running mean of the inputs seen in training (an exponential moving average).

    The bug it carries: the mean is kept in an ``nn.Parameter(requires_grad=False)`` (so that it is
    saved with the weights) instead of a buffer. DDP all-reduces only gradients and broadcasts
    parameters once, when it wraps the model; a parameter without a gradient that each rank updates
    from its own batch is never synchronised again, so every rank centres its inputs differently
    (and the checkpoint keeps rank 0's mean).
    """

    def __init__(self, features: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(features), requires_grad=False)
        self.momentum = momentum

    def forward(self, inputs: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.lerp_(inputs.mean(dim=0), self.momentum)
        return inputs - self.mean


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """A batch norm whose batch statistics are pooled over every rank (``torch.nn.SyncBatchNorm`` runs
    on GPUs only): the all-reduce is differentiable, so the gradients are those of the pooled
    normalisation, and every rank's running statistics get the same update."""

    def forward(self, inputs: Tensor) -> Tensor:
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return super().forward(inputs)
        from torch.distributed.nn.functional import all_reduce

        channels = inputs.shape[1]
        flat = inputs.transpose(0, 1).reshape(channels, -1)
        count = torch.tensor([float(flat.shape[1])], dtype=inputs.dtype, device=inputs.device)
        pooled = all_reduce(torch.cat([flat.sum(dim=1), flat.square().sum(dim=1), count]))
        total = pooled[-1]
        mean = pooled[:channels] / total
        variance = (pooled[channels : 2 * channels] / total - mean.square()).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            unbiased = variance * total / (total - 1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
        shape = (1, channels, 1, 1)
        normalised = (inputs - mean.view(shape)) / torch.sqrt(variance.view(shape) + self.eps)
        return normalised * self.weight.view(shape) + self.bias.view(shape)


def _synchronised_batch_norms(network: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``network`` by a :class:`CpuSyncBatchNorm2d` (in place; returns it)."""
    for name, child in network.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = CpuSyncBatchNorm2d(child.num_features, child.eps, child.momentum)
            synced.load_state_dict(child.state_dict())
            setattr(network, name, synced)
        else:
            _synchronised_batch_norms(child)
    return network


class HeadReinitialisedPerRank(zoo.ZooModule):
    """Re-initialises the classifier head when training starts (a fine-tuning recipe).

    The bug it carries: the script seeds each rank differently first (``seed + global_rank``, meant for
    data augmentation), and the re-initialisation runs after DDP broadcast rank 0's weights, so every
    rank starts from a different head.
    """

    def on_train_start(self) -> None:
        torch.manual_seed(1234 + self.global_rank)
        head = self.net[-1]
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)


class CriticModule(pl.LightningModule):
    """Manual optimization with two optimizers: a classifier, and a critic that learns to predict each
    sample's loss from the classifier's (detached) logits, e.g. to weight or select samples.

    ``critic_in_no_sync``, the bug: the critic's backward *and* step run inside DDP's ``no_sync()``
    (copied from a gradient-accumulation recipe, where the context must be left before the step), so
    the critic's gradients are never all-reduced and each rank steps its critic with its own batch's.
    """

    def __init__(self, critic_in_no_sync: bool = False, lr: float = 1e-3) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.classifier = zoo.mlp([64, 128, 64, 10])
        self.critic = zoo.mlp([10, 32, 1])
        self.critic_in_no_sync = critic_in_no_sync
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = zoo.split_batch(batch)
        classifier_optimizer, critic_optimizer = self.optimizers()  # type: ignore[misc]
        logits = self.classifier(inputs)
        losses = nn.functional.cross_entropy(logits, targets, reduction="none")
        loss = losses.mean()
        classifier_optimizer.zero_grad()
        self.manual_backward(loss)
        classifier_optimizer.step()
        self.log("train_loss", loss, batch_size=len(targets))
        critic_loss = nn.functional.mse_loss(self.critic(logits.detach()).squeeze(1), losses.detach())
        critic_optimizer.zero_grad()
        context = self._no_sync() if self.critic_in_no_sync else contextlib.nullcontext()
        with context:
            self.manual_backward(critic_loss)
            critic_optimizer.step()
        return loss.detach()

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        model = self.trainer.strategy.model
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.Adam(self.classifier.parameters(), lr=self.lr),
            torch.optim.Adam(self.critic.parameters(), lr=self.lr),
        )


class NoSyncAccumulation(zoo.ZooModule):
    """Manual optimization with hand-written gradient accumulation over ``micro_batches`` batches:
    DDP's ``no_sync()`` around the backward of every micro-batch but the one before the step, so that
    the gradients are all-reduced once per step (the pattern of DDP's documentation).

    ``sync_first``, the bug: the test that picks the synchronised micro-batch is off by one and
    all-reduces the *first* micro-batch instead of the last; the last one's gradients are added
    locally after the all-reduce, and each rank steps with a different gradient.
    """

    def __init__(self, *args: Any, micro_batches: int = 2, sync_first: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.micro_batches = micro_batches
        self.sync_first = sync_first

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = zoo.split_batch(batch)
        optimizer = self.optimizers()
        position = batch_idx % self.micro_batches
        steps_now = position == self.micro_batches - 1
        synced = position == 0 if self.sync_first else steps_now
        loss = self.loss(self(inputs), targets)
        self.log("train_loss", loss, batch_size=len(targets))
        model = self.trainer.strategy.model
        context = model.no_sync() if not synced and hasattr(model, "no_sync") else contextlib.nullcontext()
        with context:
            self.manual_backward(loss / self.micro_batches)
        if steps_now:
            optimizer.step()  # type: ignore[union-attr]
            optimizer.zero_grad()  # type: ignore[union-attr]
        return loss.detach()


# ====================================================================== builders
def _digits_mlp() -> zoo.ZooModule:
    return zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3)


def _healthy_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, val_fraction=0.2)
    return _digits_mlp(), train, val


def _bn_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True, val_fraction=0.2)
    return (
        zoo.ZooModule(zoo.DigitsCNN(), nn.CrossEntropyLoss(), "adamw", lr=2e-3, weight_decay=1e-2),
        train,
        val,
    )


def _synced_bn_cnn() -> Built:
    module, train, val = _bn_cnn()
    _synchronised_batch_norms(module.net)
    return module, train, val


def _accumulating_mlp() -> Built:
    train, _ = zoo.digits_loaders(batch_size=32)
    return (
        zoo.ZooModule(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "sgd", lr=0.05, momentum=0.9),
        train,
        None,
    )


def _critic(critic_in_no_sync: bool) -> Callable[[], Built]:
    def build() -> Built:
        train, _ = zoo.digits_loaders(batch_size=64)
        return CriticModule(critic_in_no_sync=critic_in_no_sync), train, None

    return build


def _no_sync_accumulation(sync_first: bool) -> Callable[[], Built]:
    def build() -> Built:
        train, _ = zoo.digits_loaders(batch_size=32)
        network = zoo.mlp([64, 128, 64, 10])
        module = NoSyncAccumulation(network, nn.CrossEntropyLoss(), "adam", lr=1e-3, sync_first=sync_first)
        return module, train, None

    return build


def _running_mean_in_parameter() -> Built:
    train, _ = zoo.digits_loaders(batch_size=64)
    network = nn.Sequential(RunningInputCentering(64), *zoo.mlp([64, 128, 64, 10]))
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, None


def _head_reinit_per_rank_seed() -> Built:
    train, _ = zoo.digits_loaders(batch_size=64)
    module = HeadReinitialisedPerRank(zoo.mlp([64, 128, 64, 10]), nn.CrossEntropyLoss(), "adam", lr=1e-3)
    return module, train, None


def _ddp(max_steps: int, strategy: str = "ddp", **extra: Any) -> dict[str, Any]:
    """Trainer arguments of a 2-process case; ``strategy`` is Lightning's name or one of :data:`_STRATEGIES`."""
    return {"max_steps": max_steps, "devices": WORLD_SIZE, "strategy": strategy, **extra}


# strategies that need arguments: built in the rank processes, from the name the case holds
_STRATEGIES: dict[str, Callable[[], Any]] = {
    "ddp_no_broadcast_buffers": lambda: _ddp_strategy(broadcast_buffers=False),
}


def _ddp_strategy(**kwargs: Any) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(**kwargs)


CASES: tuple[Case, ...] = (
    # ------------------------------------------------------------------ healthy
    Case(
        "ddp-mlp-digits",
        True,
        frozenset(),
        _healthy_mlp,
        "2-process DDP (gloo): MLP on digits, Adam, with validation",
        _ddp(60),
    ),
    Case(
        "ddp-cnn-bn-digits",
        True,
        frozenset(),
        _bn_cnn,
        "2-process DDP: BatchNorm CNN on digits, default broadcast_buffers (running stats rank-local between broadcasts)",
        _ddp(60),
    ),
    Case(
        "ddp-cnn-bn-no-broadcast",
        True,
        frozenset(),
        _bn_cnn,
        "2-process DDP with broadcast_buffers=False: each rank keeps its own BatchNorm running stats (a choice, info at most)",
        _ddp(60, "ddp_no_broadcast_buffers"),
    ),
    Case(
        "ddp-cnn-sync-bn",
        True,
        frozenset(),
        _synced_bn_cnn,
        "2-process DDP, broadcast_buffers=False, batch norms with statistics pooled over ranks (SyncBatchNorm's rule, on CPU)",
        _ddp(60, "ddp_no_broadcast_buffers"),
    ),
    Case(
        "ddp-mlp-accumulate-4",
        True,
        frozenset(),
        _accumulating_mlp,
        "2-process DDP with accumulate_grad_batches=4 (Lightning skips the all-reduce on 3 of 4 micro-batches)",
        _ddp(40, accumulate_grad_batches=4),
    ),
    Case(
        "ddp-manual-critic",
        True,
        frozenset(),
        _critic(critic_in_no_sync=False),
        "2-process DDP, manual optimization: a classifier and a loss-predicting critic, two Adam optimizers",
        _ddp(120, "ddp_find_unused_parameters_true"),  # two steps per batch: 60 batches
    ),
    Case(
        "ddp-manual-no-sync-accumulation",
        True,
        frozenset(),
        _no_sync_accumulation(sync_first=False),
        "2-process DDP, manual optimization, accumulation over 2 micro-batches with no_sync() on all but the last",
        _ddp(40),
    ),
    # ------------------------------------------------------------------ faulty
    Case(
        "ddp-running-mean-in-parameter",
        False,
        frozenset({REPLICAS_OUT_OF_SYNC}),
        _running_mean_in_parameter,
        "2-process DDP: an input-centring running mean kept in nn.Parameter(requires_grad=False), updated from each "
        "rank's own batch (DDP never syncs it)",
        _ddp(60),
    ),
    Case(
        "ddp-critic-step-in-no-sync",
        False,
        frozenset({REPLICAS_OUT_OF_SYNC}),
        _critic(critic_in_no_sync=True),
        "2-process DDP, manual optimization: the critic's backward and step inside no_sync(), its gradients never "
        "all-reduced",
        _ddp(120, "ddp_find_unused_parameters_true"),
    ),
    Case(
        "ddp-accumulation-syncs-first-micro-batch",
        False,
        frozenset({REPLICAS_OUT_OF_SYNC}),
        _no_sync_accumulation(sync_first=True),
        "2-process DDP, hand-written accumulation off by one: no_sync() on the last micro-batch instead of the first, "
        "so its gradients are added after the all-reduce, per rank",
        _ddp(40),
    ),
    Case(
        "ddp-head-reinit-per-rank-seed",
        False,
        frozenset({REPLICAS_OUT_OF_SYNC}),
        _head_reinit_per_rank_seed,
        "2-process DDP: the head re-initialised in on_train_start after torch.manual_seed(1234 + global_rank), "
        "after DDP broadcast rank 0's weights",
        _ddp(60),
    ),
)


# ====================================================================== running (parent side)
# results trained ahead of their turn by :func:`prefetch`: (name, seed, root_dir) -> (result, calibration values)
_PREFETCHED: dict[tuple[str, int, str | None], tuple[CaseResult, list[Any]]] = {}


def run_distributed_case(
    case: Case, root_dir: str | None = None, threads: int | None = 1, accelerator: str = "cpu"
) -> CaseResult:
    """Train ``case`` in ``WORLD_SIZE`` processes and score rank 0's findings like any other case.

    The processes run on the CPU with gloo (``accelerator="gpu"`` uses CUDA only where the machine has
    at least ``WORLD_SIZE`` GPUs), with ``threads`` torch threads per rank (default 1). A case that
    :func:`prefetch` already trained is returned at once. While the benchmark records calibration
    margins (:func:`benchmarks.detection.calibration.probing`), the statistics that the rank-0
    process recorded are added to the recorder, tagged with the case it is running now.
    """
    outcome = _PREFETCHED.pop((case.name, case.seed, root_dir), None)
    if outcome is None:
        outcome = _train([case], [root_dir], threads, accelerator)[0]
    result, values = outcome
    _add_calibration(values)
    return result


def prefetch(
    cases: Sequence[Case], root_dir: str | None = None, threads: int | None = 1, accelerator: str = "cpu"
) -> None:
    """Train the distributed ones of ``cases`` now, all in one launch of the ranks (their start-up, seconds
    per process, is paid once); :func:`run_distributed_case` then returns each of them at once.

    With ``root_dir``, each case keeps its files under ``<root_dir>/<case name>`` (as
    :func:`benchmarks.detection.runner.run_cases` passes them).
    """
    chosen = [case for case in cases if is_distributed(case)]
    dirs = [None if root_dir is None else os.path.join(root_dir, case.name) for case in chosen]
    for case, case_dir, outcome in zip(chosen, dirs, _train(chosen, dirs, threads, accelerator), strict=True):
        _PREFETCHED[(case.name, case.seed, case_dir)] = outcome


def _add_calibration(values: list[Any]) -> None:
    from benchmarks.detection import calibration

    recorder = calibration.active_recorder()
    if recorder is None or not values:
        return
    index = {(probe.check, probe.statistic): i for i, probe in enumerate(calibration.PROBES)}
    for check, statistic, value in values:
        if (check, statistic) in index:
            recorder.values[index[(check, statistic)]].append((float(value), recorder.case))


def _train(
    cases: Sequence[Case], dirs: Sequence[str | None], threads: int | None, accelerator: str
) -> list[tuple[CaseResult, list[Any]]]:
    """Train ``cases`` in as few launches as possible: a case that hangs or kills its ranks is scored as
    crashed and the cases after it are launched again."""
    if not cases:
        return []
    with tempfile.TemporaryDirectory(prefix="sentinel-bench-ddp-") as temporary:
        roots = [
            directory if directory is not None else os.path.join(temporary, f"{i}-{case.name}")
            for i, (case, directory) in enumerate(zip(cases, dirs, strict=True))
        ]
        outcomes: dict[int, tuple[CaseResult, list[Any]]] = {}
        pending = list(range(len(cases)))
        while pending:
            records, failure, output = _launch(
                [cases[i] for i in pending], [roots[i] for i in pending], threads, accelerator
            )
            for i, record in zip(pending, records, strict=True):
                if record is not None:
                    outcomes[i] = (_result(cases[i], record), list(record.get("calibration", [])))
            missing = [i for i, record in zip(pending, records, strict=True) if record is None]
            if missing:
                print(output[-4000:], file=sys.stderr)
                # a hang is the first missing case's; an early exit with nothing written is everyone's
                blamed = (
                    missing
                    if failure.startswith("RuntimeError") and len(missing) == len(pending)
                    else missing[:1]
                )
                for i in blamed:
                    outcomes[i] = (_result(cases[i], {"error": failure}), [])
                missing = [i for i in missing if i not in blamed]
            pending = missing
        return [outcomes[i] for i in range(len(cases))]


def _launch(
    cases: Sequence[Case], roots: Sequence[str], threads: int | None, accelerator: str
) -> tuple[list[dict[str, Any] | None], str, str]:
    """Run the ranks once over ``cases``; ``(rank 0's record per case or None, the failure, the output)``.

    The ranks write one result file per case as they go; they are killed (both: they share a process
    group) when no case has finished for :data:`TIMEOUT_S` seconds.
    """
    if accelerator == "gpu" and torch.cuda.device_count() < WORLD_SIZE:
        accelerator = "cpu"
    results = [Path(root) / _RESULT.format(rank=0) for root in roots]
    for root in roots:
        os.makedirs(root, exist_ok=True)
        for stale in Path(root).glob(_RESULT.format(rank="*")):
            stale.unlink()
    environment = {key: value for key, value in os.environ.items() if key not in _DDP_ENVIRONMENT}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="sentinel-bench-ddp-launch-") as temporary:
        spec = Path(temporary, "cases.json")
        spec.write_text(
            json.dumps(
                [{"name": c.name, "seed": c.seed, "root": r} for c, r in zip(cases, roots, strict=True)]
            )
        )
        log = Path(temporary, "output.log")
        with log.open("w") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(spec), str(threads or 0), accelerator],
                cwd=_ROOT,
                env=environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # rank 1 joins this process group: a timeout kills both
            )
            failure = _watch(process, results)
        output = log.read_text(errors="replace")
    records = [json.loads(path.read_text()) if path.is_file() else None for path in results]
    return records, failure, output


def _watch(process: subprocess.Popen[Any], results: Sequence[Path]) -> str:
    """Wait for ``process``; kill its group when no result file appears for :data:`TIMEOUT_S` seconds.
    Returns ``""`` or what went wrong."""
    last_progress, finished = time.monotonic(), 0
    while process.poll() is None:
        done = sum(path.is_file() for path in results)
        if done > finished:
            last_progress, finished = time.monotonic(), done
        elif time.monotonic() - last_progress > TIMEOUT_S:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return (
                f"TimeoutError: the {WORLD_SIZE} ranks did not finish the case within {TIMEOUT_S} s (killed)"
            )
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a rank left behind by a crash of the other
    return (
        "" if process.returncode == 0 else f"RuntimeError: the ranks exited with status {process.returncode}"
    )


def _result(case: Case, record: dict[str, Any]) -> CaseResult:
    """The :class:`~benchmarks.detection.runner.CaseResult` of ``case`` from rank 0's record.

    Example:
        >>> case = CASES[0]
        >>> _result(case, {"error": "TimeoutError: killed"}).verdict
        'CRASHED'
    """
    from benchmarks.detection.runner import CaseResult, _unique, alarms, score
    from lightning_sentinel import Finding, Severity

    error = record.get("error")
    run_findings = [Finding.from_dict(finding) for finding in record.get("findings", [])]
    verdict, first_step = score(case.healthy, case.expected, run_findings, crashed=error is not None)
    return CaseResult(
        name=case.name,
        healthy=case.healthy,
        description=case.description,
        expected=tuple(sorted(case.expected)),
        reported=_unique(finding.check for finding in alarms(run_findings)),
        info=_unique(finding.check for finding in run_findings if finding.severity is Severity.INFO),
        verdict=verdict,
        first_detection_step=first_step,
        seconds=float(record.get("seconds", 0.0)),
        steps=int(record.get("steps", 0)),
        loss_start=float(record.get("loss_start", float("nan"))),
        loss_end=float(record.get("loss_end", float("nan"))),
        sentinel_warnings=int(record.get("sentinel_warnings", 0)),
        findings=run_findings,
        error=error,
        architecture=str(record.get("architecture", "")),
    )


# ====================================================================== training (rank side)
def _strategy(name: str) -> Any:
    build = _STRATEGIES.get(name)
    return build() if build is not None else name


def train_rank(name: str, root_dir: str, seed: int, accelerator: str = "cpu") -> dict[str, Any]:
    """This process's rank of one case: train it under ``Sentinel(preset="full", on_detect="warn")`` with
    the calibration probes on, and write ``<root_dir>/distributed-result-<rank>.json``."""
    from benchmarks.detection import calibration
    from benchmarks.detection.cases import get_case
    from benchmarks.detection.runner import LossRecorder, _quiet, architecture_of, bench_preset
    from lightning_sentinel import Sentinel, SentinelWarning, findings

    case = dataclasses.replace(get_case(name), seed=seed)
    settings: dict[str, Any] = {
        "accelerator": accelerator,
        "logger": False,
        "default_root_dir": root_dir,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        **case.trainer_kwargs,
    }
    settings["strategy"] = _strategy(str(settings.get("strategy", "ddp")))
    loss_recorder = LossRecorder()
    recorder = calibration.Recorder(case=case.name)
    error = None
    started = time.perf_counter()
    with _quiet() as caught, calibration.probing(recorder):
        pl.seed_everything(case.seed, verbose=False)
        module, train_loader, val_loader = case.build()
        architecture = architecture_of(module)
        trainer = pl.Trainer(
            callbacks=[Sentinel(preset=bench_preset(), on_detect="warn"), loss_recorder], **settings
        )
        try:
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        except Exception as exception:  # scored as a crash of this case, not of the benchmark
            error = f"{type(exception).__name__}: {exception}"
            traceback.print_exc()
    loss_start, loss_end = loss_recorder.start_and_end()
    record = {
        "case": case.name,
        "rank": trainer.global_rank,
        "seconds": time.perf_counter() - started,
        "steps": int(trainer.global_step),
        "loss_start": loss_start,
        "loss_end": loss_end,
        "findings": [finding.to_dict() for finding in findings(trainer)],
        "sentinel_warnings": sum(issubclass(w.category, SentinelWarning) for w in caught),
        "error": error,
        "architecture": architecture,
        "calibration": [
            [calibration.PROBES[index].check, calibration.PROBES[index].statistic, value]
            for index, pairs in sorted(recorder.values.items())
            for value, _ in pairs
        ],
    }
    os.makedirs(root_dir, exist_ok=True)
    path = Path(root_dir) / _RESULT.format(rank=trainer.global_rank)
    path.write_text(json.dumps(record, default=str))  # a file per rank: the ranks share one stdout
    return record


def main(argv: Sequence[str]) -> int:
    """``python -m benchmarks.detection.cases_distributed SPEC.json THREADS ACCELERATOR``: train the cases
    that ``SPEC.json`` lists (``[{"name", "seed", "root"}, ...]``) one after the other, in this rank."""
    spec, threads, accelerator = argv
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    failed = False
    for entry in json.loads(Path(spec).read_text()):
        record = train_rank(entry["name"], entry["root"], int(entry["seed"]), accelerator)
        failed = failed or record["error"] is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
