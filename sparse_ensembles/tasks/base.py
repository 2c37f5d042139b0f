"""What every task offers the experiment layer, and the streaming ensemble evaluation.

A task owns its data splits (train / valid / test), its training batches, the mean negative
log-likelihood of a batch (with any state carried from one batch to the next, such as an LSTM's
hidden state across BPTT segments), its evaluation streams and its metric columns:

* ``Config``: a dataclass of its settings (the ``[task]`` config section), ``from_config(cfg, device)``;
* ``num_train``: N of the sampler's scaling (training examples, or training tokens);
* ``dims``: what a model kind needs to be built (``{"in_features", "classes"}`` or ``{"vocab"}``);
* ``check_model(model)``: raises ``ValueError`` if the built model does not fit the data;
* ``train_batches(generator)``: one epoch of batches on the task's device;
* ``loss(model, batch, state) -> (mean_nll, state)``;
* ``splits``: the evaluation splits that hold data; ``stream(split)``: an :class:`EnsembleStream`;
* ``columns``: metric names, the first being the headline (``error`` or ``ppl``);
* ``probe(model)``: outputs on a small fixed batch (to check that compaction changed nothing).

Ensembles are evaluated member by member: a stream keeps the running ``logsumexp`` of its members'
log-probabilities (of every class for classification, of the target word only for language
models) and appends the ensemble's metrics after each member, so memory does not grow with the
number of members or with vocabulary x tokens.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..registry import Registry
from ..uncertainty import entropy

TASKS = Registry("task kind")
register_task = TASKS.register
task_class = TASKS.get_class


class EnsembleStream:
    """Running ensemble over one split: ``add(model)`` scores a member and records the metrics of
    the ensemble of all members so far in ``curve``.

    ``score(model) -> Tensor`` gives a member's log-probabilities (any shape, the same every
    time); ``metrics(ensemble_logprobs) -> dict`` turns the ensemble's into numbers. The ensemble
    is ``log mean_m p_m = logsumexp_m log p_m - log M``, accumulated with ``logaddexp``.
    """

    def __init__(self, score: Callable[[nn.Module], Tensor], metrics: Callable[[Tensor], dict],
                 track_entropy: bool = False):
        self._score, self._metrics = score, metrics
        self._sum: Optional[Tensor] = None  # log sum_m p_m
        # sum_m H[p_m] over the last dim (class log-probs only): the members' disagreement (mutual
        # information) is H[mean] - mean_m H[p_m], without keeping the members
        self._entropy_sum: Optional[Tensor] = None if not track_entropy else 0
        self.members = 0
        self.curve: list[dict] = []

    @torch.no_grad()
    def add(self, model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        logp = self._score(model)
        model.train(was_training)
        self._sum = logp if self._sum is None else torch.logaddexp(self._sum, logp)
        if self._entropy_sum is not None:
            self._entropy_sum = self._entropy_sum + entropy(logp)
        self.members += 1
        self.curve.append(self._metrics(self._sum - math.log(self.members)))
        return self.curve[-1]

    @property
    def mean_logp(self) -> Tensor:
        """log of the mean of the members' probabilities."""
        if self._sum is None:
            raise ValueError("no member was added to this stream")
        return self._sum - math.log(self.members)

    @property
    def expected_entropy(self) -> Tensor:
        """mean_m H[p_m] (only for streams made with ``track_entropy=True``)."""
        if self._entropy_sum is None or not self.members:
            raise ValueError("this stream does not track member entropies, or has no member")
        return self._entropy_sum / self.members

    @property
    def result(self) -> dict[str, Any]:
        if not self.curve:
            raise ValueError("no member was added to this stream")
        return self.curve[-1]
