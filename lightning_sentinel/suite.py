"""``Sentinel``: one callback that runs a chosen set of checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_sentinel._stats import shared_norms
from lightning_sentinel._validate import require_choice, require_int, require_list, require_number
from lightning_sentinel.base import ON_DETECT_CHOICES, OnDetect, SentinelCallback
from lightning_sentinel.catalog import preset_members, validate_check_ids
from lightning_sentinel.engine import CheckClock, CostMeter, DeviceReads, budget_interval
from lightning_sentinel.findings import SentinelError, SentinelWarning, finding_log

Preset = Literal["fast", "full"]
PRESETS: tuple[str, ...] = ("fast", "full")
DEFAULT_INTERVAL = 10  # the suite's clock: see ``Sentinel(every_n_steps=...)``
MAX_INTERVAL = 1000  # the longest interval a budget may stretch the clock to
_CLOCK_KEY = "__clock__"  # the suite's clock in its checkpointed state (check state keys never start with _)


def preset_checks(preset: str) -> list[SentinelCallback]:
    """Fresh instances of the callbacks a preset runs.

    ``fast`` holds the cheap always-on monitors; ``full`` adds the preflight trials, which run
    once, on copies of the model, before or at the first training step (a few seconds at most).
    """
    require_choice("preset", preset, PRESETS)
    return [callback() for callback in preset_members(preset)]


class Sentinel(Callback):
    """Runs a set of lightning-sentinel checks as one callback.

    Args:
        preset: ``"fast"`` (default): the cheap monitors that run during training (NaN/Inf guard,
            gradients, data, activations, loss inputs, train/eval modes, parameter updates, the
            learning curve, the loss at init). ``"full"``: also the preflight trials on copies of
            the model (can it overfit one batch, does it learn more from real labels than from
            shuffled ones or zeroed inputs, are samples independent, do targets leak into inputs),
            run once before or at the first step, within a few seconds.
        checks: the check callbacks to run instead of the preset's (a list of lightning-sentinel check
            callbacks, no two with the same settings), e.g.
            ``[NonFiniteGuard(on_detect="raise"), GradientNormMonitor(every_n_steps=1)]``.
        disable: check ids to silence, a list of strings (see ``lightning-sentinel checks``); unknown
            ids raise ``ValueError``.
        on_detect: if given, overrides every check's own ``on_detect`` (``"warn"``, ``"stop"``, ``"raise"``).

        every_n_steps: the suite's one clock: every check that looks during training looks on the same
            optimizer steps, the first one and then every n-th (an integer >= 1); on every other step
            the suite touches no tensor but a running device-side sum of the loss, and reads nothing.
            It replaces the ``every_n_steps`` of the checks in the suite. To give one check a cadence of
            its own, add it to the Trainer beside the ``Sentinel`` and ``disable`` its ids in the suite.
        budget: if given, the share of training time the suite may take (e.g. ``0.01`` for 1%): the
            suite measures its own wall time and stretches its interval (never below ``every_n_steps``,
            at most 1000 steps) to hold the budget; a finite number in (0, 1). Single process only:
            under DDP every rank must keep the same schedule, so the interval stays fixed there.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import Sentinel
        >>> sentinel = Sentinel(disable=["vanishing-gradients"])
        >>> trainer = pl.Trainer(callbacks=[sentinel], logger=False, max_steps=1)
        >>> [type(check).__name__ for check in sentinel.checks][:2]  # the NaN guard runs first
        ['NonFiniteGuard', 'GradientNormMonitor']
    """

    def __init__(
        self,
        preset: Preset = "fast",
        checks: list[SentinelCallback] | None = None,
        disable: list[str] | None = None,
        on_detect: OnDetect | None = None,
        every_n_steps: int = DEFAULT_INTERVAL,
        budget: float | None = None,
    ) -> None:
        require_choice("preset", preset, PRESETS)
        require_choice("on_detect", on_detect, ON_DETECT_CHOICES, allow_none=True)
        self.every_n_steps = require_int("every_n_steps", every_n_steps)
        self.budget = None if budget is None else require_number("budget", budget, above=0, below=1)
        disabled = require_list("disable", disable, str, "check ids (strings)")
        validate_check_ids("disable", disabled)
        if checks is not None:
            checks = require_list("checks", checks, SentinelCallback, "lightning-sentinel check callbacks")
        self.preset = preset
        self.disable = disabled
        self.on_detect = on_detect
        self.checks: list[SentinelCallback] = list(checks) if checks is not None else preset_checks(preset)
        self._clock = CheckClock(self.every_n_steps)
        self._reads = DeviceReads()
        self._meter = CostMeter()
        for check in self.checks:
            check.disabled_checks.update(disabled)
            if on_detect is not None:
                check.on_detect = on_detect
            check._use_clock(self._clock, self._reads)
        keys = [check.state_key for check in self.checks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"`checks` must not hold two callbacks with the same settings, got {keys}")
        self._state_key = self._generate_state_key(
            preset=self.preset, checks=keys
        )  # the clock's interval is in them
        # per hook, only the checks that implement it (Lightning calls every hook of every callback)
        self._implementers: dict[str, list[SentinelCallback]] = {
            hook: [check for check in self.checks if _implements(check, hook)] for hook in _FORWARDED_HOOKS
        }

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            _CLOCK_KEY: self._clock.state_dict(),
            **{check.state_key: check.state_dict() for check in self.checks},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _CLOCK_KEY in state_dict:
            self._clock.load_state_dict(state_dict[_CLOCK_KEY])
        for check in self.checks:
            if check.state_key in state_dict:
                check.load_state_dict(state_dict[check.state_key])

    # ------------------------------------------------------------------ the engine around every hook
    def _run_hook(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        trainer = args[0] if args else kwargs.get("trainer")
        if hook == "setup" and (args[2] if len(args) > 2 else kwargs.get("stage")) == "fit":
            self._clock.reset()  # a fresh schedule for every fit (a resume loads its own after this)
        if hook == "on_train_start":
            self._meter.start_training()
        with self._meter.inside():
            for check in self._implementers[hook]:
                getattr(check, hook)(*args, **kwargs)
            if len(self._reads):
                self._reads.flush(on_error=lambda owner, error: _owner_failed(owner, trainer, hook, error))
        if hook == "on_train_batch_end" and self.budget is not None:
            self._hold_budget(trainer)
        if hook == "on_train_end":
            self._record_cost(trainer)

    def _hold_budget(self, trainer: Any) -> None:
        """Every 4th check step, stretch or shorten the interval to hold ``budget`` (one process only)."""
        clock = self._clock
        if (
            trainer.world_size > 1
            or clock.check_steps == 0
            or clock.check_steps % 4
            or not clock.due(trainer)
            or clock.early
        ):
            return
        share = self._meter.take_share()
        interval = budget_interval(share, clock.every_n_steps, self.budget, self.every_n_steps, MAX_INTERVAL)
        if interval != clock.every_n_steps:
            clock.stretch(interval)

    def _record_cost(self, trainer: Any) -> None:
        share = self._meter.share()
        if share == share:  # not NaN: training ran
            finding_log(trainer).cost_note = (
                f"the suite took {100 * share:.2g}% of training time ({self._clock.check_steps} check steps, "
                f"every {self._clock.every_n_steps} steps at the end)"
            )

    def __repr__(self) -> str:
        names = ", ".join(type(check).__name__ for check in self.checks)
        return f"Sentinel(preset={self.preset!r}, checks=[{names}], disable={self.disable})"


def _implements(check: Callback, hook: str) -> bool:
    """Whether ``check``'s class does something in ``hook`` (not Lightning's empty default)."""
    return getattr(type(check), hook) is not getattr(Callback, hook)


def _owner_failed(owner: Any, trainer: Any, hook: str, error: Exception) -> None:
    """A check's callback of a batched read failed: it switches itself off like a failing hook."""
    if isinstance(error, (SentinelError, SentinelWarning)):
        raise error
    if isinstance(owner, SentinelCallback):
        owner._disable_after_error(trainer, hook, error)


def _forward(hook: str) -> Callable[..., None]:
    def forward(self: Sentinel, *args: Any, **kwargs: Any) -> None:
        self._run_hook(hook, args, kwargs)

    def forward_sharing_norms(self: Sentinel, *args: Any, **kwargs: Any) -> None:
        with shared_norms():  # the weights and gradients do not change during this hook
            self._run_hook(hook, args, kwargs)

    if hook == "on_before_optimizer_step":
        forward = forward_sharing_norms

    forward.__name__ = hook
    forward.__doc__ = f"Run ``{hook}`` of every check in the suite that implements it."
    return forward


# state travels through state_dict / load_state_dict, not the checkpoint hooks
_FORWARDED_HOOKS = tuple(
    name
    for name in vars(Callback)
    if (name.startswith("on_") or name in ("setup", "teardown"))
    and name not in ("on_save_checkpoint", "on_load_checkpoint")
)
for _hook in _FORWARDED_HOOKS:
    setattr(Sentinel, _hook, _forward(_hook))

__all__ = ["PRESETS", "Sentinel", "preset_checks"]
