"""``Sentinel``: one callback that runs a chosen set of checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_sentinel._stats import shared_norms
from lightning_sentinel._validate import require_choice, require_list
from lightning_sentinel.base import ON_DETECT_CHOICES, OnDetect, SentinelCallback
from lightning_sentinel.catalog import preset_members, validate_check_ids

Preset = Literal["fast", "full"]
PRESETS: tuple[str, ...] = ("fast", "full")


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
    ) -> None:
        require_choice("preset", preset, PRESETS)
        require_choice("on_detect", on_detect, ON_DETECT_CHOICES, allow_none=True)
        disabled = require_list("disable", disable, str, "check ids (strings)")
        validate_check_ids("disable", disabled)
        if checks is not None:
            checks = require_list("checks", checks, SentinelCallback, "lightning-sentinel check callbacks")
        self.preset = preset
        self.disable = disabled
        self.on_detect = on_detect
        self.checks: list[SentinelCallback] = list(checks) if checks is not None else preset_checks(preset)
        for check in self.checks:
            check.disabled_checks.update(disabled)
            if on_detect is not None:
                check.on_detect = on_detect
        keys = [check.state_key for check in self.checks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"`checks` must not hold two callbacks with the same settings, got {keys}")
        self._state_key = self._generate_state_key(preset=self.preset, checks=keys)
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
        return {check.state_key: check.state_dict() for check in self.checks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for check in self.checks:
            if check.state_key in state_dict:
                check.load_state_dict(state_dict[check.state_key])

    def __repr__(self) -> str:
        names = ", ".join(type(check).__name__ for check in self.checks)
        return f"Sentinel(preset={self.preset!r}, checks=[{names}], disable={self.disable})"


def _implements(check: Callback, hook: str) -> bool:
    """Whether ``check``'s class does something in ``hook`` (not Lightning's empty default)."""
    return getattr(type(check), hook) is not getattr(Callback, hook)


def _forward(hook: str) -> Callable[..., None]:
    def forward(self: Sentinel, *args: Any, **kwargs: Any) -> None:
        for check in self._implementers[hook]:
            getattr(check, hook)(*args, **kwargs)

    def forward_sharing_norms(self: Sentinel, *args: Any, **kwargs: Any) -> None:
        with shared_norms():  # the weights and gradients do not change during this hook
            for check in self._implementers[hook]:
                getattr(check, hook)(*args, **kwargs)

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
