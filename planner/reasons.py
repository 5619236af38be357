"""Why each decision was taken: (what, choice, why) rows, plus what the alternatives would give."""
from __future__ import annotations

from typing import TYPE_CHECKING

from planner import memory as mem
from planner.budget import avg_bpw, streams_offload
from planner.errors import kv_error
from planner.formats import HEAD_OPTION
from planner.roofline import CPU_DECODE_BANDWIDTH_EFFICIENCY
from planner.units import fmt_bytes, fmt_rate

if TYPE_CHECKING:   # imported for annotations only: optimize imports this module
    from planner.optimize import Outcome, Request


def asked_context(ctx: int, spec, how: str) -> str:
    """Why a context the user asked for (--ctx); past the model's native context, the RoPE scaling it needs (YaRN
    by the ratio, as Qwen's model cards give it) and how this engine takes it."""
    native = spec.max_context
    if ctx <= native or spec.rope_scaling:
        return "as asked (--ctx)"
    return f"as asked (--ctx); beyond the native {native}, needs RoPE scaling, e.g. YaRN factor {ctx / native:g} ({how})"


def _common(req: "Request", out: "Outcome", ladder: list[int], kvs: list[str], items) -> list[tuple[str, str, str]]:
    spec, lay, sol = req.model, out.layout, out.solution
    native = spec.max_context
    if req.ctx:
        why = asked_context(req.ctx, spec, f"config.json rope_scaling with original_max_position_embeddings {native}, "
                                           f"which vramwise run applies")
    elif lay.ctx == ladder[0]:
        why = f"the model's native {native}" + (" capped at the 4096 default" if native > ladder[0] else "")
    else:
        why = f"halved from {ladder[0]}, which did not fit at >= {req.min_bpw:g} bpw (--ctx to insist)"
    rows = [("context", str(lay.ctx), why)]
    if req.kv == "auto":
        why = (f"least expected error among {', '.join(kvs)} (cache error {kv_error(lay.kv.name, spec.num_layers):.3f} "
               f"+ weights {sol.error:.3f})")
    elif req.kv:
        why = "as asked (--kv)"
    elif lay.kv.name == "fp16":
        why = "default, lossless; --kv auto weighs q8/q4 against more weight bits"
    else:
        why = "the lossless fp16 cache did not fit; the least-error format that does"
    sliding = [i for i in range(spec.num_layers) if spec.is_sliding(i)]
    ring = mem.kv_rows(spec, lay.ctx, lay.chunk, sliding[0]) if sliding else lay.ctx
    if ring < lay.ctx:
        why += (f"; the {len(sliding)} sliding-window layers of {spec.num_layers} each keep a ring of {ring} positions "
                f"(window {spec.sliding_window} + a {lay.chunk}-token prefill chunk - 1), not {lay.ctx}")
    rows.append(("kv_cache", lay.kv.name, f"{why}; {lay.kv.description}"))
    source = (f"measured errors from {req.measurement.path}" if req.measurement
              else "prior fit to ExLlamaV2's measurement table, weighted by layer type and depth")
    proof = "proven optimal" if sol.exact else f"within {out.expected_error - sol.lower_bound:.2e} of optimal"
    rows.append(("weights", f"{avg_bpw(spec, lay.assignment):.3f} bpw",
                 f"exact multiple-choice knapsack over {len(items.linears)} linears x {len(items.options[0])} options: "
                 f"expected error {sol.error:.4f} (lower bound {sol.lower_bound:.4f}, {proof}); {source}"))
    if req.bpw is not None:
        rows.append(("target_bpw", f"{req.bpw:g}", "fixed by --bpw (as ExLlamaV2's -b): weights may not exceed it"))
    rows.append(("head", HEAD_OPTION.name, "6-bit, ExLlamaV2's default head precision (-hb 6): the head "
                                           "shapes every logit"))
    rows.append(("embedding", f"host RAM, fp16 ({fmt_bytes(mem.global_weight_bytes(spec)['embed'])})",
                 "a lookup reads one row per token, so it need not occupy VRAM (as ExLlamaV2 does)"))
    if req.reserve_bytes is not None:
        why = "as asked (--reserve)"
    elif req.gpu.display:
        why = "a desktop session can hold about 1.5 GB on a card with display outputs (--reserve 0 if headless)"
    else:
        why = "datacenter card without display outputs"
    rows.append(("reserve", fmt_bytes(lay.reserve_bytes), why))
    rows.append(("safety_margin", fmt_bytes(mem.safety_margin(req.gpu)),
                 f"{mem.SAFETY_MARGIN_FRACTION:.0%} of the card for allocator rounding and fragmentation"))
    return rows


def explain_gpu(req: "Request", out: "Outcome", ladder: list[int], kvs: list[str], items) -> None:
    spec, lay = req.model, out.layout
    bpw = avg_bpw(spec, lay.assignment)
    cards = f"{req.gpu_count} x {req.gpu.name}" if req.gpu_count > 1 else req.gpu.name
    out.decisions.append(("mode", "gpu", f"all {spec.num_layers} layers fit on {cards} at {bpw:.2f} bpw "
                                         f"(>= --min-bpw {req.min_bpw:g})"))
    out.decisions += _common(req, out, ladder, kvs, items)
    if req.gpu_count > 1:
        parts = ", ".join(f"GPU{i}: layers {a}-{b - 1}" for i, (a, b) in enumerate(lay.gpu_layers))
        out.decisions.append(("split", parts, "contiguous layers per card (pipeline); the head sits on the last card"))
    alt = out.alternatives.get("kv_q8")
    if alt is not None:
        verdict = "lower" if alt["expected_error"] < out.expected_error else "higher"
        out.decisions.append(("hint", "--kv q8", f"would give {alt['avg_bpw']:.2f} bpw at {verdict} total expected "
                                                f"error ({alt['expected_error']:.3f} vs {out.expected_error:.3f})"))
    explain_engine(req, out)


def explain_engine(req: "Request", out: "Outcome") -> None:
    """A plan for an architecture `vramwise run` cannot run yet says so, and what llama.cpp would make of it."""
    from planner.spec import engine_gaps
    from planner.targets import TargetError, TargetRequest, plan_target
    gaps = engine_gaps(req.model)
    if not gaps:
        return
    try:
        alt = plan_target("llama.cpp", TargetRequest(req.model, req.gpu, req.host, gpu_count=req.gpu_count, ctx=req.ctx))
        there = f"; `--target llama.cpp` plans it for llama.cpp ({fmt_rate(1 / alt.decode_s)} predicted)"
    except TargetError:
        there = ""
    out.decisions.append(("engine", "not yet", f"`vramwise run` does not run this architecture yet "
                                               f"({', '.join(gaps)}): the speeds price vramwise's engine as if it "
                                               f"did{there}"))


def explain_fallback(req: "Request", out: "Outcome", candidates: dict, bpw: float, items) -> None:
    spec, lay, a = req.model, out.layout, out.assessment
    for mode, (clay, ca) in candidates.items():
        entry = {"decode_tokens_per_s": round(1 / ca.decode_s, 6), "time_to_first_token_s": round(ca.ttft_s, 3)}
        if mode == "offload":
            entry["gpu_layers"] = sum(b - a_ for a_, b in clay.gpu_layers)
        out.alternatives[mode] = entry
    streaming = streams_offload(req.gpu)
    if lay.host_experts:
        what = (f"every layer on the GPU but the routed experts of the first {lay.host_experts} of {spec.num_layers} "
                f"layers, which stay in host memory: each token reads its {spec.experts_per_token} of "
                f"{spec.num_experts} there in place over the link (vramwise's CUDA engine computes them on the GPU; "
                f"llama.cpp's --n-cpu-moe keeps experts in RAM the same way and computes them on the CPU)")
    elif lay.mode == "offload":
        k = sum(b - a_ for a_, b in lay.gpu_layers)
        rest = ("streamed over the host link through two layer buffers each token (vramwise's CUDA engine "
                "computes every layer on the GPU)") if streaming else "computed by the CPU"
        what = f"{k} of {spec.num_layers} layers and the head on the GPU, the rest {rest}"
    else:
        how = "each copied before it runs" if streaming else "prefetch"
        what = f"all layers streamed over the host link through two layer buffers ({how}), as AirLLM"
    if spec.is_moe and (streaming or lay.mode == "stream") and not lay.host_experts:
        what += (f"; a streamed layer's routed experts stay in host memory and each token reads its "
                 f"{spec.experts_per_token} of {spec.num_experts} in place over the link")
    others = {m: fmt_rate(1 / c[1].decode_s) for m, c in candidates.items() if m != lay.mode}
    compare = "; ".join(f"{m} would give {r}" for m, r in others.items()) or "the other mode does not fit"
    link, cpu = req.gpu.host_link_gb_s, req.host.cpu_bandwidth_gb_s * CPU_DECODE_BANDWIDTH_EFFICIENCY
    rates = f"host link {link:g} GB/s" + ("" if streaming else f" vs CPU RAM ~{cpu:.0f} GB/s effective")
    out.decisions.append(("mode", lay.mode, f"the model does not fit at >= {req.min_bpw:g} bpw; {what}: "
                                            f"{fmt_rate(1 / a.decode_s)} ({compare}; {rates})"))
    src = "--bpw" if req.bpw is not None else "4-bit default for offload/stream (lower --bpw is faster)"
    out.decisions.append(("target_bpw", f"{bpw:g}", src))
    if not a.weights_in_ram:
        out.decisions.append(("storage", "disk", f"host-side weights exceed RAM ({fmt_bytes(req.host.ram_bytes)} minus "
                                                 f"{fmt_bytes(4 * mem.GiB)} for the OS): read from disk at "
                                                 f"{req.host.disk_gb_s:g} GB/s each token (--ram / --disk-bandwidth)"))
    out.decisions += _common(req, out, [lay.ctx], [lay.kv.name], items)
    explain_engine(req, out)
