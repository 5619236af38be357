"""Fit the roofline's efficiency factors to published llama.cpp runs and show the residuals.

Data: benchmarks/published/measurements.yaml, llama-bench rows for Llama 2 7B (tg128 decode and
pp512 prefill) per backend: CUDA -> nvidia, Metal -> apple, Vulkan/ROCm -> amd. Rows whose GPU is
not in hwdb unambiguously are skipped (e.g. "H100 80GB" may be SXM or PCIe). Apple rows use the
bandwidth their own table lists.

Decode model:   1 / tokens_per_s = bytes_per_token / (eta * bandwidth) + t0
                (least squares on relative error; bytes = weights read + KV at position 64)
Prefill model:  512 / tokens_per_s = 512 * flops_per_token / (eta_c * fp16_tflops)
                (eta_c: median over rows)

Prints a table, writes benchmarks/results/calibration.json; planner/roofline.py's EFFICIENCY holds
the fitted values (tests/test_roofline.py checks they agree with this file).
Usage: python benchmarks/calibrate_speed.py
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hwdb  # noqa: E402
from planner.budget import _prefill_flops_per_token  # noqa: E402
from planner.spec import param_count  # noqa: E402

BACKEND_VENDOR = {"cuda": "nvidia", "metal": "apple", "vulkan": "amd", "rocm": "amd"}
GGUF_BPW = {"Q4_0": 4.5, "Q8_0": 8.5, "F16": 16.0}      # ggml block formats: 18/32, 34/32, 2 bytes
DECODE_POS = 64                                         # tg128 generates positions 0..127


def _rows(db: hwdb.Database) -> list[dict]:
    data = yaml.safe_load((ROOT / "benchmarks/published/measurements.yaml").read_text())
    spec = db.find_model("llama2-7b")
    out = []
    for m in data["measurements"]:
        if (m["engine"] != "llama.cpp" or m["model"] != "Llama 2 7B" or m["test"] not in ("tg128", "pp512")
                or m["weights_format"] not in GGUF_BPW or m.get("backend") not in BACKEND_VENDOR):
            continue
        vendor = BACKEND_VENDOR[m["backend"]]
        bw, tflops = m.get("source_bandwidth_gbs"), None
        try:
            gpu = db.find_gpu(m["gpu"])
            bw, tflops = bw or gpu.bandwidth_gb_s, gpu.fp16_tflops
            if gpu.vendor != vendor:
                continue
        except hwdb.HwdbError:
            if bw is None:
                continue
        embed = spec.vocab_size * spec.hidden_size * GGUF_BPW[m["weights_format"]] / 8
        weights = (m["weights_bytes"] or param_count(spec) * GGUF_BPW[m["weights_format"]] / 8) - embed
        kv = spec.num_layers * DECODE_POS * 2 * spec.kv_dim * 2
        out.append(dict(vendor=vendor, gpu=m["gpu"], fmt=m["weights_format"], test=m["test"], tps=m["tokens_per_s"],
                        bytes=weights + kv, bw=bw, tflops=tflops, source=m["source"],
                        flops=_prefill_flops_per_token(spec, 256)))
    return out


MIN_ROWS_FOR_T0 = 3     # fewer rows: fit eta alone, t0 borrowed from the NVIDIA fit


def fit_decode(rows: list[dict], t0: float | None = None) -> tuple[float, float]:
    """eta (and t0 unless given) minimizing the relative error of seconds per token."""
    x = np.array([r["bytes"] / (r["bw"] * 1e9) for r in rows])
    y = np.array([1 / r["tps"] for r in rows])
    if t0 is None:
        a, t0 = np.linalg.lstsq(np.column_stack([x / y, 1 / y]), np.ones_like(y), rcond=None)[0]
    else:
        a = float(np.linalg.lstsq((x / y)[:, None], 1 - t0 / y, rcond=None)[0][0])
    return 1 / a, max(float(t0), 0.0)


def main() -> None:
    db = hwdb.load()
    rows = _rows(db)
    result, table = {}, []
    nvidia_t0 = fit_decode([r for r in rows if r["vendor"] == "nvidia" and r["test"] == "tg128"])[1]
    for vendor in sorted({r["vendor"] for r in rows}):
        dec = [r for r in rows if r["vendor"] == vendor and r["test"] == "tg128"]
        pre = [r for r in rows if r["vendor"] == vendor and r["test"] == "pp512" and r["tflops"]]
        eta, t0 = fit_decode(dec, None if len(dec) >= MIN_ROWS_FOR_T0 else nvidia_t0)
        eta_c = statistics.median(r["flops"] * r["tps"] / (r["tflops"] * 1e12) for r in pre) if pre else None
        errs = []
        for r in dec:
            pred = 1 / (r["bytes"] / (eta * r["bw"] * 1e9) + t0)
            errs.append(pred / r["tps"] - 1)
            table.append((vendor, r["gpu"], r["fmt"], "decode", r["tps"], pred))
        perrs = []
        for r in pre:
            pred = eta_c * r["tflops"] * 1e12 / r["flops"]
            perrs.append(pred / r["tps"] - 1)
            table.append((vendor, r["gpu"], r["fmt"], "prefill", r["tps"], pred))
        result[vendor] = dict(decode_bandwidth=round(eta, 3), token_overhead_s=round(t0, 5),
                              prefill_compute=round(eta_c, 3) if eta_c else None,
                              decode_rows=len(dec), prefill_rows=len(pre),
                              decode_median_abs_err=round(statistics.median(map(abs, errs)), 3),
                              decode_max_abs_err=round(max(map(abs, errs)), 3),
                              prefill_median_abs_err=round(statistics.median(map(abs, perrs)), 3) if perrs else None)
    print(f"{'vendor':7s} {'gpu':44s} {'fmt':5s} {'test':8s} {'published':>10s} {'predicted':>10s} {'err':>7s}")
    for v, g, f, t, meas, pred in table:
        print(f"{v:7s} {g[:44]:44s} {f:5s} {t:8s} {meas:10.1f} {pred:10.1f} {pred / meas - 1:+7.1%}")
    print(json.dumps(result, indent=1))
    out = ROOT / "benchmarks/results/calibration.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fit": result, "rows": [dict(zip(("vendor", "gpu", "format", "test", "published_tps",
                                                                 "predicted_tps"), t)) for t in table]}, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
