"""The one-call API on an LSTM language model (issue 25, "the built-in kinds"): ``fit`` over the
shipped PTB config, chosen on valid within one dense model's parameters, then read once on test.

    python benchmarks/fit_lm.py                      # 232k PTB training tokens -> results/fit_ptb232k.json
    python benchmarks/fit_lm.py --train-tokens 0     # all 929k (about 4x the time) -> results/fit_ptb.json

``configs/ptb_lstm_sse_small.toml`` (Zaremba's small LSTM, 2 x 200, no dropout; ISS groups, untied
embeddings) as shipped, except: the training stream cut to ``--train-tokens``, the group-Lasso strength
rescaled with it (the config's 3.0e-5 per token x N / 35, as its comment derives it: the prior's
weight against the likelihood stays that of full PTB), and the sparsities 80 / 90% (the config's
ISS+SE rows). The work folder resumes (``--out``, default ``runs/fit_ptb232k``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write  # noqa: E402

from sparse_ensembles import checkpoint  # noqa: E402
from sparse_ensembles.experiments import config as config_mod  # noqa: E402
from sparse_ensembles.experiments.fit_config import fit_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PTB_TRAIN_TOKENS = 929_589
LAM_PER_TOKEN = 3.0e-5  # the config's ISS strength on a loss summed over 35 steps, per training token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-tokens", type=int, default=232_000, help="0: all of PTB's training stream")
    ap.add_argument("--members", default="2,4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.train_tokens or PTB_TRAIN_TOKENS
    name = "fit_ptb" if not args.train_tokens else f"fit_ptb{args.train_tokens // 1000}k"
    lam = round(LAM_PER_TOKEN * n / 35, 4)
    overrides = [f"task.train_tokens={args.train_tokens}", "prune.sparsities=[0.8, 0.9]"]
    cfg = config_mod.load(ROOT / "configs" / "ptb_lstm_sse_small.toml", overrides)
    out = Path(args.out or ROOT / "runs" / name)
    members = tuple(int(m) for m in args.members.split(","))
    t0 = time.perf_counter()
    result = fit_config(cfg, out, {"params": 1.0}, lams=(lam,), members=members, progress=False)
    work = checkpoint.read_json(out / "work" / "fit.json")
    path = write(name, {"config": "configs/ptb_lstm_sse_small.toml", "overrides": overrides, "lam": lam,
                        "members": members, "budget": {"params": 1.0}, "chosen": result["chosen"],
                        "candidates": work["candidates"], "diagnostics": work["diagnostics"], "test": result["test"],
                        "seconds_this_call": time.perf_counter() - t0})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
