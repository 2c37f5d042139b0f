"""Speed of the block-sparse LSTM (``compact.block_lstm``, numba kernels that skip pruned blocks)
against dense torch on CPU: one product, the whole layer's inference and one training step.

Measured per (hidden, batch) group, with input = hidden and T = 35 steps, at 50 / 80 / 90% random
block sparsity and blocks 16x16, 32x32, 32x1:

* ``rec_matmul``: one recurrent product h (batch x n) @ W_hh^T. Dense: ``torch.mm`` into a
  preallocated output (or ``F.linear``, whichever is faster); sparse: the compiled kernel into a
  preallocated output, as the time loop calls it.
* ``input_matmul``: the time-batched input product x (batch*T x in) @ W_ih^T + b (``torch.addmm``).
* ``layer_inference``: ``nn.LSTM`` against ``BlockSparseLSTM``, forward under no_grad; the sparse
  side at its best executor: ``"numba"`` (time loop on one thread) or ``"numba_parallel"`` (every
  step split over the threads), recorded as ``sparse_executor``.
* ``layer_train``: forward + backward of the sum of the outputs (x requires grad; all gradients).

Every variant of a group runs in one process, interleaved (dense, then each sparse variant, at 1
and then 2 threads), repeated; medians are reported. Each side is taken at its best thread count
among 1 and 2 (``torch.set_num_threads`` and ``numba.set_num_threads`` set alike), and the speed-up
is dense time / sparse time. The ideal at sparsity s is 1 / (1 - s).

    python benchmarks/block_sparse.py [--quick] [--repeats 7] [--device cpu|cuda]

Keys: ``layer_inference_speedup_80``, ``layer_train_speedup_80``, ``matmul_speedup_80`` (recurrent
product, batch 20), ``matmul_speedup_80_batch1``, ``input_matmul_speedup_80`` (hidden 650, blocks
32x32, batch 20 unless named batch1), and ``rows`` (every measurement). Targets at 80%: layer
inference >= 2x, training step >= 1.5x, recurrent product at batch 1 >= 3x.
``--quick``: hidden 650, 32x32, 80% only, 2 repeats (under a minute with numba compilation).
``--device cuda``: dense against torch's BSR products and the masked dense cuDNN LSTM on the GPU
(a clean message where there is none).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, median, set_threads, write  # noqa: E402

from sparse_ensembles.compact import block_lstm as bl  # noqa: E402

STEPS = 35
TARGETS = {"layer_inference_speedup_80": 2.0, "layer_train_speedup_80": 1.5, "matmul_speedup_80_batch1": 3.0}


def _keep(shape, block, density, g):
    return torch.rand(-(-shape[0] // block[0]), -(-shape[1] // block[1]), generator=g) < density


def _cpu_runners(hidden: int, batch: int, variants, seed: int = 0):
    """{(kind, variant): fn} for the dense model (variant "dense") and each (sparsity, block)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lstm = nn.LSTM(hidden, hidden, batch_first=True)
    x = torch.randn(batch, STEPS, hidden, generator=g)
    h = torch.randn(batch, hidden, generator=g)
    xm = x.reshape(-1, hidden).contiguous()
    n4 = 4 * hidden
    W_hh, W_ih = lstm.weight_hh_l0.detach(), lstm.weight_ih_l0.detach()
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    y_rec, y_in = torch.empty(batch, n4), torch.empty(batch * STEPS, n4)
    Wt_hh, Wt_ih = W_hh.t(), W_ih.t()

    def dense_rec():
        torch.mm(h, Wt_hh, out=y_rec)

    def dense_rec_linear():
        F.linear(h, W_hh)

    def infer(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def train(m):
        params = list(m.parameters())

        def run():
            for p in params:
                p.grad = None
            xx = x.clone().requires_grad_()
            m(xx)[0].sum().backward()
        return run

    runners = {("rec_matmul", "dense"): dense_rec, ("rec_matmul", "dense_linear"): dense_rec_linear,
               ("input_matmul", "dense"): lambda: torch.addmm(bias, xm, Wt_ih, out=y_in),
               ("layer_inference", "dense"): infer(lstm), ("layer_train", "dense"): train(lstm)}
    hn, xn, yr, yi, bn = h.numpy(), xm.numpy(), y_rec.numpy(), y_in.numpy(), bias.numpy()
    for sp, block in variants:
        dens = 1 - sp / 100
        k_ih = _keep((n4, hidden), block, dens, g)
        k_hh = _keep((n4, hidden), block, dens, g)
        m = bl.BlockSparseLSTM.from_lstm(lstm, block, k_ih, k_hh, executor="numba")
        plan = m.plan()
        d_hh = bl.gather_blocks(plan.hh, W_hh)
        d_ih = bl.gather_blocks(plan.ih, W_ih)
        name = f"{sp}_{block[0]}x{block[1]}"
        mp = bl.BlockSparseLSTM.from_lstm(lstm, block, k_ih, k_hh, executor="numba_parallel")

        def rec(lay=plan.hh, d=d_hh):
            import numba
            bl._mm(hn, lay.rowptr, lay.cols, d, lay.bh, lay.bw, lay.R, lay.C, yr, bl._EMPTY, 0, lay.dot,
                   numba.get_num_threads() > 1)

        def inp(lay=plan.ih, d=d_ih):
            import numba
            bl._mm(xn, lay.rowptr, lay.cols, d, lay.bh, lay.bw, lay.R, lay.C, yi, bn, 2, lay.dot,
                   numba.get_num_threads() > 1)
        runners.update({("rec_matmul", name): rec, ("input_matmul", name): inp,
                        ("layer_inference", name): infer(m), ("layer_train", name): train(m),
                        ("layer_inference", name + "|par"): infer(mp), ("layer_train", name + "|par"): train(mp)})
    return runners


def _time(fn, min_time: float = 0.002) -> float:
    """Seconds per call; fast calls are looped so that one sample lasts at least ``min_time``."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if dt >= min_time:
        return dt
    reps = max(1, int(min_time / max(dt, 1e-7)))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run_cpu(hiddens, batches, sparsities, blocks, repeats, threads):
    variants = [(sp, b) for sp in sparsities for b in blocks]
    rows = []
    for hidden in hiddens:
        for batch in batches:
            runners = _cpu_runners(hidden, batch, variants)
            times = {(k, t): [] for k in runners for t in threads}
            for r in range(repeats + 1):  # round 0 compiles and warms up
                for t in threads:
                    set_threads(t)
                    for key, fn in runners.items():
                        dt = _time(fn)
                        if r:
                            times[key, t].append(dt)
            med = {key: median(v) for key, v in times.items()}
            for kind in ("rec_matmul", "input_matmul", "layer_inference", "layer_train"):
                dense_names = ["dense", "dense_linear"] if kind == "rec_matmul" else ["dense"]
                dense_t, dense_thr, dense_name = min((med[(kind, d), t], t, d) for d in dense_names for t in threads)
                for sp, block in variants:
                    name = f"{sp}_{block[0]}x{block[1]}"
                    # the sparse side at its best executor (time loop on one thread or split) and thread count
                    names = [nm for nm in (name, name + "|par") if ((kind, nm), threads[0]) in med]
                    sp_t, sp_thr, sp_name = min((med[(kind, nm), t], t, nm) for nm in names for t in threads)
                    rows.append({"measure": kind, "hidden": hidden, "input": hidden, "batch": batch, "steps": STEPS,
                                 "sparsity": sp, "block": list(block), "dense_ms": 1e3 * dense_t,
                                 "dense_threads": dense_thr, "dense_op": dense_name, "sparse_ms": 1e3 * sp_t,
                                 "sparse_threads": sp_thr, "speedup": dense_t / sp_t, "ideal": 100 / (100 - sp),
                                 # at one thread both executors run the same code
                                 "sparse_executor": "numba_parallel" if sp_name.endswith("|par") and sp_thr > 1
                                 else "numba",
                                 "ms_by_threads": {"dense": {str(t): 1e3 * med[(kind, dense_name), t] for t in threads},
                                                   **{("sparse" if nm == name else "sparse_parallel"):
                                                      {str(t): 1e3 * med[(kind, nm), t] for t in threads}
                                                      for nm in names}}})
            print(f"  hidden {hidden} batch {batch}: {len(variants)} variants x {len(threads)} thread counts done",
                  flush=True)
    return rows


def run_cuda(hiddens, batches, sparsities, blocks, repeats):
    """Dense against BSR products and the masked dense cuDNN LSTM on the GPU (square blocks for BSR)."""
    dev = torch.device("cuda")
    rows = []

    def cuda_time(fn):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 10 / 1e3

    for hidden in hiddens:
        for batch in batches:
            g = torch.Generator().manual_seed(0)
            lstm = nn.LSTM(hidden, hidden, batch_first=True).to(dev)
            x = torch.randn(batch, STEPS, hidden, generator=g).to(dev)
            h = torch.randn(batch, hidden, generator=g).to(dev)
            W = lstm.weight_hh_l0.detach()
            for sp in sparsities:
                for block in blocks:
                    keep = _keep(tuple(W.shape), block, 1 - sp / 100, g)
                    mask = bl.expand_keep(keep, W.shape, block).to(dev)
                    masked = bl.BlockSparseLSTM.from_lstm(lstm.cpu(), block, keep_hh=keep, executor="dense").to(dev)
                    lstm.to(dev)
                    cands = {"dense_matmul": lambda: h @ W.t(),
                             "dense_layer": lambda: lstm(x),
                             "masked_dense_layer": lambda: masked(x)}
                    if block[0] == block[1] and W.shape[0] % block[0] == 0 and W.shape[1] % block[0] == 0:
                        Wb = (W * mask).to_sparse_bsr(block)
                        cands["bsr_matmul"] = lambda: (Wb @ h.t()).t()
                    with torch.no_grad():
                        meds = {k: median([cuda_time(f) for _ in range(repeats)]) for k, f in cands.items()}
                    row = {"device": torch.cuda.get_device_name(), "hidden": hidden, "batch": batch, "sparsity": sp,
                           "block": list(block), **{f"{k}_ms": 1e3 * v for k, v in meds.items()},
                           "layer_speedup": meds["dense_layer"] / meds["masked_dense_layer"]}
                    if "bsr_matmul_ms" in row:
                        row["matmul_speedup"] = meds["dense_matmul"] / meds["bsr_matmul"]
                    rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=0, help="default 7 (2 with --quick)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", default="1,2", help="thread counts tried for each side")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 7)
    if args.quick:
        hiddens, batches, sparsities, blocks = [650], [1, 20], [80], [(32, 32)]
    else:
        hiddens, batches, sparsities, blocks = [650, 1500], [1, 20], [50, 80, 90], [(16, 16), (32, 32), (32, 1)]
    t_start = time.perf_counter()
    import numba
    from sparse_ensembles._jit import vector_width
    info = {"platform": platform.platform(), "cpu": machine()["cpu"], "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__, "numba_version": numba.__version__,
            "numba_vector_bits": vector_width(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": args.quick, "repeats": repeats, "steps": STEPS}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("block_sparse: no CUDA here (torch.cuda.is_available() is False); nothing measured")
            return
        rows = run_cuda(hiddens, batches, sparsities, blocks, repeats)
        path = write("block_sparse_cuda" + ("_quick" if args.quick else ""), {**info, "rows": rows})
        for r in rows:
            print(r)
        print(f"-> {path}")
        return
    threads = [int(t) for t in args.threads.split(",")]
    rows = run_cpu(hiddens, batches, sparsities, blocks, repeats, threads)

    def pick(measure, batch=20, sp=80, block=(32, 32), hidden=650):
        for r in rows:
            if (r["measure"], r["batch"], r["sparsity"], tuple(r["block"]), r["hidden"]) == (measure, batch, sp, block, hidden):
                return r["speedup"]
        return None
    keys = {"layer_inference_speedup_80": pick("layer_inference"), "layer_train_speedup_80": pick("layer_train"),
            "matmul_speedup_80": pick("rec_matmul"), "matmul_speedup_80_batch1": pick("rec_matmul", batch=1),
            "input_matmul_speedup_80": pick("input_matmul"),
            "layer_inference_speedup_80_batch1": pick("layer_inference", batch=1),
            "layer_train_speedup_80_batch1": pick("layer_train", batch=1)}
    out = {**info, **keys, "targets": TARGETS, "threads_tried": threads,
           "seconds": time.perf_counter() - t_start, "rows": rows}
    path = write("block_sparse" + ("_quick" if args.quick else ""), out)
    print(f"{'measure':<16}{'hidden':>7}{'batch':>6}{'sparse':>7}{'block':>7}{'dense ms':>10}{'thr':>4}"
          f"{'sparse ms':>10}{'thr':>4}{'speed-up':>9}{'ideal':>6}")
    for r in rows:
        print(f"{r['measure']:<16}{r['hidden']:>7}{r['batch']:>6}{r['sparsity']:>6}%{'x'.join(map(str, r['block'])):>7}"
              f"{r['dense_ms']:>10.3f}{r['dense_threads']:>4}{r['sparse_ms']:>10.3f}{r['sparse_threads']:>4}"
              f"{r['speedup']:>8.2f}x{r['ideal']:>6.1f}  {r['sparse_executor'] if 'layer' in r['measure'] else ''}")
    met = {k: (keys[k] is not None and keys[k] >= v) for k, v in TARGETS.items()}
    print("block_sparse: " + ", ".join(f"{k} {keys[k]:.2f}x (target >= {TARGETS[k]}: {'met' if met[k] else 'NOT met'})"
                                       for k in TARGETS) + f"; {out['seconds']:.0f} s -> {path.name}")


if __name__ == "__main__":
    main()
