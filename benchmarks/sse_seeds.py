"""Seed spread of a shipped SSE config: SGD x1 against the pruned ensemble, over several seeds.

The paper's Table 1 numbers are means of 10 runs; a single test error at the 1.4% level has a
standard error of about 0.12 points (10,000 test images), so one seed cannot separate the methods.
For each seed this runs (or resumes) ``configs/<name>.toml`` with ``experiment.seed`` set into
``runs/<name>_seed<s>``, training only what the comparison needs: one SGD model, the GSP chain(s)
and the members pruned to ``--sparsity``. It writes ``benchmarks/results/<name>_seeds.json``: per
seed and as mean / sample std, the valid and test error and NLL of both, and the paper's target

    mean SSE(sparsity) test error < mean SGD x1 and <= SGD x18, at params_ratio <= 1.

SGD x18 comes from one seed's directory when it holds more SGD members (train them there with
``sparse-ensembles run configs/<name>.toml --out runs/<name>_seed0 --resume --only sgd --set
sgd.members=18`` plus the overrides recorded in the results file; two such processes share the
members), else from the full table ``benchmarks/results/<name>.json``.

    python benchmarks/sse_seeds.py mnist_fnn_sse --seeds 0 1 2            # about 20 min a seed on 1 core
    python benchmarks/sse_seeds.py mnist_fnn_sse --seeds 0 1 2 --evaluate-only   # rewrite from the run dirs
    python benchmarks/sse_seeds.py mnist_fnn_sse --seeds 1 & python benchmarks/sse_seeds.py mnist_fnn_sse --seeds 2
        # one process a seed (2 cores), then the summary of all with --evaluate-only
    python benchmarks/sse_seeds.py --quick mnist_fnn_sse                  # 5k subset, short chains (< 90 s)
    python benchmarks/sse_seeds.py mnist_fnn_sse --tag lam15 --set prior.lam=1.5 --seeds 1
        # a candidate recipe's seeds beside the shipped record: runs/mnist_fnn_sse_lam15_seed1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import RESULTS, write  # noqa: E402
from sse_tables import QUICK, run_label  # noqa: E402

from sparse_ensembles.experiments import config as config_mod  # noqa: E402
from sparse_ensembles.experiments.evaluate import evaluate_run  # noqa: E402
from sparse_ensembles.experiments.pipeline import Pipeline, run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("error_valid", "error_test", "nll_valid", "nll_test", "params_ratio", "flops_ratio", "train_seconds")


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def pick(rows: list[dict], method: str) -> dict:
    row = next((r for r in rows if r["method"] == method), None)
    if row is None:
        raise SystemExit(f"no row {method!r} in this run (rows: {[r['method'] for r in rows]})")
    return {k: row[k] for k in KEYS if k in row}


def sgd_many(rows: list[dict]) -> dict | None:
    """The SGD ensemble row (SGD xM, M > 1) of a table, if it has one."""
    return next((r for r in rows if r["method"].startswith("SGD x") and r["method"] != "SGD x1"), None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name", help="config name under configs/ (a classification SSE config)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sparsity", type=float, default=0.96, help="the pruned ensemble to compare (fraction removed)")
    ap.add_argument("--quick", action="store_true", help="5k-image subset and short chains: checks the plumbing only")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="extra config override")
    ap.add_argument("--evaluate-only", action="store_true", help="evaluate the run directories as they are")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the run directories go (default runs/)")
    ap.add_argument("--tag", default="", help="name a candidate recipe (with --set): runs/<name>_<tag>_seed<s>, "
                    "results/<name>_<tag>_seeds.json, so the shipped config's record stays")
    args = ap.parse_args()
    if len(args.seeds) < 2:
        print("note: one seed has no spread; run the seeds in parallel processes (one --seeds each), then "
              "all of them with --evaluate-only for the summary", flush=True)

    keep = ["sgd.members=1", "sampler.plain_chain=false", f"prune.sparsities=[{args.sparsity}]"]
    base = (QUICK if args.quick else []) + args.set + keep
    pr = f"SGLD+GSP+PR {100 * args.sparsity:g}%"
    label = run_label(args.name, args.tag, args.quick)
    per_seed, t0 = [], time.perf_counter()
    for seed in args.seeds:
        overrides = base + [f"experiment.seed={seed}"]
        out = args.runs / f"{label}_seed{seed}"
        if args.evaluate_only:
            rows = evaluate_run(out, run_config(out))
        else:
            cfg = config_mod.load(ROOT / "configs" / f"{args.name}.toml", overrides)
            rows = Pipeline(cfg, out, resume=True, progress=False, overrides=overrides).run()
        sse, sgd = pick(rows, pr), pick(rows, "SGD x1")
        entry = {"seed": seed, "run": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
                 "sgd_x1": sgd, "sse": sse}
        many = sgd_many(rows)
        if many:  # this seed's directory also trained SGD xM
            entry["sgd_many"] = {"method": many["method"], **pick(rows, many["method"])}
        per_seed.append(entry)
        print(f"seed {seed}: SGD x1 test {100 * sgd['error_test']:.2f}% (valid {100 * sgd['error_valid']:.2f}%), "
              f"{pr} test {100 * sse['error_test']:.2f}% (valid {100 * sse['error_valid']:.2f}%) "
              f"at {sse['params_ratio']:.2f}x params", flush=True)

    summary = {side: {k: spread([s[side][k] for s in per_seed]) for k in ("error_valid", "error_test", "nll_test")}
               for side in ("sgd_x1", "sse")}
    summary["sse"]["params_ratio"] = spread([s["sse"]["params_ratio"] for s in per_seed])
    summary["sse"]["flops_ratio"] = spread([s["sse"]["flops_ratio"] for s in per_seed])
    # SGD xM: from a seed's run when one trained it (same protocol: --set sgd.members=18 on one seed's
    # directory), else from the full table (benchmarks/results/<name>.json)
    ran = [s_ for s_ in per_seed if "sgd_many" in s_]
    table = RESULTS / f"{run_label(args.name, quick=args.quick)}.json"
    sgd_all, source = None, ""
    if ran:
        sgd_all, source = ran[0]["sgd_many"], ran[0]["run"]
    elif table.exists():
        sgd_all = sgd_many(json.loads(table.read_text())["rows"])
        source = str(table.relative_to(RESULTS.parent)) if table.is_relative_to(RESULTS.parent) else str(table)
    sse_mean, sgd_mean = summary["sse"]["error_test"]["mean"], summary["sgd_x1"]["error_test"]["mean"]
    target = {
        "below_sgd_x1": sse_mean < sgd_mean,
        "params_at_most_1x": summary["sse"]["params_ratio"]["max"] <= 1.0,
        "sgd_many": ({"method": sgd_all["method"], "error_test": sgd_all.get("error_test", sgd_all.get("error")),
                      "error_valid": sgd_all.get("error_valid"), "source": source} if sgd_all else None),
    }
    target["no_worse_than_sgd_many"] = (sse_mean <= target["sgd_many"]["error_test"]) if sgd_all else None
    target["met"] = bool(target["below_sgd_x1"] and target["params_at_most_1x"] and target["no_worse_than_sgd_many"])
    path = write(f"{label}_seeds", {"config": f"configs/{args.name}.toml", "overrides": base, "sparsity": args.sparsity,
                                    "seeds": args.seeds, "evaluate_only": args.evaluate_only,
                                    "wall_seconds_this_invocation": time.perf_counter() - t0,
                                    "per_seed": per_seed, "summary": summary, "target": target})
    s, g = summary["sse"]["error_test"], summary["sgd_x1"]["error_test"]
    many = (f", {target['sgd_many']['method']} {100 * target['sgd_many']['error_test']:.2f}% (one seed)"
            if sgd_all else ", SGD xM: no full table yet")
    print(f"{label}_seeds: {len(args.seeds)} seeds, test error mean +- std: {pr} {100 * s['mean']:.2f} +- "
          f"{100 * s['std']:.2f}% at {summary['sse']['params_ratio']['max']:.2f}x params, SGD x1 {100 * g['mean']:.2f} +- "
          f"{100 * g['std']:.2f}%{many}; target {'met' if target['met'] else 'NOT met'} -> {path.name}")


if __name__ == "__main__":
    main()
