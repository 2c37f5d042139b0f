"""Distilling an ensemble into one network (issue 12): losses, a truncated teacher-output cache
and teachers (an ensemble, one model, a mixture of two, the members of a finished run's row).

Conventions (see ``docs/distillation.md``):

* every loss takes logits of shape ``(N, C)`` or ``(B, T, V)`` (flattened to rows) and returns the
  mean over rows (examples or tokens);
* ``lam`` weights the *soft* (teacher) term: ``lam * soft + (1 - lam) * CE(labels)``, as in Geras
  et al. (2016). torchdistill's ``KDLoss`` ``alpha`` weights the *hard* term, so ``alpha = 1 - lam``;
* a teacher is ``dense`` (``(N, C)`` probabilities) or ``truncated``: ``(indices (N, K), probs
  (N, K))`` with padding entries ``index = -1, prob = 0`` (:func:`truncate_topk`);
* a teacher object has ``log_probs(x)`` (``(N, C)``, or ``(B, T, V)`` for a language model) and
  ``step(x, state) -> (log_probs, state)`` that carries a language model's hidden state from one
  BPTT segment to the next (``state`` is ``None`` throughout for classifiers).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint

TruncatedTeacher = tuple[Tensor, Tensor]  # (indices (N, K) int64, -1 = padding; probs (N, K), 0 = padding)
TeacherTargets = Union[Tensor, TruncatedTeacher]

CACHE_FORMAT = "sparse_ensembles.teacher_cache"
CACHE_VERSION = 1


# -- losses -------------------------------------------------------------------------------------
def _rows(logits: Tensor) -> Tensor:
    return logits.reshape(-1, logits.shape[-1])


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (the weight of the soft, teacher term) must be in [0, 1]; got {lam}")
    return lam


def _mix(lam: float, soft: Callable[[], Tensor], hard: Callable[[], Tensor]) -> Tensor:
    """``lam * soft + (1 - lam) * hard``; a term whose weight is 0 is not computed at all, so
    ``lam = 0`` returns the hard loss and ``lam = 1`` the soft loss bit for bit."""
    if lam == 0.0:
        return hard()
    if lam == 1.0:
        return soft()
    return lam * soft() + (1.0 - lam) * hard()


def soft_cross_entropy(student_logits: Tensor, teacher_probs: TeacherTargets) -> Tensor:
    """Cross-entropy of the student against the teacher's soft targets, mean over rows:

        L = -(1/N) sum_n sum_c p_teacher(c | x_n) log softmax(z_n)_c

    (Hinton et al. 2015; Geras et al. 2016, the soft term). ``teacher_probs`` is either a dense
    ``(N, C)`` probability tensor (or ``(B, T, V)`` for tokens), or the truncated form
    ``(indices (N, K), probs (N, K))`` of :func:`truncate_topk`, for which only the K gathered
    log-probabilities enter; padding entries (index ``-1``, prob 0) are ignored. The teacher is a
    constant (no gradient flows into it).
    """
    logp = F.log_softmax(_rows(student_logits), dim=-1)
    if isinstance(teacher_probs, (tuple, list)):
        indices, probs = teacher_probs
        indices = indices.reshape(-1, indices.shape[-1]).to(device=logp.device, dtype=torch.long)
        probs = probs.reshape(indices.shape).to(device=logp.device, dtype=logp.dtype).detach()
        if indices.shape[0] != logp.shape[0]:
            raise ValueError(f"the truncated teacher has {indices.shape[0]} rows, the student {logp.shape[0]}")
        valid = indices >= 0
        gathered = logp.gather(1, indices.clamp_min(0))
        terms = torch.where(valid, probs * gathered, torch.zeros((), dtype=logp.dtype, device=logp.device))
        return -terms.sum(-1).mean()
    p = _rows(teacher_probs).to(device=logp.device, dtype=logp.dtype).detach()
    if p.shape != logp.shape:
        raise ValueError(f"teacher probabilities of shape {tuple(teacher_probs.shape)} do not match the student's "
                         f"logits {tuple(student_logits.shape)}")
    return -(p * logp).sum(-1).mean()


def label_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """``F.cross_entropy`` on rows: the hard term (labels ``(N,)`` or ``(B, T)``)."""
    return F.cross_entropy(_rows(student_logits), labels.reshape(-1))


def geras_loss(student_logits: Tensor, labels: Tensor, teacher: TeacherTargets, lam: float) -> Tensor:
    """Geras et al., "Blending LSTMs into CNNs" (ICLR 2016 workshop), eq. for the mixed target:

        L = lam * CE(p_teacher, p_student) + (1 - lam) * CE(y, p_student)

    with ``CE(p, q) = -sum_c p_c log q_c`` (no temperature), mean over rows. ``lam`` weights the
    SOFT (teacher) term. torchdistill's ``KDLoss(alpha=...)`` weights the HARD term, so their
    ``alpha = 1 - lam``. ``teacher`` is dense or truncated (see :func:`soft_cross_entropy`).
    ``lam = 0`` is exactly ``F.cross_entropy(student_logits, labels)`` and ``lam = 1`` exactly
    :func:`soft_cross_entropy` (the zero-weight term is skipped, not multiplied by 0).
    """
    lam = _check_lam(lam)
    return _mix(lam, lambda: soft_cross_entropy(student_logits, teacher),
                lambda: label_cross_entropy(student_logits, labels))


def _kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """mean_n KL(softmax(t_n) || softmax(s_n)), with 0 log 0 = 0."""
    log_q = F.log_softmax(_rows(student_logits), dim=-1)
    log_p = F.log_softmax(_rows(teacher_logits).to(log_q.dtype), dim=-1).detach()
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=log_q.dtype, device=log_q.device))
    return terms.sum(-1).mean()


def hinton_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, tau: float = 4.0,
                lam: float = 0.9, *, alpha_soft: Optional[float] = None) -> Tensor:
    """Hinton, Vinyals & Dean, "Distilling the knowledge in a neural network" (2015):

        soft = tau^2 * (1/N) sum_n KL( softmax(t_n / tau) || softmax(s_n / tau) )
        L    = soft                                       (labels is None)
        L    = lam * soft + (1 - lam) * CE(y, softmax(s))  (labels given; the hard term at tau = 1)

    The gradient of the KL term w.r.t. the student logits is ``(softmax(s/tau) - softmax(t/tau)) /
    tau``, which for large tau is about ``(s - t)_centred / (C tau^2)``: the ``tau^2`` factor keeps
    the soft term's gradient scale comparable across temperatures (and against the hard term).

    ``teacher_logits`` may be any log-scores of the teacher, e.g. an ensemble's log mean
    probabilities (``EnsembleTeacher.log_probs``): softmax is shift invariant per row.
    ``lam`` (alias ``alpha_soft``) weights the SOFT term, as in :func:`geras_loss`;
    torchdistill's ``alpha = 1 - lam`` (and their ``alpha = 0`` / no targets returns the KL
    *without* the ``tau^2`` factor, ours keeps it). ``lam`` is ignored when ``labels`` is None.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    if alpha_soft is not None:
        lam = alpha_soft
    soft = lambda: (tau * tau) * _kl_rows(teacher_logits / tau, student_logits / tau)
    if labels is None:
        return soft()
    return _mix(_check_lam(lam), soft, lambda: label_cross_entropy(student_logits, labels))


def temper(teacher: TeacherTargets, tau: float) -> TeacherTargets:
    """The teacher softened at temperature ``tau``: ``softmax(log p / tau)``, i.e. ``p^(1/tau)``
    renormalised. A truncated teacher is renormalised over its kept classes (the dropped ones stay
    at 0, so with ``mass < 1`` this differs slightly from tempering the full distribution)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    if isinstance(teacher, (tuple, list)):
        indices, probs = teacher
        powered = torch.where(indices >= 0, probs.double().clamp_min(1e-30).pow(1.0 / tau), torch.zeros((), dtype=torch.float64))
        return indices, (powered / powered.sum(-1, keepdim=True)).to(probs.dtype)
    return torch.softmax(teacher.double().clamp_min(1e-30).log() / tau, dim=-1).to(teacher.dtype)


def hinton_cached_loss(student_logits: Tensor, labels: Tensor, teacher: TeacherTargets, lam: float,
                       tau: float) -> Tensor:
    """:func:`hinton_loss` against teacher *probabilities* (the cache stores no logits):

        L = lam * tau^2 * CE(temper(p, tau), softmax(s / tau)) + (1 - lam) * CE(y, softmax(s))

    The cross-entropy differs from Hinton's KL by the tempered teacher's entropy, a constant, so
    the gradients are the same; at ``tau = 1`` this is :func:`geras_loss`."""
    lam = _check_lam(lam)
    if tau == 1.0:
        return geras_loss(student_logits, labels, teacher, lam)
    soft_targets = temper(teacher, tau)
    return _mix(lam, lambda: (tau * tau) * soft_cross_entropy(student_logits / tau, soft_targets),
                lambda: label_cross_entropy(student_logits, labels))


def logit_l2_loss(student_logits: Tensor, teacher_logits: Tensor, center: bool = False) -> Tensor:
    """Logit regression (Ba & Caruana, "Do deep nets really need to be deep?", 2014; Urban et al.,
    "Do deep convolutional nets really need to be deep and convolutional?", 2017):

        L = (1 / (N C)) sum_n sum_c (s_nc - t_nc)^2

    the mean squared difference over all entries (Ba & Caruana write ``1/(2T) sum ||g - z||^2``,
    i.e. this loss times C/2). With ``center=True`` each row of both is first shifted to mean zero
    (``z - mean_c z``): logits are defined only up to a per-row constant, so centring makes the
    loss the same whether the teacher is given as logits or as log-probabilities (an ensemble's
    ``log mean p`` has no logits of its own).
    """
    s, t = _rows(student_logits), _rows(teacher_logits).to(student_logits.dtype).detach()
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if center:
        s = s - s.mean(-1, keepdim=True)
        t = t - t.mean(-1, keepdim=True)
    return (s - t).pow(2).mean()


# -- truncation ---------------------------------------------------------------------------------
@torch.no_grad()
def truncate_topk(probs: Tensor, mass: float = 0.99, max_k: Optional[int] = None,
                  chunk_rows: int = 4096) -> TruncatedTeacher:
    """Keep, per row, the smallest set of most probable classes whose probabilities sum to at least
    ``mass`` (at most ``max_k`` classes; ties broken by ``torch.topk``), renormalised to sum 1.

    ``probs``: ``(..., C)``, flattened to ``(N, C)`` rows. Returns ``(indices, kept)``, both
    ``(N, K)`` with ``K`` = the most classes kept by any row; each row is sorted by decreasing
    probability and padded at its end with ``index = -1, prob = 0`` (which
    :func:`soft_cross_entropy` ignores). ``indices`` is int64, ``kept`` float32 (float64 stays
    float64). The cumulative mass is summed in float64. Where ``max_k`` stops a row before
    ``mass`` it keeps less than ``mass`` (see :func:`truncation_stats`).
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1]; got {mass}")
    C = probs.shape[-1]
    k_cap = C if max_k is None else min(int(max_k), C)
    if k_cap < 1:
        raise ValueError(f"max_k must be >= 1; got {max_k}")
    rows = probs.reshape(-1, C)
    out_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    idx_parts, p_parts, widths = [], [], []
    for i in range(0, rows.shape[0], chunk_rows):
        p = rows[i:i + chunk_rows].to(out_dtype)
        top_p, top_i = torch.topk(p, k_cap, dim=-1, largest=True, sorted=True)
        cum = top_p.double().cumsum(-1)
        keep = (cum < mass).sum(-1) + 1  # the smallest prefix reaching `mass`
        keep = keep.clamp(max=k_cap)
        width = int(keep.max()) if len(keep) else 1
        pos = torch.arange(width, device=p.device)
        valid = pos[None, :] < keep[:, None]
        kept = torch.where(valid, top_p[:, :width], torch.zeros((), dtype=out_dtype, device=p.device))
        kept = kept / kept.sum(-1, keepdim=True)
        idx_parts.append(torch.where(valid, top_i[:, :width], torch.full((), -1, dtype=torch.long, device=p.device)))
        p_parts.append(kept)
        widths.append(width)
    K = max(widths, default=1)
    if not idx_parts:
        return torch.empty(0, K, dtype=torch.long, device=probs.device), torch.empty(0, K, dtype=out_dtype, device=probs.device)
    indices = torch.cat([F.pad(t, (0, K - t.shape[1]), value=-1) for t in idx_parts])
    kept = torch.cat([F.pad(t, (0, K - t.shape[1]), value=0.0) for t in p_parts])
    return indices, kept


def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.int32 if num_classes < 2 ** 31 else torch.int64


@torch.no_grad()
def truncation_stats(probs: Tensor, indices: Tensor, kept_probs: Tensor, prob_dtype: torch.dtype = torch.float32) -> dict:
    """How much a truncation keeps: ``mean_kept`` / ``max_kept`` classes per row, ``mass_kept_mean``
    = the mean over rows of the ORIGINAL probability mass of the kept classes (before
    renormalisation), ``mass_kept_min``, and ``cache_bytes`` = the size of the kept entries in
    :class:`TeacherCache`'s ragged storage (int32 index + ``prob_dtype`` prob per kept entry, plus
    an int64 row offset per row); ``padded_bytes`` = the same as a padded ``(N, K)`` table.
    """
    C = probs.shape[-1]
    rows = probs.reshape(-1, C)
    idx = indices.reshape(-1, indices.shape[-1]).long()
    valid = idx >= 0
    counts = valid.sum(-1)
    mass = torch.where(valid, rows.double().gather(1, idx.clamp_min(0)), torch.zeros((), dtype=torch.float64)).sum(-1)
    entry = torch.empty((), dtype=_index_dtype(C)).element_size() + torch.empty((), dtype=prob_dtype).element_size()
    n = rows.shape[0]
    return {"mean_kept": float(counts.double().mean()) if n else 0.0, "max_kept": int(counts.max()) if n else 0,
            "mass_kept_mean": float(mass.mean()) if n else 1.0, "mass_kept_min": float(mass.min()) if n else 1.0,
            "cache_bytes": int(counts.sum()) * entry + 8 * (n + 1), "padded_bytes": idx.numel() * entry,
            "dense_bytes": rows.numel() * torch.empty((), dtype=prob_dtype).element_size()}


@torch.no_grad()
def truncation_accuracy_cost(full_probs: Tensor, labels: Tensor, indices: Tensor, kept: Tensor,
                             eps: float = 1e-8) -> dict:
    """The teacher's accuracy and NLL on ``labels`` before and after truncation.

    The argmax is the first kept class, so accuracy is unchanged (up to ties). The NLL changes:
    renormalisation raises the kept probabilities (NLL falls) and a label outside the kept set has
    probability 0 (infinite NLL), so the truncated NLL floors the label's probability at ``eps``;
    ``label_dropped`` is the fraction of rows whose label was truncated away.
    Returns ``acc_full, acc_truncated, nll_full, nll_truncated, acc_diff, nll_diff (truncated -
    full), label_dropped``.
    """
    C = full_probs.shape[-1]
    p = full_probs.reshape(-1, C).double()
    y = labels.reshape(-1).long().to(p.device)
    idx = indices.reshape(-1, indices.shape[-1]).long().to(p.device)
    q = kept.reshape(idx.shape).double().to(p.device)
    acc_full = float((p.argmax(-1) == y).double().mean())
    acc_trunc = float((idx[:, 0] == y).double().mean())
    nll_full = float(-p.gather(1, y[:, None]).squeeze(1).clamp_min(eps).log().mean())
    hit = (idx == y[:, None]) & (idx >= 0)
    q_label = torch.where(hit, q, torch.zeros((), dtype=q.dtype)).sum(-1)
    nll_trunc = float(-q_label.clamp_min(eps).log().mean())
    return {"acc_full": acc_full, "acc_truncated": acc_trunc, "acc_diff": acc_trunc - acc_full,
            "nll_full": nll_full, "nll_truncated": nll_trunc, "nll_diff": nll_trunc - nll_full,
            "label_dropped": float((~hit.any(-1)).double().mean())}


# -- teachers -----------------------------------------------------------------------------------
class Teacher(Protocol):
    """Anything with ``log_probs(x)``: log-probabilities ``(N, C)`` (``(B, T, V)`` for a
    language model, from a zero state). The teachers here also have ``step(x, state) ->
    (log_probs, state)`` for BPTT segments read in order."""

    def log_probs(self, x: Tensor) -> Tensor: ...


def _forward(model: nn.Module, x: Tensor, state=None) -> tuple[Tensor, Any]:
    """(logits, state) of a classifier (``forward(x) -> logits``, state stays None) or a language
    model (``forward(tokens, state) -> (logits, state)``)."""
    out = model(x) if state is None else model(x, state)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


class _Base:
    def log_probs(self, x: Tensor) -> Tensor:
        return self.step(x, None)[0]

    def lm_log_probs(self, tokens: Tensor, state=None):
        """``(log_probs (B, T, V), state)`` for one BPTT segment; pass the returned state with the
        next segment (``None`` = zeros)."""
        return self.step(tokens, state)

    def step(self, x: Tensor, state=None):  # pragma: no cover - abstract
        raise NotImplementedError


def _member_step(model: nn.Module, x: Tensor, state) -> tuple[Tensor, Any]:
    was = model.training
    model.eval()
    try:
        logits, state = _forward(model, x, state)
    finally:
        model.train(was)
    return F.log_softmax(logits.float(), dim=-1), state


class ModelTeacher(_Base):
    """One network as the teacher: ``log_softmax(model(x))`` in eval mode, without gradients."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def step(self, x: Tensor, state=None):
        return _member_step(self.model, x, state)


class EnsembleTeacher(_Base):
    """The mean of the members' predictive distributions, in log space:

        log p(c | x) = logsumexp_m log softmax(f_m(x))_c - log M

    accumulated member by member with ``logaddexp`` (no ``(M, N, C)`` stack). For language models
    the state is a list with one hidden state per member."""

    def __init__(self, models: Sequence[nn.Module]):
        self.models = list(models)
        if not self.models:
            raise ValueError("an ensemble teacher needs at least one member")

    def __len__(self) -> int:
        return len(self.models)

    @torch.no_grad()
    def step(self, x: Tensor, state=None):
        states = list(state) if state is not None else [None] * len(self.models)
        total, new_states = None, []
        for model, s in zip(self.models, states):
            logp, s = _member_step(model, x, s)
            total = logp if total is None else torch.logaddexp(total, logp)
            new_states.append(s)
        return total - math.log(len(self.models)), new_states


class MixtureTeacher(_Base):
    """``p = gamma p_A + (1 - gamma) p_B`` for two teachers of any kinds (e.g. an MLP ensemble and
    a CNN), in log space; ``gamma = 1`` is A alone and ``gamma = 0`` B alone, exactly. State =
    ``(state_A, state_B)``."""

    def __init__(self, a, b, gamma: float):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1]; got {gamma}")
        self.a, self.b, self.gamma = a, b, float(gamma)

    @staticmethod
    def _step(teacher, x, state):
        if hasattr(teacher, "step"):
            return teacher.step(x, state)
        return teacher.log_probs(x), None

    @torch.no_grad()
    def step(self, x: Tensor, state=None):
        sa, sb = state if state is not None else (None, None)
        if self.gamma == 1.0:
            la, sa = self._step(self.a, x, sa)
            return la, (sa, sb)
        if self.gamma == 0.0:
            lb, sb = self._step(self.b, x, sb)
            return lb, (sa, sb)
        la, sa = self._step(self.a, x, sa)
        lb, sb = self._step(self.b, x, sb)
        return torch.logaddexp(la + math.log(self.gamma), lb.to(la.dtype) + math.log1p(-self.gamma)), (sa, sb)


# -- the cache ----------------------------------------------------------------------------------
def _batches(data, batch_size: int) -> list[Tensor]:
    """The inputs of each batch, in order: ``data`` is a tensor of inputs (cut into ``batch_size``
    rows) or an iterable of batches (a tensor ``x`` or a tuple ``(x, y, ...)``)."""
    if isinstance(data, Tensor):
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    return [b[0] if isinstance(b, (tuple, list)) else b for b in data]


def _as_member(m, device) -> nn.Module:
    if isinstance(m, nn.Module):
        return m
    if callable(m):
        return m()
    return checkpoint.load_member(m, device)[0]


class TeacherCache:
    """A teacher's truncated predictive distribution over a fixed, ordered dataset.

    Rows are the dataset's examples in order (for token batches ``(B, T)``, each batch's tokens
    in ``x.reshape(-1)`` order, batch after batch). Stored ragged: ``indices`` (int32 when the
    number of classes is < 2^31) and ``probs`` (``prob_dtype``, float32 by default) hold the kept
    entries of all rows one after another, row ``r`` being ``offsets[r]:offsets[r + 1]``;
    ``batch_starts[b]`` is the first row of batch ``b``. :meth:`lookup` returns the padded
    ``(indices int64, probs float32)`` form of :func:`truncate_topk`.
    """

    def __init__(self, indices: Tensor, probs: Tensor, offsets: Tensor, num_classes: int,
                 batch_starts: Optional[Tensor] = None, meta: Optional[dict] = None):
        self.indices, self.probs, self.offsets = indices, probs, offsets.long()
        self.num_classes = int(num_classes)
        n = len(self.offsets) - 1
        self.batch_starts = (batch_starts if batch_starts is not None else torch.tensor([0, n])).long()
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.probs, self.offsets, self.batch_starts))

    # building
    @classmethod
    def from_truncated(cls, indices: Tensor, kept: Tensor, num_classes: int, prob_dtype=torch.float32,
                       meta: Optional[dict] = None) -> "TeacherCache":
        """A cache of the output of :func:`truncate_topk` (one batch holding every row)."""
        return cls._from_parts([(indices, kept)], [indices.shape[0]], num_classes, prob_dtype, meta or {})

    @classmethod
    def _from_parts(cls, parts: list[TruncatedTeacher], rows_per_batch: list[int], num_classes: int, prob_dtype,
                    meta: dict) -> "TeacherCache":
        idx, prob, counts = [], [], []
        for indices, kept in parts:
            valid = indices >= 0
            idx.append(indices[valid].cpu().to(_index_dtype(num_classes)))
            prob.append(kept[valid].cpu().to(prob_dtype))
            counts.append(valid.sum(-1).cpu())
        counts = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
        offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        starts = torch.zeros(len(rows_per_batch) + 1, dtype=torch.long)
        starts[1:] = torch.tensor(rows_per_batch, dtype=torch.long).cumsum(0)
        index_dtype = _index_dtype(num_classes)
        return cls(torch.cat(idx) if idx else torch.zeros(0, dtype=index_dtype),
                   torch.cat(prob) if prob else torch.zeros(0, dtype=prob_dtype), offsets, num_classes, starts, meta)

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, teacher, data, *, mass: float = 0.99, max_k: Optional[int] = None, batch_size: int = 1000,
                     carry_state: bool = True, prob_dtype=torch.float32, device=None) -> "TeacherCache":
        """Run ``teacher`` (all of it in memory) over ``data`` batch by batch, truncating each batch.
        With ``carry_state`` a language-model teacher's state flows from one batch to the next
        (BPTT segments of one stream, in order)."""
        parts, rows, state, C = [], [], None, 0
        for x in _batches(data, batch_size):
            x = x.to(device) if device is not None else x
            if hasattr(teacher, "step"):
                logp, new_state = teacher.step(x, state if carry_state else None)
                state = new_state if carry_state else None
            else:
                logp = teacher.log_probs(x)
            C = logp.shape[-1]
            parts.append(truncate_topk(logp.exp(), mass, max_k))
            rows.append(parts[-1][0].shape[0])
        meta = {"mass": float(mass), "max_k": int(max_k or 0), "members": int(len(teacher)) if hasattr(teacher, "__len__") else 1}
        return cls._from_parts(parts, rows, C, prob_dtype, meta)

    @classmethod
    @torch.no_grad()
    def from_members(cls, members: Sequence, data, *, mass: float = 0.99, max_k: Optional[int] = None,
                     batch_size: int = 1000, chunk_batches: Optional[int] = None, carry_state: bool = True,
                     prob_dtype=torch.float32, device="cpu") -> "TeacherCache":
        """An ensemble teacher streamed one member at a time (like ``EnsembleStream``): ``members``
        are member files (loaded with ``checkpoint.load_member``), modules, or callables returning
        a module. The running ``logsumexp`` of the members' log-probabilities is kept for
        ``chunk_batches`` batches at a time (default: all), so memory is one member plus a dense
        ``(rows of the chunk, C)`` buffer; with chunks every member is loaded once per chunk, and
        a language model's per-member state is carried across chunks."""
        members = list(members)
        if not members:
            raise ValueError("no members to stream")
        batches = [x.to(device) for x in _batches(data, batch_size)]
        chunk = chunk_batches or max(len(batches), 1)
        states: list = [None] * len(members)
        parts, rows, C = [], [], 0
        for start in range(0, len(batches), chunk):
            block = batches[start:start + chunk]
            total = None
            for m, spec in enumerate(members):
                model = _as_member(spec, device)
                outs, s = [], states[m]
                for x in block:
                    logp, s2 = _member_step(model, x, s if carry_state else None)
                    s = s2 if carry_state else None
                    outs.append(logp.reshape(-1, logp.shape[-1]))
                states[m] = s
                if m == 0:
                    rows += [len(o) for o in outs]
                logp = torch.cat(outs)
                total = logp if total is None else torch.logaddexp(total, logp)
                del model, outs, logp
            C = total.shape[-1]
            probs = (total - math.log(len(members))).exp()
            parts.append(truncate_topk(probs, mass, max_k))
            del total, probs
        meta = {"mass": float(mass), "max_k": int(max_k or 0), "members": len(members)}
        return cls._from_parts(parts, rows, C, prob_dtype, meta)

    # reading
    def lookup(self, row_indices) -> TruncatedTeacher:
        """The truncated teacher rows ``row_indices`` (a tensor or sequence of dataset row indices):
        ``(indices (n, K) int64, probs (n, K) float32)`` padded with ``-1 / 0`` to the widest of
        these rows, ready for :func:`soft_cross_entropy`."""
        rows = torch.as_tensor(row_indices, dtype=torch.long).reshape(-1).cpu()
        starts, counts = self.offsets[rows], self.counts[rows]
        K = max(int(counts.max()) if len(rows) else 1, 1)
        if len(self.indices) == 0:
            return torch.full((len(rows), K), -1, dtype=torch.long), torch.zeros(len(rows), K)
        pos = torch.arange(K)
        valid = pos[None, :] < counts[:, None]
        flat = (starts[:, None] + pos[None, :]).clamp(max=len(self.indices) - 1)
        idx = torch.where(valid, self.indices[flat].long(), torch.full((), -1, dtype=torch.long))
        prob = torch.where(valid, self.probs[flat].float(), torch.zeros(()))
        return idx, prob

    def lookup_batch(self, b: int) -> TruncatedTeacher:
        """The rows of batch ``b`` of the dataset the cache was built over (e.g. BPTT segment b)."""
        return self.lookup(torch.arange(int(self.batch_starts[b]), int(self.batch_starts[b + 1])))

    def dense(self, row_indices=None) -> Tensor:
        """Rows as dense ``(n, C)`` float32 probabilities (for checks; large for a vocabulary)."""
        rows = torch.arange(len(self)) if row_indices is None else row_indices
        idx, prob = self.lookup(rows)
        out = torch.zeros(idx.shape[0], self.num_classes)
        return out.scatter_add_(1, idx.clamp_min(0), prob)

    # files
    def state_dict(self) -> dict:
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "num_classes": self.num_classes,
                "indices": self.indices, "probs": self.probs, "offsets": self.offsets,
                "batch_starts": self.batch_starts, "meta": self.meta}

    def save(self, path) -> None:
        """Written atomically (``checkpoint.atomic_save``); read back with :meth:`load`."""
        checkpoint.atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path) -> "TeacherCache":
        blob = checkpoint.load(path)
        if blob.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} is not a teacher cache (format {blob.get('format')!r})")
        if blob.get("version") != CACHE_VERSION:
            raise ValueError(f"{path}: teacher cache version {blob.get('version')}, this code reads {CACHE_VERSION}")
        return cls(blob["indices"], blob["probs"], blob["offsets"], blob["num_classes"], blob["batch_starts"],
                   blob.get("meta", {}))
