"""TrainEvalModeChecker: pure rules, eval mode in training, train mode in evaluation, frozen exemptions."""

import pytest
import torch
from _models import Classifier, classification_loader, fit
from torch import nn

from lightning_sentinel import SentinelError, findings
from lightning_sentinel.checks.modes import (
    TrainEvalModeChecker,
    deliberately_frozen,
    is_mode_dependent,
    mode_dependent_modules,
)

EVAL_IN_TRAINING = "module-in-eval-during-training"
TRAIN_IN_EVAL = "module-in-train-during-eval"


def _net():
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


class _Noisy(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


class _Plain(nn.Module):
    def forward(self, x):
        return x


def test_mode_dependent_modules_and_frozen_rule():
    assert is_mode_dependent(_Noisy()) and not is_mode_dependent(_Plain())
    assert is_mode_dependent(nn.MultiheadAttention(4, 2, dropout=0.1))
    assert not is_mode_dependent(nn.MultiheadAttention(4, 2))
    assert is_mode_dependent(nn.InstanceNorm1d(4, track_running_stats=True))
    assert [n for n, _ in mode_dependent_modules(_net())] == ["1", "3"]
    net = nn.Sequential(_net(), nn.Linear(3, 3))
    assert not deliberately_frozen(net, "0.1")
    net[0][1].requires_grad_(False)
    assert deliberately_frozen(net, "0.1") and not deliberately_frozen(net, "0.3")  # dropout's parent trains
    net[0].requires_grad_(False)
    assert deliberately_frozen(net, "0.3")
    assert not deliberately_frozen(nn.Sequential(nn.Dropout(0.1)), "0")  # nothing with parameters above it


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="allow"):
        TrainEvalModeChecker(allow=["("])
    with pytest.raises(ValueError, match="every_n_steps"):
        TrainEvalModeChecker(every_n_steps=0)


class _WithValidation(Classifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def val_dataloader(self):
        return classification_loader(n=64)


def test_healthy_run_with_validation_is_silent(tmp_path):
    trainer = fit(
        _WithValidation(net=_net()),
        [TrainEvalModeChecker(every_n_steps=1)],
        root=tmp_path,
        max_steps=20,
        val_check_interval=5,
        limit_val_batches=2,
    )
    trainer.validate(trainer.lightning_module, classification_loader(n=64), verbose=False)
    trainer.test(trainer.lightning_module, classification_loader(n=64), verbose=False)
    assert findings(trainer) == []


class _EvalInTrainingStep(Classifier):
    def training_step(self, batch, batch_idx):
        self.eval()  # the classic: left over from a debugging session
        return super().training_step(batch, batch_idx)


def test_eval_inside_training_step_is_caught_at_the_first_batch(tmp_path):
    trainer = fit(_EvalInTrainingStep(net=_net()), [TrainEvalModeChecker()], root=tmp_path, max_steps=5)
    (found,) = findings(trainer)
    assert found.check == EVAL_IN_TRAINING and found.where == "net.1" and found.step == 1
    assert "inside training_step" in found.message and "'net.3'" in found.message
    assert found.evidence["modules_in_eval"] == 2


def test_model_loaded_in_eval_mode_is_caught_and_frozen_parts_are_exempt(tmp_path):
    module = Classifier(net=nn.Sequential(_net(), nn.Dropout(0.1), nn.Linear(3, 3)))
    module.net[0][1].requires_grad_(False)  # a frozen batch-norm: fine in eval mode
    module.eval()
    trainer = fit(module, [TrainEvalModeChecker()], root=tmp_path, max_steps=3)
    (found,) = findings(trainer)
    assert found.where == "net.0.3" and "since training started" in found.message
    assert "'net.1'" in found.message and "net.0.1" not in found.message
    assert "model.train()" in found.hint


def test_allow_list_and_frozen_backbone_in_eval_are_silent(tmp_path):
    module = Classifier(net=nn.Sequential(_net(), nn.Dropout(0.1), nn.Linear(3, 3)))
    module.net[0].requires_grad_(False).eval()
    module.net[1].eval()
    trainer = fit(module, [TrainEvalModeChecker(allow=[r"^net\.1$"])], root=tmp_path, max_steps=3)
    assert findings(trainer) == []


class _TrainInValidation(_WithValidation):
    def on_validation_model_eval(self):
        pass  # overridden and forgot self.eval()


def test_train_mode_during_validation_is_caught_and_raises_on_request(tmp_path):
    module = _TrainInValidation(net=_net())
    with pytest.raises(SentinelError) as raised:
        fit(
            module,
            [TrainEvalModeChecker(on_detect="raise")],
            root=tmp_path,
            max_steps=4,
            val_check_interval=2,
            limit_val_batches=1,
            num_sanity_val_steps=0,
        )
    assert raised.value.finding.check == TRAIN_IN_EVAL and raised.value.finding.where == "net.1"


def test_train_mode_during_predict(tmp_path):
    trainer = fit(_WithValidation(net=_net()), [TrainEvalModeChecker()], root=tmp_path, max_steps=2)
    module = trainer.lightning_module
    module.on_predict_model_eval = lambda: None  # type: ignore[method-assign]
    trainer.predict(module, classification_loader(n=64))
    found = [f for f in findings(trainer) if f.check == TRAIN_IN_EVAL]
    assert found and "during predict" in found[0].message and found[0].where == "net.1"


def test_hooks_are_removed_after_the_sampled_batch(tmp_path):
    checker = TrainEvalModeChecker(every_n_steps=1000)
    trainer = fit(Classifier(net=_net()), [checker], root=tmp_path, max_steps=3)
    assert not checker._handles
    assert all(not m._forward_pre_hooks for m in trainer.lightning_module.modules())


@pytest.mark.parametrize(
    ("case_name", "where"),
    [("eval-in-training-step-cnn", "net.features.1"), ("no-eval-in-validation-cnn", "net.features.1")],
)
def test_detection_harness_cases(case_name, where):
    import benchmarks.detection.cases as cases
    from benchmarks.detection.runner import run_case

    result = run_case(cases.get_case(case_name))
    mine = [f for f in result.findings if f.check in (EVAL_IN_TRAINING, TRAIN_IN_EVAL)]
    assert mine and mine[0].check in result.expected and mine[0].where == where


def test_accumulation_and_resume(tmp_path):
    checker = TrainEvalModeChecker(every_n_steps=4)
    trainer = fit(Classifier(net=_net()), [checker], root=tmp_path, max_steps=3, accumulate_grad_batches=2)
    assert findings(trainer) == [] and checker._clock.last_check == 0  # regular checks at steps 0, 4, ...
    path = tmp_path / "modes.ckpt"
    trainer.save_checkpoint(path)
    resumed = TrainEvalModeChecker(every_n_steps=4)
    trainer = fit(
        _EvalInTrainingStep(net=_net()),
        [resumed],
        root=tmp_path,
        max_steps=5,
        accumulate_grad_batches=2,
        ckpt_path=str(path),
    )
    assert resumed._clock.last_check == 4  # the schedule went on: step 0 | 4
    (found,) = findings(trainer)
    assert found.check == EVAL_IN_TRAINING and found.where == "net.1"
