"""2-process CPU DDP (gloo) runs for tests/test_replicas.py: replicas kept in sync, and replicas that drift apart.

Usage: ``python ddp_replicas.py ROOT SCENARIO [SCENARIO ...]``. The scenarios run one after the other
in the same two processes (one launch: Lightning starts rank 1 once, and every later Trainer reuses the
process group). Each rank writes ``ROOT/<scenario>-rank<r>.json`` per scenario: the findings, the outcome,
and what the scenario measures besides (per-batch collective counts, batch-norm statistics).

``SyncBatchNorm`` refuses CPU tensors, so ``CpuSyncBatchNorm`` stands in: a ``torch.nn.SyncBatchNorm``
whose training forward pools the batch moments of every rank with a gloo all-reduce and updates the
running statistics from the pooled ones, the same on every rank, as the real one does on GPUs (DDP's
refusal of SyncBatchNorm layers in a CPU module is lifted for it, in this script only).
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _models import Classifier, classification_loader

from lightning_sentinel import ReplicaSyncMonitor, Sentinel, SentinelWarning, findings

# ---------------------------------------------------------------------- counting collectives
_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)
REPLICAS_FILE = str(Path("lightning_sentinel", "checks", "replicas.py"))


class CollectiveCounter(pl.Callback):
    """Counts the torch.distributed collectives issued from lightning_sentinel/checks/replicas.py, per batch.

    Put it first in the callback list: its ``on_train_batch_start`` opens the batch the later calls
    are counted in (index 1 for the first batch); calls outside any batch count under 0.
    """

    def __init__(self) -> None:
        self.batch = 0
        self.calls: Counter[int] = Counter()
        self.other_calls = 0
        self._originals: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        for name in _COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._counting(original))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _counting(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.endswith(REPLICAS_FILE):
                frame = frame.f_back
            if frame is not None:
                self.calls[self.batch] += 1
            else:
                self.other_calls += 1
            return original(*args, **kwargs)

        return counted

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch += 1


class BatchNormStatistics(pl.Callback):
    """Records, at every batch end, the norm of the first batch norm's running mean and of the first weight (per rank)."""

    def __init__(self) -> None:
        self.running_mean: list[float] = []
        self.weight: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        norm = next(m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        self.running_mean.append(float(norm.running_mean.norm()))
        self.weight.append(float(next(pl_module.parameters()).detach().norm()))


# ---------------------------------------------------------------------- models
class CpuSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` for 2D inputs on the CPU: batch moments pooled over ranks with a gloo all-reduce."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return nn.functional.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        count = torch.tensor([float(input.shape[0])])
        moments = torch.cat([input.sum(0), (input * input).sum(0), count])
        pooled = dist_nn.all_reduce(moments)
        channels = input.shape[1]
        total = pooled[-1]
        mean = pooled[:channels] / total
        var = pooled[channels : 2 * channels] / total - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * total / (total - 1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
        return (input - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def _allow_cpu_sync_batchnorm() -> None:
    """DDP refuses any SyncBatchNorm in a CPU module at wrap time; let the stand-in through."""
    check = DistributedDataParallel._passing_sync_batchnorm_handle

    def passing(self: DistributedDataParallel, module: nn.Module) -> None:
        if not any(isinstance(layer, CpuSyncBatchNorm) for layer in module.modules()):
            check(self, module)

    DistributedDataParallel._passing_sync_batchnorm_handle = passing  # type: ignore[method-assign]


def bn_net(norm: type[nn.Module] = nn.BatchNorm1d) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), norm(32), nn.ReLU(), nn.Linear(32, 3))


class CenteredClassifier(Classifier):
    """Subtracts a running mean of its inputs, kept in a frozen Parameter and updated from the rank's own batch.

    The fault: nothing pools the update over ranks, and DDP never re-broadcasts parameters, so every
    rank's ``input_mean`` follows its own data (an all_reduce of ``x.mean(0)`` first would fix it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_mean = nn.Parameter(torch.zeros(8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.input_mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.net(x - self.input_mean)


class ClampOnRankZero(Classifier):
    """A weight constraint (clamp to +-0.1) put inside the ``is_global_zero`` block that logs: rank 0 only."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.is_global_zero:
            with torch.no_grad():
                self.net[0].weight.clamp_(-0.1, 0.1)


class ReinitHeadPerRank(Classifier):
    """Re-initialises its head at train start (after DDP's broadcast) with a seed that depends on the rank."""

    def on_train_start(self) -> None:
        torch.manual_seed(1234 + self.global_rank)
        self.net[2].reset_parameters()


class ManualAccumulation(Classifier):
    """Manual optimization accumulating 2 micro-batches; ``bug``: ``no_sync()`` also around the stepping backward."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.bug = bug

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        x, y = batch
        steps = (batch_idx + 1) % 2 == 0
        accumulating = self.trainer.model.no_sync() if (self.bug or not steps) else contextlib.nullcontext()
        with accumulating:
            loss = nn.functional.cross_entropy(self(x), y) / 2
            self.manual_backward(loss)
        if steps:
            optimizer.step()
            optimizer.zero_grad()


class TwoRates(Classifier):
    """Manual optimization: the encoder steps every batch, the head every 2nd, accumulating under ``no_sync()``.

    The fault: the encoder's optimizer also steps on the accumulating batches, on gradients that
    ``no_sync()`` kept rank-local. Only the encoder drifts; the head's accumulated gradients are
    all-reduced by the next synchronised backward.
    """

    def __init__(self) -> None:
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU()))
        self.head = nn.Linear(32, 3)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        encoder, head = self.optimizers()
        x, y = batch
        head_steps = (batch_idx + 1) % 2 == 0
        with contextlib.nullcontext() if head_steps else self.trainer.model.no_sync():
            self.manual_backward(nn.functional.cross_entropy(self.head(self.net(x)), y))
        encoder.step()
        encoder.zero_grad()
        if head_steps:
            head.step()
            head.zero_grad()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net.parameters(), lr=0.05), torch.optim.SGD(
            self.head.parameters(), lr=0.05
        )


class RankLocalScale(Classifier):
    """A frozen per-rank parameter, rank-local by design (``ignore`` names it): healthy."""

    def __init__(self) -> None:
        super().__init__()
        self.rank_local_scale = nn.Parameter(torch.ones(1), requires_grad=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.rank_local_scale.fill_(1.0 + self.global_rank)


class TinyGPT2(pl.LightningModule):
    """A Hugging Face GPT-2 built from a tiny config (random weights, tied embeddings, dict batches)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=16)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_loader(n: int = 512) -> torch.utils.data.DataLoader:
    """Counting sequences modulo the vocabulary, from random starts: ``{"input_ids", "labels"}`` dicts."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 40, (n, 1), generator=generator)
    ids = (starts + torch.arange(12)) % 40
    rows = [{"input_ids": row, "labels": row} for row in ids]
    return torch.utils.data.DataLoader(rows, batch_size=16, shuffle=True, generator=generator)


# ---------------------------------------------------------------------- scenarios
def _fail_on_rank_one(monitor: ReplicaSyncMonitor, at_call: int) -> None:
    """Make the monitor's fingerprint raise on rank 1 from its ``at_call``-th call on."""
    original, calls = monitor._fingerprint, [0]

    def failing(pl_module: pl.LightningModule, device: torch.device) -> torch.Tensor:
        calls[0] += 1
        if pl_module.global_rank == 1 and calls[0] >= at_call:
            raise RuntimeError("injected failure on rank 1")
        return original(pl_module, device)

    monitor._fingerprint = failing  # type: ignore[method-assign]


def scenario(name: str) -> dict[str, Any]:
    """What to fit: ``module``, ``callbacks`` (the suite last), ``trainer`` kwargs, and extra probes."""
    settings: dict[str, Any] = {"max_steps": 16}
    plan_loader = classification_loader(n=512)
    sentinel: pl.Callback = Sentinel()
    extra: list[pl.Callback] = []
    if name == "healthy-plain":
        module: pl.LightningModule = Classifier()
    elif name == "healthy-bn":
        module = Classifier(net=bn_net())
        extra = [BatchNormStatistics()]
    elif name == "healthy-bn-no-broadcast":
        module, settings["strategy"] = Classifier(net=bn_net()), DDPStrategy(broadcast_buffers=False)
    elif name == "healthy-syncbn":
        module = Classifier(net=bn_net(CpuSyncBatchNorm))
        extra = [BatchNormStatistics()]
    elif name == "healthy-accumulate":
        module, settings["accumulate_grad_batches"] = Classifier(net=bn_net()), 2
    elif name == "healthy-manual":
        module = ManualAccumulation(bug=False)
    elif name == "healthy-gpt2":
        module, plan_loader = TinyGPT2(), token_loader()
    elif name == "healthy-ignore":
        module = RankLocalScale()
        sentinel = Sentinel(checks=[ReplicaSyncMonitor(ignore=[r"^rank_local_"])])
    elif name == "fault-ema-center":
        module = CenteredClassifier()
    elif name == "fault-clamp-rank-zero":
        module = ClampOnRankZero()
    elif name == "fault-reinit-head":
        module = ReinitHeadPerRank()
    elif name == "fault-reinit-head-stop":
        module, sentinel = ReinitHeadPerRank(), Sentinel(on_detect="stop")
    elif name == "fault-no-sync-step":
        module = ManualAccumulation(bug=True)
    elif name == "fault-no-sync-encoder":
        module = TwoRates()
    elif name == "count":
        # healthy: batch norm, accumulating 2 batches, checked every 3rd optimizer step (after batches 2, 8, 14, 20)
        module, settings["accumulate_grad_batches"], settings["max_steps"] = Classifier(net=bn_net()), 2, 10
        sentinel = Sentinel(checks=[ReplicaSyncMonitor()], every_n_steps=3)
        extra = [CollectiveCounter(), BatchNormStatistics()]
    elif name == "crash-rank1":
        # the check's own code fails on rank 1 only, at its second check (batch 11): both ranks switch it off
        module, monitor = Classifier(), ReplicaSyncMonitor(every_n_steps=2)
        sentinel, extra = Sentinel(checks=[monitor]), [CollectiveCounter()]
        _fail_on_rank_one(monitor, at_call=2)
    else:
        raise SystemExit(f"unknown scenario {name}")
    return {
        "module": module,
        "callbacks": [*extra, sentinel],
        "settings": settings,
        "extra": extra,
        "loader": plan_loader,
    }


def run(name: str, root: Path) -> None:
    pl.seed_everything(0, verbose=False)
    plan = scenario(name)
    settings = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", **plan["settings"]}
    trainer = pl.Trainer(
        callbacks=plan["callbacks"],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root / name),
        **settings,
    )
    counter = next((c for c in plan["extra"] if isinstance(c, CollectiveCounter)), None)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SentinelWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        if counter is not None:
            counter.install()
        try:
            trainer.fit(plan["module"], plan["loader"])
        except Exception:
            error = traceback.format_exc()
        finally:
            if counter is not None:
                counter.uninstall()
    record: dict[str, Any] = {
        "rank": trainer.global_rank,
        "error": error,
        "step": trainer.global_step,
        "stopped": bool(trainer.should_stop),
        "findings": [
            {
                "check": f.check,
                "where": f.where,
                "step": f.step,
                "severity": f.severity.value,
                "message": f.message,
                "evidence": f.evidence,
            }
            for f in findings(trainer)
        ],
        "warnings": [str(w.message)[:300] for w in caught if issubclass(w.category, SentinelWarning)],
    }
    monitors = [c for s in plan["callbacks"] if isinstance(s, Sentinel) for c in s.checks]
    monitor = next((c for c in monitors if isinstance(c, ReplicaSyncMonitor)), None)
    if monitor is not None:
        record["compared"] = [name for name, _, _ in monitor._tensors]
    for callback in plan["extra"]:
        if isinstance(callback, CollectiveCounter):
            record["replica_collectives"] = {
                str(batch): count for batch, count in sorted(callback.calls.items())
            }
            record["batches"] = callback.batch
        if isinstance(callback, BatchNormStatistics):
            record["running_mean_norms"] = callback.running_mean
            record["weight_norms"] = callback.weight
    # a file per rank: the ranks share one stdout, where lines from two processes can interleave
    (root / f"{name}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    torch.set_num_threads(1)
    _allow_cpu_sync_batchnorm()
    out = Path(sys.argv[1])
    for scenario_name in sys.argv[2:]:
        run(scenario_name, out)
