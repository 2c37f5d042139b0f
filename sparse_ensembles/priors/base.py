"""Priors as stateless math objects over *named* parameters.

Every prior offers ``neg_log_prob(params)`` (up to a constant) and
``add_grad_(grads, params, num_data)``, which adds ``grad(-log p(theta)) / num_data`` into
``grads`` in place. Dividing by ``N = num_data`` puts the prior in the units of the *mean*
minibatch loss that ``backward()`` sees (docs/scaling.md): with temperature 0 a sampler is then
exactly SGD with the prior as weight decay.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor


class Prior:
    def neg_log_prob(self, params: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def add_grad_(self, grads: Mapping[str, Tensor], params: Mapping[str, Tensor], num_data: int) -> None:
        """``grads[name] += grad(-log p(theta)) / num_data`` in place."""
        raise NotImplementedError

    def plus_grad(self, grads: Mapping[str, Tensor], params: Mapping[str, Tensor], num_data: int) -> dict[str, Tensor]:
        """New tensors ``grads + grad(-log p) / num_data``; ``grads`` is left untouched. Priors
        override this when they can fuse the copy into the addition (one pass over memory)."""
        out = {n: g.clone() for n, g in grads.items()}
        self.add_grad_(out, params, num_data)
        return out


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class Gaussian(Prior):
    """Isotropic N(0, 1/precision) on every parameter: -log p = precision/2 * ||theta||^2."""

    def __init__(self, precision: float):
        self.precision = _check_positive("Gaussian precision", precision)

    def neg_log_prob(self, params):
        return 0.5 * self.precision * sum(p.pow(2).sum() for p in params.values())

    def add_grad_(self, grads, params, num_data):
        wd = self.precision / num_data  # the equivalent SGD weight decay
        torch._foreach_add_(list(grads.values()), [params[n] for n in grads], alpha=wd)

    def plus_grad(self, grads, params, num_data):
        # out-of-place add: copy and decay in one pass, bit-identical to clone-then-add_
        wd = self.precision / num_data
        return dict(zip(grads, torch._foreach_add(list(grads.values()), [params[n] for n in grads], alpha=wd)))


class Laplace(Prior):
    """Laplace(0, scale) on every parameter: -log p = ||theta||_1 / scale (subgradient 0 at 0)."""

    def __init__(self, scale: float):
        self.scale = _check_positive("Laplace scale", scale)

    def neg_log_prob(self, params):
        return sum(p.abs().sum() for p in params.values()) / self.scale

    def add_grad_(self, grads, params, num_data):
        alpha = 1.0 / (self.scale * num_data)
        for name, g in grads.items():
            g.add_(params[name].sign(), alpha=alpha)


class Sum(Prior):
    """Sum of priors, e.g. GroupLasso + a weak Gaussian on biases."""

    def __init__(self, *priors: Prior):
        self.priors = priors

    def neg_log_prob(self, params):
        return sum(p.neg_log_prob(params) for p in self.priors)

    def add_grad_(self, grads, params, num_data):
        for p in self.priors:
            p.add_grad_(grads, params, num_data)

    def plus_grad(self, grads, params, num_data):
        if not self.priors:
            return {n: g.clone() for n, g in grads.items()}
        out = self.priors[0].plus_grad(grads, params, num_data)
        for p in self.priors[1:]:
            p.add_grad_(out, params, num_data)
        return out
