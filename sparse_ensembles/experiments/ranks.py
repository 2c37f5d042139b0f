"""Running one config over the ranks of a ``torchrun`` job (one machine or many).

    torchrun --standalone --nproc_per_node=P -m sparse_ensembles run CONFIG

The independent work of the pipeline (each SGD member, each chain, each pruned member, the
students) is dealt out statically: the stages whose inputs are complete form a *wave*; the pending
units of the wave are listed in stage order, and unit ``i`` goes to rank ``i mod P``. Every unit is
seeded by its stage name and index alone (``stages.derive_seed``), so what a unit computes does not
depend on P or on which rank runs it: a P-rank run equals the 1-process run (bit for bit on CPU at
the same thread count). After the wave, rank 0 finishes its stages (``done.json``), then the next
wave starts; rank 0 alone writes the run-level files and evaluates. Ranks meet at barriers (gloo,
also on GPU machines: only barriers cross processes) whose timeout is ``experiment.barrier_timeout``
seconds, long enough for the slowest unit of a wave. Units are found from the files of the run
directory, so ``--resume`` works with any P, and a killed rank loses only its unfinished units.

A stage may ask for several ranks per unit (``data_parallel = K``: one chain trained over K ranks,
``sparse_ensembles.distributed``): its units go to groups of K consecutive ranks, unit ``j`` to group
``j mod (P // K)``, before the one-rank units are dealt round-robin; each rank runs its group units
first, in list order, so that the ranks of a group meet in their collectives in the same order. With
fewer than K ranks the group is all of them (one process: the chain runs alone, the same chain up to
the order of float sums).
"""
from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional

import torch.distributed as dist


@dataclass
class Shard:
    """This rank's place in the group of ranks that runs one unit together."""
    group: object  # a torch.distributed process group
    index: int
    size: int


@dataclass
class Ranks:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    _groups: dict = field(default_factory=dict, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float) -> "Ranks":
        """The ranks of this job: ``torchrun`` sets WORLD_SIZE, RANK and LOCAL_RANK (and the
        rendezvous); without them a single process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Leave the job. The barrier first: without it some ranks abort at exit (measured: 3 of 11
        two-rank runs on gloo)."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def mine(self, i: int) -> bool:
        return i % self.size == self.rank

    def width(self, stage) -> int:
        """How many ranks run each unit of ``stage`` (its ``data_parallel``, at most the job's size)."""
        return max(1, min(int(getattr(stage, "data_parallel", 1)), self.size))

    def shard(self, width: int, i: int, backend: str = "gloo") -> Optional[Shard]:
        """This rank's :class:`Shard` of group unit ``i`` at ``width`` ranks per unit, or None when
        another group runs it. Every rank must call this for the same (width, backend) first: the
        groups are created collectively, once."""
        key = (width, backend)
        if key not in self._groups:  # dist.new_group is collective: every rank creates every group
            self._groups[key] = [dist.new_group(list(range(g * width, (g + 1) * width)), backend=backend)
                                 for g in range(self.size // width)]
        groups = self._groups[key]
        g = i % len(groups)
        if not g * width <= self.rank < (g + 1) * width:
            return None
        return Shard(groups[g], self.rank - g * width, width)


def run_waves(stages: list, ctx, ranks: Ranks, log: Callable[[str], None]) -> None:
    """Run ``stages`` over ``ranks`` wave by wave (see the module docstring)."""
    out = ctx.out
    pending = [s for s in stages if not s.done(out)]
    while pending:
        ranks.barrier()  # every rank sees the files of the last wave before listing work
        wave = [s for s in pending if s.ready(out)]
        if not wave:
            names = [s.name for s in pending]
            raise RuntimeError(f"stages {names} wait for inputs that no stage of this run makes")
        work = [(s, k) for s in wave for k in s.units(out)]
        ranks.barrier()  # listed by every rank before any rank adds files
        wide = [(s, k) for s, k in work if ranks.width(s) > 1]
        narrow = [(s, k) for s, k in work if ranks.width(s) == 1]
        backend = "nccl" if getattr(getattr(ctx, "device", None), "type", "") == "cuda" and dist.is_nccl_available() else "gloo"
        shards = [(s, k, ranks.shard(ranks.width(s), i, backend)) for i, (s, k) in enumerate(wide)]
        mine = [(s, k, sh) for s, k, sh in shards if sh is not None]
        mine += [(s, k, None) for i, (s, k) in enumerate(narrow) if ranks.mine(i)]
        if ranks.size > 1:
            log(f"wave of {len(wave)} stage(s), {len(work)} unit(s) over {ranks.size} ranks; mine: "
                + (", ".join(f"{s.name}[{k}]" + (f" (rank {sh.index + 1} of {sh.size})" if sh else "")
                             for s, k, sh in mine) or "none"))
        for s, k, sh in mine:
            s.run_unit(dataclasses.replace(ctx, shard=sh) if sh is not None else ctx, k)
        ranks.barrier()
        if ranks.main:
            for s in wave:
                s.finish(ctx)
        pending = [s for s in pending if s not in wave]
    ranks.barrier()
