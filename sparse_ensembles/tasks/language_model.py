"""Word-level language modelling (Penn Treebank): BPTT training with the hidden state carried
across segments (Zaremba et al. 2014), perplexity = exp(mean NLL per token)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.text import CORPORA, UNKNOWN_MODES, batchify, bptt_segments, load_corpus
from .base import EnsembleStream, register_task


def _detach(state):
    return None if state is None else [(h.detach(), c.detach()) for h, c in state]


def next_word_loss(model: nn.Module, batch, state=None):
    """(mean next-word cross-entropy of a BPTT segment ``(x, y)``, the new state); the incoming state
    is detached, so gradients stop at segment borders."""
    x, y = batch
    logits, state = model(x, _detach(state))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), state


def segment_target_logprobs(model: nn.Module, segments) -> Iterator[Tensor]:
    """log p(y_t) of every target of each segment ``(x, y)`` in turn, (rows, positions), the state carried."""
    state = None
    for x, y in segments:
        logits, state = model(x, state)
        yield torch.log_softmax(logits.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


@register_task("language_model")
class LanguageModel:
    """Each split is one token stream cut into ``batch_size`` contiguous rows (batch-first) and read
    in BPTT segments of ``bptt`` tokens, in order; the model's state flows from one segment to the
    next (detached, so gradients stop at segment borders). A model returns ``(logits, state)``."""

    @dataclass
    class Config:
        dataset: str = "ptb"  # one of sparse_ensembles.data.text.CORPORA ("text" = your own files)
        path: str = ""  # a directory with the corpus files; empty = search (see data.registry)
        unknown: str = "error"  # valid/test words missing from the train vocabulary: error | unk
        batch_size: int = 20  # Zaremba et al.
        bptt: int = 35
        eval_batch_size: int = 10
        train_tokens: int = 0  # use the first n tokens of each split (0 = all); for quick runs
        valid_tokens: int = 0
        test_tokens: int = 0

        def validate(self, need) -> None:
            need(self.dataset in CORPORA, "task.dataset", f"unknown corpus {self.dataset!r}; known: {sorted(CORPORA)}")
            need(self.unknown in UNKNOWN_MODES, "task.unknown", f"use one of {UNKNOWN_MODES}")
            need(self.batch_size >= 1, "task.batch_size", "must be >= 1")
            need(self.eval_batch_size >= 1, "task.eval_batch_size", "must be >= 1")
            need(self.bptt >= 1, "task.bptt", "must be >= 1")
            for key in ("train_tokens", "valid_tokens", "test_tokens"):
                need(getattr(self, key) >= 0, f"task.{key}", "must be >= 0 (0 = all)")

    columns = ("ppl", "nll")

    def __init__(self, splits: dict[str, Tensor], vocab: list[str], *, batch_size: int = 20, bptt: int = 35,
                 eval_batch_size: int = 10, device="cpu", name: str = "corpus"):
        self.device = torch.device(device)
        self.vocab, self.name, self.bptt = vocab, name, bptt
        self.tokens = {s: t for s, t in splits.items()}
        self.batched = {"train": batchify(splits["train"], batch_size).to(self.device)}
        for s in ("valid", "test"):
            if len(splits[s]) > eval_batch_size:
                self.batched[s] = batchify(splits[s], eval_batch_size).to(self.device)
        rows, length = self.batched["train"].shape
        self.num_train = rows * (length - 1)  # predicted tokens per epoch
        self.dims = {"vocab": len(vocab)}

    @classmethod
    def from_config(cls, cfg: "LanguageModel.Config", device="cpu") -> "LanguageModel":
        corpus = load_corpus(cfg.dataset, cfg.path or None, unknown=cfg.unknown)
        limits = {"train": cfg.train_tokens, "valid": cfg.valid_tokens, "test": cfg.test_tokens}
        splits = {s: corpus.split(s)[: n or None] for s, n in limits.items()}
        task = cls(splits, corpus.vocab, batch_size=cfg.batch_size, bptt=cfg.bptt,
                   eval_batch_size=cfg.eval_batch_size, device=device, name=cfg.dataset)
        task.unknown_mapped = dict(corpus.unknown_mapped)
        return task

    def describe(self) -> str:
        sizes = " / ".join(f"{len(self.tokens[s]):,} {s}" for s in ("train", "valid", "test"))
        return f"{self.name}: {sizes} tokens, vocabulary {len(self.vocab):,}"

    def check_model(self, model: nn.Module) -> None:
        x = self.batched["train"][:1, :2]
        try:
            logits, _ = model.to(self.device)(x)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"the model cannot read {self.name} token batches (vocabulary {len(self.vocab)}): {e}") from None
        if logits.shape[-1] != len(self.vocab):
            raise ValueError(f"the model predicts {logits.shape[-1]} words but the {self.name} vocabulary has {len(self.vocab)}")

    # -- training ------------------------------------------------------------------------------
    def train_batches(self, generator: torch.Generator = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Segments in order (the stream is contiguous, so there is nothing to shuffle)."""
        return bptt_segments(self.batched["train"], self.bptt)

    def steps_per_epoch(self) -> int:
        return -(-(self.batched["train"].shape[1] - 1) // self.bptt)

    def loss(self, model: nn.Module, batch, state=None):
        return next_word_loss(model, batch, state)

    # -- distillation (issue 12): the cache's rows are the tokens of each segment, in order -------
    def distill_inputs(self) -> list[Tensor]:
        """The training segments' inputs, in order (the cache carries each member's state)."""
        return [x for x, _ in bptt_segments(self.batched["train"], self.bptt)]

    def distill_batches(self, generator: torch.Generator = None):
        """``(x, y, b)`` in stream order: ``b`` is the segment (``cache.lookup_batch(b)``)."""
        for b, (x, y) in enumerate(bptt_segments(self.batched["train"], self.bptt)):
            yield x, y, b

    def logits(self, model: nn.Module, x: Tensor, state=None):
        return model(x, _detach(state))

    # -- evaluation ----------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return [s for s in ("valid", "test") if s in self.batched]

    def target_logprobs(self, model: nn.Module, split: str) -> Tensor:
        """log p(next word) for every predicted token of ``split``, in stream order (rows x positions)."""
        return torch.cat(list(segment_target_logprobs(model, bptt_segments(self.batched[split], self.bptt))), dim=1)

    def stream(self, split: str) -> EnsembleStream:
        def lm_metrics(logp: Tensor) -> dict:
            nll = float(-logp.double().mean())
            return {"ppl": math.exp(nll), "nll": nll}
        return EnsembleStream(lambda model: self.target_logprobs(model, split), lm_metrics)

    # -- uncertainty (issue 12): next-word calibration and selective prediction ------------------
    @torch.no_grad()
    def top_predictions(self, models: list, split: str = "test") -> tuple[Tensor, Tensor]:
        """For every predicted token of ``split``: the ensemble's top next-word log-probability
        (``log max_w mean_m p_m(w)``) and whether that word is the target. Segment by segment with
        every member's state carried, so memory is one segment's (tokens, vocabulary) mixture."""
        for m in models:
            m.eval()
        states, tops, hits = [None] * len(models), [], []
        for x, y in bptt_segments(self.batched[split], self.bptt):
            total = None
            for i, m in enumerate(models):
                logits, states[i] = m(x, states[i])
                logp = torch.log_softmax(logits.float(), -1)
                total = logp if total is None else torch.logaddexp(total, logp)
            top, word = (total - math.log(len(models))).max(-1)
            tops.append(top.flatten())
            hits.append((word == y).flatten())
        return torch.cat(tops), torch.cat(hits)

    def uncertainty_from_models(self, models: list, split: str = "test") -> tuple[dict, dict]:
        """ECE, AURC and the error at 80% coverage of the next-word predictions, and the
        reliability diagram's bins."""
        from .. import uncertainty as U
        top, correct = self.top_predictions(models, split)
        rel = U.reliability_from_topk(top, correct)
        conf = top.exp()
        return ({"ece": float(rel["ece"]), "word_error": float(1 - correct.float().mean()),
                 "aurc": U.aurc(conf, correct), "error_at_80": U.error_at_coverage(conf, correct, 0.8)}, rel)

    def probe(self, model: nn.Module) -> Tensor:
        with torch.no_grad():
            return model(self.batched["test" if "test" in self.batched else "train"][:, :20])[0]
