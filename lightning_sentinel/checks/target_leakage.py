"""TargetLeakageCheck: the model's prediction for a position must not move when only its label changes.

Runs once, on the first training batch (``on_train_batch_start`` of global step 0), on a deep copy of
the LightningModule in eval mode, under ``torch.no_grad``. The copy's ``training_step`` runs twice on
the same inputs: once on the batch's targets, once with ONE target element per sample changed. A
:class:`torch.overrides.TorchFunctionMode` intercepts the functional losses both times and keeps what
they receive. If the outputs scored against the changed labels differ between the two runs, the
target leaks into the input (e.g. a decoder fed the token it predicts: teacher forcing without the
shift). Legitimate teacher forcing is not flagged: a changed label may move later positions, never
its own. The real model, its optimizer, its ``self.log`` calls and the RNG streams stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from lightning_sentinel._validate import require_key, require_number
from lightning_sentinel.base import OnDetect
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._batch_split import TARGET_KEYS, Key, split_batch
from lightning_sentinel.checks._copy_probe import FirstBatchCheck, SkipCheck, eval_copy, preserved_rng
from lightning_sentinel.findings import Severity

TARGET_LEAKAGE = "target-leakage"

register(
    CheckSpec(
        TARGET_LEAKAGE,
        "TargetLeakageCheck",
        Severity.ERROR,
        "the model's output at a position changes when only the label it is scored against changes: the target "
        "leaks into the input (e.g. a decoder fed the unshifted target)",
        "an output scored against a changed label moves by > 1e-4 x the largest output, eval mode, one label per "
        "sample changed; once, on the first training batch",
    ),
)

# the losses whose (input, target) pairs are compared; class scores sit on dim 1 for these two
_CLASS_LOSSES = (F.cross_entropy, F.nll_loss)
_INTERCEPTED = (
    *_CLASS_LOSSES,
    F.binary_cross_entropy_with_logits,
    F.binary_cross_entropy,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
)


# ---------------------------------------------------------------------- pure rules
def perturb_one_per_sample(targets: Tensor) -> Tensor:
    """A copy of ``targets`` (batch first) with one element per sample changed to another valid value.

    Integer labels move to the next label value present in the batch (so they stay in the
    vocabulary); negative labels (``ignore_index``) are left alone; floats inside [0, 1] (binary labels,
    probabilities) become ``1 - value``, other floats move by the targets' std (or 1); booleans flip. The element changed in sample ``i`` is the ``(i * 7 + m // 2) % m``-th of
    its ``m`` elements, so different samples probe different positions.

    Example:
        >>> perturb_one_per_sample(torch.tensor([[2, 3, 4], [4, 2, 3]])).tolist()
        [[2, 4, 4], [4, 2, 4]]
        >>> perturb_one_per_sample(torch.tensor([0, 1, 1])).tolist()
        [1, 0, 0]
        >>> perturb_one_per_sample(torch.tensor([[0.0], [1.0], [0.5]])).tolist()
        [[1.0], [0.0], [0.0]]
    """
    flat = targets.reshape(targets.shape[0], -1).clone()
    samples, per_sample = flat.shape
    rows = torch.arange(samples, device=flat.device)
    columns = (rows * 7 + per_sample // 2) % per_sample
    values = flat[rows, columns]
    if flat.dtype == torch.bool:
        flat[rows, columns] = ~values
    elif flat.is_floating_point() or flat.is_complex():
        if bool(((flat >= 0) & (flat <= 1)).all()):  # probabilities / binary labels: stay inside [0, 1]
            flipped = 1 - values
            flat[rows, columns] = torch.where(flipped != values, flipped, torch.zeros_like(values))
        else:
            spread = flat.float().std() if flat.numel() > 1 else torch.tensor(1.0)
            step = torch.where(torch.isfinite(spread) & (spread > 0), spread, torch.ones_like(spread))
            flat[rows, columns] = values + step.to(flat.dtype)
    else:
        labels = torch.unique(flat[flat >= 0])
        if labels.numel() >= 2:
            position = torch.searchsorted(labels, values.clamp(min=0), right=True) % labels.numel()
            replaced = labels[position]
        else:
            replaced = torch.where(values > 0, values - 1, values + 1)
        flat[rows, columns] = torch.where(values >= 0, replaced, values)
    return flat.reshape(targets.shape)


def scored_outputs(function: Callable[..., Any], scores: Tensor, target: Tensor) -> Tensor | None:
    """The loss input aligned element by element with ``target``: class scores moved to the last dim.

    Returns a tensor of shape ``target.shape + (classes,)`` for class-index losses, ``target.shape``
    for elementwise ones, or ``None`` when the two do not pair up element by element.

    Example:
        >>> scored_outputs(F.cross_entropy, torch.zeros(4, 5, 7), torch.zeros(4, 7, dtype=torch.long)).shape
        torch.Size([4, 7, 5])
        >>> scored_outputs(F.mse_loss, torch.zeros(4, 1), torch.zeros(4)) is None
        True
    """
    if function in _CLASS_LOSSES and not target.is_floating_point():
        if scores.dim() == target.dim() + 1 and scores.dim() >= 2:
            moved = scores.movedim(1, -1)
            return moved if moved.shape[:-1] == target.shape else None
        return None
    return scores if scores.shape == target.shape else None


def leaked_change(before: Tensor, after: Tensor, changed: Tensor) -> tuple[Tensor, Tensor]:
    """Per changed target element, how far the scored output moved; and the output scale.

    ``before``/``after`` are :func:`scored_outputs` of the two runs; ``changed`` is the boolean mask of
    the changed target elements. Returns ``(changes, scale)`` on the device.

    Example:
        >>> before = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> after = torch.tensor([[1.0, 2.5], [3.0, 4.0]])
        >>> changes, scale = leaked_change(before, after, torch.tensor([[False, True], [True, False]]))
        >>> changes.tolist(), scale.item()
        ([0.5, 0.0], 4.0)
    """
    difference = (after.float() - before.float()).abs()
    if difference.dim() > changed.dim():
        difference = difference.flatten(changed.dim()).amax(dim=-1)
    return difference[changed], before.float().abs().max()


@dataclass
class _LossRecord:
    function: Callable[..., Any]
    scores: Tensor
    target: Tensor


class _LossRecorder(TorchFunctionMode):
    """Keeps detached copies of what the functional losses receive; every call runs unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[_LossRecord] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _INTERCEPTED:
            scores = args[0] if args else kwargs.get("input")
            target = args[1] if len(args) > 1 else kwargs.get("target")
            if isinstance(scores, Tensor) and isinstance(target, Tensor):
                self.records.append(_LossRecord(func, scores.detach().clone(), target.detach().clone()))
        return func(*args, **kwargs)


def replace_targets(batch: Any, targets: Tensor, target_key: Key | None = None) -> Any:
    """A shallow copy of ``batch`` holding ``targets`` where the convention (or ``target_key``) puts them.

    Example:
        >>> replace_targets((torch.zeros(2), torch.zeros(2)), torch.ones(2))[1].tolist()
        [1.0, 1.0]
        >>> replace_targets({"x": 1, "label": 2}, torch.ones(1))["label"].tolist()
        [1.0]
    """
    if isinstance(batch, Mapping):
        key = target_key if target_key is not None else next(k for k in TARGET_KEYS if k in batch)
        copied = dict(batch)
        copied[key] = targets
        return copied
    if isinstance(batch, (tuple, list)):
        index = 1 if target_key is None else int(target_key)
        items = list(batch)
        items[index] = targets
        if isinstance(batch, list):
            return items
        return type(batch)._make(items) if hasattr(batch, "_make") else tuple(items)
    raise TypeError(f"cannot put targets into a batch of type {type(batch).__name__}")


# ---------------------------------------------------------------------- the callback
class TargetLeakageCheck(FirstBatchCheck):
    """Reports ``target-leakage``: an output moves when only the label it is scored against changes.

    Once, on the first training batch: a deep copy of the module in eval mode runs ``training_step``
    under ``torch.no_grad`` twice, on the batch and on the batch with one target element per sample
    changed (:func:`perturb_one_per_sample`), with the same RNG seed both times and its ``log`` /
    ``log_dict`` silenced. The functional losses (cross-entropy, NLL, BCE, MSE, L1, smooth L1, Huber,
    and the ``nn.*Loss`` modules that call them) are intercepted; for each call, the outputs paired
    with the changed targets must be identical in both runs. A change above ``tolerance`` x the
    largest output is a leak. A batch without targets, a custom batch type, manual optimization, a
    ``training_step`` that fails on the copy, or no intercepted loss gives one ``info`` finding.

    Cost: two forward passes of a copy of the model, once per fit.

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        target_key: where the targets are in the batch (mapping key: a string, or tuple index: an
            integer), if not the convention's.
        tolerance: relative change of an output, against the largest output, that counts as a leak (a
            finite number > 0; the two runs are identical computations: healthy models give exactly 0; 1e-4 absorbs
            non-deterministic accelerator kernels).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.target_leakage import TargetLeakageCheck
        >>> trainer = pl.Trainer(callbacks=[TargetLeakageCheck(on_detect="raise")], logger=False)
    """

    CHECKS = (TARGET_LEAKAGE,)
    SKIP_NAME = "target-leakage"
    SKIP_HINT = (
        "pass `target_key=` to TargetLeakageCheck, or compute the loss with a torch.nn.functional loss on "
        "(outputs, targets) taken from the batch"
    )

    def __init__(
        self, on_detect: OnDetect = "warn", target_key: str | int | None = None, tolerance: float = 1e-4
    ) -> None:
        super().__init__(on_detect=on_detect)
        self.target_key: Key | None = require_key("target_key", target_key)
        self.tolerance = require_number("tolerance", tolerance, above=0)

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "target_key": self.target_key, "tolerance": self.tolerance}

    @override
    def _run_first_batch_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        with preserved_rng():
            verdicts = self._probe(pl_module, batch, batch_idx)
        for where, message, evidence in verdicts:
            self._report(
                trainer,
                TARGET_LEAKAGE,
                Severity.ERROR,
                message,
                where=where,
                evidence=evidence,
                hint="the model sees the label it is scored against: for teacher forcing feed the decoder "
                "[BOS, target[:-1]] (shift right by one) and score against target; with an attention decoder "
                "also pass a causal mask; check that no input feature is computed from the label",
                magnitude=evidence["max_change"] / max(evidence["output_scale"], 1e-30),
            )

    def _probe(
        self, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> list[tuple[str, str, dict[str, float]]]:
        if not pl_module.automatic_optimization:
            raise SkipCheck("manual optimization: training_step would step the optimizers")
        parts = split_batch(batch, target_key=self.target_key)
        if parts.targets is None or parts.targets.dim() == 0 or parts.targets.numel() == 0:
            raise SkipCheck(f"no target tensor found in the batch ({parts.reason or 'no targets'})")
        targets = parts.targets
        try:
            perturbed_batch = replace_targets(batch, perturb_one_per_sample(targets), self.target_key)
        except (TypeError, KeyError, IndexError, StopIteration, ValueError) as error:
            raise SkipCheck(f"cannot replace the targets {parts.target_name} ({error})") from None
        try:
            duplicate = eval_copy(pl_module)
        except Exception as error:  # e.g. a module holding something that cannot be deep-copied
            raise SkipCheck(
                f"the module cannot be deep-copied ({type(error).__name__}: {str(error)[:120]})"
            ) from None
        runs = [
            self._losses(duplicate, batch, batch_idx),
            self._losses(duplicate, perturbed_batch, batch_idx),
        ]
        original, perturbed = runs
        if not original:
            raise SkipCheck("training_step called none of the intercepted loss functions")
        if len(original) != len(perturbed):
            raise SkipCheck(
                "training_step made a different number of loss calls when only the targets changed"
            )
        verdicts = []
        judged = False
        for index, (first, second) in enumerate(zip(original, perturbed, strict=True)):
            if first.function is not second.function or first.target.shape != second.target.shape:
                continue
            changed = first.target != second.target
            before = scored_outputs(first.function, first.scores, first.target)
            after = scored_outputs(second.function, second.scores, second.target)
            if before is None or after is None or before.shape != after.shape or not bool(changed.any()):
                continue
            judged = True
            changes, scale = leaked_change(before, after, changed)
            moved = changes > self.tolerance * scale.clamp(min=1e-12)
            stats = torch.stack([moved.sum().float(), changes.max(), scale, changed.sum().float()]).tolist()
            leaked, max_change, output_scale, perturbed_count = stats  # the one host read per loss call
            if leaked == 0:
                continue
            name = first.function.__name__
            shape = tuple(first.scores.shape)
            evidence_position: dict[str, float] = {}
            if first.target.numel() == targets.numel():  # the loss target is the batch's, maybe reshaped
                flat_index = int(changed.flatten().nonzero()[moved.nonzero()[0, 0], 0])
                per_sample = max(targets[0].numel(), 1)
                evidence_position = {
                    "first_leaked_sample": flat_index // per_sample,
                    "first_leaked_position": flat_index % per_sample,
                }
            where = f"{parts.target_name} -> {name} input {shape}"
            message = (
                f"in eval mode, changing one label per sample in {parts.target_name} "
                f"{tuple(targets.shape)} moved the {name} input (shape {shape}) at {int(leaked)} of the "
                f"{int(perturbed_count)} changed positions (largest change {max_change:.3g}, outputs up to "
                f"{output_scale:.3g}): the model's prediction sees its own target"
            )
            evidence = {
                "loss_call": index,
                "leaked_positions": leaked,
                "perturbed_positions": perturbed_count,
                "max_change": max_change,
                "output_scale": output_scale,
                **evidence_position,
            }
            verdicts.append((where, message, evidence))
        if not judged:
            raise SkipCheck("no loss call pairs its outputs element by element with the changed targets")
        return verdicts

    @staticmethod
    def _losses(duplicate: pl.LightningModule, batch: Any, batch_idx: int) -> list[_LossRecord]:
        torch.manual_seed(0)  # the same random draws in both runs (the real RNG state is restored after)
        recorder = _LossRecorder()
        try:
            with torch.no_grad(), recorder:
                duplicate.training_step(batch, batch_idx)
        except Exception as error:
            raise SkipCheck(
                f"training_step failed on the eval-mode copy ({type(error).__name__}: {str(error)[:120]})"
            ) from None
        return recorder.records


add_to_presets(TargetLeakageCheck, ("full",), order=6)
