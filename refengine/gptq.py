"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323) into the storage format of refengine.quant, so dequantize, pack,
PackedLinear and the GPU kernels read its output unchanged.

GPTQ minimizes the layer's output error ||X W^T - X W'^T||_F^2 = n/2 tr(dW H dW^T), with H = 2/n X^T X
(X: n calibration inputs) the Hessian of that loss in each row of W. It quantizes the input channels (columns of W) one at a time and
moves each column's rounding error onto the columns not yet quantized, weighted by the upper Cholesky
factor U of H^-1 (U^T U = H^-1): w[:, j+1:] -= err_j * U[j, j+1:] / U[j, j] (the paper's Algorithm 1).
The feedback is applied lazily: inside a block of columns as each column is done, to the columns after
the block once per block as one matrix product (the paper's "lazy batch updates").

How this module maps the paper (and the reference implementation, IST-DASLab/gptq) onto our formats:
  - act-order: columns in descending diag(H) (the paper's "act-order" heuristic, AutoGPTQ `desc_act`);
    for mixed options the same order decides which columns the wider slices get, consistent with
    refengine.quant.input_order, and it is stored as the tensor's `perm`;
  - groups are counted per slice, as quant.quantize's per-slice codes are: group g of a slice covers its
    columns [g*G, (g+1)*G). A group's fp16 scale is chosen the RTN way (rtn_codes: d = m / -2^(b-1),
    m the signed max) from the group's current, error-updated weights when GPTQ reaches its first column;
  - single-slice options store no permutation (planner.formats prices none), so their act-order walks
    the columns in diag(H) order while keeping groups of natural-order columns, with scales fixed from
    the weights before any feedback (AutoGPTQ's `static_groups`); without act-order they run in natural
    order with scales from the current weights like the mixed case;
  - every value fed back is the one dequantize() gives (fp16 scale, float32 code times scale), so the
    error the later columns compensate is exactly the stored tensor's.

Calibration size matters: with fewer samples than inputs H is rank-deficient and GPTQ fits those samples.
Measured on SmolLM2-135M layers.3.mlp.gate (K = 576), relative output error at 3 and 4 bits g128: on its
196 calibration tokens 0.3x RTN's, on other text 1.3x RTN's (worse); with 4,096 tokens of similar text,
0.78x RTN's on unseen text of that kind (0.76x with damp=0.1, which generalizes better when data is short).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from planner.formats import QuantOption
from refengine.quant import QSlice, QTensor, input_order, pack

_BASE = 256     # triangular inverses up to this size go to LAPACK in one call


class HessianAccumulator:
    """H = 2/n X^T X (float64) over all calibration rows seen so far, added batch by batch."""

    def __init__(self, k: int):
        self.H = np.zeros((k, k), dtype=np.float64)      # (K, K)
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        """x (..., K): the layer's inputs; each row is one sample (a running mean, as GPTQ's add_batch)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.H.shape[0])      # (n, K)
        if len(x) == 0:
            return
        total = self.count + len(x)
        self.H *= self.count / total
        self.H += (2.0 / total) * (x.T @ x)
        self.count = total


def hessian(x: np.ndarray) -> np.ndarray:
    """2/n X^T X (K, K) float64 for calibration inputs x (n, K) of one linear."""
    acc = HessianAccumulator(np.shape(x)[-1])
    acc.add(x)
    return acc.H


def _tri_inv(L: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular matrix, blocked: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]
    (NumPy has no triangular solver; this is n^3/3 flops of matrix products against solve's ~8n^3/3)."""
    n = len(L)
    if n <= _BASE:
        return np.linalg.solve(L, np.eye(n))
    h = n // 2
    X = np.zeros_like(L)
    X[:h, :h], X[h:, h:] = _tri_inv(L[:h, :h]), _tri_inv(L[h:, h:])
    X[h:, :h] = -X[h:, h:] @ L[h:, :h] @ X[:h, :h]
    return X


def _hinv_upper(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = the inverse), float64.

    Without forming the inverse (the reference code takes cholesky, cholesky_inverse, cholesky again):
    with J the reversal, J H J = M M^T gives H = R R^T for the upper R = J M J, so H^-1 = R^-T R^-1 and
    U = R^-1 = J M^-1 J."""
    k = len(H)
    H = H + damp * float(np.mean(np.diag(H))) * np.eye(k)
    try:
        M = np.linalg.cholesky(H[::-1, ::-1])
    except np.linalg.LinAlgError:
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp}); "
                         "use more calibration data or a larger damp") from None
    return np.ascontiguousarray(_tri_inv(M)[::-1, ::-1])


def _group_scale(g: np.ndarray, bits: int) -> np.ndarray:
    """fp16 scales (N,) from a group's weights (G, N), the rtn_codes rule: d = m / -2^(b-1), m the signed max."""
    m = g[np.abs(g).argmax(axis=0), np.arange(g.shape[1])]
    d = (m / -(1 << (bits - 1))).astype(np.float16)
    if not np.all(np.isfinite(d)):
        raise ValueError(f"weights too large for fp16 scales at {bits} bits (max |w| {float(np.abs(g).max()):.3g})")
    return d


def _codes(w: np.ndarray, d32: np.ndarray, bits: int) -> np.ndarray:
    """One column (N,) -> codes (N,) as float32; for a float32 column exactly as rtn_codes rounds and clamps."""
    half = 1 << (bits - 1)
    q = np.clip(np.rint(w / np.where(d32 == 0, 1.0, d32)) + half, 0, (1 << bits) - 1)
    return np.where(d32 == 0, half, q).astype(np.float32)


def _column_loop(wt: np.ndarray, U: np.ndarray, bits: np.ndarray, group_end: np.ndarray,
                 scales: np.ndarray, block: int) -> np.ndarray:
    """The GPTQ loop over the rows of wt (K, N), in place, in wt's dtype (float32 in gptq_quantize: its
    codes match float64 feedback's to about 1 in 1000 and the output error to 5 digits on SmolLM2);
    returns codes (K, N) uint8.

    bits[t]: the width of column t; group_end[t] > t: column t opens a group ending there whose scale is
    taken now from the current weights into scales[t:end] (K, N) fp16; otherwise scales[t] is used as
    given. Blocks never split a dynamic group (the caller aligns `block` to the group size)."""
    k, n = wt.shape
    codes = np.empty((k, n), dtype=np.uint8)
    Uw = U.astype(wt.dtype)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1, Ub = wt[b0:b1], Uw[b0:b1, b0:b1]                  # views: (B, N), (B, B)
        err = np.empty((b1 - b0, n), dtype=wt.dtype)          # (B, N) scaled errors of the block
        for i in range(b1 - b0):
            t, b = b0 + i, int(bits[b0 + i])
            if group_end[t] > t:
                assert group_end[t] <= b1, "a block splits a group"
                scales[t:group_end[t]] = _group_scale(W1[i:group_end[t] - b0], b)
            d32 = scales[t].astype(np.float32)
            q = _codes(W1[i], d32, b)
            codes[t] = q
            err[i] = (W1[i] - (q - (1 << (b - 1))) * d32) / Ub[i, i]
            W1[i + 1:] -= Ub[i, i + 1:, None] * err[i][None, :]
        wt[b1:] -= Uw[b0:b1, b1:].T @ err                      # lazy batch update of the later columns
    return codes


DEFAULT_DAMP = 0.1   # the paper's 0.01 overfits the few thousand calibration tokens a CPU run affords:
                     # 0.1 was better at every calibration size tried on SmolLM2 (see the module doc)


def gptq_quantize(w: np.ndarray, option: QuantOption, H: np.ndarray, damp: float = DEFAULT_DAMP,
                  act_order: bool = True, block: int = 128) -> QTensor:
    """Quantize a (N, K) linear in `option` by GPTQ, with H (K, K) = hessian(calibration inputs).

    damp: added to diag(H) as a fraction of its mean; act_order: walk columns by descending diag(H)
    (mixed options always do, since that order also assigns the slices); block: columns per lazy update,
    rounded down to whole groups."""
    w = np.array(w, dtype=np.float32)                          # (N, K), a copy
    n, k = w.shape
    if np.shape(H) != (k, k):
        raise ValueError(f"H has shape {np.shape(H)}, expected ({k}, {k}) for a weight of shape {w.shape}")
    H = np.array(H, dtype=np.float64)
    importance = np.diag(H).copy()
    dead = importance == 0                                     # inputs never active: any weight is exact
    H[dead, dead] = 1.0
    w[:, dead] = 0.0
    G, rows = option.group_size, option.slice_rows(k)
    mixed = len(rows) > 1
    order = input_order(w, importance) if (mixed or act_order) else np.arange(k, dtype=np.int32)
    bits, group_end = np.empty(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    scales = np.zeros((k, n), dtype=np.float16)                # (K, N) scale of each processed column
    start = 0
    for r, b in rows:
        bits[start:start + r] = b
        if mixed or not act_order:                             # groups in processing order, scales as they come
            group_end[start:start + r:G] = np.minimum(np.arange(start, start + r, G) + G, start + r)
        start += r
    if not mixed and act_order:                                # static groups: natural-order groups, fixed now
        scales[:] = np.repeat(_static_scales(w, rows[0][1], G), G, axis=0)[:k][order]
    wt = np.ascontiguousarray(w[:, order].T)                   # (K, N) one column of W per row
    U = _hinv_upper(H[np.ix_(order, order)], damp)
    block = max(G, block // G * G)
    codes = _column_loop(wt, U, bits, group_end, scales, block)
    if not mixed:
        codes[order], scales[order] = codes.copy(), scales.copy()   # back to natural order
    return _assemble(option, (n, k), rows, codes, scales, order if mixed else None)


def _static_scales(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """fp16 scales (ceil(K/G), N) of the natural-order groups of w (N, K)."""
    return np.stack([_group_scale(w[:, c:c + group].T, bits) for c in range(0, w.shape[1], group)])


def _assemble(option: QuantOption, shape: tuple[int, int], rows, codes: np.ndarray, scales: np.ndarray,
              perm: Optional[np.ndarray]) -> QTensor:
    """Per-column codes and scales (K, N), in stored column order, -> a QTensor of packed slices."""
    G, slices, start = option.group_size, [], 0
    for r, b in rows:
        q = np.ascontiguousarray(codes[start:start + r].T)                   # (N, r)
        d = np.ascontiguousarray(scales[start:start + r:G].T)                # (N, ceil(r/G))
        assert d.shape[1] == math.ceil(r / G)
        slices.append(QSlice(start, r, b, pack(q, b), d))
        start += r
    return QTensor(option, shape, tuple(slices), perm)
