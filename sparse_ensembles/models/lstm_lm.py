"""Word-level LSTM language model (Zaremba, Sutskever & Vinyals 2014) with the group structures of
the SSE paper (Zhang & Ou 2018, arXiv 1803.00184) and of ISS (Wen et al. 2018, ICLR).

Architecture::

    tokens (B, T) -> embedding (V x emb) -> dropout
                  -> lstms[0] -> dropout -> ... -> lstms[L-1] -> dropout
                  -> decoder (Linear hidden[-1] -> V) -> logits (B, T, V)

Each layer is its own single-layer ``nn.LSTM(batch_first=True)`` so that layers may have different
hidden sizes after shrinking; layer ``l``'s parameters are ``lstms.{l}.weight_ih_l0`` (4n x in),
``weight_hh_l0`` (4n x n), ``bias_ih_l0`` and ``bias_hh_l0`` (4n), gates stacked i, f, g, o as in
torch. Dropout sits on the non-recurrent connections only (Zaremba et al.). With shared embeddings
("SE", Press & Wolf 2017; Inan et al. 2017) ``decoder.weight`` *is* ``embedding.weight``; it then
appears once in ``named_parameters()``, as ``embedding.weight``, and ``emb`` must equal
``hidden[-1]``.

Groupings (``groups(grouping)``), for layer ``l`` with n units and input width ``in``:

* ``"untied"`` (SSE): each row and each column of each of the eight gate matrices: per layer four
  :class:`TileFamily` — rows of W_ih (tile ``(1, in)``), gate columns of W_ih (tile ``(n, 1)``), and
  the same for W_hh;
* ``"tied"`` (SSE): each row and each column of the concatenated ``[W_ih, W_hh]`` (4n x (in + n))
  matrix: one row family of size 4n over both matrices, one column family per matrix (a column spans
  all four gates).

  Both SSE groupings are defined on the LSTM weight matrices only: the embedding and the decoder
  get no group prior under them.
* ``"block"`` (block-sparse LSTMs; Narang et al. 2017): W_ih and W_hh of each layer tiled in
  ``block`` = (rows, cols) blocks, one group per block (:meth:`block_groups`); with
  ``block_softmax`` the softmax weight as well.
* ``"iss"`` (Wen et al.): one group per hidden unit k of layer l = its rows in all four gates of
  W_ih and W_hh, its column of W_hh (the entries in both count once) and its column of whatever
  reads it next (the next layer's W_ih, or the softmax weight after the last layer). Without SE,
  embedding feature j is a group of its own: embedding column j and column j of layer 0's W_ih.
  With SE the last layer's unit k owns embedding column k (= softmax column k, the same tensor)
  and column k of layer 0's W_ih, which reads that feature.

Biases belong to no group in any grouping (as in the papers); ``shrink`` still removes the bias
entries of removed units, which nothing reads. The ISS families are also ``unit_groups()``: the keep
vectors ``shrink`` takes and ``live_units`` returns, in the order [input features (without SE)],
layer-0 units, layer-1 units, ...

Presets (Zaremba et al. 2014, Table 1 settings): small = 200 units, no dropout, init 0.1;
medium = 650 units, dropout 0.5, init 0.05; large = 1500 units, dropout 0.65, init 0.04.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..structure import GroupFamily, Part, SliceFamily, TileFamily, block_family
from .registry import register, unknown_layer

# Zaremba et al. 2014: hidden units, dropout probability (1 - keep), uniform init range.
PRESETS = {
    "small": {"hidden": 200, "dropout": 0.0, "init_scale": 0.1},
    "medium": {"hidden": 650, "dropout": 0.5, "init_scale": 0.05},
    "large": {"hidden": 1500, "dropout": 0.65, "init_scale": 0.04},
}

State = list[tuple[Tensor, Tensor]]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"lstm_lm {name} must be a positive int; got {value!r}")
    return value


def _check_dropout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"lstm_lm dropout is a drop probability and must lie in [0, 1); got {value!r}")
    return float(value)


def _nonzero_index(keep: Tensor) -> Tensor:
    return keep.nonzero().flatten()


def _gate_rows(index: Tensor, n: int) -> Tensor:
    """Rows of units ``index`` in all four stacked gates of a (4n x ...) matrix."""
    return torch.cat([gate * n + index for gate in range(4)])


@register("lstm_lm")
class LSTMLM(nn.Module):
    """Word-level LSTM LM; see the module docstring for the architecture and the groupings."""

    @dataclass
    class Config:
        size: str = "small"  # Zaremba preset: small / medium / large
        hidden: int = 0  # units per layer; 0 = the preset's
        layers: int = 2
        dropout: float = -1.0  # drop probability on non-recurrent connections; < 0 = the preset's
        tie_embeddings: bool = False  # shared input/output embeddings (SE)
        init_scale: float = 0.0  # uniform(-s, s) on every weight and bias; 0 = the preset's
        grouping: str = "iss"  # default grouping of groups(): untied / tied / iss / block
        block: list[int] = field(default_factory=lambda: [32, 32])  # (rows, cols) of a block ("block" grouping)
        block_softmax: bool = False  # the "block" grouping also tiles the softmax weight (76% of a small model's)
        # (rows, cols) of the softmax weight's blocks with block_softmax; [] = model.block. [10000, 1]
        # makes whole columns the blocks: pruning them narrows the softmax's input (ISS-like)
        softmax_block: list[int] = field(default_factory=list)

    groupings = ("untied", "tied", "iss", "block")
    stateful = True  # forward(tokens, state) -> (logits, state): batches carry the hidden state (BPTT)

    def __init__(self, vocab: int, hidden: Sequence[int], emb: int, dropout: float = 0.0, tie: bool = False,
                 init_scale: float = 0.1, grouping: str = "iss", block: Sequence[int] = (32, 32),
                 block_softmax: bool = False, softmax_block: Sequence[int] = ()):
        super().__init__()
        self.vocab = _positive_int("vocab", vocab)
        if isinstance(hidden, (int, str)) or len(hidden) < 1:
            raise ValueError(f"lstm_lm hidden must be a non-empty list of per-layer sizes; got {hidden!r}")
        self.hidden = [_positive_int(f"hidden[{l}]", n) for l, n in enumerate(hidden)]
        self.emb = _positive_int("emb", emb)
        self.dropout = _check_dropout(dropout)
        if not isinstance(tie, bool):
            raise ValueError(f"lstm_lm tie must be a bool; got {tie!r}")
        if tie and emb != self.hidden[-1]:
            raise ValueError(f"tied embeddings need emb == hidden[-1]; got emb={emb}, hidden[-1]={self.hidden[-1]}")
        self.tie = tie
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"lstm_lm init_scale must be a positive number; got {init_scale!r}")
        self.init_scale = float(init_scale)
        if grouping not in self.groupings:
            raise ValueError(f"lstm_lm grouping must be one of {self.groupings}; got {grouping!r}")
        self.grouping = grouping
        if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
            raise ValueError(f"lstm_lm block must be two positive ints (rows, cols); got {list(block)!r}")
        self.block = [int(b) for b in block]
        if not isinstance(block_softmax, bool):
            raise ValueError(f"lstm_lm block_softmax must be a bool; got {block_softmax!r}")
        self.block_softmax = block_softmax
        if len(softmax_block) not in (0, 2) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                   for b in softmax_block):
            raise ValueError(f"lstm_lm softmax_block must be [] or two positive ints (rows, cols); got {list(softmax_block)!r}")
        self.softmax_block = [int(b) for b in softmax_block]

        self.embedding = nn.Embedding(self.vocab, self.emb)
        self.drop = nn.Dropout(self.dropout)
        widths = [self.emb] + self.hidden
        self.lstms = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in zip(widths[:-1], widths[1:]))
        self.decoder = nn.Linear(self.hidden[-1], self.vocab)
        if tie:
            self.decoder.weight = self.embedding.weight
        with torch.no_grad():
            for p in self.parameters():  # the shared matrix is drawn once
                p.uniform_(-self.init_scale, self.init_scale)

    # ----- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: "LSTMLM.Config", dims: dict) -> "LSTMLM":
        if "vocab" not in dims:
            raise ValueError(f"lstm_lm needs dims['vocab'] (the vocabulary size); got dims {dims!r}")
        if cfg.size not in PRESETS:
            raise ValueError(f"model.size must be one of {sorted(PRESETS)}; got {cfg.size!r}")
        preset = PRESETS[cfg.size]
        if isinstance(cfg.hidden, bool) or not isinstance(cfg.hidden, int) or cfg.hidden < 0:
            raise ValueError(f"model.hidden must be an int >= 0 (0 = the preset's {preset['hidden']}); got {cfg.hidden!r}")
        if isinstance(cfg.layers, bool) or not isinstance(cfg.layers, int) or cfg.layers < 1:
            raise ValueError(f"model.layers must be an int >= 1; got {cfg.layers!r}")
        if not isinstance(cfg.dropout, (int, float)) or isinstance(cfg.dropout, bool) or cfg.dropout >= 1:
            raise ValueError(f"model.dropout must lie in [0, 1) (< 0 = the preset's {preset['dropout']}); got {cfg.dropout!r}")
        if not isinstance(cfg.init_scale, (int, float)) or isinstance(cfg.init_scale, bool) or cfg.init_scale < 0:
            raise ValueError(f"model.init_scale must be >= 0 (0 = the preset's {preset['init_scale']}); got {cfg.init_scale!r}")
        if cfg.grouping not in cls.groupings:
            raise ValueError(f"model.grouping must be one of {cls.groupings}; got {cfg.grouping!r}")
        if len(cfg.block) != 2 or any(b < 1 for b in cfg.block):
            raise ValueError(f"model.block must be [rows, cols] of a weight block, both >= 1; got {cfg.block!r}")
        if not isinstance(cfg.tie_embeddings, bool):
            raise ValueError(f"model.tie_embeddings must be true or false; got {cfg.tie_embeddings!r}")
        if not isinstance(cfg.block_softmax, bool):
            raise ValueError(f"model.block_softmax must be true or false; got {cfg.block_softmax!r}")
        if len(cfg.softmax_block) not in (0, 2) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                       for b in cfg.softmax_block):
            raise ValueError(f"model.softmax_block must be [] (= model.block) or [rows, cols], both >= 1; "
                             f"got {cfg.softmax_block!r}")
        if cfg.softmax_block and not cfg.block_softmax:
            raise ValueError("model.softmax_block needs model.block_softmax = true (it shapes the softmax's blocks)")
        hidden = cfg.hidden or preset["hidden"]
        dropout = preset["dropout"] if cfg.dropout < 0 else cfg.dropout
        init_scale = cfg.init_scale or preset["init_scale"]
        # Zaremba et al. use the hidden size as the embedding width (required when tied)
        return cls(dims["vocab"], [hidden] * cfg.layers, hidden, dropout, cfg.tie_embeddings, init_scale, cfg.grouping,
                   cfg.block, cfg.block_softmax, cfg.softmax_block)

    def spec(self) -> dict:
        return {"kind": "lstm_lm", "vocab": self.vocab, "hidden": list(self.hidden), "emb": self.emb,
                "dropout": self.dropout, "tie": self.tie, "grouping": self.grouping, "init_scale": self.init_scale,
                "block": list(self.block), "block_softmax": self.block_softmax, "softmax_block": list(self.softmax_block)}

    @classmethod
    def from_spec(cls, spec: dict) -> "LSTMLM":
        return cls(spec["vocab"], spec["hidden"], spec["emb"], spec["dropout"], spec["tie"],
                   spec.get("init_scale", 0.1), spec.get("grouping", "iss"), spec.get("block", (32, 32)),
                   spec.get("block_softmax", False), spec.get("softmax_block", ()))

    # ----- computation ----------------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None) -> State:
        """Zero ``(h, c)`` per layer, each (1, batch_size, n_l)."""
        dtype = self.decoder.bias.dtype
        device = self.decoder.bias.device if device is None else device
        return [(torch.zeros(1, batch_size, n, device=device, dtype=dtype),
                 torch.zeros(1, batch_size, n, device=device, dtype=dtype)) for n in self.hidden]

    def forward(self, tokens: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """Logits (B, T, vocab) and the new per-layer ``(h, c)``; ``state=None`` starts from zeros.
        The caller detaches the returned state between BPTT segments."""
        if state is not None and len(state) != len(self.lstms):
            raise ValueError(f"state has {len(state)} layers, the model {len(self.lstms)}")
        x = self.drop(self.embedding(tokens))
        new_state = []
        for l, lstm in enumerate(self.lstms):
            x, hc = lstm(x, None if state is None else state[l])
            x = self.drop(x)
            new_state.append(hc)
        return self.decoder(x), new_state

    # ----- structure ------------------------------------------------------------------------------

    def _names(self, l: int) -> tuple[str, str]:
        return f"lstms.{l}.weight_ih_l0", f"lstms.{l}.weight_hh_l0"

    @property
    def softmax_name(self) -> str:
        """Name of the softmax weight in ``named_parameters()`` (the embedding when tied)."""
        return "embedding.weight" if self.tie else "decoder.weight"

    def _in_width(self, l: int) -> int:
        return self.emb if l == 0 else self.hidden[l - 1]

    def groups(self, grouping: Optional[str] = None) -> list[GroupFamily]:
        grouping = self.grouping if grouping is None else grouping
        if grouping not in self.groupings:
            raise ValueError(f"lstm_lm has groupings {self.groupings}, not {grouping!r}")
        if grouping == "iss":
            return self.unit_groups()
        if grouping == "block":
            return self.block_groups()
        families: list[GroupFamily] = []
        for l, n in enumerate(self.hidden):
            w_ih, w_hh = self._names(l)
            inp = self._in_width(l)
            if grouping == "untied":
                families += [
                    TileFamily(f"layer{l}.ih_rows", w_ih, (4 * n, inp), (1, inp)),
                    TileFamily(f"layer{l}.ih_cols", w_ih, (4 * n, inp), (n, 1)),
                    TileFamily(f"layer{l}.hh_rows", w_hh, (4 * n, n), (1, n)),
                    TileFamily(f"layer{l}.hh_cols", w_hh, (4 * n, n), (n, 1)),
                ]
            else:  # tied: rows and columns of [W_ih, W_hh]
                families += [
                    SliceFamily(f"layer{l}.rows", 4 * n, (Part(w_ih, 0), Part(w_hh, 0))),
                    SliceFamily(f"layer{l}.ih_cols", inp, (Part(w_ih, 1),)),
                    SliceFamily(f"layer{l}.hh_cols", n, (Part(w_hh, 1),)),
                ]
        return families

    def block_groups(self, block: Optional[Sequence[int]] = None) -> list[TileFamily]:
        """Block-sparse LSTMs: W_ih and W_hh of each layer tiled in ``block`` = (rows, cols) blocks
        (default ``self.block``; smaller blocks at ragged edges), one family per matrix. Blocks
        cut across the four stacked gates' rows as the matrices are stored (torch's i, f, g, o). With
        ``block_softmax`` the softmax weight (vocab x hidden) is tiled too (in ``softmax_block`` blocks if
        set), last: it holds most of a small model's parameters, so without it block-sparse members
        stay near the dense size."""
        block = self.block if block is None else block
        families = []
        for l, n in enumerate(self.hidden):
            w_ih, w_hh = self._names(l)
            families += [block_family(f"layer{l}.ih_blocks", w_ih, (4 * n, self._in_width(l)), block),
                         block_family(f"layer{l}.hh_blocks", w_hh, (4 * n, n), block)]
        if self.block_softmax:
            name = "embedding.weight" if self.tie else "decoder.weight"  # the tied matrix has the embedding's name
            families.append(block_family("softmax_blocks", name, (self.vocab, self.hidden[-1]),
                                         self.softmax_block or block))
        return families

    def unit_groups(self) -> list[SliceFamily]:
        """ISS groups: [input features (without SE)], then the hidden units of each layer."""
        families = []
        if not self.tie:
            families.append(SliceFamily("input", self.emb, (Part("embedding.weight", 1), Part(self._names(0)[0], 1))))
        last = len(self.hidden) - 1
        for l, n in enumerate(self.hidden):
            w_ih, w_hh = self._names(l)
            reader = self._names(l + 1)[0] if l < last else self.softmax_name
            parts = [Part(w_ih, 0, stack=4), Part(w_hh, 0, stack=4), Part(w_hh, 1), Part(reader, 1)]
            if l == last and self.tie:  # the shared matrix's column k is also embedding feature k
                parts.append(Part(self._names(0)[0], 1))
            families.append(SliceFamily(f"layer{l}", n, tuple(parts)))
        return families

    def prunable_weights(self) -> dict[str, Tensor]:
        """The LSTM weight matrices and the softmax weight (not an untied embedding table)."""
        params = dict(self.named_parameters())
        names = [name for l in range(len(self.hidden)) for name in self._names(l)] + [self.softmax_name]
        return {name: params[name] for name in names}

    def cost(self) -> dict:
        """Per token: nonzero parameters (LSTM weights and biases, softmax weight and bias; an untied
        embedding table is a lookup and not counted, the shared SE matrix counts once), FLOPs by the
        SSE sub-matrix rule (2 x live rows x live columns of W_ih, W_hh and the softmax weight) and
        nonzero MACs (nonzeros of those matrices). Gate nonlinearities and bias adds are not FLOPs
        under that rule."""
        for name, m in self.named_modules():
            if m is not self and not isinstance(m, (nn.Embedding, nn.LSTM, nn.Linear, nn.Dropout, nn.ModuleList)):
                raise unknown_layer(self, m, name)
        params = flops = macs = 0
        matrices = [getattr(lstm, w) for lstm in self.lstms for w in ("weight_ih_l0", "weight_hh_l0")]
        for w in matrices + [self.decoder.weight]:
            nz = w.detach().ne(0)
            params += int(nz.sum())
            flops += 2 * int(nz.any(1).sum()) * int(nz.any(0).sum())
            macs += int(nz.sum())
        biases = [getattr(lstm, b) for lstm in self.lstms for b in ("bias_ih_l0", "bias_hh_l0")]
        params += sum(int(b.detach().ne(0).sum()) for b in biases + [self.decoder.bias])
        return {"params": params, "flops": flops, "nonzero_macs": macs}

    # ----- surgery --------------------------------------------------------------------------------

    @torch.no_grad()
    def live_units(self) -> list[Tensor]:
        """Keep vectors aligned with :meth:`unit_groups`: True where removing the unit could change
        the output. Unit k of layer l is dead exactly when nothing reads it: column k of its W_hh
        and column k of the next input matrix (next W_ih, or the softmax weight) are all zero. A unit
        whose own rows are zero is *not* dead if it is read: its cell evolves from the biases. An
        input feature (without SE) is dead when its embedding column or its W_ih_0 column is zero."""
        params = dict(self.named_parameters())

        def col_live(name: str) -> Tensor:
            return params[name].detach().ne(0).any(0)

        keep = []
        if not self.tie:
            keep.append(col_live("embedding.weight") & col_live(self._names(0)[0]))
        for l in range(len(self.hidden)):
            reader = self._names(l + 1)[0] if l + 1 < len(self.hidden) else self.softmax_name
            keep.append(col_live(self._names(l)[1]) | col_live(reader))
        return keep

    @torch.no_grad()
    def shrink(self, keep: Sequence[Tensor]) -> "LSTMLM":
        """A new, physically smaller ``LSTMLM`` holding only the kept units and input features
        (``keep`` aligned with :meth:`unit_groups`). It computes what this model computes with the
        dropped groups' weights zeroed; this model is left unchanged."""
        families = self.unit_groups()
        if len(keep) != len(families):
            raise ValueError(f"shrink needs {len(families)} keep vectors (one per unit_groups() family); got {len(keep)}")
        keep = [torch.as_tensor(k, dtype=torch.bool, device="cpu") for k in keep]
        for fam, k in zip(families, keep):
            if k.shape != (fam.size,):
                raise ValueError(f"keep vector for {fam.name!r} has shape {tuple(k.shape)}, expected ({fam.size},)")
            if not k.any():
                raise ValueError(f"shrink would leave {fam.name!r} with no units; keep at least one")
        units = [_nonzero_index(k) for k in keep[len(keep) - len(self.hidden):]]
        features = units[-1] if self.tie else _nonzero_index(keep[0])
        device = self.decoder.weight.device
        units = [u.to(device) for u in units]
        features = features.to(device)

        small = type(self)(self.vocab, [len(u) for u in units], len(features), self.dropout, self.tie,
                           self.init_scale, self.grouping, self.block, self.block_softmax, self.softmax_block)
        small.to(device=device, dtype=self.decoder.weight.dtype)
        small.embedding.weight.copy_(self.embedding.weight[:, features])
        for l, (big, lstm) in enumerate(zip(self.lstms, small.lstms)):
            rows = _gate_rows(units[l], self.hidden[l])
            cols_in = features if l == 0 else units[l - 1]
            lstm.weight_ih_l0.copy_(big.weight_ih_l0[rows][:, cols_in])
            lstm.weight_hh_l0.copy_(big.weight_hh_l0[rows][:, units[l]])
            lstm.bias_ih_l0.copy_(big.bias_ih_l0[rows])
            lstm.bias_hh_l0.copy_(big.bias_hh_l0[rows])
        if not self.tie:  # tied: the decoder weight is the embedding just copied
            small.decoder.weight.copy_(self.decoder.weight[:, units[-1]])
        small.decoder.bias.copy_(self.decoder.bias)
        small.train(self.training)
        return small
