"""Calibration margins: how close the healthy zoo comes to each check's threshold.

:func:`probing` wraps the pure rule functions of the check modules (``exploding_verdict``,
``dead_share``, ``overfit_verdict``, ...) so that every call records the statistic the rule compares
with its threshold, tagged with the case being run. :func:`margins` then reports, per threshold, the
healthy value nearest to alarming and the *margin*: how many times farther the threshold is (for an
upper bound: ``threshold / nearest``; for a lower bound: ``nearest / threshold``). A margin above 1
means no healthy run reached the threshold on that statistic alone; the checks also need patience
(several checks in a row), which the margin does not count, so it is a lower bound on the true slack.

Example:
    >>> recorder = Recorder()
    >>> with probing(recorder):
    ...     from lightning_sentinel.checks import curves
    ...     recorder.case = "demo"
    ...     _ = curves.oscillation_verdict([0.1, 0.2, 0.1, 0.3, 0.1], 1.0, 0.8, 5)
    >>> [(row.statistic, row.nearest, row.case) for row in margins(recorder) if row.check == "loss-oscillation"]
    [('median swing / loss scale', 0.1, 'demo')]
"""

from __future__ import annotations

import contextlib
import importlib
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Extractor = Callable[[tuple[Any, ...], Any], float | None]


@dataclass(frozen=True)
class Probe:
    """One threshold of one check, and how to read its statistic off a call of a rule function.

    ``upper``: the check alarms when the statistic goes *above* the threshold (else below).
    ``per_case``: ``"all"`` (every call counts) or ``"steps"`` (for a rule that stops judging once the
    run passed it, loss-not-decreasing: each case counts the optimizer steps, ``cadence`` per call,
    until the statistic first reached ``pass_level``; the threshold is then a number of steps).
    ``guard``: what else keeps a healthy run quiet when the margin is below 1.
    """

    check: str
    statistic: str
    module: str
    function: str
    extract: Extractor
    threshold: Callable[[], float]
    upper: bool = True
    per_case: str = "all"
    exempt: frozenset[str] = frozenset()
    pass_level: Callable[[], float] | None = None
    cadence: Callable[[], float] | None = None
    guard: str = ""


def _default(module: str, cls: str, setting: str) -> Callable[[], float]:
    """The value a default-constructed check holds for ``setting`` (a ``None`` default resolved)."""

    def read() -> float:
        owner = getattr(importlib.import_module(f"lightning_sentinel.checks.{module}"), cls)
        return float(getattr(owner(), setting))

    return read


def _update_ratio(args: tuple[Any, ...], result: Any) -> float | None:
    """The update/weight ratio ``ratio_streak`` judged (exactly-zero and non-finite ones are other checks')."""
    ratio = args[0]
    return ratio if math.isfinite(ratio) and ratio > 0 else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _spike(early: bool) -> Extractor:
    """The norm over the running median (``early=False``), or over what the rule compares it with: the
    larger of the running median and the early median (``early=True``; ``None`` before the early median
    exists, when the two are the same)."""

    def extract(args: tuple[Any, ...], result: Any) -> float | None:
        norm, history, _, _, min_history = args[:5]
        early_reference = args[5] if len(args) > 5 else None
        finite = [value for value in history if math.isfinite(value)]
        if len(history) < min_history or not finite or not math.isfinite(norm):
            return None
        reference = statistics.median(finite)
        if early:
            if early_reference is None or not math.isfinite(early_reference):
                return None
            reference = max(reference, early_reference)
        return norm / reference if reference > 0 else None

    return extract


def _smallest_ratio(args: tuple[Any, ...], result: Any) -> float | None:
    ratios = [g / w for g, w in zip(args[0], args[1], strict=True) if w > 0 and math.isfinite(g) and g > 0]
    return min(ratios) if ratios else None


def _divergence(args: tuple[Any, ...], result: Any) -> float | None:
    current, best, start, factor, rise_fraction = args[:5]
    if not all(math.isfinite(v) for v in (current, best, start)):
        return None
    needed = max((factor - 1.0) * abs(best), rise_fraction * max(start - best, 0.0), 1e-12)
    return (current - best) / needed


def _overfitting(of_scale: bool) -> Extractor:
    """The validation loss's rise over its best, relative to the best (``of_scale=False``) or to the loss
    scale at the start (``of_scale=True``), when the rule judges it (patience met, training loss falling)."""

    def extract(args: tuple[Any, ...], result: Any) -> float | None:
        val_losses, train_losses, patience = args[0], args[1], args[2]
        loss_scale = args[4] if len(args) > 4 else math.nan
        pairs = [(index, val) for index, val in enumerate(val_losses) if math.isfinite(val)]
        if len(pairs) <= patience:
            return None
        best_index, best_val = min(pairs, key=lambda pair: pair[1])
        latest = val_losses[-1]
        if len(val_losses) - 1 - best_index < patience or not math.isfinite(latest):
            return None
        if not train_losses[-1] - train_losses[best_index] <= 0.25 * max(latest - best_val, 0.0):
            return None
        if of_scale:
            return (latest - best_val) / abs(loss_scale) if math.isfinite(loss_scale) and loss_scale else None
        return (latest - best_val) / max(abs(best_val), 1e-8)

    return extract


def _shift(args: tuple[Any, ...], result: Any) -> float | None:
    train_means, train_stds, val_means, val_stds = args[:4]
    scores = []
    for tm, ts, vm, vs in zip(train_means, train_stds, val_means, val_stds, strict=True):
        if not all(math.isfinite(v) for v in (tm, ts, vm, vs)) or ts <= 1e-5 * max(1.0, abs(tm)):
            continue
        scores.append(max(abs(vm - tm) / ts, vs / ts, ts / vs if vs > 0 else math.inf))
    if not scores:
        return None
    scores.sort(reverse=True)
    return scores[max(0, math.ceil(0.25 * len(scores)) - 1)]  # the value a quarter of the features reach


def _single_share(args: tuple[Any, ...], result: Any) -> float | None:
    sized = [batch for batch in args[0] if batch[2] >= 2]
    return sum(batch[0] == 1 for batch in sized) / len(sized) if sized else None


def _ignores_gap(args: tuple[Any, ...], result: Any) -> float | None:
    real, shuffled, zeroed = args[:3]
    gaps = [(b - real) / abs(b) for b in (shuffled, zeroed) if math.isfinite(b) and b != 0]
    return min(gaps) if gaps and math.isfinite(real) else None


def _init_ratio(regression: bool) -> Extractor:
    """First loss over the bound it must pass: ``max(max_ratio * expected, expected + max_excess)``."""

    def extract(args: tuple[Any, ...], result: Any) -> float | None:
        observed, expected, max_ratio, max_excess = args[:4]
        if (max_excess is None) != regression or not expected > 0:
            return None
        bound = (
            max_ratio * expected if max_excess is None else max(max_ratio * expected, expected + max_excess)
        )
        return observed / bound

    return extract


_WEIGHTED_LOSS_CASES = frozenset({"data-imbalance-weighted-loss", "ce-smoothing-weights-ignore"})

PROBES: tuple[Probe, ...] = (
    Probe(
        "exploding-gradients",
        "grad norm / running median",
        "gradients",
        "exploding_verdict",
        _spike(early=False),
        _default("gradients", "GradientNormMonitor", "spike_factor"),
        guard="once 20 checks exist, a spike must also pass 10x their median (next row)",
    ),
    Probe(
        "exploding-gradients",
        "grad norm / max(running median, early median)",
        "gradients",
        "exploding_verdict",
        _spike(early=True),
        _default("gradients", "GradientNormMonitor", "spike_factor"),
    ),
    Probe(
        "exploding-gradients",
        "total grad norm",
        "gradients",
        "exploding_verdict",
        lambda a, r: _finite(a[0]),
        _default("gradients", "GradientNormMonitor", "max_norm"),
    ),
    Probe(
        "vanishing-gradients",
        "smallest layer grad/weight ratio",
        "gradients",
        "vanishing_layers",
        _smallest_ratio,
        _default("gradients", "GradientNormMonitor", "vanishing_ratio"),
        upper=False,
    ),
    Probe(
        "vanishing-gradients",
        "first/last layer relative gradient",
        "gradients",
        "depth_ratio",
        lambda a, r: _finite(r),
        _default("gradients", "GradientNormMonitor", "depth_ratio_threshold"),
        upper=False,
    ),
    Probe(
        "dead-relu",
        "dead share of a layer",
        "activations",
        "dead_share",
        lambda a, r: _finite(r[0]),
        _default("activations", "DeadReLUDetector", "dead_threshold"),
    ),
    Probe(
        "saturated-activation",
        "saturated share of a layer",
        "activations",
        "saturated_share",
        lambda a, r: _finite(r[0]),
        _default("activations", "DeadReLUDetector", "saturated_threshold"),
    ),
    Probe(
        "poor-weight-init",
        "last/first hidden std (low)",
        "activations",
        "depth_scale_ratio",
        lambda a, r: _finite(r),
        _default("activations", "DeadReLUDetector", "init_scale_low"),
        upper=False,
    ),
    Probe(
        "poor-weight-init",
        "last/first hidden std (high)",
        "activations",
        "depth_scale_ratio",
        lambda a, r: _finite(r),
        _default("activations", "DeadReLUDetector", "init_scale_high"),
    ),
    Probe(
        "update-ratio-too-high",
        "update/weight norm ratio",
        "parameters",
        "ratio_streak",
        _update_ratio,
        _default("parameters", "ParameterUpdateMonitor", "high_ratio"),
    ),
    Probe(
        "update-ratio-too-high",
        "update/weight norm ratio on a single check (any layer)",
        "parameters",
        "ratio_streak",
        _update_ratio,
        _default("parameters", "ParameterUpdateMonitor", "burst_ratio"),
        guard="only weight layers with RMS >= 1e-3 are judged on one check",
    ),
    Probe(
        "update-ratio-too-low",
        "update/weight norm ratio",
        "parameters",
        "ratio_streak",
        _update_ratio,
        _default("parameters", "ParameterUpdateMonitor", "low_ratio"),
        upper=False,
        guard="not judged while the lr warms up or has decayed below half its peak",
    ),
    Probe(
        "loss-not-decreasing",
        "optimizer steps until the smoothed loss is 5% below its start",
        "curves",
        "not_decreasing_verdict",
        lambda a, r: _finite(r[1]),
        _default("curves", "LearningCurveMonitor", "patience_steps"),
        per_case="steps",
        pass_level=_default("curves", "LearningCurveMonitor", "min_improvement"),
        cadence=_default("curves", "LearningCurveMonitor", "every_n_steps"),
    ),
    Probe(
        "loss-divergence",
        "rise above best / rise needed",
        "curves",
        "divergence_verdict",
        _divergence,
        lambda: 1.0,
    ),
    Probe(
        "loss-oscillation",
        "median swing / loss scale",
        "curves",
        "oscillation_verdict",
        lambda a, r: _finite(r[1]),
        _default("curves", "LearningCurveMonitor", "oscillation_factor"),
    ),
    Probe(
        "overfitting",
        "val loss rise over its best (train falling)",
        "curves",
        "overfitting_verdict",
        _overfitting(of_scale=False),
        _default("curves", "LearningCurveMonitor", "overfit_min_rise"),
        guard="the rise must also be 7.5% of the starting loss (next row)",
    ),
    Probe(
        "overfitting",
        "val loss rise over its best / starting loss (train falling)",
        "curves",
        "overfitting_verdict",
        _overfitting(of_scale=True),
        _default("curves", "LearningCurveMonitor", "overfit_min_scale_rise"),
        guard="the rise must also be 20% above the best (previous row)",
    ),
    Probe(
        "clipped-output",
        "share of cross-entropy logits exactly 0 (all >= 0, some > 0)",
        "loss_inputs",
        "relu_logits_verdict",
        lambda a, r: _finite(a[2]) if a[0] >= 0 and a[1] > 0 else 0.0,
        _default("loss_inputs", "LossInputCheck", "min_pinned_share"),
    ),
    Probe(
        "noisy-labels",
        "share of labels given p < 0.05 (window of learned batches)",
        "label_noise",
        "pool_recent",
        lambda a, r: None if r is None else r.contradicted_share,
        _default("label_noise", "LabelNoiseMonitor", "max_share"),
    ),
    Probe(
        "weight-decay-too-strong",
        "share of a weight decayed per step (lr x weight decay)",
        "weight_decay",
        "decay_per_step",
        lambda a, r: r,
        _default("weight_decay", "WeightDecayMonitor", "max_decay_per_step"),
    ),
    Probe(
        "unnormalized-inputs",
        "largest |feature mean|",
        "data",
        "unnormalized_features",
        lambda a, r: max((abs(m) for m in a[0] if math.isfinite(m)), default=None),
        _default("data", "BatchInspector", "mean_bound"),
    ),
    Probe(
        "unnormalized-inputs",
        "largest feature std",
        "data",
        "unnormalized_features",
        lambda a, r: max((s for s in a[1] if math.isfinite(s)), default=None),
        _default("data", "BatchInspector", "std_bound"),
    ),
    Probe(
        "train-val-shift",
        "shift score reached by 25% of features",
        "data",
        "shifted_features",
        _shift,
        _default("data", "BatchInspector", "shift_std"),
    ),
    Probe(
        "single-label-batch",
        "share of single-label batches",
        "data",
        "single_label_verdict",
        _single_share,
        lambda: 0.5,
    ),
    Probe(
        "class-imbalance",
        "max/min class count (unweighted loss)",
        "data",
        "imbalance_ratio",
        lambda a, r: _finite(r[0]),
        _default("data", "BatchInspector", "imbalance_ratio"),
        exempt=_WEIGHTED_LOSS_CASES,
    ),
    Probe(
        "cannot-overfit-batch",
        "final / start loss of the one-batch trial",
        "preflight",
        "overfit_verdict",
        lambda a, r: _finite(r[1]),
        _default("preflight", "OverfitBatchCheck", "max_fraction"),
    ),
    Probe(
        "model-ignores-input",
        "real-label loss below the baselines (relative)",
        "preflight",
        "ignores_input_verdict",
        _ignores_gap,
        _default("preflight", "LabelShuffleCheck", "margin"),
        upper=False,
    ),
    Probe(
        "loss-at-init",
        "first loss / max(1.5 ln C, ln C + 1) (classification)",
        "loss_at_init",
        "too_high",
        _init_ratio(False),
        lambda: 1.0,
    ),
    Probe(
        "loss-at-init",
        "first loss / (3 x target variance) (regression)",
        "loss_at_init",
        "too_high",
        _init_ratio(True),
        lambda: 1.0,
    ),
    Probe(
        "replicas-out-of-sync",
        "largest relative 2-norm difference of a parameter across DDP ranks",
        "replicas",
        "replica_differences",
        lambda a, r: importlib.import_module(
            "lightning_sentinel.checks.replicas"
        ).largest_relative_difference(a[0]),
        _default("replicas", "ReplicaSyncMonitor", "rtol"),
    ),
)

# checks whose rule has no tunable numeric threshold (or one far from anything a healthy run produces)
STRUCTURAL = {
    "non-finite-loss": "any NaN/Inf",
    "non-finite-gradients": "any NaN/Inf",
    "non-finite-weights": "any NaN/Inf",
    "non-finite-activation": "any NaN/Inf on finite input",
    "non-finite-inputs": "any NaN/Inf",
    "constant-inputs": "every sampled batch constant",
    "repeated-batch": "identical batch content",
    "batch-mixing": "cross-sample input gradient > 1e-6 x largest (healthy: exactly 0)",
    "target-leakage": "output moves when only its label changes (healthy: exactly 0)",
    "softmax-before-cross-entropy": "rows in [0, 1] summing to 1",
    "nll-on-logits": "inputs > 0.01 or row logsumexp > 0.1",
    "sigmoid-before-bce-with-logits": "a sigmoid in the input's autograd graph (else every input in [0, 1], 3 sampled steps)",
    "loss-broadcast": "input/target shapes broadcast",
    "clipped-output": "regression: a bounded activation last in the graph and >= 5% targets out of range",
    "module-in-eval-during-training": "mode flag",
    "module-in-train-during-eval": "mode flag",
    "parameters-not-in-optimizer": "membership",
    "unused-parameters": "no gradient over 50 steps",
    "frozen-parameters": "update exactly 0",
}


@dataclass
class Recorder:
    """Statistics recorded per probe, as ``(value, case)`` pairs; ``case`` tags what is running now."""

    case: str = ""
    values: dict[int, list[tuple[float, str]]] = field(default_factory=lambda: defaultdict(list))


# the recorders of the ``probing`` blocks now open, innermost last (statistics recorded in other
# processes, e.g. the DDP cases' ranks, are added to the innermost one)
_ACTIVE: list[Recorder] = []


def active_recorder() -> Recorder | None:
    """The recorder of the innermost :func:`probing` block now open, else ``None``."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def probing(recorder: Recorder) -> Iterator[Recorder]:
    """Wrap the rule functions named by :data:`PROBES` (in their modules) for the duration of the block."""
    originals: dict[tuple[str, str], Any] = {}
    by_function: dict[tuple[str, str], list[tuple[int, Probe]]] = defaultdict(list)
    for index, probe in enumerate(PROBES):
        by_function[(probe.module, probe.function)].append((index, probe))

    def wrap(original: Any, probes: list[tuple[int, Probe]]) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            for index, probe in probes:
                if recorder.case.split("@")[0] in probe.exempt:  # "<case>@<seed>" under --seeds
                    continue
                try:
                    value = probe.extract(args, result)
                except Exception:  # a probe must never break a run
                    value = None
                if value is not None and math.isfinite(value):
                    recorder.values[index].append((float(value), recorder.case))
            return result

        return recorded

    try:
        for (module_name, function), probes in by_function.items():
            module = importlib.import_module(f"lightning_sentinel.checks.{module_name}")
            originals[(module_name, function)] = getattr(module, function)
            setattr(module, function, wrap(getattr(module, function), probes))
        _ACTIVE.append(recorder)
        yield recorder
    finally:
        if recorder in _ACTIVE:
            _ACTIVE.remove(recorder)
        for (module_name, function), original in originals.items():
            setattr(importlib.import_module(f"lightning_sentinel.checks.{module_name}"), function, original)


@dataclass(frozen=True)
class MarginRow:
    """The healthy value nearest to one threshold."""

    check: str
    statistic: str
    threshold: float
    upper: bool
    nearest: float | None
    case: str
    runs: int
    guard: str = ""

    @property
    def margin(self) -> float | None:
        """``threshold / nearest`` (upper bound) or ``nearest / threshold`` (lower bound); >1 is safe."""
        if self.nearest is None:
            return None
        if self.upper:
            return math.inf if self.nearest <= 0 else self.threshold / self.nearest
        return self.nearest / self.threshold if self.threshold > 0 else math.inf


def margins(recorder: Recorder) -> list[MarginRow]:
    """One row per probe: the nearest healthy value to its threshold, which case produced it, the margin."""
    rows = []
    for index, probe in enumerate(PROBES):
        values = recorder.values.get(index, [])
        if probe.per_case == "steps" and probe.pass_level is not None and probe.cadence is not None:
            level, cadence = probe.pass_level(), probe.cadence()
            calls: dict[str, list[float]] = defaultdict(list)
            for value, case in values:
                calls[case].append(value)
            steps = []
            for case, seen in calls.items():
                passed = next((index for index, value in enumerate(seen) if value >= level), len(seen) - 1)
                steps.append(((passed + 1) * cadence, case))
            values = steps
        nearest = (max if probe.upper else min)(values, default=None, key=lambda pair: pair[0])
        rows.append(
            MarginRow(
                probe.check,
                probe.statistic,
                probe.threshold(),
                probe.upper,
                None if nearest is None else nearest[0],
                "" if nearest is None else nearest[1],
                len({case for _, case in values}),
                probe.guard,
            )
        )
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_margins(rows: list[MarginRow]) -> list[str]:
    """Markdown table lines of :func:`margins`."""
    lines = [
        "| check | statistic | alarms when | nearest healthy value | case | margin |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        bound = f"{'>' if row.upper else '<'} {row.threshold:g}"
        nearest = "-" if row.nearest is None else f"{row.nearest:.3g}"
        margin = "-" if row.margin is None else ("inf" if math.isinf(row.margin) else f"{row.margin:.3g}x")
        if row.guard and row.margin is not None and row.margin < 1:
            margin += f" (quiet: {row.guard})"
        lines.append(
            f"| `{row.check}` | {_cell(row.statistic)} | {bound} | {nearest} | {row.case or '-'} | {margin} |"
        )
    return lines
