import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    # tests read MNIST from ../shared/data (our machines and CI); users elsewhere set it themselves
    if "SPARSE_ENSEMBLES_DATA" not in os.environ and (SHARED / "mnist").is_dir():
        os.environ["SPARSE_ENSEMBLES_DATA"] = str(SHARED)


def need_data(name: str):
    """Skip a test (with the reason) where no directory the loaders search holds ``name``
    (../shared/data, $SPARSE_ENSEMBLES_DATA, /usr/share/datasets, the user cache)."""
    from sparse_ensembles.data.registry import candidate_dirs

    if not any(d.is_dir() for d in candidate_dirs(name)):
        pytest.skip(f"{name} data not found (../shared/data/{name}, $SPARSE_ENSEMBLES_DATA/{name} or /usr/share/datasets/{name})")


@pytest.fixture
def mnist_data():
    need_data("mnist")


@pytest.fixture
def ptb_data():
    need_data("ptb")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_small():
    """2000 real MNIST training and 500 test images (skips where MNIST is not on the machine)."""
    from sparse_ensembles.data import DataError, load_idx_dataset

    try:
        xtr, ytr, xte, yte = load_idx_dataset("mnist")
    except DataError as e:
        pytest.skip(f"MNIST not found: {e}")
    return xtr[:2000], ytr[:2000], xte[:500], yte[:500]
