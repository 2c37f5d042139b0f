"""numba set-up shared by the compiled kernels (the block-sparse LSTM, the counter-based noise).

LLVM tunes Intel's AVX-512 CPUs (Skylake-X to Emerald Rapids) to *prefer 256-bit vectors*
(``prefer-256-bit``), so numba's code uses half the width the cores have. The block-sparse
products are FMA-bound register kernels: with 512-bit vectors they ran 1.5-1.9x faster on an
Emerald Rapids core (the time-batched 700 x 650 by 650 x 2600 product at 80% block sparsity: about
84 against 45 GFLOP/s), so this module asks for 512-bit vectors where the CPU has AVX-512.

It sets ``numba.core.config.CPU_FEATURES`` (the host's features plus ``-prefer-256-bit``), which
numba reads when it first compiles in a process; import this module before anything is compiled.
It does nothing where the user set ``NUMBA_CPU_FEATURES`` themselves, where
``SPARSE_ENSEMBLES_VECTOR_WIDTH=256`` asks for the default, on CPUs without AVX-512, or when
numba has already compiled in this process (the kernels then run at 256 bits, correct but slower).
numba's on-disk cache is keyed by the features, so both widths keep their own compiled code.
"""
from __future__ import annotations

import os

from numba.core import config

__all__ = ["vector_width"]


def _prefer_512bit_vectors() -> None:
    if config.CPU_FEATURES is not None or os.environ.get("SPARSE_ENSEMBLES_VECTOR_WIDTH") == "256":
        return
    from numba.core.codegen import get_host_cpu_features
    features = get_host_cpu_features()
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = features + ",-prefer-256-bit"


def vector_width() -> int:
    """The vector width (bits) numba's kernels are compiled for in this process (512 or 256; 128 on
    CPUs without AVX)."""
    from numba.core.codegen import get_host_cpu_features
    features = (config.CPU_FEATURES or get_host_cpu_features()).split(",")
    if "+avx512f" in features and "-prefer-256-bit" in features:
        return 512
    return 256 if "+avx" in features else 128


_prefer_512bit_vectors()
