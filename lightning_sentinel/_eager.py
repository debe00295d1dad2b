"""Compiled models run eagerly while a check observes them.

The checks that look inside a forward pass (torch-function modes that read loss calls and
activations, forward hooks that find the first NaN) do so on a few sampled steps only. Under
``torch.compile`` Dynamo would trace that observation code into the user's graph: every change of
what is observed guards and recompiles the graph, until Dynamo reaches its recompile limit and
falls back to eager for good (with a warning that points into this package). Instead, while any
observer is attached, the compiler's stance is ``"force_eager"`` (``torch.compiler.set_stance``,
torch >= 2.6): the sampled step runs the user's code eagerly, the observers see exactly what an
eager run shows, and the compiled graphs are left untouched for every other step.

Observers are counted: the stance is set when the first attaches and restored when the last
leaves, so several checks sampling the same step share it.

Example:
    >>> observer = object()
    >>> eager_while_observed(observer)
    >>> observed()
    True
    >>> stop_observing(observer)
    >>> observed()
    False
"""

from __future__ import annotations

from typing import Any

_observers: set[int] = set()
_prior_stance: Any = None


def _set_stance(stance: Any) -> Any:
    """Set Dynamo's stance (``"force_eager"`` for a string), returning the prior one, or ``None``
    where torch has no stances (torch < 2.6: observation is traced into the graph as before)."""
    try:
        from torch._dynamo import eval_frame
    except ImportError:  # pragma: no cover  (a torch without Dynamo)
        return None
    setter = getattr(eval_frame, "_set_stance", None)
    make = getattr(eval_frame, "DynamoStance", None)
    if setter is None or make is None:
        return None
    try:
        return setter(make(stance) if isinstance(stance, str) else stance)
    except RuntimeError:  # inside a compiled region: leave the stance alone
        return None


def eager_while_observed(observer: object) -> None:
    """Count ``observer`` as attached; the first one makes compiled code run eagerly."""
    global _prior_stance
    key = id(observer)
    if key in _observers:
        return
    if not _observers:
        _prior_stance = _set_stance("force_eager")
    _observers.add(key)


def stop_observing(observer: object) -> None:
    """Count ``observer`` as gone (safe to call twice); the last one restores the compiler's stance."""
    global _prior_stance
    key = id(observer)
    if key not in _observers:
        return
    _observers.discard(key)
    if not _observers and _prior_stance is not None:
        _set_stance(_prior_stance)
        _prior_stance = None


def observed() -> bool:
    """Whether any observer is attached now (compiled code then runs eagerly)."""
    return bool(_observers)


__all__ = ["eager_while_observed", "observed", "stop_observing"]
