"""Reference formats: bit packing, exact stored bytes (= the planner's count), and the stated error bounds."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from planner.formats import KV_FORMATS, OPTIONS, WEIGHT_BITS
from refengine.quant import (dequantize, error_bound, kv_dequantize, kv_error_bound, kv_quantize, pack, quantize,
                             unpack)


@given(st.sampled_from(WEIGHT_BITS), st.integers(1, 5), st.integers(1, 150), st.integers(0, 2**32 - 1))
@settings(max_examples=150, deadline=None)
def test_pack_round_trips(bits, n, r, seed):
    q = np.random.default_rng(seed).integers(0, 1 << bits, size=(n, r), dtype=np.uint8)
    words = pack(q, bits)
    assert words.dtype == np.uint32 and words.shape == (n, -(-r // 32) * bits)
    assert np.array_equal(unpack(words, bits, r), q)


@st.composite
def matrices(draw):
    n, k = draw(st.integers(1, 48)), draw(st.integers(1, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal((n, k)).astype(np.float32) * draw(st.sampled_from([1e-5, 1e-3, 0.05, 1.0, 30.0]))
    if draw(st.booleans()):                         # outliers, as real weights have
        w[rng.integers(0, n, 3), rng.integers(0, k, 3)] *= 50
    if draw(st.booleans()):
        w[:, : k // 3] = 0                          # all-zero groups
    return w


@given(matrices(), st.sampled_from(OPTIONS))
@settings(max_examples=250, deadline=None)
def test_round_trip_within_the_stated_bound(w, option):
    t = quantize(w, option)
    assert t.nbytes == option.tensor_bytes(*w.shape)            # exactly what the planner prices
    back = dequantize(t)
    assert back.shape == w.shape and np.all(np.isfinite(back))
    assert np.all(np.abs(back - w) <= error_bound(t) + 1e-30)


def test_more_bits_less_error():
    w = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    uniform = [o for o in OPTIONS if len(o.slices) == 1 and o.group_size == 128]
    errs = [np.linalg.norm(dequantize(quantize(w, o)) - w) / np.linalg.norm(w) for o in uniform]
    assert errs == sorted(errs, reverse=True)
    assert 0.05 < errs[uniform.index(next(o for o in uniform if o.slices[0][1] == 4))] < 0.15


def test_mixed_option_gives_wide_slice_to_important_inputs():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 1024)).astype(np.float32)
    importance = np.zeros(1024)
    importance[:128] = 1.0
    t = quantize(w, next(o for o in OPTIONS if o.slices[0] == (0.1, 4)), importance=importance)
    assert set(t.perm[: t.slices[0].rows].tolist()) == set(range(128)) and t.slices[0].bits == 4


@given(st.sampled_from(list(KV_FORMATS.values())), st.sampled_from([32, 64, 80, 96, 128, 256]),
       st.integers(1, 6), st.integers(0, 2**32 - 1), st.sampled_from([0.01, 1.0, 20.0]))
@settings(max_examples=200, deadline=None)
def test_kv_formats_round_trip_within_bound(fmt, head_dim, rows, seed, scale):
    x = (np.random.default_rng(seed).standard_normal((rows, head_dim)) * scale).astype(np.float32)
    raw = kv_quantize(fmt, x)
    assert raw.dtype == np.uint8 and raw.shape == (rows, fmt.row_bytes(head_dim))
    back = kv_dequantize(fmt, raw, head_dim)
    assert np.all(np.abs(back - x) <= kv_error_bound(fmt, x))


def test_fp8_saturates_instead_of_nan():
    x = np.array([[1000.0, -1000.0] + [0.0] * 30], dtype=np.float32)
    back = kv_dequantize(KV_FORMATS["fp8"], kv_quantize(KV_FORMATS["fp8"], x), 32)
    assert np.all(np.isfinite(back)) and back[0, 0] == 448 and back[0, 1] == -448


def test_q8_block_layout_is_llama_cpp_q8_0():
    x = np.arange(32, dtype=np.float32)[None, :] - 16
    raw = kv_quantize(KV_FORMATS["q8"], x)[0]
    d = raw[:2].view(np.float16)[0]
    assert d == np.float16(16 / 127) and raw[2:].view(np.int8)[0] == -127


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_zero_matrix_is_exact(bits):
    option = next(o for o in OPTIONS if o.slices[0][1] == bits)
    w = np.zeros((4, 96), dtype=np.float32)
    assert np.array_equal(dequantize(quantize(w, option)), w)
