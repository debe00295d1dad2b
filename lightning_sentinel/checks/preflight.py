"""Preflight trials: short trainings of a *copy* of the model before the real training starts.

- :class:`OverfitBatchCheck` (``cannot-overfit-batch``): a healthy model drives the loss of one small
  batch close to its floor within a few dozen steps; one that cannot has a capacity, regularisation,
  learning-rate or loss bug.
- :class:`LabelShuffleCheck` (``model-ignores-input``): a short training on the real (input, label)
  pairs must reach a clearly lower held-out loss than the same training on labels shuffled across
  samples, and than on "zeroed" inputs (zeros; for token ids a constant pad token); if not, the inputs
  do not reach the output or the labels do not belong to the inputs.

Both run in ``on_train_start`` on a deep copy of the LightningModule with a fresh optimizer from the
copy's own ``configure_optimizers``, on batches from a fresh iterator over the training dataloader, with
every random state restored after (see :mod:`lightning_sentinel.checks._trial`): the real run is
bit-for-bit the run it would have been without them. They run once per fit (not again on resume).
They train what the user trains, in the trainer's precision: frozen parameters and submodules kept in
eval mode stay so. Batches may be tuples, mappings with the Hugging Face names, dataclasses or nested
(see :mod:`lightning_sentinel.checks._batches`); ``training_step`` may return a tensor, a dict with
``"loss"`` or a Hugging Face ``ModelOutput``.

A trial that cannot tell says so: when the real-data training has not pulled away from its baseline
yet but was moving away from it faster and faster when its budget ended (a learning-rate warm-up, a
plateau being left), the finding is an ``info`` (inconclusive: raise ``max_steps``), not an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_sentinel._validate import require_int, require_key, require_number
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._batches import (
    BatchParts,
    Key,
    find_parts,
    is_token_ids,
    parts_at,
    replace_parts,
    slice_batch,
)
from lightning_sentinel.checks._trial import (
    Trial,
    TrialRun,
    TrialUnavailable,
    forked_random_state,
    take_batches,
    training_loaders,
)
from lightning_sentinel.findings import Severity

IGNORES_INPUT = "model-ignores-input"
CANNOT_OVERFIT = "cannot-overfit-batch"

register(
    CheckSpec(
        IGNORES_INPUT,
        "LabelShuffleCheck",
        Severity.ERROR,
        "a short training on the real labels does no better than on shuffled labels, or real inputs do no better "
        "than zeroed inputs",
        "held-out loss after 60 trial steps not >= 5% below both the shuffled-label and zeroed-input baselines, "
        "and its lead not speeding up at the end (else info: inconclusive)",
    ),
    CheckSpec(
        CANNOT_OVERFIT,
        "OverfitBatchCheck",
        Severity.WARNING,
        "the model cannot drive the loss on one small batch near its floor",
        "eval-mode loss of 16 samples after 150 trial steps > 55% of its start, and its fall not speeding up "
        "at the end (else info: inconclusive)",
    ),
)

# A trial is inconclusive when its curve was speeding up as the budget ended: the second half gained at least
# this many times what the first half did (a learning-rate warm-up, a plateau being left), and a meaningful
# amount: 5% of the start loss (OverfitBatchCheck) or a quarter of the lead required (LabelShuffleCheck).
# Healthy curves slow down; broken ones stall. Calibrated on the zoo: the slowest faults (plain SGD on a
# regression, 30% label noise on breast-cancer) gain 0.65x and 1.03x in their second half.
_SPEEDING_UP = 1.5
# how far from the zeroed-input baseline (the labels' prior) a real run may end, in units of ``margin``, and
# still count as sitting at it (LabelShuffleCheck's mixed evidence: info, not an error); 0.2 x 5% = 1%
_AT_PRIOR = 0.2
_MIN_DROP = 0.05
_MIN_GAIN = 0.25


# ---------------------------------------------------------------------- pure rules
def overfit_verdict(start: float, final: float, max_fraction: float) -> tuple[bool, float]:
    """Whether a one-batch training failed to overfit: ``final > max_fraction * start`` (or non-finite).

    Returns ``(failed, fraction)`` with ``fraction = final / start``. A start loss <= 0 is already at
    the floor of a non-negative loss and passes.

    Example:
        >>> overfit_verdict(2.3, 0.01, 0.1)
        (False, 0.004347826086956522)
        >>> overfit_verdict(2.3, 1.8, 0.1)[0]
        True
        >>> overfit_verdict(2.3, float("nan"), 0.1)[0]
        True
    """
    if not math.isfinite(final) or not math.isfinite(start):
        return True, math.inf
    if start <= 0:
        return False, 0.0
    fraction = final / start
    return fraction > max_fraction, fraction


def still_falling(start: float, middle: float, final: float, min_drop: float = _MIN_DROP) -> bool:
    """Whether a loss was still falling, faster and faster, when the trial ended: its second half lowered it by
    at least ``1.5`` x what the first half did and by at least ``min_drop`` x the start loss. Then a failed
    verdict is inconclusive (the trial caught a warm-up or a plateau, not a model that cannot learn).

    Example:
        >>> still_falling(2.3, 2.2, 1.7)  # 0.1 then 0.5: speeding up as the budget ended
        True
        >>> still_falling(2.3, 1.9, 1.6)  # 0.4 then 0.3: slowing down above the bar
        False
    """
    if not all(math.isfinite(value) for value in (start, middle, final)) or start <= 0:
        return False
    first, second = start - middle, middle - final
    return second >= min_drop * start and second >= _SPEEDING_UP * max(first, 0.0)


def ignores_input_verdict(real: float, shuffled: float, zeroed: float, margin: float) -> tuple[bool, str]:
    """Whether the real-data loss fails to beat a baseline by ``margin`` (a fraction of the baseline).

    Returns ``(ignored, baseline)``: the name of the first baseline the real loss does not beat
    (``"zeroed inputs"`` first), or ``""``.

    Example:
        >>> ignores_input_verdict(0.4, 2.2, 2.3, 0.05)
        (False, '')
        >>> ignores_input_verdict(2.25, 2.2, 2.3, 0.05)
        (True, 'zeroed inputs')
        >>> ignores_input_verdict(2.0, 2.05, 3.0, 0.05)
        (True, 'shuffled labels')
    """
    if not math.isfinite(real):
        return False, ""  # non-finite losses are the NaN guard's business
    for name, baseline in (("zeroed inputs", zeroed), ("shuffled labels", shuffled)):
        if math.isfinite(baseline) and real > baseline - margin * abs(baseline):
            return True, name
    return False, ""


def at_the_prior(real: float, shuffled: float, zeroed: float, margin: float) -> bool:
    """Mixed evidence, not a fault: the real run beats shuffled labels by ``margin`` but sits at the zeroed-input
    baseline (the labels' own frequencies), within ``0.2 x margin`` of it either way.

    Shuffling costs the real run its lead, so the labels belong to the inputs and the inputs reach the output;
    the model has just not learned more from them than the prior yet (a tiny masked LM after 60 steps predicts
    the unigram: 3.386 vs 3.384). Labels that do not belong to their inputs are memorised as noise and end above
    the prior (the dict-batch and BERT faults of the tests: 3.9% and 7.5% above it), and a model blind to its
    inputs beats neither baseline. A real run a few percent below the prior has learned something from its
    inputs, but not the margin: 30% wrong labels on breast-cancer end 3.8% below it, and stay an error.

    Example:
        >>> at_the_prior(3.386, 3.605, 3.384, 0.05)  # the masked LM: inconclusive
        True
        >>> at_the_prior(1.191, 1.3, 1.108, 0.05), at_the_prior(1.427, 1.583, 1.374, 0.05)  # shuffled labels
        (False, False)
        >>> at_the_prior(0.6739, 0.7178, 0.7005, 0.05)  # 30% wrong labels
        False
    """
    values = (real, shuffled, zeroed)
    if not all(math.isfinite(value) for value in values):
        return False
    return real <= shuffled - margin * abs(shuffled) and abs(real - zeroed) <= _AT_PRIOR * margin * abs(
        zeroed
    )


def ignored_part(baseline: str, same_as_zeroed: bool | None) -> str:
    """What the model learns nothing from: ``"inputs"`` (they never reach the output) or ``"labels"`` (they do
    not belong to the inputs). A model blind to its inputs beats neither baseline, and neither does one trained
    on labels that belong to other inputs: the trials tell them apart by the real run's training losses, which
    are exactly the zeroed-input run's when the inputs never reach the output (``same_as_zeroed``). Unknown
    (``None``): the baseline not beaten decides.

    Example:
        >>> ignored_part("zeroed inputs", True), ignored_part("zeroed inputs", False), ignored_part("shuffled labels", None)
        ('inputs', 'labels', 'labels')
    """
    if same_as_zeroed is None:
        return "inputs" if baseline == "zeroed inputs" else "labels"
    return "inputs" if same_as_zeroed else "labels"


def same_training(first: Sequence[float], second: Sequence[float], tolerance: float = 1e-4) -> bool:
    """Whether two trial trainings saw the same losses step by step (within ``tolerance`` x their scale): the
    real run and the zeroed-input run are the same computation when the inputs never reach the output.

    Example:
        >>> same_training([2.3, 2.1, 1.9], [2.3, 2.1, 1.9]), same_training([2.3, 2.1, 1.9], [2.3, 2.2, 2.1])
        (True, False)
    """
    if not first or len(first) != len(second):
        return False
    scale = max(sum(abs(value) for value in first) / len(first), 1e-12)
    return all(
        math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance * scale
        for a, b in zip(first, second, strict=True)
    )


def pulling_away(
    real: tuple[float, float], baseline: tuple[float, float], margin: float, min_gain: float = _MIN_GAIN
) -> bool:
    """Whether the real run was pulling away from a baseline, faster and faster, when the trials ended.

    ``real`` and ``baseline`` are the held-out losses ``(halfway, end)``; both runs start from the same weights,
    so the lead ``baseline - real`` starts at 0. The lead must be positive at the end and have grown over the
    second half by at least 1.5 x its growth over the first half, and by at least ``min_gain`` x the lead the
    verdict requires (``margin`` x the baseline): the real run is only starting to learn what the baseline
    cannot (a warm-up, a plateau being left). A real run that tracks its baseline, or whose small lead grows
    ever slower, learns (next to) nothing from its inputs.

    Example:
        >>> pulling_away((2.28, 2.1), (2.3, 2.3), 0.1)  # lead 0.02 halfway, then 0.2: speeding up
        True
        >>> pulling_away((2.2, 2.18), (2.25, 2.25), 0.05)  # lead 0.05, then 0.07: slowing down
        False
    """
    values = (*real, *baseline)
    if not all(math.isfinite(value) for value in values):
        return False
    lead_middle, lead_end = baseline[0] - real[0], baseline[1] - real[1]
    required = margin * abs(baseline[1])
    gain = lead_end - lead_middle
    return lead_end > 0 and gain >= min_gain * required and gain >= _SPEEDING_UP * max(lead_middle, 0.0)


def shuffled_targets(targets: Sequence[Tensor], seed: int = 0) -> list[Tensor]:
    """The targets of the trial batches with whole samples' targets exchanged across samples (the null baseline).

    Sample ``i`` receives the target of another sample: a class label, a regression target, or a whole
    label *sequence* (per-token labels, a language model's next tokens). Positions that are ignored in the
    receiving sample (negative integer labels: ``ignore_index`` -100, padding) stay ignored, and positions the
    donor ignores are ignored. Targets of one shape after the batch dimension are pooled across batches;
    otherwise each batch is shuffled within itself (sequences padded to each batch's own length).

    Example:
        >>> labels = [torch.tensor([[5, 6, -100], [7, 8, 9], [1, 2, 3], [4, -100, -100]])]
        >>> shuffled_targets(labels)[0].tolist()  # samples 2 and 3 exchanged; 0 and 1 kept by chance
        [[5, 6, -100], [7, 8, 9], [4, -100, -100], [1, -100, -100]]
    """
    generator = torch.Generator().manual_seed(seed)
    if len({tuple(target.shape[1:]) for target in targets}) == 1:
        pooled = torch.cat(list(targets))
        order = torch.randperm(len(pooled), generator=generator).to(pooled.device)
        donors = list(pooled[order].split([len(target) for target in targets]))
    else:
        donors = [
            target[torch.randperm(len(target), generator=generator).to(target.device)] for target in targets
        ]
    shuffled = []
    for own, donor in zip(targets, donors, strict=True):
        if is_token_ids(own):
            donor = torch.where(own < 0, own, donor)
        shuffled.append(donor)
    return shuffled


def null_token(module: nn.Module) -> int:
    """The token that stands for "no input" in the zeroed-input baseline of token models: the first
    embedding's ``padding_idx``, else a Hugging Face config's ``pad_token_id``, else 0.

    Example:
        >>> null_token(nn.Sequential(nn.Embedding(10, 4, padding_idx=3)))
        3
        >>> null_token(nn.Linear(2, 2))
        0
    """
    for child in module.modules():
        if isinstance(child, nn.Embedding):
            if child.padding_idx is not None:
                return int(child.padding_idx)
            break
    for child in module.modules():
        pad = getattr(getattr(child, "config", None), "pad_token_id", None)
        if isinstance(pad, int) and pad >= 0:
            return pad
    return 0


def null_inputs(inputs: Tensor, token: int) -> Tensor:
    """Inputs that carry no information: zeros for float inputs, the constant ``token`` for token ids.

    Example:
        >>> null_inputs(torch.tensor([[4, 5, 6]]), token=0).tolist(), null_inputs(torch.ones(1, 2), 0).tolist()
        ([[0, 0, 0]], [[0.0, 0.0]])
    """
    if is_token_ids(inputs):
        return torch.full_like(inputs, token)
    return torch.zeros_like(inputs)


# ---------------------------------------------------------------------- shared adapter
_LAYOUT_HINT = (
    "pass `input_key=`/`target_key=` (a key, an index, an attribute name or a dotted path such as "
    "'inputs.input_ids') for another batch layout, or disable this check"
)


class _PreflightCheck(SentinelCallback):
    """What both preflight checks share: run once in ``on_train_start``, skip what cannot be tried."""

    CHECK: str = ""

    def __init__(
        self,
        on_detect: OnDetect,
        max_steps: int,
        max_seconds: float,
        input_key: Key | None,
        target_key: Key | None,
    ) -> None:
        super().__init__(on_detect=on_detect)
        self.max_steps = require_int("max_steps", max_steps)
        self.max_seconds = require_number("max_seconds", max_seconds, above=0)
        self.input_key = require_key("input_key", input_key)
        self.target_key = require_key("target_key", target_key)
        self._done = False

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "max_steps": self.max_steps}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"done": self._done}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._done = bool(state.get("done", False))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._done or trainer.global_step > 0 or trainer.sanity_checking:
            return
        self._done = True
        if not pl_module.automatic_optimization:
            self._info(
                trainer,
                "skipped: the module uses manual optimization, which a trial cannot replay",
                hint="check by hand that the model can overfit one small batch",
            )
        else:
            try:
                with forked_random_state(training_loaders(trainer)):
                    self._run_trial(trainer, pl_module)
            except TrialUnavailable as reason:
                self._info(trainer, f"skipped: {reason}")
            except Exception as error:  # the copy could not be made or trained: not the real run's business
                self._info(
                    trainer,
                    f"skipped: the trial on a copy of the model failed ({type(error).__name__}: {error})",
                    hint="the real training goes on; disable this check if the model cannot be deep-copied",
                )
        self._settle(trainer)

    def _log_measured(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        """Log the trial's finite numbers at step 0 (``self.log`` is not allowed in ``on_train_start``)."""
        finite = {name: value for name, value in metrics.items() if math.isfinite(value)}
        if finite:
            self._log_scalars(trainer, pl_module, finite)

    def _info(self, trainer: pl.Trainer, message: str, hint: str = _LAYOUT_HINT) -> None:
        self._report(trainer, self.CHECK, Severity.INFO, f"{type(self).__name__} {message}", hint=hint)

    def _parts(self, batch: Any) -> BatchParts:
        """The inputs and targets of a (prepared) batch, or :class:`TrialUnavailable` saying what to set."""
        parts = find_parts(batch, self.input_key, self.target_key)
        if parts.reason:
            raise TrialUnavailable(parts.reason)
        if parts.batch_size == 0:
            raise TrialUnavailable(f"the inputs {parts.input_name} have no batch dimension")
        return parts

    def _run_trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------- OverfitBatchCheck
class OverfitBatchCheck(_PreflightCheck):
    """Before training, train a copy of the model on one small batch and require the loss to collapse.

    A model that cannot memorise 16 samples in ``max_steps`` steps of its own optimizer will not learn
    the whole data set: capacity, regularisation (dropout, weight decay), learning rate or loss are wrong.
    The real model, its optimizer, the random states and the dataloader order are left untouched.

    The copy trains what the user trains (frozen parameters and eval-mode submodules stay so), in the
    trainer's precision. Token inputs and per-token targets (``ignore_index`` -100) need nothing special: the
    loss is the model's own. The eval-mode loss is measured halfway and at the end: a loss that has not
    reached ``max_fraction`` of its start but fell faster in the second half than in the first
    (:func:`still_falling`: a warm-up, a plateau being left) gets an ``info`` (inconclusive: raise
    ``max_steps``) instead of a warning; one that slows down above the bar is the fault.

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the worst healthy
    one-batch trial ended at 45% of its start (``ce-sum-reduction-mlp``; threshold 55%, margin 1.2x).
    ``max_steps`` is the budget; ``max_seconds`` only caps a trial on a model so slow that the steps
    would take longer (then the verdict is ``info``, inconclusive). Keeping the cap well above the
    trial's usual time makes the verdict the same on a busy machine as on a quiet one.

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`SentinelCallback`).
        batch_size: samples kept from the first training batch; an integer >= 1.
        max_steps: optimizer steps of the trial; an integer >= 1.
        max_seconds: wall-clock cap of the trial (a finite number > 0); a trial cut short by it that
            has not reached the threshold yet is reported as an ``info`` (inconclusive), never as a warning.
        max_fraction: the loss after the trial must be at most this fraction of its first value; in (0, 1).
        input_key: where the inputs are in a batch: a key (string), an index (integer), an attribute name or a
            dotted path (default: the convention of :mod:`~lightning_sentinel.checks._batches`: ``(x, y)``
            tuples, ``input_ids``/``pixel_values``/``x``/``inputs``... keys).
        target_key: where the targets are (default: ``labels``/``label``/``y``/``targets``... or ``batch[1]``).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[OverfitBatchCheck(max_steps=100)], logger=False)
    """

    CHECKS = (CANNOT_OVERFIT,)
    CHECK = CANNOT_OVERFIT

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        batch_size: int = 16,
        max_steps: int = 150,
        max_seconds: float = 30.0,
        max_fraction: float = 0.55,
        input_key: Key | None = None,
        target_key: Key | None = None,
    ) -> None:
        super().__init__(on_detect, max_steps, max_seconds, input_key, target_key)
        self.batch_size = require_int("batch_size", batch_size)
        self.max_fraction = require_number("max_fraction", max_fraction, above=0, below=1)

    @override
    def _run_trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        raw = take_batches(trainer, 1)[0]
        trial = Trial(pl_module, trainer)
        try:
            batch = trial.to_device(raw)
            parts = self._parts(batch)
            leading = parts.batch_size
            size = min(self.batch_size, leading)
            small = slice_batch(batch, 0, size, leading)
            start = trial.evaluate([small])
            run = trial.train(
                [small], self.max_steps, started + self.max_seconds, held_out=[small], evaluations=2
            )
        finally:
            trial.release()
        self._judge(trainer, pl_module, run, start, size, time.perf_counter() - started)

    def _judge(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        run: TrialRun,
        start: float,
        size: int,
        seconds: float,
    ) -> None:
        if not run.losses:
            self._info(
                trainer,
                f"inconclusive: no trial step fitted in {self.max_seconds:g} s",
                hint="raise `max_seconds` to let the trial run",
            )
            return
        final = run.evaluation_at(1.0) if not run.non_finite else math.nan
        middle = run.evaluation_at(0.5) if len(run.evaluations) > 1 else math.nan
        failed, fraction = overfit_verdict(start, final, self.max_fraction)
        self._log_measured(trainer, pl_module, {"sentinel/overfit_batch/fraction": fraction})
        evidence = {
            "start_loss": start,
            "halfway_loss": middle,
            "final_loss": final,
            "last_training_loss": run.losses[-1],
            "fraction": fraction,
            "steps": float(len(run.losses)),
            "samples": float(size),
            "seconds": seconds,
        }
        if not failed:
            return
        if run.out_of_time and not run.non_finite:
            self._report(
                trainer,
                CANNOT_OVERFIT,
                Severity.INFO,
                f"inconclusive: the one-batch trial ran out of its {self.max_seconds:g} s after "
                f"{len(run.losses)} of {self.max_steps} steps with the loss at {fraction:.0%} of its start",
                where="batch[0]",
                evidence=evidence,
                hint="raise `max_seconds` to let the trial finish",
            )
            return
        if not run.non_finite and still_falling(start, middle, final):
            self._report(
                trainer,
                CANNOT_OVERFIT,
                Severity.INFO,
                f"inconclusive: after {len(run.losses)} steps the loss of {size} samples is at {fraction:.0%} of "
                f"its start (> {self.max_fraction:.0%}) but falling faster and faster ({start:.4g} at the start, "
                f"{middle:.4g} halfway, {final:.4g} at the end): the trial's budget ended before it could tell",
                where="batch[0]",
                evidence=evidence,
                hint=f"raise `max_steps` (now {self.max_steps}) to let the trial finish; a model that learns this "
                "slowly may also want a higher learning rate",
            )
            return
        what = (
            "the loss became non-finite"
            if run.non_finite
            else f"the loss fell from {start:.4g} to {final:.4g} only ({fraction:.0%} of its start, "
            f"> {self.max_fraction:.0%}), slowing down ({middle:.4g} halfway)"
        )
        self._report(
            trainer,
            CANNOT_OVERFIT,
            Severity.WARNING,
            f"the model cannot overfit {size} samples of the first batch: after {len(run.losses)} steps of its own "
            f"optimizer {what}",
            where="batch[0]",
            evidence=evidence,
            hint="a model must memorise one small batch: lower dropout and weight decay, check the learning rate "
            "(too low or too high), the loss function and its inputs, and that the model has enough capacity",
            magnitude=fraction if math.isfinite(fraction) else 1e6,
        )


# ---------------------------------------------------------------------- LabelShuffleCheck
# Below this many samples the trials judge noise: 32 training samples are memorised and the 16 held out
# are scored worse than by a model that learnt the class prior from zeroed inputs (a false alarm in about
# half the seeds of an MLP at batch size 16). Small batches are topped up to it, within a batch cap.
_MIN_TRIAL_SAMPLES = 256
_MAX_TRIAL_BATCHES = 32


class LabelShuffleCheck(_PreflightCheck):
    """Before training, compare a short training on real data with trainings on shuffled labels and zeroed inputs.

    Three copies of the model train for ``max_steps`` steps from the same weights with their own optimizer:
    on the real (input, label) pairs, with the labels shuffled across all trial samples, and with the
    inputs zeroed. Each is then evaluated (eval mode) on a held-out batch with real pairs. If the real
    training's held-out loss is not ``margin`` below both baselines, the model ignores its inputs: the
    inputs do not reach the output (a bug in ``forward``/``training_step``) or the labels do not belong to
    the inputs (a data pipeline that shuffles one without the other).

    Tokens and sequences: integer inputs (token ids) cannot be zeroed; the "zeroed" baseline replaces every
    token by one constant token (:func:`null_token`: the embedding's ``padding_idx``, the config's
    ``pad_token_id``, or 0), the attention mask and other inputs unchanged. Shuffled labels exchange whole
    samples' targets: class labels, or whole label sequences for per-token and language-model targets, with
    the ignored positions (``-100``) of each sample kept ignored (:func:`shuffled_targets`); a causal LM
    whose batch carries ``labels`` (``labels=input_ids``, shifted inside the model) is then scored on another
    sample's text. A batch without targets (labels made from the inputs inside ``training_step``) gives an
    ``info`` naming ``target_key``.

    The held-out losses are also measured halfway: when the real run has not pulled away from a baseline by
    ``margin`` but its lead was growing faster and faster as the trials ended (:func:`pulling_away`: a
    warm-up, a plateau being left), the finding is an ``info`` (inconclusive: raise ``max_steps``), not an
    error.

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the healthy run
    nearest to alarming still beat its baselines by 14% (``gru-seq2seq-shifted``; margin 5%, 2.8x).

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`SentinelCallback`).
        batches: batches taken from the training dataloader, at least (a quarter of them, at least one,
            is held out for evaluation); an integer >= 2. Small batches are topped up to 256 samples
            (at most 32 batches): on a few dozen samples the trials judge noise.
        max_steps: optimizer steps of each of the three trials; an integer >= 1.
        max_seconds: wall-clock cap of the three trials together (a finite number > 0); trials cut
            short are reported as an ``info`` (inconclusive). ``max_steps`` is the budget; the cap only
            stops a model too slow for it, so verdicts do not depend on how busy the machine is.
        margin: the real loss must be below each baseline by this fraction of the baseline; in (0, 1).
        input_key: where the inputs are in a batch: a key, an index, an attribute name or a dotted path.
        target_key: where the targets are in a batch.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[LabelShuffleCheck(max_steps=40)], logger=False)
    """

    CHECKS = (IGNORES_INPUT,)
    CHECK = IGNORES_INPUT

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        batches: int = 4,
        max_steps: int = 60,
        max_seconds: float = 30.0,
        margin: float = 0.05,
        input_key: Key | None = None,
        target_key: Key | None = None,
    ) -> None:
        super().__init__(on_detect, max_steps, max_seconds, input_key, target_key)
        self.batches = require_int("batches", batches, minimum=2)
        self.margin = require_number("margin", margin, above=0, below=1)

    @override
    def _run_trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        raw = take_batches(trainer, self.batches)
        trial = Trial(pl_module, trainer)
        try:
            first = trial.to_device(raw[0])
            parts = self._parts(first)
            if parts.targets is None:
                raise TrialUnavailable(
                    f"{parts.target_reason}; the trial shuffles the targets against the inputs (a causal LM that "
                    "makes its labels from input_ids inside training_step: put them in the batch as `labels`, "
                    "as DataCollatorForLanguageModeling does)"
                )
            wanted = min(_MAX_TRIAL_BATCHES, -(-_MIN_TRIAL_SAMPLES // parts.batch_size))
            if len(raw) == self.batches and wanted > self.batches:  # small batches: a few dozen samples
                raw = take_batches(trainer, wanted)  # overfit and judge noise, not the model: take more
                first = trial.to_device(raw[0])  # a fresh draw: every batch from it, none held out twice
            batches = [first, *(trial.to_device(batch) for batch in raw[1:])]
            if len(batches) == 1:  # a single (full) batch: hold out its first half
                leading = parts.batch_size
                if leading < 4:
                    raise TrialUnavailable(f"the training data hold a single batch of {leading} samples")
                half = leading // 2
                batches = [slice_batch(first, 0, half, leading), slice_batch(first, half, leading, leading)]
            held = max(1, len(batches) // 4)  # a quarter of the samples, at least one batch
            held_out, train = batches[:held], batches[held:]
            train_parts = [parts_at(batch, parts) for batch in train]
            if any(part.targets is None or part.inputs is None for part in train_parts):
                raise TrialUnavailable("the training batches do not all have the layout of the first one")
            targets = [part.targets for part in train_parts]
            shuffled = [
                replace_parts(batch, part, targets=target)
                for batch, part, target in zip(train, train_parts, shuffled_targets(targets), strict=True)  # type: ignore[arg-type]
            ]
            token = null_token(pl_module)
            zeroed = [
                replace_parts(batch, part, inputs=null_inputs(part.inputs, token))  # type: ignore[arg-type]
                for batch, part in zip(train, train_parts, strict=True)
            ]
            deadline = started + self.max_seconds
            results: dict[str, tuple[float, float]] = {}
            training: dict[str, list[float]] = {}
            out_of_time = False
            for name, data in (("real", train), ("shuffled", shuffled), ("zeroed", zeroed)):
                run = trial.train(data, self.max_steps, deadline, held_out=held_out, evaluations=2)
                out_of_time = out_of_time or run.out_of_time
                training[name] = run.losses
                usable = run.losses and not run.non_finite and len(run.evaluations) == 2
                results[name] = (
                    (run.evaluation_at(0.5), run.evaluation_at(1.0)) if usable else (math.nan, math.nan)
                )
        finally:
            trial.release()
        same = same_training(training["real"], training["zeroed"])
        self._judge(trainer, pl_module, results, out_of_time, time.perf_counter() - started, parts, same)

    def _judge(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        results: dict[str, tuple[float, float]],
        out_of_time: bool,
        seconds: float,
        parts: BatchParts,
        same_as_zeroed: bool | None = None,
    ) -> None:
        real, shuffled, zeroed = (results[name][1] for name in ("real", "shuffled", "zeroed"))
        self._log_measured(
            trainer,
            pl_module,
            {
                "sentinel/label_shuffle/real": real,
                "sentinel/label_shuffle/shuffled": shuffled,
                "sentinel/label_shuffle/zeroed": zeroed,
            },
        )
        ignored, baseline = ignores_input_verdict(real, shuffled, zeroed, self.margin)
        if not ignored:
            return
        evidence = {
            "real_loss": real,
            "shuffled_loss": shuffled,
            "zeroed_loss": zeroed,
            "real_halfway_loss": results["real"][0],
            "shuffled_halfway_loss": results["shuffled"][0],
            "zeroed_halfway_loss": results["zeroed"][0],
            "seconds": seconds,
        }
        part = ignored_part(baseline, same_as_zeroed)
        where = parts.input_name if part == "inputs" else parts.target_name
        losses = f"held-out loss real {real:.4g}, shuffled labels {shuffled:.4g}, zeroed inputs {zeroed:.4g}"
        if out_of_time:
            self._report(
                trainer,
                IGNORES_INPUT,
                Severity.INFO,
                f"inconclusive: the label-shuffle trials ran out of their {self.max_seconds:g} s ({losses})",
                where=where,
                evidence=evidence,
                hint="raise `max_seconds` to let the trials finish",
            )
            return
        key = "zeroed" if baseline == "zeroed inputs" else "shuffled"
        if pulling_away(results["real"], results[key], self.margin):
            self._report(
                trainer,
                IGNORES_INPUT,
                Severity.INFO,
                f"inconclusive: after {self.max_steps} trial steps the real data's {real:.4g} is not yet "
                f"{self.margin:.0%} below the {results[key][1]:.4g} of training on {baseline}, but its lead was "
                f"growing faster and faster ({results[key][0] - results['real'][0]:.3g} halfway, "
                f"{results[key][1] - real:.3g} at the end; {losses}): the trials' budget ended before they could tell",
                where=where,
                evidence=evidence,
                hint=f"raise `max_steps` (now {self.max_steps}) to let the trials finish; a model that learns this "
                "slowly may also want a higher learning rate",
            )
            return
        if (
            baseline == "zeroed inputs"
            and same_as_zeroed is False
            and at_the_prior(real, shuffled, zeroed, self.margin)
        ):
            self._report(
                trainer,
                IGNORES_INPUT,
                Severity.INFO,
                f"inconclusive: after {self.max_steps} trial steps the real data's {real:.4g} beats the "
                f"{shuffled:.4g} of shuffled labels but not yet the {zeroed:.4g} of zeroed inputs ({losses}): the "
                "model uses its inputs, but has not learned more from them than the labels' frequencies so far",
                where=where,
                evidence=evidence,
                hint=f"raise `max_steps` (now {self.max_steps}) to let the trials finish",
            )
            return
        other = zeroed if baseline == "zeroed inputs" else shuffled
        cause = (
            "the inputs do not reach the output (zeroed somewhere in forward/training_step, detached, or overwritten: "
            "the real run trained exactly like the one on zeroed inputs)"
            if part == "inputs"
            else "the labels do not belong to their inputs (shuffled or misaligned in the data pipeline), or the inputs "
            "barely reach the output"
        )
        self._report(
            trainer,
            IGNORES_INPUT,
            Severity.ERROR,
            f"the model learns nothing from its inputs: after {self.max_steps} trial steps the held-out loss "
            f"with real data is {real:.4g}, not {self.margin:.0%} below the {other:.4g} of training on "
            f"{baseline} (shuffled labels {shuffled:.4g}, zeroed inputs {zeroed:.4g})",
            where=where,
            evidence=evidence,
            hint=f"likely {cause}: check that training_step uses `{where}` and that inputs and labels are "
            "paired in the dataset; a learning rate far too low gives the same picture",
        )


add_to_presets(OverfitBatchCheck, ("full",), order=5)
add_to_presets(LabelShuffleCheck, ("full",), order=5)
