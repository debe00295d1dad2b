"""Cost of NaN/Inf detection on a healthy run: NonFiniteGuard and Sentinel against ``detect_anomaly=True``.

A benchmark, not a test. Variants are interleaved (A B C ... A B C ...) so drift of the machine
hits all alike; each variant's time per training step is the median over its repeats of the
mean step time, measured between ``on_train_batch_start`` and ``on_train_batch_end``.

Run: ``python -m benchmarks.nan_guard_cost [--repeats 5] [--steps 200]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sentinel import GradientNormMonitor, NonFiniteGuard, Sentinel


class StepTimer(pl.Callback):
    """Wall time of each training step, callbacks included: ``starter`` goes first in the callback
    list (its ``on_train_batch_start`` runs before any other callback's), the timer itself last."""

    def __init__(self, skip: int = 10) -> None:
        self.skip = skip
        self.times: list[float] = []
        self._start = 0.0
        timer = self

        class _Starter(pl.Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                timer._start = time.perf_counter()

        self.starter = _Starter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._start)


class Workload(pl.LightningModule):
    """A classifier over either an MLP or a small CNN with batch-norm."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "mlp":
            self.net: nn.Module = nn.Sequential(
                nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
            )
        else:
            self.net = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1, stride=2),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(64, 10),
            )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _loader(kind: str, steps: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    shape = (64,) if kind == "mlp" else (3, 32, 32)
    x = torch.randn(64 * steps, *shape, generator=generator)
    y = torch.randint(0, 10, (64 * steps,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=64)


VARIANTS: dict[str, tuple[Callable[[], list[pl.Callback]], dict[str, Any]]] = {
    "bare": (list, {}),
    "empty Callback (Lightning's dispatch floor)": (lambda: [pl.Callback()], {}),
    "NonFiniteGuard()": (lambda: [NonFiniteGuard()], {}),
    "NonFiniteGuard(every_n_steps=1)": (lambda: [NonFiniteGuard(every_n_steps=1)], {}),
    "GradientNormMonitor()": (lambda: [GradientNormMonitor()], {}),
    'Sentinel(preset="fast")': (lambda: [Sentinel()], {}),
    "detect_anomaly=True": (list, {"detect_anomaly": True}),
}


def time_variant(kind: str, name: str, steps: int) -> float:
    """Mean seconds per training step of one run of ``name`` on workload ``kind``."""
    make_callbacks, trainer_kwargs = VARIANTS[name]
    timer = StepTimer()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=[timer.starter, *make_callbacks(), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(Workload(kind), _loader(kind, steps))
    return statistics.fmean(timer.times)


def main(argv: list[str] | None = None) -> None:
    """Print a markdown table of step time ratios to the bare run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, lightning {pl.__version__}, threads {torch.get_num_threads()}")
    print("| workload | variant | ms/step (median of runs) | ratio to bare |")
    print("|---|---|---|---|")
    for kind in args.workloads:
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name in VARIANTS:
                samples[name].append(time_variant(kind, name, args.steps))
        bare = statistics.median(samples["bare"])
        for name, values in samples.items():
            value = statistics.median(values)
            print(f"| {kind} | {name} | {value * 1e3:.3f} | {value / bare:.3f}x |")


if __name__ == "__main__":
    main()
