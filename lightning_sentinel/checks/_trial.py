"""Short trial trainings on a copy of the model, before the real training starts (the preflight checks).

A trial never touches the real run: it trains a deep copy of the LightningModule with a fresh optimizer
from the copy's own ``configure_optimizers``, takes its batches from a *fresh* iterator over the training
dataloader, and restores every random state it may consume (torch, CUDA, numpy, python, and the
generators of the dataloader and its sampler) so that the real run's weights, optimizer state and batch
order are exactly what they would have been without it.

A trial trains what the user trains, as the trainer trains it: the copy keeps the train/eval mode of
every submodule (a backbone the user keeps in eval mode stays in eval mode), frozen parameters stay
frozen (``requires_grad=False``, or left out of the optimizer), batches pass through the precision
plugin's ``convert_input`` and the module's batch-transfer hooks, each step runs inside the precision
plugin's step context (default dtype, autocast), fp16 gradients are scaled by a scaler of the trial's
own, and the trainer's gradient clipping applies (see :mod:`lightning_sentinel.checks._step`).

Example:
    >>> import torch
    >>> with forked_random_state():
    ...     _ = torch.rand(3)  # consumed inside, restored on exit
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_sentinel._hooks import silence_logging, uncompile_copy
from lightning_sentinel.checks._batches import loss_of
from lightning_sentinel.checks._step import (
    clip_gradients,
    eval_mode,
    grad_scaler,
    module_modes,
    prepare_batch,
    restore_modes,
    step_context,
)


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


# ---------------------------------------------------------------------- the module copy
def trial_copy(pl_module: pl.LightningModule, trainer: pl.Trainer) -> pl.LightningModule:
    """A deep copy of ``pl_module`` with ``log``/``log_dict`` silenced and no trainer attached.

    The trainer and its callbacks are shared, not copied, should a hook of the model refer to them. Every
    submodule keeps its train/eval mode and every parameter its ``requires_grad``.
    """
    memo: dict[int, Any] = {id(trainer): trainer}
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        memo[id(callback)] = callback
    clone = copy.deepcopy(pl_module, memo)
    clone._trainer = None  # type: ignore[assignment]
    uncompile_copy(clone)
    silence_logging(clone)
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


# ---------------------------------------------------------------------- the trial run
@dataclass
class TrialRun:
    """What one trial training produced: the loss per step (on the host), the held-out losses measured on the
    way (``(steps done, loss)``), the seconds used, and whether time ran out or the loss became non-finite."""

    losses: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    out_of_time: bool = False
    non_finite: bool = False

    def evaluation_at(self, fraction: float) -> float:
        """The evaluation nearest to ``fraction`` of the steps done (NaN if none was made)."""
        if not self.evaluations:
            return math.nan
        done = max(step for step, _ in self.evaluations)
        return min(self.evaluations, key=lambda item: abs(item[0] - fraction * done))[1]


class Trial:
    """Trains copies of one model from the same starting weights, under a wall-clock budget.

    Args:
        pl_module: the real module (never modified).
        trainer: the real trainer: its precision plugin, batch hooks and clipping are applied (it is lent to
            the copy only if the copy's hooks cannot run without one).
    """

    def __init__(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None) -> None:
        self.trainer = trainer
        self.device = pl_module.device
        self._template = trial_copy(pl_module, trainer) if trainer is not None else _plain_copy(pl_module)
        self._modes = module_modes(self._template)
        self._initial = copy.deepcopy(self._template.state_dict())
        self._needs_trainer = False

    def to_device(self, batch: Any) -> Any:
        """``batch`` converted (precision) and moved (device, batch hooks) as the training loop does it."""
        return prepare_batch(self.trainer, batch, self.device)

    def reset(self) -> None:
        """Put the copy back to the real model's weights, buffers and train/eval modes."""
        self._template.load_state_dict(self._initial)
        restore_modes(self._template, self._modes)

    def _fresh(self) -> tuple[pl.LightningModule, torch.optim.Optimizer, list[Any]]:
        self.reset()
        for parameter in self._template.parameters():
            parameter.grad = None
        try:
            with attached(self._template, self.trainer if self._needs_trainer else None):
                configured = self._template.configure_optimizers()
        except Exception:
            if self._needs_trainer or self.trainer is None:
                raise
            self._needs_trainer = True
            with attached(self._template, self.trainer):
                configured = self._template.configure_optimizers()
        optimizer = first_optimizer(configured)
        return self._template, optimizer, step_schedulers(configured, optimizer)

    def _call_step(self, module: pl.LightningModule, batch: Any, index: int) -> Tensor:
        with attached(module, self.trainer if self._needs_trainer else None), step_context(self.trainer):
            output = module.training_step(batch, index)
        loss = loss_of(output)
        if loss is None:
            raise TrialUnavailable(
                f"`training_step` returned {type(output).__name__}, not a loss tensor, a dict with 'loss' or an "
                "object with `.loss`"
            )
        return loss

    def _step_loss(self, module: pl.LightningModule, batch: Any, index: int) -> Tensor:
        try:
            return self._call_step(module, batch, index)
        except TrialUnavailable:
            raise
        except Exception:
            if self._needs_trainer or self.trainer is None:
                raise
            self._needs_trainer = True
            return self._call_step(module, batch, index)

    def train(
        self,
        batches: Sequence[Any],
        steps: int,
        deadline: float,
        held_out: Sequence[Any] = (),
        evaluations: int = 0,
    ) -> TrialRun:
        """Train a fresh copy for ``steps`` steps cycling over ``batches``; losses read once at the end.

        With ``evaluations`` > 0, the mean loss over ``held_out`` is measured (eval mode) that many times at
        even intervals, the last one after the final step.
        """
        started = time.perf_counter()
        module, optimizer, schedulers = self._fresh()
        scaler = grad_scaler(self.trainer)
        run = TrialRun()
        recorded: list[Tensor] = []
        marks = {round(steps * (k + 1) / evaluations) for k in range(evaluations)} if evaluations else set()
        for step in range(steps):
            if time.perf_counter() > deadline:
                run.out_of_time = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss = self._step_loss(module, batches[step % len(batches)], step % len(batches))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                clip_gradients(self.trainer, optimizer)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                clip_gradients(self.trainer, optimizer)
                optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            recorded.append(loss.detach())
            if step + 1 in marks and held_out:
                run.evaluations.append((step + 1, self.evaluate(held_out)))
        done = len(recorded)
        if evaluations and held_out and done and (not run.evaluations or run.evaluations[-1][0] != done):
            run.evaluations.append(
                (done, self.evaluate(held_out))
            )  # cut short: the last one after the last step
        if recorded:
            values = torch.stack(recorded).float().cpu()
            run.non_finite = not bool(torch.isfinite(values).all())
            run.losses = values.tolist()
        run.seconds = time.perf_counter() - started
        return run

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Any]) -> float:
        """The mean loss of the last trained copy over ``batches`` (eval mode, no gradient; modes restored)."""
        module = self._template
        with eval_mode(module):
            losses = [self._step_loss(module, batch, index).float() for index, batch in enumerate(batches)]
        return float(torch.stack(losses).mean().cpu())

    def release(self) -> None:
        del self._template
        del self._initial


def _plain_copy(pl_module: pl.LightningModule) -> pl.LightningModule:
    """A copy for a trial without a trainer (tests of the trial machinery alone)."""
    clone = copy.deepcopy(pl_module)
    uncompile_copy(clone)
    silence_logging(clone)
    return clone
