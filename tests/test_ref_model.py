"""Reference ops against naive float64 versions, and the forward pass on a random model of its own shape."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hwdb import ModelSpec
from planner import memory as mem
from planner.formats import kv_format
from planner.spec import tensors
from refengine import ops
from refengine.model import RunState, Transformer, UnsupportedModel

RNG = np.random.default_rng(0)


def naive_attention(q, k, v, q_pos):
    t, hq, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros((t, hq, d))
    for i in range(t):
        for h in range(hq):
            s = np.array([q[i, h] @ k[j, h // g] for j in range(q_pos[i] + 1)], dtype=np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[: q_pos[i] + 1, h // g]
    return out


def test_attention_matches_naive_gqa():
    q, k, v = RNG.standard_normal((5, 8, 16)), RNG.standard_normal((9, 2, 16)), RNG.standard_normal((9, 2, 16))
    pos = np.array([4, 5, 6, 7, 8])
    got = ops.attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), pos)
    assert np.allclose(got, naive_attention(q, k, v, pos), atol=1e-5)


def test_rmsnorm_matches_definition_on_large_activations():
    x = (RNG.standard_normal((3, 64)) * 2e4).astype(np.float32)
    w = RNG.standard_normal(64).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert np.allclose(ops.rmsnorm(x, w, 1e-5), want, rtol=1e-5)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to HF q/k rows (pairs (i, i+D/2) -> (2i, 2i+1))."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_interleaved_rope_on_permuted_weights_equals_hf_rope():
    heads, d, h = 4, 16, 32
    wq, wk = RNG.standard_normal((heads * d, h)), RNG.standard_normal((heads * d, h))
    x = RNG.standard_normal((6, h))
    cos, sin = ops.rope_tables(np.arange(6), d, 10000.0)
    hf = [ops.rope((x @ w.T).reshape(6, heads, d).astype(np.float32), cos, sin, False) for w in (wq, wk)]
    gg = [ops.rope((x @ llama_cpp_permute(w, heads).T).reshape(6, heads, d).astype(np.float32), cos, sin, True)
          for w in (wq, wk)]
    assert np.allclose(np.einsum("thd,shd->hts", *hf), np.einsum("thd,shd->hts", *gg), atol=1e-4)


SPEC = ModelSpec(id="rand", name="random GQA-4 untied", family="llama", hidden_size=96, intermediate_size=160,
                 num_layers=3, num_heads=8, num_kv_heads=2, vocab_size=300, max_context=64, source="test",
                 tie_embeddings=False, norm_eps=1e-6)


def random_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for t in tensors(spec):
        scale = 1.0 if t.kind in ("norm", "embed") else 1 / np.sqrt(t.shape[-1])
        w = (rng.standard_normal(t.shape) * scale).astype(np.float32)      # float32, as the engine holds weights
        out[t.name] = (1 + 0.1 * w[0]) if t.kind == "norm" else w
    return out


def test_run_state_allocates_exactly_what_was_planned():
    st = RunState(SPEC, 64, 16, "q8")
    planned = mem.buffers_bytes(mem.run_state_buffers(SPEC, 64, 16, logits=True, gemm_staging=False))
    planned += mem.buffers_bytes(mem.kv_cache_buffers(SPEC, 64, kv_format("q8"), range(SPEC.num_layers), 16))
    assert st.nbytes == planned


@pytest.mark.parametrize("kv, tol", [("fp16", 2e-3), ("q8", 5e-2)])
def test_decode_equals_prefill(kv, tol):
    w = random_weights(SPEC)
    ids = list(np.random.default_rng(3).integers(0, SPEC.vocab_size, 20))
    full = Transformer(SPEC, w, ctx=64, kv_name=kv, chunk=64).forward(ids)
    m = Transformer(SPEC, w, ctx=64, kv_name=kv, chunk=64)
    steps = np.concatenate([m.forward([i]) for i in ids])
    assert full.shape == (20, SPEC.vocab_size) and np.abs(full - steps).max() <= tol * np.abs(full).max()
    chunked = Transformer(SPEC, w, ctx=64, kv_name=kv, chunk=7).forward(ids)
    assert np.allclose(chunked, full, atol=1e-4 * np.abs(full).max())


def test_context_overflow_is_refused():
    m = Transformer(SPEC, random_weights(SPEC), ctx=8)
    with pytest.raises(ValueError, match="exceed the planned context of 8"):
        m.forward(list(range(9)))


def test_unsupported_architecture_is_named():
    moe = ModelSpec(id="m", name="moe", family="llama", hidden_size=64, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=4, vocab_size=10, max_context=8, source="t", num_experts=4,
                    experts_per_token=2, shared_experts=1)          # routed experts run; shared ones not yet
    with pytest.raises(UnsupportedModel, match="shared_experts"):
        Transformer(moe, {}, ctx=8)
    # a Falcon's checkpoint could be named as a Llama's: the family itself is refused
    falcon = dataclasses.replace(moe, family="falcon", num_experts=0, experts_per_token=0, shared_experts=0)
    with pytest.raises(UnsupportedModel, match="the falcon architecture is not supported .* runs llama, mistral"):
        Transformer(falcon, {}, ctx=8)
