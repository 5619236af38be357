"""ExLlamaV2: `convert.py -b <bpw> -hb <head bits>` and the runtime's cache mode and max sequence length.

Accounting as ExLlamaV2 does it (turboderp/exllamav2, described, not copied):
  - bpw (exllamav2/conversion/qparams.py, QParams.total_bits): a linear with `rows` inputs and `columns`
    outputs costs its packed values (rows x columns x bits per slice) + per group a 16-bit max scale and a
    32-bit group header + 4-bit scales (groups x columns x 4) + a 32-bit inverse permutation per input row.
    convert.py's optimizer picks per-layer options so that this total, over all layer linears, meets -b;
    the layer weights are therefore -b x their parameters / 8 bytes.
  - head: budgeted separately at -hb bits with the head option qparams.py lists for it (6 -> 15% 8-bit /
    85% 6-bit, group 128), priced with the same total_bits formula.
  - the embedding stays in system RAM (fp16); norms are fp16 on the GPU.
  - cache (exllamav2/cache.py): FP16 2 bytes per value; Q8/Q6/Q4 store K and V at 8/8, 8/4, 4/4 bits
    plus one fp16 scale per 32 values, and one fp16 K+V layer-sized buffer per device to (de)quantize into;
    a quantized cache's length is rounded up to whole 512-value blocks. Every layer's cache holds the whole
    sequence: Gemma 2's sliding-window layers apply their window in flash attention, not in the cache.
  - scratch: fp32 activations of one 2048-token input chunk (ExLlamaV2's max_input_len) without attention
    scores (flash attention), CUDA context and the 2% allocator margin as for vramwise's engine.
"""
from __future__ import annotations

import math

from planner import memory as mem
from planner.budget import contiguous_split
from planner.optimize import _ctx_ladder
from planner.reasons import asked_context
from planner.roofline import Traffic, decode_seconds, efficiency, memory_bandwidth
from planner.spec import layer_linears, tensors
from planner.targets import Outcome, TargetError, TargetRequest, vllm
from planner.units import fmt_bytes

MAX_BPW, MIN_BPW, BPW_STEP = 8.0, 2.0, 0.05
HEAD_BITS = 6                                         # convert.py's default -hb
# qparams_headoptions: head bits -> (group size, [(fraction, bits)])
HEAD_OPTIONS = {2: (32, ((0.3, 4), (0.7, 2))), 3: (32, ((0.15, 4), (0.85, 3))), 4: (32, ((0.15, 6), (0.85, 4))),
                5: (128, ((0.15, 6), (0.85, 5))), 6: (128, ((0.15, 8), (0.85, 6))), 8: (128, ((1.0, 8),))}
# cache mode -> (K bytes per value, V bytes per value, has scales); scales: fp16 per 32 values
CACHE_MODES = {"FP16": (2.0, 2.0, False), "Q8": (1.0, 1.0, True), "Q6": (1.0, 0.5, True), "Q4": (0.5, 0.5, True)}
KV_TO_MODE = {"fp16": "FP16", "q8": "Q8", "q4": "Q4"}
MAX_INPUT_LEN = 2048
Q_CACHE_BLOCK = 512


def qparams_bits(rows: int, columns: int, group: int, slices) -> int:
    """QParams.total_bits for one linear (rows = input features, columns = output features)."""
    total, groups, left = 0, 0, rows
    for frac, bits in slices:
        g = math.ceil(min(rows * frac, left) / group)
        r = min(g * group, left)
        total += r * columns * bits
        groups += g
        left -= r
    return total + groups * 16 + groups * 32 + groups * columns * 4 + rows * 32


def head_bytes(spec, head_bits: int = HEAD_BITS) -> int:
    group, slices = HEAD_OPTIONS[head_bits]
    return math.ceil(qparams_bits(spec.hidden_size, spec.vocab_size, group, slices) / 8)


def _cache_len(spec, ctx: int, mode: str) -> int:
    if not CACHE_MODES[mode][2]:
        return ctx
    q = 1
    while (spec.kv_dim * q) % Q_CACHE_BLOCK:
        q += 1
    return math.ceil(ctx / q) * q


def cache_bytes_per_layer(spec, ctx: int, mode: str) -> int:
    k, v, scales = CACHE_MODES[mode]
    n = _cache_len(spec, ctx, mode) * spec.kv_dim
    return int(n * (k + v)) + (2 * (n // 32) * 2 if scales else 0)


def _norm_bytes(spec) -> list[int]:
    out = [0] * spec.num_layers
    for t in tensors(spec):
        if t.layer >= 0 and not t.quantized:
            out[t.layer] += t.numel * 2
    return out


def _fixed(req: TargetRequest, ctx: int, mode: str, card: int, cards: int) -> dict[str, int]:
    spec = req.model
    last = card == cards - 1
    chunk = min(MAX_INPUT_LEN, ctx)
    state = {b.name: b.nbytes for b in mem.run_state_buffers(spec, ctx, chunk, logits=last, gemm_staging=False)}
    temp = _cache_len(spec, ctx, mode) * spec.kv_dim * 2 * 2 if CACHE_MODES[mode][2] else 0
    return {"weights.head": head_bytes(spec) + spec.hidden_size * 2 if last else 0,
            "cache_temp_fp16": temp,
            "scratch": sum(v for k, v in state.items() if k != "scores"),
            "cuda_context": mem.CUDA_CONTEXT_BYTES, "safety_margin": mem.safety_margin(req.gpu),
            "reserve": (mem.default_reserve(req.gpu) if req.reserve_bytes is None else req.reserve_bytes) if card == 0 else 0}


def _fit(req: TargetRequest, ctx: int, mode: str):
    """Largest bpw (a multiple of 0.05, at most 8) whose layers, split in order across the cards, fit."""
    spec, cards = req.model, req.gpu_count
    params = [0] * spec.num_layers
    for t in layer_linears(spec):
        params[t.layer] += t.numel
    norms = _norm_bytes(spec)
    fixed = [sum(_fixed(req, ctx, mode, c, cards).values()) for c in range(cards)]
    kv_layer = cache_bytes_per_layer(spec, ctx, mode)
    room = sum(req.gpu.memory_bytes - f for f in fixed) - spec.num_layers * kv_layer - sum(norms)
    top = min(MAX_BPW, req.bpw if req.bpw is not None else MAX_BPW, 8 * room / sum(params) if room > 0 else 0)
    bpw = math.floor(round(top / BPW_STEP, 6)) * BPW_STEP
    while bpw >= max(MIN_BPW, req.min_bpw) - 1e-9:
        layer_bytes = [math.ceil(bpw * p / 8) + n for p, n in zip(params, norms)]
        split = contiguous_split(layer_bytes, fixed, [req.gpu.memory_bytes] * cards, [kv_layer] * spec.num_layers)
        if split is not None:
            return round(bpw, 2), layer_bytes, split
        bpw -= BPW_STEP
    return None


# Model families ExLlamaV2 0.2.8 loads (exllamav2/architecture.py: LlamaForCausalLM, the default, MistralForCausalLM,
# MixtralForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM). Gemma 3 (dev branch
# 2025-03-15, turboderp/exllamav2#749) and Qwen3 (2025-04-29, #781) came after it; Falcon never did.
FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "phi3", "gemma", "gemma2")


def plan(req: TargetRequest) -> Outcome:
    spec = req.model
    if spec.family not in FAMILIES:
        raise TargetError(f"ExLlamaV2 0.2.8 does not load {spec.name} (family {spec.family}; it loads "
                          f"{', '.join(FAMILIES)}); use --target llama.cpp"
                          + ("" if vllm.refusal(spec) else " or vllm"))
    if req.kv not in (None, "auto") and req.kv not in KV_TO_MODE:
        raise TargetError(f"ExLlamaV2 has no {req.kv} cache; use --kv fp16, q8 or q4 (or auto: FP16/Q8/Q6/Q4)")
    modes = [KV_TO_MODE[req.kv]] if req.kv in KV_TO_MODE else list(CACHE_MODES)
    for ctx in _ctx_ladder(req):
        fits = {m: f for m in modes if (f := _fit(req, ctx, m)) is not None}
        if not fits:
            continue
        best = max(f[0] for f in fits.values())
        # the most precise cache that gives up at most one step of weight bits
        mode = next(m for m in modes if m in fits and fits[m][0] >= best - BPW_STEP - 1e-9)
        if req.kv is None and mode != "FP16" and "FP16" in fits and fits["FP16"][0] >= 4.0:
            mode = "FP16"                                  # 4+ bpw with a lossless cache: keep it lossless
        return _outcome(req, ctx, mode, *fits[mode], fits)
    floor = max(MIN_BPW, req.min_bpw)
    raise TargetError(f"{spec.name} does not fit {req.gpu_count} x {req.gpu.name} with ExLlamaV2 at >= {floor:g} bpw "
                      f"(it has no CPU offload); use --target llama.cpp, more --gpus, or a smaller --ctx")


def _outcome(req: TargetRequest, ctx: int, mode: str, bpw: float, layer_bytes, split, fits) -> Outcome:
    spec, cards = req.model, req.gpu_count
    kv_layer = cache_bytes_per_layer(spec, ctx, mode)
    per_gpu = []
    for c, (a, b) in enumerate(split):
        items = {"weights.layers": sum(layer_bytes[a:b]), "kv_cache": (b - a) * kv_layer}
        items.update(_fixed(req, ctx, mode, c, cards))
        per_gpu.append(items)
    embed = spec.vocab_size * spec.hidden_size * 2
    lin = sum(t.numel for t in layer_linears(spec))
    file_bytes = sum(layer_bytes) + head_bytes(spec) + spec.hidden_size * 2 + embed
    eff = efficiency(req.gpu)

    # A quantized cache (Q4/Q6/Q8) is dequantized into the fp16 buffer (cache_temp_fp16) up to the current position
    # before each layer's attention (cache.py, get_kv_state: q4_to_fp16_kv over [offset, offset + width)), which
    # then reads the copy: per position the stored bytes, plus fp16 K and V written and read again.
    per_position = kv_layer / ctx + (2 * spec.kv_dim * 2 * 2 if CACHE_MODES[mode][2] else 0)

    def decode_at(position: int) -> float:     # weights, head and the cache up to `position` (every layer's)
        read = sum(layer_bytes) + head_bytes(spec) + spec.num_layers * position * per_position
        traffic = Traffic(vram_bytes=read, overhead_s=eff.decode_overhead_s(req.gpu, spec.num_layers))
        return decode_seconds(traffic, eff, memory_bandwidth(req.gpu, eff), req.gpu.host_link_gb_s,
                              req.host.cpu_bandwidth_gb_s, req.host.disk_gb_s)
    decode = decode_at(min(512, ctx))
    gpu_split = [round(sum(c.values()) / 1e9, 1) for c in per_gpu] if cards > 1 else []
    settings = {"bpw": bpw, "head_bits": HEAD_BITS, "cache_mode": mode, "max_seq_len": ctx, "gpu_split_gb": gpu_split}
    others = ", ".join(f"{m} {f[0]:.2f}" for m, f in fits.items())
    decisions = [
        ("mode", "gpu", f"all {spec.num_layers} layers on {cards} x {req.gpu.name}" if cards > 1 else
         f"all {spec.num_layers} layers on {req.gpu.name} (ExLlamaV2 has no CPU offload)"),
        ("bpw", f"{bpw:.2f}", f"the most bits per weight (convert.py -b, its own accounting: 4-bit scales, group "
                              f"headers, permutation) that fit with the cache; {fmt_bytes(sum(layer_bytes))} of layers "
                              f"for {lin / 1e9:.2f}B linear parameters"),
        ("head_bits", str(HEAD_BITS), f"convert.py's default -hb; the head is budgeted apart ({fmt_bytes(head_bytes(spec))})"),
        ("cache_mode", mode, f"bpw reachable per cache mode: {others}; the most precise mode within one 0.05 step "
                             f"of the best (Q4 is near-lossless per ExLlamaV2's qcache evaluation)"),
        ("max_seq_len", str(ctx), asked_context(ctx, spec, "config.json rope_scaling, which ExLlamaV2 reads")
         if req.ctx else "the model's native context, capped at 4096"),
        ("embedding", "system RAM", "ExLlamaV2 keeps the embedding table on the CPU")]
    if gpu_split:
        decisions.append(("gpu_split", ",".join(map(str, gpu_split)), "GB per card (-gs), layers in order"))
    weights = {"format": f"EXL2 {bpw:.2f} bpw", "avg_bpw": bpw, "bytes": file_bytes - embed,
               "file_bytes_estimate": file_bytes, "head_bytes": head_bytes(spec), "embedding_bytes": embed}
    return Outcome("exllamav2", "gpu", settings, per_gpu, {"embedding": embed}, ctx, mode,
                   kv_layer * spec.num_layers // ctx, weights, decode, decisions, decode_at(ctx))
