"""numba set-up shared by the compiled kernels (the block-sparse LSTM, the counter-based noise).

LLVM tunes Intel's AVX-512 CPUs (Skylake-X to Emerald Rapids) to *prefer 256-bit vectors*
(``prefer-256-bit``), so numba's code uses half the width the cores have. The block-sparse
products are FMA-bound register kernels: with 512-bit vectors they ran 1.5-1.9x faster on an
Emerald Rapids core (the time-batched 700 x 650 by 650 x 2600 product at 80% block sparsity: about
84 against 45 GFLOP/s), so this module asks for 512-bit vectors where the CPU has AVX-512.

It sets ``numba.core.config.CPU_FEATURES`` (the host's features plus ``-prefer-256-bit``), which
numba reads when it first compiles in a process; import this module before anything is compiled.
It does nothing where the user set ``NUMBA_CPU_FEATURES`` themselves, where
``SPARSE_ENSEMBLES_VECTOR_WIDTH=256`` asks for the default, on CPUs without AVX-512, or when numba
has already set up its code generator in this process (any ``@njit`` before this import: the kernels
then run at 256 bits, correct but slower; :func:`vector_width` tells). It is process-wide: other
numba code compiled afterwards gets 512-bit vectors too.
numba's on-disk cache is keyed by the features, so both widths keep their own compiled code.
"""
from __future__ import annotations

import os

from numba.core import config

__all__ = ["vector_width"]


def _codegen_started() -> bool:
    """numba fixes the target features when its CPU target context is created (at the first
    ``@njit`` decoration or compilation in the process)."""
    from numba.core.registry import cpu_target
    return "_toplevel_target_context" in vars(cpu_target)


def _prefer_512bit_vectors() -> None:
    if config.CPU_FEATURES is not None or os.environ.get("SPARSE_ENSEMBLES_VECTOR_WIDTH") == "256" \
            or _codegen_started():
        return
    from numba.core.codegen import get_host_cpu_features
    features = get_host_cpu_features()
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = features + ",-prefer-256-bit"


def vector_width() -> int:
    """The vector width (bits) numba's kernels are compiled for in this process (512 or 256; 128 on
    CPUs without AVX), read from numba's code generator where it exists."""
    from numba.core.codegen import get_host_cpu_features
    from numba.core.registry import cpu_target
    if _codegen_started():
        features = cpu_target.target_context.codegen()._tm_features.split(",")
    else:
        features = (config.CPU_FEATURES or get_host_cpu_features()).split(",")
    if "+avx512f" in features and "-prefer-256-bit" in features:
        return 512
    return 256 if "+avx" in features else 128


_prefer_512bit_vectors()
