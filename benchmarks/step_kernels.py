"""How many operations one training step dispatches: SGD, SGLD and SGLD with the SSE prior (group
Lasso + Gaussian), on the 784-300-100-10 MLP (batch 100) and a 2-layer LSTM LM with ISS groups
(batch 20 x 35). On a GPU each operation is a kernel launch (a multi-tensor ``_foreach`` call one or
a few), which is what a small model's step costs there; issue 23 measured the group Lasso's many
small kernels as its GPU overhead (1.99x an SGD step on an H200, SGLD alone 1.10x).

``dispatched``: the ATen operations a step calls, counted with a ``TorchDispatchMode`` (views and
bare allocations left out), eager kinds only (a compiled function's generated kernels are not ATen
calls), with the package's source line of each of the sampler's and prior's operations.
``--device cuda`` also counts the CUDA kernels the profiler sees in a step, for every kind including
the compiled prior (``priors.Compiled``). Counts do not depend on the machine's load, so one step
each is enough (after warm-up steps).

``host_us_per_step``: the same steps on the same architectures shrunk to tiny widths (MLP 8-6-4-2,
batch 4; LSTM 2 x 8 units, vocabulary 50, batch 4 x 5), where the arithmetic is negligible and a
step costs what its dispatch costs: the regime of a small model on a GPU, where the host issues
launches faster than the GPU finishes them only if it has few to issue. Medians of ``--rounds``
rounds of 200 steps, at 1 thread on CPU, each kind beside SGD in the same run.

    python benchmarks/step_kernels.py [--device cuda] [--hidden 200] [--rounds 7]

Writes ``results/step_kernels_<device>.json``.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write  # noqa: E402

from sparse_ensembles.models import LSTMLM  # noqa: E402
from sparse_ensembles.priors import Compiled, Gaussian, GroupLasso, Sum  # noqa: E402
from sparse_ensembles.samplers import SGLD  # noqa: E402
from sparse_ensembles.structure import groups_of  # noqa: E402

PACKAGE = str(Path(__file__).resolve().parents[1] / "sparse_ensembles")
NOT_KERNELS = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.detach"}


class Dispatched(TorchDispatchMode):
    """Records every non-view ATen call as (name, where): the package's source line, or '-' for
    calls from outside it (the model's forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not view and name not in NOT_KERNELS:
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE) and "/models/" not in f.filename]
            where = f"{Path(ours[-1].filename).relative_to(PACKAGE)}:{ours[-1].lineno}" if ours else "-"
            self.calls.append((name, where))
        return out


def mlp_setup(device, sizes=(784, 300, 100, 10), batch=100):
    a, b, c, d = sizes
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Linear(b, c),
                                torch.nn.ReLU(), torch.nn.Linear(c, d)).to(device)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, a, generator=g).to(device), torch.randint(0, d, (batch,), generator=g).to(device)

    def step(opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, groups_of(model), 50_000, step


def lstm_setup(device, hidden, vocab=10_000, batch=(20, 35)):
    model = LSTMLM(vocab, [hidden] * 2, hidden, grouping="iss").to(device)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(vocab, batch, generator=g).to(device) for _ in range(2))
    carried = [None]

    def step(opt):
        logits, state = model(x, carried[0])
        carried[0] = [(h.detach(), c.detach()) for h, c in state]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1)).backward()
        opt.step()
    return model, model.groups("iss"), 929_589, step


def optimiser(kind, model, groups, num_data, device):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    prior = Gaussian(1.0)
    if kind.startswith("sgld_group_lasso"):
        prior = Sum(GroupLasso(groups, 1.0), Gaussian(1.0))
        if kind.endswith("_compiled"):
            prior = Compiled(prior)
    return SGLD(model.named_parameters(), 0.01, num_data=num_data, temperature=1.0, prior=prior,
                generator=torch.Generator(device).manual_seed(0), prefetch_noise=False)


def cuda_kernels(step, opt) -> int:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(opt)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_us_per_step(setup, kinds, device, rounds: int, steps: int = 200) -> dict:
    """Median microseconds per step of each kind on the tiny model, the kinds interleaved per round."""
    runs = {}
    for kind in kinds:
        torch.manual_seed(0)
        model, groups, num_data, step = setup()
        opt = optimiser(kind, model, groups, num_data, device)
        for _ in range(20):  # warm-up; the compiled prior compiles on its second step
            step(opt)
        runs[kind] = (step, opt)
    times = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind, (step, opt) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(opt)
            sync(device)
            times[kind].append((time.perf_counter() - t0) / steps * 1e6)
    us = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"us": us[k], "vs_sgd": us[k] / us["sgd"]} for k in kinds}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=200, help="LSTM units per layer (counts do not depend on it)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the tiny models' host timing")
    args = ap.parse_args()
    device, cuda = args.device, torch.device(args.device).type == "cuda"
    kinds = ["sgd", "sgld", "sgld_group_lasso", "sgld_group_lasso_compiled"]
    if not cuda:
        torch.set_num_threads(1)  # dispatch is serial: more threads only add their wake-ups
    out = {"device": device, "models": {}, "host_us_per_step": {}}
    tiny = (("mlp_8_6_4_2", lambda: mlp_setup(device, (8, 6, 4, 2), batch=4)),
            ("lstm_2x8_iss", lambda: lstm_setup(device, 8, vocab=50, batch=(4, 5))))
    for name, setup in tiny:
        rows = host_us_per_step(setup, kinds, device, args.rounds)
        out["host_us_per_step"][name] = rows
        print(f"{name} host time per step: " + ", ".join(f"{k} {r['us']:.0f} us ({r['vs_sgd']:.2f}x)" for k, r in rows.items()),
              flush=True)
    for name, setup in (("mlp_784_300_100_10", lambda: mlp_setup(device)),
                        (f"lstm_2x{args.hidden}_iss", lambda: lstm_setup(device, args.hidden))):
        rows = {}
        for kind in kinds:
            torch.manual_seed(0)
            model, groups, num_data, step = setup()
            opt = optimiser(kind, model, groups, num_data, device)
            for _ in range(3):  # warm-up (the compiled prior compiles on its second step)
                step(opt)
            row = {}
            if not kind.endswith("_compiled"):
                with Dispatched() as d:
                    step(opt)
                row["dispatched"] = len(d.calls)
                row["dispatched_by_optimiser"] = dict(collections.Counter(f"{n} @ {w}" for n, w in d.calls if w != "-"))
            if cuda:
                row["cuda_kernels"] = cuda_kernels(step, opt)
            rows[kind] = row
            print(f"{name} {kind}: " + ", ".join(f"{k} {v}" for k, v in row.items() if isinstance(v, int)), flush=True)
        out["models"][name] = rows
    path = write(f"step_kernels_{torch.device(device).type}", out)
    print(f"-> {path.name}")


if __name__ == "__main__":
    main()
