"""The Llama-family forward pass in NumPy, with all run state allocated once from the planner's byte functions.

Weights arrive as a mapping from canonical tensor names (planner/spec.py) to float32 arrays of shape
(out, in); a loader may materialize them lazily, one layer at a time.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from hwdb import ModelSpec
from planner import memory as mem
from planner.formats import kv_format
from planner.spec import ENGINE_FAMILIES, unsupported_fields, window_gap
from refengine import ops
from refengine.kernels_attention import decode_attention
from refengine.packed import linear
from refengine.quant import kv_dequantize, kv_quantize


class UnsupportedModel(ValueError):
    """An architecture the reference engine does not run yet."""


def check_supported(spec: ModelSpec, ctx: int | None = None) -> None:
    if spec.family not in ENGINE_FAMILIES:   # a Gemma's tensors are named as a Llama's: refuse it by name
        raise UnsupportedModel(f"{spec.name}: the {spec.family} architecture is not supported by the reference "
                               f"engine yet (it runs {', '.join(ENGINE_FAMILIES)})")
    gaps = unsupported_fields(spec)          # planner.spec holds the fields: plans read them too
    if gaps:
        field, want = gaps[0]
        runs = " or ".join(f"{field}={w!r}" for w in (want if isinstance(want, tuple) else (want,)))
        raise UnsupportedModel(f"{spec.name}: {field}={getattr(spec, field)!r} is not supported by the reference "
                               f"engine yet (it runs {runs})")
    if window_gap(spec, ctx):
        raise UnsupportedModel(f"{spec.name}: a {ctx}-token context passes its {spec.sliding_window}-token sliding "
                               f"window, which the engines do not implement yet (they attend over every position); "
                               f"plan --ctx {spec.sliding_window} or less")


def fill_rope_factors(arrays: Mapping, spec: ModelSpec, factors: np.ndarray | None) -> np.ndarray | None:
    """A scaled RoPE's factors (Checkpoint.rope_factors) into the run state's rope_freqs buffer, which
    planner.memory gives exactly the models whose spec scales RoPE: the buffer, or None without scaling."""
    if "rope_freqs" not in arrays:
        if factors is not None:
            raise UnsupportedModel(f"{spec.name}: RoPE factors given for a model without rope_scaling")
        return None
    if factors is None or np.shape(factors) != arrays["rope_freqs"].shape:
        raise UnsupportedModel(f"{spec.name}: rope_scaling {spec.rope_scaling!r} needs its factors, "
                               f"{arrays['rope_freqs'].shape[0]} of them (Checkpoint.rope_factors)")
    buf, host = arrays["rope_freqs"], np.asarray(factors, dtype=np.float32)
    if isinstance(buf, np.ndarray):
        buf[...] = host
    else:
        buf.set(host)                                      # the CUDA engine's buffer (CuPy)
    return buf


class RunState:
    """Every buffer of a run, allocated once: exactly planner.memory's buffers, nothing more."""

    def __init__(self, spec: ModelSpec, ctx: int, chunk: int, kv_name: str):
        self.kv = kv_format(kv_name)
        self.buffers = mem.run_state_buffers(spec, ctx, chunk, logits=True, gemm_staging=False)
        self.buffers += mem.kv_cache_buffers(spec, ctx, self.kv, range(spec.num_layers))
        dtypes = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "u8": np.uint8}
        self.arrays = {b.name: np.zeros(b.shape, dtype=dtypes[b.dtype]) for b in self.buffers}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


class Transformer:
    """forward(tokens) appends tokens at the current position and returns their logits (T, V)."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], ctx: int, kv_name: str = "fp16",
                 chunk: int = mem.DEFAULT_CHUNK, rope_interleaved: bool = True,
                 rope_factors: np.ndarray | None = None):
        check_supported(spec, ctx)
        self.spec, self.w, self.ctx = spec, weights, ctx
        self.chunk = min(chunk, ctx)
        self.rope_interleaved = rope_interleaved
        self.state = RunState(spec, ctx, self.chunk, kv_name)
        self.rope_factors = fill_rope_factors(self.state.arrays, spec, rope_factors)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def forward(self, tokens: list[int]) -> np.ndarray:
        if self.pos + len(tokens) > self.ctx:
            raise ValueError(f"{self.pos + len(tokens)} tokens exceed the planned context of {self.ctx}")
        out = []
        for i in range(0, len(tokens), self.chunk):
            out.append(self._step(np.asarray(tokens[i:i + self.chunk], dtype=np.int32)).copy())
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _step(self, tokens: np.ndarray) -> np.ndarray:
        spec, st, t = self.spec, self.state, len(tokens)
        st["tokens"][:t] = tokens
        st["positions"][:t] = np.arange(self.pos, self.pos + t)
        x = st["x"][:t]                                                          # (T, H)
        x[:] = self.w["embed"][tokens]
        cos, sin = ops.rope_tables(st["positions"][:t], spec.head_dim, spec.rope_theta, factors=self.rope_factors)
        for i in range(spec.num_layers):
            x += self._attention(i, ops.rmsnorm(x, self.w[f"layers.{i}.norm.0"], spec.norm_eps), cos, sin)
            xn = ops.rmsnorm(x, self.w[f"layers.{i}.norm.1"], spec.norm_eps)
            p = f"layers.{i}.mlp"
            if spec.fused_gate_up:         # Phi-3: one linear, gate's outputs then up's
                gate, up = np.split(linear(xn, self.w[f"{p}.gate_up"]), 2, axis=1)
            else:
                gate, up = linear(xn, self.w[f"{p}.gate"]), linear(xn, self.w[f"{p}.up"])
            hidden = ops.silu(gate) * up                                                          # (T, F)
            x += linear(hidden, self.w[f"{p}.down"])
        xn = ops.rmsnorm(x, self.w["norm.final"], spec.norm_eps)
        head = self.w["head"] if "head" in self.w else self.w["embed"].astype(np.float32)   # tied: embed
        logits = st["logits"][:t]                                                # (T, V)
        logits[:] = linear(xn, head)
        self.pos += t
        return logits

    def _attention(self, i: int, xn: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        spec, st, t, p = self.spec, self.state, len(xn), f"layers.{i}.attn"
        if spec.fused_qkv:                 # Phi-3: one linear, its outputs q, k, v in that order
            qkv = linear(xn, self.w[f"{p}.qkv"]) + (self.w[f"{p}.qkv.bias"] if spec.qkv_bias else 0)
            q, k, v = np.split(qkv, [spec.q_dim, spec.q_dim + spec.kv_dim], axis=1)
        else:
            q = linear(xn, self.w[f"{p}.q"]) + (self.w[f"{p}.q.bias"] if spec.qkv_bias else 0)     # (T, Hq*D)
            k = linear(xn, self.w[f"{p}.k"]) + (self.w[f"{p}.k.bias"] if spec.qkv_bias else 0)     # (T, Hkv*D)
            v = linear(xn, self.w[f"{p}.v"]) + (self.w[f"{p}.v.bias"] if spec.qkv_bias else 0)
        qn, kn = (self.w[f"{p}.{n}_norm"] if spec.qk_norm else None for n in "qk")
        q = ops.rope(ops.heads(q, spec.num_heads, spec.head_dim, qn, spec.norm_eps), cos, sin, self.rope_interleaved)
        k = ops.rope(ops.heads(k, spec.num_kv_heads, spec.head_dim, kn, spec.norm_eps), cos, sin,
                     self.rope_interleaved)
        end = self.pos + t
        st[f"kv.{i}.k"][self.pos:end] = kv_quantize(st.kv, k)
        st[f"kv.{i}.v"][self.pos:end] = kv_quantize(st.kv, v.reshape(t, spec.num_kv_heads, spec.head_dim))
        if t == 1:               # decode: the Numba kernel reads the raw cache (ops.attention is its oracle)
            out = decode_attention(q[0], st[f"kv.{i}.k"], st[f"kv.{i}.v"], end, st.kv.name, spec.head_dim)[None]
        else:
            keys = kv_dequantize(st.kv, st[f"kv.{i}.k"][:end], spec.head_dim)            # (S, Hkv, D)
            values = kv_dequantize(st.kv, st[f"kv.{i}.v"][:end], spec.head_dim)
            out = ops.attention(q, keys, values, st["positions"][:t])                      # (T, Hq, D)
        return linear(out.reshape(t, -1), self.w[f"{p}.o"])
