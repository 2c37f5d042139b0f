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
from ..data.text import bptt_segments
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
    clips = {k: getattr(cfg, k).max_grad_norm for k in ("sgd", "sampler", "retrain")}
    if len(set(clips.values()) - {0.0}) > 1 or (len(set(clips.values())) > 1 and clips["sgd"] == 0):
        raise ConfigError(f"fit clips every stage's gradient alike (Recipe.max_grad_norm); the config sets {clips}: "
                          "give sgd, sampler and retrain the same max_grad_norm")
    return Recipe(sgd_epochs=cfg.sgd.epochs, sgd_lr=cfg.sgd.lr, sgd_decay_every=cfg.sgd.decay_every,
                  sgd_lr_decay=cfg.sgd.lr_decay, sgd_decay_start=cfg.sgd.decay_start, max_grad_norm=clips["sgd"],
                  chain_lr=s.lr, lams=tuple(lams or (p.lam,)),
                  temperatures=tuple(temperatures or (s.temperature,)), precision=p.precision, burn_in=s.burn_in,
                  thin=s.thin, sparsities=tuple(cfg.prune.sparsities), members=tuple(members or (s.samples,)),
                  group_threshold=cfg.prune.group_threshold, retrain_epochs=cfg.retrain.epochs,
                  retrain_lr=cfg.retrain.lr, retrain_lr_decay=cfg.retrain.lr_decay, seed=cfg.experiment.seed)


class _ClassificationData:
    """Image / feature classification configs: shuffled minibatches; test scored by error, NLL, ECE."""
    objective = "classification"

    def __init__(self, cfg: Config):
        self.cfg, self.task = cfg, task_class("classification").from_config(cfg.task, "cpu")
        if not len(self.task.data["valid"][1]):
            raise ConfigError("fit chooses on the validation split: set task.valid_size > 0")

    def loaders(self):
        g = torch.Generator().manual_seed(self.cfg.experiment.seed)
        data = self.task.data
        return (DataLoader(TensorDataset(*data["train"]), batch_size=self.cfg.task.batch_size, shuffle=True, generator=g),
                DataLoader(TensorDataset(*data["valid"]), batch_size=1000))

    @torch.no_grad()
    def test_scores(self, ens: SparseEnsemble, dense) -> dict:
        x, y = self.task.data["test"]
        return {"chosen: " + ens.chosen["name"]: metrics.classification_metrics(ens.eval()(x), y),
                "SGD x1 (dense)": metrics.classification_metrics(metrics.predict_logprobs(dense, x), y)}

    @staticmethod
    def line(m: dict) -> str:
        return f"error {100 * m['error']:6.2f}%  NLL {m['nll']:.4f}  ECE {100 * m['ece']:.2f}%"


class _LanguageModelData:
    """Language-model configs: each split one token stream in BPTT segments, in order (the state is
    carried); test scored by perplexity on the target word."""
    objective = "language_model"

    def __init__(self, cfg: Config):
        self.task = task_class("language_model").from_config(cfg.task, "cpu")
        if "valid" not in self.task.batched:
            raise ConfigError("fit chooses on the validation split: the corpus needs more valid tokens than "
                              "task.eval_batch_size (task.valid_tokens = 0 reads them all)")

    def _segments(self, split: str) -> list:
        return list(bptt_segments(self.task.batched[split], self.task.bptt))

    def loaders(self):
        return self._segments("train"), self._segments("valid")

    def test_scores(self, ens: SparseEnsemble, dense) -> dict:
        test = self._segments("test")
        return {"chosen: " + ens.chosen["name"]: ens.evaluate(test), "SGD x1 (dense)": ens.evaluate(test, [dense])}

    @staticmethod
    def line(m: dict) -> str:
        return f"perplexity {m['ppl']:8.2f}  NLL {m['nll']:.4f}"


_DATA = {d.objective: d for d in (_ClassificationData, _LanguageModelData)}


def fit_config(cfg: Config, out: Path, budget: dict, *, lams=None, temperatures=None, members=None,
               progress: bool = True) -> dict:
    """Fit, choose on valid, then score the choice and the dense network on test once."""
    kind = cfg.kinds.get("task")
    if kind not in _DATA:
        raise ConfigError(f"fit runs {' and '.join(sorted(_DATA))} configs; task kind {kind!r} is not supported yet")
    recipe = recipe_of(cfg, lams, temperatures, members)
    data = _DATA[kind](cfg)
    torch.manual_seed(cfg.experiment.seed)  # the network's initial weights depend on the seed only
    model = model_class(cfg.kinds["model"]).from_config(cfg.model, data.task.dims)
    train, valid = data.loaders()
    torch.manual_seed(cfg.experiment.seed)
    ens = SparseEnsemble(model, task=data.objective, budget=budget, recipe=recipe, workdir=out / "work",
                         progress=progress)
    ens.fit(train, valid)
    if not progress:  # fit printed its report already when it shows progress
        print(ens.report(print_table=False))
    ens.save(out / "ensemble")
    # the choice is made: the test split is read once
    dense = copy.deepcopy(ens.template)
    dense.load_state_dict(checkpoint.load(out / "work" / "dense.pt")["state"])
    dense.eval()
    rows = data.test_scores(ens, dense)
    result = {"chosen": ens.chosen, "budget": budget, "test": rows}
    checkpoint.atomic_write_json(out / "fit_test.json", result)
    print("\ntest split (read once, after the choice):")
    for name, m in rows.items():
        print(f"  {name:<34} {data.line(m)}")
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
