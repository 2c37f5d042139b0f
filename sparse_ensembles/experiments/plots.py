"""PNG pictures of a run (matplotlib, headless)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402


def slug(method: str) -> str:
    """A file-name form of a method label: 'SGLD+GSP+PR 96%' -> 'SGLD_GSP_PR_96pct',
    'SGLD+GSP(iss_se)+PR 90%' -> 'SGLD_GSP_iss_se_PR_90pct'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", method.replace("%", "pct")).strip("_")


_LABELS = {"error": ("test error (%)", 100), "nll": ("test NLL", 1), "ppl": ("test perplexity", 1),
           "ece": ("test ECE (%)", 100), "brier": ("test Brier", 1)}


_MARKERS = "osD^vP*Xhp<>"


def styles(methods: list[str]) -> dict[str, dict]:
    """One colour and marker per method, the same in every picture of a run: 20 colours (tab20),
    then the markers change, so rows stay apart in tables of 16 or more (the PTB table)."""
    colours = plt.get_cmap("tab20").colors
    return {m: {"color": colours[i % len(colours)], "marker": _MARKERS[(i // len(colours)) % len(_MARKERS)]}
            for i, m in enumerate(dict.fromkeys(methods))}


def _legend_right(fig, ax, n: int) -> None:
    """The legend beside the panels, so it hides no curve or point."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 if n <= 18 else 2, frameon=False)


def write_plots(out: Path, results: list[dict], curves: dict, inputs: dict, in_features: int,
                metrics=("error", "nll"), units: dict | None = None) -> list[Path]:
    """``curves``: method -> test metrics after each member; ``inputs``: method -> each compacted
    member's live input indices (the pixel picture, for 28 x 28 inputs); ``units``: method -> per
    member, the units kept per unit family (``{"layer0": 61, ...}``)."""
    written = []
    # 1. the two headline metrics against the number of members averaged
    style = styles([r["method"] for r in results] + list(curves))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for name, curve in curves.items():
        ks = range(1, len(curve) + 1)
        for ax, key in zip(axes, metrics):
            ax.plot(ks, [_LABELS[key][1] * c[key] for c in curve], markersize=4, label=name, **style[name])
    for ax, key in zip(axes, metrics):
        ax.set(xlabel="members averaged", ylabel=_LABELS[key][0], title=f"{key} vs ensemble size")
    _legend_right(fig, axes[1], len(curves))
    fig.tight_layout()
    written.append(out / "members_curve.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    # 2. the accuracy-cost frontier
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    label, scale = _LABELS[metrics[0]]
    for r in results:
        for ax, key in zip(axes, ("params_ratio", "flops_ratio")):
            ax.scatter(r[key], scale * r[metrics[0]], s=30, label=r["method"], **style[r["method"]])
    axes[0].set(xscale="log", xlabel="parameters (x one dense model)", ylabel=label)
    axes[1].set(xscale="log", xlabel="FLOPs (x one dense model)", ylabel=label)
    for ax in axes:  # log axis labelled at 1, 2, 5 x 10^k in plain numbers ("0.5, 1, 2"), no minor labels
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="0.8", linewidth=0.8, zorder=0)  # the one-dense-model budget
    _legend_right(fig, axes[1], len(results))
    fig.suptitle("accuracy-cost frontier")
    fig.tight_layout()
    written.append(out / "frontier.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    # 3. units kept per layer (unit family) by each compacted member, one panel per pruned row
    if units:
        cols = min(3, len(units))
        rows = math.ceil(len(units) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(units):]:
            ax.axis("off")
        for ax, (name, members) in zip(axes.flat, units.items()):
            families = list(members[0])
            width = 0.8 / len(families)
            for j, fam in enumerate(families):
                ax.bar([k + j * width for k in range(len(members))], [m.get(fam, 0) for m in members], width, label=fam)
            ax.set(xlabel="member", ylabel="units kept", title=name)
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(members))], [str(k) for k in range(len(members))])
            ax.title.set_fontsize(8)
            ax.legend(fontsize=7)
        fig.suptitle("units kept per layer by each compacted member")
        fig.tight_layout()
        written.append(out / "units_kept.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    # 4. input pixels that survive structured pruning (28 x 28 inputs only)
    side = int(round(math.sqrt(in_features)))
    for name, indices in inputs.items():
        if in_features == 0 or side * side != in_features:
            continue
        cols = min(6, len(indices))
        rows = math.ceil(len(indices) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for k, (ax, index) in enumerate(zip(axes.flat, indices)):
            img = [0.0] * in_features
            for i in index.tolist():
                img[i] = 1.0
            ax.imshow([img[r * side:(r + 1) * side] for r in range(side)], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"#{k}: {len(index)} px", fontsize=7)
        fig.suptitle(f"{name}: live input pixels per member")
        fig.tight_layout()
        written.append(out / f"pixels_{slug(name)}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def block_norm_heatmaps(histories: dict[str, list[dict]], path: Path, epochs: int = 3) -> Path:
    """Heatmaps of one weight matrix's block norms (like the block-sparse slides' ``weight_hh_l0``
    at epochs 0 / 50 / 100): one row of panels per variant, ``epochs`` panels spread from the first
    recorded epoch to the last, one colour scale per variant; all-zero (pruned) blocks are white.
    ``histories``: variant -> the records of ``group_norms_<k>.json`` (``epoch``, ``shape``,
    flat ``norms``, ``group_sparsity``)."""
    import numpy as np

    rows = [(name, h) for name, h in histories.items() if h]
    if not rows:
        raise ValueError("block_norm_heatmaps: no recorded block norms (group_norms_*.json)")
    fig, axes = plt.subplots(len(rows), epochs, figsize=(3.0 * epochs, 2.6 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    for r, (name, history) in enumerate(rows):
        picks = [history[round(i * (len(history) - 1) / max(epochs - 1, 1))] for i in range(epochs)]
        grids = [np.asarray(h["norms"], dtype=float).reshape(h["shape"]) for h in picks]
        top = max(float(g.max()) for g in grids) or 1.0
        for ax, h, grid in zip(axes[r], picks, grids):
            im = ax.imshow(np.ma.masked_equal(grid, 0.0), cmap=cmap, vmin=0, vmax=top, aspect="auto",
                           interpolation="nearest")
            ax.set_title(f"{name}\nepoch {h['epoch']}, {100 * h.get('group_sparsity', 0):.0f}% blocks zero", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(axes[r]), fraction=0.02, pad=0.01, label="block L2 norm")
    fig.suptitle(f"block norms of {rows[0][1][0].get('family', 'one matrix')} (rows: stacked gates i, f, g, o)", fontsize=9, y=1.04)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def perplexity_vs_sparsity(points: list[dict], path: Path) -> Path:
    """Test (and valid) perplexity against achieved block sparsity, one labelled point per row."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    st = styles([p["method"] for p in points])
    for p in points:
        ax.scatter(100 * p["block_sparsity"], p["ppl_test"], s=40, label=p["method"], **st[p["method"]])
        if "ppl_valid" in p:
            ax.scatter(100 * p["block_sparsity"], p["ppl_valid"], s=18, facecolors="none", edgecolors=st[p["method"]]["color"],
                       marker=st[p["method"]]["marker"])
    ax.set_xlabel("block sparsity of the LSTM weights (%)")
    ax.set_ylabel("perplexity (filled: test, open: valid)")
    ax.grid(alpha=0.3)
    _legend_right(fig, ax, len(points))
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
