"""Count the aten operations that lightning-sentinel code dispatches, per training step.

A ``TorchDispatchMode`` sees every aten op the process runs. Each op is charged to the nearest
calling frame outside torch's own code: it counts when that frame lies in the ``lightning_sentinel``
package. An op that a sentinel ``TorchFunctionMode`` merely passes on (the user's own op, seen by a
``__torch_function__`` on its way) is the user's, not the suite's, and does not count. Used with
:class:`benchmarks.host_reads.HostReadCounter` by ``benchmarks/overhead.py`` and
``tests/test_sync_count.py`` to say, step by step, whether the suite touched a tensor at all.

Example:
    >>> import torch
    >>> with SentinelOpCounter() as counter:
    ...     _ = torch.ones(2) + 1  # this file is not in lightning_sentinel: not counted
    >>> counter.total
    0
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_sentinel
from benchmarks.host_reads import _owner

_PACKAGE_DIR = os.path.dirname(os.path.abspath(lightning_sentinel.__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def sentinel_frame(frame: Any) -> Any:
    """The lightning_sentinel frame an op made from ``frame`` is charged to, or ``None`` (not the suite's)."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_DIR):
            frame = frame.f_back
            continue
        if filename.startswith(_PACKAGE_DIR) and frame.f_code.co_name == "__torch_function__":
            frame = frame.f_back  # a mode passing the user's op on: charge whoever called it
            continue
        return frame if filename.startswith(_PACKAGE_DIR) else None
    return None


class SentinelOpCounter(TorchDispatchMode):
    """Context manager counting the aten ops dispatched by ``lightning_sentinel`` code.

    ``ops`` maps ``(check file, aten op)`` to a count; :meth:`take` returns the counts since its
    last call (use it once per training step).
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[tuple[str, str]] = Counter()
        self._taken: Counter[tuple[str, str]] = Counter()

    @property
    def total(self) -> int:
        """All ops counted so far."""
        return sum(self.ops.values())

    def take(self) -> Counter[tuple[str, str]]:
        """The ops counted since the previous call."""
        new = self.ops - self._taken
        self._taken = Counter(self.ops)
        return new

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        frame = sentinel_frame(sys._getframe(1))
        if frame is not None:
            self.ops[(_owner(frame), str(func.overloadpacket.__name__))] += 1
        return func(*args, **(kwargs or {}))
