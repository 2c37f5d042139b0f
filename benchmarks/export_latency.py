"""The exported sparse ensemble against eager PyTorch (issue 25): parity and CPU latency of the ONNX
graph in onnxruntime and of the ``torch.export`` program, for the ensemble ``fit`` chose in a work
directory (by default the one ``benchmarks/fit_small_data.py --full`` leaves).

    python benchmarks/export_latency.py [--workdir runs/fit_full_data] [--threads 1]

``fit`` is called again on the work directory with the benchmark's settings, which only reloads what
is there (no training when the directory is complete). Latency: batch 1 and batch 100 of Fashion-MNIST
test images, medians of interleaved rounds (eager members one by one, eager fused graph module, the
exported program, onnxruntime with ``intra_op_num_threads = --threads``). Writes
``results/export_latency.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write  # noqa: E402
from fit_small_data import loaders, mlp  # noqa: E402

from sparse_ensembles.data import load_idx_dataset  # noqa: E402
from sparse_ensembles.fit import Recipe, SparseEnsemble  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "fit_full_data"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, valid = loaders(50000, 10000, 0)
    recipe = Recipe(lams=(0.3, 1.0, 3.0), seed=0)
    ens = SparseEnsemble(mlp(), budget={"params": 1.0}, recipe=recipe, workdir=args.workdir, progress=False)
    ens.fit(train, valid)
    _, _, x_test, _ = load_idx_dataset("fashion-mnist")
    import onnxruntime
    out = {"chosen": ens.chosen["name"], "threads": args.threads, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        pt2 = ens.export(Path(tmp) / "ens.pt2", x_test[:100], repeats=3)
        onnx = ens.export(Path(tmp) / "ens.onnx", x_test[:100], repeats=3)
        program = torch.export.load(pt2["path"]).module()
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = onnxruntime.InferenceSession(onnx["path"], opts, providers=["CPUExecutionProvider"])
        graph = ens.graph_module()
        for batch in (1, 100):
            x = x_test[:batch].contiguous()
            feed = {"x": x.numpy()}
            runs = {"eager_members": lambda: ens(x), "eager_fused": lambda: graph(x), "torch_export": lambda: program(x),
                    "onnxruntime": lambda: sess.run(None, feed)}
            ref = ens(x).detach()
            diff = {"torch_export": float((program(x) - ref).abs().max()),
                    "onnxruntime": float((torch.from_numpy(sess.run(None, feed)[0]) - ref).abs().max())}
            times = {k: [] for k in runs}
            with torch.no_grad():
                for f in runs.values():
                    f()
                for _ in range(args.rounds):
                    for k, f in runs.items():
                        t0 = time.perf_counter()
                        f()
                        times[k].append(1000 * (time.perf_counter() - t0))
            ms = {k: statistics.median(v) for k, v in times.items()}
            out["batches"][str(batch)] = {"ms": ms, "max_abs_diff": diff,
                                          "speedup_vs_eager_members": {k: ms["eager_members"] / v for k, v in ms.items()}}
            print(f"batch {batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
                  + f"; max |diff| torch.export {diff['torch_export']:.1e}, onnxruntime {diff['onnxruntime']:.1e}", flush=True)
    path = write("export_latency", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
