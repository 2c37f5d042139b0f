"""Issue 12's tables: distilling the sparse ensemble into one network (Fashion-MNIST and MNIST),
and the uncertainty figures (OOD detection, selective prediction, calibration) of every method.

Runs (or resumes; finished stages are skipped) through the same pipeline as the CLI. Per dataset
(fmnist / mnist):

    runs/fmnist_demo, runs/mnist_uncertainty   the teachers (SGLD+GSP+PR 88%: 8 members, <1x params)
    runs/<p>_distill[_e40]_lam<L>[_seed<S>]    784-300-100-10 students: the label-only network
                                               (SGD x1) and the distilled one (Geras loss)
    runs/<p>_distill_nocut                     the chosen student without truncating the teacher
    runs/<p>_distill_small                     a 784-100-10 student
    runs/<p>_self_distill[_seed<S>]            self-compression (model B mimics A, lam 0.5)
    runs/fmnist_uncertainty                    the demo's recipe with SGD x18 and the dense SGLD chain
    runs/mnist_uncertainty[_c4]                MNIST: SGD x1 / x18, SGLD, sparse ensembles from 1 or
                                               4 chains (the recipe for OOD chosen on valid)
    runs/ptb_lstm_distill_small                (--ptb) the PTB ISS+SE sparse ensemble of
                                               runs/ptb_lstm_sse_small distilled into one small LSTM

Protocol: the schedule (20 or 40 epochs, the same number of halvings) of the label-only network,
and the schedule and lam of the student, are each chosen on the validation split (seed 0); then
both are trained with seeds 0-2 and ``gap_recovered`` = (label-only error - student error) /
(label-only error - teacher error) is computed from the seed means on test. The test split is
only read for the table. Writes ``benchmarks/results/distill.json`` and
``benchmarks/results/uncertainty.json``.

    python benchmarks/distill_uncertainty.py          # about 60 minutes on 2 cores from scratch
    python benchmarks/distill_uncertainty.py --ptb    # then the PTB student (about 1 hour on one core
                                                      # once runs/ptb_lstm_sse_small has its ISS+SE rows)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write  # noqa: E402

from sparse_ensembles.experiments import config as config_mod  # noqa: E402
from sparse_ensembles.experiments.evaluate import evaluate_run  # noqa: E402
from sparse_ensembles.experiments.pipeline import Pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAMS = (0.5, 0.7, 0.9, 1.0)
EPOCHS = (20, 40)  # lr halved 4 times either way (every 5 / every 10 epochs)
SEEDS = (0, 1, 2)
TEACHER_ROW = "SGLD+GSP+PR 88%"
DATASETS = {  # prefix: (distill config, teacher config, teacher run, OOD set of the teacher's evaluation)
    "fmnist": ("fmnist_distill", "fmnist_demo", "fmnist_demo", "mnist"),
    "mnist": ("mnist_distill", "mnist_uncertainty", "mnist_uncertainty", "fashion-mnist"),
}
KEYS = ("error", "error_valid", "nll", "ece", "brier", "aurc", "error_at_80", "ood_auroc", "ood_aupr", "ood_fpr95",
        "ood_auroc_mi", "ood_aupr_mi", "ood_fpr95_mi", "ood_auroc_valid", "ood_auroc_mi_valid", "params_ratio",
        "members")
# the MNIST sparse ensemble's recipe for OOD detection, chosen on valid: one chain (the demo's) or
# four independent chains of 2 samples each (more diverse members)
MNIST_RECIPES = {"1 chain": ("mnist_uncertainty", []),
                 "4 chains": ("mnist_uncertainty_c4", ["sgd.members=1", "sampler.chains=4", "sampler.plain_chain=false"])}


def run(config: str, out: str, overrides=(), ood=None) -> list[dict]:
    cfg = config_mod.load(ROOT / "configs" / f"{config}.toml", list(overrides))
    path = ROOT / "runs" / out
    Pipeline(cfg, path, resume=True, progress=False, overrides=list(overrides), log=lambda m: None).run()
    return evaluate_run(path, config_mod.load(ROOT / "configs" / f"{config}.toml", list(overrides)), ood=ood,
                        log=lambda m: None)


def pick(rows, prefix):
    return next(r for r in rows if r["method"].startswith(prefix))


def schedule(epochs: int) -> list[str]:
    return [f"sgd.epochs={epochs}", f"sgd.decay_every={epochs // 4}"]


def brief(r: dict) -> dict:
    return {k: r.get(k) for k in ("method", "error_valid", "error_test", "nll", "ece", "ood_auroc")}


def mean_sd(values) -> dict:
    values = list(values)
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "each": values}


def distill_table(prefix: str, log) -> tuple[dict, list[dict], dict]:
    """The distillation protocol of the module docstring for one dataset."""
    config, teacher_config, teacher_run, ood = DATASETS[prefix]
    teacher_rows = run(teacher_config, teacher_run, ood=ood)
    teacher = pick(teacher_rows, TEACHER_ROW)
    name = lambda epochs, lam, seed=0: (f"{prefix}_distill" + (f"_e{epochs}" if epochs != 20 else "")
                                        + f"_lam{lam:g}" + (f"_seed{seed}" if seed else ""))

    def students(epochs, lam, seed=0):
        rows = run(config, name(epochs, lam, seed), schedule(epochs) + [f"distill.lam={lam}", f"experiment.seed={seed}"])
        return pick(rows, "SGD x1"), pick(rows, "KD(")

    sweep = {(e, lam): students(e, lam) for e in EPOCHS for lam in LAMS}
    log(f"{prefix}: valid sweep done")
    label_epochs = min(EPOCHS, key=lambda e: sweep[(e, LAMS[0])][0]["error_valid"])
    best_e, best_lam = min(sweep, key=lambda k: sweep[k][1]["error_valid"])
    label_seeds = [students(label_epochs, best_lam, s)[0] for s in SEEDS]
    student_seeds = [students(best_e, best_lam, s)[1] for s in SEEDS]
    label_mean = statistics.mean(r["error_test"] for r in label_seeds)
    student_mean = statistics.mean(r["error_test"] for r in student_seeds)
    label_valid = statistics.mean(r["error_valid"] for r in label_seeds)
    student_valid = statistics.mean(r["error_valid"] for r in student_seeds)
    chosen = schedule(best_e) + [f"distill.lam={best_lam}"]
    nocut = pick(run(config, f"{prefix}_distill_nocut", chosen + ["distill.mass=1.0"]), "KD(")
    small = run(config, f"{prefix}_distill_small", chosen + ["model.sizes=[784, 100, 10]"])
    selfs = [run(config, f"{prefix}_self_distill" + (f"_seed{s}" if s else ""),
                 schedule(label_epochs) + ['distill.teacher="self"', "distill.lam=0.5", f"experiment.seed={s}"])
             for s in SEEDS]
    a = [pick(r, "SGD x1") for r in selfs]
    b = [pick(r, "self-distilled") for r in selfs]
    # undefined (None) when the teacher is not better than the label-only network on that split
    gap = lambda label, student, split: ((label - student) / (label - teacher[f"error_{split}"])
                                         if label > teacher[f"error_{split}"] else None)
    table = {
        "teacher": {**brief(teacher), "params_ratio": teacher["params_ratio"], "run": f"runs/{teacher_run}"},
        "valid_sweep": {"label_only_error_valid": {str(e): sweep[(e, LAMS[0])][0]["error_valid"] for e in EPOCHS},
                        "student_error_valid": {f"{e} epochs, lam {lam:g}": sweep[(e, lam)][1]["error_valid"]
                                                for e in EPOCHS for lam in LAMS}},
        "chosen_on_valid": {"label_only_epochs": label_epochs, "student_epochs": best_e, "lam": best_lam},
        "seeds": list(SEEDS),
        "label_only_784_300_100_10": {"error_test": mean_sd(r["error_test"] for r in label_seeds),
                                      "error_valid": mean_sd(r["error_valid"] for r in label_seeds),
                                      "ece": mean_sd(r["ece"] for r in label_seeds),
                                      "ood_auroc": mean_sd(r["ood_auroc"] for r in label_seeds)},
        "distilled_784_300_100_10": {"method": student_seeds[0]["method"],
                                     "error_test": mean_sd(r["error_test"] for r in student_seeds),
                                     "error_valid": mean_sd(r["error_valid"] for r in student_seeds),
                                     "ece": mean_sd(r["ece"] for r in student_seeds),
                                     "ood_auroc": mean_sd(r["ood_auroc"] for r in student_seeds)},
        "gap_recovered": gap(label_mean, student_mean, "test"),
        "gap_recovered_valid": gap(label_valid, student_valid, "valid"),
        "teacher_gap_points": 100 * (label_mean - teacher["error_test"]),
        "no_truncation": {**brief(nocut), "note": "distill.mass = 1: the whole teacher distribution (seed 0)"},
        "small_784_100_10": {"label_only": brief(pick(small, "SGD x1")), "distilled": brief(pick(small, "KD("))},
        "self_compression": {"model_a_error_test": mean_sd(r["error_test"] for r in a),
                             "model_b_error_test": mean_sd(r["error_test"] for r in b),
                             "model_a_ece": mean_sd(r["ece"] for r in a), "model_b_ece": mean_sd(r["ece"] for r in b)},
    }
    table["ece_lower_than_label_only"] = (table["distilled_784_300_100_10"]["ece"]["mean"]
                                          < table["label_only_784_300_100_10"]["ece"]["mean"])
    table["gap_target_met"] = table["gap_recovered"] is not None and table["gap_recovered"] >= 0.5
    table["self_target_met"] = (table["self_compression"]["model_b_error_test"]["mean"]
                                <= table["self_compression"]["model_a_error_test"]["mean"])
    return table, teacher_rows, student_seeds[0]


PTB_TEACHER = "SGLD+GSP(iss_se)+PR 90%"


def truncation_cost(cfg, teacher_run: Path, row: str, segments: int = 60) -> dict:
    """What truncating the PTB teacher to (distill.mass, distill.max_k) keeps, on the first
    ``segments`` training segments (20 x 35 tokens each): mass, label coverage, NLL."""
    import torch
    from sparse_ensembles.experiments.teachers import teacher_from_run
    from sparse_ensembles.distill import truncate_topk, truncation_accuracy_cost, truncation_stats
    from sparse_ensembles.experiments.pipeline import build_task
    task = build_task(cfg, torch.device("cpu"))
    teacher = teacher_from_run(teacher_run, row)
    stats, costs, state = [], [], None
    with torch.no_grad():
        for k, (x, y, _) in enumerate(task.distill_batches()):
            if k == segments:
                break
            logp, state = teacher.step(x, state)
            p = logp.exp().reshape(-1, logp.shape[-1])
            idx, kept = truncate_topk(p, mass=cfg.distill.mass, max_k=cfg.distill.max_k or None)
            stats.append(truncation_stats(p, idx, kept))
            costs.append(truncation_accuracy_cost(p, y, idx, kept))
    mean = lambda rows, key: statistics.mean(r[key] for r in rows)
    return {"tokens": segments * x.numel(), "mean_kept": mean(stats, "mean_kept"),
            "mass_kept_mean": mean(stats, "mass_kept_mean"), "label_dropped": mean(costs, "label_dropped"),
            "ppl_full": math.exp(mean(costs, "nll_full")), "acc_full": mean(costs, "acc_full"),
            "acc_truncated": mean(costs, "acc_truncated")}


def ptb_distill(log) -> dict:
    """The PTB row: the ISS+SE sparse ensemble distilled into one dense small LSTM, against the
    teacher run's own SGD x1 (the same model, schedule and seed on labels only)."""
    teacher_run = ROOT / "runs" / "ptb_lstm_sse_small"
    teacher_rows = {r["method"]: r for r in json.loads((teacher_run / "results.json").read_text())}
    rows = run("ptb_lstm_distill_small", "ptb_lstm_distill_small")
    student = pick(rows, "KD(")
    label, teacher = teacher_rows["SGD x1"], teacher_rows[PTB_TEACHER]
    info = json.loads((ROOT / "runs" / "ptb_lstm_distill_small" / "distill" / "teacher.json").read_text())
    keep = ("method", "ppl_valid", "ppl_test", "params_ratio", "ece", "train_seconds")
    gap = lambda split: ((label[f"ppl_{split}"] - student[f"ppl_{split}"])
                         / (label[f"ppl_{split}"] - teacher[f"ppl_{split}"]))
    log("PTB student evaluated; measuring the truncation")
    cfg = config_mod.load(ROOT / "configs" / "ptb_lstm_distill_small.toml")
    return {"teacher": {k: teacher.get(k) for k in keep}, "label_only": {k: label.get(k) for k in keep},
            "distilled": {k: student.get(k) for k in keep}, "gap_recovered_ppl_test": gap("test"),
            "gap_recovered_ppl_valid": gap("valid"), "lam": cfg.distill.lam,
            "cache": {"bytes": info["cache_bytes"], "rows": info["rows"], "mean_kept": info["mean_kept"],
                      "mass": info["mass"], "max_k": info["max_k"]},
            "truncation": truncation_cost(cfg, teacher_run, PTB_TEACHER)}


def rows_of(rows, rename=lambda m: m):
    return [{**{k: r.get(k) for k in ("method",) + KEYS}, "method": rename(r["method"])} for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ptb", action="store_true", help="only the PTB student (about an hour on one core), added to "
                    "the distill.json of an earlier invocation")
    args = ap.parse_args()
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True)
    if args.ptb:
        previous = ROOT / "benchmarks" / "results" / "distill.json"
        distill = {k: v for k, v in json.loads(previous.read_text()).items() if k not in ("benchmark", "machine", "date")}
        distill["ptb"] = {**ptb_distill(log), "wall_seconds_this_invocation": time.perf_counter() - t0}
        write("distill", distill)
        p = distill["ptb"]
        print(f"distill (PTB): student test PPL {p['distilled']['ppl_test']:.2f} vs label-only "
              f"{p['label_only']['ppl_test']:.2f} vs teacher {p['teacher']['ppl_test']:.2f}: gap recovered "
              f"{p['gap_recovered_ppl_test']:.0%}; cache {p['cache']['bytes'] / 2**20:.0f} MB, "
              f"{p['truncation']['mass_kept_mean']:.0%} of the teacher's mass kept")
        return
    distill, students = {}, {}
    for prefix in DATASETS:
        distill[prefix], _, students[prefix] = distill_table(prefix, log)
    log("distillation tables done")
    distill["targets"] = {"gap_recovered": ">= 0.5 (Fashion-MNIST)", "ece": "student < label-only",
                          "self": "B at least as good as A (seed means)"}
    fmnist_rows = run("fmnist_demo", "fmnist_uncertainty", ["sgd.members=18", "sampler.plain_chain=true"], ood="mnist")
    recipes = {name: run("mnist_uncertainty", out, overrides, ood="fashion-mnist")
               for name, (out, overrides) in MNIST_RECIPES.items()}
    mnist_rows = recipes["1 chain"]
    extra = [r for r in recipes["4 chains"] if "GSP" in r["method"]]
    uncertainty = {
        "mnist_in_fashion_out": rows_of(mnist_rows) + rows_of(extra, lambda m: m + " (4 chains)")
        + rows_of([students["mnist"]], lambda m: "distilled: " + m),
        "fashion_in_mnist_out": rows_of(fmnist_rows) + rows_of([students["fmnist"]], lambda m: "distilled: " + m),
    }
    sgd1 = pick(mnist_rows, "SGD x1")
    chosen = max(recipes, key=lambda k: pick(recipes[k], TEACHER_ROW)["ood_auroc_valid"])  # on valid
    sparse = [r for r in recipes[chosen] if "+PR" in r["method"]]
    uncertainty["mnist_recipe_valid_ood_auroc"] = {k: pick(v, TEACHER_ROW)["ood_auroc_valid"] for k, v in recipes.items()}
    uncertainty["mnist_recipe_chosen_on_valid"] = chosen
    uncertainty["target"] = "sparse ensemble OOD AUROC (MNIST in, Fashion-MNIST out) >= one SGD model's"
    uncertainty["target_met"] = all(r["ood_auroc"] >= sgd1["ood_auroc"] for r in sparse)
    wall = time.perf_counter() - t0
    previous = ROOT / "benchmarks" / "results" / "distill.json"
    if previous.exists() and "ptb" in json.loads(previous.read_text()):  # kept from an earlier --ptb
        distill["ptb"] = json.loads(previous.read_text())["ptb"]
    write("distill", {**distill, "wall_seconds_this_invocation": wall})
    write("uncertainty", {**uncertainty, "wall_seconds_this_invocation": wall})
    f = distill["fmnist"]
    pct = lambda x: f"{100 * x:.2f}%"
    print(f"distill (Fashion-MNIST, means of {len(SEEDS)} seeds): student "
          f"{pct(f['distilled_784_300_100_10']['error_test']['mean'])} vs label-only "
          f"{pct(f['label_only_784_300_100_10']['error_test']['mean'])} vs teacher {pct(f['teacher']['error_test'])}: "
          f"gap recovered {f['gap_recovered']:.0%} (target 50%: {'met' if f['gap_target_met'] else 'NOT met'}); "
          f"MNIST teacher gap {distill['mnist']['teacher_gap_points']:.2f} points; self-compression "
          f"{'met' if f['self_target_met'] else 'NOT met'}. uncertainty: MNIST-in OOD AUROC SGD x1 "
          f"{sgd1['ood_auroc']:.3f}, sparse " + ", ".join(f"{r['method']} {r['ood_auroc']:.3f}" for r in sparse)
          + f" (target {'met' if uncertainty['target_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
