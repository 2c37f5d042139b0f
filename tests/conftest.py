import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    # tests read MNIST from ../shared/data (our machines and CI); users elsewhere set it themselves
    if "SPARSE_ENSEMBLES_DATA" not in os.environ and (SHARED / "mnist").is_dir():
        os.environ["SPARSE_ENSEMBLES_DATA"] = str(SHARED)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_small():
    """2000 real MNIST training and 500 test images."""
    from sparse_ensembles.data import load_idx_dataset

    xtr, ytr, xte, yte = load_idx_dataset("mnist")
    return xtr[:2000], ytr[:2000], xte[:500], yte[:500]
