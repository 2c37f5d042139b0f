"""The ``"cnn"`` model kind: the 2-conv-2-FC network of Deng et al. 2019 and its ICLR'19
predecessor, with one group per conv filter and per hidden FC neuron. Input reading, the group
convention, the cost rule and the exact removal of constant units are described in :mod:`.conv`."""
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
        self.channels = positive_ints("cnn", "channels", channels)
        (self.hidden, self.classes, self.kernel) = positive_ints("cnn", "hidden, classes and kernel",
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
        h = as_images(x, self.input_shape, "cnn")
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
        check_layers(self, (nn.Conv2d, nn.Linear, nn.ModuleList))
        total: dict = {}
        for conv, hw in zip(self.convs, self.map_sizes):
            total = add_costs(total, conv_cost(conv.weight, conv.bias, hw))
        for layer in (self.fc1, self.fc2):
            total = add_costs(total, linear_cost(layer))
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
                read = reads(self.convs[i + 1].weight)
            else:
                read = self._fc1_by_channel(self.fc1.weight.detach()).ne(0).any(2).any(0)
            keep.append(computes(conv.weight) & read)
        keep.append(computes(self.fc1.weight) & self.fc2.weight.detach().ne(0).any(0))
        return keep

    @torch.no_grad()
    def shrink(self, keep: Sequence[Tensor]) -> "CNN":
        """A new, physically smaller ``CNN`` holding the kept filters and neurons (``keep`` aligned
        with :meth:`unit_groups`), computing what this model computes with the dropped groups'
        weights zeroed. A dropped unit outputs the constant ``relu(bias)``: folded into fc1's (fc2's)
        bias where fc1 (fc2) reads it; where the next conv reads it, all of a layer's constants
        become one extra channel of constant output 1 (see the module docstring). A layer left
        with no unit keeps one such channel. This model is left unchanged."""
        keep = check_keep(self.unit_groups(), keep)
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
