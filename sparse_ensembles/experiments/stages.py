"""The recipe's steps. A stage knows one step, where it writes, whether it is done, and which
table rows its files make; the pipeline is a task plus a list of stages.

    SGDBaselines   sgd/member_000.pt ...        independently trained dense models
    Chain          sgld/sample_000.pt ...       SG-MCMC samples (one folder per prior)
    PruneRetrain   pruned_96/member_000.pt ...  pruned, retrained with the mask fixed, shrunk

Every training loop runs through :func:`sparse_ensembles.training.run_epochs` (checkpoint each
epoch, resume bit for bit); every file is written atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint, pruning
from ..data import DataError
from ..distributed import ShardedLoss
from ..models import model_class
from ..priors import BlockLasso, Compiled, Gaussian, GroupLasso, Prior, Sum
from ..priors.spike_slab import SpikeSlabGL
from ..samplers import SGHMC, SGLD, Cyclical
from ..samplers.schedules import MultiStep, Polynomial, StepDecay
from ..samplers.vectorized import VectorizedSGLD
from ..structure import norms
from ..tasks import task_class
from ..training import Constrained, GeneratorState, Holder, LossWatch, derive_seed, run_epochs, train_epoch
from . import plots
from .ranks import Shard
from .config import (Config, ConfigError, GroupLassoConfig, ScheduleConfig, SGHMCConfig, SSEPruneConfig, SSGLConfig,
                     from_dict)


class RunDirError(checkpoint.RunFileError):
    """The output directory cannot be used as asked."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"experiment.device = {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return device


def build_task(cfg: Config, device: torch.device):
    try:
        return task_class(cfg.kinds["task"]).from_config(cfg.task, device)
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise ConfigError(str(e)) from None


def run_config(run_dir: Path) -> Config:
    """The config a run directory was last run with."""
    for name in ("config.current.toml", "config.toml"):
        f = Path(run_dir) / name
        if f.exists():
            try:
                return from_dict(tomllib.loads(f.read_text()))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
                raise RunDirError(f, f"the run's config cannot be read ({e})",
                                  "restore it from the config file the run was started with (same --set values)") from None
    raise RunDirError(run_dir, "it holds no config.toml, so it is not a run directory",
                      "pass the folder that `sparse-ensembles run` wrote (runs/<experiment name> by default)")


@dataclass
class Row:
    """One line of the results table: a method and the member files it averages."""
    method: str
    files: list[Path]
    sparsity: float
    train_seconds: Callable[[list[dict]], float]  # from the members' meta


@dataclass
class Context:
    cfg: Config
    task: object
    out: Path
    device: torch.device
    log: Callable[[str], None] = print
    progress: bool = True
    shard: Optional[Shard] = None  # this rank's place in the group running a data-parallel unit

    def with_cfg(self, cfg: Config) -> "Context":
        """The same task and run directory under a variant's config."""
        return dataclasses.replace(self, cfg=cfg)

    def new_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        kind = model_class(self.cfg.kinds["model"])
        return kind.from_config(self.cfg.model, self.task.dims).to(self.device)

    def bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, mininterval=1.0, dynamic_ncols=True)

    def grouping(self) -> Optional[str]:
        prior = self.cfg.prior
        return (prior.grouping or None) if isinstance(prior, GroupLassoConfig) else None

    def groups(self, model: nn.Module) -> list:
        """The group families of the configured grouping (the model kind's default if none)."""
        return model.groups(self.grouping()) if hasattr(model, "groups") else model.unit_groups()


def _done(folder: Path) -> Optional[dict]:
    return checkpoint.read_json(folder / "done.json")


def member_claim(folder: Path, k: int):
    """The lock of member ``k`` in a stage's ``folder`` (:func:`checkpoint.claim`): ``with`` it, None
    means this process trains the member; a pid, that another process already does."""
    return checkpoint.claim(folder / f".member_{k:03d}.lock")


def _sgd_groups(model: nn.Module, c) -> list:
    """The groups ``sgd.grouping`` names (the model kind's default if "")."""
    try:
        return model.groups(c.grouping or None) if hasattr(model, "groups") else model.unit_groups()
    except ValueError as e:
        raise ConfigError(f"sgd.grouping: {e}") from None


def block_kernel(ctx: Context, model: nn.Module):
    """With ``experiment.block_kernel``: the model's LSTM layers on the block-sparse kernel for one
    epoch (entered after the epoch's masks are set, so the kernel skips the blocks pruned so far)."""
    executor = ctx.cfg.experiment.block_kernel
    if executor == "off":
        return contextlib.nullcontext()
    from ..compact.block_lm import on_block_kernel  # numba is imported only where it is used
    return on_block_kernel(model, executor)


def train_sgd_member(ctx: Context, c, stage: str, k: int, label: str, batches, loss_fn, **meta) -> None:
    """Member ``k`` of ``stage`` trained with the ``[sgd]`` schedule ``c`` (plain or momentum SGD,
    step decay; optionally a group / block Lasso and gradual or random pre-pruning of groups) on
    ``loss_fn`` over ``batches(generator)``, checkpointed every epoch, saved as
    ``<stage>/member_<k>.pt`` with ``meta``; nothing to do if that file exists or another process
    is training it. With pruning or a Lasso, the groups' norms of the first recurrent (or first)
    weight are recorded after every epoch in ``<stage>/group_norms_<k>.json`` (for heatmaps)."""
    folder, seed = ctx.out / stage, ctx.cfg.experiment.seed
    path = folder / f"member_{k:03d}.pt"
    with member_claim(folder, k) as holder:
        if holder is not None or path.exists():
            return
        model = ctx.new_model(derive_seed(seed, stage, k, "init"))
        params = dict(model.named_parameters())
        sparse = c.lasso > 0 or c.prune != "none"
        groups = _sgd_groups(model, c) if sparse else []
        prior = BlockLasso(groups, c.lasso, budget=c.lasso_budget or None) if c.lasso > 0 else None
        masks = Holder({})
        if c.prune == "pre":  # a random mask fixed from the first step
            masks.value = pruning.random_group_masks(params, groups, c.sparsity,
                                                     torch.Generator().manual_seed(derive_seed(seed, stage, k, "prune")))
            pruning.apply_masks(model, masks.value)
        sgd = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        opt = Constrained(sgd, params, prior, masks) if sparse else sgd
        gen = torch.Generator().manual_seed(derive_seed(seed, stage, k, "data"))
        traced = groups[1] if len(groups) > 1 and "hh" in groups[1].name else (groups[0] if groups else None)
        norms_file = folder / f"group_norms_{k:03d}.json"

        def record(done: int) -> None:
            if traced is None:
                return
            grid = norms(traced, params).detach().cpu()
            shape = getattr(traced, "grid", (traced.size,))
            history = checkpoint.read_json(norms_file, default=[])
            history = [h for h in history if h["epoch"] < done] + [
                {"epoch": done, "family": traced.name, "shape": list(shape), "norms": grid.tolist(),
                 "group_sparsity": pruning.group_sparsity(params, groups)}]
            checkpoint.atomic_write_json(norms_file, history)

        def epoch(e):
            for group in sgd.param_groups:  # the config's values, also over a resumed checkpoint's
                group.update(lr=c.lr_at(e), momentum=c.momentum, weight_decay=c.weight_decay)
            if c.prune == "gradual":  # zero and freeze the lowest-norm groups; never revive one
                fraction = c.pruned_fraction(e)
                if fraction > 0:
                    chosen = pruning.group_masks(params, groups, sparsity=fraction)
                    masks.value = pruning.combine(masks.value, chosen)
                    pruning.apply_masks(model, masks.value)
            with block_kernel(ctx, model):
                return train_epoch(model, opt, batches(gen), loss_fn=loss_fn, max_grad_norm=c.max_grad_norm or None,
                                   where=f"{label} epoch {e + 1}")

        if sparse and not norms_file.exists():
            record(0)
        ckpt = path.with_suffix(".ckpt")
        seconds = run_epochs(ckpt, c.epochs, {"model": model, "opt": opt, "gen": GeneratorState(gen), "masks": masks},
                             epoch, after_epoch=record if sparse else None, bar=ctx.bar(c.epochs, label),
                             log=ctx.log, label=label)
        if sparse:
            meta["group_sparsity"] = pruning.group_sparsity(params, groups)
            if traced is not None and getattr(traced, "grid", None):
                plots.block_norm_heatmaps({label: json.loads(norms_file.read_text())}, norms_file.with_suffix(".png"))
        checkpoint.save_member(path, model, train_seconds=seconds, **meta)
        ckpt.unlink(missing_ok=True)
        ctx.log(f"{label}: {seconds:.1f} s")


class SGDBaselines:
    """``sgd.members`` dense models trained with SGD from their own seeds."""

    name = "sgd"
    claims_members = True  # several processes may train its members side by side

    def __init__(self, cfg: Config):
        self.c = cfg.sgd

    def done(self, out: Path) -> bool:
        return all((out / self.name / f"member_{k:03d}.pt").exists() for k in range(self.c.members))

    def ready(self, out: Path) -> bool:
        return True

    def units(self, out: Path) -> list[int]:
        return [k for k in range(self.c.members) if not (out / self.name / f"member_{k:03d}.pt").exists()]

    def run_unit(self, ctx: Context, k: int) -> None:
        train_sgd_member(ctx, self.c, self.name, k, f"SGD member {k + 1}/{self.c.members}",
                         ctx.task.train_batches, ctx.task.loss)

    def finish(self, ctx: Context) -> None:
        pass

    def run(self, ctx: Context) -> None:
        run_stage(self, ctx)

    def rows(self, out: Path) -> list[Row]:
        files = sorted((out / self.name).glob("member_*.pt"))
        each = lambda metas: sum(m.get("train_seconds", float("nan")) for m in metas)
        rows = [Row("SGD", files[:1], 0.0, each)] if files else []
        if len(files) > 1:
            rows.append(Row("SGD", files, 0.0, each))
        return rows


def ssgl_names(cfg: SSGLConfig, model: nn.Module) -> list[str]:
    """The parameters the SSGL prior covers: those matching ``prior.names``, or every prunable
    weight but the first (the authors: every convolution but the first)."""
    params = [n for n, _ in model.named_parameters()]
    if cfg.names:
        names = [n for n in params if any(fnmatch.fnmatch(n, pat) for pat in cfg.names)]
        if not names:
            raise ConfigError(f"prior.names {cfg.names} match no parameter of the model; its parameters: {params[:12]}")
        return names
    prunable = list(model.prunable_weights())
    if len(prunable) < 2:
        raise ConfigError("prior.names = [] means every prunable weight but the first, and this model has only "
                          f"{prunable}; name the parameters in prior.names")
    return prunable[1:]


def _gsp_prior(ctx: Context, model: nn.Module) -> Prior:
    p = ctx.cfg.prior
    return Sum(GroupLasso(ctx.groups(model), p.lam, budget=p.budget or None), Gaussian(p.precision))


def _ssgl_prior(ctx: Context, model: nn.Module) -> Prior:
    c = ctx.cfg.prior
    names = ssgl_names(c, model)
    omega = c.omega if c.omega >= 0 else Polynomial(c.omega_c, c.omega_A, c.omega_alpha)
    ssgl = SpikeSlabGL(names, v0=c.v0, v1=c.v1, a=c.a, b=c.b, nu=c.nu, lam=c.lam, omega=omega, sigma0=c.sigma0,
                       delta0=c.delta0, rho0=c.rho0, per_layer=c.per_layer, scale_by_sigma=c.scale_by_sigma,
                       kappa0=c.kappa0 if c.kappa0 > 0 else None, kappa1=c.kappa1 if c.kappa1 > 0 else None,
                       sa_on=c.sa_on, latent_start=c.latent_start)
    rest = [n for n, _ in model.named_parameters() if n not in set(names)]
    return Sum(ssgl, Gaussian(c.precision, names=rest))


# prior kind -> the chain's prior for a model (the Gaussian-only plain chain is built directly)
PRIOR_BUILDERS = {"gaussian": lambda ctx, model: Gaussian(ctx.cfg.prior.precision),
                  "group_lasso": _gsp_prior, "ssgl": _ssgl_prior}


def make_prior(ctx: Context, model: nn.Module, sparse: bool) -> Prior:
    """The chain's prior: the configured kind's (``sparse``), its gradient compiled with
    ``sampler.compile_prior``; or, for the plain chain, Gaussian(precision) alone, never compiled:
    its gradient is one multi-tensor op already, and compiled it was slower (the compiled call's
    wrapper costs more than it fuses; docs/scaling.md)."""
    if not sparse:
        return Gaussian(ctx.cfg.prior.precision)
    prior = PRIOR_BUILDERS[ctx.cfg.kinds["prior"]](ctx, model)
    return Compiled(prior) if ctx.cfg.sampler.compile_prior else prior


def make_pruning(ctx: Context, model: nn.Module) -> Optional[pruning.SparsitySchedule]:
    """Pruning during sampling (``prune.kind = "schedule"``), over the SSGL prior's parameters or
    every prunable weight."""
    p = ctx.cfg.prune
    if not isinstance(p, ScheduleConfig) or p.target == 0:
        return None
    if p.names:
        names = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, pat) for pat in p.names)]
        if not names:
            raise ConfigError(f"prune.names {p.names} match no parameter of the model")
    elif isinstance(ctx.cfg.prior, SSGLConfig):
        names = ssgl_names(ctx.cfg.prior, model)
    else:
        names = list(model.prunable_weights())
    return pruning.SparsitySchedule(p.target, p.decay, p.every, p.scope, p.persistent, names)


def chain_schedules(ctx: Context):
    """(lr, temperature) of a chain: numbers, or schedules ``step -> value`` (samplers/schedules.py)."""
    c = ctx.cfg.sampler
    steps = ctx.task.steps_per_epoch()
    if c.schedule == "step":
        epochs = [m * c.epochs_per_chain if c.milestone_unit == "fraction" else m for m in c.lr_milestones]
        lr = MultiStep(c.lr, tuple(int(round(e * steps)) for e in epochs), c.lr_factor)
    else:
        lr = c.lr if c.schedule == "constant" else Cyclical(c.lr, cycle=c.thin * steps, start=c.burn_in * steps)
    temperature = c.temperature if c.anneal == 1 else StepDecay(c.temperature, 1 / c.anneal, steps)
    return lr, temperature


def make_sampler(ctx: Context, model: nn.Module, prior: Prior, seed: int, prune=None):
    c = ctx.cfg.sampler
    lr, temperature = chain_schedules(ctx)
    generator = torch.Generator(ctx.device).manual_seed(seed)
    common = dict(num_data=c.num_data or ctx.task.num_train, temperature=temperature, prior=prior, generator=generator,
                  prefetch_noise=c.prefetch_noise, noise=c.noise, pruning=prune,
                  overlap_prior_update=c.prefetch_noise and ctx.device.type == "cpu")  # SA latents in a worker
    if c.max_grad_norm:
        common["max_grad_norm"] = c.max_grad_norm
    if isinstance(c, SGHMCConfig):
        return SGHMC(model.named_parameters(), lr, friction=c.friction, **common)
    return SGLD(model.named_parameters(), lr, **common)


class Chain:
    """``sampler.chains`` independent chains sharing ``sampler.samples``; chain ``c`` writes its
    ``j``-th sample after epoch burn_in + thin * (j + 1) as ``sample_{c * per_chain + j}``."""

    def __init__(self, cfg: Config, sparse: bool, variant: str = ""):
        kind, tag = cfg.kinds["sampler"], cfg.prior.tag if sparse else ""
        self.cfg, self.sparse = cfg, sparse
        self.name = kind + (f"_{tag}" if tag else "") + (f"_{variant}" if variant else "")
        self.variant = variant
        self.label = kind.upper() + (f"+{tag.upper()}" if tag else "") + (f"({variant})" if variant else "")
        self.c = cfg.sampler
        self.data_parallel = cfg.sampler.data_parallel  # ranks per chain (experiments/ranks.py)
        # pruning during sampling (prune.kind = "schedule") makes the samples sparse themselves
        self.sparsity = cfg.prune.target if sparse and isinstance(cfg.prune, ScheduleConfig) else 0.0

    member_glob = "sample_*.pt"  # what PruneRetrain prunes

    def objective(self, ctx: Context):
        """(batches(generator), loss_fn) for retraining what this stage wrote: the task's own."""
        return ctx.task.train_batches, ctx.task.loss

    def row_label(self, out: Path) -> str:
        return self.label

    def ready(self, out: Path) -> bool:
        """A chain that starts from the first SGD baseline waits for it."""
        return not self.c.init_from or (out / "sgd" / "member_000.pt").exists()

    def done(self, out: Path) -> bool:
        return _done(out / self.name) is not None

    def units(self, out: Path) -> list[int]:
        if self.done(out):
            return []
        pending = self._pending(out)
        return pending[:1] if self.c.vectorize else pending  # vectorised: one unit runs every pending chain

    def _pending(self, out: Path) -> list[int]:
        return [c for c in range(self.c.chains) if not (out / self.name / f"chain_{c}.done").exists()]

    def check(self, out: Path) -> None:
        """What ``sampler.compile_prior`` and ``sampler.vectorize`` cannot do, refused before any work starts."""
        c = self.c
        if c.compile_prior and self.sparse and isinstance(self.cfg.prior, SSGLConfig):
            raise ConfigError("sampler.compile_prior = true with prior.kind = 'ssgl': the spike-and-slab prior adapts "
                              "its state every step, which is not compiled; set sampler.compile_prior = false")
        if not c.vectorize:
            return
        why = [("sampler.kind", not isinstance(c, SGHMCConfig), "vectorised chains are SGLD chains; use kind = 'sgld'"),
               ("prune.kind", not (self.sparse and isinstance(self.cfg.prune, ScheduleConfig)),
                "pruning during sampling keeps masks per chain; use the SSE pruning after sampling"),
               ("prior.kind", not (self.sparse and isinstance(self.cfg.prior, SSGLConfig)),
                "the spike-and-slab prior keeps latent state per chain"),
               ("sampler.max_grad_norm", not c.max_grad_norm, "gradient clipping is not vectorised; set it to 0"),
               ("sampler.noise", c.noise == "gaussian", "only Gaussian noise is vectorised"),
               ("sampler.data_parallel", c.data_parallel == 1, "a vectorised unit runs in one process; set it to 1")]
        for key, ok, reason in why:
            if not ok:
                raise ConfigError(f"sampler.vectorize = true with this {key}: {reason}, or set sampler.vectorize = false")

    def run_unit(self, ctx: Context, chain: int) -> None:
        per_chain = self.c.samples // self.c.chains
        if self.c.vectorize:
            self._vectorized_chains(ctx.with_cfg(self.cfg), self._pending(ctx.out), per_chain)
            return
        self._one_chain(ctx.with_cfg(self.cfg), chain, chain * per_chain, per_chain)

    def finish(self, ctx: Context) -> None:
        """``done.json`` once every chain has finished (each left its ``chain_<c>.done``)."""
        c, folder = self.c, ctx.out / self.name
        markers = [folder / f"chain_{chain}.done" for chain in range(c.chains)]
        if self.done(ctx.out) or not all(m.exists() for m in markers):
            return
        seconds = sum(checkpoint.read_json(m)["train_seconds"] for m in markers)
        checkpoint.atomic_write_json(folder / "done.json", {"train_seconds": seconds, "chains": c.chains,
                                                            "epochs_per_chain": c.epochs_per_chain})
        ctx.log(f"{self.name}: {c.samples} samples from {c.chains} chain(s) in {seconds:.1f} s")

    def run(self, ctx: Context) -> None:
        run_stage(self, ctx)

    def _one_chain(self, ctx: Context, chain: int, first: int, samples: int) -> float:
        c, folder, seed = self.c, ctx.out / self.name, ctx.cfg.experiment.seed
        marker = folder / f"chain_{chain}.done"
        if marker.exists():
            return checkpoint.read_json(marker)["train_seconds"]
        model = self._start(ctx, chain)
        prune = make_pruning(ctx, model) if self.sparse else None  # the plain chain is never pruned
        sampler = make_sampler(ctx, model, make_prior(ctx, model, self.sparse), derive_seed(seed, self.name, chain, "noise"),
                               prune)
        gen = torch.Generator().manual_seed(derive_seed(seed, self.name, chain, "data"))
        epochs = c.burn_in + c.thin * samples
        label = f"{self.name} chain" if c.chains == 1 else f"{self.name} chain {chain + 1}/{c.chains}"
        # data-parallel: every rank of the group reads the same batches (same seed) and keeps its rows;
        # the noise is the same on every rank (the sampler's seed does not depend on the rank)
        loss_fn, writer = ctx.task.loss, ctx.shard is None or ctx.shard.index == 0
        if ctx.shard is not None:
            try:
                loss_fn = ShardedLoss(model, ctx.task.loss, ctx.shard.group)
            except ValueError as e:
                raise ConfigError(f"sampler.data_parallel = {c.data_parallel}: {e}") from None

        def epoch(e):
            return train_epoch(model, sampler, ctx.task.train_batches(gen), loss_fn=loss_fn,
                               where=f"{label} epoch {e + 1}")

        ssgl = next((p for p in getattr(sampler.prior, "priors", ()) if isinstance(p, SpikeSlabGL)), None)
        trace_file = folder / f"trace_{chain}.json"

        def collect(done: int):
            if not writer:  # the group's first rank writes; the others hold the same parameters
                return
            if done > c.burn_in and (done - c.burn_in) % c.thin == 0:
                k = first + (done - c.burn_in) // c.thin - 1
                meta = dict(epoch=done, chain=chain)
                if prune is not None:  # the sparsity reached, over the pruned weights
                    sampler.synchronize()
                    ws = [p_ for n, p_ in model.named_parameters() if n in set(prune.names or [])]
                    meta["sparsity"] = sum(int((w == 0).sum()) for w in ws) / max(sum(w.numel() for w in ws), 1)
                checkpoint.save_member(folder / f"sample_{k:03d}.pt", model, **meta)
            if ssgl is not None:  # the SA latents' trace: sigma, delta, spike fraction, sparsity
                sampler.synchronize()
                params = sampler.named_parameters()
                zeros = sum(int((params[n] == 0).sum()) for n in ssgl.names)
                rec = {"epoch": done, **ssgl.trace(), "sparsity": zeros / max(ssgl.covered, 1)}
                trace = checkpoint.read_json(trace_file, default=[])
                checkpoint.atomic_write_json(trace_file, [t for t in trace if t["epoch"] < done] + [rec])
                ctx.log(f"{label} epoch {done}: " + ", ".join(f"{k_} {v:.4g}" for k_, v in rec.items() if k_ != "epoch"))

        try:
            seconds = run_epochs(folder / f"chain_{chain}.pt", epochs,
                                 {"model": model, "sampler": sampler, "gen": GeneratorState(gen)}, epoch,
                                 after_epoch=collect, bar=ctx.bar(epochs, label), log=ctx.log, label=label,
                                 save=writer)
        finally:
            sampler.close()  # stop the noise worker thread
        if writer:
            checkpoint.atomic_write_json(marker, {"train_seconds": seconds, "epochs": epochs})
        return seconds

    def _start(self, ctx: Context, chain: int) -> nn.Module:
        """Chain ``chain``'s first state: its own random init, or the first SGD baseline."""
        model = ctx.new_model(derive_seed(ctx.cfg.experiment.seed, self.name, chain, "init"))
        if self.c.init_from == "sgd":
            start = ctx.out / "sgd" / "member_000.pt"
            if not start.exists():
                raise ConfigError(f"sampler.init_from = 'sgd' but {start} does not exist; set sgd.members >= 1")
            model.load_state_dict(checkpoint.load_member(start, ctx.device)[0].state_dict())
        return model

    def _vectorized_chains(self, ctx: Context, chains: list[int], per_chain: int) -> None:
        """``chains`` as one batched computation (samplers/vectorized.py): each chain with its own
        init, noise seed, minibatch order and prior, so its samples equal the separate chain's up to
        the order of float sums in the batched products; checkpointed and resumed together."""
        c, folder, seed = self.c, ctx.out / self.name, ctx.cfg.experiment.seed
        output_loss = getattr(ctx.task, "output_loss", None)
        if output_loss is None:
            raise ConfigError(f"sampler.vectorize = true: {type(ctx.task).__name__} tasks are not vectorised "
                              "(classification is); set sampler.vectorize = false")
        models = [self._start(ctx, ch) for ch in chains]
        lr, temperature = chain_schedules(ctx)
        try:
            sampler = VectorizedSGLD(models[0], [derive_seed(seed, self.name, ch, "noise") for ch in chains], lr=lr,
                                     num_data=c.num_data or ctx.task.num_train, temperature=temperature,
                                     prior=make_prior(ctx, models[0], self.sparse),
                                     starts=[dict(m.named_parameters()) for m in models], loss_fn=output_loss)
        except ValueError as e:
            raise ConfigError(f"sampler.vectorize = true: {e}; or set sampler.vectorize = false") from None
        gens = [torch.Generator().manual_seed(derive_seed(seed, self.name, ch, "data")) for ch in chains]
        epochs = c.burn_in + c.thin * per_chain
        label = f"{self.name} chains {', '.join(str(ch + 1) for ch in chains)} (vectorised)"

        def epoch(e):
            watch = LossWatch(f"{label} epoch {e + 1}")  # the chains' mean loss: one of them diverged if not finite
            for batches in zip(*(ctx.task.train_batches(g) for g in gens)):
                losses = sampler.losses(torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
                watch.add(losses.detach().mean())
                losses.sum().backward()
                sampler.step()
            return watch.mean()

        def collect(done: int):
            if done > c.burn_in and (done - c.burn_in) % c.thin == 0:
                j = (done - c.burn_in) // c.thin - 1
                for ch, net in zip(chains, sampler.models()):
                    checkpoint.save_member(folder / f"sample_{ch * per_chain + j:03d}.pt", net, epoch=done, chain=ch)

        state = {"sampler": sampler, **{f"gen_{ch}": GeneratorState(g) for ch, g in zip(chains, gens)}}
        try:
            seconds = run_epochs(folder / f"chains_{'_'.join(map(str, chains))}.pt", epochs, state, epoch,
                                 after_epoch=collect, bar=ctx.bar(epochs, label), log=ctx.log, label=label)
        finally:
            sampler.close()  # stop the noise threads
        for ch in chains:  # the shared time, split evenly (finish() sums the markers)
            checkpoint.atomic_write_json(folder / f"chain_{ch}.done", {"train_seconds": seconds / len(chains),
                                                                       "epochs": epochs, "vectorized_with": chains})

    def rows(self, out: Path) -> list[Row]:
        files = sorted((out / self.name).glob("sample_*.pt"))
        info = _done(out / self.name)
        seconds = (lambda metas: info["train_seconds"]) if info else (lambda metas: float("nan"))
        return [Row(self.label, files, self.sparsity, seconds)] if files else []


def pct(s: float) -> str:
    return f"{100 * s:g}"


class PruneRetrain:
    """SSE pruning of every member ``source`` wrote (a chain's samples, distilled students) to
    ``sparsity``, masked retraining on the source's objective, shrinking."""

    claims_members = True  # several processes may retrain its members side by side

    def __init__(self, cfg: Config, source, sparsity: float, variant: str = ""):
        self.cfg, self.source, self.sparsity = cfg, source, sparsity
        self.name = f"pruned_{pct(sparsity)}" + (f"_{variant}" if variant else "")
        self.variant = variant
        self.p, self.c = cfg.prune, cfg.retrain

    def ready(self, out: Path) -> bool:
        """Only after the source has written all its members."""
        return self.source.done(out)

    def _samples(self, out: Path) -> list[Path]:
        return sorted((out / self.source.name).glob(self.source.member_glob))

    def done(self, out: Path) -> bool:
        n = len(self._samples(out))
        return n > 0 and all((out / self.name / f"member_{k:03d}.pt").exists() for k in range(n))

    def masks(self, ctx: Context, model: nn.Module, sparsity: float, masks=None, widths=None) -> dict:
        if self.p.structure == "blocks":  # the lowest-norm blocks, per matrix or over all (prune.block_scope)
            params = dict(model.named_parameters())
            scope = "family" if self.p.block_scope == "matrix" else "global"
            chosen = pruning.group_masks(params, model.groups("block"), sparsity=sparsity, scope=scope) \
                if sparsity > 0 else {}
            return pruning.combine(masks or {}, chosen)
        return pruning.sse_masks(dict(model.named_parameters()), ctx.groups(model), model.unit_groups(),
                                 list(model.prunable_weights()), sparsity,
                                 scope=self.p.scope, group_threshold=self.p.group_threshold, widths=widths,
                                 masks=masks)

    def units(self, out: Path) -> list[int]:
        return [k for k in range(len(self._samples(out))) if not (out / self.name / f"member_{k:03d}.pt").exists()]

    def run_unit(self, ctx: Context, k: int) -> None:
        ctx = ctx.with_cfg(self.cfg)
        folder, samples = ctx.out / self.name, self._samples(ctx.out)
        batches, loss_fn = self.source.objective(ctx)
        with member_claim(folder, k) as holder:
            if holder is None and not (folder / f"member_{k:03d}.pt").exists():
                self._retrain(ctx, k, samples[k], len(samples), batches, loss_fn)

    def finish(self, ctx: Context) -> None:
        folder, samples = ctx.out / self.name, self._samples(ctx.out)
        ctx.log(f"pruned to {pct(self.sparsity)}%: {sum(1 for _ in folder.glob('member_*.pt'))} of "
                f"{len(samples)} members retrained")

    def run(self, ctx: Context) -> None:
        run_stage(self, ctx)

    def _retrain(self, ctx: Context, k: int, sample: Path, count: int, batches, loss_fn) -> None:
        """Member ``k``: prune ``sample``, retrain it under its masks, shrink it, save it."""
        c, p, seed, folder = self.c, self.p, ctx.cfg.experiment.seed, ctx.out / self.name
        path = folder / f"member_{k:03d}.pt"
        model, _ = checkpoint.load_member(sample, ctx.device)
        masks = self.masks(ctx, model, 0.0)  # group pruning only: its sparsity and widths start the ramp
        pruning.apply_masks(model, masks)
        start = min(pruning.sparsity_of({n: masks[n] for n in model.prunable_weights() if n in masks}), self.sparsity)
        live = [int(k_.sum()) for k_ in model.live_units()]
        if p.widths and len(p.widths) != len(live):
            raise ValueError(f"prune.widths gives {len(p.widths)} widths but the model has {len(live)} unit "
                             f"families (live sizes {live}); give one width per family")
        opt = torch.optim.SGD(model.parameters(), lr=c.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.0 / c.lr_decay)
        gen = torch.Generator().manual_seed(derive_seed(seed, self.name, k, "data"))
        current, hooks = Holder(masks), []
        label = f"retrain {pct(self.sparsity)}% member {k + 1}/{count}"

        def set_masks(epoch):
            nonlocal hooks
            if epoch <= c.ramp_epochs:  # one-shot (ramp 0): the target at epoch 0, then fixed
                widths = pruning.cubic_widths(epoch, live, p.widths, c.ramp_epochs) if p.widths else None
                s = pruning.cubic_sparsity(epoch, start, self.sparsity, c.ramp_epochs)
                current.value = self.masks(ctx, model, s, current.value, widths)
            pruning.apply_masks(model, current.value)
            for h in hooks:
                h.remove()
            hooks = pruning.keep_pruned_at_zero(model, current.value)

        def epoch(e):
            set_masks(e)
            with block_kernel(ctx, model):
                loss = train_epoch(model, opt, batches(gen), loss_fn=loss_fn,
                                   max_grad_norm=c.max_grad_norm or None, where=f"{label} epoch {e + 1}")
            sched.step()
            return loss

        ckpt = folder / f"member_{k:03d}.ckpt"
        seconds = run_epochs(ckpt, c.epochs, {"model": model, "opt": opt, "sched": sched,
                                              "gen": GeneratorState(gen), "masks": current},
                             epoch, bar=ctx.bar(c.epochs, label), log=ctx.log, label=label)
        set_masks(c.epochs)  # retrain.epochs = 0: prune without retraining; else a no-op re-apply
        for h in hooks:
            h.remove()
        model.eval()
        small = model.shrink(model.live_units()).to(ctx.device).eval()
        gap = (ctx.task.probe(small) - ctx.task.probe(model)).abs().max().item()
        if gap > 1e-4:
            raise RuntimeError(f"compaction changed member {k}'s outputs by {gap:g}; this is a bug, please report it")
        prunable = {n: current.value[n] for n in model.prunable_weights() if n in current.value}
        extra = {"block_sparsity": pruning.group_sparsity(dict(model.named_parameters()), model.groups("block"))} \
            if self.p.structure == "blocks" else {}
        checkpoint.save_member(path, small, train_seconds=seconds, sparsity=pruning.sparsity_of(prunable), **extra)
        ckpt.unlink(missing_ok=True)

    def rows(self, out: Path) -> list[Row]:
        files = sorted((out / self.name).glob("member_*.pt"))
        info = _done(out / self.source.name)
        chain = info["train_seconds"] if info else float("nan")
        seconds = lambda metas: chain + sum(m.get("train_seconds", 0.0) for m in metas)
        return [Row(f"{self.source.row_label(out)}+PR {pct(self.sparsity)}%", files, self.sparsity, seconds)] if files else []


class Distill:
    """``distill.students`` students (the configured model) trained with the ``[sgd]`` schedule on
    the Geras (or tempered Hinton) loss against a cached, truncated teacher (see :class:`~.config.DistillConfig`)."""

    name = "distill"
    member_glob = "member_*.pt"

    def __init__(self, cfg: Config):
        self.cfg, self.d, self.c = cfg, cfg.distill, cfg.sgd
        teacher = self.d.teacher
        self.self_teacher = teacher == "self"
        self.teacher_run, self.row = None, None
        if not self.self_teacher:  # RUN_DIR or RUN_DIR:ROW
            run, row = (teacher, "") if Path(teacher).exists() or ":" not in teacher else teacher.rsplit(":", 1)
            self.teacher_run, self.row = Path(run), row or None

    def check(self, out: Path) -> None:
        """Fail before any training if the teacher cannot be found."""
        if not self.self_teacher:
            self._teacher(out)

    def _teacher(self, out: Path) -> tuple[str, list[Path]]:
        if self.self_teacher:
            return "self", [out / "sgd" / "member_000.pt"]
        if not (self.teacher_run / "config.toml").exists() and not (self.teacher_run / "config.current.toml").exists():
            raise ConfigError(f"distill.teacher: {self.teacher_run} is not a run directory (no config.toml); give "
                              "RUN_DIR or RUN_DIR:ROW of a finished run, or \"self\"")
        try:
            name, files = member_files(self.teacher_run, self.row)
        except ValueError as e:
            raise ConfigError(f"distill.teacher: {e}") from None
        table = self.teacher_run / "results.json"
        finished = {r["method"]: r["members"] for r in checkpoint.read_json(table, default=[])}
        if finished.get(name) != len(files):
            raise ConfigError(f"distill.teacher: row {name!r} of {self.teacher_run} is not finished ({len(files)} member "
                              f"files, results.json lists {finished.get(name, 'no such row')}); finish the teacher run "
                              "first (sparse-ensembles run ... --resume)")
        return name, files

    def ready(self, out: Path) -> bool:
        return not self.self_teacher or (out / "sgd" / "member_000.pt").exists()

    def done(self, out: Path) -> bool:
        return all((out / self.name / f"member_{k:03d}.pt").exists() for k in range(self.d.students))

    def units(self, out: Path) -> list[int]:
        return [] if self.done(out) else [0]  # one unit: the students share the teacher cache it builds

    def run_unit(self, ctx: Context, k: int) -> None:
        self.run(ctx)

    def finish(self, ctx: Context) -> None:
        pass

    def run(self, ctx: Context) -> None:
        from .. import distill
        c, d, folder = self.c, self.d, ctx.out / self.name
        row, files = self._teacher(ctx.out)
        cache_file, info_file = folder / "teacher_cache.pt", folder / "teacher.json"
        wanted = {"teacher": d.teacher, "row": row, "members": len(files), "mass": d.mass, "max_k": d.max_k}
        if cache_file.exists():
            info = checkpoint.read_json(info_file, default={})
            stale = {k: (info.get(k), v) for k, v in wanted.items() if info.get(k) != v}
            if stale:
                raise ConfigError(f"{cache_file} was made for another teacher or truncation ({stale}: cached, "
                                  f"now); delete {folder} or use another --out")
            cache = distill.TeacherCache.load(cache_file)
        else:
            ctx.log(f"distill: caching the teacher ({row}, {len(files)} member(s)) over the training set")
            inputs = ctx.task.distill_inputs()
            # the dense (rows, classes) buffer of the running mixture stays under ~256 MB: a chunk of
            # batches at a time (every member is reloaded per chunk) for a 10k-word vocabulary
            classes = ctx.task.dims.get("classes") or ctx.task.dims.get("vocab")
            rows = inputs[0].numel() if isinstance(inputs, list) else min(len(inputs), 1000)
            chunk = max(1, (256 << 20) // (4 * rows * classes))
            cache = distill.TeacherCache.from_members(files, inputs, mass=d.mass, max_k=d.max_k or None,
                                                      device=ctx.device, chunk_batches=chunk)
            cache.save(cache_file)
            checkpoint.atomic_write_json(info_file, {**wanted, "rows": len(cache), "cache_bytes": cache.nbytes,
                                                     "mean_kept": float(cache.counts.float().mean())})
        loss_fn = self._loss(ctx, cache)
        for k in range(d.students):
            train_sgd_member(ctx, c, self.name, k, f"distilled student {k + 1}/{d.students}", ctx.task.distill_batches,
                             loss_fn, teacher=d.teacher, teacher_row=row, lam=d.lam, tau=d.tau)
        seconds = sum(checkpoint.load(folder / f"member_{k:03d}.pt").get("meta", {}).get("train_seconds", 0.0)
                      for k in range(d.students))
        checkpoint.atomic_write_json(folder / "done.json", {"train_seconds": seconds})

    def _loss(self, ctx: Context, cache):
        """The Geras (or tempered Hinton) loss against the cached teacher rows of each batch."""
        from .. import distill
        by_batch = not hasattr(ctx.task, "data")  # language models: the cache is indexed by segment

        def loss_fn(model, batch, state):
            x, y, rows = batch
            logits, state = ctx.task.logits(model, x, state)
            idx, probs = cache.lookup_batch(rows) if by_batch else cache.lookup(rows)
            teacher = (idx.to(logits.device), probs.to(logits.device))
            return distill.hinton_cached_loss(logits, y, teacher, self.d.lam, self.d.tau), state
        return loss_fn

    def objective(self, ctx: Context):
        """Sparse students retrain on the distillation loss too."""
        from ..distill import TeacherCache
        return ctx.task.distill_batches, self._loss(ctx, TeacherCache.load(ctx.out / self.name / "teacher_cache.pt"))

    def row_label(self, out: Path) -> str:
        info = out / self.name / "teacher.json"
        row = checkpoint.read_json(info, default={}).get("row", "?")
        how = f"lam {self.d.lam:g}" + (f", tau {self.d.tau:g}" if self.d.tau != 1.0 else "")
        return f"KD({row}, {how})" if row != "self" else f"self-distilled ({how})"

    def rows(self, out: Path) -> list[Row]:
        files = sorted((out / self.name).glob("member_*.pt"))
        each = lambda metas: sum(m.get("train_seconds", float("nan")) for m in metas)
        label = self.row_label(out)
        # "+PR" in a teacher's name would drop the member count from the label; keep it explicit
        return [Row(label + f" x{len(files)}" if "+PR" in label else label, files, 0.0, each)] if files else []


def run_stage(stage, ctx: Context) -> None:
    """A stage in one process: each of its pending units (members, chains), then its finish.

    Every stage has ``units(out)`` (the indices of work still to do, each independent of the
    others and seeded by the stage name and index alone), ``run_unit(ctx, k)`` and ``finish(ctx)``
    (what needs every unit done: ``done.json``, a log line); ``experiments.ranks`` deals the units
    of several stages over the ranks of a ``torchrun`` job instead."""
    for k in stage.units(ctx.out):
        stage.run_unit(ctx, k)
    stage.finish(ctx)


def build_stages(cfg: Config) -> list:
    """The SSE recipe from the config: SGD baselines, the plain chain, and for the base config or
    each variant the sparse chain and prune + retrain of its samples at each sparsity."""
    stages: list = []
    if cfg.sgd.members:
        stages.append(SGDBaselines(cfg))
    recipes = [(name, v) for name, v in cfg.recipes() if v.sampler.samples]
    sparse = {name: bool(v.prior.tag) for name, v in recipes}  # a sparsity-inducing prior
    if cfg.sampler.samples and cfg.sampler.plain_chain and any(sparse.values()):
        stages.append(Chain(cfg, sparse=False))
    for name, v in recipes:
        main = Chain(v, sparse=True, variant=name)  # the configured prior (and pruning schedule, if any)
        stages.append(main)
        if isinstance(v.prune, SSEPruneConfig):
            stages += [PruneRetrain(v, main, s, variant=name) for s in v.prune.sparsities]
    if cfg.distill.teacher:
        student = Distill(cfg)
        stages.append(student)
        stages += [PruneRetrain(cfg, student, s, variant="distill") for s in cfg.distill.sparsities]
    return stages


def row_name(row) -> str:
    """A run row's name as in ``results.json`` (``evaluate.py``): "SGLD+GSP+PR 90%", "SGD x1"."""
    return row.method if "+PR" in row.method else f"{row.method} x{len(row.files)}"


def run_rows(run_dir) -> dict[str, list[Path]]:
    """``{row name: member files}`` of a run directory, in table order."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    rows: dict[str, list[Path]] = {}
    for stage in build_stages(cfg):
        for row in stage.rows(run_dir):
            rows.setdefault(row_name(row), list(row.files))
    return rows


def member_files(run_dir, row: Optional[str] = None) -> tuple[str, list[Path]]:
    """(name, files) of the row called ``row`` (default: the last row of the table)."""
    rows = run_rows(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no finished rows (no member files yet)")
    if row is None:
        row = list(rows)[-1]
    if row not in rows:
        raise ValueError(f"row {row!r} not found in {run_dir}; available rows: {list(rows)}")
    return row, rows[row]
