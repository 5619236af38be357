"""The float64 oracle: the reference engine's architecture as one plain, full-sequence forward pass.

No KV cache, no chunking, no packed kernels: every position attends to 0..t under a causal mask, in
float64, with the exact weight values the engine uses (a QuantizedLinear is dequantized, the fp16 embedding
widened). The float32 engine's fast paths (chunked prefill, decode, fused quantized matvecs, KV formats)
are tested against it. Shape legend as in refengine/ops.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from hwdb import ModelSpec
from planner.spec import tensors
from refengine import ops
from refengine.arch import Arch, decoder_layer
from refengine.model import check_supported
from refengine.packed import QuantizedLinear
from refengine.quant import dequantize
from refengine.weights import ROPE_INTERLEAVED

if TYPE_CHECKING:
    from refengine.api import Model


def exact_values(w, dtype: type = np.float64) -> np.ndarray:
    """The values the engine computes with, in `dtype`: a QuantizedLinear's dequantized weights (exact in
    float32: a code times an fp16 scale), any other array cast (the fp16 embedding widens exactly)."""
    if isinstance(w, QuantizedLinear):
        w = dequantize(w.qtensor)
    return np.asarray(w).astype(dtype, copy=False)


def oracle_weights(spec: ModelSpec, weights: Mapping, dtype: type = np.float64) -> dict[str, np.ndarray]:
    """Every tensor the forward pass reads, converted once (so repeated oracle calls do not redo it)."""
    names = [t.name for t in tensors(spec)]
    if "head" in weights and "head" not in names:      # a plan quantizes the tied head on its own
        names.append("head")
    return {n: exact_values(weights[n], dtype) for n in names}


def oracle_logits(spec: ModelSpec, weights: Mapping, ids: Sequence[int], rope_interleaved: bool,
                  dtype: type = np.float64, rope_factors: np.ndarray | None = None) -> np.ndarray:
    """Teacher-forced logits (T, V) in `dtype` for ids at positions 0..T-1; rope_factors: a scaled RoPE's
    (Checkpoint.rope_factors)."""
    check_supported(spec)
    w = weights if _converted(weights, dtype) else oracle_weights(spec, weights, dtype)
    arch = Arch(spec)
    ids = np.asarray(ids, dtype=np.int64)                                        # (T,)
    pos = np.arange(len(ids))                                                    # (T,)
    tables = arch.rope_tables(pos, dtype, rope_factors)                          # (T, D/2) each

    def lin(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[name].T

    def attend(i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        return ops.attention(q, k, v, pos, window=arch.window(i), cap=spec.attn_softcap)   # (T, Hq, D)

    x = arch.embed(w["embed"][ids])                                              # (T, H)
    for i in range(spec.num_layers):
        x = decoder_layer(arch, w, i, x, lin, attend, tables, rope_interleaved)[0]
    return arch.logits(x, w, lin, "head" if "head" in w else "embed")          # (T, V); tied: the embedding


def _converted(weights: Mapping, dtype: type) -> bool:
    return isinstance(weights, dict) and all(isinstance(a, np.ndarray) and a.dtype == dtype
                                             for a in weights.values())


def oracle_for(model: "Model", dtype: type = np.float64) -> Callable[[Sequence[int]], np.ndarray]:
    """ids -> oracle logits (T, V) for a loaded refengine.api.Model, with the weights it runs (a plan's
    packed linears included), read once, up front, through model.weights."""
    w = oracle_weights(model.spec, model.weights, dtype)
    interleaved = model.checkpoint.rope_layout == ROPE_INTERLEAVED
    return lambda ids: oracle_logits(model.spec, w, ids, interleaved, dtype, model.checkpoint.rope_factors)
