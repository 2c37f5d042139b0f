"""What a user of ``experiment.block_kernel`` feels: one SGD training step and one inference pass
of a whole block-pruned LSTM language model (embedding, LSTM layers, dense softmax) with its LSTM
layers dense against the same model on the block-sparse kernel (``compact.block_lm.on_block_kernel``).

Model: vocabulary 10,000, 2 LSTM layers of ``--hidden`` units (650: Zaremba's medium; 200: small),
32x32 blocks of every LSTM weight matrix pruned at random to ``--sparsity``, batch 20 x 35 tokens,
an SGD step = forward, cross-entropy, backward, ``optimizer.step()`` (lr 1). Each side at its best of
1 and 2 threads and, for the kernel, of its executors (``numba``, ``numba_parallel``), interleaved,
``--repeats`` rounds, medians.

    python benchmarks/block_lm_train.py [--hidden 650] [--sparsity 0.8] [--repeats 7] [--quick]

Writes benchmarks/results/block_lm_train_h<hidden>.json (``--quick``: block_lm_train_quick.json).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, median, set_threads, write  # noqa: E402

from sparse_ensembles import pruning  # noqa: E402
from sparse_ensembles.compact.block_lm import on_block_kernel  # noqa: E402
from sparse_ensembles.models import LSTMLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=650)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--quick", action="store_true", help="hidden 64, one round (a smoke test, seconds)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.repeats = 64, 1
    t_start = time.perf_counter()
    torch.manual_seed(0)
    vocab, n = 10_000, args.hidden
    model = LSTMLM(vocab, [n, n], n, block=(32, 32))
    params = dict(model.named_parameters())
    lstm_fams = [f for f in model.groups("block") if f.params[0].startswith("lstms.")]
    masks = pruning.random_group_masks(params, lstm_fams, args.sparsity, torch.Generator().manual_seed(1))
    pruning.apply_masks(model, masks)
    tokens = torch.randint(0, vocab, (20, 36), generator=torch.Generator().manual_seed(2))
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def step():
        opt.zero_grad(set_to_none=True)
        logits, _ = model(x)
        F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1)).backward()
        opt.step()
        for name, keep in masks.items():  # as the pipeline's Constrained optimizer does
            params[name].data.mul_(keep)

    def infer():
        with torch.no_grad():
            model(x)

    threads = [int(t) for t in args.threads.split(",")]
    sides = [("dense", None), ("kernel_numba", "numba"), ("kernel_numba_parallel", "numba_parallel")]
    times = {(side, kind, t): [] for side, _ in sides for kind in ("train_step", "inference") for t in threads}
    for r in range(args.repeats + 1):  # round 0 warms up and compiles
        for t in threads:
            set_threads(t)
            for side, executor in sides:
                if executor == "numba_parallel" and t == 1:
                    continue
                for kind, fn in (("train_step", step), ("inference", infer)):
                    if executor is None:
                        model.train(kind == "train_step")
                        t0 = time.perf_counter()
                        fn()
                        dt = time.perf_counter() - t0
                    else:
                        with on_block_kernel(model, executor):
                            model.train(kind == "train_step")
                            t0 = time.perf_counter()
                            fn()
                            dt = time.perf_counter() - t0
                    if r:
                        times[side, kind, t].append(dt)
    med = {k: 1e3 * median(v) for k, v in times.items() if v}
    out = {"machine": machine(), "hidden": n, "vocab": vocab, "layers": 2, "block": [32, 32], "sparsity": args.sparsity,
           "batch": 20, "steps": 35, "repeats": args.repeats, "threads_tried": threads,
           "ms": {f"{s}|{k}|{t}": v for (s, k, t), v in med.items()}}
    for kind in ("train_step", "inference"):
        dense_ms, dense_t = min((med["dense", kind, t], t) for t in threads)
        kern_ms, kern_t, kern_side = min((v, t, s) for (s, k, t), v in med.items() if k == kind and s != "dense")
        out[kind] = {"dense_ms": dense_ms, "dense_threads": dense_t, "kernel_ms": kern_ms, "kernel_threads": kern_t,
                     "kernel_executor": kern_side.replace("kernel_", ""), "speedup": dense_ms / kern_ms}
        print(f"{kind:<11} dense {dense_ms:8.2f} ms ({dense_t} thr)  kernel {kern_ms:8.2f} ms ({kern_t} thr, "
              f"{out[kind]['kernel_executor']})  speed-up {dense_ms / kern_ms:.2f}x")
    out["seconds"] = time.perf_counter() - t_start
    path = write("block_lm_train_quick" if args.quick else f"block_lm_train_h{n}", out)
    print(f"block_lm_train: hidden {n}, {100 * args.sparsity:g}% blocks of the LSTM weights: train step "
          f"{out['train_step']['speedup']:.2f}x, inference {out['inference']['speedup']:.2f}x; "
          f"{out['seconds']:.0f} s -> {path.name}")


if __name__ == "__main__":
    main()
