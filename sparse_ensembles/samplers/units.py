"""Settings written for a *summed* loss (``N * mean_nll - log p``, the convention of most SG-MCMC
papers and of Deng et al.'s released code) in this library's units (docs/scaling.md: the mean loss,
the prior divided by N, noise ``sqrt(2 lr T / N)``).

With a summed loss ``U_sum = N * U_mean`` a step ``eta * grad U_sum`` equals ``(eta * N) * grad
U_mean``, so ``lr = eta * N``; the injected noise ``sqrt(2 eta / beta)`` (SGLD; ``2 alpha eta / beta``
for SGHMC with friction alpha) equals ``sqrt(2 lr T / N)`` with ``T = 1 / beta``. Here ``N`` is the
*effective* number of data points the summed loss was scaled by (the authors' ``-N``), which may
differ from the training-set size: then ``num_data = N`` is a tempered posterior, and it must also
reach the sampler (``sampler.num_data``), since the prior enters divided by it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeanLossSettings:
    lr: float  # sampler.lr
    num_data: int  # sampler.num_data
    temperature: float  # sampler.temperature (at the start, when annealed)
    anneal: float  # sampler.anneal: the inverse temperature's factor per epoch
    lr_milestones: tuple[float, ...]  # sampler.lr_milestones (epochs of the chain)
    lr_factor: float  # sampler.lr_factor
    steps_per_epoch: int
    epochs: int


def from_summed_loss(eta: float, num_data: int, *, batch_size: int, inverse_temperature: float = 1.0,
                     anneal: float = 1.0, epochs: int, steps_per_epoch: int = 0,
                     lr_milestones: tuple[float, ...] = (), lr_factor: float = 0.1) -> MeanLossSettings:
    """Our settings for a chain run with step ``eta`` on the summed loss over ``num_data`` points.

    ``steps_per_epoch`` defaults to ``num_data / batch_size`` (an epoch = a pass over N points; Deng
    et al.'s "epochs" are 50 steps of 1000 images: pass it explicitly when they differ).
    Example, Deng et al.'s ResNet20 on CIFAR-10: ``from_summed_loss(2e-9, 50_000, batch_size=1000,
    inverse_temperature=1000, anneal=1.005, epochs=1000, lr_milestones=(700, 900))`` gives lr 1e-4,
    num_data 50,000, temperature 1e-3, 50 steps an epoch.
    """
    for name, value in (("eta", eta), ("inverse_temperature", inverse_temperature), ("lr_factor", lr_factor)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if not (isinstance(num_data, int) and num_data >= 1 and batch_size >= 1 and epochs >= 1):
        raise ValueError(f"num_data, batch_size and epochs must be positive ints; got {num_data}, {batch_size}, {epochs}")
    if anneal < 1:
        raise ValueError(f"anneal is the inverse temperature's factor per epoch, >= 1; got {anneal}")
    if any(not 0 < m < epochs for m in lr_milestones):
        raise ValueError(f"lr_milestones {lr_milestones} must lie inside the chain's {epochs} epochs")
    return MeanLossSettings(lr=eta * num_data, num_data=num_data, temperature=1.0 / inverse_temperature,
                            anneal=anneal, lr_milestones=tuple(lr_milestones), lr_factor=lr_factor,
                            steps_per_epoch=steps_per_epoch or -(-num_data // batch_size), epochs=epochs)
