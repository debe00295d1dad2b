"""BatchIndependenceCheck: the output of one sample must not depend on the inputs of the other samples.

Runs once, on the first training batch (``on_train_batch_start`` of global step 0), on a deep copy of
the LightningModule in eval mode (batch-norm in train mode mixes samples legitimately; in eval mode
nothing may), in the trainer's precision context. Two ways, the first that applies:

- **gradients**: the copy's ``forward`` is called as a user would (``forward(inputs)``, else
  ``forward(**batch)`` for a mapping, else ``forward(batch)``); a random projection of one sample's
  output is backpropagated to the inputs, or, for integer token ids (which have no gradient), to the
  outputs of the model's ``nn.Embedding`` layers (its input embedding first, caught by a forward hook).
  Any other sample with a non-zero gradient means something mixes the batch dimension.
- **perturbation**, for a module whose ``forward`` does not take the batch that way (a Hugging Face model
  called inside ``training_step`` as ``self.model(**batch)``): ``training_step`` runs twice under
  ``torch.no_grad``, the second time with one sample's inputs changed (each of its token ids moved to
  another id, or float noise added), and the inputs of the losses it calls (logits, per token too) must
  change for that sample's rows only.

The real model, its optimizer and the torch/numpy/python RNG streams stay untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._validate import require_int, require_key, require_number
from lightning_sentinel.base import OnDetect
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._batches import (
    BatchParts,
    Key,
    find_parts,
    logits_of,
    named_tensors,
    replace_parts,
)
from lightning_sentinel.checks._copy_probe import (
    FirstBatchCheck,
    LossRecord,
    SkipCheck,
    differentiable_in_eval,
    eval_copy,
    input_embeddings,
    preserved_rng,
    recorded_losses,
)
from lightning_sentinel.checks._step import step_context
from lightning_sentinel.findings import Severity

BATCH_MIXING = "batch-mixing"

register(
    CheckSpec(
        BATCH_MIXING,
        "BatchIndependenceCheck",
        Severity.ERROR,
        "in eval mode, the output of one sample depends on the inputs of other samples (a wrong view/reshape, "
        "a transpose or a reduction over the batch dimension)",
        "another sample's input gradient (or output change, when one sample's inputs are perturbed) > 1e-6 x the "
        "largest, once on the first training batch",
    ),
)


# ---------------------------------------------------------------------- pure rule
def leaking_samples(norms: list[float], sample: int, tolerance: float = 1e-6) -> list[int]:
    """The samples other than ``sample`` whose input-gradient norm is above ``tolerance`` x the largest norm.

    ``norms`` are the per-sample input-gradient norms of one sample's output. In a batch-independent
    model every other sample's gradient is exactly 0.

    Example:
        >>> leaking_samples([0.0, 2.0, 0.0, 0.0], sample=1)
        []
        >>> leaking_samples([0.3, 2.0, 0.0, 1e-9], sample=1)
        [0]
    """
    finite = [norm for norm in norms if math.isfinite(norm)]
    scale = max(finite, default=0.0)
    if scale <= 0:
        return []
    return [
        index
        for index, norm in enumerate(norms)
        if index != sample and math.isfinite(norm) and norm > tolerance * scale
    ]


def per_sample_norms(gradients: list[Tensor]) -> Tensor:
    """2-norm of each sample's gradient, summed in quadrature over several input tensors (batch first).

    Example:
        >>> per_sample_norms([torch.tensor([[3.0, 4.0], [0.0, 0.0]])]).tolist()
        [5.0, 0.0]
    """
    squares = torch.stack([g.detach().float().flatten(1).pow(2).sum(dim=1) for g in gradients]).sum(dim=0)
    return squares.sqrt()


def perturb_sample(inputs: Tensor, sample: int, mask: Tensor | None = None) -> Tensor:
    """A copy of ``inputs`` (batch first) with sample ``sample`` changed everywhere its ``mask`` is set: token ids
    move to the next id (modulo the largest id in the batch + 1, so they stay in the vocabulary), floats get
    fixed Gaussian noise of the inputs' scale. The other samples are untouched.

    Example:
        >>> perturb_sample(torch.tensor([[1, 2], [3, 4]]), 1).tolist()
        [[1, 2], [4, 0]]
    """
    changed = inputs.clone()
    row = inputs[sample]
    if inputs.is_floating_point() or inputs.is_complex():
        generator = torch.Generator().manual_seed(4321)
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float32).to(row.device, row.dtype)
        scale = inputs.detach().float().std() if inputs.numel() > 1 else torch.ones((), dtype=torch.float32)
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
        new_row = row + noise * scale.to(row.device, row.dtype)
    else:
        top = inputs.max() + 1
        new_row = (row + 1) % top
    if mask is not None and mask.shape == inputs.shape:
        new_row = torch.where(mask[sample] != 0, new_row, row)
    changed[sample] = new_row
    return changed


def row_changes(before: Tensor, after: Tensor) -> Tensor:
    """Per row (dim 0), the largest absolute change between two runs' loss inputs (float32, on the device).

    Example:
        >>> row_changes(torch.zeros(3, 2), torch.tensor([[0.0, 0.0], [0.5, -2.0], [0.0, 0.1]])).tolist()
        [0.0, 2.0, 0.10000000149011612]
    """
    difference = (after.float() - before.float()).abs()
    return (
        difference.reshape(difference.shape[0], -1).amax(dim=1) if difference.dim() else difference.reshape(1)
    )


def sample_changes(rows: list[float], batch_size: int) -> list[list[float]]:
    """The per-sample changes of loss-input rows under each layout the rows may have: one row per sample, or
    ``k`` rows per sample flattened batch first (``(B*k, ...)``: sample ``i`` owns rows ``i*k .. i*k+k-1``) or
    time first (``(k*B, ...)``: sample ``i`` owns rows ``i, i+B, ...``). Empty when the rows fit no layout.

    Example:
        >>> sample_changes([0.0, 0.0, 1.0, 2.0], 2)  # batch first, then time first
        [[0.0, 2.0], [1.0, 2.0]]
    """
    count = len(rows)
    if count == batch_size:
        return [rows]
    if batch_size < 1 or count % batch_size:
        return []
    per = count // batch_size
    blocks = [max(rows[i * per : (i + 1) * per]) for i in range(batch_size)]
    strided = [max(rows[i::batch_size]) for i in range(batch_size)]
    return [blocks, strided]


# ---------------------------------------------------------------------- the callback
class BatchIndependenceCheck(FirstBatchCheck):
    """Reports ``batch-mixing``: in eval mode, sample ``i``'s output depends on sample ``j``'s input.

    Once, on the first training batch, a deep copy of the module in eval mode runs ``forward`` on the
    batch's inputs (see :mod:`lightning_sentinel.checks._batches` for where the inputs are found: tuples,
    mappings with the Hugging Face names, dataclasses): ``forward(inputs)``, else ``forward(**batch)``,
    else ``forward(batch)``. A fixed random projection of sample ``sample_index``'s output (a tensor, or the
    ``logits`` of a dict or ``ModelOutput``) is backpropagated to the inputs, or, for integer token ids, to
    the outputs of the ``nn.Embedding`` layers. Every other sample's gradient must be exactly 0; the rule
    flags one above ``tolerance`` x the largest gradient norm.

    When no such ``forward`` call works (the model is called inside ``training_step``, e.g.
    ``self.model(**batch).loss``), ``training_step`` runs twice on the copy, the second time with sample
    ``sample_index``'s inputs perturbed (:func:`perturb_sample`: token ids moved to another id at every
    unmasked position, floats given noise), and the inputs of the functional losses it calls are compared
    row by row (per sample, or per token of a flattened ``(batch x time, classes)`` logit matrix): another
    sample's rows that move by more than ``tolerance`` x the perturbed sample's own change are a leak.
    A batch without inputs, a model that runs neither way, or a loss that is not one of the intercepted
    ``torch.nn.functional`` losses gives one ``info`` finding saying what to set.

    Cost: one forward and backward of a copy of the model, once per fit (none on any other step).

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        input_key: where the inputs are in the batch (mapping key or attribute name: a string; tuple
            index: an integer; a dotted path such as ``'inputs.input_ids'``), if not the convention's
            (:mod:`~lightning_sentinel.checks._batches`: ``input_ids``, ``pixel_values``, ``x``, ``batch[0]``...).
        target_key: where the targets are, if not the convention's (only used to tell them from the inputs).
        sample_index: the sample whose output is backpropagated (an integer >= 0, taken modulo the batch
            size); by default the last one, which also catches mixing that only flows forward along
            the batch (a recurrent layer with ``batch_first=False`` fed ``(N, T, F)`` batches).
        tolerance: a gradient norm above ``tolerance`` x the largest one counts as a leak (a finite
            number > 0; healthy models give exactly 0: the default 1e-6 only absorbs rounding).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.batch_mixing import BatchIndependenceCheck
        >>> trainer = pl.Trainer(callbacks=[BatchIndependenceCheck(on_detect="raise")], logger=False)
    """

    CHECKS = (BATCH_MIXING,)
    SKIP_NAME = "batch-independence"
    SKIP_HINT = (
        "pass `input_key=` to BatchIndependenceCheck (a key, an index, an attribute or a dotted path), or give "
        "the LightningModule a `forward(inputs)` (or `forward(**batch)`) that returns batch-first outputs"
    )

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        input_key: str | int | None = None,
        sample_index: int | None = None,
        tolerance: float = 1e-6,
        target_key: str | int | None = None,
    ) -> None:
        super().__init__(on_detect=on_detect)
        self.input_key: Key | None = require_key("input_key", input_key)
        self.target_key: Key | None = require_key("target_key", target_key)
        self.sample_index: int | None = require_int("sample_index", sample_index, minimum=0, allow_none=True)
        self.tolerance = require_number("tolerance", tolerance, above=0)

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {
            **super()._state_key_settings(),
            "input_key": self.input_key,
            "target_key": self.target_key,
            "tolerance": self.tolerance,
        }

    @override
    def _run_first_batch_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        with preserved_rng():
            result = self._probe(trainer, pl_module, batch, batch_idx)
        if result is None:
            return
        input_name, via, norms, sample = result
        leaked = leaking_samples(norms, sample, self.tolerance)
        if not leaked:
            return
        worst = max(leaked, key=lambda index: norms[index])
        own = norms[sample]
        self._report(
            trainer,
            BATCH_MIXING,
            Severity.ERROR,
            f"in eval mode, the output of sample {sample} depends on the inputs of {len(leaked)} other "
            f"sample(s) of {len(norms)} in {input_name}{via} (largest leaked gradient norm {norms[worst]:.3g} "
            f"at sample {worst}; its own {own:.3g})",
            where=input_name,
            evidence={
                "sample": sample,
                "leaked_samples": len(leaked),
                "first_leaked_sample": leaked[0],
                "worst_leaked_sample": worst,
                "leaked_grad_norm": norms[worst],
                "own_grad_norm": own,
                "batch_size": len(norms),
            },
            hint="something mixes the batch dimension in forward: look for view/reshape that regroups it "
            "(x.view(-1, batch) or x.reshape(features, batch).T instead of x.view(batch, -1)), a transpose "
            "or permute before flatten, batch_first=False on a recurrent/attention layer fed (N, T, F), "
            "or a mean/softmax/normalisation over dim 0",
            magnitude=norms[worst] / max(own, 1e-30),
        )

    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> tuple[str, str, list[float], int] | None:
        parts = find_parts(batch, self.input_key, self.target_key)
        if parts.reason:
            raise SkipCheck(f"no input tensor found ({parts.reason})")
        inputs = parts.inputs
        assert inputs is not None
        if inputs.dim() == 0 or inputs.shape[0] < 2:
            raise SkipCheck(
                f"the inputs {parts.input_name} have shape {tuple(inputs.shape)}: need 2+ samples"
            )
        batch_size = int(inputs.shape[0])
        sample = batch_size - 1 if self.sample_index is None else self.sample_index % batch_size
        try:
            duplicate = eval_copy(pl_module)
        except Exception as error:  # e.g. a module holding something that cannot be deep-copied
            raise SkipCheck(
                f"the module cannot be deep-copied ({type(error).__name__}: {str(error)[:120]})"
            ) from None
        by_gradient = self._gradient_probe(trainer, duplicate, batch, parts, sample)
        if by_gradient is not None:
            return by_gradient
        return self._perturbation_probe(trainer, duplicate, batch, batch_idx, parts, sample)

    # ------------------------------------------------------------------ gradients through forward
    def _gradient_probe(
        self, trainer: pl.Trainer, duplicate: pl.LightningModule, batch: Any, parts: BatchParts, sample: int
    ) -> tuple[str, str, list[float], int] | None:
        """Per-sample input-gradient norms of one sample's output, or ``None`` when ``forward`` cannot be called
        with the batch (the perturbation probe takes over)."""
        inputs = parts.inputs
        assert inputs is not None
        batch_size = int(inputs.shape[0])
        leaves: list[Tensor] = []
        via = ""
        handles = []
        if inputs.is_floating_point() or inputs.is_complex():
            leaf = inputs.detach().clone().requires_grad_(True)
            leaves.append(leaf)
            model_input = leaf
        else:
            embeddings = input_embeddings(duplicate)
            if not embeddings:
                return None  # token ids and no embedding to differentiate at: perturb instead
            via = f" (gradients taken at the output of embedding `{embeddings[0][0]}`)"

            def capture(module: Any, args: Any, output: Any) -> Any:
                if (
                    isinstance(output, Tensor)
                    and output.is_floating_point()
                    and output.dim() >= 1
                    and output.shape[0] == batch_size
                ):
                    replaced = output.detach().requires_grad_(True)
                    leaves.append(replaced)
                    return replaced
                return output

            handles = [embedding.register_forward_hook(capture) for _, embedding in embeddings]
            model_input = inputs
        replaced_batch = replace_parts(batch, parts, inputs=model_input)
        try:
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                differentiable_in_eval(duplicate),
                step_context(trainer),
            ):
                output = self._call_forward(duplicate, model_input, replaced_batch)
                if output is None:
                    return None
                projected = self._projection(output, batch_size, sample)
                if projected is None:
                    return None
                usable = [leaf for leaf in leaves if leaf.dim() >= 1 and leaf.shape[0] == batch_size]
                if not usable:
                    return None
                try:
                    gradients = torch.autograd.grad(projected, usable, allow_unused=True)
                except RuntimeError:
                    return None
        finally:
            for handle in handles:
                handle.remove()
        present = [g for g in gradients if g is not None]
        if not present:
            return None  # the output does not depend on the inputs by this path: let the perturbation tell
        norms = per_sample_norms(present).tolist()  # the one host read
        return parts.input_name, via, norms, sample

    @staticmethod
    def _call_forward(duplicate: pl.LightningModule, model_input: Tensor, batch: Any) -> Any:
        """``forward`` called as a user would: with the inputs, with the batch's items as keywords, or with the batch."""
        calls = [lambda: duplicate(model_input)]
        if isinstance(batch, Mapping):
            calls.append(lambda: duplicate(**batch))
        calls.append(lambda: duplicate(batch))
        for call in calls:
            try:
                return call()
            except Exception:
                continue
        return None

    @staticmethod
    def _projection(output: Any, batch_size: int, sample: int) -> Tensor | None:
        """A fixed random projection of sample ``sample``'s part of the batch-first, differentiable float output
        (``output``, its ``logits``, or the first such tensor inside it); ``None`` if there is none."""
        candidates = [logits_of(output, batch_size)] + [
            tensor for _, tensor in named_tensors(output, "output")
        ]
        for tensor in candidates:
            if (
                isinstance(tensor, Tensor)
                and tensor.is_floating_point()
                and tensor.dim() >= 1
                and tensor.shape[0] == batch_size
                and tensor.requires_grad
            ):
                row = tensor[sample].float()
                generator = torch.Generator().manual_seed(1234)
                weights = torch.randn(row.shape, generator=generator, dtype=torch.float32).to(row.device)
                return (row * weights).sum()
        return None

    # ------------------------------------------------------------------ perturbation through training_step
    def _perturbation_probe(
        self,
        trainer: pl.Trainer,
        duplicate: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        parts: BatchParts,
        sample: int,
    ) -> tuple[str, str, list[float], int] | None:
        if not duplicate.automatic_optimization:
            raise SkipCheck(
                "forward cannot be called with the batch, and manual optimization: training_step would step "
                "the optimizers"
            )
        inputs = parts.inputs
        assert inputs is not None
        batch_size = int(inputs.shape[0])
        perturbed = replace_parts(batch, parts, inputs=perturb_sample(inputs, sample, parts.mask))
        original = recorded_losses(duplicate, batch, batch_idx, trainer)
        changed = recorded_losses(duplicate, perturbed, batch_idx, trainer)
        pairs = [
            (first, second)
            for first, second in zip(original, changed, strict=False)
            if first.function is second.function
            and first.scores.shape == second.scores.shape
            and first.scores.dim() >= 1
        ]
        if not pairs:
            raise SkipCheck(
                f"forward cannot be called with {parts.input_name} (alone, as keywords or as the batch) and "
                "training_step calls none of the intercepted torch.nn.functional losses"
            )
        rows = [row_changes(first.scores, second.scores) for first, second in pairs]
        values = torch.cat(rows).tolist()  # the one host read
        judged = False
        offset = 0
        for (first, _), row in zip(pairs, rows, strict=True):
            per_row = values[offset : offset + row.numel()]
            offset += row.numel()
            layouts = sample_changes(per_row, batch_size)
            if not layouts:
                continue
            judged = True
            if all(leaking_samples(norms, sample, self.tolerance) for norms in layouts):
                return parts.input_name, self._via(first, sample), layouts[0], sample
        if not judged:
            raise SkipCheck(
                "the loss inputs of training_step are not batch-first (their rows match neither one per sample "
                f"nor a flattened batch of {batch_size})"
            )
        return None

    @staticmethod
    def _via(record: LossRecord, sample: int) -> str:
        return (
            f" (seen by perturbing sample {sample}'s inputs: the {record.function.__name__} input "
            f"{tuple(record.scores.shape)} changed for other samples; the sizes are output changes, not gradients)"
        )


add_to_presets(BatchIndependenceCheck, ("full",), order=6)
