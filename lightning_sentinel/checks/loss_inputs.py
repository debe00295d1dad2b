"""LossInputCheck: what the loss functions receive (probabilities, logits, shapes, ranges).

On a sampled training step, a :class:`torch.overrides.TorchFunctionMode` is active from
``on_train_batch_start`` to ``on_train_batch_end``. It intercepts the functional losses that the
``nn.*Loss`` modules call (``cross_entropy``, ``nll_loss``, ``binary_cross_entropy``,
``binary_cross_entropy_with_logits``, ``mse_loss``, ``l1_loss``, ``smooth_l1_loss``,
``huber_loss``), lets the call run unchanged, and reduces its arguments to a few statistics on the
device. The callback reads them back once, at the end of the step, and judges them with the pure
rules below.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._validate import require_int, require_number
from lightning_sentinel.base import OnDetect
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._torch_function import LossCallRecorder, SampledLossCallCheck, loss_call_site
from lightning_sentinel.findings import Severity

SOFTMAX_BEFORE_CE = "softmax-before-cross-entropy"
NLL_ON_LOGITS = "nll-on-logits"
SIGMOID_BEFORE_BCE = "sigmoid-before-bce-with-logits"
LOSS_BROADCAST = "loss-broadcast"
CLIPPED_OUTPUT = "clipped-output"

register(
    CheckSpec(
        SOFTMAX_BEFORE_CE,
        "LossInputCheck",
        Severity.ERROR,
        "cross_entropy/CrossEntropyLoss receives probabilities (softmax output) instead of logits",
        "every input in [0, 1] and every row summing to 1 (within 1e-2), on a sampled step (every 10 batches)",
    ),
    CheckSpec(
        NLL_ON_LOGITS,
        "LossInputCheck",
        Severity.ERROR,
        "nll_loss/NLLLoss receives raw logits instead of log-probabilities",
        "an input above 0.01 or a row logsumexp above 0.1, on a sampled step",
    ),
    CheckSpec(
        SIGMOID_BEFORE_BCE,
        "LossInputCheck",
        Severity.WARNING,
        "binary_cross_entropy_with_logits/BCEWithLogitsLoss receives probabilities (sigmoid output)",
        "the input comes from a sigmoid (autograd graph), at once; without a graph, every input inside [0, 1] "
        "on 3 sampled steps in a row; a linear head's logits are never judged",
    ),
    CheckSpec(
        LOSS_BROADCAST,
        "LossInputCheck",
        Severity.ERROR,
        "a regression loss broadcasts input and target of different shapes, e.g. (N, 1) against (N,)",
        "error when both sides are expanded (every output meets every target); warning when one non-scalar "
        "side is",
    ),
    CheckSpec(
        CLIPPED_OUTPUT,
        "LossInputCheck",
        Severity.WARNING,
        "a regression output is confined to a bounded activation's range while the targets lie outside it (the "
        "clipped part gets no gradient); or cross-entropy logits pass through a ReLU",
        "regression: >= 5% of targets outside the exact range the autograd graph shows last (ReLU, sigmoid, tanh, "
        "ReLU6/hardtanh, clamp, softplus, ELU, GELU, SiLU, exp, ...; without a graph: >= 1% of outputs at a bound "
        "of [0, inf), [0, 1] or [-1, 1]; a linear output is never judged); cross_entropy: every logit >= 0 and >= "
        "1% exactly 0; 3 sampled steps in a row",
    ),
)

_CLASSIFICATION = "classification"  # cross_entropy, nll_loss: stats of the class scores
_LOGITS = "logits"  # binary_cross_entropy_with_logits
_PROBABILITIES = "probabilities"  # binary_cross_entropy: shapes only
_REGRESSION = "regression"  # mse, l1, smooth_l1, huber

_INTERCEPTED: dict[Callable[..., Any], str] = {
    F.cross_entropy: _CLASSIFICATION,
    F.nll_loss: _CLASSIFICATION,
    F.binary_cross_entropy_with_logits: _LOGITS,
    F.binary_cross_entropy: _PROBABILITIES,
    F.mse_loss: _REGRESSION,
    F.l1_loss: _REGRESSION,
    F.smooth_l1_loss: _REGRESSION,
    F.huber_loss: _REGRESSION,
}


# the bounded ranges a final activation confines an output to: ReLU (and friends), sigmoid, tanh
RANGE_NON_NEGATIVE = (0.0, math.inf)
RANGE_UNIT = (0.0, 1.0)
RANGE_SYMMETRIC = (-1.0, 1.0)
_PIN_BAND = 0.05  # an output this close to a finite bound (0, 1, -1) counts as pinned there


# ---------------------------------------------------------------------- pure rules
def looks_like_probabilities(
    minimum: float, maximum: float, max_row_deviation: float, classes: int, tolerance: float = 1e-2
) -> bool:
    """Whether class scores are probabilities: all in [0, 1] and every row summing to 1.

    ``max_row_deviation`` is the largest ``abs(row sum - 1)`` over the rows (class dimension summed).

    Example:
        >>> looks_like_probabilities(0.01, 0.9, 1e-7, classes=10)
        True
        >>> looks_like_probabilities(-2.3, 3.1, 4.2, classes=10)  # logits
        False
        >>> looks_like_probabilities(0.0, 0.0, 1.0, classes=10)  # a zero-initialised head
        False
    """
    return (
        classes >= 2
        and minimum >= -tolerance
        and maximum <= 1.0 + tolerance
        and max_row_deviation <= tolerance
    )


def not_log_probabilities(
    maximum: float, max_row_logsumexp: float, value_tolerance: float = 1e-2, lse_tolerance: float = 0.1
) -> bool:
    """Whether ``nll_loss`` inputs cannot be log-probabilities.

    Log-probabilities are <= 0 and each row's ``logsumexp`` is 0 (probabilities summing to 1), or
    below 0 for a partial distribution. A positive value, or a row whose probabilities would sum
    to more than ``exp(lse_tolerance)``, is something else (typically raw logits). NaN is not judged.

    Example:
        >>> not_log_probabilities(-0.01, 0.0)  # log_softmax output
        False
        >>> not_log_probabilities(2.7, 3.4)  # logits
        True
        >>> not_log_probabilities(-0.5, -0.7)  # log-probabilities of a subset of the classes
        False
    """
    return maximum > value_tolerance or max_row_logsumexp > lse_tolerance


def inside_unit_interval(minimum: float, maximum: float) -> bool:
    """Whether the values lie in [0, 1] (what a sigmoid returns) and are not all equal.

    A constant output (a zero-initialised head at step 0, a dead layer) is no sigmoid's signature.

    Example:
        >>> inside_unit_interval(0.02, 0.97)
        True
        >>> inside_unit_interval(-1.3, 2.2), inside_unit_interval(0.0, 0.0)
        (False, False)
    """
    return minimum >= 0.0 and maximum <= 1.0 and maximum > minimum


# autograd nodes that only move, reshape, select or cast values: the producer lies behind them
_PASS_THROUGH = re.compile(
    r"(View|UnsafeView|Reshape\w*|Squeeze|Unsqueeze|Expand|Permute|Transpose|T|Clone|ToCopy|Select|Slice|"
    r"AsStrided|Alias|Index|Split\w*|Unbind|Contiguous)Backward\d*"
)
# nodes whose output is confined to a range: ReLU-family, tanh, hardtanh/ReLU6, clamp, softplus, hardsigmoid
_BOUNDED = re.compile(r"(Relu|Tanh|Hardtanh|Clamp\w*|Softplus|Threshold|Hardsigmoid)Backward\d*")
# nodes whose output is unbounded: a linear map (a logit), never a sigmoid's probability
_UNBOUNDED = re.compile(
    r"(Addmm|Mm|Bmm|Baddbmm|Addmv|Mv|Matmul|Linear|Convolution\w*|Cudnn\w*|Mkldnn\w*)Backward\d*"
)
SIGMOID_ORIGIN, BOUNDED_ORIGIN, UNBOUNDED_ORIGIN, UNKNOWN_ORIGIN = (
    "sigmoid",
    "bounded",
    "unbounded",
    "unknown",
)


def producer_of(values: Tensor, max_depth: int = 8) -> str:
    """What produced ``values``, read from its autograd graph behind reshapes, selections and casts:
    ``"sigmoid"`` (``torch.sigmoid``/``nn.Sigmoid``), ``"bounded"`` (another activation confined to a
    range: ReLU-family, tanh, hardtanh, clamp, softplus), ``"unbounded"`` (a matrix product or
    convolution: a linear layer's output) or ``"unknown"`` (no graph, e.g. under ``no_grad`` or inside
    a compiled region, or any other operation).

    Example:
        >>> head = torch.nn.Linear(3, 1)
        >>> x = torch.randn(4, 3)
        >>> producer_of(torch.sigmoid(head(x)).squeeze(-1)), producer_of(head(x).view(-1))
        ('sigmoid', 'unbounded')
        >>> producer_of(torch.tanh(head(x))), producer_of(torch.relu(head(x))[:, 0])
        ('bounded', 'bounded')
        >>> producer_of(head(x).detach())
        'unknown'
    """
    node = values.grad_fn
    for _ in range(max_depth):
        if node is None:
            return UNKNOWN_ORIGIN
        name = node.name()
        if name.startswith("SigmoidBackward"):
            return SIGMOID_ORIGIN
        if _BOUNDED.fullmatch(name):
            return BOUNDED_ORIGIN
        if _UNBOUNDED.fullmatch(name):
            return UNBOUNDED_ORIGIN
        if not _PASS_THROUGH.fullmatch(name):
            return UNKNOWN_ORIGIN
        inputs = [next_node for next_node, _ in node.next_functions if next_node is not None]
        if len(inputs) != 1:
            return UNKNOWN_ORIGIN
        node = inputs[0]
    return UNKNOWN_ORIGIN


@dataclass(frozen=True)
class OutputRange:
    """The range an output is confined to, read from its autograd graph: the last activation (or clamp)
    that produced it, times any constant factor applied after it."""

    activation: str
    low: float
    high: float

    def shown(self) -> str:
        """``[low, high]`` with open infinite ends, e.g. ``[0, 6]`` or ``[-0.17, inf)``."""
        left = f"[{self.low:.4g}" if math.isfinite(self.low) else "(-inf"
        right = f"{self.high:.4g}]" if math.isfinite(self.high) else "inf)"
        return f"{left}, {right}"


_INF = math.inf
# activations whose output range is fixed: autograd node name -> (activation, low, high); the lower bounds
# of the smooth ReLU-like ones are their minima (GELU -0.16997, SiLU -0.27846, Mish -0.30884), rounded down
_FIXED_RANGES: dict[str, tuple[str, float, float]] = {
    "ReluBackward": ("ReLU", 0.0, _INF),
    "SigmoidBackward": ("sigmoid", 0.0, 1.0),
    "TanhBackward": ("tanh", -1.0, 1.0),
    "HardsigmoidBackward": ("hardsigmoid", 0.0, 1.0),
    "SoftplusBackward": ("softplus", 0.0, _INF),
    "ExpBackward": ("exp", 0.0, _INF),
    "AbsBackward": ("abs", 0.0, _INF),
    "GeluBackward": ("GELU", -0.17, _INF),
    "SiluBackward": ("SiLU", -0.2785, _INF),
    "MishBackward": ("Mish", -0.3089, _INF),
    "HardswishBackward": ("hardswish", -0.375, _INF),
    "LogSigmoidBackward": ("logsigmoid", -_INF, 0.0),
    "ErfBackward": ("erf", -1.0, 1.0),
    "AtanBackward": ("atan", -math.pi / 2, math.pi / 2),
}


def _node_range(node: Any) -> tuple[str, float, float] | None:
    """The output range of one autograd node if it is a known activation or clamp, else ``None``."""
    name = re.sub(r"\d+$", "", node.name())
    if name in _FIXED_RANGES:
        return _FIXED_RANGES[name]

    def bound(attribute: str, default: float) -> float | None:
        value = getattr(node, attribute, None)
        if value is None:
            return default
        return float(value) if isinstance(value, (int, float)) else None  # a tensor bound: not read

    if name == "HardtanhBackward":
        low, high = bound("_saved_min_val", -1.0), bound("_saved_max_val", 1.0)
        label = "ReLU6" if (low, high) == (0.0, 6.0) else "hardtanh"
    elif name in ("ClampBackward", "ClampMinBackward", "ClampMaxBackward"):
        low, high, label = bound("_saved_min", -_INF), bound("_saved_max", _INF), "clamp"
    elif name == "EluBackward":
        alpha, scale = bound("_saved_alpha", 1.0), bound("_saved_scale", 1.0)
        if alpha is None or scale is None:
            return None
        low, high, label = -alpha * scale, _INF, "SELU" if scale != 1.0 else "ELU"
    elif name == "CeluBackward":
        alpha = bound("_saved_alpha", 1.0)
        low, high, label = (None if alpha is None else -alpha), _INF, "CELU"
    elif name == "PowBackward":
        exponent = getattr(node, "_saved_exponent", None)
        even = isinstance(exponent, (int, float)) and float(exponent).is_integer() and int(exponent) % 2 == 0
        return ("an even power", 0.0, _INF) if even and exponent != 0 else None
    else:
        return None
    if low is None or high is None or low >= high:
        return None
    return label, low, high


def _constant_factor(node: Any) -> float | None:
    """The factor of ``x * c`` or ``x / c`` with ``c`` a plain number (a 0-d CPU tensor in the graph:
    reading it is no device sync), else ``None``."""
    name = node.name()
    if not name.startswith(("MulBackward", "DivBackward")) or getattr(node, "_saved_self", None) is not None:
        return None
    other = getattr(node, "_saved_other", None)
    if not isinstance(other, Tensor) or other.numel() != 1 or other.device.type != "cpu":
        return None
    value = float(other)
    if not math.isfinite(value) or value == 0.0:
        return None
    return value if name.startswith("Mul") else 1.0 / value


def graph_range(values: Tensor, max_depth: int = 8) -> OutputRange | None:
    """The range ``values`` are confined to, read from their autograd graph: the activation or clamp that
    produced them (behind reshapes, selections and casts, and times a constant factor such as
    ``300 * torch.sigmoid(x)``), with its exact bounds: ``ReLU6`` ``[0, 6]``, ``clamp(0, 10)``, ``ELU``
    ``[-alpha, inf)``, ``GELU`` ``[-0.17, inf)``, ``exp`` ``[0, inf)``, ... ``None`` when the graph shows
    anything else (a linear layer, no graph, an unknown op).

    Example:
        >>> head = torch.nn.Linear(3, 1)
        >>> x = torch.randn(4, 3)
        >>> graph_range(torch.nn.ReLU6()(head(x))).shown(), graph_range(torch.nn.functional.elu(head(x), 0.5)).low
        ('[0, 6]', -0.5)
        >>> graph_range(300 * torch.sigmoid(head(x)).squeeze(-1))
        OutputRange(activation='sigmoid', low=0.0, high=300.0)
        >>> graph_range(head(x)) is None, graph_range(head(x).clamp(min=0).detach()) is None
        (True, True)
    """
    node = values.grad_fn
    factor = 1.0
    for _ in range(max_depth):
        if node is None:
            return None
        known = _node_range(node)
        if known is not None:
            label, low, high = known
            low, high = sorted((low * factor, high * factor)) if factor != 1.0 else (low, high)
            return OutputRange(label, low, high)
        constant = _constant_factor(node)
        if constant is not None:
            factor *= constant
        elif not _PASS_THROUGH.fullmatch(node.name()):
            return None
        inputs = [next_node for next_node, _ in node.next_functions if next_node is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def graph_range_verdict(
    minimum: float, maximum: float, outside_share: float, bounds: OutputRange, min_target_share: float
) -> bool:
    """Whether an output confined by its graph to ``bounds`` (and seen inside them) misses its targets:
    at least ``min_target_share`` of them lie outside.

    Example:
        >>> relu6 = OutputRange("ReLU6", 0.0, 6.0)
        >>> graph_range_verdict(0.0, 6.0, 0.97, relu6, 0.05), graph_range_verdict(0.0, 5.2, 0.0, relu6, 0.05)
        (True, False)
    """
    slack = 1e-3 * max(1.0, abs(bounds.low) if math.isfinite(bounds.low) else 1.0)
    top = 1e-3 * max(1.0, abs(bounds.high) if math.isfinite(bounds.high) else 1.0)
    inside = minimum >= bounds.low - slack and maximum <= bounds.high + top
    return inside and outside_share >= min_target_share


def broadcast_verdict(
    input_shape: tuple[int, ...], target_shape: tuple[int, ...]
) -> tuple[str, tuple[int, ...]]:
    """How an elementwise loss pairs ``input`` with ``target`` of these shapes.

    Returns ``(verdict, broadcast_shape)`` with verdict ``"same"`` (shapes equal, or only reshaped
    with the same pairs), ``"scalar"`` (one side holds a single value: a constant target),
    ``"both-expanded"`` (each side is repeated along a dimension of the other: every output meets
    every target, the (N, 1) against (N,) bug), ``"one-expanded"`` (a non-scalar side is repeated
    along the other's dimensions) or ``"incompatible"`` (the loss itself raises).

    Example:
        >>> broadcast_verdict((32, 1), (32,))
        ('both-expanded', (32, 32))
        >>> broadcast_verdict((32, 4), (4,))
        ('one-expanded', (32, 4))
        >>> broadcast_verdict((32, 1), (32, 1))[0], broadcast_verdict((8,), ())[0]
        ('same', 'scalar')
    """
    if tuple(input_shape) == tuple(target_shape):
        return "same", tuple(input_shape)
    try:
        shape = tuple(torch.broadcast_shapes(torch.Size(input_shape), torch.Size(target_shape)))
    except RuntimeError:
        return "incompatible", ()
    n_input, n_target, n_out = math.prod(input_shape), math.prod(target_shape), math.prod(shape)
    if min(n_input, n_target) <= 1:
        return "scalar", shape
    if n_out > n_input and n_out > n_target:
        return "both-expanded", shape
    if n_out > min(n_input, n_target):
        return "one-expanded", shape
    return "same", shape


def bounded_range(minimum: float, maximum: float) -> tuple[float, float] | None:
    """The tightest bounded-activation range (``[0, 1]``, ``[-1, 1]``, ``[0, inf)``) holding all outputs.

    Example:
        >>> bounded_range(0.0, 3.5)
        (0.0, inf)
        >>> bounded_range(-0.99, 0.98)
        (-1.0, 1.0)
        >>> bounded_range(-2.0, 1.5) is None
        True
    """
    if not (math.isfinite(minimum) and math.isfinite(maximum)):
        return None
    for low, high in (RANGE_UNIT, RANGE_SYMMETRIC, RANGE_NON_NEGATIVE):
        if low <= minimum and maximum <= high:
            return low, high
    return None


@dataclass(frozen=True)
class RegressionStats:
    """What the device reduced a regression loss's arguments to (shares are fractions in [0, 1]).

    ``pinned_*``: share of outputs at the bound of each range; ``outside_*``: share of targets outside it.
    """

    minimum: float
    maximum: float
    pinned_non_negative: float
    pinned_unit: float
    pinned_symmetric: float
    outside_non_negative: float
    outside_unit: float
    outside_symmetric: float

    def for_range(self, bounds: tuple[float, float]) -> tuple[float, float]:
        """``(pinned share, outside share)`` for one of the three ranges."""
        if bounds == RANGE_UNIT:
            return self.pinned_unit, self.outside_unit
        if bounds == RANGE_SYMMETRIC:
            return self.pinned_symmetric, self.outside_symmetric
        return self.pinned_non_negative, self.outside_non_negative


def clipped_verdict(
    stats: RegressionStats, min_target_share: float = 0.05, min_pinned_share: float = 0.01
) -> tuple[bool, tuple[float, float] | None, float, float]:
    """Whether a regression output is clipped by a bounded activation while its targets are not.

    The outputs must lie inside a bounded range, at least ``min_pinned_share`` of them at its bound
    (exactly 0 for ``[0, inf)``: a ReLU; within 0.05 of a finite bound: a saturated sigmoid/tanh; a
    linear output that merely happens to be small is not pinned), and at least
    ``min_target_share`` of the targets outside it. Returns ``(clipped, range, pinned, outside)``.

    Example:
        >>> relu = RegressionStats(0.0, 2.1, 0.4, 0.0, 0.0, 0.45, 0.5, 0.2)
        >>> clipped_verdict(relu)[:2]
        (True, (0.0, inf))
        >>> linear = RegressionStats(-0.4, 0.6, 0.0, 0.0, 0.0, 0.45, 0.5, 0.2)
        >>> clipped_verdict(linear)[0]
        False
    """
    bounds = bounded_range(stats.minimum, stats.maximum)
    if bounds is None:
        return False, None, 0.0, 0.0
    pinned, outside = stats.for_range(bounds)
    return pinned >= min_pinned_share and outside >= min_target_share, bounds, pinned, outside


def relu_logits_verdict(minimum: float, maximum: float, zero_share: float, min_zero_share: float) -> bool:
    """Whether cross-entropy class scores look like a ReLU's output: none negative, some positive, and at
    least ``min_zero_share`` of them exactly 0.

    A linear head never puts a float logit at exactly 0 by chance; a ReLU puts every negative one
    there, where it gets no gradient and can never fall below the other classes' scores.

    Example:
        >>> relu_logits_verdict(0.0, 3.2, 0.45, 0.01)
        True
        >>> relu_logits_verdict(-2.1, 3.2, 0.0, 0.01)  # a linear head
        False
        >>> relu_logits_verdict(0.0, 0.0, 1.0, 0.01)  # a zero-initialised head, before its first step
        False
    """
    return minimum >= 0.0 and maximum > 0.0 and zero_share >= min_zero_share


# ---------------------------------------------------------------------- device statistics
def classification_stats(scores: Tensor) -> Tensor:
    """``[min, max, max abs(row sum - 1), max row logsumexp, share exactly 0]`` of class scores, on their device.

    The class dimension is 1 (``(N, C, ...)``), or 0 for an unbatched ``(C,)`` input.

    Example:
        >>> classification_stats(torch.tensor([[0.2, 0.8], [0.5, 0.5]])).tolist()[:3]
        [0.20000000298023224, 0.800000011920929, 0.0]
    """
    scores = scores.detach().float()
    dim = 1 if scores.dim() >= 2 else 0
    low, high = torch.aminmax(scores)
    deviation = (scores.sum(dim) - 1.0).abs().amax()
    lse = torch.logsumexp(scores, dim).amax()
    zeros = (scores == 0).float().mean()
    return torch.stack([low, high, deviation, lse, zeros])


def range_stats(values: Tensor) -> Tensor:
    """``[min, max]`` of a tensor, on its device."""
    low, high = torch.aminmax(values.detach().float())
    return torch.stack([low, high])


def regression_stats(outputs: Tensor, targets: Tensor, bounds: OutputRange | None = None) -> Tensor:
    """The eight numbers of :class:`RegressionStats`, on the outputs' device; with ``bounds`` (the range the
    autograd graph confines the outputs to) a ninth: the share of targets outside those bounds."""
    out = outputs.detach().float()
    tgt = targets.detach().float().to(out.device)
    low, high = torch.aminmax(out)
    band = _PIN_BAND
    pinned_zero = (out == 0).float().mean()
    pinned_unit = ((out <= band) | (out >= 1.0 - band)).float().mean()
    pinned_symmetric = (out.abs() >= 1.0 - band).float().mean()
    margin = 1e-3  # targets this far beyond a bound count as outside
    outside_non_negative = (tgt < -margin).float().mean()
    outside_unit = ((tgt < -margin) | (tgt > 1.0 + margin)).float().mean()
    outside_symmetric = (tgt.abs() > 1.0 + margin).float().mean()
    numbers = [
        low,
        high,
        pinned_zero,
        pinned_unit,
        pinned_symmetric,
        outside_non_negative,
        outside_unit,
        outside_symmetric,
    ]
    if bounds is not None:
        below = tgt < bounds.low - margin * max(1.0, abs(bounds.low)) if math.isfinite(bounds.low) else None
        above = (
            tgt > bounds.high + margin * max(1.0, abs(bounds.high)) if math.isfinite(bounds.high) else None
        )
        outside = below if above is None else (above if below is None else below | above)
        numbers.append(outside.float().mean() if outside is not None else low.new_zeros(()))
    return torch.stack(numbers)


# ---------------------------------------------------------------------- the interception
@dataclass
class LossCall:
    """One intercepted loss call: where it came from, its shapes, and its device statistics."""

    function: str
    kind: str
    where: str
    call_site: str
    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...] | None
    stats: Tensor | None
    # what produced the input (``producer_of``), for the sigmoid and clipped-output rules
    origin: str = UNKNOWN_ORIGIN
    # the range the autograd graph confines a regression output to (``graph_range``)
    bounds: OutputRange | None = None

    @property
    def classes(self) -> int:
        """Number of classes of a classification input: dimension 1 of ``(N, C, ...)``, or ``C`` of ``(C,)``."""
        return self.input_shape[1] if len(self.input_shape) >= 2 else self.input_shape[0]


class _LossInterceptor(LossCallRecorder):
    """Records the arguments of the intercepted losses; every other call passes straight through."""

    intercepted = _INTERCEPTED

    def __init__(self, module_names: dict[int, str]) -> None:
        super().__init__(module_names)
        self.calls: list[LossCall] = []

    @override
    def record(
        self, func: Callable[..., Any], kind: str, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        function = func.__name__
        values = args[0] if args else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if not isinstance(values, Tensor) or not values.is_floating_point() or values.numel() == 0:
            return
        where, site = loss_call_site(function, self.module_names)
        target_shape = tuple(target.shape) if isinstance(target, Tensor) else None
        stats: Tensor | None = None
        origin = UNKNOWN_ORIGIN
        bounds: OutputRange | None = None
        with torch.no_grad():
            if kind == _CLASSIFICATION:
                stats = classification_stats(values)
            elif kind == _LOGITS:
                stats = range_stats(values)
                origin = producer_of(values)
            elif (
                kind == _REGRESSION
                and isinstance(target, Tensor)
                and target.is_floating_point()
                and target.numel() > 0
            ):
                bounds = graph_range(values)
                stats = regression_stats(values, target, bounds)
                origin = producer_of(values)
        self.calls.append(
            LossCall(function, kind, where, site, tuple(values.shape), target_shape, stats, origin, bounds)
        )


# ---------------------------------------------------------------------- the callback
class LossInputCheck(SampledLossCallCheck[_LossInterceptor]):
    """Checks what the loss functions receive: probabilities where logits belong, logits where
    log-probabilities belong, shapes that broadcast, outputs clipped by a final activation.

    On every ``every_n_steps``-th training batch (micro-batch) a ``TorchFunctionMode`` is entered in
    ``on_train_batch_start`` and removed in ``on_before_backward`` under automatic optimization (the
    backward pass and the optimizer step are not intercepted), otherwise in ``on_train_batch_end``
    (and always on exception, epoch end and teardown: it is never left active). While it is active it intercepts ``cross_entropy``,
    ``nll_loss``, ``binary_cross_entropy(_with_logits)``, ``mse_loss``, ``l1_loss``,
    ``smooth_l1_loss`` and ``huber_loss`` (the ``nn.*Loss`` modules call these), lets each call run
    unchanged, and reduces its arguments on the device; the step's statistics are read back once,
    at batch end. Other steps cost nothing (a counter).

    Rules (calibrated on the healthy and faulty zoos of ``benchmarks/detection``):

    - ``softmax-before-cross-entropy`` (error): every ``cross_entropy`` input in ``[0, 1]`` and every
      row summing to 1 within ``tolerance``: the loss applies ``log_softmax`` a second time.
    - ``nll-on-logits`` (error): an ``nll_loss`` input above ``tolerance`` or a row ``logsumexp``
      above 0.1: not log-probabilities (a partial distribution, logsumexp < 0, is accepted).
    - ``sigmoid-before-bce-with-logits`` (warning): the ``binary_cross_entropy_with_logits`` input comes
      from ``torch.sigmoid``/``nn.Sigmoid`` (read from its autograd graph, behind reshapes, selections
      and casts): at once. When the graph shows a matrix product or convolution last (a linear head's
      logits) it is never judged, so a healthy model whose logits all sit in ``[0, 1]`` (a weak signal
      and a positive majority) stays quiet; when the graph says nothing (``no_grad``, a compiled
      region, another op) every input in ``[0, 1]`` on ``patience`` sampled steps in a row (a
      zero-initialised head starts at 0).
    - ``loss-broadcast``: input and target shapes differ and broadcast; error when both sides are
      expanded (``(N, 1)`` against ``(N,)`` compares every output with every target), warning when
      one non-scalar side is; a scalar target is accepted.
    - ``clipped-output`` (warning): at least ``min_target_share`` of a regression's targets outside the
      range its output is confined to, ``patience`` sampled steps in a row. The range is read from the
      output's autograd graph (:func:`graph_range`, behind reshapes, casts and a constant factor):
      ReLU/softplus/exp/abs ``[0, inf)``, sigmoid ``[0, 1]``, tanh ``[-1, 1]``, ReLU6 ``[0, 6]``, the
      bounds of hardtanh and clamp, ELU/SELU ``[-alpha * scale, inf)``, GELU ``[-0.17, inf)``, SiLU
      ``[-0.28, inf)``, Mish, hardswish. Before it read only ``[0, inf)``, ``[0, 1]`` and ``[-1, 1]``,
      guessed from the values: ReLU6 or ``clamp(0, 10)`` under targets of ~50-400 and ELU/GELU/SiLU/exp
      heads on standardised targets were missed (caught now by the ``*-head-*`` cases of
      ``benchmarks/detection/cases_lm_rules.py``; bounded heads covering their targets stay quiet).
      When the graph shows another producer (ReLU-family, sigmoid or tanh without known bounds) the
      range is guessed from the values as before. A linear output (a matrix
      product or convolution last) is never judged, whatever its range; without a graph, at least
      ``min_pinned_share`` of the outputs must also sit at the bound (exactly 0, or within 0.05 of
      0/1/-1) on each of those steps. Also for ``cross_entropy``: every logit >= 0, some above 0 and at least
      ``min_pinned_share`` exactly 0 (a ReLU after the classifier), ``patience`` sampled steps in a
      row. Calibration: no healthy run of the zoo gave an exactly-zero logit beside positive ones (a
      zero-initialised head is all 0 before its first step); the ReLU-on-logits mutant of the digits
      MLP gives 55% zeros.

    Label smoothing, class weights, ``ignore_index`` and soft (probability) targets of
    ``cross_entropy`` are legitimate and not judged: only the predicted scores are.

    What it cannot see: a loss written by hand (``-(y * torch.log(p)).sum()``), a loss outside the
    list above (``PoissonNLLLoss``, ``KLDivLoss``, ...), or a loss inside a compiled region whose
    code never returns to Python (a fully captured graph, an exported or scripted model). When a
    sampled step makes no intercepted loss call at all, it says so once per run, as an ``info``
    finding under the first of its ids that is enabled (``softmax-before-cross-entropy`` by
    default: that id names the family, the info says that none of the five rules could run), with
    ``where="training_step"``, rather than staying silent. Under ``torch.compile`` (Dynamo) the
    loss calls are still seen: Dynamo breaks the graph at the mode on sampled steps and keeps that
    variant cached (measured: 3 graphs instead of 1, not growing with the number of steps).

    ``where`` is the loss module's name in the LightningModule (e.g. ``"loss"`` for
    ``self.loss = nn.CrossEntropyLoss()``), or ``"F.<loss> in <function>"`` for a functional call;
    the message adds the call site (function, file and line).

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        every_n_steps: sample every n-th training batch (micro-batch); an integer >= 1.
        warmup_steps: training batches to skip before the first sample; an integer >= 0.
        tolerance: slack of the probability and log-probability rules (covers bf16 rounding); > 0.
        patience: consecutive sampled steps the sigmoid and clipped-output conditions must hold; >= 1.
        min_target_share: share of targets outside the output's range for ``clipped-output``; in (0, 1].
        min_pinned_share: share of outputs at the range's bound (of exactly-zero logits) for ``clipped-output``; in (0, 1].

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.loss_inputs import LossInputCheck
        >>> check = LossInputCheck(every_n_steps=20, on_detect="raise")
        >>> trainer = pl.Trainer(callbacks=[check], logger=False)
    """

    CHECKS = (SOFTMAX_BEFORE_CE, NLL_ON_LOGITS, SIGMOID_BEFORE_BCE, LOSS_BROADCAST, CLIPPED_OUTPUT)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 10,
        warmup_steps: int = 0,
        tolerance: float = 1e-2,
        patience: int = 3,
        min_target_share: float = 0.05,
        min_pinned_share: float = 0.01,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        self.tolerance = require_number("tolerance", tolerance, above=0)
        self.patience = require_int("patience", patience)
        self.min_target_share = require_number("min_target_share", min_target_share, above=0, at_most=1)
        self.min_pinned_share = require_number("min_pinned_share", min_pinned_share, above=0, at_most=1)
        self._streaks: dict[str, int] = {}
        self._unseen_reported = False

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "tolerance": self.tolerance, "patience": self.patience}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            "streaks": dict(self._streaks),
            "unseen_reported": self._unseen_reported,
        }

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self._streaks = {str(key): int(value) for key, value in state.get("streaks", {}).items()}
        self._unseen_reported = bool(state.get("unseen_reported", False))

    # ------------------------------------------------------------------ the check
    @override
    def _new_recorder(self, module_names: dict[int, str]) -> _LossInterceptor:
        return _LossInterceptor(module_names)

    @override
    def _judge_calls(self, trainer: pl.Trainer, recorder: _LossInterceptor, batch_idx: int) -> None:
        calls = recorder.calls
        if not calls:
            self._report_unseen(trainer, batch_idx)
            return
        with_stats = [call for call in calls if call.stats is not None]
        if not with_stats:
            self._judge_stats(trainer, calls, batch_idx, [])
            return
        device = with_stats[0].stats.device  # type: ignore[union-attr]
        self._read(  # the one host read of this check (batched with the suite's other reads of this hook)
            trainer,
            torch.cat([call.stats.to(device) for call in with_stats]),  # type: ignore[union-attr]
            lambda values: self._judge_stats(trainer, calls, batch_idx, values),
        )

    def _judge_stats(
        self, trainer: pl.Trainer, calls: list[LossCall], batch_idx: int, values: list[float]
    ) -> None:
        offset = 0
        # (check, where) -> (condition held on every call of this step, the call, what to report)
        held: dict[tuple[str, str], tuple[bool, LossCall, Any]] = {}
        certain: set[tuple[str, str]] = set()  # conditions that need no patience
        for call in calls:
            stats: list[float] = []
            if call.stats is not None:
                stats = values[offset : offset + call.stats.numel()]
                offset += call.stats.numel()
            self._judge_broadcast(trainer, call)
            if call.kind == _CLASSIFICATION and stats:
                self._judge_classification(trainer, call, stats, batch_idx)
                if call.function == "cross_entropy":
                    minimum, maximum, deviation, _, zero_share = stats
                    relu = not looks_like_probabilities(
                        minimum, maximum, deviation, call.classes, self.tolerance
                    ) and relu_logits_verdict(minimum, maximum, zero_share, self.min_pinned_share)
                    key = (CLIPPED_OUTPUT, call.where)
                    before = held.get(key, (True, call, None))[0]
                    held[key] = (before and relu, call, (minimum, maximum, zero_share))
            elif call.kind == _LOGITS and stats:
                key = (SIGMOID_BEFORE_BCE, call.where)
                if call.origin == SIGMOID_ORIGIN:  # seen in the autograd graph: no patience needed
                    certain.add(key)
                before = held.get(key, (True, call, None))[0]
                probabilities = call.origin != UNBOUNDED_ORIGIN and inside_unit_interval(stats[0], stats[1])
                held[key] = (before and probabilities, call, (stats[0], stats[1]))
            elif call.kind == _REGRESSION and stats:
                key = (CLIPPED_OUTPUT, call.where)
                if call.bounds is not None:
                    # the graph gives the exact range (ReLU6's [0, 6], clamp(0, 10), ELU's [-alpha, inf)...):
                    # no output needs to sit at its bound
                    outside = stats[8]
                    clipped = graph_range_verdict(
                        stats[0], stats[1], outside, call.bounds, self.min_target_share
                    )
                    pinned = RegressionStats(*stats[:8]).for_range(RANGE_NON_NEGATIVE)[0]
                    verdict = (clipped, (call.bounds.low, call.bounds.high), pinned, outside, True)
                else:
                    # an activation seen in the graph needs no output at its bound (a batch of 32 often has
                    # none within 0.05 of a tanh's +-1); a linear output is never clipped, whatever its range
                    seen = call.origin in (SIGMOID_ORIGIN, BOUNDED_ORIGIN)
                    pinned_needed = 0.0 if seen else self.min_pinned_share
                    found = clipped_verdict(RegressionStats(*stats[:8]), self.min_target_share, pinned_needed)
                    clipped = found[0] and call.origin != UNBOUNDED_ORIGIN
                    verdict = (*found, seen)
                before = held.get(key, (True, call, None))[0]
                held[key] = (before and clipped, call, verdict)
        for (check, where), (condition, call, payload) in held.items():
            streak_key = f"{check}|{where}"
            streak = self._streaks.get(streak_key, 0) + 1 if condition else 0
            self._streaks[streak_key] = streak
            if not condition or (streak < self.patience and (check, where) not in certain):
                continue
            if check == SIGMOID_BEFORE_BCE:
                self._report_sigmoid(trainer, call, payload, streak, (check, where) in certain)
            elif call.kind == _CLASSIFICATION:
                self._report_relu_logits(trainer, call, payload, streak)
            else:
                self._report_clipped(trainer, call, payload, streak)
        self._settle(trainer)

    def _report_unseen(self, trainer: pl.Trainer, batch_idx: int) -> None:
        if self._unseen_reported or not self.active_checks:
            return
        self._unseen_reported = True
        self._report(
            trainer,
            self.active_checks[0],
            Severity.INFO,
            f"sampled training batch {batch_idx} made no intercepted loss call (cross_entropy, nll_loss, "
            "binary_cross_entropy(_with_logits), mse/l1/smooth_l1/huber_loss): the loss-input checks could not run",
            where="training_step",
            evidence={"batch_idx": float(batch_idx)},
            hint="a hand-written loss or one computed in a compiled region is not seen; use the torch.nn.functional "
            "losses (or nn.*Loss modules) in eager mode to have their inputs checked",
        )

    def _judge_broadcast(self, trainer: pl.Trainer, call: LossCall) -> None:
        if call.target_shape is None or call.kind == _CLASSIFICATION:
            return
        verdict, shape = broadcast_verdict(call.input_shape, call.target_shape)
        if verdict not in ("both-expanded", "one-expanded"):
            return
        both = verdict == "both-expanded"
        severity = Severity.ERROR if both else Severity.WARNING
        what = (
            "every output is compared with every target"
            if both
            else "one side is repeated along the other's dimensions"
        )
        self._report(
            trainer,
            LOSS_BROADCAST,
            severity,
            f"{call.function} broadcasts input {list(call.input_shape)} against target {list(call.target_shape)} "
            f"to {list(shape)}: {what} ({math.prod(shape)} terms instead of "
            f"{max(math.prod(call.input_shape), math.prod(call.target_shape))}), at {call.call_site}",
            where=call.where,
            evidence={
                "input_numel": float(math.prod(call.input_shape)),
                "target_numel": float(math.prod(call.target_shape)),
                "broadcast_numel": float(math.prod(shape)),
            },
            hint="make the shapes equal before the loss, e.g. output.squeeze(-1) for a (N, 1) output against (N,) "
            "targets, or targets.unsqueeze(-1); if the repetition is intended, expand explicitly (target.expand_as)",
        )

    def _judge_classification(
        self, trainer: pl.Trainer, call: LossCall, stats: list[float], batch_idx: int
    ) -> None:
        minimum, maximum, deviation, lse = stats[:4]
        classes = call.classes
        evidence = {
            "min": minimum,
            "max": maximum,
            "max_row_sum_deviation": deviation,
            "max_row_logsumexp": lse,
            "classes": float(classes),
        }
        if call.function == "cross_entropy":
            if looks_like_probabilities(minimum, maximum, deviation, classes, self.tolerance):
                self._report(
                    trainer,
                    SOFTMAX_BEFORE_CE,
                    Severity.ERROR,
                    f"cross_entropy receives probabilities: inputs in [{minimum:.3g}, {maximum:.3g}] with every row "
                    f"summing to 1 (max deviation {deviation:.2g}) over {classes} classes, batch {batch_idx}, at "
                    f"{call.call_site}; the loss applies log_softmax again, so gradients shrink ~{classes}x and the "
                    "loss cannot fall below ~log(C) - 1",
                    where=call.where,
                    evidence=evidence,
                    hint="pass the raw logits to cross_entropy/CrossEntropyLoss: remove the softmax (nn.Softmax) at "
                    "the end of the model, and apply softmax only where probabilities are wanted (metrics, inference)",
                )
        elif call.function == "nll_loss" and not_log_probabilities(maximum, lse, self.tolerance):
            self._report(
                trainer,
                NLL_ON_LOGITS,
                Severity.ERROR,
                f"nll_loss receives values that are not log-probabilities: max {maximum:.3g} (must be <= 0), "
                f"max row logsumexp {lse:.3g} (must be ~0), batch {batch_idx}, at {call.call_site}; nll_loss only "
                "negates the target's entry, so the loss is unbounded below on raw logits",
                where=call.where,
                evidence=evidence,
                hint="apply log_softmax(dim=1) (nn.LogSoftmax) before nll_loss/NLLLoss, or use cross_entropy on the "
                "raw logits",
            )

    def _report_sigmoid(
        self, trainer: pl.Trainer, call: LossCall, extremes: tuple[float, float], streak: int, seen: bool
    ) -> None:
        minimum, maximum = extremes
        how = (
            "come straight from a sigmoid (its autograd graph)"
            if seen
            else f"stayed inside [0, 1] on {streak} sampled steps in a row"
        )
        self._report(
            trainer,
            SIGMOID_BEFORE_BCE,
            Severity.WARNING,
            f"binary_cross_entropy_with_logits receives values in [{minimum:.3g}, {maximum:.3g}] that {how}, at "
            f"{call.call_site}: it applies a sigmoid itself, so a probability passed in is squashed again into "
            "[0.5, 0.73]",
            where=call.where,
            evidence={
                "min": minimum,
                "max": maximum,
                "sampled_steps": float(streak),
                "sigmoid_in_graph": float(seen),
            },
            hint="pass raw logits to binary_cross_entropy_with_logits/BCEWithLogitsLoss (remove the final sigmoid), "
            "or keep the sigmoid and use binary_cross_entropy/BCELoss",
        )

    def _report_relu_logits(
        self, trainer: pl.Trainer, call: LossCall, payload: tuple[float, float, float], streak: int
    ) -> None:
        minimum, maximum, zero_share = payload
        self._report(
            trainer,
            CLIPPED_OUTPUT,
            Severity.WARNING,
            f"cross_entropy receives class scores in [{minimum:.3g}, {maximum:.3g}] with {zero_share:.0%} exactly 0, "
            f"on {streak} sampled steps in a row, at {call.call_site}: the logits seem to pass through a ReLU, so a "
            "class score stuck at 0 gets no gradient and cannot be pushed below the others",
            where=call.where,
            evidence={
                "range_low": minimum,
                "range_high": maximum,
                "pinned_share": zero_share,
                "sampled_steps": float(streak),
            },
            hint="remove the activation after the classifier's last layer: cross_entropy/CrossEntropyLoss wants raw, "
            "signed logits",
        )

    def _report_clipped(
        self,
        trainer: pl.Trainer,
        call: LossCall,
        verdict: tuple[bool, tuple[float, float] | None, float, float, bool],
        streak: int,
    ) -> None:
        _, bounds, pinned, outside, seen = verdict
        assert bounds is not None
        low, high = bounds
        if call.bounds is not None:
            shown = call.bounds.shown()
            how = (
                f"the autograd graph shows {call.bounds.activation} last (range {shown}), so the output cannot reach "
                "those targets and gets no gradient toward them where the activation is flat"
            )
            at_bound = ""
        else:
            shown = f"[{low:g}, {high:g}]" if math.isfinite(high) else f"[{low:g}, inf)"
            activation = {RANGE_UNIT: "a sigmoid", RANGE_SYMMETRIC: "a tanh"}.get(bounds, "a ReLU (or clamp)")
            how = (
                "the autograd graph shows a bounded activation last, so the output cannot reach those targets"
                if seen
                else f"the output seems to pass through {activation} and cannot reach those targets"
            )
            at_bound = f" with {pinned:.0%} pinned at the bound"
        self._report(
            trainer,
            CLIPPED_OUTPUT,
            Severity.WARNING,
            f"{call.function} output stays inside {shown}{at_bound}, while {outside:.0%} of the targets lie outside "
            f"it, on {streak} sampled steps in a row, at {call.call_site}: {how}",
            where=call.where,
            evidence={
                "range_low": low,
                "range_high": high,
                "pinned_share": pinned,
                "targets_outside_share": outside,
                "sampled_steps": float(streak),
                "activation_in_graph": float(seen),
            },
            hint="remove the final activation of a regression head (use a linear output), or rescale the targets into "
            "the activation's range",
        )


add_to_presets(LossInputCheck, ("fast", "full"), order=40)
