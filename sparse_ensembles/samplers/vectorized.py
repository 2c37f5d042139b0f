"""M SGLD chains of one architecture as one batched computation (issue 23, item 3).

The chains' parameters are stacked along a new leading dimension, ``(M, *shape)``; the forward pass
is ``torch.func.functional_call`` vectorised with ``torch.func.vmap`` over the chains' parameters and
their own minibatches (an MLP's layers: batched matrix products), so M small matrix products become
one batched product and the Python and kernel-launch cost of a step is paid once instead of M times.
Each chain keeps its own noise stream: chain ``m`` draws its noise from its own generator exactly as
a separate :class:`~.sgmcmc.SGLD` does (one flat ``randn`` of all its parameters per step, in
parameter order; on CPU the chains draw side by side in a thread pool), its prior is evaluated on its
own parameters (``Prior.add_grad_chains_``: one batched computation for the group Lasso and the
elementwise priors), and the update is the same :func:`~.functional.sgld_` arithmetic on the stacked
tensors. So the samples equal M separate chains given the same seeds, initial weights and minibatches,
up to the reassociation of floating-point sums in the batched products (``tests/test_vectorized.py``).

What it does not support: models with buffers that change in the forward pass (BatchNorm's running
statistics; vmap cannot update them per chain in place), samplers other than SGLD, masks and
gradient clipping. Those run as separate chains.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from ..priors import Prior
from .functional import sgld_
from .sgmcmc import FiniteCheck


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def _mlp_plan(model: nn.Module):
    """For an ``nn.Sequential`` of ``Linear`` layers, elementwise activations and a leading
    ``Flatten``: the forward plan (Linear names and activation modules), else None."""
    from ..models.mlp import ACTIVATIONS
    if not isinstance(model, nn.Sequential):
        return None
    plan = []
    for i, (name, m) in enumerate(model.named_children()):
        if isinstance(m, nn.Linear):
            plan.append(name)
        elif type(m) in ACTIVATIONS.values():
            plan.append(m)
        elif not (isinstance(m, nn.Flatten) and i == 0):
            return None
    return plan


class VectorizedSGLD:
    """``M = len(seeds)`` SGLD chains of ``model``'s architecture (mean-loss convention, as :class:`~.sgmcmc.SGLD`).

    Args:
        model: the architecture (its weights are the default start of every chain; it is not changed).
        seeds: one noise seed per chain (chain ``m``'s generator is ``torch.Generator().manual_seed(seeds[m])``).
        lr, num_data, temperature, prior: as for :class:`~.sgmcmc.SGLD`; ``lr`` may be a schedule ``step -> lr``.
        starts: optional per-chain state dicts (parameters) to start from instead of ``model``'s weights.
        loss_fn: ``(outputs, targets) -> mean loss`` of one chain's minibatch (default cross-entropy).
    """

    def __init__(self, model: nn.Module, seeds: Sequence[int], *, lr, num_data: int, temperature: float = 1.0,
                 prior: Optional[Prior] = None, starts: Optional[Sequence[dict]] = None,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy):
        if any(True for _ in model.buffers()):
            raise ValueError(f"{type(model).__name__} has buffers (e.g. BatchNorm running statistics), which vmap "
                             "cannot update per chain; run its chains separately")
        if not seeds:
            raise ValueError("VectorizedSGLD needs at least one chain (one seed per chain)")
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
            raise ValueError("VectorizedSGLD does not support Dropout (each chain would need its own dropout masks); "
                             "run these chains separately")
        if prior is not None and prior.stateful:
            raise ValueError(f"VectorizedSGLD does not support priors with state ({type(prior).__name__}: one state "
                             "would be shared by all chains); run these chains separately")
        if any(not p.requires_grad for p in model.parameters()):
            raise ValueError("VectorizedSGLD samples every parameter; this model has frozen ones")
        if starts is not None and len(starts) != len(seeds):
            raise ValueError(f"got {len(starts)} starting states for {len(seeds)} chains")
        if not (isinstance(num_data, int) and num_data >= 1):
            raise ValueError(f"num_data must be the training-set size, a positive int; got {num_data!r}")
        self.model, self.M = model, len(seeds)
        self.lr, self.num_data, self.temperature, self.prior, self.loss_fn = lr, num_data, temperature, prior, loss_fn
        base = {n: p.detach() for n, p in model.named_parameters()}
        self.names = list(base)
        stacked = {n: torch.stack([(s[n] if starts else base[n]).detach().to(base[n]) for s in (starts or [None] * self.M)])
                   for n in self.names}
        self._mlp = _mlp_plan(model)  # Linear + activations: batched matmuls, faster than vmap's batching rules
        self._mlp_flattens = isinstance(model, nn.Sequential) and len(model) > 0 and isinstance(model[0], nn.Flatten)
        # What autograd differentiates. An MLP's weights are stored as (M, in, out), so the forward
        # product h @ W^T is a plain batched product: CPU bmm with a transposed operand (and its
        # backward) was 1.6-2.4x slower, measured. Everything else sees ``params``, the same memory
        # in the model's own layout (M, out, in).
        self._transposed = {step + ".weight" for step in (self._mlp or []) if isinstance(step, str)}
        self._leaves = {n: (stacked[n].transpose(1, 2).contiguous() if n in self._transposed else stacked[n])
                        .requires_grad_(True) for n in self.names}
        self.params = {n: self._model_layout(n, self._leaves[n].detach()) for n in self.names}
        self.generators = [torch.Generator(device=base[self.names[0]].device).manual_seed(int(s)) for s in seeds]
        sizes = [base[n].numel() for n in self.names]
        self._noise = torch.empty(self.M, sum(sizes), dtype=base[self.names[0]].dtype, device=base[self.names[0]].device)
        # per-parameter (M, *shape) views of the noise buffer: row m is chain m's flat draw
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._noise_views = [self._noise[:, o:o + n].view(self.M, *base[name].shape)
                             for o, n, name in zip(offsets, sizes, self.names)]
        self.steps = 0
        self._finite = FiniteCheck(self._noise.device)  # as a separate chain's: no host sync per step on a GPU
        self.noise_threads: Optional[int] = None  # threads drawing the chains' noise on CPU (None: automatic)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_workers = 0

        def one(params, x, y):
            return self.loss_fn(functional_call(self.model, params, (x,)), y)

        self._losses = vmap(one)

    def _model_layout(self, name: str, t: Tensor) -> Tensor:
        return t.transpose(1, 2) if name in self._transposed else t

    def _uses_mlp_plan(self, xs: Tensor) -> bool:
        return self._mlp is not None and (self._mlp_flattens or xs.dim() == 3)

    def forward(self, xs: Tensor) -> Tensor:
        """``(M, B, out)``: chain ``m``'s outputs on ``xs[m]``."""
        if not self._uses_mlp_plan(xs):
            return vmap(lambda params, x: functional_call(self.model, params, (x,)))(self._leaves, xs)
        h = xs.flatten(2) if self._mlp_flattens else xs
        for step in self._mlp:
            if isinstance(step, str):  # a Linear: its stacked weight stored (M, in, out), bias (M, out)
                w, b = self._leaves[step + ".weight"], self._leaves.get(step + ".bias")
                h = torch.bmm(h, w) if b is None else torch.baddbmm(b.unsqueeze(1), h, w)
            else:
                h = step(h)
        return h

    def losses(self, xs: Tensor, ys: Tensor) -> Tensor:
        """``(M,)`` mean losses, chain ``m`` on its own minibatch ``(xs[m], ys[m])``."""
        if not self._uses_mlp_plan(xs):
            return self._losses(self._leaves, xs, ys)
        out = self.forward(xs)
        return torch.stack([self.loss_fn(out[m], ys[m]) for m in range(self.M)])

    @torch.no_grad()
    def step(self) -> None:
        """One SGLD step of every chain from the gradients left by ``losses(...).sum().backward()``."""
        names = self.names
        # in the model's layout; the prior adds in place (they are reset below)
        grads = {n: self._model_layout(n, self._leaves[n].grad) for n in names}
        if self.prior is not None:  # each chain's prior on its own parameters
            self.prior.add_grad_chains_(grads, self.params, self.num_data)
        total = torch.stack(torch._foreach_norm(list(grads.values()))).sum()
        if not self._finite.observe(total):
            raise FloatingPointError("non-finite gradient in a vectorised chain: a chain diverged; lower the learning "
                                     "rate or the temperature")
        lr = self.lr(self.steps) if callable(self.lr) else self.lr
        temperature = self.temperature(self.steps) if callable(self.temperature) else self.temperature
        if temperature > 0:
            self._draw_noise()
        sgld_([self.params[n] for n in names], [grads[n] for n in names], self._noise_views, lr=lr,
              temperature=temperature, num_data=self.num_data)
        for n in names:
            self._leaves[n].grad = None
        self.steps += 1
        self._finite.after_step(self.steps)

    def _draw_noise(self) -> None:
        """Row ``m`` of the noise buffer from chain ``m``'s generator. A draw is serial in torch, so
        the chains draw side by side in a thread pool of ``noise_threads`` threads (default: torch's
        thread count; at 1 a pool of 2 measured no faster), each from its own generator, so the
        values do not depend on the scheduling (2.9 -> 1.7 ms for 4 chains of the MLP on 2 vCPUs at
        2 threads, measured)."""
        workers = min(self.M, self.noise_threads or torch.get_num_threads())
        if workers < 2 or self._noise.device.type != "cpu":
            for m, g in enumerate(self.generators):
                self._noise[m].normal_(generator=g)
            return
        if self._pool is None or self._pool_workers != workers:
            self.close()
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vectorized-noise")
            self._pool_workers = workers
        for _ in self._pool.map(lambda m: self._noise[m].normal_(generator=self.generators[m]), range(self.M)):
            pass

    def close(self) -> None:
        """Stop the noise threads (idempotent; a later step starts them again)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the same chains: the stacked parameters, each
        chain's noise generator and the step count (for ``lr`` / ``temperature`` schedules)."""
        self._finite.read(self.steps)  # never save diverged chains
        return {"params": {n: self.params[n].clone(memory_format=torch.contiguous_format) for n in self.names},
                "generators": [g.get_state() for g in self.generators], "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["params"]) != self.names or len(sd["generators"]) != self.M:
            raise ValueError(f"this state holds {len(sd['generators'])} chains of parameters {list(sd['params'])}; "
                             f"the sampler has {self.M} chains of {self.names}")
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(sd["params"][n])
        for g, state in zip(self.generators, sd["generators"]):
            g.set_state(state)
        self.steps = int(sd["steps"])

    def state_dicts(self) -> list[dict[str, Tensor]]:
        """Chain ``m``'s parameters as a state dict (copies)."""
        return [{n: self.params[n][m].clone(memory_format=torch.contiguous_format) for n in self.names}
                for m in range(self.M)]

    def models(self) -> list[nn.Module]:
        """Chain ``m``'s network: a copy of ``model`` holding its parameters."""
        import copy
        out = []
        for sd in self.state_dicts():
            net = copy.deepcopy(self.model)
            net.load_state_dict(sd)
            out.append(net)
        return out
