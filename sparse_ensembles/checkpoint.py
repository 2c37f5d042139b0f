"""Crash-safe files: every write goes to a temporary name and is renamed into place, so a run
directory never holds a half-written member. Members are stored as a small spec + tensors (saved
from CPU copies) and rebuilt through the model registry without pickled modules
(``torch.load(weights_only=True)``), onto any device."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from .models import from_spec


def _atomic(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind


def atomic_save(obj, path) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def load(path, device="cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def cpu_state(model: nn.Module) -> dict:
    """The state dict as CPU copies (a checkpoint written on a GPU loads anywhere)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_member(path, model: nn.Module, spec: dict | None = None, **meta) -> None:
    atomic_save({"spec": spec or model.spec(), "state_dict": cpu_state(model), "meta": meta}, path)


def load_member(path, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, meta) from a file written by :func:`save_member`."""
    blob = load(path)
    model = from_spec(blob["spec"], blob["state_dict"]).to(device)
    model.eval()
    return model, blob.get("meta", {})


@contextlib.contextmanager
def claim(lock: Path) -> Iterator[Optional[int]]:
    """Hold an exclusive ``flock`` on the file ``lock`` while the block runs. Yields None when this
    process holds it, or the pid of the process that does (then do nothing). The kernel releases
    the lock when its holder exits or dies, so a crashed run never leaves a stale lock behind; the
    file itself stays (it only carries the holder's pid for the message)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            yield int(text) if text.isdigit() else -1
            return
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
