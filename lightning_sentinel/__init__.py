"""lightning-sentinel: PyTorch Lightning callbacks that catch training pathologies while they happen.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_sentinel import Sentinel, findings
    >>> trainer = pl.Trainer(callbacks=[Sentinel()], logger=False)
    >>> findings(trainer)
    []
"""

from lightning_sentinel._validate import ArgumentTypeError
from lightning_sentinel.base import SentinelCallback
from lightning_sentinel.catalog import CheckSpec, registered_checks
from lightning_sentinel.checks import (
    BatchIndependenceCheck,
    BatchInspector,
    DeadReLUDetector,
    GradientNormMonitor,
    HistogramLogger,
    LabelNoiseMonitor,
    LabelShuffleCheck,
    LearningCurveMonitor,
    LossAtInitCheck,
    LossInputCheck,
    NonFiniteGuard,
    OverfitBatchCheck,
    ParameterUpdateMonitor,
    ReplicaSyncMonitor,
    TargetLeakageCheck,
    TrainEvalModeChecker,
    WeightDecayMonitor,
)
from lightning_sentinel.findings import (
    Finding,
    SentinelError,
    SentinelWarning,
    Severity,
    findings,
    load_findings,
)
from lightning_sentinel.suite import Sentinel

__version__ = "0.1.0.dev0"

__all__ = [
    "ArgumentTypeError",
    "BatchIndependenceCheck",
    "BatchInspector",
    "CheckSpec",
    "DeadReLUDetector",
    "Finding",
    "GradientNormMonitor",
    "HistogramLogger",
    "LabelNoiseMonitor",
    "LabelShuffleCheck",
    "LearningCurveMonitor",
    "LossAtInitCheck",
    "LossInputCheck",
    "NonFiniteGuard",
    "OverfitBatchCheck",
    "ParameterUpdateMonitor",
    "ReplicaSyncMonitor",
    "Sentinel",
    "SentinelCallback",
    "SentinelError",
    "SentinelWarning",
    "Severity",
    "TargetLeakageCheck",
    "TrainEvalModeChecker",
    "WeightDecayMonitor",
    "__version__",
    "findings",
    "load_findings",
    "registered_checks",
]
