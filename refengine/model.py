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
from planner.spec import ENGINE_FAMILIES, unsupported_fields
from refengine import ops
from refengine.arch import Arch, decoder_layer
from refengine.kernels_attention import decode_attention
from refengine.packed import linear
from refengine.quant import kv_dequantize, kv_quantize


class UnsupportedModel(ValueError):
    """An architecture the reference engine does not run yet."""


def check_supported(spec: ModelSpec) -> None:
    if spec.family not in ENGINE_FAMILIES:   # a Gemma's tensors are named as a Llama's: refuse it by name
        raise UnsupportedModel(f"{spec.name}: the {spec.family} architecture is not supported by the reference "
                               f"engine yet (it runs {', '.join(ENGINE_FAMILIES)})")
    gaps = unsupported_fields(spec)          # planner.spec holds the fields: plans read them too
    if gaps:
        field, want = gaps[0]
        runs = " or ".join(f"{field}={w!r}" for w in (want if isinstance(want, tuple) else (want,)))
        raise UnsupportedModel(f"{spec.name}: {field}={getattr(spec, field)!r} is not supported by the reference "
                               f"engine yet (it runs {runs})")


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
        self.buffers += mem.kv_cache_buffers(spec, ctx, self.kv, range(spec.num_layers), chunk)
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
        check_supported(spec)
        self.spec, self.w, self.ctx = spec, weights, ctx
        self.chunk = min(chunk, ctx)
        self.rope_interleaved = rope_interleaved
        self.state = RunState(spec, ctx, self.chunk, kv_name)
        self.rope_factors = fill_rope_factors(self.state.arrays, spec, rope_factors)
        self.arch = Arch(spec)
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
        spec, st, t, arch = self.spec, self.state, len(tokens), self.arch
        st["tokens"][:t] = tokens
        st["positions"][:t] = np.arange(self.pos, self.pos + t)
        x = st["x"][:t]                                                          # (T, H)
        x[:] = arch.embed(self.w["embed"][tokens].astype(np.float32))
        tables = arch.rope_tables(st["positions"][:t], np.float32, self.rope_factors)
        for i in range(spec.num_layers):
            x[:] = decoder_layer(arch, self.w, i, x, self._linear, self._attend, tables, self.rope_interleaved)[0]
        logits = st["logits"][:t]                                                # (T, V)
        logits[:] = arch.logits(x, self.w, self._linear, "head" if "head" in self.w else "embed")   # tied: embed
        self.pos += t
        return logits

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        w = self.w[name]
        return linear(x, w.astype(np.float32) if name == "embed" else w)

    def _attend(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Store this step's k, v in layer i's cache and attend over it (within the layer's window)."""
        spec, st, t = self.spec, self.state, len(q)
        end, window = self.pos + t, self.arch.window(i)
        kc, vc = st[f"kv.{i}.k"], st[f"kv.{i}.v"]
        rows = len(kc)                  # a sliding layer's ring: position p in row p % rows (mem.kv_rows)
        slots = np.arange(self.pos, end) % rows
        kc[slots], vc[slots] = kv_quantize(st.kv, k), kv_quantize(st.kv, v)
        start = max(0, self.pos - window + 1) if window else 0          # the first position any query here sees
        if end <= rows:
            kc, vc = kc[start:end], vc[start:end]
        else:                           # the ring has wrapped: its rows in position order
            kc, vc = kc[np.arange(start, end) % rows], vc[np.arange(start, end) % rows]
        if t == 1:               # decode: the Numba kernel reads the raw cache (ops.attention is its oracle)
            return decode_attention(q[0], kc, vc, end - start, st.kv.name, spec.head_dim, cap=spec.attn_softcap)[None]
        keys = kv_dequantize(st.kv, kc, spec.head_dim)                                    # (S, Hkv, D)
        values = kv_dequantize(st.kv, vc, spec.head_dim)
        return ops.attention(q, keys, values, st["positions"][:t], np.arange(start, end), window, spec.attn_softcap)
