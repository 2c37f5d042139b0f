"""Latency of LSTM language-model members: one dense model against ISS-compacted members (smaller
plain LSTMs, from ``LSTMLM.shrink``) and against the compacted ensemble, advancing ``batch`` token
streams one token at a time with the state carried (how a language model is used to score or
generate), at batch 1 and batch 20. The ensemble runs two ways: ``ensemble`` runs the members one
after another and takes ``logsumexp(log_softmax)`` over them; ``ensemble_fused`` runs all members at
once as one zero-padded batched network (``compact.lstm.FusedLSTMEnsemble``). Every variant runs in
one process, interleaved, repeated; medians are reported, and each ratio is taken against the
dense model of the same run.

Members come from a finished run (``--run RUN_DIR``: its SGD member is the dense model, its
``pruned_<s>`` members the compacted ones). Without a run directory (a fresh clone) it builds
random models: a dense LSTM LM of ``--hidden`` units and ``--vocab`` words and 4 members shrunk to
``--iss-hidden`` units per layer (latency does not depend on the weight values;
``"synthetic": true`` in the results file).

The default ``--iss-hidden 100,100`` (sub-matrix FLOPs 1/2.3 of the 2x200 dense model) keeps half
the units. ISS members of a 90%-sparse ensemble are smaller: ``--iss-hidden 50,50`` keeps a quarter
of the units (1/4.9 of the dense FLOPs; 80% of the prunable weights removed by units alone, the rest
of a 90% target being unstructured zeros inside the kept units), ``--iss-hidden 25,25`` removes
~90% by units alone (1/10 of the FLOPs). Only with members of about 50 units or fewer can the
ensemble of 4 multiply no more than the dense model (its 4 decoders alone have 4 x 50 x vocab weights).

    python benchmarks/lstm_inference.py [--run DIR] [--sparsity 90] [--quick] [--iss-hidden 50,50] [--threads N]

Keys: ``iss_speedup_batch1`` / ``iss_speedup_batch20`` (dense time / one member's time),
``flops_ratio`` (dense sub-matrix FLOPs / one member's), ``ensemble_vs_single_dense_sequential`` and
``ensemble_vs_single_dense_fused`` (each ensemble variant's time at batch 20 / the dense model's),
``ensemble_vs_single_dense`` (the faster of the two, named in ``ensemble_best``; ``_batch1`` keys
likewise), ``fused_padded_macs`` (what the fused ensemble multiplies, padding included) and
``fused_max_abs_diff`` (fused against sequential log-probabilities, a correctness check).
Targets (issue 10): a member's speed-up at least 70% of its FLOPs ratio; the compacted ensemble of
4 at most 1x one dense model at batch 20.

``--threads`` sets torch's CPU threads (default: torch's). On a machine shared with another job,
2 threads contend with it and OpenMP's waiting inflates the many small ops of the sequential
ensemble most; ``--threads 1`` gives steadier ratios there.
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
from sparse_ensembles.compact.lstm import FusedLSTMEnsemble  # noqa: E402
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


def from_run(run: Path, sparsity: str, variant: str = ""):
    folder = f"pruned_{sparsity}" + (f"_{variant}" if variant else "")
    dense_files = sorted((run / "sgd").glob("member_*.pt"))
    member_files = sorted((run / folder).glob("member_*.pt"))
    if not dense_files or not member_files:
        found = sorted(p.name for p in run.glob("pruned_*")) if run.is_dir() else []
        sys.exit(f"{run} has no SGD member or no {folder} members (pruned folders there: {found}); run a PTB "
                 "config first, pick --sparsity / --variant, or omit --run")
    return checkpoint.load_member(dense_files[0])[0], [checkpoint.load_member(f)[0] for f in member_files]


def stepper(models, batch: int, steps: int, vocab: int, device="cpu"):
    """A function that advances ``batch`` streams by ``steps`` tokens, one at a time, averaging the
    members' predictive distributions when there are several (log of the mean of softmaxes)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, steps), generator=g).to(device)

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


def fused_stepper(fused: FusedLSTMEnsemble, batch: int, steps: int, vocab: int, device="cpu"):
    """The same token streams as :func:`stepper`, all members at once (the ensemble's log-probabilities)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, steps), generator=g).to(device)

    def run():
        state = None
        for t in range(steps):
            _, state = fused(tokens[:, t:t + 1], state)
    return run


def fused_error(fused: FusedLSTMEnsemble, members, vocab: int, device="cpu") -> float:
    """Largest |fused - sequential| log-probability over a few carried steps and a short segment."""
    tokens = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(2)).to(device)
    states, state, err = [None] * len(members), None, 0.0
    for seg in tokens.split([1, 1, 4], dim=1):
        logps = []
        for i, m in enumerate(members):
            logits, states[i] = m(seg, states[i])
            logps.append(torch.log_softmax(logits, -1))
        out, state = fused(seg, state)
        err = max(err, float((out - (torch.logsumexp(torch.stack(logps), 0) - math.log(len(members)))).abs().max()))
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="")
    ap.add_argument("--sparsity", default="90")
    ap.add_argument("--variant", default="", help="the config variant of the pruned members (runs with [variants]: e.g. iss_se)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--hidden", type=int, default=200, help="synthetic dense model: units per layer (Zaremba small)")
    ap.add_argument("--iss-hidden", default="100,100", help="synthetic ISS members: units kept per layer")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the models and tokens live")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    synthetic_run = not args.run
    if synthetic_run:
        dense, members = synthetic(args.vocab, args.hidden, [int(h) for h in args.iss_hidden.split(",")], args.members)
    else:
        dense, members = from_run(Path(args.run), args.sparsity, args.variant)
        members = members[: args.members]
    vocab = dense.vocab
    dense, members = dense.to(device), [m.to(device) for m in members]
    steps, reps = (10, 5) if args.quick else (35, 15)
    variants = {"dense": [dense], "member": [members[0]], "ensemble": members}
    fused = FusedLSTMEnsemble(members).to(device)
    runners = {(k, b): stepper(ms, b, steps, vocab, device) for k, ms in variants.items() for b in (1, 20)}
    runners.update({("ensemble_fused", b): fused_stepper(fused, b, steps, vocab, device) for b in (1, 20)})
    times = {key: [] for key in runners}
    with torch.inference_mode():
        fused_err = fused_error(fused, members, vocab, device)
        for r in range(reps + 1):  # round 0 warms up
            for key, fn in runners.items():
                t = timed(fn, device)
                if r:
                    times[key].append(t / steps)
    med = {f"{k}_batch{b}_ms_per_step": 1e3 * median(v) for (k, b), v in times.items()}
    dense_cost, member_cost = dense.cost(), members[0].cost()
    ratio = {f"{k}{suffix}": med[f"{k}_batch{b}_ms_per_step"] / med[f"dense_batch{b}_ms_per_step"]
             for k in ("ensemble", "ensemble_fused") for b, suffix in ((20, ""), (1, "_batch1"))}
    best = min(("ensemble", "ensemble_fused"), key=lambda k: ratio[k])
    out = {"run": args.run or None, "device": str(device), "synthetic": synthetic_run, "members": len(members),
           "dense_hidden": dense.hidden, "member_hidden": [m.hidden for m in members], "vocab": vocab,
           "steps": steps, "repetitions": reps, **med,
           "iss_speedup_batch1": med["dense_batch1_ms_per_step"] / med["member_batch1_ms_per_step"],
           "iss_speedup_batch20": med["dense_batch20_ms_per_step"] / med["member_batch20_ms_per_step"],
           "flops_ratio": dense_cost["flops"] / member_cost["flops"],
           "ensemble_vs_single_dense_sequential": ratio["ensemble"],
           "ensemble_vs_single_dense_fused": ratio["ensemble_fused"],
           "ensemble_vs_single_dense": ratio[best], "ensemble_best": best,
           "ensemble_vs_single_dense_sequential_batch1": ratio["ensemble_batch1"],
           "ensemble_vs_single_dense_fused_batch1": ratio["ensemble_fused_batch1"],
           "ensemble_vs_single_dense_batch1": min(ratio["ensemble_batch1"], ratio["ensemble_fused_batch1"]),
           "fused_padded_macs": fused.padded_macs(), "fused_max_abs_diff": fused_err,
           "cost": {"dense": dense_cost, "member": member_cost}, "quick": args.quick,
           "targets": {"speedup_over_flops_ratio": 0.7, "ensemble_vs_single_dense": 1.0}}
    out["speedup_fraction_of_flops_ratio_batch20"] = out["iss_speedup_batch20"] / out["flops_ratio"]
    name = "lstm_inference" + ("_synthetic" if synthetic_run else f"_{Path(args.run).name}")
    if args.variant:
        name += f"_{args.variant}"
    if not synthetic_run and args.sparsity != ap.get_default("sparsity"):
        name += f"_{args.sparsity}"
    if synthetic_run and args.iss_hidden != ap.get_default("iss_hidden"):
        name += "_iss" + args.iss_hidden.replace(",", "_")
    path = write(name + ("_quick" if args.quick else ""), out)
    for (k, b) in times:
        print(f"{k:<14} batch {b:>2}: {med[f'{k}_batch{b}_ms_per_step']:7.3f} ms per step")
    met = (out["speedup_fraction_of_flops_ratio_batch20"] >= 0.7, out["ensemble_vs_single_dense"] <= 1.0)
    print(f"lstm_inference: member {out['member_hidden'][0]} of dense {dense.hidden}: speed-up "
          f"{out['iss_speedup_batch1']:.2f}x (batch 1), {out['iss_speedup_batch20']:.2f}x (batch 20) for a FLOPs ratio "
          f"{out['flops_ratio']:.2f} ({out['speedup_fraction_of_flops_ratio_batch20']:.0%}, target >= 70%: "
          f"{'met' if met[0] else 'NOT met'}); ensemble of {len(members)} vs one dense at batch 20 "
          f"{out['ensemble_vs_single_dense']:.2f}x ({best}; sequential {ratio['ensemble']:.2f}x, fused "
          f"{ratio['ensemble_fused']:.2f}x; target <= 1: {'met' if met[1] else 'NOT met'}) -> {path.name}")


if __name__ == "__main__":
    main()
