"""ParameterUpdateMonitor: pure rules, optimizer coverage, unused and frozen parameters, update ratios."""

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, MetricsRecorder, classification_loader, fit
from torch import nn

from benchmarks.host_reads import HostReadCounter
from lightning_sentinel import findings
from lightning_sentinel.checks.parameters import (
    GRAD_WAS_NONE,
    GRAD_WAS_NONZERO,
    GRAD_WAS_ZERO,
    ParameterUpdateMonitor,
    burst_verdict,
    carried_over,
    lr_excuses_low_ratio,
    module_groups,
    ratio_streak,
    sample_stride,
)


def _ids(trainer):
    return [f.check for f in findings(trainer)]


def test_pure_rules():
    universe = ["a.0.weight", "a.0.bias", "a.1.weight", "b.weight", "c"]
    assert module_groups(["a.0.weight", "a.0.bias"], universe) == ["a.0"]
    assert module_groups(["a.0.weight", "a.0.bias", "a.1.weight", "b.weight", "c"], universe) == [
        "a",
        "b",
        "c",
    ]
    assert module_groups(["a.0.bias"], universe) == ["a.0.bias"]
    assert ratio_streak(float("nan"), 5, 0.5, 1e-6) == (0, 0)
    assert ratio_streak(0.0, -5, 0.5, 1e-6) == (0, 0)  # exactly zero: frozen-parameters' business
    assert ratio_streak(1.0, 2, 0.5, 1e-6) == (3, 0)
    assert not lr_excuses_low_ratio(1e-3, 1e-3, 1e-3, 0.5)
    assert lr_excuses_low_ratio(2e-4, 1e-4, 2e-4, 0.5)  # warming up
    assert lr_excuses_low_ratio(1e-4, 1e-4, 1e-3, 0.5)  # decayed
    assert burst_verdict(3.0, 0.1, True, 2.0)
    assert not burst_verdict(3.0, 1e-5, True, 2.0)  # a weight initialised near 0 on purpose
    assert not burst_verdict(3.0, 0.1, False, 2.0)  # a gain/bias-only layer (LayerScale, norms)
    assert not burst_verdict(1.9, 0.1, True, 2.0)


@pytest.mark.parametrize(
    ("argument", "kwargs"),
    [
        ("patience", {"patience": 0}),
        ("high_ratio", {"high_ratio": -1.0}),
        ("low_ratio", {"low_ratio": 1.0, "high_ratio": 0.5}),
        ("decayed_fraction", {"decayed_fraction": 2.0}),
        ("unused_patience", {"unused_patience": 0}),
    ],
)
def test_arguments_are_validated(argument, kwargs):
    with pytest.raises(ValueError, match=argument):
        ParameterUpdateMonitor(**kwargs)


def test_healthy_run_is_silent_logs_ratios_and_releases_everything(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2, unused_patience=10)
    recorder = MetricsRecorder()
    trainer = fit(Classifier(), [monitor], root=tmp_path, max_steps=40, logger=recorder)
    assert findings(trainer) == []
    assert 1e-4 < recorder.metrics["sentinel/update_ratio/max"] < 0.5
    assert not monitor._candidates and all(s.snapshot is None for s in monitor._optimizers.values())


class _HeadOnly(Classifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[2].parameters(), lr=0.05)


def test_only_the_head_in_the_optimizer(tmp_path):
    trainer = fit(_HeadOnly(), [ParameterUpdateMonitor()], root=tmp_path, max_steps=3)
    (found,) = findings(trainer)
    assert found.check == "parameters-not-in-optimizer" and found.where == "net.0" and found.step == 0
    assert found.evidence["parameters"] == 2 and "torch.optim.Adam(self.parameters())" in found.hint


class _DetachedEncoder(Classifier):
    def __init__(self, every=None):
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU()))
        self.aux = nn.Linear(32, 3)
        self.head = nn.Linear(32, 3)
        self.every = every

    def forward(self, x):
        features = self.net(x)
        if self.every is None:
            return self.head(features.detach())  # the bug: the encoder never trains
        if self.global_step % self.every == 0:  # an auxiliary head used on some steps only
            return self.head(features) + self.aux(features)
        return self.head(features)


def test_detached_encoder_is_unused_and_named_by_module(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2, unused_patience=10)
    trainer = fit(_DetachedEncoder(), [monitor], root=tmp_path, max_steps=20)
    (found,) = findings(trainer)
    assert found.check == "unused-parameters" and found.where == "net" and found.step == 10
    assert found.evidence["parameters"] == 4 and "'net', 'aux'" in found.message  # aux is never called


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_branch_used_on_some_steps_is_not_unused(tmp_path, accumulate):
    monitor = ParameterUpdateMonitor(every_n_steps=1, unused_patience=10)
    trainer = fit(
        _DetachedEncoder(every=4), [monitor], root=tmp_path, max_steps=25, accumulate_grad_batches=accumulate
    )
    assert findings(trainer) == []
    assert monitor._optimizers and next(iter(monitor._optimizers.values())).steps_seen == 25


def test_lr_zero_freezes_the_parameters(tmp_path):
    trainer = fit(Classifier(lr=0.0), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=10)
    (found,) = findings(trainer)
    assert found.check == "frozen-parameters" and found.where == "net" and found.step == 5
    assert found.evidence["lr"] == 0.0 and "learning rate is 0" in found.message


class _DecayToNearZero(Classifier):
    """SGD whose lr decays from 0.05 to 1e-12 after step 10 (the tail of a schedule that ends at 0)."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 10 else 2e-11)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_updates_below_float_resolution_at_the_end_of_a_decay_are_not_frozen(tmp_path):
    # lr 1e-12: every update rounds away in float32 (exactly 0), as a bias of 150 does under lr 4e-5 near the
    # end of a cosine decay; a schedule did that, so frozen-parameters stays quiet (lr 0 from the start is not
    # excused: test_lr_zero_freezes_the_parameters)
    trainer = fit(_DecayToNearZero(), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=30)
    assert "frozen-parameters" not in _ids(trainer)


def test_tiny_learning_rate_is_too_low_but_a_warmup_is_not(tmp_path):
    trainer = fit(Classifier(lr=1e-8), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=10)
    # (a bias's update may even round away in float32: frozen-parameters, also a right diagnosis)
    assert set(_ids(trainer)) <= {"update-ratio-too-low", "frozen-parameters"}
    (found,) = [f for f in findings(trainer) if f.check == "update-ratio-too-low"]
    assert found.where in {"net.0", "net.2"}
    assert found.evidence["update_ratio"] < 1e-6

    class _Warmup(Classifier):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: min(1.0, (step + 1e-5) / 30)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    trainer = fit(_Warmup(lr=1e-3), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=30)
    assert findings(trainer) == []


def test_huge_learning_rate_is_too_high(tmp_path):
    module = Classifier(lr=20.0)  # SGD: meant 0.02
    trainer = fit(module, [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=10)
    found = [f for f in findings(trainer) if f.check == "update-ratio-too-high"]
    assert found and found[0].where in {"net.0", "net.2"} and found[0].evidence["update_ratio"] > 0.5


def test_adam_learning_rate_far_too_high_is_caught_on_its_first_steps(tmp_path):
    # Adam moves every weight by ~lr per step: at lr 0.5 the first step is several times the weights of
    # a default-initialised Linear, then the ratio decays as the weights grow (no 3 checks in a row)
    trainer = fit(
        Classifier(lr=0.5, optimizer="adam"), [ParameterUpdateMonitor()], root=tmp_path, max_steps=30
    )
    found = [f for f in findings(trainer) if f.check == "update-ratio-too-high"]
    assert found and found[0].where in {"net.0", "net.2"} and found[0].evidence["update_ratio"] > 2.0
    assert "in one optimizer step" in found[0].message


class _LayerScaled(Classifier):
    """A tiny gain initialised at 1e-6 (LayerScale): it grows many times over in its first steps."""

    def __init__(self):
        super().__init__(lr=1e-3, optimizer="adam")
        self.gain = nn.Parameter(torch.full((3,), 1e-6))
        self.head_tiny = nn.Linear(3, 3)
        nn.init.normal_(self.head_tiny.weight, std=1e-6)  # a head initialised near 0 (as ConvNeXt's)
        nn.init.zeros_(self.head_tiny.bias)

    def forward(self, x):
        return self.head_tiny(self.net(x) * self.gain) + self.net(x)


def test_near_zero_initialised_layers_are_not_a_burst(tmp_path):
    # the first check is the first optimizer step: gain and head move ~1000x their norm there
    trainer = fit(_LayerScaled(), [ParameterUpdateMonitor()], root=tmp_path, max_steps=40)
    assert "update-ratio-too-high" not in _ids(trainer)
    # checked every step, their ratio decays like 1/step (1000, 1, 0.5, 0.33, ...): no sustained alarm either
    trainer = fit(_LayerScaled(), [ParameterUpdateMonitor(every_n_steps=1)], root=tmp_path, max_steps=20)
    assert "update-ratio-too-high" not in _ids(trainer)


class _TwoOptimizers(Classifier):
    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU()))
        self.head = nn.Linear(32, 3)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        x, y = batch
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.head(self.net(x)), y))
        body.step()
        head.step()
        head.zero_grad()  # the head steps twice per batch
        self.manual_backward(nn.functional.cross_entropy(self.head(self.net(x).detach()), y))
        head.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05), torch.optim.SGD(
            self.head.parameters(), lr=1e-6
        )


def test_manual_optimization_is_keyed_per_optimizer(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2)
    trainer = fit(_TwoOptimizers(), [monitor], root=tmp_path, max_steps=24)
    assert [(f.check, f.where) for f in findings(trainer)] == [("update-ratio-too-low", "optimizer_1:head")]
    assert sorted(state.steps_seen for state in monitor._optimizers.values()) == [
        8,
        16,
    ]  # 8 batches: body 1 step, head 2 steps each


def test_bf16_mixed_run_is_silent(tmp_path):
    trainer = fit(
        Classifier(),
        [ParameterUpdateMonitor(every_n_steps=2)],
        root=tmp_path,
        max_steps=20,
        precision="bf16-mixed",
    )
    assert findings(trainer) == []


def test_resume_keeps_streaks_and_cadence(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2, patience=4)
    trainer = fit(Classifier(lr=1e-6), [monitor], root=tmp_path, max_steps=4, enable_checkpointing=True)
    assert findings(trainer) == []  # 2 of the 4 checks needed so far
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    resumed = ParameterUpdateMonitor(every_n_steps=2, patience=4)
    trainer = fit(Classifier(lr=1e-6), [resumed], root=tmp_path, max_steps=8, ckpt_path=str(path))
    (found,) = findings(trainer)
    assert found.check == "update-ratio-too-low" and found.step == 7
    assert next(iter(resumed._optimizers.values())).steps_seen == 8


def test_detection_harness_head_only_optimizer():
    import benchmarks.detection.cases as cases
    from benchmarks.detection.runner import run_case

    result = run_case(cases.get_case("head-only-optimizer-mlp"))
    (found,) = [f for f in result.findings if f.check == "parameters-not-in-optimizer"]
    assert found.where == "net.0" and "'net.0', 'net.2'" in found.message


def test_low_ratio_hint_tells_a_slow_model_from_slow_layers():
    from lightning_sentinel.checks.parameters import _low_ratio_hint

    assert "raise the learning rate" in _low_ratio_hint([1e-8, 1e-8, 1e-9], [0, 1, 2], 1e-6)
    assert "vanish" in _low_ratio_hint([1e-9, 1e-3, 2e-3], [0], 1e-6)


class _Unfreezing(Classifier):
    """Fine-tuning that unfreezes the body at step 6 and adds it to the optimizer as a new param group."""

    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[2].parameters(), lr=0.05)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 6:
            self.net[0].requires_grad_(True)
            self.optimizers().optimizer.add_param_group({"params": self.net[0].parameters(), "lr": 0.0})


def test_a_param_group_added_later_is_watched(tmp_path):
    monitor = ParameterUpdateMonitor(every_n_steps=2)
    trainer = fit(_Unfreezing(), [monitor], root=tmp_path, max_steps=16)
    found = [(f.check, f.where) for f in findings(trainer)]
    assert found == [("frozen-parameters", "net.0")]  # the new group's lr is 0


# ---------------------------------------------------------------------- gradients-not-zeroed
NOT_ZEROED = "gradients-not-zeroed"


def test_carried_over_needs_a_gradient_held_before_every_backward():
    assert carried_over([GRAD_WAS_NONZERO]) and carried_over([GRAD_WAS_NONZERO] * 4)
    assert not carried_over([GRAD_WAS_NONE, GRAD_WAS_NONZERO, GRAD_WAS_NONZERO])  # micro-batches accumulated
    assert not carried_over([GRAD_WAS_ZERO])  # zero_grad(set_to_none=False)
    assert not carried_over([GRAD_WAS_NONZERO, GRAD_WAS_NONE])  # zeroed before a second loss's backward
    assert not carried_over([])


class _Manual(Classifier):
    """Manual optimization; ``zeroing`` is ``"none"`` (the bug), ``"zero-set"`` (zero_grad(set_to_none=False))
    or ``"every-4"`` (accumulation over 4 micro-batches, zeroed after each step)."""

    def __init__(self, zeroing, **kwargs):
        super().__init__(**kwargs)
        self.zeroing = zeroing
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.zeroing == "every-4":
            self.manual_backward(loss / 4)
            if (batch_idx + 1) % 4 == 0:
                optimizer.step()
                optimizer.zero_grad()
            return loss
        if self.zeroing == "zero-set":
            optimizer.zero_grad(set_to_none=False)
        self.manual_backward(loss)
        optimizer.step()
        return loss


class _NoZeroGradAutomatic(Classifier):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        pass  # the bug: Lightning never zeroes


def test_gradients_never_zeroed_are_reported_with_where(tmp_path):
    trainer = fit(_Manual("none", lr=0.01), [ParameterUpdateMonitor()], root=tmp_path, max_steps=30)
    found = [f for f in findings(trainer) if f.check == NOT_ZEROED]
    assert [(f.where, f.severity.value) for f in found] == [("net.0", "error")]
    assert (
        found[0].step == 21
    )  # the windows that end at checked steps 10 and 20, read with their update checks
    assert found[0].evidence["parameters_carried"] == found[0].evidence["parameters_sampled"] == 4
    automatic = fit(_NoZeroGradAutomatic(lr=0.01), [ParameterUpdateMonitor()], root=tmp_path, max_steps=30)
    assert [f.where for f in findings(automatic) if f.check == NOT_ZEROED] == ["net.0"]


class _PerStepReads(pl.Callback):
    def __init__(self, counter):
        self.counter = counter
        self.steps = []

    def on_train_batch_start(self, *args):
        self.steps.append(self.counter.take())


def test_gradients_held_as_zeros_or_never_zeroed_are_read_on_checked_steps_only(tmp_path):
    """zero_grad(set_to_none=False) leaves .grad allocated: every watched backward makes a device flag, and
    the flags are read with the checked step's one read, never on the steps between."""
    for zeroing in ("zero-set", "none"):
        counter = HostReadCounter()
        per_step = _PerStepReads(counter)
        with counter:
            trainer = fit(
                _Manual(zeroing, lr=0.01),
                [per_step, ParameterUpdateMonitor(every_n_steps=5)],
                root=tmp_path,
                max_steps=30,
            )
        steps = [*per_step.steps[1:], counter.take()]  # [i]: the reads from the start of batch i on
        reads = {
            i: sum(n for (module, _, _), n in step.items() if module == "checks/parameters.py")
            for i, step in enumerate(steps)
        }
        assert {i for i, n in reads.items() if n} <= set(range(0, 30, 5)) and max(reads.values()) <= 1, reads
        assert (NOT_ZEROED in _ids(trainer)) == (zeroing == "none")


@pytest.mark.parametrize("zeroing", ["zero-set", "every-4"])
def test_zeroing_with_set_to_none_false_or_accumulating_by_hand_is_quiet(tmp_path, zeroing):
    monitor = ParameterUpdateMonitor(every_n_steps=2)
    trainer = fit(
        _Manual(zeroing, lr=0.01), [monitor], root=tmp_path, max_steps=60 if zeroing == "zero-set" else 15
    )
    assert NOT_ZEROED not in _ids(trainer)
    assert all(state.zeroing is None or state.zeroing.handles for state in monitor._optimizers.values())
    assert sum(state.steps_seen for state in monitor._optimizers.values()) >= 15


def test_automatic_accumulation_is_quiet(tmp_path):
    trainer = fit(
        Classifier(lr=0.01),
        [ParameterUpdateMonitor(every_n_steps=2)],
        root=tmp_path,
        max_steps=12,
        accumulate_grad_batches=4,
        loader=classification_loader(n=512, batch_size=8),
    )
    assert NOT_ZEROED not in _ids(trainer)


class _SharedBodyTwoLosses(Classifier):
    """Each optimizer zeroed just before its own backward; the second loss also reaches the first optimizer's
    body, so its gradient holds something between the first optimizer's step and its next zeroing."""

    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)))
        self.other_head = nn.Linear(32, 3)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        first.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        first.step()
        second.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.other_head(self.net[:2](x)), y))
        second.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05), torch.optim.SGD(
            self.other_head.parameters(), lr=0.05
        )


class _WrongOptimizerZeroed(_SharedBodyTwoLosses):
    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        second.zero_grad()
        second.zero_grad()  # the bug: meant first.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        self.manual_backward(nn.functional.cross_entropy(self.other_head(self.net[:2](x).detach()), y))
        first.step()
        second.step()


def test_two_optimizers_shared_body_quiet_and_the_wrong_one_zeroed_named(tmp_path):
    healthy = fit(_SharedBodyTwoLosses(), [ParameterUpdateMonitor()], root=tmp_path, max_steps=60)
    assert NOT_ZEROED not in _ids(healthy)
    broken = fit(_WrongOptimizerZeroed(), [ParameterUpdateMonitor()], root=tmp_path, max_steps=60)
    assert [f.where for f in findings(broken) if f.check == NOT_ZEROED] == ["optimizer_0:net.0"]


def test_gradients_not_zeroed_under_torch_compile(tmp_path):
    module = _Manual("none", lr=0.01)
    module.net = torch.compile(module.net, backend="aot_eager")
    trainer = fit(module, [ParameterUpdateMonitor()], root=tmp_path, max_steps=30)
    assert NOT_ZEROED in _ids(trainer)


class _CosineToZero(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / 40) ** 8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_schedule_that_decays_to_zero_does_not_freeze_the_parameters(tmp_path):
    trainer = fit(_CosineToZero(), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=60)
    assert "frozen-parameters" not in _ids(trainer)
    frozen = fit(Classifier(lr=0.0), [ParameterUpdateMonitor(every_n_steps=2)], root=tmp_path, max_steps=12)
    assert "frozen-parameters" in _ids(frozen)  # lr 0 from the start: still frozen


def test_the_update_sample_keeps_every_row_and_at_most_an_eighth():
    assert sample_stride(torch.zeros(5000, 16)) == 8 and sample_stride(torch.zeros(64, 32, 3, 3)) == 8
    assert sample_stride(torch.zeros(50_000, 2)) == 2  # never more than a row's elements
    assert sample_stride(torch.zeros(10, 10)) == 1 and sample_stride(torch.zeros(100_000)) == 1


class _SparseEmbedding(pl.LightningModule):
    """A bag-of-tokens classifier whose SGD step moves only the embedding rows of the batch's tokens."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 16)
        self.head = nn.Linear(16, 2)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        tokens = torch.randint(0, 5000, (8, 4), generator=torch.Generator().manual_seed(batch_idx))
        labels = (tokens[:, 0] % 2).long()
        return nn.functional.cross_entropy(self.head(self.embed(tokens).mean(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize(("lr", "expected"), [(0.5, []), (0.0, [("frozen-parameters", "embed")])])
def test_an_embedding_that_moves_a_few_rows_is_not_frozen_one_at_lr_zero_is(tmp_path, lr, expected):
    # 32 of 5000 rows move per step: a sample of every 8th element still holds 2 elements of each row
    loader = torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)
    trainer = fit(
        _SparseEmbedding(lr), [ParameterUpdateMonitor(every_n_steps=2)], loader, root=tmp_path, max_steps=10
    )
    assert [(f.check, f.where) for f in findings(trainer) if f.check == "frozen-parameters"] == expected
