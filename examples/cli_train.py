"""Train a small classifier on scikit-learn's bundled digits with LightningCLI, watched by lightning-sentinel.

The sentinel is switched on from YAML only; this script knows nothing about it::

    python examples/cli_train.py fit --config examples/sentinel.yaml
    python examples/cli_train.py fit --config examples/sentinel.yaml --config examples/broken.yaml
    tensorboard --logdir lightning_logs

The first run is healthy and ends with ``lightning-sentinel: all N checks passed``. The second
feeds raw 0..16 pixels and puts a softmax in front of ``cross_entropy``; the end-of-fit report
names both faults (``unnormalized-inputs``, ``softmax-before-cross-entropy``) with what to try.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsData(pl.LightningDataModule):
    """scikit-learn's 8x8 digits (1797 images, 10 classes, bundled: nothing is downloaded).

    Args:
        batch_size: samples per batch.
        standardize: scale each pixel to zero mean and unit variance (``False`` keeps raw 0..16 values).
        val_fraction: share of the samples held out for validation.
        limit: use only the first ``limit`` samples (``None``: all), for quick runs.
    """

    def __init__(
        self,
        batch_size: int = 64,
        standardize: bool = True,
        val_fraction: float = 0.2,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.standardize = standardize
        self.val_fraction = val_fraction
        self.limit = limit

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
        features = torch.tensor(digits.data, dtype=torch.float32)[order]
        labels = torch.tensor(digits.target, dtype=torch.long)[order]
        if self.limit is not None:
            features, labels = features[: self.limit], labels[: self.limit]
        n_val = int(len(labels) * self.val_fraction)
        train_x, val_x = features[n_val:], features[:n_val]
        if self.standardize:
            mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-3)
            train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
        self.train_set = TensorDataset(train_x, labels[n_val:])
        self.val_set = TensorDataset(val_x, labels[:n_val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(pl.LightningModule):
    """A two-hidden-layer MLP on the 64 pixels.

    Args:
        hidden: width of the hidden layers.
        dropout: dropout after each hidden layer.
        lr: AdamW learning rate.
        softmax_output: a classic bug: apply softmax before ``cross_entropy`` (which expects logits).
    """

    def __init__(
        self, hidden: int = 64, dropout: float = 0.1, lr: float = 3e-3, softmax_output: bool = False
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        return logits.softmax(-1) if self.hparams.softmax_output else logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        output = self(x)
        self.log("val_loss", nn.functional.cross_entropy(output, y), prog_bar=True)
        self.log("val_acc", (output.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main(args: Sequence[str] | None = None) -> LightningCLI:
    """Run LightningCLI on the digits model and data (``args``: command-line arguments, default ``sys.argv``)."""
    return LightningCLI(
        DigitsClassifier,
        DigitsData,
        args=None if args is None else list(args),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
