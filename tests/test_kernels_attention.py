"""The fused decode-attention kernel (refengine.kernels_attention) against the NumPy oracle: the element
decoders bit for bit, attention per KV format, head dim, GQA ratio and length, serial vs parallel path.

Tolerance: |kernel - oracle| <= 1e-5 * max |V| over the KV head's visible rows. The output is a convex
combination of those rows and both sides see the same dequantized values (the decoders are exact), so
they differ by float32 rounding only: score dots of D terms, the softmax, a weighted sum of `length`
rows, each a few ulps * sqrt(terms), about 1e-7 to 1e-6 of that scale here. One wrongly decoded
element moves the output by about |dv| / length, over 1e-3 at length 300, and a garbage row read past
`length` brings nan or inf in: both far outside the bound.
"""
from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from planner.formats import KV_CODES, KV_FORMATS, FormatError, kv_format
from refengine import kernels_attention as ka
from refengine import ops
from refengine.quant import kv_dequantize, kv_quantize
from test_kernels_numba_fast import map_float32

RTOL = 1e-5


def _caches(fmt_name: str, ctx: int, hkv: int, d: int, length: int, rng: np.random.Generator,
            scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Raw K and V caches (ctx, Hkv, R): quantized random rows below `length`, random bytes from there."""
    fmt = kv_format(fmt_name)
    raws = []
    for _ in range(2):
        raw = kv_quantize(fmt, rng.standard_normal((ctx, hkv, d)).astype(np.float32) * scale)
        raw[length:] = rng.integers(0, 256, size=raw[length:].shape, dtype=np.uint8)
        raws.append(raw)
    return raws[0], raws[1]


def _check(q: np.ndarray, k_raw: np.ndarray, v_raw: np.ndarray, length: int, fmt_name: str, cap: float = 0.0) -> None:
    fmt, (hq, d), hkv = kv_format(fmt_name), q.shape, k_raw.shape[1]
    keys = kv_dequantize(fmt, k_raw[:length], d)                                  # (S, Hkv, D)
    values = kv_dequantize(fmt, v_raw[:length], d)
    want = ops.attention(q[None], keys, values, np.array([length - 1]), cap=cap)[0]   # (Hq, D)
    got = ka.decode_attention(q, k_raw, v_raw, length, fmt_name, d, cap=cap)
    scale = np.repeat(np.abs(values).max(axis=(0, 2)), hq // hkv)[:, None]        # (Hq, 1)
    assert got.shape == (hq, d) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= RTOL * scale), float(np.max(np.abs(got - want) / scale))


# --- the element decoders, bit for bit ------------------------------------------------------------------

@numba.njit
def _decode(raw, fmt, block, rows, row_bytes, vals):
    dst = np.empty(rows * vals, dtype=np.float32)
    ka._decode_rows(raw, fmt, block, 0, rows, row_bytes, dst)
    return dst


def _same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    nan = np.isnan(want)
    return bool(np.array_equal(np.isnan(got), nan)
                and np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)))


def test_half_decoding_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)               # subnormals, signed zeros, inf, nan included
    assert _same_bits(map_float32(ka._half16, bits), bits.view(np.float16).astype(np.float32))


def test_e4m3_decoding_is_exact_for_every_byte():
    codes = np.arange(256, dtype=np.uint8)
    assert _same_bits(map_float32(ka._e4m3, codes), codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32))


@pytest.mark.parametrize("fmt_name", KV_FORMATS)
@pytest.mark.parametrize("d", [64, 48, 7])
def test_row_decoding_equals_kv_dequantize(fmt_name, d):
    fmt, rng = kv_format(fmt_name), np.random.default_rng(d)
    raw = kv_quantize(fmt, rng.standard_normal((5, 3, d)).astype(np.float32) * 10)   # (5, 3, R)
    vals = {"fp16": d, "fp8": d}.get(fmt_name, raw.shape[-1] // fmt.block_bytes * fmt.block)
    got = _decode(raw.reshape(-1), KV_CODES[fmt_name], fmt.block, 15, raw.shape[-1], vals)
    want = kv_dequantize(fmt, raw, d)
    assert np.array_equal(got.reshape(5, 3, vals)[..., :d], want)


# --- attention -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt_name", KV_FORMATS)
@pytest.mark.parametrize("d", [64, 48])
@pytest.mark.parametrize("ratio", [1, 3])
@pytest.mark.parametrize("length", [1, 7, 300])
def test_equals_numpy_oracle(fmt_name, d, ratio, length):
    rng = np.random.default_rng([d, ratio, length])
    k_raw, v_raw = _caches(fmt_name, length + 9, 2, d, length, rng)
    q = rng.standard_normal((2 * ratio, d)).astype(np.float32)
    _check(q, k_raw, v_raw, length, fmt_name)


@pytest.mark.parametrize("length", [7, 300])
def test_fp16_large_activations(length):
    """K and V of magnitude ~1e3 (outliers up to ~4e3, inside fp16's range); q small enough that the
    scores stay O(1-10) as in a trained model, so the oracle's own float32 rounding stays small."""
    rng = np.random.default_rng(length)
    k_raw, v_raw = _caches("fp16", length + 3, 3, 64, length, rng, scale=1e3)
    q = (rng.standard_normal((9, 64)) * 4e-3).astype(np.float32)
    _check(q, k_raw, v_raw, length, "fp16")


@given(st.sampled_from(list(KV_FORMATS)), st.integers(1, 80), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 200), st.integers(0, 5), st.sampled_from([0.0, 0.0, 0.7, 50.0]), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_random_shapes_equal_oracle(fmt_name, d, hkv, ratio, length, extra, cap, seed):
    """Any shape, with and without Gemma 2's soft cap on the scores (0.7 binds on these, 50 barely)."""
    rng = np.random.default_rng(seed)
    k_raw, v_raw = _caches(fmt_name, length + extra, hkv, d, length, rng)
    q = rng.standard_normal((hkv * ratio, d)).astype(np.float32)
    _check(q, k_raw, v_raw, length, fmt_name, cap)


def _spy(monkeypatch, name: str) -> list:
    calls, kernel = [], getattr(ka, name)
    monkeypatch.setattr(ka, name, lambda *a: calls.append(1) or kernel(*a))
    return calls


@pytest.mark.parametrize("fmt_name", ["fp16", "q4"])
def test_parallel_path_equals_serial(monkeypatch, fmt_name):
    if numba.get_num_threads() < 2:
        pytest.skip("one Numba thread: the parallel path is never taken")
    rng = np.random.default_rng(1)
    length = 5 * ka.CHUNK + 3                                   # several chunks, the last one partial
    k_raw, v_raw = _caches(fmt_name, length + 4, 3, 64, length, rng)
    q = rng.standard_normal((9, 64)).astype(np.float32)
    serial_calls, parallel_calls = _spy(monkeypatch, "_attend_serial"), _spy(monkeypatch, "_attend_parallel")
    monkeypatch.setattr(ka, "PARALLEL_MIN_WORK", 1 << 62)
    serial = ka.decode_attention(q, k_raw, v_raw, length, fmt_name, 64)
    monkeypatch.setattr(ka, "PARALLEL_MIN_WORK", 0)
    out = np.full((9, 64), np.nan, dtype=np.float32)
    parallel = ka.decode_attention(q, k_raw, v_raw, length, fmt_name, 64, out=out)
    assert (len(serial_calls), len(parallel_calls)) == (1, 1)
    assert parallel is out
    assert np.array_equal(parallel, serial)                     # same chunks, same order: bit for bit
    _check(q, k_raw, v_raw, length, fmt_name)


def test_small_cases_stay_serial(monkeypatch):
    rng = np.random.default_rng(2)
    k_raw, v_raw = _caches("q8", 16, 3, 64, 16, rng)
    calls = _spy(monkeypatch, "_attend_parallel")
    ka.decode_attention(rng.standard_normal((9, 64)).astype(np.float32), k_raw, v_raw, 16, "q8", 64)
    assert 16 * 9 * 64 < ka.PARALLEL_MIN_WORK and not calls


def test_bad_arguments_raise():
    rng = np.random.default_rng(3)
    k_raw, v_raw = _caches("q8", 8, 2, 64, 8, rng)
    q = np.zeros((4, 64), dtype=np.float32)
    for length in (0, 9):
        with pytest.raises(ValueError, match="length"):
            ka.decode_attention(q, k_raw, v_raw, length, "q8", 64)
    with pytest.raises(ValueError, match="row"):
        ka.decode_attention(q, k_raw, v_raw, 4, "fp16", 64)          # q8 rows read as fp16
    with pytest.raises(ValueError):
        ka.decode_attention(np.zeros((3, 64), dtype=np.float32), k_raw, v_raw, 4, "q8", 64)   # 3 % 2 heads
    with pytest.raises(ValueError):
        ka.decode_attention(q, k_raw, v_raw[:, :1], 4, "q8", 64)
    with pytest.raises(FormatError):
        ka.decode_attention(q, k_raw, v_raw, 4, "q5", 64)
