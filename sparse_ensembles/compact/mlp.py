"""Ensemble executors for compacted MLP members: :class:`FusedMLPEnsemble` (the members' layers
stacked into batched matmuls) and :class:`SparseMLPEnsemble` (CSR products). The shrinking itself,
:func:`compact_mlp`, belongs to the model kind (:mod:`sparse_ensembles.models.mlp`) and is
re-exported here.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..models.mlp import ACTIVATIONS, CompactMLP, compact_mlp

__all__ = ["CompactMLP", "FusedMLPEnsemble", "SparseMLPEnsemble", "compact_mlp"]

def _shared_layout(members: Sequence[CompactMLP], who: str) -> tuple[list[str], Tensor]:
    """Check that compacted members can run as one network; their activations and the union
    of their live inputs."""
    if not members:
        raise ValueError(f"{who} needs at least one member")
    acts = members[0].activations
    if any(m.activations != acts or len(m.widths) != len(members[0].widths) for m in members):
        raise ValueError(f"{who}: members must share depth and activations")
    if len({m.widths[-1] for m in members}) != 1:
        # padded output units would add mass to the softmax; every member needs all outputs
        raise ValueError(f"{who}: members must have the same number of outputs")
    return acts, torch.unique(torch.cat([m.input_index for m in members]))


class FusedMLPEnsemble(nn.Module):
    """All members of a compacted MLP ensemble evaluated in a handful of batched ops.

    Members are zero-padded to the widest member in each layer (exact: padded units have zero
    weights in and out, and a padded unit's activation of bias 0 is multiplied by a zero column).
    The first layer either reads the union of live inputs with one matmul (members that share
    their pixels), or gathers each member's own inputs and runs a batched matmul (members with
    different pixel sets, e.g. structured ones), whichever multiplies fewer weights.
    Returns ``log mean_m softmax(f_m(x))``.
    """

    def __init__(self, members: Sequence[CompactMLP], gather: Optional[bool] = None):
        super().__init__()
        acts, union = _shared_layout(members, "FusedMLPEnsemble")
        M = len(members)
        depth = len(members[0].layers)
        widths = [max(m.widths[i] for m in members) for i in range(depth + 1)]
        widths[0] = union.numel()
        self.acts = nn.ModuleList(ACTIVATIONS[a]() for a in acts)
        weights, biases = [], []
        for i in range(depth):
            Wi = torch.zeros(M, widths[i + 1], widths[i])
            bi = torch.zeros(M, widths[i + 1])
            for k, m in enumerate(members):
                layer = m.layers[i]
                rows = layer.out_features
                if i == 0:
                    cols = torch.searchsorted(union, m.input_index)
                    Wi[k, :rows, cols] = layer.weight.detach()
                else:
                    Wi[k, :rows, : layer.in_features] = layer.weight.detach()
                bi[k, :rows] = layer.bias.detach()
            weights.append(Wi)
            biases.append(bi)
        k0 = max(m.widths[0] for m in members)
        # first-layer weights multiplied per image: union * M * h1 (shared read) or M * k0 * h1
        # (gathered); gather only when that halves the work: M small batched matmuls run at about
        # half the speed of one large one (2 CPU threads, 18 members of 160 of 278 pixels: the
        # union matmul was faster)
        self.gather = k0 < 0.5 * union.numel() if gather is None else gather
        if self.gather:
            index = torch.zeros(M, k0, dtype=torch.long)
            w0 = torch.zeros(M, k0, widths[1])
            for k, m in enumerate(members):
                n = m.input_index.numel()
                index[k, :n] = m.input_index  # padded slots read pixel 0 through zero weights
                w0[k, :n, : m.layers[0].out_features] = m.layers[0].weight.detach().t()
            self.register_buffer("input_index", index.flatten())
            self.register_buffer("w0", w0)
            self.register_buffer("b0", biases[0].unsqueeze(1))
        else:
            self.register_buffer("input_index", union)
            self.register_buffer("w0", weights[0].reshape(M * widths[1], widths[0]).t().contiguous())
            self.register_buffer("b0", biases[0].reshape(-1))
        self.k0 = k0
        # hidden layers after the first: (M, B, n_in) @ (M, n_in, n_out); the output layer runs
        # transposed, W (M, C, n_in) @ H^T, so the logits come out as (M, C, B) (see forward)
        self.mid_w = nn.ParameterList(nn.Parameter(w.transpose(1, 2).contiguous(), requires_grad=False)
                                      for w in weights[1:-1])
        self.mid_b = nn.ParameterList(nn.Parameter(b.unsqueeze(1), requires_grad=False) for b in biases[1:-1])
        if depth > 1:
            self.register_buffer("out_w", weights[-1])
            self.register_buffer("out_b", biases[-1].unsqueeze(2))
        self.M, self.h1 = M, widths[1]

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1).index_select(1, self.input_index)
        if self.gather:  # x: (B, M * k0), each member's own pixels
            h = torch.baddbmm(self.b0, x.view(-1, self.M, self.k0).transpose(0, 1), self.w0)
        else:
            h = torch.addmm(self.b0, x, self.w0).view(-1, self.M, self.h1).transpose(0, 1)  # (M, B, h1)
        for i, (w, b) in enumerate(zip(self.mid_w, self.mid_b)):
            h = torch.baddbmm(b, self.acts[i](h), w)
        if hasattr(self, "out_w"):
            logits = torch.baddbmm(self.out_b, self.out_w, self.acts[-1](h).transpose(1, 2))  # (M, C, B)
        else:  # a single layer: h already holds the logits
            logits = h.transpose(1, 2)
        # classes on dim 1 with the batch innermost: CPU log_softmax over a short *last* dim
        # (10 classes) is about 10x slower and dominated the whole ensemble's time
        logp = torch.log_softmax(logits, dim=1)
        return (torch.logsumexp(logp, dim=0) - math.log(self.M)).t()


class SparseMLPEnsemble(nn.Module):
    """All members of a compacted MLP ensemble as one block-diagonal *sparse* network.

    Layer ``i`` of the ensemble is ``diag(W_i^(1), ..., W_i^(M))`` stored in CSR (the first layer:
    the members' rows stacked over the union of live inputs), so only nonzero weights are
    multiplied: the cost follows the nonzero multiply-accumulates, not the sub-matrix FLOPs that
    the zero-padded :class:`FusedMLPEnsemble` pays for unstructured sparsity left inside each
    member. Activations run feature-major (features x batch), so every layer is one
    sparse-times-dense product ``W @ H + b`` with no transposes in between.
    Returns ``log mean_m softmax(f_m(x))``, the same function as :class:`FusedMLPEnsemble`.
    """

    def __init__(self, members: Sequence[CompactMLP]):
        super().__init__()
        acts, union = _shared_layout(members, "SparseMLPEnsemble")
        self.register_buffer("input_index", union)
        self.acts = nn.ModuleList(ACTIVATIONS[a]() for a in acts)
        self.M, self.n_out = len(members), members[0].widths[-1]
        self.weights, self.biases = [], []  # CSR tensors are kept as plain attributes (see _apply)
        with torch.no_grad():
            first = torch.zeros(sum(m.widths[1] for m in members), union.numel())
            row = 0
            for m in members:
                w = m.layers[0].weight
                first[row: row + w.shape[0], torch.searchsorted(union, m.input_index)] = w
                row += w.shape[0]
            dense = [first] + [torch.block_diag(*[m.layers[i].weight for m in members])
                               for i in range(1, len(members[0].layers))]
            with warnings.catch_warnings():  # torch flags its CSR support as beta on every construction
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                self.weights = [w.to_sparse_csr() for w in dense]
            self.biases = [torch.cat([m.layers[i].bias for m in members]).unsqueeze(1)
                           for i in range(len(dense))]

    def _apply(self, fn, recurse=True):
        # .to(device) / .double() reach the CSR weights too
        self.weights = [fn(w) for w in self.weights]
        self.biases = [fn(b) for b in self.biases]
        return super()._apply(fn, recurse)

    @property
    def nonzeros(self) -> int:
        return sum(int(w._nnz()) for w in self.weights)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1).index_select(1, self.input_index).t()  # (n_in, B)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.sparse.mm(w, h).add_(b)
            if i < len(self.acts):
                h = self.acts[i](h)
        logp = torch.log_softmax(h.view(self.M, self.n_out, -1), dim=1)
        return (torch.logsumexp(logp, dim=0) - math.log(self.M)).t()
