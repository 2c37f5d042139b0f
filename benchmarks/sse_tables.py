"""The SSE paper's FNN tables from the shipped configs, via the same pipeline as the CLI.

Runs (or resumes) ``configs/<name>.toml`` into ``runs/<name>`` and copies its rows to
``benchmarks/results/<name>.json`` with the machine and the wall time.

    python benchmarks/sse_tables.py mnist_fnn_sse fmnist_fnn_sse     # the full tables (about 1 h each on 1 core)
    python benchmarks/sse_tables.py --quick mnist_fnn_sse             # same rows on a 5k subset, short chains (< 60 s)
    python benchmarks/sse_tables.py mnist_fnn_sse --tag ramp --set retrain.ramp_epochs=10   # a variant:
        # runs/mnist_fnn_sse_ramp -> benchmarks/results/mnist_fnn_sse_ramp.json
    python benchmarks/sse_tables.py ptb_lstm_sse_small --evaluate-only   # the rows of runs/<name> so far,
        # without training (while other processes are still running stages of it)
    python benchmarks/sse_tables.py ptb_lstm_sse_small --evaluate-only --only 'pruned_80_*'   # recompute
        # those stages' rows, take the others from their last evaluation (runs/<name>/metrics/)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write  # noqa: E402

from sparse_ensembles.experiments import config as config_mod  # noqa: E402
from sparse_ensembles.experiments.evaluate import evaluate_run  # noqa: E402
from sparse_ensembles.experiments.pipeline import Pipeline, run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["task.train_subset=5000", "task.test_subset=2000", "sgd.members=3", "sgd.epochs=3", "sampler.burn_in=2",
         "sampler.thin=1", "sampler.samples=3", "retrain.epochs=1"]


def run_label(name: str, tag: str = "", quick: bool = False) -> str:
    """The run directory and results file name of a config: ``<name>[_<tag>][_quick]``."""
    return name + (f"_{tag}" if tag else "") + ("_quick" if quick else "")


def stage_seconds(rows: list[dict]) -> float:
    """Training time of all stages behind the rows, each counted once: the largest SGD ensemble (the
    smaller ones are its first members), every chain, and each pruned row's retraining (its
    ``train_seconds`` include its chain's, whose row is ``<label> xM`` for ``<label>+PR s%``)."""
    sgd = [r["train_seconds"] for r in rows if r["method"].startswith("SGD x")]
    chains = {r["method"].rsplit(" x", 1)[0]: r["train_seconds"] for r in rows
              if "+PR" not in r["method"] and not r["method"].startswith("SGD x")}
    retrain = [r["train_seconds"] - chains.get(r["method"].split("+PR ")[0], 0.0) for r in rows if "+PR" in r["method"]]
    return max(sgd, default=0.0) + sum(chains.values()) + sum(retrain)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+", help="config names under configs/")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override (recorded in the results file)")
    ap.add_argument("--tag", default="", help="name a variant: runs/<name>_<tag>, results/<name>_<tag>.json")
    ap.add_argument("--evaluate-only", action="store_true", help="evaluate the run directory as it is, train nothing")
    ap.add_argument("--only", action="append", default=[], metavar="STAGE",
                    help="with --evaluate-only: recompute only these stages' rows, the others as last evaluated")
    args = ap.parse_args()
    for name in args.names:
        overrides = (QUICK if args.quick else []) + args.set
        cfg = config_mod.load(ROOT / "configs" / f"{name}.toml", overrides)
        label = run_label(name, args.tag, args.quick)
        out = ROOT / "runs" / label
        t0 = time.perf_counter()
        if args.evaluate_only:
            rows = evaluate_run(out, run_config(out), only=args.only)
        else:
            rows = Pipeline(cfg, out, resume=True, progress=False, overrides=overrides).run()
        wall = time.perf_counter() - t0
        total_train = stage_seconds(rows)
        path = write(label,
                     {"config": f"configs/{name}.toml", "overrides": overrides, "evaluate_only": args.evaluate_only,
                      "recomputed_stages": args.only or "all",
                      "wall_seconds_this_invocation": wall, "summed_train_seconds": total_train, "rows": rows})
        metric, scale, unit = ("error", 100, "%") if "error" in rows[0] else ("ppl", 1, " PPL")
        best = {r["method"]: r for r in rows}
        sparse = [r for r in rows if "+PR" in r["method"]]
        msg = ", ".join(f"{r['method']} {scale * r[metric]:.2f}{unit} at {r['params_ratio']:.2f}x params / "
                        f"{r['flops_ratio']:.2f}x FLOPs" for r in sparse)
        sgd1 = best.get("SGD x1")
        print(f"{label}: SGD x1 {scale * sgd1[metric]:.2f}{unit}; {msg} -> {path.name}" if sgd1 else f"{label}: {msg}")


if __name__ == "__main__":
    main()
