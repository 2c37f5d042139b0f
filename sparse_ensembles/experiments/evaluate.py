"""Evaluation of a run directory: every row's members streamed one at a time through the task's
valid and test streams (memory does not grow with members), costs against one dense model,
``results.json``, ``metrics/<method>.json``, the table and the pictures."""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Callable, Optional

from .. import checkpoint
from .config import Config, ConfigError
from .stages import Context, build_stages, build_task, resolve_device


def _cached(out: Path, name: str) -> Optional[dict]:
    """A row's metrics as the last evaluation saved them (``metrics/<method>.json``), or None."""
    from .plots import slug
    path = out / "metrics" / f"{slug(name)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _as_lists(r: dict) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in r.items()}


def evaluate_run(out: Path, cfg: Config, task=None, log: Callable[[str], None] = print,
                 ood: Optional[str] = None, only: Optional[list[str]] = None) -> list[dict]:
    """``ood``: score out-of-distribution detection against this dataset (default: ``task.ood``).
    ``only``: stage-name patterns (as ``run --only``); the rows of other stages are taken from
    their last evaluation (``metrics/``) instead of being recomputed, and left out if they have none."""
    import torch
    from .plots import slug, write_plots  # matplotlib only when needed

    out = Path(out)
    device = resolve_device(cfg.experiment.device)
    task = task or build_task(cfg, device)
    ctx = Context(cfg, task, out, device, log, progress=False)
    ref = ctx.new_model(0).cost()
    results, curves, inputs, units, reliabilities = [], {}, {}, {}, {}
    ood = ood if ood is not None else getattr(cfg.task, "ood", "")
    if ood and not hasattr(task, "ood_stream"):
        raise ConfigError(f"--ood: the {cfg.kinds['task']} task has no out-of-distribution evaluation")
    for stage in build_stages(cfg):
        fresh = not only or any(fnmatch.fnmatch(stage.name, p) for p in only)
        for row in stage.rows(out):
            if not fresh:  # reuse the last evaluation of this row
                name = row.method if "+PR" in row.method else f"{row.method} x{len(row.files)}"
                cached = _cached(out, name)
                if cached is None:
                    log(f"{name}: not evaluated yet (evaluate without --only to include it)")
                    continue
                results.append({k: v for k, v in cached.items()
                                if not k.startswith("curve_") and k not in ("units_per_member", "reliability")})
                curves[name] = cached.get("curve_test", [])
                if row.sparsity and cached.get("units_per_member"):
                    units[name] = cached["units_per_member"]
                if cached.get("reliability"):
                    reliabilities[name] = {k: torch.tensor(v) if isinstance(v, list) else v
                                           for k, v in cached["reliability"].items()}
                continue
            streams = {split: task.stream(split) for split in task.splits}
            try:
                ood_stream = task.ood_stream(ood) if ood else None
                # the same detection on the valid split (the OOD set's last training images)
                ood_valid = task.ood_stream(ood, split="valid") if ood and "valid" in streams else None
            except ValueError as e:
                raise ConfigError(str(e)) from None
            cost = {"params": 0, "flops": 0, "nonzero_macs": 0}
            metas, member_inputs, member_units = [], [], []
            for f in row.files:  # one member in memory at a time
                model, meta = checkpoint.load_member(f, device)
                for s in streams.values():
                    s.add(model)
                for o in (ood_stream, ood_valid):
                    if o is not None:
                        o.add(model)
                for k, v in model.cost().items():
                    cost[k] += v
                metas.append(meta)
                if hasattr(model, "input_index"):
                    member_inputs.append(model.input_index.cpu())
                if hasattr(model, "unit_groups"):  # a compacted member's sizes are its kept units
                    member_units.append({fam.name: fam.size for fam in model.unit_groups()})
                del model
            name = row.method if "+PR" in row.method else f"{row.method} x{len(row.files)}"
            measured = [m["sparsity"] for m in metas if "sparsity" in m]  # what the members reached
            sparsity = sum(measured) / len(measured) if len(measured) == len(metas) and metas else row.sparsity
            result = {"method": name, "members": len(row.files), "sparsity": sparsity}
            for split, s in streams.items():
                result.update({f"{k}_{split}": v for k, v in s.result.items()})
            result.update(streams["test"].result if "test" in streams else {})
            if hasattr(task, "uncertainty") and "test" in streams:
                result.update(task.uncertainty(streams["test"], ood_stream))
                if ood_valid is not None:
                    valid = task.uncertainty(streams["valid"], ood_valid, split="valid")
                    result.update({f"{k}_valid": v for k, v in valid.items() if k.startswith("ood_")})
                reliabilities[name] = task.reliability(streams["test"])
            elif hasattr(task, "uncertainty_from_models") and "test" in task.splits:
                # next-word calibration needs every member at once (segment by segment, states carried)
                members = [checkpoint.load_member(f, device)[0] for f in row.files]
                extra, reliabilities[name] = task.uncertainty_from_models(members)
                result.update(extra)
                del members
            result.update({"params": cost["params"], "flops": cost["flops"], "nonzero_macs": cost["nonzero_macs"],
                           "params_ratio": cost["params"] / ref["params"], "flops_ratio": cost["flops"] / ref["flops"],
                           "macs_ratio": cost["nonzero_macs"] / ref["nonzero_macs"],
                           "train_seconds": row.train_seconds(metas)})
            results.append(result)
            curves[name] = streams["test"].curve if "test" in streams else []
            if member_inputs:
                inputs[name] = member_inputs
            if row.sparsity and member_units:
                units[name] = member_units
            checkpoint.atomic_write_json(out / "metrics" / f"{slug(name)}.json",
                                         {**result, **{f"curve_{s}": st.curve for s, st in streams.items()},
                                          "units_per_member": member_units,
                                          "reliability": _as_lists(reliabilities[name]) if name in reliabilities else None})
    checkpoint.atomic_write_json(out / "results.json", results)
    write_plots(out, results, curves, inputs, task.dims.get("in_features", 0), task.columns[:2], units)
    if reliabilities:
        from ..uncertainty import plot_reliability
        plot_reliability(reliabilities, out / "reliability.png")
    log(format_table(results, task.columns, title=f"{cfg.experiment.name}: {task.describe()} (test set; valid in results.json)"))
    return results


_FORMATS = {"error": ("error %", 100, 8, ".2f"), "nll": ("NLL", 1, 8, ".4f"), "ece": ("ECE %", 100, 7, ".2f"),
            "brier": ("Brier", 1, 7, ".4f"), "ppl": ("PPL", 1, 9, ".2f")}


def format_table(rows: list[dict], columns=("error", "nll", "ece", "brier"), title: str = "") -> str:
    cols = [c for c in columns if c in _FORMATS]
    name_width = max([22] + [len(r["method"]) + 1 for r in rows])
    head = f"{'method':<{name_width}}{'members':>8}" + "".join(f"{_FORMATS[c][0]:>{_FORMATS[c][2] + 1}}" for c in cols)
    head += f"{'params':>11}{'x1':>6}{'FLOPs':>12}{'x1':>6}{'train s':>9}"
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for r in rows:
        line = f"{r['method']:<{name_width}}{r['members']:>8}"
        for c in cols:
            label, scale, width, fmt = _FORMATS[c]
            line += f"{scale * r.get(c, math.nan):>{width + 1}{fmt}}"
        line += (f"{r['params']:>11,}{r['params_ratio']:>6.2f}{r['flops']:>12,}{r['flops_ratio']:>6.2f}"
                 f"{r['train_seconds']:>9.0f}")
        lines.append(line)
    lines.append("x1 = ratio to one dense model; FLOPs by the SSE sub-matrix rule; params = nonzero weights and biases")
    return "\n".join(lines)
