"""NumPy reference ops: the definition of correct for every faster kernel.

Shape legend: T tokens in the step, S cached positions, H hidden size, Hq heads, Hkv KV heads,
D head dim, G = Hq / Hkv heads per KV head, F MLP width, V vocab. Each op returns its input's float dtype:
float32 in the engine, float64 in the oracle (refengine/oracle.py).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, H) * rsqrt(mean(x^2) + eps) * w (H,) -> (T, H); the mean in float64 (activations reach ~1e4)."""
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)).astype(x.dtype) * w


def heads(x: np.ndarray, n: int, d: int, norm: np.ndarray | None, eps: float) -> np.ndarray:
    """x (T, n*D) as (T, n, D); with a norm weight (D,), each head RMS-normalized by it (Qwen3's q_norm and
    k_norm, before RoPE)."""
    x = x.reshape(len(x), n, d)
    return x if norm is None else rmsnorm(x, norm, eps)


def unfuse(w: Mapping[str, Any], q_dim: int, kv_dim: int,
           rows: Callable[[Any, int, int], Any] = lambda a, r0, r1: a[r0:r1]) -> dict[str, Any]:
    """Phi-3's fused linears as the separate ones a Llama has: each attn.qkv (and its bias) cut by output rows
    into attn.q, attn.k, attn.v, each mlp.gate_up into mlp.gate (first half) and mlp.up; the rest as it is.
    rows(value, r0, r1) cuts one (views of NumPy arrays here; the CUDA engine's device linears: layout.row_block)."""
    out = dict(w)
    for name, a in w.items():
        if name.endswith(("attn.qkv", "attn.qkv.bias")):
            for n, r0, r1 in (("q", 0, q_dim), ("k", q_dim, q_dim + kv_dim), ("v", q_dim + kv_dim, q_dim + 2 * kv_dim)):
                out[name.replace(".qkv", f".{n}")] = rows(a, r0, r1)
        elif name.endswith("mlp.gate_up"):
            half, stem = a.shape[0] // 2, name[:-len("gate_up")]
            out[stem + "gate"], out[stem + "up"] = rows(a, 0, half), rows(a, half, 2 * half)
    return out


def rope_factors(kind: str, params: dict, dim: int, theta: float) -> np.ndarray:
    """Each RoPE pair's frequency divisor (D/2,) for a config.json rope_scaling (planner.spec.hf_rope_scaling):
    "linear" divides every frequency by its factor; "llama3" (Llama 3.1 on) leaves the pairs whose wavelength is
    under original_max_position_embeddings / high_freq_factor alone, divides those over .../ low_freq_factor by
    factor, and blends between, as transformers' llama3 RoPE and llama.cpp's converter (its rope_freqs) do;
    "yarn" (Qwen2.5 / Qwen3 past 32K) likewise between the pairs turning beta_fast (32) and beta_slow (1)
    times over the original context, its dims rounded outwards, as transformers' YaRN and ggml's rope_yarn."""
    factor = float(params["factor"])
    if kind == "linear":
        return np.full(dim // 2, factor)
    if kind == "yarn":
        original = float(params["original_max_position_embeddings"])
        fast, slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

        def turning_dim(turns: float) -> float:        # the dim whose wavelength fits `turns` times in `original`
            return dim * np.log(original / (turns * 2 * np.pi)) / (2 * np.log(theta))
        low, high = max(np.floor(turning_dim(fast)), 0), min(np.ceil(turning_dim(slow)), dim - 1)
        ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 0.001), 0, 1)   # 0: extrapolate, 1: divide
        return 1 / (1 - ramp + ramp / factor)
    if kind != "llama3":
        raise ValueError(f"RoPE scaling {kind!r} has no frequency factors")
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))


def rope_mscale(kind: str, params: dict) -> float:
    """What YaRN multiplies cos and sin by (attention logits by its square): attention_factor where config.json
    gives it, else 0.1 ln(factor) + 1 (transformers; ggml's rope_yarn likewise); 1 for the other scalings."""
    if kind != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = float(params["factor"])

    def m(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * np.log(factor) + 1.0
    if params.get("mscale") and params.get("mscale_all_dim"):
        return m(float(params["mscale"])) / m(float(params["mscale_all_dim"]))
    return m(1.0)


def rope_tables(positions: np.ndarray, dim: int, theta: float, dtype: type = np.float32,
                factors: np.ndarray | None = None, mscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, D/2) for the given positions: frequency i is theta^(-2i/D) (divided by factors[i] where a
    scaled RoPE gives them), computed in float64; YaRN's mscale multiplies both."""
    inv = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)             # (D/2,)
    if factors is not None:
        inv = inv / np.asarray(factors, dtype=np.float64)
    ang = positions.astype(np.float64)[:, None] * inv[None, :]                  # (T, D/2)
    return (mscale * np.cos(ang)).astype(dtype), (mscale * np.sin(ang)).astype(dtype)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotate x (T, heads, D). interleaved: pairs (2i, 2i+1), the layout llama.cpp's converter permutes
    Llama q/k into; else pairs (i, i + D/2), the Hugging Face / NeoX layout."""
    c, s = cos[:, None, :], sin[:, None, :]                                     # (T, 1, D/2)
    if interleaved and x.flags.c_contiguous and x.dtype in (np.float32, np.float64):
        # each pair (x[2i], x[2i+1]) read as the complex number x[2i] + i x[2i+1], times e^(i angle)
        z = np.dtype(np.complex64 if x.dtype == np.float32 else np.complex128)
        rot = (c + 1j * s).astype(z)                                           # (T, 1, D/2)
        return (x.view(z) * rot).view(x.dtype)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    """Along the last axis, max-subtracted."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """Gemma 2's soft cap: cap * tanh(x / cap), x itself for cap 0."""
    return x if not cap else (np.tanh(x / x.dtype.type(cap)) * x.dtype.type(cap)).astype(x.dtype, copy=False)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray | None = None,
              window: int = 0, cap: float = 0.0) -> np.ndarray:
    """Causal GQA: q (T, Hq, D) at positions q_pos (T,), cached k, v (S, Hkv, D) at positions k_pos (S,;
    default 0..S-1) -> (T, Hq, D).

    Query t sees the cached positions p <= q_pos[t], and with a sliding window only q_pos[t] - p < window
    (Hugging Face's and llama.cpp's window: the query and window - 1 before it). cap: scores soft-capped
    (softcap) before the softmax."""
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    g = hq // hkv
    k_pos = np.arange(s) if k_pos is None else k_pos
    qg = q.reshape(t, hkv, g, d).transpose(1, 2, 0, 3)                          # (Hkv, G, T, D)
    scores = softcap(qg @ k.transpose(1, 2, 0)[:, None] / q.dtype.type(np.sqrt(d)), cap)     # (Hkv, G, T, S)
    visible = k_pos[None, :] <= q_pos[:, None]                                   # (T, S)
    if window:
        visible &= q_pos[:, None] - k_pos[None, :] < window
    scores = np.where(visible, scores, -np.inf)
    out = softmax(scores) @ v.transpose(1, 0, 2)[:, None]                        # (Hkv, G, T, D)
    return out.transpose(2, 0, 1, 3).reshape(t, hq, d).astype(q.dtype)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (Gemma's GeGLU; PyTorch's gelu(approximate="tanh")), x (1 + tanh z) / 2 with
    z = sqrt(2 / pi) (x + 0.044715 x^3), written as x / (1 + e^(-2z)): the same function, without the
    cancellation 1 + tanh z suffers in float32 where x is negative (at x = -4 it keeps 3 digits of 7)."""
    c = x.dtype.type(2 * np.sqrt(2 / np.pi))
    with np.errstate(over="ignore"):             # e^(-2z) overflows to inf for x below -45: x / inf = -0
        return x / (1 + np.exp(-c * (x + x.dtype.type(0.044715) * x * x * x)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}     # ModelSpec.activation -> the gated MLP's function


