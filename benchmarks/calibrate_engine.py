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

Routed experts (benchmarks/results/gpu_decode_moe.json: Qwen3-30B-A3B, and a Mixtral 8x7B shape built with 8
layers), each term solved exactly on the two runs after the dense model above:
  decode:         s/token - dense model = MoE layers * moe_layer_s + expert values * (1 / expert rate - 1 / rate)
  prefill grouped: s - dense model = sum over chunks and MoE layers of experts taken * (moe_expert_s
                   + one expert's values / dequant rate)
  prefill slots:   s - dense model + experts' GEMM s = sum of slots * (moe_slot_s + values / expert rate):
                   moe_slot_s alone, least squares

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
            # decode attention reads a KV head's rows once per query head (planner.budget.assess)
            "kv_bytes": layers * position * mem.kv_bytes_per_token(spec, plan.layout.kv) * spec.num_heads / spec.num_kv_heads}


def shape(gpu_id: str, model: str, bpw: float, position: int) -> dict:
    """The benchmark's plan for one case and what its whole decode step reads and decodes."""
    plan = make_plan(model, gpu_id, bpw, 2048)
    return {"plan": plan, **step(plan, plan.spec.num_layers, position),
            "prefill_flops": 512 * _prefill_flops_per_token(plan.spec, 256)}


def truncated_runs(full: dict, big: dict) -> list[dict]:
    """The 70B shape's measured runs with its first 10 and 20 layers (gpu_decode.py builds them so)."""
    return [{**step(full["plan"], n, full["position"]), "seconds": big[f"seconds_{n}_layers"]} for n in (10, 20)]


# gpu_decode_moe.json's rows -> (hwdb model, layers the benchmark built)
MOE_CASES = {"Qwen3-30B-A3B 4.0 bpw": ("qwen3-30b-a3b", None), "Mixtral-8x7B shape 4.0 bpw, 8 layers": ("mixtral-8x7b", 8)}


def moe_assess(gpu, model: str, layers, engine):
    """The benchmark's plan of a MoE case (its first `layers` layers where it built fewer), assessed with `engine`
    as the CUDA engine's speed model."""
    import dataclasses

    from planner import budget
    plan = make_plan(model, gpu.id, 4.0, 2048)
    spec, lay = plan.spec, plan.layout
    if layers is not None:
        spec = dataclasses.replace(spec, num_layers=layers)
        lay = dataclasses.replace(lay, gpu_layers=((0, layers),))
    saved = budget.ENGINE_SPEED[gpu.vendor]
    budget.ENGINE_SPEED[gpu.vendor] = engine
    try:
        return spec, lay, budget.assess(spec, gpu, 1, budget.Host(256 << 30), lay)
    finally:
        budget.ENGINE_SPEED[gpu.vendor] = saved


def moe_fit(gpu, dense, moe: list[dict]) -> tuple[dict, list[dict]]:
    """The routed experts' terms of EngineSpeed (module docstring), from gpu_decode_moe.json's rows, on top of
    the dense fit `dense` (an EngineSpeed); returns the fit and each case's terms."""
    import dataclasses

    rows = {r["case"]: r for r in moe}
    base = dataclasses.replace(dense, expert_values_per_s_per_sm=0.0, moe_layer_s=0.0, moe_slot_s=0.0, moe_expert_s=0.0,
                               dequant_values_per_s_per_sm=float("inf"))
    cases = []
    for name, (model, layers) in MOE_CASES.items():
        spec, lay, a = moe_assess(gpu, model, layers, base)
        moe_layers = sum(map(spec.is_moe_layer, range(spec.num_layers)))
        values = mem.expert_values_per_token(spec)
        one = values / spec.experts_per_token / moe_layers
        prompt, k, e = min(lay.prompt_tokens, lay.ctx), spec.experts_per_token, spec.num_experts
        chunks = [min(lay.chunk, prompt - s) for s in range(0, prompt, lay.chunk)]
        gemm = sum(n * 2.0 * values / (dense.prefill_compute * gpu.fp16_tflops * 1e12) for n in chunks)
        m = rows[name]
        cases.append({"case": name, "moe_layers": moe_layers, "expert_values": values, "one_expert_values": one,
                      "decode_residual_s": 1 / m["decode_tok_s"] - a.decode_s,
                      "taken": sum(moe_layers * min(e, n * k) for n in chunks),
                      "slots": sum(moe_layers * n * k for n in chunks),
                      "grouped_residual_s": prompt / m["prefill_tok_s_grouped"] - a.ttft_s,
                      "slots_residual_s": prompt / m["prefill_tok_s_slots"] - (a.ttft_s - gemm)})
    sms = gpu.sm_count
    # decode: [moe layers, expert values] x [moe_layer_s, 1 / (expert rate SMs) - 1 / (rate SMs)]
    a = np.array([[c["moe_layers"], c["expert_values"]] for c in cases])
    moe_layer_s, extra = np.linalg.solve(a, [c["decode_residual_s"] for c in cases])
    expert_rate = 1 / (extra + 1 / (dense.values_per_s_per_sm * sms)) / sms
    # grouped: [experts taken, taken x one expert's values / SMs] x [moe_expert_s, 1 / dequant rate]
    g = np.array([[c["taken"], c["taken"] * c["one_expert_values"] / sms] for c in cases])
    moe_expert_s, inv_dequant = np.linalg.solve(g, [c["grouped_residual_s"] for c in cases])
    # slots: slots x (moe_slot_s + values / (expert rate SMs)); moe_slot_s by least squares
    n = np.array([c["slots"] for c in cases])
    r = np.array([c["slots_residual_s"] - c["slots"] * c["one_expert_values"] / (expert_rate * sms) for c in cases])
    moe_slot_s = float(n @ r / (n @ n))
    fit = {"expert_values_per_s_per_sm": float(expert_rate), "moe_layer_s": float(moe_layer_s),
           "moe_slot_s": moe_slot_s, "moe_expert_s": float(moe_expert_s),
           "dequant_values_per_s_per_sm": float(1 / inv_dequant)}
    return fit, cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode.json")
    ap.add_argument("--kernels", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_kernels.json")
    ap.add_argument("--moe", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode_moe.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine_calibration.json")
    args = ap.parse_args(argv)
    decode, kernels = json.loads(args.decode.read_text()), json.loads(args.kernels.read_text())
    gpu = hwdb.load().find_gpu(decode["device"])
    bw = gpu.bandwidth_gb_s * 1e9
    rates = {k["kernel"]: k["gb_s"] for k in kernels["kernels"]}
    w_bw = decode["device_copy_gb_s"] * 1e9 / bw
    kv_rate = rates["attention fp16 len 2048"] * 1e9 / gpu.sm_count      # 32 query heads on 32 KV heads
    meas = measurements(decode)
    cases = {name: {**shape(gpu.id, *CASES[name], meas[name]["position"]), **meas[name]} for name in CASES}
    for c in cases.values():
        c["seconds"] = 1 / c["decode_tok_s"]

    # decode: seconds minus the KV term = values / (rate_sm * SMs) + layers * c_layer + c_token
    runs = [c for name, c in cases.items() if name != "Llama-2-70B shape 2.5 bpw"]
    runs += truncated_runs(cases["Llama-2-70B shape 2.5 bpw"], decode["llama2_70b_2.5bpw"])
    a = np.array([[c["values"] / gpu.sm_count, c["layers"], 1.0] for c in runs])
    y = np.array([c["seconds"] - c["kv_bytes"] / (kv_rate * gpu.sm_count) for c in runs])
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
    fit = {"values_per_s_per_sm": 1 / inv_rate, "weight_bandwidth": w_bw, "kv_read_per_s_per_sm": kv_rate,
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
    from planner.roofline import VRAMWISE_CUDA as engine
    run = decode["streaming"]["overlapped"] if engine.overlap_streaming else decode["streaming"]
    s_meas, s_pred = run["seconds_per_token"], 1 / streamed.doc["predicted"]["decode_tokens_per_s"]
    rows.append({"case": "Llama-2-7B shape 4.0 bpw, streamed", "measured_s_per_token": s_meas,
                 "predicted_s_per_token": s_pred, "decode_error": s_meas / s_pred - 1})
    print(f"{'7B 4.0 bpw streamed (s/tok)':28} {s_meas:12.4f} {s_pred:8.4f} {s_meas / s_pred - 1:+7.1%}   (not fitted)")
    # routed experts, on top of the dense fit
    import dataclasses

    from planner.roofline import VRAMWISE_CUDA
    moe_doc = json.loads(args.moe.read_text())
    dense = dataclasses.replace(VRAMWISE_CUDA, **fit)
    moe, moe_cases = moe_fit(gpu, dense, moe_doc["moe"])
    fit.update(moe)
    for c in moe_cases:                      # the planner's predictions (VRAMWISE_CUDA as it is) beside each run
        model, layers = MOE_CASES[c["case"]]
        m = next(r for r in moe_doc["moe"] if r["case"] == c["case"])
        _, lay, a = moe_assess(gpu, model, layers, VRAMWISE_CUDA)
        prompt = min(lay.prompt_tokens, lay.ctx)
        row = {"case": c["case"], "measured_decode_tok_s": m["decode_tok_s"], "predicted_decode_tok_s": 1 / a.decode_s,
               "decode_error": 1 / a.decode_s / m["decode_tok_s"] - 1,
               "measured_prefill_tok_s": max(m["prefill_tok_s_grouped"], m["prefill_tok_s_slots"]),
               "predicted_prefill_tok_s": prompt / a.ttft_s}
        row["prefill_error"] = row["predicted_prefill_tok_s"] / row["measured_prefill_tok_s"] - 1
        rows.append(row)
        print(f"{c['case'][:28]:28} {row['measured_decode_tok_s']:12.1f} {row['predicted_decode_tok_s']:8.1f} "
              f"{row['decode_error']:+7.1%} {row['measured_prefill_tok_s']:14.0f} {row['predicted_prefill_tok_s']:8.0f} "
              f"{row['prefill_error']:+7.1%}")
    print("fit: " + ", ".join(f"{k} {v:.4g}" for k, v in fit.items()))
    write_json({"device": decode["device"], "date": decode["date"], "gpu": gpu.id, "fit": fit, "cases": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
