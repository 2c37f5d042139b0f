"""Convolutional model kinds with declared filter groups: ``"cnn"`` (the 2-conv-2-FC network of
Deng et al. 2019 and its ICLR'19 predecessor) and ``"resnet20"`` (He et al. 2016, CIFAR ResNet-20).

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
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..structure import Part, SliceFamily
from .registry import register, unknown_layer

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


def _as_images(x: Tensor, shape: tuple[int, int, int], who: str) -> Tensor:
    if x.dim() < 2 or math.prod(x.shape[1:]) != math.prod(shape):
        raise ValueError(f"{who} expects images of {math.prod(shape)} values ({'x'.join(map(str, shape))}) per "
                         f"example, flattened or not; got inputs of shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], *shape)


def _positive_ints(who: str, name: str, values) -> list[int]:
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


def _add(total: dict, part: dict) -> dict:
    return {k: total.get(k, 0) + part.get(k, 0) for k in ("params", "flops", "nonzero_macs")}


def _check_layers(model: nn.Module, known: tuple) -> None:
    for name, m in model.named_modules():
        if m is not model and not isinstance(m, known):
            raise unknown_layer(model, m, name)


def _check_keep(families: Sequence[SliceFamily], keep: Sequence[Tensor]) -> list[Tensor]:
    if len(keep) != len(families):
        raise ValueError(f"shrink needs {len(families)} keep vectors (one per unit_groups() family); got {len(keep)}")
    out = []
    for fam, k in zip(families, keep):
        k = torch.as_tensor(k).to(device="cpu", dtype=torch.bool)
        if k.shape != (fam.size,):
            raise ValueError(f"keep vector for {fam.name!r} has shape {tuple(k.shape)}, expected ({fam.size},)")
        out.append(k)
    return out


def _reads(weight: Tensor) -> Tensor:
    """Per input channel of a conv weight (out, in, kh, kw): does any weight read it?"""
    return weight.detach().ne(0).transpose(0, 1).flatten(1).any(1)


def _computes(weight: Tensor) -> Tensor:
    """Per output unit (dim 0): is any weight of its group nonzero?"""
    return weight.detach().ne(0).flatten(1).any(1)


# ----- the Deng et al. CNN -------------------------------------------------------------------------

@register("cnn")
class CNN(nn.Module):
    """``[conv k x k (padding k // 2), ReLU, maxpool 2] per entry of channels -> flatten -> fc1
    (hidden), ReLU -> fc2 (classes)``. Defaults: Deng et al. 2019's MNIST/Fashion-MNIST network,
    conv 5x5 32 -> conv 5x5 64 -> FC 1024 -> FC classes (28 -> 14 -> 7, fc1 reads 64 x 7 x 7).

    Parameters: ``convs.{i}.weight`` / ``.bias``, ``fc1.*``, ``fc2.*``. Groups and unit families
    (``unit_groups()``): the filters of each conv (``conv{i+1}``: dim 0 of ``convs.{i}.weight``)
    and the hidden FC neurons (``fc1``: rows of ``fc1.weight``); the output neurons are never
    pruned. ``shrink`` returns a smaller ``CNN`` (see the module docstring for the constants)."""

    @dataclass
    class Config:
        channels: list[int] = field(default_factory=lambda: [32, 64])  # filters per conv layer
        kernel: int = 5  # square, odd; padding kernel // 2 keeps the map size before each pooling
        hidden: int = 1024  # width of the hidden FC layer
        input_shape: list[int] = field(default_factory=list)  # [C, H, W]; [] = from in_features (784 / 3072)

        def validate(self, need) -> None:
            need(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "model.channels",
                 "give one positive filter count per conv layer, e.g. [32, 64]")
            need(self.kernel >= 1 and self.kernel % 2 == 1, "model.kernel",
                 "must be an odd int >= 1 (padding kernel // 2 keeps the map size)")
            need(self.hidden >= 1, "model.hidden", "must be >= 1")
            need(not self.input_shape or (len(self.input_shape) == 3 and min(self.input_shape) >= 1),
                 "model.input_shape", "must be [channels, height, width] of positive ints, or [] (784 / 3072 inputs)")

    groupings = ("filters",)

    def __init__(self, input_shape: Sequence[int], classes: int, channels: Sequence[int] = (32, 64),
                 hidden: int = 1024, kernel: int = 5):
        super().__init__()
        self.input_shape = image_shape(math.prod(input_shape), input_shape, "cnn")
        self.channels = _positive_ints("cnn", "channels", channels)
        (self.hidden, self.classes, self.kernel) = _positive_ints("cnn", "hidden, classes and kernel",
                                                                  [hidden, classes, kernel])
        if kernel % 2 != 1:
            raise ValueError(f"cnn kernel must be odd (padding kernel // 2 keeps the map size); got {kernel}")
        c, h, w = self.input_shape
        self.convs = nn.ModuleList()
        self.map_sizes: list[tuple[int, int]] = []  # each conv's output map, before its pooling
        for out in self.channels:
            self.convs.append(nn.Conv2d(c, out, kernel, padding=kernel // 2))
            self.map_sizes.append((h, w))
            h, w, c = h // 2, w // 2, out
            if h < 1 or w < 1:
                raise ValueError(f"cnn: {len(self.channels)} poolings by 2 leave nothing of a "
                                 f"{self.input_shape[1]}x{self.input_shape[2]} image; use fewer conv layers")
        self.pooled = (h, w)  # map size fc1 reads: fc1 column = channel * h * w + position
        self.fc1 = nn.Linear(c * h * w, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.classes)

    @classmethod
    def from_config(cls, cfg: "CNN.Config", dims: dict) -> "CNN":
        if "in_features" not in dims or "classes" not in dims:
            raise ValueError(f"cnn needs dims 'in_features' and 'classes' (an image classification task); got {dims!r}")
        shape = image_shape(dims["in_features"], cfg.input_shape, "cnn")
        return cls(shape, dims["classes"], cfg.channels, cfg.hidden, cfg.kernel)

    def spec(self) -> dict:
        return {"kind": "cnn", "input_shape": list(self.input_shape), "classes": self.classes,
                "channels": list(self.channels), "hidden": self.hidden, "kernel": self.kernel}

    @classmethod
    def from_spec(cls, spec: dict) -> "CNN":
        return cls(spec["input_shape"], spec["classes"], spec["channels"], spec["hidden"], spec["kernel"])

    def forward(self, x: Tensor) -> Tensor:
        h = _as_images(x, self.input_shape, "cnn")
        for conv in self.convs:
            h = F.max_pool2d(F.relu(conv(h)), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))

    # ----- structure ------------------------------------------------------------------------------

    def conv_weight_names(self) -> list[str]:
        """The conv weights in forward order (``[1:]``: "every convolution but the first")."""
        return [f"convs.{i}.weight" for i in range(len(self.convs))]

    def groups(self, grouping: Optional[str] = None) -> list[SliceFamily]:
        if grouping not in (None, *self.groupings):
            raise ValueError(f"cnn has groupings {self.groupings}, not {grouping!r}")
        return self.unit_groups()

    def unit_groups(self) -> list[SliceFamily]:
        fams = [SliceFamily(f"conv{i + 1}", conv.out_channels, (Part(f"convs.{i}.weight", 0),))
                for i, conv in enumerate(self.convs)]
        return fams + [SliceFamily("fc1", self.hidden, (Part("fc1.weight", 0),))]

    def prunable_weights(self) -> dict[str, Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.conv_weight_names() + ["fc1.weight", "fc2.weight"]}

    def cost(self) -> dict:
        _check_layers(self, (nn.Conv2d, nn.Linear, nn.ModuleList))
        total: dict = {}
        for conv, hw in zip(self.convs, self.map_sizes):
            total = _add(total, conv_cost(conv.weight, conv.bias, hw))
        for layer in (self.fc1, self.fc2):
            total = _add(total, linear_cost(layer))
        return total

    def _fc1_by_channel(self, w: Tensor) -> Tensor:
        """fc1's weight as (hidden, channels of the last conv, pooled positions)."""
        return w.view(w.shape[0], self.channels[-1], self.pooled[0] * self.pooled[1])

    # ----- surgery --------------------------------------------------------------------------------

    @torch.no_grad()
    def live_units(self) -> list[Tensor]:
        """Keep vectors aligned with :meth:`unit_groups`: a unit is live when its group (filter, or
        fc1 row) is nonzero *and* the next layer reads it. The others can go: an unread unit
        changes nothing, a unit with a zero group is a constant that ``shrink`` folds."""
        keep = []
        for i, conv in enumerate(self.convs):
            if i + 1 < len(self.convs):
                read = _reads(self.convs[i + 1].weight)
            else:
                read = self._fc1_by_channel(self.fc1.weight.detach()).ne(0).any(2).any(0)
            keep.append(_computes(conv.weight) & read)
        keep.append(_computes(self.fc1.weight) & self.fc2.weight.detach().ne(0).any(0))
        return keep

    @torch.no_grad()
    def shrink(self, keep: Sequence[Tensor]) -> "CNN":
        """A new, physically smaller ``CNN`` holding the kept filters and neurons (``keep`` aligned
        with :meth:`unit_groups`), computing what this model computes with the dropped groups'
        weights zeroed. A dropped unit outputs the constant ``relu(bias)``: folded into fc1's (fc2's)
        bias where fc1 (fc2) reads it; where the next conv reads it, all of a layer's constants
        become one extra channel of constant output 1 (see the module docstring). A layer left
        with no unit keeps one such channel. This model is left unchanged."""
        keep = _check_keep(self.unit_groups(), keep)
        device = self.fc1.weight.device
        keep = [k.to(device) for k in keep]
        L = len(self.convs)
        ws = [c.weight.detach().clone() for c in self.convs]
        bs = [c.bias.detach().clone() for c in self.convs]
        w1, b1 = self.fc1.weight.detach().clone(), self.fc1.bias.detach().clone()
        w2, b2 = self.fc2.weight.detach().clone(), self.fc2.bias.detach().clone()
        for i in range(L):  # the masked network: dropped groups zeroed
            ws[i][~keep[i]] = 0
        w1[~keep[L]] = 0
        consts = [F.relu(b) * ~k for b, k in zip(bs, keep)]  # a dropped channel's output; 0 if kept

        new_w, new_b, extra_col = [], [], None  # extra_col: the next conv's kernel on the constant channel
        for i in range(L):
            idx = keep[i].nonzero().flatten()
            w, b = ws[i][idx], bs[i][idx]
            if extra_col is not None:  # this conv reads the previous layer's constant channel, last
                w = torch.cat([w, extra_col[idx].unsqueeze(1)], dim=1)
            if i + 1 < L:  # the next conv reads this layer's constants through zero padding
                col = torch.einsum("ojhw,j->ohw", ws[i + 1], consts[i])
                extra_col = None
                if bool(col.ne(0).any()) or idx.numel() == 0:
                    w = torch.cat([w, w.new_zeros(1, *w.shape[1:])])
                    b = torch.cat([b, b.new_ones(1)])  # relu(1) = 1, and pooling keeps it
                    extra_col = col
                ws[i + 1] = ws[i + 1][:, idx]
            else:  # the last conv: fc1 reads it; fold its constants into fc1's bias
                fc = self._fc1_by_channel(w1)
                b1 += torch.einsum("hjp,j->h", fc, consts[i])
                fc = fc[:, idx]
                if idx.numel() == 0:  # keep one zero channel that nothing reads
                    w = torch.cat([w, w.new_zeros(1, *w.shape[1:])])
                    b = torch.cat([b, b.new_zeros(1)])
                    fc = torch.cat([fc, fc.new_zeros(fc.shape[0], 1, fc.shape[2])], dim=1)
                w1 = fc.reshape(fc.shape[0], -1)
            new_w.append(w)
            new_b.append(b)
        # hidden neurons: fc1's bias now holds the last conv's constants
        b2 += w2 @ (F.relu(b1) * ~keep[L])
        idx = keep[L].nonzero().flatten()
        w1, b1, w2 = w1[idx], b1[idx], w2[:, idx]
        if idx.numel() == 0:  # one neuron that reads and outputs nothing
            w1, b1 = w1.new_zeros(1, w1.shape[1]), b1.new_zeros(1)
            w2 = w2.new_zeros(w2.shape[0], 1)

        small = type(self)(self.input_shape, self.classes, [w.shape[0] for w in new_w], w1.shape[0], self.kernel)
        small.to(device=device, dtype=self.fc1.weight.dtype)
        for conv, w, b in zip(small.convs, new_w, new_b):
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        small.fc1.weight.copy_(w1)
        small.fc1.bias.copy_(b1)
        small.fc2.weight.copy_(w2)
        small.fc2.bias.copy_(b2)
        small.train(self.training)
        return small


# ----- ResNet-20 -----------------------------------------------------------------------------------

SHORTCUTS = ("A", "B")


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, 3x3 convs without bias. ``mid``
    (the output channels of conv1, read only by conv2) may differ from ``planes`` (the residual
    stream) after shrinking. Where the shape changes, the shortcut is option A (a strided copy,
    zero-padded with new channels) or option B (1x1 conv + BN projection: ``shortcut_conv``,
    ``shortcut_bn``); elsewhere it is the identity."""

    def __init__(self, in_planes: int, mid: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.in_planes, self.planes, self.stride, self.option = in_planes, planes, stride, shortcut
        self.project = stride != 1 or in_planes != planes
        if self.project and shortcut == "A" and planes < in_planes:
            raise ValueError(f"option-A shortcut cannot narrow {in_planes} channels to {planes}; use shortcut B")
        if self.project and shortcut == "B":
            self.shortcut_conv = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(planes)

    def shortcut(self, x: Tensor) -> Tensor:
        if not self.project:
            return x
        if self.option == "B":
            return self.shortcut_bn(self.shortcut_conv(x))
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.planes - self.in_planes
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


@register("resnet20")
class ResNet20(nn.Module):
    """He et al. 2016's CIFAR ResNet-20: conv 3x3 (16) + BN + ReLU, three stages of three
    :class:`BasicBlock` with 16, 32, 64 channels (x ``width``; the first block of stages 2 and 3
    has stride 2), global average pooling, ``fc`` (classes). Input 3x32x32; a 28x28 image (MNIST)
    is zero-padded to 32x32 inside ``forward``.

    Shortcuts: option A by default, as He et al. use for CIFAR (section 4.2: identity shortcuts
    everywhere, the new channels of a stage zero-padded): no parameters, 0.27M in all at width 1,
    the model of the papers being reproduced. Option B (1x1 conv + BN projection where the shape
    changes) is available with ``shortcut = "B"``. Shrinking is the same for both, because it
    never touches the residual stream: the stream's channels are added across blocks (every
    block, the shortcut and the stem would have to drop the same channel together), so they stay.

    Groups (``"filters"``): the filters of every conv (stem ``conv1``, each block's ``conv1`` and
    ``conv2``, option-B ``shortcut_conv``). Unit families (``unit_groups()``, the keep vectors of
    ``shrink``): the output channels of each block's conv1, ``blocks.{b}.conv1``, which only that
    block's conv2 reads and which can therefore be removed freely. A removed channel's eval-mode
    constant ``relu(beta - gamma * mean / sqrt(var + eps))`` is merged into one channel of
    constant output 1 (zero filter, BN gamma 0, beta 1, mean 0, var 1) read by conv2 with the kernel
    ``sum_k c_k W2[:, k]``; BatchNorm weight, bias, running mean and variance of kept channels are
    sliced with them. ``shrink`` reproduces the eval-mode function (BN on running statistics)."""

    STAGES = (16, 32, 64)
    BLOCKS = 3  # per stage: depth 6 * 3 + 2 = 20

    @dataclass
    class Config:
        width: float = 1.0  # channel multiplier: stages round(16 w), round(32 w), round(64 w)
        shortcut: str = "A"  # A: strided identity + zero channels (He et al.'s CIFAR choice); B: 1x1 conv + BN
        input_shape: list[int] = field(default_factory=list)  # [C, H, W]; [] = from in_features (784 / 3072)

        def validate(self, need) -> None:
            need(self.width > 0, "model.width", "must be > 0 (1 = 16/32/64 channels)")
            need(self.shortcut in SHORTCUTS, "model.shortcut", f"use one of {SHORTCUTS}, not {self.shortcut!r}")
            need(not self.input_shape or (len(self.input_shape) == 3 and min(self.input_shape) >= 1),
                 "model.input_shape", "must be [channels, height, width] of positive ints, or [] (784 / 3072 inputs)")

    groupings = ("filters",)

    def __init__(self, input_shape: Sequence[int], classes: int, stages: Sequence[int] = STAGES,
                 inner: Optional[Sequence[int]] = None, shortcut: str = "A"):
        super().__init__()
        self.input_shape = image_shape(math.prod(input_shape), input_shape, "resnet20")
        self.stages = _positive_ints("resnet20", "stages", stages)
        if len(self.stages) != 3:
            raise ValueError(f"resnet20 has 3 stages; got widths {self.stages}")
        self.classes = _positive_ints("resnet20", "classes", [classes])[0]
        planes = [p for p in self.stages for _ in range(self.BLOCKS)]
        self.inner = planes if inner is None else _positive_ints("resnet20", "inner", inner)
        if len(self.inner) != len(planes):
            raise ValueError(f"resnet20 inner gives {len(self.inner)} widths; give one per block ({len(planes)})")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"resnet20 shortcut must be one of {SHORTCUTS}; got {shortcut!r}")
        self.shortcut = shortcut
        c, h, w = self.input_shape
        self.pad = 2 if (h, w) == (28, 28) else 0
        h, w = h + 2 * self.pad, w + 2 * self.pad
        self.conv1 = nn.Conv2d(c, self.stages[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.stages[0])
        self.map_sizes = {"conv1": (h, w)}  # each conv's output map: a block's convs share one
        blocks, prev = [], self.stages[0]
        for b, (mid, out) in enumerate(zip(self.inner, planes)):
            stride = 2 if b % self.BLOCKS == 0 and b > 0 else 1
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
            blocks.append(BasicBlock(prev, mid, out, stride, shortcut))
            self.map_sizes[f"blocks.{b}"] = (h, w)
            prev = out
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(self.stages[-1], self.classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @classmethod
    def from_config(cls, cfg: "ResNet20.Config", dims: dict) -> "ResNet20":
        if "in_features" not in dims or "classes" not in dims:
            raise ValueError(f"resnet20 needs dims 'in_features' and 'classes' (an image classification task); got {dims!r}")
        shape = image_shape(dims["in_features"], cfg.input_shape, "resnet20")
        return cls(shape, dims["classes"], [max(1, round(s * cfg.width)) for s in cls.STAGES], None, cfg.shortcut)

    def spec(self) -> dict:
        return {"kind": "resnet20", "input_shape": list(self.input_shape), "classes": self.classes,
                "stages": list(self.stages), "inner": list(self.inner), "shortcut": self.shortcut}

    @classmethod
    def from_spec(cls, spec: dict) -> "ResNet20":
        return cls(spec["input_shape"], spec["classes"], spec["stages"], spec["inner"], spec["shortcut"])

    def forward(self, x: Tensor) -> Tensor:
        h = _as_images(x, self.input_shape, "resnet20")
        if self.pad:
            h = F.pad(h, (self.pad,) * 4)
        h = F.relu(self.bn1(self.conv1(h)))
        for block in self.blocks:
            h = block(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    # ----- structure ------------------------------------------------------------------------------

    def _convs(self) -> list[tuple[str, nn.Conv2d, tuple[int, int]]]:
        """(name, conv, output map size) in forward order."""
        out = [("conv1", self.conv1, self.map_sizes["conv1"])]
        for b, block in enumerate(self.blocks):
            hw = self.map_sizes[f"blocks.{b}"]
            out += [(f"blocks.{b}.conv1", block.conv1, hw), (f"blocks.{b}.conv2", block.conv2, hw)]
            if hasattr(block, "shortcut_conv"):
                out.append((f"blocks.{b}.shortcut_conv", block.shortcut_conv, hw))
        return out

    def conv_weight_names(self) -> list[str]:
        """The conv weights in forward order (``[1:]``: "every convolution but the first")."""
        return [f"{name}.weight" for name, _, _ in self._convs()]

    def groups(self, grouping: Optional[str] = None) -> list[SliceFamily]:
        if grouping not in (None, *self.groupings):
            raise ValueError(f"resnet20 has groupings {self.groupings}, not {grouping!r}")
        return [SliceFamily(name, conv.out_channels, (Part(f"{name}.weight", 0),)) for name, conv, _ in self._convs()]

    def unit_groups(self) -> list[SliceFamily]:
        return [SliceFamily(f"blocks.{b}.conv1", block.conv1.out_channels, (Part(f"blocks.{b}.conv1.weight", 0),))
                for b, block in enumerate(self.blocks)]

    def prunable_weights(self) -> dict[str, Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.conv_weight_names() + ["fc.weight"]}

    def cost(self) -> dict:
        _check_layers(self, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ModuleList, BasicBlock))
        total: dict = {}
        for _, conv, hw in self._convs():
            total = _add(total, conv_cost(conv.weight, conv.bias, hw))
        total = _add(total, linear_cost(self.fc))
        bn_params = sum(int(p.detach().ne(0).sum()) for m in self.modules() if isinstance(m, nn.BatchNorm2d)
                        for p in (m.weight, m.bias) if p is not None)
        return _add(total, {"params": bn_params})

    # ----- surgery --------------------------------------------------------------------------------

    @torch.no_grad()
    def live_units(self) -> list[Tensor]:
        """Keep vectors aligned with :meth:`unit_groups`: channel k of a block's conv1 is live when
        its filter is nonzero and the block's conv2 reads it; the others can go (a zero filter
        leaves a constant, which ``shrink`` folds)."""
        return [_computes(block.conv1.weight) & _reads(block.conv2.weight) for block in self.blocks]

    @torch.no_grad()
    def shrink(self, keep: Sequence[Tensor]) -> "ResNet20":
        """A new ``ResNet20`` whose blocks hold only the kept conv1 channels (``keep`` aligned with
        :meth:`unit_groups`), plus one constant channel where removed channels fed conv2 a nonzero
        constant (or none was kept), computing in eval mode what this model computes with the
        dropped filters zeroed. This model is left unchanged."""
        keep = _check_keep(self.unit_groups(), keep)
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        inner = []
        for b, (block, k) in enumerate(zip(self.blocks, keep)):
            p = f"blocks.{b}."
            k = k.to(state[p + "conv1.weight"].device)
            bn = block.bn1
            # eval-mode output of a channel whose filter is zero
            const = F.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)) * ~k
            w2 = state[p + "conv2.weight"]
            col = torch.einsum("ojhw,j->ohw", w2, const)
            idx = k.nonzero().flatten()
            sliced = {"conv1.weight": state[p + "conv1.weight"][idx], "conv2.weight": w2[:, idx]}
            for name in ("weight", "bias", "running_mean", "running_var"):
                sliced[f"bn1.{name}"] = state[p + f"bn1.{name}"][idx]
            if bool(col.ne(0).any()) or idx.numel() == 0:  # one channel of constant output 1
                w1 = sliced["conv1.weight"]
                sliced["conv1.weight"] = torch.cat([w1, w1.new_zeros(1, *w1.shape[1:])])
                sliced["conv2.weight"] = torch.cat([sliced["conv2.weight"], col.unsqueeze(1)], dim=1)
                for name, value in (("weight", 0.0), ("bias", 1.0), ("running_mean", 0.0), ("running_var", 1.0)):
                    t = sliced[f"bn1.{name}"]
                    sliced[f"bn1.{name}"] = torch.cat([t, t.new_full((1,), value)])
            state.update({p + n: t for n, t in sliced.items()})
            inner.append(sliced["conv1.weight"].shape[0])
        small = type(self)(self.input_shape, self.classes, self.stages, inner, self.shortcut)
        small.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        small.load_state_dict(state)
        small.train(self.training)
        return small
