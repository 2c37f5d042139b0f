import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_ensembles.priors import Gaussian
from sparse_ensembles.samplers import SGHMC, SGLD, StepDecay


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_sgld_at_temperature_zero_equals_sgd_with_prior_as_weight_decay_bit_for_bit():
    a, b = _net(), _net()
    N, precision = 1000, 5.0
    sgld = SGLD(a.named_parameters(), 0.1, num_data=N, temperature=0.0, prior=Gaussian(precision))
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, weight_decay=precision / N)
    _train(a, sgld, _batches())
    _train(b, sgd, _batches())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_sghmc_at_temperature_zero_equals_sgd_with_momentum():
    a, b = _net(), _net()
    sghmc = SGHMC(a.named_parameters(), 0.05, num_data=100, temperature=0.0, friction=0.1)
    sgd = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    _train(a, sghmc, _batches())
    _train(b, sgd, _batches())
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
def test_same_seed_noise_at_two_temperatures_differs_by_sqrt_of_temperature_ratio(cls):
    """With zero gradient, one step moves theta by sigma(T) * xi; the same seed gives the same xi."""
    moves = {}
    for t in (0.25, 4.0):
        p = nn.Parameter(torch.zeros(1000))
        opt = cls([("p", p)], 0.01, num_data=50, temperature=t, generator=torch.Generator().manual_seed(7))
        p.grad = torch.zeros_like(p)
        opt.step()
        moves[t] = p.detach().clone()
    torch.testing.assert_close(moves[4.0], moves[0.25] * math.sqrt(4.0 / 0.25), rtol=1e-5, atol=0)
    assert moves[0.25].abs().sum() > 0


@pytest.mark.parametrize("cls,kwargs", [(SGLD, {}), (SGHMC, {"estimate_gradient_noise": True}), (SGLD, {"prefetch_noise": True}),
                                        (SGLD, {"noise": "rademacher", "prefetch_noise": True})])
def test_state_dict_round_trip_resumes_chain_bit_for_bit(cls, kwargs):
    batches = _batches(10)
    ref = _net()
    opt = cls(ref.named_parameters(), StepDecay(0.05, 0.5, 3), num_data=200, prior=Gaussian(1.0),
              generator=torch.Generator().manual_seed(3), **kwargs)
    _train(ref, opt, batches[:5])
    saved_model = {k: v.clone() for k, v in ref.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # as torch.save would freeze it
    _train(ref, opt, batches[5:])

    resumed = _net(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed.named_parameters(), StepDecay(0.05, 0.5, 3), num_data=200, prior=Gaussian(1.0),
               generator=torch.Generator().manual_seed(999), **kwargs)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, batches[5:])
    for pa, pb in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


def test_prefetched_noise_gives_the_same_chain_as_inline_noise():
    results = []
    for prefetch in (False, True):
        m = _net()
        opt = SGLD(m.named_parameters(), 0.05, num_data=100, generator=torch.Generator().manual_seed(5),
                   prefetch_noise=prefetch)
        _train(m, opt, _batches())
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
def test_masked_entries_get_no_update_and_no_noise_bit_for_bit(cls):
    m = _net()
    masks = {"0.weight": torch.rand(8, 5) > 0.5, "2.weight": torch.rand(3, 8) > 0.3}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = cls(m.named_parameters(), 0.05, num_data=100, prior=Gaussian(1.0), masks=masks)
    _train(m, opt, _batches())
    for name, mask in masks.items():
        after = dict(m.named_parameters())[name].detach()
        assert torch.equal(after[~mask], before[name][~mask])
        assert not torch.equal(after[mask], before[name][mask])


def _gaussian_target_samples(cls, steps, lr, **kwargs):
    """Sample N(mu, Sigma) with U = 0.5 (x - mu)^T Sigma^-1 (x - mu) as the 'mean loss', N = 1."""
    mu = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    prec = torch.linalg.inv(cov)
    x = nn.Parameter(mu.clone())
    opt = cls([("x", x)], lr, num_data=1, generator=torch.Generator().manual_seed(0), **kwargs)
    out = torch.empty(steps, 2)
    for i in range(steps):
        x.grad = prec @ (x.detach() - mu)
        opt.step()
        out[i] = x.detach()
    return out[steps // 10:], mu, cov


@pytest.mark.parametrize("cls,lr,kwargs", [(SGLD, 0.01, {}), (SGHMC, 0.01, {"friction": 0.2}),
                                           (SGLD, 0.01, {"noise": "rademacher"})])
def test_sampler_recovers_mean_and_covariance_of_a_gaussian_target(cls, lr, kwargs):
    samples, mu, cov = _gaussian_target_samples(cls, 60000, lr, **kwargs)
    torch.testing.assert_close(samples.mean(0), mu, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), cov, atol=0.1, rtol=0.1)


def test_rademacher_noise_is_plus_minus_one_with_unit_variance_and_reproducible():
    from sparse_ensembles.samplers.sgmcmc import rademacher_

    a = rademacher_(torch.empty(100_003), torch.Generator().manual_seed(0))
    b = rademacher_(torch.empty(100_003), torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 0.01 and abs(a.var().item() - 1) < 0.01
    assert abs((a[1:] * a[:-1]).mean().item()) < 0.01  # neighbouring bits are uncorrelated


def test_invalid_constructor_arguments_name_the_bad_value():
    p = [("w", nn.Parameter(torch.zeros(2)))]
    with pytest.raises(ValueError, match="-0.1"):
        SGLD(p, -0.1, num_data=10)
    with pytest.raises(ValueError, match="num_data"):
        SGLD(p, 0.1, num_data=0)
    with pytest.raises(ValueError, match="temperature"):
        SGLD(p, 0.1, num_data=10, temperature=-1)
    with pytest.raises(ValueError, match="friction"):
        SGHMC(p, 0.1, num_data=10, friction=1.5)
    with pytest.raises(KeyError, match="nope"):
        SGLD(p, 0.1, num_data=10, masks={"nope": torch.ones(2, dtype=torch.bool)})


def test_step_size_schedule_is_applied_per_step():
    p = nn.Parameter(torch.zeros(1))
    opt = SGLD([("p", p)], lambda step: 0.1 * (step + 1), num_data=1, temperature=0.0)
    for _ in range(3):
        p.grad = torch.ones(1)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-(0.1 + 0.2 + 0.3)]))


def test_non_finite_gradient_is_reported_as_divergence():
    p = nn.Parameter(torch.zeros(2))
    opt = SGLD([("p", p)], 0.1, num_data=1)
    p.grad = torch.tensor([float("nan"), 0.0])
    with pytest.raises(FloatingPointError, match="diverged"):
        opt.step()


def test_sghmc_gradient_noise_estimate_reduces_injected_noise():
    """With a noisy constant-mean gradient, the estimate V subtracts lr^2 V from the noise variance."""
    moves = {}
    for estimate in (False, True):
        p = nn.Parameter(torch.zeros(2000))
        opt = SGHMC([("p", p)], 0.1, num_data=1, friction=0.5, estimate_gradient_noise=estimate,
                    generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        for _ in range(200):
            p.grad = torch.randn(2000, generator=g)  # pure gradient noise, variance 1
            opt.step()
        moves[estimate] = opt.state[p]["momentum"].var().item()
    assert moves[True] < moves[False]


def test_cyclical_schedule_is_constant_in_burn_in_then_decays_to_near_zero_each_cycle():
    from sparse_ensembles.samplers import Cyclical

    s = Cyclical(0.2, cycle=10, start=5)
    assert s(0) == s(4) == 0.2 and s(5) == pytest.approx(0.2)
    assert s(14) < 0.01 and s(15) == pytest.approx(0.2)
