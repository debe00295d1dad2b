"""One module per callback; importing this package registers every check id."""

from lightning_sentinel.checks.gradients import GradientNormMonitor
from lightning_sentinel.checks.non_finite import NonFiniteGuard

__all__ = ["GradientNormMonitor", "NonFiniteGuard"]
