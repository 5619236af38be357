"""Fit the speed model of vramwise's own CUDA engine (planner/roofline.py: EngineSpeed) to its measured runs,
then show the planner's predictions beside every measurement.

Data (one GPU run, all on the same card): benchmarks/results/gpu_decode.json (decode at 512 positions and
prefill of 512 tokens, for SmolLM2-135M, a Llama-2-7B shape at 4.0 and 2.5 bpw and a Llama-2-70B shape at
2.5 bpw) and benchmarks/results/gpu_kernels.json (per-kernel rates). The plans are rebuilt as the benchmark
built them (`gpu_decode.make_plan`), so bytes and weights per token are the ones that ran.

Decode model:  s/token = max(weight bytes / (w_bw * bandwidth), weights / (rate_sm * SMs))
                         + KV bytes / (kv_bw * bandwidth) + layers * c_layer + c_token
               w_bw: the card's measured copy rate over its peak (the ceiling where bytes bind; on the
               H200 they do not, so it is not tested here); kv_bw: decode attention over 2,048 fp16
               positions (gpu_kernels.json) over the peak; rate_sm, c_layer, c_token >= 0: least squares
               on five runs, SmolLM2 (30 layers), the 7B shape at two widths (32) and the 70B shape built
               with 10 and 20 layers, whose different layer counts separate the per-layer cost from the
               per-token one (the weights term binds for all of them; the script checks it).
Prefill model: s/chunk = FLOPs / (eta_c * fp16 peak) + layers * c_prefill, solved on the two 4.0-bpw cases.

Prints a table, writes benchmarks/results/engine_calibration.json; planner/roofline.py's VRAMWISE_CUDA holds
the fitted values (tests/test_roofline.py checks they agree with this file, and the planner's predictions
with the measurements). Usage: python benchmarks/calibrate_engine.py (CPU only).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchlib import ROOT, write_json

from gpu_decode import make_plan  # noqa: E402
import hwdb  # noqa: E402
from planner import memory as mem  # noqa: E402
from planner.budget import _prefill_flops_per_token  # noqa: E402

# gpu_decode.json's rows -> (hwdb model, bpw); the 70B row is its extrapolation to 80 layers
CASES = {"SmolLM2-135M 4.0 bpw": ("smollm2-135m", 4.0), "Llama-2-7B shape 4.0 bpw": ("llama2-7b", 4.0),
         "Llama-2-7B shape 2.5 bpw": ("llama2-7b", 2.5), "Llama-2-70B shape 2.5 bpw": ("llama2-70b", 2.5)}
PREFILL_FIT = ("SmolLM2-135M 4.0 bpw", "Llama-2-7B shape 4.0 bpw")


def measurements(decode: dict) -> dict[str, dict]:
    rows = {c["case"]: {"decode_tok_s": c["decode_tok_s"], "prefill_tok_s": c["prefill_tok_s"],
                        "position": c["decode_position"]} for c in decode["cases"]}
    big = decode["llama2_70b_2.5bpw"]
    rows["Llama-2-70B shape 2.5 bpw"] = {"decode_tok_s": big["decode_tok_s_extrapolated"], "prefill_tok_s": None,
                                         "position": rows["Llama-2-7B shape 4.0 bpw"]["position"]}
    return rows


def step(plan, layers: int, position: int) -> dict:
    """What one decode step through the plan's first `layers` layers reads and decodes on the device."""
    spec = plan.spec
    read, values = mem.layer_read_bytes(spec, plan.layout.assignment), mem.layer_read_values(spec)
    glob = sum(v for k, v in mem.global_weight_bytes(spec).items() if k != "embed")
    return {"layers": layers, "weight_bytes": sum(read[:layers]) + glob,
            "values": sum(values[:layers]) + spec.vocab_size * spec.hidden_size,
            "kv_bytes": layers * position * mem.kv_bytes_per_token(spec, plan.layout.kv)}


def shape(gpu_id: str, model: str, bpw: float, position: int) -> dict:
    """The benchmark's plan for one case and what its whole decode step reads and decodes."""
    plan = make_plan(model, gpu_id, bpw, 2048)
    return {"plan": plan, **step(plan, plan.spec.num_layers, position),
            "prefill_flops": 512 * _prefill_flops_per_token(plan.spec, 256)}


def truncated_runs(full: dict, big: dict) -> list[dict]:
    """The 70B shape's measured runs with its first 10 and 20 layers (gpu_decode.py builds them so)."""
    return [{**step(full["plan"], n, full["position"]), "seconds": big[f"seconds_{n}_layers"]} for n in (10, 20)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode.json")
    ap.add_argument("--kernels", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_kernels.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine_calibration.json")
    args = ap.parse_args(argv)
    decode, kernels = json.loads(args.decode.read_text()), json.loads(args.kernels.read_text())
    gpu = hwdb.load().find_gpu(decode["device"])
    bw = gpu.bandwidth_gb_s * 1e9
    rates = {k["kernel"]: k["gb_s"] for k in kernels["kernels"]}
    w_bw = decode["device_copy_gb_s"] * 1e9 / bw
    kv_bw = rates["attention fp16 len 2048"] * 1e9 / bw
    meas = measurements(decode)
    cases = {name: {**shape(gpu.id, *CASES[name], meas[name]["position"]), **meas[name]} for name in CASES}
    for c in cases.values():
        c["seconds"] = 1 / c["decode_tok_s"]

    # decode: seconds minus the KV term = values / (rate_sm * SMs) + layers * c_layer + c_token
    runs = [c for name, c in cases.items() if name != "Llama-2-70B shape 2.5 bpw"]
    runs += truncated_runs(cases["Llama-2-70B shape 2.5 bpw"], decode["llama2_70b_2.5bpw"])
    a = np.array([[c["values"] / gpu.sm_count, c["layers"], 1.0] for c in runs])
    y = np.array([c["seconds"] - c["kv_bytes"] / (kv_bw * bw) for c in runs])
    (inv_rate, c_layer, c_token), *_ = np.linalg.lstsq(a, y, rcond=None)
    if c_token < 0:                       # a cost cannot be negative: fit without it
        (inv_rate, c_layer), *_ = np.linalg.lstsq(a[:, :2], y, rcond=None)
        c_token = 0.0
    for c in runs:
        if c["weight_bytes"] / (w_bw * bw) > c["values"] * inv_rate / gpu.sm_count:
            raise SystemExit("the bytes term binds for a fitted case: the model's fit does not apply")

    # prefill: two cases, two unknowns
    p = [cases[n] for n in PREFILL_FIT]
    m = np.array([[c["prefill_flops"] / (gpu.fp16_tflops * 1e12), c["layers"]] for c in p])
    inv_eta, c_prefill = np.linalg.solve(m, np.array([512 / c["prefill_tok_s"] for c in p]))
    fit = {"values_per_s_per_sm": 1 / inv_rate, "weight_bandwidth": w_bw, "kv_bandwidth": kv_bw,
           "layer_overhead_s": c_layer, "token_overhead_s": c_token, "prefill_compute": 1 / inv_eta,
           "prefill_layer_s": c_prefill}

    # the planner's predictions with the factors now in planner/roofline.py, beside each measurement
    rows = []
    print(f"{gpu.name} ({decode['date']}): vramwise CUDA engine, fitted and predicted")
    print(f"{'case':28} {'decode tok/s':>12} {'planner':>8} {'err':>7} {'prefill tok/s':>14} {'planner':>8} {'err':>7}")
    for name, c in cases.items():
        pred = c["plan"].doc["predicted"]
        row = {"case": name, "measured_decode_tok_s": c["decode_tok_s"], "predicted_decode_tok_s": pred["decode_tokens_per_s"],
               "decode_error": pred["decode_tokens_per_s"] / c["decode_tok_s"] - 1,
               "measured_prefill_tok_s": c["prefill_tok_s"], "predicted_prefill_tok_s": pred["prefill_tokens_per_s"],
               "prefill_error": None if c["prefill_tok_s"] is None else pred["prefill_tokens_per_s"] / c["prefill_tok_s"] - 1}
        rows.append(row)
        pre = "" if c["prefill_tok_s"] is None else \
            f"{c['prefill_tok_s']:14.0f} {pred['prefill_tokens_per_s']:8.0f} {row['prefill_error']:+7.1%}"
        print(f"{name:28} {c['decode_tok_s']:12.1f} {pred['decode_tokens_per_s']:8.1f} {row['decode_error']:+7.1%} {pre}")
    # out of sample: the 7B shape streamed layer by layer over the host link
    streamed = make_plan("llama2-7b", gpu.id, 4.0, 2048, ["--mode", "stream"])
    s_meas, s_pred = decode["streaming"]["seconds_per_token"], 1 / streamed.doc["predicted"]["decode_tokens_per_s"]
    rows.append({"case": "Llama-2-7B shape 4.0 bpw, streamed", "measured_s_per_token": s_meas,
                 "predicted_s_per_token": s_pred, "decode_error": s_meas / s_pred - 1})
    print(f"{'7B 4.0 bpw streamed (s/tok)':28} {s_meas:12.4f} {s_pred:8.4f} {s_meas / s_pred - 1:+7.1%}   (not fitted)")
    print("fit: " + ", ".join(f"{k} {v:.4g}" for k, v in fit.items()))
    write_json({"device": decode["device"], "date": decode["date"], "gpu": gpu.id, "fit": fit, "cases": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
