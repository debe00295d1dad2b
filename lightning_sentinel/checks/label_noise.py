"""LabelNoiseMonitor: training labels that a model which fits the rest confidently contradicts.

On a sampled training batch the ``cross_entropy``/``nll_loss`` calls with one class index per sample
are intercepted; each is reduced on the device to three counts: labelled samples, samples whose label
is the model's top class, and samples whose label gets a probability below ``low_probability``. The
counts are read back once, at batch end, and pooled over the last sampled batches.

Only annotations are judged: targets of a language model (next-token or masked-token prediction over
the model's own input vocabulary) are text, whose uncertainty is the text's entropy, and tokens
flattened to ``(batch x time, classes)`` are positions of sequences, not independent samples.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
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
from lightning_sentinel.checks._torch_function import (
    IGNORE_INDEX_POSITION,
    LossCallRecorder,
    SampledLossCallCheck,
    call_argument,
    loss_call_site,
)
from lightning_sentinel.findings import Severity

NOISY_LABELS = "noisy-labels"

register(
    CheckSpec(
        NOISY_LABELS,
        "LabelNoiseMonitor",
        Severity.WARNING,
        "many training labels contradict a model that predicts most of the others right: annotation errors, a "
        "corrupted or misaligned label column",
        ">= 10% of the labels get a probability < 0.05, pooled over the newest >= 5 sampled batches (every 10th) "
        "and >= 256 labels where the model's top class is the label for >= 50% of the samples; one label per "
        "sample, >= 3 classes; language-model targets (classes = the input vocabulary) and tokens flattened "
        "from sequences not judged",
    )
)


# ---------------------------------------------------------------------- pure rule
@dataclass(frozen=True)
class LabelCounts:
    """What the loss calls of one or more sampled batches say about their labels.

    Args:
        labelled: samples with a label (``ignore_index`` left out).
        predicted: of those, samples whose label is the model's top class.
        contradicted: of those, samples whose label gets a probability below ``low_probability``.
        batches: sampled batches counted.
    """

    labelled: int
    predicted: int
    contradicted: int
    batches: int = 1

    @property
    def accuracy(self) -> float:
        """Share of the labels that are the model's top class."""
        return self.predicted / self.labelled if self.labelled else 0.0

    @property
    def contradicted_share(self) -> float:
        """Share of the labels given a probability below ``low_probability``."""
        return self.contradicted / self.labelled if self.labelled else 0.0


def pool_recent(history: Sequence[LabelCounts], min_batches: int, min_samples: int) -> LabelCounts | None:
    """The newest batches of ``history`` (oldest first) pooled: as few as hold ``min_batches`` batches and
    ``min_samples`` labels, or ``None`` while the history is too short.

    Example:
        >>> history = [LabelCounts(64, 48, 11)] * 5
        >>> pooled = pool_recent(history, min_batches=5, min_samples=256)
        >>> pooled.batches, pooled.labelled, round(pooled.contradicted_share, 3)
        (5, 320, 0.172)
        >>> pool_recent([LabelCounts(8, 7, 1)] * 31, min_batches=5, min_samples=256) is None  # small batches
        True
    """
    labelled = predicted = contradicted = batches = 0
    for counts in reversed(history):
        labelled += counts.labelled
        predicted += counts.predicted
        contradicted += counts.contradicted
        batches += counts.batches
        if batches >= min_batches and labelled >= min_samples:
            return LabelCounts(labelled, predicted, contradicted, batches)
    return None


# autograd nodes that flatten (view/reshape) a tensor and save the shape they were given
_FLATTENING_NODES = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "_ReshapeAliasBackward")
# nodes between a flattening and the loss that keep the element layout (a dtype cast, a copy)
_LAYOUT_KEEPING_NODES = ("ToCopyBackward", "CloneBackward")


def _merges_positions(sizes: Sequence[int], has_class_dim: bool) -> bool:
    """Whether a tensor of shape ``sizes`` (before flattening) has positions besides its first (batch)
    dimension: ``(batch, time, C)`` scores or ``(batch, time)`` targets, not ``(N, 1, C)`` or ``(N, 1)``."""
    inner = list(sizes)[1:-1] if has_class_dim else list(sizes)[1:]
    return any(int(size) > 1 for size in inner)


def flattened_from_sequence(scores: Tensor, targets: Tensor, max_depth: int = 4) -> bool:
    """Whether ``(N, C)`` scores (or ``(N,)`` targets) are a sequence model's outputs flattened from
    ``(batch, time, C)``, as Hugging Face models and most language-model loops do before
    ``cross_entropy``: the tensor is a flat view of a tensor with more than one position per row, or its
    autograd graph shows a view/reshape of one (behind a dtype cast or a copy). Labels kept as ``(N, 1)``
    and viewed as ``(N,)`` are one label per sample, and a selected position (``logits[:, 0]``) is not a
    flattening. No device work.

    Example:
        >>> logits = torch.randn(4, 6, 10, requires_grad=True)
        >>> labels = torch.randint(0, 10, (4, 6))
        >>> flattened_from_sequence(logits.view(-1, 10), labels.view(-1))
        True
        >>> flattened_from_sequence(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1))  # a copy
        True
        >>> flattened_from_sequence(torch.randn(24, 10, requires_grad=True) * 2, torch.randint(0, 10, (24, 1)).view(-1))
        False
    """
    for tensor, has_class_dim in ((scores, True), (targets, False)):
        base = tensor._base
        if (
            base is not None
            and base.dim() >= (3 if has_class_dim else 2)
            and base.numel() == tensor.numel()
            and _merges_positions(base.shape, has_class_dim)
        ):
            return True
    node = scores.grad_fn
    for _ in range(max_depth):
        if node is None:
            return False
        name = node.name()
        if name.startswith(_FLATTENING_NODES):
            sizes = getattr(node, "_saved_self_sym_sizes", None)
            return sizes is not None and len(sizes) >= 3 and _merges_positions(sizes, True)
        if not name.startswith(_LAYOUT_KEEPING_NODES):
            return False
        inputs = [next_node for next_node, _ in node.next_functions if next_node is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def vocabulary_sizes(module: torch.nn.Module) -> frozenset[int]:
    """The sizes (``num_embeddings``) of every ``nn.Embedding`` in ``module``: a classifier whose number of
    classes is one of them predicts tokens of its own input vocabulary (a language model).

    Example:
        >>> vocabulary_sizes(torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)))
        frozenset({50})
    """
    return frozenset(
        layer.num_embeddings for layer in module.modules() if isinstance(layer, torch.nn.Embedding)
    )


# ---------------------------------------------------------------------- device statistics
def label_counts(scores: Tensor, targets: Tensor, ignore_index: int, low_probability: float) -> Tensor:
    """``[labelled, predicted, contradicted]`` of ``(N, C)`` class scores against ``(N,)`` class indices.

    ``log_softmax`` turns logits into log-probabilities and leaves log-probabilities (``nll_loss``'s
    input) as they are, so both losses are read the same way.

    Example:
        >>> scores = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
        >>> label_counts(scores, torch.tensor([0, 2, -100]), -100, 0.05).tolist()
        [2.0, 1.0, 1.0]
    """
    log_probabilities = scores.detach().float().log_softmax(1)
    classes = log_probabilities.shape[1]
    valid = (targets != ignore_index) & (targets >= 0) & (targets < classes)
    labels = targets.clamp(0, classes - 1).unsqueeze(1)
    label_log_probability = log_probabilities.gather(1, labels).squeeze(1)
    predicted = (log_probabilities.argmax(1, keepdim=True) == labels).squeeze(1) & valid
    contradicted = (label_log_probability < math.log(low_probability)) & valid
    return torch.stack([valid.sum(), predicted.sum(), contradicted.sum()]).float()


# ---------------------------------------------------------------------- the interception
@dataclass
class LabelCall:
    """One intercepted classification loss call and its device counts."""

    where: str
    call_site: str
    counts: Tensor


class _LabelInterceptor(LossCallRecorder):
    """Records the label counts of ``cross_entropy``/``nll_loss`` calls with one class index per sample."""

    intercepted = {F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss"}

    def __init__(
        self,
        module_names: dict[int, str],
        low_probability: float,
        min_classes: int,
        vocabularies: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(module_names)
        self.low_probability = low_probability
        self.min_classes = min_classes
        self.vocabularies = vocabularies
        self.calls: list[LabelCall] = []

    @override
    def record(
        self, func: Callable[..., Any], label: str, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        scores = call_argument(args, kwargs, 0, "input", None)
        targets = call_argument(args, kwargs, 1, "target", None)
        if not (
            isinstance(scores, Tensor)
            and isinstance(targets, Tensor)
            and scores.is_floating_point()
            and not targets.is_floating_point()  # class probabilities (mixup, distillation) are not labels
            and scores.dim() == 2  # one label per sample: token or pixel labels are left alone
            and targets.dim() == 1
            and scores.shape[0] == targets.shape[0] > 0
            and scores.shape[1] >= self.min_classes
        ):
            return
        # a language model's targets are text (their uncertainty is the text's entropy, not annotation
        # noise), and tokens flattened from sequences are not independent samples: neither is judged
        if scores.shape[1] in self.vocabularies or flattened_from_sequence(scores, targets):
            return
        ignore_index = call_argument(args, kwargs, IGNORE_INDEX_POSITION, "ignore_index", -100)
        where, site = loss_call_site(label, self.module_names)
        with torch.no_grad():
            counts = label_counts(scores, targets.to(scores.device), int(ignore_index), self.low_probability)
        self.calls.append(LabelCall(where, site, counts))


# ---------------------------------------------------------------------- the callback
class LabelNoiseMonitor(SampledLossCallCheck[_LabelInterceptor]):
    """Warns when many training labels contradict a model that predicts most of the others right.

    On every ``every_n_steps``-th training batch the ``cross_entropy``/``nll_loss`` calls (the
    ``nn.CrossEntropyLoss``/``nn.NLLLoss`` modules call them) that receive ``(N, C)`` class scores and
    ``(N,)`` class indices, ``C >= min_classes``, are reduced on the device to three counts; they
    are read back once, at batch end. A batch where the label is the model's top class for at least
    ``min_accuracy`` of the samples (the model has learned the task) is kept, per loss call; the
    newest kept batches are pooled, at least ``window`` of them and at least ``min_samples`` labels
    (small batches pool more of them). When at least ``max_share`` of the pooled labels get a
    probability below ``low_probability``, the labels contradict what the model learned from the
    rest: ``noisy-labels`` (warning), once per loss call.

    Why it works: a model that learned the task gives a correct label a high probability, and an
    ambiguous sample a spread-out one; only a label that disagrees with every similar sample (a
    wrong label) gets almost none. With uniform label noise ``r`` over ``C`` classes a model
    calibrated to it still gives a wrong label about ``r / (C - 1)``, so at the default
    ``low_probability`` noise is seen from about 8 classes at 30% noise (10 classes: up to ~45%);
    two classes are never judged (noise there is indistinguishable from a hard task). A subset of
    the data with its classes systematically swapped is learned as a second mode and is not seen;
    nor are labels the model has memorised (long training on a small set).

    What the task can reach: a model calibrated to 30% uniform noise expects about as many of its labels
    below ``low_probability`` as it sees (measured on the ``tcl-30`` digits CNN: 16% seen, 13% expected
    from its own predicted probabilities), so nothing in the model's own spread tells annotation noise
    from a task whose targets are uncertain by nature. That is decided by what the targets are: the
    targets of a language model are never judged. A loss call is a language model's when its number of
    classes is the size of an ``nn.Embedding`` of the model (next-token or masked-token prediction over
    the input vocabulary, as ``GPT2LMHeadModel`` or ``BertForMaskedLM``), or when its ``(N, C)`` scores
    are flattened from ``(batch, time, C)`` (seen as a view of a 3-D tensor or, behind a copy, in the
    autograd graph, as Hugging Face models flatten before ``cross_entropy``): positions of one sequence
    are not independent samples, and next tokens are uncertain by nature (a healthy tiny GPT-2 on a
    synthetic language gives 46% of its correct next tokens p < 0.05 at 53% top-1 accuracy).

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the healthy run nearest to
    alarming gave 2.7% of its pooled labels a probability < 0.05 (``warmup-cosine-restarts-sgd``, seed 1;
    threshold 10%, 3.7x); with 30% of the training labels moved to another class the digits CNN
    (DeepCrime ``tcl-30``) reaches 17% and a GRU reading the digits row by row 16% (steps 51 and 61).

    Mixup and CutMix written as two losses on one prediction (``lam * ce(out, y_a) + (1 - lam) *
    ce(out, y_b)``) stay quiet: the label set of the smaller share is not the model's top class for
    most samples, so its batches never count, and near ``lam = 0.5`` both labels keep a fair
    probability. Probability targets, token-level and pixel-level labels (``(N, C, ...)`` scores, or
    ``(N, C)`` flattened from sequences) and language-model targets are never judged.

    ``where`` is the loss module's name (e.g. ``"loss"``) or ``"F.cross_entropy in <function>"``.

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        every_n_steps: sample every n-th training batch (micro-batch); an integer >= 1.
        warmup_steps: training batches to skip before the first sample; an integer >= 0.
        low_probability: a label given less than this probability is contradicted; in (0, 1).
        max_share: share of contradicted labels over the window that is reported; in (0, 1].
        min_accuracy: share of labels that must be the model's top class for a batch to count; in (0, 1].
        window: fewest sampled batches pooled; an integer >= 1.
        min_samples: fewest labels pooled; an integer >= 1.
        min_classes: fewest classes judged; an integer >= 3.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import LabelNoiseMonitor
        >>> monitor = LabelNoiseMonitor(max_share=0.2, on_detect="stop")
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
    """

    CHECKS = (NOISY_LABELS,)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 10,
        warmup_steps: int = 0,
        low_probability: float = 0.05,
        max_share: float = 0.1,
        min_accuracy: float = 0.5,
        window: int = 5,
        min_samples: int = 256,
        min_classes: int = 3,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        self.low_probability = require_number("low_probability", low_probability, above=0, below=1)
        self.max_share = require_number("max_share", max_share, above=0, at_most=1)
        self.min_accuracy = require_number("min_accuracy", min_accuracy, above=0, at_most=1)
        self.window = require_int("window", window)
        self.min_samples = require_int("min_samples", min_samples)
        self.min_classes = require_int("min_classes", min_classes, minimum=3)
        self._history: dict[str, deque[LabelCounts]] = {}
        self._vocabularies: frozenset[int] | None = None

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {
            **super()._state_key_settings(),
            "low_probability": self.low_probability,
            "max_share": self.max_share,
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        history = {
            where: [[counts.labelled, counts.predicted, counts.contradicted] for counts in kept]
            for where, kept in self._history.items()
        }
        return {**super()._extra_state(), "history": history}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self._history = {
            str(where): self._new_history(LabelCounts(*map(int, counts)) for counts in kept)
            for where, kept in state.get("history", {}).items()
        }

    def _new_history(self, counts: Iterable[LabelCounts] = ()) -> deque[LabelCounts]:
        # enough batches for the window, or for min_samples labels from batches of 4
        return deque(counts, maxlen=max(self.window, -(-self.min_samples // 4)))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._vocabularies = vocabulary_sizes(pl_module)

    @override
    def _new_recorder(self, module_names: dict[int, str]) -> _LabelInterceptor:
        vocabularies = self._vocabularies if self._vocabularies is not None else frozenset()
        return _LabelInterceptor(module_names, self.low_probability, self.min_classes, vocabularies)

    @override
    def _judge_calls(self, trainer: pl.Trainer, recorder: _LabelInterceptor, batch_idx: int) -> None:
        calls = recorder.calls
        if not calls:
            return
        device = calls[0].counts.device
        self._read(  # the one host read (batched with the suite's other reads of this hook)
            trainer,
            torch.stack([call.counts.to(device) for call in calls]),
            lambda flat: self._judge_counts(trainer, calls, batch_idx, flat),
        )

    def _judge_counts(self, trainer: pl.Trainer, calls: list[Any], batch_idx: int, flat: list[float]) -> None:
        values = [
            flat[i : i + 3] for i in range(0, len(flat), 3)
        ]  # (labelled, predicted, contradicted) per call
        for call, (labelled, predicted, contradicted) in zip(calls, values, strict=True):
            counts = LabelCounts(int(labelled), int(predicted), int(contradicted))
            if counts.labelled == 0 or counts.accuracy < self.min_accuracy:
                continue
            history = self._history.setdefault(call.where, self._new_history())
            history.append(counts)
            pooled = pool_recent(history, self.window, self.min_samples)
            if pooled is not None and pooled.contradicted_share >= self.max_share:
                self._report_noise(trainer, call, pooled, batch_idx)
        self._settle(trainer)

    def _report_noise(
        self, trainer: pl.Trainer, call: LabelCall, pooled: LabelCounts, batch_idx: int
    ) -> None:
        share = pooled.contradicted_share
        self._report(
            trainer,
            NOISY_LABELS,
            Severity.WARNING,
            f"{share:.0%} of the training labels of the last {pooled.batches} sampled batches ({pooled.labelled} "
            f"labels, up to batch {batch_idx}) get a probability below {self.low_probability:g} from a model whose "
            f"top class is the label for {pooled.accuracy:.0%} of them, at {call.call_site}: these labels "
            "contradict what the model learned from the other samples",
            where=call.where,
            evidence={
                "contradicted_share": share,
                "accuracy": pooled.accuracy,
                "labels": float(pooled.labelled),
                "sampled_batches": float(pooled.batches),
                "low_probability": self.low_probability,
            },
            hint="look at the training samples with the highest loss (cross_entropy with reduction='none') and their "
            "labels; check how labels are produced and joined to the inputs (an off-by-one or unsorted join, a "
            "class-index mapping that differs between sources); if the labels are noisy by nature, try label "
            "smoothing or a noise-robust loss, or clean them with confident learning",
            magnitude=share,
        )


add_to_presets(LabelNoiseMonitor, ("fast", "full"), order=45)
