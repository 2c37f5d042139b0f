"""The SSE experiment as resumable stages over a run directory.

    config -> SGD baselines -> SGLD chain (Gaussian prior) -> SGLD chain (group sparse prior)
           -> prune + masked retrain + compact each GSP sample, per sparsity -> evaluate

Layout of a run directory::

    config.toml                  the resolved config
    sgd/member_000.pt ...        trained baselines (dense)
    sgld/sample_000.pt ...       samples, written when collected; chain.pt = resumable chain state
    sgld_gsp/...                 the same for the group-sparse chain
    pruned_96/member_000.pt ...  compacted members (CompactMLP), one folder per sparsity
    metrics/<method>.json        per-method metrics, incl. the curve over the number of members
    results.json, *.png          the table and the pictures

Every file is written atomically, and each stage skips what is already on disk, so ``--resume``
after an interruption (or a divergence fixed by a config change) loses nothing finished.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint, metrics, pruning
from ..compact import compact_mlp
from ..data import load_idx_dataset
from ..ensembles import mean_of_probs
from ..models import mlp
from ..priors import Gaussian, GroupLasso, Sum
from ..samplers import SGLD, Cyclical
from ..structure import groups_of
from ..training import minibatches, train_epoch
from .config import Config, to_toml


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked."""


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(cfg: Config) -> Data:
    d = cfg.data
    xtr, ytr, xte, yte = load_idx_dataset(d.name, d.path or None, allow_download=d.download)
    if d.train_subset:
        xtr, ytr = xtr[: d.train_subset], ytr[: d.train_subset]
    if d.test_subset:
        xte, yte = xte[: d.test_subset], yte[: d.test_subset]
    if xtr[0].numel() != cfg.model.sizes[0]:
        raise ValueError(f"model.sizes[0] = {cfg.model.sizes[0]} but {d.name} inputs have {xtr[0].numel()} features")
    return Data(xtr, ytr, xte, yte)


def _pct(s: float) -> str:
    return f"{100 * s:g}"


class Pipeline:
    def __init__(self, cfg: Config, out: Path, *, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True):
        self.cfg, self.out, self.log, self.progress = cfg, Path(out), log, progress
        self._prepare_dir(resume)
        if cfg.experiment.threads:
            torch.set_num_threads(cfg.experiment.threads)

    # -- run directory -------------------------------------------------------------------------
    def _prepare_dir(self, resume: bool) -> None:
        cfg_file = self.out / "config.toml"
        if self.out.exists() and any(self.out.iterdir()) and not resume:
            raise RunDirError(f"{self.out} already holds a run; pass --resume to continue it, or choose "
                              "another --out")
        if resume and cfg_file.exists() and cfg_file.read_text() != to_toml(self.cfg):
            self.log(f"note: the config differs from the one {self.out} was started with; finished "
                     "stages are kept, remaining work uses the new config")
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = cfg_file.with_suffix(".tmp")
        tmp.write_text(to_toml(self.cfg))
        tmp.replace(cfg_file)

    def _bar(self, total: int, desc: str, initial: int = 0):
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.progress, leave=False,
                    mininterval=1.0, dynamic_ncols=True)

    def _new_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(self.cfg.model.sizes, self.cfg.model.activation)

    @property
    def spec(self) -> dict:
        return {"kind": "mlp", "sizes": list(self.cfg.model.sizes), "activation": self.cfg.model.activation}

    # -- stages --------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        data = load_data(self.cfg)
        self.log(f"data: {self.cfg.data.name}, {len(data.x_train)} train / {len(data.x_test)} test")
        self.train_sgd(data)
        n = len(data.x_train)
        if self.cfg.sgld.samples:
            if self.cfg.sgld.plain_chain:
                self.run_chain(data, "sgld", Gaussian(self.cfg.sgld.prior_precision))
            if self.cfg.gsp.enabled:
                model = self._new_model(0)
                gsp = Sum(GroupLasso(groups_of(model), self.cfg.gsp.lam), Gaussian(self.cfg.sgld.prior_precision))
                self.run_chain(data, "sgld_gsp", gsp)
                for s in self.cfg.prune.sparsities:
                    self.prune_retrain(data, s)
        return evaluate_run(self.out, self.cfg, data, log=self.log)

    def train_sgd(self, data: Data) -> None:
        c, seed = self.cfg.sgd, self.cfg.experiment.seed
        folder = self.out / "sgd"
        for k in range(c.members):
            path = folder / f"member_{k:03d}.pt"
            if path.exists():
                continue
            model = self._new_model(seed * 1000 + k)
            opt = torch.optim.SGD(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=c.decay_every, gamma=c.lr_decay)
            gen = torch.Generator().manual_seed(seed * 1000 + k + 1)
            start, elapsed = 0, 0.0
            ckpt = folder / "current.pt"
            if ckpt.exists():
                st = checkpoint.load(ckpt)
                if st["member"] == k:
                    model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"])
                    sched.load_state_dict(st["sched"]); gen.set_state(st["gen"])
                    start, elapsed = st["epoch"], st["elapsed"]
            bar = self._bar(c.epochs, f"SGD member {k + 1}/{c.members}", start)
            for epoch in range(start, c.epochs):
                t0 = time.perf_counter()
                loss = train_epoch(model, opt, minibatches(data.x_train, data.y_train, self.cfg.data.batch_size, gen),
                                   where=f"SGD member {k} epoch {epoch + 1}")
                sched.step()
                elapsed += time.perf_counter() - t0
                checkpoint.atomic_save({"member": k, "epoch": epoch + 1, "elapsed": elapsed, "model": model.state_dict(),
                                        "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state()}, ckpt)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            bar.close()
            checkpoint.save_member(path, model, self.spec, train_seconds=elapsed)
            ckpt.unlink(missing_ok=True)
            self.log(f"SGD member {k + 1}/{c.members}: {elapsed:.1f} s, final loss {loss:.4f}")

    def run_chain(self, data: Data, name: str, prior) -> None:
        """``sgld.chains`` independent SGLD chains sharing ``sgld.samples``; chain ``c`` writes its
        ``j``-th sample after epoch burn_in + thin * (j + 1) as ``sample_{c * per_chain + j}``."""
        c = self.cfg.sgld
        folder = self.out / name
        if (folder / "done.json").exists():
            return
        per_chain = c.samples // c.chains
        elapsed = 0.0
        for chain in range(c.chains):
            elapsed += self._run_one_chain(data, name, prior, chain, first_sample=chain * per_chain, samples=per_chain)
        (folder / "done.json").write_text(json.dumps({"train_seconds": elapsed, "chains": c.chains,
                                                     "epochs_per_chain": c.epochs_per_chain}))
        self.log(f"{name}: {c.samples} samples from {c.chains} chain(s) in {elapsed:.1f} s")

    def _run_one_chain(self, data: Data, name: str, prior, chain: int, *, first_sample: int, samples: int) -> float:
        c, seed = self.cfg.sgld, self.cfg.experiment.seed
        folder = self.out / name
        # chain 0 keeps the seeds of a single-chain run; later chains get their own init and noise
        stage_seed = seed * 1000 + (500 if name == "sgld" else 700) + 3 * chain
        epochs = c.burn_in + c.thin * samples
        ckpt = folder / ("chain.pt" if chain == 0 else f"chain_{chain}.pt")
        marker = folder / f"chain_{chain}.done"
        if marker.exists():
            return json.loads(marker.read_text())["train_seconds"]
        model = self._new_model(stage_seed)
        steps = math.ceil(len(data.x_train) / self.cfg.data.batch_size)  # per epoch
        lr = c.lr if c.schedule == "constant" else Cyclical(c.lr, cycle=c.thin * steps, start=c.burn_in * steps)
        sampler = SGLD(model.named_parameters(), lr, num_data=len(data.x_train), temperature=c.temperature,
                       prior=prior, generator=torch.Generator().manual_seed(stage_seed + 1),
                       prefetch_noise=c.prefetch_noise, noise=c.noise)
        gen = torch.Generator().manual_seed(stage_seed + 2)
        start, elapsed = 0, 0.0
        if ckpt.exists():
            st = checkpoint.load(ckpt)
            model.load_state_dict(st["model"]); sampler.load_state_dict(st["sampler"]); gen.set_state(st["gen"])
            start, elapsed = st["epoch"], st["elapsed"]
            self.log(f"{name}: resuming chain {chain + 1}/{c.chains} after epoch {start}")
        label = f"{name} chain" if c.chains == 1 else f"{name} chain {chain + 1}/{c.chains}"
        bar = self._bar(epochs, label, start)
        loss = float("nan")
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            loss = train_epoch(model, sampler, minibatches(data.x_train, data.y_train, self.cfg.data.batch_size, gen),
                               where=f"{label} epoch {epoch + 1}")
            elapsed += time.perf_counter() - t0
            done = epoch + 1
            if done > c.burn_in and (done - c.burn_in) % c.thin == 0:
                k = first_sample + (done - c.burn_in) // c.thin - 1
                checkpoint.save_member(folder / f"sample_{k:03d}.pt", model, self.spec, epoch=done, chain=chain)
            checkpoint.atomic_save({"epoch": done, "elapsed": elapsed, "model": model.state_dict(),
                                    "sampler": sampler.state_dict(), "gen": gen.get_state()}, ckpt)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        marker.write_text(json.dumps({"train_seconds": elapsed, "epochs": epochs}))
        return elapsed

    def masks_for(self, model: nn.Module, sparsity: float, masks: Optional[dict] = None,
                  widths: Optional[Sequence[int]] = None) -> dict:
        """SSE pruning: whole-neuron removal by group RMS norm (below ``prune.group_threshold``,
        and beyond the ``widths`` strongest per layer), then magnitude pruning of the weights to
        the target sparsity (fraction of weights removed). Given the ``masks`` of an earlier,
        lower sparsity, the new mask keeps nothing those removed."""
        p = self.cfg.prune
        params, groups = dict(model.named_parameters()), groups_of(model)
        if masks is None:
            masks = {}
            if p.group_threshold > 0:
                masks = pruning.group_masks(params, groups, threshold=p.group_threshold)
        pruning.apply_masks(model, masks)
        if widths:
            masks = pruning.combine(masks, pruning.group_masks(params, groups, keep=widths))
            pruning.apply_masks(model, masks)
        return pruning.combine(masks, pruning.magnitude_masks(pruning.prunable_weights(model), sparsity, scope=p.scope))

    def prune_retrain(self, data: Data, sparsity: float) -> None:
        c, p, seed = self.cfg.retrain, self.cfg.prune, self.cfg.experiment.seed
        folder = self.out / f"pruned_{_pct(sparsity)}"
        samples = sorted((self.out / "sgld_gsp").glob("sample_*.pt"))
        for k, sample in enumerate(samples):
            path = folder / f"member_{k:03d}.pt"
            if path.exists():
                continue
            t0 = time.perf_counter()
            model, _ = checkpoint.load_member(sample)
            masks = self.masks_for(model, 0.0)  # group pruning only; its sparsity and widths start the ramp
            start = min(pruning.sparsity_of({n: masks[n] for n in pruning.prunable_weights(model)}), sparsity)
            live = pruning.live_groups(dict(model.named_parameters()), groups_of(model))
            opt = torch.optim.SGD(model.parameters(), lr=c.lr)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.0 / c.lr_decay)
            gen = torch.Generator().manual_seed(seed * 1000 + 900 + k)
            bar = self._bar(c.epochs, f"retrain {_pct(sparsity)}% member {k + 1}/{len(samples)}")
            hooks = []
            for epoch in range(max(c.epochs, 1)):
                if epoch <= c.ramp_epochs:  # one-shot (ramp 0): the target at epoch 0, then fixed
                    widths = pruning.cubic_widths(epoch, live, p.widths, c.ramp_epochs) if p.widths else None
                    masks = self.masks_for(model, pruning.cubic_sparsity(epoch, start, sparsity, c.ramp_epochs), masks, widths)
                    pruning.apply_masks(model, masks)
                    for h in hooks:
                        h.remove()
                    hooks = pruning.keep_pruned_at_zero(model, masks)
                if epoch == c.epochs:  # retrain.epochs = 0: prune, don't retrain
                    break
                train_epoch(model, opt, minibatches(data.x_train, data.y_train, self.cfg.data.batch_size, gen),
                            where=f"retraining member {k} at {_pct(sparsity)}% epoch {epoch + 1}")
                sched.step()
                bar.update(1)
            bar.close()
            for h in hooks:
                h.remove()
            model.eval()
            small = compact_mlp(model)
            with torch.no_grad():
                probe = data.x_test[:256]
                gap = (small(probe) - model(probe)).abs().max().item()
            if gap > 1e-4:
                raise RuntimeError(f"compaction changed member {k}'s outputs by {gap:g}; this is a bug, please report it")
            checkpoint.save_member(path, small, small.spec(), train_seconds=time.perf_counter() - t0,
                                   sparsity=pruning.sparsity_of({n: m for n, m in masks.items()}))
        self.log(f"pruned to {_pct(sparsity)}% and retrained {len(samples)} members")


# -- evaluation ----------------------------------------------------------------------------------
def _dense_reference(cfg: Config) -> dict:
    return metrics.cost([mlp(cfg.model.sizes, cfg.model.activation)])


def methods_in(out: Path, cfg: Config) -> list[dict]:
    """The rows a run directory can show, in table order."""
    rows = []
    sgd = sorted((out / "sgd").glob("member_*.pt"))
    if sgd:
        rows.append({"method": "SGD", "files": sgd[:1], "sparsity": 0.0, "time": "sgd1"})
        if len(sgd) > 1:
            rows.append({"method": "SGD", "files": sgd, "sparsity": 0.0, "time": "sgd"})
    for stage, label in (("sgld", "SGLD"), ("sgld_gsp", "SGLD+GSP")):
        files = sorted((out / stage).glob("sample_*.pt"))
        if files:
            rows.append({"method": label, "files": files, "sparsity": 0.0, "time": stage})
    for s in cfg.prune.sparsities:
        files = sorted((out / f"pruned_{_pct(s)}").glob("member_*.pt"))
        if files:
            rows.append({"method": f"SGLD+GSP+PR {_pct(s)}%", "files": files, "sparsity": s, "time": "pruned"})
    return rows


def _stage_seconds(out: Path, stage: str) -> float:
    f = out / stage / "done.json"
    return json.loads(f.read_text())["train_seconds"] if f.exists() else float("nan")


def evaluate_run(out: Path, cfg: Config, data: Optional[Data] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Metrics of every method in ``out``; writes metrics/*.json, results.json and the plots."""
    from .plots import slug, write_plots  # matplotlib only when needed

    out = Path(out)
    data = data or load_data(cfg)
    ref = _dense_reference(cfg)
    results, curves, members_by_row = [], {}, {}
    for row in methods_in(out, cfg):
        loaded = [checkpoint.load_member(f) for f in row["files"]]
        models = [m for m, _ in loaded]
        logps = torch.stack([metrics.predict_logprobs(m, data.x_test) for m in models])
        m_count = len(models)
        name = row["method"] if row["method"].startswith("SGLD+GSP+PR") else f"{row['method']} x{m_count}"
        curve = [metrics.classification_metrics(mean_of_probs(logps[:k]), data.y_test) for k in range(1, m_count + 1)]
        cost = metrics.cost(models)
        if row["time"] == "sgd1":
            seconds = loaded[0][1].get("train_seconds", float("nan"))
        elif row["time"] == "sgd":
            seconds = sum(meta.get("train_seconds", float("nan")) for _, meta in loaded)
        elif row["time"] == "pruned":
            seconds = _stage_seconds(out, "sgld_gsp") + sum(meta.get("train_seconds", 0.0) for _, meta in loaded)
        else:
            seconds = _stage_seconds(out, row["time"])
        result = {"method": name, "members": m_count, "sparsity": row["sparsity"], **curve[-1],
                  "params": cost["params"], "flops": cost["flops"],
                  "params_ratio": cost["params"] / ref["params"], "flops_ratio": cost["flops"] / ref["flops"],
                  "nonzero_macs": cost["nonzero_macs"], "macs_ratio": cost["nonzero_macs"] / ref["nonzero_macs"],
                  "train_seconds": seconds}
        results.append(result)
        curves[name] = curve
        members_by_row[name] = models
        metrics_dir = out / "metrics"
        metrics_dir.mkdir(exist_ok=True)
        (metrics_dir / f"{slug(name)}.json").write_text(json.dumps({**result, "curve": curve}, indent=1))
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    write_plots(out, results, curves, members_by_row, cfg.model.sizes[0])
    log(format_table(results, title=f"{cfg.experiment.name} on {cfg.data.name} (test set, {len(data.y_test)} images)"))
    return results


def format_table(rows: list[dict], title: str = "") -> str:
    head = f"{'method':<22}{'members':>8}{'error %':>9}{'NLL':>8}{'ECE %':>8}{'Brier':>8}{'params':>10}{'x1':>7}{'FLOPs':>11}{'x1':>7}{'train s':>9}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<22}{r['members']:>8}{100 * r['error']:>9.2f}{r['nll']:>8.4f}{100 * r['ece']:>8.2f}"
                     f"{r['brier']:>8.4f}{r['params']:>10,}{r['params_ratio']:>7.2f}{r['flops']:>11,}"
                     f"{r['flops_ratio']:>7.2f}{r['train_seconds']:>9.0f}")
    lines.append("x1 = ratio to one dense model; FLOPs by the SSE sub-matrix rule; params = nonzero weights and biases")
    return "\n".join(lines)
