import os

import lightning.pytorch as pl
import pytest

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)


@pytest.fixture(autouse=True)
def _no_observer_left(request):
    yield
    from lightning_sentinel import _eager

    if _eager._observers:
        print(f"\nOBSERVER LEFT after {request.node.nodeid}: {len(_eager._observers)}")
        _eager._observers.clear()
