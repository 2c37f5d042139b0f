"""Image classification on IDX datasets (MNIST, Fashion-MNIST): cross-entropy, error, NLL, ECE, Brier."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from ..data import image_datasets, load_image_dataset
from ..training import minibatches
from .base import EnsembleStream, register_task


@register_task("classification")
class Classification:
    """Train / valid / test tensors held on the device; shuffled minibatches; the validation split
    is the *last* ``valid_size`` training images (the first ones train), so the test set is only
    read for the table."""

    @dataclass
    class Config:
        dataset: str = "mnist"  # mnist | fashion-mnist | cifar10 (sparse_ensembles.data.image_datasets())
        path: str = ""  # a directory with the IDX files; empty = search (see data.registry)
        download: bool = False  # opt-in fetch from the canonical mirror, checksum-verified
        batch_size: int = 100
        valid_size: int = 10000  # held out from the end of the training set; 0 = the paper's protocol
        train_subset: int = 0  # train on the first n of the remaining training images (0 = all)
        test_subset: int = 0  # evaluate on the first n test images (0 = all)
        eval_batch_size: int = 1000
        ood: str = ""  # evaluation also scores OOD detection against this dataset's test images ("" = none)

        def validate(self, need) -> None:
            need(self.dataset in image_datasets(), "task.dataset", f"unknown dataset {self.dataset!r}; known: {image_datasets()}")
            need(self.batch_size >= 1, "task.batch_size", "must be >= 1")
            need(self.eval_batch_size >= 1, "task.eval_batch_size", "must be >= 1")
            need(0 <= self.valid_size < 60000, "task.valid_size", "must be in [0, 60000) (0 = no validation split)")
            need(self.train_subset >= 0, "task.train_subset", "must be >= 0 (0 = all)")
            need(self.test_subset >= 0, "task.test_subset", "must be >= 0 (0 = all)")
            need(self.ood in ("", *image_datasets()) and self.ood != self.dataset, "task.ood",
                 f"use another image dataset of the same shape ({image_datasets()}) or \"\"")

    columns = ("error", "nll", "ece", "brier")

    def __init__(self, train: tuple[Tensor, Tensor], valid: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], *,
                 batch_size: int = 100, eval_batch_size: int = 1000, device="cpu", name: str = "data"):
        self.device = torch.device(device)
        self.data = {s: (x.to(self.device), y.to(self.device)) for s, (x, y) in
                     (("train", train), ("valid", valid), ("test", test))}
        self.batch_size, self.eval_batch_size, self.name = batch_size, eval_batch_size, name
        self._ood: dict[tuple[str, str], Tensor] = {}
        x = self.data["train"][0]
        self.num_train = len(x)
        self.dims = {"in_features": int(x[0].numel()), "classes": int(max(int(y.max()) for _, y in self.data.values() if len(y)) + 1)}

    @classmethod
    def from_config(cls, cfg: "Classification.Config", device="cpu") -> "Classification":
        xtr, ytr, xte, yte = load_image_dataset(cfg.dataset, cfg.path or None, allow_download=cfg.download)
        if cfg.valid_size >= len(xtr):
            raise ValueError(f"task.valid_size = {cfg.valid_size} leaves nothing to train on: {cfg.dataset} has "
                             f"{len(xtr)} training images; use fewer (e.g. {len(xtr) // 6})")
        n_train = len(xtr) - cfg.valid_size
        valid = (xtr[n_train:], ytr[n_train:])
        xtr, ytr = xtr[:n_train], ytr[:n_train]
        if cfg.train_subset:
            xtr, ytr = xtr[: cfg.train_subset], ytr[: cfg.train_subset]
        if cfg.test_subset:
            xte, yte = xte[: cfg.test_subset], yte[: cfg.test_subset]
        return cls((xtr, ytr), valid, (xte, yte), batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                   device=device, name=cfg.dataset)

    def describe(self) -> str:
        sizes = " / ".join(f"{len(self.data[s][1])} {s}" for s in ("train", "valid", "test"))
        return f"{self.name}: {sizes} images"

    def check_model(self, model: nn.Module) -> None:
        x = self.data["train"][0][:2]
        try:
            out = model.to(self.device)(x)
        except RuntimeError as e:
            raise ValueError(f"the model does not accept {self.name} inputs of shape {tuple(x.shape[1:])} "
                             f"({self.dims['in_features']} features): {e}") from None
        if out.shape[-1] != self.dims["classes"]:
            raise ValueError(f"the model has {out.shape[-1]} outputs but {self.name} has {self.dims['classes']} classes")

    # -- training ------------------------------------------------------------------------------
    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled pass (the order drawn on the CPU generator: the same on every device)."""
        return minibatches(*self.data["train"], self.batch_size, generator)

    def steps_per_epoch(self) -> int:
        return -(-self.num_train // self.batch_size)

    def loss(self, model: nn.Module, batch, state=None):
        x, y = batch
        return F.cross_entropy(model(x), y), None

    @staticmethod
    def output_loss(outputs: Tensor, y: Tensor) -> Tensor:
        """The mean loss of outputs already computed (vectorised chains batch the forward pass)."""
        return F.cross_entropy(outputs, y)

    # -- distillation (issue 12): a teacher cache over the training rows, in order ------------------
    def distill_inputs(self) -> Tensor:
        """The training inputs in cache-row order."""
        return self.data["train"][0]

    def distill_batches(self, generator: torch.Generator):
        """Shuffled ``(x, y, rows)``: ``rows`` index the teacher cache (``cache.lookup(rows)``)."""
        x, y = self.data["train"]
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), self.batch_size):
            rows = perm[i:i + self.batch_size]
            idx = rows.to(self.device)
            yield x[idx], y[idx], rows

    def logits(self, model: nn.Module, x: Tensor, state=None):
        return model(x), None

    # -- evaluation ----------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return [s for s in ("valid", "test") if len(self.data[s][1])]

    def stream(self, split: str) -> EnsembleStream:
        x, y = self.data[split]
        score = lambda model: metrics.predict_logprobs(model, x, self.eval_batch_size)
        return EnsembleStream(score, lambda logp: metrics.classification_metrics(logp, y), track_entropy=True)

    # -- uncertainty (issue 12) -------------------------------------------------------------------
    def ood_stream(self, dataset: str, path: str = "", split: str = "test") -> EnsembleStream:
        """The images of another dataset of the same shape (MNIST <-> Fashion-MNIST), scored
        without labels, for out-of-distribution detection: its test images (``split="test"``), or
        for ``split="valid"`` as many of its last training images as this task has validation
        images, so that settings can be chosen on OOD detection without reading any test set."""
        if dataset == self.name:
            raise ValueError(f"ood dataset {dataset} is the task's own dataset; pick another (e.g. fashion-mnist for mnist)")
        if (dataset, split) not in self._ood:
            x_train, _, x, _ = load_image_dataset(dataset, path or None)
            if x[0].numel() != self.dims["in_features"]:
                raise ValueError(f"ood dataset {dataset}: its images have {x[0].numel()} features, {self.name}'s "
                                 f"{self.dims['in_features']}; pick a dataset of the same shape")
            if split == "valid":
                x = x_train[-len(self.data["valid"][1]):]
            self._ood[(dataset, split)] = x.to(self.device)
        x = self._ood[(dataset, split)]
        score = lambda model: metrics.predict_logprobs(model, x, self.eval_batch_size)
        return EnsembleStream(score, lambda logp: {}, track_entropy=True)

    def uncertainty(self, stream: EnsembleStream, ood: EnsembleStream | None = None, split: str = "test") -> dict:
        """Selective prediction (AURC, error at 80% coverage) on ``split`` (``stream`` is its
        stream), and, given an OOD stream, detection by predictive entropy and (ensembles) mutual
        information (OOD = positive, higher score = more likely OOD)."""
        from .. import uncertainty as U

        y = self.data[split][1]
        mean = stream.mean_logp
        top, pred = mean.max(1)
        correct = pred == y
        out = {"aurc": U.aurc(top.exp(), correct), "error_at_80": U.error_at_coverage(top.exp(), correct, 0.8)}
        if ood is not None:
            h_in, h_out = U.predictive_entropy(mean), U.predictive_entropy(ood.mean_logp)
            out.update({f"ood_{k}": v for k, v in U.ood_metrics(h_in, h_out).items()})
            if stream.members > 1:
                mi_in = U.mutual_information(mean, stream.expected_entropy)
                mi_out = U.mutual_information(ood.mean_logp, ood.expected_entropy)
                out.update({f"ood_{k}_mi": v for k, v in U.ood_metrics(mi_in, mi_out).items()})
        return out

    def reliability(self, stream: EnsembleStream, split: str = "test") -> dict:
        """The reliability diagram's bins (the same bins as the ECE)."""
        from .. import uncertainty as U
        return U.reliability(stream.mean_logp, self.data[split][1], log=True)

    def probe(self, model: nn.Module) -> Tensor:
        with torch.no_grad():
            return model(self.data["test"][0][:256])
