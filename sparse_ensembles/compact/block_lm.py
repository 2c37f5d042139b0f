"""Block-sparse execution of LSTM language models and of their ensembles.

A block-pruned :class:`~sparse_ensembles.models.LSTMLM` is stored as it was trained: dense-shaped
weights whose pruned blocks are exactly zero (masks are data). :func:`block_sparse_lm` swaps each of
its ``nn.LSTM`` layers for a :class:`~.block_lstm.BlockSparseLSTM` over the *same* Parameter objects,
keeping the blocks that hold any nonzero, so that an optimizer, a sampler or a prior that holds the
model's parameters keeps working, and the compiled time loop skips the zero blocks in the forward
and backward passes. Parameter names do not change (``lstms.0.weight_ih_l0`` ...).

:class:`BlockSparseLMEnsemble` runs M such members one after another and returns
``log mean_m softmax(logits_m)`` (members differ in their block masks, so nothing is fused across
members: each member's LSTM cost is its own nonzero blocks). Each member's softmax reads only the
hidden units whose softmax column holds a nonzero (:class:`NarrowSoftmax`; ``model.softmax_block =
[vocab, 1]`` prunes whole columns), so a column-pruned softmax costs its kept fraction; a softmax
pruned in smaller blocks runs on the compiled block-sparse product where that is faster
(:class:`BlockSparseSoftmax`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._timing import median_ms
from ..models.lstm_lm import LSTMLM
from .block_lstm import BlockSparseLSTM, block_keep_from_weight, block_layout, block_matmul, gather_blocks
from .lstm import _log_mean_softmax

_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def block_sparse_lm(model: LSTMLM, block: Optional[Sequence[int]] = None, executor: str = "auto") -> LSTMLM:
    """``model`` itself, its LSTM layers now :class:`BlockSparseLSTM` over the same Parameters
    (``block`` defaults to ``model.block``); layers that already are keep their executor and get
    their keep masks refreshed from the weights' zero blocks."""
    block = tuple(model.block if block is None else block)
    for l, lstm in enumerate(model.lstms):
        if isinstance(lstm, BlockSparseLSTM):
            if tuple(lstm.block) != block:
                raise ValueError(f"layer {l} is block-sparse with blocks {lstm.block}, not {block}")
            refresh_keep(lstm)
            continue
        with torch.random.fork_rng(devices=[]):  # its throw-away initial weights must not move the global RNG
            layer = BlockSparseLSTM(lstm.input_size, lstm.hidden_size, block, executor=executor)
        for name in _NAMES:  # the same Parameter objects: optimizers and samplers keep holding them
            setattr(layer, name, getattr(lstm, name))
        layer.to(lstm.weight_ih_l0.device)
        refresh_keep(layer)
        layer.train(lstm.training)
        model.lstms[l] = layer
    return model


@contextmanager
def on_block_kernel(model: LSTMLM, executor: str = "auto") -> Iterator[LSTMLM]:
    """Run ``model``'s LSTM layers on the block-sparse kernel inside the ``with`` block (training
    included: forward and backward skip the blocks that are zero when it is entered) and put the
    ``nn.LSTM`` layers back on exit, so that checkpoints and state dicts keep their format. The
    layers share the Parameter objects, so an optimizer built before keeps working. Enter it again
    after pruning changes the masks (the pipeline does so every epoch). numba's threads follow
    torch's inside (``experiment.threads``): the kernel's OpenMP threads wait by spinning, and more
    of them than free cores makes every parallel step wait for a descheduled thread."""
    if not isinstance(model, LSTMLM):
        raise ValueError(f"the block-sparse kernel runs LSTMLM layers, not {type(model).__name__}; "
                         "set experiment.block_kernel = 'off'")
    import numba
    originals, threads = list(model.lstms), numba.get_num_threads()
    try:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        block_sparse_lm(model, executor=executor)
        yield model
    finally:
        for l, lstm in enumerate(originals):
            lstm.train(model.lstms[l].training)  # train() / eval() called inside reached the swapped layer
            model.lstms[l] = lstm
        numba.set_num_threads(threads)


@torch.no_grad()
def refresh_keep(layer: BlockSparseLSTM) -> None:
    """Keep exactly the blocks that hold a nonzero weight (after pruning changed the weights)."""
    layer.keep_ih.copy_(block_keep_from_weight(layer.weight_ih_l0, layer.block))
    layer.keep_hh.copy_(block_keep_from_weight(layer.weight_hh_l0, layer.block))


def block_density(model: LSTMLM) -> float:
    """Fraction of the LSTM weight blocks that are kept (1 - block sparsity)."""
    kept = total = 0
    for lstm in model.lstms:
        for w in (lstm.weight_ih_l0, lstm.weight_hh_l0):
            keep = block_keep_from_weight(w, model.block)
            kept, total = kept + int(keep.sum()), total + keep.numel()
    return kept / max(total, 1)


class NarrowSoftmax(nn.Module):
    """Inference-time softmax layer of a member whose softmax weight has zero columns: logits =
    h[..., cols] @ W[:, cols]^T + b over the kept columns only (equal to the full product, the
    dropped columns being zero). Holds the original Parameters (state dicts keep their keys) and a
    copy of the narrowed weight taken at construction: build it again after the weights change."""

    def __init__(self, decoder: nn.Linear):
        super().__init__()
        self.weight, self.bias = decoder.weight, decoder.bias
        with torch.no_grad():
            cols = decoder.weight.ne(0).any(0).nonzero().flatten()
            self.register_buffer("cols", cols, persistent=False)
            self.register_buffer("narrow", decoder.weight[:, cols].contiguous(), persistent=False)

    @property
    def kept_fraction(self) -> float:
        return self.cols.numel() / self.weight.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.index_select(-1, self.cols), self.narrow, self.bias)


class BlockSparseSoftmax(nn.Module):
    """Inference-time softmax layer of a member whose softmax weight is block-sparse (e.g.
    ``model.softmax_block = [32, 1]``): logits = h @ W^T + b over the kept (bh x bw) blocks only,
    with the compiled block-sparse product of :mod:`.block_lstm` (CPU float32). Holds the original
    Parameters and a copy of the kept blocks taken at construction: build it again after the
    weights change."""

    def __init__(self, decoder: nn.Linear, block):
        super().__init__()
        self.weight, self.bias = decoder.weight, decoder.bias
        keep = block_keep_from_weight(decoder.weight, block)
        self.layout = block_layout(keep, tuple(decoder.weight.shape), block)
        self.data = gather_blocks(self.layout, decoder.weight.detach().float().cpu())

    @property
    def kept_fraction(self) -> float:
        return self.layout.density

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        y = block_matmul(self.layout, self.data, x.reshape(-1, x.shape[-1]), self.bias)
        return y.view(*lead, -1)


def _faster(a: nn.Module, b: nn.Module, x: Tensor, repeats: int = 5) -> nn.Module:
    """The one of two equal layers that runs ``x`` faster (medians of interleaved calls)."""
    with torch.no_grad():
        ms = median_ms({0: lambda: a(x), 1: lambda: b(x)}, repeats)
    return a if ms[0] <= ms[1] else b


def narrow_softmax(model: LSTMLM, min_pruned: float = 0.25, rows: int = 700) -> LSTMLM:
    """``model`` with a cheaper softmax layer, for inference only (training keeps the ``nn.Linear``;
    a tied softmax stays as it is): :class:`NarrowSoftmax` when at least ``min_pruned`` of the
    softmax weight's columns are zero (below that, the gather costs more than it saves); else, when
    the softmax is tiled in blocks (``model.block_softmax``) and at least half of them are zero,
    :class:`BlockSparseSoftmax` if it is faster than the dense product on ``rows`` hidden states
    (timed once, at the current thread count)."""
    decoder = model.decoder
    if isinstance(decoder, (NarrowSoftmax, BlockSparseSoftmax)) or model.tie:
        return model
    weight = decoder.weight.detach()
    zero_columns = float(weight.eq(0).all(0).float().mean())
    if zero_columns >= min_pruned:
        model.decoder = NarrowSoftmax(decoder)
    elif getattr(model, "block_softmax", False) and weight.device.type == "cpu" and weight.dtype == torch.float32:
        block = tuple(model.softmax_block or model.block)
        if float(block_keep_from_weight(weight, block).float().mean()) <= 0.5:
            sparse = BlockSparseSoftmax(decoder, block)
            x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
            model.decoder = _faster(sparse, decoder, x)
    return model


class BlockSparseLMEnsemble(nn.Module):
    """M block-sparse LSTM LMs averaged in probability: ``forward(tokens, state)`` returns the
    ensemble's log-probabilities (B, T, vocab) and the members' states (a list, one per member)."""

    def __init__(self, members: Sequence[LSTMLM], executor: str = "auto"):
        super().__init__()
        if len(members) == 0:
            raise ValueError("BlockSparseLMEnsemble needs at least one member")
        vocab = {m.vocab for m in members}
        if len(vocab) != 1:
            raise ValueError(f"members have different vocabularies {sorted(vocab)}")
        self.members = nn.ModuleList(narrow_softmax(block_sparse_lm(m, executor=executor)).eval() for m in members)

    def init_state(self, batch_size: int) -> list:
        return [m.init_state(batch_size) for m in self.members]

    @torch.no_grad()
    def forward(self, tokens: Tensor, state: Optional[list] = None) -> tuple[Tensor, list]:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time); got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        state = self.init_state(B) if state is None else state
        logits, new_state = [], []
        for m, s in zip(self.members, state):
            out, s = m(tokens, s)
            logits.append(out.reshape(B * T, -1))
            new_state.append(s)
        return _log_mean_softmax(torch.stack(logits)).view(B, T, -1), new_state
