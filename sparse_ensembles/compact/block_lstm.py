"""Block-sparse LSTM layer whose forward and backward skip pruned weight blocks (CPU, numba).

Equations (one layer, torch's gate order i, f, g, o; ``n`` hidden units, rows ``k*n:(k+1)*n`` of
the (4n x in) / (4n x n) weights belong to gate k)::

    G_in = x @ W_ih^T + b_ih + b_hh                       all T steps at once (one product over B*T rows)
    a_t  = G_in[t] + h_{t-1} @ W_hh^T                     (block-sparse, per step)
    i, f, o = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o);   g = tanh(a_g)
    c_t  = f * c_{t-1} + i * g;                           h_t = o * tanh(c_t)

Backward through time (``dh``, ``dc`` carried from t+1; ``dH[t]`` the output gradient)::

    dh   = dH[t] + dG[t+1] @ W_hh                         (transposed block-sparse product)
    dc   = dc_next + dh * o * (1 - tanh(c)^2);            dc_next = dc * f
    dG[t] = [dc*g*i*(1-i), dc*c_{t-1}*f*(1-f), dc*i*(1-g^2), dh*tanh(c)*o*(1-o)]
    dW_hh = dG^T @ [h_{-1}..h_{T-2}],  dW_ih = dG^T @ x   (kept blocks only, one product over B*T rows)
    dx = dG @ W_ih,  db_ih = db_hh = sum of dG

Layout. A weight W (R x C) is cut into blocks (bh, bw); edge blocks may be smaller (R, C need not
be multiples: blocks are zero-padded internally and the products never read or write past R / C).
``keep`` (ceil(R/bh), ceil(C/bw)) marks the kept blocks. :class:`BlockLayout` is BSR-like: per block
row the kept block columns (``rowptr``, ``cols``; ``rows`` the block row of each kept block) and
``data`` (nnzb, ., .) holding the blocks. Two storage modes, chosen from the block shape:

* ``"axpy"`` (block height >= 8, or not shorter than wide): ``data[p]`` is the block TRANSPOSED,
  (bw, bh), so the innermost loop runs over contiguous output features. For bh = 32 (16) the kernel
  keeps an 8 x 32 (8 x 16) accumulator tile in a stack array (an ``alloca`` that LLVM promotes to
  vector registers; that needs every index into it to be a compile-time constant, hence the
  unrolled code, and an edge block row cut by R runs the same kernel on a zero-padded scratch tile),
  reuses each block it loads for 8 batch rows and walks all kept blocks of a block row before
  storing; 4-row tiles take what is left, then single rows (batch 1), which use 4 accumulators over
  k to hide the FMA latency; one-column blocks (32x1) use 4-row tiles without the k loop. Tall
  inputs (the time-batched products, B*T rows) are swept in panels of 48 rows, each over all block
  rows, so that the panel's kept columns stay in cache. 115-150 GFLOP/s on one core of an Intel
  Emerald Rapids (AVX-512, 512-bit vectors: see ``sparse_ensembles/_jit.py``; 45-100 GFLOP/s with
  LLVM's default 256-bit tuning), MKL's dense GEMM reaching 150-225 on the same core. Other block
  heights run a generic loop.
* ``"dot"`` (short wide blocks, e.g. the 1x32 blocks of W^T when W has 32x1 blocks): ``data[p]``
  is the block as is, (bh, bw); 4 batch rows at a time, 32-wide blocks accumulate elementwise in a
  register tile summed once per output. The batch-row groups are the outer loop (their rows of X
  stay in cache while the blocks stream by). About half the speed of the axpy kernel.

Backward needs products with W^T: they use the layout of W^T (blocks (bw, bh), keep transposed),
gathered from the same dense parameter. The weight gradients are computed only for the kept blocks,
each a (bh x bw) block of dY^T X reduced over all B*T rows, as inner products of the contiguous rows
of dY^T and X^T (copied transposed first) in 4x4 tiles of accumulators; they are then scattered into
a zero dense tensor. Parameters stay dense-shaped (``weight_ih_l0`` ...); each call gathers the kept
blocks (about 20% of the weights at 80% sparsity, well under a millisecond at hidden 650), so
optimizers, priors and masks work unchanged; values in pruned blocks are ignored and get exactly
zero gradient. Nonlinearities: ``tanh`` is a clamped rational approximation (|error| < 4e-7,
arithmetic only, so the gate loops vectorise; numba has no vector ``exp`` without SVML) and
``sigmoid(x) = (1 + tanh(x / 2)) / 2``; both are stable for any input. Kernels are compiled with
``error_model="numpy"``: with numba's default python error model a float division carries a
zero-divisor check that stops vectorisation.

Threads. The batched products (input projection, dx) are split into equal bands of rows (tall
inputs) or contiguous ranges of block rows balanced by kept blocks (batch-row groups for the dot
layout), the weight gradient into ranges of block rows, run as ``prange`` parts on numba's OpenMP
threads (``numba.set_num_threads``). The time loop runs on one thread with ``executor="numba"``;
``"numba_parallel"`` splits every step too (the recurrent product by block rows, the gate math by
batch rows: two parallel regions per step, about 2 us each). One thread pool for everything matters: Python threads for the products beside OpenMP's spinning
workers for the steps cost 3-5 ms per layer call at hidden 650. A parallel step only pays where the
cores are free: on a machine shared with another job it can be many times slower, which is why it
is a separate executor that ``"auto"`` picks by measurement. torch's threads
(``torch.set_num_threads``) only matter for the dense executor and the small glue ops.
:func:`choose_executor` times the candidates for a shape and thread count and caches the winner.

Limits. CPU float32 only: other dtypes / devices raise ``ValueError`` with ``executor="numba"``;
``executor="auto"`` falls back to the masked dense ``torch._VF.lstm`` there (on GPU that is cuDNN
with the pruned weights zeroed, i.e. no speed-up from sparsity). Single layer, unidirectional,
batch_first, biases, no dropout, no projections, first-order gradients only. Slow cases: block
heights other than 16 / 32 run a generic loop with the accumulator in memory (roughly 1/3 of the
32-row speed); the dot layout (the transposed products of 32x1 blocks, i.e. the backward) about
1/3 to 1/2, so 32x1 training gains least (about 1.8x at 80% against about 2.5x for 32x32).
Compilation: each kernel is compiled on first use and cached on disk (``cache=True``); with an empty
cache that costs about 60 s (numba re-optimises the callees inside every entry point, the four
parallel launchers included: the register kernels therefore have exactly one call site each).

Measured (benchmarks/block_sparse.py, hidden = input = 650, batch 20, T = 35, 80% random block
sparsity, 32x32 blocks, each side at its best of 1 / 2 threads and executor, 2 vCPUs of an Intel
Xeon (Emerald Rapids)): layer inference 2.34x ``nn.LSTM``, a training step 2.03x, the recurrent
product at batch 1 4.23x ``torch.mm`` (docs/block_sparse.md).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Optional

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from torch import Tensor, nn

from .. import _jit  # noqa: F401  (512-bit vectors on AVX-512 CPUs; before anything compiles)

__all__ = ["BlockLayout", "block_keep_from_weight", "block_layout", "gather_blocks", "block_matmul",
           "block_grad", "BlockSparseLSTMFunction", "BlockSparseLSTM", "choose_executor", "expand_keep"]


# --------------------------------------------------------------------------------------------- helpers
@intrinsic
def _stack_f32(typingctx, size):
    """A float32 buffer of ``size`` (a constant) on the stack: LLVM can keep it in registers."""
    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=args[0])
    return types.CPointer(types.float32)(size), codegen


@njit(fastmath=True, error_model="numpy", cache=True, inline="always")
def _tanh(x):
    """Rational tanh approximation (|error| < 4e-7), pure arithmetic so loops vectorise."""
    x = min(max(x, np.float32(-7.9053111)), np.float32(7.9053111))
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


@njit(fastmath=True, error_model="numpy", cache=True, inline="always")
def _sigmoid(x):
    return np.float32(0.5) + np.float32(0.5) * _tanh(np.float32(0.5) * x)


# --------------------------------------------------------------------------------------------- products
# Y[:, :R] (=|+=) X[:, :C] @ W^T (+ bias) for one block row I. data[p] (axpy) = block^T (bw, bh).

@njit(fastmath=True, error_model="numpy", cache=True)
def _rowblk_axpy32(X, rowptr, cols, data, bw, R, C, Y, scratch, bias, mode_init, I0, I1, m_lo, m_hi):
    """Block rows I0..I1-1 (full ones), rows m_lo..m_hi-1 of Y = X @ W^T: Y[m, I*32:(I+1)*32], or
    Y[m - m_lo, :32] of a scratch tile when ``scratch``. Every access to the accumulators has a
    constant index, so they live in registers: 8-row tiles (16 accumulators of 512 bits: enough
    independent FMAs in flight to cover their latency), then 4-row tiles, then single rows."""
    acc8 = numba.carray(_stack_f32(256), (8, 32))
    acc = numba.carray(_stack_f32(128), (4, 32))
    acc1 = numba.carray(_stack_f32(128), (4, 32))
    ym = m_lo if scratch else 0
    for I in range(I0, I1):
        r0 = I * 32
        yc = 0 if scratch else r0
        p0 = rowptr[I]
        p1 = rowptr[I + 1]
        m0 = m_lo
        while bw > 1 and m0 + 8 <= m_hi:
            for a in range(8):
                for j in range(32):
                    acc8[a, j] = 0.0
            for p in range(p0, p1):
                c0 = cols[p] * bw
                cn = min(bw, C - c0)
                for k in range(cn):
                    x0 = X[m0, c0 + k]
                    x1 = X[m0 + 1, c0 + k]
                    x2 = X[m0 + 2, c0 + k]
                    x3 = X[m0 + 3, c0 + k]
                    x4 = X[m0 + 4, c0 + k]
                    x5 = X[m0 + 5, c0 + k]
                    x6 = X[m0 + 6, c0 + k]
                    x7 = X[m0 + 7, c0 + k]
                    for j in range(32):
                        w = data[p, k, j]
                        acc8[0, j] += x0 * w
                        acc8[1, j] += x1 * w
                        acc8[2, j] += x2 * w
                        acc8[3, j] += x3 * w
                        acc8[4, j] += x4 * w
                        acc8[5, j] += x5 * w
                        acc8[6, j] += x6 * w
                        acc8[7, j] += x7 * w
            if mode_init == 1:
                for a in range(8):
                    for j in range(32):
                        Y[m0 - ym + a, yc + j] += acc8[a, j]
            elif mode_init == 2:
                for a in range(8):
                    for j in range(32):
                        Y[m0 - ym + a, yc + j] = acc8[a, j] + bias[r0 + j]
            else:
                for a in range(8):
                    for j in range(32):
                        Y[m0 - ym + a, yc + j] = acc8[a, j]
            m0 += 8
        while m0 + 4 <= m_hi:
            for a in range(4):
                for j in range(32):
                    acc[a, j] = 0.0
            if bw == 1:  # 32x1-like blocks: no k loop
                for p in range(p0, p1):
                    c = cols[p]
                    x0 = X[m0, c]
                    x1 = X[m0 + 1, c]
                    x2 = X[m0 + 2, c]
                    x3 = X[m0 + 3, c]
                    for j in range(32):
                        w = data[p, 0, j]
                        acc[0, j] += x0 * w
                        acc[1, j] += x1 * w
                        acc[2, j] += x2 * w
                        acc[3, j] += x3 * w
            else:
                for p in range(p0, p1):
                    c0 = cols[p] * bw
                    cn = min(bw, C - c0)
                    for k in range(cn):
                        x0 = X[m0, c0 + k]
                        x1 = X[m0 + 1, c0 + k]
                        x2 = X[m0 + 2, c0 + k]
                        x3 = X[m0 + 3, c0 + k]
                        for j in range(32):
                            w = data[p, k, j]
                            acc[0, j] += x0 * w
                            acc[1, j] += x1 * w
                            acc[2, j] += x2 * w
                            acc[3, j] += x3 * w
            if mode_init == 1:
                for a in range(4):
                    for j in range(32):
                        Y[m0 - ym + a, yc + j] += acc[a, j]
            elif mode_init == 2:
                for a in range(4):
                    for j in range(32):
                        Y[m0 - ym + a, yc + j] = acc[a, j] + bias[r0 + j]
            else:
                for a in range(4):
                    for j in range(32):
                        Y[m0 - ym + a, yc + j] = acc[a, j]
            m0 += 4
        while m0 < m_hi:  # single rows: 4 accumulators over k break the FMA latency chain
            for a in range(4):
                for j in range(32):
                    acc1[a, j] = 0.0
            if bw == 1:  # 4 blocks at a time into the 4 accumulators
                p = p0
                while p + 4 <= p1:
                    x0 = X[m0, cols[p]]
                    x1 = X[m0, cols[p + 1]]
                    x2 = X[m0, cols[p + 2]]
                    x3 = X[m0, cols[p + 3]]
                    for j in range(32):
                        acc1[0, j] += x0 * data[p, 0, j]
                        acc1[1, j] += x1 * data[p + 1, 0, j]
                        acc1[2, j] += x2 * data[p + 2, 0, j]
                        acc1[3, j] += x3 * data[p + 3, 0, j]
                    p += 4
                while p < p1:
                    x0 = X[m0, cols[p]]
                    for j in range(32):
                        acc1[0, j] += x0 * data[p, 0, j]
                    p += 1
                p0e = p1  # nothing left for the general loop
            else:
                p0e = p0
            for p in range(p0e, p1):
                c0 = cols[p] * bw
                cn = min(bw, C - c0)
                k = 0
                while k + 4 <= cn:
                    x0 = X[m0, c0 + k]
                    x1 = X[m0, c0 + k + 1]
                    x2 = X[m0, c0 + k + 2]
                    x3 = X[m0, c0 + k + 3]
                    for j in range(32):
                        acc1[0, j] += x0 * data[p, k, j]
                        acc1[1, j] += x1 * data[p, k + 1, j]
                        acc1[2, j] += x2 * data[p, k + 2, j]
                        acc1[3, j] += x3 * data[p, k + 3, j]
                    k += 4
                while k < cn:
                    x0 = X[m0, c0 + k]
                    for j in range(32):
                        acc1[0, j] += x0 * data[p, k, j]
                    k += 1
            if mode_init == 1:
                for j in range(32):
                    Y[m0 - ym, yc + j] += acc1[0, j] + acc1[1, j] + acc1[2, j] + acc1[3, j]
            elif mode_init == 2:
                for j in range(32):
                    Y[m0 - ym, yc + j] = acc1[0, j] + acc1[1, j] + acc1[2, j] + acc1[3, j] + bias[r0 + j]
            else:
                for j in range(32):
                    Y[m0 - ym, yc + j] = acc1[0, j] + acc1[1, j] + acc1[2, j] + acc1[3, j]
            m0 += 1


@njit(fastmath=True, error_model="numpy", cache=True)
def _rowblk_axpy16(X, rowptr, cols, data, bw, R, C, Y, scratch, bias, mode_init, I0, I1, m_lo, m_hi):
    """Block rows I0..I1-1 (full ones), rows m_lo..m_hi-1 of Y = X @ W^T: Y[m, I*16:(I+1)*16], or
    Y[m - m_lo, :16] of a scratch tile when ``scratch``. Every access to the accumulators has a
    constant index, so they live in registers."""
    acc = numba.carray(_stack_f32(128), (8, 16))
    acc1 = numba.carray(_stack_f32(64), (4, 16))
    ym = m_lo if scratch else 0
    for I in range(I0, I1):
        r0 = I * 16
        yc = 0 if scratch else r0
        p0 = rowptr[I]
        p1 = rowptr[I + 1]
        m0 = m_lo
        while m0 + 8 <= m_hi:
            for a in range(8):
                for j in range(16):
                    acc[a, j] = 0.0
            for p in range(p0, p1):
                c0 = cols[p] * bw
                cn = min(bw, C - c0)
                for k in range(cn):
                    x0 = X[m0, c0 + k]
                    x1 = X[m0 + 1, c0 + k]
                    x2 = X[m0 + 2, c0 + k]
                    x3 = X[m0 + 3, c0 + k]
                    x4 = X[m0 + 4, c0 + k]
                    x5 = X[m0 + 5, c0 + k]
                    x6 = X[m0 + 6, c0 + k]
                    x7 = X[m0 + 7, c0 + k]
                    for j in range(16):
                        w = data[p, k, j]
                        acc[0, j] += x0 * w
                        acc[1, j] += x1 * w
                        acc[2, j] += x2 * w
                        acc[3, j] += x3 * w
                        acc[4, j] += x4 * w
                        acc[5, j] += x5 * w
                        acc[6, j] += x6 * w
                        acc[7, j] += x7 * w
            if mode_init == 1:
                for a in range(8):
                    for j in range(16):
                        Y[m0 - ym + a, yc + j] += acc[a, j]
            elif mode_init == 2:
                for a in range(8):
                    for j in range(16):
                        Y[m0 - ym + a, yc + j] = acc[a, j] + bias[r0 + j]
            else:
                for a in range(8):
                    for j in range(16):
                        Y[m0 - ym + a, yc + j] = acc[a, j]
            m0 += 8
        while m0 < m_hi:  # single rows: 4 accumulators over k break the FMA latency chain
            for a in range(4):
                for j in range(16):
                    acc1[a, j] = 0.0
            for p in range(p0, p1):
                c0 = cols[p] * bw
                cn = min(bw, C - c0)
                k = 0
                while k + 4 <= cn:
                    x0 = X[m0, c0 + k]
                    x1 = X[m0, c0 + k + 1]
                    x2 = X[m0, c0 + k + 2]
                    x3 = X[m0, c0 + k + 3]
                    for j in range(16):
                        acc1[0, j] += x0 * data[p, k, j]
                        acc1[1, j] += x1 * data[p, k + 1, j]
                        acc1[2, j] += x2 * data[p, k + 2, j]
                        acc1[3, j] += x3 * data[p, k + 3, j]
                    k += 4
                while k < cn:
                    x0 = X[m0, c0 + k]
                    for j in range(16):
                        acc1[0, j] += x0 * data[p, k, j]
                    k += 1
            if mode_init == 1:
                for j in range(16):
                    Y[m0 - ym, yc + j] += acc1[0, j] + acc1[1, j] + acc1[2, j] + acc1[3, j]
            elif mode_init == 2:
                for j in range(16):
                    Y[m0 - ym, yc + j] = acc1[0, j] + acc1[1, j] + acc1[2, j] + acc1[3, j] + bias[r0 + j]
            else:
                for j in range(16):
                    Y[m0 - ym, yc + j] = acc1[0, j] + acc1[1, j] + acc1[2, j] + acc1[3, j]
            m0 += 1


@njit(fastmath=True, error_model="numpy", cache=True)
def _rowblk_axpy_any(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, I, m_lo, m_hi):
    r0 = I * bh
    rn = min(bh, R - r0)
    p0 = rowptr[I]
    p1 = rowptr[I + 1]
    acc = np.empty(bh, np.float32)
    for m in range(m_lo, m_hi):
        for j in range(bh):
            acc[j] = 0.0
        if mode_init == 1:
            for j in range(rn):
                acc[j] = Y[m, r0 + j]
        elif mode_init == 2:
            for j in range(rn):
                acc[j] = bias[r0 + j]
        for p in range(p0, p1):
            c0 = cols[p] * bw
            cn = min(bw, C - c0)
            for k in range(cn):
                x0 = X[m, c0 + k]
                for j in range(bh):
                    acc[j] += x0 * data[p, k, j]
        for j in range(rn):
            Y[m, r0 + j] = acc[j]


@njit(fastmath=True, error_model="numpy", cache=True)
def _dot_rows4(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, m0):
    """Rows m0..m0+3 of Y, all block rows, dot layout (data[p] = block as is, (bh, bw)). Full
    32-wide blocks accumulate elementwise in a (4 x 32) register tile summed once per output;
    other blocks (edges, other widths) add short dot products."""
    acc = numba.carray(_stack_f32(128), (4, 32))
    for I in range(rowptr.shape[0] - 1):
        r0 = I * bh
        rn = min(bh, R - r0)
        for j in range(rn):
            for a in range(4):
                for k in range(32):
                    acc[a, k] = 0.0
            e0 = e1 = e2 = e3 = np.float32(0.0)
            for p in range(rowptr[I], rowptr[I + 1]):
                c0 = cols[p] * bw
                if bw == 32 and c0 + 32 <= C:
                    # slices: indices known non-negative inside, so the loop vectorises
                    x0 = X[m0, c0:c0 + 32]
                    x1 = X[m0 + 1, c0:c0 + 32]
                    x2 = X[m0 + 2, c0:c0 + 32]
                    x3 = X[m0 + 3, c0:c0 + 32]
                    ws = data[p, j]
                    for k in range(32):
                        w = ws[k]
                        acc[0, k] += x0[k] * w
                        acc[1, k] += x1[k] * w
                        acc[2, k] += x2[k] * w
                        acc[3, k] += x3[k] * w
                else:
                    cn = min(bw, C - c0)
                    for k in range(cn):
                        w = data[p, j, k]
                        e0 += X[m0, c0 + k] * w
                        e1 += X[m0 + 1, c0 + k] * w
                        e2 += X[m0 + 2, c0 + k] * w
                        e3 += X[m0 + 3, c0 + k] * w
            for k in range(32):
                e0 += acc[0, k]
                e1 += acc[1, k]
                e2 += acc[2, k]
                e3 += acc[3, k]
            r = r0 + j
            if mode_init == 1:
                e0 += Y[m0, r]
                e1 += Y[m0 + 1, r]
                e2 += Y[m0 + 2, r]
                e3 += Y[m0 + 3, r]
            elif mode_init == 2:
                e0 += bias[r]
                e1 += bias[r]
                e2 += bias[r]
                e3 += bias[r]
            Y[m0, r] = e0
            Y[m0 + 1, r] = e1
            Y[m0 + 2, r] = e2
            Y[m0 + 3, r] = e3


@njit(fastmath=True, error_model="numpy", cache=True)
def _dot_row1(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, m):
    for I in range(rowptr.shape[0] - 1):
        r0 = I * bh
        rn = min(bh, R - r0)
        for j in range(rn):
            s = np.float32(0.0)
            for p in range(rowptr[I], rowptr[I + 1]):
                c0 = cols[p] * bw
                cn = min(bw, C - c0)
                for k in range(cn):
                    s += X[m, c0 + k] * data[p, j, k]
            if mode_init == 1:
                s += Y[m, r0 + j]
            elif mode_init == 2:
                s += bias[r0 + j]
            Y[m, r0 + j] = s


@njit(fastmath=True, error_model="numpy", cache=True)
def _dot_group(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, g):
    """Rows 4g..4g+3 (those that exist) of a dot-layout product."""
    m0 = 4 * g
    if m0 + 4 <= X.shape[0]:
        _dot_rows4(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, m0)
    else:
        for m in range(m0, X.shape[0]):
            _dot_row1(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, m)


@njit(fastmath=True, error_model="numpy", cache=True)
def _axpy_rows(X, rowptr, cols, data, bh, bw, R, C, Y, scratch, bias, mode_init, I0, I1, m_lo, m_hi):
    """The register kernel for bh = 32 or 16 (one call site each, so that LLVM compiles them once)."""
    if bh == 32:
        _rowblk_axpy32(X, rowptr, cols, data, bw, R, C, Y, scratch, bias, mode_init, I0, I1, m_lo, m_hi)
    else:
        _rowblk_axpy16(X, rowptr, cols, data, bw, R, C, Y, scratch, bias, mode_init, I0, I1, m_lo, m_hi)


@njit(fastmath=True, error_model="numpy", cache=True)
def _rowblk(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, I0, I1, m_lo, m_hi):
    """Block rows I0..I1-1, rows m_lo..m_hi-1 of Y = X @ W^T. A block row cut by R (the edge) must
    come alone (I1 = I0 + 1): the register kernel then runs on a zero-padded scratch tile and the
    valid part is copied out. Each kernel has ONE call site: numba links and re-optimises callees
    per entry point, and more call sites multiplied the compile time."""
    if bh == 32 or bh == 16:
        r0 = I0 * bh
        edge = I1 * bh > R
        rn = min(bh, R - r0)
        if edge:
            S = np.zeros((m_hi - m_lo, bh), np.float32)
            for m in range(m_lo, m_hi):
                for j in range(rn):
                    if mode_init == 1:
                        S[m - m_lo, j] = Y[m, r0 + j]
                    elif mode_init == 2:
                        S[m - m_lo, j] = bias[r0 + j]
            dst = S
            mode = 1
        else:
            dst = Y
            mode = mode_init
        _axpy_rows(X, rowptr, cols, data, bh, bw, R, C, dst, edge, bias, mode, I0, I1, m_lo, m_hi)
        if edge:
            for m in range(m_lo, m_hi):
                for j in range(rn):
                    Y[m, r0 + j] = dst[m - m_lo, j]
    else:
        for I in range(I0, I1):
            _rowblk_axpy_any(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, I, m_lo, m_hi)


_PANEL = 48  # rows of X per sweep over the block rows: their kept columns stay in L1 / L2


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _mm_range(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, dot, J0, J1):
    """Part J0..J1-1 of Y (=|+=) X @ W^T (+ bias): block rows, or groups of 4 batch rows for the
    dot layout (their rows of X stay in cache while the blocks stream by). Tall X (the time-batched
    products) is swept in panels of ``_PANEL`` rows, each over all block rows of the part."""
    if dot:
        for g in range(J0, J1):
            _dot_group(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, g)
        return
    M = X.shape[0]
    nfull = R // bh
    for m_lo in range(0, M, _PANEL):
        m_hi = min(M, m_lo + _PANEL)
        for seg in range(2):  # the full block rows in one call (accumulators set up once), then the edge row
            I0 = J0 if seg == 0 else max(J0, nfull)
            I1 = min(J1, nfull) if seg == 0 else J1
            if I1 > I0:
                _rowblk(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, I0, I1, m_lo, m_hi)


@njit(fastmath=True, error_model="numpy", cache=True)
def _mm_serial(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, dot):
    n = (X.shape[0] + 3) // 4 if dot else rowptr.shape[0] - 1
    _mm_range(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, dot, 0, n)


# --------------------------------------------------------------------------------------------- gradients
@njit(fastmath=True, error_model="numpy", cache=True)
def _nt_block(P, Q, po, qo, pn, qn, out):
    """out[a, v] = sum_m P[po + a, m] * Q[qo + v, m] for a < pn, v < qn (zero elsewhere): inner
    products over contiguous rows, 4x4 (or 4x1) tiles of scalar accumulators that LLVM vectorises
    over m."""
    M = P.shape[1]
    for a in range(out.shape[0]):
        for v in range(out.shape[1]):
            out[a, v] = 0.0
    af = pn - pn % 4
    vf = qn - qn % 4
    for a0 in range(0, af, 4):
        p0 = P[po + a0]
        p1 = P[po + a0 + 1]
        p2 = P[po + a0 + 2]
        p3 = P[po + a0 + 3]
        for v0 in range(0, vf, 4):
            q0 = Q[qo + v0]
            q1 = Q[qo + v0 + 1]
            q2 = Q[qo + v0 + 2]
            q3 = Q[qo + v0 + 3]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = np.float32(0.0)
            s30 = s31 = s32 = s33 = np.float32(0.0)
            for m in range(M):
                x0 = p0[m]
                x1 = p1[m]
                x2 = p2[m]
                x3 = p3[m]
                y0 = q0[m]
                y1 = q1[m]
                y2 = q2[m]
                y3 = q3[m]
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            out[a0, v0] = s00
            out[a0, v0 + 1] = s01
            out[a0, v0 + 2] = s02
            out[a0, v0 + 3] = s03
            out[a0 + 1, v0] = s10
            out[a0 + 1, v0 + 1] = s11
            out[a0 + 1, v0 + 2] = s12
            out[a0 + 1, v0 + 3] = s13
            out[a0 + 2, v0] = s20
            out[a0 + 2, v0 + 1] = s21
            out[a0 + 2, v0 + 2] = s22
            out[a0 + 2, v0 + 3] = s23
            out[a0 + 3, v0] = s30
            out[a0 + 3, v0 + 1] = s31
            out[a0 + 3, v0 + 2] = s32
            out[a0 + 3, v0 + 3] = s33
        for v in range(vf, qn):  # 4x1 tiles
            q0 = Q[qo + v]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for m in range(M):
                y = q0[m]
                s0 += p0[m] * y
                s1 += p1[m] * y
                s2 += p2[m] * y
                s3 += p3[m] * y
            out[a0, v] = s0
            out[a0 + 1, v] = s1
            out[a0 + 2, v] = s2
            out[a0 + 3, v] = s3
    for a in range(af, pn):  # leftover rows: 1 x 4 tiles, then single dots
        pa = P[po + a]
        for v0 in range(0, vf, 4):
            q0 = Q[qo + v0]
            q1 = Q[qo + v0 + 1]
            q2 = Q[qo + v0 + 2]
            q3 = Q[qo + v0 + 3]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for m in range(M):
                x = pa[m]
                s0 += x * q0[m]
                s1 += x * q1[m]
                s2 += x * q2[m]
                s3 += x * q3[m]
            out[a, v0] = s0
            out[a, v0 + 1] = s1
            out[a, v0 + 2] = s2
            out[a, v0 + 3] = s3
        for v in range(vf, qn):
            q0 = Q[qo + v]
            s0 = np.float32(0.0)
            for m in range(M):
                s0 += pa[m] * q0[m]
            out[a, v] = s0


@njit(fastmath=True, error_model="numpy", cache=True)
def _nt_bw1_4(P, Q, pa, r0, rn, qc0, qc1, qc2, qc3, out):
    """Column blocks (bw = 1) pa..pa+3 of one block row: out[pa + v, a, 0] = P[r0 + a] . Q[qc_v],
    in 4x4 tiles (4 rows of P against the 4 columns' rows of Q)."""
    M = P.shape[1]
    q0 = Q[qc0]
    q1 = Q[qc1]
    q2 = Q[qc2]
    q3 = Q[qc3]
    af = rn - rn % 4
    for a0 in range(0, af, 4):
        p0 = P[r0 + a0]
        p1 = P[r0 + a0 + 1]
        p2 = P[r0 + a0 + 2]
        p3 = P[r0 + a0 + 3]
        s00 = s01 = s02 = s03 = np.float32(0.0)
        s10 = s11 = s12 = s13 = np.float32(0.0)
        s20 = s21 = s22 = s23 = np.float32(0.0)
        s30 = s31 = s32 = s33 = np.float32(0.0)
        for m in range(M):
            x0 = p0[m]
            x1 = p1[m]
            x2 = p2[m]
            x3 = p3[m]
            y0 = q0[m]
            y1 = q1[m]
            y2 = q2[m]
            y3 = q3[m]
            s00 += x0 * y0
            s01 += x0 * y1
            s02 += x0 * y2
            s03 += x0 * y3
            s10 += x1 * y0
            s11 += x1 * y1
            s12 += x1 * y2
            s13 += x1 * y3
            s20 += x2 * y0
            s21 += x2 * y1
            s22 += x2 * y2
            s23 += x2 * y3
            s30 += x3 * y0
            s31 += x3 * y1
            s32 += x3 * y2
            s33 += x3 * y3
        out[pa, a0, 0] = s00
        out[pa + 1, a0, 0] = s01
        out[pa + 2, a0, 0] = s02
        out[pa + 3, a0, 0] = s03
        out[pa, a0 + 1, 0] = s10
        out[pa + 1, a0 + 1, 0] = s11
        out[pa + 2, a0 + 1, 0] = s12
        out[pa + 3, a0 + 1, 0] = s13
        out[pa, a0 + 2, 0] = s20
        out[pa + 1, a0 + 2, 0] = s21
        out[pa + 2, a0 + 2, 0] = s22
        out[pa + 3, a0 + 2, 0] = s23
        out[pa, a0 + 3, 0] = s30
        out[pa + 1, a0 + 3, 0] = s31
        out[pa + 2, a0 + 3, 0] = s32
        out[pa + 3, a0 + 3, 0] = s33
    for a in range(af, out.shape[1]):
        for v in range(4):
            out[pa + v, a, 0] = 0.0
    for a in range(af, rn):
        pr = P[r0 + a]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for m in range(M):
            x = pr[m]
            s0 += x * q0[m]
            s1 += x * q1[m]
            s2 += x * q2[m]
            s3 += x * q3[m]
        out[pa, a, 0] = s0
        out[pa + 1, a, 0] = s1
        out[pa + 2, a, 0] = s2
        out[pa + 3, a, 0] = s3


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _grad_blocks(dYT, XT, rowptr, rows, cols, bh, bw, R, C, out, J0, J1):
    """Kept-block gradient of Y = X @ W^T from the TRANSPOSED operands dYT (R, M), XT (C, M):
    out[p] (bh, bw) = dY[:, block rows]^T @ X[:, block cols], for block rows J0..J1-1. One-column
    blocks (bw = 1) are taken 4 at a time within a block row, so that the tiles stay 4x4."""
    for I in range(J0, J1):
        r0 = I * bh
        rn = min(bh, R - r0)
        p = rowptr[I]
        p1 = rowptr[I + 1]
        if bw == 1:
            while p + 4 <= p1:
                _nt_bw1_4(dYT, XT, p, r0, rn, cols[p], cols[p + 1], cols[p + 2], cols[p + 3], out)
                p += 4
        while p < p1:
            c0 = cols[p] * bw
            _nt_block(dYT, XT, r0, c0, rn, min(bw, C - c0), out[p])
            p += 1


@njit(fastmath=True, error_model="numpy", cache=True)
def _gather(W, rows, cols, bh, bw, transpose, data):
    """data[p] = block p of W (bh, bw), stored transposed (bw, bh) when ``transpose``, zero-padded."""
    R, C = W.shape
    for p in range(rows.shape[0]):
        r0 = rows[p] * bh
        c0 = cols[p] * bw
        rn = min(bh, R - r0)
        cn = min(bw, C - c0)
        blk = data[p]
        if rn < bh or cn < bw:
            blk[:] = 0.0
        if transpose:
            for j in range(rn):
                for k in range(cn):
                    blk[k, j] = W[r0 + j, c0 + k]
        else:
            for j in range(rn):
                for k in range(cn):
                    blk[j, k] = W[r0 + j, c0 + k]


@njit(fastmath=True, error_model="numpy", cache=True)
def _scatter(blocks, rows, cols, bh, bw, trans, out):
    """out (zeroed, R x C) gets block p's values; blocks[p] is (bh, bw), or (bw, bh) when ``trans``."""
    R, C = out.shape
    for p in range(rows.shape[0]):
        r0 = rows[p] * bh
        c0 = cols[p] * bw
        rn = min(bh, R - r0)
        cn = min(bw, C - c0)
        blk = blocks[p]
        if trans:
            for j in range(rn):
                for k in range(cn):
                    out[r0 + j, c0 + k] = blk[k, j]
        else:
            for j in range(rn):
                for k in range(cn):
                    out[r0 + j, c0 + k] = blk[j, k]


# --------------------------------------------------------------------------------------------- LSTM loop
@njit(fastmath=True, error_model="numpy", cache=True)
def _cell_fwd(a, cp, c, h, tc):
    """a (B, 4n) pre-activations -> activations in place; c, h, tanh(c) of this step. Simple
    one-array loops so that LLVM vectorises them (no aliasing checks between many arrays)."""
    B, n = c.shape
    for b in range(B):
        ab = a[b]
        for u in range(2 * n):
            ab[u] = _sigmoid(ab[u])
        for u in range(2 * n, 3 * n):
            ab[u] = _tanh(ab[u])
        for u in range(3 * n, 4 * n):
            ab[u] = _sigmoid(ab[u])
        cb = c[b]
        cpb = cp[b]
        for u in range(n):
            cb[u] = ab[n + u] * cpb[u] + ab[u] * ab[2 * n + u]
        tb = tc[b]
        for u in range(n):
            tb[u] = _tanh(cb[u])
        hb = h[b]
        for u in range(n):
            hb[u] = ab[3 * n + u] * tb[u]


@njit(fastmath=True, error_model="numpy", cache=True)
def _lstm_fwd(G, Hall, Call, TC, rowptr, cols, data, bh, bw, dot):
    """G (T, B, 4n): input projections (bias included), overwritten by the gate activations.
    Hall / Call (T+1, B, n): [0] holds h0 / c0, [t+1] gets h_t / c_t. TC (T, B, n) gets tanh(c_t)."""
    T = G.shape[0]
    n = Hall.shape[2]
    empty = np.empty(0, np.float32)
    for t in range(T):
        _mm_serial(Hall[t], rowptr, cols, data, bh, bw, 4 * n, n, G[t], empty, 1, dot)
        _cell_fwd(G[t], Call[t], Call[t + 1], Hall[t + 1], TC[t])


@njit(fastmath=True, error_model="numpy", cache=True)
def _cell_bwd(dHt, a, tc, cp, dh, dc, dg):
    B, n = dh.shape
    for b in range(B):
        for u in range(n):
            ig = a[b, u]
            fg = a[b, n + u]
            gg = a[b, 2 * n + u]
            og = a[b, 3 * n + u]
            t = tc[b, u]
            dhh = dHt[b, u] + dh[b, u]
            dcc = dc[b, u] + dhh * og * (np.float32(1.0) - t * t)
            dg[b, u] = dcc * gg * ig * (np.float32(1.0) - ig)
            dg[b, n + u] = dcc * cp[b, u] * fg * (np.float32(1.0) - fg)
            dg[b, 2 * n + u] = dcc * ig * (np.float32(1.0) - gg * gg)
            dg[b, 3 * n + u] = dhh * t * og * (np.float32(1.0) - og)
            dc[b, u] = dcc * fg


@njit(fastmath=True, error_model="numpy", cache=True)
def _lstm_bwd(dH, A, Call, TC, dG, dh, dc, rowptr, cols, data, bh, bw, dot):
    """dH (T, B, n) output gradients; dh / dc (B, n) hold dh_T / dc_T on entry, dh0 / dc0 on exit.
    dG (T, B, 4n) gets the pre-activation gradients. (rowptr, cols, data) is the layout of W_hh^T."""
    T = dH.shape[0]
    n = dH.shape[2]
    empty = np.empty(0, np.float32)
    for t in range(T - 1, -1, -1):
        _cell_bwd(dH[t], A[t], TC[t], Call[t], dh, dc, dG[t])
        _mm_serial(dG[t], rowptr, cols, data, bh, bw, n, 4 * n, dh, empty, 0, dot)


@njit(fastmath=True, error_model="numpy", cache=True, parallel=True)
def _lstm_fwd_par(G, Hall, Call, TC, rowptr, cols, data, bh, bw, dot, edges):
    """:func:`_lstm_fwd` with each step split over threads: the recurrent product by the parts
    ``edges`` (block rows balanced by kept blocks, or batch-row groups for the dot layout), then
    the gate math by batch rows. Two parallel regions per step (about 2 us each with numba's
    OpenMP layer); they only pay where a step's product is large (hidden 650+, batch 20+)."""
    T = G.shape[0]
    B = G.shape[1]
    n = Hall.shape[2]
    k = edges.shape[0] - 1
    empty = np.empty(0, np.float32)
    for t in range(T):
        for c in prange(k):
            _mm_range(Hall[t], rowptr, cols, data, bh, bw, 4 * n, n, G[t], empty, 1, dot, edges[c], edges[c + 1])
        for c in prange(k):
            b0 = c * B // k
            b1 = (c + 1) * B // k
            _cell_fwd(G[t, b0:b1], Call[t, b0:b1], Call[t + 1, b0:b1], Hall[t + 1, b0:b1], TC[t, b0:b1])


@njit(fastmath=True, error_model="numpy", cache=True, parallel=True)
def _lstm_bwd_par(dH, A, Call, TC, dG, dh, dc, rowptr, cols, data, bh, bw, dot, edges):
    """:func:`_lstm_bwd` with each step split over threads (the gate gradients by batch rows, then
    the transposed product by ``edges``)."""
    T = dH.shape[0]
    B = dH.shape[1]
    n = dH.shape[2]
    k = edges.shape[0] - 1
    empty = np.empty(0, np.float32)
    for t in range(T - 1, -1, -1):
        for c in prange(k):
            b0 = c * B // k
            b1 = (c + 1) * B // k
            _cell_bwd(dH[t, b0:b1], A[t, b0:b1], TC[t, b0:b1], Call[t, b0:b1], dh[b0:b1], dc[b0:b1], dG[t, b0:b1])
        for c in prange(k):
            _mm_range(dG[t], rowptr, cols, data, bh, bw, n, 4 * n, dh, empty, 0, dot, edges[c], edges[c + 1])


def _step_edges(lay: "BlockLayout", batch: int, k: int) -> np.ndarray:
    """Part boundaries for a per-step product split over k threads (see :func:`_mm`)."""
    return _edges(_splits(lay.rowptr, k, (batch + 3) // 4) if lay.dot else _splits(lay.rowptr, k))


_EMPTY = np.empty(0, np.float32)


def _threads() -> int:
    return numba.get_num_threads()


def _splits(rowptr: np.ndarray, k: int, n: Optional[int] = None):
    """k contiguous ranges of block rows with about equal kept blocks (or of n equal parts)."""
    if n is not None:
        edges = [round(i * n / k) for i in range(k + 1)]
    else:
        nb = rowptr.shape[0] - 1
        edges = [0] + [int(np.searchsorted(rowptr, rowptr[-1] * i / k)) for i in range(1, k)] + [nb]
        edges = [min(max(e, 0), nb) for e in edges]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _edges(ranges) -> np.ndarray:
    """The boundaries of contiguous ranges as one array (what the parallel kernels take)."""
    return np.array([r[0] for r in ranges] + [ranges[-1][1]] if ranges else [0, 0], np.int64)


@njit(fastmath=True, error_model="numpy", cache=True, parallel=True)
def _mm_par(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, dot, edges):
    for c in prange(edges.shape[0] - 1):
        _mm_range(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, dot, edges[c], edges[c + 1])


@njit(fastmath=True, error_model="numpy", cache=True, parallel=True)
def _mm_rows_par(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, row_edges):
    """Tall X: each part a band of rows over all block rows (no two parts share output rows; 8%
    faster than splitting the block rows at 700 x 650 by 650 x 2600 on 2 threads)."""
    nb = rowptr.shape[0] - 1
    for c in prange(row_edges.shape[0] - 1):
        r0, r1 = row_edges[c], row_edges[c + 1]
        _mm_range(X[r0:r1], rowptr, cols, data, bh, bw, R, C, Y[r0:r1], bias, mode_init, False, 0, nb)


@njit(fastmath=True, error_model="numpy", cache=True, parallel=True)
def _grad_blocks_par(dYT, XT, rowptr, rows, cols, bh, bw, R, C, out, edges):
    for c in prange(edges.shape[0] - 1):
        _grad_blocks(dYT, XT, rowptr, rows, cols, bh, bw, R, C, out, edges[c], edges[c + 1])


def _mm(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, dot, parallel):
    """Y = X @ W^T (mode_init 0), Y += X @ W^T (1), Y = bias + X @ W^T (2); W in block layout.
    ``parallel``: split over ``numba.get_num_threads()`` threads (block rows, or batch-row groups
    for the dot layout)."""
    k = _threads() if parallel else 1
    if k == 1:
        _mm_serial(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, dot)
        return
    M = X.shape[0]
    if not dot and M >= 2 * _PANEL:  # the time-batched products: equal bands of rows (multiples of the 8-row tile)
        row_edges = np.array([min(M, 8 * round(i * M / (8 * k))) for i in range(k + 1)], np.int64)
        row_edges[-1] = M
        _mm_rows_par(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, row_edges)
        return
    ranges = _splits(rowptr, k, (M + 3) // 4) if dot else _splits(rowptr, k)
    _mm_par(X, rowptr, cols, data, bh, bw, R, C, Y, bias, mode_init, dot, _edges(ranges))


# --------------------------------------------------------------------------------------------- Python API
def _pair(block) -> tuple[int, int]:
    if isinstance(block, int):
        return block, block
    bh, bw = (int(b) for b in block)
    if bh < 1 or bw < 1:
        raise ValueError(f"block sizes must be positive, got {block}")
    return bh, bw


def block_keep_from_weight(W: Tensor, block) -> Tensor:
    """Boolean (ceil(R/bh), ceil(C/bw)): the blocks of W holding any nonzero."""
    bh, bw = _pair(block)
    R, C = W.shape
    Rb, Cb = -(-R // bh), -(-C // bw)
    nz = torch.zeros(Rb * bh, Cb * bw, dtype=torch.bool, device=W.device)
    nz[:R, :C] = W.detach() != 0
    return nz.view(Rb, bh, Cb, bw).any(3).any(1)


def expand_keep(keep: Tensor, shape, block) -> Tensor:
    """The element mask (R, C) of a block keep mask."""
    bh, bw = _pair(block)
    R, C = shape
    return keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:R, :C]


class BlockLayout:
    """BSR-like layout of a (R x C) matrix cut into (bh, bw) blocks with the kept ones listed per
    block row: ``rowptr`` (Rb+1), ``rows`` / ``cols`` (block row / column of each kept block).
    ``dot`` False: ``data`` (nnzb, bw, bh) holds blocks transposed (axpy kernel); True: (nnzb, bh, bw)."""

    def __init__(self, keep: Tensor, shape, block):
        self.bh, self.bw = _pair(block)
        self.R, self.C = (int(s) for s in shape)
        Rb, Cb = -(-self.R // self.bh), -(-self.C // self.bw)
        keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
        if tuple(keep.shape) != (Rb, Cb):
            raise ValueError(f"keep mask of shape {tuple(keep.shape)}; blocks {(self.bh, self.bw)} of a "
                             f"{(self.R, self.C)} matrix need ({Rb}, {Cb})")
        k = keep.numpy()
        self.rows, self.cols = (a.astype(np.int64) for a in np.nonzero(k))
        self.rowptr = np.zeros(Rb + 1, np.int64)
        self.rowptr[1:] = np.cumsum(k.sum(1))
        self.nnzb = int(self.rows.shape[0])
        self.dot = self.bh < 8 and self.bw > self.bh
        self.density = self.nnzb / max(1, Rb * Cb)

    def data_shape(self):
        return (self.nnzb, self.bh, self.bw) if self.dot else (self.nnzb, self.bw, self.bh)

    def transposed(self, keep: Tensor) -> "BlockLayout":
        return BlockLayout(keep.t(), (self.C, self.R), (self.bw, self.bh))


def block_layout(keep: Tensor, shape, block) -> BlockLayout:
    return BlockLayout(keep, shape, block)


def gather_blocks(lay: BlockLayout, W) -> np.ndarray:
    """The kept blocks of the dense W (R x C; a tensor or array, may be a transposed view)."""
    Wn = W.detach().numpy() if isinstance(W, Tensor) else W
    data = np.empty(lay.data_shape(), np.float32)
    _gather(Wn, lay.rows, lay.cols, lay.bh, lay.bw, not lay.dot, data)
    return data


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def block_matmul(lay: BlockLayout, data: np.ndarray, X: Tensor, bias: Optional[Tensor] = None,
                 parallel: Optional[bool] = None) -> Tensor:
    """X (M, C) @ W^T (+ bias) -> (M, R) with W given by its layout and kept blocks."""
    Xn = _np(X)
    M = Xn.shape[0]
    Y = np.empty((M, lay.R), np.float32)
    if parallel is None:
        parallel = numba.get_num_threads() > 1 and M >= 64
    b = _EMPTY if bias is None else _np(bias)
    _mm(Xn, lay.rowptr, lay.cols, data, lay.bh, lay.bw, lay.R, lay.C, Y, b, 0 if bias is None else 2,
        lay.dot, bool(parallel))
    return torch.from_numpy(Y)


def _transpose(A: np.ndarray) -> np.ndarray:
    """A contiguous copy of A^T (torch's blocked copy)."""
    return torch.from_numpy(A).t().contiguous().numpy()


def block_grad(lay: BlockLayout, dY: Tensor, X: Tensor) -> Tensor:
    """dW = dY^T @ X (R x C) computed only on the kept blocks (zero elsewhere)."""
    return _dense_grad(lay, dY.detach().t().contiguous().numpy(), X.detach().t().contiguous().numpy())


def _dense_grad(lay: BlockLayout, dYT: np.ndarray, XT: np.ndarray) -> Tensor:
    """Dense-shaped gradient from the transposed operands dYT (R, M), XT (C, M)."""
    out = np.zeros((lay.R, lay.C), np.float32)
    if lay.nnzb:
        blocks = np.empty((lay.nnzb, lay.bh, lay.bw), np.float32)
        _grad_blocks_par(dYT, XT, lay.rowptr, lay.rows, lay.cols, lay.bh, lay.bw, lay.R, lay.C, blocks,
                         _edges(_splits(lay.rowptr, _threads())))
        _scatter(blocks, lay.rows, lay.cols, lay.bh, lay.bw, False, out)
    return torch.from_numpy(out)


class _Plan:
    """Layouts of W_ih, W_hh and their transposes for one keep pattern."""

    def __init__(self, keep_ih: Tensor, keep_hh: Tensor, input_size: int, hidden: int, block):
        self.ih = BlockLayout(keep_ih, (4 * hidden, input_size), block)
        self.hh = BlockLayout(keep_hh, (4 * hidden, hidden), block)
        self.ih_t = self.ih.transposed(keep_ih)
        self.hh_t = self.hh.transposed(keep_hh)


def _check(*tensors):
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(f"BlockSparseLSTM's numba executor runs float32 tensors on CPU only, got "
                             f"{t.dtype} on {t.device}; use nn.LSTM (with the pruned weights zeroed) on GPU "
                             "or for other dtypes")


class BlockSparseLSTMFunction(torch.autograd.Function):
    """(x (B, T, in), h0, c0 (B, n), W_ih, W_hh, b_ih, b_hh, plan) -> (out (B, T, n), h_n, c_n (B, n))."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, plan: _Plan, parallel_steps: bool = False):
        _check(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        B, T, _ = x.shape
        n = w_hh.shape[1]
        par = numba.get_num_threads() > 1
        xt = x.detach().transpose(0, 1).contiguous()  # (T, B, in)
        xn = xt.numpy().reshape(T * B, -1)
        bias = (b_ih.detach() + b_hh.detach()).contiguous().numpy()
        G = np.empty((T, B, 4 * n), np.float32)
        d_ih = gather_blocks(plan.ih, w_ih)
        _mm(xn, plan.ih.rowptr, plan.ih.cols, d_ih, plan.ih.bh, plan.ih.bw, plan.ih.R, plan.ih.C,
            G.reshape(T * B, 4 * n), bias, 2, plan.ih.dot, par)
        Hall = np.empty((T + 1, B, n), np.float32)
        Call = np.empty((T + 1, B, n), np.float32)
        TC = np.empty((T, B, n), np.float32)
        Hall[0] = h0.detach().numpy()
        Call[0] = c0.detach().numpy()
        d_hh = gather_blocks(plan.hh, w_hh)
        lh = plan.hh
        steps_par = parallel_steps and par
        if steps_par:
            _lstm_fwd_par(G, Hall, Call, TC, lh.rowptr, lh.cols, d_hh, lh.bh, lh.bw, lh.dot,
                          _step_edges(lh, B, numba.get_num_threads()))
        else:
            _lstm_fwd(G, Hall, Call, TC, lh.rowptr, lh.cols, d_hh, lh.bh, lh.bw, lh.dot)
        Ht = torch.from_numpy(Hall)
        # time-major memory, batch-first view: the strides nn.LSTM's output has, so that dropout after
        # the layer (bernoulli_ fills an empty_like(out) in memory order) draws the same masks; a copy,
        # so in-place ops on it cannot reach the states saved for backward
        out = torch.from_numpy(Hall[1:].copy()).transpose(0, 1)
        h_n = Ht[T].clone()
        c_n = torch.from_numpy(Call[T].copy())
        if any(ctx.needs_input_grad[:7]):
            ctx.plan = plan
            ctx.steps_par = steps_par
            ctx.saved = (xn, G, Hall, Call, TC)
            ctx.save_for_backward(w_ih, w_hh)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, g_out, g_hn, g_cn):
        plan = ctx.plan
        xn, A, Hall, Call, TC = ctx.saved
        w_ih, w_hh = ctx.saved_tensors
        T, B, n = TC.shape
        par = numba.get_num_threads() > 1
        if g_out is None:
            dH = np.zeros((T, B, n), np.float32)
        else:
            dH = g_out.detach().to(torch.float32).transpose(0, 1).contiguous().numpy()
        dh = np.zeros((B, n), np.float32) if g_hn is None else g_hn.detach().to(torch.float32).contiguous().numpy().copy()
        dc = np.zeros((B, n), np.float32) if g_cn is None else g_cn.detach().to(torch.float32).contiguous().numpy().copy()
        dG = np.empty((T, B, 4 * n), np.float32)
        lt = plan.hh_t
        d_hh_t = gather_blocks(lt, w_hh.detach().t())
        if ctx.steps_par and par:
            _lstm_bwd_par(dH, A, Call, TC, dG, dh, dc, lt.rowptr, lt.cols, d_hh_t, lt.bh, lt.bw, lt.dot,
                          _step_edges(lt, B, numba.get_num_threads()))
        else:
            _lstm_bwd(dH, A, Call, TC, dG, dh, dc, lt.rowptr, lt.cols, d_hh_t, lt.bh, lt.bw, lt.dot)
        dGm = dG.reshape(T * B, 4 * n)
        need = ctx.needs_input_grad
        dx = dw_ih = dw_hh = db = None
        if need[0]:
            li = plan.ih_t
            d_ih_t = gather_blocks(li, w_ih.detach().t())
            dxn = np.empty((T * B, li.R), np.float32)
            _mm(dGm, li.rowptr, li.cols, d_ih_t, li.bh, li.bw, li.R, li.C, dxn, _EMPTY, 0, li.dot, par)
            dx = torch.from_numpy(dxn).view(T, B, -1).transpose(0, 1)
        if need[3] or need[4]:
            dGT = _transpose(dGm)
        if need[3]:
            dw_ih = _dense_grad(plan.ih, dGT, _transpose(xn))
        if need[4]:
            dw_hh = _dense_grad(plan.hh, dGT, _transpose(Hall[:T].reshape(T * B, n)))
        if need[5] or need[6]:
            db = torch.from_numpy(dGm.sum(0, dtype=np.float64).astype(np.float32))
        dh0 = torch.from_numpy(dh) if need[1] else None
        dc0 = torch.from_numpy(dc) if need[2] else None
        db_ih = db if need[5] else None
        db_hh = (db.clone() if need[5] else db) if need[6] else None  # two tensors: .grad must not alias
        return (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None)


# --------------------------------------------------------------------------------------------- executors
_AUTO_CACHE: dict = {}
EXECUTORS = ("auto", "numba", "numba_parallel", "dense", "bsr")


def _dense_lstm(x, hx, w_ih, w_hh, b_ih, b_hh, train):
    out, h, c = torch._VF.lstm(x, hx, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, train, False, True)
    return out, (h, c)


def _bsr_inference(x, hx, w_ih, w_hh, b_ih, b_hh, block):
    """Inference with torch's BSR tensors (square blocks, weights zero-padded to whole blocks)."""
    b = block[0]
    B, T, I = x.shape
    n = w_hh.shape[1]

    def bsr(W):
        R, C = W.shape
        P = W.new_zeros(-(-R // b) * b, -(-C // b) * b)
        P[:R, :C] = W
        return P.to_sparse_bsr((b, b)), P.shape

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "BSR support is in beta state"
        s_ih, (_, ci) = bsr(w_ih)
        s_hh, (_, ch) = bsr(w_hh)
    xp = x.new_zeros(B * T, ci)
    xp[:, :I] = x.reshape(B * T, I)
    G = (s_ih @ xp.t()).t()[:, :4 * n].reshape(B, T, 4 * n) + (b_ih + b_hh)
    h = x.new_zeros(B, ch)
    h[:, :n] = hx[0][0]
    c = hx[1][0]
    outs = []
    for t in range(T):
        a = G[:, t] + (s_hh @ h.t()).t()[:, :4 * n]
        i, f, g, o = a.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        hn = torch.sigmoid(o) * torch.tanh(c)
        h[:, :n] = hn
        outs.append(hn)
    out = torch.stack(outs, 1)
    return out, (outs[-1].unsqueeze(0), c.unsqueeze(0))


def choose_executor(input_size: int, hidden: int, batch: int, steps: int = 35, block=(32, 32),
                    density: float = 0.2, threads: Optional[int] = None, training: bool = True,
                    repeats: int = 3, seed: int = 0) -> str:
    """Time the candidates on random weights of this shape and keep density at this thread count
    (numba and torch threads set alike) and return the fastest: ``"numba"``, ``"numba_parallel"``
    (more than one thread), ``"dense"`` (masked dense ``torch._VF.lstm``) or, for inference with
    square blocks, ``"bsr"``. Cached per shape, thread count and density (to 0.01), so gradual
    pruning re-times once per new density (about a second at hidden 650). The global RNG is left as
    it was."""
    bh, bw = _pair(block)
    threads = threads or numba.get_num_threads()
    key = (input_size, hidden, batch, steps, bh, bw, round(density, 2), threads, training)
    if key in _AUTO_CACHE:
        return _AUTO_CACHE[key]
    old_t, old_n = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with torch.random.fork_rng(devices=[]):  # the trial layer's initialisation must not move the global RNG
            g = torch.Generator().manual_seed(seed)
            lstm = nn.LSTM(input_size, hidden, batch_first=True)
            shape_ih, shape_hh = (4 * hidden, input_size), (4 * hidden, hidden)
            k_ih = torch.rand(-(-shape_ih[0] // bh), -(-shape_ih[1] // bw), generator=g) < density
            k_hh = torch.rand(-(-shape_hh[0] // bh), -(-shape_hh[1] // bw), generator=g) < density
            mod = BlockSparseLSTM.from_lstm(lstm, block=(bh, bw), keep_ih=k_ih, keep_hh=k_hh, executor="numba")
            x = torch.randn(batch, steps, input_size, generator=g)
            cands = ["numba", "dense"] + (["numba_parallel"] if threads > 1 else []) \
                + (["bsr"] if (not training and bh == bw) else [])
            times = {c: [] for c in cands}

            def run(c):
                mod.executor = c
                if training:
                    xx = x.clone().requires_grad_()
                    mod(xx)[0].sum().backward()
                else:
                    with torch.no_grad():
                        mod(x)
            for r in range(repeats + 1):
                for c in cands:
                    t0 = time.perf_counter()
                    run(c)
                    if r:
                        times[c].append(time.perf_counter() - t0)
            best = min(cands, key=lambda c: sorted(times[c])[len(times[c]) // 2])
    finally:
        torch.set_num_threads(old_t)
        numba.set_num_threads(old_n)
    _AUTO_CACHE[key] = best
    return best


class BlockSparseLSTM(nn.Module):
    """Drop-in for a single-layer ``nn.LSTM(input_size, hidden_size, batch_first=True)`` whose
    weights are pruned in blocks. ``executor``: ``"numba"`` (compiled block-sparse loop, CPU
    float32; the batched products on ``numba.get_num_threads()`` threads, the time loop on one),
    ``"numba_parallel"`` (the same with every time step split over the threads too; CPU
    float32), ``"dense"`` (masked dense ``torch._VF.lstm``; any device / dtype), ``"bsr"``
    (torch BSR, inference, square blocks) or ``"auto"`` (:func:`choose_executor` per input shape
    and thread count, cached; CPU float32 only, elsewhere ``"dense"``)."""

    def __init__(self, input_size: int, hidden_size: int, block=(32, 32), keep_ih: Optional[Tensor] = None,
                 keep_hh: Optional[Tensor] = None, executor: str = "auto"):
        super().__init__()
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.block = _pair(block)
        self.executor = executor
        n, bh, bw = hidden_size, *self.block
        k = 1.0 / math.sqrt(hidden_size)
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * n, input_size).uniform_(-k, k))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * n, n).uniform_(-k, k))
        self.bias_ih_l0 = nn.Parameter(torch.empty(4 * n).uniform_(-k, k))
        self.bias_hh_l0 = nn.Parameter(torch.empty(4 * n).uniform_(-k, k))
        full_ih = (-(-4 * n // bh), -(-input_size // bw))
        full_hh = (-(-4 * n // bh), -(-n // bw))
        self.register_buffer("keep_ih", torch.ones(full_ih, dtype=torch.bool) if keep_ih is None
                             else torch.as_tensor(keep_ih, dtype=torch.bool).clone())
        self.register_buffer("keep_hh", torch.ones(full_hh, dtype=torch.bool) if keep_hh is None
                             else torch.as_tensor(keep_hh, dtype=torch.bool).clone())
        if tuple(self.keep_ih.shape) != full_ih or tuple(self.keep_hh.shape) != full_hh:
            raise ValueError(f"keep masks must be {full_ih} and {full_hh} for blocks {self.block}, got "
                             f"{tuple(self.keep_ih.shape)} and {tuple(self.keep_hh.shape)}")
        self._plan, self._plan_key = None, None

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, block=(32, 32), keep_ih=None, keep_hh=None, executor: str = "auto",
                  **kw) -> "BlockSparseLSTM":
        if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first or not lstm.bias \
                or getattr(lstm, "proj_size", 0):
            raise ValueError("from_lstm takes a single-layer, unidirectional, batch_first LSTM with biases")
        if keep_ih is None:
            keep_ih = block_keep_from_weight(lstm.weight_ih_l0, block)
        if keep_hh is None:
            keep_hh = block_keep_from_weight(lstm.weight_hh_l0, block)
        m = cls(lstm.input_size, lstm.hidden_size, block, keep_ih, keep_hh, executor, **kw)
        with torch.no_grad():
            for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                getattr(m, name).copy_(getattr(lstm, name))
        return m.to(lstm.weight_ih_l0.device)

    def plan(self) -> _Plan:
        key = (self.keep_ih.data_ptr(), self.keep_hh.data_ptr(), self.keep_ih._version, self.keep_hh._version)
        if self._plan is None or key != self._plan_key:
            self._plan = _Plan(self.keep_ih, self.keep_hh, self.input_size, self.hidden_size, self.block)
            self._plan_key = key
        return self._plan

    def masked_weights(self):
        return (self.weight_ih_l0 * expand_keep(self.keep_ih, self.weight_ih_l0.shape, self.block),
                self.weight_hh_l0 * expand_keep(self.keep_hh, self.weight_hh_l0.shape, self.block))

    def density(self) -> float:
        return float((self.keep_ih.sum() + self.keep_hh.sum()) / (self.keep_ih.numel() + self.keep_hh.numel()))

    def forward(self, x: Tensor, hx=None):
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"expected input (batch, time, {self.input_size}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        n = self.hidden_size
        if hx is None:
            z = x.new_zeros(1, B, n)
            hx = (z, z)
        h0, c0 = hx
        ex = self.executor
        cpu32 = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, h0, c0, self.weight_ih_l0))
        if ex == "auto":
            if not cpu32:
                ex = "dense"
            else:
                training = torch.is_grad_enabled() and (x.requires_grad or self.weight_hh_l0.requires_grad)
                ex = choose_executor(self.input_size, n, B, T, self.block, self.density(), training=training)
        if ex == "dense":
            w_ih, w_hh = self.masked_weights()
            return _dense_lstm(x, (h0, c0), w_ih, w_hh, self.bias_ih_l0, self.bias_hh_l0, self.training)
        _check(x, h0, c0, self.weight_ih_l0)
        if ex == "bsr":
            if self.block[0] != self.block[1]:
                raise ValueError("the bsr executor needs square blocks")
            with torch.no_grad():
                w_ih, w_hh = self.masked_weights()
                return _bsr_inference(x, (h0, c0), w_ih, w_hh, self.bias_ih_l0, self.bias_hh_l0, self.block)
        out, h_n, c_n = BlockSparseLSTMFunction.apply(x, h0[0].contiguous(), c0[0].contiguous(), self.weight_ih_l0,
                                                      self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0, self.plan(),
                                                      ex == "numba_parallel")
        return out, (h_n.unsqueeze(0), c_n.unsqueeze(0))
