"""One module per callback. Importing this package imports every check module, which registers
its check ids (:mod:`lightning_sentinel.catalog`) and the presets it belongs to."""

import importlib
import pkgutil

from lightning_sentinel.checks.gradients import GradientNormMonitor
from lightning_sentinel.checks.non_finite import NonFiniteGuard

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["GradientNormMonitor", "NonFiniteGuard"]
