"""Each CUDA kernel against its refengine reference, on random shapes, bit widths, group sizes and KV formats.

Outputs are poisoned (NaN / 0xFF bytes) before each launch, so every element is proven written. Tolerances:
fp32 accumulation is checked by relative Frobenius error, well under 1e-3 (METHOD: fp32 lands far below it);
conversions the kernels share with refengine (fp16 and e4m3 rounding, q8 / q4 cache blocks, dequantized
fp16 tiles) must match bit for bit.

Each test runs twice: on the GPU (skipped without CUDA, tests/conftest.py) and on the CPU, where the same
kernel sources run compiled by g++ (tests/cudaemu.py; cuBLAS has no CPU twin, so the GEMM test is GPU-only)."""
from __future__ import annotations

import types
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuengine.kernels import MATVEC_INSTANCES, MATVEC_STAGED, TC_TILES
from planner.formats import HEAD_OPTION, KV_FORMATS, OPTIONS, kv_format, parse_option
from planner.memory import ATTN_MAX_SPLITS
from refengine import ops
from refengine.quant import dequantize, kv_dequantize, kv_quantize, quantize

pytestmark = pytest.mark.usefixtures("backend")           # each test on the GPU, and on the CPU (conftest)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# A matvec row's error, over the sum of its terms' magnitudes (|W| |x|, plus |bias| and |y| where added): fp32
# accumulation, and the decode's sum f x - 1.5 sum x cancelling a few ulps of 1.5 sum |x| a unit. Measured
# at most 8.3e-7 over 320 random linears on the CPU twin (every instance and option); a relative norm of the
# whole output is no bound for a row whose terms cancel (one such row measured 1.7e-5).
MATVEC_ERR = 4e-6


def assert_rows_close(got, want, magnitude) -> None:
    """|got - want| <= MATVEC_ERR * magnitude, row by row (magnitude: the sum of each row's |terms|)."""
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.isfinite(got).all() and (err <= MATVEC_ERR * magnitude).all(), float(np.max(err / magnitude))


def matvec_terms(t, x, *added) -> tuple[np.ndarray, np.ndarray]:
    """(W x, |W| |x| + sum |added|) in float64 for a QTensor t."""
    w = dequantize(t).astype(np.float64)
    return w @ x, np.abs(w) @ np.abs(x) + sum(np.abs(a) for a in added)


def rel(got, want) -> float:
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def device_linear(t):
    """A QTensor on the device, laid out as the engine lays out a layer."""
    import cupy as cp

    from gpuengine.layout import build_image, views
    image = build_image({"w": types.SimpleNamespace(qtensor=t)})
    return views(cp.asarray(image.data), image)["w"]


def record_kernels(monkeypatch) -> set:
    """The names of the kernels launched from here on in a test (launch.function, wrapped)."""
    from gpuengine import launch
    names, function = set(), launch.function
    monkeypatch.setattr(launch, "function", lambda module, name: (names.add(name), function(module, name))[1])
    return names


def nan_array(shape):
    import cupy as cp
    return cp.full(shape, cp.nan, dtype=cp.float32)


options = st.sampled_from((*OPTIONS, HEAD_OPTION))


@contextmanager
def launch_setting(name, value):
    """gpuengine.launch.<name> = value for a block (hypothesis examples cannot use the monkeypatch fixture)."""
    from gpuengine import launch
    saved = getattr(launch, name)
    setattr(launch, name, value)
    try:
        yield
    finally:
        setattr(launch, name, saved)


def block_shape(instance, warps, staged=False, idot=False, ordered=False):
    """The matvec launched as one compiled instance (rows, units, lane) with `warps` warps a block, staged
    through shared memory or not, with the integer dot or not, its loads in program order or not."""
    from gpuengine import launch
    return launch_setting("MATVEC", launch.MatvecShape(*instance, warps, staged, idot, ordered))


# every compiled shape: the plain instances, and the staged ones (whose 16 rows at 8 warps take 148 KiB of
# shared memory a block, past CUDA's default 48 KiB: the launcher raises the kernel's limit), with the
# integer dot or not (x as 23-bit integers a unit, exact integer sums: over 120 random 2-, 4- and 8-bit
# linears on the CPU twin its worst row error was 1.7e-7 of MATVEC_ERR's magnitude, the float decode's 1.0e-6),
# and the unit-a-lane ones with their loads in program order
block_shapes = st.one_of(st.tuples(st.sampled_from(MATVEC_INSTANCES), st.sampled_from((1, 2, 4, 8))),
                         st.tuples(st.sampled_from([(r, 1, 32) for r in MATVEC_STAGED]), st.sampled_from((1, 2, 4, 8)),
                                   st.just(True), st.booleans()),
                         st.tuples(st.sampled_from([i for i in MATVEC_INSTANCES if i[2] == 32]),
                                   st.sampled_from((1, 2, 4, 8)), st.just(False), st.just(False), st.just(True)))
plain_options = st.sampled_from([o for o in (*OPTIONS, HEAD_OPTION) if len(o.slices) == 1])


def test_qmat_layout_matches_the_compiler():
    """The structured dtypes launch.QMAT (a linear), launch.NORM_IN (a folded RMSNorm) and launch.XMAP (an
    in-kernel gather) that the kernel takes by value have the CUDA structs' layouts."""
    import cupy as cp

    from gpuengine import launch
    from gpuengine.kernels import function
    out = cp.zeros(18, dtype=cp.uint64)
    function("matvec", "qmat_layout")((1,), (1,), (out,))
    q, s, r, g = launch.QMAT, launch.QSLICE, launch.NORM_IN, launch.XMAP
    want = [q.itemsize, s.itemsize, *(q.fields[f][1] for f in ("y", "bias", "sl", "n", "nslices", "accumulate", "has_bias")),
            q.fields["sl"][1] + s.fields["bits"][1], q.fields["sl"][1] + s.fields["xoff"][1], q.fields["gshift"][1],
            r.itemsize, *(r.fields[f][1] for f in ("eps", "h")), g.itemsize, g.fields["start"][1], g.fields["rows"][1]]
    assert out.get().tolist() == want


def test_staged_ring_matches_the_compiler(monkeypatch):
    """launch.MatvecShape.shared_bytes sizes the staged matvec's ring as matvec.cu's StagedRing lays it out,
    and a shape past the device's shared memory a block is refused before launch."""
    import cupy as cp

    from gpuengine import device, launch
    from gpuengine.kernels import function
    out = cp.zeros(3, dtype=cp.uint64)
    function("matvec", "staged_layout")((1,), (1,), (out,))
    assert MATVEC_STAGED == (4, 8, 16)
    assert [launch.MatvecShape(r, 1, 32, 1, True).shared_bytes // 32 for r in MATVEC_STAGED] == out.get().tolist()
    assert launch.MatvecShape(8, 1, 32, 4).shared_bytes == 0
    monkeypatch.setattr(device, "max_shared_per_block", lambda: 99 * 1024)           # an sm_89 card's
    t = quantize(np.ones((4, 64), np.float32), OPTIONS[0])
    with launch_setting("MATVEC", launch.MatvecShape(16, 1, 32, 8, True)), \
            pytest.raises(launch.LaunchError, match="148 KiB|151552 bytes of shared memory"):
        launch.matvec(cp.ones(64, cp.float32), nan_array(4), device_linear(t), nan_array(64 + 96))


@settings(SETTINGS, max_examples=60)
@given(option=options, n=st.integers(1, 300), k=st.one_of(st.integers(8, 1100), st.integers(1, 34).map(lambda v: 32 * v)),
       seed=st.integers(0, 2**31), accumulate=st.booleans(), bias=st.booleans(), shape=block_shapes)
def test_matvec_equals_the_dequantized_product(option, n, k, seed, accumulate, bias, shape):
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    t = quantize(rng.standard_normal((n, k)).astype(np.float32), option)
    x = rng.standard_normal(k).astype(np.float32)
    y0 = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    y = cp.asarray(y0.copy()) if accumulate else nan_array(n)
    xp = nan_array(k + 96)
    with block_shape(*shape):
        launch.matvec(cp.asarray(x), y, device_linear(t), xp, cp.asarray(b) if bias else None, accumulate)
    wx, magnitude = matvec_terms(t, x, b if bias else 0, y0 if accumulate else 0)
    assert_rows_close(y.get(), wx + (b if bias else 0) + (y0 if accumulate else 0), magnitude)


@SETTINGS
@given(option=plain_options, ns=st.lists(st.integers(1, 300), min_size=1, max_size=3), k=st.integers(1, 40).map(lambda v: 32 * v),
       seed=st.integers(0, 2**31), shape=block_shapes, data=st.data())
def test_fused_matvecs_and_swiglu(option, ns, k, seed, shape, data):
    """Up to three linears of different heights in one launch (q, k, v), each with or without bias and
    accumulation; and gate / up in one launch giving act(gate x) * (up x), SwiGLU's or GeGLU's."""
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(k).astype(np.float32)
    ts = [quantize(rng.standard_normal((n, k)).astype(np.float32), option) for n in ns]
    jobs, wants = [], []
    for t, n in zip(ts, ns):
        bias, accumulate = data.draw(st.booleans()), data.draw(st.booleans())
        y0, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        jobs.append((cp.asarray(y0.copy()) if accumulate else nan_array(n), device_linear(t), cp.asarray(b) if bias else None, accumulate))
        wx, magnitude = matvec_terms(t, x, b if bias else 0, y0 if accumulate else 0)
        wants.append((wx + (b if bias else 0) + (y0 if accumulate else 0), magnitude))
    with block_shape(*shape):
        launch.matvec_fused(cp.asarray(x), jobs)
    for (y, *_), (want, magnitude) in zip(jobs, wants):
        assert_rows_close(y.get(), want, magnitude)
    n = ns[0]
    gate, up = ts[0], quantize(rng.standard_normal((n, k)).astype(np.float32), option)
    y, act = nan_array(n), data.draw(st.sampled_from(sorted(ops.ACTIVATIONS)))
    with block_shape(*shape):
        launch.matvec_glu(cp.asarray(x), device_linear(gate), device_linear(up), y, act=act)
    (g, mg), (u, mu) = matvec_terms(gate, x), matvec_terms(up, x)
    # silu's slope is within [-0.1, 1.1], GELU's within [-0.13, 1.13], so the errors of g and u reach the
    # product at most as below
    f = ops.ACTIVATIONS[act]
    assert_rows_close(y.get(), f(g) * u, 1.13 * np.abs(u) * mg + np.abs(f(g)) * mu)


@SETTINGS
@given(option=plain_options, ns=st.lists(st.integers(1, 300), min_size=1, max_size=3), k=st.integers(1, 40).map(lambda v: 32 * v),
       scale=st.sampled_from([1e-2, 1.0, 3e3]), seed=st.integers(0, 2**31),
       instance=st.sampled_from([i for i in MATVEC_INSTANCES if i[2] == 32]), warps=st.sampled_from((1, 2, 4)),
       regs=st.booleans())
def test_rmsnorm_folded_into_the_matvec(option, ns, k, scale, seed, instance, warps, regs):
    """matvec_fused and matvec_glu with norm = (w, eps) equal rmsnorm then the matvec (residual-stream
    scales from 1e-2 to 3e3), with the register caps (launch.MATVEC_REGS) or without, and a quad-layout
    matvec refuses the fold."""
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(k) * scale).astype(np.float32)
    g = rng.standard_normal(k).astype(np.float32)
    xn = ops.rmsnorm(x[None], g, 1e-5)[0].astype(np.float64)
    ts = [quantize(rng.standard_normal((n, k)).astype(np.float32), option) for n in ns]
    ys = [nan_array(n) for n in ns]
    with block_shape(instance, warps), launch_setting("MATVEC_REGS", regs):
        launch.matvec_fused(cp.asarray(x), [(y, device_linear(t), None, False) for y, t in zip(ys, ts)],
                            norm=(cp.asarray(g), 1e-5))
    for y, t in zip(ys, ts):
        wx, magnitude = matvec_terms(t, xn)
        assert_rows_close(y.get(), wx, magnitude)
    up = quantize(rng.standard_normal((ns[0], k)).astype(np.float32), option)
    y = nan_array(ns[0])
    with block_shape(instance, warps), launch_setting("MATVEC_REGS", regs):
        launch.matvec_glu(cp.asarray(x), device_linear(ts[0]), device_linear(up), y, norm=(cp.asarray(g), 1e-5))
    (gx, mg), (ux, mu) = matvec_terms(ts[0], xn), matvec_terms(up, xn)
    assert_rows_close(y.get(), ops.silu(gx) * ux, 1.1 * np.abs(ux) * mg + np.abs(ops.silu(gx)) * mu)
    with block_shape((4, 4, 8), 2), pytest.raises(launch.LaunchError, match="unit-a-lane"):
        launch.matvec_fused(cp.asarray(x), [(ys[0], device_linear(ts[0]), None, False)], norm=(cp.asarray(g), 1e-5))


@SETTINGS
@given(options=st.lists(options, min_size=1, max_size=3), k=st.one_of(st.integers(8, 900), st.integers(1, 28).map(lambda v: 32 * v)),
       seed=st.integers(0, 2**31), norm=st.booleans(),
       instance=st.sampled_from([i for i in MATVEC_INSTANCES if i[2] == 32]), warps=st.sampled_from((1, 2, 4)),
       regs=st.booleans())
def test_mixed_options_gathered_in_the_kernel(options, k, seed, norm, instance, warps, regs, monkeypatch):
    """launch.GATHER = "kernel": unit-a-lane matvecs read a mixed option's permuted, padded input in place
    (no gather_x), alone, as q / k / v of different options in one launch, and as gate / up, with or without
    the folded RMSNorm."""
    import cupy as cp

    from gpuengine import launch
    monkeypatch.setattr(launch, "GATHER", "kernel")
    monkeypatch.setattr(launch, "MATVEC_REGS", regs)            # the register caps (both ways)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(k) * 3).astype(np.float32)
    g = rng.standard_normal(k).astype(np.float32)
    xn = ops.rmsnorm(x[None], g, 1e-5)[0].astype(np.float64) if norm else x.astype(np.float64)
    fold = (cp.asarray(g), 1e-5) if norm else None
    ns = [int(rng.integers(1, 90)) for _ in options]
    ts = [quantize(rng.standard_normal((n, k)).astype(np.float32), o) for n, o in zip(ns, options)]
    ys = [nan_array(n) for n in ns]
    calls = record_kernels(monkeypatch)
    with block_shape(instance, warps):
        assert launch.fusable(*(device_linear(t) for t in ts))
        launch.matvec_fused(cp.asarray(x), [(y, device_linear(t), None, False) for y, t in zip(ys, ts)], norm=fold)
        if not norm:
            y1 = nan_array(ns[0])
            launch.matvec(cp.asarray(x), y1, device_linear(ts[0]), None)
            assert_rows_close(y1.get(), *matvec_terms(ts[0], xn))
    assert "gather_x" not in calls
    for y, t in zip(ys, ts):
        assert_rows_close(y.get(), *matvec_terms(t, xn))
    up = quantize(rng.standard_normal((ns[0], k)).astype(np.float32), options[-1])
    y = nan_array(ns[0])
    with block_shape(instance, warps):
        launch.matvec_glu(cp.asarray(x), device_linear(ts[0]), device_linear(up), y, norm=fold)
    (gx, mg), (ux, mu) = matvec_terms(ts[0], xn), matvec_terms(up, xn)
    assert_rows_close(y.get(), ops.silu(gx) * ux, 1.1 * np.abs(ux) * mg + np.abs(ops.silu(gx)) * mu)


@SETTINGS
@given(n=st.integers(1, 200), k=st.integers(1, 600).map(lambda v: 2 * v), seed=st.integers(0, 2**31))
def test_fp16_matvec_equals_the_product(n, k, seed):
    import cupy as cp

    from gpuengine import launch
    from gpuengine.layout import DeviceLinear
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float16)
    x = rng.standard_normal(k).astype(np.float32)
    y = nan_array(n)
    launch.matvec(cp.asarray(x), y, DeviceLinear(None, half=cp.asarray(w.view(np.uint16))), nan_array(1))
    w64 = w.astype(np.float64)
    assert_rows_close(y.get(), w64 @ x, np.abs(w64) @ np.abs(x))


@SETTINGS
@given(option=options, n=st.integers(1, 200), k=st.integers(8, 700), seed=st.integers(0, 2**31),
       kernel=st.sampled_from(["slice", "rows"]), data=st.data())
def test_dequantized_tile_is_bit_exact(option, n, k, seed, kernel, data, monkeypatch):
    import cupy as cp

    from gpuengine import launch
    monkeypatch.setattr(launch, "DEQUANT", kernel)
    t = quantize(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32), option)
    row0 = data.draw(st.integers(0, n - 1))
    rows = data.draw(st.integers(1, n - row0))
    tile = cp.full((rows, k), 0xFFFF, dtype=cp.uint16)
    launch.dequantize(device_linear(t), row0, tile)
    want = dequantize(t)[row0:row0 + rows].astype(np.float16)
    assert np.array_equal(tile.get(), want.view(np.uint16))


@SETTINGS
@given(t=st.integers(1, 64), n=st.integers(1, 300), k=st.integers(1, 500), col0=st.integers(0, 40),
       accumulate=st.booleans(), seed=st.integers(0, 2**31))
def test_gemm_fp16_in_fp32_out(t, n, k, col0, accumulate, seed, backend):
    import cupy as cp

    if backend == "cpu":
        pytest.skip("cuBLAS runs on a GPU only (the CPU runs use gpu_fake's NumPy GEMM)")

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((t, k)).astype(np.float16)
    w = rng.standard_normal((n, k)).astype(np.float16)
    base = rng.standard_normal((t, col0 + n + 3)).astype(np.float32)
    out = cp.asarray(base)
    launch.gemm(cp.asarray(a.view(np.uint16)), cp.asarray(w.view(np.uint16)), out, col0, accumulate)
    want = base.astype(np.float64)
    prod = a.astype(np.float64) @ w.astype(np.float64).T
    want[:, col0:col0 + n] = prod + (want[:, col0:col0 + n] if accumulate else 0)
    got = out.get()
    assert rel(got[:, col0:col0 + n], want[:, col0:col0 + n]) < 1e-3      # cuBLAS may use tensor cores
    assert np.array_equal(got[:, :col0], base[:, :col0]) and np.array_equal(got[:, col0 + n:], base[:, col0 + n:])


@SETTINGS
@given(t=st.integers(1, 16), h=st.integers(1, 3000), scale=st.sampled_from([1e-3, 1.0, 1e4]), seed=st.integers(0, 2**31))
def test_rmsnorm(t, h, scale, seed):
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, h)) * scale).astype(np.float32)
    w = rng.standard_normal(h).astype(np.float32)
    out = nan_array((t, h))
    launch.rmsnorm(cp.asarray(x), cp.asarray(w), out, 1e-5)
    assert rel(out.get(), ops.rmsnorm(x, w, 1e-5)) < 1e-6


def rope_store(fmt, q, k, v, pos, ctx, theta=1e4, interleaved=True, factors=None):
    """launch.rope_store (the engine's one launch for RoPE and the KV store) on device copies of q, k and v,
    into caches of ctx positions filled with 0xFF: q and k rotated, and both caches, back on the host."""
    import cupy as cp

    from gpuengine import launch
    f = kv_format(fmt)
    gq, gk = cp.asarray(q.copy()), cp.asarray(k.copy())
    kc, vc = (cp.full((ctx, k.shape[1], f.row_bytes(q.shape[2])), 0xFF, dtype=cp.uint8) for _ in range(2))
    launch.rope_store(fmt, gq, gk, cp.asarray(v), kc, vc, cp.asarray(pos), theta, interleaved,
                      None if factors is None else cp.asarray(factors))
    return gq.get(), gk.get(), kc.get(), vc.get()


def llama3_factors(d: int, theta: float) -> np.ndarray:
    """Llama 3.1's RoPE factors at a 512-token original context, so short positions show them (float32)."""
    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=512)
    return ops.rope_factors("llama3", params, d, theta).astype(np.float32)


@SETTINGS
@given(t=st.integers(1, 12), heads=st.integers(1, 9), d=st.sampled_from([16, 64, 80, 128]), start=st.integers(0, 30000),
       theta=st.sampled_from([1e4, 5e5]), interleaved=st.booleans(), scaled=st.booleans(), seed=st.integers(0, 2**31))
def test_rope(t, heads, d, start, theta, interleaved, scaled, seed):
    x = np.random.default_rng(seed).standard_normal((t, heads, d)).astype(np.float32)
    pos = np.arange(start, start + t, dtype=np.int32)
    kv = np.zeros((t, 1, d), np.float32)
    factors = llama3_factors(d, theta) if scaled else None
    got = rope_store("fp16", x, kv, kv, pos, start + t, theta, interleaved, factors)[0]
    cos, sin = ops.rope_tables(pos, d, theta, factors=factors)
    assert rel(got, ops.rope(x.copy(), cos, sin, interleaved)) < 1e-6


def tensor_cores(tiles, warps):
    """Decode matvecs the tensor cores take launched as tmatvec<tiles> with `warps` warps a block."""
    from gpuengine import launch
    return launch_setting("MATVEC_TC", launch.TcShape(tiles, warps))


@SETTINGS
@given(ns=st.lists(st.integers(1, 300), min_size=1, max_size=3), kb=st.one_of(st.integers(1, 6), st.integers(15, 40)),
       scale=st.sampled_from([1e-3, 1.0, 3e3, 1e6]), tiles=st.sampled_from(TC_TILES), warps=st.sampled_from((1, 2, 4, 8)),
       bits=st.sampled_from((2, 3, 4, 5, 6, 8)), norm=st.booleans(), seed=st.integers(0, 2**31), data=st.data())
def test_tensor_core_matvec_keeps_fp32_accuracy(ns, kb, scale, tiles, warps, bits, norm, seed, data, monkeypatch):
    """tmatvec (every width, groups of 128): one linear, up to three in one launch (each with or without bias
    and accumulation), and gate / up with SwiGLU, within the fp32 kernels' row bound, with x of any scale
    (1e6 is past fp16's range: the kernel scales x by a power of two first) and k past one staging pass
    (2048 values); and with RMSNorm folded in (the reference: ops.rmsnorm of x, then the product)."""
    import cupy as cp

    from gpuengine import launch
    launched = record_kernels(monkeypatch)
    rng = np.random.default_rng(seed)
    k = 128 * kb
    option = parse_option(f"1:{bits}b g128")
    x = (rng.standard_normal(k) * scale * np.exp(rng.uniform(-4, 0, k))).astype(np.float32)   # 2 decades a value
    nw = (rng.standard_normal(k) * 2).astype(np.float32)
    folded = (cp.asarray(nw), 1e-5) if norm else None
    xin = ops.rmsnorm(x[None], nw, 1e-5)[0] if norm else x   # what the matvecs multiply
    ts = [quantize(rng.standard_normal((n, k)).astype(np.float32), option) for n in ns]
    jobs, wants = [], []
    for t, n in zip(ts, ns):
        bias, accumulate = data.draw(st.booleans()), data.draw(st.booleans())
        y0, b = (rng.standard_normal(n) * scale).astype(np.float32), (rng.standard_normal(n) * scale).astype(np.float32)
        jobs.append((cp.asarray(y0.copy()) if accumulate else nan_array(n), device_linear(t), cp.asarray(b) if bias else None, accumulate))
        wx, magnitude = matvec_terms(t, xin, b if bias else 0, y0 if accumulate else 0)
        wants.append((wx + (b if bias else 0) + (y0 if accumulate else 0), magnitude))
    with tensor_cores(tiles, warps):
        if len(jobs) == 1 and not norm:
            y, lin, b, accumulate = jobs[0]
            launch.matvec(cp.asarray(x), y, lin, None, b, accumulate)
        else:
            launch.matvec_fused(cp.asarray(x), jobs, norm=folded)
        gate, up = ts[0], quantize(rng.standard_normal((ns[0], k)).astype(np.float32), option)
        yg = nan_array(ns[0])
        launch.matvec_glu(cp.asarray(x), device_linear(gate), device_linear(up), yg, norm=folded)
    assert launched == {f"tmatvec<{tiles}, {int(norm)}>"}
    for (y, *_), (want, magnitude) in zip(jobs, wants):
        assert_rows_close(y.get(), want, magnitude)
    (g, mg), (u, mu) = matvec_terms(gate, xin), matvec_terms(up, xin)
    with np.errstate(over="ignore"):                          # silu of a large negative: exp overflows to 0
        assert_rows_close(yg.get(), ops.silu(g) * u, 1.1 * np.abs(u) * mg + np.abs(ops.silu(g)) * mu)


def test_tensor_cores_take_only_what_tmatvec_decodes(monkeypatch):
    """Mixed options, 32- and 64-value groups, linears of two widths in one launch, or a card before sm_80
    keep the CUDA-core matvec; the tensor cores fold a norm in even where the CUDA-core layout
    (quads) could not."""
    import cupy as cp

    from gpuengine import device, launch
    rng = np.random.default_rng(0)
    lin = {o: device_linear(quantize(rng.standard_normal((16, 256)).astype(np.float32), parse_option(o)))
           for o in ("1:4b g128", "1:2b g128", "1:8b g128", "1:5b g128", "1:4b g32", "0.5:4b/0.5:3b g128")}
    monkeypatch.setattr(launch, "MATVEC", launch.MatvecShape(4, 4, 8, 2))           # quads: no fold of their own
    monkeypatch.setattr(launch, "FUSE_NORM", True)
    assert not launch.folds_norm(lin["1:4b g128"])
    with tensor_cores(2, 2):
        assert launch.on_tensor_cores(lin["1:4b g128"]) and launch.folds_norm(lin["1:4b g128"])
        assert launch.on_tensor_cores(lin["1:2b g128"], lin["1:2b g128"]) and launch.on_tensor_cores(lin["1:8b g128"])
        assert not launch.on_tensor_cores(lin["1:4b g128"], lin["1:8b g128"])
        assert launch.on_tensor_cores(lin["1:5b g128"])
        assert not any(launch.on_tensor_cores(lin[o]) for o in ("1:4b g32", "0.5:4b/0.5:3b g128"))
        assert not launch.on_tensor_cores(lin["1:4b g128"], lin["1:5b g128"])
        assert not launch.folds_norm(lin["1:4b g32"])
        with pytest.raises(launch.LaunchError, match="folds into the unit-a-lane matvec only"):
            launch.matvec_fused(cp.zeros(256, cp.float32), [(nan_array(16), lin["1:4b g32"], None, False)],
                                norm=(cp.ones(256, cp.float32), 1e-5))
        monkeypatch.setattr(device, "compute_capability", lambda: 75)
        assert not launch.on_tensor_cores(lin["1:4b g128"])


@SETTINGS
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**31))
def test_glu_softcap_bias_and_half(n, seed):
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    g, u = (rng.standard_normal((2, n)) * 4).astype(np.float32)
    for act, fn in ops.ACTIVATIONS.items():                         # SwiGLU and GeGLU
        gate = cp.asarray(g)
        launch.glu(gate, cp.asarray(u), act)
        assert rel(gate.get(), fn(g) * u) < 1e-6, act
    capped = cp.asarray(g * 10)
    launch.softcap(capped, 7.5)
    assert np.allclose(capped.get(), ops.softcap(g * 10, 7.5), rtol=1e-6, atol=1e-6)
    x, w = rng.standard_normal((2, 3, 64)).astype(np.float32)
    out = cp.asarray(w)
    launch.rmsnorm(cp.asarray(x), cp.asarray(w[0]), out, 1e-6, add=True)          # a post norm into the residual
    assert np.allclose(out.get(), w + ops.rmsnorm(x, w[0], 1e-6), rtol=1e-6, atol=1e-6)
    y, b = cp.asarray(g.reshape(1, n)), rng.standard_normal(n).astype(np.float32)
    launch.add_bias(y, cp.asarray(b))
    assert np.allclose(y.get()[0], g + b, rtol=0, atol=1e-6)
    half = cp.full(n, 0xFFFF, dtype=cp.uint16)
    launch.to_half(cp.asarray(g * 1000), half)
    assert np.array_equal(half.get(), (g * 1000).astype(np.float16).view(np.uint16))


def cache_values(rng, shape, fmt):
    """Cache rows with the spread real K and V have (per-head scales over 3 decades), inside e4m3's range."""
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape[:-1] + (1,)))
    return np.clip(x, -440, 440).astype(np.float32)


@SETTINGS
@given(fmt=st.sampled_from(list(KV_FORMATS)), t=st.integers(1, 9), heads=st.integers(1, 5),
       d=st.sampled_from([32, 48, 64, 100, 128]), seed=st.integers(0, 2**31))
def test_kv_store_writes_refengines_bytes(fmt, t, heads, d, seed):
    f = kv_format(fmt)
    rng = np.random.default_rng(seed)
    x = cache_values(rng, (t, heads, d), f)
    got = rope_store(fmt, np.zeros((t, heads, d), np.float32), x, x, np.arange(3, 3 + t, dtype=np.int32), t + 5)[3]
    assert np.array_equal(got[3:3 + t], kv_quantize(f, x))
    assert (got[:3] == 0xFF).all() and (got[3 + t:] == 0xFF).all()


@SETTINGS
@given(fmt=st.sampled_from(list(KV_FORMATS)), t=st.integers(1, 5), hkv=st.integers(1, 4), group=st.sampled_from([1, 3, 4]),
       d=st.sampled_from([32, 64, 80, 128]), start=st.integers(0, 9000), interleaved=st.booleans(), seed=st.integers(0, 2**31))
def test_rope_store_is_rope_then_kv_store(fmt, t, hkv, group, d, start, interleaved, seed):
    f = kv_format(fmt)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((t, hkv * group, d)).astype(np.float32)
    k, v = cache_values(rng, (t, hkv, d), f), cache_values(rng, (t, hkv, d), f)
    pos = np.arange(start, start + t, dtype=np.int32)
    gq, gk, kc, vc = rope_store(fmt, q, k, v, pos, start + t + 2, 1e4, interleaved)
    cos, sin = ops.rope_tables(pos, d, 1e4)
    want_q, want_k = (ops.rope(a.copy(), cos, sin, interleaved) for a in (q, k))
    assert rel(gq, want_q) < 1e-6 and rel(gk, want_k) < 1e-6
    # the cache holds the rotated k the kernel computed (bytes of kv_quantize of it), and v's bytes
    assert np.array_equal(kc[start:start + t], kv_quantize(f, gk))
    assert np.array_equal(vc[start:start + t], kv_quantize(f, v))
    assert (kc[:start] == 0xFF).all() and (vc[start + t:] == 0xFF).all()


def test_fp8_encoding_at_its_edges():
    """Zeros of both signs, the subnormal range and its top, ties, the largest finite value, and clipping."""
    f = kv_format("fp8")
    edges = [0.0, -0.0, 2.0 ** -10, 2.0 ** -9, 1.5 * 2.0 ** -9, 2.0 ** -6 - 2.0 ** -10, 2.0 ** -6, 1.0625, 1.1875,
             240.0, 248.0, 448.0, 460.0, 1e6, -1e6, 3.0, -0.3]
    rng = np.random.default_rng(0)
    values = np.concatenate([edges, rng.standard_normal(4000) * np.exp(rng.uniform(-12, 7, 4000))])
    x = values[: len(values) // 32 * 32].astype(np.float32).reshape(-1, 1, 32)
    cache = rope_store("fp8", np.zeros_like(x), x, x, np.arange(x.shape[0], dtype=np.int32), x.shape[0])[3]
    assert np.array_equal(cache, kv_quantize(f, x))


@SETTINGS
@given(fmt=st.sampled_from(list(KV_FORMATS)), t=st.one_of(st.integers(1, 6), st.integers(15, 40)), hkv=st.integers(1, 4),
       group=st.sampled_from([1, 2, 4, 7]), d=st.sampled_from([32, 64, 80, 100, 128, 256]),
       past=st.one_of(st.integers(0, 300), st.integers(2000, 9000)), prefill=st.sampled_from(["query", "tiled"]),
       decode=st.sampled_from(["split", "gqa", "lanes"]), window=st.sampled_from([0, 1, 5, 40, 700]),
       cap=st.sampled_from([0.0, 1.5, 50.0]), ring=st.booleans(), seed=st.integers(0, 2**31))
def test_attention_over_each_cache_format(fmt, t, hkv, group, d, past, prefill, decode, window, cap, ring, seed,
                                          monkeypatch):
    """Decode (t = 1) splits the context into chunks merged afterwards (more than ATTN_CHUNK positions
    each beyond 64 chunks), a block per query head (split, or lanes: a lane a position) or (gqa) per KV
    head; prefill takes each query's whole context in one block, or (tiled) tiles of 16 queries over shared key tiles. The candidates fall back to
    the first kernels outside their shapes (head dim above 128, more than 8 heads a KV head). Each with and
    without a sliding window (the split then covers the window from its start) and a soft cap; with a window,
    the cache may be the ring of window + t - 1 rows a sliding layer holds (position p in row p mod rows)."""
    import cupy as cp

    from gpuengine import launch
    monkeypatch.setattr(launch, "ATTN_PREFILL", prefill)
    monkeypatch.setattr(launch, "ATTN_DECODE", decode)
    f = kv_format(fmt)
    rng = np.random.default_rng(seed)
    ctx, hq = past + t + 3, hkv * group
    raw_k = kv_quantize(f, cache_values(rng, (ctx, hkv, d), f))
    raw_v = kv_quantize(f, cache_values(rng, (ctx, hkv, d), f))
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    pos = np.arange(past, past + t, dtype=np.int32)
    out = nan_array((t, hq, d))
    partials = nan_array((hq, ATTN_MAX_SPLITS, d + 2))
    kc, vc, rows = raw_k, raw_v, window + t - 1
    if ring and window and rows < past + t:
        held = np.arange(past + t - rows, past + t)
        kc, vc = np.empty_like(raw_k[:rows]), np.empty_like(raw_v[:rows])
        kc[held % rows], vc[held % rows] = raw_k[held], raw_v[held]
    launch.attention(fmt, cp.asarray(q), cp.asarray(kc), cp.asarray(vc), cp.asarray(pos), out, partials, window, cap)
    want = ops.attention(q.astype(np.float64), kv_dequantize(f, raw_k, d).astype(np.float64),
                         kv_dequantize(f, raw_v, d).astype(np.float64), pos, window=window, cap=cap)
    assert rel(out.get(), want) < 1e-5


@SETTINGS
@given(fmt=st.sampled_from(list(KV_FORMATS)), hkv=st.integers(1, 4), group=st.sampled_from([1, 2, 4, 7, 8]),
       d=st.sampled_from([32, 64, 80, 100, 128]), past=st.one_of(st.integers(0, 300), st.integers(2000, 9000)),
       interleaved=st.booleans(), scaled=st.booleans(), window=st.sampled_from([0, 1, 33, 700]),
       cap=st.sampled_from([0.0, 1.5]), seed=st.integers(0, 2**31))
def test_attention_step_is_rope_store_then_attention(fmt, hkv, group, d, past, interleaved, scaled, window, cap, seed):
    """launch.attention_step, two decode steps in a row: each stores the cache rows rope_store stores (bit for
    bit), leaves q and k as they were, gives attention over the cache it wrote (the new position included),
    and leaves every merge ticket at zero for the next launch (the twin runs blocks in a shuffled order, so
    any block may be the last to finish)."""
    import cupy as cp

    from gpuengine import launch
    f = kv_format(fmt)
    rng = np.random.default_rng(seed)
    ctx, hq = past + 2 + int(rng.integers(0, 40)), hkv * group
    caches = np.full((2, ctx, hkv, f.row_bytes(d)), 0xFF, np.uint8)                   # 0xFF from past on
    for cache in caches[:, :past] if past else ():
        cache[...] = kv_quantize(f, cache_values(rng, (past, hkv, d), f))
    kc, vc = cp.asarray(caches[0]), cp.asarray(caches[1])
    partials = nan_array((hq, ATTN_MAX_SPLITS, d + 2))
    tickets = cp.zeros(hkv, dtype=cp.int32)
    for p in (past, past + 1):
        q = rng.standard_normal((1, hq, d)).astype(np.float32)
        k, v = cache_values(rng, (1, hkv, d), f), cache_values(rng, (1, hkv, d), f)
        pos = np.array([p], np.int32)
        gq, gk, out = cp.asarray(q), cp.asarray(k), nan_array((1, hq, d))
        factors = llama3_factors(d, 1e4) if scaled else None
        launch.attention_step(fmt, gq, gk, cp.asarray(v), kc, vc, cp.asarray(pos), out, partials, tickets, 1e4,
                              interleaved, None if factors is None else cp.asarray(factors), window, cap)
        assert np.array_equal(gq.get(), q) and np.array_equal(gk.get(), k)
        assert not tickets.get().any()
        want_q, _, want_kc, want_vc = rope_store(fmt, q, k, v, pos, ctx, 1e4, interleaved, factors)
        assert np.array_equal(kc.get()[p], want_kc[p]) and np.array_equal(vc.get()[p], want_vc[p])
        assert (kc.get()[p + 1:] == 0xFF).all() and (vc.get()[p + 1:] == 0xFF).all()
        want = ops.attention(want_q.astype(np.float64), kv_dequantize(f, kc.get()[:p + 1], d).astype(np.float64),
                             kv_dequantize(f, vc.get()[:p + 1], d).astype(np.float64), pos, window=window, cap=cap)
        assert rel(out.get(), want) < 1e-5


def test_attention_step_refuses_what_it_cannot_take():
    import cupy as cp

    from gpuengine import launch
    q, k = cp.zeros((1, 4, 256), cp.float32), cp.zeros((1, 2, 256), cp.float32)
    cache = cp.zeros((8, 2, 512), cp.uint8)
    with pytest.raises(launch.LaunchError, match="head dim <= 128"):
        launch.attention_step("fp16", q, k, k, cache, cache, cp.zeros(1, cp.int32), cp.zeros((1, 4, 256), cp.float32),
                              cp.zeros((4, ATTN_MAX_SPLITS, 258), cp.float32), cp.zeros(2, cp.int32), 1e4, True)


@SETTINGS
@given(n=st.integers(1, 70000), seed=st.integers(0, 2**31), ties=st.booleans())
def test_argmax_and_penalty(n, seed, ties):
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    if ties:
        x = np.round(x)                                  # many equal maxima: the first one wins, as numpy's
    out = cp.full(1, -1, dtype=cp.int32)
    launch.argmax(cp.asarray(x), out)
    assert int(out.get()[0]) == int(np.argmax(x))
    seen = (rng.random(n) < 0.3).astype(np.uint8)
    got = cp.asarray(x)
    launch.penalize(got, cp.asarray(seen), 1.3)
    want = np.where(seen == 1, np.where(x > 0, x / np.float32(1.3), x * np.float32(1.3)), x)
    assert np.allclose(got.get(), want, rtol=1e-6, atol=0)


# --- routed experts (MoE) -------------------------------------------------------------------------------

def test_xgather_layout_matches_the_compiler():
    """launch.XGATHER (gather_moe's per-expert entry) has the CUDA struct's layout, and an expert's table
    entry fits planner.memory.EXPERT_TABLE_BYTES."""
    import cupy as cp

    from gpuengine import launch
    from gpuengine.kernels import function
    from planner.memory import EXPERT_TABLE_BYTES
    out = cp.zeros(6, dtype=cp.uint64)
    function("matvec", "xgather_layout")((1,), (1,), (out,))
    g = launch.XGATHER
    assert out.get().tolist() == [g.itemsize, *(g.fields[f][1] for f in ("nslices", "start", "rows", "len", "off"))]
    assert launch.QMAT.itemsize + g.itemsize + 8 <= EXPERT_TABLE_BYTES


@SETTINGS
@given(e=st.integers(1, 70), data=st.data(), tied=st.booleans(), seed=st.integers(0, 2**31))
def test_moe_route_equals_the_reference(e, data, tied, seed):
    """Each token's k experts, most probable first (the lower index among equal probabilities) and their
    renormalized weights, as refengine.arch.route picks them; tied: logits from a few values, so ties are common."""
    import cupy as cp

    from gpuengine import launch
    from refengine.arch import route
    k, t = data.draw(st.integers(1, min(e, 10))), data.draw(st.integers(1, 6))
    rng = np.random.default_rng(seed)
    logits = (rng.integers(-2, 3, (t, e)) if tied else rng.standard_normal((t, e)) * 3).astype(np.float32)
    sel, weight = cp.full(t * k, -1, dtype=cp.int32), nan_array(t * k)
    launch.moe_route(cp.asarray(logits), k, sel, weight)
    top, w = route(logits, k)
    assert sel.get().tolist() == top.reshape(-1).tolist()
    np.testing.assert_allclose(weight.get(), w.reshape(-1), rtol=2e-6, atol=1e-7)


def expert_linears(rng, opts: list, n: int, k: int):
    """Experts of one shape: a QTensor each (option) or an fp16 matrix (None), and their device linears."""
    import cupy as cp

    from gpuengine.layout import DeviceLinear
    hosts, lins = [], []
    for o in opts:
        w = rng.standard_normal((n, k)).astype(np.float32)
        if o is None:
            h = w.astype(np.float16)
            hosts.append(h.astype(np.float64))
            lins.append(DeviceLinear(None, half=cp.asarray(h.view(np.uint16))))
        else:
            t = quantize(w, o)
            hosts.append(dequantize(t).astype(np.float64))
            lins.append(device_linear(t))
    return hosts, lins


@SETTINGS
@given(opts=st.lists(st.one_of(st.none(), options), min_size=1, max_size=5), n=st.integers(1, 200),
       k=st.one_of(st.integers(4, 300).map(lambda v: 2 * v), st.integers(1, 12).map(lambda v: 32 * v)),
       rows=st.integers(1, 4), per=st.sampled_from((1, 2, 3)), seed=st.integers(0, 2**31), shape=block_shapes,
       regs=st.booleans())
def test_expert_matvecs_equal_each_experts_product(opts, n, k, rows, per, seed, shape, regs):
    """matvec_experts: slot s gets W_e x[s // per], e = sel[s], for experts of mixed options (permuted, padded
    slices), one-slice options and fp16 matrices in one table, in every compiled matvec shape, with the
    register caps (launch.MATVEC_REGS) or without. k from 8, as
    the matvec test's: at k = 2 a 2-bit row of zero weights leaves the decode's cancellation (sum f x - 1.5
    sum x) above MATVEC_ERR of a zero magnitude."""
    import cupy as cp

    from gpuengine import launch
    from planner.formats import PACK_VALUES
    rng = np.random.default_rng(seed)
    hosts, lins = expert_linears(rng, opts, n, k)
    region = cp.zeros(len(opts) * 256 + 8, dtype=cp.uint8)
    table = launch.expert_table(lins, region)
    slots = rows * per
    sel = rng.integers(0, len(opts), slots).astype(np.int32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    width = -(-k // PACK_VALUES) * PACK_VALUES + 3 * PACK_VALUES
    y = nan_array((slots, n))
    with block_shape(*shape), launch_setting("MATVEC_REGS", regs):
        launch.matvec_experts(cp.asarray(x), per, table, cp.asarray(sel), nan_array((slots, width)), y)
    got = y.get()
    for s, e in enumerate(sel):
        xs = x[s // per].astype(np.float64)
        assert_rows_close(got[s], hosts[e] @ xs, np.abs(hosts[e]) @ np.abs(xs))


@SETTINGS
@given(t=st.integers(1, 5), k=st.integers(1, 8), h=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_moe_combine_adds_the_weighted_slots(t, k, h, seed):
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    x, out = rng.standard_normal((t, h)).astype(np.float32), rng.standard_normal((t * k, h)).astype(np.float32)
    w = rng.random(t * k).astype(np.float32)
    got = cp.asarray(x.copy())
    launch.moe_combine(got, cp.asarray(out), cp.asarray(w), k)
    want = x + (w.reshape(t, k, 1) * out.reshape(t, k, h)).sum(axis=1)
    np.testing.assert_allclose(got.get(), want, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(t=st.integers(1, 9), h=st.integers(1, 300), data=st.data(), seed=st.integers(0, 2**31))
def test_grouped_prefill_gathers_and_scatters_an_experts_rows(t, h, data, seed):
    """gather_rows_half: an expert's tokens' rows as fp16 (bit for bit numpy's rounding); scatter_add: its
    weighted outputs added into exactly those rows."""
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    rows = np.array(data.draw(st.lists(st.integers(0, t - 1), min_size=1, max_size=t, unique=True)), np.int32)
    x = (rng.standard_normal((t, h)) * 100).astype(np.float32)
    out = cp.full((len(rows), h), 0xFFFF, dtype=cp.uint16)
    launch.gather_rows_half(cp.asarray(x), cp.asarray(rows), out)
    assert np.array_equal(out.get(), x[rows].astype(np.float16).view(np.uint16))
    y, w = rng.standard_normal((len(rows), h)).astype(np.float32), rng.random(len(rows)).astype(np.float32)
    got = cp.asarray(x.copy())
    launch.scatter_add(got, cp.asarray(y), cp.asarray(rows), cp.asarray(w))
    want = x.copy()
    want[rows] += w[:, None] * y
    np.testing.assert_allclose(got.get(), want, rtol=1e-6, atol=1e-4)


@SETTINGS
@given(gate_opts=st.lists(plain_options, min_size=1, max_size=4), data=st.data(), n=st.integers(1, 150),
       k=st.integers(1, 12).map(lambda v: 32 * v), rows=st.integers(1, 3), seed=st.integers(0, 2**31),
       shape=block_shapes, act=st.sampled_from(sorted(ops.ACTIVATIONS)))
def test_expert_gate_and_up_in_one_launch(gate_opts, data, n, k, rows, seed, shape, act, monkeypatch):
    """Experts that read x as it is: no gather launch, and gate / up in one launch giving act(G_e x) * (U_e x)."""
    import cupy as cp

    from gpuengine import launch
    rng = np.random.default_rng(seed)
    up_opts = [data.draw(plain_options) for _ in gate_opts]
    (gates, g_lins), (ups, u_lins) = expert_linears(rng, gate_opts, n, k), expert_linears(rng, up_opts, n, k)
    e = len(gate_opts)
    gate = launch.expert_table(g_lins, cp.zeros(e * 256, dtype=cp.uint8))
    up = launch.expert_table(u_lins, cp.zeros(e * 256, dtype=cp.uint8))
    assert launch.experts_fusable(gate, up)
    k_slots = 2
    sel = rng.integers(0, e, rows * k_slots).astype(np.int32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    y = nan_array((rows * k_slots, n))
    calls = record_kernels(monkeypatch)
    with block_shape(*shape):
        launch.matvec_experts(cp.asarray(x), k_slots, gate, cp.asarray(sel), nan_array((rows * k_slots, k + 96)), y,
                              up, act)
    assert "gather_moe" not in calls
    f, got = ops.ACTIVATIONS[act], y.get()
    for s, ex in enumerate(sel):
        xs = x[s // k_slots].astype(np.float64)
        g, u = gates[ex] @ xs, ups[ex] @ xs
        mg, mu = np.abs(gates[ex]) @ np.abs(xs), np.abs(ups[ex]) @ np.abs(xs)
        assert_rows_close(got[s], f(g) * u, 1.13 * np.abs(u) * mg + np.abs(f(g)) * mu)
