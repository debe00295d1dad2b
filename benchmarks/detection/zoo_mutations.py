"""Mutation testing of the zoo: DeepCrime-style operators applied to healthy training programs.

A :class:`Program` describes a healthy training run as data (dataset, network factory, loss,
optimizer, batch size, steps, ...). A :class:`Mutation` is a generic transformation of a program
(of its training data, its network, its loss/optimizer or its trainer arguments), named after the
operator of the DeepCrime taxonomy it re-implements (Humbatova et al., ISSTA 2021): ``TCL``
change labels, ``TRD`` delete training data, ``TUD`` unbalance data, ``TAN`` add input noise,
``TCO`` class overlap, ``HBS`` batch size, ``HLR`` learning rate, ``HNE`` epochs, ``HDB`` disable
batching, ``ACH``/``ARM``/``AAL`` change/remove/add activation, ``RAW``/``RCW``/``RRW``
add/change/remove weight regularisation, ``RCD`` dropout rate, ``WCI`` weight initialiser,
``WAB``/``WRB`` add/remove bias, ``LCH`` loss function, ``OCH`` optimizer, ``OCG`` gradient clipping.

Data mutations touch the *training* split only; the held-out split that scores a run
(:func:`held_out_error`) is the program's own, unchanged. Whether a mutant is a fault at all is
measured, not assumed: :func:`compare_twins` trains the healthy program (the *twin*) and the
mutant without any callback for the same steps and seeds and compares their held-out error.

Example:
    >>> program = PROGRAMS["digits-mlp"]
    >>> mutant = MUTATIONS["hlr-x1000"].apply(program)
    >>> (program.lr, mutant.lr)
    (0.001, 1.0)
    >>> module, train, val = build(MUTATIONS["trd-90"].apply(program))
    >>> len(train.dataset) < len(build(program)[1].dataset) // 5
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from benchmarks.detection import zoo

Task = Literal["multiclass", "binary", "regression"]
DataEdit = Callable[[Tensor, Tensor, Task, torch.Generator], tuple[Tensor, Tensor]]
ModelEdit = Callable[[nn.Module], nn.Module]
Built = tuple[pl.LightningModule, Any, Any]

_SPLIT_SEED = 1234  # the train/held-out split is fixed; the seed of a run only moves init and order
_VAL_FRACTION = 0.25


# ====================================================================== programs
@dataclass(frozen=True)
class Program:
    """A training program as data, so that a mutation can rewrite any part of it.

    Args:
        name: kebab-case name.
        task: ``"multiclass"`` (long labels), ``"binary"`` (float 0/1 labels ``(N, 1)``) or ``"regression"``.
        dataset: ``"digits"``, ``"diabetes"`` or ``"breast-cancer"`` (bundled with scikit-learn, standardised).
        network: builds the network (called after seeding).
        loss: builds the loss module.
        optimizer, lr, weight_decay, momentum: as in :class:`~benchmarks.detection.zoo.ZooModule`.
        batch_size: training batch size (capped at the training set's size).
        max_steps: optimizer steps.
        images: serve digits as ``1x8x8`` images.
        gradient_clip_val: ``Trainer(gradient_clip_val=...)`` (by norm), or ``None``.
        data_edits: applied in order to the training split ``(inputs, targets)``.
        model_edits: applied in order to the built network.
        description: one line.
    """

    name: str
    task: Task
    dataset: Literal["digits", "diabetes", "breast-cancer"]
    network: Callable[[], nn.Module]
    loss: Callable[[], nn.Module]
    optimizer: zoo.OptimizerName
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    batch_size: int = 64
    max_steps: int = 150
    images: bool = False
    gradient_clip_val: float | None = None
    data_edits: tuple[DataEdit, ...] = ()
    model_edits: tuple[ModelEdit, ...] = ()
    description: str = ""

    @property
    def trainer_kwargs(self) -> dict[str, Any]:
        """``Trainer`` arguments of the program."""
        kwargs: dict[str, Any] = {"max_steps": self.max_steps}
        if self.gradient_clip_val is not None:
            kwargs["gradient_clip_val"] = self.gradient_clip_val
        return kwargs


@functools.cache
def _tensors(dataset: str) -> tuple[Tensor, Tensor]:
    if dataset == "digits":
        return zoo._digits("standardized")
    if dataset == "diabetes":
        return zoo._diabetes(True)
    if dataset == "breast-cancer":
        return zoo._breast_cancer()
    raise ValueError(f"unknown dataset {dataset!r}")


def splits(program: Program) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((train_inputs, train_targets), (held_out_inputs, held_out_targets))``, data edits applied to
    the training split (with a generator seeded from the fixed split seed)."""
    inputs, targets = _tensors(program.dataset)
    if program.images:
        inputs = inputs.view(-1, 1, 8, 8)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_val = int(len(inputs) * _VAL_FRACTION)
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_inputs, train_targets = inputs[train_idx], targets[train_idx]
    generator = torch.Generator().manual_seed(_SPLIT_SEED + 1)
    for edit in program.data_edits:
        train_inputs, train_targets = edit(train_inputs, train_targets, program.task, generator)
    return (train_inputs, train_targets), (inputs[val_idx], targets[val_idx])


def build(program: Program, seed: int = 0) -> Built:
    """``(ZooModule, train_loader, held_out_loader)`` of ``program`` (call after seeding)."""
    (train_inputs, train_targets), (val_inputs, val_targets) = splits(program)
    network = program.network()
    for edit in program.model_edits:
        network = edit(network)
    module = zoo.ZooModule(
        network,
        program.loss(),
        program.optimizer,
        lr=program.lr,
        weight_decay=program.weight_decay,
        momentum=program.momentum,
    )
    batch_size = min(program.batch_size, len(train_inputs))
    train = zoo.make_loader(train_inputs, train_targets, batch_size, True, seed)
    val = zoo.make_loader(val_inputs, val_targets, 128, False, seed)
    return module, train, val


# ---------------------------------------------------------------------- the healthy programs
def _digits_mlp() -> nn.Module:
    return zoo.mlp([64, 128, 64, 10], dropout=0.1)


def _diabetes_mlp() -> nn.Module:
    return zoo.mlp([10, 64, 64, 1])


def _breast_cancer_mlp() -> nn.Module:
    return zoo.mlp([30, 32, 16, 1])


PROGRAMS: dict[str, Program] = {
    program.name: program
    for program in (
        Program(
            "digits-mlp",
            "multiclass",
            "digits",
            _digits_mlp,
            nn.CrossEntropyLoss,
            "adam",
            1e-3,
            description="MLP 64-128-64-10 with dropout 0.1 on standardised digits, Adam 1e-3, batch 64",
        ),
        Program(
            "digits-cnn",
            "multiclass",
            "digits",
            zoo.DigitsCNN,
            nn.CrossEntropyLoss,
            "adamw",
            2e-3,
            weight_decay=1e-2,
            images=True,
            description="BatchNorm/dropout CNN on 1x8x8 digits, AdamW 2e-3 with weight decay 1e-2, batch 64",
        ),
        Program(
            "diabetes-mlp",
            "regression",
            "diabetes",
            _diabetes_mlp,
            nn.MSELoss,
            "adam",
            3e-3,
            batch_size=32,
            description="regression MLP 10-64-64-1, MSE on standardised diabetes, Adam 3e-3, batch 32",
        ),
        Program(
            "breast-cancer-sgd",
            "binary",
            "breast-cancer",
            _breast_cancer_mlp,
            nn.BCEWithLogitsLoss,
            "sgd",
            0.05,
            momentum=0.9,
            batch_size=32,
            description="binary MLP 30-32-16-1, BCEWithLogits on standardised breast_cancer, SGD 0.05 momentum 0.9",
        ),
    )
}


# ====================================================================== data edits (training split only)
def _classes(targets: Tensor, task: Task) -> int:
    return 2 if task == "binary" else int(targets.max()) + 1


def _relabel(targets: Tensor, rows: Tensor, task: Task, generator: torch.Generator) -> Tensor:
    """``targets`` with the given rows moved to another class (drawn uniformly among the others)."""
    targets = targets.clone()
    classes = _classes(targets, task)
    if task == "binary":
        targets[rows] = 1.0 - targets[rows]
        return targets
    shift = torch.randint(1, classes, (len(rows),), generator=generator)
    targets[rows] = (targets[rows] + shift) % classes
    return targets


def change_labels(fraction: float) -> DataEdit:
    """TCL: move ``fraction`` of the training labels to a wrong class."""

    def edit(
        inputs: Tensor, targets: Tensor, task: Task, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        rows = torch.randperm(len(targets), generator=generator)[: int(fraction * len(targets))]
        return inputs, _relabel(targets, rows, task, generator)

    return edit


def delete_data(fraction: float) -> DataEdit:
    """TRD: drop ``fraction`` of the training rows."""

    def edit(
        inputs: Tensor, targets: Tensor, task: Task, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        keep = torch.randperm(len(targets), generator=generator)[
            : max(1, round((1 - fraction) * len(targets)))
        ]
        return inputs[keep], targets[keep]

    return edit


def unbalance(fraction: float) -> DataEdit:
    """TUD: drop ``fraction`` of the rows of the upper half of the classes (class 1 for binary)."""

    def edit(
        inputs: Tensor, targets: Tensor, task: Task, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        labels = targets.view(len(targets), -1)[:, 0].long()
        minority = labels >= (_classes(targets, task) + 1) // 2
        dropped = minority & (torch.rand(len(labels), generator=generator) < fraction)
        return inputs[~dropped], targets[~dropped]

    return edit


def add_noise(std: float) -> DataEdit:
    """TAN: add Gaussian noise of standard deviation ``std`` to the (standardised) training inputs."""

    def edit(
        inputs: Tensor, targets: Tensor, task: Task, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        return inputs + std * torch.randn(inputs.shape, generator=generator), targets

    return edit


def class_overlap(fraction: float) -> DataEdit:
    """TCO: duplicate ``fraction`` of the training rows with a wrong label (the same inputs now carry
    two classes)."""

    def edit(
        inputs: Tensor, targets: Tensor, task: Task, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        rows = torch.randperm(len(targets), generator=generator)[: int(fraction * len(targets))]
        copies = _relabel(targets, rows, task, generator)[rows]
        return torch.cat([inputs, inputs[rows]]), torch.cat([targets, copies])

    return edit


# ====================================================================== model edits
def _replace_modules(
    network: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[], nn.Module]
) -> nn.Module:
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make())
    return network


def change_activation(new: type[nn.Module]) -> ModelEdit:
    """ACH: every ``nn.ReLU`` becomes ``new()``."""
    return lambda network: _replace_modules(network, lambda m: isinstance(m, nn.ReLU), new)


def remove_activations(network: nn.Module) -> nn.Module:
    """ARM: every ``nn.ReLU`` becomes ``nn.Identity``."""
    return _replace_modules(network, lambda m: isinstance(m, nn.ReLU), nn.Identity)


def add_activation(activation: Callable[[], nn.Module]) -> ModelEdit:
    """AAL: an activation after the network's output layer."""
    return lambda network: nn.Sequential(network, activation())


def _weighted(network: nn.Module) -> list[nn.Module]:
    return [m for m in network.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def reinitialise(init: Callable[[Tensor], Any]) -> ModelEdit:
    """WCI: re-initialise every Linear/Conv weight with ``init`` (biases to 0)."""

    def edit(network: nn.Module) -> nn.Module:
        with torch.no_grad():
            for module in _weighted(network):
                init(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        return network

    return edit


def add_bias(network: nn.Module) -> nn.Module:
    """WAB: a zero bias on every Linear/Conv that has none."""
    for module in _weighted(network):
        if module.bias is None:
            out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            module.bias = nn.Parameter(torch.zeros(out))
    return network


def remove_bias(network: nn.Module) -> nn.Module:
    """WRB: no bias on any Linear/Conv."""
    for module in _weighted(network):
        module.register_parameter("bias", None)
    return network


def dropout_rate(p: float) -> ModelEdit:
    """RCD: every ``nn.Dropout`` drops with probability ``p``."""

    def edit(network: nn.Module) -> nn.Module:
        for module in network.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
        return network

    return edit


class NLLOnLogits(nn.NLLLoss):
    """``NLLLoss`` put in place of ``CrossEntropyLoss`` without the ``LogSoftmax`` it needs (LCH)."""


# ====================================================================== mutations
@dataclass(frozen=True)
class Mutation:
    """A DeepCrime operator at one strength, as a transformation of a :class:`Program`.

    Args:
        name: kebab-case, ``<operator>-<strength>`` (e.g. ``"hlr-x1000"``).
        operator: the DeepCrime operator code (``"HLR"``).
        description: what the mutation does, in words.
        change: the program fields to replace; a callable value is called with the old program to
            get the new value, and ``data_edits``/``model_edits`` values are *appended* to the
            program's own edits.
        expected: check ids that are a right diagnosis, should the mutant be a fault.
        programs: names of the programs it applies to.
    """

    name: str
    operator: str
    description: str
    change: dict[str, Any]
    expected: frozenset[str]
    programs: tuple[str, ...]
    notes: str = field(default="")

    def apply(self, program: Program) -> Program:
        """The mutant of ``program``."""
        values: dict[str, Any] = {}
        for key, value in self.change.items():
            if key in ("data_edits", "model_edits"):
                values[key] = getattr(program, key) + tuple(value)
            elif callable(value) and key not in ("network", "loss"):
                values[key] = value(program)
            else:
                values[key] = value
        return dataclasses.replace(program, name=f"{program.name}-{self.name}", **values)


NON_FINITE = frozenset(
    {"non-finite-loss", "non-finite-gradients", "non-finite-weights", "non-finite-activation"}
)
# as in the core cases, a dead ReLU layer is also a right diagnosis of a learning rate far too high
LR_HIGH = NON_FINITE | {
    "exploding-gradients",
    "update-ratio-too-high",
    "loss-divergence",
    "loss-oscillation",
    "dead-relu",
}
LR_LOW = frozenset(
    {"update-ratio-too-low", "loss-not-decreasing", "frozen-parameters", "cannot-overfit-batch"}
)
NO_SIGNAL = frozenset({"model-ignores-input"})
# training data that mislead the model: it fits them while the held-out loss climbs
MISLEADING_DATA = NO_SIGNAL | {"overfitting"}
# wrong labels among right ones: the model that learns from the right ones contradicts the wrong ones
WRONG_LABELS = MISLEADING_DATA | {"noisy-labels"}
CANNOT_FIT = frozenset({"cannot-overfit-batch", "model-ignores-input", "loss-not-decreasing"})

_CLASSIFIERS = ("digits-mlp", "digits-cnn", "breast-cancer-sgd")
_ALL = ("digits-mlp", "digits-cnn", "diabetes-mlp", "breast-cancer-sgd")
_ADAM = ("digits-mlp", "digits-cnn", "diabetes-mlp")


def _by(factor: float, attribute: str) -> Callable[[Program], Any]:
    return lambda program: type(getattr(program, attribute))(getattr(program, attribute) * factor)


_MUTATION_LIST: tuple[Mutation, ...] = (
    # ------------------------------------------------------------------ training data
    Mutation(
        "tcl-30",
        "TCL",
        "30% of the training labels moved to a wrong class",
        {"data_edits": [change_labels(0.3)]},
        WRONG_LABELS,
        _CLASSIFIERS,
    ),
    Mutation(
        "tcl-100",
        "TCL",
        "every training label moved to a wrong class (labels carry no information)",
        {"data_edits": [change_labels(1.0)]},
        MISLEADING_DATA,
        ("digits-mlp", "digits-cnn"),
    ),
    Mutation(
        "trd-90",
        "TRD",
        "90% of the training rows deleted",
        {"data_edits": [delete_data(0.9)]},
        frozenset({"overfitting"}),
        _ALL,
    ),
    Mutation(
        "tud-95",
        "TUD",
        "95% of the rows of the upper half of the classes deleted",
        {"data_edits": [unbalance(0.95)]},
        frozenset({"class-imbalance"}),
        _CLASSIFIERS,
    ),
    Mutation(
        "tan-1",
        "TAN",
        "Gaussian noise of std 1 (the inputs' own scale) added to the training inputs",
        {"data_edits": [add_noise(1.0)]},
        MISLEADING_DATA | {"train-val-shift"},
        _ALL,
    ),
    Mutation(
        "tan-30",
        "TAN",
        "Gaussian noise of std 30 added to the training inputs",
        {"data_edits": [add_noise(30.0)]},
        MISLEADING_DATA | {"unnormalized-inputs", "train-val-shift"},
        _ALL,
    ),
    Mutation(
        "tco-20",
        "TCO",
        "20% of the training rows duplicated with a wrong label",
        {"data_edits": [class_overlap(0.2)]},
        WRONG_LABELS,
        _CLASSIFIERS,
    ),
    # ------------------------------------------------------------------ hyper-parameters
    Mutation("hbs-2", "HBS", "batch size 2", {"batch_size": 2}, LR_HIGH | {"loss-oscillation"}, _ALL),
    Mutation("hlr-x1000", "HLR", "learning rate x1000", {"lr": _by(1000.0, "lr")}, LR_HIGH, _ALL),
    Mutation("hlr-x1e-4", "HLR", "learning rate x1e-4", {"lr": _by(1e-4, "lr")}, LR_LOW, _ALL),
    Mutation(
        "hne-half", "HNE", "half the training steps", {"max_steps": _by(0.5, "max_steps")}, LR_LOW, _ALL
    ),
    Mutation(
        "hdb",
        "HDB",
        "batching disabled: the whole training set in every batch",
        {"batch_size": 100_000},
        LR_LOW | {"overfitting"},
        ("digits-mlp", "diabetes-mlp", "breast-cancer-sgd"),
    ),
    # ------------------------------------------------------------------ activations
    Mutation(
        "ach-sigmoid",
        "ACH",
        "every ReLU replaced by a sigmoid",
        {"model_edits": [change_activation(nn.Sigmoid)]},
        frozenset({"vanishing-gradients", "saturated-activation", "poor-weight-init"}),
        _ALL,
    ),
    Mutation(
        "arm",
        "ARM",
        "every ReLU removed (the network is linear)",
        {"model_edits": [remove_activations]},
        CANNOT_FIT,
        _ALL,
    ),
    Mutation(
        "aal-softmax",
        "AAL",
        "softmax added after the output layer of a cross-entropy classifier",
        {"model_edits": [add_activation(lambda: nn.Softmax(dim=1))]},
        frozenset({"softmax-before-cross-entropy"}),
        ("digits-mlp", "digits-cnn"),
    ),
    Mutation(
        "aal-sigmoid",
        "AAL",
        "sigmoid added after the output layer (BCEWithLogits / MSE)",
        {"model_edits": [add_activation(nn.Sigmoid)]},
        frozenset({"sigmoid-before-bce-with-logits", "clipped-output"}),
        ("breast-cancer-sgd", "diabetes-mlp"),
    ),
    Mutation(
        "aal-relu",
        "AAL",
        "ReLU added after the output layer",
        {"model_edits": [add_activation(nn.ReLU)]},
        frozenset({"clipped-output", "dead-relu"}),
        ("diabetes-mlp", "digits-mlp"),
    ),
    # ------------------------------------------------------------------ regularisation
    Mutation(
        "raw-1",
        "RAW",
        "L2 weight decay 1.0 added to the optimizer",
        {"weight_decay": 1.0},
        CANNOT_FIT,
        ("digits-mlp", "diabetes-mlp"),
    ),
    Mutation(
        "rcw-x1000",
        "RCW",
        "weight decay x1000 (AdamW 1e-2 -> 10)",
        {"weight_decay": _by(1000.0, "weight_decay")},
        CANNOT_FIT | {"weight-decay-too-strong"},
        ("digits-cnn",),
    ),
    Mutation("rrw", "RRW", "weight decay removed", {"weight_decay": 0.0}, CANNOT_FIT, ("digits-cnn",)),
    Mutation(
        "rcd-90",
        "RCD",
        "dropout rate 0.9",
        {"model_edits": [dropout_rate(0.9)]},
        CANNOT_FIT,
        ("digits-mlp", "digits-cnn"),
    ),
    # ------------------------------------------------------------------ weights
    Mutation(
        "wci-constant",
        "WCI",
        "every weight initialised to the constant 0.05",
        {"model_edits": [reinitialise(lambda w: nn.init.constant_(w, 0.05))]},
        frozenset({"poor-weight-init"}),
        _ALL,
    ),
    Mutation(
        "wci-normal-1",
        "WCI",
        "weights drawn from N(0, 1) regardless of fan-in",
        {"model_edits": [reinitialise(lambda w: nn.init.normal_(w, 0.0, 1.0))]},
        frozenset({"poor-weight-init", "loss-at-init", "exploding-gradients", "saturated-activation"}),
        _ALL,
    ),
    Mutation(
        "wci-xavier",
        "WCI",
        "Xavier-uniform initialisation instead of PyTorch's default",
        {"model_edits": [reinitialise(nn.init.xavier_uniform_)]},
        frozenset({"poor-weight-init"}),
        _ALL,
    ),
    Mutation(
        "wab",
        "WAB",
        "a bias added to every layer without one",
        {"model_edits": [add_bias]},
        CANNOT_FIT,
        ("digits-cnn",),
    ),
    Mutation("wrb", "WRB", "every bias removed", {"model_edits": [remove_bias]}, CANNOT_FIT, _ALL),
    # ------------------------------------------------------------------ loss and optimizer
    Mutation(
        "lch-nll",
        "LCH",
        "CrossEntropyLoss replaced by NLLLoss (no log-softmax in the model)",
        {"loss": NLLOnLogits},
        frozenset({"nll-on-logits"}),
        ("digits-mlp", "digits-cnn"),
    ),
    Mutation(
        "lch-l1", "LCH", "MSELoss replaced by L1Loss", {"loss": nn.L1Loss}, CANNOT_FIT, ("diabetes-mlp",)
    ),
    Mutation(
        "och-sgd",
        "OCH",
        "Adam replaced by plain SGD at the same learning rate",
        {"optimizer": "sgd", "momentum": 0.0},
        LR_LOW,
        _ADAM,
    ),
    Mutation(
        "och-adam",
        "OCH",
        "SGD momentum replaced by Adam at the same learning rate (0.05)",
        {"optimizer": "adam"},
        LR_HIGH,
        ("breast-cancer-sgd",),
    ),
    Mutation(
        "ocg-1e-4",
        "OCG",
        "gradients clipped to a total norm of 1e-4",
        {"gradient_clip_val": 1e-4},
        LR_LOW,
        _ALL,
    ),
)

MUTATIONS: dict[str, Mutation] = {mutation.name: mutation for mutation in _MUTATION_LIST}


def mutants() -> list[tuple[Mutation, Program, Program]]:
    """``(mutation, healthy twin, mutant)`` for every mutation and every program it applies to."""
    return [
        (mutation, PROGRAMS[name], mutation.apply(PROGRAMS[name]))
        for mutation in _MUTATION_LIST
        for name in mutation.programs
    ]


# ====================================================================== healthy-twin comparison
def held_out_error(module: pl.LightningModule, program: Program) -> float:
    """The trained model's error on the program's held-out split: ``1 - accuracy`` for a classifier,
    ``MSE / variance`` of the (standardised) targets for a regression (``1 - R^2``); NaN stays NaN."""
    _, (inputs, targets) = splits(program)
    module.eval()
    with torch.no_grad():
        outputs = module(inputs).float()
    if not torch.isfinite(outputs).all():
        return math.nan
    if program.task == "multiclass":
        return float((outputs.argmax(dim=1) != targets).float().mean())
    if program.task == "binary":
        return float(((outputs > 0).float() != targets).float().mean())
    return float(((outputs - targets) ** 2).mean() / targets.var())


def train_without_sentinel(program: Program, seed: int) -> float:
    """Train ``program`` with no callback at all and return its :func:`held_out_error` (NaN if it diverged)."""
    import logging
    import warnings

    pl.seed_everything(seed, verbose=False)
    module, train, _ = build(program, seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **program.trainer_kwargs,
    )
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=train)
    return held_out_error(module, program)


SEEDS = (0, 1, 2)  # seeds of the twin comparison
# A mutant is "faulty" when its mean held-out error is worse than its twin's by more than all of:
RELATIVE_MARGIN = 0.10  # 10% of the twin's error,
ABSOLUTE_MARGIN = 0.02  # 2 points of error (accuracy points; 0.02 of the target variance),
NOISE_FACTOR = 3.0  # and 3 standard deviations of the healthy twin's error over the seeds.


@dataclass(frozen=True)
class TwinComparison:
    """Held-out errors of a healthy twin and its mutant over the same seeds, and the verdict."""

    mutation: str
    operator: str
    program: str
    twin: tuple[float, ...]
    mutant: tuple[float, ...]

    @property
    def twin_mean(self) -> float:
        return statistics.fmean(self.twin)

    @property
    def mutant_mean(self) -> float:
        return statistics.fmean(self.mutant) if all(map(math.isfinite, self.mutant)) else math.inf

    @property
    def noise(self) -> float:
        """Seed standard deviation of the twin's error: how much a healthy run moves from seed to seed."""
        return statistics.stdev(self.twin) if len(self.twin) > 1 else 0.0

    @property
    def margin(self) -> float:
        """How much worse the mutant must be to count as faulty."""
        return max(RELATIVE_MARGIN * self.twin_mean, ABSOLUTE_MARGIN, NOISE_FACTOR * self.noise)

    @property
    def faulty(self) -> bool:
        return self.mutant_mean - self.twin_mean > self.margin

    @property
    def verdict(self) -> str:
        return "faulty" if self.faulty else "harmless"


def compare_twins(
    mutation: Mutation,
    twin: Program,
    mutant: Program,
    seeds: Sequence[int] = SEEDS,
    twin_errors: Sequence[float] | None = None,
) -> TwinComparison:
    """Train twin (unless ``twin_errors`` is given) and mutant without the sentinel over ``seeds``."""
    if twin_errors is None:
        twin_errors = [train_without_sentinel(twin, seed) for seed in seeds]
    mutant_errors = [train_without_sentinel(mutant, seed) for seed in seeds]
    return TwinComparison(
        mutation.name, mutation.operator, twin.name, tuple(twin_errors), tuple(mutant_errors)
    )
