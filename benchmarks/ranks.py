"""Issue 23: throughput of a stage of independent members, one process against ``torchrun`` ranks.

    python benchmarks/ranks.py [--quick]        # -> results/ranks.json
    python benchmarks/ranks.py --members 4 --epochs 16   # a longer stage -> results/ranks_m4e16.json

The stage is the demo's SGD stage (Fashion-MNIST 784-300-100-10, batch 100) with ``--members``
members of ``--epochs`` epochs each: ``sparse-ensembles run configs/fmnist_demo.toml --only sgd``.
Each setting is timed as a user feels it, the whole command from start to exit (interpreter, data
loading, ``torchrun``'s rendezvous and the barriers included), in a fresh run directory:

* one process at 1 torch thread and at all cores (``experiment.threads``);
* ``torchrun --standalone --nproc_per_node=P`` with 1 thread per rank, the members split
  statically over the P ranks.

Settings alternate within each round; medians over ``--rounds``. Headline: members per second of
the ranks over the one process at *its* best thread count (target on 2 cores: >= 1.7). Also
reported: the same ratio for the training alone (the members' recorded ``train_seconds``; for the
ranks the busiest rank's sum), which leaves out start-up, data loading and rendezvous.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, write  # noqa: E402

from sparse_ensembles.checkpoint import load_member  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.7


def command(setting: str, out: Path, members: int, epochs: int) -> list[str]:
    args = ["run", str(ROOT / "configs" / "fmnist_demo.toml"), "--only", "sgd", "--no-progress", "--out", str(out),
            "--set", f"sgd.members={members}", "--set", f"sgd.epochs={epochs}"]
    kind, n = setting.split("_")
    if kind == "process":
        return [sys.executable, "-m", "sparse_ensembles", *args, "--set", f"experiment.threads={n}"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "sparse_ensembles", *args, "--set", "experiment.threads=1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 members x 1 epoch, 1 round (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.members, args.epochs, args.rounds = 2, 1, 1
    cores = os.cpu_count() or 1
    settings = ["process_1"] + ([f"process_{cores}", f"ranks_{cores}"] if cores > 1 else ["ranks_2"])
    times = {s: [] for s in settings}
    train_wall = {s: [] for s in settings}
    scratch = Path(tempfile.mkdtemp(prefix="ranks_bench_"))
    try:
        for r in range(args.rounds):
            for s in (settings if r % 2 == 0 else settings[::-1]):
                out = scratch / f"{s}_{r}"
                env = {**os.environ, "OMP_NUM_THREADS": "1"} if s.startswith("ranks") else dict(os.environ)
                t0 = time.perf_counter()
                proc = subprocess.run(command(s, out, args.members, args.epochs), cwd=ROOT, env=env,
                                      capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                if proc.returncode:
                    raise SystemExit(f"{s} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                files = sorted((out / "sgd").glob("member_*.pt"))
                if len(files) != args.members:
                    raise SystemExit(f"{s}: expected {args.members} members in {out / 'sgd'}, found {len(files)}")
                times[s].append(seconds)
                # the members' own training time; the ranks train theirs side by side, so the stage's
                # training wall time is the busiest rank's sum (static assignment: member k on rank k % P)
                train = [load_member(f)[1]["train_seconds"] for f in files]
                p = int(s.split("_")[1]) if s.startswith("ranks") else 1
                train_wall[s].append(max(sum(train[i::p]) for i in range(p)))
                shutil.rmtree(out)
                print(f"round {r + 1}/{args.rounds} {s}: {seconds:.1f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {s: median(v) for s, v in times.items()}
    best_process = min((s for s in settings if s.startswith("process")), key=med.get)
    ranks = next(s for s in settings if s.startswith("ranks"))
    ratio = med[best_process] / med[ranks]
    out = {"stage": "fmnist_demo sgd", "members": args.members, "epochs": args.epochs, "rounds": args.rounds,
           "cores": cores, "wall_seconds": times, "median_wall_seconds": med,
           "members_per_second": {s: args.members / t for s, t in med.items()},
           "training_wall_seconds": train_wall,
           "median_training_wall_seconds": {s: median(v) for s, v in train_wall.items()},
           "ranks_vs_best_process_training_only": (min(median(train_wall[s]) for s in settings if s.startswith("process"))
                                                   / median(train_wall[next(s for s in settings if s.startswith("ranks"))])),
           "best_process": best_process, "ranks_vs_best_process": ratio, "target": TARGET,
           "target_met": ratio >= TARGET, "quick": args.quick}
    # another stage size is a separate record beside the default one
    size = "" if args.quick or (args.members, args.epochs) == (4, 4) else f"_m{args.members}e{args.epochs}"
    path = write("ranks" + size + ("_quick" if args.quick else ""), out)
    print(" | ".join(f"{s} {t:.1f} s" for s, t in med.items()))
    print(f"ranks: {ranks} {ratio:.2f}x the members/s of {best_process} (target >= {TARGET}: "
          f"{'met' if ratio >= TARGET else 'NOT met'}); training alone (start-up excluded): "
          f"{out['ranks_vs_best_process_training_only']:.2f}x -> {path.name}")


if __name__ == "__main__":
    main()
