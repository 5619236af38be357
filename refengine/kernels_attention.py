"""Numba decode attention over the quantized KV cache, fused with the cache's dequantization.

Same math as ops.attention(q[None], kv_dequantize(k), kv_dequantize(v), [length - 1]) for one new token
(tests/test_kernels_attention.py checks), without a dequantized copy of the cache: each cached element is
decoded from its raw bytes in the kernel. The decoded values are exactly the oracle's (fp16 and e4m3 are
exact in float32; q8 / q4 values are an fp16 scale times a small integer, also exact), so the results
differ from the oracle by summation order only.

Work is split into tasks of CHUNK positions, flash-decoding style (Dao et al. 2023, "Flash-Decoding for
long-context inference"): a task decodes its positions' K and V rows of every KV head (one contiguous run
of the cache, so the decode loops are long and vectorize; each row once for all G = Hq / Hkv query heads
that share it), and keeps per query head its chunk's max score m, l = sum exp(s - m) and the unnormalized
output acc = sum exp(s - m) v. The chunks are then merged per head in float64:
out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c with M = max_c m_c. Chunks do not depend on the
thread count, so the parallel and serial paths compute the same numbers in the same order. Within a
chunk, scores and acc are float32 (at most D and CHUNK terms), l is float64.

Shapes: Hq query heads, Hkv KV heads, G = Hq / Hkv, D head dim, C cached positions (ctx), R row bytes.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from planner.formats import KV_CODES, kv_format

CHUNK = 64                      # positions per task: its decoded K and V (CHUNK, Hkv, D) stay in L2
PARALLEL_MIN_WORK = 1 << 18     # length * Hq * D below this runs on one thread: a parallel region costs
                                # 10-50 us to start and its spinning workers slow BLAS calls after it
_I = np.int32
_U = np.uint64                  # unsigned indices: no negative-index fix-up, so loops vectorize


# --- element decoders: raw bytes -> the exact float32 value of refengine.quant.kv_dequantize ----------

@numba.njit(inline="always")
def _half16(h):  # pragma: no cover - compiled
    """IEEE half bits -> float32, subnormals, inf and nan included: the magnitude is
    (mantissa with implicit bit) * 2^(max(e, 1) - 25), every factor and product exact."""
    v = _I(h)
    e = _I(v >> 10 & 31)
    m = _I(v & 1023)
    mm = _I(m | 1024) if e > 0 else m
    f = np.float32(mm) * np.float32(_I(1) << _I(max(e, 1) - 1)) * np.float32(2.0 ** -24)
    special = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    f = special if e == 31 else f
    return -f if v >= 32768 else f


@numba.njit(inline="always")
def _e4m3(b):  # pragma: no cover - compiled
    """float8 e4m3fn byte -> float32: bias 7, no infinities, nan only at exponent and mantissa all ones;
    the magnitude is (mantissa with implicit bit) * 2^(max(e, 1) - 10)."""
    v = _I(b)
    e = _I(v >> 3 & 15)
    m = _I(v & 7)
    mm = _I(m | 8) if e > 0 else m
    f = np.float32(mm) * np.float32(_I(1) << _I(max(e, 1) - 1)) * np.float32(2.0 ** -9)
    f = np.float32(np.nan) if (v & 127) == 127 else f
    return -f if v >= 128 else f


@numba.njit(inline="always")
def _decode_rows(raw, fmt, block, r0, rows, row_bytes, dst):  # pragma: no cover - compiled
    """dst[r * V + i] = value i of cache row r0 + r (rows of row_bytes bytes in flat raw) for r < rows,
    V the values stored per row (D, or whole blocks for q8 / q4, padding included).

    block (values per q8 / q4 block, 32) comes in at run time on purpose: with a constant trip count
    LLVM unrolls the block loop fully and, Numba leaving the SLP vectorizer off, runs it scalar (4x
    slower); each iteration writes both halves of a block, so the loop vectorizes with 16 lanes."""
    b0, h = _U(r0 * row_bytes), _U(block // 2)
    if fmt == 0:                                     # fp16: one long loop over the rows' halves
        raw16 = raw.view(np.uint16)
        for e in range(_U(rows * row_bytes // 2)):
            dst[e] = _half16(raw16[b0 // _U(2) + e])
    elif fmt == 1:                                   # fp8 e4m3fn
        for e in range(_U(rows * row_bytes)):
            dst[e] = _e4m3(raw[b0 + e])
    elif fmt == 2:                                   # block_q8_0: fp16 scale, then block int8
        for k in range(_U(rows * row_bytes // (block + 2))):
            p, o = b0 + (h + h + _U(2)) * k, (h + h) * k
            s = _half16(_I(raw[p]) | _I(raw[p + _U(1)]) << 8)
            for i in range(h):
                c = _I(raw[p + _U(2) + i])
                dst[o + i] = s * np.float32(c - (c >> 7 << 8))
                c = _I(raw[p + _U(2) + h + i])
                dst[o + h + i] = s * np.float32(c - (c >> 7 << 8))
    else:                                            # block_q4_0: fp16 scale, byte i = codes i, i + block/2
        for k in range(_U(rows * row_bytes // (block // 2 + 2))):
            p, o = b0 + (h + _U(2)) * k, (h + h) * k
            s = _half16(_I(raw[p]) | _I(raw[p + _U(1)]) << 8)
            for i in range(h):
                c = _I(raw[p + _U(2) + i])
                dst[o + i] = s * np.float32((c & 15) - 8)
                dst[o + h + i] = s * np.float32((c >> 4) - 8)


# --- one task: positions [s0, s1) of every KV head --------------------------------------------------

@numba.njit(fastmath={"reassoc", "contract"}, cache=True)
def _task(qs, k_raw, v_raw, fmt, block, hkv, row_bytes, s0, s1, cap, m_out, l_out, acc_out):  # pragma: no cover
    """m_out (Hq,), l_out (Hq,), acc_out (Hq, D): the chunk's max score, sum of exp(score - max) and
    unnormalized output per query head; cap > 0: each score soft-capped first (ops.softcap). fastmath
    'reassoc' lets the score dots vectorize: their order is fixed by the compiled code (deterministic), not
    the order written here."""
    hq, d = acc_out.shape
    g_n, n = hq // hkv, s1 - s0
    vals = (row_bytes // 2 if fmt == 0 else row_bytes if fmt == 1                 # values per row
            else row_bytes // (block + 2) * block if fmt == 2 else row_bytes // (block // 2 + 2) * block)
    kc = np.empty(n * hkv * vals, dtype=np.float32)   # (n, Hkv, V) decoded keys
    vc = np.empty(n * hkv * vals, dtype=np.float32)   # (n, Hkv, V) decoded values
    _decode_rows(k_raw, fmt, block, s0 * hkv, n * hkv, row_bytes, kc)
    _decode_rows(v_raw, fmt, block, s0 * hkv, n * hkv, row_bytes, vc)
    sc = np.empty(n, dtype=np.float32)
    for h in range(hq):
        kh, q, acc = _U(h // g_n), qs[h], acc_out[h]
        m = np.float32(-np.inf)
        for j in range(_U(n)):
            o = (j * _U(hkv) + kh) * _U(vals)
            t = np.float32(0.0)
            for i in range(_U(d)):
                t += q[i] * kc[o + i]
            if cap > 0:
                t = np.float32(np.tanh(t / cap) * cap)
            sc[j] = t
            m = max(m, t)
        l = 0.0
        for j in range(_U(n)):
            p = np.exp(sc[j] - m)
            sc[j] = p
            l += np.float64(p)
        acc[:] = 0.0
        for j in range(_U(n)):
            p, o = sc[j], (j * _U(hkv) + kh) * _U(vals)
            for i in range(_U(d)):
                acc[i] += p * vc[o + i]
        m_out[h], l_out[h] = m, l


@numba.njit(cache=True)
def _merge(m, l, acc, out):  # pragma: no cover - compiled
    """Per query head, the softmax over all chunks from the chunks' (m, l, acc)."""
    n_chunks, hq, d = acc.shape
    num = np.empty(d, dtype=np.float64)
    for h in range(hq):
        top = m[0, h]
        for c in range(1, n_chunks):
            top = max(top, m[c, h])
        den = 0.0
        num[:] = 0.0
        for c in range(n_chunks):
            w = np.exp(np.float64(m[c, h]) - np.float64(top))
            den += w * l[c, h]
            for i in range(d):
                num[i] += w * acc[c, h, i]
        for i in range(d):
            out[h, i] = np.float32(num[i] / den)


@numba.njit(cache=True)
def _attend_serial(qs, k_raw, v_raw, fmt, block, hkv, row_bytes, length, cap, m, l, acc, out):  # pragma: no cover
    for c in range(acc.shape[0]):
        s0, s1 = c * CHUNK, min(length, (c + 1) * CHUNK)
        _task(qs, k_raw, v_raw, fmt, block, hkv, row_bytes, s0, s1, cap, m[c], l[c], acc[c])
    _merge(m, l, acc, out)


@numba.njit(parallel=True, cache=True)
def _attend_parallel(qs, k_raw, v_raw, fmt, block, hkv, row_bytes, length, cap, m, l, acc, out):  # pragma: no cover
    for c in numba.prange(acc.shape[0]):
        s0, s1 = c * CHUNK, min(length, (c + 1) * CHUNK)
        _task(qs, k_raw, v_raw, fmt, block, hkv, row_bytes, s0, s1, cap, m[c], l[c], acc[c])
    _merge(m, l, acc, out)


# --- the public wrapper -------------------------------------------------------------------------------

def decode_attention(q: np.ndarray, k_raw: np.ndarray, v_raw: np.ndarray, length: int, fmt_name: str,
                     head_dim: int, out: np.ndarray | None = None, cap: float = 0.0) -> np.ndarray:
    """One token's attention: q (Hq, D) float32, already rotated, over raw caches k_raw, v_raw (C, Hkv, R)
    uint8 in KV format fmt_name, positions 0..length-1 (the token's own K, V at length - 1) -> (Hq, D).
    A sliding window passes the window's rows only; cap: Gemma 2's soft cap on the scores (0: none)."""
    fmt = kv_format(fmt_name)
    q = np.ascontiguousarray(q, dtype=np.float32)
    k_raw = np.ascontiguousarray(k_raw, dtype=np.uint8)
    v_raw = np.ascontiguousarray(v_raw, dtype=np.uint8)
    hq, d = q.shape if q.ndim == 2 else (0, -1)
    if d != head_dim or k_raw.ndim != 3 or v_raw.shape != k_raw.shape:
        raise ValueError(f"q {q.shape}, k_raw {k_raw.shape}, v_raw {v_raw.shape}: expected (Hq, {head_dim}) "
                         f"and two equal (ctx, Hkv, row_bytes)")
    ctx, hkv, row_bytes = k_raw.shape
    if row_bytes != fmt.row_bytes(head_dim) or hkv == 0 or hq % hkv:
        raise ValueError(f"caches {k_raw.shape} do not fit {fmt_name} rows of {fmt.row_bytes(head_dim)} bytes "
                         f"or {hq} query heads")
    if not 1 <= length <= ctx:
        raise ValueError(f"length {length} outside 1..{ctx} (the cache's positions)")
    direct = (out is not None and out.dtype == np.float32 and out.shape == (hq, d)
              and out.flags.c_contiguous and out.flags.writeable)
    y = out if direct else np.empty((hq, d), dtype=np.float32)
    qs = q * np.float32(1 / math.sqrt(d))                                      # (Hq, D) scaled queries
    chunks = -(-length // CHUNK)
    m = np.empty((chunks, hq), dtype=np.float32)                               # per chunk and head
    l = np.empty((chunks, hq), dtype=np.float64)
    acc = np.empty((chunks, hq, d), dtype=np.float32)
    parallel = length * hq * d >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1
    kernel = _attend_parallel if parallel else _attend_serial
    kernel(qs, k_raw.reshape(-1), v_raw.reshape(-1), np.int64(KV_CODES[fmt.name]), np.int64(fmt.block),
           np.int64(hkv), np.int64(row_bytes), np.int64(length), np.float32(cap), m, l, acc, y)
    if out is not None and not direct:
        out[...] = y
        return out
    return y
