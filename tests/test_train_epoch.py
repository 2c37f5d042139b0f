"""The training loop's divergence check: at the bad minibatch on CPU, or within check_every
minibatches when read lazily (the GPU default), and always before the epoch returns."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparse_ensembles.training import DivergenceError, train_epoch


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(7)]
    return model, torch.optim.SGD(model.parameters(), lr=0.1), batches


def _loss_nan_at(bad):
    calls = []

    def loss_fn(model, batch, state):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        calls.append(len(calls))
        return (loss * float("nan") if len(calls) - 1 == bad else loss), None
    return loss_fn


def test_lazy_loss_check_gives_the_same_mean_loss_and_parameters_as_the_per_step_check():
    out = {}
    for every in (1, 3):
        model, opt, batches = _setup()
        out[every] = (train_epoch(model, opt, batches, check_every=every), model.weight.detach().clone())
    assert out[1][0] == pytest.approx(out[3][0], rel=1e-6)
    assert torch.equal(out[1][1], out[3][1])


@pytest.mark.parametrize("bad,every,window", [(1, 3, "0..2"), (4, 3, "3..5"), (6, 3, "6..6"), (5, 10, "0..6")])
def test_lazy_loss_check_reports_a_non_finite_loss_within_its_window_before_the_epoch_returns(bad, every, window):
    model, opt, batches = _setup()
    with pytest.raises(DivergenceError, match=rf"minibatches {window}\b"):
        train_epoch(model, opt, batches, loss_fn=_loss_nan_at(bad), where="chain 1 epoch 1", check_every=every)


def test_per_step_loss_check_on_cpu_stops_at_the_bad_minibatch_before_its_step():
    model, opt, batches = _setup()
    before = []

    def loss_fn(model, batch, state):
        before.append(model.weight.detach().clone())
        return _inner(model, batch, state)
    _inner = _loss_nan_at(2)
    with pytest.raises(DivergenceError, match="at minibatch 2;"):
        train_epoch(model, opt, batches, loss_fn=loss_fn)  # CPU default: check_every = 1
    assert torch.equal(model.weight.detach(), before[2])  # the bad minibatch took no step
