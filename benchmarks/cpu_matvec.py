"""Fused dequantize + matvec on the CPU (refengine.kernels_numba) against NumPy float32 W @ x.

Shapes: SmolLM2-135M's (576x576, 1536x576, 576x1536) and Llama-7B's (4096x4096, 11008x4096), as
N out x K in. Options: 1:4b g128, 0.1:4b/0.9:3b g128, 1:8b g32, 1:2b g128.

Per shape and option:
  fused     PackedLinear.matvec, median over repeats after warm-up. "cold": every call reads another
            copy of the weights, with enough copies to span 3x the last-level cache, as in decoding
            where each token streams all weights from memory; "hot": the same copy every call.
  GB/s      packed bytes read (QTensor.nbytes, the bytes the planner prices) / cold time.
  numpy     float32 W @ x on the dequantized matrix (4 bytes per weight), cold as above.
  generic   the original per-element kernel (kernels_numba.matvec_generic), hot: the "before".
  err       max |fused - float64 oracle| / (|W| |x|) over the outputs (the tests require <= 1e-5).
Machine bandwidth: NumPy copy of a 512 MiB array ((read + write) bytes / time, one thread) and a
2-thread Numba read of the same array; the table's "%bw" is cold GB/s over the 2-thread read.

Runs with 2 threads (NUMBA_NUM_THREADS and the BLAS threads default to 2; override in the
environment). Prints a table; writes benchmarks/results/cpu_matvec.json atomically.
Usage: python benchmarks/cpu_matvec.py [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

THREADS = "2"
for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, THREADS)

import numba  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchlib import cpu_name, write_json  # noqa: E402

from planner.formats import parse_option  # noqa: E402
from refengine.kernels_numba import PackedLinear, matvec_generic  # noqa: E402
from refengine.quant import QSlice, QTensor, dequantize, quantize  # noqa: E402

SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096))
OPTIONS = ("1:4b g128", "0.1:4b/0.9:3b g128", "1:8b g32", "1:2b g128")
OUT = ROOT / "benchmarks/results/cpu_matvec.json"
BW_BYTES = 512 * 2**20


def _llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = p.read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return best or 32 * 2**20


@numba.njit(parallel=True, fastmath=True)
def _read_sum(a):  # pragma: no cover - compiled
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s


def bandwidth(repeats: int) -> dict:
    a = np.ones(BW_BYTES // 4, dtype=np.float32)
    b = np.empty_like(a)
    copy, read = [], []
    _read_sum(a[:1024])
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - t)
        t = time.perf_counter()
        _read_sum(a)
        read.append(time.perf_counter() - t)
    return {"array_bytes": BW_BYTES,
            "numpy_copy_gb_s": round(2 * BW_BYTES / statistics.median(copy) / 1e9, 2),
            "read_2threads_gb_s": round(BW_BYTES / statistics.median(read) / 1e9, 2)}


def _copy_tensor(t: QTensor) -> QTensor:
    return QTensor(t.option, t.shape, tuple(QSlice(s.start, s.rows, s.bits, s.qweight.copy(), s.scales.copy())
                                            for s in t.slices), t.perm)


def _timed(fn, args_list, repeats: int) -> float:
    """Median seconds of fn(args) over `repeats` calls, cycling through args_list (after one warm-up call)."""
    fn(*args_list[0])
    times = []
    for i in range(repeats):
        args = args_list[(i + 1) % len(args_list)]
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(n: int, k: int, option: str, llc: int, repeats: int, rng: np.random.Generator) -> dict:
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    x = rng.standard_normal(k).astype(np.float32)
    t = quantize(w, parse_option(option))
    wd = dequantize(t)
    copies = max(1, min(2000, math.ceil(3 * llc / t.nbytes)))
    packed = [PackedLinear(t)] + [PackedLinear(_copy_tensor(t)) for _ in range(copies - 1)]
    y = packed[0].matvec(x)
    want = wd.astype(np.float64) @ x.astype(np.float64)
    scale = np.abs(wd).astype(np.float64) @ np.abs(x).astype(np.float64) + 1e-30
    err = float(np.max(np.abs(y - want) / scale))
    out = np.empty(n, dtype=np.float32)
    fused_cold = _timed(lambda p: p.matvec(x, out), [(p,) for p in packed], max(repeats, 2 * copies))
    fused_hot = _timed(lambda p: p.matvec(x, out), [(packed[0],)], repeats)
    del packed
    dense_copies = max(1, min(500, math.ceil(3 * llc / wd.nbytes)))
    dense = [wd] + [wd.copy() for _ in range(dense_copies - 1)]
    numpy_cold = _timed(lambda m: np.matmul(m, x, out=out), [(m,) for m in dense], max(repeats, 2 * dense_copies))
    del dense
    generic = _timed(lambda: matvec_generic(t, x), [()], 3)
    gbs = t.nbytes / fused_cold / 1e9
    return {"shape": [n, k], "option": option, "packed_bytes": t.nbytes, "fp32_bytes": wd.nbytes,
            "copies": copies, "fused_ms": round(fused_cold * 1e3, 4), "fused_hot_ms": round(fused_hot * 1e3, 4),
            "fused_gb_s": round(gbs, 2), "numpy_fp32_ms": round(numpy_cold * 1e3, 4),
            "numpy_gb_s": round(wd.nbytes / numpy_cold / 1e9, 2), "generic_ms": round(generic * 1e3, 3),
            "speedup_vs_numpy": round(numpy_cold / fused_cold, 2), "speedup_vs_generic": round(generic / fused_cold, 1),
            "max_rel_err": err}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, fewer repeats (no JSON)")
    args = ap.parse_args()
    repeats = 5 if args.quick else 30
    llc = _llc_bytes()
    load_before = os.getloadavg()
    bw = bandwidth(3 if args.quick else 7)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, numba threads {numba.get_num_threads()} "
          f"({numba.threading_layer()}), largest cache {llc / 2**20:.0f} MiB, load {load_before[0]:.2f}")
    print(f"memory: numpy copy {bw['numpy_copy_gb_s']} GB/s (read+write), 2-thread read {bw['read_2threads_gb_s']} GB/s")
    hdr = (f"{'N x K':>12} {'option':>20} {'MB':>7} {'generic ms':>10} {'fused ms':>9} {'hot ms':>8} {'GB/s':>6} "
           f"{'%bw':>4} {'numpy ms':>9} {'np GB/s':>7} {'vs np':>6} {'vs gen':>7} {'err':>8}")
    print(hdr)
    rows = []
    rng = np.random.default_rng(0)
    for n, k in SHAPES[:3] if args.quick else SHAPES:
        for option in OPTIONS:
            r = measure(n, k, option, llc, repeats, rng)
            r["pct_of_read_bw"] = round(100 * r["fused_gb_s"] / bw["read_2threads_gb_s"], 1)
            rows.append(r)
            print(f"{n:>5} x {k:<5} {option:>20} {r['packed_bytes'] / 1e6:7.3f} {r['generic_ms']:10.3f} "
                  f"{r['fused_ms']:9.4f} {r['fused_hot_ms']:8.4f} {r['fused_gb_s']:6.2f} {r['pct_of_read_bw']:4.0f} "
                  f"{r['numpy_fp32_ms']:9.4f} {r['numpy_gb_s']:7.2f} {r['speedup_vs_numpy']:5.2f}x "
                  f"{r['speedup_vs_generic']:6.0f}x {r['max_rel_err']:8.1e}", flush=True)
    if args.quick:
        return
    doc = {"machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "numpy": np.__version__, "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
                       "threading_layer": numba.threading_layer(), "largest_cache_bytes": llc,
                       "load_average_before": [round(v, 2) for v in load_before],
                       "load_average_after": [round(v, 2) for v in os.getloadavg()]},
           "date": time.strftime("%Y-%m-%d"), "bandwidth": bw,
           "notes": "fused/numpy: median ms, cold (weights rotated through copies spanning 3x the cache); "
                    "GB/s = QTensor.nbytes / fused_ms; generic = original per-element kernel (before)",
           "rows": rows}
    write_json(doc, OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
