"""Feed-forward nets: the SSE paper's 784-300-100-10 MLP, its compacted form, and the shrinking.

:func:`compact_mlp` turns the zeros of an MLP (``nn.Sequential`` of ``Linear`` layers with
elementwise activations between them, an optional leading ``Flatten``, ``Dropout`` anywhere) into
smaller dense layers; it removes

* input features whose outgoing column is all zero (dead pixels),
* hidden neurons that nothing used reads (their outgoing column is zero towards kept neurons),
* hidden neurons that read no live input: their output is the constant ``act(bias)``, which is
  folded exactly into the next layer's bias.

The result computes the same function as the masked model (up to float rounding). It is stored as
widths + plain tensors and rebuilt without pickled modules (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ..structure import GroupFamily, Part, SliceFamily, block_family, sequential_groups
from .registry import register, unknown_layer

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
               "identity": nn.Identity, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}


def check_default_activation(m: nn.Module, where: str) -> str:
    """The name of activation ``m``; a ``ValueError`` if it has non-default arguments (a shrunk
    network rebuilds its activations by name, so ``LeakyReLU(0.3)`` would come back as ``LeakyReLU()``)."""
    name = {cls: n for n, cls in ACTIVATIONS.items()}[type(m)]
    default = ACTIVATIONS[name]()
    if any(getattr(m, k) != getattr(default, k) for k in ("negative_slope", "alpha", "approximate") if hasattr(m, k)):
        raise ValueError(f"{where}: {type(m).__name__} with non-default arguments is not supported (shrunk networks "
                         "rebuild activations by name); use the default or keep the model unshrunk")
    return name


def _linear_cost(model: nn.Module, linears: Sequence[nn.Linear]) -> dict:
    """Nonzero params (weights and biases), sub-matrix FLOPs and nonzero MACs of Linear layers."""
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Flatten, nn.Dropout, nn.ModuleList, nn.Sequential, type(model),
                              *ACTIVATIONS.values())):
            raise unknown_layer(model, m, name)
    params = flops = macs = 0
    for layer in linears:
        nz = layer.weight.detach().ne(0)
        params += int(nz.sum()) + (int(layer.bias.detach().ne(0).sum()) if layer.bias is not None else 0)
        flops += 2 * int(nz.any(1).sum()) * int(nz.any(0).sum())
        macs += int(nz.sum())
    return {"params": params, "flops": flops, "nonzero_macs": macs}


@register("mlp")
class MLP(nn.Sequential):
    """``Flatten -> Linear -> act -> ... -> Linear`` (logits). Group of a neuron = its outgoing
    weights (SSE paper, section 3.2): input pixel ``j`` owns column ``j`` of the first layer."""

    @dataclass
    class Config:
        sizes: list[int] = field(default_factory=lambda: [784, 300, 100, 10])  # input, hidden..., classes
        activation: str = "relu"
        block: list[int] = field(default_factory=lambda: [32, 32])  # (rows, cols) of a block ("block" grouping)

    groupings = ("neurons", "block")

    def __init__(self, sizes: Sequence[int], activation: str = "relu", block: Sequence[int] = (32, 32)):
        if len(sizes) < 2 or any((not isinstance(s, int)) or s < 1 for s in sizes):
            raise ValueError(f"model sizes must be >= 2 positive ints (input, hidden..., classes); got {list(sizes)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.sizes, self.activation = list(sizes), activation
        if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
            raise ValueError(f"mlp block must be two positive ints (rows, cols); got {list(block)!r}")
        self.block = [int(b) for b in block]

    @classmethod
    def from_config(cls, cfg: "MLP.Config", dims: dict) -> "MLP":
        return cls(cfg.sizes, cfg.activation, cfg.block)

    @property
    def in_features(self) -> int:
        return self.sizes[0]

    @property
    def out_features(self) -> int:
        return self.sizes[-1]

    def spec(self) -> dict:
        return {"kind": "mlp", "sizes": list(self.sizes), "activation": self.activation, "block": list(self.block)}

    @classmethod
    def from_spec(cls, spec: dict) -> "MLP":
        return cls(spec["sizes"], spec["activation"], spec.get("block", (32, 32)))

    def groups(self, grouping: str | None = None) -> list[GroupFamily]:
        """``"neurons"`` (default; SSE): each neuron's outgoing weights; ``"block"``: each weight
        matrix tiled in ``block`` = (rows, cols) blocks (smaller at ragged edges)."""
        if grouping not in (None, *self.groupings):
            raise ValueError(f"mlp has groupings {self.groupings}, not {grouping!r}")
        if grouping == "block":
            return [block_family(f"{name}.blocks", name, tuple(p.shape), self.block)
                    for name, p in self.named_parameters() if p.dim() == 2]
        return sequential_groups(self)

    def unit_groups(self) -> list[SliceFamily]:
        return sequential_groups(self)

    def prunable_weights(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.named_parameters() if p.dim() >= 2}

    def cost(self) -> dict:
        return _linear_cost(self, [m for m in self if isinstance(m, nn.Linear)])

    def live_units(self) -> list[Tensor]:
        """Inputs and hidden neurons whose outgoing weights are not all zero."""
        params = dict(self.named_parameters())
        return [fam.sq_norms(params) > 0 for fam in self.unit_groups()]

    @torch.no_grad()
    def shrink(self, keep: Sequence[Tensor]) -> "CompactMLP":
        """Zero the outgoing weights of dropped neurons, then rebuild with smaller dense layers
        (:func:`~sparse_ensembles.compact.compact_mlp` also drops neurons that read nothing, folding
        their constant output into the next bias)."""
        params = dict(self.named_parameters())
        for fam, k in zip(self.unit_groups(), keep):
            for name in fam.params:
                params[name].mul_(fam.broadcast_keep(k.to(params[name].device), name, params[name]))
        return compact_mlp(self)


def mlp(sizes: Sequence[int], activation: str = "relu") -> MLP:
    """The :class:`MLP` of ``sizes`` (kept for code written against the first release)."""
    return MLP(sizes, activation)


@register("compact_mlp")
class CompactMLP(nn.Module):
    """A shrunk MLP: gathers its live input features, then dense Linear layers of reduced width.

    ``widths = [n_live_inputs, h1, ..., n_out]``; ``input_index`` picks live features from the
    flattened input.
    """

    def __init__(self, in_features: int, input_index: Tensor, widths: Sequence[int], activations: Sequence[str]):
        super().__init__()
        self.in_features = in_features
        self.register_buffer("input_index", input_index.to(torch.long))
        self.widths = list(widths)
        self.activations = list(activations)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.acts = nn.ModuleList(ACTIVATIONS[a]() for a in activations)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1).index_select(1, self.input_index)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h

    def spec(self) -> dict:
        return {"kind": "compact_mlp", "in_features": self.in_features, "widths": self.widths,
                "activations": self.activations}

    @classmethod
    def from_spec(cls, spec: dict) -> "CompactMLP":
        # input_index is a buffer of the state dict; only its length is needed here
        index = torch.zeros(spec["widths"][0], dtype=torch.long)
        return cls(spec["in_features"], index, spec["widths"], spec["activations"])

    groupings = ("neurons",)

    def groups(self, grouping: str | None = None) -> list[SliceFamily]:
        return self.unit_groups()

    def unit_groups(self) -> list[SliceFamily]:
        return [SliceFamily("input" if i == 0 else f"hidden{i}", layer.in_features, (Part(f"layers.{i}.weight", 1),))
                for i, layer in enumerate(self.layers)]

    def prunable_weights(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.named_parameters() if p.dim() >= 2}

    def cost(self) -> dict:
        return _linear_cost(self, list(self.layers))


_NAME_OF = {cls: name for name, cls in ACTIVATIONS.items()}


def _mlp_layers(model: nn.Sequential) -> tuple[list[nn.Linear], list[str]]:
    """Linears and the activation name after each hidden layer; rejects anything else."""
    linears, acts = [], []
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            if len(linears) > len(acts):
                acts.append("identity")
            linears.append(m)
        elif isinstance(m, (nn.Flatten, nn.Dropout)):
            if isinstance(m, nn.Flatten) and linears:
                raise ValueError("compact_mlp: nn.Flatten is only supported before the first Linear")
        elif type(m) in _NAME_OF:
            if len(linears) != len(acts) + 1:
                raise ValueError(f"compact_mlp: two activations in a row at position {i}")
            acts.append(check_default_activation(m, f"compact_mlp: position {i}"))
        else:
            raise ValueError(
                f"compact_mlp supports Linear, Flatten, Dropout and {sorted(ACTIVATIONS)}; "
                f"found {type(m).__name__} at position {i}"
            )
    if not linears:
        raise ValueError("compact_mlp: the model has no nn.Linear")
    acts = acts[: len(linears) - 1]
    while len(acts) < len(linears) - 1:
        acts.append("identity")
    return linears, acts


@torch.no_grad()
def compact_mlp(model: nn.Sequential) -> CompactMLP:
    """Shrink a (masked) MLP physically; see the module docstring for what is removed."""
    linears, acts = _mlp_layers(model)
    act_fns = [ACTIVATIONS[a]() for a in acts]
    W = [l.weight.detach().clone() for l in linears]
    b = [l.bias.detach().clone() if l.bias is not None else torch.zeros(l.out_features) for l in linears]
    L = len(W)
    # forward pass: which neurons vary with the input (the rest are constants act(bias))
    variable = [W[0].ne(0).any(dim=0)]  # live input features
    for i in range(L - 1):
        variable.append(W[i][:, variable[i]].ne(0).any(dim=1))
    # fold constant hidden neurons into the next bias
    for i in range(1, L):
        const = ~variable[i]
        if const.any():
            c = act_fns[i - 1](b[i - 1][const])
            b[i] += W[i][:, const] @ c
            W[i][:, const] = 0
    # backward pass: which neurons are read by a used neuron of the next layer
    used = [None] * L + [torch.ones(W[-1].shape[0], dtype=torch.bool)]
    for i in range(L - 1, -1, -1):
        used[i] = W[i][used[i + 1]].ne(0).any(dim=0)
    keep = [variable[i] & used[i] for i in range(L)] + [used[L]]
    widths = [int(k.sum()) for k in keep]
    out = CompactMLP(linears[0].in_features, keep[0].nonzero().flatten(), widths, acts)
    for i, layer in enumerate(out.layers):
        layer.weight.copy_(W[i][keep[i + 1]][:, keep[i]])
        layer.bias.copy_(b[i][keep[i + 1]])
    return out
