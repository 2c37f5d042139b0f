"""Issue 25's target for the one-call API: on Fashion-MNIST with a 5,000-image training subset and 5,000
validation images, ``SparseEnsemble(mlp, budget={"params": 1.0}).fit(train, valid)`` -- choosing only
on valid -- against one SGD network of the same architecture at its own best schedule (also chosen on
valid), both then read once on the 10,000 test images.

    python benchmarks/fit_small_data.py            # 5,000 train / 5,000 valid -> results/fit_small_data.json
    python benchmarks/fit_small_data.py --full     # 50,000 train / 10,000 valid -> results/fit_full_data.json
    python benchmarks/fit_small_data.py --seed 1   # another seed (fit's, the baseline's, the shuffles) -> ..._s1.json

Splits: train = the first ``n_train`` training images, valid = the last ``n_valid``; the test set is
loaded only after both choices are made. The SGD baseline's grid (step x epochs, the step halved every
quarter of the epochs) is trained outside ``fit`` so that it gets its own best settings; ``fit``'s own
dense network (the demo's schedule) is one of its candidates as well. The latency of the chosen
ensemble against one dense network is measured at batch 100 (median of interleaved repeats).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write  # noqa: E402

from sparse_ensembles import metrics  # noqa: E402
from sparse_ensembles.data import load_idx_dataset  # noqa: E402
from sparse_ensembles.fit import Recipe, SparseEnsemble  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SGD_GRID = [(lr, epochs) for lr in (0.1, 0.5) for epochs in (20, 40)]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def loaders(n_train: int, n_valid: int, seed: int):
    """Train and valid loaders; each call has its own shuffling generator, so the SGD baseline's
    batches do not depend on how much of the fit ran in this process (a resumed fit draws fewer)."""
    x, y, _, _ = load_idx_dataset("fashion-mnist")
    train = TensorDataset(x[:n_train], y[:n_train])
    valid = TensorDataset(x[-n_valid:], y[-n_valid:])
    return (DataLoader(train, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(valid, batch_size=1000))


def sgd_baseline(train, valid, seed: int) -> tuple[nn.Module, list[dict]]:
    """One network per (lr, epochs) of the grid; the lowest valid NLL wins."""
    rows, best = [], None
    for lr, epochs in SGD_GRID:
        torch.manual_seed(seed)
        net = mlp()
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 4), gamma=0.5)
        t0 = time.perf_counter()
        for _ in range(epochs):
            for xb, yb in train:
                opt.zero_grad()
                nn.functional.cross_entropy(net(xb), yb).backward()
                opt.step()
            sched.step()
        logp = torch.cat([torch.log_softmax(net(xb), -1) for xb, _ in valid]).detach()
        yv = torch.cat([yb for _, yb in valid])
        rows.append({"lr": lr, "epochs": epochs, "valid_error": metrics.error(logp, yv), "valid_nll": metrics.nll(logp, yv),
                     "train_seconds": time.perf_counter() - t0})
        print(f"SGD lr {lr} epochs {epochs}: valid error {100 * rows[-1]['valid_error']:.2f}%, NLL {rows[-1]['valid_nll']:.4f}",
              flush=True)
        if best is None or rows[-1]["valid_nll"] < best[1]:
            best = (net.eval(), rows[-1]["valid_nll"])
    return best[0], rows


@torch.no_grad()
def test_metrics(model: nn.Module, x, y, log_probs: bool) -> dict:
    out = model(x)
    logp = out if log_probs else torch.log_softmax(out, -1)
    return {"error": metrics.error(logp, y), "nll": metrics.nll(logp, y), "ece": metrics.ece(logp, y)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="50,000 train / 10,000 valid instead of 5,000 / 5,000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lams", default="0.3,1,3", help="group-Lasso strengths of fit's grid")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    n_train, n_valid, name = (50000, 10000, "fit_full_data") if args.full else (5000, 5000, "fit_small_data")
    if args.seed:
        name += f"_s{args.seed}"
    t0 = time.perf_counter()
    train, valid = loaders(n_train, n_valid, args.seed)
    recipe = Recipe(lams=tuple(float(v) for v in args.lams.split(",")), seed=args.seed)
    workdir = Path(args.workdir or ROOT / "runs" / name)
    torch.manual_seed(args.seed)
    ens = SparseEnsemble(mlp(), budget={"params": 1.0}, recipe=recipe, workdir=workdir).fit(train, valid)
    fit_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    sgd, sgd_rows = sgd_baseline(*loaders(n_train, n_valid, args.seed), args.seed)
    sgd_seconds = time.perf_counter() - t1
    # both choices are made; the test set is read once
    _, _, x_test, y_test = load_idx_dataset("fashion-mnist")
    ens.eval()
    result = {"n_train": n_train, "n_valid": n_valid, "seed": args.seed, "budget": ens.budget,
              "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(recipe).items()},
              "chosen": ens.chosen, "candidates": ens.candidates, "diagnostics": ens.diagnostics,
              "sgd_grid": sgd_rows,
              "test": {"sparse_ensemble": test_metrics(ens, x_test, y_test, log_probs=True),
                       "sgd_best_on_valid": test_metrics(sgd, x_test, y_test, log_probs=False)},
              "params": {"sparse_ensemble": sum(metrics.nonzero_params(m) for m in ens.members),
                         "sgd": metrics.nonzero_params(sgd)},
              "latency_batch100": ens.measure_latency(x_test[:100]),
              "seconds": {"fit": fit_seconds, "sgd_grid": sgd_seconds, "total": time.perf_counter() - t0}}
    e, s = result["test"]["sparse_ensemble"], result["test"]["sgd_best_on_valid"]
    result["target_met"] = e["error"] < s["error"] and e["nll"] < s["nll"]
    path = write(name, result)
    print(f"\nchosen on valid: {ens.chosen['name']} ({ens.chosen['params_ratio']:.2f}x params)")
    print(f"test error: sparse ensemble {100 * e['error']:.2f}% vs SGD {100 * s['error']:.2f}%; "
          f"NLL {e['nll']:.4f} vs {s['nll']:.4f}; target {'met' if result['target_met'] else 'NOT met'}")
    print(f"{result['seconds']['total']:.0f} s in all; wrote {path}")


if __name__ == "__main__":
    main()
