"""The uncertainty users check: ensemble uncertainty scores, OOD detection, selective prediction,
calibration curves.

Pure functions of torch tensors, computed on the data's device; scalars come back as Python
floats, per-example scores and curves as tensors on the data's device, per-bin reliability
statistics as small CPU tensors. Conventions (which class is positive, ties, thresholds) are
stated in each docstring and in ``docs/uncertainty.md``.

Entropies are in nats. An ensemble's prediction is the mean of its members' probabilities,
``log mean_m p_m = logsumexp_m log p_m - log M`` (as in :class:`~sparse_ensembles.tasks.base.EnsembleStream`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .metrics import MetricInputError, _bad_rows, _drop

__all__ = [
    "entropy", "ensemble_mean_logp", "predictive_entropy", "expected_entropy", "mutual_information",
    "UncertaintyStream", "ood_metrics", "auroc", "aupr", "fpr_at_tpr", "risk_coverage", "aurc",
    "error_at_coverage", "reliability", "reliability_from_topk", "plot_reliability",
]


# -- 1. scores from an ensemble -------------------------------------------------------------------
def entropy(logp: Tensor) -> Tensor:
    """Shannon entropy ``H[p] = -sum_c p_c log p_c`` (nats) over the last dimension, from
    log-probabilities; classes with ``p_c = 0`` (log-prob ``-inf``) contribute 0. Shape
    ``(..., C) -> (...)``."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def ensemble_mean_logp(logp: Tensor) -> Tensor:
    """Log of the members' mean probability: ``(M, N, C) -> (N, C)``,
    ``logsumexp_m log p_m - log M``."""
    if logp.dim() != 3 or not logp.shape[0]:
        raise MetricInputError("ensemble_mean_logp", f"need (M, N, C) member log-probabilities with M >= 1, got shape "
                               f"{tuple(logp.shape)}", "stack at least one member's (N, C) log-probabilities")
    return torch.logsumexp(logp, 0) - math.log(logp.shape[0])


def predictive_entropy(mean_logp: Tensor) -> Tensor:
    """Total uncertainty: the entropy of the ensemble's mean prediction, ``H[mean_m p_m]``, from
    the log of the mean probability ``(N, C) -> (N,)``. A single model's is its own entropy."""
    return entropy(mean_logp)


def expected_entropy(logp: Tensor) -> Tensor:
    """Aleatoric part: the members' mean entropy ``mean_m H[p_m]``, ``(M, N, C) -> (N,)``."""
    return entropy(logp).mean(0)


def mutual_information(mean_logp: Tensor, expected_entropy: Tensor) -> Tensor:
    """Epistemic part (BALD, the members' disagreement): ``I = H[mean_m p_m] - mean_m H[p_m]``
    per example, ``(N, C), (N,) -> (N,)``. Non-negative by Jensen's inequality; rounding
    below 0 is clamped to 0. Zero when all members predict the same distribution."""
    return (predictive_entropy(mean_logp) - expected_entropy).clamp_min(0)


class UncertaintyStream:
    """Member-by-member accumulation, so the mutual information needs neither all members nor
    their models in memory: keeps the running ``logsumexp`` of the members' log-probabilities
    (as ``EnsembleStream`` does) and the running sum of their entropies.

    ``add(logp_member)`` takes one member's ``(N, C)`` log-probabilities (the same shape each
    time). ``mean_logp`` is ``log mean_m p_m``; ``entropy`` is the predictive entropy
    ``H[mean_m p_m]``, ``expected_entropy`` is ``mean_m H[p_m]`` and ``mutual_information`` their
    difference, all ``(N,)``."""

    def __init__(self):
        self._sum: Optional[Tensor] = None  # log sum_m p_m
        self._entropy_sum: Optional[Tensor] = None  # sum_m H[p_m]
        self.members = 0

    @torch.no_grad()
    def add(self, logp_member: Tensor) -> "UncertaintyStream":
        logp = logp_member.detach()
        if logp.dim() != 2:
            raise ValueError(f"expected a member's (N, C) log-probabilities, got shape {tuple(logp.shape)}")
        if self._sum is not None and logp.shape != self._sum.shape:
            raise ValueError(f"member shape {tuple(logp.shape)} differs from the first member's {tuple(self._sum.shape)}")
        h = entropy(logp)
        if self._sum is None:
            self._sum, self._entropy_sum = logp.clone(), h
        else:
            self._sum = torch.logaddexp(self._sum, logp)
            self._entropy_sum = self._entropy_sum + h
        self.members += 1
        return self

    def _need(self) -> None:
        if not self.members:
            raise ValueError("no member was added to this stream")

    @property
    def mean_logp(self) -> Tensor:
        self._need()
        return self._sum - math.log(self.members)

    @property
    def entropy(self) -> Tensor:
        return predictive_entropy(self.mean_logp)

    @property
    def expected_entropy(self) -> Tensor:
        self._need()
        return self._entropy_sum / self.members

    @property
    def mutual_information(self) -> Tensor:
        return mutual_information(self.mean_logp, self.expected_entropy)


# -- 2. OOD detection -----------------------------------------------------------------------------
def _scores(metric: str, x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise MetricInputError(metric, f"{what} must be a torch.Tensor, got {type(x).__name__}", "pass torch.as_tensor(...)")
    if x.is_complex() or x.dtype == torch.bool:
        raise MetricInputError(metric, f"{what} must be real numbers, got {x.dtype}", "pass x.double()")
    return x.detach().flatten()


def _labelled(metric: str, score_in: Tensor, score_out: Tensor, drop_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    score_in, score_out = _scores(metric, score_in, "in-distribution scores"), _scores(metric, score_out, "OOD scores")
    if not len(score_in) or not len(score_out):
        raise MetricInputError(metric, f"got {len(score_in)} in-distribution and {len(score_out)} OOD scores",
                               "OOD metrics need at least one of each")
    score_in = score_in.double()
    score_out = score_out.to(device=score_in.device, dtype=torch.float64)
    # a NaN score cannot be ranked: refuse it (or drop it) rather than let it fall anywhere
    (score_in,) = _drop(metric, ~score_in.isfinite(), drop_nonfinite, "in-distribution scores", (score_in,))
    (score_out,) = _drop(metric, ~score_out.isfinite(), drop_nonfinite, "OOD scores", (score_out,))
    scores = torch.cat([score_in, score_out])
    is_out = torch.cat([torch.zeros_like(score_in, dtype=torch.bool), torch.ones_like(score_out, dtype=torch.bool)])
    return scores, is_out


def auroc(score_in: Tensor, score_out: Tensor, drop_nonfinite: bool = False) -> float:
    """Area under the ROC curve with OOD as the positive class and higher score = more likely
    OOD: ``P(s_out > s_in) + P(s_out = s_in) / 2`` over all (in, out) pairs, computed exactly
    by the Mann-Whitney rank-sum statistic with average ranks for ties (identical scores give
    0.5)."""
    scores, is_out = _labelled("auroc", score_in, score_out, drop_nonfinite)
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # ascending
    last = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    avg_rank = (last - (counts.double() - 1) / 2)[inverse]
    n_out, n_in = int(is_out.sum()), int((~is_out).sum())
    u = avg_rank[is_out].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_out * n_in))


def aupr(score_in: Tensor, score_out: Tensor, drop_nonfinite: bool = False) -> float:
    """Area under the precision-recall curve with OOD as the positive class, as average
    precision (sklearn's ``average_precision_score``): ``AP = sum_k (R_k - R_{k-1}) P_k`` over the
    distinct score thresholds ``t_k`` in decreasing order, where a sample is flagged OOD when its
    score is ``>= t_k`` (a tie group enters all at once), ``P_k``/``R_k`` are the precision and
    recall of that rule and ``R_0 = 0``. Step-wise, no interpolation. This is AUPR-out (OOD
    positive); for AUPR-in pass the negated scores swapped."""
    scores, is_out = _labelled("aupr", score_in, score_out, drop_nonfinite)
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    pos = torch.zeros(len(counts), dtype=torch.float64, device=scores.device).index_add(0, inverse, is_out.double())
    tp = pos.flip(0).cumsum(0)  # thresholds in decreasing order
    flagged = counts.flip(0).double().cumsum(0)
    recall_gain = pos.flip(0) / tp[-1]
    return float((recall_gain * tp / flagged).sum())


def fpr_at_tpr(score_in: Tensor, score_out: Tensor, tpr: float = 0.95, drop_nonfinite: bool = False) -> float:
    """False-positive rate at ``tpr`` true-positive rate, OOD positive, flagged when
    ``score >= t``. The threshold is the largest ``t`` that flags at least ``tpr`` of the OOD
    samples: the ``k``-th largest OOD score with ``k = ceil(tpr * n_out)``. Returns the fraction
    of in-distribution samples with ``score >= t`` (ties at ``t`` count as flagged)."""
    if not 0 < tpr <= 1:
        raise MetricInputError("fpr_at_tpr", f"tpr must be in (0, 1], got {tpr}", "pass e.g. tpr=0.95")
    scores, is_out = _labelled("fpr_at_tpr", score_in, score_out, drop_nonfinite)
    score_in, score_out = scores[~is_out], scores[is_out]
    k = max(1, math.ceil(round(tpr * len(score_out), 9)))  # round: 0.95 * 20 is 19, not 19.000...04
    t = score_out.sort(descending=True).values[k - 1]
    return float((score_in >= t).double().mean())


def ood_metrics(score_in: Tensor, score_out: Tensor, drop_nonfinite: bool = False) -> dict[str, float]:
    """``{"auroc", "aupr", "fpr95"}`` for separating OOD (positive) from in-distribution samples
    by a score that is higher for OOD (e.g. the predictive entropy or the mutual information;
    pass ``-max_prob`` for a confidence). See :func:`auroc`, :func:`aupr`, :func:`fpr_at_tpr`."""
    kw = {"drop_nonfinite": drop_nonfinite}
    return {"auroc": auroc(score_in, score_out, **kw), "aupr": aupr(score_in, score_out, **kw),
            "fpr95": fpr_at_tpr(score_in, score_out, 0.95, **kw)}


# -- 3. selective prediction ----------------------------------------------------------------------
def _confidence_and_correct(metric: str, confidence: Tensor, correct: Tensor,
                            drop_nonfinite: bool) -> tuple[Tensor, Tensor]:
    confidence = _scores(metric, confidence, "confidences")
    if not isinstance(correct, Tensor):
        raise MetricInputError(metric, f"correctness flags must be a torch.Tensor, got {type(correct).__name__}",
                               "pass torch.as_tensor(correct)")
    correct = correct.detach().flatten().to(confidence.device)
    if len(confidence) != len(correct) or not len(confidence):
        raise MetricInputError(metric, f"got {len(confidence)} confidences and {len(correct)} correctness flags",
                               "pass one flag per confidence, at least one of each")
    if correct.dtype != torch.bool and not bool(((correct == 0) | (correct == 1)).all()):
        raise MetricInputError(metric, "correctness flags must be bool or 0/1", "pass (pred == y)")
    confidence = confidence if confidence.is_floating_point() else confidence.double()
    return _drop(metric, _bad_rows(confidence, allow_neg_inf=False), drop_nonfinite, "confidences",
                 (confidence, correct))


def _accepted(metric: str, confidence: Tensor, correct: Tensor, drop_nonfinite: bool) -> tuple[Tensor, Tensor]:
    """Per distinct confidence, in decreasing order: examples accepted so far (``>=`` it), errors among them."""
    confidence, correct = _confidence_and_correct(metric, confidence, correct, drop_nonfinite)
    _, inverse, counts = torch.unique(confidence, return_inverse=True, return_counts=True)
    wrong = (correct == 0).double()
    errors = torch.zeros(len(counts), dtype=torch.float64, device=confidence.device).index_add(0, inverse, wrong)
    return counts.flip(0).cumsum(0), errors.flip(0).cumsum(0)


def risk_coverage(confidence: Tensor, correct: Tensor, drop_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    """Risk-coverage curve of predicting only on the most confident examples.

    Examples are accepted in decreasing order of ``confidence``; a group of equal confidences is
    accepted all at once (no arbitrary tie-break), so there is one point per distinct confidence
    value: ``coverage = k / N`` with ``k`` the number of examples with confidence ``>=`` that
    value, and ``risk`` the error rate (fraction not ``correct``; ``correct`` is bool or 0/1)
    among those ``k``. Without ties the points are ``k = 1..N``. Returns ``(coverages, risks)``,
    float64 on the data's device, coverage increasing to 1."""
    k, errors = _accepted("risk_coverage", confidence, correct, drop_nonfinite)
    return k.double() / int(k[-1]), errors / k


def aurc(confidence: Tensor, correct: Tensor, drop_nonfinite: bool = False) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2018): the mean over ``k = 1..N`` of
    the error rate of the ``k`` most confident examples. Ties follow :func:`risk_coverage`: every
    ``k`` inside a tie group takes the risk of the whole group, i.e. ``AURC = sum_j (c_j - c_{j-1})
    r_j`` over the curve's points. Lower is better."""
    k, errors = _accepted("aurc", confidence, correct, drop_nonfinite)
    cov, risk = k.double() / int(k[-1]), errors / k
    return float((torch.diff(cov, prepend=cov.new_zeros(1)) * risk).sum())


def error_at_coverage(confidence: Tensor, correct: Tensor, coverage: float = 0.8,
                      drop_nonfinite: bool = False) -> float:
    """Error rate of the most confident ``coverage`` fraction: the risk at the first point of
    :func:`risk_coverage` whose coverage is ``>= coverage`` (``k = ceil(coverage * N)`` examples
    without ties; a tie group straddling that rank is included whole)."""
    if not 0 < coverage <= 1:
        raise MetricInputError("error_at_coverage", f"coverage must be in (0, 1], got {coverage}", "pass e.g. coverage=0.8")
    k, errors = _accepted("error_at_coverage", confidence, correct, drop_nonfinite)
    need = math.ceil(round(coverage * int(k[-1]), 9))  # round: 0.8 * 5 is 4, not 4.000...01
    i = int((k < need).sum())  # the first point accepting >= need examples
    return float(errors[i] / k[i])


# -- 4./5. calibration ----------------------------------------------------------------------------
def _reliability(conf: Tensor, correct: Tensor, bins: int, metric: str = "reliability") -> dict:
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise MetricInputError(metric, f"bins must be a positive integer, got {bins!r}", "pass e.g. bins=15")
    conf, correct = _confidence_and_correct(metric, conf, correct, drop_nonfinite=False)
    if conf.dtype not in (torch.float32, torch.float64):
        conf = conf.float()
    correct = correct.to(conf.dtype)
    # bin b holds confidences in (b/bins, (b+1)/bins], as in metrics.ece
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    zeros = torch.zeros(bins, dtype=conf.dtype, device=conf.device)
    sum_conf, sum_acc = zeros.index_add(0, idx, conf), zeros.index_add(0, idx, correct)
    counts = torch.zeros(bins, dtype=torch.long, device=conf.device).index_add(0, idx, torch.ones_like(idx))
    denom = counts.clamp_min(1).to(conf.dtype)
    return {"edges": torch.linspace(0, 1, bins + 1, dtype=torch.float64), "confidence": (sum_conf / denom).cpu(),
            "accuracy": (sum_acc / denom).cpu(), "counts": counts.cpu(),
            "ece": float((sum_conf - sum_acc).abs().sum() / len(conf)), "n": len(conf)}


def reliability_from_topk(max_logp: Tensor, correct: Tensor, bins: int = 15) -> dict:
    """Reliability diagram from the top-1 log-probability of each prediction and whether the
    top-1 class was right, so a language model need not keep ``(tokens, V)`` tensors (collect
    ``max_logp`` and ``correct`` per batch, concatenate, call once).

    Equal-width bins on the confidence ``exp(max_logp)`` in [0, 1], bin ``b`` holding
    ``(b/bins, (b+1)/bins]`` -- the binning of :func:`sparse_ensembles.metrics.ece`. Returns
    ``{"edges", "confidence", "accuracy", "counts", "ece", "n"}``: bin edges, per-bin mean
    confidence and accuracy (0 for an empty bin) and counts as small CPU tensors, and
    ``ece = sum_b counts_b / N * |accuracy_b - confidence_b|`` (equal to ``metrics.ece``), ``n = N``."""
    return _reliability(max_logp.detach().flatten().exp(), correct.detach().flatten(), bins)


def reliability(probs_or_logp: Tensor, labels: Tensor, bins: int = 15, log: Optional[bool] = None) -> dict:
    """Reliability diagram of ``(N, C)`` predictions (also flattened ``(tokens, V)`` next-word
    predictions) against integer ``labels``: top-1 confidence and correctness, then the binning
    of :func:`reliability_from_topk`. ``log`` says whether the input holds log-probabilities;
    ``None`` guesses: log-probabilities when no entry is positive (a probability row always has
    one)."""
    x = probs_or_logp.detach()
    if log is None:
        log = bool((x <= 0).all())
    top, pred = x.max(-1)
    correct = pred == labels.to(pred.device)
    if log:  # exp(max log p) is bit-identical to metrics.ece's max exp(log p)
        return reliability_from_topk(top, correct, bins)
    return _reliability(top.flatten(), correct.flatten(), bins)  # probabilities binned as given


def plot_reliability(curves: dict[str, dict], path) -> Path:
    """One PNG at ``path`` with a reliability diagram per method (``curves``: name ->
    :func:`reliability` dict): bars of accuracy per confidence bin, the mean confidence per bin
    as dots, the diagonal of perfect calibration, ECE in the title. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("no reliability curve to plot")
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    for ax, (name, r) in zip(axes.flat, curves.items()):
        edges = r["edges"].tolist()
        width = edges[1] - edges[0]
        centers = [e + width / 2 for e in edges[:-1]]
        full = [c > 0 for c in r["counts"].tolist()]
        acc, conf = r["accuracy"].tolist(), r["confidence"].tolist()
        ax.bar([c for c, f in zip(centers, full) if f], [a for a, f in zip(acc, full) if f], width,
               edgecolor="black", linewidth=0.5, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.plot([c for c, f in zip(conf, full) if f], [c for c, f in zip(conf, full) if f], "r.", label="mean confidence")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{name}\nECE {100 * r['ece']:.2f}% (n={r['n']})")
        ax.title.set_fontsize(9)
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
