"""The state hook for priors (Prior.update_ / state_dict) and the AdaptiveGaussian SA prior."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from sparse_ensembles.priors import AdaptiveGaussian, Gaussian, Prior, Sum
from sparse_ensembles.samplers import SGHMC, SGLD, Polynomial
from test_samplers import _batches, _net, _train


class _Recorder(Prior):
    """A flat prior that records every hook call."""

    stateful = True

    def __init__(self):
        self.calls = []

    def add_grad_(self, grads, params, num_data):
        pass

    def update_(self, params, step):
        self.calls.append((step, torch.is_grad_enabled(), {n: p.clone() for n, p in params.items()},
                           any(p.requires_grad for p in params.values())))

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        pass


def test_hook_is_called_once_per_step_under_no_grad_with_the_updated_detached_parameters():
    m = _net()
    prior = _Recorder()
    opt = SGLD(m.named_parameters(), 0.05, num_data=100, prior=prior)
    for i, (x, y) in enumerate(_batches(4)):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        assert len(prior.calls) == i + 1
        step, grad_enabled, params, requires_grad = prior.calls[-1]
        assert step == i and not grad_enabled and not requires_grad
        for name, p in m.named_parameters():
            assert torch.equal(params[name], p.detach())  # after this step's update
    assert opt.state_dict()["prior"] == {"calls": 4}


def test_sum_forwards_the_hook_and_state_to_its_stateful_members_only():
    ada = AdaptiveGaussian(1.0, 0.5)
    prior = Sum(Gaussian(2.0), ada)
    assert prior.stateful and not Sum(Gaussian(1.0)).stateful
    params = {"w": torch.full((4,), 2.0)}
    prior.update_(params, 0)
    assert ada.precision == pytest.approx(0.5 * 1.0 + 0.5 * 4 / 16)
    assert prior.state_dict() == {"1": {"precision": ada.precision}}
    fresh = Sum(Gaussian(2.0), AdaptiveGaussian(1.0, 0.5))
    fresh.load_state_dict(prior.state_dict())
    assert fresh.priors[1].precision == ada.precision
    with pytest.raises(ValueError, match="stateful members"):
        fresh.load_state_dict({"0": {"precision": 1.0}})


def _adaptive():
    return Sum(Gaussian(0.1), AdaptiveGaussian(1.0, Polynomial(0.5, 1.0, 0.6), names=["0.weight", "2.weight"]))


@pytest.mark.parametrize("cls,kwargs", [(SGLD, {}), (SGHMC, {"friction": 0.2}), (SGLD, {"prefetch_noise": True})])
def test_resumed_chain_with_an_adaptive_prior_matches_the_uninterrupted_one_bit_for_bit(cls, kwargs):
    batches = _batches(10)
    ref, prior = _net(), _adaptive()
    opt = cls(ref.named_parameters(), 0.05, num_data=200, prior=prior, generator=torch.Generator().manual_seed(3), **kwargs)
    _train(ref, opt, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": ref.state_dict(), "sampler": opt.state_dict()}, buf)  # as a run directory would

    resumed, prior2 = _net(seed=7), _adaptive()  # fresh model, prior and sampler
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(resumed.named_parameters(), 0.05, num_data=200, prior=prior2,
               generator=torch.Generator().manual_seed(99), **kwargs)
    opt2.load_state_dict(ckpt["sampler"])
    for x, y in batches[5:]:  # lockstep
        _train(ref, opt, [(x, y)])
        _train(resumed, opt2, [(x, y)])
        for pa, pb in zip(ref.parameters(), resumed.parameters()):
            assert torch.equal(pa, pb)
        assert prior.state_dict() == prior2.state_dict()
    assert prior.priors[1].precision != 1.0  # it did adapt


def test_adaptive_gaussian_with_omega_zero_is_the_plain_gaussian_bit_for_bit():
    results = []
    for prior in (Gaussian(3.0), AdaptiveGaussian(3.0, 0.0)):
        m = _net()
        opt = SGLD(m.named_parameters(), 0.05, num_data=100, prior=prior, generator=torch.Generator().manual_seed(2))
        _train(m, opt, _batches(8))
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_sa_estimate_moves_toward_d_over_squared_norm_on_a_fixed_theta():
    theta = {"a": torch.full((3, 4), 0.5), "b": torch.full((8,), -0.25)}
    target = 20 / (12 * 0.25 + 8 * 0.0625)  # d / ||theta||^2
    prior = AdaptiveGaussian(1.0, 0.3)
    gaps = []
    for k in range(10):
        prior.update_(theta, k)
        gaps.append(prior.precision - target)
    # tau_k - target = (1 - w)^k (tau_0 - target): a geometric approach from below
    assert gaps[-1] == pytest.approx(0.7 ** 10 * (1.0 - target), rel=1e-5)  # ||theta|| is a float32 reduction
    assert all(g < 0 and abs(g2) < abs(g) for g, g2 in zip(gaps, gaps[1:]))
    em = AdaptiveGaussian(1.0, 1.0)  # omega = 1 is the EM step: straight to the target
    em.update_(theta, 0)
    assert em.precision == pytest.approx(target, rel=1e-6)


def test_adaptive_gaussian_covers_only_the_named_parameters():
    params = {"w": torch.ones(4), "b": torch.full((2,), 3.0)}
    prior = AdaptiveGaussian(2.0, 1.0, names=["w"])
    grads = prior.plus_grad({"w": torch.zeros(4), "b": torch.zeros(2)}, params, num_data=4)
    assert torch.equal(grads["w"], torch.full((4,), 0.5)) and torch.equal(grads["b"], torch.zeros(2))
    prior.update_(params, 0)
    assert prior.precision == pytest.approx(4 / 4)  # d = 4 entries of w, ||w||^2 = 4
    with pytest.raises(KeyError, match="nope"):
        AdaptiveGaussian(1.0, 0.1, names=["nope"]).update_(params, 0)


def test_invalid_sa_weights_name_the_bad_value():
    with pytest.raises(ValueError, match="1.5"):
        AdaptiveGaussian(1.0, 1.5)
    with pytest.raises(ValueError, match="precision0"):
        AdaptiveGaussian(0.0, 0.1)
    prior = AdaptiveGaussian(1.0, lambda k: 2.0)
    with pytest.raises(ValueError, match="step 3"):
        prior.update_({"w": torch.ones(2)}, 3)


def test_loading_prior_state_into_a_sampler_without_a_stateful_prior_fails_loudly():
    m = _net()
    opt = SGLD(m.named_parameters(), 0.05, num_data=100, prior=AdaptiveGaussian(1.0, 0.1))
    _train(m, opt, _batches(2))
    saved = copy.deepcopy(opt.state_dict())
    plain = SGLD(m.named_parameters(), 0.05, num_data=100, prior=Gaussian(1.0))
    with pytest.raises(ValueError, match="stateless"):
        plain.load_state_dict(saved)
    with pytest.raises(ValueError, match="has state"):
        SGLD(m.named_parameters(), 0.05, num_data=100, prior=AdaptiveGaussian(1.0, 0.1)).load_state_dict(plain.state_dict())
