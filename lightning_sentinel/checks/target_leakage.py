"""TargetLeakageCheck: the model's prediction for a position must not move when only its label changes.

Runs once, on the first training batch (``on_train_batch_start`` of global step 0), on a deep copy of
the LightningModule in eval mode, under ``torch.no_grad`` and the trainer's precision context. The copy's
``training_step`` runs twice on the same inputs: once on the batch's targets, once with ONE target element
per sample changed. A :class:`torch.overrides.TorchFunctionMode` intercepts the functional losses both
times and keeps what they receive. If the outputs scored against the changed labels differ between the
two runs, the target leaks into the input (e.g. a decoder fed the token it predicts: teacher forcing
without the shift). Legitimate teacher forcing is not flagged: a changed label may move later positions,
never its own.

Language models: when the labels *are* the input tokens (Hugging Face causal LMs take ``labels=input_ids``
and shift inside their loss; or a pipeline that shifted them by one), changing a label means changing
that token, so the token is changed in the inputs too. A causal LM scores the logits at ``t - 1`` against
token ``t``, and those never see token ``t``: quiet. A loss that forgets the shift (logits at ``t`` scored
against token ``t``) or an attention mask that lets ``t - 1`` see ``t`` (a non-causal decoder) moves them:
``target-leakage``. A batch without labels whose ``training_step`` makes them from ``input_ids`` is probed
by changing the tokens alone. The real model, its optimizer, its ``self.log`` calls and the RNG streams stay
untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._validate import require_key, require_number
from lightning_sentinel.base import OnDetect
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._batches import (
    BatchParts,
    Key,
    find_parts,
    is_token_ids,
    replace_parts,
    set_path,
    target_path,
)
from lightning_sentinel.checks._copy_probe import (
    CLASS_LOSSES,
    FirstBatchCheck,
    LossRecord,
    SkipCheck,
    eval_copy,
    preserved_rng,
    recorded_losses,
)
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

_CLASS_LOSSES = CLASS_LOSSES


# ---------------------------------------------------------------------- pure rules
def perturb_one_per_sample(targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """A copy of ``targets`` (batch first) with one element per sample changed to another valid value.

    Integer labels move to the next label value present in the batch (so they stay in the
    vocabulary); negative labels (``ignore_index``) are left alone; floats inside [0, 1] (binary labels,
    probabilities) become ``1 - value``, other floats move by the targets' std (or 1); booleans flip. The
    element changed in sample ``i`` is the ``(i * 7 + m // 2) % m``-th of its ``m`` candidates: all its
    elements, or those where ``valid`` (a boolean tensor of the targets' shape: real tokens, not padding) is
    set; a sample without any is left alone. Different samples probe different positions.

    Example:
        >>> perturb_one_per_sample(torch.tensor([[2, 3, 4], [4, 2, 3]])).tolist()
        [[2, 4, 4], [4, 2, 4]]
        >>> perturb_one_per_sample(torch.tensor([0, 1, 1])).tolist()
        [1, 0, 0]
        >>> perturb_one_per_sample(torch.tensor([[0.0], [1.0], [0.5]])).tolist()
        [[1.0], [0.0], [0.0]]
        >>> perturb_one_per_sample(torch.tensor([[5, 6, 0, 0]]), torch.tensor([[True, True, False, False]])).tolist()
        [[5, 5, 0, 0]]
    """
    flat = targets.reshape(targets.shape[0], -1).clone()
    samples, per_sample = flat.shape
    rows = torch.arange(samples, device=flat.device)
    if valid is None:
        columns = (rows * 7 + per_sample // 2) % per_sample
        usable = torch.ones(samples, dtype=torch.bool, device=flat.device)
    else:
        allowed = valid.reshape(samples, -1).to(flat.device).bool()
        counts = allowed.sum(dim=1)
        rank = (rows * 7 + counts // 2) % counts.clamp(min=1)
        order = allowed.long().cumsum(dim=1) - 1  # the rank of each allowed element in its row
        hit = allowed & (order == rank[:, None])
        columns = hit.long().argmax(dim=1)
        usable = counts > 0
    values = flat[rows, columns]
    if flat.dtype == torch.bool:
        replaced = ~values
    elif flat.is_floating_point() or flat.is_complex():
        if bool(((flat >= 0) & (flat <= 1)).all()):  # probabilities / binary labels: stay inside [0, 1]
            flipped = 1 - values
            replaced = torch.where(flipped != values, flipped, torch.zeros_like(values))
        else:
            spread = flat.float().std() if flat.numel() > 1 else torch.ones((), dtype=torch.float32)
            step = torch.where(torch.isfinite(spread) & (spread > 0), spread, torch.ones_like(spread))
            replaced = values + step.to(flat.device, flat.dtype)
    else:
        present = flat >= 0 if valid is None else (flat >= 0) & allowed
        labels = torch.unique(flat[present])
        if labels.numel() >= 2:
            position = torch.searchsorted(labels, values.clamp(min=0), right=True) % labels.numel()
            moved = labels[position]
        else:
            moved = torch.where(values > 0, values - 1, values + 1)
        replaced = torch.where(values >= 0, moved, values)
    flat[rows, columns] = torch.where(usable, replaced, values)
    return flat.reshape(targets.shape)


def token_offset(targets: Tensor, inputs: Tensor, valid: Tensor | None = None) -> int | None:
    """How the labels are the input tokens: ``0`` when ``targets[:, t] == inputs[:, t]`` at every labelled
    position (Hugging Face causal LMs: ``labels=input_ids``, shifted inside the loss), ``1`` when
    ``targets[:, t] == inputs[:, t + 1]`` (a pipeline that shifted them), else ``None`` (labels of their own:
    classes, tags, a masked LM's hidden tokens). Labelled positions: non-negative targets where ``valid`` is set.

    Example:
        >>> tokens = torch.tensor([[3, 4, 5, 6]])
        >>> token_offset(tokens, tokens), token_offset(torch.tensor([[4, 5, 6, -100]]), tokens)
        (0, 1)
        >>> token_offset(torch.tensor([[1, 0, 1, 1]]), tokens) is None
        True
    """
    if (
        not (is_token_ids(targets) and is_token_ids(inputs))
        or targets.shape != inputs.shape
        or inputs.dim() < 2
    ):
        return None
    labelled = targets >= 0
    if valid is not None and valid.shape == targets.shape:
        labelled = labelled & (valid != 0)
    columns = targets.shape[-1]
    flags = []
    for offset in (0, 1):
        if offset >= columns:
            flags.append(torch.zeros((), dtype=torch.bool, device=targets.device))
            continue
        here = labelled[..., : columns - offset]
        same = targets[..., : columns - offset] == inputs[..., offset:]
        flags.append(here.any() & (same | ~here).all())
    first, second = torch.stack(flags).tolist()  # one host read
    return 0 if first else (1 if second else None)


def with_tokens_changed(inputs: Tensor, old_targets: Tensor, new_targets: Tensor, offset: int) -> Tensor:
    """The inputs with the token behind every changed label changed the same way (label ``t`` is input token
    ``t + offset``).

    Example:
        >>> with_tokens_changed(torch.tensor([[3, 4, 5]]), torch.tensor([[4, 5, -100]]), torch.tensor([[4, 9, -100]]), 1).tolist()
        [[3, 4, 9]]
    """
    changed = old_targets != new_targets
    result = inputs.clone()
    columns = inputs.shape[-1]
    result[..., offset:] = torch.where(
        changed[..., : columns - offset], new_targets[..., : columns - offset], inputs[..., offset:]
    )
    return result


def scored_outputs(function: Callable[..., Any], scores: Tensor, target: Tensor) -> Tensor | None:
    """The loss input aligned element by element with ``target``: class scores moved to the last dim.

    Returns a tensor of shape ``target.shape + (classes,)`` for class-index losses, ``target.shape``
    for elementwise ones, or ``None`` when the two do not pair up element by element.

    Example:
        >>> scored_outputs(torch.nn.functional.cross_entropy, torch.zeros(4, 5, 7), torch.zeros(4, 7, dtype=torch.long)).shape
        torch.Size([4, 7, 5])
        >>> scored_outputs(torch.nn.functional.mse_loss, torch.zeros(4, 1), torch.zeros(4)) is None
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


def replace_targets(batch: Any, targets: Tensor, target_key: Key | None = None) -> Any:
    """A copy of ``batch`` holding ``targets`` where the convention (or ``target_key``) puts them.

    Example:
        >>> replace_targets((torch.zeros(2), torch.zeros(2)), torch.ones(2))[1].tolist()
        [1.0, 1.0]
        >>> replace_targets({"x": 1, "label": 2}, torch.ones(1))["label"].tolist()
        [1.0]
    """
    path = target_path(batch, target_key)
    if path is None:
        raise TypeError(f"cannot find where the targets are in a batch of type {type(batch).__name__}")
    return set_path(batch, path, targets)


# ---------------------------------------------------------------------- the callback
class TargetLeakageCheck(FirstBatchCheck):
    """Reports ``target-leakage``: an output moves when only the label it is scored against changes.

    Once, on the first training batch: a deep copy of the module in eval mode runs ``training_step``
    under ``torch.no_grad`` twice, on the batch and on the batch with one target element per sample
    changed (:func:`perturb_one_per_sample`, at a labelled, unpadded position), with the same RNG seed both
    times and its ``log`` / ``log_dict`` silenced. The functional losses (cross-entropy, NLL, BCE, MSE, L1,
    smooth L1, Huber, and the ``nn.*Loss`` modules and Hugging Face loss functions that call them) are
    intercepted; for each call, the outputs paired with the changed targets must be identical in both runs.
    A change above ``tolerance`` x the largest output is a leak.

    When the labels are the input tokens (:func:`token_offset`: ``labels == input_ids``, the Hugging Face
    convention for causal LMs, or ``labels[t] == input_ids[t + 1]``), the token behind each changed label is
    changed in the inputs too (:func:`with_tokens_changed`). A batch without targets but with token inputs
    is probed by changing one token per sample, and only loss calls whose targets are those tokens (shifted
    by 0 or 1) are judged. A batch without inputs or targets, manual optimization, a ``training_step`` that
    fails on the copy, or no intercepted loss gives one ``info`` finding saying what to set.

    Cost: two forward passes of a copy of the model, once per fit.

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        target_key: where the targets are in the batch (mapping key or attribute: a string; tuple index: an
            integer; or a dotted path), if not the convention's (``labels``, ``y``, ``targets``, ``batch[1]``...).
        tolerance: relative change of an output, against the largest output, that counts as a leak (a
            finite number > 0; the two runs are identical computations: healthy models give exactly 0; 1e-4 absorbs
            non-deterministic accelerator kernels).
        input_key: where the inputs are (same forms as ``target_key``; ``input_ids``, ``x``, ``batch[0]``... by
            default): the token inputs that language-model labels are compared with.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.target_leakage import TargetLeakageCheck
        >>> trainer = pl.Trainer(callbacks=[TargetLeakageCheck(on_detect="raise")], logger=False)
    """

    CHECKS = (TARGET_LEAKAGE,)
    SKIP_NAME = "target-leakage"
    SKIP_HINT = (
        "pass `target_key=` (and `input_key=`) to TargetLeakageCheck, or compute the loss with a "
        "torch.nn.functional loss on (outputs, targets) taken from the batch"
    )

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        target_key: str | int | None = None,
        tolerance: float = 1e-4,
        input_key: str | int | None = None,
    ) -> None:
        super().__init__(on_detect=on_detect)
        self.target_key: Key | None = require_key("target_key", target_key)
        self.tolerance = require_number("tolerance", tolerance, above=0)
        self.input_key: Key | None = require_key("input_key", input_key)

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {
            **super()._state_key_settings(),
            "target_key": self.target_key,
            "input_key": self.input_key,
            "tolerance": self.tolerance,
        }

    @override
    def _run_first_batch_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        with preserved_rng():
            verdicts = self._probe(trainer, pl_module, batch, batch_idx)
        for where, message, evidence in verdicts:
            self._report(
                trainer,
                TARGET_LEAKAGE,
                Severity.ERROR,
                message,
                where=where,
                evidence=evidence,
                hint="the model sees the label it is scored against: for teacher forcing feed the decoder "
                "[BOS, target[:-1]] (shift right by one) and score against target; for a language model score "
                "logits[:, :-1] against labels[:, 1:] (Hugging Face models shift inside when given "
                "labels=input_ids) and keep the decoder's attention causal (a triangular mask, is_decoder=True); "
                "check that no input feature is computed from the label",
                magnitude=evidence["max_change"] / max(evidence["output_scale"], 1e-30),
            )

    def _perturbed(self, batch: Any, parts: BatchParts) -> tuple[Any, Tensor, str, int | None]:
        """The batch with one label per sample changed, the labels (as the losses see them before), how the
        change reads in messages, and the token offset of language-model labels (``None`` otherwise)."""
        inputs, targets, mask = parts.inputs, parts.targets, parts.mask
        if targets is not None:
            offset = token_offset(targets, inputs) if inputs is not None else None
            valid = targets >= 0 if is_token_ids(targets) else None
            if offset is not None and inputs is not None:
                valid = _labelled_positions(targets, mask, offset)
            new_targets = perturb_one_per_sample(targets, valid)
            if offset is None or inputs is None:
                return (
                    replace_parts(batch, parts, targets=new_targets),
                    targets,
                    f"one label per sample in {parts.target_name}",
                    None,
                )
            new_inputs = with_tokens_changed(inputs, targets, new_targets, offset)
            return (
                replace_parts(batch, parts, inputs=new_inputs, targets=new_targets),
                targets,
                f"one label per sample in {parts.target_name} and its token in {parts.input_name} (the labels are "
                f"the input tokens{', shifted by one' if offset else ''})",
                offset,
            )
        if inputs is None or not parts.tokens or inputs.dim() < 2:
            raise SkipCheck(f"no target tensor found in the batch ({parts.target_reason or parts.reason})")
        valid = (mask != 0) if mask is not None and mask.shape == inputs.shape else None
        new_inputs = perturb_one_per_sample(inputs, valid)
        return (
            replace_parts(batch, parts, inputs=new_inputs),
            inputs,
            f"one token per sample in {parts.input_name} (the batch has no labels: training_step makes them "
            "from the tokens)",
            -1,
        )

    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> list[tuple[str, str, dict[str, float]]]:
        if not pl_module.automatic_optimization:
            raise SkipCheck("manual optimization: training_step would step the optimizers")
        parts = find_parts(batch, self.input_key, self.target_key)
        if parts.targets is None and parts.inputs is None:
            raise SkipCheck(f"no target tensor found in the batch ({parts.target_reason or parts.reason})")
        if parts.targets is not None and (parts.targets.dim() == 0 or parts.targets.numel() == 0):
            raise SkipCheck(f"the targets {parts.target_name} hold no element per sample")
        try:
            perturbed_batch, targets, changed_what, offset = self._perturbed(batch, parts)
        except (TypeError, KeyError, IndexError, ValueError) as error:
            raise SkipCheck(f"cannot replace the targets {parts.target_name} ({error})") from None
        target_name = parts.target_name or f"{parts.input_name} (as labels)"
        try:
            duplicate = eval_copy(pl_module)
        except Exception as error:  # e.g. a module holding something that cannot be deep-copied
            raise SkipCheck(
                f"the module cannot be deep-copied ({type(error).__name__}: {str(error)[:120]})"
            ) from None
        original = recorded_losses(duplicate, batch, batch_idx, trainer)
        perturbed = recorded_losses(duplicate, perturbed_batch, batch_idx, trainer)
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
            if offset == -1 and not _targets_are_tokens(first, targets):
                continue  # labels made in training_step but not the tokens themselves: not this probe's case
            changed = first.target != second.target
            before = scored_outputs(first.function, first.scores, first.target)
            after = scored_outputs(second.function, second.scores, second.target)
            if before is None or after is None or before.shape != after.shape or not bool(changed.any()):
                continue
            judged = True
            changes, scale = leaked_change(before, after, changed)
            moved = changes > self.tolerance * scale.clamp(min=1e-12)
            stats = torch.stack(
                [moved.sum().float(), changes.max().float(), scale.float(), changed.sum().float()]
            ).tolist()
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
            where = f"{target_name} -> {name} input {shape}"
            message = (
                f"in eval mode, changing {changed_what} {tuple(targets.shape)} moved the {name} input (shape "
                f"{shape}) at {int(leaked)} of the {int(perturbed_count)} changed positions (largest change "
                f"{max_change:.3g}, outputs up to {output_scale:.3g}): the model's prediction sees its own target"
            )
            evidence = {
                "loss_call": index,
                "leaked_positions": leaked,
                "perturbed_positions": perturbed_count,
                "max_change": max_change,
                "output_scale": output_scale,
                "token_offset": float(offset) if offset is not None and offset >= 0 else float("nan"),
                **evidence_position,
            }
            verdicts.append((where, message, evidence))
        if not judged:
            raise SkipCheck("no loss call pairs its outputs element by element with the changed targets")
        return verdicts


def _labelled_positions(targets: Tensor, mask: Tensor | None, offset: int) -> Tensor:
    """Where a language model's label may be changed: a labelled position whose token (``t + offset``) exists
    and is not padding."""
    valid = targets >= 0
    columns = targets.shape[-1]
    if offset:
        valid[..., columns - offset :] = False
    if mask is not None and mask.shape == targets.shape:
        shifted = torch.zeros_like(valid)
        shifted[..., : columns - offset] = mask[..., offset:] != 0
        valid = valid & shifted
    return valid


def _targets_are_tokens(record: LossRecord, tokens: Tensor) -> bool:
    """Whether a loss call's targets are the token inputs, shifted by 0 or 1 (an LM's labels made in
    ``training_step``), rather than labels computed from them."""
    target = record.target
    if not is_token_ids(target) or target.numel() % max(tokens.shape[0], 1):
        return False
    rows = target.reshape(tokens.shape[0], -1)
    length, columns = rows.shape[1], tokens.shape[-1]
    flat_tokens = tokens.reshape(tokens.shape[0], -1)
    for offset in (0, 1):
        compared = min(length, columns - offset)
        head, tail = rows[:, :compared], rows[:, compared:]
        window = flat_tokens[:, offset : offset + compared]
        labelled = head >= 0
        if bool(labelled.any() & ((head == window) | ~labelled).all() & (tail < 0).all()):
            return (
                True  # e.g. a Hugging Face loss's labels[:, 1:] padded with -100: the tokens shifted by one
            )
    return False


add_to_presets(TargetLeakageCheck, ("full",), order=6)
