import pytest
import torch
from torch import nn

from sparse_ensembles import checkpoint, pruning
from sparse_ensembles.compact import CompactMLP, FusedMLPEnsemble, SparseMLPEnsemble, compact_mlp
from sparse_ensembles.ensembles import Ensemble
from sparse_ensembles.models import mlp
from sparse_ensembles.structure import sequential_groups


def _pruned_mlp(seed, sparsity=0.9, drop_units=(3, 7)):
    torch.manual_seed(seed)
    model = mlp([784, 40, 20, 10])
    masks = pruning.magnitude_masks(pruning.prunable_weights(model), sparsity)
    with torch.no_grad():
        model[1].weight[list(drop_units)] = 0  # hidden units reading nothing: constants act(bias)
        model[1].bias[drop_units[0]] = 0.5
    pruning.apply_masks(model, masks)
    return model.eval()


def test_magnitude_masks_remove_exactly_the_requested_fraction_of_smallest_weights():
    params = {"a": torch.arange(1.0, 11.0).reshape(2, 5), "b": -torch.arange(11.0, 21.0).reshape(5, 2)}
    masks = pruning.magnitude_masks(params, 0.3)
    assert pruning.sparsity_of(masks) == pytest.approx(0.3)
    assert pruning.sparsity_of({}) == 0.0  # no masks: nothing pruned
    assert not masks["a"].flatten()[:6].any() and masks["a"].flatten()[6:].all() and masks["b"].all()
    per_layer = pruning.magnitude_masks(params, 0.5, scope="layer")
    assert int(per_layer["a"].sum()) == 5 and int(per_layer["b"].sum()) == 5


def test_sparsity_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="fraction removed"):
        pruning.magnitude_masks({"a": torch.ones(3, 3)}, 1.5)


def test_group_masks_remove_whole_neurons_with_the_lowest_norm():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.01, 1.0, 1.0]] * 3))
    masks = pruning.group_masks(dict(model.named_parameters()), sequential_groups(model)[:1], sparsity=0.25)
    assert torch.equal(masks["0.weight"].all(0), torch.tensor([True, False, True, True]))
    assert not masks["0.weight"][:, 1].any()


def test_keep_pruned_at_zero_holds_masked_weights_at_zero_under_sgd_with_momentum_and_decay():
    model = _pruned_mlp(0)
    masks = pruning.masks_from_zeros(pruning.prunable_weights(model))
    pruning.keep_pruned_at_zero(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(8, 1, 28, 28)).logsumexp(-1).sum().backward()
        opt.step()
    for n, m in masks.items():
        assert torch.equal(dict(model.named_parameters())[n].detach()[~m], torch.zeros(int((~m).sum())))


def test_shrunk_mlp_output_equals_masked_output_and_is_smaller():
    model = _pruned_mlp(1)
    small = compact_mlp(model)
    x = torch.rand(64, 1, 28, 28)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)
    assert small.widths[1] <= 40 - 2  # the two constant units were folded into the next bias
    assert small.widths[0] < 784


def test_compact_member_reloads_without_pickled_modules(tmp_path):
    small = compact_mlp(_pruned_mlp(2))
    checkpoint.save_member(tmp_path / "m.pt", small, small.spec())
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert blob["spec"]["widths"] == small.widths
    again, _ = checkpoint.load_member(tmp_path / "m.pt")
    assert isinstance(again, CompactMLP)
    x = torch.rand(5, 784)
    torch.testing.assert_close(again(x), small(x))


def test_fused_ensemble_equals_ensemble_of_compacted_members():
    members = [compact_mlp(_pruned_mlp(s, sparsity=0.8 + 0.05 * s)) for s in range(3)]
    x = torch.rand(50, 1, 28, 28)
    torch.testing.assert_close(FusedMLPEnsemble(members)(x), Ensemble(members)(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sizes", [[784, 10], [784, 30, 10], [784, 30, 20, 15, 10]])
def test_fused_ensemble_equals_ensemble_for_one_two_and_four_layers(sizes):
    members = []
    for s in range(3):
        torch.manual_seed(s)
        model = mlp(sizes)
        pruning.apply_masks(model, pruning.magnitude_masks(pruning.prunable_weights(model), 0.7, scope="layer"))
        members.append(compact_mlp(model.eval()))
    x = torch.rand(20, 1, 28, 28)
    for gather in (False, True):
        torch.testing.assert_close(FusedMLPEnsemble(members, gather=gather)(x), Ensemble(members)(x), atol=1e-5, rtol=0)


def test_structured_members_fuse_by_gathering_their_own_pixels_and_still_equal_the_ensemble():
    members = []
    for s in range(3):
        torch.manual_seed(s)
        model = mlp([784, 40, 20, 10])
        masks = pruning.group_masks(dict(model.named_parameters()), sequential_groups(model), keep=[60, 12, 8])
        assert [int(m.any(0).sum()) for n, m in masks.items() if n.endswith("weight")][:1] == [60]
        pruning.apply_masks(model, masks)
        members.append(compact_mlp(model.eval()))
    assert [m.widths for m in members] == [[60, 12, 8, 10]] * 3
    x = torch.rand(50, 1, 28, 28)
    auto = FusedMLPEnsemble(members)
    assert auto.gather  # three random pixel sets of 60: the union is far wider than one member's
    for fused in (auto, FusedMLPEnsemble(members, gather=False)):
        torch.testing.assert_close(fused(x), Ensemble(members)(x), atol=1e-5, rtol=0)


def test_sparse_csr_ensemble_equals_ensemble_and_stores_only_the_nonzero_weights():
    members = [compact_mlp(_pruned_mlp(s, sparsity=0.8 + 0.05 * s)) for s in range(3)]
    x = torch.rand(50, 1, 28, 28)
    sparse = SparseMLPEnsemble(members)
    torch.testing.assert_close(sparse(x), Ensemble(members)(x), atol=1e-5, rtol=0)
    assert sparse.nonzeros == sum(int((layer.weight != 0).sum()) for m in members for layer in m.layers)
    torch.testing.assert_close(sparse.double()(x.double()), Ensemble(members).double()(x.double()), atol=1e-10, rtol=0)


def test_sparse_csr_ensemble_rejects_members_with_different_output_sizes():
    a = compact_mlp(_pruned_mlp(0))
    b = CompactMLP(784, torch.arange(5), [5, 3, 2, 4], ["relu", "relu"])
    with pytest.raises(ValueError, match="same number of outputs"):
        SparseMLPEnsemble([a, b])


def test_ensemble_returns_log_of_mean_member_probabilities():
    members = [nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(7, 4)
    expected = torch.stack([torch.softmax(m(x), -1) for m in members]).mean(0).log()
    torch.testing.assert_close(Ensemble(members)(x), expected)


def test_gradual_sparsity_schedule_starts_at_zero_and_approaches_the_target():
    assert pruning.gradual_sparsity(0, 0.9, rate=0.5, period=10) == 0.0
    assert pruning.gradual_sparsity(10, 0.9, rate=0.5, period=10) == pytest.approx(0.45)
    assert pruning.gradual_sparsity(1000, 0.9, rate=0.5, period=10) == pytest.approx(0.9)


def test_cubic_sparsity_rises_from_start_to_final_fast_then_slow_and_stays():
    s = [pruning.cubic_sparsity(t, 0.5, 0.9, ramp=10) for t in range(13)]
    assert s[0] == 0.5 and s[10] == s[12] == pytest.approx(0.9)
    assert s[1] == pytest.approx(0.9 - 0.4 * 0.9 ** 3)
    steps = [b - a for a, b in zip(s, s[1:11])]
    assert all(d > 0 for d in steps) and steps == sorted(steps, reverse=True)  # fast first, then slow
    assert pruning.cubic_sparsity(0, 0.5, 0.9, ramp=0) == 0.9  # no ramp: one-shot


def test_cubic_widths_shrink_layer_by_layer_from_live_to_target_and_never_below_it():
    w = [pruning.cubic_widths(t, [300, 100], [160, 64], ramp=10) for t in range(12)]
    assert w[0] == [300, 100] and w[10] == w[11] == [160, 64]
    assert all(a[i] >= b[i] >= t for a, b in zip(w, w[1:]) for i, t in enumerate([160, 64]))
    assert 160 < w[3][0] < 300  # gradual, not one-shot
    assert pruning.cubic_widths(0, [300, 100], [160, 64], ramp=0) == [160, 64]
    assert pruning.cubic_widths(0, [100, 50], [160, 64], ramp=5) == [160, 64]  # fewer live than asked: target


def test_group_threshold_masks_drop_neurons_whose_rms_weight_is_below_it():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, 1e-4, 0.5], [0.5, -1e-4, 0.5]]))
    masks = pruning.group_masks(dict(model.named_parameters()), sequential_groups(model)[:1], threshold=1e-3)
    assert torch.equal(masks["0.weight"].all(0), torch.tensor([True, False, True]))
