"""Issue 12's tables: distilling the Fashion-MNIST sparse ensemble into one network, and the
uncertainty figures (OOD detection, selective prediction, calibration) of every method.

Runs (or resumes; finished stages are skipped) through the same pipeline as the CLI:

    runs/fmnist_demo               configs/fmnist_demo.toml          the teacher (SSE 88%: 8 members, 0.95x params)
    runs/fmnist_distill_lam<L>     configs/fmnist_distill.toml       784-300-100-10 student, label-only vs
                                                                     distilled, lam in LAMS (chosen on valid)
    runs/fmnist_distill_nocut      ... distill.mass = 1              the same without truncating the teacher
    runs/fmnist_distill_small      ... model.sizes = [784, 100, 10]  a small student
    runs/fmnist_self_distill       ... distill.teacher = "self"      self-compression (lam 0.5)
    runs/mnist_uncertainty         configs/mnist_uncertainty.toml    MNIST: SGD x1 / x4, SGLD, sparse ensembles

and evaluates each with out-of-distribution data (MNIST <-> Fashion-MNIST). Writes
``benchmarks/results/distill.json`` (``gap_recovered`` = (label-only error - student error) /
(label-only error - teacher error), on test, for the lam chosen on valid) and
``benchmarks/results/uncertainty.json`` (one entry per run and method).

    python benchmarks/distill_uncertainty.py          # about 25 minutes on 2 cores from scratch
"""
from __future__ import annotations

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
TEACHER_ROW = "SGLD+GSP+PR 88%"
KEYS = ("error", "nll", "ece", "brier", "aurc", "error_at_80", "ood_auroc", "ood_aupr", "ood_fpr95",
        "ood_auroc_mi", "ood_aupr_mi", "ood_fpr95_mi", "params_ratio", "members")


def run(config: str, out: str, overrides=(), ood=None) -> list[dict]:
    cfg = config_mod.load(ROOT / "configs" / f"{config}.toml", list(overrides))
    path = ROOT / "runs" / out
    Pipeline(cfg, path, resume=True, progress=False, overrides=list(overrides), log=lambda m: None).run()
    return evaluate_run(path, config_mod.load(ROOT / "configs" / f"{config}.toml", list(overrides)), ood=ood,
                        log=lambda m: None)


def pick(rows, prefix):
    return next(r for r in rows if r["method"].startswith(prefix))


def main():
    t0 = time.perf_counter()
    teacher_rows = run("fmnist_demo", "fmnist_demo", ood="mnist")
    teacher = pick(teacher_rows, TEACHER_ROW)
    sweep = {}
    for lam in LAMS:
        rows = run("fmnist_distill", f"fmnist_distill_lam{lam:g}", [f"distill.lam={lam}"])
        sweep[lam] = {"label_only": pick(rows, "SGD x1"), "distilled": pick(rows, "KD(")}
    best = min(LAMS, key=lambda lam: sweep[lam]["distilled"]["error_valid"])  # chosen on valid
    label, student = sweep[best]["label_only"], sweep[best]["distilled"]
    nocut = pick(run("fmnist_distill", "fmnist_distill_nocut", [f"distill.lam={best}", "distill.mass=1.0"]), "KD(")
    small_rows = run("fmnist_distill", "fmnist_distill_small", [f"distill.lam={best}", "model.sizes=[784, 100, 10]"])
    self_rows = run("fmnist_distill", "fmnist_self_distill", ['distill.teacher="self"', "distill.lam=0.5"])
    gap = lambda split: ((label[f"error_{split}"] - student[f"error_{split}"])
                         / (label[f"error_{split}"] - teacher[f"error_{split}"]))
    brief = lambda r: {k: r.get(k) for k in ("method", "error_valid", "error_test", "nll", "ece", "ood_auroc")}
    distill = {
        "teacher": {**brief(teacher), "params_ratio": teacher["params_ratio"], "run": "runs/fmnist_demo"},
        "lam_sweep_valid_error": {f"{lam:g}": sweep[lam]["distilled"]["error_valid"] for lam in LAMS},
        "lam_chosen_on_valid": best,
        "label_only_784_300_100_10": brief(label), "distilled_784_300_100_10": brief(student),
        "gap_recovered": gap("test"), "gap_recovered_valid": gap("valid"),
        "ece_lower_than_label_only": student["ece"] < label["ece"],
        "no_truncation": {**brief(nocut), "note": "distill.mass = 1: the whole teacher distribution"},
        "small_784_100_10": {"label_only": brief(pick(small_rows, "SGD x1")), "distilled": brief(pick(small_rows, "KD("))},
        "self_compression": {"model_a": brief(pick(self_rows, "SGD x1")), "model_b": brief(pick(self_rows, "self-distilled"))},
        "targets": {"gap_recovered": ">= 0.5", "ece": "student < label-only", "self": "B at least as good as A"},
    }
    distill["gap_target_met"] = distill["gap_recovered"] >= 0.5
    sa, sb = distill["self_compression"]["model_a"], distill["self_compression"]["model_b"]
    distill["self_target_met"] = sb["error_test"] <= sa["error_test"]
    mnist_rows = run("mnist_uncertainty", "mnist_uncertainty", ood="fashion-mnist")
    uncertainty = {
        "mnist_in_fashion_out": [{k: r.get(k) for k in ("method",) + KEYS} for r in mnist_rows],
        "fashion_in_mnist_out": [{k: r.get(k) for k in ("method",) + KEYS} for r in teacher_rows]
        + [{**{k: r.get(k) for k in ("method",) + KEYS}, "method": "distilled: " + r["method"]} for r in (student,)],
    }
    sgd1 = pick(mnist_rows, "SGD x1")
    sparse = [r for r in mnist_rows if "+PR" in r["method"]]
    uncertainty["target"] = "sparse ensemble OOD AUROC (MNIST in, Fashion-MNIST out) >= one SGD model's"
    uncertainty["target_met"] = all(r["ood_auroc"] >= sgd1["ood_auroc"] for r in sparse)
    wall = time.perf_counter() - t0
    write("distill", {**distill, "wall_seconds_this_invocation": wall})
    write("uncertainty", {**uncertainty, "wall_seconds_this_invocation": wall})
    print(f"distill: 784-300-100-10 student (lam {best:g} on valid) test error {100 * student['error_test']:.2f}% vs "
          f"label-only {100 * label['error_test']:.2f}% vs teacher {100 * teacher['error_test']:.2f}%: gap recovered "
          f"{distill['gap_recovered']:.0%} (target 50%: {'met' if distill['gap_target_met'] else 'NOT met'}); ECE "
          f"{100 * student['ece']:.2f}% vs {100 * label['ece']:.2f}%; self-compression B {100 * sb['error_test']:.2f}% vs "
          f"A {100 * sa['error_test']:.2f}%. uncertainty: MNIST-in OOD AUROC SGD x1 {sgd1['ood_auroc']:.3f}, sparse "
          + ", ".join(f"{r['method']} {r['ood_auroc']:.3f}" for r in sparse)
          + f" (target {'met' if uncertainty['target_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
