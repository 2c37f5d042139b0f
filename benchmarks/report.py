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
    out = ["| method | members | error % | NLL | ECE % | Brier | params (x1) | FLOPs (x1) | nonzero MACs (x1) | train s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['members']} | {100 * r['error']:.2f} | {r['nll']:.4f} | {100 * r['ece']:.2f} | "
                   f"{r['brier']:.4f} | {r['params']:,} ({r['params_ratio']:.2f}) | {r['flops']:,} ({r['flops_ratio']:.2f}) | "
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
