"""LossAtInitCheck: the loss of the first training batch, before any optimizer step, against its expected value.

A freshly initialised classifier predicts roughly uniform probabilities, so its cross-entropy starts
near ``ln C``; a binary classifier near ``ln 2``; a regression head whose output starts near the
target mean near the target variance. A first loss far above that means the network starts out
confidently wrong (a final layer initialised too large, a regression head not centred on its
targets) and spends its first steps undoing the initialisation ("A recipe for training neural
networks": verify the loss at init, initialise the final layer well).

On the first training batch of a fit (``global_step == 0``), a
:class:`torch.overrides.TorchFunctionMode` intercepts the functional losses that the ``nn.*Loss``
modules call (``cross_entropy``, ``nll_loss``, ``binary_cross_entropy(_with_logits)``,
``mse_loss``), lets each call run unchanged, and reduces its arguments on the device to the
canonical loss (plain mean, no class weights, no label smoothing, no ``pos_weight``, ignored targets
left out, whatever the ``reduction``) and its reference values. The callback reads them back once,
at the end of that batch, and never looks again.

A language model is a classifier over its vocabulary: tokens flattened to ``(batch x time,
vocabulary)`` (as Hugging Face models and most LM loops do) start near ``ln V``, with the positions
labelled -100 (padding, unmasked tokens of a masked LM) left out. On such a large call the
statistics are computed on a bounded part of the rows (:func:`within_budget`), so the check never
allocates more than 64 MB for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._validate import require_number
from lightning_sentinel.base import OnDetect
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._torch_function import (
    IGNORE_INDEX_POSITION,
    InterceptingCheck,
    LossCallRecorder,
    call_argument,
    loss_call_site,
    remove_mode,
)
from lightning_sentinel.findings import Severity

LOSS_AT_INIT = "loss-at-init"

register(
    CheckSpec(
        LOSS_AT_INIT,
        "LossAtInitCheck",
        Severity.WARNING,
        "the loss of the first training batch is far above its expected value at init (ln C for C-class "
        "cross-entropy, ln 2 for binary cross-entropy, the target variance for MSE)",
        "classification: above 1.5 x ln C and ln C + 1 nat (C = 2: 1.69, C = 10: 3.45; a language model's C is its "
        "vocabulary, targets -100 left out); MSE: above 3 x the batch's target variance; first batch only",
    )
)

_CROSS_ENTROPY = "cross_entropy"
_NLL = "nll_loss"
_BCE_LOGITS = "binary_cross_entropy_with_logits"
_BCE = "binary_cross_entropy"
_MSE = "mse_loss"

_INTERCEPTED: dict[Callable[..., Any], str] = {
    F.cross_entropy: _CROSS_ENTROPY,
    F.nll_loss: _NLL,
    F.binary_cross_entropy_with_logits: _BCE_LOGITS,
    F.binary_cross_entropy: _BCE,
    F.mse_loss: _MSE,
}


# ---------------------------------------------------------------------- pure rules
def binary_entropy(p: float) -> float:
    """Entropy in nats of a Bernoulli(``p``) label: the best constant binary cross-entropy.

    Example:
        >>> round(binary_entropy(0.5), 4), binary_entropy(0.0)
        (0.6931, 0.0)
    """
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


def too_high(observed: float, expected: float, max_ratio: float, max_excess: float | None) -> bool:
    """Whether a first loss is far above its expected value: more than ``max_ratio`` times it and (when
    ``max_excess`` is given, for losses in nats) more than ``max_excess`` above it. NaN is not judged.

    Example:
        >>> too_high(2.4, math.log(10), 1.5, 1.0)  # a default-initialised 10-class MLP
        False
        >>> too_high(9.7, math.log(10), 1.5, 1.0)  # a final layer scaled up 50x
        True
        >>> too_high(0.97, math.log(2), 1.5, 1.0)  # 1.4x ln 2 but only 0.3 nat above: a healthy binary start
        False
        >>> too_high(2.5, 1.0, 3.0, None), too_high(3.5, 1.0, 3.0, None)  # MSE against the target variance
        (False, True)
    """
    if not (math.isfinite(observed) and math.isfinite(expected)) or expected < 0:
        return False
    if observed <= max_ratio * expected:
        return False
    return max_excess is None or observed > expected + max_excess


def too_low(observed: float, floor: float, max_ratio: float, max_excess: float) -> bool:
    """Whether a first loss is far *below* the best an uninformed model can do (the label prior's
    entropy): below ``floor / max_ratio`` and more than ``max_excess`` nats below it.

    Pretrained weights explain it; so does a label that leaks into the input.

    Example:
        >>> too_low(2.2, 2.3, 1.5, 1.0), too_low(0.05, 2.3, 1.5, 1.0)
        (False, True)
    """
    if not (math.isfinite(observed) and math.isfinite(floor)):
        return False
    return observed < floor / max_ratio and observed < floor - max_excess


# ---------------------------------------------------------------------- device statistics
def _class_dim(scores: Tensor) -> int:
    return 1 if scores.dim() >= 2 else 0


# score elements one cross-entropy call is reduced over (64 MB in float32): a language model's
# ``(batch x time, vocabulary)`` logits are far larger (GPT-2's 8 x 1024 x 50257 are 4e8)
STATS_BUDGET = 1 << 24


def within_budget(
    scores: Tensor, target: Tensor, ignore_index: int = -100, budget: int | None = None
) -> tuple[Tensor, Tensor]:
    """The part of a cross-entropy call's ``scores`` (and matching ``target``) that its statistics are
    computed on: all of them up to ``budget`` elements (default :data:`STATS_BUDGET`); beyond, for ``(N, C)`` scores ``budget // C``
    rows, labelled ones first (an ``argsort`` of the label mask on the device: no host read; the rows
    whose label is ``ignore_index`` are taken only when too few are labelled), for ``(N, C, *positions)``
    every k-th position of the last dimension. The loss at init of a language model is the mean of
    near-equal per-token losses, so a few hundred tokens estimate it well.

    Example:
        >>> scores, labels = torch.zeros(10, 4), torch.tensor([-100] * 7 + [1, 2, 3])
        >>> kept, kept_labels = within_budget(scores, labels, budget=12)
        >>> tuple(kept.shape), sorted(kept_labels.tolist())
        ((3, 4), [1, 2, 3])
    """
    budget = STATS_BUDGET if budget is None else budget
    if scores.numel() <= budget:
        return scores, target
    classes = scores.shape[1]
    if scores.dim() == 2:
        rows = max(1, budget // classes)
        if target.is_floating_point():  # class probabilities: evenly spread rows
            index = torch.arange(rows, device=scores.device) * (scores.shape[0] // rows)
        else:
            labelled = (target != ignore_index).to(torch.uint8)
            index = torch.argsort(labelled, descending=True, stable=True)[:rows]
        return scores.index_select(0, index), target.index_select(0, index.to(target.device))
    step = -(-scores.numel() // budget)
    return scores[..., ::step], target[..., ::step]


def classification_init_stats(
    scores: Tensor, target: Tensor, log_probabilities: bool = False, ignore_index: int = -100
) -> Tensor:
    """``[canonical loss, classes, prior entropy, mean logit spread]`` of a cross-entropy call, on the device.

    The canonical loss is the plain mean cross-entropy (no class weights, no label smoothing, ignored
    targets left out); the prior entropy is the entropy of the batch's label frequencies; the spread is
    the standard deviation of each row's scores over the classes, averaged. ``target`` holds class
    indices or class probabilities (the shape of ``scores``). Tokens flattened to ``(batch x time,
    vocabulary)`` are rows like any other; the loss and the spread are computed on
    :func:`within_budget`'s part of a large call, the prior on every label.

    Example:
        >>> stats = classification_init_stats(torch.zeros(4, 10), torch.tensor([0, 1, 2, 3]))
        >>> [round(value, 4) for value in stats.tolist()]
        [2.3026, 10.0, 1.3863, 0.0]
    """
    dim = _class_dim(scores)
    classes = scores.shape[dim]
    kept_scores, kept_target = within_budget(scores.detach(), target.detach(), ignore_index)
    values = kept_scores.float()
    logp = values if log_probabilities else torch.log_softmax(values, dim=dim)
    if target.is_floating_point():  # class probabilities
        soft = kept_target.float().to(values.device)
        observed = -(soft * logp).sum(dim).mean()
        prior = soft.movedim(dim, -1).reshape(-1, classes).mean(0)
    else:
        labels = kept_target.to(values.device)
        keep = labels != ignore_index
        safe = torch.where(keep, labels, torch.zeros_like(labels)).clamp(0, classes - 1)
        picked = -logp.gather(dim, safe.unsqueeze(dim)).squeeze(dim)
        weights = keep.float()
        observed = (picked * weights).sum() / weights.sum().clamp(min=1.0)
        all_labels = target.detach().to(values.device)
        all_weights = (all_labels != ignore_index).float()
        all_safe = torch.where(all_labels != ignore_index, all_labels, torch.zeros_like(all_labels))
        counts = torch.zeros(classes, device=values.device, dtype=torch.float32).index_add_(
            0, all_safe.clamp(0, classes - 1).flatten(), all_weights.flatten()
        )
        prior = counts / all_weights.sum().clamp(min=1.0)
    prior_entropy = -torch.special.xlogy(prior, prior).sum()
    spread = values.std(dim=dim, unbiased=False).mean() if classes > 1 else values.new_zeros(())
    return torch.stack([observed, values.new_tensor(float(classes)), prior_entropy, spread])


def binary_init_stats(scores: Tensor, target: Tensor, logits: bool = True) -> Tensor:
    """``[canonical loss, positive share, mean logit, logit std]`` of a binary cross-entropy call, on the device.

    The canonical loss is the plain mean (no ``weight``/``pos_weight``). ``scores`` are logits, or
    probabilities with ``logits=False``.

    Example:
        >>> stats = binary_init_stats(torch.zeros(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        >>> [round(value, 4) for value in stats.tolist()]
        [0.6931, 0.5, 0.0, 0.0]
    """
    values = scores.detach().float()
    labels = target.detach().float().to(values.device)
    if logits:
        observed = (F.softplus(values) - values * labels).mean()
        logit = values
    else:
        probability = values.clamp(0.0, 1.0)
        log_p = torch.log(probability).clamp(min=-100.0)
        log_q = torch.log1p(-probability).clamp(min=-100.0)
        observed = -(labels * log_p + (1.0 - labels) * log_q).mean()
        logit = torch.logit(probability, eps=1e-6)
    return torch.stack([observed, labels.mean(), logit.mean(), logit.std(unbiased=False)])


def regression_init_stats(outputs: Tensor, targets: Tensor) -> Tensor:
    """``[mse, target variance, target mean, output mean, output std]`` of an MSE call, on the device.

    Example:
        >>> stats = regression_init_stats(torch.zeros(4), torch.tensor([99.0, 101.0, 99.0, 101.0]))
        >>> [round(value, 2) for value in stats.tolist()]
        [10001.0, 1.0, 100.0, 0.0, 0.0]
    """
    out = outputs.detach().float()
    tgt = targets.detach().float().to(out.device)
    observed = (out - tgt).square().mean()
    return torch.stack([observed, tgt.var(unbiased=False), tgt.mean(), out.mean(), out.std(unbiased=False)])


# ---------------------------------------------------------------------- the interception
@dataclass
class InitLossCall:
    """One intercepted loss call of the first batch: its function, where it came from, its statistics."""

    function: str
    where: str
    call_site: str
    stats: Tensor


class _InitLossInterceptor(LossCallRecorder):
    """Reduces the arguments of the intercepted losses to statistics; every call runs unchanged."""

    intercepted = _INTERCEPTED

    def __init__(self, module_names: dict[int, str]) -> None:
        super().__init__(module_names)
        self.calls: list[InitLossCall] = []
        self.results: list[Tensor] = []

    @override
    def record(
        self,
        func: Callable[..., Any],
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
    ) -> None:
        scores = call_argument(args, kwargs, 0, "input", None)
        target = call_argument(args, kwargs, 1, "target", None)
        if not isinstance(scores, Tensor) or not isinstance(target, Tensor):
            return
        if not scores.is_floating_point() or scores.numel() == 0 or target.numel() == 0:
            return
        with torch.no_grad(), torch.autocast(scores.device.type, enabled=False):
            if function in (_CROSS_ENTROPY, _NLL):
                if scores.shape[_class_dim(scores)] < 2:
                    return
                ignore_index = call_argument(args, kwargs, IGNORE_INDEX_POSITION, "ignore_index", -100)
                stats = classification_init_stats(scores, target, function == _NLL, int(ignore_index))
            elif function in (_BCE_LOGITS, _BCE):
                if not target.is_floating_point():
                    return
                stats = binary_init_stats(scores, target, logits=function == _BCE_LOGITS)
            else:
                if not target.is_floating_point():
                    return
                stats = regression_init_stats(scores, target)
            if isinstance(result, Tensor):
                self.results.append(result.detach())
        where, site = loss_call_site(function, self.module_names)
        self.calls.append(InitLossCall(function, where, site, stats))


# ---------------------------------------------------------------------- the callback
class LossAtInitCheck(InterceptingCheck[_InitLossInterceptor]):
    """Compares the loss of the first training batch, before any optimizer step, with its expected value.

    On the first training batch of a fit (``trainer.global_step == 0``; a resumed run is not judged
    again) a ``TorchFunctionMode`` intercepts ``cross_entropy``, ``nll_loss``,
    ``binary_cross_entropy(_with_logits)`` and ``mse_loss`` (what the ``nn.*Loss`` modules call) until
    the first backward, and reduces each call's arguments on the device; they are read back once, at
    the end of that batch. Every later batch costs one ``if``.

    The loss kind and the number of classes come from the call itself, and the loss is recomputed in
    its canonical form (plain mean; class weights, label smoothing, ``pos_weight``, ``reduction`` and
    ``ignore_index`` do not change it: ignored targets are left out), so these options cannot cause a
    false alarm. Rules (``loss-at-init``, warning):

    - cross-entropy / NLL over ``C`` classes: above ``max_ratio * ln C`` *and* above
      ``ln C + max_excess`` (``C = 2``: 1.69, ``C = 10``: 3.45). Uniform predictions score ``ln C``
      whatever the label frequencies; a model whose final bias starts at the log prior scores the
      prior's entropy, lower, which is fine;
    - binary cross-entropy (logits or probabilities): the same rule with ``ln 2``;
    - MSE: above ``max_regression_ratio`` times the batch's target variance (the loss of predicting
      the target mean). A default-initialised head adds its own output variance and offset, hence a
      looser ratio than for classification;
    - with ``expected_loss`` given: the training step's own loss (the value it returned, times
      ``accumulate_grad_batches``; the first intercepted call's under manual optimization) above
      ``max_ratio`` times and ``max_excess`` more than ``expected_loss`` (or as far below it).

    A cross-entropy far *below* the label prior's entropy (under ``prior / max_ratio`` and more than
    ``max_excess`` below) is reported as ``info``: pretrained weights, or a label leaking into the input.

    Language models and per-token tasks: ``(batch x time, V)`` scores are judged against ``ln V``,
    ``(N, C, T)`` per-position scores against ``ln C``, in both cases without the targets equal to
    ``ignore_index`` (-100: padding, the unmasked positions of a masked LM); label smoothing does not
    change the canonical loss. Past 2^24 scores in one call (GPT-2's 8 x 1024 x 50257 logits are 4e8)
    the loss is computed on the first ``2^24 / V`` labelled rows (picked on the device, no host read):
    at init the per-token losses are near-equal, so a few hundred tokens estimate their mean. Tiny
    Hugging Face models from their configs with random weights start at: ``GPT2LMHeadModel`` 3.42
    for ``ln 32`` = 3.47 (threshold 5.20), ``LlamaForCausalLM`` 3.48, ``BertForMaskedLM`` 3.52 for
    ``ln 33``, ``BertForTokenClassification`` 1.63 for ``ln 5``, ``BertForSequenceClassification``
    2.31 for ``ln 10``. GPT-2 with ``initializer_range`` 0.2 starts at 4.08 (quiet), 0.5 at 6.15 and 1.0
    (embeddings ``N(0, 1)``, tied to the output) at 12.2 (caught). A ``T5ForConditionalGeneration``
    with an untied output layer starts at 14.9: Hugging Face initialises that layer with std 1.0,
    which is confidently wrong at init (reported; a tied T5 starts at 3.93).

    Calibration (``benchmarks/detection``, first batch of every case): default-initialised healthy
    networks start at 2.30-2.63 for 10-12 classes (threshold 3.45), 1.27 for 3 classes (2.10), and
    0.69-0.97 for 2 classes (1.69; 0.97 is the imbalanced 1:50 case with logits that already spread);
    standardised or ``[0, 1]`` regression targets start at 1.05-1.68x their variance (threshold 3x;
    raw diabetes targets from a head at 0 would be 4.9x). The faults start at 8.9 and 51 nats for 10
    classes (final layer scaled up 50x: MLP, CNN), 26-48 nats for a too-large ``N(0, 1)`` init, and
    at ~12800x the target variance (targets of mean 100 and std 1, head at 0).

    ``where`` is the loss module's name in the LightningModule (``"loss"`` for
    ``self.loss = nn.CrossEntropyLoss()``) or ``"F.<loss> in <function>"``; with ``expected_loss``,
    ``"training_step"``. A loss this callback does not know (hand-written, ``PoissonNLLLoss``, ...)
    is not judged unless ``expected_loss`` is given.

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        expected_loss: the loss you expect at init (a finite number >= 0, or ``None`` to derive it from
            the loss function); compared with the training step's own loss.
        max_ratio: how many times the expected value the first loss may reach; a finite number > 1.
        max_excess: how many nats above ``ln C`` (or ``expected_loss``) the first loss may reach; > 0.
        max_regression_ratio: how many times the batch's target variance the first MSE loss may reach;
            a finite number > 1.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.loss_at_init import LossAtInitCheck
        >>> check = LossAtInitCheck(on_detect="raise", max_ratio=2.0)
        >>> trainer = pl.Trainer(callbacks=[check], logger=False)
    """

    CHECKS = (LOSS_AT_INIT,)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        expected_loss: float | None = None,
        max_ratio: float = 1.5,
        max_excess: float = 1.0,
        max_regression_ratio: float = 3.0,
    ) -> None:
        super().__init__(on_detect=on_detect)
        self.expected_loss = require_number("expected_loss", expected_loss, at_least=0, allow_none=True)
        self.max_ratio = require_number("max_ratio", max_ratio, above=1)
        self.max_excess = require_number("max_excess", max_excess, above=0)
        self.max_regression_ratio = require_number("max_regression_ratio", max_regression_ratio, above=1)
        self._done = False

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {
            **super()._state_key_settings(),
            "expected_loss": self.expected_loss,
            "max_ratio": self.max_ratio,
            "max_excess": self.max_excess,
            "max_regression_ratio": self.max_regression_ratio,
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"done": self._done}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._done = bool(state.get("done", False))

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._done:
            return
        self._release(trainer)
        if trainer.global_step > 0 or not self.active_checks:  # resumed, or nothing to judge
            self._done = True
            return
        names = {id(module): name for name, module in pl_module.named_modules() if name}
        self._mode = _InitLossInterceptor(names)
        self._mode.__enter__()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # the first batch's loss is computed: backward and the optimizer step are not intercepted
        if self._mode is not None:
            remove_mode(self._mode)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._mode is not None:
            self._done = True  # judged once, also when the recorder failed
        mode = self._take_recorder(trainer)
        if mode is None:
            return
        returned = _returned_loss(outputs, trainer, pl_module)
        self._run_loss_at_init_check(trainer, mode, returned, batch_idx)

    # ------------------------------------------------------------------ the check
    def _run_loss_at_init_check(
        self, trainer: pl.Trainer, mode: _InitLossInterceptor, returned: Tensor | None, batch_idx: int
    ) -> None:
        """Read the first loss's statistics (in the suite's one read of the hook) and judge them."""
        calls = mode.calls
        if self.expected_loss is not None:
            observed_tensor = (
                returned if returned is not None else (mode.results[0] if mode.results else None)
            )
            if observed_tensor is None:
                return

            def judge_expected(values: list[float]) -> None:
                self._judge_expected(trainer, values[0], batch_idx)
                self._settle(trainer)

            self._read(trainer, observed_tensor.detach().float().mean(), judge_expected)
            return
        if not calls:
            return

        def judge(values: list[float]) -> None:
            offset = 0
            for call in calls:
                stats = values[offset : offset + call.stats.numel()]
                offset += call.stats.numel()
                if call.function in (_CROSS_ENTROPY, _NLL):
                    self._judge_classification(trainer, call, stats, batch_idx)
                elif call.function in (_BCE_LOGITS, _BCE):
                    self._judge_binary(trainer, call, stats, batch_idx)
                else:
                    self._judge_regression(trainer, call, stats, batch_idx)
            self._settle(trainer)

        device = calls[0].stats.device
        self._read(trainer, torch.cat([call.stats.to(device) for call in calls]), judge)  # the one host read

    def _judge_expected(self, trainer: pl.Trainer, observed: float, batch_idx: int) -> None:
        expected = self.expected_loss
        assert expected is not None
        high = too_high(observed, expected, self.max_ratio, self.max_excess)
        low = (
            math.isfinite(observed)
            and observed < expected / self.max_ratio
            and observed < expected - self.max_excess
        )
        if not (high or low):
            return
        direction = "above" if high else "below"
        self._report(
            trainer,
            LOSS_AT_INIT,
            Severity.WARNING,
            f"the first training loss (batch {batch_idx}, before any optimizer step) is {observed:.4g}, far "
            f"{direction} the expected {expected:.4g} (x{_ratio(observed, expected):.3g}; allowed: within "
            f"x{self.max_ratio:g} or {self.max_excess:g} of it)",
            where="training_step",
            evidence={"observed": observed, "expected": expected, "ratio": _ratio(observed, expected)},
            hint=_CLASSIFICATION_HINT if high else _LOW_HINT,
            magnitude=abs(observed - expected),
        )

    def _judge_classification(
        self, trainer: pl.Trainer, call: InitLossCall, stats: list[float], batch_idx: int
    ) -> None:
        observed, classes_value, prior_entropy, spread = stats
        classes = int(classes_value)
        chance = math.log(classes)
        evidence = {
            "observed": observed,
            "expected": chance,
            "ratio": _ratio(observed, chance),
            "classes": float(classes),
            "prior_entropy": prior_entropy,
            "logit_std": spread,
        }
        if too_high(observed, chance, self.max_ratio, self.max_excess):
            self._report(
                trainer,
                LOSS_AT_INIT,
                Severity.WARNING,
                f"{call.function} on the first training batch (batch {batch_idx}, before any optimizer step) "
                f"is {observed:.4g}, {_ratio(observed, chance):.3g}x the ln({classes}) = {chance:.4g} of uniform "
                f"predictions (label prior entropy {prior_entropy:.3g}); the scores' spread across classes is "
                f"{spread:.3g}: the network starts confidently wrong, at {call.call_site}",
                where=call.where,
                evidence=evidence,
                hint=_CLASSIFICATION_HINT,
                magnitude=observed - chance,
            )
        elif call.function == _CROSS_ENTROPY and too_low(
            observed, prior_entropy, self.max_ratio, self.max_excess
        ):
            self._report_low(trainer, call, observed, prior_entropy, evidence, batch_idx)

    def _judge_binary(
        self, trainer: pl.Trainer, call: InitLossCall, stats: list[float], batch_idx: int
    ) -> None:
        observed, positive_share, mean_logit, logit_std = stats
        chance = math.log(2.0)
        prior_entropy = binary_entropy(positive_share)
        evidence = {
            "observed": observed,
            "expected": chance,
            "ratio": _ratio(observed, chance),
            "classes": 2.0,
            "prior_entropy": prior_entropy,
            "positive_share": positive_share,
            "logit_mean": mean_logit,
            "logit_std": logit_std,
        }
        if not too_high(observed, chance, self.max_ratio, self.max_excess):
            return
        if 0.0 < positive_share < 1.0:
            prior_logit = math.log(positive_share / (1.0 - positive_share))
            bias_hint = f"set the final bias to log(p / (1 - p)) = {prior_logit:.3g} for the positive share p"
        else:
            bias_hint = "set the final bias to the log-odds of the positive share"
        self._report(
            trainer,
            LOSS_AT_INIT,
            Severity.WARNING,
            f"{call.function} on the first training batch (batch {batch_idx}, before any optimizer step) is "
            f"{observed:.4g}, {_ratio(observed, chance):.3g}x the ln 2 = 0.6931 of a 50/50 prediction (label prior "
            f"entropy {prior_entropy:.3g}); the logits start at mean {mean_logit:.3g}, std {logit_std:.3g}, at "
            f"{call.call_site}",
            where=call.where,
            evidence=evidence,
            hint=f"scale down the final layer's initial weights (e.g. x0.01, or zero them) so the logits start "
            f"near 0, and {bias_hint} (Karpathy's 'init well')",
            magnitude=observed - chance,
        )

    def _judge_regression(
        self, trainer: pl.Trainer, call: InitLossCall, stats: list[float], batch_idx: int
    ) -> None:
        observed, variance, target_mean, output_mean, output_std = stats
        expected = max(variance, 1e-12)
        if not too_high(observed, expected, self.max_regression_ratio, None):
            return
        offset_share = (output_mean - target_mean) ** 2 / observed if observed > 0 else 0.0
        if offset_share >= 0.5:
            cause = (
                f"the output starts at mean {output_mean:.4g} while the targets' mean is {target_mean:.4g}"
            )
            hint = (
                f"initialise the final layer's bias to the target mean ({target_mean:.4g}), or standardise the "
                "targets (subtract the mean, divide by the std) and undo it at prediction time"
            )
        else:
            cause = f"the output starts with a spread (std {output_std:.3g}) larger than the targets' ({variance**0.5:.3g})"
            hint = (
                "scale down the final layer's initial weights (e.g. x0.01) so the output starts near a constant, "
                f"and set its bias to the target mean ({target_mean:.4g})"
            )
        self._report(
            trainer,
            LOSS_AT_INIT,
            Severity.WARNING,
            f"{call.function} on the first training batch (batch {batch_idx}, before any optimizer step) is "
            f"{observed:.4g}, {_ratio(observed, expected):.3g}x the targets' variance {variance:.4g} (the loss "
            f"of predicting their mean): {cause}, at {call.call_site}",
            where=call.where,
            evidence={
                "observed": observed,
                "expected": variance,
                "ratio": _ratio(observed, expected),
                "target_mean": target_mean,
                "output_mean": output_mean,
                "output_std": output_std,
            },
            hint=hint,
            magnitude=_ratio(observed, expected),
        )

    def _report_low(
        self,
        trainer: pl.Trainer,
        call: InitLossCall,
        observed: float,
        prior_entropy: float,
        evidence: dict[str, float],
        batch_idx: int,
    ) -> None:
        self._report(
            trainer,
            LOSS_AT_INIT,
            Severity.INFO,
            f"{call.function} on the first training batch (batch {batch_idx}, before any optimizer step) is "
            f"{observed:.4g}, far below the label prior's entropy {prior_entropy:.4g} (the best an uninformed "
            f"model can do), at {call.call_site}",
            where=call.where,
            evidence=evidence,
            hint="expected with pretrained weights; otherwise check that the label does not leak into the input",
        )


_CLASSIFICATION_HINT = (
    "scale down the final layer's initial weights (e.g. multiply them by 0.01, or zero them) so the first "
    "predictions are near uniform and the loss starts near ln C; with imbalanced classes set the final bias to "
    "the log of the class prior (Karpathy's 'init well')"
)


_LOW_HINT = (
    "check that the loss and the expected value measure the same thing (reduction, scaling); a loss far below "
    "it at init suggests pretrained weights or a label leaking into the input"
)


def _ratio(observed: float, expected: float) -> float:
    return observed / expected if expected > 0 else math.inf


def _returned_loss(outputs: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
    """The loss the training step returned, undoing the automatic loop's division by accumulation."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, Tensor) or not loss.is_floating_point() or loss.numel() == 0:
        return None
    loss = loss.detach()
    if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
        loss = loss * trainer.accumulate_grad_batches
    return loss


add_to_presets(LossAtInitCheck, ("fast", "full"), order=25)
