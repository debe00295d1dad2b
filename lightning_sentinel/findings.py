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
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


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

    The log is shared by every sentinel callback attached to the same trainer. It also keeps what the
    report must say besides the findings: the check ids that stopped being watched after a check's own
    error (:attr:`unwatched`), and where ``findings.json`` really went when its usual place could not
    be written.

    Example:
        >>> log = FindingLog()
        >>> log.stop_watching(["dead-relu"], "DeadReLUDetector failed in `on_train_batch_end` (KeyError: 'x')")
        >>> log.unwatched
        {'dead-relu': "DeadReLUDetector failed in `on_train_batch_end` (KeyError: 'x')"}
    """

    FILE_NAME = "findings.json"

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.directory: str | None = None
        self.checks_run: set[str] = set()
        self.report_printed = False
        # check id -> why it is no longer watched (its callback failed and switched itself off)
        self.unwatched: dict[str, str] = {}
        # outputs (a file, a logger's method, the console) that failed once: told once, then skipped
        self.failed_outputs: dict[str, str] = {}
        self.written_to: str | None = None  # where findings.json was last written (None: nowhere yet)
        self.cost_note: str | None = None  # what the suite measured of its own cost (``Sentinel``)
        self._printed_payload: str | None = None  # the JSON last printed when no file could be written
        # under DDP: the sentinel callbacks of this trainer, in hook order, and the sync bookkeeping
        self.members: list[Any] = []
        self.shared_upto = 0  # findings before this index were already exchanged with the other ranks

    def add(self, finding: Finding) -> None:
        """Append ``finding`` to the record."""
        self.findings.append(finding)

    def stop_watching(self, checks: Iterable[str], reason: str) -> None:
        """Record that ``checks`` are no longer watched in this fit, and why (the report names them)."""
        for check in checks:
            self.unwatched.setdefault(check, reason)

    def output_failed(self, output: str, error: BaseException, consequence: str) -> bool:
        """Note that writing to ``output`` failed; returns whether this is its first failure.

        The caller warns (once, on the first failure) with ``consequence``: what happens instead.
        Detection goes on either way: an output that fails is a recording problem, never a reason
        to stop watching.
        """
        if output in self.failed_outputs:
            return False
        self.failed_outputs[output] = f"{type(error).__name__}: {error}"
        warnings.warn(
            SentinelWarning(
                f"lightning-sentinel could not write to {output} ({type(error).__name__}: {error}); "
                f"{consequence}. Detection goes on: every check still watches and acts."
            ),
            stacklevel=3,
        )
        return True

    def can_write(self, output: str) -> bool:
        """Whether ``output`` has not failed before (a failed output is skipped from then on)."""
        return output not in self.failed_outputs

    @property
    def path(self) -> str | None:
        """Where ``findings.json`` goes, once the trainer's log directory is known."""
        return None if self.directory is None else os.path.join(self.directory, "sentinel", self.FILE_NAME)

    def fallback_path(self) -> str:
        """The writable place ``findings.json`` falls back to when :attr:`path` cannot be written.

        A folder of its own under the system's temporary directory, named after the process and this
        log, so two runs never overwrite each other's file.
        """
        name = f"run-{os.getpid()}-{id(self):x}"
        return os.path.join(tempfile.gettempdir(), "lightning-sentinel", name, self.FILE_NAME)

    def write(self) -> str | None:
        """Write every finding as JSON (a list of records); never raises.

        Returns the path written: :attr:`path`, or, when that cannot be written (a read-only
        directory, a full disk), :meth:`fallback_path`, said once in a :class:`SentinelWarning`.
        When no place can be written, the findings go to the console as JSON (said in the same
        warning) and ``None`` is returned. ``None`` too when the log directory is not known yet.
        """
        path = self.path
        if path is None:
            return None
        payload = json.dumps([finding.to_dict() for finding in self.findings], indent=2)
        places = [path] if self.can_write(path) else []
        fallback = self.fallback_path()
        places.append(fallback)
        for place in places:
            try:
                _write_atomically(place, payload)
            except OSError as error:
                if place == path:
                    self.output_failed(path, error, f"findings.json goes to {fallback} instead")
                    continue
                self.output_failed(fallback, error, "the findings are printed to the console as JSON instead")
                if payload != self._printed_payload:  # each new state of the record once
                    self._printed_payload = payload
                    rank_zero_info(
                        f"lightning-sentinel findings (JSON, no file could be written):\n{payload}"
                    )
                self.written_to = None
                return None
            self.written_to = place
            return place
        return None  # pragma: no cover  (the fallback is always tried)


def _write_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


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
