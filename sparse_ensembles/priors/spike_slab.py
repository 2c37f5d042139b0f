"""The spike-and-slab Gaussian-Laplace (SSGL) prior with latents adapted by stochastic
approximation: the prior of SGLD-SA / SGHMC-SA (Deng, Zhang, Liang & Lin 2019, *An Adaptive
Empirical Bayesian Method for Sparse Deep Learning*, NeurIPS; arXiv 1910.10791).

    beta_j | sigma, gamma_j ~ (1 - gamma_j) Laplace(0, sigma v0) + gamma_j N(0, sigma^2 v1)
    gamma_j ~ Bernoulli(delta),  delta ~ Beta(a, b),  sigma^2 ~ InvGamma(nu / 2, nu lam / 2)

The sampler draws beta from the expected log-posterior Q (their eq. for Q1), whose prior part is

    -log p(beta | kappa, sigma) = sum_j kappa0_j |beta_j| / sigma + kappa1_j beta_j^2 / (2 sigma^2)

and after every step k the latents move by SA with weight w = omega_k (their Algorithm 1):

    rho_j   <- (1-w) rho_j   + w * a_j / (a_j + b_j),  a_j = N(beta_j; 0, sigma^2 v1) delta,
                                                         b_j = Laplace(beta_j; 0, sigma v0) (1 - delta)
    kappa0_j <- (1-w) kappa0_j + w (1 - rho_j) / v0,   kappa1_j <- (1-w) kappa1_j + w rho_j / v1
    delta   <- (1-w) delta   + w (sum_j rho_j + a - 1) / (a + b + p - 2)
    sigma   <- (1-w) sigma   + w * the positive root of  A s^2 - B s - C = 0,
               B = sum_j kappa0_j |beta_j|,  J = sum_j kappa1_j beta_j^2,
               regression:      A = N + p + nu,  C = RSS + J + nu lam   (RSS = N/n * minibatch sum of squares)
               classification:  A = p + nu + 2,  C = J + nu lam         (the authors' CNN code)

``omega = 1`` is the EM variant (SGLD-EM / SGHMC-EM), ``omega = 0`` keeps the latents at their
start (plain SG-MCMC under a fixed SSGL prior). The new rho feeds the kappa update of the same
step (the order of Algorithm 1). ``delta`` is one per covered tensor (``per_layer=True``, the
paper's delta_l) or one for all; ``sigma`` is shared.

Two choices where the authors' released code differs from the paper's equations, both options
here: ``scale_by_sigma=False`` evaluates rho's densities as N(0, v1) and Laplace(0, v0) without
sigma (their code; the paper's eq. (5) has sigma^2 v1 and sigma v0), and ``kappa0`` / ``kappa1``
set the starting kappas (their code: 5e-4 each, so the prior starts weak) instead of the values
rho0 implies, (1 - rho0) / v0 and rho0 / v1, which with their v1 = 1e-5 start a ridge of 5e4.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor

from .adaptive import Weight, _sa_weight
from .base import Prior, _check_positive

FORMS = ("classification", "regression")


class SpikeSlabGL(Prior):
    """SSGL prior over the parameters ``names`` with SA latents (see the module docstring).

    Args:
        names: the covered parameters (the authors: every convolution weight but the first).
        v0, v1: spike (Laplace) and slab (Gaussian) scales, v0 << v1 in effect.
        a, b: Beta prior of delta.  nu, lam: inverse-gamma prior of sigma^2.
        omega: SA weight, a number in [0, 1] or a schedule ``step -> w``
            (e.g. ``Polynomial(0.02, 1000, 0.75)``).
        form: "classification" or "regression" (needs :meth:`observe_rss` before each step).
        num_data: N, for the regression form's A.
        sigma0, delta0, rho0: starting latents (kappa0 and kappa1 start at their rho0 values).
        latent_start: ``"rho0"`` (every weight's rho starts at ``rho0``) or ``"estep"`` (rho starts at
            eq. (5) of the starting weights, at sigma0 and delta0 -- the E-step EM would take first --
            and the kappas at its values): a weight the chain starts in the slab is not held under the
            spike's L1 while the slow SA weight moves rho.
        per_layer: one delta per covered tensor (True) or one shared.
        sa_on: ``"sigma"`` (sigma <- (1-w) sigma + w sigma~) or ``"sigma2"`` (the authors' code:
            sigma^2 <- (1-w) sigma^2 + w sigma~^2); the same fixed point, different paths.
    """

    stateful = True

    def __init__(self, names: Iterable[str], *, v0: float, v1: float, a: float = 1.0, b: float = 1.0,
                 nu: float = 1.0, lam: float = 1.0, omega: Weight = 1.0, form: str = "classification",
                 num_data: Optional[int] = None, sigma0: float = 1.0, delta0: float = 0.5, rho0: float = 0.5,
                 per_layer: bool = True, kappa0: Optional[float] = None, kappa1: Optional[float] = None,
                 scale_by_sigma: bool = True, sa_on: str = "sigma", latent_start: str = "rho0"):
        self.names = list(names)
        if sa_on not in ("sigma", "sigma2"):
            raise ValueError(f"SpikeSlabGL sa_on must be 'sigma' or 'sigma2' (what the SA step averages), got {sa_on!r}")
        self.sa_on = sa_on
        if latent_start not in ("rho0", "estep"):
            raise ValueError(f"SpikeSlabGL latent_start must be 'rho0' or 'estep', got {latent_start!r}")
        if latent_start == "estep" and (kappa0 is not None or kappa1 is not None):
            raise ValueError("SpikeSlabGL latent_start='estep' sets the starting kappas from rho; drop kappa0 / kappa1")
        self.latent_start = latent_start
        if not self.names:
            raise ValueError("SpikeSlabGL covers no parameters; pass the names of the weights it should cover")
        self.v0, self.v1 = _check_positive("SpikeSlabGL v0", v0), _check_positive("SpikeSlabGL v1", v1)
        self.a, self.b = _check_positive("SpikeSlabGL a", a), _check_positive("SpikeSlabGL b", b)
        self.nu, self.lam = _check_positive("SpikeSlabGL nu", nu), _check_positive("SpikeSlabGL lam", lam)
        if form not in FORMS:
            raise ValueError(f"SpikeSlabGL form must be one of {FORMS}, got {form!r}")
        if form == "regression" and not (isinstance(num_data, int) and num_data >= 1):
            raise ValueError("the regression form needs num_data = N (the training-set size)")
        for name, v in (("delta0", delta0), ("rho0", rho0)):
            if not 0 < v < 1:
                raise ValueError(f"SpikeSlabGL {name} must be in (0, 1), got {v!r}")
        if not callable(omega):
            _sa_weight(omega, 0)
        self.omega, self.form, self.num_data, self.per_layer = omega, form, num_data, per_layer
        self.sigma = _check_positive("SpikeSlabGL sigma0", sigma0)
        self._start = (float(delta0), float(rho0))
        self._kappa_start = ((1 - rho0) / self.v0 if kappa0 is None else _check_positive("SpikeSlabGL kappa0", kappa0),
                             rho0 / self.v1 if kappa1 is None else _check_positive("SpikeSlabGL kappa1", kappa1))
        self.scale_by_sigma = scale_by_sigma
        self.rho: dict[str, Tensor] = {}
        self.kappa0: dict[str, Tensor] = {}
        self.kappa1: dict[str, Tensor] = {}
        self.delta: dict[str, float] = {}
        self.rss: Optional[float] = None

    # -- latents -------------------------------------------------------------------------------
    def _latents(self, params: Mapping[str, Tensor]) -> None:
        """Create the per-weight latents on first use (shapes and devices from the parameters)."""
        if self.rho:
            first = next(iter(self.rho))
            if self.rho[first].device != params[first].device:  # loaded from a CPU checkpoint
                for key in ("rho", "kappa0", "kappa1"):
                    setattr(self, key, {n: t.to(params[n].device) for n, t in getattr(self, key).items()})
            return
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"SpikeSlabGL covers parameters the sampler does not hold: {missing[:5]}; "
                           "pass model.named_parameters() so names match the model's")
        delta0, rho0 = self._start
        for n in self.names:
            p = params[n].detach()
            self.delta[n] = delta0
            if self.latent_start == "estep":
                self.rho[n] = self._rho_tilde(p, delta0)
                self.kappa0[n] = (1 - self.rho[n]) / self.v0
                self.kappa1[n] = self.rho[n] / self.v1
            else:
                self.rho[n] = torch.full_like(p, rho0)
                self.kappa0[n] = torch.full_like(p, self._kappa_start[0])
                self.kappa1[n] = torch.full_like(p, self._kappa_start[1])

    def observe_rss(self, rss: float) -> None:
        """Regression form: the residual sum of squares scaled to the data set, N/n * sum of the
        minibatch's squared residuals, at the parameters the next step starts from."""
        self.rss = float(rss)

    @property
    def overlappable(self) -> bool:
        """Whether the sampler may run ``update_`` beside the next forward pass: not in the
        regression form, whose update reads the RSS that the training loop sets for the next step."""
        return self.form != "regression"

    @property
    def covered(self) -> int:
        return sum(r.numel() for r in self.rho.values())

    def inclusion(self) -> dict[str, Tensor]:
        """rho: the posterior probability that each weight is in the slab."""
        return self.rho

    # -- prior ---------------------------------------------------------------------------------
    def neg_log_prob(self, params):
        self._latents(params)
        s = self.sigma
        return sum((self.kappa0[n] * params[n].abs()).sum() / s + (self.kappa1[n] * params[n].pow(2)).sum() / (2 * s * s)
                   for n in self.names)

    def add_grad_(self, grads, params, num_data):
        self._latents(params)
        s = self.sigma
        for n in self.names:
            if n in grads:
                p = params[n]
                # d/dbeta: kappa0 sign(beta) / sigma + kappa1 beta / sigma^2, in mean-loss units (/ N)
                grads[n].addcmul_(self.kappa0[n], p.sign(), value=1 / (s * num_data))
                grads[n].addcmul_(self.kappa1[n], p, value=1 / (s * s * num_data))

    # -- the SA step ---------------------------------------------------------------------------
    def rho_tilde(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Eq. (5): P(gamma_j = 1 | beta_j, delta, sigma) at the given weights and the current
        delta and sigma (in the weights' dtype)."""
        return {n: self._rho_tilde(params[n], self.delta.get(n, self._start[0])) for n in self.names}

    def _rho_tilde(self, beta: Tensor, delta: float, x: Tensor = None, x2: Tensor = None) -> Tensor:
        # log(a / b) = log N(beta; 0, s^2 v1) + log delta - log Laplace(beta; 0, s v0) - log(1 - delta)
        #            = c + |beta| / (s v0) - beta^2 / (2 s^2 v1), in log space (the densities underflow)
        s = self.sigma if self.scale_by_sigma else 1.0
        v0, v1 = self.v0, self.v1
        c = (-0.5 * math.log(2 * math.pi * s * s * v1) + math.log(delta)
             + math.log(2 * s * v0) - math.log(1 - delta))
        x = beta.abs() if x is None else x
        x2 = x * x if x2 is None else x2
        return x.mul(1 / (s * v0)).add_(c).add_(x2, alpha=-1 / (2 * s * s * v1)).sigmoid_()

    def update_(self, params, step):
        w = _sa_weight(self.omega, step)
        self._latents(params)
        if w == 0:
            return  # omega = 0: the fixed prior, bit for bit
        sums = []
        for n in self.names:
            beta = params[n]
            x = beta.abs()  # |beta| and beta^2 serve eq. (5) and the sigma update
            x2 = x * x
            rho = self.rho[n].mul_(1 - w).add_(self._rho_tilde(beta, self.delta[n], x, x2), alpha=w)
            # kappa0 <- (1 - w) kappa0 + w (1 - rho) / v0, in place without a (1 - rho) temporary
            k0 = self.kappa0[n].mul_(1 - w).add_(w / self.v0).add_(rho, alpha=-w / self.v0)
            k1 = self.kappa1[n].mul_(1 - w).add_(rho, alpha=w / self.v1)
            sums.append(torch.stack([rho.sum(), torch.dot(k0.flatten(), x.flatten()), torch.dot(k1.flatten(), x2.flatten())]))
        # one host sync for all the scalars (per tensor: sum rho, sum kappa0 |beta|, sum kappa1 beta^2)
        table = torch.stack(sums).double().cpu()
        total_rho = dict(zip(self.names, table[:, 0].tolist()))
        b_sum, j_sum = float(table[:, 1].sum()), float(table[:, 2].sum())
        p_all = sum(self.rho[n].numel() for n in self.names)
        # delta: per layer (delta_l over p_l weights) or one over all covered weights
        groups = [[n] for n in self.names] if self.per_layer else [self.names]
        for g in groups:
            p_g = sum(self.rho[n].numel() for n in g)
            tilde = (sum(total_rho[n] for n in g) + self.a - 1) / (self.a + self.b + p_g - 2)
            tilde = min(max(tilde, 1e-12), 1 - 1e-12)  # a, b < 1 can put the M-step outside (0, 1)
            for n in g:
                self.delta[n] = (1 - w) * self.delta[n] + w * tilde
        if self.form == "regression":
            if self.rss is None:
                raise ValueError("SpikeSlabGL(form='regression') needs observe_rss(rss) before each step")
            A, C = self.num_data + p_all + self.nu, self.rss + j_sum + self.nu * self.lam
        else:
            A, C = p_all + self.nu + 2, j_sum + self.nu * self.lam
        sigma_tilde = (b_sum + math.sqrt(b_sum * b_sum + 4 * A * C)) / (2 * A)
        if self.sa_on == "sigma2":  # the authors' code: the SA average runs on sigma^2
            self.sigma = math.sqrt((1 - w) * self.sigma ** 2 + w * sigma_tilde ** 2)
        else:
            self.sigma = (1 - w) * self.sigma + w * sigma_tilde

    def trace(self, threshold: float = 0.5) -> dict:
        """Scalars to log: sigma, mean delta, and the fraction of covered weights with rho below
        ``threshold`` (judged in the spike)."""
        if not self.rho:
            return {"sigma": self.sigma}
        spike = sum(int((r < threshold).sum()) for r in self.rho.values())
        return {"sigma": self.sigma, "delta": sum(self.delta.values()) / len(self.delta),
                "spike_fraction": spike / self.covered}

    def state_dict(self):
        return {"sigma": self.sigma, "delta": dict(self.delta), "rss": self.rss,
                "rho": {n: t.clone() for n, t in self.rho.items()},
                "kappa0": {n: t.clone() for n, t in self.kappa0.items()},
                "kappa1": {n: t.clone() for n, t in self.kappa1.items()}}

    def load_state_dict(self, state):
        if set(state.get("rho", {})) not in (set(), set(self.names)):
            raise ValueError(f"SpikeSlabGL state covers {sorted(state['rho'])}, this prior covers {sorted(self.names)}")
        self.sigma, self.rss = float(state["sigma"]), state.get("rss")
        self.delta = {n: float(v) for n, v in state["delta"].items()}
        for key in ("rho", "kappa0", "kappa1"):
            setattr(self, key, {n: t.clone() for n, t in state[key].items()})
