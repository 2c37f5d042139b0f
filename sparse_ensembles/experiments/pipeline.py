"""An experiment = a task + a list of stages over a run directory, then a streamed evaluation.

    config -> task + model kind -> stages (SGD baselines, chains, prune + retrain + shrink)
           -> every row's members streamed through the task's evaluation -> table, plots

Layout of a run directory::

    config.toml                  the config the run was started with (never rewritten)
    config.current.toml          the config of the latest invocation (--resume may change it)
    resumes.json                 each resume: its time and the keys it changed
    sgd/member_000.pt ...        trained baselines (dense)
    sgld/sample_000.pt ...       samples, written when collected; chain_0.pt = resumable chain state
    sgld_gsp/...                 the same for the group-sparse chain
    pruned_96/member_000.pt ...  compacted members, one folder per sparsity
    metrics/<method>.json        per-method metrics, incl. the curves over the number of members
    results.json, *.png          the table and the pictures

Every file is written atomically, and each stage skips what is already on disk, so ``--resume``
after an interruption (or a divergence fixed by a config change) loses nothing finished.

Several processes may work on one run directory at once (``--resume`` in each, optionally with
``--only`` to choose their stages): a stage is claimed by an exclusive ``flock`` on ``.lock`` in
its folder while it runs (released by the kernel when the holder exits or dies), other processes
skip it, and a stage waits (is skipped) until its inputs are complete. Stages of independent
members (SGD baselines, pruned members: ``claims_members = True``) lock each member instead, so
several processes train one stage's members side by side.

Under ``torchrun`` (``torchrun --standalone --nproc_per_node=P -m sparse_ensembles run CONFIG``)
the ranks share the work by a static assignment instead, wave by wave, and rank 0 evaluates
(:mod:`.ranks`).
"""
from __future__ import annotations

import fnmatch
import time
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint
from .config import Config, ConfigError, changed_keys, to_toml
from .ranks import Ranks, run_waves
from .stages import Context, RunDirError, build_stages, build_task, resolve_device, run_config  # noqa: F401 (re-exported)


def check_model(ctx: Context, where: str = "model") -> None:
    """Cross-section checks, asked of the built model."""
    try:
        model = ctx.new_model(0)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        ctx.task.check_model(model)
    except ValueError as e:
        raise ConfigError(f"model and task do not fit: {e}; change [model]") from None
    grouping = ctx.grouping()
    if grouping and grouping not in getattr(model, "groupings", ()):
        raise ConfigError(f"prior.grouping: {ctx.cfg.kinds['model']} has groupings {list(getattr(model, 'groupings', ()))}, "
                          f"not {grouping!r}")
    sgd = ctx.cfg.sgd
    if (sgd.lasso > 0 or sgd.prune != "none") and sgd.grouping and sgd.grouping not in getattr(model, "groupings", ()):
        raise ConfigError(f"sgd.grouping: {ctx.cfg.kinds['model']} has groupings {list(getattr(model, 'groupings', ()))}, "
                          f"not {sgd.grouping!r}")
    from .config import SSGLConfig
    from .stages import ssgl_names
    if isinstance(ctx.cfg.prior, SSGLConfig):
        ssgl_names(ctx.cfg.prior, model)  # raises ConfigError when the patterns match nothing
    widths = getattr(ctx.cfg.prune, "widths", [])
    if widths:
        sizes = [fam.size for fam in model.unit_groups()]
        if len(widths) != len(sizes) or any(w > n for w, n in zip(widths, sizes)):
            raise ConfigError(f"prune.widths: give one width per unit family of the model, sizes {sizes}, each between "
                              f"1 and that size (e.g. {[max(1, n // 4) for n in sizes]}), or [] for no structured pruning")


class Pipeline:
    def __init__(self, cfg: Config, out: Path, *, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True, overrides: list[str] = (), only: list[str] = ()):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.only = list(only)
        self.ranks = Ranks.from_env(cfg.experiment.barrier_timeout)  # one process unless under torchrun
        self.log = log if self.ranks.size == 1 else (lambda text: log(f"[rank {self.ranks.rank}] {text}"))
        self.device = resolve_device(cfg.experiment.device)
        if self.device.type == "cuda" and self.ranks.size > 1 and cfg.experiment.device == "cuda":
            self.device = torch.device("cuda", self.ranks.local_rank)
        if self.ranks.main:  # the run-level files are rank 0's
            self._prepare_dir(resume, list(overrides))
        self.ranks.barrier()
        if cfg.experiment.threads:
            torch.set_num_threads(cfg.experiment.threads)

    def _prepare_dir(self, resume: bool, overrides: list[str]) -> None:
        original = self.out / "config.toml"
        if self.out.exists() and any(self.out.iterdir()) and not resume:
            raise RunDirError(self.out, "it already holds a run", "pass --resume to continue it, or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        if not original.exists():
            checkpoint.atomic_write_text(original, to_toml(self.cfg))
        else:
            previous = run_config(self.out)
            changed = changed_keys(previous, self.cfg)
            if changed:
                self.log(f"note: --resume with a changed config ({', '.join(changed)}); finished work is kept, "
                         "remaining work uses the new values (recorded in resumes.json)")
            log_file = self.out / "resumes.json"
            history = checkpoint.read_json(log_file, default=[])
            history.append({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": overrides, "changed": changed})
            checkpoint.atomic_write_json(log_file, history)
        checkpoint.atomic_write_text(self.out / "config.current.toml", to_toml(self.cfg))

    def context(self) -> Context:
        task = build_task(self.cfg, self.device)
        return Context(self.cfg, task, self.out, self.device, self.log, self.progress)

    def run(self) -> list[dict]:
        for name, variant in self.cfg.recipes():
            if getattr(variant.sampler, "noise", None) == "gaussian_parallel" and self.device.type != "cpu":
                raise ConfigError(f"{'[variants.' + name + '] ' if name else ''}sampler.noise = 'gaussian_parallel' "
                                  f"draws on the CPU, but this run is on {self.device}: use sampler.noise = "
                                  "'gaussian' (torch's GPU generator is already parallel) or experiment.device = 'cpu'")
        if self.cfg.experiment.block_kernel in ("numba", "numba_parallel") and self.device.type != "cpu":
            raise ConfigError(f"experiment.block_kernel = {self.cfg.experiment.block_kernel!r} runs the compiled CPU "
                              f"kernel, but this run is on {self.device}: use 'auto' (the dense layer on a GPU) "
                              "or 'off'")
        ctx = self.context()
        self.log(f"task: {ctx.task.describe()}; device {self.device}")
        for name, variant in self.cfg.recipes():
            check_model(ctx.with_cfg(variant), f"[variants.{name}] model" if name else "model")
        stages = build_stages(self.cfg)
        if self.only:
            names = [s.name for s in stages]
            for pattern in self.only:
                if not fnmatch.filter(names, pattern):
                    raise ConfigError(f"--only {pattern!r} matches no stage; this config's stages: {names}")
            stages = [s for s in stages if any(fnmatch.fnmatch(s.name, p) for p in self.only)]
        for stage in stages:
            if hasattr(stage, "check"):
                stage.check(self.out)
        if self.ranks.size > 1:
            run_waves(stages, ctx, self.ranks, self.log)
            if not self.ranks.main:
                return []
            from .evaluate import evaluate_run
            return evaluate_run(self.out, self.cfg, ctx.task, log=self.log, only=self.only)
        for stage in stages:
            if stage.done(self.out):
                continue
            if not stage.ready(self.out):
                self.log(f"{stage.name}: its inputs are not complete yet (another process?); skipped")
                continue
            if getattr(stage, "claims_members", False):  # each member locked on its own: processes share it
                stage.run(ctx)
                continue
            with checkpoint.claim(self.out / stage.name / ".lock") as holder:
                if holder is not None:
                    self.log(f"{stage.name}: being run by process {holder}; skipped")
                    continue
                stage.run(ctx)
        from .evaluate import evaluate_run
        # with --only, the other stages' rows come from their last evaluation (metrics/)
        return evaluate_run(self.out, self.cfg, ctx.task, log=self.log, only=self.only)
