"""CIFAR-10, python version (Krizhevsky 2009): ``cifar-10-batches-py/data_batch_1..5`` and
``test_batch``, each a pickled dict with ``b"data"`` (N x 3072 uint8, the red, green, blue planes
of a 32x32 image one after the other, so CHW order) and ``b"labels"`` (N ints in 0..9).

Located like the IDX datasets (:func:`~sparse_ensembles.data.registry.candidate_dirs` of
``"cifar10"``: ``task.path``, ``$SPARSE_ENSEMBLES_DATA/cifar10``, ``/usr/share/datasets/cifar10``,
the user cache), each directory tried as it is and with ``cifar-10-batches-py/`` appended, so the
unpacked tarball can be dropped in as it comes. Files may be gzipped. Every file is checked: the
md5 of the canonical file (``verify=True``; pass ``verify=False`` for a subset of your own), that
it unpickles to the expected dict (with an unpickler that only rebuilds numpy arrays: a pickle can
otherwise run code), the shapes, and the label range. :func:`download_cifar10` is opt-in and
checks the tarball's md5 before unpacking it.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import DataError
from .idx import read_bytes
from .registry import DATASETS, _find_file, cache_dir, candidate_dirs, first_dir_with, load_idx_dataset

NAME = "cifar10"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# md5 of the canonical (uncompressed) files, as listed by torchvision
MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddbe9f0e2f6a8400a5e7",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TARBALL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
HOW_TO_GET = (f"download {TARBALL_URL} (md5 {TARBALL_MD5}) and unpack it into $SPARSE_ENSEMBLES_DATA/cifar10 "
              f"(the folder {FOLDER}/ or its files), or fetch it with "
              "sparse_ensembles.data.download_cifar10() / allow_download=True")
PIXELS = 3 * 32 * 32
CLASSES = 10
BATCH = 10000  # images per canonical file


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays only; anything else is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds only arrays and lists)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved numpy.core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_cifar_batch(path, md5: Optional[str] = None, *, expect_rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3072), labels int64 (N,)) of one python-version batch file, checked."""
    path = Path(path)
    raw = read_bytes(path)
    if md5 is not None:
        got = _md5(raw)
        if got != md5:
            raise DataError(f"{path}: md5 {got}, expected {md5}: the file is corrupt or not the canonical CIFAR-10 "
                            f"batch; fetch it again ({HOW_TO_GET}), or pass verify=False for a subset of your own")
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a damaged pickle raises almost anything
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); the file is truncated or corrupt, "
                        f"or not a CIFAR-10 python batch: fetch it again ({HOW_TO_GET})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, expected the dict of a CIFAR-10 python batch")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: no b'data' / b'labels' entries (it has {sorted(map(str, batch))[:6]}); "
                        "not a CIFAR-10 python batch (CIFAR-100 files have b'fine_labels')")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise DataError(f"{path}: data is {data.dtype} of shape {data.shape}, expected uint8 of shape (N, {PIXELS}) "
                        "(32x32 RGB images, channel-major)")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {labels.dtype} labels of shape {labels.shape} for {len(data)} images; "
                        f"expected {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= CLASSES):
        raise DataError(f"{path}: labels range over {labels.min()}..{labels.max()}, expected 0..{CLASSES - 1}: "
                        "corrupt file")
    if expect_rows is not None and len(data) != expect_rows:
        raise DataError(f"{path}: {len(data)} images, the canonical file has {expect_rows}")
    return data, labels.astype(np.int64)


def locate_cifar10(path: Optional[str] = None, verify: bool = True) -> Path:
    """The first candidate directory holding the batch files: all six with ``verify``, else at
    least ``data_batch_1`` and ``test_batch`` (the train set is every ``data_batch_i`` present)."""
    searched = [x for d in candidate_dirs(NAME, path) for x in (d, d / FOLDER)]
    need = list(MD5) if verify else [TRAIN_FILES[0], TEST_FILE]
    found = first_dir_with(searched, need)
    if found:
        return found
    partial = [(d, [f for f in need if not _find_file(d, f)]) for d in searched if d.is_dir()]
    partial = [(d, missing) for d, missing in partial if len(missing) < len(need)]
    detail = "".join(f"\n{d} lacks {', '.join(missing)}" for d, missing in partial)
    looked = "\n  ".join(str(d) for d in searched)
    raise DataError(f"dataset 'cifar10' not found; looked in\n  {looked}{detail}\nTo get it: {HOW_TO_GET}")


def load_cifar10(path: Optional[str] = None, *, allow_download: bool = False, verify: bool = True,
                 normalize: bool = False):
    """(x_train, y_train, x_test, y_test): float32 images of shape (N, 3072) (CHW order) scaled to
    [0, 1], or with ``normalize`` standardised per channel by the training set's mean and std;
    int64 labels in 0..9. ``verify``: check each file's md5 (and 10000 images per file) against the
    canonical CIFAR-10; off for a subset of your own."""
    try:
        d = locate_cifar10(path, verify)
    except DataError:
        if not allow_download:
            raise
        d = download_cifar10()
    parts = [read_cifar_batch(_find_file(d, f), MD5[f] if verify else None, expect_rows=BATCH if verify else None)
             for f in TRAIN_FILES if _find_file(d, f)]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read_cifar_batch(_find_file(d, TEST_FILE), MD5[TEST_FILE] if verify else None,
                                expect_rows=BATCH if verify else None)
    x = lambda a: torch.from_numpy(a.astype(np.float32)) / 255.0
    xtr, xte = x(xtr), x(xte)
    if normalize:
        planes = xtr.view(len(xtr), 3, -1)
        mean = planes.mean(dim=(0, 2)).view(1, 3, 1)
        std = planes.std(dim=(0, 2)).clamp_min(1e-8).view(1, 3, 1)
        xtr = ((planes - mean) / std).reshape(len(xtr), PIXELS)
        xte = ((xte.view(len(xte), 3, -1) - mean) / std).reshape(len(xte), PIXELS)
    return xtr, torch.from_numpy(ytr), xte, torch.from_numpy(yte)


def download_cifar10(dest: Optional[Path] = None) -> Path:
    """Opt-in: fetch the python-version tarball into ``dest`` (default: the user cache), check its
    md5, and only then unpack the six batch files (and ``batches.meta``) into ``dest/cifar-10-batches-py``,
    checking each file's md5. A tarball already in ``dest`` is checked and reused."""
    dest = Path(dest) if dest else cache_dir(NAME)
    target = dest / FOLDER
    if all((target / f).is_file() for f in MD5):
        return target
    dest.mkdir(parents=True, exist_ok=True)
    tarball = dest / TARBALL_URL.rsplit("/", 1)[1]
    if not tarball.is_file():
        tmp = tarball.with_name(tarball.name + ".part")
        print(f"downloading {TARBALL_URL}")
        try:
            urllib.request.urlretrieve(TARBALL_URL, tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"download of {TARBALL_URL} failed ({e}); {HOW_TO_GET}") from e
        got = _md5(tmp.read_bytes())
        if got != TARBALL_MD5:
            tmp.unlink()
            raise DataError(f"{TARBALL_URL}: md5 {got} does not match the expected {TARBALL_MD5}; not saved")
        os.replace(tmp, tarball)
    else:
        got = _md5(tarball.read_bytes())
        if got != TARBALL_MD5:
            raise DataError(f"{tarball}: md5 {got}, expected {TARBALL_MD5}: a partial or different download; "
                            "delete it and fetch it again")
    target.mkdir(exist_ok=True)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for name in [*MD5, "batches.meta"]:
                member = tar.extractfile(f"{FOLDER}/{name}")  # only these names: no path tricks
                data = member.read()
                if name in MD5 and _md5(data) != MD5[name]:
                    raise DataError(f"{tarball}: {name} has md5 {_md5(data)}, expected {MD5[name]}")
                tmp = target / f".{name}.part"
                tmp.write_bytes(data)
                os.replace(tmp, target / name)
    except (tarfile.TarError, KeyError, OSError, EOFError) as e:
        raise DataError(f"{tarball}: cannot unpack ({e}); delete it and fetch it again") from e
    return target


def image_datasets() -> list[str]:
    """The names ``load_image_dataset`` knows: the IDX datasets and ``cifar10``."""
    return sorted([*DATASETS, NAME])


def load_image_dataset(name: str, path: Optional[str] = None, allow_download: bool = False, *, verify: bool = True):
    """``load_idx_dataset`` for the IDX datasets, :func:`load_cifar10` for ``"cifar10"`` (images
    flattened to (N, 3072); ``verify`` = check the canonical md5s, off for a subset of your own)."""
    if name == NAME:
        return load_cifar10(path, allow_download=allow_download, verify=verify)
    return load_idx_dataset(name, path, allow_download)
