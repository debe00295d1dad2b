"""Short trial trainings on a copy of the model, before the real training starts (the preflight checks).

A trial never touches the real run: it trains a deep copy of the LightningModule with a fresh optimizer
from the copy's own ``configure_optimizers``, takes its batches from a *fresh* iterator over the training
dataloader, and restores every random state it may consume (torch, CUDA, numpy, python, and the
generators of the dataloader and its sampler) so that the real run's weights, optimizer state and batch
order are exactly what they would have been without it.

Example:
    >>> import torch
    >>> with forked_random_state():
    ...     _ = torch.rand(3)  # consumed inside, restored on exit
    >>> batch = {"x": torch.ones(4, 2), "y": torch.arange(4)}
    >>> new = replace_parts(batch, "x", "y", inputs=torch.zeros(4, 2))
    >>> float(new["x"].sum()), float(batch["x"].sum())
    (0.0, 8.0)
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_sentinel._hooks import silence_logging, uncompile_copy
from lightning_sentinel.checks._batch_split import INPUT_KEYS, TARGET_KEYS

Key = str | int


class TrialUnavailable(Exception):
    """The trial cannot run on this module or batch layout (the reason is the message)."""


# ---------------------------------------------------------------------- random state
def _dataloader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a fresh iterator over ``loader`` may consume (loader, sampler, batch sampler)."""
    found: list[torch.Generator] = []
    candidates = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None:
        candidates.append(getattr(batch_sampler, "sampler", None))
    for candidate in candidates:
        generator = getattr(candidate, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@contextlib.contextmanager
def forked_random_state(loaders: Sequence[Any] = ()) -> Iterator[None]:
    """Run the body with the torch/CUDA/numpy/python RNGs (and ``loaders``' generators) restored after."""
    python_state = random.getstate()
    torch_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    numpy_state = None
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        numpy = None  # type: ignore[assignment]
    generators = [g for loader in loaders for g in _dataloader_generators(loader)]
    generator_states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if numpy is not None and numpy_state is not None:
            numpy.random.set_state(numpy_state)
        for generator, state in zip(generators, generator_states, strict=True):
            generator.set_state(state)


# ---------------------------------------------------------------------- batches
def training_loaders(trainer: pl.Trainer) -> list[Any]:
    """The training dataloaders of ``trainer`` as a flat list (empty if none is set up)."""
    iterables = trainer.train_dataloader
    if iterables is None:
        return []
    if isinstance(iterables, Mapping):
        return list(iterables.values())
    if isinstance(iterables, (list, tuple)):
        return list(iterables)
    return [iterables]


def _single_process_twin(loader: Any) -> Any:
    """``loader`` itself, or for a multi-process ``DataLoader`` a single-process one over the same dataset,
    batch sampler and collate function (no worker start-up; persistent workers are left alone)."""
    if not isinstance(loader, DataLoader) or loader.num_workers == 0:
        return loader
    if isinstance(loader.dataset, IterableDataset):
        if loader.persistent_workers:
            raise TrialUnavailable("an iterable dataset with persistent workers cannot be read twice")
        return loader
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)


def take_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """Up to ``count`` batches from a fresh iterator over the first training dataloader.

    Call inside :func:`forked_random_state` with the same loaders so that the real run's order is kept.
    """
    loaders = training_loaders(trainer)
    if not loaders:
        raise TrialUnavailable("the trainer has no training dataloader")
    batches: list[Any] = []
    iterator = iter(_single_process_twin(loaders[0]))
    try:
        for batch in iterator:
            batches.append(batch)
            if len(batches) >= count:
                break
    finally:
        del iterator
    if not batches:
        raise TrialUnavailable("the training dataloader is empty")
    return batches


@dataclass(frozen=True)
class BatchLayout:
    """Where the inputs and targets of a batch are: a key or index of a tuple/list/mapping."""

    input_key: Key
    target_key: Key | None


def find_layout(batch: Any, input_key: Key | None, target_key: Key | None) -> BatchLayout:
    """The :class:`BatchLayout` of ``batch`` (``input_key``/``target_key`` override the convention).

    Example:
        >>> import torch
        >>> find_layout((torch.zeros(2, 3), torch.zeros(2)), None, None)
        BatchLayout(input_key=0, target_key=1)
        >>> find_layout({"image": torch.zeros(2, 3), "label": torch.zeros(2)}, None, None)
        BatchLayout(input_key='image', target_key='label')
    """
    if isinstance(batch, Mapping):
        key_in = input_key if input_key is not None else next((k for k in INPUT_KEYS if k in batch), None)
        if key_in is None or key_in not in batch:
            raise TrialUnavailable(
                f"a mapping batch without an input key (keys: {list(batch)[:8]}); pass `input_key`"
            )
        key_target = (
            target_key if target_key is not None else next((k for k in TARGET_KEYS if k in batch), None)
        )
        if key_target is not None and key_target not in batch:
            raise TrialUnavailable(
                f"`target_key={target_key!r}` is not in the batch (keys: {list(batch)[:8]})"
            )
        layout = BatchLayout(key_in, key_target)
    elif isinstance(batch, (tuple, list)):
        key_in = 0 if input_key is None else input_key
        key_target = (1 if len(batch) > 1 else None) if target_key is None else target_key
        for key in (key_in, key_target):
            if key is not None and (not isinstance(key, int) or not -len(batch) <= key < len(batch)):
                raise TrialUnavailable(
                    f"index {key!r} does not fit a {type(batch).__name__} of length {len(batch)}"
                )
        layout = BatchLayout(key_in, key_target)
    else:
        raise TrialUnavailable(
            f"a batch of type {type(batch).__name__} is neither a tuple/list nor a mapping; "
            "the trial needs to replace its inputs and targets"
        )
    inputs = batch[layout.input_key]
    if not isinstance(inputs, Tensor):
        raise TrialUnavailable(
            f"the inputs batch[{layout.input_key!r}] are a {type(inputs).__name__}, not a tensor"
        )
    if layout.target_key is not None and not isinstance(batch[layout.target_key], Tensor):
        layout = BatchLayout(layout.input_key, None)
    return layout


def replace_parts(
    batch: Any,
    input_key: Key,
    target_key: Key | None,
    inputs: Tensor | None = None,
    targets: Tensor | None = None,
) -> Any:
    """A shallow copy of ``batch`` with its inputs and/or targets replaced (the original is untouched)."""
    new: Any = dict(batch) if isinstance(batch, Mapping) else list(batch)
    if inputs is not None:
        new[input_key] = inputs
    if targets is not None and target_key is not None:
        new[target_key] = targets
    if isinstance(batch, Mapping):
        try:
            return type(batch)(new)
        except Exception:
            return new
    if isinstance(batch, tuple):
        return type(batch)(*new) if hasattr(batch, "_fields") else tuple(new)
    return new


def slice_batch(batch: Any, start: int, stop: int, leading: int) -> Any:
    """Every tensor of ``batch`` whose first dimension is ``leading`` cut to its rows ``start:stop``.

    Example:
        >>> import torch
        >>> part = slice_batch((torch.arange(6), torch.zeros(3)), 2, 4, leading=6)
        >>> part[0].tolist(), tuple(part[1].shape)
        ([2, 3], (3,))
    """
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == leading else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: slice_batch(value, start, stop, leading) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(value, start, stop, leading) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(value, start, stop, leading) for value in batch)
    return batch


# ---------------------------------------------------------------------- the module copy
def trial_copy(pl_module: pl.LightningModule, trainer: pl.Trainer) -> pl.LightningModule:
    """A deep copy of ``pl_module`` with ``log``/``log_dict`` silenced and no trainer attached.

    The trainer and its callbacks are shared, not copied, should a hook of the model refer to them.
    """
    memo: dict[int, Any] = {id(trainer): trainer}
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        memo[id(callback)] = callback
    clone = copy.deepcopy(pl_module, memo)
    clone._trainer = None  # type: ignore[assignment]
    uncompile_copy(clone)
    silence_logging(clone)
    clone.train()
    for parameter in clone.parameters():
        parameter.grad = None
    return clone


@contextlib.contextmanager
def attached(clone: pl.LightningModule, trainer: pl.Trainer | None) -> Iterator[None]:
    """Attach ``trainer`` to ``clone`` for the body (for models whose hooks read ``self.trainer``)."""
    previous = clone._trainer
    clone._trainer = trainer  # type: ignore[assignment]
    try:
        yield
    finally:
        clone._trainer = previous


def first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The first optimizer in any return form of ``configure_optimizers``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> all(first_optimizer(form) is opt for form in (opt, [opt], ([opt], []), {"optimizer": opt}))
        True
    """
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping) and "optimizer" in configured:
        return first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return first_optimizer(configured[0])
    raise TrialUnavailable(
        f"`configure_optimizers` returned {type(configured).__name__}, with no optimizer in it"
    )


def step_schedulers(configured: Any, optimizer: torch.optim.Optimizer) -> list[Any]:
    """The schedulers of ``optimizer`` in a ``configure_optimizers`` result that step every step.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        >>> len(step_schedulers({"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}, opt))
        1
        >>> step_schedulers(([opt], [sched]), opt)  # epoch interval by default: not stepped by the trial
        []
    """
    found: list[Any] = []

    def visit(item: Any, interval: str = "epoch") -> None:
        if isinstance(item, Mapping):
            if "scheduler" in item:
                visit(item["scheduler"], str(item.get("interval", "epoch")))
            else:
                for key in ("lr_scheduler",):
                    if key in item:
                        visit(item[key], interval)
        elif isinstance(item, (list, tuple)):
            for part in item:
                visit(part, interval)
        elif (
            interval == "step"
            and getattr(item, "optimizer", None) is optimizer
            and not isinstance(item, torch.optim.lr_scheduler.ReduceLROnPlateau)
        ):
            found.append(item)

    visit(configured)
    return found


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Mapping):
        output = output.get("loss")
    if not isinstance(output, Tensor) or output.numel() != 1:
        raise TrialUnavailable(
            f"`training_step` returned {type(output).__name__}, not a loss tensor or a dict with 'loss'"
        )
    return output.reshape(())


# ---------------------------------------------------------------------- the trial run
@dataclass
class TrialRun:
    """What one trial training produced: the loss per step (on the host), the steps and seconds used."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    out_of_time: bool = False
    non_finite: bool = False


class Trial:
    """Trains copies of one model from the same starting weights, under a wall-clock budget.

    Args:
        pl_module: the real module (never modified).
        trainer: the real trainer (lent to the copy only if its hooks cannot run without one).
    """

    def __init__(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.device = pl_module.device
        self._template = trial_copy(pl_module, trainer)
        self._initial = copy.deepcopy(self._template.state_dict())
        self._needs_trainer = False

    def to_device(self, batch: Any) -> Any:
        return move_data_to_device(batch, self.device)

    def reset(self) -> None:
        """Put the copy back to the real model's weights (and buffers)."""
        self._template.load_state_dict(self._initial)

    def _fresh(self) -> tuple[pl.LightningModule, torch.optim.Optimizer, list[Any]]:
        self.reset()
        self._template.train()
        for parameter in self._template.parameters():
            parameter.grad = None
        try:
            with attached(self._template, self.trainer if self._needs_trainer else None):
                configured = self._template.configure_optimizers()
        except Exception:
            if self._needs_trainer:
                raise
            self._needs_trainer = True
            with attached(self._template, self.trainer):
                configured = self._template.configure_optimizers()
        optimizer = first_optimizer(configured)
        return self._template, optimizer, step_schedulers(configured, optimizer)

    def _step_loss(self, module: pl.LightningModule, batch: Any, index: int) -> Tensor:
        try:
            with attached(module, self.trainer if self._needs_trainer else None):
                return _loss_of(module.training_step(batch, index))
        except TrialUnavailable:
            raise
        except Exception:
            if self._needs_trainer:
                raise
            self._needs_trainer = True
            with attached(module, self.trainer):
                return _loss_of(module.training_step(batch, index))

    def train(self, batches: Sequence[Any], steps: int, deadline: float) -> TrialRun:
        """Train a fresh copy for ``steps`` steps cycling over ``batches``; losses read once at the end."""
        started = time.perf_counter()
        module, optimizer, schedulers = self._fresh()
        run = TrialRun()
        recorded: list[Tensor] = []
        for step in range(steps):
            if time.perf_counter() > deadline:
                run.out_of_time = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss = self._step_loss(module, batches[step % len(batches)], step % len(batches))
            loss.backward()
            optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            recorded.append(loss.detach())
        if recorded:
            values = torch.stack(recorded).float().cpu()
            run.non_finite = not bool(torch.isfinite(values).all())
            run.losses = values.tolist()
        run.seconds = time.perf_counter() - started
        return run

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Any]) -> float:
        """The mean loss of the last trained copy over ``batches`` (eval mode, no gradient)."""
        module = self._template
        module.eval()
        try:
            losses = [self._step_loss(module, batch, index).float() for index, batch in enumerate(batches)]
        finally:
            module.train()
        return float(torch.stack(losses).mean().cpu())

    def release(self) -> None:
        del self._template
        del self._initial
