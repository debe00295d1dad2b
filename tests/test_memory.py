"""A long run with every callback keeps no growing reference to batches, activations or gradients.

1000 optimizer steps (300 in the default run; 1000 under ``-m slow``, ~20-30 s on a busy CPU) of a
tiny classifier under ``Sentinel(preset="full")`` and a ``HistogramLogger`` (logging to TensorBoard,
with a validation loop). Between step 200 (100) and the last step we compare:

- how many of the batches, activations and gradients of earlier steps are still alive (weak
  references taken in ``training_step``, in a forward hook and after ``backward``);
- the number and the total bytes of live tensors (``gc``), and, in the slow run, the Python heap
  (``tracemalloc``, less this test's own bookkeeping).

Each check keeps a bounded window of statistics, so none of these may grow with the step count.
Measured (1000 steps): 84 live tensors (29.9 kB) at step 200 and at step 1000, one batch, no
activation and the current step's 4 gradients alive, +368 bytes of Python heap over 800 steps.
"""

from __future__ import annotations

import gc
import tracemalloc
import warnings
import weakref
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sentinel import HistogramLogger, Sentinel


def live_tensors() -> tuple[int, int]:
    """(number of live tensors, bytes of their distinct storages), after a full collection."""
    gc.collect()
    count, storages = 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch proxies warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, Tensor) and not obj.is_meta:
                    count += 1
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except Exception:  # objects that are half torn down
                continue
    return count, sum(storages.values())


def python_heap() -> int:
    """Bytes traced by ``tracemalloc`` (0 when off), less what this file allocated (its weak references)."""
    if not tracemalloc.is_tracing():
        return 0
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, __file__)])
    return sum(statistic.size for statistic in snapshot.statistics("filename"))


class Tracked(pl.LightningModule):
    """A tiny classifier that keeps weak references to every batch, activation and gradient it made."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
        self.batches: list[weakref.ref] = []
        self.activations: list[weakref.ref] = []
        self.gradients: list[weakref.ref] = []
        self.net[1].register_forward_hook(self._remember_activation)

    def _remember_activation(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self.training and torch.is_grad_enabled():
            self.activations.append(weakref.ref(output))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if torch.is_grad_enabled():
            self.batches.append(weakref.ref(x))
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_after_backward(self) -> None:
        self.gradients.extend(weakref.ref(p.grad) for p in self.parameters() if p.grad is not None)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def alive(references: list[weakref.ref]) -> int:
    return sum(reference() is not None for reference in references)


class Measure(pl.Callback):
    """Measures at the end of two optimizer steps."""

    def __init__(self, steps: tuple[int, int]) -> None:
        self.steps = steps
        self.at: dict[int, dict[str, float]] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step not in self.steps or step in self.at:
            return
        del outputs, batch  # this hook's own references
        tensors, tensor_bytes = live_tensors()
        self.at[step] = {
            "batches": alive(module.batches),
            "activations": alive(module.activations),
            "gradients": alive(module.gradients),
            "tensors": tensors,
            "tensor_bytes": tensor_bytes,
            "python_bytes": python_heap(),
        }


def loader(n: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=generator)


@pytest.mark.parametrize(
    ("first", "last", "trace"),
    [(100, 300, False), pytest.param(200, 1000, True, marks=pytest.mark.slow)],
    ids=["300-steps", "1000-steps-tracemalloc"],
)
def test_long_run_keeps_no_growing_references(tmp_path, first, last, trace):
    module, measure = Tracked(), Measure((first, last))
    trainer = pl.Trainer(
        max_steps=last,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        callbacks=[Sentinel(preset="full"), HistogramLogger(every_n_steps=50), measure],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        check_val_every_n_epoch=4,
        log_every_n_steps=50,
    )
    if trace:
        tracemalloc.start()
    try:
        trainer.fit(module, loader(512, 0), loader(64, 1))
    finally:
        if trace:
            tracemalloc.stop()
    assert trainer.global_step == last and set(measure.at) == {first, last}
    early, late = measure.at[first], measure.at[last]
    print(f"memory at step {first}: {early}\nmemory at step {last}: {late}")
    assert len(module.batches) == last  # every real step was tracked ...
    assert len(module.activations) >= last and len(module.gradients) >= last
    # ... and only the current step's objects (and a bounded window of earlier ones) are alive
    for kind in ("batches", "activations", "gradients"):
        assert late[kind] <= 8, (kind, late[kind])
        assert late[kind] <= early[kind] + 2, (kind, early[kind], late[kind])
    # the later steps add no tensors, no tensor memory and (almost) no Python heap
    assert late["tensors"] - early["tensors"] <= 20, (early["tensors"], late["tensors"])
    assert late["tensor_bytes"] - early["tensor_bytes"] <= 64 * 1024, (early, late)
    assert late["python_bytes"] - early["python_bytes"] <= 64 * 1024, (early, late)
