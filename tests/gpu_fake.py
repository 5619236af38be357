"""The GPU engine's runtime on the CPU: a stand-in for CuPy (NumPy arrays with .set/.get) and launchers that
do each kernel's job with refengine's reference code, so tests/test_gpu_runtime.py checks the runtime's own
logic (state allocation, layer images and views, streaming slots, which launch gets which buffer) without a
GPU. The kernels themselves are checked against the same references on a GPU (tests/test_gpu_kernels.py)."""
from __future__ import annotations

import sys
import types

import numpy as np

from gpuengine import launch
from planner.formats import kv_format, parse_option
from refengine import ops
from refengine.quant import QSlice, QTensor, dequantize, kv_dequantize, kv_quantize


class FakeArray(np.ndarray):
    """A NumPy array with CuPy's host-transfer methods."""

    def set(self, arr, stream=None):
        self[...] = arr

    def get(self, stream=None):
        return np.array(self)


def _fake(a: np.ndarray) -> FakeArray:
    return a.view(FakeArray)


class _Stream:
    """CUDA streams and their context: everything runs at once on the CPU."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass

    def wait_event(self, event):
        pass


class _Event:
    """CUDA events: work runs in issue order on the CPU, so there is nothing to wait for."""

    def __init__(self, **kwargs):
        pass

    def record(self, stream=None):
        pass


def _poisoned(shape, dtype=np.float32) -> FakeArray:
    """cupy.empty's stand-in: NaN floats and 0x5A bytes, so a buffer read before it is written shows."""
    dtype, shape = np.dtype(dtype), tuple(np.atleast_1d(shape))
    if dtype.kind == "f":
        return _fake(np.full(shape, np.nan, dtype))
    return _fake(np.full(int(np.prod(shape)) * dtype.itemsize, 0x5A, np.uint8).view(dtype).reshape(shape))


def fake_cupy() -> tuple[types.ModuleType, types.ModuleType]:
    cp = types.ModuleType("cupy")
    cp.empty = _poisoned
    cp.zeros = lambda shape, dtype=np.float32: _fake(np.zeros(shape, dtype))
    cp.full = lambda shape, value, dtype=np.float32: _fake(np.full(shape, value, dtype))
    cp.ones = lambda shape, dtype=np.float32: _fake(np.ones(shape, dtype))
    cp.asarray = lambda a, dtype=None: _fake(np.array(a, dtype))         # a copy, as a host-to-device one
    for name in ("uint8", "uint16", "int32", "uint64", "float32", "float64", "nan", "inf"):
        setattr(cp, name, getattr(np, name))
    cp.cuda = types.SimpleNamespace(get_current_stream=lambda: _Stream(), Stream=lambda non_blocking=False: _Stream(),
                                    Event=_Event)
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype: np.empty(shape, dtype)
    return cp, cupyx


def dense(lin) -> np.ndarray:
    """A DeviceLinear's matrix in float32, through refengine.quant.dequantize."""
    if lin.meta is None:
        return np.asarray(lin.half).view(np.float16).astype(np.float32)
    m = lin.meta
    slices = tuple(QSlice(s.start, s.rows, s.bits, np.asarray(w), np.asarray(sc).view(np.float16))
                   for s, w, sc in zip(m.slices, lin.words, lin.scales))
    option = parse_option(f"1:{m.slices[0].bits}b g{m.group_size}")      # dequantize reads the group size only
    return dequantize(QTensor(option, (m.n, m.k), slices, None if lin.perm is None else np.asarray(lin.perm)))


def _matvec(x, y, lin, xp, bias=None, accumulate=False):
    launch.check_matvec(x, y, lin, xp)
    r = dense(lin) @ np.asarray(x) + (0 if bias is None else bias)
    y[...] = y + r if accumulate else r


def _normed(x, norm):
    """x, or rmsnorm(x) * w for a folded norm = (w, eps)."""
    return x if norm is None else ops.rmsnorm(np.asarray(x)[None], np.asarray(norm[0]), norm[1])[0]


def _matvec_fused(x, jobs, norm=None):
    if not launch.fusable(*(lin for _, lin, _, _ in jobs)):
        raise launch.LaunchError("not fusable")
    for y, lin, bias, accumulate in jobs:
        _matvec(_normed(x, norm), y, lin, None, bias, accumulate)


def _matvec_glu(x, gate, up, y, norm=None, act="silu"):
    if not launch.fusable(gate, up):
        raise launch.LaunchError("not fusable")
    x = _normed(x, norm)
    y[...] = ops.ACTIVATIONS[act](dense(gate) @ np.asarray(x)) * (dense(up) @ np.asarray(x))


def _rope_store(fmt, q, k, v, kc, vc, pos, theta, interleaved, factors=None):
    _rope(q, pos, theta, interleaved, factors)
    _rope(k, pos, theta, interleaved, factors)
    for x, cache in ((k, kc), (v, vc)):
        cache[np.asarray(pos) % len(cache)] = kv_quantize(kv_format(fmt), np.asarray(x))    # a sliding layer's ring


def _dequantize(lin, row0, tile):
    tile[...] = dense(lin)[row0:row0 + tile.shape[0]].astype(np.float16).view(np.uint16)


def _gemm(a16, w16, out, col0=0, accumulate=False):
    r = np.asarray(a16).view(np.float16).astype(np.float32) @ np.asarray(w16).view(np.float16).astype(np.float32).T
    cols = slice(col0, col0 + r.shape[1])
    out[:, cols] = out[:, cols] + r if accumulate else r


def _rope(x, pos, theta, interleaved, factors=None):
    cos, sin = ops.rope_tables(np.asarray(pos), x.shape[-1], theta, factors=factors)
    x[...] = ops.rope(np.ascontiguousarray(x), cos, sin, interleaved)


def _attention(fmt, q, kc, vc, pos, out, partials, window=0, cap=0.0):
    launch.check("partials", partials, np.float32)
    d, end = q.shape[-1], int(np.max(pos)) + 1
    held = np.arange(max(0, end - len(kc)), end)                      # the positions a ring still holds
    keys = kv_dequantize(kv_format(fmt), np.asarray(kc)[held % len(kc)], d)
    values = kv_dequantize(kv_format(fmt), np.asarray(vc)[held % len(vc)], d)
    out[...] = ops.attention(np.asarray(q), keys, values, np.asarray(pos), held, window=window, cap=cap)


def _attention_step(fmt, q, k, v, kc, vc, pos, out, partials, tickets, theta, interleaved, factors=None, window=0,
                    cap=0.0):
    launch.check("tickets", tickets, np.int32)
    if np.any(np.asarray(tickets)):
        raise launch.LaunchError("attention_step: tickets not zero before the launch")
    q, k = np.array(q), np.array(k)                     # the kernel rotates copies: q and k stay as they are
    _rope_store(fmt, q, k, v, kc, vc, pos, theta, interleaved, factors)
    _attention(fmt, q, kc, vc, pos, out, partials, window, cap)


def _argmax(x, out):
    out[0] = int(np.argmax(x))


def _penalize(x, seen, p):
    x[...] = np.where(seen.astype(bool), np.where(x > 0, x / p, x * p), x)


LAUNCHERS = {
    "matvec": _matvec, "matvec_fused": _matvec_fused, "matvec_glu": _matvec_glu, "rope_store": _rope_store,
    "dequantize": _dequantize, "gemm": _gemm, "attention": _attention, "attention_step": _attention_step,
    "argmax": _argmax, "penalize": _penalize,
    "to_half": lambda x, out: out.__setitem__(..., np.asarray(x).astype(np.float16).view(np.uint16)),
    "rmsnorm": lambda x, w, out, eps, add=False: out.__setitem__(..., ops.rmsnorm(np.asarray(x), w, eps)
                                                                   + (np.asarray(out) if add else 0)),
    "glu": lambda gate, up, act="silu": gate.__setitem__(..., ops.ACTIVATIONS[act](np.asarray(gate)) * up),
    "softcap": lambda x, cap: x.__setitem__(..., ops.softcap(np.asarray(x), cap)),
    "add_bias": lambda y, b: y.__setitem__(..., y + b),
}


def install_runtime(monkeypatch) -> None:
    """Swap CuPy for the stand-in, for one test: graphs off, host-to-device copies as NumPy copies."""
    cp, cupyx = fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    from gpuengine import model
    monkeypatch.setattr(model, "USE_GRAPHS", False)        # graph capture needs the real device
    monkeypatch.setattr(model, "h2d", lambda dst, src, stream: dst.__setitem__(..., src.reshape(dst.shape)))
    monkeypatch.setattr(model, "mapped", _mapped)           # mapped pinned memory: one array, host and device


def _mapped(nbytes: int) -> tuple[np.ndarray, FakeArray]:
    host = np.zeros(nbytes, np.uint8)
    return host, _fake(host)


def install(monkeypatch) -> None:
    """Swap CuPy and every launcher for the stand-ins, for one test."""
    install_runtime(monkeypatch)
    for name, fn in LAUNCHERS.items():
        monkeypatch.setattr(launch, name, fn)
