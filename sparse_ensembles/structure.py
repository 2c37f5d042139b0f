"""Declared coupled groups of weights.

A *group family* is ``size`` groups of weights that a model declares; the group prior, structured
pruning and physical shrinking all read the same declaration, so they never disagree about what a
"neuron" or an "LSTM unit" is. Every family follows the small :class:`GroupFamily` protocol:

* ``params``: the names of the parameters it touches;
* ``sq_norms(params)``: squared L2 norm of each group, shape ``(size,)``;
* ``group_dim(params)``: weights in one group (``dim_g`` of the group Lasso);
* ``broadcast(values, name, like)``: a per-group vector onto parameter ``name``; an entry gets
  the sum over the distinct groups that hold it (the gradient of sum_g c_g ||theta_g||);
* ``broadcast_keep(keep, name, like)``: a per-group keep vector onto ``name``; an entry is kept
  only if every group that holds it is kept (a structured mask).

Two kinds of family:

* :class:`SliceFamily`: group ``k`` is the ``k``-th slice along ``dim`` of each listed
  :class:`Part`. A part with ``stack > 1`` sees that dimension as ``stack`` consecutive copies of
  ``size`` (an LSTM's gate matrices stack four gates, so unit ``k`` owns rows ``k, n+k, 2n+k,
  3n+k``). Two parts of one group may cover the same parameter along its two dimensions (an LSTM
  unit's rows *and* column of the recurrent matrix); the entries they share count once.
* :class:`TileFamily`: the parameter cut into a grid of 2-D tiles, one group per tile (a row or
  column of one gate matrix, or a block of block-sparse LSTMs; edge tiles may be smaller).

For a plain ``nn.Sequential`` MLP, :func:`sequential_groups` declares the neuron groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class GroupFamily(Protocol):
    name: str
    size: int

    @property
    def params(self) -> tuple[str, ...]: ...

    def sq_norms(self, params: Mapping[str, Tensor]) -> Tensor: ...

    def group_dim(self, params: Mapping[str, Tensor]) -> int: ...

    def broadcast(self, values: Tensor, name: str, like: Tensor) -> Tensor: ...

    def broadcast_keep(self, keep: Tensor, name: str, like: Tensor) -> Tensor: ...


def norms(family: GroupFamily, params: Mapping[str, Tensor]) -> Tensor:
    """L2 norm of each group of ``family``."""
    return family.sq_norms(params).sqrt()


@dataclass(frozen=True)
class Part:
    param: str
    dim: int
    stack: int = 1  # the dim holds `stack` consecutive copies of the family's size (stacked gates)


@dataclass(frozen=True)
class SliceFamily:
    """``size`` groups; group ``k`` is slice ``k`` of every part (see the module docstring)."""

    name: str
    size: int
    parts: tuple[Part, ...]

    def __post_init__(self):
        by_param: dict[str, list[Part]] = {}
        for part in self.parts:
            by_param.setdefault(part.param, []).append(part)
        for name, parts in by_param.items():
            if len(parts) > 2 or (len(parts) == 2 and {p.dim for p in parts} != {0, 1}):
                raise ValueError(
                    f"group family {self.name!r}: parameter {name!r} is covered by {len(parts)} parts; "
                    "a parameter may appear once, or twice along dims 0 and 1 of a matrix"
                )

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.param for p in self.parts))

    def _parts_of(self, name: str) -> list[Part]:
        return [p for p in self.parts if p.param == name]

    def _part_sq_norms(self, part: Part, tensor: Tensor) -> Tensor:
        """``(size,)``: the squared norm of each group's entries in ``tensor``. The group dim is split
        into (stack, size), a view (splitting one dim never copies, where ``movedim + reshape``
        copied the matrix whenever the groups were not its rows). Where a reduced dim is the
        contiguous one in memory, the reduced dims on its side of the group dim go through one
        fused norm (an inner reduction: 2-3x faster than squaring into a temporary and summing)
        and the rest (a stack of gates, size-1 dims) are summed; otherwise square and sum, because
        ``vector_norm`` over strided dims is 2-5x slower than that on CPU (measured on an MLP's
        rows and columns, contiguous and transposed, with and without ``vmap``)."""
        if tensor.shape[part.dim] != part.stack * self.size:
            raise ValueError(
                f"group family {self.name!r}: parameter {part.param!r} has {tensor.shape[part.dim]} "
                f"entries along dim {part.dim}, expected stack*size = {part.stack}*{self.size}"
            )
        shape = list(tensor.shape)
        shape[part.dim:part.dim + 1] = [part.stack, self.size]
        split = tensor.reshape(shape)
        group = part.dim + 1  # the size dim of ``split``
        reduced = [d for d in range(split.dim()) if d != group]
        unit = [d for d in reduced if split.stride(d) == 1 and split.shape[d] > 1]
        if not unit:
            return split.square().sum(dim=reduced)
        side = [d for d in reduced if (d > group) == (unit[0] > group)]
        sq = torch.linalg.vector_norm(split, dim=side, keepdim=True).square()
        rest = [d for d in reduced if d not in side]
        return (sq.sum(dim=rest, keepdim=True) if rest else sq).reshape(self.size)

    def _overlap(self, name: str) -> tuple[Part, Part] | None:
        """(rows part, columns part) when both cover ``name``: their shared entries are the
        diagonal of each (stack_r x stack_c) block of size x size."""
        parts = sorted(self._parts_of(name), key=lambda p: p.dim)
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def _diagonal(self, name: str, tensor: Tensor) -> Tensor:
        rows, cols = self._overlap(name)
        blocks = tensor.reshape(rows.stack, self.size, cols.stack, self.size)
        return torch.diagonal(blocks, dim1=1, dim2=3)  # (stack_r, stack_c, size)

    def sq_norms(self, params: Mapping[str, Tensor]) -> Tensor:
        total = self._part_sq_norms(self.parts[0], params[self.parts[0].param])
        for part in self.parts[1:]:
            total = total + self._part_sq_norms(part, params[part.param])
        for name in self.params:
            if self._overlap(name):  # counted by both parts: subtract once
                total = total - self._diagonal(name, params[name]).pow(2).sum(dim=(0, 1))
        return total

    def group_dim(self, params: Mapping[str, Tensor]) -> int:
        dim = sum(params[p.param].numel() // self.size for p in self.parts)
        for name in self.params:
            if self._overlap(name):
                rows, cols = self._overlap(name)
                dim -= rows.stack * cols.stack
        return dim

    def _expand(self, values: Tensor, part: Part, like: Tensor) -> Tensor:
        shape = [1] * like.dim()
        shape[part.dim] = self.size
        if part.stack == 1:  # a view: no copy (and no kernel) for the common unstacked case
            return values.reshape(shape).expand_as(like)
        tiles = [1] * like.dim()
        tiles[part.dim] = part.stack  # stacked copies: index b * size + k
        return values.reshape(shape).repeat(*tiles).expand_as(like)

    def broadcast(self, values: Tensor, name: str, like: Tensor) -> Tensor:
        parts = self._parts_of(name)
        out = self._expand(values, parts[0], like)
        if len(parts) == 2:
            rows, cols = self._overlap(name)
            diag = torch.diag_embed(values).repeat(rows.stack, cols.stack)
            out = out + self._expand(values, parts[1], like) - diag
        return out

    def broadcast_keep(self, keep: Tensor, name: str, like: Tensor) -> Tensor:
        out = None
        for part in self._parts_of(name):
            m = self._expand(keep, part, like)
            out = m if out is None else out & m
        return out


@dataclass(frozen=True)
class TileFamily:
    """Parameter ``param`` of shape (rows, cols) cut into a grid of 2-D tiles of ``tile = (th, tw)``;
    group ``i * ceil(cols / tw) + j`` is tile (i, j). ``tile = (1, cols)`` gives one group per row,
    ``(rows, 1)`` one per column; square tiles are the blocks of block-sparse RNNs (Narang et al.
    2017). A tile that does not divide the shape leaves smaller tiles along the last block-row and
    block-column (every entry still in exactly one group); ``group_dim`` is the full tile's
    ``th * tw``, so the few edge tiles are weighed and scored as if full-sized."""

    name: str
    param: str
    shape: tuple[int, int]
    tile: tuple[int, int]

    def __post_init__(self):
        (r, c), (th, tw) = self.shape, self.tile
        if th < 1 or tw < 1 or r < 1 or c < 1:
            raise ValueError(f"tile family {self.name!r}: tiles {self.tile} and shape {self.shape} of {self.param!r} "
                             "must be positive")

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles along the rows and along the columns (edge tiles included)."""
        (r, c), (th, tw) = self.shape, self.tile
        return -(-r // th), -(-c // tw)

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param,)

    def _grid(self, tensor: Tensor) -> Tensor:
        if tuple(tensor.shape) != tuple(self.shape):
            raise ValueError(f"tile family {self.name!r}: {self.param!r} has shape {tuple(tensor.shape)}, declared {self.shape}")
        (r, c), (th, tw), (gr, gc) = self.shape, self.tile, self.grid
        if (gr * th, gc * tw) != (r, c):  # ragged edge: pad with zeros, which add nothing to a norm
            tensor = torch.nn.functional.pad(tensor, (0, gc * tw - c, 0, gr * th - r))
        return tensor.reshape(gr, th, gc, tw)

    def sq_norms(self, params: Mapping[str, Tensor]) -> Tensor:
        return self._grid(params[self.param]).pow(2).sum(dim=(1, 3)).flatten()

    def group_dim(self, params: Mapping[str, Tensor]) -> int:
        return self.tile[0] * self.tile[1]

    def broadcast(self, values: Tensor, name: str, like: Tensor) -> Tensor:
        (r, c), (th, tw), (gr, gc) = self.shape, self.tile, self.grid
        grid = values.reshape(gr, 1, gc, 1).expand(gr, th, gc, tw)
        return grid.reshape(gr * th, gc * tw)[:r, :c]

    broadcast_keep = broadcast


def block_family(name: str, param: str, shape: tuple[int, int], block: Sequence[int]) -> TileFamily:
    """The blocks of one weight matrix for the block (group) Lasso and block pruning; ``block`` =
    (bh, bw), each clipped to the matrix (a 32x32 block on a 10 x 300 matrix is 10 x 32)."""
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"a block is two positive ints (rows, cols); got {list(block)!r}")
    return TileFamily(name, param, tuple(shape), (min(block[0], shape[0]), min(block[1], shape[1])))


def sequential_groups(model: nn.Sequential, *, include_inputs: bool = True) -> list[SliceFamily]:
    """Neuron groups of an MLP written as ``nn.Sequential`` (SSE paper, section 3.2).

    Group of a neuron = all its outgoing weights: input feature ``j`` owns column ``j`` of the first
    ``Linear``; hidden neuron ``j`` of layer ``l`` owns column ``j`` of the next ``Linear``. Output
    neurons own nothing and are never pruned.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("sequential_groups needs an nn.Sequential with at least one nn.Linear")
    families = []
    for i, (name, layer) in enumerate(linears):
        if i == 0 and not include_inputs:
            continue
        label = "input" if i == 0 else f"hidden{i}"
        families.append(SliceFamily(label, layer.in_features, (Part(f"{name}.weight", 1),)))
    return families


def groups_of(model: nn.Module, grouping: str | None = None) -> list[GroupFamily]:
    """The model's declared groups (``model.groups(grouping)`` or ``model.unit_groups()``), or
    inferred for an ``nn.Sequential`` MLP."""
    if grouping is not None and hasattr(model, "groups"):
        return list(model.groups(grouping))
    if hasattr(model, "unit_groups"):
        return list(model.unit_groups())
    if isinstance(model, nn.Sequential):
        return sequential_groups(model)
    raise TypeError(
        f"{type(model).__name__} declares no groups: give it a unit_groups() method returning "
        "group families (see sparse_ensembles.structure)"
    )
