"""DDP on CPU (gloo, 2 processes): a fault seen by one rank stops or raises on both, without a hang."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fault.py"


def _run(on_detect, root):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), on_detect, str(root)], capture_output=True, text=True, timeout=240
    )
    lines = re.findall(r"RESULT rank=(\d) outcome=(\S+) step=(\d+) checks=(\S*)", completed.stdout)
    return completed, {int(rank): (outcome, int(step), checks) for rank, outcome, step, checks in lines}


@pytest.mark.parametrize(("on_detect", "outcome"), [("stop", "stopped"), ("raise", "raised:non-finite-loss")])
def test_a_fault_on_one_rank_ends_both_ranks_together(tmp_path, on_detect, outcome):
    completed, results = _run(on_detect, tmp_path)
    assert set(results) == {0, 1}, completed.stdout + completed.stderr
    assert {result[0] for result in results.values()} == {outcome}
    assert len({result[1] for result in results.values()}) == 1  # same step on both ranks
    assert results[0][1] < 40  # ended early
    assert "non-finite-loss" in results[1][2]
    assert (tmp_path / "sentinel" / "findings.json").exists()
