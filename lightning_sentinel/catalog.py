"""The registry of check ids the code implements.

Each check module registers the ids it owns, and its callback class, when it is imported; the package's
``__init__`` imports every check module, so the registry is complete once ``lightning_sentinel`` is
imported (importing this module imports the package first). This module imports none of them: the checks
depend on the catalog, never the other way round. The registry feeds the README table test,
``lightning-sentinel checks``, and the validation of ``Sentinel(disable=[...])``.

Example:
    >>> from lightning_sentinel.catalog import registered_checks
    >>> "non-finite-loss" in registered_checks()
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_sentinel.findings import Severity


@dataclass(frozen=True)
class CheckSpec:
    """What the documentation says about one check id.

    Args:
        check: the id (kebab-case, public API).
        callback: name of the callback class that owns it.
        severity: the severity its findings usually carry.
        meaning: one line, what it means.
        threshold: the default rule, in words, with numbers.
    """

    check: str
    callback: str
    severity: Severity
    meaning: str
    threshold: str


_REGISTRY: dict[str, CheckSpec] = {}


def register(*specs: CheckSpec) -> None:
    """Add check ids to the registry (idempotent for an identical spec)."""
    for spec in specs:
        known = _REGISTRY.get(spec.check)
        if known is not None and known != spec:
            raise ValueError(f"check id {spec.check!r} is registered twice with different specs")
        _REGISTRY[spec.check] = spec


_PRESET_MEMBERS: list[tuple[int, type, tuple[str, ...]]] = []


def add_to_presets(callback: type, presets: tuple[str, ...], order: int = 100) -> None:
    """Make ``Sentinel(preset=...)`` run a default instance of ``callback`` for each preset named.

    Called by each check module at import. ``Sentinel`` runs its checks by ascending ``order``
    (then registration order): the NaN guard first, so it sees a step before anything else.
    """
    if not any(member is callback for _, member, _ in _PRESET_MEMBERS):
        _PRESET_MEMBERS.append((order, callback, tuple(presets)))
        _PRESET_MEMBERS.sort(key=lambda member: member[0])


def preset_members(preset: str) -> list[type]:
    """The callback classes of ``preset``, in registration order."""
    return [callback for _, callback, presets in _PRESET_MEMBERS if preset in presets]


def registered_checks() -> dict[str, CheckSpec]:
    """Every implemented check id and its spec, grouped by callback in the order ``Sentinel`` runs them."""
    order = {callback.__name__: position for position, callback, _ in _PRESET_MEMBERS}
    specs = sorted(_REGISTRY.values(), key=lambda spec: order.get(spec.callback, 1_000))  # stable
    return {spec.check: spec for spec in specs}


def default_action(spec: CheckSpec) -> str:
    """The default ``on_detect`` of the callback that owns ``spec``."""
    import inspect

    callback = next(member for _, member, _ in _PRESET_MEMBERS if member.__name__ == spec.callback)
    return str(inspect.signature(callback.__init__).parameters["on_detect"].default)


def validate_check_ids(argument: str, ids: list[str]) -> None:
    """Raise ``ValueError`` naming ``argument`` if an id in ``ids`` is not a registered check id."""
    known = registered_checks()
    unknown = [check for check in ids if check not in known]
    if unknown:
        raise ValueError(
            f"`{argument}` must hold registered check ids, got unknown check ids {unknown}; known ids are {sorted(known)}"
        )
