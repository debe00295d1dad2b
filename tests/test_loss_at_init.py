"""LossAtInitCheck: pure rules, faults and healthy runs on a real Trainer, once-only cost, loop variants, harness."""

import math

import lightning.pytorch as pl
import pytest
import torch
from _models import Classifier, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.detection.cases import get_case
from benchmarks.detection.runner import run_case
from lightning_sentinel import findings
from lightning_sentinel.checks.loss_at_init import (
    LOSS_AT_INIT,
    LossAtInitCheck,
    binary_entropy,
    binary_init_stats,
    classification_init_stats,
    regression_init_stats,
    too_high,
    too_low,
    within_budget,
)


def _own(trainer, severities=("warning", "error")):
    return [f for f in findings(trainer) if f.check == LOSS_AT_INIT and f.severity.value in severities]


def _scaled_net(factor=50.0):
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        net[-1].weight.mul_(factor)
        net[-1].bias.mul_(factor)
    return net


def _mode_depth() -> int:
    return len(torch.overrides._get_current_function_mode_stack())


# ---------------------------------------------------------------------- pure rules
def test_rules():
    assert not too_high(2.4, math.log(10), 1.5, 1.0)
    assert too_high(9.0, math.log(10), 1.5, 1.0)
    assert not too_high(1.0, math.log(2), 1.5, 1.0)  # 1.44x but only 0.3 nat above
    assert too_high(1.8, math.log(2), 1.5, 1.0)
    assert not too_high(float("nan"), 1.0, 1.5, 1.0)
    assert too_high(4.0, 1.0, 3.0, None) and not too_high(2.9, 1.0, 3.0, None)
    assert too_low(0.01, 2.3, 1.5, 1.0) and not too_low(2.0, 2.3, 1.5, 1.0)
    assert binary_entropy(0.5) == pytest.approx(math.log(2)) and binary_entropy(1.0) == 0.0


def test_statistics_ignore_weights_smoothing_and_ignored_targets():
    scores = torch.zeros(6, 4)
    labels = torch.tensor([0, 1, 2, 3, -100, -100])
    observed, classes, prior_entropy, spread = classification_init_stats(scores, labels).tolist()
    assert observed == pytest.approx(math.log(4)) and classes == 4 and spread == 0
    assert prior_entropy == pytest.approx(math.log(4))
    soft = torch.full((6, 4), 0.25)
    assert classification_init_stats(scores, soft)[0].item() == pytest.approx(math.log(4))
    log_p = torch.log_softmax(torch.zeros(3, 5), 1)
    assert classification_init_stats(log_p, torch.tensor([0, 1, 2]), True)[0].item() == pytest.approx(
        math.log(5)
    )
    probabilities = torch.full((8, 1), 0.5)
    assert binary_init_stats(probabilities, torch.ones(8, 1), logits=False)[0].item() == pytest.approx(
        math.log(2)
    )
    mse, variance, mean, *_ = regression_init_stats(torch.zeros(4, 1), torch.full((4, 1), 3.0)).tolist()
    assert (mse, variance, mean) == (9.0, 0.0, 3.0)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="max_ratio"):
        LossAtInitCheck(max_ratio=1.0)
    with pytest.raises(ValueError, match="max_excess"):
        LossAtInitCheck(max_excess=0)
    with pytest.raises(ValueError, match="expected_loss"):
        LossAtInitCheck(expected_loss=-1.0)
    with pytest.raises(ValueError, match="max_regression_ratio"):
        LossAtInitCheck(max_regression_ratio=0.5)
    with pytest.raises(ValueError, match="on_detect"):
        LossAtInitCheck(on_detect="shout")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- on a Trainer
def test_final_layer_too_large_is_caught_with_where_and_numbers(tmp_path):
    trainer = fit(Classifier(net=_scaled_net()), [LossAtInitCheck()], root=tmp_path, max_steps=3)
    (finding,) = _own(trainer)
    assert finding.where == "F.cross_entropy in training_step"
    assert finding.step <= 1 and finding.severity.value == "warning"  # read at the end of batch 0
    assert finding.evidence["classes"] == 3
    assert finding.evidence["expected"] == pytest.approx(math.log(3))
    assert finding.evidence["observed"] > 5 and finding.evidence["ratio"] > 4
    assert "ln(3)" in finding.message and "final layer" in finding.hint
    # the user's own self.log calls keep working
    assert "train_loss" in trainer.callback_metrics


def test_healthy_default_init_is_silent_and_costs_nothing_after_the_first_batch(tmp_path):
    depths = []

    class Probe(Classifier):
        def training_step(self, batch, batch_idx):
            depths.append(_mode_depth())
            return super().training_step(batch, batch_idx)

    check = LossAtInitCheck()
    trainer = fit(Probe(), [check], root=tmp_path, max_steps=5)
    assert findings(trainer) == []
    assert depths[0] == 1 and depths[1:] == [0, 0, 0, 0]  # intercepted on the first batch only
    assert check._mode is None and check._done and _mode_depth() == 0
    assert check.state_dict()["extra"] == {"done": True}
    assert "train_loss" in trainer.callback_metrics


class _LossModule(Classifier):
    """A classifier whose loss is an ``nn`` module (named ``loss``) and whose targets may be regression values."""

    def __init__(self, net, loss):
        super().__init__(net=net, lr=1e-3, optimizer="adam")
        self.loss = loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss


def _regression_loader(shift=0.0, binary=False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=generator)
    y = x[:, :1] * 0.8 + 0.2 * torch.randn(128, 1, generator=generator)
    y = (y > 0).float() if binary else (y - y.mean()) / y.std() + shift
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=generator)


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(label_smoothing=0.2, weight=torch.tensor([0.2, 1.0, 5.0]), ignore_index=1),
        nn.CrossEntropyLoss(reduction="sum"),
    ],
    ids=["smoothing-weights-ignore", "sum"],
)
def test_cross_entropy_options_do_not_raise_false_alarms(tmp_path, loss):
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    trainer = fit(_LossModule(net, loss), [LossAtInitCheck()], root=tmp_path, max_steps=2)
    assert _own(trainer, ("info", "warning", "error")) == []


def test_healthy_bce_and_mse_are_silent(tmp_path):
    bce = _LossModule(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)), nn.BCEWithLogitsLoss())
    trainer = fit(
        bce, [LossAtInitCheck()], loader=_regression_loader(binary=True), root=tmp_path, max_steps=2
    )
    assert _own(trainer) == []
    mse = _LossModule(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)), nn.MSELoss())
    trainer = fit(mse, [LossAtInitCheck()], loader=_regression_loader(), root=tmp_path, max_steps=2)
    assert _own(trainer) == []


def test_regression_head_not_centred_is_caught(tmp_path):
    mse = _LossModule(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)), nn.MSELoss())
    trainer = fit(
        mse, [LossAtInitCheck()], loader=_regression_loader(shift=100.0), root=tmp_path, max_steps=2
    )
    (finding,) = _own(trainer)
    assert finding.where == "loss"
    assert finding.evidence["target_mean"] == pytest.approx(100.0, abs=1.0)
    assert finding.evidence["ratio"] > 1000 and "bias to the target mean" in finding.hint


def test_scaled_bce_head_is_caught(tmp_path):
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        net[-1].weight.mul_(100.0)
    trainer = fit(
        _LossModule(net, nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0]))),
        [LossAtInitCheck()],
        loader=_regression_loader(binary=True),
        root=tmp_path,
        max_steps=2,
    )
    (finding,) = _own(trainer)
    assert finding.where == "loss" and finding.evidence["classes"] == 2


def test_expected_loss_override(tmp_path):
    trainer = fit(Classifier(), [LossAtInitCheck(expected_loss=8.0)], root=tmp_path, max_steps=2)
    (finding,) = _own(trainer)
    assert finding.where == "training_step" and finding.evidence["expected"] == 8.0
    # the returned loss is read back in full under gradient accumulation (Lightning divides it)
    trainer = fit(
        Classifier(),
        [LossAtInitCheck(expected_loss=math.log(3))],
        root=tmp_path,
        max_steps=2,
        accumulate_grad_batches=4,
    )
    assert _own(trainer) == []
    # far above the expected value: reported; the user's own expectation of a large loss: silent
    trainer = fit(
        Classifier(net=_scaled_net()),
        [LossAtInitCheck(expected_loss=math.log(3))],
        root=tmp_path,
        max_steps=2,
    )
    (finding,) = _own(trainer)
    assert "above" in finding.message and finding.evidence["observed"] > 5
    observed = finding.evidence["observed"]
    trainer = fit(
        Classifier(net=_scaled_net()), [LossAtInitCheck(expected_loss=observed)], root=tmp_path, max_steps=2
    )
    assert _own(trainer) == []


def test_manual_optimization_and_bf16(tmp_path):
    class Manual(Classifier):
        def __init__(self):
            super().__init__(net=_scaled_net())
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.log("train_loss", loss)

    trainer = fit(Manual(), [LossAtInitCheck()], root=tmp_path, max_steps=3)
    assert [f.where for f in _own(trainer)] == ["F.cross_entropy in training_step"]
    trainer = fit(Classifier(), [LossAtInitCheck()], root=tmp_path, max_steps=2, precision="bf16-mixed")
    assert _own(trainer) == []
    trainer = fit(
        Classifier(net=_scaled_net()), [LossAtInitCheck()], root=tmp_path, max_steps=2, precision="bf16-mixed"
    )
    assert len(_own(trainer)) == 1


def test_resume_does_not_judge_again(tmp_path):
    trainer = fit(
        Classifier(),
        [LossAtInitCheck()],
        root=tmp_path,
        max_steps=3,
        enable_checkpointing=True,
    )
    ckpt = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(ckpt)
    depths = []

    class Probe(Classifier):
        def training_step(self, batch, batch_idx):
            depths.append(_mode_depth())
            return super().training_step(batch, batch_idx)

    resumed = fit(Probe(), [LossAtInitCheck()], root=tmp_path, max_steps=5, ckpt_path=str(ckpt))
    assert depths and set(depths) == {0}
    assert _own(resumed) == []


def test_raise_policy(tmp_path):
    from lightning_sentinel import SentinelError

    with pytest.raises(SentinelError, match="loss-at-init"):
        fit(Classifier(net=_scaled_net()), [LossAtInitCheck(on_detect="raise")], root=tmp_path, max_steps=3)
    assert _mode_depth() == 0


# ---------------------------------------------------------------------- the detection harness
@pytest.mark.parametrize(
    "name", ["final-layer-50x-mlp", "regression-head-not-centred", "ce-sum-reduction-mlp"]
)
def test_harness_cases(name):
    case = get_case(name)
    result = run_case(case)
    own = [f for f in result.findings if f.check == LOSS_AT_INIT and f.severity.value != "info"]
    if case.healthy:
        assert own == []
    else:
        assert own and own[0].where == "loss" and own[0].step <= 1
    assert result.verdict == "ok"


# ---------------------------------------------------------------------- language models and per-token tasks
def test_token_statistics_are_ln_vocabulary_without_the_ignored_positions():
    vocab = 50
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (4 * 6,), generator=generator)
    labels[::3] = -100  # padding
    scores = torch.zeros(4 * 6, vocab)
    scores[labels == -100, 0] = 100.0  # confidently wrong on the ignored positions only
    observed, classes, _, _ = classification_init_stats(scores, labels).tolist()
    assert observed == pytest.approx(math.log(vocab)) and classes == vocab
    # a call too large for the budget: the labelled rows are taken first, the ignored ones never
    kept, kept_labels = within_budget(scores, labels, budget=5 * vocab)
    assert kept.shape == (5, vocab) and bool((kept_labels != -100).all())
    assert torch.equal(kept, torch.zeros(5, vocab))
    # per-position scores (N, C, T) keep every k-th position of the last dimension
    kept, kept_labels = within_budget(
        torch.zeros(2, vocab, 12), torch.zeros(2, 12).long(), budget=2 * vocab * 4
    )
    assert kept.shape == (2, vocab, 4) and kept_labels.shape == (2, 4)


class _CausalLM(pl.LightningModule):
    """A tiny ``GPT2LMHeadModel`` on dict batches with padding (-100). ``own_loss``: the model's own loss
    (it shifts and flattens the logits); otherwise the loop does it, with ``CrossEntropyLoss(ignore_index=-100,
    label_smoothing=0.1)``."""

    def __init__(self, initializer_range=0.02, own_loss=True):
        super().__init__()
        from benchmarks.detection.zoo_lm_rules import tiny_gpt2

        self.model = tiny_gpt2(initializer_range=initializer_range)
        self.own_loss = own_loss
        self.loss = nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)

    def training_step(self, batch, batch_idx):
        if self.own_loss:
            return self.model(**batch).loss
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        vocab = logits.shape[-1]
        return self.loss(logits[:, :-1].reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit_lm(root, module, **kwargs):
    from benchmarks.detection.zoo_lm_rules import markov_text_loaders

    loader = markov_text_loaders(n=64, batch_size=16)[0]
    return fit(module, [LossAtInitCheck(**kwargs)], root=root, max_steps=2, loader=loader)


@pytest.mark.parametrize("own_loss", [True, False])
def test_a_language_model_starts_at_ln_vocabulary_and_an_overconfident_init_is_caught(
    tmp_path, own_loss, monkeypatch
):
    pytest.importorskip("transformers")
    assert _own(_fit_lm(tmp_path / "healthy", _CausalLM(own_loss=own_loss)), ("info", "warning")) == []
    (finding,) = _own(_fit_lm(tmp_path / "overconfident", _CausalLM(1.0, own_loss)))  # embeddings N(0, 1)
    assert finding.where == ("F.cross_entropy in fixed_cross_entropy" if own_loss else "loss")
    assert finding.evidence["classes"] == 32 and finding.evidence["expected"] == pytest.approx(math.log(32))
    assert finding.evidence["observed"] > 2 * math.log(32)
    # the same verdicts on a budget of 40 rows (of 16 x 23 tokens) per call
    from lightning_sentinel.checks import loss_at_init

    monkeypatch.setattr(loss_at_init, "STATS_BUDGET", 40 * 32)
    assert _own(_fit_lm(tmp_path / "healthy-budget", _CausalLM(own_loss=own_loss))) == []
    (finding,) = _own(_fit_lm(tmp_path / "overconfident-budget", _CausalLM(1.0, own_loss)))
    assert finding.evidence["observed"] > 2 * math.log(32)


def test_a_masked_lm_is_judged_on_its_masked_positions_only(tmp_path):
    pytest.importorskip("transformers")
    from benchmarks.detection.zoo_lm_rules import dict_loaders, masked_text, tiny_bert_mlm

    class MaskedLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_bert_mlm(vocab=33)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    stats = []

    class Spy(LossAtInitCheck):
        def _run_loss_at_init_check(self, trainer, mode, returned, batch_idx):
            stats.extend(call.stats.tolist() for call in mode.calls)
            super()._run_loss_at_init_check(trainer, mode, returned, batch_idx)

    loader = dict_loaders(masked_text, n=64, batch_size=16, length=24, vocab=32)[0]
    trainer = fit(MaskedLM(), [Spy()], root=tmp_path, max_steps=2, loader=loader)
    assert _own(trainer, ("info", "warning")) == []
    ((observed, classes, _, _),) = stats  # ~85% of the labels are -100
    assert classes == 33 and abs(observed - math.log(33)) < 0.3
