"""IDX files (MNIST, Fashion-MNIST), plain or gzipped, with format checks."""
from __future__ import annotations

import gzip
import math
import hashlib
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: Path) -> bytes:
    path = Path(path)
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or corrupt — delete it and "
                        "fetch it again") from e


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes: magic = 0x0000, dtype code, ndim; then ndim big-endian uint32 sizes."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{source}: not an IDX file (bad magic number {data[:4].hex()!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: IDX header truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow on a corrupt header
    if len(data) != expected:
        raise DataError(f"{source}: IDX header says shape {shape} ({expected} bytes) but the file has "
                        f"{len(data)} bytes; the file is truncated or corrupt — fetch it again")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(path, sha256: str | None = None) -> np.ndarray:
    data = read_bytes(path)
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise DataError(f"{path}: sha256 of the uncompressed file is {got}, expected {sha256}; "
                            "the file is corrupt or a different version — fetch it again")
    return parse_idx(data, str(path))
