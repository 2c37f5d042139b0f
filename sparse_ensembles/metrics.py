"""What users compare: error, NLL, ECE, Brier, nonzero parameters and FLOPs."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


def error(logprobs: Tensor, y: Tensor) -> float:
    """Top-1 test error as a fraction."""
    return float((logprobs.argmax(-1) != y).float().mean())


def nll(logprobs: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood (nats)."""
    return float(-logprobs.gather(1, y[:, None]).mean())


def ece(logprobs: Tensor, y: Tensor, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017): top-1 confidence, ``bins`` equal-width bins
    on [0, 1], L1 gap weighted by the fraction of examples in each bin."""
    conf, pred = logprobs.exp().max(-1)
    correct = (pred == y).float()
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur for a max prob
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    zeros = torch.zeros(bins, dtype=conf.dtype, device=conf.device)  # bins on the data's device
    sum_conf = zeros.index_add(0, idx, conf)
    sum_acc = zeros.index_add(0, idx, correct)
    return float((sum_conf - sum_acc).abs().sum() / len(y))


def brier(logprobs: Tensor, y: Tensor) -> float:
    """Brier score: sum over classes of (p - onehot)^2, averaged over examples (range [0, 2])."""
    p = logprobs.exp()
    onehot = torch.nn.functional.one_hot(y, p.shape[-1]).to(p.dtype)
    return float((p - onehot).pow(2).sum(-1).mean())


def classification_metrics(logprobs: Tensor, y: Tensor) -> dict:
    return {"error": error(logprobs, y), "nll": nll(logprobs, y), "ece": ece(logprobs, y), "brier": brier(logprobs, y)}


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
