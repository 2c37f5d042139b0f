"""Physical compaction and ensemble executors: sparsity turned into speed and memory.

* :mod:`.mlp` — :func:`compact_mlp` (dead neurons removed, constants folded), the fused
  padded-dense and block-diagonal CSR MLP ensemble executors;
* :mod:`.lstm` — :class:`FusedLSTMEnsemble`, ISS-shrunk LSTM LMs of different widths run as one batch;
* :mod:`.block_lstm` — the block-sparse LSTM layer (compiled time loop that skips pruned blocks) for
  training and inference; :mod:`.block_lm` — block-pruned LSTM LMs run on it, and their ensemble.
"""
from .mlp import CompactMLP, FusedMLPEnsemble, SparseMLPEnsemble, compact_mlp

__all__ = ["CompactMLP", "FusedMLPEnsemble", "SparseMLPEnsemble", "compact_mlp"]
