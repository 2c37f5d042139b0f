"""Epoch time of SGLD and SGHMC against torch.optim.SGD on the 784-300-100-10 MLP (batch 100).

Headline (``sgld_vs_sgd`` / ``sghmc_vs_sgd``): **best vs best** = the median epoch time of the
sampler with Gaussian noise at its best setting (torch thread count; noise drawn in the worker
thread or inline; torch's generator or the counter-based ``noise="gaussian_parallel"``) over the median epoch time of SGD at *its* best thread count. That is
what a user pays for sampling instead of optimising on this machine. Target: <= 1.3.

Also reported: the per-thread table (each kind against SGD at the same thread count), the cheaper
two-point noise (``noise="rademacher"``), the samplers at T = 0 (their arithmetic without noise:
the difference to the default is what the RNG costs), and the raw cost of drawing one step's
normals with torch's generator, with ours (counter-based ziggurat on all threads) and with numpy's
``Generator(PCG64)`` (ziggurat).

Each thread count runs in fresh processes (the count is set before torch starts any threads), and
the processes for the thread counts alternate, each timing every kind in rotating order, so slow
phases of a shared machine hit all of them alike; each number is a median over all epochs.
Real MNIST when found, random images of the same shape otherwise.

    python benchmarks/sampler_overhead.py [--quick] [--device cuda]

``--device cuda`` runs the models, data and noise on the GPU (the timings synchronise the device
before and after each epoch) and writes ``sampler_overhead_cuda.json``; thread counts still vary
(they set the host side). Not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, timed, write  # noqa: E402

from sparse_ensembles.models import mlp  # noqa: E402
from sparse_ensembles.priors import Compiled, Gaussian, GroupLasso, Sum  # noqa: E402
from sparse_ensembles.samplers import SGHMC, SGLD  # noqa: E402
from sparse_ensembles.structure import groups_of  # noqa: E402
from sparse_ensembles.samplers.ziggurat import ZigguratNormal  # noqa: E402
from sparse_ensembles.training import minibatches, train_epoch  # noqa: E402

# kind -> sampler options (None: torch.optim.SGD)
KINDS = {
    "sgd": None,
    "sgld": dict(prefetch_noise=True),
    "sgld_inline": dict(prefetch_noise=False),
    "sghmc": dict(prefetch_noise=True),
    "sghmc_inline": dict(prefetch_noise=False),
    "sgld_parallel": dict(prefetch_noise=True, noise="gaussian_parallel"),
    "sgld_parallel_inline": dict(prefetch_noise=False, noise="gaussian_parallel"),
    "sghmc_parallel": dict(prefetch_noise=True, noise="gaussian_parallel"),
    "sghmc_parallel_inline": dict(prefetch_noise=False, noise="gaussian_parallel"),
    "sgld_rademacher": dict(prefetch_noise=True, noise="rademacher"),
    "sgld_rademacher_inline": dict(prefetch_noise=False, noise="rademacher"),
    "sghmc_rademacher": dict(prefetch_noise=True, noise="rademacher"),
    "sghmc_rademacher_inline": dict(prefetch_noise=False, noise="rademacher"),
    "sgld_group_lasso": dict(prefetch_noise=True, prior="group_lasso"),
    "sgld_group_lasso_inline": dict(prefetch_noise=False, prior="group_lasso"),
    "sgld_group_lasso_compiled": dict(prefetch_noise=True, prior="group_lasso_compiled"),
    "sgld_group_lasso_compiled_inline": dict(prefetch_noise=False, prior="group_lasso_compiled"),
    "sgld_t0": dict(temperature=0.0),
    "sghmc_t0": dict(temperature=0.0),
}
# the settings a user of the default (Gaussian) noise can choose between (headline), and of +-1 noise
GAUSSIAN = {"sgld": ["sgld", "sgld_inline", "sgld_parallel", "sgld_parallel_inline"],
            "sghmc": ["sghmc", "sghmc_inline", "sghmc_parallel", "sghmc_parallel_inline"]}
RADEMACHER = {"sgld_rademacher": ["sgld_rademacher", "sgld_rademacher_inline"],
              "sghmc_rademacher": ["sghmc_rademacher", "sghmc_rademacher_inline"]}
# SGLD with the SSE prior (group Lasso on the neuron groups + a Gaussian), as the pipeline runs it: at
# its best with or without sampler.compile_prior (priors.Compiled), and eager only
GROUP_LASSO = {"sgld_group_lasso": ["sgld_group_lasso", "sgld_group_lasso_inline", "sgld_group_lasso_compiled",
                                    "sgld_group_lasso_compiled_inline"],
               "sgld_group_lasso_eager": ["sgld_group_lasso", "sgld_group_lasso_inline"]}
TARGET = 1.3


def data():
    try:
        from sparse_ensembles.data import load_idx_dataset

        x, y, _, _ = load_idx_dataset("mnist")
        return x, y, "mnist"
    except Exception:  # the benchmark measures speed; any 60k x 784 data will do
        g = torch.Generator().manual_seed(0)
        return torch.rand(60000, 28, 28, generator=g), torch.randint(0, 10, (60000,), generator=g), "random"


def make(kind: str, model, n: int):
    if KINDS[kind] is None:
        return torch.optim.SGD(model.parameters(), lr=0.1)
    device = next(model.parameters()).device
    opts = {"temperature": 1.0, "generator": torch.Generator(device).manual_seed(0), **KINDS[kind]}
    prior = opts.pop("prior", None)
    if prior in ("group_lasso", "group_lasso_compiled"):
        opts["prior"] = Sum(GroupLasso(groups_of(model), 1.0), Gaussian(1.0))
        if prior == "group_lasso_compiled":  # compiled on its second step, in the warm-up round
            opts["prior"] = Compiled(opts["prior"])
    if kind.startswith("sgld"):
        return SGLD(model.named_parameters(), 0.1, num_data=n, **opts)
    return SGHMC(model.named_parameters(), 0.01, num_data=n, friction=0.1, **opts)


def rng_ms(numel: int, draws: int = 100) -> dict:
    """Milliseconds to draw ``numel`` float32 standard normals (one step's noise)."""
    buf = torch.empty(numel)
    gen = torch.Generator().manual_seed(0)
    npgen = np.random.Generator(np.random.PCG64(0))
    counter = ZigguratNormal(0, threads=torch.get_num_threads())
    out = {}
    for name, draw in [("torch_normal", lambda: buf.normal_(generator=gen)),
                       ("counter_ziggurat_all_threads", lambda: counter.fill_(buf)),
                       ("numpy_pcg64_standard_normal", lambda: npgen.standard_normal(out=buf.numpy(), dtype=np.float32))]:
        draw()
        t0 = time.perf_counter()
        for _ in range(draws):
            draw()
        out[name] = (time.perf_counter() - t0) / draws * 1e3
    return out


def measure(threads: int, rounds: int, n_use: int, device: str = "cpu") -> dict:
    """Epoch seconds per kind, ``rounds`` epochs each, at ``threads`` torch threads (set before any
    torch work, as the pipeline does: set later, the noise worker thread and an idle OpenMP team
    can fight for the cores and the sampler looks up to 2x slower than it is in a real run)."""
    torch.set_num_threads(threads)
    x, y, source = data()
    x, y = x[:n_use].to(device), y[:n_use].to(device)
    kinds = list(KINDS)
    times = {k: [] for k in kinds}
    for r in range(rounds + 1):  # round 0 warms up on a tenth of an epoch
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]  # rotate: no kind always runs first
        for k in order:
            torch.manual_seed(r)
            model = mlp([784, 300, 100, 10]).to(device)
            opt = make(k, model, n_use)
            gen = torch.Generator().manual_seed(r)
            m = n_use // 10 if r == 0 else n_use
            t = timed(lambda: train_epoch(model, opt, minibatches(x[:m], y[:m], 100, gen)), device)
            if hasattr(opt, "close"):
                opt.close()
            if r:
                times[k].append(t)
    numel = sum(p.numel() for p in mlp([784, 300, 100, 10]).parameters())
    return {"data": source, "epoch_seconds": times, "rng_ms": rng_ms(numel), "normals_per_step": numel}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer epochs of 1/4 size (about a minute)")
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # child mode: one thread count
    ap.add_argument("--rounds", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--examples", type=int, default=60000, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (models, data and noise there)")
    args = ap.parse_args()
    if args.threads:
        print(json.dumps(measure(args.threads, args.rounds, args.examples, args.device)))
        return

    alternations, n_use = (2, 15000) if args.quick else (4, 60000)
    cores = os.cpu_count() or 1
    # settings a user can choose: torch threads, and with several threads the OpenMP wait policy
    # (libgomp's default spins after a parallel region, which on a 2-vCPU machine takes half a core
    # from serial work such as torch's single-threaded normal_; PASSIVE sleeps instead)
    settings = ["1"] + ([str(cores), f"{cores}_passive"] if cores > 1 else [])
    times = {st: {k: [] for k in KINDS} for st in settings}
    rng = {st: [] for st in settings}
    for a in range(alternations):
        for st in (settings if a % 2 == 0 else settings[::-1]):
            # a fresh process per run, so the thread count (and wait policy) is set before torch
            # starts any threads
            threads, passive = int(st.split("_")[0]), st.endswith("_passive")
            env = {**os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if passive else {})}
            if not passive:
                env.pop("OMP_WAIT_POLICY", None)
            cmd = [sys.executable, __file__, "--threads", str(threads), "--rounds", "2", "--examples", str(n_use),
                   "--device", args.device]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.splitlines()[-1])
            for k, v in res["epoch_seconds"].items():
                times[st][k].extend(v)
            rng[st].append(res["rng_ms"])
            print(f"run {a + 1}/{alternations}, setting {st}: "
                  + ", ".join(f"{k} {median(v):.3f}s" for k, v in res["epoch_seconds"].items()), flush=True)

    med = {st: {k: median(v) for k, v in times[st].items()} for st in settings}
    out = {"data": res["data"], "device": args.device, "examples_per_epoch": n_use,
           "epochs_per_median": len(times["1"]["sgd"]), "quick": args.quick, "target": TARGET,
           "settings": "torch threads, '_passive' = OMP_WAIT_POLICY=PASSIVE", "by_setting": {}}
    for st in settings:
        out["by_setting"][st] = {"median_epoch_seconds": med[st],
                                 **{f"{k}_vs_sgd": med[st][k] / med[st]["sgd"] for k in KINDS if k != "sgd"},
                                 "rng_ms_per_step": {name: median([r[name] for r in rng[st]]) for name in rng[st][0]}}
    sgd_st = min(settings, key=lambda st: med[st]["sgd"])
    out["sgd_best"] = {"setting": sgd_st, "epoch_seconds": med[sgd_st]["sgd"]}
    for sampler, kinds in {**GAUSSIAN, **RADEMACHER, **GROUP_LASSO}.items():
        st, k = min(((st, k) for st in settings for k in kinds), key=lambda sk: med[sk[0]][sk[1]])
        out[f"{sampler}_best"] = {"setting": st, "kind": k, "epoch_seconds": med[st][k]}
        out[f"{sampler}_vs_sgd"] = med[st][k] / med[sgd_st]["sgd"]
    out["target_met"] = {s: out[f"{s}_vs_sgd"] <= TARGET for s in GAUSSIAN}
    out["normals_per_step"] = res["normals_per_step"]
    path = write("sampler_overhead" + ("" if args.device == "cpu" else f"_{torch.device(args.device).type}")
                 + ("_quick" if args.quick else ""), out)

    print("\nmedian epoch seconds (ratio to SGD at the same setting)")
    print("setting | " + " | ".join(KINDS))
    for st in settings:
        print(f"{st} | " + " | ".join(f"{med[st][k]:.3f}" + ("" if k == "sgd" else f" ({med[st][k] / med[st]['sgd']:.2f})")
                                      for k in KINDS))
    for st in settings:
        r = out["by_setting"][st]["rng_ms_per_step"]
        print(f"setting {st}: one step's {res['normals_per_step']} normals: torch {r['torch_normal']:.2f} ms, counter "
              f"ziggurat {r['counter_ziggurat_all_threads']:.2f} ms, numpy PCG64 {r['numpy_pcg64_standard_normal']:.2f} ms")
    met = " and ".join(f"{s.upper()} {'met' if ok else 'NOT met'}" for s, ok in out["target_met"].items())
    b = {s: out[f"{s}_best"] for s in GAUSSIAN}
    print(f"sampler_overhead best vs best: SGLD {out['sgld_vs_sgd']:.2f}x ({b['sgld']['kind']}, {b['sgld']['setting']}), "
          f"SGHMC {out['sghmc_vs_sgd']:.2f}x ({b['sghmc']['kind']}, {b['sghmc']['setting']}) over SGD at "
          f"{sgd_st} ({out['sgd_best']['epoch_seconds']:.2f} s/epoch); target <= {TARGET}: {met} "
          f"(+-1 noise: {out['sgld_rademacher_vs_sgd']:.2f}x / {out['sghmc_rademacher_vs_sgd']:.2f}x; SGLD with the "
          f"group Lasso: {out['sgld_group_lasso_vs_sgd']:.2f}x ({out['sgld_group_lasso_best']['kind']}), eager "
          f"{out['sgld_group_lasso_eager_vs_sgd']:.2f}x) -> {path.name}")


if __name__ == "__main__":
    main()
