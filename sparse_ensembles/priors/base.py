"""Priors as stateless math objects over *named* parameters.

Every prior offers ``neg_log_prob(params)`` (up to a constant) and
``add_grad_(grads, params, num_data)``, which adds ``grad(-log p(theta)) / num_data`` into
``grads`` in place. Dividing by ``N = num_data`` puts the prior in the units of the *mean*
minibatch loss that ``backward()`` sees (docs/scaling.md): with temperature 0 a sampler is then
exactly SGD with the prior as weight decay.

Priors with state (the SA latents of Deng et al. 2019, an empirical-Bayes precision) set
``stateful = True`` and implement the hook below: the sampler calls ``update_(params, step)`` after
every step and carries ``state_dict()`` in its own, so a chain resumes bit for bit. The state
lives in the prior, which owns its math (the spike-and-slab latents included); the sampler only
calls the hook and checkpoints what it returns.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor


class Prior:
    #: True when the prior adapts through ``update_`` and has state to save.
    stateful: bool = False
    #: False when ``update_`` reads something the training loop sets for the next step (then the
    #: sampler never runs it in a worker thread).
    overlappable: bool = True

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

    def add_grad_chains_(self, grads: Mapping[str, Tensor], params: Mapping[str, Tensor], num_data: int) -> None:
        """:meth:`add_grad_` for M chains at once: every tensor carries a leading chain dimension
        ``(M, *shape)`` and chain ``m``'s prior is evaluated on its own slice (vectorised chains,
        ``samplers/vectorized.py``). This default loops over the chains; elementwise priors and the
        group Lasso override it with one batched computation."""
        chains = next(iter(params.values())).shape[0]
        for m in range(chains):
            self.add_grad_({n: g[m] for n, g in grads.items()}, {n: p[m] for n, p in params.items()}, num_data)

    # -- the hook for priors with state (no-ops here) ------------------------------------------
    def update_(self, params: Mapping[str, Tensor], step: int) -> None:
        """Adapt the state to the parameters after sampler step ``step`` (0-based). Called by the
        sampler after every step, under no_grad, with the updated detached parameters."""

    def state_dict(self) -> dict:
        """Everything ``update_`` changes, as plain values (floats, ints, tensors) that survive
        ``torch.save`` + ``torch.load(weights_only=True)``."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, but got state for {sorted(state)}")


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class Gaussian(Prior):
    """Isotropic N(0, 1/precision) on every parameter (or on ``names`` only):
    -log p = precision/2 * ||theta||^2."""

    def __init__(self, precision: float, names=None):
        self.precision = _check_positive("Gaussian precision", precision)
        self.names = None if names is None else set(names)

    def _covered(self, grads) -> list[str]:
        return list(grads) if self.names is None else [n for n in grads if n in self.names]

    def neg_log_prob(self, params):
        return 0.5 * self.precision * sum(params[n].pow(2).sum() for n in self._covered(params))

    def add_grad_(self, grads, params, num_data):
        wd = self.precision / num_data  # the equivalent SGD weight decay
        names = self._covered(grads)
        if names:
            torch._foreach_add_([grads[n] for n in names], [params[n] for n in names], alpha=wd)

    def add_grad_chains_(self, grads, params, num_data):
        self.add_grad_(grads, params, num_data)  # elementwise: the chain dimension changes nothing

    def plus_grad(self, grads, params, num_data):
        # out-of-place add: copy and decay in one pass, bit-identical to clone-then-add_
        wd = self.precision / num_data
        if self.names is None:
            return dict(zip(grads, torch._foreach_add(list(grads.values()), [params[n] for n in grads], alpha=wd)))
        return super().plus_grad(grads, params, num_data)


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

    def add_grad_chains_(self, grads, params, num_data):
        self.add_grad_(grads, params, num_data)  # elementwise


class Sum(Prior):
    """Sum of priors, e.g. GroupLasso + a weak Gaussian on biases. Forwards the state hook to its
    stateful members; its state is ``{str(index): member_state}``."""

    def __init__(self, *priors: Prior):
        self.priors = priors

    @property
    def stateful(self) -> bool:
        return any(p.stateful for p in self.priors)

    @property
    def overlappable(self) -> bool:
        return all(p.overlappable for p in self.priors)

    def _stateful(self) -> dict[str, Prior]:
        return {str(i): p for i, p in enumerate(self.priors) if p.stateful}

    def update_(self, params, step):
        for p in self._stateful().values():
            p.update_(params, step)

    def state_dict(self):
        return {k: p.state_dict() for k, p in self._stateful().items()}

    def load_state_dict(self, state):
        members = self._stateful()
        if set(state) != set(members):
            raise ValueError(f"state for members {sorted(state)} of Sum, but its stateful members are {sorted(members)}")
        for k, p in members.items():
            p.load_state_dict(state[k])

    def neg_log_prob(self, params):
        return sum(p.neg_log_prob(params) for p in self.priors)

    def add_grad_(self, grads, params, num_data):
        for p in self.priors:
            p.add_grad_(grads, params, num_data)

    def add_grad_chains_(self, grads, params, num_data):
        for p in self.priors:
            p.add_grad_chains_(grads, params, num_data)

    def plus_grad(self, grads, params, num_data):
        if not self.priors:
            return {n: g.clone() for n, g in grads.items()}
        out = self.priors[0].plus_grad(grads, params, num_data)
        for p in self.priors[1:]:
            p.add_grad_(out, params, num_data)
        return out
