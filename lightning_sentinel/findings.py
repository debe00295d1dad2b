"""The ``Finding`` contract and the per-trainer record of findings.

Every check reports what it saw as a :class:`Finding`. All findings of one run are kept in a
:class:`FindingLog` that belongs to the trainer; :func:`findings` returns them in order.

Example:
    >>> finding = Finding(
    ...     check="non-finite-loss",
    ...     severity=Severity.ERROR,
    ...     message="training loss is nan at step 12",
    ...     step=12,
    ...     epoch=0,
    ...     where="batch 12",
    ...     evidence={"loss": float("nan")},
    ...     hint="look for log(0), division by zero or an fp16 overflow",
    ... )
    >>> finding.severity
    <Severity.ERROR: 'error'>
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import lightning.pytorch as pl


class Severity(str, Enum):
    """How bad a finding is: ``error`` ruins the run, ``warning`` likely costs accuracy, ``info`` is advice."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """Order of severities, ``info`` < ``warning`` < ``error``."""
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


@dataclass(frozen=True)
class Finding:
    """One detected pathology.

    Args:
        check: the check id from the catalog (e.g. ``"exploding-gradients"``).
        severity: :class:`Severity` of the finding.
        message: one line, with the numbers that triggered it.
        step: the trainer's ``global_step`` when it was detected.
        epoch: the trainer's ``current_epoch`` when it was detected.
        where: the module, parameter or batch at fault, or ``None`` for the whole model.
        evidence: the measured numbers, by name.
        hint: what to try, concretely.

    Example:
        >>> Finding("exploding-gradients", Severity.WARNING, "grad norm 3e5", 7, 0, None, {"norm": 3e5}, "clip")
        ... # doctest: +ELLIPSIS
        Finding(check='exploding-gradients', ...)
    """

    check: str
    severity: Severity
    message: str
    step: int
    epoch: int
    where: str | None = None
    evidence: Mapping[str, float] = field(default_factory=dict)
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-compatible values (non-finite floats become strings)."""
        record = dataclasses.asdict(self)
        record["severity"] = self.severity.value
        record["evidence"] = {key: _json_float(value) for key, value in self.evidence.items()}
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Finding:
        """Rebuild a finding written by :meth:`to_dict`."""
        evidence = {key: float(value) for key, value in dict(record.get("evidence", {})).items()}
        return cls(
            check=str(record["check"]),
            severity=Severity(record["severity"]),
            message=str(record["message"]),
            step=int(record["step"]),
            epoch=int(record["epoch"]),
            where=record.get("where"),
            evidence=evidence,
            hint=str(record.get("hint", "")),
        )

    def format(self) -> str:
        """A one-line human summary: ``[severity] check at where (step N): message``."""
        place = f" at {self.where}" if self.where else ""
        return f"[{self.severity.value}] {self.check}{place} (step {self.step}): {self.message}"


def _json_float(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)


class SentinelWarning(UserWarning):
    """Warning emitted for a finding when a check runs with ``on_detect="warn"`` (or ``"stop"``).

    Being a ``UserWarning`` subclass, it can be filtered as usual::

        import warnings
        warnings.filterwarnings("ignore", category=SentinelWarning)
    """


class SentinelError(RuntimeError):
    """Raised for a finding when a check runs with ``on_detect="raise"``; the finding is ``error.finding``."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.format() + (f" Hint: {finding.hint}" if finding.hint else ""))
        self.finding = finding


class FindingLog:
    """All findings of one trainer, in the order they were reported, and where they are written.

    The log is shared by every sentinel callback attached to the same trainer.
    """

    FILE_NAME = "findings.json"

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.directory: str | None = None
        self.checks_run: set[str] = set()
        self.report_printed = False
        # under DDP: the sentinel callbacks of this trainer, in hook order, and the sync bookkeeping
        self.members: list[Any] = []
        self.batches_since_sync = 0
        self.shared_upto = 0  # findings before this index were already exchanged with the other ranks

    def add(self, finding: Finding) -> None:
        """Append ``finding`` to the record."""
        self.findings.append(finding)

    @property
    def path(self) -> str | None:
        """Where ``findings.json`` goes, once the trainer's log directory is known."""
        return None if self.directory is None else os.path.join(self.directory, "sentinel", self.FILE_NAME)

    def write(self) -> str | None:
        """Write every finding as JSON (a list of records). Returns the path, or ``None`` if unknown."""
        path = self.path
        if path is None:
            return None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        payload = [finding.to_dict() for finding in self.findings]
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(temporary, path)
        return path


_LOGS: weakref.WeakKeyDictionary[pl.Trainer, FindingLog] = weakref.WeakKeyDictionary()


def finding_log(trainer: pl.Trainer) -> FindingLog:
    """The :class:`FindingLog` of ``trainer``, created on first use."""
    log = _LOGS.get(trainer)
    if log is None:
        log = FindingLog()
        _LOGS[trainer] = log
    return log


def findings(trainer: pl.Trainer) -> list[Finding]:
    """Every finding reported on ``trainer`` so far, in order.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_sentinel import Sentinel, findings
        >>> trainer = pl.Trainer(callbacks=[Sentinel()], logger=False)
        >>> findings(trainer)
        []
    """
    return list(finding_log(trainer).findings)


def load_findings(path: str | os.PathLike[str]) -> list[Finding]:
    """Read a ``findings.json`` written at the end of a run back into :class:`Finding` objects."""
    with open(path, encoding="utf-8") as handle:
        return [Finding.from_dict(record) for record in json.load(handle)]
