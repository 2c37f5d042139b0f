"""Minimal training loops over in-memory tensors (fast for MNIST-sized data) or any iterable."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DivergenceError(FloatingPointError):
    """The loss became NaN or infinite."""


def minibatches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled pass over (x, y); the last partial batch is kept."""
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], y[idx]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches, *, where: str = "") -> float:
    """One pass of ``loss = mean cross-entropy; backward; step``. Returns the mean loss.

    Raises :class:`DivergenceError` naming ``where`` at the first non-finite loss, before the
    step, so the parameters are still the last finite ones.
    """
    model.train()
    total, count = 0.0, 0
    for i, (xb, yb) in enumerate(batches):
        loss = F.cross_entropy(model(xb), yb)
        value = loss.item()
        if not math.isfinite(value):
            raise DivergenceError(
                f"{where}: the loss became {value} at minibatch {i}; the chain diverged. Lower the "
                "learning rate (or the temperature / prior strength) and rerun with --resume: "
                "finished stages and collected samples are kept"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value * len(yb)
        count += len(yb)
    return total / max(count, 1)
