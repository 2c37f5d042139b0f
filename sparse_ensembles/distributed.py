"""One SG-MCMC chain on K processes: data-parallel gradients, one noise (issue 23, item 2).

A K-rank chain must be the same Markov chain as one process on the global batch. Two things make
it so:

* **The gradient is the global-batch mean.** Every rank reads the same global batch (the same data
  generator seed), keeps its rows ``[i n / K, (i + 1) n / K)`` and weights its mean loss by its share
  of the rows, ``n_i / n``; torch's ``DistributedDataParallel`` averages the gradients over the K
  ranks, so the local loss is scaled by ``K n_i / n`` and the average is
  ``sum_i (n_i / n) grad mean_i = grad mean``, also for a last batch that does not divide by K.
* **The noise is drawn once.** SGLD's update ``-lr grad + N(0, 2 lr T / N)`` must not be averaged:
  K independent draws averaged have variance ``2 lr T / (N K)``, a chain at temperature T / K. Each
  rank's sampler is seeded with the same seed, so every rank draws the same noise and the parameters
  stay equal on every rank without a broadcast; the learning rate, N and T are those of the
  one-process chain.

The loss value every rank sees is the global mean (one scalar all-reduce per step), so a diverging
chain stops on every rank at the same step instead of leaving the others waiting in a collective.

BatchNorm statistics of a rank's rows alone would change the chain: BatchNorm layers become
``SyncBatchNorm`` (batch statistics over the global batch), which torch runs on GPUs only; on CPU a
BatchNorm net is refused with that reason.

    group = dist.new_group([0, 1])                    # or None: the whole job
    sharded = ShardedLoss(model, loss_fn, group)      # loss_fn(model, batch, state) -> (loss, state)
    for batch in loader:                              # the same global batches on every rank
        loss, state = sharded(model, batch, state)    # this rank's rows; value = the global mean loss
        sampler.zero_grad(); loss.backward(); sampler.step()   # sampler seeded alike on every rank
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def _rows(batch) -> int:
    """The leading size of the first tensor in a batch (a tensor, tuple, list or dict of them)."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        if isinstance(item, Tensor):
            return item.shape[0]
    raise TypeError(f"a batch of {type(batch).__name__} holds no tensor to split between ranks")


def _slice(batch, lo: int, hi: int):
    if isinstance(batch, Tensor):
        return batch[lo:hi]
    if isinstance(batch, dict):
        return {k: _slice(v, lo, hi) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, lo, hi) if isinstance(v, Tensor) else v for v in batch)
    return batch


def shard(batch, index: int, size: int) -> tuple[Any, int, int]:
    """Rank ``index`` of ``size``'s rows of ``batch`` (dim 0 of every tensor in it):
    ``(local batch, local rows, global rows)``. The shares differ by at most one row; a rank left
    without rows (a batch smaller than ``size``) gets the first row, to be weighted 0."""
    n = _rows(batch)
    lo, hi = index * n // size, (index + 1) * n // size
    if hi == lo:
        return _slice(batch, 0, 1), 0, n
    return _slice(batch, lo, hi), hi - lo, n


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class ShardedLoss:
    """``loss_fn(model, batch, state) -> (loss, state)`` on this rank's rows of each global batch,
    through ``DistributedDataParallel`` over ``group``: the returned loss has the global-batch mean
    as its value and, once DDP has averaged, the global-batch mean gradient. See the module
    docstring; ``model`` keeps its own parameters (the sampler steps them as usual)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, group: Optional[dist.ProcessGroup] = None):
        if has_batchnorm(model):
            device = next(model.parameters()).device
            if device.type != "cuda":
                raise ValueError(
                    "a data-parallel chain of a network with BatchNorm needs torch's SyncBatchNorm (batch "
                    "statistics over the global batch), which runs on GPUs only; run it on CUDA "
                    "(experiment.device = 'cuda') or with sampler.data_parallel = 1")
            nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)  # same Parameters, in place
        self.loss_fn, self.group = loss_fn, group
        self.index, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.ddp = DistributedDataParallel(model, process_group=group)

    def __call__(self, model: nn.Module, batch, state=None) -> tuple[Tensor, Any]:
        local, rows, total = shard(batch, self.index, self.size)
        loss, state = self.loss_fn(self.ddp, local, state)
        weight = rows / total
        scaled = loss * (weight * self.size)  # DDP divides the summed gradients by the group size
        value = (loss.detach() * weight).reshape(1)
        dist.all_reduce(value, group=self.group)  # the global-batch mean, the same on every rank
        return scaled + (value[0] - scaled).detach(), state
