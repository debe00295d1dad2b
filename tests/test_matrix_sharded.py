"""Sharded strategies: the cross-rank reductions behind global gradient norms (FSDP, DeepSpeed) and
pooled batch statistics (DDP), checked in two gloo processes on the CPU.

Lightning's FSDPStrategy refuses a CPU accelerator, so an FSDP run itself awaits a GPU; what can be
checked here is the reduction each rank runs on its shards, and that the monitor switches to it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from lightning_sentinel._stats import shards_gradients

SCRIPT = Path(__file__).parent / "scripts" / "gloo_reductions.py"


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.slow  # three Python processes importing lightning: ~13 s
def test_global_norms_and_pooled_moments_over_two_gloo_ranks(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), _free_port(), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the gloo reductions hung")
    records = [json.loads(path.read_text()) for path in tmp_path.glob("result-*.json")]
    assert sorted(r["rank"] for r in records) == [0, 1], output[-3000:]
    for record in records:
        assert record["norms_match"] and record["nan_spreads"]
        assert record["count"] == 160.0 and record["alone_count"] == 100.0
        assert (
            record["mean_match"] and record["std_match"] and record["absmax_match"] and record["alone_match"]
        )


def test_sharding_strategies_are_recognised():
    assert shards_gradients(FSDPStrategy())
    assert shards_gradients(DeepSpeedStrategy.__new__(DeepSpeedStrategy))  # its __init__ needs deepspeed
    assert not shards_gradients(DDPStrategy())
