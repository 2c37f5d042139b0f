"""A prior whose gradient is compiled with ``torch.compile`` (issue 23, item 4).

Eager, the group Lasso's gradient is a chain of small operations: per family the squared group
norms, then the square roots, the per-group scales, their broadcast and the addition into the
gradients, each a kernel of its own (the MLP's SSE prior dispatches 14 operations a step, the ISS
prior of a 2-layer LSTM 59: ``benchmarks/step_kernels.py``). On a GPU each is a launch, which is
why SGLD with the group Lasso cost 1.99x an SGD step on an H200 where SGLD alone cost 1.10x.
``torch.compile`` traces the gradient once and generates fused kernels for it (C++ on CPU, Triton
on CUDA). Measured on a 2-vCPU CPU at one thread (docs/scaling.md): the SSE prior's gradient of the
784-300-100-10 MLP 0.45 -> 0.32 ms, of the ISS 2 x 200 LSTM 7.5 -> 4.3 ms.

The result equals the eager gradient up to the reassociation of float sums (tests: 1e-6
relative). Each method's first call runs eagerly, so that priors which cache what they compute
once (the group Lasso's per-group coefficients) are traced in their steady state; the second call
pays the compilation (seconds; later processes reuse inductor's cache on disk). The compiled code
is shared by every instance of the same prior class with the same settings (lam, N, budget, the
parameters' shapes): other settings compile again, and past ``torch._dynamo.config.recompile_limit``
(8) versions of one method torch runs it eagerly and warns. Priors with state are refused: their
state changes every step, which would be baked into the compiled code or recompile it.
"""
from __future__ import annotations

import torch

from .base import Prior


class Compiled(Prior):
    """``prior`` with :meth:`add_grad_`, :meth:`plus_grad` and :meth:`add_grad_chains_` (the
    vectorised chains' batched gradient, ``vmap`` included) compiled by ``torch.compile``
    (``compile_kwargs`` go to it, e.g. ``mode="max-autotune"``; ``dynamic=False`` unless given);
    :meth:`neg_log_prob` is the prior's own.

        sampler = SGLD(model.named_parameters(), lr, num_data=N,
                       prior=Compiled(Sum(GroupLasso(groups_of(model), lam), Gaussian(1.0))))
    """

    def __init__(self, prior: Prior, **compile_kwargs):
        if not isinstance(prior, Prior):
            raise TypeError(f"Compiled wraps a Prior; got {type(prior).__name__}")
        if prior.stateful:
            raise ValueError(f"Compiled needs a prior without state; {type(prior).__name__} adapts every step "
                             "(its state would be baked into the compiled code); use it uncompiled")
        self.prior = prior
        # static shapes: a chain's shapes never change, and the dynamic-shape retrace that torch
        # tries after a second model's shapes breaks the graph in the group bookkeeping
        compile_kwargs.setdefault("dynamic", False)
        # the first call of each runs eagerly (it fills the prior's caches), then compiled
        self._add_grad_ = _EagerFirst(prior.add_grad_, torch.compile(prior.add_grad_, **compile_kwargs))
        self._plus_grad = _EagerFirst(prior.plus_grad, torch.compile(prior.plus_grad, **compile_kwargs))
        self._add_grad_chains_ = _EagerFirst(prior.add_grad_chains_,
                                             torch.compile(prior.add_grad_chains_, **compile_kwargs))

    @property
    def overlappable(self) -> bool:
        return self.prior.overlappable

    def neg_log_prob(self, params):
        return self.prior.neg_log_prob(params)

    def add_grad_(self, grads, params, num_data):
        self._add_grad_(grads, params, num_data)

    def plus_grad(self, grads, params, num_data):
        return self._plus_grad(grads, params, num_data)

    def add_grad_chains_(self, grads, params, num_data):
        self._add_grad_chains_(grads, params, num_data)

    def __repr__(self) -> str:
        return f"Compiled({self.prior!r})"


class _EagerFirst:
    """``eager`` on the first call, ``compiled`` on every later one."""

    def __init__(self, eager, compiled):
        self.eager, self.compiled, self.called = eager, compiled, False

    def __call__(self, *args):
        if not self.called:
            self.called = True
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler, no Triton
            raise RuntimeError(
                f"torch.compile could not compile the prior's gradient ({getattr(e, 'inner_exception', e)!r}); "
                "it needs a C++ compiler on CPU (apt-get install g++) and Triton on a GPU, or run the prior "
                "uncompiled (sampler.compile_prior = false; the chain resumes from its last checkpoint "
                "with --resume)") from e
