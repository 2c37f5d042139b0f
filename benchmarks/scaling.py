"""Issue 23: M SGLD chains (group Lasso + Gaussian prior, the demo's settings) run one after another
against the same M chains vectorised (:class:`sparse_ensembles.samplers.vectorized.VectorizedSGLD`).

    python benchmarks/scaling.py                       # M = 4 and 18, MLP 784-300-100-10, batch 100, CPU
    python benchmarks/scaling.py --device cuda --chains 4,18

Throughput = chain steps per second (M x steps / wall time). Each round times ``--steps`` steps of
all M chains sequentially (M separate SGLD samplers, each stepping its own network on its own
minibatch) and then vectorised (one batched step of all M chains), interleaved; medians of
``--rounds`` rounds, at each thread count of ``--threads``; the headline compares each at its best
thread count. Random inputs: the cost of a step does not depend on the pixels.
Writes ``results/scaling.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, write  # noqa: E402

from sparse_ensembles.priors import Gaussian, GroupLasso, Sum  # noqa: E402
from sparse_ensembles.samplers import SGLD  # noqa: E402
from sparse_ensembles.samplers.vectorized import VectorizedSGLD  # noqa: E402
from sparse_ensembles.structure import sequential_groups  # noqa: E402


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def prior(model):
    return Sum(GroupLasso(sequential_groups(model), 3.0), Gaussian(1.0))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", default="4,18")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for M in (int(v) for v in args.chains.split(",")):
        torch.manual_seed(0)
        nets = [mlp().to(device) for _ in range(M)]
        samplers = [SGLD(n.named_parameters(), lr=0.1, num_data=50000, temperature=0.01, prior=prior(n),
                         generator=torch.Generator(device=device).manual_seed(m)) for m, n in enumerate(nets)]
        vec = VectorizedSGLD(nets[0], list(range(M)), lr=0.1, num_data=50000, temperature=0.01, prior=prior(nets[0]),
                             starts=[dict(n.named_parameters()) for n in nets])
        xs = torch.rand(M, args.batch, 784, device=device)
        ys = torch.randint(0, 10, (M, args.batch), device=device)

        def sequential():
            for _ in range(args.steps):
                for m, (n, s) in enumerate(zip(nets, samplers)):
                    s.zero_grad()
                    F.cross_entropy(n(xs[m]), ys[m]).backward()
                    s.step()

        def vectorised():
            for _ in range(args.steps):
                vec.losses(xs, ys).sum().backward()
                vec.step()

        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            times = {"sequential": [], "vectorised": []}
            sequential(), vectorised()  # warm-up
            for _ in range(args.rounds):
                for name, fn in (("sequential", sequential), ("vectorised", vectorised)):
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
            row = {"chains": M, "threads": threads, **{f"{k}_s": median(v) for k, v in times.items()}}
            for k in ("sequential", "vectorised"):
                row[f"{k}_steps_per_s"] = M * args.steps / row[f"{k}_s"]
            row["speedup"] = row["sequential_s"] / row["vectorised_s"]
            rows.append(row)
            print(f"M={M:>3} threads={threads}: sequential {row['sequential_steps_per_s']:8.1f} chain-steps/s, "
                  f"vectorised {row['vectorised_steps_per_s']:8.1f}  ({row['speedup']:.2f}x)", flush=True)
    best = {}
    for M in sorted({r["chains"] for r in rows}):
        mine = [r for r in rows if r["chains"] == M]
        seq = max(r["sequential_steps_per_s"] for r in mine)
        vec = max(r["vectorised_steps_per_s"] for r in mine)
        best[str(M)] = {"sequential_steps_per_s": seq, "vectorised_steps_per_s": vec, "speedup_best_vs_best": vec / seq}
        print(f"M={M}: best vs best {vec / seq:.2f}x")
    path = write("scaling" + ("" if device.type == "cpu" else f"_{device.type}"), {"device": str(device), "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                             "model": "MLP 784-300-100-10, SGLD + group Lasso (lam 3) + Gaussian", "rows": rows,
                             "best_vs_best": best})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
