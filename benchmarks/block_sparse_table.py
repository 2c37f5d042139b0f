"""The block-sparse LSTM table on PTB (issue 21): the seed slides' four rows at 80% block sparsity
(dense; + block Lasso; + block Lasso + gradual pruning; + block Lasso + pre-pruning) and block-sparse
SSE against SGD x1 / x4, with train / valid / test perplexity, achieved block sparsity, and each
model's measured speed-up over the dense model on the block-sparse kernel.

Each row is a config under configs/ run through the pipeline into runs/<label>; ``--train`` runs
the missing ones (resumable), then the table is collected:

    python benchmarks/block_sparse_table.py --train                      # full PTB (hours on 2 cores)
    python benchmarks/block_sparse_table.py --train --tag ptb232k --set task.train_tokens=232000 \
        --sse-set sgd.members=4             # the CPU-sized table: a quarter of PTB's training tokens
    python benchmarks/block_sparse_table.py --train --rows grid,seed    # one process: the seed's rows
    python benchmarks/block_sparse_table.py --train --rows sse          # another: block-sparse SSE

Rows: ``grid`` = the gradual row at each ``--lassos`` value; ``seed`` = the block-Lasso-only and
pre-pruned rows at the Lasso chosen on valid (after the grid); ``sse`` = ptb_lstm_block_sse (its
``sgd.members`` give SGD x1, the dense row, and SGD x M; at 0, as shipped for full PTB, the dense
row is ptb_lstm_block_dense and SGD x1 / x4 come from ptb_lstm_sse_small, the same protocol).

The gradual row's Lasso strength is the grid point with the lowest *validation* perplexity; the
test column is read for the table only. Missing rows are listed as such. Speed: each model's two LSTM
layers on the block-sparse layer against the same layers as dense ``nn.LSTM``, batch 20 x 35 steps,
inference (no_grad) and one training step (forward + backward), each side at its best of
``--threads`` (default 1 and 2; the kernel also of its executors ``numba`` / ``numba_parallel``),
interleaved, medians of ``--repeats``; and the whole model's inference (embedding and the dense
10k-word softmax included, which bound it at hidden 200). The seed's training-cost formula for
gradual pruning, ``sum_t (1 - rho_t) / T``, is given beside it.

Writes benchmarks/results/block_sparse_lstm.json, block_norms_ptb.png, ppl_vs_block_sparsity.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import RESULTS, median, set_threads, timed, write  # noqa: E402

from sparse_ensembles import checkpoint  # noqa: E402
from sparse_ensembles.compact.block_lm import (BlockSparseLMEnsemble, block_density, block_sparse_lm,  # noqa: E402
                                               narrow_softmax)
from sparse_ensembles.experiments import config as config_mod  # noqa: E402
from sparse_ensembles.experiments.pipeline import Pipeline  # noqa: E402
from sparse_ensembles.experiments.plots import block_norm_heatmaps, perplexity_vs_sparsity  # noqa: E402
from sparse_ensembles.tasks.language_model import LanguageModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_rows(label: str) -> list[dict] | None:
    f = RESULTS / f"{label}.json"
    return json.loads(f.read_text())["rows"] if f.exists() else None


def timing(model, repeats: int, threads: list[int]) -> dict:
    """Speed-up of the model's LSTM layers (and of the whole model) on the block-sparse layer; each
    side at its best of ``threads`` (and the kernel of its executors ``numba`` / ``numba_parallel``),
    interleaved, medians of ``repeats``."""
    dense = copy.deepcopy(model).eval()
    # as BlockSparseLMEnsemble runs members: LSTM layers on the kernel, a column-pruned softmax narrowed
    sparse = {ex: narrow_softmax(block_sparse_lm(copy.deepcopy(model), executor=ex)).eval()
              for ex in ("numba", "numba_parallel")}
    torch.manual_seed(0)
    tokens = torch.randint(0, model.vocab, (20, 35))
    x = model.embedding(tokens).detach()

    def layers(m, grad: bool):
        h = x.clone().requires_grad_(grad)
        for lstm in m.lstms:
            h, _ = lstm(h)
        if grad:
            h.sum().backward()

    def infer(m):
        with torch.no_grad():
            layers(m, False)

    def whole(m):
        with torch.no_grad():
            m(tokens)

    cases = {"layers_inference": infer, "layers_train_step": lambda m: layers(m, True), "model_inference": whole}
    sides = {"dense": dense, **sparse}
    out = {}
    for key, fn in cases.items():
        times = {(side, t): [] for side in sides for t in threads if not (side == "numba_parallel" and t == 1)}
        for r in range(repeats + 1):  # round 0 warms up (and compiles)
            for t in threads:
                set_threads(t)
                for side, m in sides.items():
                    if (side, t) in times:
                        dt = timed(lambda: fn(m))
                        if r:
                            times[side, t].append(dt)
        med = {k: median(v) for k, v in times.items()}
        td, t_d = min((v, t) for (side, t), v in med.items() if side == "dense")
        ts, t_s, ex = min((v, t, side) for (side, t), v in med.items() if side != "dense")
        out[key] = {"dense_ms": 1e3 * td, "dense_threads": t_d, "block_ms": 1e3 * ts, "block_threads": t_s,
                    "block_executor": ex, "speedup": td / ts}
    return out


def ensemble_timing(files: list[Path], repeats: int, threads: list[int]) -> dict:
    """Whole-model inference to log-probabilities (batch 20 x 35 tokens, no_grad) of the block-sparse ensemble of the
    members in ``files`` (``BlockSparseLMEnsemble``: LSTM layers on the kernel, a column-pruned
    softmax narrowed) against one dense model of the same shape (member 0 with its zeros run dense);
    each side at its best of ``threads`` (the kernel also of its executors), interleaved, medians."""
    members = [checkpoint.load_member(f)[0].eval() for f in files]
    dense = type(members[0]).from_spec(members[0].spec()).eval()  # the architecture, dense weights
    # both sides return next-word log-probabilities (B, T, vocab): the ensemble's mixture costs the
    # exponentials of every member's 10,000 logits, which one model's log_softmax pays once
    dense_logp = lambda tokens, state=None: (torch.log_softmax(dense(tokens, state)[0], -1), None)  # noqa: E731
    sides = {"dense": dense_logp, **{ex: BlockSparseLMEnsemble([copy.deepcopy(m) for m in members], executor=ex)
                                     for ex in ("numba", "numba_parallel")}}
    torch.manual_seed(0)
    tokens = torch.randint(0, dense.vocab, (20, 35))
    times = {(side, t): [] for side in sides for t in threads if not (side == "numba_parallel" and t == 1)}
    for r in range(repeats + 1):  # round 0 warms up (and compiles)
        for t in threads:
            set_threads(t)
            for side, m in sides.items():
                if (side, t) in times:
                    with torch.no_grad():
                        dt = timed(lambda: m(tokens))
                    if r:
                        times[side, t].append(dt)
    med = {k: median(v) for k, v in times.items()}
    td, t_d = min((v, t) for (side, t), v in med.items() if side == "dense")
    te, t_e, ex = min((v, t, side) for (side, t), v in med.items() if side != "dense")
    softmax = [getattr(m.decoder, "kept_fraction", 1.0) for m in sides[ex].members]
    return {"members": len(members), "dense_ms": 1e3 * td, "dense_threads": t_d, "ensemble_ms": 1e3 * te,
            "ensemble_threads": t_e, "ensemble_executor": ex, "ensemble_vs_one_dense": te / td,
            "softmax_columns_kept": softmax}


def train(label: str, config: str, overrides: list[str]) -> None:
    """Run (or resume) ``configs/<config>.toml`` with ``overrides`` into runs/<label> and write its
    rows to results/<label>.json (as sse_tables.py does)."""
    t0 = time.perf_counter()
    cfg = config_mod.load(ROOT / "configs" / f"{config}.toml", overrides)
    rows = Pipeline(cfg, ROOT / "runs" / label, resume=True, progress=False, overrides=overrides).run()
    write(label, {"config": f"configs/{config}.toml", "overrides": overrides, "evaluate_only": False,
                  "wall_seconds_this_invocation": time.perf_counter() - t0, "rows": rows})
    print(f"{label}: " + ", ".join(f"{r['method']} valid {r['ppl_valid']:.2f}" for r in rows), flush=True)


def train_ppl(model, task) -> float:
    model.eval()
    with torch.no_grad():
        return math.exp(-float(task.target_logprobs(model, "train").mean()))


def gradual_cost(cfg) -> float:
    """The seed's training cost of gradual pruning relative to dense: mean over epochs of 1 - rho_t."""
    c = cfg.sgd
    return sum(1 - c.pruned_fraction(e) for e in range(c.epochs)) / c.epochs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-ppl", action="store_true", help="also evaluate each model on the training split")
    ap.add_argument("--threads", default="1,2", help="thread counts tried for each side of the speed columns")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--train", action="store_true", help="run the missing rows first (resumable)")
    ap.add_argument("--rows", default="grid,seed,sse",
                    help="with --train: which rows (grid, seed = lasso + pre, lasso, pre, sse)")
    ap.add_argument("--lassos", default="1e-6,1e-5,1e-4", help="the gradual row's Lasso grid")
    ap.add_argument("--tag", default="", help="suffix of every run and results label (a protocol variant)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for every row (recorded in the results files)")
    ap.add_argument("--sse-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for the sse row only (e.g. sgd.members=4: train SGD x1 / x4 there)")
    args = ap.parse_args()
    suffix = f"_{args.tag}" if args.tag else ""
    threads = [int(t) for t in args.threads.split(",")]
    lassos = args.lassos.split(",")

    def label(row: str, lasso: str = "") -> str:
        return f"ptb_lstm_block_{row}" + (f"_lasso{lasso}" if lasso else "") + suffix

    def grid_results() -> dict:
        found = {l: load_rows(label("gradual", l)) for l in lassos}
        return {l: rows[0] for l, rows in found.items() if rows}

    if args.train:
        wanted = args.rows.split(",")
        if "grid" in wanted:
            for l in lassos:
                train(label("gradual", l), "ptb_lstm_block_gradual", args.set + [f"sgd.lasso={l}"])
        seed_rows = [r for r in ("lasso", "pre") if r in wanted or "seed" in wanted]
        if seed_rows:
            grid = grid_results()
            if len(grid) < len(lassos):
                sys.exit(f"the seed rows need the whole Lasso grid first (have {sorted(grid)} of {lassos})")
            best = min(grid, key=lambda l: grid[l]["ppl_valid"])
            for row in seed_rows:
                train(label(row, best), f"ptb_lstm_block_{row}", args.set + [f"sgd.lasso={best}"])
        if "sse" in wanted:
            train(label("sse"), "ptb_lstm_block_sse", args.set + args.sse_set)

    candidates = grid_results()
    chosen = min(candidates, key=lambda k: candidates[k]["ppl_valid"]) if candidates else None
    sse_rows = load_rows(label("sse")) or []
    dense = label("dense")
    if any(r["method"] == "SGD x1" for r in sse_rows):  # the SSE run trained the SGD baselines
        dense = label("sse")
    specs = [("dense (SGD)", dense),
             ("+ block Lasso", label("lasso", chosen) if chosen else None),
             ("+ block Lasso + gradual pruning", label("gradual", chosen) if chosen else None),
             ("+ block Lasso + pre-pruning", label("pre", chosen) if chosen else None)]
    task = None
    rows, histories, missing = [], {}, []
    # rows whose run directory is gone (runs/ is not kept between machines) are carried over from the
    # last table written for the same run, marked as such, instead of being listed as missing
    last = RESULTS / f"block_sparse_lstm{suffix}.json"
    previous = {r["run"]: r for r in json.loads(last.read_text())["rows"]} if last.exists() else {}
    for method, run_label in specs:
        table = load_rows(run_label) if run_label else None
        run = ROOT / "runs" / (run_label or "")
        member = run / "sgd" / "member_000.pt"
        if table and not member.exists() and run_label in previous:
            rows.append({**previous[run_label], "carried_over": "from the previous table; its run directory is not here"})
            print(f"{method}: carried over from {last.name} (no run directory)")
            continue
        if not table or not member.exists():
            missing.append({"method": method, "run": run_label})
            continue
        r = next(r for r in table if r["method"] in ("SGD", "SGD x1"))
        model, meta = checkpoint.load_member(member)
        cfg = config_mod.load(run / "config.toml")
        row = {"method": method, "run": run_label, "lasso": cfg.sgd.lasso, "block": list(model.block),
               "block_sparsity": 1 - block_density(model), "ppl_valid": r["ppl_valid"], "ppl_test": r["ppl_test"],
               "params": r["params"], "train_seconds": r["train_seconds"]}
        if args.train_ppl:
            task = task or LanguageModel.from_config(cfg.task)
            row["ppl_train"] = train_ppl(model, task)
        if cfg.sgd.prune == "gradual":
            row["seed_training_cost"] = gradual_cost(cfg)
        # the dense row is the baseline itself (its blocks are all kept: "auto" runs it dense)
        row["speed"] = timing(model, args.repeats, threads) if row["block_sparsity"] > 0 else None
        rows.append(row)
        norms = run / "sgd" / "group_norms_000.json"
        if norms.exists():
            histories[method] = json.loads(norms.read_text())
        speed = (f", layers x{row['speed']['layers_inference']['speedup']:.2f} inference / "
                 f"x{row['speed']['layers_train_step']['speedup']:.2f} train step" if row["speed"] else "")
        print(f"{method}: valid {row['ppl_valid']:.2f} test {row['ppl_test']:.2f} PPL, "
              f"{100 * row['block_sparsity']:.1f}% blocks{speed}")

    own_sgd = any(r["method"].startswith("SGD x") for r in sse_rows)
    sgd = [] if own_sgd else [r for r in load_rows("ptb_lstm_sse_small") or [] if r["method"].startswith("SGD x")]
    ensembles = [{"method": r["method"], "source": "ptb_lstm_sse_small", **{k: r[k] for k in ("ppl_valid", "ppl_test", "params_ratio")}}
                 for r in sgd]
    for r in sse_rows:
        ensembles.append({"method": r["method"], "source": label("sse"), "members": r["members"],
                          **{k: r[k] for k in ("ppl_valid", "ppl_test", "params_ratio", "train_seconds")}})
    pruned = next(iter(sorted((ROOT / "runs" / label("sse")).glob("pruned_*"))), None)  # pruned_<sparsity %>
    if pruned is not None:
        files = sorted(pruned.glob("member_*.pt"))
        metas = [checkpoint.load(f)["meta"] for f in files]
        for e in ensembles:
            if "+PR" in e["method"] and metas:
                e["block_sparsity"] = sum(m.get("block_sparsity", 0) for m in metas) / len(metas)
                e["speed"] = ensemble_timing(files, args.repeats, threads)
                print(f"{e['method']}: whole-model inference of the ensemble {e['speed']['ensemble_vs_one_dense']:.2f}x "
                      f"one dense model ({e['speed']['ensemble_ms']:.1f} vs {e['speed']['dense_ms']:.1f} ms)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    if histories:
        block_norm_heatmaps(histories, RESULTS / f"block_norms_ptb{suffix}.png")
    points = [{"method": r["method"], "block_sparsity": r["block_sparsity"], "ppl_test": r["ppl_test"],
               "ppl_valid": r["ppl_valid"]} for r in rows]
    points += [{"method": e["method"], "block_sparsity": e["block_sparsity"], "ppl_test": e["ppl_test"],
                "ppl_valid": e["ppl_valid"]} for e in ensembles if "block_sparsity" in e]
    if points:
        perplexity_vs_sparsity(points, RESULTS / f"ppl_vs_block_sparsity{suffix}.png")
    path = write("block_sparse_lstm" + suffix, {"overrides": args.set, "lasso_grid_valid_ppl": {k: v["ppl_valid"] for k, v in candidates.items()},
                                        "lasso_chosen_on_valid": chosen, "rows": rows, "ensembles": ensembles,
                                        "missing": missing, "threads_tried": threads})
    for e in ensembles:
        print(f"{e['method']}: valid {e['ppl_valid']:.2f} test {e['ppl_test']:.2f} PPL at {e['params_ratio']:.2f}x params")
    if missing:
        print("missing rows (not yet run):", ", ".join(m["method"] for m in missing))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
