"""TrainEvalModeChecker: mode-dependent modules (dropout, batch-norm, ...) in the wrong train/eval mode.

Lightning never calls ``.train()`` at fit start, so a model built or loaded in eval mode trains with
dropout off and frozen batch-norm statistics; a ``self.eval()`` left inside ``training_step`` does the
same from the next forward on; an overridden ``on_validation_model_eval`` (or a ``self.train()`` in
``validation_step``) evaluates with dropout on and lets batch-norm statistics leak from validation data.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_sentinel._eager import eager_while_observed, stop_observing
from lightning_sentinel._validate import require_bool, require_list, require_regex
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.findings import Severity

EVAL_DURING_TRAINING = "module-in-eval-during-training"
TRAIN_DURING_EVAL = "module-in-train-during-eval"

register(
    CheckSpec(
        EVAL_DURING_TRAINING,
        "TrainEvalModeChecker",
        Severity.WARNING,
        "a mode-dependent module (dropout, batch-norm, instance-norm with running stats, any forward reading "
        "`self.training`) is in eval mode inside a training step",
        "at batch start, during the forward and after the step, on the first batch and on check steps; deliberately "
        "frozen modules (all parameters requires_grad=False) and `allow` patterns exempt",
    ),
    CheckSpec(
        TRAIN_DURING_EVAL,
        "TrainEvalModeChecker",
        Severity.WARNING,
        "a mode-dependent module is in train mode during validation/test/predict",
        "first batch of every evaluation epoch; `allow` patterns exempt",
    ),
)

_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase,)


def _reads_training_flag(cls: type) -> bool:
    """Whether a user-defined module class's ``forward`` reads ``self.training`` (cached per class)."""
    cached = _READS_TRAINING.get(cls)
    if cached is None:
        forward = getattr(cls, "forward", None)
        try:
            source = inspect.getsource(forward) if forward is not None else ""
        except (OSError, TypeError):
            source = ""
        cached = _READS_TRAINING[cls] = "self.training" in source
    return cached


_READS_TRAINING: dict[type, bool] = {}


def is_mode_dependent(module: nn.Module) -> bool:
    """Whether ``module``'s own forward computes something different in train and eval mode.

    Dropout variants with ``p > 0``, batch-norm/instance-norm that track running statistics,
    ``MultiheadAttention`` with dropout, and user-defined modules whose ``forward`` reads
    ``self.training``. Containers are not: their children are judged themselves.

    Example:
        >>> is_mode_dependent(nn.Dropout(0.1)), is_mode_dependent(nn.Dropout(0.0))
        (True, False)
        >>> is_mode_dependent(nn.BatchNorm1d(4)), is_mode_dependent(nn.BatchNorm1d(4, track_running_stats=False))
        (True, False)
        >>> is_mode_dependent(nn.InstanceNorm1d(4)), is_mode_dependent(nn.Linear(2, 2))
        (False, False)
    """
    if isinstance(module, _DROPOUT_TYPES):
        return float(getattr(module, "p", 0.0)) > 0.0
    if isinstance(module, _NORM_TYPES):
        return bool(getattr(module, "track_running_stats", False))
    if isinstance(module, nn.MultiheadAttention):
        return float(module.dropout) > 0.0
    cls = type(module)
    if cls.__module__.startswith(("torch.", "lightning.", "lightning_sentinel.")):
        return False  # torch's own modules: the known mode-dependent ones are listed above
    return _reads_training_flag(cls)


def mode_dependent_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every mode-dependent submodule of ``root``, in registration order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5))
        >>> [name for name, _ in mode_dependent_modules(net)]
        ['1', '3']
    """
    return [(name, module) for name, module in root.named_modules() if name and is_mode_dependent(module)]


def deliberately_frozen(root: nn.Module, name: str) -> bool:
    """Whether the module called ``name`` inside ``root`` is deliberately frozen.

    A module with parameters is frozen when none of them requires a gradient. A module without
    parameters (dropout) belongs to its nearest ancestor that has parameters, and is frozen with it
    (a dropout inside a frozen backbone). A module no ancestor of which has parameters is not frozen.

    Example:
        >>> backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1)).requires_grad_(False)
        >>> net = nn.Sequential(backbone, nn.Dropout(0.1), nn.Linear(4, 2))
        >>> deliberately_frozen(net, "0.1"), deliberately_frozen(net, "0.2"), deliberately_frozen(net, "1")
        (True, True, False)
    """
    parts = name.split(".")
    for depth in range(len(parts), -1, -1):
        module = root.get_submodule(".".join(parts[:depth]))
        parameters = list(module.parameters())
        if parameters:
            return not any(parameter.requires_grad for parameter in parameters)
    return False


def misplaced_modules(modes: Iterable[tuple[str, bool]], expect_training: bool) -> list[str]:
    """Names whose ``training`` flag differs from ``expect_training``, in input order, each once.

    Example:
        >>> misplaced_modules([("drop", False), ("bn", True), ("drop", False)], expect_training=True)
        ['drop']
    """
    return list(dict.fromkeys(name for name, training in modes if training != expect_training))


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class TrainEvalModeChecker(SentinelCallback):
    """Reports mode-dependent modules in the wrong mode: ``module-in-eval-during-training`` and
    ``module-in-train-during-eval``.

    On the first training batch and the first batch of every check step (the suite's clock; on its own,
    steps 0, 1, 2, 4, 8, ..., then every ``every_n_steps``-th), the checker reads the
    ``training`` flag of every mode-dependent module (dropout with ``p > 0``, batch-/instance-norm with
    running statistics, ``MultiheadAttention`` with dropout, user modules whose ``forward`` reads
    ``self.training``) at batch start, when each one runs its forward (a pre-hook attached for that
    batch only) and after the step. That catches a model built or loaded in eval mode (Lightning
    never calls ``.train()`` at fit start) as well as a ``self.eval()`` inside ``training_step``.
    The first batch of every validation, test and predict epoch is checked the same way for modules
    left in train mode. Reading a Python flag costs no device work; batches in between cost nothing.

    Deliberately frozen modules are not reported in eval mode during training: a module all of whose
    parameters have ``requires_grad=False`` (a frozen batch-norm), and a parameter-less module (dropout)
    inside a frozen parent. Modules whose name matches one of the ``allow`` regular expressions
    (``re.search``) are never reported (e.g. Monte-Carlo dropout kept on at evaluation).

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        every_n_steps: the interval of its check steps after the dense start (the first batch always); an
            integer >= 1 (inside ``Sentinel``, the suite's clock replaces it).
        allow: regular expressions of module names never to report (a list of strings, not one string).
        use_hooks: attach forward pre-hooks on checked batches to see each module's mode when it runs
            (turn off for ``torch.compile``d models; the batch start/end checks remain).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.modes import TrainEvalModeChecker
        >>> checker = TrainEvalModeChecker(allow=[r"mc_dropout"])
        >>> trainer = pl.Trainer(callbacks=[checker], logger=False)
    """

    CHECKS = (EVAL_DURING_TRAINING, TRAIN_DURING_EVAL)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 20,
        allow: list[str] | None = None,
        use_hooks: bool = True,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps)
        patterns = [
            require_regex("allow", pattern) for pattern in require_list("allow", allow, str, "strings")
        ]
        self.allow = patterns
        self.use_hooks = require_bool("use_hooks", use_hooks)
        self._allow = [re.compile(pattern) for pattern in patterns]
        self._modules: list[tuple[str, nn.Module]] | None = None
        self._root: nn.Module | None = None
        self._handles: list[RemovableHandle] = []
        self._seen: list[tuple[str, bool]] = []  # (name, training) at batch start, per forward, after
        self._run_batches = 0  # training batches of this fit call
        self._checking = False

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "allow": self.allow}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        return None  # the cadence is the clock's, checkpointed with it

    # ------------------------------------------------------------------ helpers
    def _watched(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        if self._modules is None or self._root is not pl_module:
            self._root = pl_module
            self._modules = [
                (name, module)
                for name, module in mode_dependent_modules(pl_module)
                if not any(pattern.search(name) for pattern in self._allow)
            ]
        return self._modules

    def _start(self, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()  # a batch whose end hook never ran (skipped by on_train_batch_start) left some
        modules = self._watched(pl_module)
        self._seen = [(name, module.training) for name, module in modules]
        self._checking = True
        if self.use_hooks and modules:
            eager_while_observed(self)  # hooks added after compilation would be traced into the graph
            self._handles = [
                module.register_forward_pre_hook(self._make_hook(name)) for name, module in modules
            ]

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._seen.append((name, module.training))

        return hook

    def _stop(self, pl_module: pl.LightningModule) -> tuple[list[str], list[str]]:
        """Remove the hooks; return the modes seen at the start and everything seen (start, forward, end)."""
        self._remove_hooks()
        self._checking = False
        modules = self._watched(pl_module)
        start = self._seen[: len(modules)]
        seen = self._seen + [(name, module.training) for name, module in modules]
        self._seen = []
        return misplaced_modules(start, expect_training=True), misplaced_modules(seen, expect_training=True)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        stop_observing(self)

    @override
    def _release(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()
        self._checking = False
        self._seen = []

    # ------------------------------------------------------------------ training
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._modules = None
        self._run_batches = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._run_batches += 1
        due = self._due_batch(trainer)
        if EVAL_DURING_TRAINING in self.active_checks and (self._run_batches == 1 or due):
            self._start(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._checking:
            return
        self._run_training_check(trainer, pl_module, batch_idx)
        self._settle(trainer)

    def _run_training_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        at_start, anywhere = self._stop(pl_module)
        offenders = [name for name in anywhere if not deliberately_frozen(pl_module, name)]
        if not offenders:
            return
        from_start = [name for name in offenders if name in at_start]
        if from_start and self._run_batches == 1:
            when = "since training started (Lightning does not call .train() at fit start: the model was built or loaded in eval mode)"
            hint = (
                "call model.train() after loading the model (or in on_fit_start/on_train_start); to keep a part "
                "deliberately frozen, set requires_grad=False on its parameters or list it in `allow`"
            )
        elif from_start:
            when = f"at the start of training batch {batch_idx}"
            hint = (
                "something switched the model to eval mode and did not switch it back: look for self.eval() / "
                "model.eval() in training_step or a callback, and an overridden on_validation_model_train"
            )
        else:
            when = f"inside training_step (batch {batch_idx})"
            hint = (
                "remove the self.eval() / module.eval() call from training_step (use torch.no_grad() to skip "
                "gradients, not eval()); to freeze a module deliberately, also set requires_grad=False or add "
                "it to `allow`"
            )
        types = sorted({type(pl_module.get_submodule(name)).__name__ for name in offenders})
        total = len(self._watched(pl_module))
        self._report(
            trainer,
            EVAL_DURING_TRAINING,
            Severity.WARNING,
            f"{len(offenders)} of {total} mode-dependent modules ({', '.join(types)}) are in eval mode {when}: "
            f"{_listing(offenders)}; dropout is off and batch-norm uses stale running statistics",
            where=offenders[0],
            evidence={
                "modules_in_eval": len(offenders),
                "mode_dependent_modules": total,
                "batch_idx": batch_idx,
            },
            hint=hint,
            magnitude=len(offenders),
        )

    # ------------------------------------------------------------------ evaluation
    def _eval_batch_start(self, pl_module: pl.LightningModule, batch_idx: int) -> None:
        if batch_idx == 0 and TRAIN_DURING_EVAL in self.active_checks and not self._checking:
            self._start(pl_module)

    def _eval_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, batch_idx: int
    ) -> None:
        if not self._checking:
            return
        self._remove_hooks()
        self._checking = False
        modules = self._watched(pl_module)
        seen = self._seen + [(name, module.training) for name, module in modules]
        self._seen = []
        offenders = misplaced_modules(seen, expect_training=False)
        if offenders:
            types = sorted({type(pl_module.get_submodule(name)).__name__ for name in offenders})
            self._report(
                trainer,
                TRAIN_DURING_EVAL,
                Severity.WARNING,
                f"{len(offenders)} of {len(modules)} mode-dependent modules ({', '.join(types)}) are in train mode "
                f"during {stage} (batch {batch_idx}): {_listing(offenders)}; dropout stays on and batch-norm "
                f"normalises with batch statistics and updates its running statistics from {stage} data",
                where=offenders[0],
                evidence={"modules_in_train": len(offenders), "mode_dependent_modules": len(modules)},
                hint=f"do not call self.train() in {stage}_step or an eval-time hook; if on_{stage}_model_eval is "
                "overridden, it must call self.eval() (Lightning's default); list deliberate Monte-Carlo dropout "
                "in `allow`",
                magnitude=len(offenders),
                dedupe_as=f"{stage}:{offenders[0]}",
            )
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
        self._eval_batch_start(pl_module, batch_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, pl_module, "validation", batch_idx)

    @override
    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_start(pl_module, batch_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, pl_module, "test", batch_idx)

    @override
    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_start(pl_module, batch_idx)

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, pl_module, "predict", batch_idx)


add_to_presets(TrainEvalModeChecker, ("fast", "full"), order=40)
