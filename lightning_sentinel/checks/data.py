"""BatchInspector: what is wrong with the data itself, seen on sampled training and validation batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_sentinel._stats import on_host
from lightning_sentinel._validate import require_int, require_key, require_number
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._batch_stats import (
    FeatureMoments,
    feature_axis,
    fingerprint,
    label_counts,
    non_finite_count,
    pooled_moments,
)
from lightning_sentinel.checks._batches import BatchParts, Key, find_parts, named_tensors
from lightning_sentinel.findings import Severity

NON_FINITE_INPUTS = "non-finite-inputs"
UNNORMALIZED = "unnormalized-inputs"
CONSTANT = "constant-inputs"
REPEATED = "repeated-batch"
SINGLE_LABEL = "single-label-batch"
IMBALANCE = "class-imbalance"
IMBALANCE_MIN_MINORITY = 5  # the smallest class count a ratio divides by (fewer is chance)
SHIFT = "train-val-shift"

register(
    CheckSpec(
        NON_FINITE_INPUTS,
        "BatchInspector",
        Severity.ERROR,
        "a batch holds NaN/Inf (inputs, targets or any other tensor in it)",
        "any value in a sampled batch (every 4th)",
    ),
    CheckSpec(
        UNNORMALIZED,
        "BatchInspector",
        Severity.WARNING,
        "float inputs far from zero mean / unit scale (e.g. pixels in [0, 255]), per channel or feature",
        "per channel/feature over >= 256 samples: abs(mean) > 5 or std > 5, or most varying features with std < 0.01",
    ),
    CheckSpec(
        CONSTANT,
        "BatchInspector",
        Severity.ERROR,
        "the inputs are all zeros or one constant value",
        "every sampled batch of a 5-batch window constant",
    ),
    CheckSpec(
        REPEATED,
        "BatchInspector",
        Severity.WARNING,
        "the same batch content arrives again and again",
        "every sampled batch identical to the sampled batch before it (another batch index), over a window (>= 2 pairs)",
    ),
    CheckSpec(
        SINGLE_LABEL,
        "BatchInspector",
        Severity.WARNING,
        "classification batches hold one class each (data sorted by label, not shuffled)",
        ">= 3 and >= half of a window's batches single-label, of >= 2 different classes, "
        "where shuffling gives < 10%",
    ),
    CheckSpec(
        IMBALANCE,
        "BatchInspector",
        Severity.WARNING,
        "label frequencies are very skewed (info when the loss has class weights)",
        "max/min class count > 10 over >= 500 samples",
    ),
    CheckSpec(
        SHIFT,
        "BatchInspector",
        Severity.WARNING,
        "validation inputs are preprocessed differently from training inputs",
        ">= 25% of features/channels with val mean > 3 train std away or val/train std outside [1/3, 3]",
    ),
)

_BINS = 1024  # label values 0..1023 are counted; larger labels mean "not a classification target"
_CONSTANT_RELATIVE = 1e-5  # a feature whose std is below this times max(1, |mean|) is constant


# ====================================================================== pure rules
def unnormalized_features(
    means: list[float],
    stds: list[float],
    absmaxes: list[float],
    mean_bound: float,
    std_bound: float,
    min_std: float,
) -> list[int]:
    """Indices of the features (or channels) whose scale is far from normalized.

    A feature is flagged when ``|mean| > mean_bound`` or ``std > std_bound``. Features that vary (are
    not constant) by less than ``min_std`` while every value stays within ``10 * min_std`` of zero are
    flagged when they are at least half of the varying features (the whole input is scaled down, e.g.
    pixels divided by 255 twice; a few rare pixels of [0, 1] data are not). Constant features are left
    to ``constant-inputs``.

    Example:
        >>> unnormalized_features([0.1, 120.0, 0.0, 0.001], [1.0, 60.0, 0.0, 0.002], [3.0, 255.0, 0.0, 0.004],
        ...                       5.0, 5.0, 0.01)
        [1]
        >>> unnormalized_features([0.001, 0.002, 0.0], [0.002, 0.001, 0.0], [0.004, 0.004, 0.0], 5.0, 5.0, 0.01)
        [0, 1]
    """
    flagged, tiny = [], []
    varying = 0
    for index, (mean, std, absmax) in enumerate(zip(means, stds, absmaxes, strict=True)):
        if not (math.isfinite(mean) and math.isfinite(std)):
            continue
        if abs(mean) > mean_bound or std > std_bound:
            flagged.append(index)
        if std <= _CONSTANT_RELATIVE * max(1.0, abs(mean)):
            continue
        varying += 1
        if std < min_std and absmax <= 10 * min_std:
            tiny.append(index)
    if tiny and 2 * len(tiny) >= varying:
        flagged = sorted(set(flagged) | set(tiny))
    return flagged


def shifted_features(
    train_means: list[float],
    train_stds: list[float],
    val_means: list[float],
    val_stds: list[float],
    max_shift: float,
) -> list[int]:
    """Indices of the features whose validation statistics are far from training's.

    Shifted: ``|val_mean - train_mean| > max_shift * train_std``, or ``val_std / train_std`` above
    ``max_shift`` or below ``1 / max_shift``. Features constant in training are skipped.

    Example:
        >>> shifted_features([0.0, 0.0, 0.0, 5.0], [1.0, 1.0, 1.0, 0.0], [0.2, 14.0, 0.0, 9.0], [1.1, 1.0, 0.1, 1.0], 3.0)
        [1, 2]
    """
    shifted = []
    for index, (tm, ts, vm, vs) in enumerate(zip(train_means, train_stds, val_means, val_stds, strict=True)):
        if not all(math.isfinite(v) for v in (tm, ts, vm, vs)):
            continue
        if ts <= _CONSTANT_RELATIVE * max(1.0, abs(tm)):
            continue
        if abs(vm - tm) > max_shift * ts or vs > max_shift * ts or vs < ts / max_shift:
            shifted.append(index)
    return shifted


def single_label_verdict(
    batches: list[tuple[int, int, int]],
    class_counts: list[float],
    min_batches: int,
    max_expected: float = 0.1,
) -> tuple[bool, float, int, int]:
    """Whether a window of batches looks sorted by label.

    ``batches`` holds ``(distinct_classes, majority_class, size)`` per sampled batch;
    ``class_counts`` the label counts seen so far. The window looks sorted when at least
    ``min_batches`` and at least half of its batches (of two or more samples) hold a single class,
    those single-class batches show two or more different classes (so it is not just one dominant
    class), and shuffled data with the observed class frequencies would give a single-class batch
    less often than ``max_expected`` of the time.

    Returns ``(sorted, expected_single_rate, single_batches, classes_among_them)``.

    Example:
        >>> single_label_verdict([(1, 0, 64), (1, 0, 64), (1, 1, 64), (1, 2, 64)], [200.0, 64.0, 64.0], 3)[0]
        True
        >>> single_label_verdict([(1, 0, 16), (1, 0, 16), (2, 0, 16), (1, 0, 16)], [600.0, 12.0], 3)[0]
        False
    """
    sized = [batch for batch in batches if batch[2] >= 2]
    single = [batch for batch in sized if batch[0] == 1]
    classes = len({batch[1] for batch in single})
    total = sum(class_counts)
    if not sized or total <= 0:
        return False, float("nan"), len(single), classes
    mean_size = sum(batch[2] for batch in sized) / len(sized)
    expected = sum((count / total) ** mean_size for count in class_counts if count > 0)
    verdict = (
        len(single) >= min_batches
        and 2 * len(single) >= len(sized)
        and classes >= 2
        and expected < max_expected
    )
    return verdict, expected, len(single), classes


def imbalance_ratio(class_counts: list[float]) -> tuple[float, int, int]:
    """``(max/min, majority class, minority class)`` over the classes seen (NaN with fewer than two).

    Example:
        >>> imbalance_ratio([500.0, 0.0, 10.0])
        (50.0, 0, 2)
    """
    seen = [(count, label) for label, count in enumerate(class_counts) if count > 0]
    if len(seen) < 2:
        return float("nan"), -1, -1
    most, least = max(seen), min(seen)
    return most[0] / least[0], most[1], least[1]


def token_extremes(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(min, max)`` of the token ids a batch holds where ``mask`` (an attention mask of the same shape) is
    set, as a float device tensor; padding does not count. A batch with no unmasked token gives ``(0, 1)``.

    Example:
        >>> token_extremes(torch.tensor([[5, 5, 0], [5, 5, 5]]), torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist()
        [5.0, 5.0]
    """
    values = tokens.detach().long()
    if mask is None or mask.shape != tokens.shape:
        return torch.stack(torch.aminmax(values)).to(torch.float32)
    keep = mask.detach() != 0
    big = torch.iinfo(torch.long).max
    low = torch.where(keep, values, torch.full_like(values, big)).amin()
    high = torch.where(keep, values, torch.full_like(values, -big)).amax()
    empty = ~keep.any()
    low = torch.where(empty, torch.zeros_like(low), low)
    high = torch.where(empty, torch.ones_like(high), high)
    return torch.stack([low, high]).to(torch.float32)


def loss_has_class_weights(module: nn.Module) -> bool:
    """Whether a loss module inside ``module`` weighs classes (``weight=`` or ``pos_weight=``)."""
    for child in module.modules():
        if isinstance(child, nn.modules.loss._WeightedLoss) and getattr(child, "weight", None) is not None:
            return True
        if getattr(child, "pos_weight", None) is not None and isinstance(child, nn.modules.loss._Loss):
            return True
    return False


# ====================================================================== the callback
@dataclass
class _BatchRecord:
    """Device tensors of one sampled batch, read back with the window."""

    batch_idx: int
    non_finite: list[tuple[str, int, Tensor]] = field(default_factory=list)
    extremes: Tensor | None = None  # (min, max) of float inputs
    same_as_previous: Tensor | None = None
    labels: Tensor | None = None  # (distinct classes, majority class, labelled samples, binary, overflow)


class BatchInspector(SentinelCallback):
    """Inspects sampled batches for NaN/Inf, unnormalized or constant inputs, a batch that repeats, label
    order and imbalance, and validation inputs preprocessed differently from training's.

    Finding inputs and targets (:mod:`~lightning_sentinel.checks._batches`): ``(inputs, targets, ...)``
    tuples/lists (nested too), mappings, dataclasses and objects with the Hugging Face names
    (``input_ids``/``pixel_values``/``input_values``... and ``labels``, with ``attention_mask``) or
    ``x``/``inputs``/``features``/``image`` and ``y``/``target``/``targets``/``label``, or
    ``input_key``/``target_key`` (a key, an index, an attribute name or a dotted path). A layout it cannot
    split gives one ``info`` finding saying what to set, and only ``non-finite-inputs`` keeps running.
    Token ids (integer inputs) are not features: the scale and shift checks skip them, while
    ``constant-inputs`` (one token id at every unmasked position) and ``repeated-batch`` judge them too.
    Images ``(N, C, H, W)`` are judged per channel, ``(N, F)`` per feature, ``(N, T, F)`` per last-dim
    feature. Label checks take one label per sample: integer targets ``(N,)`` or ``(N, 1)``, or float ones
    holding only 0 and 1; per-token targets (``(N, T)`` with ``-100`` at ignored positions) are left alone.

    Cost: the first training batch (micro-batch) of each check step (the suite's clock inside
    ``Sentinel``; on its own, steps 0, 1, 2, 4, ... then every ``every_n_steps``-th) is reduced on the
    device to a few statistics (per-feature moments merged across batches, min/max, a content
    fingerprint, label counts); other batches are not touched. The host reads everything
    back once per ``window_batches`` sampled batches (NaN/Inf counts are read at once on a CPU, and on
    an accelerator for the first sampled batch of a fit).
    Validation batches (all of them, during ``fit``) feed per-feature moments read once per
    validation epoch. Statistics are per rank under DDP; the stop/raise decision is shared.

    Rules (calibrated on the detection benchmark, see ``benchmarks/detection/cases_data.py``):

    - ``unnormalized-inputs`` (warning): over >= ``min_samples`` samples, a channel/feature has
      ``|mean| > mean_bound`` (5) or ``std > std_bound`` (5), or at least half of the varying
      features vary by less than ``min_std`` (0.01) while staying within +-0.1 (pixels divided by
      255 twice). ``std_bound`` is 5, not the usual 20: digits pixels 0..16 as images have a channel
      std of 6.0, while standardized digits/breast-cancer/diabetes features stay below 1.9 over 256
      samples even with rare outliers (and [0, 1] pixels below 0.5).
    - ``constant-inputs`` (error): every sampled batch of a window (at least two) has min == max.
    - ``repeated-batch`` (warning): each sampled batch has the same content (in any order) as the sampled
      batch before it, for a whole window; two batches of the same batch index (full-batch training, or
      an interval that lands on the same index of every epoch) are not compared.
    - ``single-label-batch`` (warning): see :func:`single_label_verdict`.
    - ``class-imbalance``: max/min class count > ``imbalance_ratio`` (10) over >= 256 sampled labels, the
      min counted as at least 5 (fewer is chance: 100 balanced classes over 500 labels). A
      warning when no loss module of the LightningModule has class weights (``weight=``/``pos_weight=``),
      else info (already handled). Not judged once label order looked sorted (sampled counts of
      sorted data alias with the order; fix the shuffling first).
    - ``train-val-shift`` (warning): see :func:`shifted_features`; reported when >= ``shift_fraction``
      of the features/channels are shifted (a preprocessing difference moves most of them; a few rare
      features move by chance).

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the largest healthy
    feature |mean| was 0.31 (``data-digits-unit-pixels-cnn``; bound 5, margin 16x) and std 2.5
    (``noisy-batch8-adam-long``, batches of 8; bound 5, 2x); the train/val shift score reached by a
    quarter of the features at most 1.59 (``gru-digits-rows``, 8 rows of 8 pixels; threshold 3, 1.9x); the largest unweighted class ratio 1.76 (threshold 10, 5.7x); at most 40%
    single-label batches (the 20:1 ``data-imbalance-weighted-loss``; the rule also needs such batches
    to be unlikely by chance).

    Args:
        on_detect: ``"warn"`` (default), ``"stop"`` or ``"raise"``.
        every_n_steps: inspect every n-th training batch (micro-batch); an integer >= 1.
        window_batches: sampled batches per host read and verdict; an integer >= 1.
        input_key: key (string), index or attribute of the inputs in a batch (``None``: the convention).
        target_key: key (string), index or attribute of the targets (``None``: the convention).
        mean_bound: largest normal ``|mean|`` of a feature/channel; a finite number > 0.
        std_bound: largest normal std of a feature/channel; a finite number > 0.
        min_std: smallest normal std of a feature that varies; a finite number > 0.
        min_samples: samples seen before the scale of the inputs is judged; an integer >= 1.
        single_label_batches: single-class batches in a window needed for ``single-label-batch``; >= 1.
        imbalance_ratio: max/min class count above which labels count as imbalanced; a finite number > 1.
        imbalance_min_samples: labels seen before the imbalance is judged; an integer >= 1.
        shift_std: ``train-val-shift`` threshold in training standard deviations (and std ratio); > 1.
        shift_fraction: share of features/channels that must be shifted; in (0, 1].

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.data import BatchInspector
        >>> inspector = BatchInspector(input_key="pixels", target_key="label", every_n_steps=10)
        >>> trainer = pl.Trainer(callbacks=[inspector], logger=False)
    """

    CHECKS = (NON_FINITE_INPUTS, UNNORMALIZED, CONSTANT, REPEATED, SINGLE_LABEL, IMBALANCE, SHIFT)
    LOOKS_EARLY = True  # samples, not patience: the clock's early check steps add batches where faults start

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 4,
        window_batches: int = 5,
        input_key: str | int | None = None,
        target_key: str | int | None = None,
        mean_bound: float = 5.0,
        std_bound: float = 5.0,
        min_std: float = 0.01,
        min_samples: int = 256,
        single_label_batches: int = 3,
        imbalance_ratio: float = 10.0,
        imbalance_min_samples: int = 256,
        shift_std: float = 3.0,
        shift_fraction: float = 0.25,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps)
        self.window_batches = require_int("window_batches", window_batches)
        self.input_key: Key | None = require_key("input_key", input_key)
        self.target_key: Key | None = require_key("target_key", target_key)
        self.mean_bound = require_number("mean_bound", mean_bound, above=0)
        self.std_bound = require_number("std_bound", std_bound, above=0)
        self.min_std = require_number("min_std", min_std, above=0)
        self.min_samples = require_int("min_samples", min_samples)
        self.single_label_batches = require_int("single_label_batches", single_label_batches)
        self.imbalance_ratio = require_number("imbalance_ratio", imbalance_ratio, above=1)
        self.imbalance_min_samples = require_int("imbalance_min_samples", imbalance_min_samples)
        self.shift_std = require_number("shift_std", shift_std, above=1)
        self.shift_fraction = require_number("shift_fraction", shift_fraction, above=0, at_most=1)
        self._reset_statistics()
        self._reset_run_state()

    def _reset_statistics(self) -> None:
        """The statistics of a fit, checkpointed (reset in ``setup``, before a checkpoint restores them)."""
        self._moments = FeatureMoments()
        self._train_samples = 0
        self._judged_samples = 0  # samples behind the moments last judged (pooled over ranks under DDP)
        self._class_counts: Tensor | None = None
        self._labels_usable: bool | None = None  # False once targets turn out not to be class labels
        self._epochs_done = 0

    def _reset_run_state(self) -> None:
        self._batches_seen = 0
        self._first_inspection = True  # the first sampled batch of a fit: its NaN counts are read at once
        self._window: list[_BatchRecord] = []
        self._previous_fingerprint: tuple[int, Tensor] | None = None
        self._input_name = "batch[0]"
        self._input_axis = "feature"
        self._target_name = ""
        self._float_inputs = False
        self._sorted_suspected = False
        self._val_moments: dict[int, FeatureMoments] = {}
        self._val_samples: dict[int, int] = {}
        self._val_name = ""

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "input_key": self.input_key, "target_key": self.target_key}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {
            "moments": self._moments.state(),
            "train_samples": self._train_samples,
            "class_counts": None if self._class_counts is None else self._class_counts.detach().cpu(),
            "labels_usable": self._labels_usable,
            "epochs_done": self._epochs_done,
        }

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._moments = FeatureMoments()
        self._moments.load(state.get("moments", {}))
        self._train_samples = int(state.get("train_samples", 0))
        self._class_counts = state.get("class_counts")
        self._labels_usable = state.get("labels_usable")
        self._epochs_done = int(state.get("epochs_done", 0))

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset_statistics()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_run_state()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.active_checks:
            return
        index = self._batches_seen
        self._batches_seen += 1
        if not self._due_batch(trainer):  # the first micro-batch of each check step only
            return
        self._inspect(trainer, batch, batch_idx, index)
        if len(self._window) >= self.window_batches:
            self._run_window_check(trainer, pl_module, log=True)
            self._settle(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs_done += 1

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window:
            self._run_window_check(trainer, pl_module, log=False)
            self._settle(trainer)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or SHIFT not in self.active_checks or self._train_samples == 0:
            return
        parts = find_parts(batch, self.input_key, self.target_key)
        inputs = parts.inputs
        if inputs is None or not inputs.is_floating_point() or inputs.dim() < 1 or inputs.shape[0] == 0:
            return
        self._val_name = parts.input_name
        self._val_moments.setdefault(dataloader_idx, FeatureMoments()).update(inputs)
        self._val_samples[dataloader_idx] = self._val_samples.get(dataloader_idx, 0) + int(inputs.shape[0])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or SHIFT not in self.active_checks:
            return
        if self._val_moments:
            self._run_shift_check(trainer)
        self._val_moments, self._val_samples = {}, {}
        self._settle(trainer)

    # ------------------------------------------------------------------ per batch (device work only)
    def _inspect(self, trainer: pl.Trainer, batch: Any, batch_idx: int, index: int) -> None:
        record = _BatchRecord(batch_idx)
        active = self.active_checks
        if NON_FINITE_INPUTS in active:
            self._count_non_finite(trainer, batch, batch_idx, record)
        parts = find_parts(batch, self.input_key, self.target_key)
        if parts.reason:
            self._report_layout(trainer, parts)
            self._window.append(record)
            return
        inputs = parts.inputs
        assert inputs is not None
        self._input_name = parts.input_name
        usable = inputs.dim() >= 1 and inputs.shape[0] > 0 and inputs.numel() > 0
        self._float_inputs = inputs.is_floating_point()
        if usable and self._float_inputs:
            self._input_axis = feature_axis(inputs)
            if UNNORMALIZED in active or SHIFT in active:
                self._moments.update(inputs)
                self._train_samples += int(inputs.shape[0])
            if CONSTANT in active and inputs.numel() > 1:
                record.extremes = torch.stack(torch.aminmax(inputs.detach()))  # (min, max) of the batch
        elif usable and parts.tokens and CONSTANT in active and inputs.numel() > 1:
            record.extremes = token_extremes(
                inputs, parts.mask
            )  # token ids: one id everywhere is constant too
        if usable and REPEATED in active:
            current = fingerprint(inputs)
            # against the previous sampled batch, when it came from another batch index: a loader that yields
            # the same batch every step repeats at any distance, while one batch per epoch (full-batch
            # training) or an interval that lands on the same index of every epoch is not compared
            previous = self._previous_fingerprint
            if previous is not None and previous[0] != batch_idx:
                close = torch.isclose(current, previous[1], rtol=1e-5, atol=1e-8).all()
                record.same_as_previous = close.float()
            self._previous_fingerprint = (batch_idx, current)
        if parts.targets is not None and (SINGLE_LABEL in active or IMBALANCE in active):
            record.labels = self._count_labels(parts)
        self._window.append(record)

    def _count_non_finite(
        self, trainer: pl.Trainer, batch: Any, batch_idx: int, record: _BatchRecord
    ) -> None:
        counted = [
            (name, tensor.numel(), non_finite_count(tensor))
            for name, tensor in named_tensors(batch)
            if (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel() > 0
        ]
        first, self._first_inspection = self._first_inspection, False
        if not counted:
            return
        # CPU counts have no device to sync with, so they are read at once; on an accelerator the first
        # sampled batch of the fit is read at once too (one read per fit): NaN there from the start is
        # named at step 0, before the loss turns NaN. Under DDP the window's pooled read decides.
        on_cpu = all(on_host(bad) for _, _, bad in counted)
        if trainer.world_size > 1 or not (on_cpu or first):
            record.non_finite.extend(counted)
            return
        device = counted[0][2].device

        def judge(counts: list[float]) -> None:
            for (name, numel, _), count in zip(counted, counts, strict=True):
                if count:
                    self._report_non_finite(trainer, name, int(count), numel, batch_idx)
            self._settle(trainer)  # one process: stop or raise before this batch's loss turns NaN

        # read at the end of this hook (with the suite's other reads), still before the forward pass
        self._read(trainer, torch.stack([bad.to(device) for _, _, bad in counted]), judge)

    def _count_labels(self, parts: BatchParts) -> Tensor | None:
        if self._labels_usable is False:
            return None
        targets = parts.targets
        assert targets is not None
        if targets.dim() == 2 and targets.shape[1] == 1:
            targets = targets[:, 0]
        if targets.dim() != 1 or targets.numel() == 0 or targets.is_complex() or targets.dtype == torch.bool:
            return None
        self._target_name = parts.target_name
        targets = targets.detach()
        if targets.is_floating_point():
            binary = ((targets == 0) | (targets == 1)).all()
            labels = torch.where(torch.isfinite(targets), targets, torch.zeros_like(targets)).long()
        else:
            binary = torch.ones((), dtype=torch.bool, device=targets.device)
            labels = targets
        counts = label_counts(labels, _BINS)
        classes = counts[:-1]
        if self._class_counts is None:
            self._class_counts = torch.zeros_like(counts)
        elif self._class_counts.device != counts.device:
            self._class_counts = self._class_counts.to(counts.device)
        self._class_counts += counts * binary.float()
        return torch.stack(
            [(classes > 0).sum().float(), classes.argmax().float(), classes.sum(), binary.float(), counts[-1]]
        )

    # ------------------------------------------------------------------ the window verdicts (one host read)
    def _run_window_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool) -> None:
        window, self._window = self._window, []
        parts: list[Tensor] = []
        device = None
        for record in window:
            for tensor in (record.extremes, record.same_as_previous, record.labels):
                if tensor is not None:
                    device = tensor.device
                    break
        device = device or (
            self._moments.mean.device if self._moments.mean is not None else torch.device("cpu")
        )

        def add(tensor: Tensor | None) -> slice | None:
            if tensor is None:
                return None
            start = sum(part.numel() for part in parts)
            parts.append(tensor.detach().float().reshape(-1).to(device))
            return slice(start, start + tensor.numel())

        slots = []
        for record in window:
            slots.append(
                (
                    [(name, numel, add(bad)) for name, numel, bad in record.non_finite],
                    add(record.extremes),
                    add(record.same_as_previous),
                    add(record.labels),
                )
            )
        moments, samples, class_counts = self._moments, self._train_samples, self._class_counts
        if trainer.world_size > 1 and torch.distributed.is_initialized():  # every rank, every window check
            moments, samples, class_counts = self._pooled(moments, class_counts, device)
        judge_scale = self._float_inputs and moments.mean is not None and samples >= self.min_samples
        moment_slots = None
        if judge_scale:
            self._judged_samples = samples
            moment_slots = (add(moments.mean), add(moments.std), add(moments.absmax))
        counts_slot = add(class_counts) if class_counts is not None else None
        if not parts:
            return

        def judge(values: list[float]) -> None:
            def get(slot: slice | None) -> list[float]:
                return [] if slot is None else values[slot]

            # ---- non-finite
            for record, (non_finite, _, _, _) in zip(window, slots, strict=True):
                for name, numel, slot in non_finite:
                    count = int(get(slot)[0])
                    if count:
                        self._report_non_finite(trainer, name, count, numel, record.batch_idx)
            # ---- constant
            extremes = [get(slot[1]) for slot in slots if slot[1] is not None]
            constant = len(extremes) >= 2 and all(
                low == high and math.isfinite(low) for low, high in extremes
            )
            if constant and len(extremes) == len(window):
                self._report_constant(trainer, extremes)
            # ---- unnormalized
            if moment_slots is not None and not constant:
                means, stds, absmaxes = (get(slot) for slot in moment_slots)
                self._judge_scale(trainer, means, stds, absmaxes)
                if log and means:
                    self._log_scalars(
                        trainer,
                        pl_module,
                        {
                            "sentinel/data/input_mean_abs_max": max(abs(m) for m in means),
                            "sentinel/data/input_std_max": max(stds),
                        },
                    )
            # ---- repeated
            same = [get(slot[2])[0] for slot in slots if slot[2] is not None]
            if len(same) >= 2 and all(flag > 0 for flag in same) and not constant:
                self._report_repeated(trainer, len(same))
            # ---- labels
            labels = [
                (record.batch_idx, get(slot[3]))
                for record, slot in zip(window, slots, strict=True)
                if slot[3]
            ]
            if labels and self._labels_usable is not False:
                if any(row[3] < 1 or row[4] > 0 for _, row in labels):
                    self._labels_usable = False  # regression targets, or class ids beyond the counted range
                else:
                    self._labels_usable = True
                    counts = get(counts_slot)[:-1]
                    self._judge_labels(trainer, pl_module, labels, counts)
            self._settle(trainer)

        self._read(trainer, torch.cat(parts), judge)  # the one host read of this window (batched)

    @staticmethod
    def _pooled(
        moments: FeatureMoments, class_counts: Tensor | None, device: torch.device
    ) -> tuple[FeatureMoments, int, Tensor]:
        """Input moments and label counts summed over the ranks (DDP: each rank sees its own shard)."""
        pooled = pooled_moments(moments, device)
        counts = torch.zeros(_BINS + 1, device=device)
        if class_counts is not None:
            counts = counts + class_counts.to(device, counts.dtype)
        torch.distributed.all_reduce(counts)
        return pooled, int(pooled.count.item()), counts  # type: ignore[union-attr]

    def _judge_scale(
        self, trainer: pl.Trainer, means: list[float], stds: list[float], absmaxes: list[float]
    ) -> None:
        flagged = unnormalized_features(means, stds, absmaxes, self.mean_bound, self.std_bound, self.min_std)
        if not flagged:
            return
        axis = self._input_axis
        worst = max(flagged, key=lambda i: max(abs(means[i]), stds[i]))
        self._report(
            trainer,
            UNNORMALIZED,
            Severity.WARNING,
            f"{self._input_name}: {len(flagged)} of {len(means)} input {axis}s are far from unit scale "
            f"(|mean| > {self.mean_bound:g}, std > {self.std_bound:g} or std < {self.min_std:g}); worst {axis} "
            f"{worst}: mean {means[worst]:.4g}, std {stds[worst]:.4g}, max |x| {absmaxes[worst]:.4g} over "
            f"{self._judged_samples} samples",
            where=self._input_name,
            evidence={
                "flagged": float(len(flagged)),
                "features": float(len(means)),
                "worst_index": float(worst),
                "worst_mean": means[worst],
                "worst_std": stds[worst],
                "worst_abs_max": absmaxes[worst],
                "samples": float(self._judged_samples),
            },
            hint="standardize inputs with statistics of the training set ((x - mean) / std per "
            f"{axis}, e.g. sklearn StandardScaler or torchvision Normalize); scale pixels to [0, 1] "
            "(divide by 255, or by 16 for 0..16 digits) before normalizing",
        )

    def _judge_labels(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        labels: list[tuple[int, list[float]]],
        counts: list[float],
    ) -> None:
        batches = [(int(row[0]), int(row[1]), int(row[2])) for _, row in labels]
        if SINGLE_LABEL in self.active_checks:
            verdict, expected, single, classes = single_label_verdict(
                batches, counts, self.single_label_batches
            )
            self._sorted_suspected = self._sorted_suspected or (single >= 2 and classes >= 2)
            if verdict:
                first = next(batch_idx for batch_idx, row in labels if int(row[0]) == 1)
                self._report(
                    trainer,
                    SINGLE_LABEL,
                    Severity.WARNING,
                    f"{single} of {len(batches)} sampled batches of {self._target_name} hold a single class "
                    f"({classes} different classes among them, first at batch {first}); shuffled data would give a "
                    f"single-class batch {100 * expected:.2g}% of the time",
                    where=self._target_name,
                    evidence={
                        "single_class_batches": float(single),
                        "batches": float(len(batches)),
                        "classes_among_them": float(classes),
                        "expected_single_rate": expected,
                        "first_batch_idx": float(first),
                    },
                    hint="the data arrive sorted by label: shuffle the training set "
                    "(DataLoader(..., shuffle=True) or a sampler that shuffles); with an IterableDataset, "
                    "shuffle its source or use a shuffle buffer",
                )
        total = sum(counts)
        if IMBALANCE not in self.active_checks or total < self.imbalance_min_samples:
            return
        if self._sorted_suspected:
            return  # label-sorted data: sampled counts alias with the order and are not the class frequencies
        ratio, majority, minority = imbalance_ratio(counts)
        # a class seen fewer than 5 times is too few to divide by: 100 balanced classes over 500 labels
        # give counts from 1 to 12 by chance alone
        if (
            majority < 0
            or not counts[majority] / max(counts[minority], IMBALANCE_MIN_MINORITY) > self.imbalance_ratio
        ):
            return
        weighted = loss_has_class_weights(pl_module)
        self._report(
            trainer,
            IMBALANCE,
            Severity.INFO if weighted else Severity.WARNING,
            f"{self._target_name}: class {majority} is {ratio:.3g}x as frequent as class {minority} "
            f"({counts[majority]:.0f} vs {counts[minority]:.0f} of {total:.0f} labels seen)"
            + ("; the loss has class weights" if weighted else "; the loss has no class weights"),
            where=self._target_name,
            evidence={
                "ratio": ratio,
                "majority_class": float(majority),
                "minority_class": float(minority),
                "majority_count": counts[majority],
                "minority_count": counts[minority],
                "labels_seen": total,
            },
            hint="weight the loss by inverse class frequency (CrossEntropyLoss(weight=...), "
            "BCEWithLogitsLoss(pos_weight=...)) or resample (WeightedRandomSampler), and judge with a "
            "per-class metric (balanced accuracy, F1) rather than accuracy",
            magnitude=ratio,
        )

    # ------------------------------------------------------------------ train-val shift
    def _run_shift_check(self, trainer: pl.Trainer) -> None:
        train = self._moments
        if train.mean is None or not self._float_inputs:
            return
        parts: list[Tensor] = [train.mean, train.std]
        order = sorted(self._val_moments)
        usable = []
        for idx in order:
            moments = self._val_moments[idx]
            if moments.mean is None or moments.mean.shape != train.mean.shape or self._val_samples[idx] < 2:
                continue
            usable.append(idx)
            parts += [moments.mean.to(train.mean.device), moments.std.to(train.mean.device)]
        if not usable:
            return
        width = train.features
        values = torch.cat([part.reshape(-1) for part in parts]).tolist()  # the one host read
        train_means, train_stds = values[:width], values[width : 2 * width]
        for position, idx in enumerate(usable):
            start = 2 * width * (position + 1)
            val_means, val_stds = values[start : start + width], values[start + width : start + 2 * width]
            shifted = shifted_features(train_means, train_stds, val_means, val_stds, self.shift_std)
            considered = sum(
                1 for m, s in zip(train_means, train_stds, strict=True) if s > 1e-5 * max(1.0, abs(m))
            )
            if not shifted or len(shifted) < self.shift_fraction * max(considered, 1):
                continue
            worst = max(shifted, key=lambda i: abs(val_means[i] - train_means[i]) / max(train_stds[i], 1e-12))
            axis = self._input_axis
            where = self._val_name if idx == 0 else f"{self._val_name} (val dataloader {idx})"
            self._report(
                trainer,
                SHIFT,
                Severity.WARNING,
                f"validation {where}: {len(shifted)} of {considered} input {axis}s differ from training by more "
                f"than {self.shift_std:g} train std; worst {axis} {worst}: val mean {val_means[worst]:.4g}, std "
                f"{val_stds[worst]:.4g} vs train mean {train_means[worst]:.4g}, std {train_stds[worst]:.4g}",
                where=where,
                evidence={
                    "shifted": float(len(shifted)),
                    "features": float(considered),
                    "worst_index": float(worst),
                    "val_mean": val_means[worst],
                    "val_std": val_stds[worst],
                    "train_mean": train_means[worst],
                    "train_std": train_stds[worst],
                    "val_samples": float(self._val_samples[idx]),
                },
                hint="apply exactly the training preprocessing to validation data (the same transform, with "
                "the statistics fitted on the training set: scaler.transform(val), the same Normalize)",
            )

    # ------------------------------------------------------------------ reports
    def _report_layout(self, trainer: pl.Trainer, parts: BatchParts) -> None:
        check = UNNORMALIZED if UNNORMALIZED in self.active_checks else self.active_checks[0]
        self._report(
            trainer,
            check,
            Severity.INFO,
            f"BatchInspector cannot find the inputs: {parts.reason}; its input and label checks are skipped "
            "(non-finite-inputs still runs)",
            where="batch layout",
            evidence={},
            hint="pass BatchInspector(input_key=..., target_key=...) with the key, index or attribute of the inputs "
            "and targets",
        )

    def _report_non_finite(
        self, trainer: pl.Trainer, name: str, count: int, numel: int, batch_idx: int
    ) -> None:
        self._report(
            trainer,
            NON_FINITE_INPUTS,
            Severity.ERROR,
            f"{name} of training batch {batch_idx} holds {count} NaN/Inf values out of {numel}",
            where=name,
            evidence={"non_finite": float(count), "numel": float(numel), "batch_idx": float(batch_idx)},
            hint="the data hold missing or broken values: impute or drop them (torch.nan_to_num, "
            "SimpleImputer, dropna) and check divisions in the preprocessing (x / std with std 0)",
        )

    def _report_constant(self, trainer: pl.Trainer, extremes: list[list[float]]) -> None:
        values = sorted({low for low, _ in extremes})
        described = (
            "all zeros" if values == [0.0] else f"constant (values {', '.join(f'{v:g}' for v in values[:4])})"
        )
        self._report(
            trainer,
            CONSTANT,
            Severity.ERROR,
            f"{self._input_name} is {described} in each of the {len(extremes)} sampled batches of the last window",
            where=self._input_name,
            evidence={"batches": float(len(extremes)), "value": values[0]},
            hint="the model cannot learn from constant inputs: check the loading and preprocessing (a mask or "
            "multiplication by 0, an image read as blank, a normalization dividing by a huge number)",
        )

    def _report_repeated(self, trainer: pl.Trainer, pairs: int) -> None:
        if trainer.num_training_batches == 1:
            return  # full-batch training: the one batch repeats by design
        self._report(
            trainer,
            REPEATED,
            Severity.WARNING,
            f"{self._input_name}: each of the last {pairs} sampled batches has the same content as the batch just "
            "before it: the model sees the same samples step after step",
            where=self._input_name,
            evidence={"identical_pairs": float(pairs)},
            hint="check the Dataset's __getitem__ uses its index argument, that an iterator is not re-created or a "
            "batch cached inside the loop (next(iter(loader)) in training_step), and the sampler's indices",
        )


add_to_presets(BatchInspector, ("fast", "full"), order=20)
