"""Models of the wiring cases: train/eval mode, optimizer coverage, unused/frozen parameters, update sizes.

Each broken piece is a small, plausible bug in how a LightningModule is wired, not in its maths:
``self.eval()`` left in ``training_step``, an overridden ``on_validation_model_eval`` that forgets
``self.eval()``, an optimizer given only the head, a ``.detach()`` cutting the encoder off, a
learning-rate factor that is always 0, a rounded output without gradient.

Example:
    >>> from torch import nn
    >>> module = EvalInTrainingStep(nn.Linear(4, 2), nn.CrossEntropyLoss())
    >>> type(module).__mro__[1].__name__
    'ZooModule'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.detection import zoo


class EvalInTrainingStep(zoo.ZooModule):
    """The bug it carries: ``self.eval()`` in ``training_step`` (left from computing a metric without
    dropout): from the first forward on, dropout is off and batch-norm uses its running statistics."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.eval()
        return super().training_step(batch, batch_idx)


class NoEvalInValidation(zoo.ZooModule):
    """The bug it carries: ``on_validation_model_eval`` overridden (to keep a frozen part as it is) without
    calling ``self.eval()``: validation runs with dropout on and batch-norm updating its statistics."""

    def on_validation_model_eval(self) -> None:
        pass


class TrainInValidationStep(zoo.ZooModule):
    """The bug it carries: ``self.train()`` at the top of ``validation_step`` (copied from ``training_step``)."""

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.train()
        return super().validation_step(batch, batch_idx)


class HeadOnlyOptimizer(zoo.ZooModule):
    """The bug it carries: the optimizer is given ``self.net[head].parameters()`` only (meant for a
    fine-tuning run with a frozen body, but the body was never frozen)."""

    def __init__(self, *args: Any, head: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_name = head

    def configure_optimizers(self) -> Any:
        head = self.net.get_submodule(self.head_name)
        return torch.optim.Adam(head.parameters(), lr=self.lr)


class DetachedEncoder(nn.Module):
    """``head(encoder(x).detach())``: the bug is the ``.detach()`` (meant for a logging copy of the features)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.encoder(inputs).detach())


class LastStepEncoder(nn.Module):
    """A GRU encoder over ``(N, T, F)`` whose last output feeds ``head``; ``detach`` carries the bug."""

    def __init__(self, features: int, hidden: int = 32, classes: int = 2, detach: bool = True) -> None:
        super().__init__()
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)
        self.detach = detach

    def forward(self, sequences: Tensor) -> Tensor:
        outputs, _ = self.rnn(sequences)
        last = outputs[:, -1]
        return self.head(last.detach() if self.detach else last)


class RoundedRegression(nn.Module):
    """The bug it carries: the prediction is rounded to whole units inside ``forward`` ("the targets are
    integers"): ``round`` has a zero gradient everywhere, so no parameter ever moves."""

    def __init__(self, network: nn.Module, scale: float = 4.0) -> None:
        super().__init__()
        self.network = network
        self.scale = scale

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.round(self.network(inputs) * self.scale) / self.scale


def integer_warmup(step: int, warmup_steps: int = 1000) -> float:
    """Warm-up factor for ``LambdaLR`` written ``step // warmup_steps``: the bug is the integer division,
    which is 0 (lr 0) for the whole warm-up, instead of ``min(1.0, step / warmup_steps)``."""
    return float(min(1, step // warmup_steps))


def warmup_cosine(step: int, warmup_steps: int = 30, total_steps: int = 150) -> float:
    """A correct linear warm-up from ~0 followed by a cosine decay to 0 (``LambdaLR`` factor)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + float(torch.cos(torch.tensor(progress * torch.pi))))


class HardMixtureOfExperts(nn.Module):
    """A top-1 mixture of experts over features: each sample goes to one expert chosen by a router
    (straight-through weight on the chosen expert), so some experts get no sample on some steps."""

    def __init__(self, features: int, classes: int, experts: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.router = nn.Linear(features, experts)
        self.experts = nn.ModuleList(zoo.mlp([features, hidden, classes]) for _ in range(experts))

    def forward(self, inputs: Tensor) -> Tensor:
        gates = torch.softmax(self.router(inputs), dim=-1)
        choice = gates.argmax(dim=-1)
        output = inputs.new_zeros(len(inputs), self.experts[0][-1].out_features)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero(as_tuple=True)[0]
            if len(rows):
                output = output.index_add(0, rows, expert(inputs[rows]) * gates[rows, index : index + 1])
        return output


def freeze_batch_norm_(network: nn.Module) -> nn.Module:
    """Deliberately freeze every batch-norm layer (parameters and running statistics), as fine-tuning
    recipes do with small batches: ``requires_grad=False`` and eval mode. In place; returns it."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
            module.eval()
    return network
