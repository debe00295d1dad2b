"""``SentinelCallback``: what every check shares.

A check subclasses :class:`SentinelCallback`, decides in its hooks *whether* to look, computes its
statistics on the device, and calls :meth:`SentinelCallback._report` for each finding and
:meth:`SentinelCallback._settle` once at the end of each check run. The base class takes care of

- the ``on_detect`` policy (``warn`` / ``stop`` / ``raise``), with the stop or raise decision shared
  across ranks so that all of them stop together and none hangs;
- de-duplication: one (check, where) is reported once, again only if it gets worse;
- the per-trainer record (:func:`lightning_sentinel.findings`), ``findings.json`` and the
  end-of-fit report;
- the cadence settings ``every_n_steps`` and ``warmup_steps``;
- isolation: a check whose own code fails warns once, naming itself, and switches itself off.

Example:
    >>> from lightning_sentinel.base import SentinelCallback
    >>> class AlwaysQuiet(SentinelCallback):
    ...     CHECKS = ()
    >>> AlwaysQuiet(on_detect="warn").on_detect
    'warn'
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._validate import require_choice, require_int, require_number
from lightning_sentinel.engine import CheckClock, DeviceReads, ends_cycle, optimizer_cycle
from lightning_sentinel.findings import (
    Finding,
    FindingLog,
    SentinelError,
    SentinelWarning,
    Severity,
    finding_log,
)
from lightning_sentinel.report import findings_markdown, format_report, write_scalar_layout

OnDetect = Literal["warn", "stop", "raise"]
ON_DETECT_CHOICES: tuple[str, ...] = ("warn", "stop", "raise")

# Hooks whose exceptions are caught and turned into "this check disabled itself".
_GUARDED_HOOKS = frozenset(
    name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown")
)
# Hooks that still run after a check disabled itself (they release resources).
_CLEANUP_HOOKS = frozenset({"teardown", "on_exception", "on_fit_end"})


# Hooks after which, under DDP, the last sentinel callback of the trainer runs the shared stop/raise
# agreement (see ``SentinelCallback._sync_point``): every rank calls them the same number of times.
_SYNC_HOOKS = frozenset({"on_train_start", "on_train_batch_end", "on_validation_end", "on_train_end"})


def _guard_hook(name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
    sync = name in _SYNC_HOOKS
    starts_fit = name == "setup"

    @functools.wraps(hook)
    def guarded(self: SentinelCallback, *args: Any, **kwargs: Any) -> Any:
        result = None
        outermost = self.__dict__.get("_hook_depth", 0) == 0
        if starts_fit and outermost and _stage(args, kwargs) == "fit":
            self._start_fit()  # a fresh judgement for every fit; a resume's state is loaded after this
        if not self._failed or name in _CLEANUP_HOOKS:
            self.__dict__["_hook_depth"] = self.__dict__.get("_hook_depth", 0) + 1
            try:
                result = hook(self, *args, **kwargs)
            except (SentinelError, SentinelWarning):  # a raise policy, or a warnings filter set to "error"
                raise
            except Exception as error:  # a check must never kill the user's training
                self._disable_after_error(_trainer_of(args, kwargs), name, error)
            finally:
                self.__dict__["_hook_depth"] -= 1
        if sync and self._sync_log is not None:  # a disabled check still takes part
            self._sync_point(args[0] if args else kwargs["trainer"], name)
        return result

    return guarded


def _stage(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``stage`` argument of a ``setup(trainer, pl_module, stage)`` call."""
    return kwargs.get("stage", args[2] if len(args) > 2 else None)


def _trainer_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> pl.Trainer | None:
    """The trainer a hook was called with (every Lightning hook takes it first)."""
    trainer = kwargs.get("trainer", args[0] if args else None)
    return trainer if isinstance(trainer, pl.Trainer) else None


# Private attributes that are not per-fit state: never reset between fits (a shared clock is reset by its owner).
_KEPT_ACROSS_FITS = frozenset(
    {"_state_key_cache", "_hook_depth", "_init_depth", "_pristine", "_clock", "_own_clock", "_reads"}
)


def _wrap_init(init: Callable[..., None]) -> Callable[..., None]:
    """``__init__`` that, when the outermost constructor returns, keeps a copy of the per-fit state."""

    @functools.wraps(init)
    def init_and_snapshot(self: SentinelCallback, *args: Any, **kwargs: Any) -> None:
        depth = self.__dict__.get("_init_depth", 0)
        self.__dict__["_init_depth"] = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            self.__dict__["_init_depth"] = depth
        if depth == 0:
            self.__dict__["_pristine"] = _copy_run_state(self.__dict__)

    init_and_snapshot.__sentinel_snapshot__ = True  # type: ignore[attr-defined]
    return init_and_snapshot


def _copy_run_state(attributes: dict[str, Any]) -> dict[str, Any]:
    """Deep copies of the private attributes (the per-fit state; public ones are settings)."""
    state = {}
    for attribute, value in attributes.items():
        if attribute.startswith("_") and attribute not in _KEPT_ACROSS_FITS:
            try:
                state[attribute] = copy.deepcopy(value)
            except Exception:  # an object that cannot be copied is kept as it is
                state[attribute] = value
    return state


def validate_on_detect(on_detect: str | None, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``on_detect`` is one of ``warn``, ``stop``, ``raise``."""
    require_choice("on_detect", on_detect, ON_DETECT_CHOICES, allow_none=allow_none)


def validate_positive_int(argument: str, value: int, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is an int >= ``minimum`` (``TypeError`` too for a non-integer)."""
    require_int(argument, value, minimum=minimum)


def validate_positive_float(argument: str, value: float) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a finite number > 0 (``TypeError`` too for a non-number)."""
    require_number(argument, value, above=0)


class SentinelCallback(Callback):
    """Base class of every lightning-sentinel check.

    Args:
        on_detect: what to do with a finding: ``"warn"`` emits a :class:`SentinelWarning` on rank
            zero; ``"stop"`` also stops the run on every rank together (``trainer.should_stop``);
            ``"raise"`` raises :class:`SentinelError` on every rank, after the ranks agreed.
        every_n_steps: run the check on every n-th optimizer step this callback observes (an integer >= 1).
        warmup_steps: do not judge (but may measure) during the first optimizer steps (an integer >= 0).

    Every setting of every check is validated here, at construction: a value of the wrong type raises
    ``TypeError`` (:class:`~lightning_sentinel._validate.ArgumentTypeError`, also a ``ValueError``), a
    value out of range ``ValueError``; both name the argument, the value and what is allowed.

    Subclasses list their check ids in ``CHECKS`` and put every setting that tells two instances
    apart into :meth:`_state_key_settings`. Settings are fixed once the callback is in use.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import GradientNormMonitor
        >>> trainer = pl.Trainer(callbacks=[GradientNormMonitor(on_detect="stop")], logger=False)
    """

    CHECKS: ClassVar[tuple[str, ...]] = ()
    FOLLOWS_SUITE_CLOCK: ClassVar[bool] = True  # inside ``Sentinel``, look on the suite's check steps
    WRITES_SCALAR_LAYOUT: ClassVar[bool] = False  # writes TensorBoard's custom scalar layout itself
    # also look on the clock's early check steps (1, 2, 4, 8 after the first): checks that need no patience
    LOOKS_EARLY: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__sentinel_snapshot__", False):
            cls.__init__ = _wrap_init(init)  # type: ignore[method-assign]
        for name in _GUARDED_HOOKS:
            hook = cls.__dict__.get(name)
            if hook is not None and not getattr(hook, "__sentinel_guarded__", False):
                guarded = _guard_hook(name, hook)
                guarded.__sentinel_guarded__ = True  # type: ignore[attr-defined]
                setattr(cls, name, guarded)

    def __init__(self, on_detect: OnDetect = "warn", every_n_steps: int = 1, warmup_steps: int = 0) -> None:
        self.on_detect: str = require_choice("on_detect", on_detect, ON_DETECT_CHOICES)
        self.every_n_steps = require_int("every_n_steps", every_n_steps)
        self.warmup_steps = require_int("warmup_steps", warmup_steps, minimum=0)
        # when this check looks: its own clock, or the suite's (``Sentinel`` shares one among its checks)
        self._clock = CheckClock(self.every_n_steps, self.warmup_steps)
        self._own_clock = True
        self._reads: DeviceReads | None = None  # the suite's batched read of a hook, or None: read at once
        self._last_due_cycle = -1
        self.disabled_checks: set[str] = set()
        self._failed = False
        self._reported: dict[tuple[str, str | None], tuple[int, float]] = {}
        self._pending_stop = False
        self._pending_raise: Finding | None = None
        self._restored_findings: list[Finding] = []
        self._own_findings: list[Finding] = []
        self._next_log_step: dict[str, int] = {}  # per metric set: the step from which it is written again
        self._sync_log: FindingLog | None = None  # set under DDP: the trainer's log holds the members

    # ------------------------------------------------------------------ identity and state
    def _state_key_settings(self) -> dict[str, Any]:
        """The settings that tell two instances of this callback apart (override to add more)."""
        return {"on_detect": self.on_detect, "every_n_steps": self.every_n_steps}

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this on every hook call: build it once (settings are fixed after construction)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None:
            cached = self.__dict__["_state_key_cache"] = self._generate_state_key(
                **self._state_key_settings()
            )
        return cached

    @property
    def active_checks(self) -> tuple[str, ...]:
        """The check ids this callback reports, less the disabled ones."""
        return tuple(check for check in self.CHECKS if check not in self.disabled_checks)

    def _extra_state(self) -> dict[str, Any]:
        """Check-specific state to checkpoint (override)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned (override)."""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "clock": self._clock.state_dict() if self._own_clock else None,
            "reported": [
                [check, where, rank, magnitude]
                for (check, where), (rank, magnitude) in self._reported.items()
            ],
            # restored findings not yet re-added at on_train_start are kept too (a save right after a load)
            "findings": [finding.to_dict() for finding in [*self._own_findings, *self._restored_findings]],
            "extra": self._extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reported = {
            (check, where): (int(rank), float(magnitude))
            for check, where, rank, magnitude in state_dict["reported"]
        }
        self._restored_findings = [Finding.from_dict(record) for record in state_dict.get("findings", [])]
        if self._own_clock and state_dict.get("clock"):
            self._clock.load_state_dict(state_dict["clock"])
        self._load_extra_state(state_dict.get("extra", {}))

    # ------------------------------------------------------------------ lifecycle shared by all checks
    def _start_fit(self) -> None:
        """Forget everything the previous fit left: each fit is judged afresh.

        Called when ``setup(stage="fit")`` starts, before Lightning restores a checkpoint's callback
        state (``load_state_dict``), so a resume keeps what it loads while a reused instance (a
        notebook, a sweep, ``trainer.fit`` called again) starts as if new. Every private attribute
        made by the constructor (the per-fit state, by this project's convention: checks create all
        their state in ``__init__``) is set back to a copy of its value right after construction;
        public attributes are settings and stay.
        """
        pristine = self.__dict__.get("_pristine")
        if pristine is not None:
            self.__dict__.update(_copy_run_state(pristine))
        if self.__dict__.get("_own_clock", True) and "_clock" in self.__dict__:
            self._clock.reset()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log = finding_log(trainer)
        if stage == "fit":
            log.report_printed = False
        # ``trainer.log_dir`` is a collective (a broadcast): every rank resolves it here, in lockstep,
        # so that rank zero can later write findings.json even from an exception handler.
        if log.directory is None:
            log.directory = trainer.log_dir or trainer.default_root_dir
        log.checks_run.update(self.active_checks)
        if stage == "fit":
            self._emit(trainer, "TensorBoard's custom scalar layout", write_scalar_layout, trainer)
        self._sync_log = log if trainer.world_size > 1 else None
        if self._sync_log is not None and self not in log.members:
            log.members.append(self)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored_findings:
            log = finding_log(trainer)
            for finding in self._restored_findings:
                if finding not in log.findings:
                    log.add(finding)
                    self._own_findings.append(finding)
            self._restored_findings = []

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Nothing here; under DDP the guard runs the shared stop/raise agreement after it."""

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing here; under DDP the guard runs the shared stop/raise agreement after it."""

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing here; under DDP the guard shares every rank's findings with rank zero after it."""

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, print_report=True)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release(trainer)
        self._finish(trainer, print_report=not isinstance(exception, SentinelError))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(trainer)

    def _release(self, trainer: pl.Trainer) -> None:
        """Remove hooks and other resources (override; must be safe to call twice)."""

    def _finish(self, trainer: pl.Trainer, print_report: bool) -> None:
        """Write findings.json and, once per fit, print the report (rank zero). Never raises."""
        if trainer.global_rank != 0:
            return
        log = finding_log(trainer)
        if not log.checks_run and not log.findings:
            return  # nothing ran in this process (e.g. the launcher of ddp_spawn): nothing true to say
        path = log.write()
        if print_report and not log.report_printed:
            log.report_printed = True
            report = format_report(
                log.findings, sorted(log.checks_run), path, unwatched=log.unwatched, cost=log.cost_note
            )
            self._emit(trainer, "the console", rank_zero_info, report)

    def _emit(self, trainer: pl.Trainer, output: str, write: Callable[..., Any], *args: Any) -> None:
        """Call ``write(*args)``; if it fails, say so once per output and go on (recording never stops detection)."""
        log = finding_log(trainer)
        if not log.can_write(output):
            return
        try:
            write(*args)
        except Exception as error:
            log.output_failed(output, error, f"nothing more is written to {output} in this run")

    # ------------------------------------------------------------------ cadence
    def _use_clock(self, clock: CheckClock, reads: DeviceReads | None) -> None:
        """Look on ``clock``'s check steps and read through ``reads`` (``Sentinel`` calls this for its checks).

        A callback that keeps a cadence of its own (``FOLLOWS_SUITE_CLOCK = False``: a logger of
        histograms every few hundred steps) keeps it, and reads through ``reads`` only.
        """
        if not self.FOLLOWS_SUITE_CLOCK:
            self._reads = reads
            return
        self._clock, self._own_clock, self._reads = clock, False, reads
        self.every_n_steps, self.warmup_steps = clock.every_n_steps, clock.warmup_steps

    def _due(self, trainer: pl.Trainer) -> bool:
        """Whether the current training batch belongs to a check step of this check's clock."""
        due = self._clock.due(trainer) and (self.LOOKS_EARLY or not self._clock.early)
        self.every_n_steps = self._clock.every_n_steps  # a budget may have stretched the suite's clock
        return due

    def _due_batch(self, trainer: pl.Trainer) -> bool:
        """Whether this training batch is the first micro-batch this check sees of a check step.

        For the checks that sample whole batches (inputs, activations, loss calls): under gradient
        accumulation a check step has several micro-batches, and one of them is enough.
        """
        if not self._due(trainer):
            return False
        cycle = optimizer_cycle(trainer)
        if cycle == self._last_due_cycle:
            return False
        self._last_due_cycle = cycle
        return True

    def _read(self, trainer: pl.Trainer, tensor: Tensor, then: Callable[[list[float]], None]) -> None:
        """Read ``tensor`` back and call ``then`` with its values (a flat list of floats).

        Inside ``Sentinel`` the read is batched with every other check's of the same hook (one host
        read per hook, see :class:`~lightning_sentinel.engine.DeviceReads`) and ``then`` runs at the
        end of the hook; on its own the check reads at once. ``then`` should finish with
        :meth:`_settle`, so a stop or raise acts on what it found.
        """
        if self._reads is None:
            then(tensor.detach().reshape(-1).to(torch.float32).tolist())
        else:
            self._reads.request(tensor, then, owner=self)

    def _is_due(self, step_index: int) -> bool:
        """Whether the ``step_index``-th observed optimizer step (0-based) is a check step."""
        return step_index >= self.warmup_steps and (step_index - self.warmup_steps) % self.every_n_steps == 0

    # ------------------------------------------------------------------ reporting
    def _report(
        self,
        trainer: pl.Trainer,
        check: str,
        severity: Severity,
        message: str,
        *,
        where: str | None = None,
        evidence: dict[str, float] | None = None,
        hint: str = "",
        magnitude: float = 0.0,
        dedupe_as: str | None = None,
        step: int | None = None,
    ) -> Finding | None:
        """Record a finding unless it is disabled or a repeat; apply the ``on_detect`` policy.

        ``magnitude`` grows with how bad the finding is: a (check, where) already reported is reported
        again only when its severity rises or its magnitude is 10x the last one reported. Pass
        ``dedupe_as`` to de-duplicate on another key than ``where`` (e.g. one key for a whole model).
        ``step``: the optimizer step the numbers come from, when they were read later (default: now).
        Info findings are recorded and warned but never trigger ``stop`` or ``raise``.
        """
        if check not in self.CHECKS:
            raise AssertionError(f"{type(self).__name__} reported {check!r}, which is not in its CHECKS")
        if check in self.disabled_checks:
            return None
        key = (check, where if dedupe_as is None else dedupe_as)
        previous = self._reported.get(key)
        if previous is not None:
            previous_rank, previous_magnitude = previous
            worse = severity.rank > previous_rank or (
                math.isfinite(magnitude)
                and magnitude > 0
                and magnitude >= 10 * max(previous_magnitude, 1e-300)
            )
            if not worse:
                return None
        self._reported[key] = (severity.rank, magnitude)
        finding = Finding(
            check=check,
            severity=severity,
            message=message,
            step=int(trainer.global_step) if step is None else step,
            epoch=int(trainer.current_epoch),
            where=where,
            evidence={name: float(value) for name, value in (evidence or {}).items()},
            hint=hint,
        )
        finding_log(trainer).add(finding)
        self._own_findings.append(finding)
        # the policy first: whatever happens to the outputs below, a stop or raise still acts
        if severity is not Severity.INFO:  # advice (or a check that could not run) never stops or fails a run
            if self.on_detect == "stop":
                self._pending_stop = True
            elif self.on_detect == "raise" and self._pending_raise is None:
                self._pending_raise = finding
        if trainer.global_rank == 0:
            warnings.warn(
                SentinelWarning(finding.format() + (f" Hint: {hint}" if hint else "")), stacklevel=2
            )
            self._log_findings_text(trainer)
        return finding

    def _settle(self, trainer: pl.Trainer) -> None:
        """Act on this check run's stop/raise decision.

        Call at the end of every check run. With one process the decision is applied at once. Under
        DDP nothing happens here: the decision stays pending until the next sync point
        (:meth:`_sync_point`), where all ranks agree on it, so that the collective schedule never
        depends on what a check found or whether it failed on one rank.
        """
        if self.on_detect == "warn" or self._sync_log is not None:
            return
        if self.on_detect == "stop":
            if self._pending_stop:
                self._pending_stop = False
                trainer.should_stop = True
                self._finish(trainer, print_report=False)
            return
        finding, self._pending_raise = self._pending_raise, None
        if finding is not None:
            self._finish(trainer, print_report=False)
            raise SentinelError(finding)

    def _sync_point(self, trainer: pl.Trainer, hook: str) -> None:
        """Under DDP, the one collective that shares every check's stop/raise decision across ranks.

        Only the trainer's last sentinel callback runs it, after its ``on_train_start``,
        ``on_validation_end`` and ``on_train_end`` and after the ``on_train_batch_end`` that ends a check
        step of a check that stops or raises (the suite's clock, or the check's own), so
        every rank reaches it at the same points whatever the checks found, and a check that disabled
        itself after an error still takes part. When any rank has something to act on (and always at
        ``on_train_end``) the ranks also exchange their new findings, so that rank zero records and
        writes what any rank found. Then all stop together, or all raise the first finding.
        """
        log = self._sync_log
        if log is None or not log.members or log.members[-1] is not self:
            return
        acting = [member for member in log.members if member.on_detect != "warn"]
        if hook == "on_train_batch_end":
            # at the end of a check step of an acting check (the suite's one clock inside ``Sentinel``): the
            # clocks count optimizer-step cycles, so every rank gets the same answer at the same batch
            if not acting or not ends_cycle(trainer):
                return
            if not any(member._due(trainer) for member in acting):
                return
        elif hook != "on_train_end" and not acting:
            return
        stop = any(member._pending_stop for member in log.members)
        first_raise = next((m._pending_raise for m in log.members if m._pending_raise is not None), None)
        flags = torch.tensor(
            [float(stop), float(first_raise is not None)],
            dtype=torch.float32,
            device=trainer.strategy.root_device,
        )
        stop_votes, raise_votes = trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        for member in log.members:
            member._pending_stop = False
            member._pending_raise = None
        if not (stop_votes or raise_votes or hook == "on_train_end"):
            return
        finding = _share_findings(log, first_raise)
        if raise_votes:
            self._finish(trainer, print_report=False)
            raise SentinelError(finding or Finding("unknown", Severity.ERROR, "another rank raised", -1, -1))
        if stop_votes:
            trainer.should_stop = True
            self._finish(trainer, print_report=False)

    def _log_findings_text(self, trainer: pl.Trainer) -> None:
        text = None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                text = text or findings_markdown(finding_log(trainer).findings)
                self._emit(
                    trainer,
                    f"{type(logger).__name__}.experiment.add_text",
                    functools.partial(
                        logger.experiment.add_text, "sentinel/findings", text, trainer.global_step
                    ),
                )

    def _log_scalars(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        """Write host numbers under ``sentinel/...`` straight to the trainer's loggers, at the trainer's cadence.

        A set of metrics (told apart by its first name) is written at most once per
        ``trainer.log_every_n_steps`` steps: on the first check step of each such interval. Not
        through ``pl_module.log``, which costs about a millisecond per call in a callback hook (a
        TensorBoard write costs about half that, hence the cadence). Rank zero only; nothing when the
        trainer is barebones or has no logger. Call it on check steps, with numbers already read
        from the device.
        """
        if trainer.barebones or trainer.global_rank != 0 or not trainer.loggers:
            return
        step = trainer.global_step
        every = max(int(trainer.log_every_n_steps), 1)
        key = next(iter(metrics), "")
        due = self._next_log_step.get(key, 0)
        if due - every <= step < due:  # already written in this interval (a new fit starts over)
            return
        self._next_log_step[key] = (step // every + 1) * every
        for logger in trainer.loggers:
            self._emit(trainer, f"{type(logger).__name__}.log_metrics", logger.log_metrics, metrics, step)

    def _disable_after_error(self, trainer: pl.Trainer | None, hook: str, error: Exception) -> None:
        """This check's own code failed: it switches itself off alone, and the report names what it no longer watches."""
        self._failed = True
        reason = f"{type(self).__name__} failed in `{hook}` ({type(error).__name__}: {error})"
        if trainer is not None:
            finding_log(trainer).stop_watching(self.active_checks, reason)
        warnings.warn(
            SentinelWarning(
                f"{reason} and disabled itself; training goes on without it, and these checks are no longer "
                f"watched: {', '.join(self.active_checks) or 'none'}. Please report this with the traceback."
            ),
            stacklevel=3,
        )


# the base class's own hooks are guarded like its subclasses', and its constructor keeps the pristine state
SentinelCallback.__init__ = _wrap_init(SentinelCallback.__init__)  # type: ignore[method-assign]
for _name in _GUARDED_HOOKS:
    if _name in SentinelCallback.__dict__:
        setattr(SentinelCallback, _name, _guard_hook(_name, SentinelCallback.__dict__[_name]))


def trainer_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _identity(finding: Finding) -> tuple[Any, ...]:
    return (finding.check, finding.where, finding.step, finding.message)


def _share_findings(log: FindingLog, local_raise: Finding | None) -> Finding | None:
    """All ranks together: add the other ranks' new findings to ``log``; return the lowest rank's raise."""
    payload = ([f.to_dict() for f in log.findings[log.shared_upto :]], local_raise and local_raise.to_dict())
    gathered: list[Any] = [payload]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, payload)
    known = {_identity(finding) for finding in log.findings}
    for rank, (records, _) in enumerate(gathered):
        if rank == trainer_rank():
            continue
        for record in records:
            finding = Finding.from_dict(record)
            if _identity(finding) not in known:  # a statistic reduced across ranks is found on every rank
                known.add(_identity(finding))
                log.add(finding)
    log.shared_upto = len(log.findings)
    return next((Finding.from_dict(raised) for _, raised in gathered if raised is not None), None)


def named_trainable_parameters(module: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` for every parameter that requires a gradient."""
    return ((name, parameter) for name, parameter in module.named_parameters() if parameter.requires_grad)
