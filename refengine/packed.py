"""A linear layer kept in its plan's quantized format: decode uses the fused Numba matvec, prefill
dequantizes blocks of rows into a small scratch and multiplies each with BLAS (as the GPU engine's prefill
does with cuBLAS), so no full float32 copy of the matrix is ever made."""
from __future__ import annotations

import numpy as np

from refengine.kernels_numba import PackedLinear
from refengine.quant import QTensor


class QuantizedLinear:
    def __init__(self, t: QTensor):
        self.qtensor = t
        self.packed = PackedLinear(t)
        self.shape = t.shape

    @property
    def nbytes(self) -> int:
        return self.qtensor.nbytes

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (T, K) -> (T, N) = x W^T."""
        if x.shape[0] == 1:
            return self.packed.matvec(x[0])[None, :]
        return self.packed.matmul(x)


def linear(x: np.ndarray, w) -> np.ndarray:
    """x (T, K) times W^T for a float matrix or a QuantizedLinear."""
    return x @ w.T if isinstance(w, np.ndarray) else w.apply(x)
