"""Tiny models and a fit helper shared by the tests (synthetic data, CPU, seconds)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sentinel import SentinelWarning


def classification_loader(n: int = 256, features: int = 8, batch_size: int = 32, seed: int = 0) -> DataLoader:
    """A shuffled 3-class problem on standardised features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)


def deep_mlp(
    depth: int, activation: Callable[[], nn.Module] = nn.ReLU, randn_init: bool = False
) -> nn.Sequential:
    """An MLP 8 -> 32 x (depth - 1) -> 3 with ``depth`` linear layers (``net.0``, ``net.2``, ...).

    ``randn_init``: the classic bad init, N(0, 1) weights instead of ~1/sqrt(fan_in); with ReLU the signal
    grows ~4x per layer, so gradients explode with depth.
    """
    layers: list[nn.Module] = [nn.Linear(8, 32), activation()]
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), activation()]
    net = nn.Sequential(*layers, nn.Linear(32, 3))
    if randn_init:
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=1.0)
    return net


class Classifier(pl.LightningModule):
    """An MLP classifier; ``transform`` may corrupt the logits inside ``training_step``."""

    def __init__(
        self,
        net: nn.Module | None = None,
        lr: float = 0.05,
        transform: Callable[[Tensor, int], Tensor] | None = None,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        self.lr = lr
        self.transform = transform
        self.optimizer_name = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        if self.transform is not None:
            logits = self.transform(logits, self.global_step)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class MetricsRecorder(Logger):
    """A logger that keeps the last value of every metric it is given, in ``metrics``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update({name: float(value) for name, value in metrics.items()})

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def fit(
    module: pl.LightningModule,
    callbacks: list[pl.Callback],
    loader: DataLoader | None = None,
    root: Any = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Fit quietly on CPU and return the trainer (SentinelWarnings are recorded on ``trainer.sentinel_warnings``)."""
    settings: dict[str, Any] = {
        "max_steps": 30,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(trainer_kwargs)
    if root is not None:
        settings["default_root_dir"] = str(root)
    ckpt_path = settings.pop("ckpt_path", None)
    trainer = pl.Trainer(callbacks=callbacks, **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SentinelWarning)
        try:
            trainer.fit(
                module, loader if loader is not None else classification_loader(), ckpt_path=ckpt_path
            )
        finally:
            trainer.sentinel_warnings = [w for w in caught if issubclass(w.category, SentinelWarning)]  # type: ignore[attr-defined]
    return trainer


class TwoOptimizers(Classifier):
    """Manual optimization: a body and a head, each with its own optimizer, both stepped every batch.

    ``make_optimizers(module)`` returns the (body, head) optimizers; default SGD at lr 0.01 each.
    """

    def __init__(self, make_optimizers: Callable[[TwoOptimizers], Any] | None = None) -> None:
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU()))
        self.head = nn.Linear(32, 3)
        self.automatic_optimization = False
        self.make_optimizers = make_optimizers

    def training_step(self, batch: Any, batch_idx: int) -> None:
        body, head = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.net(x)), y)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()

    def configure_optimizers(self) -> Any:
        if self.make_optimizers is not None:
            return self.make_optimizers(self)
        return torch.optim.SGD(self.net.parameters(), lr=0.01), torch.optim.SGD(
            self.head.parameters(), lr=0.01
        )
