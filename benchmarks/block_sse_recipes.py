"""Block-sparse SSE recipes on PTB compared on the validation split (issue 21): for each run
directory (a chain and its pruned, retrained members, e.g. the shipped ptb_lstm_block_sse and the
same chain retrained with other ``[retrain]`` settings), the valid perplexity of every retrained
member, of the ensemble of those present, and the recipe read from the run's config. Test is not
read here: the recipe is chosen on valid, and the table (block_sparse_table.py) reads test once.

    python benchmarks/block_sse_recipes.py runs/ptb_lstm_block_sse_v1 runs/ptb_lstm_block_sse_r8g \\
        runs/ptb_lstm_block_sse

Writes benchmarks/results/block_sse_recipes.json (``--label`` another name).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write  # noqa: E402

from sparse_ensembles import checkpoint  # noqa: E402
from sparse_ensembles.experiments import config as config_mod  # noqa: E402
from sparse_ensembles.tasks.language_model import LanguageModel  # noqa: E402


def recipe(cfg) -> dict:
    r, m = cfg.retrain, cfg.model
    return {"retrain_epochs": r.epochs, "ramp_epochs": r.ramp_epochs, "lr": r.lr, "lr_decay": r.lr_decay,
            "block": list(m.block), "softmax_block": list(m.softmax_block) or list(m.block),
            "sparsity": cfg.prune.sparsities}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--stage", default="pruned_*", help="the retrained members' folder (a shell pattern)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="block_sse_recipes", help="results file name (benchmarks/results/LABEL.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task, out = None, []
    for run in args.runs:
        t0 = time.perf_counter()
        cfg = config_mod.load(run / "config.current.toml" if (run / "config.current.toml").exists() else run / "config.toml")
        task = task or LanguageModel.from_config(cfg.task)
        files = sorted(run.glob(f"{args.stage}/member_*.pt"))
        if not files:
            print(f"{run}: no retrained members in {args.stage}/ yet")
            continue
        members, logps = [], []
        for f in files:
            model, meta = checkpoint.load_member(f)
            model.eval()
            with torch.no_grad():
                lp = task.target_logprobs(model, "valid")
            logps.append(lp)
            members.append({"file": f.name, "ppl_valid": math.exp(-float(lp.mean())),
                            "block_sparsity": meta.get("block_sparsity"), "params": model.cost()["params"]})
        # the ensemble averages the members' probabilities of each target token
        ens = torch.logsumexp(torch.stack(logps), 0) - math.log(len(logps))
        row = {"run": str(run), "recipe": recipe(cfg), "members": members,
               "ensemble_ppl_valid": math.exp(-float(ens.mean())), "seconds": time.perf_counter() - t0}
        out.append(row)
        print(f"{run}: {row['recipe']}\n  members valid " + ", ".join(f"{m['ppl_valid']:.2f}" for m in members)
              + f"; ensemble of {len(members)} valid {row['ensemble_ppl_valid']:.2f}", flush=True)
    path = write(args.label, {"chosen_on": "valid perplexity (test not read)", "runs": out})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
