"""GPU decode, prefill and streaming against the memory-bandwidth roofline (issue 6). A benchmark, never a test.

One run on the CUDA device it finds measures:
  - copy bandwidth: a large device-to-device copy (bytes read + written) and a pinned host-to-device copy;
  - decode tokens/s at DECODE_AT cached positions, eager and as a replayed CUDA graph, and achieved GB/s (weight + KV bytes read per
    token over the time per token) as a fraction of the measured copy bandwidth, for SmolLM2-135M, a
    Llama-2-7B shape at 4.0 and 2.5 bpw, and a Llama-2-70B shape at 2.5 bpw (run with 10 and 20 layers; the
    per-layer slope extrapolates to all 80);
  - prefill tokens/s for a 512-token prompt;
  - streaming seconds/token (every layer copied from pinned host memory) against the streamed bytes over
    the measured host-to-device bandwidth;
  - CuPy's pool against the plan's weights + state;
  - the planner's predicted tokens/s beside each measured one.
Weights are random codes in each plan's formats: the kernels' speed does not depend on the values.
Prints a table, writes JSON (default benchmarks/results/gpu_decode.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import gc
import math
import statistics
import sys
import tempfile
import time
import types
from datetime import date
from pathlib import Path

import numpy as np

from benchlib import ROOT, write_json

from planner import memory as mem  # noqa: E402
from planner.formats import HEAD_OPTION  # noqa: E402
from planner.spec import tensors  # noqa: E402
from refengine.quant import QSlice, QTensor  # noqa: E402

# prefill length; decode timed from this many cached positions: where the planner predicts decode speed
# (its predicted.decode_position, the default prompt's end), so measured and predicted compare like for like
PROMPT, DECODE_AT = 512, 512


def copy_bandwidth(cp) -> dict:
    """Median of 10 timed copies each: 2 GiB device-to-device (read + write counted), 1 GiB pinned host-to-device."""
    import cupyx
    n = 1 << 31
    a, b = cp.empty(n, cp.uint8), cp.empty(n, cp.uint8)
    host = cupyx.empty_pinned((n // 2,), np.uint8)
    host[:] = 1
    def timed(fn, reps=10):
        fn()
        out = []
        for _ in range(reps):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
        return statistics.median(out)
    d2d = 2 * n / timed(lambda: b.__setitem__(slice(None), a))
    h2d = (n // 2) / timed(lambda: b[: n // 2].set(host, stream=cp.cuda.get_current_stream()))
    return {"device_copy_gb_s": d2d / 1e9, "host_to_device_gb_s": h2d / 1e9}


def random_linear(rng, option, n: int, k: int):
    """A QuantizedLinear-like object of random codes and small fp16 scales in `option`."""
    slices, start = [], 0
    for rows, bits in option.slice_rows(k):
        words = rng.integers(0, 2**32, size=(n, math.ceil(rows / 32) * bits), dtype=np.uint32)
        scales = (rng.standard_normal((n, math.ceil(rows / option.group_size))) * 0.002).astype(np.float16)
        slices.append(QSlice(start, rows, bits, words, scales))
        start += rows
    perm = rng.permutation(k).astype(np.int32) if len(slices) > 1 else None
    return types.SimpleNamespace(qtensor=QTensor(option, (n, k), tuple(slices), perm))


class RandomWeights(dict):
    """Canonical name -> random weights in the plan's formats; one random tensor per (shape, option), shared
    by every layer (each layer still gets its own device copy)."""

    def __init__(self, spec, assignment, seed: int = 0):
        rng, shared = np.random.default_rng(seed), {}
        for t in tensors(spec):
            if t.quantized:
                key = (t.shape, assignment[t.name].name)
                if key not in shared:
                    shared[key] = random_linear(rng, assignment[t.name], *t.shape)
                self[t.name] = shared[key]
            elif t.kind == "norm":
                self[t.name] = np.ones(t.shape[-1], np.float32)
            elif t.kind in ("embed", "router"):
                self[t.name] = (rng.standard_normal(t.shape) * 0.02).astype(np.float16)
        self["head"] = random_linear(rng, HEAD_OPTION, spec.vocab_size, spec.hidden_size)


def make_plan(model: str, gpu: str, bpw: float, ctx: int, extra: tuple = ()):
    from planner.cli import main
    from planner.plan import load_plan
    path = Path(tempfile.mkdtemp()) / "plan.yaml"
    if main(["plan", "--gpu", gpu, "--model", model, "--bpw", str(bpw), "--ctx", str(ctx), *extra, "-o", str(path), "--quiet"]):
        raise SystemExit(f"vramwise plan failed for {model} at {bpw} bpw on {gpu}")
    return load_plan(path)


def build(plan, layers=None, resident=None, graphs=None, overlap=None):
    from gpuengine.model import GPUTransformer
    spec = plan.spec if layers is None else dataclasses.replace(plan.spec, num_layers=layers)
    lay = plan.layout
    weights = RandomWeights(spec, lay.assignment)
    return GPUTransformer(spec, weights, lay.ctx, lay.kv.name, lay.chunk, True, resident, graphs, overlap)


def decode_seconds(net, steps: int = 40) -> float:
    """Median seconds per decoded token from DECODE_AT cached positions (each step waits for the previous,
    as generation does for its sampled token)."""
    net.reset()
    net.forward_device(list(range(DECODE_AT)))
    for _ in range(3):
        net.forward_device([1])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        net.forward_device([1])
        net.stream.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prefill_seconds(net, reps: int = 3) -> float:
    out = []
    for _ in range(reps):
        net.reset()
        t0 = time.perf_counter()
        net.forward_device(list(range(PROMPT)))
        net.stream.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bytes_per_token(net) -> int:
    """Weights read by one decode step plus the KV cache read at DECODE_AT positions."""
    spec, kv = net.spec, net.state.kv
    weights = net.weights.resident_bytes + sum(img.nbytes for img in net.weights.images.values())
    return weights + spec.num_layers * DECODE_AT * mem.kv_bytes_per_token(spec, kv)


def free(cp) -> None:
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()


def run_case(cp, bw, name, plan, planned_bytes) -> dict:
    net = build(plan)
    pool = cp.get_default_memory_pool().total_bytes()
    graph_s = decode_seconds(net)
    net.graphs, net._graph = False, None
    eager_s = decode_seconds(net)
    pre_s = prefill_seconds(net)
    b = bytes_per_token(net)
    row = {"case": name, "bpw": plan.doc["weights"]["avg_bpw"],
           "decode_tok_s": 1 / graph_s, "decode_eager_tok_s": 1 / eager_s,
           "bytes_per_token": b, "achieved_gb_s": b / graph_s / 1e9, "fraction_of_copy_bw": b / graph_s / 1e9 / bw,
           "prefill_tok_s": PROMPT / pre_s, "decode_position": DECODE_AT,
           "predicted_decode_position": plan.doc["predicted"]["decode_position"],
           "predicted_decode_tok_s": plan.doc["predicted"]["decode_tokens_per_s"],
           "predicted_prefill_tok_s": plan.doc["predicted"]["prefill_tokens_per_s"],
           "pool_bytes": pool, "planned_bytes": planned_bytes,
           "pool_vs_plan": pool / planned_bytes - 1}
    del net
    free(cp)
    return row


def planned_engine_bytes(plan) -> int:
    from planner.cli_engine import _planned_engine_bytes
    return _planned_engine_bytes(plan, "gpu")


def sweep_choice(path: Path, key: str, what: str) -> dict:
    """The shape a gpu_kernels.py JSON chose (`key`), or exit with one line saying why there is none."""
    try:
        best = json.loads(path.read_text()).get(key)
    except (OSError, ValueError) as exc:
        sys.exit(f"error: cannot read {path}: {exc} (write it with benchmarks/gpu_kernels.py --out)")
    if not best:
        sys.exit(f"error: {path} has no {what} sweep ({key}); run benchmarks/gpu_kernels.py on this card")
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="auto", help="GPU the plans are made for (default auto: this one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode.json")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 and the 7B shape at 4.0 bpw only")
    ap.add_argument("--matvec-from", type=Path, help="gpu_kernels.py's JSON: use the matvec block shape it chose")
    ap.add_argument("--tensor-cores-from", type=Path,
                    help="gpu_kernels.py's JSON: decode 4-bit linears on the tensor cores (tmatvec) with the shape "
                         "its sweep chose")
    ap.add_argument("--moe", action="store_true",
                    help="also routed experts: Qwen3-30B-A3B and a Mixtral 8x7B shape (moe_cases)")
    ap.add_argument("--attention", choices=("split", "gqa", "lanes", "step"),
                    help="decode attention kernel (launch.ATTN_DECODE; default: the engine's)")
    ap.add_argument("--regs", action="store_true",
                    help="the packed matvec's register caps (launch.MATVEC_REGS: the fold, the in-kernel gather and "
                         "routed experts' matvecs held to fewer registers)")
    ap.add_argument("--candidates", action="store_true",
                    help="the engine's alternatives to its defaults (run 9 timed each kernel slower on an H200): "
                         "GQA decode attention with RoPE, cache store and merge in its launch, and with a "
                         "unit-a-lane matvec, RMSNorm folded in (the final one into the head) and mixed options' "
                         "inputs gathered in the kernel, all with the register caps (--regs)")
    args = ap.parse_args(argv)
    import cupy as cp

    from gpuengine import device, launch
    from gpuengine import model as engine
    device.require()
    if args.matvec_from:
        launch.MATVEC = launch.MatvecShape.from_json(sweep_choice(args.matvec_from, "matvec_best", "matvec"))
    if args.tensor_cores_from:
        best = sweep_choice(args.tensor_cores_from, "tensor_core_best", "tensor-core")
        launch.MATVEC_TC = launch.TcShape(best["tiles"], best["warps"])
    if args.candidates:
        launch.FUSE_NORM, launch.ATTN_DECODE, launch.GATHER, launch.MATVEC_REGS = True, "step", "kernel", True
    if args.regs:
        launch.MATVEC_REGS = True
    if args.attention:
        launch.ATTN_DECODE = args.attention
    settings = {"matvec": dataclasses.asdict(launch.MATVEC), "overlap_streaming": engine.OVERLAP,
                "dequant": launch.DEQUANT, "prefill_attention": launch.ATTN_PREFILL, "decode_attention": launch.ATTN_DECODE,
                "norm_folded": launch.FUSE_NORM and launch.MATVEC.takes_variants, "gather_in_kernel": launch.gathers_in_kernel(),
                "tensor_cores": dataclasses.asdict(launch.MATVEC_TC) if launch.MATVEC_TC else None,
                "register_caps": launch.MATVEC_REGS}
    bw = copy_bandwidth(cp)
    free(cp)                                   # the copy buffers stay out of the pool figures below
    print(f"{device.name()}: device copy {bw['device_copy_gb_s']:.0f} GB/s, host->device {bw['host_to_device_gb_s']:.1f} GB/s",
          flush=True)
    rows = []
    cases = [("SmolLM2-135M", "smollm2-135m", 4.0), ("Llama-2-7B shape", "llama2-7b", 4.0)]
    if not args.quick:
        cases.append(("Llama-2-7B shape", "llama2-7b", 2.5))
    for name, model, bpw in cases:
        plan = make_plan(model, args.gpu, bpw, 2048)
        rows.append(run_case(cp, bw["device_copy_gb_s"], f"{name} {bpw} bpw", plan, planned_engine_bytes(plan)))
        print(rows[-1], flush=True)
    doc = {"device": device.name(), "date": date.today().isoformat(), "cupy": cp.__version__,
           "matvec_block": dataclasses.asdict(launch.MATVEC), "engine": settings, **bw, "cases": rows}
    if not args.quick:
        doc["llama2_70b_2.5bpw"] = seventy_b(cp, bw, args.gpu)
        doc["streaming"] = streaming(cp, bw, args.gpu)
        doc["architectures"] = architectures(cp, bw["device_copy_gb_s"], args.gpu)
    if args.moe:
        doc["moe"] = moe_cases(cp, bw, args.gpu)
    table(doc)
    write_json(doc, args.out)
    return 0


def seventy_b(cp, bw, gpu) -> dict:
    """A Llama-2-70B shape at 2.5 bpw, built with 10 and 20 layers: time = a + layers * slope, taken to 80."""
    plan = make_plan("llama2-70b", gpu, 2.5, 2048)
    t = {}
    for layers in (10, 20):
        net = build(plan, layers)
        t[layers] = decode_seconds(net)
        per_layer = bytes_per_token(net)
        del net
        free(cp)
    slope = (t[20] - t[10]) / 10
    full = t[10] + slope * (plan.spec.num_layers - 10)
    layer_bytes = sum(mem.layer_weight_bytes(plan.spec, plan.layout.assignment))
    b = layer_bytes + mem.global_weight_bytes(plan.spec)["head"] + \
        plan.spec.num_layers * DECODE_AT * mem.kv_bytes_per_token(plan.spec, plan.layout.kv)
    out = {"decode_tok_s_extrapolated": 1 / full, "seconds_10_layers": t[10], "seconds_20_layers": t[20],
           "bytes_per_token": b, "achieved_gb_s": b / full / 1e9, "fraction_of_copy_bw": b / full / 1e9 / bw["device_copy_gb_s"],
           "predicted_decode_tok_s": plan.doc["predicted"]["decode_tokens_per_s"], "bytes_20_layers": per_layer}
    print(out, flush=True)
    return out


def streaming(cp, bw, gpu) -> dict:
    """Every layer of the 7B shape at 4.0 bpw streamed from pinned host memory, against bytes / link rate:
    copies serial with compute, and overlapped on a copy stream (gpuengine.schedule); the engine's default is
    VRAMWISE_CUDA.overlap_streaming."""
    plan = make_plan("llama2-7b", gpu, 4.0, 2048)
    out = {}
    for overlap in (False, True):
        net = build(plan, resident=range(0), overlap=overlap)
        s = decode_seconds(net, steps=10)
        streamed = sum(img.nbytes for img in net.weights.images.values())
        bound = streamed / (bw["host_to_device_gb_s"] * 1e9)
        pool = cp.get_default_memory_pool().total_bytes()
        del net
        free(cp)
        run = {"seconds_per_token": s, "streamed_bytes": streamed, "link_bound_s": bound, "ratio_to_bound": s / bound,
               "pool_bytes": pool}
        if overlap:
            out["overlapped"] = run
        else:
            out.update(run)
        print({"overlap": overlap, **run}, flush=True)
    return out


ARCHITECTURES = (("Llama-3-8B 4.0 bpw", "llama3-8b"), ("Qwen3-8B 4.0 bpw", "qwen3-8b"),
                 ("Gemma-2-9B 4.0 bpw", "gemma2-9b"))


def architectures(cp, bw: float, gpu) -> list[dict]:
    """The launches other architectures add, against Llama 3 8B (GQA, 32 layers, the same widths as Qwen3 8B
    but for 36 layers and its q / k head norms): Qwen3-8B (two head-norm launches a layer) and Gemma-2-9B (two
    post norms a layer, GeGLU, soft caps). A case that fails is recorded with its error, not fatal."""
    rows = []
    for name, model_id in ARCHITECTURES:
        try:
            plan = make_plan(model_id, gpu, 4.0, 2048)
            rows.append(run_case(cp, bw, name, plan, planned_engine_bytes(plan)))
        except Exception as exc:                                   # noqa: BLE001 - recorded, the run goes on
            rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}"})
            free(cp)
        print(rows[-1], flush=True)
    return rows


def moe_cases(cp, bw, gpu) -> list[dict]:
    """Routed experts at 4.0 bpw: Qwen3-30B-A3B whole (128 experts of 768, 8 a token) and a Mixtral 8x7B shape
    (8 experts of 14336, 2 a token) built with 8 of its 32 layers. Decode (graph) against the bytes a token
    reads (each layer's attention, router and k experts; head; cache), prefill at 512 tokens with the experts
    grouped and as slots (gpuengine.model.MOE_PREFILL), and the Mixtral shape with every layer streamed (the
    slots take attention and router, the experts are read in place in host memory) against its bytes read
    over the measured host link."""
    from gpuengine import model
    rows = []
    for name, model_id, layers in (("Qwen3-30B-A3B 4.0 bpw", "qwen3-30b-a3b", None),
                                   ("Mixtral-8x7B shape 4.0 bpw, 8 layers", "mixtral-8x7b", 8)):
        plan = make_plan(model_id, gpu, 4.0, 2048)
        net = build(plan, layers)
        spec, lay = net.spec, plan.layout
        layer_read = sum(mem.layer_read_bytes(spec, lay.assignment))
        read = layer_read + mem.global_weight_bytes(spec)["head"] + \
            spec.num_layers * DECODE_AT * mem.kv_bytes_per_token(spec, lay.kv)
        s = decode_seconds(net)
        prefill = {}
        for mode in ("grouped", "slots"):
            model.MOE_PREFILL = mode
            prefill[mode] = PROMPT / prefill_seconds(net)
        model.MOE_PREFILL = "auto"
        row = {"case": name, "decode_tok_s": 1 / s, "bytes_per_token": read, "achieved_gb_s": read / s / 1e9,
               "fraction_of_copy_bw": read / s / 1e9 / bw["device_copy_gb_s"],
               "prefill_tok_s_grouped": prefill["grouped"], "prefill_tok_s_slots": prefill["slots"],
               "predicted_decode_tok_s": plan.doc["predicted"]["decode_tokens_per_s"] if layers is None else None,
               "predicted_prefill_tok_s": plan.doc["predicted"]["prefill_tokens_per_s"] if layers is None else None}
        del net
        free(cp)
        if layers is not None:
            net = build(plan, layers, resident=range(0))
            streamed = decode_seconds(net, steps=10)
            bound = layer_read / (bw["host_to_device_gb_s"] * 1e9)
            row.update(streamed_seconds_per_token=streamed, streamed_link_bound_s=bound,
                       streamed_ratio_to_bound=streamed / bound)
            del net
            free(cp)
        rows.append(row)
        print(row, flush=True)
    return rows


def table(doc: dict) -> None:
    print(f"\n{doc['device']} ({doc['date']}): copy {doc['device_copy_gb_s']:.0f} GB/s, "
          f"host->device {doc['host_to_device_gb_s']:.1f} GB/s")
    print(f"{'case':34} {'decode tok/s':>12} {'eager':>8} {'GB/s':>7} {'of copy':>8} {'prefill tok/s':>13} "
          f"{'plan decode':>11} {'plan prefill':>12} {'pool vs plan':>12}")
    for r in doc["cases"]:
        print(f"{r['case']:34} {r['decode_tok_s']:12.1f} {r['decode_eager_tok_s']:8.1f} {r['achieved_gb_s']:7.0f} "
              f"{r['fraction_of_copy_bw']:8.1%} {r['prefill_tok_s']:13.0f} {r['predicted_decode_tok_s']:11.1f} "
              f"{r['predicted_prefill_tok_s']:12.0f} {r['pool_vs_plan']:+12.2%}")
    if "llama2_70b_2.5bpw" in doc:
        s = doc["llama2_70b_2.5bpw"]
        print(f"{'Llama-2-70B shape 2.5 bpw (extrap.)':34} {s['decode_tok_s_extrapolated']:12.1f} {'':8} "
              f"{s['achieved_gb_s']:7.0f} {s['fraction_of_copy_bw']:8.1%} {'':13} {s['predicted_decode_tok_s']:11.1f}")
    if "streaming" in doc:
        s = doc["streaming"]
        print(f"streaming 7B 4.0 bpw: {s['seconds_per_token']:.3f} s/token, link bound {s['link_bound_s']:.3f} s "
              f"({s['ratio_to_bound']:.2f}x)")
        if "overlapped" in s:
            o = s["overlapped"]
            print(f"  overlapped copies: {o['seconds_per_token']:.3f} s/token ({o['ratio_to_bound']:.2f}x)")
    for r in doc.get("architectures", []):
        if "error" in r:
            print(f"{r['case']:34} error: {r['error']}")
        else:
            print(f"{r['case']:34} {r['decode_tok_s']:12.1f} {r['decode_eager_tok_s']:8.1f} {r['achieved_gb_s']:7.0f} "
                  f"{r['fraction_of_copy_bw']:8.1%} {r['prefill_tok_s']:13.0f} {r['predicted_decode_tok_s']:11.1f} "
                  f"{r['predicted_prefill_tok_s']:12.0f} {r['pool_vs_plan']:+12.2%}")
    for r in doc.get("moe", []):
        plan = f"plan {r['predicted_decode_tok_s']:.1f} / {r['predicted_prefill_tok_s']:.0f}" \
            if r["predicted_decode_tok_s"] is not None else ""
        print(f"{r['case']}: decode {r['decode_tok_s']:.1f} tok/s ({r['achieved_gb_s']:.0f} GB/s, "
              f"{r['fraction_of_copy_bw']:.1%} of copy), prefill grouped {r['prefill_tok_s_grouped']:.0f} / slots "
              f"{r['prefill_tok_s_slots']:.0f} tok/s {plan}")
        if "streamed_seconds_per_token" in r:
            print(f"  streamed, experts in place: {r['streamed_seconds_per_token']:.3f} s/token, link bound "
                  f"{r['streamed_link_bound_s']:.3f} s ({r['streamed_ratio_to_bound']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
