"""A user's own nn.Sequential CNN (issue 25 item 3): unit groups derived, shrunk physically and exactly."""
import pytest
import torch
from torch import nn

from sparse_ensembles import checkpoint, pruning
from sparse_ensembles.models.sequential import (CompactSequential, blocks_of, compact_sequential, sequential_cost,
                                                sequential_unit_groups)


def _cnn(padding: int, bn: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    side = 7 if padding else 5
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=padding), *( [nn.BatchNorm2d(8)] if bn else []), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=padding), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(16 * side * side, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(32, 10))


def _pruned(net: nn.Sequential, sparsity=0.5) -> nn.Sequential:
    x = torch.randn(32, 1, 28, 28)
    net.train()
    net(x)  # BatchNorm statistics that are not the identity
    net.eval()
    masks = pruning.group_masks(dict(net.named_parameters()), sequential_unit_groups(net), sparsity=sparsity)
    pruning.apply_masks(net, masks)
    return net


def test_unit_groups_cover_every_hidden_layer_output_unit_exactly_once():
    net = _cnn(1)
    groups = sequential_unit_groups(net)
    assert [(g.params, g.size) for g in groups] == [(("0.weight",), 8), (("4.weight",), 16), (("8.weight",), 32)]
    params = dict(net.named_parameters())
    for g in groups:  # each group is one unit's filter or row: sizes sum to the layer's weight count
        assert int(g.group_dim(params)) * g.size == params[g.params[0]].numel()


@pytest.mark.parametrize("padding", [1, 0])
def test_shrunk_cnn_equals_the_masked_one_and_is_smaller(padding):
    net = _pruned(_cnn(padding))
    with torch.no_grad():
        net[0].bias.fill_(0.3)  # dead filters output relu(BN(0.3)): constants that must be carried or folded
    x = torch.randn(16, 1, 28, 28)
    small = compact_sequential(net, input_shape=(1, 28, 28))
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-5)
    convs = [m for m in small if isinstance(m, nn.Conv2d)]
    live0 = int(net[0].weight.ne(0).flatten(1).any(1).sum())
    # zero padding: one carrier channel for the constants at most; no padding: constants folded away
    assert convs[0].out_channels <= live0 + (1 if padding else 0)
    assert sequential_cost(small, (1, 28, 28))["flops"] < sequential_cost(net, (1, 28, 28))["flops"]
    assert small.cost()["params"] <= sequential_cost(net, (1, 28, 28))["params"]


def test_the_carrier_channel_holds_the_constants_of_dead_filters_under_zero_padding():
    net = _pruned(_cnn(1, bn=False), sparsity=0.5)
    with torch.no_grad():
        net[0].bias.copy_(torch.linspace(0.1, 0.8, 8))  # every dead filter outputs relu(b) > 0
    small = compact_sequential(net, input_shape=(1, 28, 28))
    live0 = int(net[0].weight.ne(0).flatten(1).any(1).sum())
    assert [m for m in small if isinstance(m, nn.Conv2d)][0].out_channels == live0 + 1
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-5)


def test_channels_no_later_weight_reads_are_removed():
    net = _pruned(_cnn(0), sparsity=0.0)
    with torch.no_grad():
        net[4].weight[:, [1, 4]] = 0  # the second conv no longer reads channels 1 and 4
    small = compact_sequential(net, input_shape=(1, 28, 28))
    assert [m for m in small if isinstance(m, nn.Conv2d)][0].out_channels == 6
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-5)


def test_compact_sequential_saves_and_reloads_from_its_spec_without_code(tmp_path):
    small = compact_sequential(_pruned(_cnn(1)), input_shape=(1, 28, 28))
    checkpoint.save_member(tmp_path / "m.pt", small)
    torch.load(tmp_path / "m.pt", weights_only=True)
    back, _ = checkpoint.load_member(tmp_path / "m.pt")
    assert isinstance(back, CompactSequential)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(back(x), small(x))


@pytest.mark.parametrize("layers,message", [
    ([nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)], "only groups=1"),
    ([nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, padding=1), nn.Flatten(), nn.Linear(4, 2)], "pooling with padding"),
    ([nn.Flatten(), nn.Linear(4, 4), nn.Conv2d(1, 4, 3)], "a convolution after Flatten"),
    ([nn.Conv2d(1, 4, 3), nn.LSTM(4, 4)], "LSTM at position 1 is not supported"),
    ([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)], "no Conv2d"),
])
def test_unsupported_networks_are_refused_naming_the_layer(layers, message):
    with pytest.raises(ValueError, match=message):
        blocks_of(nn.Sequential(*layers))


def test_a_layer_whose_units_all_died_shrinks_to_one_silent_unit_and_keeps_the_outputs():
    net = _pruned(_cnn(1), sparsity=0.0)
    with torch.no_grad():
        net[8].weight.zero_()  # every hidden neuron outputs the constant relu(BN(bias))
    small = compact_sequential(net, input_shape=(1, 28, 28))
    assert [m for m in small if isinstance(m, nn.Linear)][0].out_features == 1
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-5)


def test_a_trailing_flatten_is_kept():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 5), nn.Flatten()).eval()
    x = torch.randn(4, 3, 7, 7)
    small = compact_sequential(net, input_shape=(3, 7, 7))
    assert small(x).shape == (4, 4)
    torch.testing.assert_close(small(x), net(x))


@pytest.mark.parametrize("layers,message", [
    ([nn.Conv2d(3, 6, 3), nn.LeakyReLU(0.3), nn.Flatten(), nn.Linear(216, 2)], "non-default arguments"),
    ([nn.Conv2d(3, 6, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(54, 2)], "ceil_mode=False"),
    ([nn.Conv2d(3, 6, 3), nn.AvgPool2d(2, divisor_override=1), nn.Flatten(), nn.Linear(54, 2)], "divisor_override"),
    ([nn.Conv2d(3, 6, 3), nn.Flatten(), nn.BatchNorm1d(216), nn.Linear(216, 2)], "between Flatten and the next Linear"),
    ([nn.Conv2d(3, 6, 3), nn.Linear(5, 2)], "needs an nn.Flatten"),
    ([nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False), nn.Flatten(), nn.Linear(6, 2)],
     "without running statistics"),
])
def test_layers_that_would_not_shrink_exactly_are_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        blocks_of(nn.Sequential(*layers))
