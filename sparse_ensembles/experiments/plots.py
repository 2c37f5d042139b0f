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
