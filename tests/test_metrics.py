import math

import pytest
import torch
from torch import nn

from sparse_ensembles import metrics
from sparse_ensembles.models import mlp


def test_ece_of_calibrated_synthetic_predictions_is_near_zero():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    conf = 0.5 + 0.5 * torch.rand(n, generator=g)  # top-1 confidence in [0.5, 1]
    correct = torch.rand(n, generator=g) < conf  # right exactly as often as claimed
    y = torch.zeros(n, dtype=torch.long)
    pred = torch.where(correct, 0, 1)
    probs = torch.zeros(n, 2)
    probs[torch.arange(n), pred] = conf
    probs[torch.arange(n), 1 - pred] = 1 - conf
    assert metrics.ece(probs.log(), y) < 0.01


def test_ece_of_overconfident_predictions_equals_the_gap():
    # always 90% confident, right half the time: ECE = |0.9 - 0.5| = 0.4
    logp = torch.tensor([[0.9, 0.1]] * 10).log()
    y = torch.tensor([0, 1] * 5)
    assert metrics.ece(logp, y) == pytest.approx(0.4, abs=1e-6)


def test_brier_and_nll_and_error_on_hand_worked_example():
    logp = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]).log()
    y = torch.tensor([0, 2])
    assert metrics.brier(logp, y) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.04 + 0.25 + 0.49)) / 2)
    assert metrics.nll(logp, y) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-6)
    assert metrics.error(logp, y) == 0.5


def test_flops_of_the_dense_paper_network_equal_the_hand_count():
    model = mlp([784, 300, 100, 10])
    assert metrics.submatrix_flops(model) == 2 * (784 * 300 + 300 * 100 + 100 * 10) == 532_400
    assert metrics.nonzero_params(model) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_submatrix_flops_count_only_rows_and_columns_holding_nonzeros():
    layer = nn.Linear(5, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 1] = 1.0
        layer.weight[2, 3] = 2.0  # rows {0, 2}, columns {1, 3}: a 2 x 2 sub-matrix
    model = nn.Sequential(layer)
    assert metrics.submatrix_flops(model) == 2 * 2 * 2
    assert metrics.nonzero_macs(model) == 2
