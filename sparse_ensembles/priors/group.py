"""The group sparse prior (GSP) over declared group families."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..structure import GroupFamily, norms
from .base import Prior, _check_positive


class GroupLasso(Prior):
    """Group sparse prior (GSP) of Zhang & Ou 2018, eq. (5):

        -log p(theta) = lam * sum_g sqrt(dim_g) * ||theta_g||_2

    over the declared ``groups``. Its gradient ``lam * sqrt(dim_g) * theta_g / ||theta_g||`` is
    taken as 0 on an all-zero group (the minimal-norm subgradient), so it stays finite there.
    Parameters not in any group get no prior from this object; combine with ``Sum`` if needed.
    """

    def __init__(self, groups: Sequence[GroupFamily], lam: float, eps: float = 1e-12):
        self.groups = list(groups)
        if not self.groups:
            raise ValueError("GroupLasso needs at least one GroupFamily (see model.unit_groups())")
        self.lam = _check_positive("group Lasso lambda", lam)
        self.eps = eps

    def _check(self, params):
        for fam in self.groups:
            for name in fam.params:
                if name not in params:
                    raise KeyError(
                        f"group {fam.name!r} refers to parameter {name!r}, which the sampler "
                        f"does not hold (it holds {sorted(params)[:6]}...); pass "
                        "model.named_parameters() to the sampler so names are known"
                    )

    def neg_log_prob(self, params):
        self._check(params)
        return self.lam * sum(math.sqrt(f.group_dim(params)) * norms(f, params).sum() for f in self.groups)

    def add_grad_(self, grads, params, num_data):
        self._check(params)
        for fam in self.groups:
            size = norms(fam, params)
            coef = self.lam * math.sqrt(fam.group_dim(params)) / num_data
            # theta_g / ||theta_g||, and exactly 0 where the whole group is 0
            scale = torch.where(size > self.eps, coef / size.clamp_min(self.eps), torch.zeros_like(size))
            for name in fam.params:
                if name in grads:
                    p = params[name]
                    grads[name].addcmul_(fam.broadcast(scale, name, p), p)
