"""SG-MCMC update rules as pure functions over lists of tensors (as ``torch.optim.sgd.sgd`` sits
under ``torch.optim.SGD``).

Each function moves ``params`` in place with ``torch._foreach`` ops, given this step's gradients of
``U(theta) = mean_nll(theta) - log p(theta) / N`` and standard-normal ``noise`` (lists aligned with
``params``; masking, priors and clipping are done by the caller). The classes in :mod:`.sgmcmc`
and the adaptive (SA) samplers call these, so every sampler shares one implementation of the
arithmetic. Scaling convention: docs/scaling.md.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def sgld_(params: list[Tensor], grads: list[Tensor], noise: list[Tensor], *, lr: float,
          temperature: float, num_data: int) -> None:
    r"""One SGLD step (Welling & Teh 2011, *Bayesian Learning via Stochastic Gradient Langevin
    Dynamics*, ICML), tempered, in the mean-loss convention:

        theta <- theta - lr * grad U(theta) + sqrt(2 * lr * T / N) * xi,   xi ~ N(0, I)

    ``T = 0`` is plain SGD; ``noise`` is then not read.
    """
    torch._foreach_add_(params, grads, alpha=-lr)
    if temperature > 0:
        torch._foreach_add_(params, noise, alpha=math.sqrt(2.0 * lr * temperature / num_data))


def sghmc_(params: list[Tensor], grads: list[Tensor], noise: list[Tensor], momenta: list[Tensor], *,
           lr: float, friction: float, temperature: float, num_data: int,
           grad_var: Optional[list[Tensor]] = None) -> None:
    r"""One SGHMC step (Chen, Fox & Guestrin 2014, *Stochastic Gradient Hamiltonian Monte Carlo*,
    ICML, eq. 15) in the SGD-momentum form, with ``alpha = friction``:

        v     <- (1 - alpha) * v - lr * grad U(theta) + sqrt(2 * alpha * lr * T / N - lr^2 * V) * xi
        theta <- theta + v

    ``V`` (``grad_var``, per entry, optional) estimates the minibatch-gradient noise so the injected
    noise plus the gradient's own add up to the right total; the variance is clamped at 0. ``T = 0``
    is SGD with momentum ``1 - alpha``; ``noise`` is then not read. ``momenta`` are updated in place.
    """
    torch._foreach_mul_(momenta, 1 - friction)
    torch._foreach_add_(momenta, grads, alpha=-lr)
    if temperature > 0:
        var = 2.0 * friction * lr * temperature / num_data
        if grad_var is None:
            torch._foreach_add_(momenta, noise, alpha=math.sqrt(var))
        else:
            for v, z, g_var in zip(momenta, noise, grad_var):
                v.addcmul_((var - lr * lr * g_var).clamp_min_(0).sqrt_(), z)
    torch._foreach_add_(params, momenta)
