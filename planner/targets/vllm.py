"""vLLM: a weight format it serves, --max-model-len, --gpu-memory-utilization, --kv-cache-dtype, TP and PP.

vLLM's accounting (vllm/worker and vllm/v1/worker gpu_worker.determine_available_memory, described):
the instance may use total memory x --gpu-memory-utilization; from that it subtracts the weights, the
peak activation memory of the profiling run (the larger of a forward pass of --max-num-batched-tokens
tokens and the sampler's top-k/top-p over --max-num-seqs x vocabulary logits) and the memory outside
PyTorch's allocator; the rest
becomes KV cache in blocks of --block-size (16) tokens:
    block bytes = 16 x layers on this GPU x 2 (K, V) x KV heads per TP rank x head_dim x dtype bytes
    blocks = floor(KV memory / block bytes), the minimum over all workers.
Models with sliding-window layers among global ones (Gemma 2, Gemma 3, gpt-oss) go through V1's hybrid KV cache
manager, on by default on CUDA and ROCm (vllm/v1/core/kv_cache_utils.py, 0.10-era): layers are grouped by
type, groups of min(sliding, global layers) layers (the last padded), a block holds one page of each of a
group's layers, and a request of L tokens takes ceil(L / 16) blocks in each global group but only
ceil(min(window - 1 + max_num_batched_tokens, L) / 16) + 1 in each sliding one (SlidingWindowSpec).
KV heads are split over the tensor-parallel ranks (replicated when TP exceeds them); pipeline stages
hold contiguous layers, the embedding on the first and the head on the last (vocab-parallel over TP).
Across nodes vLLM documents Ray: one `ray start --head`, `ray start --address` on the others, then
`vllm serve` with TP = GPUs per node and PP = nodes (docs: serving/distributed_serving).
Memory outside PyTorch (CUDA context, cuBLAS/NCCL workspaces): 1.79 GiB, what vLLM's profiler logged
for Meta-Llama-3-8B on one H100 (vllm-project/vllm#10511). The same PR logs a 1.26 GiB activation
peak at TP 1 and TP 2 alike: the sampler, not the TP-split layers, sets it; we predict 1.22 GiB for both.
"""
from __future__ import annotations

import math

from planner import memory as mem
from planner.reasons import asked_context
from planner.roofline import Traffic, decode_seconds, efficiency, memory_bandwidth
from planner.spec import positions_read, tensors, windowed_layers
from planner.targets import Outcome, TargetError, TargetRequest
from planner.units import fmt_bytes

BLOCK_SIZE = 16
DEFAULT_UTILIZATION = 0.90
NON_TORCH_BYTES = int(1.79 * mem.GiB)
MAX_NUM_SEQS = 256
SAMPLER_COPIES = 10    # fp32 [seqs, vocab] tensors alive at the sampler's peak: a count fit to vllm#10511's log
# --max-num-batched-tokens we set explicitly (vLLM's own default depends on version and card)
BATCHED_TOKENS_LARGE, BATCHED_TOKENS = 8192, 2048
LARGE_CARD_BYTES = 70 * mem.GiB
GROUP = 128                                   # AWQ / GPTQ group size
# format -> (bits per quantized linear weight, extra bytes per group of 128 weights, description)
FORMATS = {
    "bf16": (16, 0.0, "the checkpoint's 16-bit weights (--dtype auto)"),
    "fp8": (8, 0.0, "FP8 weights quantized at load (--quantization fp8; per-tensor scales)"),
    "awq": (4, 2.5, "AWQ 4-bit checkpoint: int4 + fp16 scale and 4-bit zero per group of 128 (--quantization awq)"),
    # the experts at MXFP4's 4.25 bits (an 8-bit scale per 32 values), every other weight bf16
    "mxfp4": (16, 0.0, "the checkpoint as shipped: MXFP4 experts (4.25 bits), bf16 attention, router and head"),
}
BITS_TO_FORMAT = ((16, "bf16"), (8, "fp8"), (4, "awq"))
NATIVE_FORMATS = {"gpt_oss": "mxfp4"}          # served in the format the checkpoint ships in
MXFP4_EXPERT_BITS = 4.25
# Families whose config.json sliding window vLLM gives its own KV groups. Others with a window (Mistral 7B v0.1)
# are priced as global attention: more cache than vLLM may hold, never less.
SWA_FAMILIES = ("gemma2", "gemma3", "gemma3_text", "gpt_oss")


class KVGroups:
    """How one worker's layers share vLLM's block pool: block bytes and the blocks a request of L tokens takes."""

    def __init__(self, spec, stage: tuple[int, int], tp: int, kv_dtype_bytes: int, batched_tokens: int):
        a, b = stage
        sliding = sum(windowed_layers(spec, SWA_FAMILIES)[a:b])
        full = b - a - sliding
        self.window = spec.sliding_window + batched_tokens - 1      # SlidingWindowSpec's tokens a request keeps
        if sliding and full:
            self.group = min(sliding, full)
            self.full_groups, self.sliding_groups = -(-full // self.group), -(-sliding // self.group)
        else:                                  # one group of every layer (a sliding-only stage is priced as global)
            self.group, self.full_groups, self.sliding_groups = b - a, 1, 0
        self.block = block_bytes(spec, self.group, tp, kv_dtype_bytes)

    def blocks_for(self, tokens: int) -> int:
        """Blocks one request of `tokens` tokens holds."""
        swa = -(-min(self.window, tokens) // BLOCK_SIZE) + 1 if tokens else 0
        return self.full_groups * -(-tokens // BLOCK_SIZE) + self.sliding_groups * swa

    def max_tokens(self, blocks: int) -> int:
        """The longest request `blocks` blocks hold (a multiple of the block size)."""
        lo, hi = 0, blocks * BLOCK_SIZE
        while lo < hi:
            mid = (lo + hi + BLOCK_SIZE) // (2 * BLOCK_SIZE) * BLOCK_SIZE
            lo, hi = (mid, hi) if self.blocks_for(mid) <= blocks else (lo, mid - BLOCK_SIZE)
        return lo


def _stages(n_layers: int, pp: int) -> list[tuple[int, int]]:
    """vLLM's pipeline partition: equal shares, the remainder to the stages before the last."""
    parts = [n_layers // pp] * pp
    for i in range(2, n_layers % pp + 2):
        parts[-i] += 1
    out, start = [], 0
    for p in parts:
        out.append((start, start + p))
        start += p
    return out


def _weights_per_gpu(spec, fmt: str, tp: int, stage: tuple[int, int], first: bool, last: bool,
                     active: bool = False) -> int:
    """One GPU's weight bytes; active: only what a decoded token reads (an MoE layer's routed experts)."""
    bits, per_group, _ = FORMATS[fmt]
    a, b = stage
    total = 0.0
    for t in tensors(spec):
        if t.kind == "embed":                  # a token reads one row of it, unless it is also the head
            if active:
                total += t.numel * 2 if last and spec.tie_embeddings else 0
                continue
            total += t.numel * 2 if first else 0
            total += t.numel * 2 if last and spec.tie_embeddings and not first else 0
        elif t.kind == "head":
            total += t.numel * 2 if last else 0
        elif a <= t.layer < b:
            share = t.read_fraction if active else 1.0
            if fmt == "mxfp4" and t.quantized and t.expert:
                total += t.numel * MXFP4_EXPERT_BITS / 8 * share
            else:
                total += (t.numel * bits / 8 + t.numel / GROUP * per_group if t.quantized else t.numel * 2) * share
        elif t.kind == "norm" and t.layer < 0 and last:
            total += t.numel * 2
    return math.ceil(total / tp)


def activation_bytes(spec, tp: int, tokens: int) -> int:
    """Profiling peak: the larger of the layer activations and the sampler's vocabulary-wide fp32 tensors.

    The layer part is 16-bit activations of `tokens` through one layer, split over TP ranks. The sampler
    runs after the forward pass on the last token of each of --max-num-seqs dummy requests, with top-k and
    top-p on: a full-vocabulary sort (fp32 values + int64 indices), masks, softmax, cumulative sum, the
    re-scattered logits and the final probabilities, about SAMPLER_COPIES fp32 copies of the [seqs, vocab]
    logits, none of them split by TP (vllm#10511 logs the same 1.26 GiB peak for Llama 3 8B at TP 1 and 2).
    """
    h, f = spec.hidden_size, spec.intermediate_size * max(1, spec.experts_per_token)
    per_token = 4 * h * 2 + (spec.q_dim + 2 * spec.kv_dim) // tp * 2 + 3 * f // tp * 2
    return max(tokens * per_token, SAMPLER_COPIES * MAX_NUM_SEQS * spec.vocab_size * 4)


def kv_memory_bytes(total_bytes: int, util: float, items: dict[str, int]) -> int:
    """What vLLM's profiler leaves for the KV cache: total x utilization minus weights, peak and non-torch."""
    return int(total_bytes * util) - sum(items.values())


def stage_items(spec, fmt: str, tp: int, pp: int, stage_index: int, tokens: int) -> dict[str, int]:
    """One GPU's non-KV memory in a (TP, PP) layout: weights, profiling activation peak, non-torch."""
    stage = _stages(spec.num_layers, pp)[stage_index]
    return {"weights": _weights_per_gpu(spec, fmt, tp, stage, stage_index == 0, stage_index == pp - 1),
            "activation_peak": activation_bytes(spec, tp, tokens), "non_torch": NON_TORCH_BYTES}


def block_bytes(spec, layers: int, tp: int, kv_dtype_bytes: int) -> int:
    if spec.is_mla:                        # one latent row a token, the same on every TP rank
        return BLOCK_SIZE * layers * (spec.kv_lora_rank + spec.rope_head_dim) * kv_dtype_bytes
    kv_heads = max(1, spec.num_kv_heads // tp)
    return BLOCK_SIZE * layers * 2 * kv_heads * spec.head_dim * kv_dtype_bytes


def _utilization(req: TargetRequest) -> float:
    reserve = mem.default_reserve(req.gpu) if req.reserve_bytes is None else req.reserve_bytes
    return min(DEFAULT_UTILIZATION, math.floor((1 - reserve / req.gpu.memory_bytes) * 100) / 100)


def _price(req: TargetRequest, fmt: str, kv_bytes: int):
    spec, tp, pp = req.model, req.gpu_count, req.nodes
    util = _utilization(req)
    tokens = BATCHED_TOKENS_LARGE if req.gpu.memory_bytes >= LARGE_CARD_BYTES else BATCHED_TOKENS
    cards, blocks, capacity = [], [], []
    for s, stage in enumerate(_stages(spec.num_layers, pp)):
        items = stage_items(spec, fmt, tp, pp, s, tokens)
        free = kv_memory_bytes(req.gpu.memory_bytes, util, items)
        groups = KVGroups(spec, stage, tp, kv_bytes, tokens)
        blocks.append(max(0, free) // groups.block)
        cards += [(items, groups.block, stage)] * tp
        capacity.append(groups)
    n_blocks = min(blocks)
    per_gpu = []
    for items, bb, _ in cards:
        card = dict(items, kv_cache=n_blocks * bb)
        card["unused"] = req.gpu.memory_bytes - sum(card.values())   # the (1 - utilization) vLLM leaves alone
        per_gpu.append(card)
    return util, tokens, n_blocks, per_gpu, cards, min(g.max_tokens(n_blocks) for g in capacity), capacity[0]


def refusal(spec) -> str | None:
    """Why vLLM 0.10.1 is not planned for this model (None where it is)."""
    if spec.linear_attention_interval:
        return (f"vLLM 0.10.1 does not plan {spec.name}'s linear-attention (Gated DeltaNet) layers, whose fixed-size "
                f"state vLLM keeps in its own cache groups")
    if spec.family == "minimax_m2":
        return (f"vLLM 0.10.1 (August 2025) predates {spec.name} (October 2025), whose MiniMaxM2 architecture it "
                f"does not load")
    if spec.has_global_geometry:
        return (f"vLLM 0.10.1 (August 2025) predates {spec.name}: its full-attention layers' own KV heads and head "
                f"width are not planned for it")
    return None


def plan(req: TargetRequest) -> Outcome:
    spec, tp, pp = req.model, req.gpu_count, req.nodes
    why = refusal(spec)
    if why:
        raise TargetError(f"{why}; use --target llama.cpp")
    if spec.num_heads % tp:
        raise TargetError(f"vLLM needs the attention heads ({spec.num_heads}) divisible by --tensor-parallel-size "
                          f"{tp}; use --gpus {', '.join(str(d) for d in range(1, 9) if spec.num_heads % d == 0)}")
    if pp > spec.num_layers:
        raise TargetError(f"--nodes {pp} exceeds the model's {spec.num_layers} layers")
    if req.kv in ("q8", "q4"):
        raise TargetError(f"vLLM has no {req.kv} integer KV cache; use --kv fp8 (--kv-cache-dtype fp8) or fp16")
    kv_name, kv_bytes = ("fp8", 1) if req.kv == "fp8" else ("auto", 2)
    want = req.ctx or spec.max_context
    bits = [b for b, _ in BITS_TO_FORMAT if req.bpw is None or b <= req.bpw]
    fmts = [f for b, f in BITS_TO_FORMAT if b in bits and b >= req.min_bpw]
    if spec.family in NATIVE_FORMATS:
        fmts = [NATIVE_FORMATS[spec.family]]
    if not fmts:
        raise TargetError(f"vLLM serves 16-, 8- and 4-bit weights; nothing lies within --min-bpw {req.min_bpw:g} "
                          f"and --bpw {req.bpw:g}")
    tried = []
    for fmt in fmts:
        util, tokens, n_blocks, per_gpu, cards, capacity, groups = _price(req, fmt, kv_bytes)
        need = want if req.ctx else min(want, 4096)
        tried.append(f"{fmt}: {capacity} tokens")
        if capacity >= need:
            ctx = want if capacity >= want or req.ctx else max(need, capacity // 1024 * 1024)
            return _outcome(req, fmt, kv_name, kv_bytes, util, tokens, n_blocks, per_gpu, cards, ctx, tried, groups)
    raise TargetError(f"{spec.name} leaves no room for a {want if req.ctx else min(want, 4096)}-token KV cache on "
                      f"{tp * pp} x {req.gpu.name} with vLLM ({'; '.join(tried)}); add --gpus or --nodes, or lower --ctx")


def _outcome(req, fmt, kv_name, kv_bytes, util, tokens, n_blocks, per_gpu, cards, ctx, tried, groups) -> Outcome:
    spec, tp, pp = req.model, req.gpu_count, req.nodes
    eff = efficiency(req.gpu)
    stages = _stages(spec.num_layers, pp)                              # stages run one after another
    read = sum(_weights_per_gpu(spec, fmt, tp, st, i == 0, i == pp - 1, active=True) for i, st in enumerate(stages))
    row = block_bytes(spec, 1, tp, kv_bytes) / BLOCK_SIZE               # one layer's cache a token, on one rank

    def decode_at(depth: int) -> float:        # the weights a token reads, and the cache its attention reads
        kv = sum(positions_read(spec, SWA_FAMILIES, depth)) * row
        traffic = Traffic(vram_bytes=read + kv, overhead_s=eff.decode_overhead_s(req.gpu, spec.num_layers),
                          link_bytes=4 * spec.hidden_size * (pp - 1 + (tp > 1) * 2 * spec.num_layers))
        return decode_seconds(traffic, eff, memory_bandwidth(req.gpu, eff), req.gpu.host_link_gb_s,
                              req.host.cpu_bandwidth_gb_s, req.host.disk_gb_s)
    decode = decode_at(0)
    settings = {"weights": fmt, "dtype": "float16" if _no_bf16(req) else "auto", "max_model_len": ctx,
                "gpu_memory_utilization": util, "kv_cache_dtype": kv_name, "tensor_parallel_size": tp,
                "pipeline_parallel_size": pp, "block_size": BLOCK_SIZE, "max_num_batched_tokens": tokens,
                "max_num_seqs": MAX_NUM_SEQS, "gpu_blocks": n_blocks, "nodes": pp}
    kv_tok = block_bytes(spec, spec.num_layers, 1, kv_bytes) // BLOCK_SIZE
    decisions = [
        ("weights", fmt, f"{FORMATS[fmt][2]}; the most precise format whose KV cache holds the context "
                         f"({'; '.join(tried)})"),
        ("parallel", f"TP {tp} x PP {pp}", "tensor parallel within a node, pipeline parallel across nodes (Ray), "
                                           "as vLLM documents for multi-node serving" if pp > 1 else
                                           f"tensor parallel over the {tp} cards" if tp > 1 else "one GPU"),
        ("gpu_memory_utilization", f"{util:.2f}", "vLLM's default 0.90" if util == DEFAULT_UTILIZATION else
         "lowered so the desktop reserve stays free"),
        ("kv_cache", f"{n_blocks} blocks", _kv_why(spec, n_blocks, kv_name, cards[0][1], groups)),
        ("max_model_len", str(ctx), asked_context(ctx, spec, "config.json rope_scaling, or vLLM's --hf-overrides")
         if req.ctx else "the model's native context" if ctx == spec.max_context
         else "the native context does not fit the KV cache; the largest multiple of 1024 that does"),
        ("max_num_batched_tokens", str(tokens), "the profiling batch vLLM's activation peak is measured with")]
    weights = {"format": fmt, "bytes": sum(items["weights"] for items, _, _ in cards),
               "avg_bpw": _avg_bpw(spec, fmt)}
    return Outcome("vllm", "gpu", settings, per_gpu, {}, ctx, kv_name, kv_tok, weights, decode, decisions,
                   decode_at(ctx))


def _avg_bpw(spec, fmt: str) -> float:
    """Bits per weight over the quantized linears (for mxfp4: the experts' 4.25 and the rest's 16, weighted)."""
    bits, per_group, _ = FORMATS[fmt]
    if fmt != "mxfp4":
        return bits + 8 * per_group / GROUP
    lin = [t for t in tensors(spec) if t.quantized]
    return round(sum(t.numel * (MXFP4_EXPERT_BITS if t.expert else 16) for t in lin)
                 / sum(t.numel for t in lin), 4)


def _kv_why(spec, n_blocks: int, kv_name: str, block: int, groups: KVGroups) -> str:
    per = f"block {BLOCK_SIZE} tokens, {fmt_bytes(block)} per block per GPU"
    if not groups.sliding_groups:
        return f"{n_blocks * BLOCK_SIZE} tokens of {kv_name} cache ({per})"
    return (f"{kv_name} cache for one request of up to {groups.max_tokens(n_blocks)} tokens ({per}): the hybrid KV "
            f"cache manager groups the layers {groups.group} a group, {groups.full_groups} global and "
            f"{groups.sliding_groups} sliding, and a sliding group keeps only the {spec.sliding_window}-token window "
            f"plus a {groups.window - spec.sliding_window + 1}-token batch")


def _no_bf16(req: TargetRequest) -> bool:
    try:
        return float(req.gpu.compute_capability) < 8.0
    except ValueError:
        return False
