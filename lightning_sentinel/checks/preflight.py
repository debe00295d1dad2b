"""Preflight trials: short trainings of a *copy* of the model before the real training starts.

- :class:`OverfitBatchCheck` (``cannot-overfit-batch``): a healthy model drives the loss of one small
  batch close to its floor within a few dozen steps; one that cannot has a capacity, regularisation,
  learning-rate or loss bug.
- :class:`LabelShuffleCheck` (``model-ignores-input``): a short training on the real (input, label)
  pairs must reach a clearly lower held-out loss than the same training on labels shuffled across
  samples, and than on zeroed inputs; if not, the inputs do not reach the output or the labels do not
  belong to the inputs.

Both run in ``on_train_start`` on a deep copy of the LightningModule with a fresh optimizer from the
copy's own ``configure_optimizers``, on batches from a fresh iterator over the training dataloader, with
every random state restored after (see :mod:`lightning_sentinel.checks._trial`): the real run is
bit-for-bit the run it would have been without them. They run once per fit (not again on resume).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_sentinel._validate import require_int, require_key, require_number
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._batch_split import Key
from lightning_sentinel.checks._trial import (
    Trial,
    TrialRun,
    TrialUnavailable,
    find_layout,
    forked_random_state,
    replace_parts,
    slice_batch,
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
        "held-out loss after 60 trial steps not >= 5% below both the shuffled-label and zeroed-input baselines",
    ),
    CheckSpec(
        CANNOT_OVERFIT,
        "OverfitBatchCheck",
        Severity.WARNING,
        "the model cannot drive the loss on one small batch near its floor",
        "eval-mode loss of 16 samples after 150 trial steps > 55% of its start",
    ),
)


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


def ignores_input_verdict(real: float, shuffled: float, zeroed: float, margin: float) -> tuple[bool, str]:
    """Whether the real-data loss fails to beat a baseline by ``margin`` (a fraction of the baseline).

    Returns ``(ignored, baseline)``: the name of the first baseline the real loss does not beat
    (``"zeroed inputs"`` first: that diagnosis is the more specific), or ``""``.

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


# ---------------------------------------------------------------------- shared adapter
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

    @staticmethod
    def _log_measured(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Log the trial's numbers at step 0 straight to the loggers (``self.log`` is not allowed here)."""
        if trainer.global_rank != 0 or trainer.barebones:
            return
        finite = {name: value for name, value in metrics.items() if math.isfinite(value)}
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=trainer.global_step)

    def _info(
        self,
        trainer: pl.Trainer,
        message: str,
        hint: str = "pass `input_key`/`target_key` for another batch layout, or disable this check",
    ) -> None:
        self._report(trainer, self.CHECK, Severity.INFO, f"{type(self).__name__} {message}", hint=hint)

    def _run_trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------- OverfitBatchCheck
class OverfitBatchCheck(_PreflightCheck):
    """Before training, train a copy of the model on one small batch and require the loss to collapse.

    A model that cannot memorise 16 samples in ``max_steps`` steps of its own optimizer will not learn
    the whole data set: capacity, regularisation (dropout, weight decay), learning rate or loss are wrong.
    The real model, its optimizer, the random states and the dataloader order are left untouched.

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
        input_key: key (string) or index (integer) of the inputs in a batch (default: ``(x, y)`` tuples,
            ``x``/``inputs``... keys).
        target_key: key (string) or index (integer) of the targets in a batch.

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
        batch = take_batches(trainer, 1)[0]
        layout = find_layout(batch, self.input_key, self.target_key)
        leading = int(batch[layout.input_key].shape[0])
        size = min(self.batch_size, leading)
        trial = Trial(pl_module, trainer)
        try:
            small = trial.to_device(slice_batch(batch, 0, size, leading))
            trial.reset()
            start = trial.evaluate([small])
            run = trial.train([small], self.max_steps, started + self.max_seconds)
            final = trial.evaluate([small]) if run.losses and not run.non_finite else math.nan
        finally:
            trial.release()
        self._judge(trainer, run, start, final, size, time.perf_counter() - started)

    def _judge(
        self, trainer: pl.Trainer, run: TrialRun, start: float, final: float, size: int, seconds: float
    ) -> None:
        if not run.losses:
            self._info(
                trainer,
                f"inconclusive: no trial step fitted in {self.max_seconds:g} s",
                hint="raise `max_seconds` to let the trial run",
            )
            return
        failed, fraction = overfit_verdict(start, final, self.max_fraction)
        self._log_measured(trainer, {"sentinel/overfit_batch/fraction": fraction})
        evidence = {
            "start_loss": start,
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
        what = (
            "the loss became non-finite"
            if run.non_finite
            else f"the loss fell from {start:.4g} to {final:.4g} only ({fraction:.0%} of its start, "
            f"> {self.max_fraction:.0%})"
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
        input_key: key (string) or index (integer) of the inputs in a batch.
        target_key: key (string) or index (integer) of the targets in a batch.

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
        layout = find_layout(raw[0], self.input_key, self.target_key)
        leading = int(raw[0][layout.input_key].shape[0])
        wanted = min(_MAX_TRIAL_BATCHES, -(-_MIN_TRIAL_SAMPLES // max(leading, 1)))
        if len(raw) == self.batches and wanted > self.batches:  # small batches: a few dozen samples
            raw = take_batches(trainer, wanted)  # overfit and judge noise, not the model: take more
        if len(raw) == 1:  # a single (full) batch: hold out its first half
            leading = int(raw[0][layout.input_key].shape[0])
            if leading < 4:
                raise TrialUnavailable(f"the training data hold a single batch of {leading} samples")
            half = leading // 2
            raw = [slice_batch(raw[0], 0, half, leading), slice_batch(raw[0], half, leading, leading)]
        if layout.target_key is None:
            raise TrialUnavailable("the batches have no target tensor to shuffle")
        trial = Trial(pl_module, trainer)
        try:
            batches = [trial.to_device(batch) for batch in raw]
            held = max(1, len(batches) // 4)  # a quarter of the samples, at least one batch
            held_out, train = batches[:held], batches[held:]
            targets = [batch[layout.target_key] for batch in train]
            sizes = [len(target) for target in targets]
            pooled = torch.cat(targets)
            generator = torch.Generator().manual_seed(0)
            permuted = pooled[torch.randperm(len(pooled), generator=generator).to(pooled.device)]
            shuffled = [
                replace_parts(batch, layout.input_key, layout.target_key, targets=part)
                for batch, part in zip(train, permuted.split(sizes), strict=True)
            ]
            zeroed = [
                replace_parts(batch, layout.input_key, None, inputs=torch.zeros_like(batch[layout.input_key]))
                for batch in train
            ]
            deadline = started + self.max_seconds
            results: dict[str, float] = {}
            out_of_time = False
            for name, data in (("real", train), ("shuffled", shuffled), ("zeroed", zeroed)):
                run = trial.train(data, self.max_steps, deadline)
                out_of_time = out_of_time or run.out_of_time
                results[name] = trial.evaluate(held_out) if run.losses and not run.non_finite else math.nan
        finally:
            trial.release()
        self._judge(trainer, results, out_of_time, time.perf_counter() - started, layout)

    def _judge(
        self,
        trainer: pl.Trainer,
        results: dict[str, float],
        out_of_time: bool,
        seconds: float,
        layout: Any,
    ) -> None:
        real, shuffled, zeroed = results["real"], results["shuffled"], results["zeroed"]
        self._log_measured(
            trainer,
            {
                "sentinel/label_shuffle/real": real,
                "sentinel/label_shuffle/shuffled": shuffled,
                "sentinel/label_shuffle/zeroed": zeroed,
            },
        )
        ignored, baseline = ignores_input_verdict(real, shuffled, zeroed, self.margin)
        if not ignored:
            return
        evidence = {"real_loss": real, "shuffled_loss": shuffled, "zeroed_loss": zeroed, "seconds": seconds}
        where = (
            f"batch[{layout.input_key!r}]" if baseline == "zeroed inputs" else f"batch[{layout.target_key!r}]"
        )
        if out_of_time:
            self._report(
                trainer,
                IGNORES_INPUT,
                Severity.INFO,
                f"inconclusive: the label-shuffle trials ran out of their {self.max_seconds:g} s "
                f"(held-out loss real {real:.4g}, shuffled labels {shuffled:.4g}, zeroed inputs {zeroed:.4g})",
                where=where,
                evidence=evidence,
                hint="raise `max_seconds` to let the trials finish",
            )
            return
        other = zeroed if baseline == "zeroed inputs" else shuffled
        cause = (
            "the inputs do not reach the output (zeroed somewhere in forward/training_step, detached, or overwritten)"
            if baseline == "zeroed inputs"
            else "the labels do not belong to their inputs (shuffled or misaligned in the data pipeline)"
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
