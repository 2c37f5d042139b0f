"""One call from a user's own model and DataLoaders to a sparse ensemble chosen on validation data
(issue 25)::

    ens = SparseEnsemble(model, budget={"params": 1.0}).fit(train_loader, valid_loader)
    ens(x)              # log of the mean of the members' probabilities
    ens.report()        # every candidate's valid metrics and cost; the chosen one marked
    ens.save("ens"); SparseEnsemble.load("ens")

The task is an objective beside the others: :class:`Classification`, :class:`Regression` (Gaussian
likelihood) or :class:`LanguageModelling` (a stateful LSTM on BPTT segments, scored by perplexity).

``fit`` runs the SSE recipe (Zhang & Ou 2018) on the model as given:

1. the model trained densely by SGD: the reference of the budget, and itself a candidate;
2. per point of the grid ``lams x temperatures`` one SGLD chain started from that network, with the
   group sparse prior ``lam * sum_g sqrt(dim_g) ||theta_g||`` on the model's neuron groups, one
   sample every ``thin`` epochs after ``burn_in``;
3. every sample pruned at every sparsity (magnitude, after the groups the prior switched off),
   retrained with its mask fixed, and shrunk physically (a built-in kind by its own ``shrink``; an
   ``nn.Sequential`` MLP or CNN by :func:`~sparse_ensembles.compact.compact_mlp` /
   :func:`~sparse_ensembles.models.sequential.compact_sequential`);
4. every candidate ``(lam, T, sparsity, m)`` -- the ensemble of the first ``m`` members -- scored on
   the validation loader; the one with the lowest valid NLL (or error) whose cost is within the
   ``budget`` (relative to the dense model) is chosen.

One chain serves every sparsity and member count, and a member retrained once serves every ``m``.
With more than one grid point, successive halving decides which chains get the full search: every
chain's first two members at the middle sparsity are scored first, and only the better half goes on.
Nothing here reads a test split: ``fit`` is given train and valid only.

Everything is written to ``workdir`` as it finishes (per-epoch checkpoints, samples, members), so an
interrupted ``fit`` called again with the same arguments resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._timing import median_ms
from . import checkpoint, metrics, pruning
from .models.mlp import CompactMLP, _mlp_layers, compact_mlp
from .models.sequential import as_sequential, blocks_of, compact_sequential, sequential_cost, sequential_unit_groups
from .models.registry import from_spec
from .priors import Gaussian, GroupLasso, Sum
from .samplers import SGLD
from .samplers.sgmcmc import SGMCMC
from .structure import sequential_groups
from .tasks.language_model import next_word_loss, segment_target_logprobs
from .training import Constrained, Holder, derive_seed, run_epochs, seed_epoch, train_epoch

__all__ = ["SparseEnsemble", "Recipe", "CollapseWarning", "prunability", "Classification", "Regression",
           "LanguageModelling"]


# Recipe fields that may change between calls on one workdir: the grids add or reuse folders keyed
# by their values, and the choice is recomputed
_FREE = ("lams", "temperatures", "sparsities", "select", "latency_repeats")


class CollapseWarning(UserWarning):
    """The chain's samples are (nearly) one network: the ensemble adds little over a point estimate."""


@dataclass
class Recipe:
    """The settings ``fit`` runs with; the defaults are the shipped demo's (``configs/fmnist_demo.toml``,
    an MLP on Fashion-MNIST). Grids: ``lams``, ``temperatures``, ``sparsities``, ``members``."""
    sgd_epochs: int = 20
    sgd_lr: float = 0.5
    sgd_decay_every: int = 5         # the SGD step is multiplied by sgd_lr_decay every this many epochs
    sgd_lr_decay: float = 0.5
    sgd_decay_start: int = 0         # first epoch with a decayed step (0: sgd_decay_every), as [sgd] decay_start
    max_grad_norm: float = 0.0       # clip the likelihood gradient's norm (SGD, chains, retraining); 0: never
    chain_lr: float = 0.1
    lams: Sequence[float] = (3.0,)   # group-Lasso strength
    temperatures: Sequence[float] = (0.01,)
    precision: float = 1.0           # a weak Gaussian prior on every parameter beside the group Lasso
    burn_in: int = 10                # chain epochs before the first sample
    thin: int = 3                    # chain epochs between samples
    sparsities: Sequence[float] = (0.8, 0.88, 0.94)
    group_threshold: float = 0.0     # also remove whole groups (units) whose RMS weight is below this
    members: Sequence[int] = (2, 4, 8)
    retrain_epochs: int = 15
    retrain_lr: float = 0.2
    retrain_lr_decay: float = 1.15   # the retraining step is divided by this every epoch
    select: str = "nll"              # what the validation split minimises: "nll" or "error"
    latency_repeats: int = 7         # interleaved rounds timing every candidate on a valid batch (0: no timing)
    seed: int = 0

    def check(self) -> None:
        def need(ok, key, why):
            if not ok:
                raise ValueError(f"Recipe.{key}: {why}")
        for key in ("sgd_epochs", "burn_in", "retrain_epochs", "sgd_decay_start"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, key, "must be an int >= 0")
        need(isinstance(self.thin, int) and self.thin >= 1, "thin", "must be an int >= 1")
        need(isinstance(self.sgd_decay_every, int) and self.sgd_decay_every >= 1, "sgd_decay_every", "must be an int >= 1")
        need(isinstance(self.latency_repeats, int) and self.latency_repeats >= 0, "latency_repeats", "must be an int >= 0")
        for key in ("sgd_lr", "sgd_lr_decay", "chain_lr", "retrain_lr", "precision", "retrain_lr_decay"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, key, f"must be a finite number > 0, got {v!r}")
        need(len(self.lams) > 0 and all(v > 0 and math.isfinite(v) for v in self.lams), "lams", "positive numbers")
        need(len(self.temperatures) > 0 and all(v >= 0 and math.isfinite(v) for v in self.temperatures),
             "temperatures", "numbers >= 0")
        need(len(self.sparsities) > 0 and all(0 <= s < 1 for s in self.sparsities), "sparsities",
             "fractions removed, in [0, 1)")
        need(len(self.members) > 0 and all(isinstance(m, int) and m >= 1 for m in self.members), "members",
             "positive ints")
        need(self.select in ("nll", "error"), "select", "use 'nll' or 'error'")
        need(isinstance(self.group_threshold, (int, float)) and 0 <= self.group_threshold < math.inf,
             "group_threshold", "must be a finite number >= 0")
        need(isinstance(self.max_grad_norm, (int, float)) and 0 <= self.max_grad_norm < math.inf,
             "max_grad_norm", "must be a finite number >= 0 (0: no clipping)")

    @property
    def samples(self) -> int:
        return max(self.members)


class _Structure:
    """How ``fit`` groups, prunes and shrinks one family of models. ``groups_of`` (None: no groups)
    gives the group prior's families, ``unit_groups_of`` those whose empty groups remove a unit,
    ``prunable_of`` the weights magnitude pruning may touch; ``compact`` shrinks a pruned model."""
    groups_of = None

    def unit_groups_of(self, model: nn.Module) -> list:
        return self.groups_of(model) if self.groups_of else []

    def prunable_of(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if p.dim() >= 2]

    def params(self, model: nn.Module) -> int:
        """What the parameter budget counts: nonzero weights and biases."""
        return metrics.nonzero_params(model)


class _KindStructure(_Structure):
    """A built-in model kind (``sparse_ensembles.models``: ``mlp``, ``cnn``, ``resnet20``, or one a
    user registered): the kind's own groups, prunable weights, cost and ``shrink``, exactly as the
    config pipeline prunes and shrinks it."""

    @staticmethod
    def applies(model: nn.Module) -> bool:
        return all(callable(getattr(model, a, None)) for a in ("spec", "unit_groups", "live_units", "shrink", "cost"))

    def __init__(self, model: nn.Module):
        kind = model.spec()["kind"]
        names = ", ".join(f.name for f in model.unit_groups())
        self.reason = f"the built-in kind {kind!r}: its own groups (units: {names}), shrunk by {kind}.shrink"

    def groups_of(self, model: nn.Module) -> list:
        return model.groups() if hasattr(model, "groups") else model.unit_groups()

    def unit_groups_of(self, model: nn.Module) -> list:
        return model.unit_groups()

    def prunable_of(self, model: nn.Module) -> list[str]:
        return list(model.prunable_weights())

    def compact(self, model: nn.Module, input_shape) -> nn.Module:
        return model.shrink(model.live_units())

    def params(self, model: nn.Module) -> int:
        """The kind's own count, as the config pipeline's tables: nonzero weights and biases, except
        that a language model's untied embedding table (a lookup, not a product) is not counted."""
        return model.cost()["params"]

    def flops(self, model: nn.Module, input_shape) -> int:
        return model.cost()["flops"]


class _MLPStructure(_Structure):
    """An ``nn.Sequential`` MLP: neuron groups (a neuron's outgoing weights), shrunk by
    :func:`~sparse_ensembles.compact.compact_mlp`."""
    reason = "an MLP: neuron groups, shrunk to smaller dense layers"

    def __init__(self, model: nn.Sequential):
        _mlp_layers(model)  # raises ValueError naming what is not supported
        self.groups_of = sequential_groups

    def compact(self, model: nn.Module, input_shape) -> nn.Module:
        return compact_mlp(model)

    def flops(self, model: nn.Module, input_shape) -> int:
        return metrics.cost([model])["flops"]


class _CNNStructure(_Structure):
    """An ``nn.Sequential`` CNN: channel / neuron groups (each unit's filter or incoming row),
    shrunk by :func:`~sparse_ensembles.models.sequential.compact_sequential`."""
    reason = "a CNN: channel and neuron groups, shrunk to fewer channels and neurons"

    def __init__(self, model: nn.Sequential):
        blocks_of(model)  # raises ValueError naming what is not supported
        self.groups_of = sequential_unit_groups

    def compact(self, model: nn.Module, input_shape) -> nn.Module:
        return compact_sequential(model, input_shape=input_shape)

    def flops(self, model: nn.Module, input_shape) -> int:
        return sequential_cost(model, input_shape)["flops"]


class _Unstructured(_Structure):
    """Anything else: magnitude masks under a Gaussian prior, members kept at full size."""

    def __init__(self, reason: str):
        self.reason = f"not compacted ({reason}): unstructured magnitude masks, members kept at full size"

    def compact(self, model: nn.Module, input_shape) -> nn.Module:
        return model

    def flops(self, model: nn.Module, input_shape) -> int:
        return metrics.cost([model])["flops"]  # its Linear layers only


def _structure_of(model: nn.Module):
    """(structure, the model as fit trains it): an ``nn.Sequential`` as given; another module as
    the ``nn.Sequential`` of its submodules when torch.fx traces its forward as a chain."""
    if _KindStructure.applies(model):
        return _KindStructure(model), model
    traced = ""
    if not isinstance(model, nn.Sequential):
        try:
            model, traced = as_sequential(model), f"{type(model).__name__} traced by torch.fx as a chain; "
        except ValueError as e:
            return _Unstructured(f"{type(model).__name__} is not an nn.Sequential, and {e}"), model
    reasons = []
    for kind in (_MLPStructure, _CNNStructure):
        try:
            found = kind(model)
            found.reason = traced + found.reason
            return found, model
        except ValueError as e:
            reasons.append(str(e))
    return _Unstructured(traced + "; ".join(reasons)), model


def prunability(model: nn.Module) -> dict:
    """What ``fit`` can do with ``model``: ``{"compacts": bool, "groups": [...], "reason": str}``.
    A built-in model kind (``mlp``, ``cnn``, ``resnet20``, ...) uses its own groups and ``shrink``.
    An ``nn.Sequential`` MLP (``Linear``, activations, ``Flatten`` first, ``Dropout``) gets neuron
    groups; an ``nn.Sequential`` CNN (``Conv2d``, ``BatchNorm``, activations, pooling, one
    ``Flatten``, ``Linear``, ``Dropout``; see :mod:`sparse_ensembles.models.sequential`) channel and
    neuron groups; both shrink physically. Anything else falls back to unstructured magnitude masks
    under a Gaussian prior, kept at full size; ``reason`` says why."""
    st, model = _structure_of(model)
    groups = st.groups_of(model) if st.groups_of else []
    return {"compacts": st.groups_of is not None, "groups": [f"{g.name}: {g.size} groups" for g in groups],
            "reason": st.reason}


def _xy(batch) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of a batch given as a tuple / list or a dict."""
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("x", "input", "inputs", "image", "images") if k in batch), None)
        y = next((batch[k] for k in ("y", "label", "labels", "target", "targets") if k in batch), None)
        if x is None or y is None:
            raise ValueError(f"a dict batch needs an input key (x / input / inputs / image / images) and a target key "
                             f"(y / label / labels / target / targets); got keys {sorted(batch)}")
        return x, y
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be (inputs, targets) or a dict; got {type(batch).__name__}")


def _batches(loader: Iterable, device) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in loader:
        x, y = _xy(batch)
        yield x.to(device), y.to(device)


def _num_data(loader) -> int:
    """N, the number of training examples one epoch visits: the sampler's length (a subset sampler
    visits fewer than the dataset holds), else the dataset's, else counted."""
    for source in ("sampler", "dataset"):
        try:
            return len(getattr(loader, source))
        except (AttributeError, TypeError):
            pass
    return sum(_xy(b)[1].numel() for b in loader)  # targets: one per example, or per token of a segment


class _Objective:
    """What ``fit`` optimises and scores. ``loss(model, batch, state) -> (loss, state)`` trains;
    ``predictions`` gives a member's valid predictions (what ``combine`` mixes and ``scores`` reads);
    ``predict`` maps one forward output to what ``ens(x)`` mixes. ``stateful``: the model carries a
    state from batch to batch (a language model)."""
    stateful = False

    def predictions(self, model: nn.Module, batches) -> tuple[Tensor, Tensor]:
        out, ys = [], []
        for x, y in batches:
            out.append(self.predict(model(x)).float())
            ys.append(y)
        return torch.cat(out), torch.cat(ys)


class Classification(_Objective):
    """Cross-entropy on logits; a member predicts log-probabilities, the ensemble the log of the
    mean of its members' probabilities. Scores: top-1 ``error`` and ``nll``."""
    name, error_name = "classification", "error"
    metric_names = ("error", "nll")

    def loss(self, model, batch, state=None):
        x, y = batch
        return F.cross_entropy(model(x), y), None

    def predict(self, out: Tensor) -> Tensor:
        return torch.log_softmax(out, -1)

    def combine(self, preds: Sequence[Tensor]) -> Tensor:
        return torch.logsumexp(torch.stack(list(preds)), 0) - math.log(len(preds))

    def output(self, combined: Tensor) -> Tensor:
        return combined

    def scores(self, combined: Tensor, y: Tensor) -> dict:
        return {"error": metrics.error(combined, y), "nll": metrics.nll(combined, y)}

    def disagreement(self, a: Tensor, b: Tensor) -> float:
        """The fraction of examples whose top-1 class differs (comparable to ``error``)."""
        return float((a.argmax(-1) != b.argmax(-1)).float().mean())


class Regression(_Objective):
    """Gaussian likelihood. A model with 2 outputs predicts the mean and ``log var`` (learned,
    per-example noise); a model with 1 output predicts the mean under a fixed ``noise_std``. The
    loss is the mean Gaussian NLL ``0.5 (log 2 pi var + (y - mu)^2 / var)``; the ensemble is the
    equal mixture of its members' Gaussians, and ``ens(x)`` returns its mean and variance ``(N, 2)``.
    Scores: ``rmse``, exact mixture ``nll`` and ``coverage95`` (:func:`~sparse_ensembles.metrics.regression_metrics`)."""
    name, error_name = "regression", "rmse"
    metric_names = ("rmse", "nll", "coverage95")

    def __init__(self, noise_std: float = 1.0):
        if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std > 0):
            raise ValueError(f"Regression(noise_std=...) must be a finite number > 0, got {noise_std!r}")
        self.noise_std = float(noise_std)

    def _mean_var(self, out: Tensor) -> tuple[Tensor, Tensor]:
        if out.dim() == 1 or out.shape[-1] == 1:
            mean = out.reshape(-1)  # not len(out): the batch size stays symbolic when exported
            return mean, torch.full_like(mean, self.noise_std ** 2)
        if out.dim() == 2 and out.shape[-1] == 2:
            return out[:, 0], out[:, 1].clamp(-20, 20).exp()  # log var clamped: exp stays finite
        raise ValueError(f"a regression model returns (N,) or (N, 1) means, or (N, 2) means and log variances; "
                         f"got shape {tuple(out.shape)}")

    def loss(self, model, batch, state=None):
        x, y = batch
        mean, var = self._mean_var(model(x))
        return 0.5 * (torch.log(2 * math.pi * var) + (y.reshape(len(mean)).to(mean.dtype) - mean).pow(2) / var).mean(), None

    def predict(self, out: Tensor) -> Tensor:
        mean, var = self._mean_var(out)
        return torch.stack([mean, var], -1)[:, None]  # (N, 1 component, 2)

    def combine(self, preds: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(preds), 1)  # (N, M components, 2): the mixture, kept whole for its exact NLL

    def output(self, combined: Tensor) -> Tensor:
        mean, var = combined[..., 0], combined[..., 1]
        mu = mean.mean(1)
        return torch.stack([mu, (var + mean.pow(2)).mean(1) - mu.pow(2)], -1)

    def scores(self, combined: Tensor, y: Tensor) -> dict:
        return metrics.regression_metrics(combined[..., 0], combined[..., 1], y)

    def disagreement(self, a: Tensor, b: Tensor) -> float:
        """RMS difference of the two members' means (comparable to ``rmse``)."""
        return float((a[:, 0, 0] - b[:, 0, 0]).pow(2).mean().sqrt())


class LanguageModelling(Classification):
    """Next-word prediction by a model that carries a state, ``forward(tokens, state) -> (logits,
    state)`` (the built-in ``lstm_lm``). Batches are BPTT segments ``(x, y)`` (rows x positions) of
    contiguous token streams, given in stream order: the state flows from each segment to the next,
    detached (Zaremba et al. 2014), so pass a list of segments rather than a shuffling loader
    (``sparse_ensembles.data.text.bptt_segments``). Members are scored on the target word only: the
    ensemble's ``log p(y_t) = log mean_m p_m(y_t)``; scores ``ppl`` and ``nll`` per token. ``ens(x)``
    returns the log of the mean of the members' next-word distributions ``(rows, positions, vocab)``,
    each member starting from a zero state."""
    name, error_name = "language_model", "nll"
    metric_names = ("ppl", "nll")
    stateful = True

    def loss(self, model, batch, state=None):
        return next_word_loss(model, batch, state)

    def predictions(self, model: nn.Module, batches) -> tuple[Tensor, Tensor]:
        """log p(y_t) of every target token, flattened segment by segment in stream order, and the targets."""
        batches = list(batches)
        out = [lp.reshape(-1) for lp in segment_target_logprobs(model, batches)]
        return torch.cat(out), torch.cat([y.reshape(-1) for _, y in batches])

    def predict(self, out) -> Tensor:
        return torch.log_softmax(out[0], -1)

    def scores(self, combined: Tensor, y: Tensor) -> dict:
        nll = float(-combined.double().mean())
        return {"ppl": math.exp(nll), "nll": nll}

    def disagreement(self, a: Tensor, b: Tensor) -> float:
        """The mean absolute difference of two members' log p(y_t), in nats (comparable to ``nll``)."""
        return float((a - b).abs().mean())


OBJECTIVES = {"classification": Classification, "regression": Regression, "language_model": LanguageModelling}


@torch.no_grad()
@torch.no_grad()
def _predict(objective, model: nn.Module, loader, device) -> tuple[Tensor, Tensor]:
    was = model.training
    model.eval()
    try:
        return objective.predictions(model, _batches(loader, device))
    finally:
        model.train(was)




def _tag(lam: float, temperature: float) -> str:
    return f"lam{lam:g}_T{temperature:g}"


def _pct(s: float) -> str:
    return f"{100 * s:g}"


class _Members(nn.Module):
    """Members combined by an objective, as one module (what ``SparseEnsemble.forward`` computes)."""

    def __init__(self, members: Sequence[nn.Module], objective):
        super().__init__()
        self.members, self.objective = nn.ModuleList(members), objective

    def forward(self, x: Tensor) -> Tensor:
        obj = self.objective
        return obj.output(obj.combine([obj.predict(m(x)) for m in self.members]))


def _graph_of(members: Sequence[nn.Module], objective) -> nn.Module:
    """Members as one module: compacted MLP classifiers fused (:class:`~sparse_ensembles.compact.FusedMLPEnsemble`),
    others combined by the objective in a loop that tracing unrolls."""
    from .compact.mlp import FusedMLPEnsemble
    if objective.name == "classification" and all(isinstance(m, CompactMLP) for m in members):
        return FusedMLPEnsemble(list(members)).eval()
    return _Members(list(members), objective).eval()


class SparseEnsemble(nn.Module):
    """A sparse ensemble of a user's model, built and chosen by :meth:`fit`; see the module docstring.

    Args:
        model: the network (left untouched; ``fit`` trains copies). Its forward returns logits.
        task: ``"classification"`` (cross-entropy; members averaged as probabilities), ``"regression"``
            (Gaussian likelihood; see :class:`Regression`), ``"language_model"`` (next word, a stateful model
            on BPTT segments; see :class:`LanguageModelling`), or an objective such as ``Regression(noise_std=0.5)``.
        budget: the chosen ensemble's cost relative to one dense model: ``{"params": 1.0}`` (nonzero
            parameters), ``{"flops": 2.0}`` (sub-matrix FLOPs), or both; ``None``: no limit.
        recipe: a :class:`Recipe` (or a dict of its fields).
        workdir: where work is saved and resumed (default: a new temporary folder).
        device: where training runs (default: the model's device).
        progress: show progress bars and messages.
    """

    def __init__(self, model: nn.Module, task="classification", budget: Optional[dict] = None,
                 recipe: Recipe | dict | None = None, workdir=None, device=None, progress: bool = True):
        super().__init__()
        if isinstance(task, str):
            if task not in OBJECTIVES:
                raise ValueError(f"task {task!r} is not supported; use one of {sorted(OBJECTIVES)}")
            task = OBJECTIVES[task]()
        self.objective = task
        if getattr(model, "stateful", False) and not getattr(task, "stateful", False):
            raise ValueError(f"{type(model).__name__} carries a state from batch to batch (a language model): use "
                             "task=\"language_model\" with BPTT segments (x, y) as batches")
        if getattr(task, "stateful", False) and not getattr(model, "stateful", False):
            raise ValueError(f"task {task.name!r} needs a model whose forward(tokens, state) returns (logits, state) "
                             f"and that says so (stateful = True), such as sparse_ensembles.models.LSTMLM; "
                             f"{type(model).__name__} does not")
        budget = {"params": 1.0} if budget is None else dict(budget)
        unknown = set(budget) - {"params", "flops", "latency"}
        if unknown or not all(isinstance(v, (int, float)) and v > 0 for v in budget.values()):
            raise ValueError("budget must map 'params', 'flops' and/or 'latency' to a positive ratio to one dense model; "
                             f"got {budget!r}")
        self.recipe = Recipe(**recipe) if isinstance(recipe, dict) else (recipe or Recipe())
        self.recipe.check()
        self.task, self.budget = task.name, budget
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="sparse_ensemble_"))
        self.progress = progress
        self.structure = prunability(model)
        self._structure, model = _structure_of(model)  # a module traced as a chain trains as its nn.Sequential
        self.__dict__["template"] = model  # not a submodule: its weights are not the ensemble's
        self.input_shape: Optional[list] = None  # of one example, read from the first training batch
        self.members = nn.ModuleList()
        self.candidates: list[dict] = []
        self.chosen: Optional[dict] = None
        self.diagnostics: dict = {}

    # -- the recipe --------------------------------------------------------------------------------
    def _flops(self, model: nn.Module) -> int:
        if hasattr(model, "cost") and getattr(model, "input_shape", True) is not None:
            return model.cost()["flops"]
        return self._structure.flops(model, self.input_shape)

    def _log(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    def _bar(self, total: int, label: str):
        if not self.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=label, leave=False)

    def _train(self, model, opt, loader, epochs: int, ckpt: Path, label: str, *, sched=None, after_epoch=None,
               extra_state=None) -> float:
        def epoch(e):
            # every epoch's batches (order, dropout, workers' seeds) are a function of (seed, unit,
            # epoch) alone, so a fit resumed from any checkpoint continues bit for bit
            seed_epoch(loader, derive_seed(self.recipe.seed, label, e))
            clip = 0 if isinstance(opt, SGMCMC) else self.recipe.max_grad_norm  # a sampler clips by itself
            loss = train_epoch(model, opt, _batches(loader, self.device), where=f"{label} epoch {e + 1}",
                               loss_fn=self.objective.loss, max_grad_norm=clip or None)
            if sched is not None:
                sched.step()
            return loss

        state = {"model": model, "opt": opt, **(extra_state or {})}
        if sched is not None:
            state["sched"] = sched
        return run_epochs(ckpt, epochs, state, epoch, after_epoch=after_epoch, bar=self._bar(epochs, label),
                          log=self._log if self.progress else (lambda s: None), label=label)

    def _dense(self, train_loader) -> nn.Module:
        r, path = self.recipe, self.workdir / "dense.pt"
        model = copy.deepcopy(self.template).to(self.device)
        if path.exists():
            model.load_state_dict(checkpoint.load(path, fix="delete it to train the dense model again")["state"])
            return model
        opt = torch.optim.SGD(model.parameters(), lr=r.sgd_lr)
        start = r.sgd_decay_start or r.sgd_decay_every  # lr * decay^k, k = 0 before start, then one more every `every`
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: r.sgd_lr_decay ** (
            0 if e < start else (e - start) // r.sgd_decay_every + 1))
        seconds = self._train(model, opt, train_loader, r.sgd_epochs, self.workdir / "dense.ckpt", "dense SGD", sched=sched)
        checkpoint.atomic_save({"state": checkpoint.cpu_state(model), "train_seconds": seconds}, path)
        (self.workdir / "dense.ckpt").unlink(missing_ok=True)
        return model

    def _prior(self, model: nn.Module, lam: float):
        if self.structure["compacts"]:
            return Sum(GroupLasso(self._structure.groups_of(model), lam), Gaussian(self.recipe.precision))
        return Gaussian(self.recipe.precision)

    def _chain(self, dense: nn.Module, lam: float, temperature: float, train_loader) -> list[Path]:
        """The chain's samples (state dicts), one every ``thin`` epochs after ``burn_in``."""
        r = self.recipe
        folder = self.workdir / f"chain_{_tag(lam, temperature)}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"sample_{k:03d}.pt" for k in range(r.samples)]
        if all(p.exists() for p in paths):
            return paths
        for stale in folder.glob("pruned_*/member_*"):  # members of samples about to be drawn again
            stale.unlink()
        model = copy.deepcopy(dense)
        gen = torch.Generator(device=self.device).manual_seed(r.seed + 1)
        sampler = SGLD(model.named_parameters(), lr=r.chain_lr, num_data=_num_data(train_loader),
                       temperature=temperature, prior=self._prior(model, lam), generator=gen,
                       max_grad_norm=r.max_grad_norm or None)  # the sampler clips the likelihood's gradient itself
        epochs = r.burn_in + r.thin * r.samples

        def after(done: int):
            k, rest = divmod(done - r.burn_in, r.thin)
            if done > r.burn_in and rest == 0 and k >= 1:
                checkpoint.atomic_save({"state": checkpoint.cpu_state(model)}, paths[k - 1])

        self._train(model, sampler, train_loader, epochs, folder / "chain.ckpt",
                    f"SGLD chain lam {lam:g} T {temperature:g}", after_epoch=after, extra_state={})
        (folder / "chain.ckpt").unlink(missing_ok=True)
        return paths

    def _member(self, dense: nn.Module, sample: Path, sparsity: float, k: int, train_loader) -> nn.Module:
        """Sample ``k`` pruned to ``sparsity``, retrained with its mask fixed, shrunk (cached on disk)."""
        r = self.recipe
        path = sample.parent / f"pruned_{_pct(sparsity)}" / f"member_{k:03d}.pt"
        if path.exists():
            if self.structure["compacts"]:
                return checkpoint.load_member(path, self.device)[0]
            model = copy.deepcopy(dense)
            model.load_state_dict(checkpoint.load(path)["state"])
            return model.eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(dense)
        model.load_state_dict(checkpoint.load(sample, fix="delete the chain folder to sample it again")["state"])
        params = dict(model.named_parameters())
        st = self._structure
        groups = st.groups_of(model) if self.structure["compacts"] else []
        masks = pruning.sse_masks(params, groups, st.unit_groups_of(model), st.prunable_of(model), sparsity,
                                  group_threshold=r.group_threshold)
        pruning.apply_masks(model, masks)
        hooks = pruning.keep_pruned_at_zero(model, masks)
        opt = Constrained(torch.optim.SGD(model.parameters(), lr=r.retrain_lr), params, masks=Holder(masks))
        sched = torch.optim.lr_scheduler.ExponentialLR(opt.optimizer, gamma=1 / r.retrain_lr_decay)
        self._train(model, opt, train_loader, r.retrain_epochs, path.with_suffix(".ckpt"),
                    f"retrain {sample.parent.name} {_pct(sparsity)}% member {k + 1}", sched=sched)
        for h in hooks:
            h.remove()
        model.eval()
        if self.structure["compacts"]:
            small = self._structure.compact(model, self.input_shape).to(self.device).eval()
            checkpoint.save_member(path, small)
            model = small
        else:
            checkpoint.atomic_save({"state": checkpoint.cpu_state(model)}, path)
        path.with_suffix(".ckpt").unlink(missing_ok=True)
        return model

    def _diversity(self, samples: list[Path], dense: nn.Module, valid_loader) -> dict:
        """How different the chain's samples are: the mean pairwise disagreement of their valid
        predictions (the objective's, on the scale of its error), and the mean distance between
        consecutive samples relative to their norm."""
        preds, flats = [], []
        for p in samples:
            model = copy.deepcopy(dense)
            model.load_state_dict(checkpoint.load(p)["state"])
            preds.append(_predict(self.objective, model, valid_loader, self.device)[0])
            flats.append(torch.cat([q.detach().flatten() for q in model.parameters()]))
        pairs = [(i, j) for i in range(len(preds)) for j in range(i + 1, len(preds))]
        disagree = statistics.fmean(self.objective.disagreement(preds[i], preds[j]) for i, j in pairs) if pairs else 0.0
        dist = [float((a - b).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(flats, flats[1:])]
        return {"disagreement": disagree, "relative_distance": statistics.fmean(dist) if dist else 0.0}

    def _candidates_of(self, tag: str, lam: float, temperature: float, logps: dict, members: dict,
                       dense_cost: dict, sparsities, counts, y: Tensor) -> list[dict]:
        rows = []
        for s in sparsities:
            for m in counts:
                if len(logps[s]) < m:
                    continue
                scores = self.objective.scores(self.objective.combine(logps[s][:m]), y)
                cost = {"params": sum(self._structure.params(x) for x in members[s][:m]),
                        "flops": sum(self._flops(x) for x in members[s][:m])}
                rows.append({"name": f"SGLD+GSP+PR {_pct(s)}% x{m}", "chain": tag, "lam": lam, "temperature": temperature,
                             "sparsity": s, "members": m, **{f"valid_{k}": v for k, v in scores.items()},
                             "params_ratio": cost["params"] / dense_cost["params"],
                             "flops_ratio": cost["flops"] / dense_cost["flops"]})
        return rows

    @torch.no_grad()
    def _time_candidates(self, rows: list[dict], found: dict, valid_loader) -> None:
        """``latency_ms`` and ``latency_ratio`` (to the dense network) of every candidate's graph
        module (:meth:`graph_module`: fused where the members allow) on one valid batch, medians of
        interleaved rounds at the current device and thread count."""
        r = self.recipe
        if not r.latency_repeats:
            if "latency" in self.budget:
                raise ValueError("a latency budget needs Recipe.latency_repeats > 0")
            return
        x = next(iter(_batches(valid_loader, self.device)))[0]
        modules = []
        for row in rows:
            members = found["dense"] if row["chain"] is None else found[(row["chain"], row["sparsity"], row["members"])]
            modules.append(_graph_of(members, self.objective).to(self.device))
        ms = median_ms({i: (lambda f=f: f(x)) for i, f in enumerate(modules)}, r.latency_repeats)
        for i, row in enumerate(rows):
            row["latency_ms"] = ms[i]
            row["latency_ratio"] = ms[i] / ms[0]
        self.diagnostics["latency_batch"] = len(x)

    def fit(self, train_loader, valid_loader) -> "SparseEnsemble":
        """Run the recipe, score every candidate on ``valid_loader`` and keep the chosen one."""
        r = self.recipe
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = {"recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()},
                    "budget": self.budget, "task": self.task, "noise_std": getattr(self.objective, "noise_std", None)}
        settings = json.loads(json.dumps(settings))
        prior = checkpoint.read_json(self.workdir / "settings.json", default=None)
        if prior is not None:  # only what the work on disk depends on must match; grids and budget may change
            defaults = json.loads(json.dumps(asdict(Recipe())))
            differ = [k for k, v in settings["recipe"].items() if k not in _FREE
                      and prior.get("recipe", {}).get(k, defaults[k]) != v]
            differ += [k for k in ("task", "noise_std") if prior.get(k) != settings[k]]
            if differ:
                raise ValueError(f"{self.workdir} holds a fit made with other {', '.join(differ)} "
                                 f"({ {k: prior.get('recipe', {}).get(k, prior.get(k)) for k in differ} }); pass another workdir, "
                                 "or the same settings to resume it")
        checkpoint.atomic_write_json(self.workdir / "settings.json", settings)
        self._log(f"sparse ensemble: {self.structure['reason']}; working in {self.workdir}")
        t0 = time.perf_counter()
        self.input_shape = list(_xy(next(iter(train_loader)))[0].shape[1:])
        dense = self._dense(train_loader)
        obj = self.objective
        dense_pred, y = _predict(obj, dense, valid_loader, self.device)
        dense_cost = {"params": self._structure.params(dense), "flops": self._flops(dense)}
        dense_scores = obj.scores(obj.combine([dense_pred]), y)
        rows = [{"name": "SGD x1 (dense)", "chain": None, "lam": None, "temperature": None, "sparsity": 0.0,
                 "members": 1, **{f"valid_{k}": v for k, v in dense_scores.items()},
                 "params_ratio": 1.0, "flops_ratio": 1.0}]
        # the dense candidate as a compacted kind too (same size), so it saves and exports like the others
        found = {"dense": [self._structure.compact(dense.eval(), self.input_shape).to(self.device)
                           if self.structure["compacts"] else dense]}
        grid = [(lam, t) for lam in r.lams for t in r.temperatures]
        mid = sorted(r.sparsities)[len(r.sparsities) // 2]
        key = "valid_nll" if r.select == "nll" else f"valid_{obj.error_name}"
        survivors = grid
        if len(grid) > 1:  # successive halving: two members at the middle sparsity decide who goes on
            scores = []
            for lam, t in grid:
                samples = self._chain(dense, lam, t, train_loader)
                probe = [self._member(dense, samples[k], mid, k, train_loader) for k in range(min(2, r.samples))]
                ens = obj.combine([_predict(obj, m, valid_loader, self.device)[0] for m in probe])
                scores.append(obj.scores(ens, y)[key[len("valid_"):]])
                self._log(f"halving: lam {lam:g} T {t:g}: valid {r.select} {scores[-1]:.4f} with {len(probe)} members")
            order = sorted(range(len(grid)), key=lambda i: scores[i])
            survivors = [grid[i] for i in order[:max(1, len(grid) // 2)]]
            self.diagnostics["halving"] = [{"lam": lam, "temperature": t, f"valid_{r.select}": s}
                                           for (lam, t), s in zip(grid, scores)]
        for lam, t in survivors:
            tag = _tag(lam, t)
            samples = self._chain(dense, lam, t, train_loader)
            div = self._diversity(samples, dense, valid_loader)
            self.diagnostics[tag] = div
            if div["disagreement"] < 0.05 * dense_scores[obj.error_name] or div["relative_distance"] < 1e-3:
                warnings.warn(CollapseWarning(
                    f"chain {tag}: its {len(samples)} samples are nearly one network (pairwise disagreement "
                    f"{div['disagreement']:.4g} on valid against a dense valid {obj.error_name} of "
                    f"{dense_scores[obj.error_name]:.4g}, consecutive samples "
                    f"{100 * div['relative_distance']:.3f}% apart): the ensemble adds little over a point estimate; "
                    "raise the temperature or the chain's step (Recipe.temperatures, Recipe.chain_lr)"))
            logps, members = {}, {}
            for s in r.sparsities:
                members[s] = [self._member(dense, samples[k], s, k, train_loader) for k in range(r.samples)]
                logps[s] = [_predict(obj, m, valid_loader, self.device)[0] for m in members[s]]
                found.update({(tag, s, m): members[s][:m] for m in r.members})
            rows += self._candidates_of(tag, lam, t, logps, members, dense_cost, r.sparsities, r.members, y)
        self._time_candidates(rows, found, valid_loader)
        for row in rows:
            row["within_budget"] = all(row[f"{k}_ratio"] <= v + 1e-12 for k, v in self.budget.items())
        eligible = [row for row in rows if row["within_budget"]]
        if not eligible:
            checkpoint.atomic_write_json(self.workdir / "fit.json", {"candidates": rows, "diagnostics": self.diagnostics,
                                                                      **settings})
            lowest = {k: min(row[f"{k}_ratio"] for row in rows) for k in self.budget}
            raise ValueError(f"no candidate fits the budget {self.budget} (the lowest ratios reached: {lowest}); "
                             f"raise the budget, or add higher sparsities or fewer members; the candidates are in "
                             f"{self.workdir / 'fit.json'} and the work is kept for the next call")
        best = min(eligible, key=lambda row: (row[key], row["params_ratio"]))
        for row in rows:
            row["chosen"] = row is best
        self.candidates, self.chosen = rows, best
        chosen_members = found["dense"] if best["chain"] is None else found[(best["chain"], best["sparsity"], best["members"])]
        self.members = nn.ModuleList(m.eval() for m in chosen_members)
        self.diagnostics["fit_seconds"] = time.perf_counter() - t0
        checkpoint.atomic_write_json(self.workdir / "fit.json", {"candidates": rows, "diagnostics": self.diagnostics,
                                                                  **settings})
        self.plot_frontier(self.workdir / "frontier.png")
        self._log(self.report(print_table=False) + f"\nfrontier: {self.workdir / 'frontier.png'}")
        return self

    def plot_frontier(self, path) -> Path:
        """The candidates' valid NLL and valid error (or RMSE) against their parameter ratio to one
        dense model, one marker per chain, the budget as a vertical line, the chosen one circled."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.candidates:
            raise RuntimeError("nothing to plot: call fit() first")
        err = self.objective.error_name
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        chains = sorted({r["chain"] or "dense" for r in self.candidates})
        for ax, key in zip(axes, ("valid_nll", f"valid_{err}")):
            for i, chain in enumerate(chains):
                rows = [r for r in self.candidates if (r["chain"] or "dense") == chain]
                ax.scatter([r["params_ratio"] for r in rows], [r[key] for r in rows], marker="os^vD<>"[i % 7],
                           label=chain, s=28)
                for r in rows:
                    if r["chain"]:
                        ax.annotate(f"{_pct(r['sparsity'])}% x{r['members']}", (r["params_ratio"], r[key]),
                                    fontsize=6, xytext=(3, 3), textcoords="offset points")
            c = self.chosen
            ax.scatter([c["params_ratio"]], [c[key]], s=160, facecolors="none", edgecolors="red", linewidths=1.5,
                       label="chosen")
            if "params" in self.budget:
                ax.axvline(self.budget["params"], color="grey", linestyle="--", linewidth=1, label="budget")
            ax.set(xlabel="parameters (x one dense model)", ylabel=key.replace("_", " "))
        axes[0].legend(fontsize=7)
        fig.suptitle("candidates on the validation split", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # -- using the result ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Classification: the log of the mean of the chosen members' probabilities ``(N, C)``;
        regression: the mean and variance of the members' Gaussian mixture ``(N, 2)``."""
        if not len(self.members):
            raise RuntimeError("this SparseEnsemble has no members yet: call fit(train_loader, valid_loader) or load()")
        obj = self.objective
        return obj.output(obj.combine([obj.predict(m(x)) for m in self.members]))

    @torch.no_grad()
    def measure_latency(self, x: Tensor, repeats: int = 21) -> dict:
        """Median milliseconds of one forward pass on ``x`` (same device and thread count, interleaved
        rounds): the members one by one (``ensemble_ms``, what ``ens(x)`` does), the exported graph
        module (``fused_ms``: compacted MLP members fused into batched matmuls) and one dense network
        of the template's architecture (``dense_ms``); ratios to the dense network."""
        self.eval()
        dense = copy.deepcopy(self.template).eval()
        fused = self.graph_module()
        ms = median_ms({"ensemble": lambda: self(x), "fused": lambda: fused(x), "dense": lambda: dense(x)}, repeats)
        out = {f"{k}_ms": v for k, v in ms.items()}
        out["ratio"] = out["ensemble_ms"] / out["dense_ms"]
        out["fused_ratio"] = out["fused_ms"] / out["dense_ms"]
        return out

    def report(self, print_table: bool = True) -> str:
        """Every candidate's valid error and NLL, parameter and FLOPs ratios to one dense model,
        whether it fits the budget; the chosen one marked ``<-``."""
        if not self.candidates:
            raise RuntimeError("nothing to report: call fit() first")
        names = self.objective.metric_names
        head = "".join(f" {'valid ' + n:>16}" for n in names)
        lat = "latency_ratio" in self.candidates[0]
        lines = [f"{'candidate':<26} {'chain':<16}{head} {'params':>7} {'FLOPs':>7}{' latency' if lat else ''}  budget",
                 "-" * (78 + 17 * len(names))]
        for row in self.candidates:
            cells = "".join(f" {row[f'valid_{n}']:>16.4f}" for n in names)
            latency = f" {row['latency_ratio']:>6.2f}x" if lat else ""
            lines.append(f"{row['name']:<26} {row['chain'] or '-':<16}{cells} {row['params_ratio']:>6.2f}x "
                         f"{row['flops_ratio']:>6.2f}x{latency}  {'yes' if row['within_budget'] else 'no ':<3}"
                         f"{'  <- chosen' if row['chosen'] else ''}")
        for tag, d in self.diagnostics.items():
            if isinstance(d, dict) and "disagreement" in d:
                lines.append(f"chain {tag}: samples' pairwise disagreement on valid {d['disagreement']:.4f} "
                             f"({self.objective.error_name} scale), consecutive samples "
                             f"{100 * d['relative_distance']:.2f}% apart")
        text = "\n".join(lines)
        if print_table:
            print(text)
        return text

    def evaluate(self, loader, members: Optional[Sequence[nn.Module]] = None) -> dict:
        """The objective's scores of the chosen ensemble (or of ``members``) on ``loader``, such as a
        test split read after the choice: error and NLL; RMSE, NLL and coverage; or perplexity and NLL."""
        members = list(self.members if members is None else members)
        if not members:
            raise RuntimeError("nothing to evaluate: call fit() or load() first")
        preds = [_predict(self.objective, m, loader, self.device) for m in members]
        return self.objective.scores(self.objective.combine([p for p, _ in preds]), preds[0][1])

    def save(self, path) -> Path:
        """The chosen members as a JSON spec plus a tensors-only file (no pickled code):
        ``spec.json`` and ``tensors.pt`` in the folder ``path``."""
        if not len(self.members):
            raise RuntimeError("nothing to save: call fit() first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        specs, tensors = [], {}
        for i, m in enumerate(self.members):
            spec = m.spec() if hasattr(m, "spec") else None  # None: the user's template, reloaded via load(model=)
            specs.append(spec)
            tensors.update({f"{i}.{k}": v for k, v in checkpoint.cpu_state(m).items()})
        checkpoint.atomic_write_json(path / "spec.json", {"format": "sparse_ensemble/1", "task": self.task,
                                                          "noise_std": getattr(self.objective, "noise_std", None),
                                                          "members": specs, "chosen": self.chosen,
                                                          "budget": self.budget})
        checkpoint.atomic_save(tensors, path / "tensors.pt")
        return path

    def graph_module(self) -> nn.Module:
        """The chosen members as one module for export: compacted MLP members fused into batched
        matmuls (:class:`~sparse_ensembles.compact.FusedMLPEnsemble`, no loop over members), others
        stacked (the loop is unrolled into the one graph when traced)."""
        if not len(self.members):
            raise RuntimeError("nothing to export: call fit() or load() first")
        return _graph_of(list(self.members), self.objective)

    @torch.no_grad()
    def export(self, path, example_inputs: Tensor, repeats: int = 21, atol: float = 1e-5) -> dict:
        """Export the ensemble as one graph with a dynamic batch dimension: ``*.onnx`` (torch's
        dynamo ONNX exporter; checked with onnxruntime) or ``*.pt2`` (``torch.export``). The file
        is reloaded and run on ``example_inputs``; the largest absolute difference from the eager
        ensemble must be within ``atol``. Returns ``{"path", "max_abs_diff", "eager_ms",
        "exported_ms"}`` (medians of ``repeats`` interleaved calls on ``example_inputs``)."""
        path = Path(path)
        graph = copy.deepcopy(self.graph_module()).cpu()  # copies: the ensemble stays on its device
        x = example_inputs.detach().cpu()
        if len(x) < 2:
            raise ValueError("export needs example_inputs with a batch of at least 2 rows (the batch dimension is "
                             "exported as dynamic)")
        eager = copy.deepcopy(self).cpu().eval()
        want = eager(x)
        batch = torch.export.Dim("batch", min=1)
        if path.suffix == ".pt2":
            with warnings.catch_warnings():  # nn.LSTM re-assigns its flat weight list while traced (harmless: parity is checked)
                warnings.filterwarnings("ignore", message=".*were assigned during export")
                program = torch.export.export(graph, (x,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
            run = torch.export.load(str(path)).module()
            got_fn = lambda: run(x)  # noqa: E731
        elif path.suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise RuntimeError("ONNX export is checked with onnxruntime: pip install the pinned onnxruntime, onnx "
                                   "and onnxscript (requirements.txt)") from None
            import logging
            quiet = logging.getLogger("torch.onnx")  # it lists the torchvision ops it skips
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(graph, (x,), str(path), input_names=["x"], output_names=["logp"],
                                      dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
            finally:
                quiet.setLevel(level)
            sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = {"x": x.numpy()}
            got_fn = lambda: torch.from_numpy(sess.run(None, feed)[0])  # noqa: E731
        else:
            raise ValueError(f"export writes *.onnx or *.pt2, not {path.name!r}")
        diff = float((got_fn() - want).abs().max())
        if not diff <= atol:
            raise RuntimeError(f"the exported graph differs from the eager ensemble by {diff:g} (> {atol:g}) on "
                               f"example_inputs; {path} was written but should not be used")
        ms = median_ms({"eager": lambda: eager(x), "exported": got_fn}, repeats)
        return {"path": str(path), "max_abs_diff": diff, "eager_ms": ms["eager"], "exported_ms": ms["exported"]}

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None, device="cpu") -> "SparseEnsemble":
        """An ensemble saved by :meth:`save`; ``model`` (the architecture) is needed only when its
        members are not compacted kinds (a user model kept at full size)."""
        path = Path(path)
        spec = checkpoint.read_json(path / "spec.json", fix="save the ensemble again")
        if not isinstance(spec, dict) or spec.get("format") != "sparse_ensemble/1":
            raise checkpoint.RunFileError(path / "spec.json", "it is not a saved SparseEnsemble", "save the ensemble again")
        tensors = checkpoint.load(path / "tensors.pt", fix="save the ensemble again")
        members = []
        for i, s in enumerate(spec["members"]):
            state = {k[len(f"{i}."):]: v for k, v in tensors.items() if k.startswith(f"{i}.")}
            if s is None:
                if model is None:
                    raise ValueError(f"{path}: member {i} is the user's own architecture; pass it: "
                                     "SparseEnsemble.load(path, model=YourModel(...))")
                m = copy.deepcopy(model)
                m.load_state_dict(state)
            else:
                m = from_spec(s, state)
            members.append(m.to(device).eval())
        template = model if model is not None else members[0]
        task = spec["task"]
        if task == "regression" and spec.get("noise_std") is not None:
            task = Regression(spec["noise_std"])
        ens = cls(template, task=task, budget=spec["budget"], workdir=path, device=device, progress=False)
        ens.members = nn.ModuleList(members)
        ens.chosen = spec["chosen"]
        return ens.eval()
