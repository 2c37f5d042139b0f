"""SGLD-SA and SGHMC-SA (Deng, Zhang, Liang & Lin 2019, *An Adaptive Empirical Bayesian Method for
Sparse Deep Learning*, NeurIPS): the plain samplers with the spike-and-slab Gaussian-Laplace prior
(:class:`~sparse_ensembles.priors.SpikeSlabGL`) on the ``sparse`` parameters, a Gaussian
(weight decay) on the rest, and the prior's latents (rho, kappa, delta, sigma) adapted by
stochastic approximation after every step with weight ``omega``:

    omega_k = c / (A + k)^alpha   (the authors: Polynomial(0.02, 1000, 0.75))  -> SGLD-SA / SGHMC-SA
    omega = 1                                                               -> SGLD-EM / SGHMC-EM
    omega = 0                                                               -> SGLD / SGHMC under a fixed SSGL prior

Same scaling convention and Optimizer API as :class:`~.sgmcmc.SGLD` / :class:`~.sgmcmc.SGHMC`
(the update functions are theirs); the latents are sampler state (``state_dict()`` resumes them
bit for bit). Inverse-temperature annealing is a temperature schedule (``temperature=StepDecay(
1e-3, 1 / 1.005, steps_per_epoch)``: tau = 1000, x 1.005 per epoch); pruning during sampling is
``pruning=SparsitySchedule(...)``.
"""
from __future__ import annotations

from typing import Iterable

from ..priors import Gaussian, Sum
from ..priors.spike_slab import SpikeSlabGL
from .schedules import Polynomial
from .sgmcmc import SGHMC, SGLD

SSGL_KEYS = ("v0", "v1", "a", "b", "nu", "lam", "omega", "form", "sigma0", "delta0", "rho0", "per_layer",
             "kappa0", "kappa1", "scale_by_sigma", "sa_on", "latent_start")


def _ssgl_prior(params: list, sparse: Iterable[str], num_data: int, precision: float, ssgl: dict):
    names = [n for n, _ in params]
    sparse = list(sparse)
    unknown = sorted(set(sparse) - set(names))
    if unknown:
        raise KeyError(f"sparse names parameters the sampler does not hold: {unknown[:5]}; "
                       "pass model.named_parameters() and names from it")
    prior = SpikeSlabGL(sparse, num_data=num_data, **ssgl)
    rest = [n for n in names if n not in set(sparse)]
    return prior, Sum(prior, Gaussian(precision, names=rest))


class _Adaptive:
    ssgl: SpikeSlabGL

    def trace(self) -> dict:
        """sigma, mean delta, the fraction of covered weights in the spike (rho < 0.5) and the
        fraction exactly zero (pruned): what the paper's figures follow."""
        self.synchronize()  # a prior update may be running in the worker thread
        params = self.named_parameters()
        zeros = sum(int((params[n] == 0).sum()) for n in self.ssgl.names)
        total = sum(params[n].numel() for n in self.ssgl.names)
        return {**self.ssgl.trace(), "sparsity": zeros / total}


def _split(kwargs: dict) -> tuple[dict, dict]:
    ssgl = {k: kwargs.pop(k) for k in SSGL_KEYS if k in kwargs}
    ssgl.setdefault("omega", Polynomial(0.02, 1000, 0.75))
    return ssgl, kwargs


class SGLDSA(_Adaptive, SGLD):
    """SGLD-SA: ``SGLDSA(model.named_parameters(), lr, num_data=N, sparse=[names], v0=..., v1=...,
    omega=..., precision=...)``; the SSGL keywords (``SSGL_KEYS``: v0, v1, a, b, nu, lam, omega, form,
    sigma0, delta0, rho0, per_layer, kappa0, kappa1, scale_by_sigma, sa_on, latent_start) go to
    :class:`SpikeSlabGL`, the rest to :class:`SGLD`.
    ``precision``: the Gaussian on the parameters outside ``sparse`` (weight decay wd = precision / N)."""

    def __init__(self, params, lr, *, num_data: int, sparse: Iterable[str], precision: float = 1.0, **kwargs):
        params = list(params)
        ssgl, rest = _split(kwargs)
        self.ssgl, prior = _ssgl_prior(params, sparse, num_data, precision, ssgl)
        super().__init__(params, lr, num_data=num_data, prior=prior, **rest)


class SGHMCSA(_Adaptive, SGHMC):
    """SGHMC-SA: as :class:`SGLDSA` over :class:`SGHMC` (``friction`` = 1 - momentum; the
    authors: momentum 0.9)."""

    def __init__(self, params, lr, *, num_data: int, sparse: Iterable[str], precision: float = 1.0, **kwargs):
        params = list(params)
        ssgl, rest = _split(kwargs)
        self.ssgl, prior = _ssgl_prior(params, sparse, num_data, precision, ssgl)
        super().__init__(params, lr, num_data=num_data, prior=prior, **rest)
