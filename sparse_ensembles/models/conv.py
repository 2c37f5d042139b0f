"""What the convolutional model kinds share (``"cnn"`` in :mod:`.cnn`, ``"resnet20"`` in
:mod:`.resnet20`): reading flattened images, the filter-group convention, the cost rule, and the
checks ``shrink`` runs.

Both read the task's *flattened* images, shape (B, in_features), and reshape them themselves:
784 -> (1, 28, 28), 3072 -> (3, 32, 32) (CIFAR order: channel-major, CHW), or ``input_shape``.

Groups (grouping ``"filters"``, the only one): one group per output channel of each convolution =
that channel's filter, slice ``k`` along dim 0 of the conv weight (out, in, kh, kw). The CNN's
hidden FC neurons use the same convention: neuron ``j`` owns row ``j`` of ``fc1.weight`` (its
incoming weights), so every group of these kinds is "the weights that compute one unit". Biases
and BatchNorm parameters belong to no group (as in the MLP and the LSTM kinds).

A unit whose group is zero still outputs a constant: ``relu(bias)`` in the CNN, ``relu(beta -
gamma * mean / sqrt(var + eps))`` after an eval-mode BatchNorm. ``shrink`` removes such units
exactly: constants read by a Linear layer are folded into its bias; constants read by a zero-padded
convolution cannot be (near the border the padding makes their contribution position-dependent),
so all of them are merged into *one* channel whose output is exactly 1 (zero filter, bias 1 / BN
gamma 0, beta 1) and which the next convolution reads with the kernel ``sum_k c_k W[:, k]``. A
layer therefore shrinks to its kept units, plus at most one such constant channel.

Cost (``cost()``), per example: nonzero parameters (weights, biases, BatchNorm gamma and beta;
running statistics are buffers and not counted); FLOPs by the SSE sub-matrix rule extended to
convolutions, for a conv weight (out, in, kh, kw) producing an H_out x W_out map::

    2 x (live output channels) x (live input channels) x kh x kw x H_out x W_out

where an output (input) channel is live if any weight of its filter (of its input slice
``W[:, c]``) is nonzero; nonzero MACs = nonzero conv weights x H_out x W_out; Linear layers as in
the MLP (2 x live rows x live columns; nonzero weights). BatchNorm, pooling, ReLU, bias and
residual additions and the option-A shortcut (a strided copy) cost no FLOPs under this rule.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..structure import SliceFamily
from .registry import unknown_layer

KNOWN_SHAPES = {784: (1, 28, 28), 3072: (3, 32, 32)}


def image_shape(in_features: int, input_shape: Optional[Sequence[int]] = None, who: str = "cnn") -> tuple[int, int, int]:
    """(channels, height, width) of a task's flattened images: ``input_shape`` if given (it must
    hold ``in_features`` values), else 784 -> 1x28x28 and 3072 -> 3x32x32."""
    if input_shape:
        shape = tuple(input_shape)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"{who} input_shape must be [channels, height, width] of positive ints; got {list(shape)}")
        if math.prod(shape) != in_features:
            raise ValueError(f"{who} input_shape {list(shape)} holds {math.prod(shape)} values, but the task's "
                             f"inputs have {in_features} features")
        return shape
    if in_features in KNOWN_SHAPES:
        return KNOWN_SHAPES[in_features]
    raise ValueError(f"{who} cannot tell the image shape of {in_features} input features (it knows 784 = 1x28x28 "
                     "and 3072 = 3x32x32); set model.input_shape = [channels, height, width]")


def as_images(x: Tensor, shape: tuple[int, int, int], who: str) -> Tensor:
    if x.dim() < 2 or math.prod(x.shape[1:]) != math.prod(shape):
        raise ValueError(f"{who} expects images of {math.prod(shape)} values ({'x'.join(map(str, shape))}) per "
                         f"example, flattened or not; got inputs of shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], *shape)


def positive_ints(who: str, name: str, values) -> list[int]:
    if isinstance(values, (int, str)) or len(values) < 1 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{who} {name} must be a non-empty list of positive ints; got {values!r}")
    return list(values)


def conv_cost(weight: Tensor, bias: Optional[Tensor], out_hw: tuple[int, int]) -> dict:
    """Nonzero params, sub-matrix FLOPs and nonzero MACs of one convolution (module docstring)."""
    nz = weight.detach().ne(0)
    area = out_hw[0] * out_hw[1]
    kh, kw = weight.shape[2:]
    live_out = int(nz.flatten(1).any(1).sum())
    live_in = int(nz.transpose(0, 1).flatten(1).any(1).sum())
    params = int(nz.sum()) + (int(bias.detach().ne(0).sum()) if bias is not None else 0)
    return {"params": params, "flops": 2 * live_out * live_in * kh * kw * area, "nonzero_macs": int(nz.sum()) * area}


def linear_cost(layer: nn.Linear) -> dict:
    nz = layer.weight.detach().ne(0)
    params = int(nz.sum()) + (int(layer.bias.detach().ne(0).sum()) if layer.bias is not None else 0)
    return {"params": params, "flops": 2 * int(nz.any(1).sum()) * int(nz.any(0).sum()), "nonzero_macs": int(nz.sum())}


def add_costs(total: dict, part: dict) -> dict:
    return {k: total.get(k, 0) + part.get(k, 0) for k in ("params", "flops", "nonzero_macs")}


def check_layers(model: nn.Module, known: tuple) -> None:
    for name, m in model.named_modules():
        if m is not model and not isinstance(m, known):
            raise unknown_layer(model, m, name)


def check_keep(families: Sequence[SliceFamily], keep: Sequence[Tensor]) -> list[Tensor]:
    if len(keep) != len(families):
        raise ValueError(f"shrink needs {len(families)} keep vectors (one per unit_groups() family); got {len(keep)}")
    out = []
    for fam, k in zip(families, keep):
        k = torch.as_tensor(k).to(device="cpu", dtype=torch.bool)
        if k.shape != (fam.size,):
            raise ValueError(f"keep vector for {fam.name!r} has shape {tuple(k.shape)}, expected ({fam.size},)")
        out.append(k)
    return out


def reads(weight: Tensor) -> Tensor:
    """Per input channel of a conv weight (out, in, kh, kw): does any weight read it?"""
    return weight.detach().ne(0).transpose(0, 1).flatten(1).any(1)


def computes(weight: Tensor) -> Tensor:
    """Per output unit (dim 0): is any weight of its group nonzero?"""
    return weight.detach().ne(0).flatten(1).any(1)


# ----- the Deng et al. CNN -------------------------------------------------------------------------
