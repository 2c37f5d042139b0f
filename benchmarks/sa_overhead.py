"""Step time of SGHMC-SA against SGHMC on the CNN (issue 11): what the adaptive spike-and-slab
prior costs per step, latents and their SA update included.

The shipped Deng et al. CNN config (``configs/mnist_cnn_sa.toml``: the 2-conv-2-FC CNN, batch 100,
SSGL on ``fc1.weight``, 3.2M of its 3.3M weights) and, as a harder case, the SSGL prior on every
prunable weight but the first conv's, with the pruning schedule of the ResNet experiments
(per-layer magnitude pruning after every step). SGHMC has the Gaussian prior (weight decay). Rounds of ``steps`` steps alternate between the kinds, so slow phases of a
shared machine hit all alike; medians per step. Real MNIST when found, random images otherwise.

    python benchmarks/sa_overhead.py [--threads 1,2] [--quick]

Every kind runs at every setting (torch threads x noise drawn in the worker thread or inline) and
the key compares each at its own best setting, the way sampler_overhead.py does.

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


def make(kind: str, prefetch_noise: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = CNN([1, 28, 28], 10)
    common = dict(num_data=N, friction=0.1, temperature=1e-3, prefetch_noise=prefetch_noise,
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
    ap.add_argument("--threads", default="1,2", help="torch thread counts to sweep, e.g. 1,2")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 3, 3
    threads = [int(t) for t in str(args.threads).split(",")]
    data = batches(args.steps, 100)
    kinds = ["sghmc", "sghmc_sa", "sghmc_sa_overlap", "sghmc_sa_all_pruned"]
    # every kind at every setting: torch threads x noise drawn in the worker thread or inline
    settings = [(t, w) for t in threads for w in (True, False)]
    runs = {(k, s): make(k, prefetch_noise=s[1]) for k in kinds for s in settings}
    times = {key: [] for key in runs}

    def round_of(key):
        torch.set_num_threads(key[1][0])
        model, opt = runs[key]
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    keys = list(runs)
    for r in range(args.rounds + 1):  # round 0 warms up; the order rotates so slow phases hit all alike
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            t = timed(lambda: round_of(key))
            if r:
                times[key].append(t / args.steps)
    for _, opt in runs.values():
        opt.close()
    ms = {k: {f"threads{s[0]}_{'worker' if s[1] else 'inline'}_noise": 1e3 * median(times[(k, s)]) for s in settings}
          for k in kinds}
    best = {k: min(v.values()) for k, v in ms.items()}
    best_setting = {k: min(v, key=v.get) for k, v in ms.items()}
    same = {k: {s: ms[k][s] / ms["sghmc"][s] for s in ms[k]} for k in kinds[1:]}  # at equal settings
    out = {"threads": threads, "batch": 100, "steps_per_round": args.steps, "rounds": args.rounds,
           "quick": args.quick, "ms_per_step": ms, "best_ms_per_step": best, "best_setting": best_setting,
           "sa_vs_sghmc": min(best["sghmc_sa"], best["sghmc_sa_overlap"]) / best["sghmc"],
           "sa_inline_vs_sghmc": best["sghmc_sa"] / best["sghmc"],
           "sa_overlap_vs_sghmc": best["sghmc_sa_overlap"] / best["sghmc"],
           "sa_all_pruned_vs_sghmc": best["sghmc_sa_all_pruned"] / best["sghmc"],
           "ratio_at_equal_settings": same,
           "covered_params": {"sghmc_sa": runs[("sghmc_sa", settings[0])][1].ssgl.covered,
                              "sghmc_sa_all_pruned": runs[("sghmc_sa_all_pruned", settings[0])][1].ssgl.covered},
           "target": 1.3}
    path = write("sa_overhead" + ("_quick" if args.quick else ""), out)
    for k in kinds:
        print(f"{k:<22} " + "  ".join(f"{s} {v:7.2f}" for s, v in ms[k].items()) + " ms per step")
    print(f"sa_overhead: SGHMC-SA / SGHMC per step, each at its best setting, {out['sa_vs_sghmc']:.2f}x on the shipped "
          f"CNN config (SSGL on fc1; SGHMC best at {best_setting['sghmc']}, SA update inline "
          f"{out['sa_inline_vs_sghmc']:.2f}x, overlapped {out['sa_overlap_vs_sghmc']:.2f}x), "
          f"{out['sa_all_pruned_vs_sghmc']:.2f}x with SSGL on every weight but the first and pruning every step "
          f"(target <= 1.3: {'met' if out['sa_vs_sghmc'] <= 1.3 else 'NOT met'}) -> {path.name}")

if __name__ == "__main__":
    main()
