"""Step-size schedules: callables ``step -> lr`` (step counts from 0).

Every sampler takes ``lr`` as a number or as one of these (or any callable of the step).
Schedules are plain frozen dataclasses so configs can name them and tests can compare them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Constant:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class StepDecay:
    """``lr * factor ** (step // every)`` — e.g. the SSE paper's SGD: 0.5, halved every 10 epochs."""

    lr: float
    factor: float
    every: int

    def __call__(self, step: int) -> float:
        return self.lr * self.factor ** (step // self.every)


@dataclass(frozen=True)
class MultiStep:
    """``lr * factor ** (number of milestones <= step)`` — e.g. Deng et al.'s ResNet chains: the
    step divided by 10 at epochs 700 and 900 (milestones in steps)."""

    lr: float
    milestones: tuple[int, ...]
    factor: float = 0.1

    def __call__(self, step: int) -> float:
        return self.lr * self.factor ** sum(step >= m for m in self.milestones)


@dataclass(frozen=True)
class Polynomial:
    """``a / (b + step) ** gamma`` — the decaying step of Welling & Teh 2011 and of SA updates
    (Deng et al. 2019 use c / (A + k)^alpha with c=0.02, A=1000, alpha=0.75)."""

    a: float
    b: float = 1.0
    gamma: float = 0.55

    def __call__(self, step: int) -> float:
        return self.a / (self.b + step) ** self.gamma


def resolve(lr, step: int) -> float:
    """The learning rate at ``step`` for a number or a schedule."""
    value = lr(step) if callable(lr) else lr
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"learning rate at step {step} is {value}; it must be finite and >= 0")
    return value


def resolve_temperature(t, step: int) -> float:
    """The temperature at ``step`` for a number or a schedule (annealing: e.g. Deng et al.'s
    inverse temperature 1000 x 1.005 per epoch is ``StepDecay(1e-3, 1 / 1.005, steps_per_epoch)``)."""
    value = t(step) if callable(t) else t
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"temperature at step {step} is {value}; it must be finite and >= 0")
    return value


@dataclass(frozen=True)
class Cyclical:
    """Cyclical cosine step size (Zhang et al. 2020, *Cyclical SG-MCMC*): constant ``lr`` until
    ``start``, then cycles of ``cycle`` steps, ``lr/2 * (cos(pi * (k mod cycle) / cycle) + 1)``.
    Samples taken at the end of a cycle (step size near 0) sit in a mode; the large steps at the
    start of the next cycle move the chain on to another one."""

    lr: float
    cycle: int
    start: int = 0

    def __call__(self, step: int) -> float:
        if step < self.start:
            return self.lr
        k = (step - self.start) % self.cycle
        return self.lr / 2 * (math.cos(math.pi * k / self.cycle) + 1)
