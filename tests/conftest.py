import os

import lightning.pytorch as pl
import pytest

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)


@pytest.fixture(autouse=True)
def _no_observer_left():
    """A test that ends inside an observation (an exception mid-step) must not leave later tests'
    compiled code running eagerly."""
    yield
    from lightning_sentinel import _eager

    _eager._observers.clear()
