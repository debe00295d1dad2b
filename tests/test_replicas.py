"""ReplicaSyncMonitor (``replicas-out-of-sync``): the pure rule, the callback in one process acting as two
ranks, and real 2-process DDP runs on the CPU (gloo).

The DDP scenarios live in ``tests/scripts/ddp_replicas.py``; each group of them runs in one launch
(two processes, one fit per scenario), killed as a whole on timeout, since a rank left waiting in a
collective would otherwise hang the test. One healthy run (batch norm, accumulation, the collectives
counted) and one fault run by default; the rest are slow.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _launch import launch
from _models import Classifier, fit
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from lightning_sentinel import ReplicaSyncMonitor, Sentinel, findings
from lightning_sentinel.checks import replicas
from lightning_sentinel.checks.replicas import (
    REPLICAS_OUT_OF_SYNC,
    buffers_synced_each_forward,
    compared_tensors,
    largest_magnitudes,
    largest_relative_difference,
    replica_differences,
)

SCRIPT = Path(__file__).parent / "scripts" / "ddp_replicas.py"
TIMEOUT_S = 420


# ---------------------------------------------------------------------- the pure rule
def test_the_first_differing_tensor_is_named_with_its_numbers():
    rows = [[3.0, 4.0, 1.0], [3.0, 4.4, 2.0]]
    differing = replica_differences(rows, rtol=1e-5)
    assert [d.index for d in differing] == [1, 2]
    first = differing[0]
    assert (first.largest, first.smallest) == (4.4, 4.0)
    assert first.absolute == pytest.approx(0.4)
    assert first.relative == pytest.approx(0.4 / 4.4)
    assert first.rank_groups == ((0,), (1,)) and first.group_values == (4.0, 4.4)


def test_the_tolerance_is_relative_to_the_tensors_size():
    big, small = 1000.0, 1e-6
    within = [[big, small], [big * (1 + 5e-6), small * (1 + 5e-6)]]
    beyond = [[big, small], [big * (1 + 5e-5), small * (1 + 5e-5)]]
    assert replica_differences(within, rtol=1e-5) == []
    assert [d.index for d in replica_differences(beyond, rtol=1e-5)] == [0, 1]
    assert [d.index for d in replica_differences(within, rtol=0.0)] == [0, 1]  # rtol 0: bitwise


def test_identical_replicas_and_zero_norms_are_quiet_but_zero_against_nonzero_is_not():
    assert replica_differences([[0.0, 2.5], [0.0, 2.5]], rtol=1e-5) == []
    assert largest_relative_difference([[0.0, 2.5], [0.0, 2.5]]) == 0.0
    (difference,) = replica_differences([[0.0], [1e-12]], rtol=1e-5)
    assert difference.relative == 1.0


def test_non_finite_values_are_left_to_the_nan_checks():
    rows = [[float("nan"), float("inf"), 1.0], [1.0, 1.0, 1.5]]
    assert [d.index for d in replica_differences(rows, rtol=1e-5)] == [2]
    assert largest_relative_difference(rows) == pytest.approx(0.5 / 1.5)


def test_ranks_are_grouped_by_value_with_rank_zero_first():
    rows = [[5.0], [5.5], [5.0], [5.5 * (1 + 1e-7)]]
    (difference,) = replica_differences(rows, rtol=1e-5)
    assert difference.rank_groups == ((0, 2), (1, 3))
    odd_rank_zero = replica_differences([[7.0], [5.0], [5.0]], rtol=1e-5)[0]
    assert odd_rank_zero.rank_groups == ((0,), (1, 2))
    assert "7 on rank 0, 5 on ranks 1, 2" in replicas._by_rank(odd_rank_zero)


def test_largest_magnitudes_are_exact_for_every_dtype():
    tensors = [
        torch.tensor([0.5, -2.0]),
        torch.zeros(0),
        torch.tensor([3, -7]),
        torch.tensor([1.5], dtype=torch.float64),
        torch.tensor([True, False]),
        torch.tensor([-0.25], dtype=torch.bfloat16),
    ]
    assert largest_magnitudes(tensors, torch.device("cpu")).tolist() == [2.0, 0.0, 7.0, 1.5, 1.0, 0.25]


def test_a_change_the_2_norm_hides_shows_in_the_largest_value():
    """[3, 4] on rank 0 and [0, 5] on rank 1 have the same 2-norm (5); their largest |value| differs."""
    norms, peaks = [[5.0], [5.0]], [[4.0], [5.0]]
    (difference,) = replicas._merge(replica_differences(norms, 1e-5), replica_differences(peaks, 1e-5))
    assert difference.norm is None and difference.relative == pytest.approx(0.2)
    assert (
        difference.describe()
        == "2-norm equal on every rank, largest |value| 4 on rank 0, 5 on rank 1 (0.2 relative)"
    )


def test_compared_tensors_leave_out_ignored_names_rank_local_ones_and_local_running_statistics():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.SyncBatchNorm(4))
            self.head = nn.Linear(4, 2)
            self.head.weight.requires_grad_(False)
            self.register_buffer("codebook", torch.ones(3))
            self.private = nn.Parameter(torch.ones(1))
            self._ddp_params_and_buffers_to_ignore = ["private"]

    model = Model()
    synced = compared_tensors(model, [re.compile(r"^head\.bias$")], buffers_synced=True)
    names = [name for name, _, _ in synced]
    assert names[:6] == [
        "body.0.weight",
        "body.0.bias",
        "body.1.weight",
        "body.1.bias",
        "body.2.weight",
        "body.2.bias",
    ]
    assert "head.weight" in names and "head.bias" not in names and "private" not in names
    # DDP re-broadcasts buffers every forward, then each rank's forward updates plain batch norm's statistics
    assert "body.1.running_mean" not in names and "body.1.running_var" not in names
    assert {"body.2.running_mean", "body.2.running_var", "codebook", "body.1.num_batches_tracked"} <= set(
        names
    )
    kinds = {name: (kind, trainable) for name, kind, trainable in synced}
    assert kinds["head.weight"] == ("parameter", False) and kinds["codebook"] == ("buffer", False)
    unsynced = [name for name, _, _ in compared_tensors(model, [], buffers_synced=False)]
    assert "body.1.running_mean" in unsynced and "head.bias" in unsynced


def test_buffer_sync_is_read_off_the_ddp_module():
    def trainer(**attributes: Any) -> Any:
        return SimpleNamespace(strategy=SimpleNamespace(model=SimpleNamespace(**attributes)))

    assert buffers_synced_each_forward(trainer(forward_sync_buffers=False, broadcast_buffers=True)) is False
    assert buffers_synced_each_forward(trainer(broadcast_buffers=False)) is False
    assert buffers_synced_each_forward(trainer()) is True


def test_settings_are_validated_and_tell_instances_apart():
    with pytest.raises(ValueError, match="rtol"):
        ReplicaSyncMonitor(rtol=-1e-5)
    with pytest.raises(TypeError, match="ignore"):
        ReplicaSyncMonitor(ignore="ema")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ignore"):
        ReplicaSyncMonitor(ignore=["("])
    assert ReplicaSyncMonitor().state_key != ReplicaSyncMonitor(rtol=1e-3).state_key
    assert ReplicaSyncMonitor().state_key != ReplicaSyncMonitor(ignore=["ema"]).state_key


def test_it_is_in_both_presets():
    for preset in ("fast", "full"):
        assert any(isinstance(check, ReplicaSyncMonitor) for check in Sentinel(preset=preset).checks)


# ---------------------------------------------------------------------- one process
def test_world_size_one_costs_no_tensor_work_and_no_collective(monkeypatch, tmp_path):
    calls = {"norms": 0, "gathers": 0}
    norms = replicas.tensor_norms

    def counted_norms(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["norms"] += 1
        return norms(*args, **kwargs)

    gather = SingleDeviceStrategy.all_gather

    def counted_gather(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["gathers"] += 1
        return gather(self, *args, **kwargs)

    monkeypatch.setattr(replicas, "tensor_norms", counted_norms)
    monkeypatch.setattr(SingleDeviceStrategy, "all_gather", counted_gather)
    sentinel = Sentinel()
    trainer = fit(Classifier(), [sentinel], max_steps=25, root=tmp_path)
    monitor = next(check for check in sentinel.checks if isinstance(check, ReplicaSyncMonitor))
    assert monitor._mode == "off"
    assert calls == {"norms": 0, "gathers": 0}
    assert not [f for f in findings(trainer) if f.check == REPLICAS_OUT_OF_SYNC]


class TwoFakeRanks(ReplicaSyncMonitor):
    """One process acting as two ranks: the gather returns this rank's vector and a 'rank 1' copy of it
    with the named tensors' statistics scaled by ``drift[name]`` (the real callback path otherwise)."""

    def __init__(self, drift: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drift = dict(drift or {})

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._mode = "compare"
        self._buffers_synced = True
        self._tensors = compared_tensors(pl_module, self._ignore, True)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        other, count = local.clone(), len(self._tensors)
        for index, (name, _, _) in enumerate(self._tensors):
            other[1 + index] *= self.drift.get(name, 1.0)  # its 2-norm
            other[1 + count + index] *= self.drift.get(name, 1.0)  # its largest |value|
        return torch.stack([local, other])


@pytest.fixture
def fake_gather(monkeypatch):
    def gather(self: Any, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        monitor = next(c for c in self.lightning_module.trainer.callbacks if isinstance(c, TwoFakeRanks))
        return monitor.gather(tensor)

    monkeypatch.setattr(SingleDeviceStrategy, "all_gather", gather)


class WithBuffers(Classifier):
    def __init__(self) -> None:
        super().__init__(net=nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3)))
        self.register_buffer("codebook", torch.ones(4))


def test_a_drifting_parameter_is_an_error_naming_it_and_a_buffer_an_info(fake_gather, tmp_path):
    monitor = TwoFakeRanks(drift={"net.3.weight": 1.001, "net.3.bias": 1.5, "codebook": 1.2}, every_n_steps=5)
    trainer = fit(WithBuffers(), [monitor], max_steps=12, root=tmp_path)
    found = [f for f in findings(trainer) if f.check == REPLICAS_OUT_OF_SYNC]
    assert [(f.severity.value, f.where, f.step) for f in found] == [
        ("error", "net.3.weight", 1),
        ("info", "codebook", 1),
    ]
    error = found[0]
    assert "differs between data-parallel ranks" in error.message and "on rank 0" in error.message
    assert "2 of 6 compared parameters differ: 'net.3.weight', 'net.3.bias'" in error.message
    assert error.evidence["relative_difference"] == pytest.approx(1e-3, rel=1e-3)
    assert error.evidence["parameters_differing"] == 2 and error.evidence["world_size"] == 2
    assert "no_sync" in error.hint  # some trained parameters differ: the usual suspects are listed
    assert "only rank 0's updates last" in found[1].message


def test_a_frozen_parameter_that_drifts_points_at_a_rank_local_in_place_update(fake_gather, tmp_path):
    class Centered(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.input_mean = nn.Parameter(torch.zeros(8), requires_grad=False)

    module = Centered()
    module.input_mean.data.fill_(0.5)
    trainer = fit(module, [TwoFakeRanks(drift={"input_mean": 0.9})], max_steps=3, root=tmp_path)
    (finding,) = [f for f in findings(trainer) if f.check == REPLICAS_OUT_OF_SYNC]
    assert finding.where == "input_mean" and "not trained" in finding.hint


def test_within_tolerance_and_ignored_names_stay_quiet(fake_gather, tmp_path):
    monitor = TwoFakeRanks(drift={"net.0.weight": 1 + 1e-6, "net.2.bias": 2.0}, ignore=[r"^net\.2\.bias$"])
    trainer = fit(Classifier(), [monitor], max_steps=12, root=tmp_path)
    assert findings(trainer) == []


def test_a_growing_drift_is_reported_again_only_when_ten_times_worse(fake_gather, tmp_path):
    monitor = TwoFakeRanks(every_n_steps=2)  # checks after batches 1, 3, 5, 7, 9, 11

    class Grow(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            monitor.drift["net.0.weight"] = 1.001 if step < 4 else 1.002 if step < 8 else 1.05

    trainer = fit(Classifier(), [Grow(), monitor], max_steps=12, root=tmp_path)
    found = findings(trainer)
    assert [f.step for f in found] == [1, 9]  # 1e-3 relative, then 4.8e-2 (>= 10x); 2e-3 is a repeat
    assert found[1].evidence["relative_difference"] == pytest.approx(0.05 / 1.05, rel=1e-3)


def test_resume_keeps_the_cadence_and_what_was_reported(tmp_path, fake_gather):
    monitor = TwoFakeRanks(drift={"net.0.weight": 1.01}, every_n_steps=4)
    first = fit(Classifier(), [monitor], max_steps=6, root=tmp_path, enable_checkpointing=True)
    assert [f.step for f in findings(first)] == [1]
    state = monitor.state_dict()
    assert state["clock"]["last_check"] == 4  # check steps 0, 1, 2, 4 of 6
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    resumed_monitor = TwoFakeRanks(drift={"net.0.weight": 1.01}, every_n_steps=4)
    resumed = fit(Classifier(), [resumed_monitor], max_steps=12, root=tmp_path, ckpt_path=str(checkpoint))
    assert resumed_monitor._clock.last_check == 8  # then 8, as in one run (0, 1, 2, 4, 8, 12, ...)
    assert [f.step for f in findings(resumed) if f.check == REPLICAS_OUT_OF_SYNC] == [
        1
    ]  # restored, not repeated


def test_a_failure_in_the_check_still_joins_the_gather_and_then_switches_off(
    fake_gather, monkeypatch, tmp_path
):
    monitor = TwoFakeRanks(every_n_steps=1)
    gathers = []
    original = monitor.gather
    monitor.gather = lambda local: gathers.append(float(local[0])) or original(local)  # type: ignore[method-assign]

    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(monitor, "_fingerprint", broken)
    trainer = fit(Classifier(), [monitor], max_steps=5, root=tmp_path)
    assert gathers == [1.0]  # joined once, flagged as failed, then off
    assert monitor._failed and any(
        "failed in `on_train_batch_end` (RuntimeError: boom)" in str(w.message)
        for w in trainer.sentinel_warnings
    )


# ---------------------------------------------------------------------- 2-process DDP (gloo)
def run_ddp(root: Path, *scenarios: str) -> dict[str, dict[int, dict[str, Any]]]:
    """Run ``scenarios`` in one 2-process launch; each scenario's record per rank."""
    output = launch(
        [sys.executable, str(SCRIPT), str(root), *scenarios], TIMEOUT_S, f"DDP scenarios {scenarios}"
    )
    records: dict[str, dict[int, dict[str, Any]]] = {}
    for name in scenarios:
        records[name] = {}
        for rank in (0, 1):
            path = root / f"{name}-rank{rank}.json"
            assert path.exists(), f"{name} rank {rank} wrote nothing:\n{output[-3000:]}"
            record = json.loads(path.read_text())
            assert record["error"] is None, record["error"]
            records[name][rank] = record
    return records


def _ours(
    record: dict[str, Any], severities: tuple[str, ...] = ("warning", "error")
) -> list[tuple[str, int]]:
    return [
        (f["where"], f["step"])
        for f in record["findings"]
        if f["check"] == REPLICAS_OUT_OF_SYNC and f["severity"] in severities
    ]


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    return run_ddp(tmp_path_factory.mktemp("ddp-replicas"), "count", "fault-no-sync-encoder")


def test_ddp_one_collective_per_check_step_and_none_on_other_steps(default_runs):
    """Regular check steps every 3rd (the replica check needs no early look), with 2 accumulated batches: the
    steps 0, 3, 6, 9 end batches 2, 8, 14, 20."""
    for record in default_runs["count"].values():
        assert record["batches"] == 20 and record["step"] == 10
        assert record["replica_collectives"] == {"2": 1, "8": 1, "14": 1, "20": 1}


def test_ddp_healthy_batch_norm_with_accumulation_is_quiet_though_its_running_statistics_differ(default_runs):
    ranks = default_runs["count"]
    for record in ranks.values():
        assert [f for f in record["findings"] if f["check"] == REPLICAS_OUT_OF_SYNC] == []
        assert "net.1.running_mean" not in record["compared"] and "net.0.weight" in record["compared"]
    # what is true at on_train_batch_end: the weights are bitwise equal, the running statistics are not
    assert ranks[0]["weight_norms"] == ranks[1]["weight_norms"]
    assert ranks[0]["running_mean_norms"] != ranks[1]["running_mean_norms"]


def test_ddp_encoder_stepped_inside_no_sync_is_found_at_the_first_check(default_runs):
    """Manual optimization: the head accumulates under no_sync(), the encoder's optimizer steps inside it."""
    for record in default_runs["fault-no-sync-encoder"].values():
        assert _ours(record) == [("net.0.weight", 1)]
        (finding,) = [f for f in record["findings"] if f["check"] == REPLICAS_OUT_OF_SYNC]
        assert "2 of 4 compared parameters differ: 'net.0.weight', 'net.0.bias'" in finding["message"]
        assert finding["evidence"]["relative_difference"] > 10 * 1e-5


@pytest.fixture(scope="module")
def healthy_runs(tmp_path_factory):
    return run_ddp(
        tmp_path_factory.mktemp("ddp-healthy"),
        "healthy-plain",
        "healthy-bn",
        "healthy-bn-no-broadcast",
        "healthy-syncbn",
        "healthy-accumulate",
        "healthy-manual",
        "healthy-ignore",
        "crash-rank1",
        *(["healthy-gpt2"] if importlib.util.find_spec("transformers") else []),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [
        "healthy-plain",
        "healthy-bn",
        "healthy-syncbn",
        "healthy-accumulate",
        "healthy-manual",
        "healthy-ignore",
    ],
)
def test_ddp_healthy_runs_produce_no_replica_finding(healthy_runs, scenario):
    for record in healthy_runs[scenario].values():
        assert record["step"] == 16
        assert [f for f in record["findings"] if f["check"] == REPLICAS_OUT_OF_SYNC] == [], record["findings"]


@pytest.mark.slow
def test_ddp_a_hugging_face_gpt2_with_tied_embeddings_is_quiet(healthy_runs):
    pytest.importorskip("transformers")
    for record in healthy_runs["healthy-gpt2"].values():
        assert record["step"] == 16
        assert "model.transformer.wte.weight" in record["compared"]
        assert "model.lm_head.weight" not in record["compared"]  # tied to wte: compared once
        assert [f for f in record["findings"] if f["check"] == REPLICAS_OUT_OF_SYNC] == [], record["findings"]


@pytest.mark.slow
def test_ddp_sync_batch_norm_statistics_are_compared_and_equal(healthy_runs):
    ranks = healthy_runs["healthy-syncbn"]
    assert {"net.1.running_mean", "net.1.running_var"} <= set(ranks[0]["compared"])
    assert ranks[0]["running_mean_norms"] == ranks[1]["running_mean_norms"]


@pytest.mark.slow
def test_ddp_without_buffer_broadcast_differing_statistics_are_info_only(healthy_runs):
    for record in healthy_runs["healthy-bn-no-broadcast"].values():
        assert _ours(record) == []
        assert _ours(record, ("info",)) == [("net.1.running_mean", 1)]
        assert "broadcast_buffers=False" in record["findings"][0]["message"]


@pytest.mark.slow
def test_ddp_a_failure_on_one_rank_switches_the_check_off_on_both_without_a_hang(healthy_runs):
    for rank, record in healthy_runs["crash-rank1"].items():
        assert record["step"] == 16  # trained to the end
        # the suite's clock (every 10th step): both joined the failing second check (batch 11), none after
        assert record["replica_collectives"] == {"1": 1, "11": 1}
        assert any("ReplicaSyncMonitor failed" in w for w in record["warnings"]), rank
    assert "injected failure on rank 1" in healthy_runs["crash-rank1"][1]["warnings"][0]


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    return run_ddp(
        tmp_path_factory.mktemp("ddp-faults"),
        "fault-ema-center",
        "fault-clamp-rank-zero",
        "fault-reinit-head",
        "fault-reinit-head-stop",
        "fault-no-sync-step",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "where", "step"),
    [
        ("fault-ema-center", "input_mean", 1),  # an EMA of each rank's own inputs, in a frozen Parameter
        (
            "fault-clamp-rank-zero",
            "net.0.weight",
            11,
        ),  # edited after the first check's batch: seen at the next
        ("fault-reinit-head", "net.2.weight", 1),  # re-initialised at train start with a per-rank seed
        (
            "fault-no-sync-step",
            "net.0.weight",
            5,
        ),  # manual accumulation with no_sync() around the stepping batch too
    ],
)
def test_ddp_faults_are_found_naming_the_parameter(fault_runs, scenario, where, step):
    for record in fault_runs[scenario].values():
        assert _ours(record)[:1] == [(where, step)], record["findings"]


@pytest.mark.slow
def test_ddp_stop_ends_both_ranks_at_the_same_step(fault_runs):
    ranks = fault_runs["fault-reinit-head-stop"]
    assert ranks[0]["stopped"] and ranks[1]["stopped"]
    assert ranks[0]["step"] == ranks[1]["step"] < 16
    assert _ours(ranks[0])[:1] == [("net.2.weight", 1)]
