"""Declared coupled groups of weights.

A *group family* is a set of ``size`` groups of the same shape; group ``k`` is the ``k``-th slice
along dimension ``dim`` of each listed parameter (a :class:`Part`). A part with ``blocks > 1``
sees that dimension as ``blocks`` consecutive copies of ``size`` (LSTM gate matrices stack four
gates, so the ISS group of hidden unit ``k`` takes rows ``k, n+k, 2n+k, 3n+k``).

Models declare their families (``model.unit_groups()``); the group prior, structured pruning and
physical compaction all read the same declaration, so they can never disagree about what a
"neuron" is. For a plain ``nn.Sequential`` MLP, :func:`sequential_groups` declares them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Part:
    param: str
    dim: int
    blocks: int = 1


@dataclass(frozen=True)
class GroupFamily:
    """``size`` groups; group ``k`` is slice ``k`` of every part (see module docstring)."""

    name: str
    size: int
    parts: tuple[Part, ...]

    def _view(self, part: Part, tensor: Tensor) -> Tensor:
        """``tensor`` as (blocks, size, rest) with the group index in the middle."""
        if tensor.shape[part.dim] != part.blocks * self.size:
            raise ValueError(
                f"group family {self.name!r}: parameter {part.param!r} has {tensor.shape[part.dim]} "
                f"entries along dim {part.dim}, expected blocks*size = {part.blocks}*{self.size}"
            )
        moved = tensor.movedim(part.dim, 0)
        return moved.reshape(part.blocks, self.size, -1)

    def sq_norms(self, params: Mapping[str, Tensor]) -> Tensor:
        """Squared L2 norm of each group, shape (size,)."""
        total = None
        for part in self.parts:
            s = self._view(part, params[part.param]).pow(2).sum(dim=(0, 2))
            total = s if total is None else total + s
        return total

    def norms(self, params: Mapping[str, Tensor]) -> Tensor:
        return self.sq_norms(params).sqrt()

    def group_dim(self, params: Mapping[str, Tensor]) -> int:
        """Number of weights in one group (dim_g of the group Lasso)."""
        return sum(params[p.param].numel() // self.size for p in self.parts)

    def expand(self, per_group: Tensor, part: Part, like: Tensor) -> Tensor:
        """Broadcast a (size,) vector onto ``like`` (the tensor of ``part``)."""
        shape = [1] * like.dim()
        shape[part.dim] = self.size
        tiles = [1] * like.dim()
        tiles[part.dim] = part.blocks  # blocks are consecutive copies: index b * size + k
        return per_group.reshape(shape).repeat(*tiles).expand_as(like)


def sequential_groups(model: nn.Sequential, *, include_inputs: bool = True) -> list[GroupFamily]:
    """Neuron groups of an MLP written as ``nn.Sequential`` (SSE paper, section 3.2).

    Group of a neuron = all its outgoing weights: input feature ``j`` owns column ``j`` of the first
    ``Linear``; hidden neuron ``j`` of layer ``l`` owns column ``j`` of the next ``Linear``. Output
    neurons own nothing and are never pruned.
    """
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("sequential_groups needs an nn.Sequential with at least one nn.Linear")
    families = []
    for i, (name, layer) in enumerate(linears):
        if i == 0 and not include_inputs:
            continue
        label = "input" if i == 0 else f"hidden{i}"
        families.append(GroupFamily(label, layer.in_features, (Part(f"{name}.weight", 1),)))
    return families


def groups_of(model: nn.Module) -> list[GroupFamily]:
    """The model's declared groups: ``model.unit_groups()``, or inferred for an nn.Sequential MLP."""
    if hasattr(model, "unit_groups"):
        return list(model.unit_groups())
    if isinstance(model, nn.Sequential):
        return sequential_groups(model)
    raise TypeError(
        f"{type(model).__name__} declares no groups: give it a unit_groups() method returning "
        "GroupFamily objects (see sparse_ensembles.structure)"
    )
