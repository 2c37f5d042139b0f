"""Vectorised SGLD chains (issue 23 item 3) equal separate chains with the same seeds and minibatches."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparse_ensembles.priors import Gaussian, GroupLasso, Sum
from sparse_ensembles.samplers import SGLD
from sparse_ensembles.samplers.vectorized import VectorizedSGLD
from sparse_ensembles.structure import sequential_groups


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(M, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(M, 10, 20, generator=g), torch.randint(0, 3, (M, 10), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize("with_prior,threads", [(False, 1), (True, 1), (True, 2)])
def test_vectorised_chains_equal_separate_chains_with_the_same_seeds_and_batches(with_prior, threads):
    """With 2 noise threads (the default with 2 torch threads) the chains draw side by side in a thread pool."""
    net, M, steps, seeds = _net(), 3, 6, [11, 12, 13]
    prior = (lambda model: Sum(GroupLasso(sequential_groups(model), 3.0), Gaussian(1.0))) if with_prior else (lambda m: None)
    starts = []
    for m in range(M):  # different starting points per chain
        torch.manual_seed(100 + m)
        starts.append({k: v.detach().clone() for k, v in _net().named_parameters()})
    batches = _batches(M, steps)
    vec = VectorizedSGLD(net, seeds, lr=0.05, num_data=500, temperature=0.5, prior=prior(net), starts=starts)
    vec.noise_threads = threads
    for xs, ys in batches:
        vec.losses(xs, ys).sum().backward()
        vec.step()
    assert (vec._pool is not None) == (threads > 1)
    vec.close()
    for m in range(M):
        model = _net()
        model.load_state_dict(starts[m])
        sampler = SGLD(model.named_parameters(), lr=0.05, num_data=500, temperature=0.5, prior=prior(model),
                       generator=torch.Generator().manual_seed(seeds[m]))
        for xs, ys in batches:
            sampler.zero_grad()
            F.cross_entropy(model(xs[m]), ys[m]).backward()
            sampler.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(vec.state_dicts()[m][name], p.detach(), atol=2e-6, rtol=1e-5)


def test_vectorised_chains_differ_from_each_other_by_their_noise():
    vec = VectorizedSGLD(_net(), [1, 2], lr=0.05, num_data=100, temperature=1.0)
    xs, ys = _batches(1, 1)[0]
    vec.losses(xs.expand(2, -1, -1), ys.expand(2, -1)).sum().backward()  # the same batch for both chains
    vec.step()
    a, b = vec.state_dicts()
    assert not torch.equal(a["0.weight"], b["0.weight"])


def test_models_with_running_buffers_are_refused_with_the_reason():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="BatchNorm running statistics"):
        VectorizedSGLD(net, [0, 1], lr=0.1, num_data=10)


def test_dropout_and_priors_with_state_are_refused_naming_why():
    with pytest.raises(ValueError, match="Dropout"):
        VectorizedSGLD(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)), [0, 1], lr=0.1, num_data=10)
    from sparse_ensembles.priors import AdaptiveGaussian
    net = _net()
    with pytest.raises(ValueError, match="priors with state"):
        VectorizedSGLD(net, [0, 1], lr=0.1, num_data=10, prior=AdaptiveGaussian(1.0, 0.1))


def test_a_vectorised_sampler_resumed_from_its_state_dict_continues_the_same_chains():
    batches = _batches(3, 4)

    def run(s, lo, hi):
        for x, y in batches[lo:hi]:
            s.losses(x, y).sum().backward()
            s.step()

    whole = VectorizedSGLD(_net(), [1, 2, 3], lr=0.05, num_data=100, temperature=1.0)
    run(whole, 0, 4)
    first = VectorizedSGLD(_net(), [1, 2, 3], lr=0.05, num_data=100, temperature=1.0)
    run(first, 0, 2)
    resumed = VectorizedSGLD(_net(), [7, 8, 9], lr=0.05, num_data=100, temperature=1.0)  # seeds overwritten
    resumed.load_state_dict(first.state_dict())
    run(resumed, 2, 4)
    for n in whole.names:
        assert torch.equal(whole.params[n], resumed.params[n])
    two = whole.state_dict()
    two["generators"] = two["generators"][:2]
    with pytest.raises(ValueError, match="holds 2 chains"):
        VectorizedSGLD(_net(), [1, 2, 3], lr=0.05, num_data=100).load_state_dict(two)
