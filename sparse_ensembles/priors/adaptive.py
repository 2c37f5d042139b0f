"""Priors whose hyperparameters adapt by stochastic approximation (SA) while the chain runs.

They use the state hook of :class:`~.base.Prior`: the sampler calls ``update_(params, step)``
after every step and saves ``state_dict()`` with its own.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Union

import torch

from .base import Prior, _check_positive

Weight = Union[float, Callable[[int], float]]


def _sa_weight(omega: Weight, step: int) -> float:
    """The SA step size ``w_k`` at ``step`` for a number or a schedule (``step -> w``)."""
    w = omega(step) if callable(omega) else omega
    if not (isinstance(w, (int, float)) and math.isfinite(w) and 0 <= w <= 1):
        raise ValueError(f"SA weight omega at step {step} is {w!r}; it must be a number in [0, 1]")
    return float(w)


class AdaptiveGaussian(Prior):
    r"""Empirical-Bayes Gaussian ``N(0, 1/tau)`` whose precision follows the chain by SA:

        -log p(theta | tau) = tau / 2 * ||theta||^2                      (+ const)
        tau <- (1 - w_k) * tau + w_k * d / ||theta||^2                   after sampler step k

    ``d / ||theta||^2`` maximises ``p(theta | tau)`` over ``tau`` (the M-step), so ``w_k = 1`` is
    SG-MCMC-EM and ``w_k = 0`` the fixed ``Gaussian(precision0)``; with decaying ``w_k``
    (``sum w_k = inf``, ``sum w_k^2 < inf``, e.g. ``Polynomial(0.02, 1000, 0.75)``) it is a
    Robbins-Monro estimate. This is the simplest case of the SA latent updates of SGLD-SA /
    SGHMC-SA (Deng, Zhang, Liang & Lin 2019, *An Adaptive Empirical Bayesian Method for Sparse Deep
    Learning*, NeurIPS, arXiv 1910.10791), whose spike-and-slab latents use the same hook.

    Args:
        precision0: the starting precision ``tau_0 > 0``.
        omega: ``w_k``, a number in [0, 1] or a schedule ``step -> w`` (step counts from 0).
        names: the parameters it covers (``d`` counts their entries); default all the sampler's.
    """

    stateful = True

    def __init__(self, precision0: float, omega: Weight, names: Optional[Iterable[str]] = None):
        self.precision = _check_positive("AdaptiveGaussian precision0", precision0)
        if not callable(omega):
            _sa_weight(omega, 0)  # a bad constant fails here, not at the first step
        self.omega = omega
        self.names = None if names is None else list(names)

    def _covered(self, params) -> list[str]:
        if self.names is None:
            return list(params)
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"AdaptiveGaussian covers parameters the sampler does not hold: {missing[:5]}; "
                           "pass model.named_parameters() to the sampler so names match the model's")
        return self.names

    def neg_log_prob(self, params):
        return 0.5 * self.precision * sum(params[n].pow(2).sum() for n in self._covered(params))

    def add_grad_(self, grads, params, num_data):
        names = [n for n in self._covered(params) if n in grads]
        if names:
            torch._foreach_add_([grads[n] for n in names], [params[n] for n in names], alpha=self.precision / num_data)

    def plus_grad(self, grads, params, num_data):
        # as Gaussian.plus_grad: copy and decay in one pass (bit-identical to it when omega = 0)
        covered = set(self._covered(params))
        names = [n for n in grads if n in covered]
        out = {n: g.clone() for n, g in grads.items() if n not in covered}
        if names:
            summed = torch._foreach_add([grads[n] for n in names], [params[n] for n in names],
                                        alpha=self.precision / num_data)
            out.update(zip(names, summed))
        return {n: out[n] for n in grads}

    def update_(self, params, step):
        w = _sa_weight(self.omega, step)
        if w == 0:
            return  # nothing to learn; also keeps omega = 0 exactly the fixed Gaussian
        ps = [params[n] for n in self._covered(params)]
        d = sum(p.numel() for p in ps)
        # one reduction and one host sync (the sampler's finiteness check already syncs per step)
        sq = torch.stack(torch._foreach_norm(ps)).double().pow(2).sum().item()
        if not (math.isfinite(sq) and sq > 0):
            raise FloatingPointError(
                f"AdaptiveGaussian: ||theta||^2 = {sq} over {d} parameters, so d / ||theta||^2 is not a "
                "finite precision (zero-initialised or diverged parameters? restrict it with names=)"
            )
        self.precision = (1 - w) * self.precision + w * d / sq

    def state_dict(self):
        return {"precision": self.precision}

    def load_state_dict(self, state):
        self.precision = float(state["precision"])
