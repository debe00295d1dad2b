"""NonFiniteGuard: each id fires with the right `where`, healthy runs stay silent."""

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, classification_loader, fit
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from benchmarks.detection.cases import get_case
from benchmarks.detection.runner import run_case
from lightning_sentinel import NonFiniteGuard, SentinelError, findings


class LogCompressor(nn.Module):
    """log() of activations that can be negative: NaN from finite inputs."""

    def forward(self, x):
        return torch.log(x)


class NormFeature(nn.Module):
    """Appends the hand-written norm of a masked (all-zero) vector: finite forward, but the derivative
    of sqrt at 0 is inf, and inf * 0 = NaN flows back into every earlier parameter."""

    def forward(self, x):
        masked = x * torch.zeros_like(x)
        return torch.cat([x, torch.sqrt(masked.pow(2).sum(-1, keepdim=True))], dim=-1)


def _checks(trainer):
    return [(f.check, f.where) for f in findings(trainer)]


@pytest.mark.parametrize("trainer_kwargs", [{}, {"precision": "bf16-mixed"}, {"accumulate_grad_batches": 3}])
def test_healthy_runs_are_silent(tmp_path, trainer_kwargs):
    trainer = fit(
        Classifier(), [NonFiniteGuard(every_n_steps=1)], root=tmp_path, max_steps=40, **trainer_kwargs
    )
    assert findings(trainer) == []
    assert trainer.global_step == 40


def test_nan_from_a_module_names_the_module_before_the_weights_are_corrupted(tmp_path):
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), LogCompressor(), nn.Linear(32, 3))
    module = Classifier(net=net)
    with pytest.raises(SentinelError) as raised:
        fit(module, [NonFiniteGuard(on_detect="raise")], root=tmp_path)
    assert raised.value.finding.check == "non-finite-loss"
    assert raised.value.finding.where == "batch 0"
    # raised in on_before_optimizer_step: the update with NaN gradients never happened
    assert all(torch.isfinite(p).all() for p in module.parameters())
    recorded = [(r.check, r.where) for r in _read(tmp_path)]
    assert ("non-finite-activation", "net.2") in recorded


def _read(root):
    from lightning_sentinel import load_findings

    return load_findings(root / "sentinel" / "findings.json")


def test_nan_in_training_step_code_is_attributed_to_training_step(tmp_path):
    """A NaN that first appears on a check step (steps 0, 1, 2, 4, 8, then every 10th) is replayed and named."""
    module = Classifier(transform=lambda logits, step: torch.log(logits) if step >= 4 else logits)
    trainer = fit(module, [NonFiniteGuard()], root=tmp_path)
    assert ("non-finite-loss", "batch 4") in _checks(trainer)
    assert ("non-finite-activation", "Classifier.training_step") in _checks(trainer)
    assert trainer.global_step == 5  # default on_detect="stop"


def test_nan_gradient_with_finite_loss_names_the_first_parameter(tmp_path):
    net = nn.Sequential(nn.Linear(8, 32), NormFeature(), nn.Linear(33, 3))
    trainer = fit(Classifier(net=net), [NonFiniteGuard(on_detect="warn")], root=tmp_path, max_steps=3)
    first = findings(trainer)[0]
    assert (first.check, first.where, first.step) == ("non-finite-gradients", "net.0.weight", 0)
    assert first.evidence["non_finite_gradients"] == 2.0  # net.0.weight and net.0.bias


class ZeroGradAdamModel(Classifier):
    """A parameter whose gradient is always 0, stepped by Adam with eps=0: 0/0 = NaN weights."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.net(x) + 0.0 * self.offset

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, eps=0.0)


def test_non_finite_weights_name_the_parameter(tmp_path):
    trainer = fit(ZeroGradAdamModel(), [NonFiniteGuard(on_detect="warn")], root=tmp_path, max_steps=4)
    assert ("non-finite-weights", "offset") in _checks(trainer)
    assert ("non-finite-loss", "batch 1") in _checks(trainer)


def test_manual_optimization_is_checked(tmp_path):
    class Manual(Classifier):
        def __init__(self):
            super().__init__(transform=lambda logits, step: logits / 0.0 if step >= 4 else logits)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            optimizer.step()

    trainer = fit(Manual(), [NonFiniteGuard(on_detect="warn")], root=tmp_path, max_steps=6)
    assert ("non-finite-loss", "batch 4") in _checks(trainer)


def _fp16_plugin(init_scale):
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_grad_scaler_skipped_steps_are_not_a_finding(tmp_path):
    # 2**22 overflows fp16 gradients for the first steps; the scaler skips them and halves its scale
    plugin = _fp16_plugin(2.0**22)
    trainer = fit(
        Classifier(), [NonFiniteGuard(every_n_steps=1)], root=tmp_path, max_steps=30, plugins=[plugin]
    )
    assert plugin.scaler.get_scale() < 2.0**22  # steps were really skipped
    assert findings(trainer) == []


def test_persistent_non_finite_gradients_under_a_grad_scaler_are_reported(tmp_path):
    net = nn.Sequential(nn.Linear(8, 32), NormFeature(), nn.Linear(33, 3))
    plugin = _fp16_plugin(2.0**4)
    guard = NonFiniteGuard(every_n_steps=1, on_detect="warn")
    trainer = fit(Classifier(net=net), [guard], root=tmp_path, max_steps=12, plugins=[plugin])
    found = [f for f in findings(trainer) if f.check == "non-finite-gradients"]
    assert len(found) == 1 and found[0].where == "net.0.weight"
    assert found[0].step >= 4  # only once the scale fell below 1 (2**4 halved 5 times)
    assert found[0].evidence["grad_scale"] < 1.0


def test_replay_leaves_buffers_rng_and_logging_untouched():
    class BatchNormNaN(Classifier):
        def __init__(self):
            super().__init__(
                net=nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), LogCompressor(), nn.Linear(16, 3))
            )

    module = BatchNormNaN()
    x, y = next(iter(classification_loader()))

    class _Trainer:
        world_size = 1
        global_step = 0
        current_epoch = 0
        global_rank = 0
        loggers = ()

    guard = NonFiniteGuard(on_detect="warn")
    guard._batch, guard._batch_idx = (x, y), 0
    before_buffers = {k: v.clone() for k, v in module.named_buffers()}
    before_rng = torch.get_rng_state()
    with pytest.warns(Warning):
        assert guard._replay(_Trainer(), module)  # training_step calls self.log: silenced, no error
    assert all(torch.equal(before_buffers[k], v) for k, v in module.named_buffers())
    assert torch.equal(before_rng, torch.get_rng_state())
    assert "log" not in vars(module)
    assert [(f.check, f.where) for f in guard._own_findings] == [("non-finite-activation", "net.2")]


@pytest.mark.parametrize(
    ("case", "module"), [("exp-activation-overflow", "net.3"), ("transformer-inverted-pool-mask", "net.pool")]
)
def test_a_nan_of_a_check_step_is_localised(case, module):
    """The loss stays on the device between checks; a check step reads its own loss with the norms, so a
    NaN there (step 0 here) is replayed and named before the update spreads it. (Found on an H100, where
    the accelerator path was apart: these cases reported only `non-finite-weights` at step 10.)"""
    result = run_case(get_case(case))
    serious = [(f.check, f.step, f.where) for f in result.findings if f.severity.value == "error"]
    assert ("non-finite-loss", 0, "batch 0") in serious
    assert ("non-finite-activation", 0, module) in serious


def test_a_nan_between_check_steps_is_reported_at_the_next_one_naming_its_first_step(tmp_path):
    """A NaN from step 5 is read at step 8 (check steps 0, 1, 2, 4, 8): the device-side count of finite
    backwards names the first non-finite one (step 5, batch 5), and the loss of the check step is given."""
    nan_from_5 = lambda logits, step: logits / 0.0 if step >= 5 else logits  # noqa: E731
    trainer = fit(
        Classifier(transform=nan_from_5), [NonFiniteGuard(on_detect="warn")], root=tmp_path, max_steps=12
    )
    loss = next(f for f in findings(trainer) if f.check == "non-finite-loss")
    assert (loss.step, loss.where) == (8, "batch 5")
    assert loss.evidence["first_step"] == 5
    assert (
        "non-finite at step 5 (batch 5), read at the check of step 8; loss is nan at step 8" in loss.message
    )


def test_every_step_localises_a_nan_between_default_checks(tmp_path):
    """``every_n_steps=1`` reads each step's loss: a NaN from step 5 is replayed and named at step 5."""
    module = Classifier(transform=lambda logits, step: torch.log(logits) if step >= 5 else logits)
    trainer = fit(module, [NonFiniteGuard(every_n_steps=1)], root=tmp_path)
    assert ("non-finite-loss", "batch 5") in _checks(trainer)
    assert ("non-finite-activation", "Classifier.training_step") in _checks(trainer)


def test_steps_where_no_check_is_due_read_nothing_and_do_four_device_ops(tmp_path):
    """Off check steps the guard's only work is four constant-size device ops: the loss added to its running
    sum, and whether that sum is still finite added to a count (which names the first bad step later)."""
    from benchmarks.host_reads import HostReadCounter
    from benchmarks.op_count import SentinelOpCounter

    guard, per_step = NonFiniteGuard(), []
    reads, ops = HostReadCounter(), SentinelOpCounter()

    class Take(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            per_step.append((trainer.global_step, reads.take(), ops.take()))

    with reads, ops:
        fit(Classifier(), [Take(), guard], root=tmp_path, max_steps=30)
    quiet = [(step, r, o) for step, r, o in per_step[1:] if step - 1 not in (0, 1, 2, 4, 8, 10, 20)]
    assert quiet  # steps 3, 5, 6, 7, 9, 11, ...: the batch before each of them had no check
    assert all(sum(r.values()) == 0 for _, r, _ in quiet)
    assert all(sorted(op for _, op in o.elements()) == ["abs", "add_", "add_", "lt"] for _, _, o in quiet)
