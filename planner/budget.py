"""Assess one layout: itemized device and host memory, and predicted speed.

A layout is everything a plan decides: per-linear options, context, KV format, mode and which
layers sit where. The optimizer builds layouts; `assess` prices them; a loaded plan is re-assessed
and must reproduce its recorded numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

from hwdb import GPUSpec, ModelSpec
from planner import memory as mem
from planner.formats import PACK_VALUES, KVFormat, QuantOption
from planner.roofline import (DEFAULT_CPU_BANDWIDTH_GB_S, DEFAULT_DISK_GB_S, ENGINE_SPEED, EngineSpeed, Traffic,
                              decode_seconds, efficiency, engine_decode_seconds, engine_prefill_seconds,
                              memory_bandwidth, moe_prefill_grouped, moe_prefill_seconds, prefill_seconds,
                              clock_ratio)
from planner.spec import active_param_count, positions_read, tensors

# Host RAM kept for the operating system and other programs when deciding what stays in RAM.
HOST_OS_RESERVE_BYTES = 4 * mem.GiB


@dataclass(frozen=True)
class Host:
    """The machine around the GPU."""

    ram_bytes: int
    cpu_bandwidth_gb_s: float = DEFAULT_CPU_BANDWIDTH_GB_S
    disk_gb_s: float = DEFAULT_DISK_GB_S


@dataclass(frozen=True)
class Layout:
    mode: str                                    # gpu | offload | stream
    assignment: Mapping[str, QuantOption]        # linear name -> option
    ctx: int
    kv: KVFormat
    chunk: int
    gpu_layers: tuple[tuple[int, int], ...]      # per card, [start, end) of resident layers
    reserve_bytes: int
    prompt_tokens: int
    # the first this many layers keep their routed experts in host memory, read in place over the link by the
    # CUDA engine (the rest of each layer resident): an MoE's offload that moves only a token's k experts
    host_experts: int = 0


class CardTotals:
    """Sums over cards of an itemized budget (`per_gpu`: per card, item -> bytes)."""

    per_gpu: list[dict[str, int]]

    @property
    def items(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for card in self.per_gpu:
            for k, v in card.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.per_gpu)


@dataclass
class Assessment(CardTotals):
    per_gpu: list[dict[str, int]]                # per card: item -> bytes
    host: dict[str, int]
    weights_in_ram: bool                         # host-side weights fit in RAM (else read from disk)
    decode_s: float
    prefill_chunk_s: float
    ttft_s: float
    traffic: Traffic
    notes: list[str] = field(default_factory=list)


def streams_offload(gpu: GPUSpec) -> bool:
    """Whether vramwise's own engine runs plans for this card (ENGINE_SPEED: CUDA on NVIDIA). It computes
    every layer on the GPU: an offload plan's host layers are streamed through two layer buffers on card 0
    each token (their KV cache stays there), not computed by the CPU as llama.cpp does."""
    return gpu.vendor in ENGINE_SPEED


def _streamed_layers(spec: ModelSpec, lay: Layout) -> range:
    """Layers a plan keeps in host RAM: all in stream mode, those before the first resident one in offload."""
    if lay.mode == "stream":
        return range(spec.num_layers)
    if lay.mode == "offload":
        return range(min(a for a, _ in lay.gpu_layers))
    return range(0)


def _kv_layers(spec: ModelSpec, lay: Layout, card: int, streaming: bool) -> list[int]:
    """Layers whose KV cache a card holds: its resident layers; card 0 also those streamed to it (stream
    mode, or offload on a streaming engine)."""
    own = [] if lay.mode == "stream" else list(range(*lay.gpu_layers[card]))
    if card == 0 and (lay.mode == "stream" or (lay.mode == "offload" and streaming)):
        return list(_streamed_layers(spec, lay)) + own
    return own


# The GPU engine's buffers beyond the reference engine's (planner.memory.run_state_buffers, gemm_staging=True).
GPU_STAGING = ("gemm_in", "dequant_tile", "matvec_in", "sampled")
ATTENTION_SCRATCH = ("attn_partials", "attn_tickets")


def card_items(spec: ModelSpec, gpu: GPUSpec, lay: Layout, card: int, layer_bytes: list[int]) -> dict[str, int]:
    a, b = lay.gpu_layers[card]
    last = card == len(lay.gpu_layers) - 1
    glob = mem.global_weight_bytes(spec)
    streaming = streams_offload(gpu)
    state = mem.run_state_buffers(spec, lay.ctx, lay.chunk, logits=last)
    by_name = {buf.name: buf.nbytes for buf in state}
    host_experts = range(a, min(b, lay.host_experts))
    kept_out = 0
    if len(host_experts):                    # those layers' routed experts, kept in host memory
        core = mem.layer_stream_bytes(spec, lay.assignment)
        kept_out = sum(layer_bytes[i] - core[i] for i in host_experts)
    items = {
        "weights.layers": sum(layer_bytes[a:b]) - kept_out,
        "weights.head": glob["head"] if last else 0,
        "weights.norm_final": glob["norm.final"] if last else 0,
        "kv_cache": mem.buffers_bytes(mem.kv_cache_buffers(spec, lay.ctx, lay.kv, _kv_layers(spec, lay, card, streaming),
                                                           lay.chunk)),
        "compute.activations": sum(v for k, v in by_name.items()
                                   if k not in ("scores", *ATTENTION_SCRATCH, "logits", *GPU_STAGING)),
        # the GPU engine's attention scratch: split-context partial sums and their merge tickets (no score
        # matrix; see run_state_buffers)
        "compute.attention_scores": sum(by_name[k] for k in ATTENTION_SCRATCH),
        "compute.gemm_staging": sum(by_name[k] for k in GPU_STAGING),
        "compute.logits": by_name.get("logits", 0),
        "cuda_context": mem.CUDA_CONTEXT_BYTES,
        "cublas_workspace": mem.cublas_workspace_bytes(gpu),
        "reserve": lay.reserve_bytes if card == 0 else 0,
        "safety_margin": mem.safety_margin(gpu),
    }
    streamed = _streamed_layers(spec, lay)
    if card == 0 and len(streamed) and (lay.mode == "stream" or streaming):
        # two layer buffers: layer i computes in one while layer i+1 arrives in the other (its routed experts stay
        # in host memory, read in place)
        slot = mem.layer_stream_bytes(spec, lay.assignment)
        items["weights.stream_buffers"] = 2 * max(slot[i] for i in streamed)
    return items


def _prefill_flops_per_token(spec: ModelSpec, avg_ctx: float) -> float:
    """2 FLOPs per active weight, plus QK^T and AV over the average context (a sliding layer's: its window)."""
    linear = active_param_count(spec) - spec.vocab_size * spec.hidden_size   # the embedding is a lookup
    return 2.0 * linear + 4.0 * spec.q_dim * sum(positions_read(spec, (spec.family,), avg_ctx))


def assess(spec: ModelSpec, gpu: GPUSpec, gpu_count: int, host: Host, lay: Layout) -> Assessment:
    """Price a layout: memory per card and on the host, and decode / prefill / TTFT predictions."""
    layer_bytes = mem.layer_weight_bytes(spec, lay.assignment)
    read_bytes = mem.layer_read_bytes(spec, lay.assignment)
    read_values = mem.layer_read_values(spec)
    glob = mem.global_weight_bytes(spec)
    per_gpu = [card_items(spec, gpu, lay, c, layer_bytes) for c in range(len(lay.gpu_layers))]
    on_gpu = {i for a, b in lay.gpu_layers for i in range(a, b)}
    off = [i for i in range(spec.num_layers) if i not in on_gpu]
    kv_token = mem.kv_bytes_per_token(spec, lay.kv)

    engine = ENGINE_SPEED.get(gpu.vendor)
    streaming = streams_offload(gpu)        # offload means: stream the host layers
    streams = lay.mode == "stream" or (lay.mode == "offload" and streaming)
    # a streamed layer's slot holds it without its routed experts; a host-experts layer keeps the same part
    slot_bytes = mem.layer_stream_bytes(spec, lay.assignment) if spec.is_moe else layer_bytes
    host_experts = range(lay.host_experts)
    # what a token reads of routed experts in host memory, in place over the link rather than from VRAM
    in_place = sum(read_bytes[i] - slot_bytes[i] for i in set(off) | set(host_experts)) if streams else 0
    host_items = {"embedding": glob["embed"]}
    if lay.host_experts:
        host_items["weights.host_experts"] = sum(layer_bytes[i] - slot_bytes[i] for i in host_experts)
    if lay.mode == "offload" and not streaming:
        host_items["weights.cpu_layers"] = sum(layer_bytes[i] for i in off)
        kv_layer = mem.kv_layer_bytes(spec, lay.ctx, lay.chunk, lay.kv)
        host_items["kv_cache.cpu_layers"] = sum(kv_layer[i] for i in off)
        host_items["compute.cpu"] = mem.buffers_bytes(mem.run_state_buffers(spec, lay.ctx, lay.chunk, False, False))
    elif lay.mode in ("stream", "offload"):
        host_items["weights.streamed"] = sum(layer_bytes[i] for i in _streamed_layers(spec, lay))
    room = host.ram_bytes - HOST_OS_RESERVE_BYTES - sum(v for k, v in host_items.items() if not k.startswith("weights"))
    host_weights = sum(v for k, v in host_items.items() if k.startswith("weights"))
    in_ram = host_weights <= room
    from_disk = 0 if in_ram else host_weights - max(room, 0)

    eff = efficiency(gpu)
    overhead_s = eff.decode_overhead_s(gpu, spec.num_layers)
    pos = min(lay.prompt_tokens, lay.ctx)
    # cached positions each layer's attention reads (vramwise's engines: a sliding layer's window only)
    seen = positions_read(spec, (spec.family,), pos)
    gpu_layers_read = sum(read_bytes[i] for i in on_gpu)
    vram = gpu_layers_read + glob["head"] + glob["norm.final"] + sum(seen[i] for i in on_gpu) * kv_token
    hidden = spec.hidden_size * 4
    if lay.mode == "gpu":
        traffic = Traffic(vram_bytes=vram, link_bytes=hidden * 2 * (gpu_count - 1), overhead_s=overhead_s)
        overlap = False
    elif lay.mode == "offload" and not streaming:
        cpu_read = sum(read_bytes[i] for i in off) + sum(seen[i] for i in off) * kv_token
        # CPU layers that exceed RAM are memory-mapped: each token scans them in the same order, and
        # LRU evicts exactly the pages needed next, so all of them come from disk (a streaming engine
        # instead pins what fits and reads only the rest)
        disk = 0 if in_ram else cpu_read
        traffic = Traffic(vram_bytes=vram, link_bytes=2 * hidden, cpu_bytes=cpu_read - disk,
                          disk_bytes=disk, overhead_s=overhead_s)
        overlap = False
    else:                                   # streamed layers: all (stream), or the host ones (offload)
        # each token moves a streamed layer's bytes but the experts it does not route to, and its chosen experts
        # of the host-experts layers (both read in place)
        streamed = sum(read_bytes[i] for i in off) + sum(read_bytes[i] - slot_bytes[i] for i in host_experts)
        vram = sum(read_bytes) - in_place + glob["head"] + glob["norm.final"] + sum(seen) * kv_token
        # host weights past RAM come from disk in the share they hold of what a token reads (all of it for
        # whole streamed layers; routed experts read in place are a token's k of E)
        disk = streamed * from_disk / host_weights if host_weights else 0
        traffic = Traffic(vram_bytes=vram, link_bytes=streamed - disk, disk_bytes=disk, overhead_s=overhead_s,
                          in_place_bytes=in_place * (1 - from_disk / host_weights) if host_weights else 0.0)
        # a prefetching engine overlaps copies with compute; vramwise's copies each layer in stream order
        # before it runs (measured: 1.08x the link bound, benchmarks/results/gpu_decode.json) unless its
        # overlapped schedule is on (then a step is the larger of link and compute, to within one layer)
        overlap = not streaming or (engine is not None and engine.overlap_streaming)
    experts = _ExpertCosts.of(spec) if spec.is_moe and engine is not None else None
    gpu_s = None
    if engine is not None:                 # vramwise's own engine runs the plan: its measured model
        computed = range(spec.num_layers) if lay.mode != "gpu" else sorted(on_gpu)
        weights = sum(read_bytes[i] for i in computed) - in_place + glob["head"] + glob["norm.final"]
        values = sum(read_values[i] for i in computed) + spec.vocab_size * spec.hidden_size
        kv_read = sum(seen[i] for i in computed) * kv_token
        # gpuengine's launches a layer beyond a Llama's: Qwen3's / Gemma 3's head norms, Gemma 2 / 3's post norms,
        # and routed experts' gathers (_moe_decode_launches beyond the 6 of the fitted MoE layers)
        extra = (2 if spec.qk_norm else 0) + (2 if spec.norms_per_layer == 4 else 0) + \
            (_moe_decode_launches(spec, lay.assignment) - MOE_FUSED_LAUNCHES if spec.is_moe else 0)
        moe = [i for i in computed if experts and experts.layer_values[i]]
        expert_values = spec.experts_per_token * sum(experts.layer_values[i] for i in moe) if moe else 0.0
        # decode attention reads a KV head's rows once for each of its query heads (gpuengine's `attention`: a
        # block per query head; on an H200, 32 query heads on 8 KV heads took as long as on 32, run 9)
        gpu_s = engine_decode_seconds(engine, weights, values, kv_read, len(computed), gpu, extra, expert_values,
                                      len(moe), spec.num_heads / spec.num_kv_heads)
    decode = decode_seconds(traffic, eff, memory_bandwidth(gpu, eff), gpu.host_link_gb_s, host.cpu_bandwidth_gb_s,
                            host.disk_gb_s, overlap, gpu_s)

    # prefill: every chunk reads all device weights once; offloaded and streamed weights cross the
    # link once per chunk (llama.cpp likewise copies CPU layers' weights to the GPU for large batches)
    def chunk_seconds(tokens: int, start: int) -> float:
        flops = tokens * _prefill_flops_per_token(spec, start + tokens / 2)
        device_bytes = sum(layer_bytes[i] for i in on_gpu) + glob["head"]
        # pipelined cards run their layers one after another, so one card's peak sets the pace
        if engine is not None:
            t = engine_prefill_seconds(engine, flops, spec.num_layers, gpu)
            if spec.is_moe:
                t += _engine_experts_prefill(engine, spec, gpu, experts, tokens,
                                             set(off) | set(host_experts) if streams else set())
        else:
            t = prefill_seconds(flops, device_bytes, eff, gpu.fp16_tflops, gpu.bandwidth_gb_s)
        moved = sum(_chunk_link_bytes(spec, i, tokens, layer_bytes, slot_bytes if streams else None)
                    for i in off) if lay.mode != "gpu" else 0
        moved += sum(_chunk_link_bytes(spec, i, tokens, layer_bytes, slot_bytes) - slot_bytes[i] for i in host_experts)
        link = (moved - from_disk) / (gpu.host_link_gb_s * 1e9) + from_disk / (host.disk_gb_s * 1e9)
        return max(t, link) if lay.mode == "stream" and overlap else t + link

    assert lay.chunk > 0 and lay.ctx > 0, "layouts come from the optimizer or a validated plan file"
    prompt = min(lay.prompt_tokens, lay.ctx)
    ttft, start = 0.0, 0
    while start < prompt:
        n = min(lay.chunk, prompt - start)
        ttft += chunk_seconds(n, start)
        start += n
    return Assessment(per_gpu, host_items, in_ram, decode, chunk_seconds(min(lay.chunk, lay.ctx), 0), ttft, traffic)


# gpuengine's decode launches for a routed-expert layer whose experts all read x as it is (the fitted models'):
# rmsnorm, router, route, gate / up, down, the weighted sum
MOE_FUSED_LAUNCHES = 6


def _moe_decode_launches(spec: ModelSpec, assignment: Mapping[str, QuantOption]) -> float:
    """gpuengine's decode launches for a routed-expert layer, on average over the layers: rmsnorm, router and
    route; gate and up in one launch where every expert of both reads x as it is (one slice, whole packing
    units), else a matvec each, a gather before each that some expert needs, and the activation; down, with its
    gather where needed; the weighted sum."""
    gathers: dict[tuple[int, str], bool] = {}
    for t in tensors(spec):
        if t.expert and t.quantized:
            key = (t.layer, t.name.rsplit(".", 1)[1])
            option = assignment.get(t.name)
            gathers[key] = gathers.get(key, False) or (option is not None and len(option.slices) > 1) \
                or t.shape[1] % PACK_VALUES != 0
    layers = {i for i, _ in gathers}
    total = 0
    for i in layers:
        g, u, d = (gathers.get((i, m), False) for m in ("gate", "up", "down"))
        total += 3 + (1 if not (g or u) else 3 + g + u) + 1 + d + 1
    return total / len(layers) if layers else 0.0


@dataclass(frozen=True)
class _ExpertCosts:
    layer_values: list[float]     # one expert's weights in each layer (0 for a dense layer)
    values: float                 # weights of the experts a token multiplies, all layers

    @staticmethod
    def of(spec: ModelSpec) -> "_ExpertCosts":
        values = mem.expert_values_per_token(spec)
        one = values / spec.experts_per_token / max(1, sum(map(spec.is_moe_layer, range(spec.num_layers))))
        return _ExpertCosts([one if spec.is_moe_layer(i) else 0.0 for i in range(spec.num_layers)], values)


def _engine_experts_prefill(engine: EngineSpeed, spec: ModelSpec, gpu: GPUSpec, experts: _ExpertCosts, tokens: int,
                            streamed: set[int]) -> float:
    """The CUDA engine's routed experts over a prefill chunk beyond their GEMM FLOPs (in the chunk's flops): each
    layer grouped or as slots, as the engine picks (roofline.moe_prefill_grouped); as slots, their FLOPs are
    not GEMMs, so those come off. A streamed layer's experts always run grouped, their bytes priced with the
    link's (_chunk_link_bytes), here only their launches."""
    k, e, sms, out = spec.experts_per_token, spec.num_experts, gpu.sm_count, 0.0
    clock = clock_ratio(engine, gpu)
    moe_layers = sum(1 for v in experts.layer_values if v)
    gemm_s = tokens * 2.0 * experts.values / max(1, moe_layers) / (engine.prefill_compute * gpu.fp16_tflops * 1e12)
    for i, v in enumerate(experts.layer_values):
        if not v:
            continue
        slots, grouped = moe_prefill_seconds(engine, tokens, k, e, v, sms, clock)
        if i in streamed and tokens > 1:            # dequantized as they cross the link: priced with its bytes
            out += moe_prefill_seconds(engine, tokens, k, e, 0.0, sms, clock)[1]
        else:
            out += grouped if moe_prefill_grouped(engine, tokens, k, e, v, sms) else slots - gemm_s
    return out


def _chunk_link_bytes(spec: ModelSpec, i: int, tokens: int, layer_bytes: list[int],
                      slot_bytes: Optional[list[int]]) -> float:
    """Bytes of off-GPU layer i that cross the link in a prefill chunk: all of it, except that the GPU engine
    reads a streamed layer's (slot_bytes given) routed experts in place, each expert some token took once (at
    most tokens k of the E)."""
    if slot_bytes is None or not spec.is_moe_layer(i):
        return layer_bytes[i]
    core = slot_bytes[i]
    return core + (layer_bytes[i] - core) * min(1.0, tokens * spec.experts_per_token / spec.num_experts)


def contiguous_split(layer_bytes: list[int], fixed_per_card: list[int], budgets: list[int],
                     per_layer_extra: list[int]) -> Optional[tuple[tuple[int, int], ...]]:
    """Assign layers to cards in order, filling each card before the next (each layer its weights and its
    per_layer_extra, the KV cache); None if they do not fit."""
    out, start = [], 0
    for card, (budget, fixed) in enumerate(zip(budgets, fixed_per_card)):
        if fixed > budget:              # the card cannot even hold its share of the fixed costs
            return None
        used, end = fixed, start
        last = card == len(budgets) - 1
        while end < len(layer_bytes) and used + layer_bytes[end] + per_layer_extra[end] <= budget:
            used += layer_bytes[end] + per_layer_extra[end]
            end += 1
        if last and end < len(layer_bytes):
            return None
        out.append((start, end))
        start = end
    return tuple(out)


def avg_bpw(spec: ModelSpec, assignment: Mapping[str, QuantOption]) -> float:
    """Average bits per weight of the quantized linears, all metadata included (ExLlamaV2's bpw)."""
    bits = params = 0
    for t in tensors(spec):
        if t.quantized:
            bits += 8 * mem.tensor_bytes(t, assignment[t.name])
            params += t.numel
    return bits / params if params else math.nan
