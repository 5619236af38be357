"""Fit the roofline's efficiency factors to published llama.cpp runs and show the residuals.

Data: benchmarks/published/measurements.yaml, llama-bench rows for Llama 2 7B (tg128 decode and pp512
prefill), matched to hwdb cards by benchmarks/published_rows.py (the vendor's own backends: CUDA on NVIDIA,
Metal on Apple, ROCm or Vulkan on AMD, Vulkan or SYCL on Intel). Apple rows whose chip hwdb lacks use the
bandwidth their own table lists. Rows are grouped as the planner prices them (planner.roofline.efficiency_group):
by vendor, and AMD's GCN-lineage chips apart.

Decode model:   1 / tokens_per_s = bytes_per_token / (eta * bandwidth) + layers * cycles / boost_clock
                (least squares on relative error; bytes = weights read + KV at position 64; a card without a
                clock in hwdb, every Apple chip, is taken at the vendor's reference clock)
Prefill model:  512 / tokens_per_s = 512 * flops_per_token / (eta_c * fp16_tflops)
                (eta_c: median over rows)

Prints a table, writes benchmarks/results/calibration.json; planner/roofline.py's EFFICIENCY holds
the fitted values (tests/test_roofline.py checks they agree with this file).
Usage: python benchmarks/calibrate_speed.py
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchlib  # noqa: E402
import hwdb  # noqa: E402
import published_rows  # noqa: E402
from planner.budget import _prefill_flops_per_token  # noqa: E402
from planner.roofline import efficiency_group  # noqa: E402
from planner.spec import param_count  # noqa: E402

GGUF_BPW = {"Q4_0": 4.5, "Q8_0": 8.5, "F16": 16.0}      # ggml block formats: 18/32, 34/32, 2 bytes
DECODE_POS = 64                                         # tg128 generates positions 0..127
# Apple publishes no GPU clocks: its fixed costs are fit and priced at this nominal clock, so for Apple chips
# `layer_cycles` is microseconds a layer times 1,000.
NOMINAL_CLOCK_MHZ = 1000.0
MIN_ROWS_FOR_CYCLES = 3     # fewer rows: fit eta alone, the cycles borrowed from the NVIDIA fit
# No card reads its memory at the full rated rate: copy kernels reach 85-93% (vramwise measured 85.7% on the
# H200, benchmarks/results/gpu_decode.json). A fit above this cap trades bandwidth against the fixed cost on too
# few or too noisy rows (AMD's mix of ROCm and Vulkan builds); eta is then held at the cap and the cycles fit alone.
ETA_MAX = 0.95


def in_fit(row: published_rows.Row) -> bool:
    """The rows this script fits to: llama-bench runs of Llama 2 7B in the three plain ggml types, but for rows
    measurements.yaml holds out (`fit: false`, with the reason in `fit_note`)."""
    m = row.m
    return (not row.skip and m["engine"] == "llama.cpp" and m["model"] == "Llama 2 7B" and m.get("fit", True)
            and m["test"] in ("tg128", "pp512") and m["weights_format"] in GGUF_BPW
            and not published_rows.spilled(row, m["weights_bytes"] or 0))


def _rows(db: hwdb.Database) -> list[dict]:
    spec = db.find_model("llama2-7b")
    out = []
    for row in filter(in_fit, published_rows.load(db)):
        m, gpu = row.m, row.gpu
        embed = spec.vocab_size * spec.hidden_size * GGUF_BPW[m["weights_format"]] / 8
        weights = (m["weights_bytes"] or param_count(spec) * GGUF_BPW[m["weights_format"]] / 8) - embed
        kv = spec.num_layers * DECODE_POS * 2 * spec.kv_dim * 2
        out.append(dict(vendor=efficiency_group(gpu), gpu=m["gpu"], fmt=m["weights_format"], test=m["test"],
                        tps=m["tokens_per_s"], bytes=weights + kv, bw=gpu.bandwidth_gb_s,
                        clock=gpu.boost_clock_mhz, layers=spec.num_layers,
                        tflops=None if gpu.id == "published" else gpu.fp16_tflops, source=m["source"],
                        flops=_prefill_flops_per_token(spec, 256)))
    return out


def reference_clock(rows: list[dict]) -> float:
    """The clock a card of this vendor without one in hwdb is taken at: the median of the fit's cards, or the
    nominal clock where none has one (Apple)."""
    clocks = [r["clock"] for r in rows if r["clock"]]
    return float(statistics.median(clocks)) if clocks else NOMINAL_CLOCK_MHZ


def fit_decode(rows: list[dict], ref_mhz: float, cycles: float | None = None) -> tuple[float, float]:
    """eta (and the cycles a layer unless given) minimizing the relative error of seconds per token."""
    x = np.array([r["bytes"] / (r["bw"] * 1e9) for r in rows])
    z = np.array([r["layers"] / ((r["clock"] or ref_mhz) * 1e6) for r in rows])
    y = np.array([1 / r["tps"] for r in rows])
    if cycles is None:
        a, cycles = np.linalg.lstsq(np.column_stack([x / y, z / y]), np.ones_like(y), rcond=None)[0]
        if 1 / a > ETA_MAX or a < 0:
            a = 1 / ETA_MAX
            cycles = float(np.linalg.lstsq((z / y)[:, None], 1 - a * x / y, rcond=None)[0][0])
    else:
        a = float(np.linalg.lstsq((x / y)[:, None], 1 - cycles * z / y, rcond=None)[0][0])
    return min(1 / a, ETA_MAX), max(float(cycles), 0.0)


def predict_decode(r: dict, eta: float, cycles: float, ref_mhz: float) -> float:
    return 1 / (r["bytes"] / (eta * r["bw"] * 1e9) + r["layers"] * cycles / ((r["clock"] or ref_mhz) * 1e6))


def main() -> None:
    db = hwdb.load()
    rows = _rows(db)
    result, table = {}, []
    nvidia = [r for r in rows if r["vendor"] == "nvidia" and r["test"] == "tg128"]
    nvidia_cycles = fit_decode(nvidia, reference_clock(nvidia))[1]
    # vendors first, then the architecture groups within one (amd-gcn), which borrow their vendor's cycles
    for vendor in sorted({r["vendor"] for r in rows}, key=lambda v: ("-" in v, v)):
        dec = [r for r in rows if r["vendor"] == vendor and r["test"] == "tg128"]
        pre = [r for r in rows if r["vendor"] == vendor and r["test"] == "pp512" and r["tflops"]]
        ref = reference_clock(dec)
        base = vendor.split("-")[0]
        borrowed = result[base]["layer_cycles"] if base != vendor else nvidia_cycles
        eta, cycles = fit_decode(dec, ref, None if len(dec) >= MIN_ROWS_FOR_CYCLES else borrowed)
        eta_c = statistics.median(r["flops"] * r["tps"] / (r["tflops"] * 1e12) for r in pre) if pre else None
        errs = []
        for r in dec:
            pred = predict_decode(r, eta, cycles, ref)
            errs.append(pred / r["tps"] - 1)
            table.append((vendor, r["gpu"], r["fmt"], "decode", r["tps"], pred))
        perrs = []
        for r in pre:
            pred = eta_c * r["tflops"] * 1e12 / r["flops"]
            perrs.append(pred / r["tps"] - 1)
            table.append((vendor, r["gpu"], r["fmt"], "prefill", r["tps"], pred))
        result[vendor] = dict(decode_bandwidth=round(eta, 3), layer_cycles=float(f"{cycles:.3g}"),
                              reference_clock_mhz=ref, cycles_borrowed=len(dec) < MIN_ROWS_FOR_CYCLES,
                              prefill_compute=round(eta_c, 3) if eta_c else None,
                              decode_rows=len(dec), prefill_rows=len(pre),
                              decode_median_abs_err=round(statistics.median(map(abs, errs)), 3),
                              decode_max_abs_err=round(max(map(abs, errs)), 3),
                              prefill_median_abs_err=round(statistics.median(map(abs, perrs)), 3) if perrs else None)
    print(f"{'vendor':7s} {'gpu':44s} {'fmt':5s} {'test':8s} {'published':>10s} {'predicted':>10s} {'err':>7s}")
    for v, g, f, t, meas, pred in table:
        print(f"{v:7s} {g[:44]:44s} {f:5s} {t:8s} {meas:10.1f} {pred:10.1f} {pred / meas - 1:+7.1%}")
    print(json.dumps(result, indent=1))
    keys = ("vendor", "gpu", "format", "test", "published_tps", "predicted_tps")
    benchlib.write_json({"fit": result, "rows": [dict(zip(keys, (*t[:5], round(t[5], 2)))) for t in table]},
                        ROOT / "benchmarks/results/calibration.json")


if __name__ == "__main__":
    main()
