"""Detection cases of :class:`~lightning_sentinel.checks.loss_at_init.LossAtInitCheck`: the loss at init.

Example:
    >>> sorted(case.name for case in CASES if not case.healthy)
    ['final-layer-50x-cnn', 'final-layer-50x-mlp', 'regression-head-not-centred']
"""

from __future__ import annotations

from torch import nn

from benchmarks.detection import zoo, zoo_preflight_init
from benchmarks.detection.cases import Built, Case

LOSS_AT_INIT = "loss-at-init"
_QUIET: frozenset[str] = frozenset()


# ====================================================================== healthy builders
def _bce_imbalanced_prior_bias() -> Built:
    """Breast cancer (63% positive) with the final bias set to the log-odds of the prior: starts below ln 2."""
    train, val = zoo.breast_cancer_loaders(batch_size=32)
    network = zoo.mlp([30, 32, 1])
    nn.init.constant_(network[-1].bias, 0.53)  # log(0.63 / 0.37)
    return zoo.ZooModule(network, nn.BCEWithLogitsLoss(), "adam", lr=3e-3), train, val


def _ce_sum_reduction() -> Built:
    """Digits MLP with a summed (not averaged) cross-entropy: the loss is 64x larger, the init is fine."""
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_preflight_init.mlp_for_digits()
    return zoo.ZooModule(network, nn.CrossEntropyLoss(reduction="sum"), "sgd", lr=1e-3), train, val


def _regression_centred_head() -> Built:
    """Targets of mean 100 with the head's bias set to the target mean (Karpathy's fix): a healthy start."""
    train, val = zoo_preflight_init.shifted_diabetes_loaders()
    network = zoo.mlp([10, 64, 1])
    nn.init.constant_(network[-1].bias, 100.0)
    return zoo.ZooModule(network, nn.MSELoss(), "adam", lr=3e-3), train, val


# ====================================================================== faulty builders
def _final_layer_50x_mlp() -> Built:
    train, val = zoo.digits_loaders(batch_size=64)
    network = zoo_preflight_init.scale_final_layer_(zoo_preflight_init.mlp_for_digits(), 50.0)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=1e-3), train, val


def _final_layer_50x_cnn() -> Built:
    train, val = zoo.digits_loaders(batch_size=64, images=True)
    network = zoo_preflight_init.scale_final_layer_(zoo.DigitsCNN(), 50.0)
    return zoo.ZooModule(network, nn.CrossEntropyLoss(), "adam", lr=2e-3), train, val


def _regression_head_not_centred() -> Built:
    train, val = zoo_preflight_init.shifted_diabetes_loaders()
    return zoo.ZooModule(zoo.mlp([10, 64, 1]), nn.MSELoss(), "adam", lr=3e-3), train, val


CASES: tuple[Case, ...] = (
    Case(
        "bce-prior-bias-breast-cancer",
        True,
        _QUIET,
        _bce_imbalanced_prior_bias,
        "binary classifier whose final bias starts at the log-odds of the 63% positive share (good init)",
        {"max_steps": 40},
    ),
    Case(
        "ce-sum-reduction-mlp",
        True,
        _QUIET,
        _ce_sum_reduction,
        "digits MLP with CrossEntropyLoss(reduction='sum'): a 64x larger loss that is no init fault",
        {"max_steps": 40},
    ),
    Case(
        "regression-centred-head",
        True,
        _QUIET,
        _regression_centred_head,
        "regression on targets of mean 100 whose head's bias starts at the target mean",
        {"max_steps": 40},
    ),
    Case(
        "final-layer-50x-mlp",
        False,
        frozenset({LOSS_AT_INIT}),
        _final_layer_50x_mlp,
        "digits MLP whose final layer is initialised 50x too large: the first loss is far above ln 10",
        {"max_steps": 40},
    ),
    Case(
        "final-layer-50x-cnn",
        False,
        frozenset({LOSS_AT_INIT}),
        _final_layer_50x_cnn,
        "digits CNN whose final layer is initialised 50x too large: the first loss is far above ln 10",
        {"max_steps": 40},
    ),
    Case(
        "regression-head-not-centred",
        False,
        frozenset({LOSS_AT_INIT}),
        _regression_head_not_centred,
        "regression on targets of mean 100 (std 1) with a head that starts at 0: MSE ~10^4 x the target variance",
        {"max_steps": 40},
    ),
)
