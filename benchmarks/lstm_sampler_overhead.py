"""Step time of SGLD against ``torch.optim.SGD`` on an LSTM language model (issue 23's GPU target:
SGLD with the group-Lasso prior at most 1.1x an SGD step on the 650-unit LSTM).

Model: vocabulary 10,000, 2 LSTM layers of ``--hidden`` units (650: Zaremba's medium; 200: small),
batch 20 x 35 tokens of random words, the state carried and detached between steps. A step is
forward, cross-entropy, backward and the optimiser's step. Kinds: SGD (lr 1), SGLD with a Gaussian
prior, SGLD with the SSE prior on ISS groups (group Lasso + Gaussian, as the PTB configs run it), eager
and compiled (``priors.Compiled``, ``sampler.compile_prior``); on
CPU each sampler also with its noise drawn in the worker thread (``prefetch_noise``), and the
headline takes each side at its best. Rounds of ``--steps`` steps rotate through the kinds, so slow
phases of a shared machine hit all alike; medians per step.

    python benchmarks/lstm_sampler_overhead.py [--hidden 650] [--device cuda] [--steps 20] [--rounds 7]

Writes ``results/lstm_sampler_overhead_<device>_h<hidden>.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, timed, write  # noqa: E402

from sparse_ensembles.models import LSTMLM  # noqa: E402
from sparse_ensembles.priors import Compiled, Gaussian, GroupLasso, Sum  # noqa: E402
from sparse_ensembles.samplers import SGLD  # noqa: E402

TARGET = 1.1  # issue 23, on a GPU


def make(kind: str, model: LSTMLM, num_data: int, device: str):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1.0)
    prior = Gaussian(1.0)
    if kind.startswith("sgld_group_lasso"):
        prior = Sum(GroupLasso(model.groups("iss"), 1e-5 * num_data / 35), Gaussian(1.0))
        if "_compiled" in kind:  # sampler.compile_prior (the warm-up round compiles it)
            prior = Compiled(prior)
    return SGLD(model.named_parameters(), 1.0, num_data=num_data, temperature=0.01, prior=prior,
                generator=torch.Generator(device).manual_seed(0), prefetch_noise=kind.endswith("_prefetch"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=650)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20, help="steps per round and kind")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    device = args.device
    kinds = ["sgd", "sgld", "sgld_group_lasso", "sgld_group_lasso_compiled"]
    if torch.device(device).type == "cpu":  # the noise worker thread exists for CPU parameters only
        kinds += ["sgld_prefetch", "sgld_group_lasso_prefetch", "sgld_group_lasso_compiled_prefetch"]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(args.vocab, (20, 35), generator=g).to(device),
                torch.randint(args.vocab, (20, 35), generator=g).to(device)) for _ in range(args.steps)]
    num_data = 929_589  # PTB's training tokens
    setups = {}
    for k in kinds:
        torch.manual_seed(0)
        model = LSTMLM(args.vocab, [args.hidden] * 2, args.hidden, init_scale=0.05, grouping="iss").to(device)
        setups[k] = (model, make(k, model, num_data, device))

    def run(kind: str) -> None:
        model, opt = setups[kind]
        state = None
        for x, y in batches:
            logits, state = model(x, state)
            state = [(h.detach(), c.detach()) for h, c in state]
            loss = F.cross_entropy(logits.reshape(-1, args.vocab), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    ms = {k: [] for k in kinds}
    for r in range(args.rounds + 1):  # round 0 warms up
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            t = timed(lambda: run(k), device)
            if r:
                ms[k].append(1e3 * t / args.steps)
    med = {k: median(v) for k, v in ms.items()}
    # each sampler at its best setting; the group Lasso's with and without the compiled prior, and eager only
    choices = {"sgld": ["sgld"], "sgld_group_lasso": ["sgld_group_lasso", "sgld_group_lasso_compiled"],
               "sgld_group_lasso_eager": ["sgld_group_lasso"]}
    best = {s: min((k for k in kinds for c in cs if k in (c, c + "_prefetch")), key=med.get) for s, cs in choices.items()}
    ratios = {f"{s}_vs_sgd": med[best[s]] / med["sgd"] for s in best}
    for opt in (o for _, o in setups.values()):
        if hasattr(opt, "close"):
            opt.close()
    name = f"lstm_sampler_overhead_{torch.device(device).type}_h{args.hidden}"
    path = write(name, {"device": device, "hidden": args.hidden, "vocab": args.vocab, "batch": [20, 35],
                        "steps_per_round": args.steps, "rounds": args.rounds, "median_ms_per_step": med,
                        "best": best, **ratios, "target": TARGET,
                        "target_met": ratios["sgld_group_lasso_vs_sgd"] <= TARGET})
    print(", ".join(f"{k} {v:.1f} ms" for k, v in med.items()))
    print(f"SGLD {ratios['sgld_vs_sgd']:.2f}x, SGLD + group Lasso (ISS) {ratios['sgld_group_lasso_vs_sgd']:.2f}x "
          f"({best['sgld_group_lasso']}; eager {ratios['sgld_group_lasso_eager_vs_sgd']:.2f}x) an SGD "
          f"step ({device}, hidden {args.hidden}; target <= {TARGET} on a GPU) -> {path.name}")


if __name__ == "__main__":
    main()
