"""``lightning-sentinel doctor --config cfg.yaml``: the preflight trials and first-batch checks of a
LightningCLI configuration, without a training run.

The model and data are built from the config exactly as ``LightningCLI`` would build them; a fresh
``Trainer`` (the config's precision and gradient accumulation, no logger, no checkpoint, no
validation) runs ``Sentinel(preset="full")`` for a single optimizer step: the preflight trials run
on copies of the model, the first-batch checks on the real first batch. Nothing is saved but
``findings.json``.

Example:
    >>> from lightning_sentinel.doctor import has_errors
    >>> has_errors([])
    False
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl

from lightning_sentinel.findings import Finding, SentinelWarning, Severity, finding_log, findings
from lightning_sentinel.suite import Sentinel


def has_errors(found: Sequence[Finding]) -> bool:
    """Whether any finding has ``error`` severity (the doctor's exit status)."""
    return any(finding.severity is Severity.ERROR for finding in found)


@dataclass(frozen=True)
class Diagnosis:
    """What ``doctor --config`` found: the findings, the check ids that ran, and the JSON file."""

    findings: list[Finding]
    checks: list[str]
    path: str | None


def diagnose_config(config_path: str | os.PathLike[str], root_dir: str | os.PathLike[str]) -> Diagnosis:
    """Build model and data from a LightningCLI config and run the preflight trials on them.

    ``findings.json`` is written under ``<root_dir>/sentinel/``. Raises ``ImportError`` with an
    install hint when LightningCLI's ``jsonargparse`` is missing.
    """
    try:
        from lightning.pytorch.cli import LightningCLI
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "`doctor --config` needs LightningCLI: pip install 'jsonargparse[signatures]'"
        ) from error
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=["--config", str(config_path), "--trainer.logger=false"],
            save_config_callback=None,
            seed_everything_default=0,
        )
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[Sentinel(preset="full", on_detect="warn")],
        precision=cli.trainer.precision,
        accumulate_grad_batches=cli.trainer.accumulate_grad_batches,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(root_dir),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SentinelWarning)  # the report shows every finding
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a Lightning-internal deprecation
        trainer.fit(cli.model, datamodule=cli.datamodule)
    log = finding_log(trainer)
    return Diagnosis(findings(trainer), sorted(log.checks_run), log.write())
