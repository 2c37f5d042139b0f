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
        self._coef_cache = None

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

    def _coefficients(self, params, like: torch.Tensor, num_data: int) -> torch.Tensor:
        """``lam * w_g / N`` for every group of every family, concatenated, computed in float64 and
        rounded once (cached per shape, N, device and dtype)."""
        key = (like.device, like.dtype, num_data, tuple(tuple(params[n].shape) for f in self.groups for n in f.params))
        if self._coef_cache is None or self._coef_cache[0] != key:
            coef = torch.cat([torch.full((f.size,), self.lam * self._weight(f, params) / num_data, dtype=torch.float64)
                              for f in self.groups])
            self._coef_cache = (key, coef.to(device=like.device, dtype=like.dtype))
        return self._coef_cache[1]

    def _factors(self, params, names, num_data) -> dict[str, torch.Tensor]:
        """Per covered parameter in ``names``: ``lam w_g / (N ||theta_g||)`` broadcast to its shape
        (0 on an all-zero group; factors of a parameter in two families summed). Pure, so that
        :meth:`add_grad_chains_` can ``vmap`` it over chains."""
        self._check(params)
        first = params[self.groups[0].params[0]]
        sq = torch.cat([fam.sq_norms(params) for fam in self.groups])
        size = sq.sqrt()
        coef = self._coefficients(params, first, num_data)
        scale = torch.where(size > self.eps, coef / size, 0.0)  # the 0 / 0 of an all-zero group is not taken
        if self.budget is not None:  # inside the budget the hinge is flat: every scale becomes 0
            total = (coef * size).sum() * (num_data / self.lam)
            scale = scale * (total > self.budget)
        factors: dict[str, torch.Tensor] = {}
        for fam, fam_scale in zip(self.groups, scale.split([f.size for f in self.groups])):
            for name in fam.params:
                if name in names:
                    b = fam.broadcast(fam_scale, name, params[name])
                    factors[name] = b if name not in factors else factors[name] + b
        return factors

    def add_grad_(self, grads, params, num_data):
        """Fused: one pass computes every family's group norms (concatenated), one ``where`` the
        per-group scales ``lam w_g / (N ||theta_g||)`` (0 on an all-zero group), and one
        ``_foreach_addcmul_`` adds ``scale * theta`` to every covered gradient. The budget's hinge
        multiplies by ``total > k`` on the device instead of branching on the host, so a step has
        no host sync. Equal to the per-family loop it replaced up to rounding (the coefficient is
        rounded to the parameters' dtype before the division; factors of a parameter in two
        families are summed before the multiply); inside the budget it adds ``0 * theta``, so
        non-finite parameters give a non-finite gradient (which the sampler reports)."""
        self._addcmul_(grads, params, self._factors(params, set(grads), num_data))

    def plus_grad(self, grads, params, num_data):
        """Out of place, as ``clone`` then :meth:`add_grad_` (bit for bit): one ``_foreach_addcmul``
        copies and adds over the covered gradients, one ``_foreach_copy_`` copies the rest, so a
        step makes two multi-tensor kernels where the clones made one kernel per tensor."""
        factors = self._factors(params, set(grads), num_data)
        covered = [n for n in grads if n in factors]
        out = dict(zip(covered, torch._foreach_addcmul([grads[n] for n in covered], [factors[n] for n in covered],
                                                       [params[n] for n in covered])))
        rest = [n for n in grads if n not in factors]
        if rest:
            copies = [torch.empty_like(grads[n]) for n in rest]
            torch._foreach_copy_(copies, [grads[n] for n in rest])
            out.update(zip(rest, copies))
        return {n: out[n] for n in grads}

    def add_grad_chains_(self, grads, params, num_data):
        """Every chain's factors in one ``vmap``-ed computation over the leading chain dimension,
        then one ``_foreach_addcmul_`` over the stacked tensors."""
        names = set(grads)
        factors = torch.func.vmap(lambda p: self._factors(p, names, num_data))(dict(params))
        self._addcmul_(grads, params, factors)

    @staticmethod
    def _addcmul_(grads, params, factors) -> None:
        if factors:
            names = list(factors)
            torch._foreach_addcmul_([grads[n] for n in names], [factors[n] for n in names],
                                    [params[n] for n in names])


class BlockLasso(GroupLasso):
    """The block (group) Lasso of the block-sparse LSTM slides: ``lam * sum_i ||W_i||_2`` over
    weight blocks (no ``sqrt(dim)`` weight), or with ``budget`` k the constraint's hinge
    ``lam * max(sum_i ||W_i||_2 - k, 0)``. ``groups``: block families (:func:`~..structure.block_family`)."""

    def __init__(self, groups: Sequence[GroupFamily], lam: float, budget: Optional[float] = None):
        super().__init__(groups, lam, scaled=False, budget=budget)
