"""Reference quantize / dequantize for every format of planner.formats: weight options and KV formats.

Weights (layout and byte count defined in planner/formats.py, which the planner prices):
  per slice of input channels at b bits and per (output row, group of g inputs), symmetric with the
  llama.cpp q4_0 trick: d = m / -2^(b-1), where m is the group's value of largest magnitude, so m maps
  exactly to code 0 and all 2^b codes are used; q = clamp(round(w / d) + 2^(b-1), 0, 2^b - 1);
  w' = d * (q - 2^(b-1)), d stored as fp16.
  Error bound, per element: |w - w'| <= |d| * (1 + 2^(b-1) * 2^-10) + 2^(b-1) * 2^-24: half a step
  where unclamped, at most one step where the value opposite m clamps, plus the fp16 rounding of d
  (relative for normal scales, absolute for subnormal ones, i.e. weights below about 6e-5 * 2^(b-1)).
Round-to-nearest here; `quantize` takes an optional `codes_fn` so GPTQ can supply its own codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import ml_dtypes  # float8 e4m3 as a numpy dtype (see pyproject)
import numpy as np

from planner.formats import PACK_VALUES, KVFormat, QuantOption

FP16_SCALE_SLACK = 2.0 ** -10      # relative rounding of an fp16 scale is at most 2^-11; 2x margin
FP16_SUBNORMAL_STEP = 2.0 ** -24   # below 2^-14 an fp16 scale rounds to multiples of this (absolute error)
FP8_MAX = 448.0                    # largest finite float8 e4m3fn


# --- bit packing: 32 values of b bits <-> b uint32 words ------------------------------------------

def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(N, R) codes < 2^bits -> (N, ceil(R/32) * bits) uint32; value i of a unit fills bits [i*b, (i+1)*b)."""
    n, r = q.shape
    units = math.ceil(r / PACK_VALUES)
    v = np.zeros((n, units * PACK_VALUES), dtype=np.uint64)
    v[:, :r] = q
    v = v.reshape(n, units, PACK_VALUES)
    words = np.zeros((n, units, bits), dtype=np.uint64)
    for i in range(PACK_VALUES):
        word, off = divmod(i * bits, 32)
        words[:, :, word] |= (v[:, :, i] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        if off + bits > 32:
            words[:, :, word + 1] |= v[:, :, i] >> np.uint64(32 - off)
    return words.astype(np.uint32).reshape(n, units * bits)


def unpack(words: np.ndarray, bits: int, r: int) -> np.ndarray:
    """Inverse of pack: (N, units * bits) uint32 -> (N, r) uint8 codes."""
    n = words.shape[0]
    w = words.astype(np.uint64).reshape(n, -1, bits)
    out = np.empty((n, w.shape[1], PACK_VALUES), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for i in range(PACK_VALUES):
        word, off = divmod(i * bits, 32)
        val = w[:, :, word] >> np.uint64(off)
        if off + bits > 32:
            val |= w[:, :, word + 1] << np.uint64(32 - off)
        out[:, :, i] = val & mask
    return out.reshape(n, -1)[:, :r].astype(np.uint8)


# --- quantized weight tensors -----------------------------------------------------------------------

@dataclass(frozen=True)
class QSlice:
    start: int                 # first input channel (in permuted order)
    rows: int                  # input channels in this slice
    bits: int
    qweight: np.ndarray        # (N, ceil(rows/32) * bits) uint32
    scales: np.ndarray         # (N, ceil(rows/g)) float16


@dataclass(frozen=True)
class QTensor:
    """A linear (N out, K in) in one QuantOption, stored exactly as planner.formats counts it."""

    option: QuantOption
    shape: tuple[int, int]
    slices: tuple[QSlice, ...]
    perm: Optional[np.ndarray]     # (K,) int32 input order, mixed options only

    @property
    def header(self) -> np.ndarray:
        """The slice table as stored: int32 (first row, rows, bits) per slice."""
        return np.array([[s.start, s.rows, s.bits] for s in self.slices], dtype=np.int32)

    @property
    def nbytes(self) -> int:
        n = sum(s.qweight.nbytes + s.scales.nbytes for s in self.slices) + self.header.nbytes
        return n + (self.perm.nbytes if self.perm is not None else 0)


CodesFn = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]


def rtn_codes(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest: (N, R) float32 -> codes (N, R) uint8 and fp16 scales (N, ceil(R/g))."""
    n, r = w.shape
    groups = math.ceil(r / group)
    padded = np.zeros((n, groups * group), dtype=np.float32)
    padded[:, :r] = w
    g = padded.reshape(n, groups, group)
    idx = np.abs(g).argmax(axis=2)
    m = np.take_along_axis(g, idx[..., None], axis=2)[..., 0]
    half = 1 << (bits - 1)
    d = (m / -half).astype(np.float16)
    if not np.all(np.isfinite(d)):
        raise ValueError(f"weights too large for fp16 scales at {bits} bits (max |w| {float(np.abs(w).max()):.3g})")
    d32 = d.astype(np.float32)[..., None]
    safe = np.where(d32 == 0, 1.0, d32)
    q = np.clip(np.rint(g / safe) + half, 0, (1 << bits) - 1)
    q = np.where(d32 == 0, half, q)
    return q.reshape(n, -1)[:, :r].astype(np.uint8), d


def input_order(w: np.ndarray, importance: Optional[np.ndarray]) -> np.ndarray:
    """Most important input channels first: the given importance (e.g. mean squared activation), else
    column RMS of W (for isotropic inputs the output error is ||dW||_F, dominated by large columns)."""
    score = importance if importance is not None else np.sqrt((w.astype(np.float64) ** 2).mean(axis=0))
    return np.argsort(-score, kind="stable").astype(np.int32)


def quantize(w: np.ndarray, option: QuantOption, importance: Optional[np.ndarray] = None,
             codes_fn: CodesFn = rtn_codes) -> QTensor:
    """Quantize a (N, K) float matrix in `option` (round to nearest unless codes_fn says otherwise)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    rows = option.slice_rows(k)
    perm = input_order(w, importance) if len(rows) > 1 else None
    wp = w[:, perm] if perm is not None else w
    slices, start = [], 0
    for r, bits in rows:
        q, d = codes_fn(wp[:, start:start + r], bits, option.group_size)
        slices.append(QSlice(start, r, bits, pack(q, bits), d))
        start += r
    return QTensor(option, (n, k), tuple(slices), perm)


def _slice_values(s: QSlice, group: int) -> np.ndarray:
    half = 1 << (s.bits - 1)
    q = unpack(s.qweight, s.bits, s.rows).astype(np.float32) - half
    d = np.repeat(s.scales.astype(np.float32), group, axis=1)[:, :s.rows]
    return q * d


def dequantize(t: QTensor) -> np.ndarray:
    """(N, K) float32 weights back, in the original input order."""
    n, k = t.shape
    out = np.empty((n, k), dtype=np.float32)
    for s in t.slices:
        cols = t.perm[s.start:s.start + s.rows] if t.perm is not None else slice(s.start, s.start + s.rows)
        out[:, cols] = _slice_values(s, t.option.group_size)
    return out


def error_bound(t: QTensor) -> np.ndarray:
    """Per-element bound on |w - dequantize(quantize(w))|, from the stored scales (see module doc)."""
    n, k = t.shape
    out = np.empty((n, k), dtype=np.float32)
    for s in t.slices:
        cols = t.perm[s.start:s.start + s.rows] if t.perm is not None else slice(s.start, s.start + s.rows)
        d = np.abs(np.repeat(s.scales.astype(np.float32), t.option.group_size, axis=1)[:, :s.rows])
        half = 1 << (s.bits - 1)
        out[:, cols] = d * (1 + half * FP16_SCALE_SLACK) + half * FP16_SUBNORMAL_STEP
    return out


# --- KV cache formats: (..., head_dim) float32 <-> (..., row_bytes) uint8 ----------------------------

def _q8_rows(x: np.ndarray) -> np.ndarray:
    """llama.cpp block_q8_0: fp16 d = absmax/127, then 32 int8."""
    d = (np.abs(x).max(axis=-1, keepdims=True) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    q = np.where(d32 == 0, 0, np.rint(x / np.where(d32 == 0, 1, d32))).astype(np.int8)
    return np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=-1)


def _q4_rows(x: np.ndarray) -> np.ndarray:
    """llama.cpp block_q4_0: fp16 d = m/-8 (m the signed max), byte j holds codes j and j + 16."""
    q, d = rtn_codes(x.reshape(-1, 32), 4, 32)
    q = q.reshape(*x.shape)
    packed = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    return np.concatenate([d.reshape(*x.shape[:-1], 1).view(np.uint8), packed], axis=-1)


def kv_quantize(fmt: KVFormat, x: np.ndarray) -> np.ndarray:
    """Cache rows (..., head_dim) -> raw bytes (..., fmt.row_bytes(head_dim))."""
    x = np.asarray(x, dtype=np.float32)
    hd = x.shape[-1]
    if fmt.name == "fp16":
        return x.astype(np.float16).view(np.uint8)
    if fmt.name == "fp8":
        return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    blocks = math.ceil(hd / 32)
    xb = np.zeros((*x.shape[:-1], blocks, 32), dtype=np.float32)
    xb.reshape(*x.shape[:-1], blocks * 32)[..., :hd] = x
    rows = _q8_rows(xb) if fmt.name == "q8" else _q4_rows(xb)
    return rows.reshape(*x.shape[:-1], blocks * fmt.block_bytes)


def kv_dequantize(fmt: KVFormat, raw: np.ndarray, head_dim: int) -> np.ndarray:
    """Raw cache bytes (..., row_bytes) -> float32 rows (..., head_dim)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if fmt.name == "fp16":
        return raw.view(np.float16).astype(np.float32)
    if fmt.name == "fp8":
        return raw.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    blocks = raw.reshape(*raw.shape[:-1], -1, fmt.block_bytes)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)
    if fmt.name == "q8":
        q = blocks[..., 2:].view(np.int8).astype(np.float32)
    else:
        lo, hi = blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4
        q = np.concatenate([lo, hi], axis=-1).astype(np.float32) - 8
    return (q * d).reshape(*raw.shape[:-1], -1)[..., :head_dim]


def kv_error_bound(fmt: KVFormat, x: np.ndarray) -> np.ndarray:
    """Per-element bound on |x - kv_dequantize(kv_quantize(x))| for |x| <= 448."""
    x = np.asarray(x, dtype=np.float32)
    if fmt.name == "fp16":     # 11-bit significand; subnormal spacing 2^-24
        return np.abs(x) * 2.0 ** -11 + 2.0 ** -24
    if fmt.name == "fp8":      # e4m3: 4-bit significand; subnormal spacing 2^-9
        return np.abs(x) * 2.0 ** -4 + 2.0 ** -10
    hd = x.shape[-1]
    blocks = math.ceil(hd / 32)
    xb = np.zeros((*x.shape[:-1], blocks, 32), dtype=np.float32)
    xb.reshape(*x.shape[:-1], blocks * 32)[..., :hd] = x
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    step = amax / 127 if fmt.name == "q8" else amax / 8
    slack = 0.5 if fmt.name == "q8" else 1.0
    codes = 127 if fmt.name == "q8" else 8
    bound = step * (slack + codes * FP16_SCALE_SLACK) + codes * FP16_SUBNORMAL_STEP
    return np.broadcast_to(bound, xb.shape).reshape(*x.shape[:-1], blocks * 32)[..., :hd]

