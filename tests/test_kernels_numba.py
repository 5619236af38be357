"""Numba fused dequantize + matvec equals the NumPy oracle (dequantize, then matmul)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from planner.formats import OPTIONS
from refengine.kernels_numba import PackedLinear
from refengine.quant import dequantize, quantize


@given(st.sampled_from(OPTIONS), st.integers(1, 40), st.integers(1, 300), st.integers(0, 2**32 - 1))
@settings(max_examples=120, deadline=None)
def test_matvec_equals_numpy_oracle(option, n, k, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal(k) * 10).astype(np.float32)
    t = quantize(w, option)
    want = dequantize(t).astype(np.float64) @ x.astype(np.float64)
    got = PackedLinear(t).matvec(x)
    scale = np.abs(dequantize(t)).astype(np.float64) @ np.abs(x).astype(np.float64) + 1e-6
    assert np.all(np.abs(got - want) <= 1e-5 * scale)             # fp32 accumulation, relative to sum |w x|
