"""The suite's engine: one clock for every per-step check, one host read per hook, and its own cost.

Three small pieces that every check uses and none re-implements:

- :class:`CheckClock` decides which optimizer steps are check steps. It counts optimizer-step
  cycles (training batches that ended in an optimizer step, as Lightning's own logging does:
  every micro-batch of an accumulation window, and every optimizer of a manual-optimization batch,
  belongs to the same cycle), so it survives a resume and all ranks agree. ``Sentinel`` gives all
  of its checks one shared clock; a check used on its own has a clock of its own.
- :class:`DeviceReads` batches the host reads of one hook: checks ``request`` a device tensor with
  a callback, and at the end of the hook the engine concatenates every request into one buffer,
  reads it back once and hands each check its numbers.
- :class:`CostMeter` measures the wall time spent inside the suite's hooks against the time of the
  whole training loop; with a ``budget`` the clock stretches its interval to hold it.

Example:
    >>> clock = CheckClock(every_n_steps=10)
    >>> [cycle for cycle in range(35) if clock.decide(cycle)]  # dense at the start, then every 10th
    [0, 1, 2, 4, 8, 10, 20, 30]
    >>> clock.stretch(25)  # a budget asks for fewer checks: 25 cycles after the last one (30)
    >>> [cycle for cycle in range(35, 90) if clock.decide(cycle)]
    [55, 80]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


def optimizer_cycle(trainer: pl.Trainer) -> int:
    """The index of the optimizer-step cycle the current training batch belongs to (0-based).

    Lightning's count of training batches that stepped the optimizers (its logging step), read
    during the batch: equal for every micro-batch of one accumulation window, once per batch under
    manual optimization whatever the number of optimizers, restored on resume.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    if isinstance(stepped, int):
        return stepped
    return int(trainer.global_step)  # pragma: no cover  (a Lightning without the counter)


def ends_cycle(trainer: pl.Trainer) -> bool:
    """Whether the current training batch is the last micro-batch of its cycle (its optimizer step is done
    by ``on_train_batch_end``): always under manual optimization or without accumulation."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    should_accumulate = getattr(loop, "_should_accumulate", None)
    if callable(should_accumulate):
        return not should_accumulate()
    return True  # pragma: no cover  (a Lightning without it)


class CheckClock:
    """When the checks look: every ``every_n_steps``-th cycle, plus a few early looks at the start.

    Args:
        every_n_steps: cycles between two regular check steps (an integer >= 1).
        warmup_steps: cycles before the first check step (an integer >= 0).

    Counted from the first eligible cycle ``w``, the regular check steps are ``w``,
    ``w + every_n_steps``, ``w + 2 every_n_steps``, ...: the cadence every rule was calibrated on
    (a rule's patience counts regular check steps). Before the first interval is over the clock also
    offers early check steps ``w + 1``, ``w + 2``, ``w + 4``, ``w + 8``, ... (doubling): most faults
    that end a run (a NaN) show in its first steps, and a check that needs no patience
    (``SentinelCallback.LOOKS_EARLY``: the NaN guard) looks there too, at a cost of
    ``log2(every_n_steps)`` extra reads over a whole run. The decision for a cycle is taken once,
    when the cycle is first asked about, and kept for the rest of it: every hook and every check of
    the batch gets the same answer. The interval can be stretched (a budget) while training; the
    next regular check step moves with it.

    Example:
        >>> clock = CheckClock(every_n_steps=10)
        >>> [cycle for cycle in range(45) if clock.decide(cycle)]  # regular and early
        [0, 1, 2, 4, 8, 10, 20, 30, 40]
        >>> clock = CheckClock(every_n_steps=10)
        >>> [cycle for cycle in range(45) if clock.decide(cycle) and not clock.early]
        [0, 10, 20, 30, 40]
    """

    def __init__(self, every_n_steps: int = 10, warmup_steps: int = 0) -> None:
        self.every_n_steps = int(every_n_steps)
        self.warmup_steps = int(warmup_steps)
        self.base_interval = self.every_n_steps
        self.reset()

    def reset(self) -> None:
        """Start a fresh fit: the next check step is the first eligible cycle."""
        self.every_n_steps = self.base_interval
        self._next_due = self.warmup_steps  # the next regular check step
        self._decided: tuple[int, bool, bool] | None = None  # (cycle, due, early)
        self._last_check: int | None = None  # the last regular check step
        self.check_steps = 0  # regular check steps decided in this fit (kept across a resume)

    def decide(self, cycle: int) -> bool:
        """Whether ``cycle`` is a check step, regular or early (the same answer for every question
        about one cycle; :attr:`early` says which)."""
        decided = self._decided
        if decided is not None and decided[0] == cycle:
            return decided[1]
        regular = cycle >= self._next_due
        early = False
        if regular:
            self._next_due = cycle + self.every_n_steps
            self._last_check = cycle
            self.check_steps += 1
        else:
            since = cycle - self.warmup_steps
            early = 0 < since < self.base_interval and since & (since - 1) == 0  # 1, 2, 4, 8, ...
        self._decided = (cycle, regular or early, early)
        return regular or early

    @property
    def early(self) -> bool:
        """Whether the cycle decided last is an early check step (not a regular one)."""
        return self._decided is not None and self._decided[2]

    @property
    def last_check(self) -> int | None:
        """The cycle of the last regular check step decided (``None`` before the first)."""
        return self._last_check

    def due(self, trainer: pl.Trainer) -> bool:
        """Whether the current training batch belongs to a check step (regular or early)."""
        return self.decide(optimizer_cycle(trainer))

    def next_is_due(self, trainer: pl.Trainer) -> bool:
        """Whether the cycle after the current one will be a regular check step (unless a budget
        stretches the interval before it): for the checks that watch the step before a check step."""
        cycle = optimizer_cycle(trainer)
        self.decide(cycle)
        return cycle + 1 >= self._next_due

    def stretch(self, every_n_steps: int) -> None:
        """Use ``every_n_steps`` from now on (the next check step is counted from the last one)."""
        self.every_n_steps = max(int(every_n_steps), 1)
        if self._last_check is not None:
            self._next_due = self._last_check + self.every_n_steps

    def state_dict(self) -> dict[str, int | None]:
        """What a checkpoint keeps: the interval now, the next and the last check step."""
        return {
            "every_n_steps": self.every_n_steps,
            "next_due": self._next_due,
            "last_check": self._last_check,
            "check_steps": self.check_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resume continues the same schedule)."""
        self.every_n_steps = int(state.get("every_n_steps", self.every_n_steps))
        self._next_due = int(state.get("next_due", self._next_due))
        last = state.get("last_check")
        self._last_check = None if last is None else int(last)
        self.check_steps = int(state.get("check_steps", self.check_steps))
        self._decided = None


class Persistence:
    """Whether a condition has held on every check step for a span of training steps, per key.

    With the clock's dense start, "``patience`` checks in a row" would be a few steps only; a rule
    that means "sustained" asks instead for the condition on every check over at least ``span``
    steps (``(patience - 1) x every_n_steps``: what ``patience`` checks cover once the clock is
    regular). A check where the condition fails starts the key afresh.

    Example:
        >>> held = Persistence()
        >>> [held.update("layer", True, step, span=20) for step in (0, 1, 2, 4, 8, 10, 20)]
        [False, False, False, False, False, False, True]
        >>> held.update("layer", False, 30, span=20), held.update("layer", True, 40, span=20)
        (False, False)
    """

    def __init__(self) -> None:
        self.since: dict[str, int] = {}  # key -> the step from which the condition has held

    def update(self, key: str, condition: bool, step: int, span: int) -> bool:
        """Record this check's ``condition`` for ``key`` at ``step``; return whether it has held for ``span`` steps."""
        if not condition:
            self.since.pop(key, None)
            return False
        start = self.since.setdefault(key, step)
        return step - start >= span

    def state_dict(self) -> dict[str, int]:
        """The start step of every condition that holds (for a checkpoint)."""
        return dict(self.since)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.since = {str(key): int(value) for key, value in state.items()}


class DeviceReads:
    """One host read for everything the checks of one hook want to read.

    ``request(tensor, then)`` queues a device tensor; :meth:`flush` concatenates all queued tensors
    (as float32, on the first one's device) and reads them back with one ``tolist``, then calls
    each ``then`` with its own numbers, in request order. An error in a callback is handed to
    ``on_error`` with the request's owner and never reaches the other requests.

    Example:
        >>> reads, seen = DeviceReads(), []
        >>> reads.request(torch.tensor([1.0, 2.0]), seen.append)
        >>> reads.request(torch.tensor([3]), seen.append)
        >>> reads.flush()
        1
        >>> seen
        [[1.0, 2.0], [3.0]]
    """

    def __init__(self) -> None:
        self._queue: list[tuple[Tensor, Callable[[list[float]], None], Any]] = []
        self.reads = 0  # host reads made (one per non-empty flush)

    def request(self, tensor: Tensor, then: Callable[[list[float]], None], owner: Any = None) -> None:
        """Read ``tensor`` at the next :meth:`flush` and call ``then`` with its values (a flat list)."""
        self._queue.append((tensor.detach().reshape(-1), then, owner))

    def flush(self, on_error: Callable[[Any, Exception], None] | None = None) -> int:
        """Read every queued tensor at once and run the callbacks; returns the number of host reads (0 or 1)."""
        queue, self._queue = self._queue, []
        if not queue:
            return 0
        device = queue[0][0].device
        values = torch.cat([tensor.to(device=device, dtype=torch.float32) for tensor, _, _ in queue]).tolist()
        self.reads += 1
        offset = 0
        for tensor, then, owner in queue:
            size = tensor.numel()
            part, offset = values[offset : offset + size], offset + size
            try:
                then(part)
            except Exception as error:
                if on_error is None:
                    raise
                on_error(owner, error)
        return 1

    def __len__(self) -> int:
        return len(self._queue)


class CostMeter:
    """The suite's share of training time: wall time inside its hooks over the training loop's.

    Example:
        >>> meter = CostMeter()
        >>> meter.start_training(now=0.0)
        >>> with meter.inside(clock=iter([1.0, 1.5]).__next__):
        ...     pass
        >>> meter.share(now=10.0)
        0.05
    """

    def __init__(self) -> None:
        self.suite_seconds = 0.0
        self._started: float | None = None
        self._depth = 0
        self._window: tuple[float, float] = (0.0, 0.0)  # (suite seconds, time) at the last take_share

    def start_training(self, now: float | None = None) -> None:
        """Start measuring (at the first training batch of a fit)."""
        self.suite_seconds = 0.0
        self._started = time.perf_counter() if now is None else now
        self._window = (0.0, self._started)

    def take_share(self, now: float | None = None) -> float:
        """The suite's share of the wall time since the previous call (or since training started).

        Example:
            >>> meter = CostMeter()
            >>> meter.start_training(now=0.0)
            >>> meter.suite_seconds = 1.0
            >>> meter.take_share(now=10.0), meter.take_share(now=20.0)
            (0.1, 0.0)
        """
        if self._started is None:
            return math.nan
        now = time.perf_counter() if now is None else now
        seconds, since = self._window
        self._window = (self.suite_seconds, now)
        return (self.suite_seconds - seconds) / (now - since) if now > since else math.nan

    @contextmanager
    def inside(self, clock: Callable[[], float] = time.perf_counter) -> Iterator[None]:
        """Count the block's wall time as the suite's (nested blocks count once)."""
        if self._depth or self._started is None:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth += 1
        began = clock()
        try:
            yield
        finally:
            self._depth -= 1
            self.suite_seconds += clock() - began

    def share(self, now: float | None = None) -> float:
        """The suite's share of the wall time since training started (NaN before it started)."""
        if self._started is None:
            return math.nan
        elapsed = (time.perf_counter() if now is None else now) - self._started
        return self.suite_seconds / elapsed if elapsed > 0 else math.nan


def budget_interval(share: float, interval: int, budget: float, shortest: int, longest: int) -> int:
    """The interval that brings the suite's ``share`` of step time, measured at ``interval``, within ``budget``.

    The suite's cost is almost all on check steps, so it scales as 1 / interval. The interval grows
    (up to ``longest``) while the share is above the budget, and comes back down (never below
    ``shortest``) when the share falls well below it.

    Example:
        >>> budget_interval(0.04, 10, 0.01, 10, 1000)  # 4% at every 10th step: every 40th holds 1%
        40
        >>> budget_interval(0.002, 40, 0.01, 10, 1000)  # far below: check more often again
        20
        >>> budget_interval(0.002, 10, 0.01, 10, 1000)  # but never more often than asked
        10
    """
    if not math.isfinite(share) or share <= 0:
        return interval
    if share > budget:
        return min(max(math.ceil(interval * share / budget), interval + 1), longest)
    if share < budget / 4:
        return max(interval // 2, shortest)
    return interval


__all__ = [
    "CheckClock",
    "CostMeter",
    "DeviceReads",
    "Persistence",
    "budget_interval",
    "ends_cycle",
    "optimizer_cycle",
]
