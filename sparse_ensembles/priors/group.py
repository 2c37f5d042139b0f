"""The group sparse prior (GSP) over declared group families, and the block Lasso."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..structure import GroupFamily, norms
from .base import Prior, _check_positive


class GroupLasso(Prior):
    """Group sparse prior (GSP) of Zhang & Ou 2018, eq. (5):

        -log p(theta) = lam * sum_g sqrt(dim_g) * ||theta_g||_2

    over the declared ``groups`` (``scaled=False`` drops the ``sqrt(dim_g)``). With a ``budget``
    k it is the hinge of the constraint "sum_g ||theta_g|| <= k" (block-sparse LSTM slides):

        -log p(theta) = lam * max(sum_g sqrt(dim_g) ||theta_g||_2 - k, 0)

    which pulls on no group while the total norm is within the budget. The gradient
    ``lam * sqrt(dim_g) * theta_g / ||theta_g||`` is taken as 0 on an all-zero group (the
    minimal-norm subgradient), so it stays finite there. Parameters not in any group get no prior
    from this object; combine with ``Sum`` if needed.
    """

    def __init__(self, groups: Sequence[GroupFamily], lam: float, eps: float = 1e-12, *, scaled: bool = True,
                 budget: Optional[float] = None):
        self.groups = list(groups)
        if not self.groups:
            raise ValueError("GroupLasso needs at least one GroupFamily (see model.unit_groups())")
        self.lam = _check_positive("group Lasso lambda", lam)
        self.eps = eps
        self.scaled = bool(scaled)
        self.budget = None if budget is None else _check_positive("group Lasso budget k", budget)

    def _check(self, params):
        for fam in self.groups:
            for name in fam.params:
                if name not in params:
                    raise KeyError(
                        f"group {fam.name!r} refers to parameter {name!r}, which the sampler "
                        f"does not hold (it holds {sorted(params)[:6]}...); pass "
                        "model.named_parameters() to the sampler so names are known"
                    )

    def _weight(self, fam, params) -> float:
        return math.sqrt(fam.group_dim(params)) if self.scaled else 1.0

    def total_norm(self, params) -> torch.Tensor:
        """``sum_g w_g ||theta_g||`` (``w_g = sqrt(dim_g)`` or 1): the quantity the budget bounds."""
        self._check(params)
        return sum(self._weight(f, params) * norms(f, params).sum() for f in self.groups)

    def neg_log_prob(self, params):
        total = self.total_norm(params)
        return self.lam * (total if self.budget is None else (total - self.budget).clamp_min(0))

    def add_grad_(self, grads, params, num_data):
        self._check(params)
        if self.budget is not None and float(self.total_norm(params)) <= self.budget:
            return  # inside the budget the hinge is flat
        for fam in self.groups:
            size = norms(fam, params)
            coef = self.lam * self._weight(fam, params) / num_data
            # theta_g / ||theta_g||, and exactly 0 where the whole group is 0
            scale = torch.where(size > self.eps, coef / size.clamp_min(self.eps), torch.zeros_like(size))
            for name in fam.params:
                if name in grads:
                    p = params[name]
                    grads[name].addcmul_(fam.broadcast(scale, name, p), p)


class BlockLasso(GroupLasso):
    """The block (group) Lasso of the block-sparse LSTM slides: ``lam * sum_i ||W_i||_2`` over
    weight blocks (no ``sqrt(dim)`` weight), or with ``budget`` k the constraint's hinge
    ``lam * max(sum_i ||W_i||_2 - k, 0)``. ``groups``: block families (:func:`~..structure.block_family`)."""

    def __init__(self, groups: Sequence[GroupFamily], lam: float, budget: Optional[float] = None):
        super().__init__(groups, lam, scaled=False, budget=budget)
