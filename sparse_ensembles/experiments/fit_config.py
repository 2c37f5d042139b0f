"""``sparse-ensembles fit CONFIG``: the one-call API (:mod:`sparse_ensembles.fit`) over an experiment
config. The config's ``[task]`` gives the data (train and valid only reach ``fit``), its ``[model]``
the network, and its ``[sgd]``, ``[sampler]``, ``[prior]``, ``[prune]`` and ``[retrain]`` sections the
recipe; the grids that ``fit`` searches (group-Lasso strengths, temperatures, member counts) and the
budget come from the command line. After the choice, the test split is read once: the chosen
ensemble's and the dense network's test metrics are printed and written to ``OUT/fit_test.json``;
the ensemble is saved to ``OUT/ensemble`` (tensors + JSON).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from .. import checkpoint, metrics
from ..fit import Recipe, SparseEnsemble
from ..models.registry import model_class
from ..tasks.base import task_class
from .config import Config, ConfigError


def recipe_of(cfg: Config, lams: Optional[Sequence[float]] = None, temperatures: Optional[Sequence[float]] = None,
              members: Optional[Sequence[int]] = None) -> Recipe:
    """The config's schedule as a :class:`~sparse_ensembles.fit.Recipe`; the grids default to the
    config's single values."""
    if cfg.kinds.get("sampler") != "sgld" or cfg.kinds.get("prior") != "group_lasso":
        raise ConfigError("fit runs SGLD with the group Lasso: the config needs [sampler] kind = \"sgld\" and "
                          "[prior] kind = \"group_lasso\"")
    s, p = cfg.sampler, cfg.prior
    return Recipe(sgd_epochs=cfg.sgd.epochs, sgd_lr=cfg.sgd.lr, sgd_decay_every=cfg.sgd.decay_every,
                  sgd_lr_decay=cfg.sgd.lr_decay, chain_lr=s.lr, lams=tuple(lams or (p.lam,)),
                  temperatures=tuple(temperatures or (s.temperature,)), precision=p.precision, burn_in=s.burn_in,
                  thin=s.thin, sparsities=tuple(cfg.prune.sparsities), members=tuple(members or (s.samples,)),
                  group_threshold=cfg.prune.group_threshold, retrain_epochs=cfg.retrain.epochs,
                  retrain_lr=cfg.retrain.lr, retrain_lr_decay=cfg.retrain.lr_decay, seed=cfg.experiment.seed)


def fit_config(cfg: Config, out: Path, budget: dict, *, lams=None, temperatures=None, members=None,
               progress: bool = True) -> dict:
    """Fit, choose on valid, then score the choice and the dense network on test once."""
    if cfg.kinds.get("task") != "classification":
        raise ConfigError(f"fit runs classification configs; task kind {cfg.kinds.get('task')!r} is not supported yet")
    recipe = recipe_of(cfg, lams, temperatures, members)
    task = task_class("classification").from_config(cfg.task, "cpu")
    torch.manual_seed(cfg.experiment.seed)  # the network's initial weights depend on the seed only
    model = model_class(cfg.kinds["model"]).from_config(cfg.model, task.dims)
    g = torch.Generator().manual_seed(cfg.experiment.seed)
    train = DataLoader(TensorDataset(*task.data["train"]), batch_size=cfg.task.batch_size, shuffle=True, generator=g)
    valid = DataLoader(TensorDataset(*task.data["valid"]), batch_size=1000)
    if not len(valid.dataset):
        raise ConfigError("fit chooses on the validation split: set task.valid_size > 0")
    torch.manual_seed(cfg.experiment.seed)
    ens = SparseEnsemble(model, budget=budget, recipe=recipe, workdir=out / "work", progress=progress)
    ens.fit(train, valid)
    if not progress:  # fit printed its report already when it shows progress
        print(ens.report(print_table=False))
    ens.save(out / "ensemble")
    # the choice is made: the test split is read once
    x, y = task.data["test"]
    dense = copy.deepcopy(model)
    dense.load_state_dict(checkpoint.load(out / "work" / "dense.pt")["state"])
    dense.eval()
    with torch.no_grad():
        rows = {"chosen: " + ens.chosen["name"]: metrics.classification_metrics(ens.eval()(x), y),
                "SGD x1 (dense)": metrics.classification_metrics(metrics.predict_logprobs(dense, x), y)}
    result = {"chosen": ens.chosen, "budget": budget, "test": rows}
    checkpoint.atomic_write_json(out / "fit_test.json", result)
    print("\ntest split (read once, after the choice):")
    for name, m in rows.items():
        print(f"  {name:<34} error {100 * m['error']:6.2f}%  NLL {m['nll']:.4f}  ECE {100 * m['ece']:.2f}%")
    print(f"ensemble saved to {out / 'ensemble'}; candidates and frontier in {out / 'work'}")
    return result


def parse_budget(text: str) -> dict:
    """``"params=1.0"`` or ``"params=1,flops=3"`` -> ``{"params": 1.0, ...}``; ``"none"`` -> no limit."""
    if text.strip().lower() == "none":
        return {}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--budget {text!r}: write KEY=RATIO[,KEY=RATIO] with KEY params or flops, "
                              "e.g. params=1.0") from None
        if key.strip() not in ("params", "flops") or not out[key.strip()] > 0:
            raise ConfigError(f"--budget {text!r}: KEY is params or flops and RATIO a positive number (a multiple "
                              "of one dense model), e.g. params=1.0; or none")
    return out
