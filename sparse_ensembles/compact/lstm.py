"""All members of a compacted LSTM language-model ensemble evaluated at once.

ISS-compacted members (``LSTMLM.shrink``) are plain LSTM LMs whose layers have *different* widths
(e.g. [48, 52], [55, 41], ...). Running them one after another costs M times the per-op overhead
of a member, and their average ``log mean_m softmax(logits_m)`` taken as ``logsumexp`` over the
stacked ``log_softmax`` outputs costs two exponentials per member and word. On CPU, stepping one
token at a time, the sequential ensemble of 4 took 3-4x one dense model's time at batch 20 (most of
it the combination, see below).

:class:`FusedLSTMEnsemble` zero-pads every member to the widest member at each layer and runs the
members as one batch over a leading member dimension: one embedding gather, per layer one ``baddbmm``
for the input projection and one per step for the recurrence, the LSTM gate math written out once,
one ``bmm`` for the decoder and one softmax for all members. (Timings quoted in the comments:
1 torch thread on a 2-core Xeon (AVX-512) shared with a training job; medians of interleaved runs.)

Why zero-padding is exact. The padded parameters are zero rows (a padded unit's gate pre-activations)
and zero columns (what reads a padded unit or a padded embedding feature), with zero biases. A padded
unit's gates are then sigmoid(0) = 0.5 and g = tanh(0) = 0, so from a zero state its cell stays
c = 0.5 * c + 0.5 * 0 = 0 and h = 0.5 * tanh(0) = 0; and whatever it held, nothing reads it (its
columns in W_hh, in the next layer's W_ih and in the decoder are zero). The padding costs
multiplications (:meth:`FusedLSTMEnsemble.padded_macs`), not accuracy.

Evaluation only: dropout is not applied (members are used as in ``eval()``), and nothing here is
meant to be trained.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..models.lstm_lm import LSTMLM

FusedState = list[tuple[Tensor, Tensor]]  # per layer (h, c), each (M, B, widest width of the layer)


def _check_members(members: Sequence[LSTMLM]) -> None:
    if len(members) == 0:
        raise ValueError("FusedLSTMEnsemble needs at least one member")
    for i, m in enumerate(members):
        if not isinstance(m, LSTMLM):
            raise ValueError(f"FusedLSTMEnsemble members must be LSTMLM; member {i} is {type(m).__name__}")
    first = members[0]
    for i, m in enumerate(members[1:], 1):
        if m.vocab != first.vocab:
            raise ValueError(f"FusedLSTMEnsemble members must share the vocabulary: member 0 has "
                             f"{first.vocab} words, member {i} has {m.vocab}")
        if len(m.hidden) != len(first.hidden):
            raise ValueError(f"FusedLSTMEnsemble members must have the same number of LSTM layers: member 0 has "
                             f"{len(first.hidden)} ({first.hidden}), member {i} has {len(m.hidden)} ({m.hidden})")


class FusedLSTMEnsemble(nn.Module):
    """``forward(tokens (B, T), state=None) -> (log mean_m softmax(logits_m) (B, T, vocab), state)``.

    Equal, up to float rounding, to running each member on its own with its own carried state and
    averaging the predictive distributions. The state is the members' states zero-padded and
    stacked: per layer ``(h, c)``, each ``(M, B, widths[l])`` (:meth:`init_state`; convert with
    :meth:`member_state` / :meth:`from_member_states`). Members may have different widths per
    layer, untied or tied (SE) embeddings, or a mix of both; they must share the vocabulary and
    the number of layers.
    """

    def __init__(self, members: Sequence[LSTMLM]):
        super().__init__()
        _check_members(members)
        members = list(members)
        ref = members[0].decoder.weight
        dtype, device = ref.dtype, ref.device
        M, L, V = len(members), len(members[0].hidden), members[0].vocab
        self.M, self.vocab = M, V
        self.widths = [max(m.hidden[l] for m in members) for l in range(L)]
        self.emb_width = max(m.emb for m in members)
        self.member_hidden = [list(m.hidden) for m in members]
        self.member_emb = [m.emb for m in members]
        ins = [self.emb_width] + self.widths[:-1]

        def zeros(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        with torch.no_grad():
            emb = zeros(M, V, self.emb_width)
            for k, m in enumerate(members):
                emb[k, :, : m.emb] = m.embedding.weight
            self.register_buffer("embedding", emb)
            # weights stored transposed, (M, in, 4 * width), so that the products are plain
            # (M, N, in) @ (M, in, 4n) bmm's; gates stay in nn.LSTM's order i, f, g, o, each a block
            # of the padded width, a member's units first in each block
            for l, n in enumerate(self.widths):
                w_ih, w_hh, bias = zeros(M, ins[l], 4 * n), zeros(M, n, 4 * n), zeros(M, 1, 4 * n)
                for k, m in enumerate(members):
                    lstm, own = m.lstms[l], m.hidden[l]
                    cols = torch.cat([gate * n + torch.arange(own, device=device) for gate in range(4)])
                    w_ih[k, : lstm.input_size, cols] = lstm.weight_ih_l0.t()
                    w_hh[k, :own, cols] = lstm.weight_hh_l0.t()
                    bias[k, 0, cols] = lstm.bias_ih_l0 + lstm.bias_hh_l0
                self.register_buffer(f"w_ih{l}", w_ih)
                self.register_buffer(f"w_hh{l}", w_hh)
                self.register_buffer(f"bias{l}", bias)
            # the decoder as (M, width + 1, V), its bias the last row, read by a constant-1 input
            # appended to the last layer's output. Why: baddbmm first copies the broadcast bias into
            # the whole (M, B, V) output, an extra pass over 3 MB at batch 20; the extra row measured
            # 0.72 ms against 0.83 ms (M = 4, width 50, V = 10,000, batch 20). And (M, width, V)
            # rather than (M, V, width) read transposed: ~20% faster in bmm, so tied members get a
            # transposed copy of their embedding here rather than a view of the table above.
            dec = zeros(M, self.widths[-1] + 1, V)
            for k, m in enumerate(members):
                dec[k, : m.hidden[-1]] = m.decoder.weight.t()
                dec[k, -1] = m.decoder.bias
            self.register_buffer("decoder", dec)
        self._scratch: tuple = (None, None, None)  # (key, logits, probabilities); see _scratch_for

    def _scratch_for(self, rows: int, like: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Reused (M, rows, V) buffers for the logits and the members' probabilities, or (None, None).

        Why: a fresh 3 MB tensor per step (M = 4, batch 20, V = 10,000) comes from mmap'd memory
        that glibc hands back and forth, ~250 page faults per step: the fused step measured 3.3 ms
        against 1.9 ms with the same memory reused. Only the last shape is kept and only while small
        (<= 2**23 elements each; longer segments allocate as usual). The returned log-probabilities are
        always a fresh tensor; the module is therefore not safe to call from two threads at once."""
        if rows * self.M * self.vocab > 2 ** 23:
            return None, None
        key = (rows, like.dtype, like.device)
        if self._scratch[0] != key:
            self._scratch = (key, like.new_empty(self.M, rows, self.vocab), like.new_empty(self.M, rows, self.vocab))
        return self._scratch[1], self._scratch[2]

    # ----- state ------------------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> FusedState:
        """Zero ``(h, c)`` per layer, each (M, batch_size, widths[l])."""
        z = self.decoder
        return [(z.new_zeros(self.M, batch_size, n), z.new_zeros(self.M, batch_size, n)) for n in self.widths]

    def member_state(self, state: FusedState, k: int) -> list[tuple[Tensor, Tensor]]:
        """Member ``k``'s own state in ``LSTMLM``'s format: per layer (h, c), each (1, B, hidden[l])."""
        return [(h[k:k + 1, :, :n], c[k:k + 1, :, :n]) for (h, c), n in zip(state, self.member_hidden[k])]

    def from_member_states(self, states: Sequence[Sequence[tuple[Tensor, Tensor]]]) -> FusedState:
        """The fused state of the members' own states (``states[k]`` as ``LSTMLM.forward`` returns it)."""
        if len(states) != self.M:
            raise ValueError(f"from_member_states needs {self.M} member states; got {len(states)}")
        batch = states[0][0][0].shape[1]
        fused = self.init_state(batch)
        for k, st in enumerate(states):
            if len(st) != len(self.widths):
                raise ValueError(f"member {k}'s state has {len(st)} layers, the ensemble {len(self.widths)}")
            for (h, c), (H, C), n in zip(st, fused, self.member_hidden[k]):
                H[k, :, :n] = h[0]
                C[k, :, :n] = c[0]
        return fused

    # ----- cost ----------------------------------------------------------------------------------------

    def padded_macs(self) -> dict:
        """Multiply-accumulates per token: ``padded`` (what this module multiplies), ``members`` (the
        members' own weight matrices, i.e. LSTMLM.cost()'s sub-matrix FLOPs / 2 summed over the
        members) and their ratio ``overhead`` (>= 1). The embedding is a lookup and not counted."""
        def macs(emb, hidden):
            ins = [emb] + hidden[:-1]
            return sum(4 * n * (i + n) for i, n in zip(ins, hidden)) + hidden[-1] * self.vocab

        padded = self.M * macs(self.emb_width, self.widths)
        own = sum(macs(e, h) for e, h in zip(self.member_emb, self.member_hidden))
        return {"padded": padded, "members": own, "overhead": padded / own}

    # ----- computation ---------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, state: Optional[FusedState] = None) -> tuple[Tensor, FusedState]:
        """Log-probabilities of the ensemble (B, T, vocab) and the new fused state."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time); got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B)
        elif len(state) != len(self.widths):
            raise ValueError(f"state has {len(state)} layers, the ensemble {len(self.widths)}")
        M = self.M
        x = self.embedding.index_select(1, tokens.reshape(-1))  # (M, B*T, emb), one gather for all members
        new_state = []
        for l, n in enumerate(self.widths):
            h, c = state[l]
            w_hh = getattr(self, f"w_hh{l}")
            # the input projection of all T steps at once; only the recurrence runs step by step.
            # (For T = 1, concatenating [x, h] into one bmm, or a precomputed embedding @ W_ih table
            # for layer 0, measured no faster: at batch 20 the decoder and softmax dominate, at
            # batch 1 the op count is the same.)
            gates_x = torch.baddbmm(getattr(self, f"bias{l}"), x, getattr(self, f"w_ih{l}")).view(M, B, T, 4 * n)
            outputs = []
            for t in range(T):
                gates = torch.baddbmm(gates_x[:, :, t], h, w_hh)
                s = torch.sigmoid(gates)  # all four blocks in one op; the g block's is unused
                g = torch.tanh(gates[..., 2 * n: 3 * n])
                c = torch.addcmul(s[..., n: 2 * n] * c, s[..., :n], g)
                h = s[..., 3 * n:] * torch.tanh(c)
                outputs.append(h)
            x = h if T == 1 else torch.stack(outputs, 2).view(M, B * T, n)
            new_state.append((h, c))
        logits, probs = self._scratch_for(B * T, x)
        x = torch.cat([x, x.new_ones(M, B * T, 1)], -1)  # the 1 that reads the decoder bias
        logits = torch.bmm(x, self.decoder, out=logits)  # (M, B*T, V)
        return _log_mean_softmax(logits, probs).view(B, T, self.vocab), new_state


def _log_mean_softmax(logits: Tensor, probs: Optional[Tensor] = None) -> Tensor:
    """``log mean_m softmax(logits[m])`` over the leading member dimension; (M, N, V) -> (N, V).

    As ``log((1/M, ..., 1/M) @ softmax(logits))``: one exponential per member and word (softmax),
    the mean over members as one (1, M) x (M, N * V) matmul (no separate ``- log M`` pass), then
    one log per word. The textbook ``logsumexp(log_softmax(logits), 0)`` takes a second exponential
    per member and word, and torch's logsumexp over a leading dimension is slow: at M = 4, batch 20,
    V = 10,000 (1 CPU thread) it took 1.8 ms against 0.77 ms, more than the decoder matmul itself.
    (Also measured: ``softmax.sum(0).log() - log M`` 0.79 ms, adds 0.82 ms, exp with a precomputed
    shift and the 1/Z scaling as a bmm 0.73-1.05 ms.)

    Exactness: softmax in float loses relative precision only where a member's probability is
    subnormal, i.e. below ``tiny`` (the smallest normal number), which bounds what each member can
    lose. A word whose *mixture* probability is at least ``tiny * 2**26`` (~8e-31 in float32) is
    therefore exact to rounding (what underflowed is < 2**-26 of it); the rows holding a smaller one (a
    log-probability below about -69 in float32) are recomputed with the logsumexp formula.
    ``probs``, if given, receives the members' softmax (a reused buffer of the logits' shape).
    """
    M, N, V = logits.shape
    probs = torch.softmax(logits, -1, out=probs)
    mix = torch.mm(logits.new_full((1, M), 1.0 / M), probs.view(M, N * V)).view(N, V)
    tiny = torch.finfo(mix.dtype).tiny * 2.0 ** 26
    # amin, not min: 14 us against 43 us over (20, 10000); (mix < tiny).any() took 230 us
    if bool(mix.amin() < tiny):
        rows = (mix.amin(-1) < tiny).nonzero().flatten()
        mix.log_()[rows] = torch.logsumexp(torch.log_softmax(logits[:, rows], -1), 0) - math.log(M)
        return mix
    return mix.log_()
