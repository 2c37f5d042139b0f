"""Ensembles average predictive *distributions* (never logits or weights):

    log p_ens(y | x) = log mean_m softmax(f_m(x))_y = logsumexp_m log_softmax(f_m(x))_y - log M

so ``F.nll_loss(ensemble(x), y)`` is the ensemble's NLL.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn


def mean_of_probs(logprobs: Tensor) -> Tensor:
    """(M, B, C) member log-probabilities -> (B, C) log of their mean probability."""
    if not logprobs.shape[0]:
        raise ValueError("mean_of_probs: an ensemble of 0 members has no prediction; pass at least one member's "
                         "log-probabilities")
    return torch.logsumexp(logprobs, dim=0) - math.log(logprobs.shape[0])


class Ensemble(nn.Module):
    """An ``nn.Module`` over members that each return logits."""

    def __init__(self, members: Iterable[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("an Ensemble needs at least one member")

    def forward(self, x: Tensor) -> Tensor:
        return mean_of_probs(torch.stack([torch.log_softmax(m(x), dim=-1) for m in self.members]))
