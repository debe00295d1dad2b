"""One module per callback; importing this package registers every check id."""

from lightning_sentinel.checks.non_finite import NonFiniteGuard  # noqa: I001  (import order = catalog order)
from lightning_sentinel.checks.gradients import GradientNormMonitor

__all__ = ["GradientNormMonitor", "NonFiniteGuard"]
