"""The training loop every stage shares, and the resumable-epochs helper that checkpoints it."""
from __future__ import annotations

import math
import random
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint


def derive_seed(seed: int, *keys) -> int:
    """An independent 63-bit seed for (experiment seed, stage, index, purpose), by hashing with
    NumPy's ``SeedSequence`` (fixed offsets such as ``seed * 1000 + k`` collide for large counts)."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def shuffle_generators(loader) -> list[torch.Generator]:
    """The generators a DataLoader shuffles with (its own, its sampler's, its batch sampler's
    sampler's), each once; empty for a plain iterable of batches."""
    found = {}
    for holder in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(holder, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


def seed_epoch(loader, seed: int) -> None:
    """Seed everything an epoch over ``loader`` draws from: the global RNG (a shuffling DataLoader
    without a generator draws its order from it, and dropout its masks) and the loader's own
    shuffling generators, and Python's and NumPy's global generators (transforms in the main
    process). Seeding each epoch from (run seed, unit, epoch) makes a resumed run draw the same
    batches as an uninterrupted one, wherever it was stopped. Workers of a DataLoader with
    ``persistent_workers=True`` are seeded once, when they start, so they are not replayed."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    for g in shuffle_generators(loader):
        g.manual_seed(seed)


class DivergenceError(FloatingPointError):
    """The loss became NaN or infinite."""


def minibatches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled pass over in-memory (x, y); the last partial batch is kept."""
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], y[idx]


def cross_entropy_loss(model: nn.Module, batch, state=None):
    x, y = batch
    return F.cross_entropy(model(x), y), None


class LossWatch:
    """The loss of every minibatch of an epoch, summed and checked for divergence.

    ``check_every`` minibatches between reads of the loss (a host sync). Default 1 on CPU, where
    the read is free and the error comes at the first bad minibatch, before its step, so the
    parameters are still the last finite ones; 100 on a GPU, where the losses are summed on the
    device so a step queues its kernels without waiting, and a divergence is reported up to 100
    minibatches late, always by :meth:`mean`, i.e. before the epoch returns (so a run never
    checkpoints a diverged epoch)."""

    def __init__(self, where: str, check_every: Optional[int] = None):
        self.where, self.check_every = where, check_every
        self.count, self.checked, self.total = 0, 0, None

    def add(self, loss: Tensor) -> None:
        """Call with each minibatch's (mean) loss, before its backward pass and step."""
        if self.check_every is None:
            self.check_every = 1 if loss.device.type == "cpu" else 100
        if self.check_every == 1:
            value = loss.item()
            if not math.isfinite(value):
                self._diverged(f"the loss became {value} at minibatch {self.count}")
            self.total = value if self.total is None else self.total + value
        else:
            value = loss.detach().float()
            self.total = value if self.total is None else self.total + value
        self.count += 1
        if self.check_every > 1 and self.count - self.checked >= self.check_every:
            self._read()

    def _read(self) -> None:
        first, self.checked = self.checked, self.count
        value = self.total.item()
        if not math.isfinite(value):
            self._diverged(f"the loss became non-finite at one of minibatches {first}..{self.count - 1} "
                           f"(read every {self.check_every})")

    def _diverged(self, what: str):
        raise DivergenceError(
            f"{self.where}: {what}; the chain diverged. Lower the learning rate (or the temperature / "
            "prior strength) and rerun with --resume: finished stages and collected samples are kept")

    def mean(self) -> float:
        """The mean loss over the minibatches so far (0 for none), after a last check."""
        if self.total is None:
            return 0.0
        if self.check_every > 1 and self.count > self.checked:
            self._read()
        return float(self.total) / self.count


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, *, where: str = "",
                loss_fn: Callable = cross_entropy_loss, max_grad_norm: Optional[float] = None,
                check_every: Optional[int] = None) -> float:
    """One pass of ``loss, state = loss_fn(model, batch, state); backward; step``; the state (an
    LSTM's hidden state) flows from batch to batch. Returns the mean loss over batches.

    ``max_grad_norm`` clips the gradient norm before the step (for torch optimizers; samplers
    clip themselves). Raises :class:`DivergenceError` naming ``where`` at a non-finite loss: at
    the bad minibatch on CPU, within ``check_every`` minibatches on a GPU (:class:`LossWatch`).
    """
    model.train()
    watch, state = LossWatch(where, check_every), None
    for batch in batches:
        loss, state = loss_fn(model, batch, state)
        watch.add(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return watch.mean()


class Constrained:
    """A torch optimizer whose step adds a prior's gradient (a regulariser on the *mean* loss, so
    ``num_data = 1``: the step sees ``grad loss + grad R``) and keeps pruned entries at exactly zero
    afterwards (also against momentum and weight decay). ``masks`` is a :class:`Holder` so that a
    pruning schedule may change it between steps; ``None`` or empty: nothing pruned.

    Same interface as the wrapped optimizer for the training loop and checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], prior=None,
                 masks: Optional["Holder"] = None):
        self.optimizer, self.params, self.prior, self.masks = optimizer, dict(params), prior, masks

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        if self.prior is not None:
            grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
            self.prior.add_grad_(grads, {n: p.detach() for n, p in self.params.items()}, 1)
        self.optimizer.step()
        for name, keep in (self.masks.value or {}).items() if self.masks is not None else ():
            self.params[name].mul_(keep)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: Mapping) -> None:
        self.optimizer.load_state_dict(sd)


class GeneratorState:
    """A ``torch.Generator`` with ``state_dict`` / ``load_state_dict`` (for checkpoints)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, sd: Mapping) -> None:
        self.generator.set_state(sd["state"])


class Holder:
    """A plain value (e.g. the current masks) with ``state_dict`` / ``load_state_dict``."""

    def __init__(self, value: Any = None):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, sd: Mapping) -> None:
        self.value = sd["value"]


def run_epochs(ckpt: Path, epochs: int, state: Mapping[str, Any], epoch_fn: Callable[[int], float], *,
               after_epoch: Optional[Callable[[int], None]] = None, bar=None, log: Callable[[str], None] = print,
               label: str = "", save: bool = True) -> float:
    """Run ``epoch_fn(epoch)`` for epochs ``start .. epochs - 1``, checkpointing ``state`` (objects
    with ``state_dict``/``load_state_dict``: model, optimizer or sampler, schedulers, generators)
    atomically to ``ckpt`` after each epoch, and resuming from it if it exists. ``after_epoch(done)``
    runs before the checkpoint (e.g. to save a sample), so a crash between the two redoes that
    epoch rather than skipping its sample. Returns the training seconds of all epochs, resumed
    ones included. The checkpoint is left in place; the caller deletes it once its result is saved.
    ``save=False`` reads a checkpoint but writes none (a rank that is not its group's writer).
    """
    start, elapsed = 0, 0.0
    if ckpt.exists():
        blob = checkpoint.load(ckpt, fix="delete it and run again with --resume: this member restarts from its "
                               "first epoch, finished members are kept")
        for key, obj in state.items():
            obj.load_state_dict(blob["state"][key])
        start, elapsed = blob["epoch"], blob["elapsed"]
        log(f"{label}: resuming after epoch {start}")
    if bar is not None:
        bar.update(start)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        loss = epoch_fn(epoch)
        elapsed += time.perf_counter() - t0
        if after_epoch is not None:
            after_epoch(epoch + 1)
        if save:
            states = {k: (checkpoint.cpu_state(o) if isinstance(o, nn.Module) else o.state_dict()) for k, o in state.items()}
            checkpoint.atomic_save({"epoch": epoch + 1, "elapsed": elapsed, "state": states}, ckpt)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        if bar is None or getattr(bar, "disable", False):  # no bar (logs, background runs): one line
            log(f"{label} epoch {epoch + 1}/{epochs}: train loss {loss:.4f}, {time.perf_counter() - t0:.0f} s")
    if bar is not None:
        bar.close()
    return elapsed
