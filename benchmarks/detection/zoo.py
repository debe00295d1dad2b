"""Models, losses and data of the detection benchmark: small, seeded, CPU-fast, nothing downloaded.

Data come from scikit-learn's *bundled* datasets (``load_digits``, ``load_diabetes``,
``load_breast_cancer``) or are synthetic. Every network trains on a CPU in a few seconds. The
broken pieces (``LogFeatures``, ``NLLOfProbabilities``, ``PairwiseContrastiveLoss``, ``normal_init_``)
are small, plausible bugs; :mod:`benchmarks.detection.cases` combines them into fault cases.

Example:
    >>> train, val = digits_loaders(batch_size=32)
    >>> inputs, targets = next(iter(train))
    >>> tuple(inputs.shape), val is None
    ((32, 64), True)
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

OptimizerName = Literal["adam", "adamw", "sgd"]
Loaders = tuple[DataLoader, DataLoader | None]

INPUTS_KEY = "inputs"
TARGETS_KEY = "targets"


# ====================================================================== data
class DictDataset(Dataset):
    """Rows of equally long tensors, served as ``{name: row}`` dicts (collated into dict batches)."""

    def __init__(self, **columns: Tensor) -> None:
        lengths = {len(column) for column in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns must have the same length, got {sorted(lengths)}")
        self.columns = columns
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def make_loader(
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    dict_batches: bool = False,
) -> DataLoader:
    """A single-process loader of ``(inputs, targets)`` tuples, or of ``{"inputs", "targets"}`` dicts."""
    dataset: Dataset = (
        DictDataset(**{INPUTS_KEY: inputs, TARGETS_KEY: targets})
        if dict_batches
        else TensorDataset(inputs, targets)
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=shuffle)


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a tuple/list batch or of a dict batch with ``inputs``/``targets`` keys."""
    if isinstance(batch, Mapping):
        return batch[INPUTS_KEY], batch[TARGETS_KEY]
    inputs, targets = batch
    return inputs, targets


def _standardize(values: Tensor) -> Tensor:
    """Zero mean, unit variance per column; constant columns become 0."""
    return (values - values.mean(0)) / values.std(0).clamp_min(1e-6)


def _train_val(
    inputs: Tensor, targets: Tensor, batch_size: int, val_fraction: float, seed: int, dict_batches: bool
) -> Loaders:
    """Shuffle once with ``seed``, hold out ``val_fraction`` (0: no validation loader)."""
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(inputs) * val_fraction)
    train_idx, val_idx = order[n_val:], order[:n_val]
    train = make_loader(inputs[train_idx], targets[train_idx], batch_size, True, seed, dict_batches)
    if n_val == 0:
        return train, None
    val = make_loader(inputs[val_idx], targets[val_idx], batch_size, False, seed, dict_batches)
    return train, val


DigitsScale = Literal["standardized", "raw", "bytes"]


@functools.cache
def _digits(scale: DigitsScale) -> tuple[Tensor, Tensor]:
    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    if scale == "standardized":
        inputs = _standardize(inputs)
    elif scale == "bytes":
        inputs = inputs * (255.0 / 16.0)
    return inputs, torch.tensor(data.target, dtype=torch.long)


def digits_loaders(
    batch_size: int = 64,
    images: bool = False,
    scale: DigitsScale = "standardized",
    val_fraction: float = 0.0,
    dict_batches: bool = False,
    seed: int = 0,
) -> Loaders:
    """The 1797 8x8 digits (10 classes) as 64 features, or as ``1x8x8`` images with ``images=True``.

    ``scale``: ``"standardized"`` (zero mean, unit variance per pixel), ``"raw"`` (the dataset's 0-16
    grey levels) or ``"bytes"`` (0-255, as pixels usually come).
    """
    inputs, targets = _digits(scale)
    if images:
        inputs = inputs.view(-1, 1, 8, 8)
    return _train_val(inputs, targets, batch_size, val_fraction, seed, dict_batches)


@functools.cache
def _diabetes(scaled: bool) -> tuple[Tensor, Tensor]:
    data = load_diabetes(scaled=scaled)
    inputs = torch.tensor(data.data, dtype=torch.float32)
    targets = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    if scaled:
        return _standardize(inputs), _standardize(targets)
    return inputs, targets


def diabetes_loaders(
    batch_size: int = 32,
    scaled: bool = True,
    val_fraction: float = 0.0,
    dict_batches: bool = False,
    seed: int = 0,
) -> Loaders:
    """Diabetes regression (442 rows, 10 features, target of shape ``(N, 1)``).

    ``scaled=True``: features and target standardised. ``scaled=False``: the raw clinical values
    (age in years, blood pressure, serum measurements up to ~300; target 25-346).
    """
    inputs, targets = _diabetes(scaled)
    return _train_val(inputs, targets, batch_size, val_fraction, seed, dict_batches)


@functools.cache
def _breast_cancer() -> tuple[Tensor, Tensor]:
    data = load_breast_cancer()
    inputs = _standardize(torch.tensor(data.data, dtype=torch.float32))
    return inputs, torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)


def breast_cancer_loaders(batch_size: int = 32, val_fraction: float = 0.0, seed: int = 0) -> Loaders:
    """Breast-cancer binary classification (569 rows, 30 standardised features, float targets ``(N, 1)``)."""
    inputs, targets = _breast_cancer()
    return _train_val(inputs, targets, batch_size, val_fraction, seed, dict_batches=False)


def sequence_loaders(
    n: int = 1024, length: int = 16, features: int = 3, batch_size: int = 32, seed: int = 0
) -> Loaders:
    """Synthetic float sequences ``(N, length, features)``; the class says whether channel 0 sums above 0."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, length, features, generator=generator)
    targets = (inputs[:, :, 0].sum(dim=1) > 0).long()
    return _train_val(inputs, targets, batch_size, 0.0, seed, dict_batches=False)


def marker_token_loaders(
    n: int = 1024, length: int = 12, vocab: int = 20, batch_size: int = 32, seed: int = 0
) -> Loaders:
    """Synthetic token ids ``(N, length)`` from ``2..vocab-1``; half the rows hold the marker token ``1``
    at a random position, and the class says whether it is there."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (n, length), generator=generator)
    has_marker = torch.rand(n, generator=generator) < 0.5
    positions = torch.randint(0, length, (n,), generator=generator)
    rows = torch.arange(n)[has_marker]
    tokens[rows, positions[has_marker]] = 1
    return _train_val(tokens, has_marker.long(), batch_size, 0.0, seed, dict_batches=False)


def token_count_loaders(
    n: int = 1024, length: int = 10, vocab: int = 30, classes: int = 3, batch_size: int = 32, seed: int = 0
) -> Loaders:
    """Synthetic token ids ``(N, length)``; the class is the residue (token id mod ``classes``) seen most
    often (ties go to the smaller residue)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=generator)
    counts = nn.functional.one_hot(tokens % classes, classes).sum(dim=1)
    return _train_val(tokens, counts.argmax(dim=1), batch_size, 0.0, seed, dict_batches=False)


# ====================================================================== healthy networks
def mlp(
    sizes: Sequence[int],
    activation: type[nn.Module] = nn.ReLU,
    dropout: float = 0.0,
    final_activation: bool = False,
) -> nn.Sequential:
    """``Linear`` layers of the given sizes with ``activation`` (and optional dropout) between them."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2 or final_activation:
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Two conv-BatchNorm-ReLU blocks, max-pooling, dropout and a linear head for ``1x8x8`` digits."""

    def __init__(self, channels: int = 16, classes: int = 10, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels * 16, classes))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class ResidualBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))`` at constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + residual)


class ResNetDigits(nn.Module):
    """A stem convolution, ``blocks`` residual blocks, global average pooling and a linear head."""

    def __init__(self, channels: int = 16, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(images)).mean(dim=(2, 3)))


class RecurrentClassifier(nn.Module):
    """A GRU or LSTM over ``(N, T, F)`` sequences; the last hidden state feeds a linear head."""

    def __init__(
        self, features: int, hidden: int = 32, classes: int = 2, cell: Literal["gru", "lstm"] = "gru"
    ) -> None:
        super().__init__()
        recurrent = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = recurrent(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, sequences: Tensor) -> Tensor:
        outputs, _ = self.rnn(sequences)
        return self.head(outputs[:, -1])


def token_encoder(width: int, heads: int, layers: int = 2) -> nn.TransformerEncoder:
    """The zoo's small Transformer encoder: batch-first layers with dropout 0.1 and a 2x feed-forward."""
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class TokenTransformer(nn.Module):
    """Token and learned position embeddings, a Transformer encoder with dropout, mean pooling, a head."""

    def __init__(
        self, vocab: int, length: int, width: int = 32, heads: int = 4, layers: int = 2, classes: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.encoder = token_encoder(width, heads, layers)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position)
        return self.head(hidden.mean(dim=1))


class BagOfEmbeddings(nn.Module):
    """``nn.Embedding`` of token ids, averaged over the sequence, then a small MLP."""

    def __init__(self, vocab: int, width: int = 16, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.classifier = mlp([width, hidden, classes])

    def forward(self, tokens: Tensor) -> Tensor:
        return self.classifier(self.embed(tokens).mean(dim=1))


# ====================================================================== broken pieces (realistic bugs)
class LogFeatures(nn.Module):
    """``log1p`` of every feature, the usual transform for skewed non-negative counts.

    The bug it carries: applied to *standardised* features, which go below -1, it returns NaN.
    """

    def forward(self, features: Tensor) -> Tensor:
        return torch.log1p(features)


class SoftmaxHead(nn.Module):
    """Turns logits into class probabilities with ``torch.softmax`` (for a loss that takes probabilities)."""

    def forward(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)


class NLLOfProbabilities(nn.Module):
    """Negative log-likelihood of class probabilities: ``nll_loss(log(p), targets)``.

    The bug it carries: ``log(softmax(x))`` instead of ``log_softmax(x)``. Once two logits differ by
    more than ~104, the smaller probability underflows to exactly 0 and its log is ``-inf``.
    """

    def forward(self, probabilities: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.nll_loss(torch.log(probabilities), targets)


class PairwiseContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell et al., 2006) over every pair of embeddings in the batch.

    Same-class pairs are pulled together (``d^2``), other pairs pushed beyond ``margin``
    (``relu(margin - d)^2``), with ``d = sqrt(sum((z_i - z_j)^2))``. The bug it carries: the
    diagonal (``i == j``) counts as a same-class pair, so ``sqrt`` is taken at exactly 0, whose
    derivative is infinite: the loss is finite but every gradient is NaN.
    """

    def __init__(self, margin: float = 2.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: Tensor, targets: Tensor) -> Tensor:
        differences = embeddings.unsqueeze(1) - embeddings.unsqueeze(0)
        distances = differences.pow(2).sum(dim=-1).sqrt()
        same = (targets.unsqueeze(1) == targets.unsqueeze(0)).float()
        pull = same * distances.pow(2)
        push = (1.0 - same) * torch.relu(self.margin - distances).pow(2)
        return (pull + push).mean()


def normal_init_(network: nn.Module, std: float) -> nn.Module:
    """Initialise every ``Linear`` weight from ``N(0, std^2)`` and its bias at 0 (in place; returns it).

    A fixed ``std`` ignores the fan-in, the classic bad init: with ``std=1`` activations grow by about
    ``sqrt(fan_in / 2)`` per ReLU layer, so a deep stack starts with enormous outputs and gradients;
    with ``std=0.01`` they shrink by ``0.01 * sqrt(fan_in)`` per layer and the gradients of the
    first layers vanish.
    """
    for module in network.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return network


def warmup_without_cap(step: int, warmup_steps: int = 10) -> float:
    """Linear learning-rate warm-up factor ``(step + 1) / warmup_steps`` for ``LambdaLR``.

    The bug it carries: the ``min(1.0, ...)`` is missing, so the learning rate never stops growing.
    """
    return (step + 1) / warmup_steps


def freeze_(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module`` (in place; returns it)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


# ====================================================================== the LightningModule
class ZooModule(pl.LightningModule):
    """A network, a loss and an optimizer: the LightningModule every benchmark case trains.

    Batches are ``(inputs, targets)`` tuples or ``{"inputs": ..., "targets": ...}`` dicts. The loss is
    ``loss(net(inputs), targets)``.

    Args:
        net: the network.
        loss: a module called as ``loss(outputs, targets)``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: learning rate.
        weight_decay: weight decay of the optimizer.
        momentum: SGD momentum (ignored by Adam/AdamW).
        lr_lambda: optional factor of the learning rate per optimizer step (``LambdaLR``, stepped every step).

    Example:
        >>> module = ZooModule(mlp([4, 8, 3]), nn.CrossEntropyLoss(), optimizer="sgd", lr=0.1)
        >>> type(module.configure_optimizers()).__name__
        'SGD'
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam', 'adamw' or 'sgd', got {optimizer!r}")
        self.net = net
        self.loss = loss
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.lr_lambda = lr_lambda

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def _step(self, batch: Any, stage: str) -> Tensor:
        inputs, targets = split_batch(batch)
        loss = self.loss(self(inputs), targets)
        self.log(f"{stage}_loss", loss, batch_size=len(targets))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        parameters = self.parameters()
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(
                parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        elif self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_lambda is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
