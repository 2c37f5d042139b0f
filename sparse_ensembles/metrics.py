"""What users compare: error, NLL, ECE, Brier, nonzero parameters and FLOPs.

Every metric checks its input first (:func:`check_predictions`): ``(N, C)`` log-probabilities of
any float dtype against ``N`` integer labels in ``[0, C)``, ``N > 0``. A log-probability of
``-inf`` is a probability of 0 and is scored as such; NaN or ``+inf`` is refused with a
:class:`MetricInputError` naming the metric, unless the caller passes ``drop_nonfinite=True``,
which scores only the rows without them.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn


class MetricInputError(ValueError):
    """Input a metric cannot score; the message names the metric, what is wrong and the fix."""

    def __init__(self, metric: str, problem: str, fix: str):
        self.metric, self.problem, self.fix = metric, problem, fix
        super().__init__(f"{metric}: {problem}; {fix}")


def _as_float(metric: str, x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise MetricInputError(metric, f"{what} must be a torch.Tensor, got {type(x).__name__}",
                               "pass torch.as_tensor(...)")
    if not x.is_floating_point():
        raise MetricInputError(metric, f"{what} must be floating point, got {x.dtype}", "pass x.float()")
    # half precision is scored in float32 (its sums lose whole examples); float32 / float64 as given
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _bad_rows(values: Tensor, allow_neg_inf: bool) -> Tensor:
    """Per row (or element, for 1-D input): holds NaN, +inf, or -inf unless ``allow_neg_inf``."""
    bad = values.isnan() | (values == float("inf"))
    if not allow_neg_inf:
        bad = bad | (values == float("-inf"))
    return bad.flatten(1).any(1) if bad.dim() > 1 else bad


def _drop(metric: str, bad: Tensor, drop_nonfinite: bool, what: str, tensors: tuple[Tensor, ...]):
    if not bool(bad.any()):
        return tensors
    n_bad = int(bad.sum())
    if not drop_nonfinite:
        raise MetricInputError(metric, f"{n_bad} of {len(bad)} {what} hold NaN or inf",
                               "fix what produced them, or pass drop_nonfinite=True to score the rest")
    if n_bad == len(bad):
        raise MetricInputError(metric, f"all {len(bad)} {what} hold NaN or inf", "nothing is left to score")
    keep = ~bad
    return tuple(t[keep] for t in tensors)


def check_predictions(metric: str, logprobs: Tensor, y: Tensor, drop_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    """Validated ``(logprobs, y)`` for ``metric``: ``(N, C)`` float log-probabilities (half precision
    promoted to float32) and ``N`` integer labels in ``[0, C)``, ``N > 0``; rows holding NaN or
    ``+inf`` refused (or dropped with ``drop_nonfinite``). Raises :class:`MetricInputError`."""
    logprobs = _as_float(metric, logprobs, "log-probabilities")
    if not isinstance(y, Tensor):
        raise MetricInputError(metric, f"labels must be a torch.Tensor, got {type(y).__name__}", "pass torch.as_tensor(y)")
    if logprobs.dim() != 2:
        raise MetricInputError(metric, f"log-probabilities must be (N, C), got shape {tuple(logprobs.shape)}",
                               "flatten tokens first: logprobs.reshape(-1, C), y.reshape(-1)")
    if y.dim() != 1 or len(y) != len(logprobs):
        raise MetricInputError(metric, f"{len(logprobs)} predictions but labels of shape {tuple(y.shape)}",
                               "pass one integer label per prediction row")
    if not len(y):
        raise MetricInputError(metric, "no examples (N = 0)", "score at least one example")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise MetricInputError(metric, f"labels must be integers, got {y.dtype}", "pass y.long()")
    y = y.to(device=logprobs.device, dtype=torch.long)
    if bool((y < 0).any()) or bool((y >= logprobs.shape[1]).any()):
        raise MetricInputError(metric, f"labels must lie in [0, {logprobs.shape[1]}), got [{int(y.min())}, {int(y.max())}]",
                               "check that the labels match the model's classes")
    bad = _bad_rows(logprobs, allow_neg_inf=True)
    return _drop(metric, bad, drop_nonfinite, "prediction rows", (logprobs, y))


def error(logprobs: Tensor, y: Tensor, drop_nonfinite: bool = False) -> float:
    """Top-1 test error as a fraction."""
    logprobs, y = check_predictions("error", logprobs, y, drop_nonfinite)
    return float((logprobs.argmax(-1) != y).float().mean())


def nll(logprobs: Tensor, y: Tensor, drop_nonfinite: bool = False) -> float:
    """Mean negative log-likelihood (nats); ``inf`` when a true class has probability 0."""
    logprobs, y = check_predictions("nll", logprobs, y, drop_nonfinite)
    return float(-logprobs.gather(1, y[:, None]).mean())


def ece(logprobs: Tensor, y: Tensor, bins: int = 15, drop_nonfinite: bool = False) -> float:
    """Expected calibration error (Guo et al. 2017): top-1 confidence, ``bins`` equal-width bins
    on [0, 1], bin ``b`` holding ``(b/bins, (b+1)/bins]``, L1 gap weighted by the fraction of
    examples in each bin."""
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise MetricInputError("ece", f"bins must be a positive integer, got {bins!r}", "pass e.g. bins=15")
    logprobs, y = check_predictions("ece", logprobs, y, drop_nonfinite)
    conf, pred = logprobs.exp().max(-1)
    correct = (pred == y).to(conf.dtype)
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur for a max prob
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    zeros = torch.zeros(bins, dtype=conf.dtype, device=conf.device)  # bins on the data's device
    sum_conf = zeros.index_add(0, idx, conf)
    sum_acc = zeros.index_add(0, idx, correct)
    return float((sum_conf - sum_acc).abs().sum() / len(y))


def brier(logprobs: Tensor, y: Tensor, drop_nonfinite: bool = False) -> float:
    """Brier score: sum over classes of (p - onehot)^2, averaged over examples (range [0, 2])."""
    logprobs, y = check_predictions("brier", logprobs, y, drop_nonfinite)
    p = logprobs.exp()
    onehot = torch.nn.functional.one_hot(y, p.shape[-1]).to(p.dtype)
    return float((p - onehot).pow(2).sum(-1).mean())


def classification_metrics(logprobs: Tensor, y: Tensor, drop_nonfinite: bool = False) -> dict:
    logprobs, y = check_predictions("classification_metrics", logprobs, y, drop_nonfinite)
    return {"error": error(logprobs, y), "nll": nll(logprobs, y), "ece": ece(logprobs, y), "brier": brier(logprobs, y)}


def check_mixture(metric: str, mean: Tensor, var: Tensor, y: Tensor, drop_nonfinite: bool = False):
    """Validated ``(mean, var, y)``: ``(N, M)`` member means and variances (``M`` >= 1 Gaussian
    components per example, equally weighted; ``(N,)`` is one component), ``N`` float targets."""
    mean, var = _as_float(metric, mean, "means"), _as_float(metric, var, "variances")
    y = _as_float(metric, y, "targets").flatten()
    mean = mean[:, None] if mean.dim() == 1 else mean
    var = var[:, None] if var.dim() == 1 else var
    if mean.dim() != 2 or mean.shape != var.shape or mean.shape[1] < 1:
        raise MetricInputError(metric, f"means {tuple(mean.shape)} and variances {tuple(var.shape)} must both be (N, M)",
                               "stack the members' predictions on dim 1")
    if len(y) != len(mean):
        raise MetricInputError(metric, f"{len(mean)} predictions but {len(y)} targets", "pass one target per prediction")
    if not len(y):
        raise MetricInputError(metric, "no examples (N = 0)", "score at least one example")
    var = var.to(mean.dtype)
    y = y.to(device=mean.device, dtype=mean.dtype)
    bad = _bad_rows(mean, False) | _bad_rows(var, False) | _bad_rows(y, False) | (var <= 0).any(1)
    return _drop(metric, bad, drop_nonfinite, "predictions (or their targets; variances must be > 0)", (mean, var, y))


def regression_metrics(mean: Tensor, var: Tensor, y: Tensor, drop_nonfinite: bool = False) -> dict:
    """An equally weighted Gaussian mixture per example (an ensemble of Gaussian-likelihood members):

    * ``rmse`` of the mixture mean ``mu = mean_m mu_m``;
    * ``nll``: mean of ``-log mean_m N(y; mu_m, var_m)``, exact (logsumexp over the members), nats;
    * ``coverage95``: the fraction of targets inside ``mu +- 1.96 sd``, the 95% interval of the
      mixture's moment-matched Gaussian (``sd^2 = mean_m (var_m + mu_m^2) - mu^2``, aleatoric plus
      the members' disagreement); well calibrated near 0.95.
    """
    mean, var, y = check_mixture("regression_metrics", mean, var, y, drop_nonfinite)
    mu = mean.mean(1)
    total = (var + mean.pow(2)).mean(1) - mu.pow(2)
    comp = -0.5 * (torch.log(2 * math.pi * var) + (y[:, None] - mean).pow(2) / var)
    nll = -(torch.logsumexp(comp, 1) - math.log(mean.shape[1]))
    inside = (y - mu).abs() <= 1.96 * total.clamp_min(0).sqrt()
    return {"rmse": float((y - mu).pow(2).mean().sqrt()), "nll": float(nll.mean()), "coverage95": float(inside.double().mean())}


def _linear_weights(model: nn.Module) -> list[Tensor]:
    mods = model.modules()
    return [m.weight.detach() for m in mods if isinstance(m, nn.Linear)]


def nonzero_params(model: nn.Module) -> int:
    """Nonzero entries over all parameters (weights and biases) — what a sparse format stores."""
    return sum(int(p.detach().ne(0).sum()) for p in model.parameters())


def submatrix_flops(model: nn.Module) -> int:
    """FLOPs by the SSE paper's rule: for every weight matrix, 2 x the size of the smallest
    sub-matrix whose rows and columns contain all its nonzeros (what a shrunk dense layer costs).
    Biases and embeddings are not counted."""
    total = 0
    for w in _linear_weights(model):
        nz = w.ne(0)
        total += 2 * int(nz.any(1).sum()) * int(nz.any(0).sum())
    return total


def nonzero_macs(model: nn.Module) -> int:
    """Multiply-accumulates with a nonzero weight (what an ideal sparse kernel costs), per example."""
    return sum(int(w.ne(0).sum()) for w in _linear_weights(model))


def cost(models: Iterable[nn.Module]) -> dict:
    """Summed cost of an ensemble's members: each model kind's own ``cost()`` (see
    :mod:`sparse_ensembles.models.registry`), or, for a plain module, its Linear layers."""
    total = {"params": 0, "flops": 0, "nonzero_macs": 0}
    for m in models:
        c = m.cost() if hasattr(m, "cost") else {"params": nonzero_params(m), "flops": submatrix_flops(m),
                                                 "nonzero_macs": nonzero_macs(m)}
        for k in total:
            total[k] += c[k]
    return total


@torch.no_grad()
def predict_logprobs(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """log-softmax of a logits model over ``x`` in batches, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([torch.log_softmax(model(x[i:i + batch_size]), -1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out
