"""Where datasets live and how they are verified.

A dataset ``name`` is looked up, in order, at

1. the path given in the config (``task.path``),
2. ``$SPARSE_ENSEMBLES_DATA/<name>``,
3. ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist`` installs there),
4. the user cache, ``$XDG_CACHE_HOME/sparse_ensembles/<name>`` (default ``~/.cache/...``).

Every file is checked (IDX magic and shape, and the sha256 of the uncompressed bytes where known).
:func:`download` is opt-in: it fetches from the canonical mirror into the cache and verifies.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import DataError
from .idx import read_bytes, read_idx


@dataclass(frozen=True)
class IdxDataset:
    name: str
    files: dict  # role -> (file name, sha256 of the uncompressed file, expected shape)
    mirror: str
    how_to_get: str


_SHAPES = {"train_images": (60000, 28, 28), "train_labels": (60000,),
           "test_images": (10000, 28, 28), "test_labels": (10000,)}

DATASETS = {
    "mnist": IdxDataset(
        "mnist",
        {"train_images": ("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
         "train_labels": ("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
         "test_images": ("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
         "test_labels": ("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")},
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "run `sparse-ensembles download mnist` (or set task.download = true), or put the four "
        "*-ubyte.gz files in $SPARSE_ENSEMBLES_DATA/mnist",
    ),
    # checksums of the uncompressed files as shipped in Debian's dataset-fashion-mnist
    # (0.0~git20200523.55506a9-1, built from zalandoresearch/fashion-mnist)
    "fashion-mnist": IdxDataset(
        "fashion-mnist",
        {"train_images": ("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
         "train_labels": ("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
         "test_images": ("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
         "test_labels": ("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34")},
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "install Debian's package (`sudo apt-get install dataset-fashion-mnist`), run "
        "`sparse-ensembles download fashion-mnist`, or put the four *-ubyte.gz files in "
        "$SPARSE_ENSEMBLES_DATA/fashion-mnist",
    ),
}


def cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparse_ensembles" / name


def candidate_dirs(name: str, path: Optional[str] = None) -> list[Path]:
    dirs = []
    if path:
        dirs.append(Path(path).expanduser())
    if os.environ.get("SPARSE_ENSEMBLES_DATA"):
        dirs.append(Path(os.environ["SPARSE_ENSEMBLES_DATA"]) / name)
    dirs += [Path("/usr/share/datasets") / name, cache_dir(name)]
    return dirs


def _find_file(d: Path, fname: str) -> Optional[Path]:
    for candidate in (d / fname, d / (fname + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _spec(name: str) -> IdxDataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def first_dir_with(dirs: list[Path], files) -> Optional[Path]:
    """The first of ``dirs`` that holds every one of ``files`` (plain or ``.gz``)."""
    return next((d for d in dirs if all(_find_file(d, f) for f in files)), None)


def locate(name: str, path: Optional[str] = None) -> Path:
    """The first candidate directory that holds all of the dataset's files."""
    spec = _spec(name)
    searched = candidate_dirs(name, path)
    found = first_dir_with(searched, [f for f, _ in spec.files.values()])
    if found:
        return found
    looked = "\n  ".join(str(d) for d in searched)
    raise DataError(f"dataset {name!r} not found; looked in\n  {looked}\nTo get it: {spec.how_to_get}")


def load_idx_dataset(name: str, path: Optional[str] = None, allow_download: bool = False):
    """(x_train, y_train, x_test, y_test): float32 images in [0, 1] (N, 28, 28), int64 labels."""
    spec = _spec(name)
    try:
        d = locate(name, path)
    except DataError:
        if not allow_download:
            raise
        d = download(name)
    arrays = {}
    for role, (fname, sha) in spec.files.items():
        f = _find_file(d, fname)
        a = read_idx(f, sha)
        if a.shape != _SHAPES[role]:
            raise DataError(f"{f}: shape {a.shape}, expected {_SHAPES[role]} for {name} {role}")
        arrays[role] = a
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        if labels.max() > 9:
            raise DataError(f"{name} {split} labels go up to {labels.max()}, expected 0..9: corrupt file")
    x = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)) / 255.0
    y = lambda a: torch.from_numpy(np.array(a, dtype=np.int64))
    return x(arrays["train_images"]), y(arrays["train_labels"]), x(arrays["test_images"]), y(arrays["test_labels"])


def download(name: str, dest: Optional[Path] = None) -> Path:
    """Opt-in: fetch the gzipped files from the canonical mirror into ``dest`` (default: the user
    cache), verify each sha256, and only then move it into place."""
    spec = _spec(name)
    dest = Path(dest) if dest else cache_dir(name)
    dest.mkdir(parents=True, exist_ok=True)
    for fname, sha in spec.files.values():
        target = dest / (fname + ".gz")
        if target.is_file():
            continue
        url = spec.mirror + fname + ".gz"
        tmp = target.with_suffix(".part")
        print(f"downloading {url}")
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise DataError(f"download of {url} failed ({e}); {spec.how_to_get}") from e
        got = hashlib.sha256(read_bytes(tmp)).hexdigest()
        if got != sha:
            tmp.unlink()
            raise DataError(f"{url}: sha256 {got} does not match the expected {sha}; not saved")
        os.replace(tmp, target)
    return dest
