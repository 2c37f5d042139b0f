"""Issue 22's building blocks: the authors' summed-loss settings in our units, the step schedule for
chains, sampler.num_data, SA on sigma^2, and the authors' omega = 0 baseline at fixed kappas."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparse_ensembles.experiments import config as config_mod
from sparse_ensembles.experiments.stages import Context, make_sampler
from sparse_ensembles.priors import Gaussian
from sparse_ensembles.priors.spike_slab import SpikeSlabGL
from sparse_ensembles.samplers import MultiStep, from_summed_loss
from sparse_ensembles.samplers.schedules import resolve


def test_deng_et_al_cifar_settings_convert_to_lr_1e_4_n_50000_and_temperature_1e_3():
    s = from_summed_loss(2e-9, 50_000, batch_size=1000, inverse_temperature=1000, anneal=1.005, epochs=1000,
                         lr_milestones=(700, 900))
    assert s.lr == pytest.approx(1e-4) and s.num_data == 50_000 and s.temperature == pytest.approx(1e-3)
    assert s.steps_per_epoch == 50 and s.lr_milestones == (700, 900) and s.lr_factor == 0.1
    # the same step in both units: eta * grad(N * mean) == lr * grad(mean); noise 2 eta / beta == 2 lr T / N
    g_mean = 0.37
    assert 2e-9 * (50_000 * g_mean) == pytest.approx(s.lr * g_mean)
    assert 2 * 2e-9 / 1000 == pytest.approx(2 * s.lr * s.temperature / s.num_data)
    with pytest.raises(ValueError, match="inside the chain"):
        from_summed_loss(2e-9, 50_000, batch_size=1000, epochs=100, lr_milestones=(700,))


def test_multistep_lr_is_divided_by_the_factor_at_each_milestone():
    lr = MultiStep(1e-4, (35_000, 45_000), 0.1)
    assert [lr(k) for k in (0, 34_999, 35_000, 44_999, 45_000, 10 ** 6)] == pytest.approx(
        [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])


def _ctx(overrides, steps=10, num_train=640):
    cfg = config_mod.from_dict({"sampler": {"kind": "sghmc", "lr": 0.01, "burn_in": 10, "thin": 5, "samples": 2,
                                            **overrides}})
    task = SimpleNamespace(steps_per_epoch=lambda: steps, num_train=num_train)
    return Context(cfg, task, out=None, device=torch.device("cpu"), progress=False)


@pytest.mark.parametrize("unit,milestones", [("epoch", [14.0, 18.0]), ("fraction", [0.7, 0.9])])
def test_the_chain_step_schedule_reaches_the_sampler_with_milestones_in_epochs_or_fractions(unit, milestones):
    ctx = _ctx({"schedule": "step", "lr_milestones": milestones, "milestone_unit": unit, "lr_factor": 0.5})
    sampler = make_sampler(ctx, nn.Linear(3, 2), Gaussian(1.0), seed=0)
    lr = sampler.param_groups[0]["lr"]  # 20 epochs of 10 steps: milestones at steps 140 and 180
    assert [resolve(lr, k) for k in (0, 139, 140, 179, 180)] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])


def test_sampler_num_data_reaches_the_sampler_and_defaults_to_the_training_set_size():
    assert make_sampler(_ctx({}), nn.Linear(3, 2), Gaussian(1.0), seed=0).num_data == 640
    assert make_sampler(_ctx({"num_data": 50_000}), nn.Linear(3, 2), Gaussian(1.0), seed=0).num_data == 50_000


@pytest.mark.parametrize("bad,match", [({"lr_milestones": [3.0]}, "schedule = 'step'"),
                                       ({"schedule": "step"}, "at least one milestone"),
                                       ({"schedule": "step", "lr_milestones": [25.0]}, "inside the chain"),
                                       ({"num_data": -1}, "num_data")])
def test_bad_step_schedules_and_num_data_are_config_errors_naming_the_key(bad, match):
    with pytest.raises(config_mod.ConfigError, match=match):
        _ctx(bad)


def test_sa_on_sigma2_averages_the_square_of_the_scale_and_equals_its_closed_form():
    beta = torch.tensor([0.0, 0.05, -0.4, 2.0], dtype=torch.float64)
    settings = dict(v0=0.1, v1=10.0, a=2.0, b=3.0, nu=1.5, lam=0.7, sigma0=0.8, delta0=0.3, rho0=0.5)
    full = SpikeSlabGL(["w"], omega=1.0, **settings)
    full.update_({"w": beta}, 0)
    target = full.sigma  # the M-step's sigma~ (omega = 1: both forms land on it)
    w = 0.25
    on_sigma = SpikeSlabGL(["w"], omega=w, **settings)
    on_sigma2 = SpikeSlabGL(["w"], omega=w, sa_on="sigma2", **settings)
    for prior in (on_sigma, on_sigma2):
        prior.update_({"w": beta}, 0)
    # sigma~ depends on this step's kappas, which the partial weight also moves: recompute it
    k0, k1 = on_sigma.kappa0["w"], on_sigma.kappa1["w"]
    B, J, A = float((k0 * beta.abs()).sum()), float((k1 * beta ** 2).sum()), 4 + 1.5 + 2
    tilde = (B + math.sqrt(B * B + 4 * A * (J + 1.5 * 0.7))) / (2 * A)
    assert on_sigma.sigma == pytest.approx((1 - w) * 0.8 + w * tilde, rel=1e-12)
    assert on_sigma2.sigma == pytest.approx(math.sqrt((1 - w) * 0.8 ** 2 + w * tilde ** 2), rel=1e-12)
    assert on_sigma2.sigma != pytest.approx(on_sigma.sigma, rel=1e-6) and target > 0
    with pytest.raises(ValueError, match="sa_on"):
        SpikeSlabGL(["w"], omega=w, sa_on="tau", v0=0.1, v1=1.0)


def test_the_authors_plain_baseline_omega_zero_keeps_its_kappas_at_their_start_values():
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=torch.float64)
    prior = SpikeSlabGL(["w"], omega=0.0, v0=0.005, v1=1e-5, kappa0=5e-4, kappa1=5e-4, sa_on="sigma2")
    for step in range(5):
        prior.update_({"w": w}, step)
        w = w + 0.1 * torch.randn_like(w)
    assert torch.equal(prior.kappa0["w"], torch.full_like(w, 5e-4))
    assert torch.equal(prior.kappa1["w"], torch.full_like(w, 5e-4))
    assert prior.sigma == 1.0


def test_sgld_sa_passes_sa_on_and_latent_start_to_its_spike_slab_prior():
    from sparse_ensembles.samplers import SGLDSA
    w = nn.Parameter(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))
    opt = SGLDSA([("w", w)], lr=0.0, num_data=10, sparse=["w"], v0=0.1, v1=10.0, omega=0.0, sa_on="sigma2",
                 latent_start="estep", generator=torch.Generator().manual_seed(1))
    assert opt.ssgl.sa_on == "sigma2" and opt.ssgl.latent_start == "estep"
    w.grad = torch.zeros_like(w)
    opt.step()  # lr 0 and omega 0: w and the latents stay where they started
    # the estep start: rho is eq. (5) of the starting weights, not rho0 = 0.5 everywhere
    assert torch.allclose(opt.ssgl.rho["w"], opt.ssgl.rho_tilde({"w": w.detach()})["w"])
    assert not torch.allclose(opt.ssgl.rho["w"], torch.full_like(w, 0.5))
