"""Latency of LSTM language-model members: one dense model against ISS-compacted members (smaller
plain LSTMs, from ``LSTMLM.shrink``) and against the compacted ensemble, advancing ``batch`` token
streams one token at a time with the state carried (how a language model is used to score or
generate), at batch 1 and batch 20. Every variant runs in one process, interleaved, repeated;
medians are reported, and each ratio is taken against the dense model of the same run.

Members come from a finished run (``--run RUN_DIR``: its SGD member is the dense model, its
``pruned_<s>`` members the compacted ones). Without a run directory (a fresh clone) it builds
random models: a dense LSTM LM of ``--hidden`` units and ``--vocab`` words and 4 members shrunk to
``--iss-hidden`` units per layer (latency does not depend on the weight values;
``"synthetic": true`` in the results file).

    python benchmarks/lstm_inference.py [--run DIR] [--sparsity 90] [--quick]

Keys: ``iss_speedup_batch1`` / ``iss_speedup_batch20`` (dense time / one member's time),
``flops_ratio`` (dense sub-matrix FLOPs / one member's), ``ensemble_vs_single_dense`` (the
compacted ensemble's time at batch 20 / the dense model's). Targets (issue 10): a member's speed-up
at least 70% of its FLOPs ratio; the compacted ensemble of 4 at most 1x one dense model at batch 20.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, timed, write  # noqa: E402

from sparse_ensembles import checkpoint  # noqa: E402
from sparse_ensembles.models import LSTMLM  # noqa: E402


def synthetic(vocab: int, hidden: int, iss_hidden: list[int], members: int, seed: int = 0):
    """A dense 2-layer LSTM LM and ``members`` random ISS keep patterns shrunk from copies of it."""
    torch.manual_seed(seed)
    dense = LSTMLM(vocab, [hidden] * len(iss_hidden), hidden).eval()
    small = []
    for _ in range(members):
        keep = [torch.zeros(hidden, dtype=torch.bool) for _ in range(len(iss_hidden) + 1)]
        keep[0][torch.randperm(hidden)[:iss_hidden[0]]] = True  # input features (untied embeddings)
        for k, n in zip(keep[1:], iss_hidden):
            k[torch.randperm(hidden)[:n]] = True
        small.append(dense.shrink(keep).eval())
    return dense, small


def from_run(run: Path, sparsity: str):
    dense_files = sorted((run / "sgd").glob("member_*.pt"))
    member_files = sorted((run / f"pruned_{sparsity}").glob("member_*.pt"))
    if not dense_files or not member_files:
        sys.exit(f"{run} has no SGD member or no pruned_{sparsity} members; run a PTB config first (or omit --run)")
    return checkpoint.load_member(dense_files[0])[0], [checkpoint.load_member(f)[0] for f in member_files]


def stepper(models, batch: int, steps: int, vocab: int):
    """A function that advances ``batch`` streams by ``steps`` tokens, one at a time, averaging the
    members' predictive distributions when there are several (log of the mean of softmaxes)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, steps), generator=g)

    def run():
        states = [None] * len(models)
        for t in range(steps):
            x = tokens[:, t:t + 1]
            logps = []
            for i, m in enumerate(models):
                logits, states[i] = m(x, states[i])
                logps.append(torch.log_softmax(logits, -1))
            if len(logps) > 1:
                torch.logsumexp(torch.stack(logps), 0) - math.log(len(logps))
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="")
    ap.add_argument("--sparsity", default="90")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--hidden", type=int, default=200, help="synthetic dense model: units per layer (Zaremba small)")
    ap.add_argument("--iss-hidden", default="100,100", help="synthetic ISS members: units kept per layer")
    ap.add_argument("--members", type=int, default=4)
    args = ap.parse_args()
    synthetic_run = not args.run
    if synthetic_run:
        dense, members = synthetic(args.vocab, args.hidden, [int(h) for h in args.iss_hidden.split(",")], args.members)
    else:
        dense, members = from_run(Path(args.run), args.sparsity)
        members = members[: args.members]
    vocab = dense.vocab
    steps, reps = (10, 5) if args.quick else (35, 15)
    variants = {"dense": [dense], "member": [members[0]], "ensemble": members}
    times = {(k, b): [] for k in variants for b in (1, 20)}
    runners = {(k, b): stepper(ms, b, steps, vocab) for k, ms in variants.items() for b in (1, 20)}
    with torch.inference_mode():
        for r in range(reps + 1):  # round 0 warms up
            for key, fn in runners.items():
                t = timed(fn)
                if r:
                    times[key].append(t / steps)
    med = {f"{k}_batch{b}_ms_per_step": 1e3 * median(v) for (k, b), v in times.items()}
    dense_cost, member_cost = dense.cost(), members[0].cost()
    out = {"run": args.run or None, "synthetic": synthetic_run, "members": len(members),
           "dense_hidden": dense.hidden, "member_hidden": [m.hidden for m in members], "vocab": vocab,
           "steps": steps, "repetitions": reps, **med,
           "iss_speedup_batch1": med["dense_batch1_ms_per_step"] / med["member_batch1_ms_per_step"],
           "iss_speedup_batch20": med["dense_batch20_ms_per_step"] / med["member_batch20_ms_per_step"],
           "flops_ratio": dense_cost["flops"] / member_cost["flops"],
           "ensemble_vs_single_dense": med["ensemble_batch20_ms_per_step"] / med["dense_batch20_ms_per_step"],
           "ensemble_vs_single_dense_batch1": med["ensemble_batch1_ms_per_step"] / med["dense_batch1_ms_per_step"],
           "cost": {"dense": dense_cost, "member": member_cost}, "quick": args.quick,
           "targets": {"speedup_over_flops_ratio": 0.7, "ensemble_vs_single_dense": 1.0}}
    out["speedup_fraction_of_flops_ratio_batch20"] = out["iss_speedup_batch20"] / out["flops_ratio"]
    name = "lstm_inference" + ("_synthetic" if synthetic_run else f"_{Path(args.run).name}")
    path = write(name + ("_quick" if args.quick else ""), out)
    for (k, b) in times:
        print(f"{k:<9} batch {b:>2}: {med[f'{k}_batch{b}_ms_per_step']:7.3f} ms per step")
    met = (out["speedup_fraction_of_flops_ratio_batch20"] >= 0.7, out["ensemble_vs_single_dense"] <= 1.0)
    print(f"lstm_inference: member {out['member_hidden'][0]} of dense {dense.hidden}: speed-up "
          f"{out['iss_speedup_batch1']:.2f}x (batch 1), {out['iss_speedup_batch20']:.2f}x (batch 20) for a FLOPs ratio "
          f"{out['flops_ratio']:.2f} ({out['speedup_fraction_of_flops_ratio_batch20']:.0%}, target >= 70%: "
          f"{'met' if met[0] else 'NOT met'}); ensemble of {len(members)} vs one dense at batch 20 "
          f"{out['ensemble_vs_single_dense']:.2f}x (target <= 1: {'met' if met[1] else 'NOT met'}) -> {path.name}")


if __name__ == "__main__":
    main()
