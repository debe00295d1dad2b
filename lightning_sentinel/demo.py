"""The ``lightning-sentinel demo``: one healthy and two broken trainings on synthetic data.

Everything is made here (no download): a 3-class problem on 16 float features.

Example:
    >>> from lightning_sentinel.demo import make_data
    >>> loader = make_data(n=64, batch_size=16)
    >>> len(loader)
    4
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sentinel.findings import Finding, SentinelWarning, findings
from lightning_sentinel.suite import Sentinel


def make_data(n: int = 1024, batch_size: int = 64, seed: int = 0) -> DataLoader:
    """A shuffled loader of a separable 3-class problem on 16 standardised features."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 16, generator=generator)
    labels = (features[:, 0] > 0).long() + (features[:, 1] > 0.5).long()
    return DataLoader(
        TensorDataset(features, labels), batch_size=batch_size, shuffle=True, generator=generator
    )


class DemoDataModule(pl.LightningDataModule):
    """The demo's synthetic 3-class data as a DataModule (for LightningCLI configs).

    Args:
        n: number of samples.
        batch_size: batch size.
        permute_labels: a data bug: labels shuffled independently of the inputs.

    Example:
        >>> len(DemoDataModule(n=128, batch_size=32).train_dataloader())
        4
    """

    def __init__(self, n: int = 1024, batch_size: int = 64, permute_labels: bool = False) -> None:
        super().__init__()
        self.n = n
        self.batch_size = batch_size
        self.permute_labels = permute_labels

    def train_dataloader(self) -> DataLoader:
        loader = make_data(n=self.n, batch_size=self.batch_size)
        if not self.permute_labels:
            return loader
        features, labels = loader.dataset.tensors  # type: ignore[attr-defined]
        shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
        return DataLoader(TensorDataset(features, shuffled), batch_size=self.batch_size, shuffle=True)


class SafeLogNormalizer(nn.Module):
    """A layer meant to compress large activations with ``log``; it forgets that inputs can be negative."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x + 1.0)


class DemoClassifier(pl.LightningModule):
    """A small MLP classifier; ``fault`` picks a classic bug: ``"log-of-negative"`` or ``"lr-too-high"``."""

    def __init__(self, fault: str | None = None) -> None:
        super().__init__()
        self.fault = fault
        layers: list[nn.Module] = [nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64)]
        if fault == "log-of-negative":
            layers.append(SafeLogNormalizer())
        layers += [nn.ReLU(), nn.Linear(64, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        features, labels = batch
        loss = nn.functional.cross_entropy(self(features), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        learning_rate = 400.0 if self.fault == "lr-too-high" else 0.05
        return torch.optim.SGD(self.parameters(), lr=learning_rate, momentum=0.9)


@dataclass
class DemoResult:
    """What one demo training found."""

    title: str
    steps: int
    seconds: float
    findings: list[Finding]


def run_one(title: str, fault: str | None, max_steps: int = 150) -> DemoResult:
    """Train one demo model with ``Sentinel()`` and collect its findings."""
    pl.seed_everything(0, verbose=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore", SentinelWarning)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a Lightning-internal deprecation
        trainer = pl.Trainer(
            max_steps=max_steps,
            callbacks=[Sentinel()],
            default_root_dir=root,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(DemoClassifier(fault), make_data())
    return DemoResult(title, trainer.global_step, time.perf_counter() - started, findings(trainer))


def run_demo(print_fn: type[print] = print) -> list[DemoResult]:  # type: ignore[valid-type]
    """Run the healthy model and two broken ones; print what was found and what to try."""
    runs = [
        ("healthy MLP", None),
        ("MLP with a log() of negative activations", "log-of-negative"),
        ("MLP with learning rate 400", "lr-too-high"),
    ]
    results = []
    for title, fault in runs:
        result = run_one(title, fault)
        results.append(result)
        print_fn(f"\n=== {title}: {result.steps} steps in {result.seconds:.1f}s ===")
        if not result.findings:
            print_fn("  no findings: all checks passed.")
        for finding in result.findings:
            print_fn(f"  {finding.format()}")
            if finding.hint:
                print_fn(f"      try: {finding.hint}")
    return results
