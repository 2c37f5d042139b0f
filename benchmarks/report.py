"""Markdown tables for the README from benchmarks/results/*.json (or a run's results.json).

    python benchmarks/report.py mnist_fnn_sse            # a table written by sse_tables.py
    python benchmarks/report.py runs/fmnist_demo/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def table(rows: list[dict]) -> str:
    """Valid and test columns where the rows have them (``error_valid`` / ``ppl_valid``), perplexity
    for language models, error / NLL / ECE / Brier for classifiers."""
    lm = "ppl" in rows[0]
    valid = any(f"{'ppl' if lm else 'error'}_valid" in r for r in rows)
    cols = ([("ppl_valid", "valid PPL", 1, ".2f")] if lm and valid else []) + ([("ppl", "test PPL", 1, ".2f")] if lm else [])
    if not lm:
        cols = ([("error_valid", "valid error %", 100, ".2f")] if valid else []) + [
            ("error", "error %", 100, ".2f"), ("nll", "NLL", 1, ".4f"), ("ece", "ECE %", 100, ".2f"), ("brier", "Brier", 1, ".4f")]
    head = ["method", "members"] + [c[1] for c in cols] + ["params (x1)", "FLOPs (x1)", "nonzero MACs (x1)", "train s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [f"{scale * r[key]:{fmt}}" if key in r else "–" for key, _, scale, fmt in cols]
        out.append(f"| {r['method']} | {r['members']} | " + " | ".join(vals) +
                   f" | {r['params']:,} ({r['params_ratio']:.2f}) | {r['flops']:,} ({r['flops_ratio']:.2f}) | "
                   f"{r['nonzero_macs']:,} ({r['macs_ratio']:.2f}) | {r['train_seconds']:.0f} |")
    return "\n".join(out)


def main():
    for arg in sys.argv[1:]:
        path = Path(arg) if arg.endswith(".json") else RESULTS / f"{arg}.json"
        blob = json.loads(path.read_text())
        rows = blob["rows"] if isinstance(blob, dict) else blob
        print(f"### {arg}\n")
        if isinstance(blob, dict):
            print(f"machine: {blob['machine']['cpu']}, {blob['machine']['cores']} cores, torch {blob['machine']['torch']}; "
                  f"overrides: {blob.get('overrides') or 'none'}\n")
        print(table(rows) + "\n")


if __name__ == "__main__":
    main()
