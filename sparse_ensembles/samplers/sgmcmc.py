"""Stochastic-gradient MCMC samplers as ``torch.optim.Optimizer`` subclasses.

Scaling convention (docs/scaling.md): the loss given to ``backward()`` is the *mean* negative
log-likelihood of the minibatch; the sampler knows ``num_data = N`` and a temperature ``T`` and
targets ``p(theta | D) ** (1 / T)``. With ``U(theta) = mean_nll - log p(theta) / N``:

    SGLD   theta <- theta - lr * grad U + sqrt(2 * lr * T / N) * xi                (Welling & Teh 2011)
    SGHMC  v <- (1 - alpha) * v - lr * grad U + sqrt(2 * alpha * lr * T / N - lr^2 * V) * xi
           theta <- theta + v                                                     (Chen et al. 2014)

with ``xi ~ N(0, I)``. ``T = 0`` is plain SGD (SGD with momentum ``1 - alpha`` for SGHMC) with the
prior as weight decay. Masked entries (``masks[name] == False``) get no update and no noise, so a
pruned weight stays exactly where it is (zero after :func:`sparse_ensembles.pruning.apply_masks`).

Parameters should be passed as ``model.named_parameters()`` so priors and masks can refer to them
by name; a state-dict round trip (noise generator included) resumes a chain bit for bit.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..priors import Prior
from .schedules import resolve


NOISE_KINDS = ("gaussian", "rademacher")


def rademacher_(out: Tensor, generator: torch.Generator) -> Tensor:
    """Fill ``out`` with independent +1/-1 (probability 1/2 each), 31 values per random integer.

    Same mean (0) and covariance (I) as N(0, I) at about a third of the cost of ``normal_`` on CPU,
    where torch spends one Mersenne-twister draw per normal value.
    """
    n = out.numel()
    words = torch.randint(0, 2**31, ((n + 30) // 31,), dtype=torch.int32, generator=generator, device=out.device)
    shifts = torch.arange(31, dtype=torch.int32, device=out.device)
    bits = words.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).view(-1)[:n]
    return out.copy_(bits.view_as(out)).mul_(2).sub_(1)


class _NoiseSource:
    """Standard-normal noise for every parameter, one list per step, from one generator.

    All parameters' noise is one ``randn`` into a flat buffer (views per parameter), so a step
    costs one generator call. With ``prefetch=True`` the next step's noise is drawn in a worker
    thread into a second buffer while the model computes its gradients (the draw is
    single-threaded in torch and costs about as much as an MLP's whole SGD step). The sequence of
    draws is the same either way, so results do not depend on ``prefetch``; ``get_state`` returns
    the state *before* any pending draw.
    """

    def __init__(self, params: list[Tensor], generator: torch.Generator, prefetch: bool, kind: str = "gaussian"):
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise {kind!r}; use one of {NOISE_KINDS}")
        self.params = params
        self.generator = generator
        self.kind = kind
        kinds = {(p.dtype, p.device) for p in params}
        self.flat = len(kinds) == 1  # one buffer needs one dtype and device
        self.prefetch = prefetch and all(p.device.type == "cpu" for p in params)
        self._buffers = [self._new_buffer() for _ in range(2 if self.prefetch else 1)] if self.flat else []
        self._which = 0
        self._pending: Optional[Future] = None
        self._state_before_pending: Optional[Tensor] = None
        self._pool: Optional[ThreadPoolExecutor] = None

    def _new_buffer(self) -> Tensor:
        p0 = self.params[0]
        return torch.empty(sum(p.numel() for p in self.params), dtype=p0.dtype, device=p0.device)

    def _fill(self, t: Tensor) -> Tensor:
        return t.normal_(generator=self.generator) if self.kind == "gaussian" else rademacher_(t, self.generator)

    def _draw(self, which: int = 0) -> list[Tensor]:
        if not self.flat:
            return [self._fill(torch.empty_like(p)) for p in self.params]
        buf = self._fill(self._buffers[which])
        return [v.view_as(p) for v, p in zip(buf.split([p.numel() for p in self.params]), self.params)]

    def next(self) -> list[Tensor]:
        """This step's noise; valid until the next call (the buffer is then refilled)."""
        if not self.prefetch:
            return self._draw()
        noise = self._pending.result() if self._pending is not None else self._draw(self._which)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sgmcmc-noise")
        self._state_before_pending = self.generator.get_state()
        self._which = 1 - self._which
        self._pending = self._pool.submit(self._draw, self._which)
        return noise

    def get_state(self) -> Tensor:
        if self._pending is not None:
            return self._state_before_pending.clone()
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self.generator.set_state(state)


class SGMCMC(Optimizer):
    """Shared machinery: validation, named parameters, prior, masks, noise, schedules, state."""

    def __init__(self, params, defaults: dict, *, num_data: int, prior: Optional[Prior],
                 masks: Optional[Mapping[str, Tensor]], generator: Optional[torch.Generator],
                 prefetch_noise: bool, noise: str = "gaussian"):
        lr = defaults["lr"]
        if not callable(lr) and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"invalid learning rate {lr!r}: use a number >= 0 or a schedule (step -> lr)")
        if not isinstance(num_data, int) or isinstance(num_data, bool) or num_data < 1:
            raise ValueError(f"num_data must be the training-set size, a positive int; got {num_data!r}")
        t = defaults["temperature"]
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"invalid temperature {t!r}: use a number >= 0 (1 = the posterior, 0 = SGD)")
        super().__init__(params, {**defaults, "step": 0})  # step: per group, drives lr schedules
        self.check_finite = True  # raise FloatingPointError on a non-finite gradient (one sync/step)
        self.num_data = num_data
        self.prior = prior
        self._params = [p for g in self.param_groups for p in g["params"]]
        names = [n for g in self.param_groups for n in g.get("param_names", [])]
        self._names = names if len(names) == len(self._params) else [f"param{i}" for i in range(len(self._params))]
        self._by_name = dict(zip(self._names, self._params))
        # detached views share storage with the parameters, so they follow in-place updates
        self._detached = {n: p.detach() for n, p in self._by_name.items()}
        self._masks: dict[int, Tensor] = {}
        if masks:
            self.set_masks(masks)
        if generator is None:
            # seeded from the global RNG so torch.manual_seed makes a chain reproducible
            device = self._params[0].device if self._params else torch.device("cpu")
            generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ()).item()))
        self._noise = _NoiseSource(self._params, generator, prefetch_noise, noise)

    # -- masks ---------------------------------------------------------------------------------
    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Fix a pruning mask (True = keep) for the named parameters; None entries are unmasked."""
        unknown = sorted(set(masks) - set(self._by_name))
        if unknown:
            raise KeyError(
                f"masks name parameters the sampler does not hold: {unknown[:5]}; pass "
                "model.named_parameters() to the sampler so names match the model's"
            )
        self._masks = {}
        for name, mask in masks.items():
            p = self._by_name[name]
            if mask.shape != p.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(p.shape)}")
            self._masks[id(p)] = mask.to(device=p.device, dtype=p.dtype)

    # -- the step ------------------------------------------------------------------------------
    def _effective_grads(self) -> dict[int, Tensor]:
        """grad U = grad mean_nll - grad log p / N, masked; keyed by id(param)."""
        # p.grad stays the user's: the prior adds out of place (a copy fused with the addition),
        # and masks multiply our copy; with neither, the gradients are used as they are
        grads = {n: p.grad for n, p in self._by_name.items() if p.grad is not None}
        if self.prior is not None:
            grads = self.prior.plus_grad(grads, self._detached, self.num_data)
        elif self._masks:
            grads = {n: g.clone() for n, g in grads.items()}
        if grads and self.check_finite:
            # one fused reduction and one sync per step, not one per tensor
            norms = torch._foreach_norm(list(grads.values()))
            if not math.isfinite(torch.stack(norms).sum().item()):
                bad = next(n for n, v in zip(grads, norms) if not torch.isfinite(v))
                raise FloatingPointError(
                    f"non-finite gradient in {bad!r}: the chain diverged; lower the learning rate "
                    "or the temperature and resume from the last checkpoint"
                )
        out = {id(self._by_name[n]): g for n, g in grads.items()}
        masked = [(out[i], m) for i, m in self._masks.items() if i in out]
        if masked:
            torch._foreach_mul_([g for g, _ in masked], [m for _, m in masked])
        return out

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._effective_grads()
        noise = dict(zip(map(id, self._params), self._noise.next()))
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in grads]
            if not ps:
                continue
            lr = resolve(group["lr"], group["step"])
            zs = [noise[id(p)] for p in ps]
            masked = [(z, self._masks[id(p)]) for z, p in zip(zs, ps) if id(p) in self._masks]
            if masked:
                torch._foreach_mul_([z for z, _ in masked], [m for _, m in masked])
            for p in ps:
                if not self.state[p]:
                    self._init_state(p, self.state[p], group)
            self._update(ps, [grads[id(p)] for p in ps], zs, lr, group)
            group["step"] += 1
        return loss

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        state["initialized"] = True

    def _update(self, params: list[Tensor], grads: list[Tensor], noise: list[Tensor], lr: float, group: dict) -> None:
        """Move ``params`` of one param group (lists aligned) with this step's ``lr``."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        # schedules are code, not data: they stay with the sampler that was constructed
        for g in sd["param_groups"]:
            if callable(g["lr"]):
                g["lr"] = None
        sd["noise_generator"] = self._noise.get_state()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("noise_generator", None)
        current_lrs = [g["lr"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, lr in zip(self.param_groups, current_lrs):
            if g["lr"] is None:
                g["lr"] = lr
        if gen_state is not None:
            self._noise.set_state(gen_state)


class SGLD(SGMCMC):
    r"""Stochastic gradient Langevin dynamics (Welling & Teh 2011) under the mean-loss convention:

    ``theta <- theta - lr * (grad mean_nll - grad log p(theta) / N) + sqrt(2 * lr * T / N) * xi``.

    Args:
        params: ``model.named_parameters()`` (names let priors and masks find tensors).
        lr: step size, a number or a schedule ``step -> lr``.
        num_data: N, the number of training examples.
        temperature: T; the chain targets p(theta | D)^(1/T). T = 0 is SGD.
        prior: a :class:`~sparse_ensembles.priors.Prior`, or None for a flat prior.
        masks: ``{name: BoolTensor}``, True = keep; masked entries are never changed.
        generator: a ``torch.Generator`` for the noise (else one seeded from the global RNG).
        prefetch_noise: draw the next step's noise in a worker thread (CPU only; same results).
        noise: ``"gaussian"`` (xi ~ N(0, I)) or ``"rademacher"`` (xi = +-1 with probability 1/2):
            same mean and covariance, so the update is the *simplified weak Euler scheme* of the
            Langevin SDE, which keeps the weak order 1 of Euler-Maruyama (Kloeden & Platen 1992,
            sec. 14.1): expectations under the chain converge as with Gaussian noise. About 3x
            cheaper to draw on CPU; single draws are not Gaussian, so keep the default when that matters.
    """

    def __init__(self, params, lr, *, num_data: int, temperature: float = 1.0, prior: Optional[Prior] = None,
                 masks=None, generator: Optional[torch.Generator] = None, prefetch_noise: bool = False,
                 noise: str = "gaussian"):
        super().__init__(params, dict(lr=lr, temperature=temperature), num_data=num_data, prior=prior,
                         masks=masks, generator=generator, prefetch_noise=prefetch_noise, noise=noise)

    def _update(self, params, grads, noise, lr, group):
        torch._foreach_add_(params, grads, alpha=-lr)
        t = group["temperature"]
        if t > 0:
            torch._foreach_add_(params, noise, alpha=math.sqrt(2.0 * lr * t / self.num_data))


class SGHMC(SGMCMC):
    r"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014), SGD-momentum form:

    ``v <- (1 - alpha) v - lr * grad U + sqrt(2 alpha lr T / N - lr^2 V) xi``;  ``theta <- theta + v``

    where ``alpha = friction`` and ``V`` is an optional estimate of the minibatch-gradient variance
    (``estimate_gradient_noise=True``: a running per-entry variance of the gradient, decay
    ``noise_decay``; the injected variance is clamped at 0). ``T = 0`` is SGD with momentum
    ``1 - alpha``. Other arguments as :class:`SGLD`.
    """

    def __init__(self, params, lr, *, num_data: int, temperature: float = 1.0, friction: float = 0.1,
                 estimate_gradient_noise: bool = False, noise_decay: float = 0.99,
                 prior: Optional[Prior] = None, masks=None, generator: Optional[torch.Generator] = None,
                 prefetch_noise: bool = False, noise: str = "gaussian"):
        if not (isinstance(friction, (int, float)) and 0 < friction <= 1):
            raise ValueError(f"invalid friction {friction!r}: use 0 < friction <= 1 (momentum = 1 - friction)")
        if not 0 < noise_decay < 1:
            raise ValueError(f"invalid noise_decay {noise_decay!r}: use 0 < noise_decay < 1")
        super().__init__(params, dict(lr=lr, temperature=temperature, friction=friction,
                                      estimate_gradient_noise=estimate_gradient_noise, noise_decay=noise_decay),
                         num_data=num_data, prior=prior, masks=masks, generator=generator,
                         prefetch_noise=prefetch_noise, noise=noise)

    def _init_state(self, p, state, group):
        state["momentum"] = torch.zeros_like(p)
        if group["estimate_gradient_noise"]:
            state["grad_mean"] = torch.zeros_like(p)
            state["grad_sq"] = torch.zeros_like(p)

    def _update(self, params, grads, noise, lr, group):
        alpha, t = group["friction"], group["temperature"]
        vs = [self.state[p]["momentum"] for p in params]
        torch._foreach_mul_(vs, 1 - alpha)
        torch._foreach_add_(vs, grads, alpha=-lr)
        if t > 0:
            var = 2.0 * alpha * lr * t / self.num_data
            if group["estimate_gradient_noise"]:
                d = group["noise_decay"]
                for p, v, g, z in zip(params, vs, grads, noise):
                    st = self.state[p]
                    st["grad_mean"].mul_(d).add_(g, alpha=1 - d)
                    st["grad_sq"].mul_(d).addcmul_(g, g, value=1 - d)
                    grad_var = (st["grad_sq"] - st["grad_mean"].pow(2)).clamp_min_(0)
                    v.addcmul_((var - lr * lr * grad_var).clamp_min_(0).sqrt_(), z)
            else:
                torch._foreach_add_(vs, noise, alpha=math.sqrt(var))
        torch._foreach_add_(params, vs)
