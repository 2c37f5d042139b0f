"""Crash-safe files: every write goes to a temporary name and is renamed into place, so a run
directory never holds a half-written member. Members are stored as a small spec + tensors (saved
from CPU copies) and rebuilt through the model registry without pickled modules
(``torch.load(weights_only=True)``), onto any device."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from .models import from_spec


RERUN = ("delete it and run the same command again with --resume: the stage that wrote it redoes only "
         "that file, and finished work elsewhere is kept")


class RunFileError(RuntimeError):
    """A file of a run (a member, a training checkpoint, a run directory, a results file) that cannot
    be read. Carries the path, the cause in words and the fix; the CLI prints it as one line."""

    def __init__(self, path, cause: str, fix: str = RERUN):
        self.path, self.cause, self.fix = Path(path), cause, fix
        super().__init__(f"{self.path}: {cause}; {fix}")


def _why(e: BaseException) -> str:
    """torch's and pickle's failures, in words."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        return ("it holds pickled objects or code that a weights-only load refuses (nothing in it was run); "
                "it was not written by sparse_ensembles, or it was replaced")
    if isinstance(e, (EOFError, zipfile.BadZipFile)) or "PytorchStreamReader" in text or "zip archive" in text:
        return "it is truncated or corrupt (not a complete torch archive), e.g. a copy or a disk that failed"
    return f"it cannot be read ({type(e).__name__}: {text.splitlines()[0] if text else 'no detail'})"


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


def load(path, device="cpu", fix: str = RERUN) -> dict:
    """A dict saved by :func:`atomic_save`, read without running pickled code. Any failure is a
    :class:`RunFileError` naming the file, the cause and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(path, "the file is missing" if not path.exists() else "it is not a file", fix)
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise RunFileError(path, _why(e), fix) from None
    if not isinstance(blob, dict):
        raise RunFileError(path, f"it holds a {type(blob).__name__}, not the dict sparse_ensembles writes", fix)
    return blob


def read_json(path, fix: str = RERUN, default=None):
    """The JSON in ``path`` (``default`` if the file does not exist); an unreadable or broken file is a
    :class:`RunFileError`."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunFileError(path, f"it is not valid JSON ({e})", fix) from None


def cpu_state(model: nn.Module) -> dict:
    """The state dict as CPU copies (a checkpoint written on a GPU loads anywhere)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def member_digest(spec: dict, state: dict, meta: dict) -> str:
    """SHA-256 over a member's spec, meta and every tensor's name, dtype, shape and bytes: a member
    file carries it, so a byte that changed after writing is found on loading instead of giving
    silently different weights (torch's archive does not check its own contents)."""
    h = hashlib.sha256(json.dumps([spec, meta], sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_member(path, model: nn.Module, spec: dict | None = None, **meta) -> None:
    spec, state = spec or model.spec(), cpu_state(model)
    atomic_save({"spec": spec, "state_dict": state, "meta": meta, "digest": member_digest(spec, state, meta)}, path)


def load_member(path, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, meta) from a file written by :func:`save_member`."""
    blob = load(path)
    missing = [k for k in ("spec", "state_dict") if k not in blob]
    if missing:
        raise RunFileError(path, f"it is not a member file (no {' or '.join(missing)})")
    if "digest" in blob:  # members written before the digest existed load unchecked
        try:
            same = blob["digest"] == member_digest(blob["spec"], blob["state_dict"], blob.get("meta", {}))
        except Exception:  # a damaged file can hold anything where the tensors should be
            same = False
        if not same:
            raise RunFileError(path, "its contents do not match the digest written with it: the file was changed "
                               "or damaged after it was saved")
    try:
        model = from_spec(blob["spec"], blob["state_dict"])
    except Exception as e:  # an unknown kind, a spec that does not fit its tensors, ...
        raise RunFileError(path, f"its spec and tensors do not build a model ({type(e).__name__}: {e})") from None
    model = model.to(device)
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
