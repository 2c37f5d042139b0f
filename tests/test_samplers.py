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
                                        (SGLD, {"noise": "rademacher", "prefetch_noise": True}),
                                        (SGLD, {"noise": "gaussian_parallel", "prefetch_noise": True}),
                                        (SGHMC, {"noise": "gaussian_parallel"})])
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


@pytest.mark.parametrize("noise", ["gaussian", "gaussian_parallel"])
def test_prefetched_noise_gives_the_same_chain_as_inline_noise(noise):
    results = []
    for prefetch in (False, True):
        m = _net()
        opt = SGLD(m.named_parameters(), 0.05, num_data=100, generator=torch.Generator().manual_seed(5),
                   prefetch_noise=prefetch, noise=noise)
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
                                           (SGLD, 0.01, {"noise": "rademacher"}),
                                           (SGHMC, 0.01, {"friction": 0.2, "noise": "gaussian_parallel"})])
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


@pytest.mark.parametrize("kind", [SGLD, SGHMC])
def test_lazy_finiteness_check_reports_a_bad_step_within_check_every_steps_and_before_any_state_dict(kind):
    """check_every > 1 (the GPU default: no host sync per step) reads the flag every k steps, and
    state_dict() reads it first, so a checkpoint never holds a diverged chain."""
    assert kind([("p", nn.Parameter(torch.zeros(2)))], 0.1, num_data=1).check_every == 1  # CPU: every step

    def chain():
        p = nn.Parameter(torch.zeros(2))
        opt = kind([("p", p)], 0.1, num_data=1, temperature=0.0)
        opt.check_every = 4
        return p, opt

    p, opt = chain()
    for step in range(1, 4):  # step 2 is bad; 1..3 return
        p.grad = torch.tensor([float("nan"), 0.0]) if step == 2 else torch.ones(2)
        opt.step()
    p.grad = torch.ones(2)
    with pytest.raises(FloatingPointError, match=r"steps 1\.\.4 .*check_every = 4"):
        opt.step()
    p, opt = chain()
    for step in range(1, 7):  # the first read (step 4) is clean; step 6 is bad
        p.grad = torch.tensor([float("inf"), 0.0]) if step == 6 else torch.ones(2)
        opt.step()
    with pytest.raises(FloatingPointError, match=r"steps 5\.\.6"):
        opt.state_dict()
    p, opt = chain()  # a clean chain saves and reads no error
    for _ in range(6):
        p.grad = torch.ones(2)
        opt.step()
    assert opt.state_dict()["steps"] == 6


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_gradient_whose_norm_overflows_is_reported_naming_the_parameter(max_grad_norm):
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = SGLD([("a", a), ("b", b)], 0.1, num_data=1, max_grad_norm=max_grad_norm)
    a.grad, b.grad = torch.zeros(2), torch.full((2,), 3e38)  # finite entries, infinite norm
    with pytest.raises(FloatingPointError, match="'b'"):
        opt.step()
    assert torch.equal(b.detach(), torch.zeros(2))  # raised before any update


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


# -- functional update rules -----------------------------------------------------------------------

def test_functional_sgld_and_sghmc_are_the_class_updates_bit_for_bit():
    from sparse_ensembles.samplers.functional import sghmc_, sgld_

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    noise = torch.randn(17, generator=torch.Generator().manual_seed(9))
    xi = [noise[:12].view(4, 3), noise[12:]]
    for cls, kwargs in [(SGLD, {}), (SGHMC, {"friction": 0.3})]:
        ps = [nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(5))]
        opt = cls([("a", ps[0]), ("b", ps[1])], 0.01, num_data=50, temperature=2.0,
                  generator=torch.Generator().manual_seed(9), **kwargs)
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt.step()
        ref = [torch.ones(4, 3), torch.ones(5)]
        if cls is SGLD:
            sgld_(ref, grads, xi, lr=0.01, temperature=2.0, num_data=50)
        else:
            sghmc_(ref, grads, xi, [torch.zeros(4, 3), torch.zeros(5)], lr=0.01, friction=0.3, temperature=2.0, num_data=50)
        for p, r in zip(ps, ref):
            assert torch.equal(p.detach(), r)


def test_temperature_zero_draws_no_noise():
    p = nn.Parameter(torch.zeros(10))
    gen = torch.Generator().manual_seed(0)
    opt = SGLD([("p", p)], 0.1, num_data=10, temperature=0.0, generator=gen, prefetch_noise=True)
    before = gen.get_state()
    for _ in range(3):
        p.grad = torch.ones(10)
        opt.step()
    assert torch.equal(gen.get_state(), before)


# -- gradient clipping -------------------------------------------------------------------------------

def test_clipped_step_equals_sgd_on_the_clip_grad_norm_gradient_at_temperature_zero():
    a, b = _net(), _net()
    N, precision, max_norm = 1000, 5.0, 0.45  # the gradient norms here are 0.41-0.55
    sgld = SGLD(a.named_parameters(), 0.1, num_data=N, temperature=0.0, prior=Gaussian(precision), max_grad_norm=max_norm)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, weight_decay=precision / N)
    clipped = 0
    for x, y in _batches(10):
        for model, opt in ((a, sgld), (b, sgd)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        user_grads = [p.grad.clone() for p in a.parameters()]
        total = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
        clipped += int(max_norm / (total + 1e-6) < 1)
        sgld.step()
        sgd.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), user_grads))  # p.grad stays the user's
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert 0 < clipped < 10 and sgld.clipped_steps == clipped


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
def test_inactive_clip_changes_nothing_bit_for_bit(cls):
    results = []
    for max_norm in (None, 1e6):
        m = _net()
        opt = cls(m.named_parameters(), 0.05, num_data=100, prior=Gaussian(1.0), max_grad_norm=max_norm,
                  generator=torch.Generator().manual_seed(4))
        _train(m, opt, _batches())
        assert opt.clipped_steps == 0
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_invalid_max_grad_norm_names_the_bad_value():
    with pytest.raises(ValueError, match="-1"):
        SGLD([("w", nn.Parameter(torch.zeros(2)))], 0.1, num_data=10, max_grad_norm=-1.0)


# -- state through torch.save, devices ---------------------------------------------------------------

def test_state_dict_survives_torch_save_and_weights_only_load_and_resumes_bit_for_bit():
    import io

    batches = _batches(8)
    ref = _net()
    opt = SGLD(ref.named_parameters(), 0.05, num_data=200, prior=Gaussian(1.0), max_grad_norm=0.5,
               generator=torch.Generator().manual_seed(3), prefetch_noise=True)
    _train(ref, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": ref.state_dict(), "sampler": opt.state_dict()}, buf)
    _train(ref, opt, batches[4:])

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _net(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = SGLD(resumed.named_parameters(), 0.05, num_data=200, prior=Gaussian(1.0), max_grad_norm=0.5,
                generator=torch.Generator().manual_seed(999), prefetch_noise=True)
    opt2.load_state_dict(ckpt["sampler"])
    _train(resumed, opt2, batches[4:])
    for pa, pb in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    assert opt2.clipped_steps == opt.clipped_steps > 0


def test_default_noise_generator_is_on_the_parameters_device():
    opt = SGLD([("w", nn.Parameter(torch.zeros(2)))], 0.1, num_data=10)
    assert opt._noise.generator.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_equals_cpu_step_at_temperature_zero_and_cuda_chain_resumes_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w0, grad = torch.randn(300, 7, generator=g), torch.randn(300, 7, generator=g)  # CPU and CUDA both fuse a + alpha * b (FMA)
    moved = []
    for device in ("cpu", "cuda"):
        w = nn.Parameter(w0.clone().to(device))  # clone: on CPU .to() would alias w0 and the step move it
        opt = SGLD([("w", w)], 0.1, num_data=50, temperature=0.0, prior=Gaussian(2.0))
        w.grad = grad.to(device)
        opt.step()
        moved.append(w.detach().cpu())
    assert torch.equal(*moved)

    def run(opt, w, steps):
        for i in steps:
            w.grad = torch.sin(w.detach() + i)
            opt.step()

    torch.manual_seed(1)
    w = nn.Parameter(w0.cuda())
    opt = SGLD([("w", w)], 0.01, num_data=50, prior=Gaussian(1.0))  # generator created on cuda
    assert opt._noise.generator.device.type == "cuda"
    run(opt, w, range(3))
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    run(opt, w, range(3, 6))
    w2 = nn.Parameter(saved_w)
    opt2 = SGLD([("w", w2)], 0.01, num_data=50, prior=Gaussian(1.0))
    opt2.load_state_dict(saved)
    run(opt2, w2, range(3, 6))
    assert torch.equal(w.detach(), w2.detach())
    with pytest.raises(ValueError, match="generator"):
        SGLD([("w", w)], 0.01, num_data=50, generator=torch.Generator())


# -- the noise worker thread -------------------------------------------------------------------------

def _noise_threads():
    import threading

    return {t for t in threading.enumerate() if t.name.startswith("sgmcmc-noise")}


def test_close_stops_the_noise_worker_and_later_steps_continue_the_same_chain():
    results = []
    for close in (False, True):
        before = _noise_threads()
        m = _net()
        opt = SGLD(m.named_parameters(), 0.05, num_data=100, generator=torch.Generator().manual_seed(5), prefetch_noise=True)
        batches = _batches()
        _train(m, opt, batches[:3])
        mine = _noise_threads() - before
        assert mine  # the worker is running
        if close:
            opt.close()
            assert not any(t.is_alive() for t in mine)
            opt.close()  # idempotent
        _train(m, opt, batches[3:])
        results.append([p.detach().clone() for p in m.parameters()])
        opt.close()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_noise_worker_stops_when_the_sampler_is_garbage_collected():
    import gc

    before = _noise_threads()
    m = _net()
    opt = SGLD(m.named_parameters(), 0.05, num_data=100, prefetch_noise=True)
    _train(m, opt, _batches(2))
    mine = _noise_threads() - before
    assert mine
    del opt
    gc.collect()
    for t in mine:
        t.join(timeout=5)
        assert not t.is_alive()
