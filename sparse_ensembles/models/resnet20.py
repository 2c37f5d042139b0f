"""The ``"resnet20"`` model kind: He et al. 2016's CIFAR ResNet-20 (option-A or -B shortcuts), one
group per conv filter, shrinking to its live channels. Input reading, the group convention, the cost
rule and the exact removal of constant channels are described in :mod:`.conv`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..structure import Part, SliceFamily
from .conv import image_shape, as_images, positive_ints, conv_cost, linear_cost, add_costs, check_layers, check_keep, reads, computes
from .registry import register


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
        self.stages = positive_ints("resnet20", "stages", stages)
        if len(self.stages) != 3:
            raise ValueError(f"resnet20 has 3 stages; got widths {self.stages}")
        self.classes = positive_ints("resnet20", "classes", [classes])[0]
        planes = [p for p in self.stages for _ in range(self.BLOCKS)]
        self.inner = planes if inner is None else positive_ints("resnet20", "inner", inner)
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
        h = as_images(x, self.input_shape, "resnet20")
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
        check_layers(self, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ModuleList, BasicBlock))
        total: dict = {}
        for _, conv, hw in self._convs():
            total = add_costs(total, conv_cost(conv.weight, conv.bias, hw))
        total = add_costs(total, linear_cost(self.fc))
        bn_params = sum(int(p.detach().ne(0).sum()) for m in self.modules() if isinstance(m, nn.BatchNorm2d)
                        for p in (m.weight, m.bias) if p is not None)
        return add_costs(total, {"params": bn_params})

    # ----- surgery --------------------------------------------------------------------------------

    @torch.no_grad()
    def live_units(self) -> list[Tensor]:
        """Keep vectors aligned with :meth:`unit_groups`: channel k of a block's conv1 is live when
        its filter is nonzero and the block's conv2 reads it; the others can go (a zero filter
        leaves a constant, which ``shrink`` folds)."""
        return [computes(block.conv1.weight) & reads(block.conv2.weight) for block in self.blocks]

    @torch.no_grad()
    def shrink(self, keep: Sequence[Tensor]) -> "ResNet20":
        """A new ``ResNet20`` whose blocks hold only the kept conv1 channels (``keep`` aligned with
        :meth:`unit_groups`), plus one constant channel where removed channels fed conv2 a nonzero
        constant (or none was kept), computing in eval mode what this model computes with the
        dropped filters zeroed. This model is left unchanged."""
        keep = check_keep(self.unit_groups(), keep)
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
