"""Inference latency on the 10k test images: one dense model, the dense ensemble, and the
compacted sparse ensemble (members physically shrunk), in batches of 100 and as one batch of 10k.

Members come from a finished run (default: runs/mnist_fnn_sse, SGD members and the 96% pruned
members). The compacted ensemble is timed three ways: member by member (``Ensemble`` of
``CompactMLP``), fused into batched matmuls (``FusedMLPEnsemble``, zero-padded to the widest
member) and as one block-diagonal CSR network (``SparseMLPEnsemble``, only nonzero weights
multiplied). The headline ``compact_ensemble_vs_single_dense`` is the faster of the two fused
executors (both compute the same function; ``compact_executor`` names it). Every variant runs in
one process, interleaved, repeated; medians are reported.
Target: compacted ensemble of 18 at <= 1.5x the latency of one dense model (batch 100).

    python benchmarks/compact_inference.py [--run DIR] [--sparsity 96] [--quick]
    python benchmarks/compact_inference.py --run runs/mnist_fnn_sse_widths   # structured members
    python benchmarks/compact_inference.py --device cuda                     # on a GPU (synchronised timing)

Without the run directory (a fresh clone) it builds 18 random members of ``--widths`` (default
160-64-32, the structured members' widths) reading random pixel sets, and random dense models:
latency does not depend on the weight values (``"synthetic": true`` in the results file).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, timed, write  # noqa: E402

from sparse_ensembles import checkpoint, metrics  # noqa: E402
from sparse_ensembles.compact import FusedMLPEnsemble, SparseMLPEnsemble  # noqa: E402
from sparse_ensembles.data import load_idx_dataset  # noqa: E402
from sparse_ensembles.ensembles import Ensemble  # noqa: E402
from sparse_ensembles.experiments.pipeline import run_config  # noqa: E402
from sparse_ensembles.experiments.stages import pct  # noqa: E402
from sparse_ensembles.models import MLP, CompactMLP  # noqa: E402

DEFAULT_RUN = "runs/mnist_fnn_sse"


def synthetic_members(widths: list[int], m: int = 18, seed: int = 0):
    """``m`` dense 784-300-100-10 models and ``m`` compacted members of ``widths`` (pixels, hidden...)
    with random weights and random pixel sets."""
    torch.manual_seed(seed)
    dense = [MLP([784, 300, 100, 10]).eval() for _ in range(m)]
    members = []
    for _ in range(m):
        pixels = torch.randperm(784)[: widths[0]].sort().values
        members.append(CompactMLP(784, pixels, list(widths) + [10], ["relu"] * (len(widths) - 1)).eval())
    return dense, members


def test_images(run: Path):
    try:
        name = run_config(run).task.dataset if run.is_dir() else "mnist"
        _, _, x, y = load_idx_dataset(name)
        return x, y
    except Exception:  # latency only needs images of the right shape
        g = torch.Generator().manual_seed(0)
        return torch.rand(10000, 28, 28, generator=g), torch.randint(0, 10, (10000,), generator=g)


def _percent(text: str) -> str:
    """'96', '96%' or '0.96' -> '96' (the run directory's pruned_96)."""
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity {text!r}: give a percent (96) or a fraction (0.96)") from None
    return pct(value if value <= 1 else value / 100)  # the stage's own directory naming


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=DEFAULT_RUN)
    ap.add_argument("--sparsity", default="96", type=_percent,
                    help="the pruned members to time, in percent (96) or as a fraction (0.96)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--widths", default="160,64,32", help="synthetic members' widths when --run does not exist")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where every model and the images live")
    args = ap.parse_args()
    device = torch.device(args.device)
    run = Path(args.run)
    x, y = test_images(run)
    synthetic = not run.is_dir()
    if synthetic:
        print(f"{run} does not exist: timing random members of widths {args.widths} (latency does not depend on weights)")
        dense, sparse = synthetic_members([int(w) for w in args.widths.split(",")])
    else:
        dense_files = sorted((run / "sgd").glob("member_*.pt"))
        sparse_files = sorted((run / f"pruned_{args.sparsity}").glob("member_*.pt"))
        if not dense_files or not sparse_files:
            sys.exit(f"{run} has no SGD members or no pruned_{args.sparsity} members; run "
                     "`sparse-ensembles run configs/mnist_fnn_sse.toml` first (or pass --run)")
        dense = [checkpoint.load_member(f)[0] for f in dense_files]
        sparse = [checkpoint.load_member(f)[0] for f in sparse_files]
    m = len(sparse)
    dense = (dense * m)[:m] if len(dense) < m else dense[:m]  # same ensemble size on both sides
    models = {"single_dense": dense[0], "dense_ensemble": Ensemble(dense), "compact_ensemble": Ensemble(sparse),
              "fused_compact_ensemble": FusedMLPEnsemble(sparse), "csr_compact_ensemble": SparseMLPEnsemble(sparse)}
    x, y = x.to(device), y.to(device)
    for mod in models.values():
        mod.to(device).eval()
    with torch.no_grad():
        ref = models["compact_ensemble"](x)
        gap = max((models[k](x) - ref).abs().max().item() for k in ("fused_compact_ensemble", "csr_compact_ensemble"))
    reps = 5 if args.quick else 21
    batches = [x[i:i + 100] for i in range(0, len(x), 100)]
    times = {(k, b): [] for k in models for b in ("b100", "b10k")}
    with torch.inference_mode():
        for r in range(reps + 1):
            for k, mod in models.items():
                t100 = timed(lambda: [mod(b) for b in batches], device)
                t10k = timed(lambda: mod(x), device)
                if r:
                    times[(k, "b100")].append(t100)
                    times[(k, "b10k")].append(t10k)
    med = {f"{k}_{b}_seconds": median(v) for (k, b), v in times.items()}
    base100, base10k = med["single_dense_b100_seconds"], med["single_dense_b10k_seconds"]
    cost = {k: metrics.cost(v) for k, v in {"single_dense": [dense[0]], "dense_ensemble": dense, "compact_ensemble": sparse}.items()}
    # the compacted ensemble is the faster fused execution of the shrunk members (same function,
    # checked above against member-by-member evaluation)
    best = min(("fused_compact_ensemble", "csr_compact_ensemble"), key=lambda k: med[k + "_b100_seconds"])
    out = {"run": str(run), "device": str(device), "synthetic": synthetic, "member_widths": [mm.widths for mm in sparse], "members": m, "sparsity_pct": args.sparsity, "repetitions": reps,
           "fused_vs_member_by_member_max_abs_gap": gap, **med, "compact_executor": best,
           "compact_ensemble_vs_single_dense": med[best + "_b100_seconds"] / base100,
           "padded_fused_vs_single_dense": med["fused_compact_ensemble_b100_seconds"] / base100,
           "csr_vs_single_dense": med["csr_compact_ensemble_b100_seconds"] / base100,
           "member_by_member_compact_ensemble_vs_single_dense": med["compact_ensemble_b100_seconds"] / base100,
           "dense_ensemble_vs_single_dense": med["dense_ensemble_b100_seconds"] / base100,
           "compact_ensemble_vs_single_dense_b10k": med[best + "_b10k_seconds"] / base10k,
           "dense_ensemble_vs_single_dense_b10k": med["dense_ensemble_b10k_seconds"] / base10k,
           "cost": cost, "target": 1.5, "quick": args.quick,
           # throughput in nonzero multiply-accumulates per second (10k images): the target needs
           # the sparse executor at >= required_fraction_of_dense_throughput of dense GEMM's rate
           "gmac_per_s_b100": {"single_dense": 1e-9 * len(x) * cost["single_dense"]["nonzero_macs"] / base100,
                               "csr_compact_ensemble": 1e-9 * len(x) * cost["compact_ensemble"]["nonzero_macs"]
                               / med["csr_compact_ensemble_b100_seconds"]},
           "required_fraction_of_dense_throughput": cost["compact_ensemble"]["nonzero_macs"]
           / cost["single_dense"]["nonzero_macs"] / 1.5,
           "test_error": {"single_dense": metrics.error(metrics.predict_logprobs(dense[0], x), y),
                          "compact_ensemble": metrics.error(ref, y)}}
    # a run other than the default gets its own results file: compact_inference_<run dir name>.json
    name = "compact_inference" + ("_synthetic" if synthetic else "" if run == Path(DEFAULT_RUN) else f"_{run.name}")
    path = write(name + ("_quick" if args.quick else ""), out)
    for k in models:
        print(f"{k:<24} batch100 {1e3 * med[k + '_b100_seconds']:8.1f} ms   batch10k {1e3 * med[k + '_b10k_seconds']:8.1f} ms")
    g = out["gmac_per_s_b100"]
    print(f"nonzero MACs/s at batch 100: dense {g['single_dense']:.1f} G, CSR ensemble {g['csr_compact_ensemble']:.1f} G "
          f"({g['csr_compact_ensemble'] / g['single_dense']:.0%} of dense; the target needs "
          f"{out['required_fraction_of_dense_throughput']:.0%})")
    which = f"random members of widths {args.widths}" if synthetic else f"members at {args.sparsity}%"
    print(f"compact_inference: {m} {which}: compact_ensemble_vs_single_dense "
          f"{out['compact_ensemble_vs_single_dense']:.2f} ({best}; padded fused "
          f"{out['padded_fused_vs_single_dense']:.2f}, CSR {out['csr_vs_single_dense']:.2f}, member by member "
          f"{out['member_by_member_compact_ensemble_vs_single_dense']:.2f}), dense_ensemble_vs_single_dense "
          f"{out['dense_ensemble_vs_single_dense']:.2f} (batch 100; target <= 1.5) -> {path.name}")


if __name__ == "__main__":
    main()
