"""The vectorized kernels of refengine.kernels_numba: code extraction, fp16 scales, matvec on every path
(one thread and parallel, row blocks and row chunks, out=), matmul; all against NumPy oracles."""
from __future__ import annotations

import inspect

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from planner.formats import OPTIONS, parse_option
from refengine import kernels_numba as kn
from refengine.kernels_numba import PackedLinear, matvec_generic
from refengine.quant import QSlice, QTensor, dequantize, pack, quantize, unpack


def _oracle(t: QTensor, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = dequantize(t).astype(np.float64)
    return w @ x.astype(np.float64), np.abs(w) @ np.abs(x).astype(np.float64) + 1e-30


def test_generated_code_is_current():
    src = inspect.getsource(kn)
    block = src.split("# BEGIN GENERATED")[1].split("# END GENERATED")[0]
    want = "\n\n".join(kn._codes_source(b) for b in kn.KERNEL_BITS)
    assert block.split("\n", 1)[1].strip() == want.strip()


@pytest.mark.parametrize("bits", kn.KERNEL_BITS)
def test_codes_equal_unpack(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(1, 64), dtype=np.uint8)
    words = pack(q, bits)[0]
    codes = getattr(kn, f"_codes{bits}")
    got = [c for u in range(2) for c in codes(words, np.uint64(bits * u))]
    assert got == list(unpack(words[None], bits, 64)[0])


@numba.njit
def map_float32(f, a):
    """[f(v) for v in a] as float32, f a compiled scalar function (an element decoder under test)."""
    out = np.empty(a.shape[0], dtype=np.float32)
    for i in range(a.shape[0]):
        out[i] = f(a[i])
    return out


def test_fp16_scale_decoding_is_exact():
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    got = map_float32(kn._h2f, bits[finite])
    want = bits[finite].view(np.float16).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))     # bit for bit, signed zeros too


@given(st.sampled_from(OPTIONS), st.integers(1, 300), st.sampled_from([1, 7, 33, 200, 577, 1000, 4096, 4130, 9001]),
       st.booleans(), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_matvec_paths_equal_oracle(option, n, k, parallel, seed):
    rng = np.random.default_rng(seed)
    n = max(1, n // 8) if k > 4096 else n                     # long rows: few of them
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal(k) * 10).astype(np.float32)
    t = quantize(w, option)
    p = PackedLinear(t)
    p._parallel = parallel
    want, scale = _oracle(t, x)
    got = p.matvec(x)
    assert got.dtype == np.float32 and got.shape == (n,)
    assert np.all(np.abs(got - want) <= 1e-5 * scale)
    out = np.full(2 * n, np.nan, dtype=np.float32)
    assert p.matvec(x, out=out[::2]) is not None
    assert np.array_equal(out[::2], got)                       # strided out: same values
    buf = np.full(n, np.nan, dtype=np.float32)
    assert p.matvec(x, out=buf) is buf and np.array_equal(buf, got)
    assert np.all(np.abs(matvec_generic(t, x) - want) <= 1e-5 * scale)


@pytest.mark.parametrize("name", ["1:4b g128", "0.1:4b/0.9:3b g128", "1:8b g32", "1:2b g128",
                                  "0.1:4b/0.4:3b/0.5:2b g128", "0.1:6b/0.9:5b g128"])
@pytest.mark.parametrize("n,k", [(576, 576), (300, 1536), (40, 11008)])
def test_model_shapes(name, n, k):
    rng = np.random.default_rng(0)
    t = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.02, parse_option(name))
    x = rng.standard_normal(k).astype(np.float32)
    want, scale = _oracle(t, x)
    for parallel in (False, True):
        p = PackedLinear(t)
        p._parallel = parallel
        assert np.all(np.abs(p.matvec(x) - want) <= 1e-5 * scale)


def test_extreme_scales():
    """Subnormal fp16 scales (tiny weights) and large ones decode exactly in the kernel."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 300)).astype(np.float32)
    w[:32] *= 1e-6
    w[32:] *= 1e3
    x = rng.standard_normal(300).astype(np.float32)
    for name in ("1:4b g32", "1:8b g128", "0.1:4b/0.9:3b g128"):
        t = quantize(w, parse_option(name))
        want, scale = _oracle(t, x)
        assert np.all(np.abs(PackedLinear(t).matvec(x) - want) <= 1e-5 * scale)


@given(st.sampled_from(OPTIONS), st.integers(1, 70), st.integers(1, 700), st.integers(1, 9),
       st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_matmul_equals_oracle(option, n, k, tokens, seed):
    rng = np.random.default_rng(seed)
    t = quantize(rng.standard_normal((n, k)).astype(np.float32), option)
    X = rng.standard_normal((tokens, k)).astype(np.float32)
    w = dequantize(t).astype(np.float64)
    want = X.astype(np.float64) @ w.T
    scale = np.abs(X).astype(np.float64) @ np.abs(w).T + 1e-30
    got = PackedLinear(t).matmul(X)
    assert got.shape == (tokens, n) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= 1e-5 * scale)


def test_matmul_blocks_and_dequantized_values():
    """Several dequantization blocks; one token gives W x, values as dequantize's float32."""
    rng = np.random.default_rng(2)
    t = quantize(rng.standard_normal((700, 1000)).astype(np.float32), parse_option("0.1:4b/0.9:3b g128"))
    p = PackedLinear(t)
    eye = np.eye(1000, dtype=np.float32)
    old = kn.MATMUL_BLOCK_FLOATS
    kn.MATMUL_BLOCK_FLOATS = 200 * 1024
    try:
        assert np.array_equal(p.matmul(eye).T, dequantize(t))   # X = I recovers W exactly
    finally:
        kn.MATMUL_BLOCK_FLOATS = old


def test_shape_errors():
    t = quantize(np.ones((4, 40), dtype=np.float32), parse_option("1:4b g32"))
    p = PackedLinear(t)
    with pytest.raises(ValueError):
        p.matvec(np.ones(41, dtype=np.float32))
    with pytest.raises(ValueError):
        p.matmul(np.ones((2, 41), dtype=np.float32))
    s = t.slices[0]
    bad = QTensor(t.option, t.shape, (QSlice(s.start, s.rows, s.bits, s.qweight[:, :-1], s.scales),), None)
    with pytest.raises(ValueError):
        PackedLinear(bad)
