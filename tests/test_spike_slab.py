"""SGLD-SA / SGHMC-SA (Deng et al. 2019): the SSGL prior's SA updates against the paper's closed
forms, latent domains, omega = 0 as plain SG-MCMC, lockstep resume with latents and masks, the
pruning schedule, temperature annealing, and a CI-sized large-p-small-n regression."""
import copy
import math

import pytest
import torch
from torch import nn

from sparse_ensembles.priors import Gaussian, Laplace, Sum
from sparse_ensembles.priors.spike_slab import SpikeSlabGL
from sparse_ensembles.pruning import SparsitySchedule
from sparse_ensembles.samplers import SGHMC, SGHMCSA, SGLD, SGLDSA, Polynomial, StepDecay

BETA = [0.0, 0.05, -0.4, 2.0]


def _closed_forms(beta, *, v0, v1, sigma, delta, a, b, nu, lam, form="classification", n=None, rss=None):
    """The paper's eqs. (5)-(8) written out with math, one weight at a time."""
    rho = []
    for x in beta:
        slab = math.exp(-x * x / (2 * sigma ** 2 * v1)) / math.sqrt(2 * math.pi * sigma ** 2 * v1) * delta
        spike = math.exp(-abs(x) / (sigma * v0)) / (2 * sigma * v0) * (1 - delta)
        rho.append(slab / (slab + spike))
    k0 = [(1 - r) / v0 for r in rho]
    k1 = [r / v1 for r in rho]
    p = len(beta)
    new_delta = (sum(rho) + a - 1) / (a + b + p - 2)
    B = sum(k * abs(x) for k, x in zip(k0, beta))
    J = sum(k * x * x for k, x in zip(k1, beta))
    A, C = (p + nu + 2, J + nu * lam) if form == "classification" else (n + p + nu, rss + J + nu * lam)
    new_sigma = (B + math.sqrt(B * B + 4 * A * C)) / (2 * A)
    return rho, k0, k1, new_delta, new_sigma


SETTINGS = dict(v0=0.1, v1=10.0, a=2.0, b=3.0, nu=1.5, lam=0.7)


@pytest.mark.parametrize("form", ["classification", "regression"])
def test_sa_update_with_omega_one_equals_the_paper_closed_forms_on_a_hand_example(form):
    prior = SpikeSlabGL(["w"], omega=1.0, form=form, num_data=40, sigma0=0.8, delta0=0.3, rho0=0.5, **SETTINGS)
    params = {"w": torch.tensor(BETA, dtype=torch.float64)}
    if form == "regression":
        prior.observe_rss(12.5)
    prior.update_(params, 0)
    rho, k0, k1, delta, sigma = _closed_forms(BETA, sigma=0.8, delta=0.3, form=form, n=40, rss=12.5, **SETTINGS)
    torch.testing.assert_close(prior.rho["w"], torch.tensor(rho, dtype=torch.float64))
    torch.testing.assert_close(prior.kappa0["w"], torch.tensor(k0, dtype=torch.float64))
    torch.testing.assert_close(prior.kappa1["w"], torch.tensor(k1, dtype=torch.float64))
    assert prior.delta["w"] == pytest.approx(delta, rel=1e-12)
    assert prior.sigma == pytest.approx(sigma, rel=1e-12)
    assert rho[3] > 0.99 and rho[0] < 0.1  # 2.0 is in the slab, 0 in the spike


def test_sa_update_with_a_partial_weight_moves_each_latent_that_fraction_of_the_way():
    w = 0.25
    prior = SpikeSlabGL(["w"], omega=w, sigma0=0.8, delta0=0.3, rho0=0.5, **SETTINGS)
    prior.update_({"w": torch.tensor(BETA, dtype=torch.float64)}, 0)
    rho, *_ = _closed_forms(BETA, sigma=0.8, delta=0.3, **SETTINGS)
    expect_rho = [(1 - w) * 0.5 + w * r for r in rho]
    torch.testing.assert_close(prior.rho["w"], torch.tensor(expect_rho, dtype=torch.float64))
    # kappa uses this step's rho (Algorithm 1's order)
    expect_k0 = [(1 - w) * 0.5 / 0.1 + w * (1 - r) / 0.1 for r in expect_rho]
    torch.testing.assert_close(prior.kappa0["w"], torch.tensor(expect_k0, dtype=torch.float64))


def test_the_prior_gradient_is_the_expected_ssgl_penalty_over_n():
    prior = SpikeSlabGL(["w"], omega=0.0, sigma0=0.5, rho0=0.2, **SETTINGS)
    beta = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64, requires_grad=True)
    prior.neg_log_prob({"w": beta}).backward()
    grads = {"w": torch.zeros(3, dtype=torch.float64)}
    prior.add_grad_(grads, {"w": beta.detach()}, num_data=7)
    torch.testing.assert_close(grads["w"], beta.grad / 7)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _steps(model, opt, k, data=None):
    x, y = data or _data()
    for _ in range(k):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _sghmc_sa(model, **kw):
    args = dict(num_data=64, sparse=["0.weight", "2.weight"], v0=0.05, v1=1.0, a=2.0, b=2.0, nu=1.0, lam=1.0,
                precision=2.0, friction=0.1, temperature=0.01, generator=torch.Generator().manual_seed(3))
    args.update(kw)
    return SGHMCSA(model.named_parameters(), 0.05, **args)


def test_latents_stay_in_their_domains_along_a_chain():
    model = _mlp()
    opt = _sghmc_sa(model, omega=Polynomial(0.5, 1, 0.6))
    for _ in range(30):
        _steps(model, opt, 1)
        s = opt.ssgl
        for n in s.names:
            assert 0 <= float(s.rho[n].min()) and float(s.rho[n].max()) <= 1
            assert float(s.kappa0[n].min()) >= 0 and float(s.kappa1[n].min()) >= 0
            assert 0 < s.delta[n] < 1
        assert s.sigma > 0 and math.isfinite(s.sigma)
    trace = opt.trace()
    assert set(trace) == {"sigma", "delta", "spike_fraction", "sparsity"}


def test_omega_zero_keeps_the_latents_and_equals_sghmc_under_the_fixed_prior_it_starts_from():
    a, b = _mlp(), _mlp()
    sa = _sghmc_sa(a, omega=0.0, rho0=0.3, sigma0=0.5)
    start = {n: t.clone() for n, t in sa.ssgl.state_dict()["rho"].items()}
    sparse = ["0.weight", "2.weight"]
    rest = ["0.bias", "2.bias"]
    # kappa0 |b| / sigma = |b| / scale with scale = sigma v0 / (1 - rho0); kappa1 b^2 / (2 sigma^2)
    # is a Gaussian of precision rho0 / (v1 sigma^2)
    laplace = Laplace(0.5 * 0.05 / 0.7)
    fixed = Sum(_Only(laplace, sparse), Gaussian(0.3 / (1.0 * 0.25), names=sparse), Gaussian(2.0, names=rest))
    plain = SGHMC(b.named_parameters(), 0.05, num_data=64, prior=fixed, friction=0.1, temperature=0.01,
                  generator=torch.Generator().manual_seed(3))
    _steps(a, sa, 15)
    _steps(b, plain, 15)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    assert sa.ssgl.sigma == 0.5 and all(d == 0.5 for d in sa.ssgl.delta.values())
    for n, r in sa.ssgl.state_dict()["rho"].items():
        assert torch.equal(r, torch.full_like(r, 0.3)) and (start == {} or torch.equal(start[n], r))


class _Only(Laplace):
    """A Laplace prior on some parameters (for the fixed-prior reference above)."""

    def __init__(self, inner, names):
        self.scale, self.names = inner.scale, set(names)

    def add_grad_(self, grads, params, num_data):
        super().add_grad_({n: g for n, g in grads.items() if n in self.names}, params, num_data)


@pytest.mark.parametrize("persistent", [True, False])
def test_state_dict_resumes_an_sa_chain_with_pruning_in_lockstep_latents_and_masks_included(persistent):
    prune = dict(target=0.6, decay=0.9, every=2, scope="layer", persistent=persistent, names=["0.weight", "2.weight"])
    a = _mlp()
    opt_a = _sghmc_sa(a, pruning=SparsitySchedule(**prune))
    _steps(a, opt_a, 8)
    blob = copy.deepcopy({"model": a.state_dict(), "opt": opt_a.state_dict()})  # state_dict shares buffers
    _steps(a, opt_a, 8)
    b = _mlp(seed=5)
    b.load_state_dict(blob["model"])
    opt_b = _sghmc_sa(b, pruning=SparsitySchedule(**prune), generator=torch.Generator().manual_seed(99))
    opt_b.load_state_dict(blob["opt"])
    _steps(b, opt_b, 8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = opt_a.ssgl.state_dict(), opt_b.ssgl.state_dict()
    assert sa["sigma"] == sb["sigma"] and sa["delta"] == sb["delta"]
    for key in ("rho", "kappa0", "kappa1"):
        for n in sa[key]:
            assert torch.equal(sa[key][n], sb[key][n])
    if persistent:
        assert {n: torch.equal(m, opt_b.masks[n]) for n, m in opt_a.masks.items()} == {"0.weight": True, "2.weight": True}


def test_sparsity_schedule_rises_to_the_target_and_pruned_weights_stay_zero_when_persistent():
    sched = SparsitySchedule(target=0.8, decay=0.99, every=50)
    assert sched.sparsity(0) == 0 and sched.sparsity(50) == pytest.approx(0.8 * 0.01)
    assert sched.sparsity(50 * 1000) == pytest.approx(0.8, abs=1e-4)
    model = _mlp()
    fast = SparsitySchedule(target=0.5, decay=0.5, every=1, names=["0.weight"])
    opt = SGLD(model.named_parameters(), 0.05, num_data=64, temperature=0.01, pruning=fast,
               generator=torch.Generator().manual_seed(0))
    zeros_before = None
    for k in range(1, 13):
        _steps(model, opt, 1)
        w = model[0].weight
        zeros = w == 0
        assert int(zeros.sum()) >= math.floor(fast.sparsity(k) * w.numel())
        if zeros_before is not None:
            assert bool(zeros[zeros_before].all())  # once pruned, stays pruned
        zeros_before = zeros.clone()
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("persistent", [True, False])
def test_non_persistent_pruning_lets_pruned_weights_regrow_and_persistent_keeps_them_at_zero(persistent):
    model = _mlp()
    sched = SparsitySchedule(target=0.5, decay=0.5, every=1, persistent=persistent, names=["0.weight"])
    opt = SGLD(model.named_parameters(), 0.5, num_data=64, temperature=0.0, pruning=sched)
    _steps(model, opt, 6)
    w = model[0].weight
    pruned = w == 0
    assert float(pruned.float().mean()) >= 0.48 and (opt.masks == {}) == (not persistent)
    # a step whose gradient pushes the pruned weights far out: free ones regrow past the kept ones
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w.grad[pruned] = -100.0
    opt.step()
    regrown = (w != 0) & pruned
    assert float((w == 0).float().mean()) >= 0.48  # the schedule's sparsity still holds
    assert bool(regrown.any()) == (not persistent)


def test_a_temperature_schedule_anneals_the_noise_and_zero_equals_sgd():
    a, b = _mlp(), _mlp()
    sched = SGLD(a.named_parameters(), 0.1, num_data=64, temperature=lambda k: 0.0)
    zero = SGLD(b.named_parameters(), 0.1, num_data=64, temperature=0.0)
    _steps(a, sched, 5)
    _steps(b, zero, 5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # inverse temperature 1000 x 1.005 per epoch of 10 steps, as the authors anneal
    anneal = StepDecay(1e-3, 1 / 1.005, 10)
    assert anneal(0) == 1e-3 and anneal(25) == pytest.approx(1e-3 / 1.005 ** 2)
    opt = SGLD(_mlp().named_parameters(), 0.1, num_data=64, temperature=anneal)
    assert opt.state_dict()["param_groups"][0]["temperature"] is None  # code, not data


def test_sgld_sa_recovers_the_three_nonzero_coefficients_of_a_small_large_p_small_n_regression():
    """n = 100, p = 200, Sigma_ij = 0.6^|i-j|, beta = (3, 2, 1, 0, ...), noise variance 3: the
    posterior mean of SGLD-SA puts beta_1..3 near the truth, in the slab (rho > 0.5), and at most
    a few of the 197 nulls in it."""
    torch.manual_seed(0)
    n, p = 100, 200
    idx = torch.arange(p, dtype=torch.float64)
    cov = 0.6 ** (idx[:, None] - idx[None, :]).abs()
    x = torch.randn(n, p, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    truth = torch.zeros(p, dtype=torch.float64)
    truth[:3] = torch.tensor([3.0, 2.0, 1.0])
    y = x @ truth + math.sqrt(3) * torch.randn(n, dtype=torch.float64)
    beta = nn.Parameter(torch.zeros(p, dtype=torch.float64))
    opt = SGLDSA([("beta", beta)], 0.02, num_data=n, sparse=["beta"], form="regression", v0=0.1, v1=10.0,
                 a=1.0, b=float(p), nu=1.0, lam=1.0, omega=lambda k: min(0.1, 10 / (10 + k) ** 0.7),
                 temperature=1.0, generator=torch.Generator().manual_seed(1))
    draws = []
    for k in range(4000):
        opt.zero_grad()
        sigma = opt.ssgl.sigma
        residual = y - x @ beta
        opt.ssgl.observe_rss(float(residual.detach().pow(2).sum()))
        (residual.pow(2).mean() / (2 * sigma ** 2)).backward()
        opt.step()
        if k >= 2000 and k % 10 == 0:
            draws.append(beta.detach().clone())
    mean = torch.stack(draws).mean(0)
    assert torch.allclose(mean[:3], truth[:3], atol=0.6), mean[:3]
    rho = opt.ssgl.rho["beta"]
    assert bool((rho[:3] > 0.5).all())
    assert int((rho[3:] > 0.5).sum()) <= 4


def test_the_prior_update_overlapped_in_a_worker_thread_gives_the_same_chain_and_latents():
    a, b = _mlp(), _mlp()
    sync = _sghmc_sa(a, omega=Polynomial(0.5, 1, 0.6), overlap_prior_update=False)
    overlapped = _sghmc_sa(b, omega=Polynomial(0.5, 1, 0.6), overlap_prior_update=True, prefetch_noise=True)
    assert overlapped.overlap_prior_update and not sync.overlap_prior_update
    _steps(a, sync, 12)
    _steps(b, overlapped, 12)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = sync.ssgl.state_dict(), overlapped.state_dict()["prior"]["0"]
    assert sa["sigma"] == sb["sigma"] and all(torch.equal(sa["rho"][n], sb["rho"][n]) for n in sa["rho"])
    overlapped.close()


def test_estep_latent_start_sets_rho_to_eq5_of_the_starting_weights_and_the_kappas_from_it():
    w = torch.tensor([[0.0, 1e-5, 5e-4], [0.01, 0.05, -0.2]])
    params = {"w": w}
    prior = SpikeSlabGL(["w"], v0=1e-3, v1=1.0, sigma0=0.1, delta0=0.5, latent_start="estep")
    grads = {"w": torch.zeros_like(w)}
    prior.add_grad_(grads, params, num_data=100)
    rho = prior.rho["w"]
    torch.testing.assert_close(rho, prior.rho_tilde(params)["w"])
    torch.testing.assert_close(prior.kappa0["w"], (1 - rho) / 1e-3)
    torch.testing.assert_close(prior.kappa1["w"], rho / 1.0)
    assert bool((rho[0, :2] < 0.01).all()) and bool((rho[1] > 0.99).all())  # near zero: spike; large: slab
    # the large weights carry (almost) no L1: their gradient is the slab's L2 alone
    l2 = prior.kappa1["w"][1] * w[1] / (0.1 ** 2 * 100)
    torch.testing.assert_close(grads["w"][1], l2, atol=1e-6, rtol=1e-4)
    rho0 = SpikeSlabGL(["w"], v0=1e-3, v1=1.0, sigma0=0.1, rho0=0.999)
    rho0.add_grad_({"w": torch.zeros_like(w)}, params, num_data=100)
    torch.testing.assert_close(rho0.kappa0["w"], torch.full_like(w, 1.0))  # the constant start: an L1 on every weight


def test_estep_latent_start_refuses_explicit_kappas_and_unknown_names():
    with pytest.raises(ValueError, match="latent_start='estep' sets the starting kappas"):
        SpikeSlabGL(["w"], v0=1e-3, v1=1.0, latent_start="estep", kappa0=5e-4)
    with pytest.raises(ValueError, match="latent_start must be 'rho0' or 'estep'"):
        SpikeSlabGL(["w"], v0=1e-3, v1=1.0, latent_start="mean")


def test_config_names_prior_latent_start_when_it_is_unknown_or_clashes_with_explicit_kappas():
    from pathlib import Path

    from sparse_ensembles.experiments import config as config_mod
    cfg = Path(__file__).resolve().parents[1] / "configs" / "mnist_cnn_sa.toml"
    assert config_mod.load(cfg, ["prior.latent_start=estep"]).prior.latent_start == "estep"
    with pytest.raises(config_mod.ConfigError, match="prior.latent_start"):
        config_mod.load(cfg, ["prior.latent_start=mean"])
    with pytest.raises(config_mod.ConfigError, match="prior.latent_start"):
        config_mod.load(cfg, ["prior.latent_start=estep", "prior.kappa0=5e-4"])
