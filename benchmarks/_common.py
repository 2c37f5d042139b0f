"""Shared helpers: machine description, medians, results files under benchmarks/results/."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

# where results files go; tests point it at a temporary folder
RESULTS = Path(os.environ.get("SPARSE_ENSEMBLES_RESULTS", Path(__file__).resolve().parent / "results"))
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if "SPARSE_ENSEMBLES_DATA" not in os.environ and _SHARED.is_dir():
    os.environ["SPARSE_ENSEMBLES_DATA"] = str(_SHARED)  # our machines keep MNIST in ../shared/data


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def set_threads(t: int) -> None:
    """torch's and numba's threads alike (the block-sparse kernels run on numba's)."""
    import numba
    torch.set_num_threads(t)
    numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))


def median(xs) -> float:
    return float(statistics.median(xs))


def timed(fn, device=None) -> float:
    """Wall seconds of ``fn()``; on a CUDA ``device`` the queued kernels are waited for before and after."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=1))
    return path
