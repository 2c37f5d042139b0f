"""Step time of SGHMC-SA against SGHMC on the CNN (issue 11): what the adaptive spike-and-slab
prior costs per step, latents and their SA update included.

The shipped Deng et al. CNN config (``configs/mnist_cnn_sa.toml``: the 2-conv-2-FC CNN, batch 100,
SSGL on ``fc1.weight``, 3.2M of its 3.3M weights) and, as a harder case, the SSGL prior on every
prunable weight but the first conv's, with the pruning schedule of the ResNet experiments
(per-layer magnitude pruning after every step). SGHMC has the Gaussian prior (weight decay). Both
draw their noise in the worker thread (the fastest setting at 1 torch thread, see
sampler_overhead.py). Rounds of ``steps`` steps alternate between the kinds, so slow phases of a
shared machine hit all alike; medians per step. Real MNIST when found, random images otherwise.

    python benchmarks/sa_overhead.py [--threads 1] [--quick]

Key ``sa_vs_sghmc`` (shipped config, SGHMC-SA at its best setting: the SA update inline or
overlapped with the next forward pass in a worker thread, ``overlap_prior_update=True``, which the
experiment layer uses on CPU) and ``sa_all_pruned_vs_sghmc``. Target: <= 1.3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, timed, write  # noqa: E402

from sparse_ensembles.models import CNN  # noqa: E402
from sparse_ensembles.priors import Gaussian  # noqa: E402
from sparse_ensembles.pruning import SparsitySchedule  # noqa: E402
from sparse_ensembles.samplers import SGHMC, SGHMCSA, Polynomial  # noqa: E402

N = 50000
SSGL = dict(v0=1e-3, v1=1.0, nu=1.0, lam=1.0, sigma0=0.1, omega=Polynomial(0.02, 1000, 0.75))


def batches(steps: int, batch: int):
    try:
        from sparse_ensembles.data import load_idx_dataset
        x, y, _, _ = load_idx_dataset("mnist")
        x, y = x[: steps * batch], y[: steps * batch]
    except Exception:  # no data here: random images of the same shape
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(steps * batch, 784, generator=g), torch.randint(0, 10, (steps * batch,), generator=g)
    return list(zip(x.split(batch), y.split(batch)))


def make(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = CNN([1, 28, 28], 10)
    common = dict(num_data=N, friction=0.1, temperature=1e-3, prefetch_noise=True,
                  generator=torch.Generator().manual_seed(seed))
    if kind == "sghmc":
        return model, SGHMC(model.named_parameters(), 0.05, prior=Gaussian(1.0), **common)
    if kind in ("sghmc_sa", "sghmc_sa_overlap"):  # the SA update inline, or beside the next forward pass
        return model, SGHMCSA(model.named_parameters(), 0.05, sparse=["fc1.weight"], a=3.2e6, b=3.2e6, **SSGL, **common,
                              overlap_prior_update=kind.endswith("overlap"))
    covered = list(model.prunable_weights())[1:]
    return model, SGHMCSA(model.named_parameters(), 0.05, sparse=covered, a=1e4, b=1e4, **SSGL,
                          pruning=SparsitySchedule(0.9, 0.99, 50, "layer", False, covered), **common)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 5, 3
    torch.set_num_threads(args.threads)
    data = batches(args.steps, 100)
    kinds = ["sghmc", "sghmc_sa", "sghmc_sa_overlap", "sghmc_sa_all_pruned"]
    runs = {k: make(k) for k in kinds}
    times = {k: [] for k in kinds}

    def round_of(kind):
        model, opt = runs[kind]
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    for r in range(args.rounds + 1):  # round 0 warms up
        for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
            t = timed(lambda: round_of(k))
            if r:
                times[k].append(t / args.steps)
    for _, opt in runs.values():
        opt.close()
    med = {k: 1e3 * median(v) for k, v in times.items()}
    out = {"threads": args.threads, "batch": 100, "steps_per_round": args.steps, "rounds": args.rounds,
           "quick": args.quick, "ms_per_step": med,
           "sa_vs_sghmc": min(med["sghmc_sa"], med["sghmc_sa_overlap"]) / med["sghmc"],
           "sa_inline_vs_sghmc": med["sghmc_sa"] / med["sghmc"],
           "sa_overlap_vs_sghmc": med["sghmc_sa_overlap"] / med["sghmc"],
           "sa_all_pruned_vs_sghmc": med["sghmc_sa_all_pruned"] / med["sghmc"],
           "covered_params": {"sghmc_sa": runs["sghmc_sa"][1].ssgl.covered,
                              "sghmc_sa_all_pruned": runs["sghmc_sa_all_pruned"][1].ssgl.covered},
           "target": 1.3}
    path = write("sa_overhead" + ("_quick" if args.quick else ""), out)
    for k in kinds:
        print(f"{k:<22} {med[k]:7.2f} ms per step")
    print(f"sa_overhead: SGHMC-SA / SGHMC per step {out['sa_vs_sghmc']:.2f}x on the shipped CNN config "
          f"(SSGL on fc1; SA update inline {out['sa_inline_vs_sghmc']:.2f}x, overlapped "
          f"{out['sa_overlap_vs_sghmc']:.2f}x), {out['sa_all_pruned_vs_sghmc']:.2f}x with SSGL on every weight but the first and "
          f"pruning every step (target <= 1.3: {'met' if out['sa_vs_sghmc'] <= 1.3 else 'NOT met'}) -> {path.name}")


if __name__ == "__main__":
    main()
