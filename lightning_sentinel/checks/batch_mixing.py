"""BatchIndependenceCheck: the output of one sample must not depend on the inputs of the other samples.

Runs once, on the first training batch (``on_train_batch_start`` of global step 0), on a deep copy of
the LightningModule in eval mode (batch-norm in train mode mixes samples legitimately; in eval mode
nothing may). It backpropagates a random projection of one sample's output through the copy's
``forward`` to the inputs and reads the per-sample gradient norms back once. Any other sample with a
non-zero gradient means something mixes the batch dimension: a ``view``/``reshape`` that regroups
the batch, a ``transpose`` before ``flatten``, a mean or softmax over ``dim=0``. Token-id inputs are
handled through the output of the first ``nn.Embedding``. The real model, its optimizer and the
torch/numpy/python RNG streams stay untouched.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._validate import require_int, require_key, require_number
from lightning_sentinel.base import OnDetect
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._batch_split import Key, named_tensors, split_batch
from lightning_sentinel.checks._copy_probe import (
    FirstBatchCheck,
    SkipCheck,
    differentiable_in_eval,
    eval_copy,
    first_embedding,
    preserved_rng,
)
from lightning_sentinel.findings import Severity

BATCH_MIXING = "batch-mixing"

register(
    CheckSpec(
        BATCH_MIXING,
        "BatchIndependenceCheck",
        Severity.ERROR,
        "in eval mode, the output of one sample depends on the inputs of other samples (a wrong view/reshape, "
        "a transpose or a reduction over the batch dimension)",
        "another sample's input gradient > 1e-6 x the largest, once on the first training batch",
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


# ---------------------------------------------------------------------- the callback
class BatchIndependenceCheck(FirstBatchCheck):
    """Reports ``batch-mixing``: in eval mode, sample ``i``'s output depends on sample ``j``'s input.

    Once, on the first training batch, a deep copy of the module in eval mode runs ``forward`` on the
    batch's inputs (see :mod:`lightning_sentinel.checks._batch_split` for where the inputs are found);
    a fixed random projection of sample ``sample_index``'s output is backpropagated to the inputs
    (or, for integer token ids, to the output of the first ``nn.Embedding``). Every other sample's
    gradient must be exactly 0; the rule flags one above ``tolerance`` x the largest gradient norm.
    A batch that cannot be split, a ``forward`` that does not take the inputs alone, or an output
    without the batch dimension first gives one ``info`` finding and the check is skipped.

    Cost: one forward and backward of a copy of the model, once per fit (none on any other step).

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        input_key: where the inputs are in the batch (mapping key or attribute name: a string; tuple
            index: an integer), if not the convention's.
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
        "pass `input_key=` to BatchIndependenceCheck, or give the LightningModule a `forward(inputs)` that returns "
        "batch-first outputs"
    )

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        input_key: str | int | None = None,
        sample_index: int | None = None,
        tolerance: float = 1e-6,
    ) -> None:
        super().__init__(on_detect=on_detect)
        self.input_key: Key | None = require_key("input_key", input_key)
        self.sample_index: int | None = require_int("sample_index", sample_index, minimum=0, allow_none=True)
        self.tolerance = require_number("tolerance", tolerance, above=0)

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "input_key": self.input_key, "tolerance": self.tolerance}

    @override
    def _run_first_batch_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        with preserved_rng():
            result = self._probe(pl_module, batch)
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

    def _probe(self, pl_module: pl.LightningModule, batch: Any) -> tuple[str, str, list[float], int] | None:
        parts = split_batch(batch, input_key=self.input_key)
        if parts.inputs is None:
            raise SkipCheck(f"no input tensor found ({parts.reason})")
        inputs = parts.inputs
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
        leaves: list[Tensor] = []
        via = ""
        handle = None
        if inputs.is_floating_point() or inputs.is_complex():
            parameter = next((p for p in duplicate.parameters() if p.is_floating_point()), None)
            dtype = parameter.dtype if parameter is not None and inputs.is_floating_point() else inputs.dtype
            leaf = inputs.detach().to(dtype).clone().requires_grad_(True)
            leaves.append(leaf)
            model_input = leaf
        else:
            found = first_embedding(duplicate)
            if found is None:
                raise SkipCheck(
                    f"the inputs {parts.input_name} are {inputs.dtype} (not differentiable) and the model "
                    "has no nn.Embedding"
                )
            name, embedding = found
            via = f" (gradients taken at the output of embedding `{name}`)"

            def capture(module: Any, args: Any, output: Any) -> Any:
                if isinstance(output, Tensor) and output.is_floating_point():
                    replaced = output.detach().requires_grad_(True)
                    leaves.append(replaced)
                    return replaced
                return output

            handle = embedding.register_forward_hook(capture)
            model_input = inputs
        try:
            with torch.inference_mode(False), torch.enable_grad(), differentiable_in_eval(duplicate):
                try:
                    output = duplicate(model_input)
                except Exception as error:
                    raise SkipCheck(
                        f"calling the module's forward with {parts.input_name} alone failed "
                        f"({type(error).__name__}: {str(error)[:120]})"
                    ) from None
                projected = self._projection(output, batch_size, sample)
                usable = [leaf for leaf in leaves if leaf.dim() >= 1 and leaf.shape[0] == batch_size]
                if not usable:
                    raise SkipCheck(
                        f"no batch-first tensor to differentiate{via or ''} (batch size {batch_size})"
                    )
                try:
                    gradients = torch.autograd.grad(projected, usable, allow_unused=True)
                except RuntimeError as error:
                    raise SkipCheck(f"backward through the copy failed ({str(error)[:120]})") from None
        finally:
            if handle is not None:
                handle.remove()
        present = [g for g in gradients if g is not None]
        if not present:
            return None  # the output does not depend on the inputs at all: another check's business
        norms = per_sample_norms(present).tolist()  # the one host read
        return parts.input_name, via, norms, sample

    @staticmethod
    def _projection(output: Any, batch_size: int, sample: int) -> Tensor:
        """A fixed random projection of sample ``sample``'s part of the first batch-first float output."""
        for _name, tensor in named_tensors(output, "output"):
            if tensor.is_floating_point() and tensor.dim() >= 1 and tensor.shape[0] == batch_size:
                if not tensor.requires_grad:
                    continue
                row = tensor[sample].float()
                generator = torch.Generator().manual_seed(1234)
                weights = torch.randn(row.shape, generator=generator).to(row.device)
                return (row * weights).sum()
        raise SkipCheck(
            f"forward returned no differentiable float tensor with the batch dimension ({batch_size}) first"
        )


add_to_presets(BatchIndependenceCheck, ("full",), order=6)
