"""Typed experiment configuration, read from TOML.

Sections ``[experiment]``, ``[task]``, ``[model]``, ``[sgd]``, ``[sampler]``, ``[prior]``,
``[prune]``, ``[retrain]``, ``[distill]``. Where several implementations exist the section carries a ``kind``
(``task.kind = "language_model"``, ``model.kind = "lstm_lm"``, ``sampler.kind = "sghmc"``), and
each kind is a dataclass of its own with its own checks; the kinds come from their registries
(tasks, model kinds) or from the tables below. Unknown keys and wrong types are errors that name
the key. ``--set section.key=value`` overrides take TOML literals (``--set sampler.lr=0.1``,
``--set prune.sparsities=[0.9]``), and reach into a variant with more dots
(``--set variants.iss_se.prune.widths=[50,50]``).

Variants: ``[variants.<name>]`` tables run the chain -> prune -> retrain part of the recipe once
per variant, each on the base config with the variant's keys changed (dotted, from the sections
model, sampler, prior, prune, retrain)::

    [variants.iss_se]            # ISS groups with shared embeddings
    model.tie_embeddings = true
    prior.grouping = "iss"
    prior.lam = 0.4

The SGD baselines and the plain (Gaussian-prior) chain run once, from the base config.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import MODELS
from ..pruning import cubic_sparsity, linear_sparsity
from ..samplers.sgmcmc import NOISE_KINDS
from ..tasks import TASKS


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what is allowed."""


def need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun, "cuda" is each rank's LOCAL_RANK)
    barrier_timeout: float = 21600.0  # seconds ranks of a torchrun job wait for each other (the longest unit)
    # train and retrain block-pruned lstm_lm layers on the block-sparse kernel (compact.block_lstm):
    # "off", "auto" (times the kernel against the dense layer per shape and keeps the faster) or an
    # executor forced ("numba", "numba_parallel"); CPU float32 (elsewhere "auto" runs the dense layer)
    block_kernel: str = "off"

    def validate(self, need) -> None:
        need(self.barrier_timeout > 0, "experiment.barrier_timeout", "must be > 0 seconds")
        d = self.device
        ok = d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())
        need(ok, "experiment.device", f"use 'auto', 'cpu', 'cuda' or 'cuda:N', not {d!r}")
        need(self.threads >= 0, "experiment.threads", "must be >= 0 (0 = torch's default)")
        need(self.block_kernel in ("off", "auto", "numba", "numba_parallel"), "experiment.block_kernel",
             "use 'off', 'auto' (the faster of the kernel and the dense layer, measured) or 'numba' / 'numba_parallel'")


@dataclass
class SGDConfig:
    """Independently trained SGD baselines (SSE paper: lr 0.5 halved every 10 epochs, 100 epochs).

    The lr of 0-based epoch e is ``lr * lr_decay ** k`` with k = 0 before ``decay_start`` and
    ``(e - decay_start) // decay_every + 1`` from then on; ``decay_start = 0`` means
    ``decay_every`` (a plain step decay). Zaremba et al.'s small LSTM: decay_start 4, every 1."""
    members: int = 18
    epochs: int = 100
    lr: float = 0.5
    lr_decay: float = 0.5  # multiplied in every `decay_every` epochs
    decay_every: int = 10
    decay_start: int = 0  # first epoch with a decayed lr (0 = decay_every)
    momentum: float = 0.0  # heavy-ball momentum (ResNets: 0.9)
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # clip the gradient norm (LSTMs: Zaremba clip 5); 0 = off
    # Regularised and block-sparse SGD (block-sparse LSTM slides, Narang et al. 2017). A Lasso over
    # the model's `grouping` groups added to the mean loss: lasso * sum_g ||W_g||_2 (no sqrt(dim_g)),
    # or with lasso_budget = k > 0 the hinge lasso * max(sum_g ||W_g||_2 - k, 0).
    lasso: float = 0.0  # 0 = off
    lasso_budget: float = 0.0  # 0 = the plain penalty
    grouping: str = ""  # groups of the Lasso and of pruning ("" = the model's default; "block" for blocks)
    # pruning while training: "gradual" zeroes and freezes the lowest-norm groups of each family at
    # the start of each epoch, their fraction rising on `prune_schedule` to `sparsity`; "pre" fixes a
    # random mask of `sparsity` of each family's groups from the first step
    prune: str = "none"  # none | gradual | pre
    sparsity: float = 0.0  # target fraction of groups removed, per family
    prune_schedule: str = "linear"  # linear (the slides' rho_t = a (t - 1) + b) | cubic (Zhu & Gupta)
    prune_start: int = 0  # first epoch (0-based) with a pruned fraction > 0
    prune_ramp: int = 1  # epochs from the first pruned one to the target

    def validate(self, need) -> None:
        need(self.members >= 0, "sgd.members", "must be >= 0")
        need(self.lasso >= 0, "sgd.lasso", "must be >= 0 (0 = off)")
        need(self.lasso_budget >= 0, "sgd.lasso_budget", "must be >= 0 (0 = off)")
        need(self.prune in ("none", "gradual", "pre"), "sgd.prune", "use 'none', 'gradual' or 'pre'")
        need(0 <= self.sparsity < 1, "sgd.sparsity", "the fraction of groups removed, in [0, 1)")
        need(self.prune == "none" or self.sparsity > 0, "sgd.sparsity", f"sgd.prune = {self.prune!r} needs a sparsity > 0")
        need(self.prune_schedule in ("linear", "cubic"), "sgd.prune_schedule", "use 'linear' or 'cubic'")
        need(self.prune_start >= 0, "sgd.prune_start", "must be >= 0")
        need(self.prune_ramp >= 1, "sgd.prune_ramp", "must be >= 1")
        need(self.prune != "gradual" or self.prune_start + self.prune_ramp <= self.epochs, "sgd.prune_ramp",
             f"gradual pruning reaches its target after epoch prune_start + prune_ramp = "
             f"{self.prune_start + self.prune_ramp}, beyond sgd.epochs = {self.epochs}")
        need(self.epochs >= 1, "sgd.epochs", "must be >= 1")
        need(self.decay_every >= 1, "sgd.decay_every", "must be >= 1")
        need(self.lr > 0, "sgd.lr", "must be > 0")
        need(self.lr_decay > 0, "sgd.lr_decay", "must be > 0")
        need(self.decay_start >= 0, "sgd.decay_start", "must be >= 0 (0 = decay_every)")
        need(0 <= self.momentum < 1, "sgd.momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "sgd.weight_decay", "must be >= 0")
        need(self.max_grad_norm >= 0, "sgd.max_grad_norm", "must be >= 0 (0 = no clipping)")

    def pruned_fraction(self, epoch: int) -> float:
        """Fraction of each family's groups pruned during 0-based ``epoch``."""
        if self.prune == "pre":
            return self.sparsity
        if self.prune == "none" or epoch < self.prune_start:
            return 0.0
        if self.prune_schedule == "linear":
            return linear_sparsity(epoch, self.sparsity, self.prune_start, self.prune_ramp)
        return cubic_sparsity(epoch - self.prune_start + 1, 0.0, self.sparsity, self.prune_ramp)

    def lr_at(self, epoch: int) -> float:
        start = self.decay_start or self.decay_every
        return self.lr * self.lr_decay ** (0 if epoch < start else (epoch - start) // self.decay_every + 1)


@dataclass
class ChainConfig:
    """Per prior, ``chains`` independent chains share ``samples``; each chain collects its share
    after epoch burn_in + thin * k, k = 1..samples / chains."""
    lr: float = 0.5
    # constant | cyclical (cosine cycles of `thin` epochs after burn-in) | step (x lr_factor at each
    # of lr_milestones: epochs of the chain, or fractions of it with milestone_unit = "fraction")
    schedule: str = "constant"
    lr_milestones: list[float] = field(default_factory=list)
    lr_factor: float = 0.1
    milestone_unit: str = "epoch"  # epoch | fraction
    # N of the scaling convention (the prior enters divided by it, the noise is sqrt(2 lr T / N));
    # 0 = the training-set size. Another value samples a tempered posterior (Deng et al.'s free
    # "-N": the effective number of data points; docs/adaptive.md)
    num_data: int = 0
    temperature: float = 1.0
    burn_in: int = 10
    thin: int = 5
    samples: int = 18
    chains: int = 1  # independent chains (own init and noise): more diverse samples, one burn-in each
    plain_chain: bool = True  # also run a chain with the Gaussian prior only (the "SGLD xM" row)
    prefetch_noise: bool = True
    # gaussian | gaussian_parallel (CPU float32: a counter-based generator on all threads) |
    # rademacher (+-1: same covariance, ~3x cheaper; see SGLD docs)
    noise: str = "gaussian"
    max_grad_norm: float = 0.0  # clip the likelihood gradient (biases the chain when it fires; see SGMCMC)
    # inverse-temperature annealing: T at epoch e is temperature / anneal**e (Deng et al.: 1.005, from 1/1000)
    anneal: float = 1.0
    # where each chain starts: "" = a fresh random init; "sgd" = the first SGD baseline (Deng et al.
    # start their ResNet chains from a pretrained dense model)
    init_from: str = ""
    # ranks per chain under torchrun (sparse_ensembles.distributed): each reads 1/K of every batch, the
    # gradients are averaged, the noise is drawn alike on every rank; the same chain as one process
    data_parallel: int = 1
    # run the stage's chains as one batched computation (SGLD, classification; samplers/vectorized.py)
    vectorize: bool = False
    # the sparse chain's prior gradient through torch.compile (priors/compiled.py): fused kernels, for
    # GPUs above all, separate or vectorised chains; the first steps pay the compilation; not for
    # priors with state (ssgl); the plain chain's Gaussian (one multi-tensor op) stays eager
    compile_prior: bool = False

    @property
    def epochs_per_chain(self) -> int:
        return self.burn_in + self.thin * (self.samples // self.chains)

    def validate(self, need) -> None:
        need(self.lr > 0, "sampler.lr", "must be > 0")
        need(self.schedule in ("constant", "cyclical", "step"), "sampler.schedule", "use 'constant', 'cyclical' or 'step'")
        need(self.temperature >= 0, "sampler.temperature", "must be >= 0")
        need(self.burn_in >= 0, "sampler.burn_in", "must be >= 0")
        need(self.thin >= 1, "sampler.thin", "must be >= 1")
        need(self.samples >= 0, "sampler.samples", "must be >= 0")
        need(self.noise in NOISE_KINDS, "sampler.noise", "use one of " + ", ".join(map(repr, NOISE_KINDS)))
        need(1 <= self.chains, "sampler.chains", "must be >= 1")
        need(self.samples % self.chains == 0, "sampler.samples",
             f"{self.samples} samples cannot be shared evenly by {self.chains} chains; use a multiple of sampler.chains")
        need(self.max_grad_norm >= 0, "sampler.max_grad_norm", "must be >= 0 (0 = off)")
        need(self.init_from in ("", "sgd"), "sampler.init_from", "use \"\" (random init) or \"sgd\" (the first SGD baseline)")
        need(self.anneal >= 1, "sampler.anneal", "must be >= 1 (1 = no annealing; 1.005 = the inverse temperature x 1.005 per epoch)")
        need(self.milestone_unit in ("epoch", "fraction"), "sampler.milestone_unit", "use 'epoch' or 'fraction'")
        need(self.schedule == "step" or not self.lr_milestones, "sampler.lr_milestones",
             "milestones need sampler.schedule = 'step'")
        need(self.schedule != "step" or bool(self.lr_milestones), "sampler.lr_milestones",
             "the step schedule needs at least one milestone")
        need(self.lr_factor > 0, "sampler.lr_factor", "must be > 0")
        limit = 1.0 if self.milestone_unit == "fraction" else float(self.epochs_per_chain)
        need(all(0 < m < limit for m in self.lr_milestones), "sampler.lr_milestones",
             f"each milestone must lie inside the chain: 0 < m < {limit:g} ({self.milestone_unit}s)")
        need(self.num_data >= 0, "sampler.num_data", "must be >= 0 (0 = the training-set size)")
        need(self.data_parallel >= 1, "sampler.data_parallel", "must be >= 1 (ranks per chain under torchrun; 1 = one process)")


@dataclass
class SGLDConfig(ChainConfig):
    """Stochastic gradient Langevin dynamics (Welling & Teh 2011)."""


@dataclass
class SGHMCConfig(ChainConfig):
    """Stochastic gradient HMC (Chen et al. 2014) in SGD-momentum form; momentum = 1 - friction."""
    friction: float = 0.1

    def validate(self, need) -> None:
        super().validate(need)
        need(0 < self.friction <= 1, "sampler.friction", "use 0 < friction <= 1 (momentum = 1 - friction)")


@dataclass
class GroupLassoConfig:
    """Group sparse prior (Zhang & Ou 2018) R = lam * sum_g sqrt(dim_g) ||theta_g||, plus a Gaussian
    N(0, 1/precision) on every parameter."""
    tag: typing.ClassVar[str] = "gsp"  # names the chain (sgld_gsp) and its rows (SGLD+GSP)
    lam: float = 3.0
    precision: float = 1.0
    grouping: str = ""  # one of the model kind's groupings ("" = its default; lstm_lm: untied | tied | iss | block)
    budget: float = 0.0  # k > 0: the hinge lam * max(sum_g sqrt(dim_g) ||theta_g|| - k, 0) instead

    def validate(self, need) -> None:
        need(self.lam > 0, "prior.lam", "must be > 0")
        need(self.budget >= 0, "prior.budget", "must be >= 0 (0 = the plain group Lasso)")
        need(self.precision > 0, "prior.precision", "must be > 0")


@dataclass
class GaussianConfig:
    """Gaussian prior N(0, 1/precision) on every parameter only (no sparse chain)."""
    tag: typing.ClassVar[str] = ""
    precision: float = 1.0

    def validate(self, need) -> None:
        need(self.precision > 0, "prior.precision", "must be > 0")


@dataclass
class SSEPruneConfig:
    """SSE pruning of every sample: whole groups by RMS norm, then weights by magnitude."""
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.96])
    scope: str = "global"  # global | layer: one magnitude threshold, or the same fraction per layer
    group_threshold: float = 0.0  # also drop whole groups whose RMS weight is below this (0 = off)
    # structured members: keep only this many units per unit family (MLP: input pixels and hidden
    # neurons; LSTM: [input features,] hidden units per layer), by largest RMS group norm, before
    # magnitude pruning; gradually if retrain.ramp_epochs > 0; [] = off
    widths: list[int] = field(default_factory=list)
    # what `sparsities` count: "weights" (magnitude pruning, the SSE paper) or "blocks" (the lowest-
    # norm fraction of each matrix's blocks of the model's block grouping, for block-sparse execution)
    structure: str = "weights"
    # with structure = "blocks": "matrix" = that fraction of each matrix's blocks; "global" = the
    # lowest-norm blocks of all matrices together until that fraction of their weights is gone
    block_scope: str = "matrix"

    def validate(self, need) -> None:
        need(all(0 <= s < 1 for s in self.sparsities), "prune.sparsities", "each is the fraction removed, in [0, 1)")
        need(self.block_scope in ("matrix", "global"), "prune.block_scope", "use 'matrix' or 'global'")
        need(self.block_scope == "matrix" or self.structure == "blocks", "prune.block_scope",
             "applies to prune.structure = 'blocks' only (weights: prune.scope)")
        need(self.structure in ("weights", "blocks"), "prune.structure", "use 'weights' or 'blocks'")
        need(self.structure == "weights" or not self.widths, "prune.widths",
             "structured widths and block pruning do not combine; use one of them")
        need(self.scope in ("global", "layer"), "prune.scope", "use 'global' or 'layer'")
        need(self.group_threshold >= 0, "prune.group_threshold", "must be >= 0")
        need(all(w >= 1 for w in self.widths), "prune.widths", "each width must be >= 1")


@dataclass
class RetrainConfig:
    """Masked retraining of every pruned sample (SSE: 20 epochs, lr 0.01 divided by 1.15 per epoch).

    ``ramp_epochs`` > 0 prunes gradually instead of at once: over the first ``ramp_epochs``
    epochs (of ``epochs``) the sparsity rises along Zhu & Gupta's cubic schedule from that of the
    group-pruned sample to the target, the mask re-chosen by magnitude each epoch (and
    ``prune.widths``, if set, shrink from the live widths along the same schedule)."""
    epochs: int = 20
    lr: float = 0.01
    lr_decay: float = 1.15
    ramp_epochs: int = 0  # 0 = one-shot pruning (the paper)
    max_grad_norm: float = 0.0

    def validate(self, need) -> None:
        need(self.epochs >= 0, "retrain.epochs", "must be >= 0")
        need(self.lr > 0, "retrain.lr", "must be > 0")
        need(self.lr_decay > 0, "retrain.lr_decay", "must be > 0")
        # the target mask is set at the start of epoch ramp_epochs, so at least one epoch must follow
        need(self.ramp_epochs == 0 or 0 < self.ramp_epochs < self.epochs, "retrain.ramp_epochs",
             f"must be 0 (one-shot pruning) or below retrain.epochs = {self.epochs}, so that the "
             "members retrain at the target sparsity for at least one epoch")
        need(self.max_grad_norm >= 0, "retrain.max_grad_norm", "must be >= 0 (0 = off)")


@dataclass
class SSGLConfig:
    """Spike-and-slab Gaussian-Laplace prior with SA latents (Deng et al. 2019): with sampler kind
    sgld it is SGLD-SA, with sghmc SGHMC-SA; ``omega = 1`` gives the EM variant, ``omega = 0`` a
    fixed SSGL prior (plain SG-MCMC), ``omega < 0`` the schedule omega_c / (omega_A + k)^omega_alpha.
    Covers the parameters matching ``names`` (shell patterns; [] = every prunable weight but the
    first, the authors' "every convolution but the first"); the rest get N(0, 1/precision)."""
    tag: typing.ClassVar[str] = "ssgl"
    v0: float = 0.1
    v1: float = 1e-3
    a: float = 1.0
    b: float = 1.0
    nu: float = 1000.0
    lam: float = 1000.0
    sigma0: float = 1.0
    delta0: float = 0.5
    rho0: float = 0.5
    per_layer: bool = True
    omega: float = -1.0
    omega_c: float = 0.02
    omega_A: float = 1000.0
    omega_alpha: float = 0.75
    precision: float = 1.0
    names: list[str] = field(default_factory=list)
    kappa0: float = -1.0  # starting kappas; < 0 = implied by rho0 (the authors' code: 5e-4 each)
    kappa1: float = -1.0
    scale_by_sigma: bool = True  # rho's densities with sigma (the paper) or without (the authors' code)
    sa_on: str = "sigma"  # the SA average of the scale: sigma (ours) or sigma2 (the authors' code)
    latent_start: str = "rho0"  # rho starts at rho0, or "estep": at eq. (5) of the chain's starting weights

    def validate(self, need) -> None:
        need(self.sa_on in ("sigma", "sigma2"), "prior.sa_on", "use 'sigma' or 'sigma2'")
        need(self.latent_start in ("rho0", "estep"), "prior.latent_start", "use 'rho0' or 'estep'")
        need(self.latent_start == "rho0" or (self.kappa0 < 0 and self.kappa1 < 0), "prior.latent_start",
             "'estep' sets the starting kappas from rho: leave prior.kappa0 and prior.kappa1 unset")
        for key in ("v0", "v1", "a", "b", "nu", "lam", "sigma0", "precision", "omega_c", "omega_A", "omega_alpha"):
            need(getattr(self, key) > 0, f"prior.{key}", "must be > 0")
        need(0 < self.delta0 < 1, "prior.delta0", "must be in (0, 1)")
        need(0 < self.rho0 < 1, "prior.rho0", "must be in (0, 1)")
        need(self.omega <= 1, "prior.omega", "use a weight in [0, 1], or < 0 for the schedule omega_c / (omega_A + k)^omega_alpha")
        need(self.omega >= 0 or math.log(self.omega_c) <= self.omega_alpha * math.log(self.omega_A),  # omega_0 <= 1
             "prior.omega_c",
             f"the schedule's first weight omega_c / omega_A^omega_alpha = exp("
             f"{math.log(self.omega_c) - self.omega_alpha * math.log(self.omega_A):.3g}) must be <= 1")


@dataclass
class ScheduleConfig:
    """Magnitude pruning while the chain samples (Deng et al. 2019): s_k = target (1 - decay^(k / every))
    after step k; ``persistent`` keeps pruned weights at zero (false: re-zeroed each step, free to
    regrow, the authors' code). Covers the SSGL prior's parameters, or every prunable weight."""
    target: float = 0.9
    decay: float = 0.99
    every: float = 50.0
    scope: str = "layer"
    persistent: bool = True
    # the pruned parameters (shell patterns); [] = the SSGL prior's, or every prunable weight. Set
    # it when variants with different priors are compared, so that all prune the same layers.
    names: list[str] = field(default_factory=list)

    def validate(self, need) -> None:
        need(0 <= self.target < 1, "prune.target", "the fraction removed, in [0, 1)")
        need(0 < self.decay < 1, "prune.decay", "must be in (0, 1)")
        need(self.every > 0, "prune.every", "must be > 0")
        need(self.scope in ("global", "layer"), "prune.scope", "use 'global' or 'layer'")


@dataclass
class DistillConfig:
    """Distil a teacher into the configured model (the student), trained with the ``[sgd]``
    schedule on L = lam * CE(teacher, student) + (1 - lam) * CE(labels, student) (Geras et al.
    2016; torchdistill's alpha = 1 - lam). ``teacher``: a run directory, optionally
    ``RUN_DIR:ROW`` with ROW a method of its results.json (default its last row), or "self" =
    this run's first SGD member (self-compression: an identical model B mimics A). The teacher's
    predictive distribution over the training set is computed once, truncated to the classes
    covering ``mass`` (at most ``max_k``; 0 = no limit), and cached in ``distill/``."""
    teacher: str = ""  # "" = no distillation
    lam: float = 0.5
    mass: float = 0.99
    max_k: int = 0
    students: int = 1
    # sparse students: each pruned to these sparsities ([prune] settings) and retrained ([retrain])
    # on the same distillation loss, then shrunk
    sparsities: list[float] = field(default_factory=list)
    # "geras": the loss above; "hinton": the soft term at temperature tau, times tau^2 (Hinton et
    # al. 2015; distill.hinton_cached_loss)
    loss: str = "geras"
    tau: float = 1.0

    def validate(self, need) -> None:
        need(self.loss in ("geras", "hinton"), "distill.loss", '"geras" (Geras et al. 2016) or "hinton" (with distill.tau)')
        need(self.tau > 0, "distill.tau", "the softening temperature, > 0 (1 = none)")
        need(self.loss == "hinton" or self.tau == 1.0, "distill.tau", 'only the "hinton" loss has a temperature; set distill.loss = "hinton"')
        need(0 <= self.lam <= 1, "distill.lam", "must be in [0, 1] (0 = labels only, 1 = teacher only)")
        need(0 < self.mass <= 1, "distill.mass", "the teacher probability mass kept per row, in (0, 1]")
        need(self.max_k >= 0, "distill.max_k", "must be >= 0 (0 = no limit)")
        need(self.students >= 1, "distill.students", "must be >= 1")
        need(all(0 <= s < 1 for s in self.sparsities), "distill.sparsities", "each is the fraction removed, in [0, 1)")


SAMPLERS = {"sgld": SGLDConfig, "sghmc": SGHMCConfig}
PRIORS = {"group_lasso": GroupLassoConfig, "gaussian": GaussianConfig, "ssgl": SSGLConfig}
PRUNERS = {"sse": SSEPruneConfig, "schedule": ScheduleConfig}


def _kinds() -> dict[str, tuple[dict[str, type], str]]:
    """Kind-tagged sections: the dataclass of each kind, and the default kind."""
    return {"task": ({k: c.Config for k, c in TASKS.items()}, "classification"),
            "model": ({k: c.Config for k, c in MODELS.items() if hasattr(c, "Config")}, "mlp"),
            "sampler": (SAMPLERS, "sgld"), "prior": (PRIORS, "group_lasso"), "prune": (PRUNERS, "sse")}


PLAIN = {"experiment": ExperimentConfig, "sgd": SGDConfig, "retrain": RetrainConfig, "distill": DistillConfig}
VARIED = ("model", "sampler", "prior", "prune", "retrain")  # the sections a variant may change
# sections of the first release's schema, and where their keys went
MOVED = {"data": "[data] is now [task] (kind = \"classification\", name -> dataset)",
         "sgld": "[sgld] is now [sampler] (kind = \"sgld\"; prior_precision -> prior.precision)",
         "gsp": "[gsp] is now [prior] (kind = \"group_lasso\", lam; enabled = false -> kind = \"gaussian\")"}
ORDER = ("experiment", "task", "model", "sgd", "sampler", "prior", "prune", "retrain", "distill")


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    task: Any = None
    model: Any = None
    sgd: SGDConfig = field(default_factory=SGDConfig)
    sampler: Any = None
    prior: Any = None
    prune: Any = None
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    kinds: dict = field(default_factory=dict)  # section -> kind
    variants: dict = field(default_factory=dict)  # name -> {section: {key: value}} (see the module doc)

    def to_dict(self) -> dict:
        out = {}
        for section in ORDER:
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {"kind": self.kinds[section], **values} if section in self.kinds else values
        if self.variants:
            out["variants"] = {name: {s: dict(v) for s, v in changes.items()} for name, changes in self.variants.items()}
        return out

    def variant(self, name: str) -> "Config":
        """The base config with variant ``name``'s keys changed (a changed ``kind`` starts that
        section afresh from the variant's keys)."""
        raw = self.to_dict()
        raw.pop("variants", None)
        for section, values in self.variants[name].items():
            if "kind" in values and values["kind"] != raw[section].get("kind"):
                raw[section] = dict(values)
            else:
                raw[section].update(values)
        return from_dict(raw)

    def recipes(self) -> list[tuple[str, "Config"]]:
        """``(variant name, config)`` for each run of the chain -> prune part: the variants, or
        the base config alone (name "") when there are none."""
        return [(n, self.variant(n)) for n in self.variants] if self.variants else [("", self)]


def _check_type(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {inner.__name__}, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    if not isinstance(value, tp):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(section: str, cls: type, values: dict) -> Any:
    obj = cls()
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {section}.{key}; known in [{section}]: {sorted(known)}")
        setattr(obj, key, _check_type(f"{section}.{key}", value, hints[key]))
    if hasattr(obj, "validate"):
        obj.validate(need)
    return obj


def from_dict(raw: dict) -> Config:
    kinds = _kinds()
    raw = dict(raw)
    variants = raw.pop("variants", {})
    unknown = sorted(set(raw) - set(ORDER))
    if unknown:
        hint = f" ({MOVED[unknown[0]]}; see configs/ for examples)" if unknown[0] in MOVED else ""
        raise ConfigError(f"unknown config section [{unknown[0]}]{hint}; known: {list(ORDER)}")
    cfg = Config()
    for section in ORDER:
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        if section in kinds:
            table, default = kinds[section]
            values = dict(values)
            kind = values.pop("kind", default)
            if not isinstance(kind, str) or kind not in table:
                raise ConfigError(f"{section}.kind: unknown kind {kind!r}; known: {sorted(table)}")
            cfg.kinds[section] = kind
            setattr(cfg, section, _build(section, table[kind], values))
        else:
            setattr(cfg, section, _build(section, PLAIN[section], values))
    cfg.variants = _check_variants(variants)
    for name in cfg.variants:  # build each now, so that a bad key fails before any work is done
        try:
            v = cfg.variant(name)
        except ConfigError as e:
            raise ConfigError(f"[variants.{name}]: {e}") from None
        need(not (v.sampler.init_from and v.to_dict()["model"] != cfg.to_dict()["model"]), f"variants.{name}.model",
             "sampler.init_from = 'sgd' starts the chain from the SGD baseline, which has the base [model]; "
             "a variant cannot change the model then")
    for c in [cfg] + [cfg.variant(n) for n in cfg.variants]:
        need(not c.sampler.init_from or cfg.sgd.members >= 1, "sampler.init_from",
             "'sgd' starts the chains from the first SGD baseline: set sgd.members >= 1")
    need(cfg.distill.teacher != "self" or cfg.sgd.members >= 1, "distill.teacher",
         "'self' distils this run's first SGD member: set sgd.members >= 1")
    need(cfg.experiment.block_kernel == "off" or cfg.kinds.get("model") == "lstm_lm", "experiment.block_kernel",
         f"the block-sparse kernel runs lstm_lm layers; this config's model is {cfg.kinds.get('model')!r}: "
         "set experiment.block_kernel = 'off'")
    return cfg


def _check_variants(variants) -> dict:
    need(isinstance(variants, dict), "variants", "use [variants.<name>] tables")
    out = {}
    for name, changes in variants.items():
        need(bool(re.fullmatch(r"[A-Za-z0-9_-]+", name)), f"variants.{name}",
             "a variant name is a folder name: letters, digits, '_' and '-' only")
        need(name != "distill", "variants.distill", "'distill' names the distilled students' folders; choose another name")
        need(isinstance(changes, dict) and all(isinstance(v, dict) for v in changes.values()), f"variants.{name}",
             "give dotted keys such as prior.lam = 0.5")
        bad = sorted(set(changes) - set(VARIED))
        need(not bad, f"variants.{name}.{bad[0] if bad else ''}",
             f"a variant may change only the sections {list(VARIED)} (the task, SGD baselines and seed are shared)")
        out[name] = {s: dict(v) for s, v in changes.items()}
    return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` with a TOML literal value (bare words are taken as strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, literal = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {literal}")["v"]
    except tomllib.TOMLDecodeError:
        value = literal
    return section, key, value


def load(path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; shipped configs are in configs/") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    for text in overrides:
        section, key, value = parse_override(text)
        set_dotted(raw, section, key, value)
    return from_dict(raw)


def set_dotted(raw: dict, section: str, key: str, value: Any) -> None:
    """``raw[section][key] = value`` where ``key`` may be dotted into nested tables: ``--set
    variants.iss_se.prune.widths=[50, 50]`` changes one variant (which must exist: a typo must not
    add a variant that runs a whole chain)."""
    *parents, last = key.split(".")
    if section == "variants":
        known = list(raw.get("variants", {}))
        if not parents or parents[0] not in known:
            raise ConfigError(f"--set variants.{key}: the config has no such variant (variants: {known}); "
                              f"write variants.<name>.<section>.<key>=value")
    table = raw.setdefault(section, {})
    for part in parents:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {section}.{key}: {part!r} is a value, not a table")
    table[last] = value


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (every key written, so a run documents itself)."""
    def lit(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        return repr(v)

    lines = []
    raw = cfg.to_dict()
    variants = raw.pop("variants", {})
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {lit(v)}" for k, v in values.items()]
        lines.append("")
    for name, changes in variants.items():
        lines.append(f"[variants.{name}]")
        lines += [f"{s}.{k} = {lit(v)}" for s, values in changes.items() for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def changed_keys(old: Config, new: Config) -> dict[str, list]:
    """``{"section.key": [old, new]}`` for every value that differs."""
    a, b = old.to_dict(), new.to_dict()
    keys = {f"{s}.{k}": (a.get(s, {}).get(k), b.get(s, {}).get(k)) for s in a.keys() | b.keys()
            for k in a.get(s, {}).keys() | b.get(s, {}).keys()}
    return {key: list(pair) for key, pair in sorted(keys.items()) if pair[0] != pair[1]}
