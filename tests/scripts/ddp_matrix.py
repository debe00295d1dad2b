"""2-process CPU DDP (gloo) scenarios for tests/test_matrix_ddp.py; each rank writes ``ROOT/result-<rank>.json``.

Usage: ``python ddp_matrix.py SCENARIO ROOT [STRATEGY]`` (STRATEGY: ``ddp`` (default) or ``ddp_spawn``).
"""

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _models import Classifier, classification_loader

from lightning_sentinel import GradientNormMonitor, Sentinel, SentinelError, SentinelWarning, findings


class NaNOnRankOne(Classifier):
    """Rank 1 only: the loss turns NaN from optimizer step ``nan_step`` on."""

    def __init__(self, nan_step: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.global_rank == 1 and self.global_step >= self.nan_step:
            logits = logits / 0.0
        return torch.nn.functional.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


class IgnoresInput(NaNOnRankOne):
    """A model whose output does not depend on its input (preflight trials must say so on both ranks)."""

    def forward(self, x):
        return self.net(x * 0.0)


class ScaledOnRankOne(NaNOnRankOne):
    """Rank 1's inputs are 1000x larger: only the statistics pooled over both ranks are unnormalized."""


def scaled_loader(rank: int):
    loader = classification_loader(n=256)
    if rank == 1:
        dataset = loader.dataset
        dataset.tensors = (dataset.tensors[0] * 1000.0, dataset.tensors[1])
    return loader


def _break_gradient_monitor_on_rank_one(callbacks) -> None:
    """Make GradientNormMonitor's own code fail on rank 1 only (it disables itself there, not on rank 0)."""
    for check in callbacks.checks:
        if isinstance(check, GradientNormMonitor):
            original = check._run_gradient_check

            def failing(trainer, *args, _original=original):
                if trainer.global_rank == 1:
                    raise RuntimeError("injected failure on rank 1")
                return _original(trainer, *args)

            check._run_gradient_check = failing


def main(scenario: str, root: str, strategy: str = "ddp") -> None:
    if strategy == "ddp_spawn":  # tensors sent to the spawned ranks: avoid /dev/shm (tiny in containers)
        torch.multiprocessing.set_sharing_strategy("file_system")
    pl.seed_everything(0, verbose=False)
    module: pl.LightningModule = NaNOnRankOne(nan_step=10_000)
    sentinel = Sentinel(on_detect="stop")
    max_steps, val = 24, None
    train = classification_loader()
    if scenario == "full-healthy":
        sentinel, val = Sentinel(preset="full", on_detect="raise"), classification_loader(seed=1)
        max_steps = 16
    elif scenario == "nan-stop":
        module = NaNOnRankOne(nan_step=3)
    elif scenario == "nan-default":
        module, sentinel = NaNOnRankOne(nan_step=3), Sentinel()
    elif scenario == "nan-warn":
        module, sentinel = NaNOnRankOne(nan_step=3), Sentinel(on_detect="warn")
        max_steps = 8
    elif scenario == "crash-rank1":
        module = NaNOnRankOne(nan_step=6)
        _break_gradient_monitor_on_rank_one(sentinel)
    elif scenario == "crash-rank1-raise":
        module, sentinel = NaNOnRankOne(nan_step=6), Sentinel(on_detect="raise")
        _break_gradient_monitor_on_rank_one(sentinel)
    elif scenario == "preflight-raise":
        module, sentinel = IgnoresInput(nan_step=10_000), Sentinel(preset="full", on_detect="raise")
    elif scenario == "scaled-rank1":
        module, sentinel = ScaledOnRankOne(nan_step=10_000), Sentinel(on_detect="warn")
        max_steps = (
            20  # BatchInspector's first window: 5 sampled batches (steps 0, 1, 2, 4, 8), 320 rows pooled
        )
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[sentinel],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        limit_val_batches=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SentinelWarning)
        try:
            if scenario == "scaled-rank1":
                trainer.fit(module, _RankScaledData())
            else:
                trainer.fit(module, train, val)
            outcome = "stopped" if trainer.should_stop else "finished"
        except SentinelError as error:
            outcome = f"raised:{error.finding.check}"
    record = {
        "rank": trainer.global_rank,
        "outcome": outcome,
        "step": trainer.global_step,
        "findings": [[f.check, f.where, f.step, f.severity.value] for f in findings(trainer)],
        "warnings": [str(w.message)[:200] for w in caught if issubclass(w.category, SentinelWarning)],
    }
    # a file per rank: the ranks share one stdout, where lines from two processes can interleave
    (Path(root) / f"result-{trainer.global_rank}.json").write_text(json.dumps(record))


class _RankScaledData(pl.LightningDataModule):
    def train_dataloader(self):
        return scaled_loader(self.trainer.global_rank)


if __name__ == "__main__":
    main(*sys.argv[1:])
