"""Run a 2-process launcher script for a test, killing both ranks if it hangs.

Example:
    >>> import sys
    >>> launch([sys.executable, "-c", "print('ranks ready')"], 30, "a smoke run")
    'ranks ready\\n'
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def launch(argv: list[str], timeout_s: float, what: str) -> str:
    """Run ``argv`` with the repository on ``PYTHONPATH``; its combined output, or a test failure naming
    ``what`` when it runs past ``timeout_s`` (the whole process group is killed: both ranks)."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher's child ranks are in the same group
        output, _ = process.communicate()
        pytest.fail(f"{what} hung (killed after {timeout_s} s):\n{output[-3000:]}")
    return output
