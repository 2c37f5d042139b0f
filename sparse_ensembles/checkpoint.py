"""Crash-safe files: every write goes to a temporary name and is renamed into place, so a run
directory never holds a half-written member. Members are stored as a small spec + tensors and
rebuilt without pickled modules (``torch.load(weights_only=True)``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .compact import CompactMLP
from .models import mlp


def atomic_save(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def member_spec(model: nn.Module, sizes=None, activation: str = "relu") -> dict:
    if isinstance(model, CompactMLP):
        return model.spec()
    return {"kind": "mlp", "sizes": list(sizes), "activation": activation}


def save_member(path, model: nn.Module, spec: dict, **meta) -> None:
    atomic_save({"spec": spec, "state_dict": model.state_dict(), "meta": meta}, path)


def build_member(spec: dict, state_dict: dict) -> nn.Module:
    kind = spec.get("kind")
    if kind == "mlp":
        model = mlp(spec["sizes"], spec["activation"])
    elif kind == "compact_mlp":
        model = CompactMLP(spec["in_features"], state_dict["input_index"], spec["widths"], spec["activations"])
    else:
        raise ValueError(f"unknown member kind {kind!r}")
    model.load_state_dict(state_dict)
    return model


def load_member(path) -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from a file written by :func:`save_member`."""
    blob = load(path)
    model = build_member(blob["spec"], blob["state_dict"])
    model.eval()
    return model, blob.get("meta", {})
