"""``priors.Compiled``: the prior's gradient through torch.compile (inductor's C++ on CPU) equals the
eager gradient, is compiled once for chains of the same settings, drives a chain that follows the
eager one (separate and vectorised chains), and is refused for priors with state."""
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from conftest import need_data
from sparse_ensembles.experiments import config as config_mod
from sparse_ensembles.experiments.cli import main
from sparse_ensembles.experiments.stages import Context, make_prior
from sparse_ensembles.models import LSTMLM
from sparse_ensembles.models.mlp import mlp
from sparse_ensembles.priors import AdaptiveGaussian, Compiled, Gaussian, GroupLasso, Sum
from sparse_ensembles.samplers import SGLD
from sparse_ensembles.samplers.vectorized import VectorizedSGLD
from sparse_ensembles.structure import groups_of
from test_ranks import TINY

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile's CPU backend needs a C++ compiler")


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _close(a: dict, b: dict, rel=1e-6):
    assert list(a) == list(b)
    for n in a:
        scale = b[n].abs().max().clamp_min(1e-30)
        assert (a[n] - b[n]).abs().max() <= rel * scale, (n, ((a[n] - b[n]).abs().max() / scale).item())


@pytest.mark.parametrize("case", ["mlp_sse", "lstm_iss_budget"])
def test_compiled_prior_gradient_equals_the_eager_one_on_every_call(case):
    torch.manual_seed(0)
    if case == "mlp_sse":
        model, num_data = _mlp(), 50_000
        eager = Sum(GroupLasso(groups_of(model), 3.0), Gaussian(1.0))
    else:
        model, num_data = LSTMLM(40, [16, 16], 16, grouping="iss"), 929_560
        eager = Sum(GroupLasso(model.groups("iss"), 0.8, budget=0.5), Gaussian(1.0))
    params = {n: p.detach() for n, p in model.named_parameters()}
    params[next(iter(params))][0].zero_()  # an all-zero group: its scale is 0, not 0 / 0
    prior = Compiled(eager)
    for call in range(3):  # eager, then compiled, then the compiled code again
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        kept = {n: g.clone() for n, g in grads.items()}
        _close(prior.plus_grad(grads, params, num_data), eager.plus_grad(grads, params, num_data))
        assert all(torch.equal(grads[n], kept[n]) for n in grads)  # out of place
        mine, theirs = {n: g.clone() for n, g in grads.items()}, {n: g.clone() for n, g in grads.items()}
        prior.add_grad_(mine, params, num_data)
        eager.add_grad_(theirs, params, num_data)
        _close(mine, theirs)
    assert prior.neg_log_prob(params) == eager.neg_log_prob(params)


def test_priors_of_the_same_settings_share_one_compiled_gradient():
    """A stage's chains each build their prior; only the first compiles."""
    model = _mlp()
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    graphs, breaks = [], sum(counters["graph_break"].values())
    for _ in range(3):
        prior = Compiled(Sum(GroupLasso(groups_of(model), 2.5), Gaussian(1.0)))
        for _ in range(3):
            prior.plus_grad(grads, params, 12_345)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[2] == graphs[0]
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])  # one graph, not pieces


def test_an_sgld_chain_with_the_compiled_prior_follows_the_eager_chain():
    x, y = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 10
    finals = []
    for wrap in (lambda p: p, Compiled):
        torch.manual_seed(0)
        model = _mlp()
        sampler = SGLD(model.named_parameters(), 0.1, num_data=1000, temperature=0.01,
                       prior=wrap(Sum(GroupLasso(groups_of(model), 3.0), Gaussian(1.0))),
                       generator=torch.Generator().manual_seed(2), prefetch_noise=False)
        for step in range(20):
            sampler.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[step % 4::4]), y[step % 4::4]).backward()
            sampler.step()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    _close(finals[1], finals[0], rel=1e-5)


def test_a_compiler_that_fails_gives_an_error_naming_the_fix():
    def no_compiler(graph, inputs):
        raise RuntimeError("no C++ compiler found")

    model = _mlp()
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    prior = Compiled(Sum(GroupLasso(groups_of(model), 3.0), Gaussian(1.0)), backend=no_compiler)
    prior.plus_grad(grads, params, 100)  # the first call is eager
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler found.*sampler.compile_prior = false"):
        prior.plus_grad(grads, params, 100)


def test_a_prior_with_state_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="without state"):
        Compiled(AdaptiveGaussian(1.0, omega=0.5))
    with pytest.raises(TypeError, match="wraps a Prior"):
        Compiled(lambda grads, params, n: None)


def test_sampler_compile_prior_in_a_run_gives_the_eager_run_samples(tmp_path):
    need_data("mnist")
    short = ["--no-progress", "--set", "sgd.members=0", "--set", "sampler.plain_chain=false", "--set",
             "sampler.samples=1", "--set", "prune.sparsities=[]"]
    for name, extra in (("eager", []), ("compiled", ["--set", "sampler.compile_prior=true"])):
        assert main(["run", TINY, "--out", str(tmp_path / name), *short, *extra]) == 0
    a = torch.load(tmp_path / "eager" / "sgld_gsp" / "sample_000.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "compiled" / "sgld_gsp" / "sample_000.pt", weights_only=True)["state_dict"]
    _close(b, a, rel=1e-4)


def test_compile_prior_with_the_stateful_ssgl_prior_is_refused_before_any_work(tmp_path, capsys):
    need_data("mnist")
    sets = ["--set", "sampler.compile_prior=true", "--set", "prior.kind=ssgl"]
    assert main(["run", TINY, "--out", str(tmp_path / "run"), "--no-progress", *sets]) != 0
    assert "sampler.compile_prior = true with prior.kind = 'ssgl'" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*/*.pt"))  # refused before any member or sample


def test_vectorised_chains_with_the_compiled_prior_follow_the_eager_vectorised_chains():
    """``add_grad_chains_`` (the vmapped group Lasso of M chains) compiled: the same gradient, and
    VectorizedSGLD with it ends where the eager one does."""
    M, model = 3, _mlp()
    params = {n: torch.stack([p.detach() * (m + 1) for m in range(M)]) for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    eager = Sum(GroupLasso(groups_of(model), 3.0), Gaussian(1.0))
    prior = Compiled(eager)
    for _ in range(3):  # eager, compiled, compiled again
        mine, theirs = {n: g.clone() for n, g in grads.items()}, {n: g.clone() for n, g in grads.items()}
        prior.add_grad_chains_(mine, params, 1000)
        eager.add_grad_chains_(theirs, params, 1000)
        _close(mine, theirs)
    xs, ys = torch.rand(M, 32, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(M * 32).view(M, 32) % 10
    finals = []
    for wrap in (lambda p: p, Compiled):
        chains = VectorizedSGLD(model, [5, 6, 7], lr=0.1, num_data=1000, temperature=0.01,
                                prior=wrap(Sum(GroupLasso(groups_of(model), 3.0), Gaussian(1.0))))
        for _ in range(10):
            chains.losses(xs, ys).sum().backward()
            chains.step()
        finals.append({n: t.clone() for n, t in chains.params.items()})
    _close(finals[1], finals[0], rel=1e-5)


def test_compile_prior_compiles_the_sparse_chains_prior_and_leaves_the_plain_chains_gaussian_eager():
    """The plain chain's Gaussian is one multi-tensor op; compiled it was slower (0.12 -> 0.20 ms on
    the MLP), so ``sampler.compile_prior`` compiles only the configured (group Lasso) prior."""
    cfg = config_mod.from_dict({"sampler": {"compile_prior": True}, "prior": {"kind": "group_lasso", "lam": 3.0}})
    ctx = Context(cfg, SimpleNamespace(), out=None, device=torch.device("cpu"), progress=False)
    model = mlp([784, 64, 10])
    sparse, plain = make_prior(ctx, model, sparse=True), make_prior(ctx, model, sparse=False)
    assert isinstance(sparse, Compiled) and isinstance(sparse.prior, Sum)
    assert type(plain) is Gaussian
