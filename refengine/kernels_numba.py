"""Numba hot loops, same math as refengine.quant + NumPy matmul (tests/test_kernels_numba.py checks).

Fused dequantize + matrix-vector product on the packed format: no dequantized copy of the weights,
float32 accumulation per group, parallel over output rows.
"""
from __future__ import annotations

import numba
import numpy as np

from refengine.quant import QTensor


@numba.njit(parallel=True, cache=True)
def _matvec_slice(qw, scales, x, bits, group, out):  # pragma: no cover - compiled
    """out[n] += sum_g scales[n, g] * sum_{i in g} (code(n, i) - 2^(b-1)) * x[i]."""
    n_rows, r = qw.shape[0], x.shape[0]
    half = 1 << (bits - 1)
    mask = (1 << bits) - 1
    n_groups = (r + group - 1) // group
    for n in numba.prange(n_rows):
        acc = np.float32(0.0)
        for g in range(n_groups):
            s = np.float32(0.0)
            for i in range(g * group, min(r, (g + 1) * group)):
                bitpos = (i % 32) * bits
                word = (i // 32) * bits + bitpos // 32
                off = bitpos % 32
                v = np.int64(qw[n, word]) >> off
                if off + bits > 32:
                    v |= np.int64(qw[n, word + 1]) << (32 - off)
                s += np.float32((v & mask) - half) * x[i]
            acc += scales[n, g] * s
        out[n] += acc


class PackedLinear:
    """A QTensor prepared for the kernel: fp32 scales (converted once) and the input permutation."""

    def __init__(self, t: QTensor):
        self.shape = t.shape
        self.perm = t.perm
        self.group = t.option.group_size
        self.slices = [(s.start, s.rows, s.bits, np.ascontiguousarray(s.qweight),
                        s.scales.astype(np.float32)) for s in t.slices]

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """y = W x for x (K,) float32 -> (N,) float32."""
        xp = np.ascontiguousarray(x[self.perm] if self.perm is not None else x, dtype=np.float32)
        y = np.zeros(self.shape[0], dtype=np.float32) if out is None else out
        if out is not None:
            y[:] = 0
        for start, rows, bits, qw, scales in self.slices:
            _matvec_slice(qw, scales, xp[start:start + rows], bits, self.group, y)
        return y
