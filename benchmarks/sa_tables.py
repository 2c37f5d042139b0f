"""Deng et al. 2019's experiments (issue 11) from the shipped configs, via the same pipeline as the CLI.

    python benchmarks/sa_tables.py cnn        # configs/{mnist,fmnist}_cnn_sa.toml -> results/cnn_sa.json
    python benchmarks/sa_tables.py resnet20   # configs/fmnist_resnet20_sa.toml -> results/resnet20_sa.json
    python benchmarks/sa_tables.py cnn resnet20 --evaluate-only   # the run directories as they are
    python benchmarks/sa_tables.py resnet20 --quick   # same rows on a 500-image subset, 1 epoch per chain (2 min on a loaded 2-core machine)
    python benchmarks/sa_tables.py resnet20 --lr-grid 1e-4,5e-4,2.5e-3   # choose each method's step on valid
    python benchmarks/sa_tables.py cnn --configs fmnist_cnn_sa --lr-grid 0.05,0.01,0.002 --grid-variants dense_init
    python benchmarks/sa_tables.py cnn --suffix _estep --only sghmc --only '*estep*'   # runs/<name>_estep -> cnn_sa_estep.json

``--lr-grid`` runs the variants named by ``--grid-variants`` (default: the 90% ones; ``'*'`` all) and
the plain chain (where the config has one) once per step size
into ``runs/<name>_lr<lr>`` (the dense SGD network does not depend on the step: it is trained once and
copied) and writes ``results/<name>_lr_grid.json``: valid (and, for the record, test) accuracy of
each variant at each step, and per method the step of highest valid accuracy. Test is never used to
choose; the config's ``[variants]`` are then set to the chosen steps by hand, citing the file.

Each config runs (or resumes) into ``runs/<name>``. ``cnn_sa.json`` has, per dataset, the rows and
SGHMC against SGHMC-SA beside the paper's accuracy. ``resnet20_sa.json`` has the rows, a table
sparsity x method (test accuracy, with valid beside it), the targets at 90% and the measured inference
latency of each sampled network physically shrunk (``model.shrink(model.live_units())``: channels whose
weights were all pruned are removed) against the dense SGD network, at batch 1 and 100, each at its
best torch thread count; medians of interleaved rounds. Networks of the same shape are timed once.
"""
from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, timed, write  # noqa: E402

from sparse_ensembles import checkpoint  # noqa: E402
from sparse_ensembles.experiments import config as config_mod  # noqa: E402
from sparse_ensembles.experiments.evaluate import evaluate_run  # noqa: E402
from sparse_ensembles.experiments.pipeline import Pipeline, run_config  # noqa: E402
from sparse_ensembles.experiments.stages import Chain, build_stages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"mnist": 99.60, "fashion-mnist": 93.01}  # Deng et al. 2019, no augmentation, test accuracy %
QUICK = {"cnn": ["task.train_subset=1000", "task.test_subset=500", "task.valid_size=500", "sgd.epochs=1",
                 "sampler.burn_in=0", "sampler.samples=1"],
         "resnet20": ["task.train_subset=500", "task.test_subset=500", "task.valid_size=500", "sgd.epochs=1",
                      "sampler.burn_in=0", "sampler.anneal=1.0", "prune.every=0.05"]}
CONFIGS = {"cnn": ["mnist_cnn_sa", "fmnist_cnn_sa"], "resnet20": ["fmnist_resnet20_sa"]}


def rows_of(name: str, overrides: list[str], quick: bool, evaluate_only: bool, suffix: str = "",
            only: list[str] | None = None):
    out = ROOT / "runs" / (name + suffix + ("_quick" if quick else ""))
    t0 = time.perf_counter()
    if evaluate_only:  # the config the run directory was last run with
        cfg = run_config(out)
        rows = evaluate_run(out, cfg)
    else:
        cfg = config_mod.load(ROOT / "configs" / f"{name}.toml", overrides)
        rows = Pipeline(cfg, out, resume=True, progress=False, overrides=overrides, only=only or ()).run()
    return cfg, out, rows, time.perf_counter() - t0


def accuracy(row: dict, split: str = "test") -> float:
    return 100 * (1 - row[f"error_{split}"])


def cnn_entry(cfg, rows: list[dict], wall: float) -> dict:
    """SGD, SGHMC and SGHMC-SA; with several SGHMC-SA variants the one of lowest valid error (a tie
    broken by the lower valid NLL) is the SGHMC-SA of the table (the others stay in ``rows`` and
    ``sa_variants``)."""
    by = {r["method"]: r for r in rows}
    sgd = by.get("SGD x1")
    plain = next((r for r in rows if re.fullmatch(r"SGHMC x\d+", r["method"])), None)
    sa_rows = [r for r in rows if r["method"].startswith("SGHMC+SSGL")]
    sa = min(sa_rows, key=lambda r: (r["error_valid"], r["nll_valid"])) if sa_rows else None
    chosen = (("sgd", sgd), ("sghmc", plain), ("sghmc_sa", sa))
    return {"dataset": cfg.task.dataset, "paper_sghmc_sa_accuracy": PAPER.get(cfg.task.dataset),
            "epochs": {"sgd": cfg.sgd.epochs, "chain": cfg.sampler.epochs_per_chain},
            "sghmc_sa_chosen_on_valid": sa["method"] if sa else None,
            "sa_variants": {r["method"]: {"accuracy_valid": accuracy(r, "valid"), "accuracy_test": accuracy(r)}
                            for r in sa_rows},
            "accuracy_test": {k: accuracy(r) for k, r in chosen if r},
            "accuracy_valid": {k: accuracy(r, "valid") for k, r in chosen if r},
            "wall_seconds_this_invocation": wall, "rows": rows}


def _method_level(method: str) -> tuple[str, int]:
    """'SGHMC+SSGL(sa_anneal_90) x1' -> ('sa_anneal', 90)."""
    m = re.search(r"\(([a-z0-9_]+?)_(\d+)\)", method)
    return (m.group(1), int(m.group(2))) if m else (method, 0)


def latencies(models: dict, x, threads: list[int], rounds: int) -> dict:
    """Median seconds per forward pass of each model at each thread count. Within a round every model
    runs once, in a rotated order, so a slow phase of the shared machine hits all of them alike."""
    names = list(models)
    times = {n: {t: [] for t in threads} for n in names}
    with torch.inference_mode():
        for t in threads:
            torch.set_num_threads(t)
            reps = {}
            for n in names:
                models[n].eval()(x)  # warm-up
                reps[n] = max(1, int(0.05 / max(timed(lambda: models[n](x)), 1e-6)))
            for r in range(rounds):
                for n in names[r % len(names):] + names[: r % len(names)]:
                    times[n][t].append(timed(lambda: [models[n](x) for _ in range(reps[n])]) / reps[n])
    return {n: {t: median(v) for t, v in per.items()} for n, per in times.items()}


def resnet_latency(cfg, out: Path, threads: list[int], rounds: int) -> dict:
    """Each row's sampled network shrunk by its live channels against the dense SGD network, each at its
    best thread count."""
    nets = {}
    for stage in build_stages(cfg):
        for row in stage.rows(out):
            if row.files:
                nets[row.method] = checkpoint.load_member(row.files[0])[0].eval()
    dense_name = next(k for k in nets if k.startswith("SGD"))
    shape = [1, 28, 28] if cfg.task.dataset in ("mnist", "fashion-mnist") else [3, 32, 32]
    result = {"threads_tried": threads, "rounds": rounds}
    shrunk = {dense_name: nets[dense_name]}
    for name, net in nets.items():
        if name == dense_name:
            continue
        keep = net.live_units()
        shrunk[name] = net.shrink(keep).eval()
        x = torch.randn(4, *shape).flatten(1)
        with torch.inference_mode():
            gap = (shrunk[name](x) - net(x)).abs().max().item()
        result[name] = {"channels_kept": [int(k.sum()) for k in keep], "channels_total": [int(k.numel()) for k in keep],
                        "max_abs_gap_to_masked": gap}
    # networks of one shape run the same kernels: time each distinct shape once (the dense one included)
    shapes = {name: tuple(tuple(p.shape) for p in net.parameters()) for name, net in shrunk.items()}
    distinct = {}
    for name, shp in shapes.items():
        distinct.setdefault(shp, name)
    for batch in (1, 100):
        x = torch.randn(batch, *shape).flatten(1)
        per = latencies({n: shrunk[n] for n in distinct.values()}, x, threads, rounds)
        best = {n: min(v.values()) for n, v in per.items()}
        dense_ms = best[distinct[shapes[dense_name]]]
        result[f"dense_batch{batch}_ms"] = 1e3 * dense_ms
        for name in shrunk:
            if name != dense_name:
                timed_as = distinct[shapes[name]]
                result[name]["timed_as"] = timed_as  # itself, or the first network of its shape
                result[name][f"batch{batch}_ms"] = 1e3 * best[timed_as]
                result[name][f"batch{batch}_threads"] = min(per[timed_as], key=per[timed_as].get)
                result[name][f"speedup_batch{batch}"] = dense_ms / best[timed_as]
    result["distinct_shapes_timed"] = len(distinct)
    torch.set_num_threads(threads[0])
    return result


def resnet_entry(cfg, out: Path, rows: list[dict], wall: float, threads, rounds) -> dict:
    dense = next(r for r in rows if r["method"].startswith("SGD"))
    table = {}
    for r in rows:
        kind, level = _method_level(r["method"])
        if level:
            table.setdefault(str(level), {})[kind] = {"accuracy_test": accuracy(r), "accuracy_valid": accuracy(r, "valid"),
                                                      "sparsity": r["sparsity"]}
    at90 = table.get("90", {})
    targets = {}
    if "sa_anneal" in at90:
        sa = at90["sa_anneal"]["accuracy_test"]
        targets = {"sa_anneal_90_gap_to_dense": accuracy(dense) - sa,
                   "within_1.5_of_dense": accuracy(dense) - sa <= 1.5,
                   "ahead_of_em_and_plain": all(sa > at90[k]["accuracy_test"] for k in ("em", "plain") if k in at90)}
    return {"dataset": cfg.task.dataset, "train_subset": cfg.task.train_subset, "width": cfg.model.width,
            "epochs": {"sgd": cfg.sgd.epochs, "chain": cfg.sampler.epochs_per_chain},
            "dense_accuracy_test": accuracy(dense), "dense_accuracy_valid": accuracy(dense, "valid"),
            "table": table, "targets_at_90": targets,
            "paper_cifar10_sghmc_sa": {"30": 94.23, "50": 94.27, "70": 93.74, "90": 91.68},
            "latency": resnet_latency(cfg, out, threads, rounds),
            "wall_seconds_this_invocation": wall, "rows": rows}


def lr_grid(name: str, lrs: list[float], patterns: list[str], quick: bool, which: str) -> Path:
    """Each variant matching ``patterns`` (and the plain chain, if the config has one) at each step
    size; per method the step of best valid accuracy."""
    base = config_mod.load(ROOT / "configs" / f"{name}.toml")
    chosen_variants = [v for v in base.variants if any(fnmatch.fnmatch(v, p) for p in patterns)]
    if not chosen_variants:
        raise SystemExit(f"--grid-variants {patterns} match no variant of {name}: {list(base.variants)}")
    grid, dense, first, t0 = {}, None, None, time.perf_counter()
    for lr in lrs:
        out = ROOT / "runs" / f"{name}{'_quick' if quick else ''}_lr{lr:g}"
        if first is not None and not (out / "sgd").exists():  # the dense network: trained once, copied
            out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(first / "sgd", out / "sgd", ignore=shutil.ignore_patterns(".lock"))
        overrides = ((QUICK[which] if quick else []) + [f"sampler.lr={lr}"]
                     + [f"variants.{v}.sampler.lr={lr}" for v in chosen_variants])
        cfg = config_mod.load(ROOT / "configs" / f"{name}.toml", overrides)
        only = ["sgd"] + [s.name for s in build_stages(cfg) if isinstance(s, Chain)
                          and (s.variant in chosen_variants or (not s.variant and not s.sparse))]  # + the plain chain
        rows = Pipeline(cfg, out, resume=True, progress=False, overrides=overrides, only=only).run()
        first = first or out
        for r in rows:
            if r["method"].startswith("SGD"):
                dense = {"accuracy_valid": accuracy(r, "valid"), "accuracy_test": accuracy(r)}
                continue
            variant = re.search(r"\(([A-Za-z0-9_]+)\)", r["method"])
            key = variant.group(1) if variant else r["method"].rsplit(" x", 1)[0]  # a variant, or the plain chain
            if key in chosen_variants or not variant:
                grid.setdefault(key, {})[f"{lr:g}"] = {
                    "accuracy_valid": accuracy(r, "valid"), "accuracy_test": accuracy(r), "sparsity": r["sparsity"]}
        print(f"lr {lr:g}: " + ", ".join(f"{v} valid {grid[v][f'{lr:g}']['accuracy_valid']:.2f}%"
                                          for v in grid if f"{lr:g}" in grid[v]), flush=True)
    choice = {v: max(per, key=lambda k: per[k]["accuracy_valid"]) for v, per in grid.items()}
    path = write(f"{name}_lr_grid" + ("_quick" if quick else ""), {
        "config": f"configs/{name}.toml", "lrs": lrs, "variants": chosen_variants, "quick": quick,
        "chosen_on": "valid accuracy (test shown for the record, never used to choose)",
        "dense": dense, "grid": grid, "chosen_lr": choice, "wall_seconds": time.perf_counter() - t0})
    for v, lr in choice.items():
        print(f"{name} {v}: step {lr} (valid {grid[v][lr]['accuracy_valid']:.2f}%) -> {path.name}")
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="+", choices=sorted(CONFIGS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--evaluate-only", action="store_true", help="evaluate the run directories as they are")
    ap.add_argument("--threads", default="1,2", help="thread counts tried for the latency, best of each kept")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--lr-grid", default="", help="comma-separated sampler step sizes: choose each method's on valid")
    ap.add_argument("--grid-variants", default="*_90", help="comma-separated patterns of the variants in the grid")
    ap.add_argument("--configs", default="", help="comma-separated config names to keep (default: all of each group)")
    ap.add_argument("--suffix", default="", help="run directories runs/<name><suffix>, results <table><suffix>.json")
    ap.add_argument("--only", action="append", default=[],
                    help="run only these stages (shell patterns, as the CLI's --only); repeatable")
    args = ap.parse_args()
    keep = set(args.configs.split(",")) if args.configs else None
    for which in CONFIGS:
        CONFIGS[which] = [n for n in CONFIGS[which] if keep is None or n in keep]
    if args.lr_grid:
        lrs = [float(x) for x in args.lr_grid.split(",")]
        for which in args.which:
            for name in CONFIGS[which]:
                lr_grid(name, lrs, args.grid_variants.split(","), args.quick, which)
        return
    threads = [int(t) for t in args.threads.split(",")]
    for which in args.which:
        overrides = QUICK[which] if args.quick else []
        entries = {}
        for name in CONFIGS[which]:
            cfg, out, rows, wall = rows_of(name, overrides, args.quick, args.evaluate_only, args.suffix, args.only)
            entries[name] = (cnn_entry(cfg, rows, wall) if which == "cnn"
                             else resnet_entry(cfg, out, rows, wall, threads, 3 if args.quick else args.rounds))
        label = ("cnn_sa" if which == "cnn" else "resnet20_sa") + args.suffix + ("_quick" if args.quick else "")
        path = write(label, {"configs": [f"configs/{n}.toml" for n in CONFIGS[which]], "overrides": overrides,
                             "evaluate_only": args.evaluate_only, "run_dirs": [f"runs/{n}{args.suffix}" for n in CONFIGS[which]],
                             "only": args.only, "entries": entries})
        for name, e in entries.items():
            if which == "cnn":
                acc = e["accuracy_test"]
                print(f"{name}: test accuracy SGD {acc.get('sgd', float('nan')):.2f}%, SGHMC "
                      f"{acc.get('sghmc', float('nan')):.2f}%, SGHMC-SA {acc.get('sghmc_sa', float('nan')):.2f}% "
                      f"[{e['sghmc_sa_chosen_on_valid']}, chosen on valid] (paper {e['paper_sghmc_sa_accuracy']}%) -> {path.name}")
            else:
                for level, methods in sorted(e["table"].items(), key=lambda kv: -int(kv[0])):
                    print(f"{name} {level}%: " + ", ".join(f"{k} {v['accuracy_test']:.2f}%" for k, v in methods.items()))
                t = e["targets_at_90"]
                print(f"{name}: dense {e['dense_accuracy_test']:.2f}%; at 90% SGHMC-SA (annealed) "
                      f"{t.get('sa_anneal_90_gap_to_dense', float('nan')):.2f} points below dense (target <= 1.5: "
                      f"{'met' if t.get('within_1.5_of_dense') else 'NOT met'}), ahead of EM and SGHMC: "
                      f"{'yes' if t.get('ahead_of_em_and_plain') else 'NO'} -> {path.name}")


if __name__ == "__main__":
    main()
