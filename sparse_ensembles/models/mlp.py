"""Feed-forward nets: the SSE paper's 784-300-100-10 ReLU MLP and friends."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..compact import ACTIVATIONS


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """``Flatten -> Linear -> act -> ... -> Linear`` (logits). Groups: see
    :func:`sparse_ensembles.structure.sequential_groups` (each neuron's outgoing weights)."""
    if len(sizes) < 2 or any((not isinstance(s, int)) or s < 1 for s in sizes):
        raise ValueError(f"model sizes must be >= 2 positive ints (input, hidden..., classes); got {list(sizes)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
