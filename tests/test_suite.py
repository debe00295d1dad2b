"""The Sentinel suite: presets, disable, on_detect override, checkpoint resume, LightningCLI."""

import json

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, fit
from torch import nn

from lightning_sentinel import GradientNormMonitor, NonFiniteGuard, Sentinel, findings, registered_checks


def test_presets():
    fast, full = Sentinel(), Sentinel(preset="full")
    assert [type(check) for check in fast.checks][:2] == [NonFiniteGuard, GradientNormMonitor]
    assert {type(check) for check in fast.checks} <= {type(check) for check in full.checks}
    owned = {check_id for check in full.checks for check_id in check.CHECKS}
    assert owned == set(registered_checks())  # every registered id runs in the full preset
    assert fast.checks[0] is not Sentinel().checks[0]  # fresh instances per suite


def test_healthy_run_is_silent_and_reports_all_checks_passed(tmp_path, capfd):
    trainer = fit(Classifier(), [Sentinel()], root=tmp_path, max_steps=40)
    assert findings(trainer) == []
    n_checks = len({check for callback in Sentinel().checks for check in callback.CHECKS})
    assert f"lightning-sentinel: all {n_checks} checks passed" in capfd.readouterr().err
    assert json.loads((tmp_path / "sentinel" / "findings.json").read_text()) == []


def _nan_module():
    return Classifier(transform=lambda logits, step: logits / 0.0 if step >= 3 else logits)


def test_disable_silences_ids_and_on_detect_overrides(tmp_path):
    trainer = fit(_nan_module(), [Sentinel(on_detect="warn")], root=tmp_path, max_steps=8)
    assert "non-finite-loss" in {f.check for f in findings(trainer)}
    assert trainer.global_step == 8  # warn instead of NonFiniteGuard's default stop

    disabled = Sentinel(
        on_detect="warn", disable=["non-finite-loss", "non-finite-weights", "non-finite-activation"]
    )
    trainer = fit(_nan_module(), [disabled], root=tmp_path, max_steps=8)
    assert not {"non-finite-loss", "non-finite-weights", "non-finite-activation"} & {
        f.check for f in findings(trainer)
    }


def test_custom_checks_list():
    sentinel = Sentinel(checks=[GradientNormMonitor(every_n_steps=1)], disable=["vanishing-gradients"])
    assert len(sentinel.checks) == 1 and sentinel.checks[0].active_checks == ("exploding-gradients",)
    with pytest.raises(ValueError, match="same settings"):
        Sentinel(checks=[GradientNormMonitor(), GradientNormMonitor()])


class SpikeAt(Classifier):
    def __init__(self, spike_step):
        super().__init__(lr=1e-3)
        self.spike_step = spike_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x) * (300.0 if self.global_step == self.spike_step else 1.0)
        return nn.functional.cross_entropy(logits, y)


def _sentinel():
    return Sentinel(checks=[NonFiniteGuard(), GradientNormMonitor()], every_n_steps=1)


def test_checkpoint_resume_reports_the_same_findings(tmp_path):
    # the spike comes 2 steps after the resume: only the restored norm history (min_history=5) can judge it
    straight = fit(SpikeAt(22), [_sentinel()], root=tmp_path / "a", max_steps=40, enable_checkpointing=False)
    expected = [(f.check, f.step) for f in findings(straight)]
    assert expected == [("exploding-gradients", 22)]

    torch.manual_seed(0)
    first = fit(SpikeAt(22), [_sentinel()], root=tmp_path / "b", max_steps=20)
    checkpoint = tmp_path / "half.ckpt"
    first.save_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=False)["callbacks"]
    (suite_state,) = [value for key, value in state.items() if key.startswith("Sentinel")]
    checks = [
        value for key, value in suite_state.items() if not key.startswith("__")
    ]  # "__clock__": the schedule
    assert any(len(check["extra"].get("history", {}).get("", [])) > 0 for check in checks)

    resumed = fit(SpikeAt(22), [_sentinel()], root=tmp_path / "b", max_steps=40, ckpt_path=str(checkpoint))
    assert [(f.check, f.step) for f in findings(resumed)] == expected


def test_findings_from_before_a_resume_are_kept(tmp_path):
    first = fit(SpikeAt(5), [_sentinel()], root=tmp_path, max_steps=10)
    assert [f.step for f in findings(first)] == [5]
    first.save_checkpoint(tmp_path / "c.ckpt")
    resumed = fit(SpikeAt(5), [_sentinel()], root=tmp_path, max_steps=15, ckpt_path=str(tmp_path / "c.ckpt"))
    assert [(f.check, f.step) for f in findings(resumed)] == [("exploding-gradients", 5)]


def test_sentinel_is_configurable_from_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning_sentinel.Sentinel
      init_args:
        preset: fast
        disable: [vanishing-gradients]
        on_detect: stop
    - class_path: lightning_sentinel.GradientNormMonitor
      init_args:
        every_n_steps: 3
        spike_factor: 20.0
"""
    )
    cli = LightningCLI(
        Classifier,
        run=False,
        args=["--config", str(config), "--trainer.logger=false"],
        save_config_kwargs={"overwrite": True},
    )
    (sentinel,) = [c for c in cli.trainer.callbacks if isinstance(c, Sentinel)]
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, GradientNormMonitor)]
    assert isinstance(sentinel, Sentinel) and sentinel.disable == ["vanishing-gradients"]
    assert all(check.on_detect == "stop" for check in sentinel.checks)
    assert (
        isinstance(monitor, GradientNormMonitor)
        and monitor.every_n_steps == 3
        and monitor.spike_factor == 20.0
    )


def test_watching_does_not_change_training(tmp_path):
    def train(callbacks):
        pl.seed_everything(0, verbose=False)
        net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 3))
        module = Classifier(net=net, optimizer="adam", lr=1e-2)
        fit(module, callbacks, root=tmp_path, max_steps=25)
        return [p.detach().clone() for p in module.parameters()]

    bare = train([])
    watched = train([Sentinel(checks=[NonFiniteGuard(), GradientNormMonitor()], every_n_steps=1)])
    assert all(torch.equal(a, b) for a, b in zip(bare, watched, strict=True))
