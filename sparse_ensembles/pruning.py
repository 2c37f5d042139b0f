"""Pruning masks. Masks are data: ``dict[name, BoolTensor]`` with True = keep.

``sparsity`` is always the fraction *removed*, in [0, 1]. Mask builders never change the model;
:func:`apply_masks` zeroes the pruned entries and :func:`keep_pruned_at_zero` makes any torch
optimizer leave them at zero during retraining (the samplers take ``masks=`` directly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .structure import GroupFamily, norms

Masks = dict[str, Tensor]


def _check_sparsity(sparsity: float) -> float:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity <= 1.0):
        raise ValueError(f"sparsity is the fraction removed and must lie in [0, 1]; got {sparsity!r}")
    return float(sparsity)


def prunable_weights(model: nn.Module) -> dict[str, Tensor]:
    """The weight matrices (dim >= 2) of a model — biases are never pruned by magnitude."""
    return {n: p for n, p in model.named_parameters() if p.dim() >= 2}


def _keep_largest(scores: Tensor, sparsity: float) -> Tensor:
    """Bool mask keeping the ``round((1 - sparsity) * n)`` largest scores (ties by position)."""
    n = scores.numel()
    n_remove = int(round(sparsity * n))
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_remove > 0:
        keep[torch.argsort(scores.flatten(), stable=True)[:n_remove]] = False
    return keep.view_as(scores)


def magnitude_masks(params: Mapping[str, Tensor], sparsity: float, *, scope: str = "global") -> Masks:
    """Unstructured magnitude pruning: remove the ``sparsity`` fraction of smallest |w|.

    ``scope="global"``: one threshold over all given tensors; ``"layer"``: the same fraction in
    each tensor.
    """
    sparsity = _check_sparsity(sparsity)
    if scope == "layer":
        return {n: _keep_largest(p.detach().abs(), sparsity) for n, p in params.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    names = list(params)
    flat = torch.cat([params[n].detach().abs().flatten() for n in names])
    keep = _keep_largest(flat, sparsity)
    out, start = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = keep[start:start + k].view_as(params[n])
        start += k
    return out


def _keep_by_weight(scores: Sequence[Tensor], sizes: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """One threshold over the groups of all families: remove the lowest-scored groups until
    ``sparsity`` of all their entries are removed (the group that crosses the target is removed
    if that lands closer to it); ties by position."""
    flat, size = torch.cat([s.flatten() for s in scores]), torch.cat([z.flatten() for z in sizes]).double()
    order = torch.argsort(flat, stable=True)
    removed = torch.cumsum(size[order], 0)
    target = sparsity * float(size.sum())
    n = int(torch.searchsorted(removed, torch.tensor(target, dtype=removed.dtype)))  # removed[n-1] < target <= removed[n]
    if n < len(order) and abs(float(removed[n]) - target) < abs(target - (float(removed[n - 1]) if n else 0.0)):
        n += 1
    keep = torch.ones(len(flat), dtype=torch.bool, device=flat.device)
    keep[order[:n]] = False
    return list(keep.split([s.numel() for s in scores]))


def group_masks(params: Mapping[str, Tensor], groups: Sequence[GroupFamily], *,
                sparsity: Optional[float] = None, threshold: Optional[float] = None,
                keep: Optional[Sequence[int]] = None, scope: str = "family") -> Masks:
    """Structured pruning of whole groups (neurons, LSTM units, blocks) by group norm.

    Scores are RMS norms ``||theta_g|| / sqrt(dim_g)`` so families of different group sizes are
    comparable. Exactly one of: remove the ``sparsity`` fraction of groups with the lowest score
    in each family (``scope="family"``), or, with ``scope="global"``, the lowest-scored groups of
    all families together until ``sparsity`` of their entries are gone (so the families' own
    sparsities differ; entries in groups of two families count twice); remove every group whose
    score is below ``threshold``; or ``keep[i]`` groups with the highest scores in family ``i``
    (e.g. the widths of a structured MLP).
    """
    if sum(a is not None for a in (sparsity, threshold, keep)) != 1:
        raise ValueError("group_masks needs exactly one of sparsity=, threshold= or keep=")
    if keep is not None and len(keep) != len(groups):
        raise ValueError(f"keep= gives {len(keep)} group counts for {len(groups)} group families; give one per family")
    if scope not in ("family", "global"):
        raise ValueError(f"group_masks(scope=...) is 'family' or 'global', not {scope!r}")
    scores = [norms(fam, params) / math.sqrt(fam.group_dim(params)) for fam in groups]
    if sparsity is not None and scope == "global":
        sizes = [fam.sq_norms({n: torch.ones_like(params[n]) for n in fam.params}) for fam in groups]
        return keep_masks(params, groups, _keep_by_weight(scores, sizes, _check_sparsity(sparsity)))
    out: Masks = {}
    for i, fam in enumerate(groups):
        score = scores[i]
        if sparsity is not None:
            keep_g = _keep_largest(score, _check_sparsity(sparsity))
        elif keep is not None:
            if not 1 <= keep[i] <= score.numel():
                raise ValueError(f"keep[{i}] = {keep[i]} groups, but family {i} has {score.numel()}; use 1..{score.numel()}")
            keep_g = torch.zeros_like(score, dtype=torch.bool)
            keep_g[torch.argsort(score, descending=True, stable=True)[: keep[i]]] = True
        else:
            keep_g = score >= threshold
        for name in fam.params:
            m = fam.broadcast_keep(keep_g, name, params[name])
            out[name] = out[name] & m if name in out else m.clone()
    return out


def random_group_masks(params: Mapping[str, Tensor], groups: Sequence[GroupFamily], sparsity: float,
                       generator: torch.Generator) -> Masks:
    """Random pre-pruning (block-sparse LSTM slides): in each family, ``round(sparsity * size)``
    groups chosen uniformly at random are removed, whatever the weights; the mask is meant to be
    fixed from the first step."""
    sparsity = _check_sparsity(sparsity)
    keep = []
    for fam in groups:
        k = torch.ones(fam.size, dtype=torch.bool)
        k[torch.randperm(fam.size, generator=generator)[: int(round(sparsity * fam.size))]] = False
        keep.append(k)
    return keep_masks(params, groups, keep)


def group_sparsity(params: Mapping[str, Tensor], groups: Sequence[GroupFamily]) -> float:
    """Fraction of the groups of ``groups`` that are all zero (e.g. the achieved block sparsity)."""
    zero = total = 0
    for fam in groups:
        sq = fam.sq_norms({n: p.detach() for n, p in params.items()})
        zero += int((sq == 0).sum())
        total += sq.numel()
    return zero / max(total, 1)


def keep_masks(params: Mapping[str, Tensor], groups: Sequence[GroupFamily], keep: Sequence[Tensor]) -> Masks:
    """Masks that keep exactly the groups marked True in ``keep[i]`` (one bool vector per family);
    an entry in groups of several families is kept only if all of them keep it."""
    out: Masks = {}
    for fam, k in zip(groups, keep):
        for name in fam.params:
            m = fam.broadcast_keep(k.to(params[name].device), name, params[name])
            out[name] = out[name] & m if name in out else m
    return out


def combine(*mask_sets: Mapping[str, Tensor]) -> Masks:
    """Entry kept only if every mask set that mentions it keeps it."""
    out: Masks = {}
    for masks in mask_sets:
        for n, m in masks.items():
            out[n] = out[n] & m if n in out else m.clone()
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Set pruned entries to exactly zero, in place."""
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in params:
            raise KeyError(f"mask names {n!r}, which is not a parameter of the model")
        params[n].mul_(m.to(params[n].dtype))


def keep_pruned_at_zero(model: nn.Module, masks: Mapping[str, Tensor]) -> list:
    """Zero the gradients of pruned entries with hooks, so SGD/Adam/momentum (with or without
    weight decay) keep masked weights at exactly zero. Returns the hook handles (``.remove()``)."""
    params = dict(model.named_parameters())
    handles = []
    for n, m in masks.items():
        mf = m.to(params[n].dtype)
        handles.append(params[n].register_hook(lambda g, mf=mf: g * mf))
    return handles


def masks_from_zeros(params: Mapping[str, Tensor]) -> Masks:
    return {n: p.detach() != 0 for n, p in params.items()}


def sparsity_of(masks: Mapping[str, Tensor]) -> float:
    """The fraction of masked entries that are pruned; no masks prune nothing (0.0)."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 0.0
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


def _masked(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: p * masks[n] if n in masks else p for n, p in params.items()}


def sse_masks(params: Mapping[str, Tensor], groups: Sequence[GroupFamily], unit_groups: Sequence[GroupFamily],
              prunable: Sequence[str], sparsity: float, *, scope: str = "global", group_threshold: float = 0.0,
              widths: Optional[Sequence[int]] = None, masks: Optional[Mapping[str, Tensor]] = None) -> Masks:
    """The SSE mask policy (Zhang & Ou 2018, extended), a pure function of the weights:

    1. without earlier ``masks``: remove every group of ``groups`` (the prior's grouping) whose RMS
       norm is below ``group_threshold`` (the groups the group prior switched off);
    2. with ``widths``: keep only the ``widths[i]`` strongest groups of ``unit_groups[i]``
       (structured members: neurons, LSTM units);
    3. magnitude-prune the ``prunable`` weights to ``sparsity`` (fraction removed), among what is left.

    Given the ``masks`` of an earlier, lower sparsity, the new mask keeps nothing those removed.
    """
    params = {n: p.detach() for n, p in params.items()}
    if masks is None:
        masks = group_masks(params, groups, threshold=group_threshold) if group_threshold > 0 else {}
    params = _masked(params, masks)
    if widths:
        masks = combine(masks, group_masks(params, unit_groups, keep=widths))
        params = _masked(params, masks)
    return combine(masks, magnitude_masks({n: params[n] for n in prunable}, sparsity, scope=scope))


def cubic_ramp(step: int, start: float, final: float, ramp: int) -> float:
    """Zhu & Gupta 2017's gradual pruning schedule
    ``s_t = s_f + (s_0 - s_f) * (1 - t / ramp) ** 3`` for ``0 <= t <= ramp``, then ``s_f``:
    prune fast while many redundant weights remain, slowly near the target."""
    if ramp <= 0 or step >= ramp:
        return final
    return final + (start - final) * (1.0 - max(step, 0) / ramp) ** 3


def cubic_sparsity(step: int, start: float, final: float, ramp: int) -> float:
    """:func:`cubic_ramp` of a sparsity (a fraction in [0, 1))."""
    return cubic_ramp(step, _check_sparsity(start), _check_sparsity(final), ramp)


def cubic_widths(step: int, start: Sequence[int], final: Sequence[int], ramp: int) -> list[int]:
    """:func:`cubic_ramp` of group counts per family (e.g. layer widths), rounded, never below
    ``final``: structured pruning removes neurons as gradually as the weights go."""
    return [max(f, round(cubic_ramp(step, s, f, ramp))) for s, f in zip(start, final)]


def linear_sparsity(epoch: int, final: float, start: int, ramp: int) -> float:
    """The block-sparse LSTM slides' linear schedule ``rho_t = a (t - 1) + b`` written as a ramp:
    0 before epoch ``start`` (0-based), then ``final * (epoch - start + 1) / ramp``, reaching
    ``final`` after ``ramp`` epochs (a = final / ramp, b = a)."""
    final = _check_sparsity(final)
    if epoch < start:
        return 0.0
    return final if ramp <= 0 else min(final, final * (epoch - start + 1) / ramp)


def gradual_sparsity(step: int, final: float, rate: float, period: int) -> float:
    """Deng et al. 2019's pruning schedule ``s_k = S * (1 - D ** (k / U))``: sparsity ``final`` = S
    approached geometrically, ``rate`` = D in (0, 1), ``period`` = U steps."""
    return _check_sparsity(final) * (1.0 - rate ** (step / period))


@dataclass
class SparsitySchedule:
    """Magnitude pruning while a chain samples (Deng et al. 2019, Algorithm 1): the bottom ``s_k``
    fraction of the covered weights by |w| is pruned, with

        s_k = S * (1 - D ** (k / U))        (S = target, D = decay, U = every; s -> S as k grows)

    per tensor (``scope="layer"``, the authors') or with one global threshold. ``persistent=True``
    fixes the masks in the sampler, so pruned weights stay at zero (their momentum too);
    ``persistent=False`` is the authors' code: the weights are re-zeroed after every step but get
    gradients and noise, so they may regrow. Pass it as ``pruning=`` to SGLD / SGHMC (and the SA
    variants); masks and thresholds are saved in the sampler's ``state_dict``.

    The thresholds (a k-th smallest |w| per tensor, the costly part) are recomputed every
    ``refresh`` steps (0 = every ``U`` steps, when s_k has moved by a factor ``D``); in between,
    persistent masks stay as they are and non-persistent pruning re-zeroes every weight below the
    last threshold (two cheap passes). ``refresh = 1`` follows s_k step by step."""

    target: float
    decay: float = 0.99
    every: float = 50
    scope: str = "layer"
    persistent: bool = True
    names: Optional[list] = None  # the pruned parameters (default: every tensor with dim >= 2)
    refresh: int = 0

    def __post_init__(self):
        _check_sparsity(self.target)
        if not 0 < self.decay < 1 or not self.every > 0:
            raise ValueError(f"SparsitySchedule needs 0 < decay < 1 and every > 0; got {self.decay}, {self.every}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.refresh < 0:
            raise ValueError(f"refresh must be >= 0 (0 = every U steps), got {self.refresh}")
        self.thresholds: dict[str, float] = {}

    def sparsity(self, step: int) -> float:
        """``s_k`` after ``step`` steps."""
        return self.target * (1 - self.decay ** (step / self.every))

    def _thresholds(self, params: Mapping[str, Tensor], sparsity: float) -> dict[str, float]:
        """Per tensor (or one global) |w| below or at which the ``sparsity`` fraction lies."""
        def kth(flat: Tensor) -> float:
            k = int(round(sparsity * flat.numel()))
            return float(flat.kthvalue(k).values) if k > 0 else -1.0
        if self.scope == "layer":
            return {n: kth(p.detach().abs().flatten()) for n, p in params.items()}
        t = kth(torch.cat([p.detach().abs().flatten() for p in params.values()]))
        return {n: t for n in params}

    def apply_(self, sampler, step: int) -> None:
        """Called by the sampler after step ``step`` (0-based), so ``step + 1`` steps are done."""
        params = sampler.named_parameters()
        names = self.names if self.names is not None else [n for n, p in params.items() if p.dim() >= 2]
        done = step + 1
        every = self.refresh or max(1, int(round(self.every)))
        fresh = not self.thresholds or done % every == 0
        if fresh:
            self.thresholds = self._thresholds({n: params[n] for n in names}, self.sparsity(done))
        elif self.persistent:
            return  # the fixed masks keep the pruned weights at zero
        chosen = {n: params[n].abs() > t for n, t in self.thresholds.items()}
        if self.persistent:
            chosen = combine(chosen, {n: m for n, m in sampler.masks.items() if n in chosen})
        sampler.prune_(chosen, fix=self.persistent)

    def state_dict(self) -> dict:
        return {"thresholds": dict(self.thresholds)}

    def load_state_dict(self, state: Mapping) -> None:
        self.thresholds = dict(state["thresholds"])
