"""A user's own ``nn.Sequential`` network with convolutions: its unit groups derived, its cost counted,
and the network shrunk physically to :class:`CompactSequential`, a registered kind saved without code.

Supported layers: ``Conv2d`` (``groups=1``, zero padding), ``BatchNorm1d`` / ``BatchNorm2d``, the
activations of :data:`~sparse_ensembles.models.mlp.ACTIVATIONS`, ``MaxPool2d`` / ``AvgPool2d`` without
padding, one ``Flatten`` between the convolutional and the fully connected part, ``Linear`` and
``Dropout``. A network is a chain of *blocks*: a weighted layer (``Conv2d`` or ``Linear``) and the
pointwise layers after it (normalisation, activation, pooling, dropout).

Units and groups: every output channel of a convolution (its filter: slice ``k`` of the weight along
dim 0) and every output neuron of a hidden ``Linear`` (its row, the incoming weights). The last
layer's outputs are not units. This is the convention of the built-in CNN kinds
(:mod:`sparse_ensembles.models.conv`).

Shrinking, in eval mode (BatchNorm uses its running statistics), exact:

* a unit that no later weight reads is removed;
* a unit whose group is all zero outputs a constant ``c_k`` (its bias through the block's
  BatchNorm and activation; pooling keeps a constant). Read by a ``Linear`` (directly or through
  ``Flatten``) or by a convolution without padding, its contribution is folded into that layer's
  bias. Read by a zero-padded convolution it cannot be (near the border the padding makes it
  position-dependent), so the constant unit of largest ``|c_k|`` stays as a *carrier* and the next
  convolution reads it with the kernel ``sum_k c_k W[:, k] / c_carrier``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..structure import Part, SliceFamily
from .conv import conv_cost, linear_cost
from .mlp import ACTIVATIONS, check_default_activation
from .registry import register

_ACT_NAME = {cls: name for name, cls in ACTIVATIONS.items()}
POINTWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, *ACTIVATIONS.values())


class Block:
    """A weighted layer, the pointwise layers after it, and whether a ``Flatten`` comes before it."""

    def __init__(self, index: int, layer: nn.Module, flatten_before: bool):
        self.index, self.layer, self.post, self.flatten_before = index, layer, [], flatten_before
        self.flatten_after = False


def blocks_of(model: nn.Sequential) -> list[Block]:
    """The model's blocks; a ``ValueError`` naming the first layer that is not supported, and why."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{type(model).__name__} is not an nn.Sequential")
    blocks, flatten_pending, seen_flatten = [], False, False
    for i, m in enumerate(model):
        where = f"{type(m).__name__} at position {i}"
        if isinstance(m, nn.Conv2d):
            if seen_flatten:
                raise ValueError(f"{where}: a convolution after Flatten is not supported")
            if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"{where}: only groups=1, dilation 1 and numeric zero padding are supported")
            blocks.append(Block(i, m, False))
        elif isinstance(m, nn.Linear):
            if blocks and isinstance(blocks[-1].layer, nn.Conv2d) and not flatten_pending:
                raise ValueError(f"{where}: a Linear after a convolution needs an nn.Flatten between them")
            blocks.append(Block(i, m, flatten_pending))
            flatten_pending = False
        elif isinstance(m, nn.Flatten):
            if seen_flatten or (m.start_dim, m.end_dim) != (1, -1):
                raise ValueError(f"{where}: one Flatten(start_dim=1) is supported")
            seen_flatten, flatten_pending = True, bool(blocks)  # a leading Flatten only reshapes the input
        elif isinstance(m, POINTWISE):
            if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and m.padding not in (0, (0, 0)):
                raise ValueError(f"{where}: pooling with padding is not supported")
            if isinstance(m, nn.MaxPool2d) and (m.ceil_mode or m.dilation not in (1, (1, 1))):
                raise ValueError(f"{where}: only MaxPool2d with ceil_mode=False and dilation 1 is supported")
            if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or m.divisor_override is not None):
                raise ValueError(f"{where}: only AvgPool2d with ceil_mode=False and no divisor_override is supported")
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not m.track_running_stats:
                raise ValueError(f"{where}: BatchNorm without running statistics cannot be shrunk exactly")
            if type(m) in ACTIVATIONS.values():
                check_default_activation(m, where)
            if not blocks:
                raise ValueError(f"{where}: the network must start with a Conv2d, Linear or Flatten")
            if flatten_pending and not isinstance(m, (nn.Dropout, *ACTIVATIONS.values())):
                raise ValueError(f"{where}: between Flatten and the next Linear only activations and Dropout are "
                                 "supported")
            blocks[-1].post.append(m)
        else:
            raise ValueError(f"{where} is not supported (supported: Conv2d, Linear, BatchNorm1d/2d, MaxPool2d, "
                             f"AvgPool2d, Flatten, Dropout and {sorted(ACTIVATIONS)})")
    if not blocks:
        raise ValueError("the network has no Conv2d or Linear layer")
    if not any(isinstance(b.layer, nn.Conv2d) for b in blocks):
        raise ValueError("the network has no Conv2d (an MLP is compacted by compact_mlp)")
    blocks[-1].flatten_after = flatten_pending  # a Flatten after the last layer
    return blocks


def sequential_unit_groups(model: nn.Sequential) -> list[SliceFamily]:
    """One family per hidden weighted layer: its output units, each the slice ``k`` along dim 0."""
    return [SliceFamily(f"layer{b.index}", b.layer.weight.shape[0], (Part(f"{b.index}.weight", 0),))
            for b in blocks_of(model)[:-1]]


def sequential_cost(model: nn.Sequential, input_shape: Sequence[int]) -> dict:
    """Nonzero parameters, sub-matrix FLOPs and nonzero MACs per example (the rule of
    :mod:`sparse_ensembles.models.conv`), the convolutions' output sizes found by one forward pass
    of a zero input of ``input_shape`` (without the batch dimension)."""
    sizes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(name, out.shape[-2:])))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    model.train(was)
    for h in hooks:
        h.remove()
    total = {"params": 0, "flops": 0, "nonzero_macs": 0}
    for name, m in model.named_modules():
        part = None
        if isinstance(m, nn.Conv2d):
            part = conv_cost(m.weight, m.bias, tuple(sizes[name]))
        elif isinstance(m, nn.Linear):
            part = linear_cost(m)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            part = {"params": int(m.weight.ne(0).sum()) + int(m.bias.ne(0).sum())}
        for k, v in (part or {}).items():
            total[k] += v
    return total


def _constants(block: Block, bias: Tensor) -> Tensor:
    """What each unit of ``block`` outputs when its group is zero: its bias through the block's
    pointwise layers (eval mode; pooling and dropout leave a constant as it is)."""
    conv = isinstance(block.layer, nn.Conv2d)
    x = bias.reshape(1, -1, 1, 1) if conv else bias.reshape(1, -1)
    for m in block.post:
        if not isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)):
            x = m(x)
    return x.flatten()


def _reads(w_next: Tensor, units: int) -> Tensor:
    """Per unit of a block: does any weight of the next layer (``w_next``) read it? A convolution
    reads input channel ``k`` through ``W[:, k]``; a Linear after ``Flatten``, through the block of
    columns unit ``k`` owns (one column without ``Flatten``)."""
    return w_next.ne(0).reshape(w_next.shape[0], units, -1).any(2).any(0)


@torch.no_grad()
def compact_sequential(model: nn.Sequential, input_shape: Optional[Sequence[int]] = None) -> "CompactSequential":
    """The physically smaller network computing what ``model`` computes in eval mode (module docstring)."""
    was = model.training
    model.eval()
    blocks = blocks_of(model)
    W = [b.layer.weight.detach().clone() for b in blocks]
    B = [b.layer.bias.detach().clone() if b.layer.bias is not None
         else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) for b, w in zip(blocks, W)]
    keep_in = torch.ones(W[0].shape[1], dtype=torch.bool)  # the network's input channels / features stay
    keeps = []
    for i in range(len(blocks) - 1):
        blk, nxt = blocks[i], blocks[i + 1]
        units = W[i].shape[0]
        cols = keep_in.repeat_interleave(W[i].shape[1] // len(keep_in))  # after Flatten: a unit's block of columns
        computes = W[i][:, cols].ne(0).flatten(1).any(1)
        W[i][:, ~cols] = 0
        reads = _reads(W[i + 1], units)
        keep = computes & reads
        fold = ~computes & reads
        if fold.any():
            c = _constants(blk, B[i])
            w_next = W[i + 1]
            conv_next = isinstance(nxt.layer, nn.Conv2d)
            if conv_next and tuple(nxt.layer.padding) != (0, 0):
                carrier = int(torch.where(fold, c.abs(), torch.full_like(c, -1.0)).argmax())
                if c[carrier] != 0:
                    kernel = torch.einsum("k,okhw->ohw", c[fold], w_next[:, fold])
                    w_next[:, fold] = 0
                    w_next[:, carrier] = kernel / c[carrier]
                    keep[carrier] = True
                    W[i][carrier] = 0
            else:
                per_unit = w_next.reshape(w_next.shape[0], units, -1).sum(2)  # conv: kernel sum; flatten: block sum
                B[i + 1] += per_unit[:, fold] @ c[fold]
                w_next.reshape(w_next.shape[0], units, -1)[:, fold] = 0
        if not keep.any():  # a layer of width 0 cannot be built: keep one unit that nothing reads
            keep[0] = True
            W[i + 1].reshape(W[i + 1].shape[0], units, -1)[:, 0] = 0
        keeps.append(keep)
        keep_in = keep
    # rebuild the layers with the kept units
    layers: list[nn.Module] = []
    prev_keep = torch.ones(W[0].shape[1], dtype=torch.bool)
    for i, blk in enumerate(blocks):
        keep = keeps[i] if i < len(keeps) else torch.ones(W[i].shape[0], dtype=torch.bool)
        w = W[i][keep]
        if blk.flatten_before:
            layers.append(nn.Flatten())
            w = w.reshape(w.shape[0], len(prev_keep), W[i].shape[1] // len(prev_keep))[:, prev_keep].reshape(w.shape[0], -1)
        else:
            w = w[:, prev_keep]
        if isinstance(blk.layer, nn.Conv2d):
            src = blk.layer
            new = nn.Conv2d(w.shape[1], w.shape[0], src.kernel_size, stride=src.stride, padding=src.padding)
        else:
            new = nn.Linear(w.shape[1], w.shape[0])
        new.weight.copy_(w)
        new.bias.copy_(B[i][keep])
        layers.append(new)
        for m in blk.post:
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                bn = type(m)(int(keep.sum()), eps=m.eps, momentum=m.momentum, affine=m.affine,
                             track_running_stats=m.track_running_stats)
                state = {k: (v[keep] if v.dim() == 1 else v) for k, v in m.state_dict().items()}
                bn.load_state_dict(state)
                layers.append(bn)
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                layers.append(type(m)(m.kernel_size, stride=m.stride))
            elif isinstance(m, nn.Dropout):
                layers.append(nn.Dropout(m.p))
            else:
                layers.append(ACTIVATIONS[_ACT_NAME[type(m)]]())
        prev_keep = keep
    if blocks[-1].flatten_after:
        layers.append(nn.Flatten())
    if not blocks[0].flatten_before and isinstance(model[0], nn.Flatten):
        layers.insert(0, nn.Flatten())
    model.train(was)
    return CompactSequential(*layers, input_shape=input_shape).eval()


@register("compact_sequential")
class CompactSequential(nn.Sequential):
    """A shrunk user ``nn.Sequential`` (:func:`compact_sequential`); ``spec()`` describes every layer
    with plain values, so it reloads with ``torch.load(weights_only=True)``."""

    def __init__(self, *layers: nn.Module, input_shape: Optional[Sequence[int]] = None):
        super().__init__(*layers)
        self.input_shape = list(input_shape) if input_shape is not None else None

    def spec(self) -> dict:
        out = []
        for m in self:
            if isinstance(m, nn.Conv2d):
                out.append({"layer": "conv2d", "in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size),
                            "stride": list(m.stride), "padding": list(m.padding)})
            elif isinstance(m, nn.Linear):
                out.append({"layer": "linear", "in": m.in_features, "out": m.out_features})
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                out.append({"layer": "batchnorm1d" if isinstance(m, nn.BatchNorm1d) else "batchnorm2d",
                            "features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine})
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                k, s = m.kernel_size, m.stride
                out.append({"layer": "maxpool2d" if isinstance(m, nn.MaxPool2d) else "avgpool2d",
                            "kernel": list(k) if isinstance(k, tuple) else k, "stride": list(s) if isinstance(s, tuple) else s})
            elif isinstance(m, nn.Flatten):
                out.append({"layer": "flatten"})
            elif isinstance(m, nn.Dropout):
                out.append({"layer": "dropout", "p": m.p})
            else:
                out.append({"layer": _ACT_NAME[type(m)]})
        return {"kind": "compact_sequential", "layers": out, "input_shape": self.input_shape}

    @classmethod
    def from_spec(cls, spec: dict) -> "CompactSequential":
        build = {"conv2d": lambda d: nn.Conv2d(d["in"], d["out"], tuple(d["kernel"]), stride=tuple(d["stride"]),
                                                padding=tuple(d["padding"])),
                 "linear": lambda d: nn.Linear(d["in"], d["out"]),
                 "batchnorm1d": lambda d: nn.BatchNorm1d(d["features"], eps=d["eps"], momentum=d["momentum"], affine=d["affine"]),
                 "batchnorm2d": lambda d: nn.BatchNorm2d(d["features"], eps=d["eps"], momentum=d["momentum"], affine=d["affine"]),
                 "maxpool2d": lambda d: nn.MaxPool2d(d["kernel"], stride=d["stride"]),
                 "avgpool2d": lambda d: nn.AvgPool2d(d["kernel"], stride=d["stride"]),
                 "flatten": lambda d: nn.Flatten(),
                 "dropout": lambda d: nn.Dropout(d["p"])}
        layers = [build[d["layer"]](d) if d["layer"] in build else ACTIVATIONS[d["layer"]]() for d in spec["layers"]]
        return cls(*layers, input_shape=spec.get("input_shape"))

    def cost(self) -> dict:
        if self.input_shape is None:
            raise ValueError("CompactSequential.cost() needs the input shape: build it with compact_sequential(model, "
                             "input_shape=...)")
        return sequential_cost(self, self.input_shape)


def as_sequential(model: nn.Module) -> nn.Sequential:
    """``model`` as an ``nn.Sequential`` of its own submodules when its forward is a chain: traced
    with ``torch.fx``, every step must take the previous step's output as its only tensor input and
    be a submodule call, ``relu`` / ``tanh`` / ``sigmoid`` (as functions or methods) or a flatten
    from dim 1 (``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(x.size(0), -1)``). Raises
    ``ValueError`` naming the first step that is not. The submodules are shared, not copied."""
    import operator

    import torch.fx as fx
    from torch.nn import functional as F

    if isinstance(model, nn.Sequential):
        return model
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # data-dependent control flow and the like
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {e})") from None
    functions = {F.relu: nn.ReLU, torch.relu: nn.ReLU, torch.tanh: nn.Tanh, F.tanh: nn.Tanh, torch.sigmoid: nn.Sigmoid,
                 F.sigmoid: nn.Sigmoid}
    methods = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    layers: list[nn.Module] = []
    previous = None
    size_nodes = set()
    for node in graph.nodes:
        what = f"step {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)})"
        if node.op == "placeholder":
            if previous is not None:
                raise ValueError(f"{type(model).__name__}.forward takes more than one input")
            previous = node
            continue
        if node.op == "output":
            if node.args[0] is not previous:
                raise ValueError(f"{type(model).__name__}.forward does not return its last step")
            break
        if node.op == "call_method" and node.target == "size" or (node.op == "call_function"
                                                                  and node.target is operator.getitem):
            size_nodes.add(node)  # x.size(0) feeding a view: checked with the view
            continue
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a not in size_nodes]
        if tensors != [previous]:
            raise ValueError(f"{type(model).__name__} is not a chain of layers: {what} does not take the previous "
                             "step's output as its only tensor input")
        if node.op == "call_module":
            layers.append(model.get_submodule(node.target))
        elif (node.op == "call_function" and node.target in functions and len(node.args) == 1
              and node.kwargs in ({}, {"inplace": False})):
            layers.append(functions[node.target]())
        elif node.op == "call_method" and node.target in methods and len(node.args) == 1:
            layers.append(methods[node.target]())
        elif ((node.op == "call_function" and node.target is torch.flatten and node.args[1:] == (1,))
              or (node.op == "call_method" and node.target == "flatten" and node.args[1:] == (1,))
              or (node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3
                  and node.args[1] in size_nodes and node.args[2] == -1)):
            layers.append(nn.Flatten())
        else:
            raise ValueError(f"{type(model).__name__}: {what} is not a layer, an activation or a flatten")
        previous = node
    return nn.Sequential(*layers)
