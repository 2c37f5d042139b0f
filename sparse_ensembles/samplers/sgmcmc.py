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
by name; a state-dict round trip (noise generator, step count, clip count and a stateful prior's
state included) resumes a chain bit for bit. The arithmetic of each update lives in
:mod:`.functional` (``sgld_``, ``sghmc_``); the classes add priors, masks, clipping, noise and state.
"""
from __future__ import annotations

import math
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..priors import Prior
from .functional import sghmc_, sgld_
from .schedules import resolve, resolve_temperature
from .ziggurat import ZigguratNormal


#: gaussian: torch's generator; gaussian_parallel: N(0, I) from a counter-based generator on all
#: CPU threads (:mod:`.ziggurat`; CPU float32); rademacher: +-1 (same covariance)
NOISE_KINDS = ("gaussian", "gaussian_parallel", "rademacher")


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

    The worker thread is shut down by :meth:`close` or, failing that, when the source is
    garbage-collected (``weakref.finalize``), so forgetting ``close`` leaks no thread.

    Why torch's generator and not numpy's ``Generator(PCG64)``: measured here (one thread, 266k
    float32 normals) torch's vectorised Box-Muller ``normal_`` takes about 0.6 ms, numpy's
    ziggurat ``standard_normal(out=..., dtype=float32)`` about 2.2 ms (benchmarks/sampler_overhead.py
    records both), so numpy would only make the worker busier.
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
        self._counter: Optional[ZigguratNormal] = None
        if kind == "gaussian_parallel":
            if kinds - {(torch.float32, torch.device("cpu"))}:
                raise ValueError(
                    f"noise='gaussian_parallel' draws CPU float32 noise, but the parameters are "
                    f"{sorted(str(d) + ' ' + str(t) for t, d in kinds)}; use noise='gaussian' on other "
                    "devices and dtypes (on a GPU torch's own generator is already parallel)")
            # the key comes from the generator, so a seeded generator still fixes the chain; drawn
            # ahead in the worker thread, it uses that one thread (more would fight torch's)
            self._counter = ZigguratNormal.from_generator(generator, threads=1 if self.prefetch else None)
        self._buffers = [self._new_buffer() for _ in range(2 if self.prefetch else 1)] if self.flat else []
        # per-parameter views of each buffer, made once: a step then costs one C call and no
        # Python in the worker thread, which would contend for the GIL with the training loop
        self._views = [[v.view_as(p) for v, p in zip(b.split([p.numel() for p in params]), params)]
                       for b in self._buffers]
        self._which = 0
        self._pending: Optional[Future] = None
        self._state_before_pending: Optional[Tensor] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._finalizer: Optional[weakref.finalize] = None

    def _new_buffer(self) -> Tensor:
        p0 = self.params[0]
        return torch.empty(sum(p.numel() for p in self.params), dtype=p0.dtype, device=p0.device)

    def _fill(self, t: Tensor) -> Tensor:
        if self._counter is not None:
            return self._counter.fill_(t)
        return t.normal_(generator=self.generator) if self.kind == "gaussian" else rademacher_(t, self.generator)

    def _draw(self, which: int = 0) -> list[Tensor]:
        if not self.flat:
            return [self._fill(torch.empty_like(p)) for p in self.params]
        self._fill(self._buffers[which])
        return self._views[which]

    def _draw_ahead(self, which: int) -> list[Tensor]:
        # runs in the worker: the state is taken here, off the training thread's path
        self._state_before_pending = self._generator_state()
        return self._draw(which)

    def next(self) -> list[Tensor]:
        """This step's noise; valid until the next call (the buffer is then refilled)."""
        if not self.prefetch:
            return self._draw()
        noise = self._pending.result() if self._pending is not None else self._draw(self._which)
        if self._pool is None:  # first step, or after close()
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sgmcmc-noise")
            # the finalizer holds the pool, not self; wait=False because the last reference may be
            # dropped in the worker thread itself, which cannot join itself
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        self._which = 1 - self._which
        self._pending = self._pool.submit(self._draw_ahead, self._which)
        return noise

    def close(self) -> None:
        """Stop the worker thread after any pending draw; that draw's noise is kept for the next
        step, so closing never changes the chain. Idempotent; a later ``next`` starts a new worker."""
        if self._pending is not None:
            self._pending.result()
        if self._pool is not None:
            self._finalizer.detach()
            self._pool.shutdown(wait=True)
            self._pool = self._finalizer = None
        if self._counter is not None:
            self._counter.close()

    def _generator_state(self) -> Tensor:
        return self._counter.get_state() if self._counter is not None else self.generator.get_state()

    def get_state(self) -> Tensor:
        if self._pending is not None:
            self._pending.result()  # the state is taken when the draw starts
            return self._state_before_pending.clone()
        return self._generator_state()

    def set_state(self, state: Tensor) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._counter is not None:
            self._counter.set_state(state)
            return
        if state.dtype == torch.int64 and state.numel() == 2:
            raise ValueError("this checkpoint's noise state is a gaussian_parallel (counter) state, but the "
                             f"sampler draws noise={self.kind!r}: resume with the same sampler.noise")
        try:
            self.generator.set_state(state)
        except RuntimeError as e:  # e.g. a CPU (mt19937) state for a CUDA (Philox) generator
            raise ValueError(
                f"cannot restore the noise generator ({self.generator.device} generator) from this "
                f"checkpoint's state ({state.numel()} bytes): was it saved from a sampler on another "
                f"device type? ({e})"
            ) from None


class FiniteCheck:
    """Whether a chain's gradients stayed finite, read back (a host sync) every ``every`` steps.

    Every step on CPU, where the read is free and the caller can name the bad tensor at the step it
    happens; every 100 steps on a GPU, so a step queues its kernels without waiting for the device:
    a non-finite gradient is then reported up to 100 steps late, and always by :meth:`read`, which
    a sampler's ``state_dict()`` calls first (so no checkpoint holds a diverged chain). Shared by
    :class:`SGMCMC` and the vectorised chains."""

    def __init__(self, device: torch.device):
        self.every = 1 if device.type == "cpu" else 100
        self._flag = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite since the last read
        self._last_read = 0  # steps taken at the last read

    def observe(self, total: Tensor) -> bool:
        """False when ``total`` (a gradient norm) is read now and is not finite; with ``every > 1``
        it is folded into the device flag without a sync, and this returns True."""
        if self.every > 1:
            self._flag |= ~torch.isfinite(total)
            return True
        return math.isfinite(total.item())

    def after_step(self, steps: int) -> None:
        if steps - self._last_read >= self.every > 1:
            self.read(steps)

    def read(self, steps: int) -> None:
        """Raise if one of the steps since the last read had a non-finite gradient."""
        first, self._last_read = self._last_read, steps
        if bool(self._flag):
            raise FloatingPointError(
                f"non-finite gradient in one of steps {first + 1}..{steps} (the finiteness flag is read "
                f"every check_every = {self.every} steps): the chain diverged; lower the learning rate "
                "or the temperature and resume from the last checkpoint (check_every = 1 stops at the first "
                "bad step and names the tensor)")


class SGMCMC(Optimizer):
    """Shared machinery: validation, named parameters, prior (and its state hook), masks,
    gradient clipping, noise, schedules, state. Subclasses implement ``_update`` with a function
    of :mod:`.functional`.

    ``max_grad_norm`` (None = off) rescales the *likelihood* gradient (``p.grad`` of the mean loss,
    before the prior is added) so its total L2 norm is at most ``max_grad_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does. While the clip is inactive the update is unchanged
    bit for bit. When it fires the drift is no longer ``grad U``, so the chain samples a distorted
    distribution, the more often the more it fires: it is a stabiliser for exploding (LSTM)
    gradients in burn-in, to be used with a threshold that rarely fires. ``clipped_steps`` counts
    the steps where it did (saved in the state dict), so a run can report it.
    """

    def __init__(self, params, defaults: dict, *, num_data: int, prior: Optional[Prior],
                 masks: Optional[Mapping[str, Tensor]], generator: Optional[torch.Generator],
                 prefetch_noise: bool, noise: str = "gaussian", max_grad_norm: Optional[float] = None,
                 pruning=None, overlap_prior_update: Optional[bool] = None):
        lr = defaults["lr"]
        if not callable(lr) and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"invalid learning rate {lr!r}: use a number >= 0 or a schedule (step -> lr)")
        if not isinstance(num_data, int) or isinstance(num_data, bool) or num_data < 1:
            raise ValueError(f"num_data must be the training-set size, a positive int; got {num_data!r}")
        t = defaults["temperature"]
        if not callable(t) and not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"invalid temperature {t!r}: use a number >= 0 (1 = the posterior, 0 = SGD) "
                             "or a schedule (step -> T, e.g. annealing)")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"invalid max_grad_norm {max_grad_norm!r}: use a positive number, or None for no clipping")
        super().__init__(params, {**defaults, "step": 0})  # step: per group, drives lr schedules
        self.check_finite = True  # raise FloatingPointError on a non-finite gradient
        self.num_data = num_data
        self.prior = prior
        self.pruning = pruning  # e.g. pruning.SparsitySchedule: called after every step
        self.max_grad_norm = max_grad_norm
        self._params = [p for g in self.param_groups for p in g["params"]]
        names = [n for g in self.param_groups for n in g.get("param_names", [])]
        self._names = names if len(names) == len(self._params) else [f"param{i}" for i in range(len(self._params))]
        self._by_name = dict(zip(self._names, self._params))
        # detached views share storage with the parameters, so they follow in-place updates
        self._detached = {n: p.detach() for n, p in self._by_name.items()}
        device = self._params[0].device if self._params else torch.device("cpu")
        self._steps = 0  # steps taken; the prior hook's step index
        # a device tensor, so counting clipped steps costs no host sync
        self._clipped = torch.zeros((), dtype=torch.int64, device=device)
        self._finite = FiniteCheck(device)  # read every check_every steps (1 on CPU, 100 on a GPU)
        self._masks: dict[int, Tensor] = {}
        if masks:
            self.set_masks(masks)
        if generator is None:
            # on the parameters' device, seeded from the global RNG so torch.manual_seed makes a
            # chain reproducible
            generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ()).item()))
        elif generator.device.type != device.type:
            raise ValueError(f"the noise generator is on {generator.device}, the parameters on {device}; "
                             f"pass torch.Generator({device.type!r}) or none")
        self._noise = _NoiseSource(self._params, generator, prefetch_noise, noise)
        # Opt-in: a stateful prior's update (the SA latents) only has to be done when the next step
        # adds the prior's gradient, so it can run in a worker thread while the training loop
        # computes the next forward / backward (torch releases the GIL). Same arithmetic, same
        # order: the chain is identical; read the prior's state after synchronize(). Not with a
        # pruning schedule, which writes the parameters after the update.
        self.overlap_prior_update = (bool(overlap_prior_update) and pruning is None
                                     and (prior is None or prior.overlappable))
        self._prior_pool: Optional[ThreadPoolExecutor] = None
        self._prior_pending: Optional[Future] = None
        self._prior_finalizer: Optional[weakref.finalize] = None

    @property
    def clipped_steps(self) -> int:
        """How many steps had their likelihood gradient rescaled by ``max_grad_norm``."""
        return int(self._clipped.item())

    def synchronize(self) -> None:
        """Wait for a prior update running in the worker thread (and raise its error, if any).
        Reading the prior's state directly needs this first; ``state_dict`` and ``step`` call it."""
        if self._prior_pending is not None:
            pending, self._prior_pending = self._prior_pending, None
            pending.result()

    def close(self) -> None:
        """Stop the worker threads (idempotent; never required: they also stop when the sampler
        is garbage-collected, and a later ``step`` starts them again). The chain is unaffected."""
        try:
            self.synchronize()
        finally:  # a failed update must not leave the threads running (nor hide the caller's error)
            self._noise.close()
            if self._prior_pool is not None:
                self._prior_finalizer.detach()
                self._prior_pool.shutdown(wait=True)
                self._prior_pool = self._prior_finalizer = None

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

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks by parameter name (True = keep)."""
        return {n: self._masks[id(p)].bool() for n, p in self._by_name.items() if id(p) in self._masks}

    def named_parameters(self) -> dict[str, Tensor]:
        """The sampled parameters by name (detached views that follow the updates)."""
        return dict(self._detached)

    @torch.no_grad()
    def prune_(self, masks: Mapping[str, Tensor], *, fix: bool = True) -> None:
        """Zero the pruned entries (False) of the named parameters and of their per-parameter
        state (momentum, gradient statistics), so they do not drift back. ``fix=True`` also keeps
        them at zero from now on (the masks replace those of these parameters); ``fix=False``
        leaves them free to regrow (Deng et al.'s code re-zeroes every step instead)."""
        for n, m in masks.items():
            p = self._by_name[n]
            keep = m.to(device=p.device, dtype=p.dtype)
            p.mul_(keep)
            for v in self.state[p].values():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    v.mul_(keep)
        if fix:
            merged = {**self.masks, **{n: m.bool() for n, m in masks.items()}}
            self.set_masks(merged)

    # -- the step ------------------------------------------------------------------------------
    def _effective_grads(self) -> dict[int, Tensor]:
        """grad U = clip(grad mean_nll) - grad log p / N, masked; keyed by id(param)."""
        names = [n for n, p in self._by_name.items() if p.grad is not None]
        if not names:
            return {}
        raw = [self._by_name[n].grad for n in names]
        total = scale = None
        if self.max_grad_norm is not None:
            # the arithmetic of torch.nn.utils.clip_grad_norm_ (so it can be checked bit for bit);
            # the scale stays on the device, and a scale of exactly 1 leaves the gradient unchanged
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(raw)))
            scale = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
            grads = dict(zip(names, torch._foreach_mul(raw, scale)))  # copies: p.grad stays the user's
            if self.prior is not None:
                self.prior.add_grad_(grads, self._detached, self.num_data)
        elif self.prior is not None:
            # p.grad stays the user's: the prior adds out of place (a copy fused with the addition)
            grads = self.prior.plus_grad(dict(zip(names, raw)), self._detached, self.num_data)
        elif self._masks:
            grads = {n: g.clone() for n, g in zip(names, raw)}  # masks multiply our copy
        else:
            grads = dict(zip(names, raw))
        if self.check_finite:
            # one fused reduction and one sync per step, not one per tensor; with clipping the
            # clip's norm serves (a finite likelihood gradient and finite parameters give a finite U)
            checked, checked_names = (raw, names) if total is not None else (list(grads.values()), list(grads))
            if total is None:
                total = torch.stack(torch._foreach_norm(checked)).sum()
            if not self._finite.observe(total):
                # name the worst tensor; its norm can be inf with finite entries (overflow)
                norms = torch.stack(torch._foreach_norm(checked)).nan_to_num(math.inf)
                bad = checked_names[int(norms.argmax())]
                raise FloatingPointError(
                    f"non-finite gradient in {bad!r} (norm {norms.max().item()}): the chain diverged; lower "
                    "the learning rate or the temperature and resume from the last checkpoint"
                )
        if scale is not None:
            self._clipped += scale < 1  # counted once the step is known to happen
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
        self.synchronize()  # the prior's state must be this step's before its gradient is added
        grads = self._effective_grads()
        temps = [resolve_temperature(g["temperature"], g["step"]) for g in self.param_groups]
        noise = {}
        if grads and any(t > 0 for t in temps):  # T = 0 draws nothing
            noise = dict(zip(map(id, self._params), self._noise.next()))
        for group, temperature in zip(self.param_groups, temps):
            ps = [p for p in group["params"] if id(p) in grads]
            if not ps:
                continue
            lr = resolve(group["lr"], group["step"])
            zs = [noise[id(p)] for p in ps] if noise else []
            masked = [(z, self._masks[id(p)]) for z, p in zip(zs, ps) if id(p) in self._masks]
            if masked:
                torch._foreach_mul_([z for z, _ in masked], [m for _, m in masked])
            for p in ps:
                if not self.state[p]:
                    self._init_state(p, self.state[p], group)
            self._update(ps, [grads[id(p)] for p in ps], zs, lr, temperature, group)
            group["step"] += 1
        if self.prior is not None and self.prior.stateful:
            if self.overlap_prior_update:
                if self._prior_pool is None:
                    self._prior_pool = ThreadPoolExecutor(1, thread_name_prefix="sgmcmc-prior")
                    self._prior_finalizer = weakref.finalize(self, self._prior_pool.shutdown, wait=False)
                self._prior_pending = self._prior_pool.submit(self.prior.update_, self._detached, self._steps)
            else:
                self.prior.update_(self._detached, self._steps)
        if self.pruning is not None:
            self.pruning.apply_(self, self._steps)
        self._steps += 1
        self._finite.after_step(self._steps)
        return loss

    @property
    def check_every(self) -> int:
        """Steps between reads of the finiteness flag (:class:`FiniteCheck`); 1 stops at the first
        bad step and names the tensor."""
        return self._finite.every

    @check_every.setter
    def check_every(self, every: int) -> None:
        self._finite.every = int(every)

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        state["initialized"] = True

    def _update(self, params: list[Tensor], grads: list[Tensor], noise: list[Tensor], lr: float, temperature: float,
                group: dict) -> None:
        """Move ``params`` of one param group (lists aligned; ``noise`` is empty when T = 0)."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        self.synchronize()
        self._finite.read(self._steps)  # never save a diverged chain
        sd = super().state_dict()
        # schedules are code, not data: they stay with the sampler that was constructed
        for g in sd["param_groups"]:
            for key in ("lr", "temperature"):
                if callable(g[key]):
                    g[key] = None
        sd["noise_generator"] = self._noise.get_state()
        sd["steps"] = self._steps
        sd["clipped_steps"] = self.clipped_steps
        if self.prior is not None and self.prior.stateful:
            sd["prior"] = self.prior.state_dict()
        if self.pruning is not None:  # masks chosen during sampling are part of the chain's state
            sd["masks"] = self.masks
            if hasattr(self.pruning, "state_dict"):
                sd["pruning"] = self.pruning.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        self.synchronize()
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("noise_generator", None)
        steps = state_dict.pop("steps", None)
        clipped = state_dict.pop("clipped_steps", 0)
        prior_state = state_dict.pop("prior", None)
        masks = state_dict.pop("masks", None)
        pruning_state = state_dict.pop("pruning", None)
        stateful = self.prior is not None and self.prior.stateful
        if (prior_state is not None) != stateful:
            # resuming would silently restart (or drop) the prior's adaptation
            raise ValueError(
                "the checkpoint has a prior state but this sampler's prior is stateless" if prior_state is not None
                else f"this sampler's prior ({type(self.prior).__name__}) has state, but the checkpoint has none"
            )
        # the hyperparameters this sampler was built with win over the checkpoint's (a resume with
        # a changed lr, temperature or friction uses the new values); only the step counts carry on
        current = [{k: v for k, v in g.items() if k not in ("params", "param_names", "step")} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, values in zip(self.param_groups, current):
            g.update(values)
        if masks is not None:
            self.set_masks(masks)
        if pruning_state is not None and self.pruning is not None:
            self.pruning.load_state_dict(pruning_state)
        if gen_state is not None:
            self._noise.set_state(gen_state)
        # checkpoints from before the count was saved: every group stepped together
        self._steps = steps if steps is not None else max((g["step"] for g in self.param_groups), default=0)
        self._clipped.fill_(clipped)
        if stateful:
            self.prior.load_state_dict(prior_state)


class SGLD(SGMCMC):
    r"""Stochastic gradient Langevin dynamics (Welling & Teh 2011) under the mean-loss convention:

    ``theta <- theta - lr * (grad mean_nll - grad log p(theta) / N) + sqrt(2 * lr * T / N) * xi``
    (the update is :func:`.functional.sgld_`).

    Args:
        params: ``model.named_parameters()`` (names let priors and masks find tensors).
        lr: step size, a number or a schedule ``step -> lr``.
        num_data: N, the number of training examples.
        temperature: T; the chain targets p(theta | D)^(1/T). T = 0 is SGD (no noise is drawn).
        prior: a :class:`~sparse_ensembles.priors.Prior`, or None for a flat prior. A stateful
            prior is updated after every step and saved in the state dict.
        masks: ``{name: BoolTensor}``, True = keep; masked entries are never changed.
        generator: a ``torch.Generator`` for the noise, on the parameters' device (else one
            created there, seeded from the global RNG).
        prefetch_noise: draw the next step's noise in a worker thread (CPU only; same results).
            Pays off when a core is free for it (e.g. torch at 1 thread on 2 cores); call
            :meth:`close` to stop the thread early.
        noise: ``"gaussian"`` (xi ~ N(0, I) from ``generator``), ``"gaussian_parallel"`` (xi ~
            N(0, I) from a counter-based generator keyed by ``generator`` that runs on all CPU
            threads, :mod:`.ziggurat`; CPU float32 only; a different stream from ``"gaussian"``)
            or ``"rademacher"`` (xi = +-1 with probability 1/2):
            same mean and covariance, so the update is the *simplified weak Euler scheme* of the
            Langevin SDE, which keeps the weak order 1 of Euler-Maruyama (Kloeden & Platen 1992,
            sec. 14.1): expectations under the chain converge as with Gaussian noise. About 3x
            cheaper to draw on CPU; single draws are not Gaussian, so keep the default when that matters.
        max_grad_norm: clip the likelihood gradient's total L2 norm (None = off). Exact while it
            does not fire; biases the chain when it does (see :class:`SGMCMC`, ``clipped_steps``).
    """

    def __init__(self, params, lr, *, num_data: int, temperature: float = 1.0, prior: Optional[Prior] = None,
                 masks=None, generator: Optional[torch.Generator] = None, prefetch_noise: bool = False,
                 noise: str = "gaussian", max_grad_norm: Optional[float] = None, pruning=None,
                 overlap_prior_update: Optional[bool] = None):
        super().__init__(params, dict(lr=lr, temperature=temperature), num_data=num_data, prior=prior,
                         masks=masks, generator=generator, prefetch_noise=prefetch_noise, noise=noise,
                         max_grad_norm=max_grad_norm, pruning=pruning, overlap_prior_update=overlap_prior_update)

    def _update(self, params, grads, noise, lr, temperature, group):
        sgld_(params, grads, noise, lr=lr, temperature=temperature, num_data=self.num_data)


class SGHMC(SGMCMC):
    r"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014), SGD-momentum form:

    ``v <- (1 - alpha) v - lr * grad U + sqrt(2 alpha lr T / N - lr^2 V) xi``;  ``theta <- theta + v``

    (the update is :func:`.functional.sghmc_`) where ``alpha = friction`` and ``V`` is an optional
    estimate of the minibatch-gradient variance (``estimate_gradient_noise=True``: a running
    per-entry variance of the gradient, decay ``noise_decay``; the injected variance is clamped at
    0). ``T = 0`` is SGD with momentum ``1 - alpha``. Other arguments as :class:`SGLD`.
    """

    def __init__(self, params, lr, *, num_data: int, temperature: float = 1.0, friction: float = 0.1,
                 estimate_gradient_noise: bool = False, noise_decay: float = 0.99,
                 prior: Optional[Prior] = None, masks=None, generator: Optional[torch.Generator] = None,
                 prefetch_noise: bool = False, noise: str = "gaussian", max_grad_norm: Optional[float] = None,
                 pruning=None, overlap_prior_update: Optional[bool] = None):
        if not (isinstance(friction, (int, float)) and 0 < friction <= 1):
            raise ValueError(f"invalid friction {friction!r}: use 0 < friction <= 1 (momentum = 1 - friction)")
        if not 0 < noise_decay < 1:
            raise ValueError(f"invalid noise_decay {noise_decay!r}: use 0 < noise_decay < 1")
        super().__init__(params, dict(lr=lr, temperature=temperature, friction=friction,
                                      estimate_gradient_noise=estimate_gradient_noise, noise_decay=noise_decay),
                         num_data=num_data, prior=prior, masks=masks, generator=generator,
                         prefetch_noise=prefetch_noise, noise=noise, max_grad_norm=max_grad_norm, pruning=pruning,
                         overlap_prior_update=overlap_prior_update)

    def _init_state(self, p, state, group):
        state["momentum"] = torch.zeros_like(p)
        if group["estimate_gradient_noise"]:
            state["grad_mean"] = torch.zeros_like(p)
            state["grad_sq"] = torch.zeros_like(p)

    def _update(self, params, grads, noise, lr, temperature, group):
        t, grad_var = temperature, None
        if t > 0 and group["estimate_gradient_noise"]:
            d, grad_var = group["noise_decay"], []
            for p, g in zip(params, grads):
                st = self.state[p]
                st["grad_mean"].mul_(d).add_(g, alpha=1 - d)
                st["grad_sq"].mul_(d).addcmul_(g, g, value=1 - d)
                grad_var.append((st["grad_sq"] - st["grad_mean"].pow(2)).clamp_min_(0))
        sghmc_(params, grads, noise, [self.state[p]["momentum"] for p in params], lr=lr,
               friction=group["friction"], temperature=t, num_data=self.num_data, grad_var=grad_var)
