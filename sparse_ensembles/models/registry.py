"""Model kinds, found by name.

A model kind is an ``nn.Module`` class registered with :func:`register`. It owns everything the
experiment layer needs to know about it, so nothing else checks model types:

* ``Config``: a dataclass of its constructor settings (the ``[model]`` config section);
  ``from_config(cfg, dims)`` builds it for a task's ``dims`` (e.g. ``{"in_features": 784,
  "classes": 10}`` or ``{"vocab": 10000}``);
* ``spec()`` / ``from_spec(spec)``: a small dict of plain values that rebuilds the architecture
  (``spec["kind"]`` names the class), so members reload with ``torch.load(weights_only=True)``;
* ``groupings`` and ``groups(grouping)``: the declared group families a group prior and structured
  pruning use; ``unit_groups()``: the families ``shrink`` takes keep vectors for;
* ``prunable_weights()``: the matrices magnitude pruning may touch;
* ``cost()``: nonzero parameters, FLOPs by the SSE paper's sub-matrix rule and nonzero MACs, per
  example (per token for language models); embeddings are not counted; a layer the kind does not
  know raises instead of counting 0;
* ``live_units()`` and ``shrink(keep)``: which units can go without changing the function, and the
  physically smaller model (another registered kind) that computes the same outputs.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from ..registry import Registry

MODELS = Registry("model kind")
register = MODELS.register
model_class = MODELS.get_class


def from_spec(spec: Mapping[str, Any], state_dict: Optional[Mapping] = None) -> nn.Module:
    """Rebuild a model from ``spec`` (and load ``state_dict`` if given)."""
    model = model_class(spec.get("kind", "?")).from_spec(dict(spec))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def unknown_layer(model: nn.Module, module: nn.Module, name: str) -> ValueError:
    return ValueError(
        f"{type(model).__name__}.cost() does not know layer {name!r} ({type(module).__name__}); "
        "count it in the model kind's cost() rather than leave it out"
    )
