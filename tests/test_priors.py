import math

import torch
from torch import nn

from sparse_ensembles.priors import Gaussian, GroupLasso, Laplace, Sum
from sparse_ensembles.priors.base import Prior
from sparse_ensembles.structure import Part, SliceFamily, norms, sequential_groups


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def _autograd_grad(prior, params):
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    prior.neg_log_prob(leaves).backward()
    return {n: p.grad for n, p in leaves.items()}


def test_group_lasso_gradient_matches_autograd_divided_by_num_data():
    model = _mlp()
    params = dict(model.named_parameters())
    prior = GroupLasso(sequential_groups(model), lam=0.7)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    prior.add_grad_(grads, {n: p.detach() for n, p in params.items()}, num_data=10)
    expected = _autograd_grad(prior, params)
    for n in params:
        if n.endswith("bias"):  # biases belong to no group: no prior from GroupLasso
            assert expected[n] is None and torch.equal(grads[n], torch.zeros_like(grads[n]))
        else:
            torch.testing.assert_close(grads[n], expected[n] / 10)


def test_group_lasso_value_is_lambda_sqrt_dim_times_group_norms():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # columns are groups: norms 5 and 1, dim 2
    fam = SliceFamily("cols", 2, (Part("w", 1),))
    assert math.isclose(float(GroupLasso([fam], 2.0).neg_log_prob({"w": w})), 2.0 * math.sqrt(2) * 6, rel_tol=1e-6)


def test_group_lasso_gradient_is_finite_and_zero_on_an_all_zero_group():
    w = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    fam = SliceFamily("cols", 2, (Part("w", 1),))
    g = {"w": torch.zeros(2, 2)}
    GroupLasso([fam], 1.0).add_grad_(g, {"w": w}, num_data=1)
    assert torch.isfinite(g["w"]).all()
    assert torch.equal(g["w"][:, 0], torch.zeros(2))


def test_lstm_style_blocked_group_spans_all_four_gates():
    n = 3
    w = torch.zeros(4 * n, 2)
    w[1::n] = 1.0  # unit 1 in every gate
    fam = SliceFamily("units", n, (Part("w", 0, stack=4),))
    got = norms(fam, {"w": w})
    torch.testing.assert_close(got, torch.tensor([0.0, math.sqrt(8), 0.0]))


def test_gaussian_and_laplace_gradients_match_autograd():
    params = {"a": torch.randn(5, 3), "b": torch.randn(4)}
    for prior in (Gaussian(3.0), Laplace(0.5)):
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        prior.add_grad_(grads, params, num_data=4)
        expected = _autograd_grad(prior, params)
        for n in params:
            torch.testing.assert_close(grads[n], expected[n] / 4)


def test_plus_grad_equals_in_place_add_bit_for_bit_and_leaves_the_input_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    before = {n: g.clone() for n, g in grads.items()}
    for prior in (Gaussian(2.0), Laplace(0.5), Sum(GroupLasso(sequential_groups(model), 3.0), Gaussian(1.0))):
        expected = {n: g.clone() for n, g in grads.items()}
        prior.add_grad_(expected, params, 100)
        got = prior.plus_grad(grads, params, 100)
        for n in grads:
            assert torch.equal(got[n], expected[n]), (type(prior).__name__, n)
            assert torch.equal(grads[n], before[n])


def _blocks():
    from sparse_ensembles.structure import block_family
    torch.manual_seed(0)
    w = torch.randn(10, 7)
    return w, [block_family("blocks", "w", (10, 7), (4, 3))]


def test_block_lasso_is_lambda_times_the_sum_of_block_norms_and_its_gradient_matches_autograd():
    from sparse_ensembles.priors import BlockLasso
    w, fams = _blocks()
    prior = BlockLasso(fams, lam=0.3)
    blocks = [w[i:i + 4, j:j + 3] for i in range(0, 10, 4) for j in range(0, 7, 3)]
    assert math.isclose(float(prior.neg_log_prob({"w": w})), 0.3 * sum(float(b.norm()) for b in blocks), rel_tol=1e-6)
    g = {"w": torch.zeros_like(w)}
    prior.add_grad_(g, {"w": w}, num_data=5)
    torch.testing.assert_close(g["w"], _autograd_grad(prior, {"w": w})["w"] / 5)


def test_block_lasso_hinge_pulls_only_when_the_total_norm_exceeds_the_budget():
    from sparse_ensembles.priors import BlockLasso
    w, fams = _blocks()
    total = float(BlockLasso(fams, 1.0).neg_log_prob({"w": w}))
    over = BlockLasso(fams, 0.5, budget=total - 1.0)  # 1 over budget
    assert math.isclose(float(over.neg_log_prob({"w": w})), 0.5, rel_tol=1e-5)
    g = {"w": torch.zeros_like(w)}
    over.add_grad_(g, {"w": w}, num_data=1)
    torch.testing.assert_close(g["w"], _autograd_grad(over, {"w": w})["w"])
    assert g["w"].abs().sum() > 0
    within = BlockLasso(fams, 0.5, budget=total + 1.0)
    assert float(within.neg_log_prob({"w": w})) == 0.0
    g = {"w": torch.zeros_like(w)}
    within.add_grad_(g, {"w": w}, num_data=1)
    assert torch.equal(g["w"], torch.zeros_like(w))


# -- the fused group-Lasso gradient against the per-family loop it replaced --------------------------

def _per_family_loop(prior, grads, params, num_data):
    """The gradient as it was computed before the fused version: family by family, parameter by
    parameter, with the budget checked on the host."""
    if prior.budget is not None and float(prior.total_norm(params)) <= prior.budget:
        return
    for fam in prior.groups:
        size = norms(fam, params)
        coef = prior.lam * prior._weight(fam, params) / num_data
        scale = torch.where(size > prior.eps, coef / size.clamp_min(prior.eps), torch.zeros_like(size))
        for name in fam.params:
            if name in grads:
                grads[name].addcmul_(fam.broadcast(scale, name, params[name]), params[name])


def _lstm_cases():
    from sparse_ensembles.models.lstm_lm import LSTMLM

    torch.manual_seed(0)
    for grouping in ("untied", "tied", "iss", "block"):
        model = LSTMLM(50, [12, 10], 8, grouping=grouping, block=[4, 5], block_softmax=grouping == "block")
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        yield grouping, model.groups(grouping), params


def test_fused_group_lasso_gradient_equals_the_per_family_loop_on_lstm_groupings_and_an_mlp():
    torch.manual_seed(1)
    mlp = _mlp()
    cases = list(_lstm_cases()) + [("mlp", sequential_groups(mlp), {n: p.detach().clone() for n, p in mlp.named_parameters()})]
    for label, groups, params in cases:
        first = groups[0].params[0]
        params[first].view(-1)[: params[first].numel() // 3] = 0  # some all-zero groups
        inside = 2 * float(GroupLasso(groups, lam=1.0, scaled=True).total_norm(params))
        for budget in (None, 1e-3, inside):  # no hinge, far outside it, inside it (all scales 0)
            prior = GroupLasso(groups, lam=0.4, budget=budget)
            base = {n: torch.randn_like(p) for n, p in params.items()}
            got = {n: g.clone() for n, g in base.items()}
            want = {n: g.clone() for n, g in base.items()}
            prior.add_grad_(got, params, num_data=37)
            _per_family_loop(prior, want, params, num_data=37)
            for n in params:
                torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7, msg=f"{label} {n}")
            moved = any(not torch.equal(got[n], base[n]) for n in params)
            assert moved == (budget != inside), (label, budget)


def test_fused_group_lasso_sums_the_factors_of_a_parameter_in_two_families_and_matches_autograd():
    w = torch.randn(6, 4)
    fams = [SliceFamily("cols", 4, (Part("w", 1),)), SliceFamily("rows", 6, (Part("w", 0),))]
    prior = GroupLasso(fams, lam=0.9)
    g = {"w": torch.zeros_like(w)}
    prior.add_grad_(g, {"w": w}, num_data=3)
    torch.testing.assert_close(g["w"], _autograd_grad(prior, {"w": w})["w"] / 3)


def test_fused_group_lasso_with_a_budget_reads_nothing_back_to_the_host(monkeypatch):
    from sparse_ensembles.structure import block_family

    w = torch.randn(10, 7)
    prior = GroupLasso([block_family("b", "w", (10, 7), (4, 3))], 0.5, scaled=False, budget=1.0)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    for attr in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    g = {"w": torch.zeros_like(w)}
    prior.add_grad_(g, {"w": w}, num_data=2)
    monkeypatch.undo()
    want = {"w": torch.zeros_like(w)}
    _per_family_loop(prior, want, {"w": w}, num_data=2)
    torch.testing.assert_close(g["w"], want["w"])
    assert g["w"].abs().sum() > 0


def test_add_grad_chains_gives_every_chain_its_own_prior_on_lstm_groupings_and_an_mlp():
    """The chain-batched prior gradient (vectorised chains) equals each chain's add_grad_ on its own
    slice: the group Lasso's vmap, with a budget one chain is inside and the others outside; the
    elementwise priors; and the default per-chain loop of a prior that does not override it."""

    class Custom(Gaussian):  # no add_grad_chains_ of its own: the base class's loop
        add_grad_chains_ = Prior.add_grad_chains_

    torch.manual_seed(2)
    mlp = _mlp()
    cases = list(_lstm_cases()) + [("mlp", sequential_groups(mlp), {n: p.detach().clone() for n, p in mlp.named_parameters()})]
    for label, groups, params in cases:
        chains = {n: torch.stack([p * (1 + m) for m in range(3)]) for n, p in params.items()}
        first = groups[0].params[0]
        chains[first][0].view(-1)[: params[first].numel() // 3] = 0  # all-zero groups in chain 0 only
        chains = {n: p * torch.tensor([0.01, 1.0, 1.0]).view(-1, *[1] * (p.dim() - 1)) for n, p in chains.items()}
        budget = 2 * float(GroupLasso(groups, lam=1.0).total_norm({n: p[0] for n, p in chains.items()}))
        priors = [GroupLasso(groups, lam=0.4), GroupLasso(groups, lam=0.4, budget=budget),
                  Sum(GroupLasso(groups, lam=0.4), Gaussian(2.0)), Laplace(3.0), Custom(5.0)]
        for prior in priors:
            base = {n: torch.randn_like(p) for n, p in chains.items()}
            got = {n: g.clone() for n, g in base.items()}
            prior.add_grad_chains_(got, chains, num_data=37)
            for m in range(3):
                want = {n: g[m].clone() for n, g in base.items()}
                prior.add_grad_(want, {n: p[m] for n, p in chains.items()}, num_data=37)
                for n in chains:
                    torch.testing.assert_close(got[n][m], want[n], rtol=1e-6, atol=1e-7,
                                               msg=f"{label} {type(prior).__name__} chain {m} {n}")
        inside = GroupLasso(groups, lam=0.4, budget=budget)
        got = {n: torch.zeros_like(p) for n, p in chains.items()}
        inside.add_grad_chains_(got, chains, num_data=37)
        assert all(torch.equal(g[0], torch.zeros_like(g[0])) for g in got.values()), label  # chain 0 is inside
        assert any(g[1].abs().sum() > 0 for g in got.values()), label
