"""DeadReLUDetector: dead ReLU units, saturated tanh/sigmoid units, and poor weight initialisation.

The detector samples the first training batch of each check step (the suite's clock). On a sampled batch an
:class:`~lightning_sentinel.checks._activation_probe.ActivationProbe` sees every ReLU-family,
tanh and sigmoid activation, module or functional, names it by the module running it, and folds
it into per-unit counts on the device; hooks and the function mode are removed when the batch's
forward is done. Every ``window`` sampled batches the counts are read back once and judged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_sentinel._validate import require_bool, require_int, require_number, require_order
from lightning_sentinel.base import OnDetect, SentinelCallback
from lightning_sentinel.catalog import CheckSpec, add_to_presets, register
from lightning_sentinel.checks._activation_probe import RELU, SIGMOID, TANH, ActivationProbe, Site
from lightning_sentinel.findings import Severity

DEAD_RELU = "dead-relu"
SATURATED = "saturated-activation"
POOR_INIT = "poor-weight-init"

register(
    CheckSpec(
        DEAD_RELU,
        "DeadReLUDetector",
        Severity.WARNING,
        "a large share of a ReLU-family layer's units output 0 for every sample of a window of sampled batches "
        "(error when the whole layer is dead)",
        "> 50% of a layer's units dead over 4 batches sampled every 10 (all dead: error)",
    ),
    CheckSpec(
        SATURATED,
        "DeadReLUDetector",
        Severity.WARNING,
        "tanh/sigmoid units pinned at their limits (abs(tanh) > 0.99, sigmoid < 0.01 or > 0.99) for nearly "
        "every sample",
        "> 50% of a layer's units saturated on >= 99% of the samples of a window",
    ),
    CheckSpec(
        POOR_INIT,
        "DeadReLUDetector",
        Severity.WARNING,
        "at the first training batch the activation scale collapses or explodes with depth, or a layer is "
        "initialised symmetric (identical rows feeding identical columns: its units can never differ)",
        "per-unit std of the last hidden activation / the first < 0.1 or > 10; identical weight rows",
    ),
)

_DEAD_HINT = (
    "lower the learning rate; check the bias initialisation (negative biases switch ReLUs off); use He "
    "initialisation (nn.init.kaiming_normal_(w, nonlinearity='relu')), BatchNorm before the ReLU, or "
    "LeakyReLU/GELU"
)
_SATURATED_HINT = (
    "scale the weight initialisation down (Xavier/Glorot for tanh and sigmoid: nn.init.xavier_uniform_), "
    "normalise the inputs, put a normalisation layer before the activation, or lower the learning rate"
)
_SCALE_HINT = (
    "initialise with the fan-in in mind: He (nn.init.kaiming_normal_) for ReLU, Xavier (nn.init.xavier_normal_) "
    "for tanh/sigmoid, or PyTorch's default; add BatchNorm/LayerNorm or residual connections to deep stacks"
)
_SYMMETRY_HINT = (
    "initialise weights randomly (PyTorch's default, nn.init.kaiming_uniform_ or nn.init.xavier_uniform_) "
    "instead of a constant; only the last layer may start at zero"
)


# ---------------------------------------------------------------------- pure rules
def dead_share(active_counts: list[float]) -> tuple[float, int]:
    """``(share, dead)``: the share and number of units active on no sample at all.

    Example:
        >>> dead_share([0.0, 3.0, 0.0, 12.0])
        (0.5, 2)
    """
    if not active_counts:
        return 0.0, 0
    dead = sum(1 for count in active_counts if count == 0)
    return dead / len(active_counts), dead


def saturated_share(saturated_counts: list[float], samples: int, sample_fraction: float) -> tuple[float, int]:
    """``(share, saturated)``: units saturated on at least ``sample_fraction`` of ``samples``.

    Example:
        >>> saturated_share([100.0, 99.0, 50.0, 0.0], 100, 0.99)
        (0.5, 2)
    """
    if not saturated_counts or samples <= 0:
        return 0.0, 0
    saturated = sum(1 for count in saturated_counts if count >= sample_fraction * samples)
    return saturated / len(saturated_counts), saturated


def _worst_chain(sites: list[Site], scales: list[float], low: float, high: float) -> tuple[float, list[int]]:
    """The depth-scale ratio of each connected chain of ``sites`` (see ``Site.chain``): the one furthest
    outside ``[low, high]`` (in log distance), with its sites' indices; ``(nan, [])`` if none is defined."""
    chains: dict[int, list[int]] = {}
    for index, site in enumerate(sites):
        chains.setdefault(site.chain, []).append(index)
    best: tuple[float, float, list[int]] = (-math.inf, math.nan, [])
    for members in chains.values():
        ratio = depth_scale_ratio([scales[i] for i in members], last_is_relu=sites[members[-1]].kind == RELU)
        if not math.isfinite(ratio):
            continue
        outside = math.inf if ratio <= 0 else max(math.log(low / ratio), math.log(ratio / high))
        if outside > best[0]:
            best = (outside, ratio, members)
    return best[1], best[2]


def depth_scale_ratio(scales: list[float], last_is_relu: bool = False) -> float:
    """Signal scale of the last hidden activation over the first one's (NaN if undefined).

    An exactly-zero last scale of a ReLU is a dead layer (``dead-relu``'s business), not a scale
    drifting with depth, and gives NaN; a tanh/sigmoid whose signal faded to exactly zero gives 0.

    Example:
        >>> depth_scale_ratio([1.0, 0.3, 0.02])
        0.02
        >>> math.isnan(depth_scale_ratio([1.0, 0.0], last_is_relu=True))
        True
        >>> depth_scale_ratio([1.0, 0.0])
        0.0
    """
    if len(scales) < 2:
        return float("nan")
    first, last = scales[0], scales[-1]
    if not (math.isfinite(first) and math.isfinite(last)) or first <= 0 or last < 0:
        return float("nan")
    if last == 0 and last_is_relu:
        return float("nan")
    return last / first


def identical_rows(weight: Tensor, bias: Tensor | None = None, rtol: float = 1e-6) -> Tensor:
    """A device bool: every output unit of a ``Linear``/``Conv`` weight has the same weights and bias.

    Example:
        >>> bool(identical_rows(torch.full((3, 2), 0.5)))
        True
        >>> bool(identical_rows(torch.eye(2)))
        False
    """
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    if bias is not None:
        rows = torch.cat([rows, bias.detach().float().unsqueeze(1)], dim=1)
    return (rows - rows[:1]).abs().amax() <= rtol * rows.abs().amax()


def identical_inputs(weight: Tensor, units: int, rtol: float = 1e-6) -> Tensor | None:
    """A device bool: a consumer layer treats each of ``units`` incoming units alike (its columns,
    grouped per unit, are identical); ``None`` when its fan-in does not split into ``units`` groups.

    Example:
        >>> bool(identical_inputs(torch.ones(2, 6), 3))
        True
        >>> identical_inputs(torch.ones(2, 5), 3) is None
        True
    """
    fan_in = weight.shape[1]
    if units < 2 or fan_in % units != 0:
        return None
    if weight.dim() > 2 and fan_in != units:
        return None
    grouped = weight.detach().float().reshape(weight.shape[0], units, -1)
    return (grouped - grouped[:, :1]).abs().amax() <= rtol * grouped.abs().amax()


def _units_of(module: nn.Module) -> int:
    weight = module.weight
    return int(weight.shape[0])


class DeadReLUDetector(SentinelCallback):
    """Reports ``dead-relu``, ``saturated-activation`` and ``poor-weight-init`` from sampled activations.

    What it watches: ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU`` with a slope <= ``max_leaky_slope``,
    ``nn.Tanh``, ``nn.Sigmoid``, and their functional forms called inside any ``forward`` (``F.relu``,
    ``torch.relu``, ``Tensor.relu``, in-place forms, ``torch.tanh``, ``torch.sigmoid``, ...), each
    named by the module that runs it (``blocks.0:relu`` for a functional call in ``blocks.0``, with
    ``#2``, ``#3`` for further calls). GELU/SiLU/ELU/Mish count only for the depth scale: they have no
    exactly-zero region, so they are never "dead". A unit is a feature (last dimension) or a channel
    (dimension 1 of a convolution's output); its samples are batch x positions.

    When: the first training batch (micro-batch) of each check step is sampled: the suite's clock
    inside ``Sentinel``, otherwise steps 0, 1, 2, 4, 8, ... then every ``every_n_steps``-th; the probe is attached at the batch start and removed when the forward is done (at the first
    backward under automatic optimization, at the batch end under manual optimization), on fit end
    and on exception. Validation batches are not sampled unless ``sample_validation=True``. Forward calls replayed by activation
    checkpointing during backward are skipped. Every ``window`` sampled batches the counts, kept on
    the device, are read back once (summed over ranks under DDP) and judged.

    Cost: nothing on the batches in between (no hook, no mode, no device op). A sampled batch runs
    every op of its forward through the function mode and folds each activation into per-unit
    counts with one fused comparison and sum. Measured on CPU with tiny models (digits MLP and
    BatchNorm CNN, 200 steps, defaults): 5-9% of the run, Lightning's own per-callback dispatch
    included; raise ``every_n_steps`` to pay less.

    Rules (calibrated on the healthy and fault zoos of ``benchmarks/detection``):

    - ``dead-relu``: more than ``dead_threshold`` (50%) of a layer's units output <= 0 for every sample
      of the window (4 sampled batches: 64-256 samples in the zoo). On the healthy zoo (MLPs, BN-CNNs,
      ResNet, ReLU and GELU Transformers, a 512-unit ReLU right before the head on digits) the
      largest dead share of any layer in any window is 9.4% (the last ReLU of the diabetes regression
      MLP); the negative-bias faults reach 70-100%: 50% sits in the wide gap. A 100% dead layer is
      an error.
    - ``saturated-activation``: more than ``saturated_threshold`` (50%) of a hidden tanh/sigmoid
      layer's units sit beyond abs(tanh) > 0.99 (sigmoid < 0.01 or > 0.99) on at least
      ``saturated_sample_fraction`` (80%) of their samples. Output activations (no weight layer
      after them: a sigmoid head) are skipped: saturated probabilities are what training aims at.
      Healthy tanh MLPs have no unit saturated even on 50% of its samples; a N(0, 2^2)
      initialisation saturates each unit on ~87% of its samples, so a 99% rule would miss it
      (9-20% of units) while 80% sees 100% of them.
    - ``poor-weight-init`` (first training batch of a fresh run only, weights as initialised):
      (a) the signal of the last hidden watched activation over the first one's is below
      ``init_scale_low`` (0.1) or above ``init_scale_high`` (10). The signal is the standard deviation
      over the batch of each output element, RMS over the elements (position patterns that zero
      padding adds are no signal); output activations are left out. Healthy zoo ratios: 0.18
      (5-layer tanh MLP, default init) to 1.7 (ResNet); faults: 1e-3 or less (deep sigmoid stacks,
      small-init tanh) and 2e5 (N(0, 1) ReLU MLP), so 0.1 and 10 leave a margin on both sides.
      (b) a ``Linear``/``Conv`` layer's rows (weights and bias) are identical and the next weight layer
      in execution order reads its units with identical columns: the units get identical gradients
      forever. A last layer (a zero-initialised head) or one whose consumer treats its units
      differently is fine: gradient descent tells the units apart.

    Calibration (``benchmarks/RESULTS.md``, 53 healthy runs x 3 seeds): the most dead units
    in a healthy layer was 14% (threshold 50%, margin 3.6x); no healthy unit was saturated (the
    5-layer ``tanh-mlp-digits`` included); the init depth ratio stayed in 0.17-1.74 (``tanh-mlp-digits``
    and ``resnet-digits``; thresholds 0.1 and 10, margins 1.7x and 5.7x).

    Args:
        on_detect: ``"warn"``, ``"stop"`` or ``"raise"`` (see :class:`~lightning_sentinel.base.SentinelCallback`).
        every_n_steps: the interval of the check steps it samples, after the dense start; an integer >= 1
            (inside ``Sentinel``, the suite's clock replaces it).
        window: sampled batches per verdict (one host read per window); an integer >= 1.
        dead_threshold: share of dead units above which a layer is reported; in (0, 1].
        saturated_threshold: share of saturated units above which a layer is reported; in (0, 1].
        saturated_sample_fraction: share of its samples a unit must be saturated on to count; in (0, 1].
        init_scale_low: depth scale ratio below which the activations collapse at init; a finite
            number > 0, below ``init_scale_high``.
        init_scale_high: depth scale ratio above which the activations explode at init; a finite number.
        max_leaky_slope: ``LeakyReLU`` slopes up to this count as ReLU family; in [0, 1).
        sample_validation: also sample every ``every_n_steps``-th validation batch into the current
            window (eval mode: a unit active only on validation data is then not dead). Off by default.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel.checks.activations import DeadReLUDetector
        >>> detector = DeadReLUDetector(every_n_steps=5, dead_threshold=0.7)
        >>> trainer = pl.Trainer(callbacks=[detector], logger=False)
    """

    CHECKS = (DEAD_RELU, SATURATED, POOR_INIT)

    def __init__(
        self,
        on_detect: OnDetect = "warn",
        every_n_steps: int = 10,
        window: int = 4,
        dead_threshold: float = 0.5,
        saturated_threshold: float = 0.5,
        saturated_sample_fraction: float = 0.8,
        init_scale_low: float = 0.1,
        init_scale_high: float = 10.0,
        max_leaky_slope: float = 0.01,
        sample_validation: bool = False,
    ) -> None:
        super().__init__(on_detect=on_detect, every_n_steps=every_n_steps)
        self.window = require_int("window", window)
        self.dead_threshold = require_number("dead_threshold", dead_threshold, above=0, at_most=1)
        self.saturated_threshold = require_number(
            "saturated_threshold", saturated_threshold, above=0, at_most=1
        )
        self.saturated_sample_fraction = require_number(
            "saturated_sample_fraction", saturated_sample_fraction, above=0, at_most=1
        )
        self.init_scale_low = require_number("init_scale_low", init_scale_low, above=0)
        self.init_scale_high = require_number("init_scale_high", init_scale_high, above=0)
        require_order("init_scale_low", self.init_scale_low, "init_scale_high", self.init_scale_high)
        self.max_leaky_slope = require_number("max_leaky_slope", max_leaky_slope, at_least=0, below=1)
        self.sample_validation = require_bool("sample_validation", sample_validation)
        self._init_judged = False
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._probe: ActivationProbe | None = None
        self._probe_batch_judges_init = False
        # the initialisation's numbers, computed after the forward, read at the end of the batch
        self._held_init_read: tuple[Tensor, Callable[[list[float]], None]] | None = None
        self._sites: dict[str, Site] = {}
        self._window_batches = 0
        self._window_start_step = 0

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {
            **super()._state_key_settings(),
            "window": self.window,
            "dead_threshold": self.dead_threshold,
            "saturated_threshold": self.saturated_threshold,
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"init_judged": self._init_judged}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._init_judged = bool(state.get("init_judged", False))

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(trainer)
        self._reset_run_state()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.active_checks:
            return
        judge_init = not self._init_judged and POOR_INIT in self.active_checks and trainer.global_step == 0
        if not (self._due_batch(trainer) or judge_init):
            return
        if self._window_batches == 0:
            self._window_start_step = trainer.global_step
        self._release(trainer)  # defensive: never two probes at once
        self._probe_batch_judges_init = judge_init
        self._probe = ActivationProbe(
            pl_module,
            self._sites,
            max_leaky_slope=self.max_leaky_slope,
            measure_scale=judge_init,
            record_order=judge_init,
        )
        self._probe.attach()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # automatic optimization: the forward is over (manual optimization may run more forwards), and
        # the weights are still those of the forward: judge the initialisation now
        if self._probe is None or not pl_module.automatic_optimization:
            return
        self._probe.remove()
        if self._probe_batch_judges_init:
            self._probe_batch_judges_init = False
            self._init_judged = True
            self._run_init_check(trainer, pl_module, self._probe)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        probe, self._probe = self._probe, None
        if probe is None:
            return
        probe.remove()
        self._window_batches += 1
        if self._probe_batch_judges_init:  # manual optimization, or a step without backward
            self._probe_batch_judges_init = False
            self._init_judged = True
            self._run_init_check(trainer, pl_module, probe)
        held, self._held_init_read = self._held_init_read, None
        if held is not None:  # in the suite's one read of this hook (not one of its own after the forward)
            self._read(trainer, *held)
        # windows end on every ``window``-th check step of the clock, so a resumed run judges the same ones
        if self._clock.check_steps % self.window == 0:  # regular check steps (this detector's only ones)
            self._run_window_check(trainer, pl_module)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.sample_validation or trainer.sanity_checking or not self.active_checks:
            return
        if batch_idx % self.every_n_steps != 0 or self._probe is not None:
            return
        self._probe = ActivationProbe(pl_module, self._sites, max_leaky_slope=self.max_leaky_slope)
        self._probe.attach()

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
        self._release(trainer)

    @override
    def _release(self, trainer: pl.Trainer) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None

    # ------------------------------------------------------------------ poor-weight-init
    def _run_init_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ActivationProbe
    ) -> None:
        # hidden activations only: an output activation (a sigmoid head) has no weight layer after it
        scaled = sorted(
            (site for site in self._sites.values() if site.scale is not None and site.hidden),
            key=lambda site: site.order,
        )
        pairs = self._symmetry_candidates(pl_module, probe.weight_order)
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        flags: list[Tensor] = [site.scale.float().view(1).to(device) for site in scaled]  # type: ignore[union-attr]
        for _, rows_same, inputs_same in pairs:
            flags.append(torch.stack([rows_same, inputs_same]).float().to(device))
        if not flags:
            return
        packed = torch.cat(flags)  # computed now, on the weights of the forward; read at the batch's end
        step = int(trainer.global_step)
        self._held_init_read = (
            packed,
            lambda values: self._judge_init(trainer, pl_module, scaled, pairs, values, step),
        )

    def _judge_init(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        scaled: list[Site],
        pairs: list[tuple[str, Tensor, Tensor]],
        values: list[float],
        step: int,
    ) -> None:
        symmetric = values[len(scaled) :]
        ratio, chain = _worst_chain(scaled, values[: len(scaled)], self.init_scale_low, self.init_scale_high)
        if chain:
            scaled, scales = [scaled[i] for i in chain], [values[i] for i in chain]
        if chain and not (self.init_scale_low <= ratio <= self.init_scale_high):
            first, last = scaled[0], scaled[-1]
            verb = "collapses" if ratio < self.init_scale_low else "explodes"
            self._report(
                trainer,
                POOR_INIT,
                Severity.WARNING,
                f"activation scale {verb} with depth at init: per-unit std {scales[-1]:.3g} at '{last.name}' "
                f"({last.label}) vs {scales[0]:.3g} at '{first.name}' ({first.label}), ratio {ratio:.3g} over "
                f"{len(scaled)} activations (allowed {self.init_scale_low:g}-{self.init_scale_high:g})",
                where=last.name,
                evidence={
                    "scale_ratio": ratio,
                    "first_std": scales[0],
                    "last_std": scales[-1],
                    "activations": float(len(scaled)),
                },
                hint=_SCALE_HINT,
                dedupe_as="depth-scale",
                step=step,
            )
        for index, (name, _, _) in enumerate(pairs):
            if symmetric[2 * index] > 0 and symmetric[2 * index + 1] > 0:
                self._report(
                    trainer,
                    POOR_INIT,
                    Severity.WARNING,
                    f"layer '{name}' is initialised symmetric: all its {_units_of(pl_module.get_submodule(name))} "
                    "units have identical weights and bias, and the next layer reads them with identical weights, "
                    "so they get identical gradients and can never differ",
                    where=name,
                    evidence={
                        "identical_rows": 1.0,
                        "units": float(_units_of(pl_module.get_submodule(name))),
                    },
                    hint=_SYMMETRY_HINT,
                    step=step,
                )
        self._settle(trainer)

    @staticmethod
    def _symmetry_candidates(
        pl_module: pl.LightningModule, weight_order: list[str]
    ) -> list[tuple[str, Tensor, Tensor]]:
        """``(layer, rows identical, next layer's inputs identical)`` for each trainable layer with a next one."""
        pairs: list[tuple[str, Tensor, Tensor]] = []
        for name, next_name in itertools.pairwise(weight_order):
            layer = pl_module.get_submodule(name)
            consumer = pl_module.get_submodule(next_name)
            if not layer.weight.requires_grad or _units_of(layer) < 2:
                continue
            if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and layer.groups != 1:
                continue
            inputs_same = identical_inputs(consumer.weight, _units_of(layer))
            if inputs_same is None:
                continue
            pairs.append((name, identical_rows(layer.weight, layer.bias), inputs_same))
        return pairs

    # ------------------------------------------------------------------ dead-relu, saturated-activation
    def _run_window_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sites = [site for site in self._sites.values() if site.counts is not None]
        batches, start = self._window_batches, self._window_start_step
        self._sites.clear()  # the probe of the next window starts afresh
        self._window_batches = 0
        if not sites:
            return
        device = sites[0].counts.device  # type: ignore[union-attr]
        packed = torch.cat(
            [site.counts.to(device) for site in sites]  # type: ignore[union-attr]
            + [torch.tensor([float(site.samples) for site in sites], dtype=torch.float32, device=device)]
        )
        if trainer.world_size > 1:  # every rank samples the same batches: this collective lines up
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        self._read(  # the one host read of this window
            trainer,
            packed,
            lambda values: self._judge_window(trainer, pl_module, sites, batches, start, values),
        )

    def _judge_window(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        sites: list[Site],
        batches: int,
        start: int,
        values: list[float],
    ) -> None:
        samples = values[-len(sites) :]
        offset = 0
        worst_dead, worst_saturated = 0.0, 0.0
        for site, site_samples in zip(sites, samples, strict=True):
            counts = values[offset : offset + site.units]
            offset += site.units
            if site.kind == RELU:
                share, dead = dead_share(counts)
                worst_dead = max(worst_dead, share)
                if share > self.dead_threshold:
                    self._report_dead(trainer, site, share, dead, batches, int(site_samples), start)
            elif site.kind in (TANH, SIGMOID) and site.hidden:
                share, saturated = saturated_share(counts, int(site_samples), self.saturated_sample_fraction)
                worst_saturated = max(worst_saturated, share)
                if share > self.saturated_threshold:
                    self._report_saturated(trainer, site, share, saturated, batches, int(site_samples), start)
        self._log_scalars(
            trainer,
            pl_module,
            {"sentinel/dead_relu/max_share": worst_dead, "sentinel/saturation/max_share": worst_saturated},
        )
        self._settle(trainer)

    def _window_words(self, batches: int, samples: int, start: int, trainer: pl.Trainer) -> str:
        return f"{samples} samples of {batches} sampled batches (steps {start}-{trainer.global_step})"

    def _report_dead(
        self, trainer: pl.Trainer, site: Site, share: float, dead: int, batches: int, samples: int, start: int
    ) -> None:
        after = f" after '{site.after}'" if site.after else ""
        self._report(
            trainer,
            DEAD_RELU,
            Severity.ERROR if dead == site.units else Severity.WARNING,
            f"{dead} of {site.units} units ({share:.0%}) of {site.label} '{site.name}'{after} output 0 for all "
            f"{self._window_words(batches, samples, start, trainer)} (threshold {self.dead_threshold:.0%})",
            where=site.name,
            evidence={
                "dead_share": share,
                "dead_units": float(dead),
                "units": float(site.units),
                "window_batches": float(batches),
                "window_samples": float(samples),
            },
            hint=_DEAD_HINT,
            magnitude=share,
        )

    def _report_saturated(
        self,
        trainer: pl.Trainer,
        site: Site,
        share: float,
        saturated: int,
        batches: int,
        samples: int,
        start: int,
    ) -> None:
        limit = "abs(y) > 0.99" if site.kind == TANH else "y < 0.01 or y > 0.99"
        after = f" after '{site.after}'" if site.after else ""
        self._report(
            trainer,
            SATURATED,
            Severity.WARNING,
            f"{saturated} of {site.units} units ({share:.0%}) of {site.label} '{site.name}'{after} are saturated "
            f"({limit}) on >= {self.saturated_sample_fraction:.0%} of "
            f"{self._window_words(batches, samples, start, trainer)} (threshold {self.saturated_threshold:.0%})",
            where=site.name,
            evidence={
                "saturated_share": share,
                "saturated_units": float(saturated),
                "units": float(site.units),
                "window_batches": float(batches),
                "window_samples": float(samples),
            },
            hint=_SATURATED_HINT,
            magnitude=share,
        )


add_to_presets(DeadReLUDetector, ("fast", "full"), order=30)
