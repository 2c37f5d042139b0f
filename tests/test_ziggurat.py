"""The counter-based ziggurat behind noise="gaussian_parallel": its distribution, its independence
from the thread split, its state, and its use in the samplers."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparse_ensembles.samplers import SGLD
from sparse_ensembles.samplers.ziggurat import ZigguratNormal, _mix, _mix_py


def _draw(n, key=1, threads=2):
    return ZigguratNormal(key, threads=threads).fill_(torch.empty(n))


def test_compiled_hash_equals_splitmix64_written_in_python_integers():
    gamma = 0x9E3779B97F4A7C15
    rng = np.random.default_rng(0)
    full = lambda: rng.integers(0, 2**64 - 1, 20, dtype=np.uint64, endpoint=True)  # the whole uint64 range
    for key, c in zip(full(), full()):
        expect = _mix_py((int(key) + int(c) * gamma) % 2**64)
        assert int(_mix(np.uint64(key), np.uint64(c))) == expect


def test_values_match_the_standard_normal_in_moments_cdf_and_tails():
    n = 2_000_000
    x = _draw(n).double()
    se = 1 / math.sqrt(n)
    assert abs(x.mean().item()) < 5 * se
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((x ** 3).mean().item()) < 5 * math.sqrt(15) * se
    assert abs((x ** 4).mean().item() - 3) < 5 * math.sqrt(96) * se
    # Kolmogorov-Smirnov against the exact CDF; 1.95 / sqrt(n) is the 0.1% critical value
    s, _ = x.sort()
    cdf = torch.special.ndtr(s)
    i = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(i - cdf, cdf - (i - 1 / n)).max().item()
    assert ks < 1.95 * se
    # the tail beyond the ziggurat's base strip (r = 3.4426) and far out: binomial counts within 5 sd
    for t in (1.0, 2.0, 3.442619855899, 4.0):
        p = 2 * (1 - torch.special.ndtr(torch.tensor(t, dtype=torch.float64)).item())
        count = (x.abs() > t).sum().item()
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, (t, count, n * p)


def test_neighbouring_values_and_different_keys_are_uncorrelated():
    n = 1_000_000
    a, b = _draw(n, key=1).double(), _draw(n, key=2).double()
    bound = 5 / math.sqrt(n)
    assert abs((a[1:] * a[:-1]).mean().item()) < bound
    assert abs((a * b).mean().item()) < bound
    assert abs((a ** 2 * b ** 2).mean().item() - 1) < 5 * math.sqrt(8 / n)


def test_values_do_not_depend_on_the_thread_count_or_on_how_draws_are_split():
    one = _draw(300_001, threads=1)
    assert torch.equal(one, _draw(300_001, threads=2))
    assert torch.equal(one, _draw(300_001, threads=5))
    g = ZigguratNormal(1, threads=2)
    parts = [g.fill_(torch.empty(n)) for n in (100_000, 7, 200_000 - 6)]
    assert torch.equal(torch.cat(parts), one)


def test_state_round_trip_repeats_the_stream_and_refuses_a_torch_generator_state():
    g = ZigguratNormal(2**64 - 5)  # a key above 2**63 survives the int64 state
    g.fill_(torch.empty(1000))
    state = g.get_state()
    a = g.fill_(torch.empty(5000)).clone()
    h = ZigguratNormal(0)
    h.set_state(state)
    assert torch.equal(h.fill_(torch.empty(5000)), a)
    with pytest.raises(ValueError, match="same sampler.noise"):
        h.set_state(torch.Generator().get_state())


def test_fill_refuses_non_float32_or_non_contiguous_buffers_with_the_fix():
    with pytest.raises(ValueError, match="float32"):
        ZigguratNormal(0).fill_(torch.empty(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        ZigguratNormal(0).fill_(torch.empty(10, 10).t())


def test_sgld_gaussian_parallel_noise_has_the_step_variance_2_lr_T_over_N():
    p = nn.Parameter(torch.zeros(200_000))
    lr, T, N = 0.01, 2.0, 50
    opt = SGLD([("p", p)], lr, num_data=N, temperature=T, noise="gaussian_parallel",
               generator=torch.Generator().manual_seed(0))
    p.grad = torch.zeros_like(p)
    opt.step()
    var = p.detach().double().var().item()
    assert abs(var / (2 * lr * T / N) - 1) < 5 * math.sqrt(2 / p.numel())


def test_gaussian_parallel_noise_refuses_float64_parameters_and_names_the_fix():
    with pytest.raises(ValueError, match="noise='gaussian'"):
        SGLD([("p", nn.Parameter(torch.zeros(3, dtype=torch.float64)))], 0.1, num_data=10, noise="gaussian_parallel")


def test_resuming_with_another_noise_kind_is_refused_with_the_fix():
    p = nn.Parameter(torch.zeros(10))
    a = SGLD([("p", p)], 0.1, num_data=10, noise="gaussian_parallel")
    b = SGLD([("p", p)], 0.1, num_data=10, noise="gaussian")
    with pytest.raises(ValueError, match="same sampler.noise"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="same sampler.noise"):
        a.load_state_dict(b.state_dict())


def test_a_large_net_gets_the_same_chain_with_prefetched_and_inline_counter_noise_on_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # inline draws split over 2 threads, the worker draws on 1
    try:
        results = []
        for prefetch in (False, True):
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))  # 62k parameters
            opt = SGLD(net.named_parameters(), 0.01, num_data=100, noise="gaussian_parallel", prefetch_noise=prefetch,
                       generator=torch.Generator().manual_seed(3))
            for step in range(3):
                x = torch.randn(8, 300, generator=torch.Generator().manual_seed(step))
                opt.zero_grad()
                net(x).pow(2).mean().backward()
                opt.step()
            opt.close()
            results.append([p.detach().clone() for p in net.parameters()])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)
