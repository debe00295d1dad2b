"""Count the host reads of tensors (``.item()``, ``.tolist()``, ``float(t)``...) made by lightning-sentinel code.

On an accelerator every host read of a device tensor waits for the device (a host-device sync). On
the CPU nothing waits, but the same calls show where the code *would* sync: this counter patches the
reading methods of ``torch.Tensor`` and attributes each call to the nearest calling frame outside
torch's own code. A call counts when that frame lies in the ``lightning_sentinel`` package; reads
made by the user's code, Lightning or torch internals do not count, and a read nested inside a
counted one (a ``TorchFunctionMode`` re-dispatching it) counts once.

Used by ``tests/test_sync_count.py`` and ``benchmarks/overhead.py``.

Example:
    >>> import torch
    >>> with HostReadCounter() as counter:
    ...     _ = torch.ones(2).sum().item()  # this file is not in lightning_sentinel: not counted
    >>> counter.total
    0
"""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from typing import Any

import torch

import lightning_sentinel

# the Tensor methods that copy a value to the host (Tensor.__bool__ also covers `if t:` and `not t`)
READ_METHODS: tuple[str, ...] = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(lightning_sentinel.__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _owner(frame: Any) -> str:
    """The file, relative to the package, of the check that made the read: the nearest frame in a public
    ``checks/<name>.py`` module, else the file of ``frame`` itself (helpers are charged to their caller)."""
    first = frame.f_code.co_filename[len(_PACKAGE_DIR) :]
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        name = frame.f_code.co_filename[len(_PACKAGE_DIR) :]
        if name.startswith("checks" + os.sep) and not os.path.basename(name).startswith("_"):
            return name.replace(os.sep, "/")
        frame = frame.f_back
    return first.replace(os.sep, "/")


class HostReadCounter:
    """Context manager counting host reads of tensors made by ``lightning_sentinel`` frames.

    ``reads`` maps ``(check file, function name, method)`` to a count (the check file: see
    :func:`_owner`; the function: the one that called the method); :meth:`take` returns the reads
    since its last call (use it once per training step). Only CPU tensors are seen on a CPU-only
    machine: the point is to find the calls that would be host-device syncs on an accelerator.
    """

    def __init__(self) -> None:
        self.reads: Counter[tuple[str, str, str]] = Counter()
        self._taken: Counter[tuple[str, str, str]] = Counter()
        self._originals: dict[str, Any] = {}
        self._local = threading.local()

    @property
    def total(self) -> int:
        """All reads counted so far."""
        return sum(self.reads.values())

    def take(self) -> Counter[tuple[str, str, str]]:
        """The reads counted since the previous call."""
        new = self.reads - self._taken
        self._taken = Counter(self.reads)
        return new

    def __enter__(self) -> HostReadCounter:
        for method in READ_METHODS:
            original = getattr(torch.Tensor, method)
            self._originals[method] = original
            setattr(torch.Tensor, method, self._wrap(method, original))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for method, original in self._originals.items():
            setattr(torch.Tensor, method, original)
        self._originals = {}

    def _wrap(self, method: str, original: Any) -> Any:
        counter = self

        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if getattr(counter._local, "busy", False):
                return original(tensor, *args, **kwargs)
            counter._local.busy = True
            try:
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
                    frame = frame.f_back
                if frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
                    counter.reads[(_owner(frame), frame.f_code.co_name, method)] += 1
                return original(tensor, *args, **kwargs)
            finally:
                counter._local.busy = False

        read.__name__ = method
        return read
