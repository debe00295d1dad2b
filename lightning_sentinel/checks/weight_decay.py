"""WeightDecayMonitor: weight decay so strong that it, not the loss, sets the weights.

Weight decay shrinks every decayed weight by a fixed fraction per optimizer step, whatever the
gradient says. For decoupled decay (``AdamW``; ``Adam``/``NAdam``/``RAdam`` with
``decoupled_weight_decay=True``; optimizers named ``AdamW*`` or ``Lion*`` in other packages) that
fraction is ``lr x weight_decay``. For ``SGD`` the decay term joins the gradient and the momentum
buffer carries it, so in steady state the fraction is ``lr x weight_decay x (1 - dampening) /
(1 - momentum)``. The check reads these numbers off the optimizer's param groups in
``on_before_optimizer_step``: plain Python floats, no tensor is touched and nothing is synchronised.

Optimizers with coupled decay that rescale the step (``Adam``, ``RMSprop``, ``Adagrad`` ...) are
not judged: the decay term goes through the adaptive normalisation, so its pull per step cannot be
read off the settings (an L2 penalty that swamps the loss there shows up as ``cannot-overfit-batch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sentinel._validate import require_int, require_number
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._optimizers import optimizer_key, unwrap_optimizer
from lightning_sentinel.engine import Persistence
from lightning_sentinel.findings import Severity

WEIGHT_DECAY_TOO_STRONG = "weight-decay-too-strong"

register(
    CheckSpec(
        WEIGHT_DECAY_TOO_STRONG,
        "WeightDecayMonitor",
        Severity.WARNING,
        "weight decay alone shrinks the weights so much per step that they stay pinned near zero and the loss "
        "cannot be fitted",
        "per-step shrink from decay (lr x weight_decay; / (1 - momentum) for SGD) > 0.01 on 3 checks in a row "
        "(on check steps)",
    ),
)

# decoupled decay by class name, for optimizers outside torch (bitsandbytes, timm, lion-pytorch ...)
_DECOUPLED_NAME_PREFIXES = ("AdamW", "PagedAdamW", "Lion", "PagedLion")


# ---------------------------------------------------------------------- pure rules
def decay_per_step(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> float | None:
    """The fraction of a decayed weight that weight decay alone removes per optimizer step.

    ``None`` when the group does not decay, its learning rate is not a plain number, or the
    optimizer's decay is coupled to an adaptive step (``Adam`` without ``decoupled_weight_decay``,
    ``RMSprop``, ``Adagrad`` ...), whose pull per step the settings do not tell.

    Example:
        >>> weights = [torch.nn.Parameter(torch.ones(2))]
        >>> adamw = torch.optim.AdamW(weights, lr=2e-3, weight_decay=10.0)
        >>> round(decay_per_step(adamw, adamw.param_groups[0]), 6)
        0.02
        >>> sgd = torch.optim.SGD(weights, lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> round(decay_per_step(sgd, sgd.param_groups[0]), 6)
        0.0005
        >>> adam = torch.optim.Adam(weights, lr=1e-3, weight_decay=1e-2)
        >>> decay_per_step(adam, adam.param_groups[0]) is None
        True
    """
    weight_decay, lr = _plain_number(group.get("weight_decay")), _plain_number(group.get("lr"))
    if weight_decay is None or lr is None or weight_decay <= 0 or lr <= 0:
        return None
    optimizer = unwrap_optimizer(optimizer)  # type: ignore[assignment]
    if isinstance(optimizer, torch.optim.SGD):
        momentum = _plain_number(group.get("momentum")) or 0.0
        dampening = _plain_number(group.get("dampening")) or 0.0
        if not 0 <= momentum < 1:
            return None
        carried = (1 - dampening) / (1 - momentum) if momentum > 0 else 1.0
        return lr * weight_decay * carried
    decoupled = (
        isinstance(optimizer, torch.optim.AdamW)
        or group.get("decoupled_weight_decay") is True
        or type(optimizer).__name__.startswith(_DECOUPLED_NAME_PREFIXES)
    )
    return lr * weight_decay if decoupled else None


def _plain_number(value: Any) -> float | None:
    """A finite float from a number or a one-element CPU tensor (a device tensor is not read: no sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.device.type != "cpu":
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def steps_to_halve(rate: float) -> float:
    """Optimizer steps after which decay alone leaves half of a weight (``inf`` for no decay).

    Example:
        >>> round(steps_to_halve(0.02))
        34
    """
    if rate <= 0:
        return math.inf
    if rate >= 1:
        return 1.0
    return math.log(0.5) / math.log1p(-rate)


# ---------------------------------------------------------------------- the callback
class WeightDecayMonitor(SentinelCallback):
    """Warns when weight decay shrinks the weights faster than training can use them.

    On every check step (the suite's clock), for each optimizer, it computes, per param group, the fraction of a
    decayed weight that the decay alone removes in one step (see :func:`decay_per_step`; the
    current learning rate, so schedulers and warm-up are followed). When that fraction is above
    ``max_decay_per_step`` on every check over ``patience`` check intervals (``(patience - 1) x
    every_n_steps`` steps, 20 by default), the weights halve every few dozen steps
    unless the gradient pushes them back each step: they settle where the decay balances the loss
    gradient, far from the loss's minimum, and the training loss levels off high.
    ``weight-decay-too-strong`` (warning), once per param group.

    Healthy recipes sit far below the default 0.01: AdamW at lr 1e-3 with weight decay 0.01-0.1
    removes 1e-5 to 1e-4 per step; ImageNet SGD (lr 0.1, momentum 0.9, weight decay 1e-4 to 5e-4)
    1e-4 to 5e-4; large-batch SGD scaled to lr 3.2 about 3e-3. DeepCrime's ``rcw-x1000`` mutation
    (AdamW at lr 2e-3 with weight decay 10 instead of 0.01) removes 0.02 per step and leaves the
    digits CNN at 4.7% error instead of 2.1%; it is reported at step 20.

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the healthy run nearest to
    alarming removes 1e-3 per step (``adamw-strong-decay-cnn``: AdamW at lr 5e-3 with weight decay
    0.2; threshold 0.01, 10x).

    Coupled decay in adaptive optimizers (``Adam(weight_decay=...)``, ``RMSprop``, ``Adagrad``) is
    not judged (see the module docstring). ``where`` is ``param_groups[i]``, prefixed by
    ``optimizer_<k>:`` when the trainer has several optimizers.

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        every_n_steps: the interval of its check steps after the dense start; an integer >= 1 (inside
            ``Sentinel``, the suite's clock replaces it).
        warmup_steps: optimizer steps to skip before the first check; an integer >= 0.
        max_decay_per_step: the largest healthy fraction removed per step; in (0, 1).
        patience: how long it must last before it is reported, in check intervals (every check over
            ``(patience - 1) x every_n_steps`` steps); an integer >= 1.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import WeightDecayMonitor
        >>> monitor = WeightDecayMonitor(max_decay_per_step=0.005, on_detect="stop")
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
    """

    CHECKS = (WEIGHT_DECAY_TOO_STRONG,)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 10,
        warmup_steps: int = 0,
        max_decay_per_step: float = 0.01,
        patience: int = 3,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        self.max_decay_per_step = require_number("max_decay_per_step", max_decay_per_step, above=0, below=1)
        self.patience = require_int("patience", patience)
        self._too_strong = Persistence()  # per where: the step from which every check found it too strong

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "max_decay_per_step": self.max_decay_per_step}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"too_strong_since": self._too_strong.state_dict()}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._too_strong.load_state_dict(state.get("too_strong_since", {}))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if WEIGHT_DECAY_TOO_STRONG not in self.active_checks or not self._due(trainer):
            return
        key = optimizer_key(trainer, optimizer)
        prefix = f"{key}:" if key else ""
        for index, group in enumerate(optimizer.param_groups):
            where = f"{prefix}param_groups[{index}]"
            rate = decay_per_step(optimizer, group) if _trains(group) else None
            too_strong = rate is not None and rate > self.max_decay_per_step
            span = (self.patience - 1) * self.every_n_steps
            if self._too_strong.update(where, too_strong, int(trainer.global_step), span):
                self._report_decay(trainer, pl_module, group, where, rate)  # type: ignore[arg-type]
        self._settle(trainer)

    def _report_decay(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        group: Mapping[str, Any],
        where: str,
        rate: float,
    ) -> None:
        names = _parameter_names(pl_module, group)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lr, weight_decay = _plain_number(group.get("lr")), _plain_number(group.get("weight_decay"))
        momentum = _plain_number(group.get("momentum")) or 0.0
        dampening = _plain_number(group.get("dampening")) or 0.0
        carried = f" / (1 - momentum {momentum:g})" if momentum > 0 else ""
        if momentum > 0 and dampening > 0:
            carried = f" x (1 - dampening {dampening:g}){carried}"
        halving = steps_to_halve(rate)
        self._report(
            trainer,
            WEIGHT_DECAY_TOO_STRONG,
            Severity.WARNING,
            f"weight decay removes {rate:.2%} of every decayed weight per optimizer step (lr {lr:.3g} x weight_decay "
            f"{weight_decay:.3g}{carried}) on every check since step {self._too_strong.since.get(where, 0)}: without the gradient pushing back, "
            f"the weights of {where} ({shown}) halve every {halving:.0f} steps, so the decay, not the "
            "loss, decides where they settle",
            where=where,
            evidence={
                "decay_per_step": rate,
                "lr": lr if lr is not None else math.nan,
                "weight_decay": weight_decay if weight_decay is not None else math.nan,
                "momentum": momentum,
                "steps_to_halve": halving,
            },
            hint=f"lower weight_decay so that lr x weight_decay stays below {self.max_decay_per_step:g} (AdamW: 0.01-0.1 "
            "at lr ~1e-3; SGD: 1e-4 to 5e-4 at lr ~0.1); a value meant for Adam's coupled L2 or for another "
            "learning rate does not carry over; if the learning rate itself is far too high (a typo, a scheduler that "
            "keeps raising it), lower that instead; leave biases and normalisation weights out of the decayed group",
            magnitude=rate,
        )


def _trains(group: Mapping[str, Any]) -> bool:
    return any(isinstance(p, Tensor) and p.requires_grad for p in group.get("params", ()))


def _parameter_names(pl_module: pl.LightningModule, group: Mapping[str, Any]) -> list[str]:
    names_by_id = {id(parameter): name for name, parameter in pl_module.named_parameters()}
    return [names_by_id.get(id(p), "<unnamed>") for p in group.get("params", ())]


add_to_presets(WeightDecayMonitor, ("fast", "full"), order=58)
