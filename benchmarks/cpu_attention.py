"""Decode attention over the quantized KV cache on the CPU: NumPy path vs the fused Numba kernel.

SmolLM2-135M shapes (Hq=9, Hkv=3, D=64), one layer, one new token, caches of CTX positions of which the
first `length` are attended to. Per length and KV format:
  numpy    kv_dequantize of both caches [:length] + ops.attention, as refengine/model.py does today
  kernel   kernels_attention.decode_attention (parallel above PARALLEL_MIN_WORK, else one thread)
  serial   the same kernel forced onto one thread
  err      max |kernel - numpy| / max |V| (the tests require <= 1e-5)
Times are medians over REPEATS calls after a warm-up (hot caches: one layer's cache fits in L2/L3).
Runs with 2 threads (NUMBA_NUM_THREADS and the BLAS threads default to 2; override in the environment).
Prints a table; writes benchmarks/results/cpu_attention.json atomically. Usage: python benchmarks/cpu_attention.py
"""
from __future__ import annotations

import os

for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "2")

import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchlib import cpu_name, write_json  # noqa: E402

from planner.formats import kv_format  # noqa: E402
from refengine import kernels_attention as ka  # noqa: E402
from refengine import ops  # noqa: E402
from refengine.quant import kv_dequantize, kv_quantize  # noqa: E402

HQ, HKV, D = 9, 3, 64
CTX = 2048
LENGTHS = (64, 512, 2048)
FORMATS = ("fp16", "q8")
REPEATS = 200
OUT = ROOT / "benchmarks/results/cpu_attention.json"




def _median_s(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(fmt_name: str, length: int, rng: np.random.Generator) -> dict:
    fmt = kv_format(fmt_name)
    k = kv_quantize(fmt, rng.standard_normal((CTX, HKV, D)).astype(np.float32))     # (C, Hkv, R) uint8
    v = kv_quantize(fmt, rng.standard_normal((CTX, HKV, D)).astype(np.float32))
    q = rng.standard_normal((HQ, D)).astype(np.float32)                               # (Hq, D)
    pos = np.array([length - 1])

    def numpy_path():
        keys = kv_dequantize(fmt, k[:length], D)                                      # (S, Hkv, D)
        values = kv_dequantize(fmt, v[:length], D)
        return ops.attention(q[None], keys, values, pos)[0]

    out = np.empty((HQ, D), dtype=np.float32)
    want = numpy_path()
    got = ka.decode_attention(q, k, v, length, fmt_name, D, out=out)
    err = float(np.abs(got - want).max() / np.abs(kv_dequantize(fmt, v[:length], D)).max())
    numpy_s = _median_s(numpy_path)
    kernel_s = _median_s(lambda: ka.decode_attention(q, k, v, length, fmt_name, D, out=out))
    threshold, ka.PARALLEL_MIN_WORK = ka.PARALLEL_MIN_WORK, 1 << 62
    try:
        serial_s = _median_s(lambda: ka.decode_attention(q, k, v, length, fmt_name, D, out=out))
    finally:
        ka.PARALLEL_MIN_WORK = threshold
    parallel = length * HQ * D >= ka.PARALLEL_MIN_WORK and numba.get_num_threads() > 1
    return {"format": fmt_name, "length": length, "path": "parallel" if parallel else "serial",
            "numpy_us": round(numpy_s * 1e6, 1), "kernel_us": round(kernel_s * 1e6, 1),
            "kernel_serial_us": round(serial_s * 1e6, 1), "speedup": round(numpy_s / kernel_s, 2),
            "max_err_rel_v": err}




def main() -> None:
    load_before = os.getloadavg()
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, numba threads "
          f"{numba.get_num_threads()}, Hq={HQ} Hkv={HKV} D={D}, ctx {CTX}, load {load_before[0]:.2f}")
    print(f"{'length':>6} {'fmt':>5} {'path':>8} {'numpy us':>9} {'kernel us':>9} {'serial us':>9} "
          f"{'speedup':>7} {'err':>8}")
    rng = np.random.default_rng(0)
    rows = []
    for length in LENGTHS:
        for fmt_name in FORMATS:
            r = measure(fmt_name, length, rng)
            rows.append(r)
            print(f"{length:>6} {fmt_name:>5} {r['path']:>8} {r['numpy_us']:9.1f} {r['kernel_us']:9.1f} "
                  f"{r['kernel_serial_us']:9.1f} {r['speedup']:6.2f}x {r['max_err_rel_v']:8.1e}", flush=True)
    doc = {"machine": {"cpu": cpu_name(), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                       "numba_threads": numba.get_num_threads(), "threading_layer": numba.threading_layer(),
                       "load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in os.getloadavg()]},
           "date": time.strftime("%Y-%m-%d"),
           "shapes": {"hq": HQ, "hkv": HKV, "head_dim": D, "ctx": CTX},
           "parallel_min_work": ka.PARALLEL_MIN_WORK, "chunk": ka.CHUNK,
           "notes": "median us per call, one layer, hot caches; numpy = kv_dequantize both caches + ops.attention",
           "rows": rows}
    write_json(doc, OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
