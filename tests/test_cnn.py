"""The cnn and resnet20 model kinds: input shapes, filter groups, the conv FLOPs rule, live units and
physical shrinking (equal to the masked network, BatchNorm constants folded), spec round trips."""
import copy

import pytest
import torch
from torch import nn

from sparse_ensembles import pruning
from sparse_ensembles.experiments.config import ConfigError, from_dict
from sparse_ensembles.models import CNN, MODELS, ResNet20, from_spec


def _cnn(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(input_shape=(1, 8, 8), classes=3, channels=[4, 5], hidden=6, kernel=3)
    args.update(kw)
    return CNN(**args).eval()


def _resnet(shortcut="A", shape=(3, 8, 8), seed=0):
    """A narrow ResNet-20 with non-trivial BatchNorm: random gamma and beta, running statistics
    from a few train-mode passes over shifted inputs, then eval mode."""
    torch.manual_seed(seed)
    model = ResNet20(shape, 4, [3, 4, 5], shortcut=shortcut)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn(8, *shape) + 0.5)
    return model.eval()


@torch.no_grad()
def _masked(model, keep):
    """A copy of ``model`` with the dropped unit groups' weights zeroed."""
    masked = copy.deepcopy(model)
    pruning.apply_masks(masked, pruning.keep_masks(dict(masked.named_parameters()), masked.unit_groups(), keep))
    return masked


def _weak_groups(model, keep_counts):
    """Group masks keeping ``keep_counts[i]`` strongest groups of unit family i, applied in place."""
    masks = pruning.group_masks(dict(model.named_parameters()), model.unit_groups(), keep=keep_counts)
    pruning.apply_masks(model, masks)
    return masks


# ----- shapes and config --------------------------------------------------------------------------

def test_kinds_are_registered_and_read_flattened_mnist_and_cifar_images():
    assert {"cnn", "resnet20"} <= set(MODELS)
    torch.manual_seed(0)
    cnn = CNN.from_config(CNN.Config(channels=[2, 3], hidden=4), {"in_features": 784, "classes": 10})
    assert cnn.input_shape == (1, 28, 28) and cnn.fc1.in_features == 3 * 7 * 7
    assert cnn(torch.rand(2, 784)).shape == (2, 10) and cnn(torch.rand(2, 28, 28)).shape == (2, 10)
    cifar = CNN.from_config(CNN.Config(channels=[2, 3], hidden=4), {"in_features": 3072, "classes": 10})
    assert cifar.input_shape == (3, 32, 32) and cifar.fc1.in_features == 3 * 8 * 8
    resnet = ResNet20.from_config(ResNet20.Config(width=0.25), {"in_features": 784, "classes": 10})
    assert resnet.stages == [4, 8, 16] and resnet.pad == 2
    assert resnet.eval()(torch.rand(2, 784)).shape == (2, 10)


def test_unknown_input_size_and_wrong_inputs_raise_value_errors_naming_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        CNN.from_config(CNN.Config(), {"in_features": 100, "classes": 10})
    model = CNN.from_config(CNN.Config(channels=[2], hidden=3, input_shape=[1, 10, 10]), {"in_features": 100, "classes": 2})
    assert model(torch.rand(3, 100)).shape == (3, 2)
    with pytest.raises(ValueError, match="100 values"):
        model(torch.rand(3, 99))
    with pytest.raises(ValueError, match="holds 300 values"):
        ResNet20.from_config(ResNet20.Config(input_shape=[3, 10, 10]), {"in_features": 100, "classes": 2})


def test_config_rejects_bad_channels_kernel_and_shortcut_by_key():
    with pytest.raises(ConfigError, match="model.channels"):
        from_dict({"model": {"kind": "cnn", "channels": [32, 0]}})
    with pytest.raises(ConfigError, match="model.kernel"):
        from_dict({"model": {"kind": "cnn", "kernel": 4}})
    with pytest.raises(ConfigError, match="model.shortcut"):
        from_dict({"model": {"kind": "resnet20", "shortcut": "C"}})
    assert from_dict({"model": {"kind": "resnet20", "width": 0.5}}).model.width == 0.5


# ----- groups -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [_cnn, lambda: _resnet("B")])
def test_filter_groups_cover_exactly_one_filter_each_and_nothing_else(make):
    model = make()
    params = dict(model.named_parameters())
    families = model.groups("filters")
    expected = set(model.conv_weight_names()) | ({"fc1.weight"} if isinstance(model, CNN) else set())
    assert {n for fam in families for n in fam.params} == expected
    for fam in families:
        (name,) = fam.params
        w = params[name]
        assert fam.size == w.shape[0] and fam.group_dim(params) == w[0].numel()
        for k in range(fam.size):
            one = torch.zeros(fam.size, dtype=torch.bool)
            one[k] = True
            hit = fam.broadcast_keep(one, name, w)
            want = torch.zeros_like(w, dtype=torch.bool)
            want[k] = True
            assert torch.equal(hit, want)
        torch.testing.assert_close(fam.sq_norms(params), w.detach().pow(2).flatten(1).sum(1))
    with pytest.raises(ValueError, match="groupings"):
        model.groups("neurons")


def test_unit_groups_are_the_shrinkable_channels_and_conv_names_come_in_forward_order():
    cnn, resnet = _cnn(), _resnet("B")
    assert [f.name for f in cnn.unit_groups()] == ["conv1", "conv2", "fc1"]
    assert [f.params for f in resnet.unit_groups()] == [(f"blocks.{b}.conv1.weight",) for b in range(9)]
    names = resnet.conv_weight_names()
    assert names[:3] == ["conv1.weight", "blocks.0.conv1.weight", "blocks.0.conv2.weight"]
    assert "blocks.3.shortcut_conv.weight" in names and len(names) == 1 + 18 + 2
    assert set(resnet.prunable_weights()) == set(names) | {"fc.weight"}
    assert len(_resnet("A").conv_weight_names()) == 19


# ----- cost ---------------------------------------------------------------------------------------

def test_dense_cnn_cost_equals_the_hand_count():
    model = _cnn()  # 1x8x8 -> conv3x3(4) 8x8 -> pool 4x4 -> conv3x3(5) 4x4 -> pool 2x2 -> fc 20->6 -> fc 6->3
    conv1 = {"params": 4 * 9 + 4, "flops": 2 * 4 * 1 * 9 * 64, "nonzero_macs": 4 * 9 * 64}
    conv2 = {"params": 5 * 4 * 9 + 5, "flops": 2 * 5 * 4 * 9 * 16, "nonzero_macs": 5 * 4 * 9 * 16}
    fc1 = {"params": 20 * 6 + 6, "flops": 2 * 6 * 20, "nonzero_macs": 20 * 6}
    fc2 = {"params": 6 * 3 + 3, "flops": 2 * 3 * 6, "nonzero_macs": 6 * 3}
    assert model.cost() == {k: sum(c[k] for c in (conv1, conv2, fc1, fc2)) for k in conv1}


def test_cost_after_removing_channels_equals_the_hand_count_of_the_smaller_convs():
    model = _cnn()
    with torch.no_grad():
        model.convs[0].weight[[1, 3]] = 0  # two conv1 filters gone; with bias 0 their output is 0
        model.convs[0].bias[[1, 3]] = 0
        model.convs[1].weight[:, :, 0, 0] = 0  # unstructured zeros: fewer MACs, same live channels
    masked = model.cost()
    # conv2 still reads the two dead channels, so its sub-matrix keeps 4 input channels
    assert masked["flops"] == 2 * 2 * 1 * 9 * 64 + 2 * 5 * 4 * 9 * 16 + 2 * 6 * 20 + 2 * 3 * 6
    assert masked["nonzero_macs"] == 2 * 9 * 64 + 5 * 4 * 8 * 16 + 20 * 6 + 6 * 3
    small = model.shrink(model.live_units())
    assert small.channels == [2, 5]  # no constant to carry: relu(0) = 0
    assert small.cost() == {
        "params": (2 * 9 + 2) + (5 * 2 * 8 + 5) + (20 * 6 + 6) + (6 * 3 + 3),
        "flops": 2 * 2 * 1 * 9 * 64 + 2 * 5 * 2 * 9 * 16 + 2 * 6 * 20 + 2 * 3 * 6,
        "nonzero_macs": 2 * 9 * 64 + 5 * 2 * 8 * 16 + 20 * 6 + 6 * 3,
    }
    x = torch.rand(4, 64)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_dense_resnet20_cost_equals_the_hand_count(shortcut):
    s0, s1, s2, C, H = 3, 4, 5, 3, 8  # maps 8x8, 4x4, 2x2
    model = _resnet(shortcut)
    flops = 2 * 9 * (C * s0 * H * H + 6 * s0 * s0 * H * H
                     + (s0 * s1 + 5 * s1 * s1) * (H // 2) ** 2 + (s1 * s2 + 5 * s2 * s2) * (H // 4) ** 2)
    flops += 2 * s2 * 4
    weights = 9 * (C * s0 + 6 * s0 * s0 + s0 * s1 + 5 * s1 * s1 + s1 * s2 + 5 * s2 * s2) + s2 * 4
    bn = 2 * (s0 + 6 * s0 + 6 * s1 + 6 * s2)
    if shortcut == "B":  # 1x1 projections at the two stage changes, with their BatchNorms
        flops += 2 * (s0 * s1 * (H // 2) ** 2 + s1 * s2 * (H // 4) ** 2)
        weights += s0 * s1 + s1 * s2
        bn += 2 * (s1 + s2)
    cost = model.cost()
    assert cost["flops"] == flops and cost["params"] == weights + 4 + bn
    model.add_module("extra", nn.Dropout())
    with pytest.raises(ValueError, match="does not know layer 'extra'"):
        model.cost()


# ----- live units and shrinking -------------------------------------------------------------------

def test_cnn_group_masks_then_shrink_equals_the_masked_network_with_constants_folded():
    model = _cnn()
    with torch.no_grad():  # positive biases: every removed unit outputs a nonzero constant
        for b in (model.convs[0].bias, model.convs[1].bias, model.fc1.bias):
            b.uniform_(0.1, 0.5)
    _weak_groups(model, [2, 3, 4])
    keep = model.live_units()
    assert [int(k.sum()) for k in keep] == [2, 3, 4]
    small = model.shrink(keep)
    # conv1's two constants reach conv2 through zero padding: merged into one constant channel;
    # conv2's and fc1's constants are folded into fc1's and fc2's biases
    assert small.channels == [3, 3] and small.hidden == 4
    x = torch.rand(16, 64)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)
    assert small.cost()["flops"] < model.cost()["flops"]
    again = from_spec(small.spec(), small.state_dict()).eval()
    assert isinstance(again, CNN) and torch.equal(again(x), small(x))


def test_cnn_shrink_of_any_keep_equals_the_masked_copy_and_an_empty_layer_keeps_one_channel():
    model = _cnn(seed=1, input_shape=(2, 12, 12), channels=[4, 5, 3], hidden=5)
    x = torch.rand(6, 2 * 12 * 12)
    for keep in ([torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 0, 1]),
                  torch.tensor([1, 1, 0, 0, 1])],
                 [torch.zeros(4), torch.ones(5), torch.zeros(3), torch.zeros(5)]):
        keep = [k.bool() for k in keep]
        small = model.shrink(keep)
        torch.testing.assert_close(small(x), _masked(model, keep)(x), atol=1e-5, rtol=0)
    assert small.channels[0] == 1 and small.channels[2] == 1 and small.hidden == 1
    with pytest.raises(ValueError, match="keep vectors"):
        model.shrink(keep[:2])


def test_live_units_drop_zero_filters_and_unread_channels_only():
    model = _cnn()
    with torch.no_grad():
        model.convs[0].weight[0] = 0  # zero filter: a constant, foldable
        model.convs[1].weight[:, 2] = 0  # conv1 channel 2 is read by nothing
        model.fc1.weight[:, 4:8] = 0  # conv2 channel 1 (fc1 columns 4..7) is read by nothing
        model.fc2.weight[:, 5] = 0  # hidden neuron 5 is read by nothing
    keep = model.live_units()
    assert [k.tolist() for k in keep] == [[False, True, False, True], [True, False, True, True, True],
                                          [True] * 5 + [False]]
    small = model.shrink(keep)
    x = torch.rand(5, 64)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet20_group_masks_then_shrink_equals_the_masked_network_in_eval_mode(shortcut):
    model = _resnet(shortcut)
    sizes = [fam.size for fam in model.unit_groups()]
    _weak_groups(model, [max(1, n - 2) for n in sizes])
    keep = model.live_units()
    assert [int(k.sum()) for k in keep] == [max(1, n - 2) for n in sizes]
    small = model.shrink(keep)
    # the removed channels' BatchNorm constants relu(beta - gamma mean / sigma) feed conv2
    # through zero padding: a block keeps at most one constant channel for them (none where all are 0)
    kept = [int(k.sum()) for k in keep]
    assert all(k <= n <= k + 1 for k, n in zip(kept, small.inner)) and small.inner != kept
    x = torch.randn(6, 3 * 8 * 8)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)
    assert small.cost()["flops"] < model.cost()["flops"]
    again = from_spec(small.spec(), small.state_dict()).eval()
    assert isinstance(again, ResNet20) and again.inner == small.inner
    torch.testing.assert_close(again(x), small(x), atol=0, rtol=0)


def test_resnet20_shrink_slices_batchnorm_with_the_kept_channels_and_handles_mnist_padding():
    model = _resnet("A", shape=(1, 28, 28))
    keep = [torch.rand(fam.size) < 0.5 for fam in model.unit_groups()]
    keep[0][:] = False  # a block with no channel left keeps only the constant one
    small = model.shrink(keep)
    x = torch.rand(3, 784)
    torch.testing.assert_close(small(x), _masked(model, keep)(x), atol=1e-5, rtol=0)
    b = 1
    idx = keep[b].nonzero().flatten()
    big, little = model.blocks[b].bn1, small.blocks[b].bn1
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(little, name)[: len(idx)], getattr(big, name)[idx])
    assert small.inner[0] == 1 and small.blocks[0].conv1.weight.abs().sum() == 0


def test_spec_round_trip_rebuilds_the_same_dense_networks():
    x = torch.rand(3, 64)
    cnn = _cnn()
    again = from_spec(cnn.spec(), cnn.state_dict()).eval()
    assert isinstance(again, CNN) and torch.equal(again(x), cnn(x))
    resnet = _resnet("B")
    again = from_spec(resnet.spec(), resnet.state_dict()).eval()
    x = torch.rand(3, 192)
    assert isinstance(again, ResNet20) and torch.equal(again(x), resnet(x))
