"""One module per callback. Importing this package imports every check module, which registers
its check ids (:mod:`lightning_sentinel.catalog`) and the presets it belongs to (a new module
dropped in this folder is picked up without editing this file)."""

import importlib
import pkgutil

from lightning_sentinel.checks.activations import DeadReLUDetector
from lightning_sentinel.checks.batch_mixing import BatchIndependenceCheck
from lightning_sentinel.checks.curves import LearningCurveMonitor
from lightning_sentinel.checks.data import BatchInspector
from lightning_sentinel.checks.gradients import GradientNormMonitor
from lightning_sentinel.checks.histograms import HistogramLogger
from lightning_sentinel.checks.label_noise import LabelNoiseMonitor
from lightning_sentinel.checks.loss_at_init import LossAtInitCheck
from lightning_sentinel.checks.loss_inputs import LossInputCheck
from lightning_sentinel.checks.modes import TrainEvalModeChecker
from lightning_sentinel.checks.non_finite import NonFiniteGuard
from lightning_sentinel.checks.parameters import ParameterUpdateMonitor
from lightning_sentinel.checks.preflight import LabelShuffleCheck, OverfitBatchCheck
from lightning_sentinel.checks.replicas import ReplicaSyncMonitor
from lightning_sentinel.checks.target_leakage import TargetLeakageCheck
from lightning_sentinel.checks.weight_decay import WeightDecayMonitor

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BatchIndependenceCheck",
    "BatchInspector",
    "DeadReLUDetector",
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
    "TargetLeakageCheck",
    "TrainEvalModeChecker",
    "WeightDecayMonitor",
]
