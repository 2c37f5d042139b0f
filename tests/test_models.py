"""Model kinds through the registry: spec round trip, cost rules, shrinking driven by declared groups."""
import pytest
import torch
from torch import nn

from sparse_ensembles import pruning
from sparse_ensembles.compact import compact_mlp
from sparse_ensembles.models import MLP, MODELS, CompactMLP, LSTMLM, from_spec, model_class


def test_registry_lists_the_kinds_and_rejects_an_unknown_one_by_name():
    assert {"mlp", "compact_mlp", "lstm_lm"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model kind 'resnet'.*known"):
        model_class("resnet")


def test_mlp_spec_round_trip_rebuilds_the_same_function():
    torch.manual_seed(0)
    model = MLP([12, 7, 3], "tanh").eval()
    again = from_spec(model.spec(), model.state_dict()).eval()
    x = torch.rand(5, 12)
    assert isinstance(again, MLP) and torch.equal(again(x), model(x))


def test_mlp_cost_counts_nonzeros_submatrix_flops_and_raises_on_an_unknown_layer():
    torch.manual_seed(0)
    model = MLP([6, 4, 3])
    with torch.no_grad():
        model[1].weight[:, 2] = 0  # input 2 unused: the sub-matrix loses a column
        model[1].weight[0] = 0  # hidden 0 reads nothing: the sub-matrix loses a row
    c = model.cost()
    assert c["nonzero_macs"] == 4 * 6 - 4 - 6 + 1 + 3 * 4
    assert c["flops"] == 2 * (3 * 5) + 2 * (3 * 4)
    assert c["params"] == c["nonzero_macs"] + 4 + 3
    model.add_module("extra", nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="does not know layer 'extra'"):
        model.cost()


def test_mlp_shrink_of_its_live_units_equals_compact_mlp_and_drops_dead_groups():
    torch.manual_seed(0)
    model = MLP([20, 10, 5, 3]).eval()
    params = dict(model.named_parameters())
    masks = pruning.group_masks(params, model.unit_groups(), keep=[12, 6, 3])
    pruning.apply_masks(model, masks)
    keep = model.live_units()
    assert [int(k.sum()) for k in keep] == [12, 6, 3]
    small = model.shrink(keep)
    x = torch.rand(8, 20)
    assert isinstance(small, CompactMLP) and small.widths == [12, 6, 3, 3]
    torch.testing.assert_close(small(x), model(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(small(x), compact_mlp(model)(x))
    # the per-matrix sub-matrix rule still counts the masked model's dead units' incoming rows;
    # the shrunk model costs only what is left
    assert small.cost()["flops"] == 2 * (12 * 6 + 6 * 3 + 3 * 3) < model.cost()["flops"]


def test_lstm_lm_from_config_uses_the_preset_and_the_task_vocabulary():
    cfg = LSTMLM.Config(size="medium", layers=2)
    model = LSTMLM.from_config(cfg, {"vocab": 50})
    assert model.hidden == [650, 650] and model.emb == 650 and model.dropout == 0.5 and model.vocab == 50
