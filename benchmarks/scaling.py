"""Issue 23: M SGLD chains (group Lasso + Gaussian prior, the demo's settings) run one after another
against the same M chains vectorised (:class:`sparse_ensembles.samplers.vectorized.VectorizedSGLD`).

    python benchmarks/scaling.py                       # M = 4 and 18, MLP 784-300-100-10, batch 100, CPU
    python benchmarks/scaling.py --device cuda --chains 4,18

Throughput = chain steps per second (M x steps / wall time). Each round times ``--steps`` steps of
all M chains sequentially (M separate SGLD samplers, one chain's steps after another's, each
stepping its own network on its own minibatch; on CPU once with the noise drawn inline and once in
each sampler's worker thread) and then vectorised (one batched step of all M chains), interleaved,
each with the prior's gradient eager and compiled (``priors.Compiled``, ``sampler.compile_prior``;
the warm-up compiles it); medians of ``--rounds`` rounds, at each thread count of ``--threads``; the
headline compares each method at its best setting (also with the prior eager only). Random inputs:
the cost of a step does not depend on the pixels.
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

from sparse_ensembles.priors import Compiled, Gaussian, GroupLasso, Sum  # noqa: E402
from sparse_ensembles.samplers import SGLD  # noqa: E402
from sparse_ensembles.samplers.vectorized import VectorizedSGLD  # noqa: E402
from sparse_ensembles.structure import sequential_groups  # noqa: E402


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def prior(model, compiled: bool):
    p = Sum(GroupLasso(sequential_groups(model), 3.0), Gaussian(1.0))
    return Compiled(p) if compiled else p


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
        # the sequential chains at each of their settings: noise drawn inline, or in a worker thread;
        # each method with the prior's gradient eager and compiled (sampler.compile_prior)
        samplers = {(prefetch, compiled): [
            SGLD(n.named_parameters(), lr=0.1, num_data=50000, temperature=0.01, prior=prior(n, compiled),
                 generator=torch.Generator(device=device).manual_seed(m), prefetch_noise=prefetch)
            for m, n in enumerate(nets)]
            for compiled in (False, True) for prefetch in ((False, True) if device.type == "cpu" else (False,))}
        vecs = {compiled: VectorizedSGLD(nets[0], list(range(M)), lr=0.1, num_data=50000, temperature=0.01,
                                         prior=prior(nets[0], compiled), starts=[dict(n.named_parameters()) for n in nets])
                for compiled in (False, True)}
        xs = torch.rand(M, args.batch, 784, device=device)
        ys = torch.randint(0, 10, (M, args.batch), device=device)

        def sequential(setting):
            def run():  # one chain after another, as a run without vectorising does
                for m, (n, s) in enumerate(zip(nets, samplers[setting])):
                    for _ in range(args.steps):
                        s.zero_grad()
                        F.cross_entropy(n(xs[m]), ys[m]).backward()
                        s.step()
                for s in samplers[setting]:  # finish the pending draws inside this kind's time
                    s.close()
            return run

        def vectorised(vec):
            def run():
                for _ in range(args.steps):
                    vec.losses(xs, ys).sum().backward()
                    vec.step()
            return run

        kinds = {"sequential" + ("_worker" if p else "") + ("_compiled" if c else ""): sequential((p, c))
                 for p, c in samplers}
        kinds.update({"vectorised" + ("_compiled" if c else ""): vectorised(v) for c, v in vecs.items()})
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            times = {k: [] for k in kinds}
            for fn in kinds.values():  # warm-up
                fn()
            for _ in range(args.rounds):
                for name, fn in kinds.items():
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
            row = {"chains": M, "threads": threads, **{f"{k}_s": median(v) for k, v in times.items()}}
            for k in kinds:
                row[f"{k}_steps_per_s"] = M * args.steps / row[f"{k}_s"]
            seq_best = min(row[f"{k}_s"] for k in kinds if k.startswith("sequential"))
            row["speedup"] = seq_best / min(row[f"{k}_s"] for k in kinds if k.startswith("vectorised"))
            rows.append(row)
            print(f"M={M:>3} threads={threads}: " + ", ".join(f"{k} {row[f'{k}_steps_per_s']:7.1f}" for k in kinds)
                  + f" chain-steps/s  (vectorised {row['speedup']:.2f}x the best sequential)", flush=True)
        for group in samplers.values():
            for s in group:
                s.close()
        for v in vecs.values():
            v.close()
    best = {}
    for M in sorted({r["chains"] for r in rows}):
        mine = [r for r in rows if r["chains"] == M]
        # best vs best over every setting (threads, noise worker, compiled prior), and eager only
        for tag, ok in (("", lambda k: True), ("eager_", lambda k: "_compiled" not in k)):
            def top(method):
                return max(r[k] for r in mine for k in r if k.startswith(method) and k.endswith("_steps_per_s") and ok(k))
            seq, vec = top("sequential"), top("vectorised")
            best[tag + str(M)] = {"sequential_steps_per_s": seq, "vectorised_steps_per_s": vec,
                                  "speedup_best_vs_best": vec / seq}
            print(f"M={M}: best vs best {vec / seq:.2f}x" + (" (prior eager)" if tag else ""))
    path = write("scaling" + ("" if device.type == "cpu" else f"_{device.type}"), {"device": str(device), "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                             "model": "MLP 784-300-100-10, SGLD + group Lasso (lam 3) + Gaussian", "rows": rows,
                             "best_vs_best": best})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
