"""Epoch time of SGLD and SGHMC against torch.optim.SGD on the 784-300-100-10 MLP (batch 100).

All optimizers run in one process, interleaved round by round, on real MNIST when it is found
(random images of the same shape otherwise); each ratio is median(sampler) / median(SGD) at the
same torch thread count. SGLD/SGHMC draw their noise in a worker thread (``prefetch_noise``); the
inline variant and the cheaper two-point noise (``noise="rademacher"``) are reported too. The
headline keys ``sgld_vs_sgd`` / ``sghmc_vs_sgd`` are the default Gaussian noise. Target: <= 1.3 on CPU.

    python benchmarks/sampler_overhead.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, timed, write  # noqa: E402

from sparse_ensembles.models import mlp  # noqa: E402
from sparse_ensembles.samplers import SGHMC, SGLD  # noqa: E402
from sparse_ensembles.training import minibatches, train_epoch  # noqa: E402


def data():
    try:
        from sparse_ensembles.data import load_idx_dataset

        x, y, _, _ = load_idx_dataset("mnist")
        return x, y, "mnist"
    except Exception:  # the benchmark measures speed; any 60k x 784 data will do
        g = torch.Generator().manual_seed(0)
        return torch.rand(60000, 28, 28, generator=g), torch.randint(0, 10, (60000,), generator=g), "random"


def make(kind: str, model, n: int):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    opts = dict(prefetch_noise=not kind.endswith("_inline"), noise="rademacher" if kind.endswith("_rademacher") else "gaussian")
    if kind.startswith("sgld"):
        return SGLD(model.named_parameters(), 0.1, num_data=n, temperature=1.0, **opts)
    return SGHMC(model.named_parameters(), 0.01, num_data=n, friction=0.1, **opts)


def measure(threads: int, quick: bool) -> dict:
    """Median epoch seconds per optimizer at ``threads`` torch threads (set before any torch work,
    as the pipeline does: set later, the noise worker thread and an idle OpenMP team can fight for
    the cores and the sampler looks up to 2x slower than it is in a real run)."""
    torch.set_num_threads(threads)
    x, y, source = data()
    reps, n_use = (3, 15000) if quick else (7, 60000)
    x, y = x[:n_use], y[:n_use]
    times = {k: [] for k in KINDS}
    for r in range(reps + 1):  # round 0 warms up
        for k in KINDS:
            torch.manual_seed(r)
            model = mlp([784, 300, 100, 10])
            opt = make(k, model, n_use)
            gen = torch.Generator().manual_seed(r)
            t = timed(lambda: train_epoch(model, opt, minibatches(x, y, 100, gen)))
            if r:
                times[k].append(t)
    return {"data": source, "examples_per_epoch": n_use, "repetitions": reps,
            "median_epoch_seconds": {k: median(v) for k, v in times.items()}}


KINDS = ["sgd", "sgld", "sghmc", "sgld_rademacher", "sghmc_rademacher", "sgld_inline"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and 1/4 epochs (< 60 s)")
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # child mode: one thread count
    args = ap.parse_args()
    if args.threads:
        print(json.dumps(measure(args.threads, args.quick)))
        return
    out = {"by_threads": {}}
    for threads in sorted({1, os.cpu_count() or 1}):
        # a fresh process per thread count, so the count is set before torch starts any threads
        cmd = [sys.executable, __file__, "--threads", str(threads)] + (["--quick"] if args.quick else [])
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        med = res.pop("median_epoch_seconds")
        out.update(res)
        out["by_threads"][str(threads)] = {"median_epoch_seconds": med,
                                           **{f"{k}_vs_sgd": med[k] / med["sgd"] for k in KINDS[1:]}}
        print(f"threads={threads}: " + ", ".join(f"{k} {med[k]:.3f}s" for k in KINDS))
    # headline: the thread count the shipped configs use (1), plus the best-vs-best comparison
    one = out["by_threads"]["1"]
    best = {k: min(out["by_threads"][t]["median_epoch_seconds"][k] for t in out["by_threads"]) for k in KINDS}
    out.update(sgld_vs_sgd=one["sgld_vs_sgd"], sghmc_vs_sgd=one["sghmc_vs_sgd"],
               sgld_vs_sgd_best_settings=best["sgld"] / best["sgd"], sghmc_vs_sgd_best_settings=best["sghmc"] / best["sgd"],
               sgld_rademacher_vs_sgd=one["sgld_rademacher_vs_sgd"], sghmc_rademacher_vs_sgd=one["sghmc_rademacher_vs_sgd"],
               target=1.3, quick=args.quick)
    path = write("sampler_overhead" + ("_quick" if args.quick else ""), out)
    print(f"sampler_overhead: sgld_vs_sgd {out['sgld_vs_sgd']:.2f}, sghmc_vs_sgd {out['sghmc_vs_sgd']:.2f} "
          f"(1 thread; best settings {out['sgld_vs_sgd_best_settings']:.2f} / {out['sghmc_vs_sgd_best_settings']:.2f}; "
          f"rademacher noise {out['sgld_rademacher_vs_sgd']:.2f} / {out['sghmc_rademacher_vs_sgd']:.2f}; "
          f"target <= 1.3) -> {path.name}")


if __name__ == "__main__":
    main()
