"""llama.cpp: a GGUF file type (with --tensor-type overrides), -c, -ngl, -ctk/-ctv, -fa, and MoE experts on the CPU.

Memory as llama.cpp allocates it (src/llama-model.cpp, src/llama-kv-cache.cpp, src/llama-context.cpp):
  - model buffers: every tensor in its GGUF type (planner.targets.gguf). The token embedding stays in
    host memory (llama.cpp keeps the input layer on the CPU); -ngl N puts the last N repeating layers on
    the GPU(s), and the output head too when N exceeds the layer count. --cpu-moe / --n-cpu-moe keep
    expert tensors in host memory (an -ot override to the CPU buffer);
  - KV cache: n_ctx cells x resident layers x (K row + V row); rows are whole ggml blocks, so q8_0 takes
    34 bytes and q4_0 18 bytes per 32 values (planner.formats' q8/q4). llama_context rounds n_ctx up to a
    multiple of 256 (ggml-org/llama.cpp#17046, November 2025, restoring the padding #16812 had removed).
    Architectures with interleaved sliding-window attention (SWA_FAMILIES) get two caches
    (src/llama-kv-cache-iswa.cpp, since ggml-org/llama.cpp#13194; not with --swa-full): the global layers
    keep n_ctx cells, the sliding ones min(n_ctx, n_swa + n_ubatch) rounded up to 256 (kv_cells);
  - compute buffer: what llama_context reserves for the worst-case graph (n_ubatch=512 tokens over all
    n_ctx cells, logits for every token): the largest set of fp32 tensors alive at once, since ggml-alloc
    reuses a tensor's memory after its last consumer (compute_buffer_bytes: the attention mask, the
    score matrix without flash attention, the FFN intermediates, or the logits; checked against published
    `CUDA0 compute buffer size` lines in tests/data/published_figures.yaml);
  - flash attention's f16 copy of a quantized cache (fa_convert_bytes): on CUDA and ROCm the tensor-core and
    tile kernels read f16, so launch_fattn converts a q8_0 / q4_0 layer's K and V over all its cells into
    the CUDA pool, which keeps its peak;
  - margins: --fit's default target leaves 1024 MiB free per device (ggml-org/llama.cpp#16653, `-fitt`);
    CUDA context and cuBLAS workspace as for vramwise's engine; the desktop reserve on display cards.
"""
from __future__ import annotations

from planner import memory as mem
from planner.budget import HOST_OS_RESERVE_BYTES, contiguous_split
from planner.errors import TYPE_WEIGHT
from planner.formats import KV_FORMATS
from planner.optimize import _ctx_ladder
from planner.reasons import asked_context
from planner.roofline import Traffic, decode_seconds, efficiency, memory_bandwidth
from planner.spec import windowed_layers
from planner.targets import Outcome, TargetError, TargetRequest
from planner.targets import gguf
from planner.units import fmt_bytes

FIT_TARGET_BYTES = 1024 * mem.MiB        # llama.cpp --fit-target default, per device
N_UBATCH = 512                           # llama.cpp default physical batch (-ub)
KQ_MASK_PAD = 64                         # ggml GGML_KQ_MASK_PAD: the mask's token rows are padded to it
# best first; each is a llama-quantize type name. F16 is offered only through --bpw 16.
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_L", "Q3_K_M", "IQ3_M",
          "IQ3_XS", "Q3_K_S", "IQ3_XXS", "Q2_K", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# Architectures whose sliding-window layers llama.cpp gives a cache of the window's size (load_hparams sets their
# swa_type; Llama 4's chunked attention gets the same cache, LLAMA_SWA_TYPE_CHUNKED with n_swa 8192). Mistral 7B v0.1
# runs as the llama architecture, which has none, and Phi-3's is disabled: both keep n_ctx cells in every layer.
SWA_FAMILIES = ("gemma2", "gemma3", "gemma3_text", "gemma4", "gpt_oss", "llama4")
# Families llama.cpp gained after the January 2026 master these plans model: the build that loads them, and why.
NEWER_FAMILIES = {"gemma4": ("b8639 or later", "Gemma 4 support landed in llama.cpp b8639 (April 2026, "
                                               "ggml-org/llama.cpp#21309), after the January 2026 master this plan "
                                               "models; its memory and speed are priced as that master would run it")}
CELL_PAD = 256                           # n_ctx and the SWA cache's cells are padded to 256 (ggml-org/llama.cpp#17046)
# Models whose files come in one type: gpt-oss ships MXFP4 experts, and its GGUFs keep them (MXFP4_MOE)
NATIVE_FTYPES = {"gpt_oss": ("MXFP4_MOE",)}
OFFLOAD_FTYPE = "Q4_K_M"                 # the common 4-bit choice when the model must be split with the CPU
KV_TYPES = {"fp16": "f16", "q8": "q8_0", "q4": "q4_0"}
KV_FROM_TYPE = {v: k for k, v in KV_TYPES.items()}     # llama.cpp's -ctk name (q8_0) -> ours (q8)
K_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
BUMP_ORDER = sorted(("attn_v", "ffn_down", "attn_output", "attn_k", "attn_q"),
                    key=lambda c: -TYPE_WEIGHT[{"attn_v": "v", "ffn_down": "down", "attn_output": "o",
                                                "attn_k": "k", "attn_q": "q"}[c]])


class _Layout:
    """Where every tensor sits: per card the resident layers, the head, CPU experts."""

    def __init__(self, spec, types, ctx, kv, gpu_layers, head_on_gpu, cpu_expert_layers):
        self.spec, self.types, self.ctx, self.kv = spec, types, ctx, kv
        self.gpu_layers, self.head_on_gpu, self.cpu_expert_layers = gpu_layers, head_on_gpu, cpu_expert_layers
        self.tensor_bytes = gguf.file_bytes(spec, types)
        self.kv_layer = kv_layer_bytes(spec, ctx, kv)

    @property
    def on_gpu(self) -> set[int]:
        return {i for a, b in self.gpu_layers for i in range(a, b)}


def _pad(n: int) -> int:
    return -(-n // CELL_PAD) * CELL_PAD


def kv_cells(spec, ctx: int, n_ubatch: int = N_UBATCH) -> list[int]:
    """Cells of each layer's cache for -c ctx: n_ctx rounded up to 256, or on a sliding-window layer of an
    SWA_FAMILIES model the SWA cache's min(n_ctx, n_swa + n_ubatch) rounded up to 256 (one sequence, as llama-cli
    and llama-bench run, and llama-server with the -np 1 the export prints; its default of 4 slots sharing one
    cache gives the SWA cache 4 windows, and --swa-full all n_ctx cells). A linear-attention layer has none
    (kv_layer_bytes gives it its recurrent state)."""
    base = _pad(ctx)
    swa = _pad(min(base, spec.sliding_window + n_ubatch))
    return [0 if spec.is_linear(i) else swa if w else base for i, w in enumerate(windowed_layers(spec, SWA_FAMILIES))]


def kv_layer_bytes(spec, ctx: int, kv: str) -> list[int]:
    """Bytes of each layer's K and V cache at n_ctx = ctx in the cache type kv (fp16, q8 or q4); a linear-attention
    layer's recurrent state instead (one sequence, f32: llama_memory_hybrid keeps it beside the attention
    layers' cache, whatever n_ctx and -ctk)."""
    fmt, state = KV_FORMATS[kv], mem.recurrent_state_bytes(spec)
    return [state if spec.is_linear(i) else cells * mem.kv_bytes_per_token_at(spec, fmt, i)
            for i, cells in enumerate(kv_cells(spec, ctx))]


def _layer_bytes(lay: _Layout, experts: bool) -> list[int]:
    out = [0] * lay.spec.num_layers
    for t in gguf.gguf_tensors(lay.spec):
        if t.layer >= 0 and (experts or not (t.expert and t.layer in lay.cpu_expert_layers)):
            out[t.layer] += lay.tensor_bytes[t.name]
    return out


def compute_buffer_bytes(spec, ctx: int, flash_attn: bool, with_logits: bool, n_ubatch: int = N_UBATCH) -> int:
    """Peak of llama.cpp's compute buffer: the graph allocator's high-water mark for the worst-case micro-batch.

    llama.cpp reserves the compute buffer once, for a graph of min(n_ctx, n_ubatch) tokens that attends over
    the whole cache (n_kv = n_ctx) and produces logits for every token of the micro-batch. ggml's graph
    allocator frees each intermediate after its last consumer, so the buffer is the largest set of tensors
    alive at one point of the graph, not their sum. Three points compete (all fp32):
      - attention: the KQ mask input (n_kv x n_tokens padded to 64; with flash attention also its f16 copy)
        and, without flash attention, the n_kv x n_tokens x n_head score matrix (softmax runs in place),
        beside four hidden-sized tensors (residual, normed input, Q, attention output);
      - the feed-forward block: gate, up and their product per routed expert, the MoE down projection,
        and the residual and normed input; the mask stays alive until the last layer uses it;
      - the output: logits for every token (n_tokens x n_vocab) and the final norm they are computed from.
    """
    n = min(ctx, n_ubatch)
    h = spec.hidden_size
    q = max(spec.num_heads * spec.head_dim_at(i) for i in range(spec.num_layers))
    n_pad = -(-n // KQ_MASK_PAD) * KQ_MASK_PAD
    cells = kv_cells(spec, ctx, n_ubatch)
    mask = sum(set(cells)) * n_pad * (4 + 2 if flash_attn else 4)   # a mask per cache: the sliding layers' too
    scores = 0 if flash_attn else max(cells) * n * spec.num_heads * 4
    attention = mask + scores + n * (2 * h + 2 * q) * 4
    k = max(1, spec.experts_per_token)
    width = max(k * spec.intermediate_size + spec.shared_experts * spec.intermediate_size, spec.dense_intermediate_size)
    ffn = mask + n * 3 * width * 4 + n * 2 * h * 4 + (n * k * h * 4 if spec.is_moe else 0)
    output = n * (spec.vocab_size + h) * 4 if with_logits else 0
    return max(attention, ffn, output)


# Backends whose flash attention runs ggml-cuda's kernels (HIP builds compile the same sources).
CUDA_FA_VENDORS = ("nvidia", "amd")
# A quantized cache read by ggml-cuda's vec kernel (head sizes 64-256) costs its own bytes plus the dequantization,
# which the kernel does for each query head on its own: QUANT_CACHE_DEQUANT_CYCLES SM clock cycles for every cached
# K and V element each query head reads, spread over the card's SMs (CUs) at its boost clock. A compute cost, not a
# byte cost: on published runs a q8_0 cache is read slower than an f16 one, the more so the more query heads share a
# KV head and the fewer SM cycles the card has per byte of bandwidth. Fit by benchmarks/fit_kv_read.py
# (benchmarks/results/kv_read_fit.json) to the q8_0 depth ladders of llama.cpp master 36b101543 (September 2026):
# Llama 3 8B (4 query heads a KV head) and Gemma 2B (8) on an RTX 3090 and an RTX 5070 Laptop GPU, 16384-65536
# tokens, 11 rows from 0.061 to 0.070. q4_0 is priced the same per element (no published q4_0 ladder was found).
QUANT_CACHE_DEQUANT_CYCLES = 0.065
# Metal's flash attention reads the cache once for each query head: a token deep into the context costs the cache's
# bytes x (query heads per KV head) x METAL_CACHE_READ_COST at the weights' share of the bandwidth. Fit by
# benchmarks/fit_kv_read.py to 6 pairs of published depth rows (Qwen3 0.6B on an M2 Ultra, 2 query heads a KV head,
# master of August 2026; Qwen3.5 27B on an M3 Ultra, 6, version 8500), 0.73 to 1.14.
METAL_CACHE_READ_COST = 0.96


def fa_convert_bytes(spec, ctx: int, kv: str, vendor: str) -> int:
    """The f16 copy flash attention makes of one layer's quantized K and V (ggml-cuda fattn-common.cuh,
    launch_fattn: a pool allocation of each view's elements when the kernel needs f16 and the cache is not): one
    layer's cache row at f16 times its cells, for the largest layer; the pool keeps its peak. Every card that
    holds layers pays it, so every card is charged: the split is decided after. Published (llama.cpp issue text
    and tables for #29827, RTX 3090, master 36b101543, 2026-09): with a q8_0 cache, Llama 3 8B's CUDA0 compute
    buffer (where that build pre-allocates the copy) grows by 436 MiB at n_ctx 131072, one layer's 512 MiB less
    what the copy shares with the rest; an MLA cache (DeepSeek-V2-Lite) copies its 576-wide K only (V is a view of
    it), 144 MiB. fp16 caches, and Metal and Vulkan, copy nothing."""
    if kv == "fp16" or vendor not in CUDA_FA_VENDORS:
        return 0
    f16 = KV_FORMATS["fp16"]
    return max(mem.kv_bytes_per_token_at(spec, f16, i) * n for i, n in enumerate(kv_cells(spec, ctx)))


def _card(req: TargetRequest, lay: _Layout, card: int, layer_bytes: list[int]) -> dict[str, int]:
    a, b = lay.gpu_layers[card]
    last = card == len(lay.gpu_layers) - 1
    head = lay.tensor_bytes.get("output", lay.tensor_bytes["token_embd"] if lay.spec.tie_embeddings else 0)
    norm = sum(lay.tensor_bytes[t.name] for t in gguf.gguf_tensors(lay.spec) if t.layer < 0 and t.category == "other")
    on_head = last and lay.head_on_gpu
    return {"weights.layers": sum(layer_bytes[a:b]), "weights.output": head + norm if on_head else 0,
            "kv_cache": sum(lay.kv_layer[a:b]),
            "compute_buffer": compute_buffer_bytes(lay.spec, lay.ctx, True, on_head),
            "fa_convert": fa_convert_bytes(lay.spec, lay.ctx, lay.kv, req.gpu.vendor),
            "cuda_context": mem.CUDA_CONTEXT_BYTES, "cublas_workspace": mem.cublas_workspace_bytes(req.gpu),
            "fit_margin": FIT_TARGET_BYTES, "reserve": _reserve(req) if card == 0 else 0}


def _reserve(req: TargetRequest) -> int:
    return mem.default_reserve(req.gpu) if req.reserve_bytes is None else req.reserve_bytes


def _place(req: TargetRequest, spec, types, ctx, kv, cpu_expert_layers=frozenset(), max_layers=None):
    """Fill the cards from the last layer backwards (as -ngl does); None if not even one layer fits."""
    n, cards = spec.num_layers, req.gpu_count
    probe = _Layout(spec, types, ctx, kv, tuple((0, 0) for _ in range(cards)), True, cpu_expert_layers)
    layer_bytes = [w + c for w, c in zip(_layer_bytes(probe, experts=False), probe.kv_layer)]
    budgets = [req.gpu.memory_bytes] * cards
    top = n if max_layers is None else max_layers
    for k in range(top, 0, -1):
        head_on_gpu = k == n
        fixed = [sum(_card(req, _Layout(spec, types, ctx, kv, tuple((0, 0) for _ in range(cards)), head_on_gpu,
                                        cpu_expert_layers), c, layer_bytes).values()) for c in range(cards)]
        split = contiguous_split(layer_bytes[n - k:], fixed, budgets, [0] * k)
        if split is not None:
            split = tuple((a + n - k, b + n - k) for a, b in split)
            return _Layout(spec, types, ctx, kv, split, head_on_gpu, cpu_expert_layers)
    return None


def _host_items(lay: _Layout) -> dict[str, int]:
    """Host memory of a layout: the token embedding and the CPU layers' weights (llama.cpp memory-maps both from
    the GGUF), and the CPU layers' cache."""
    gpu_side = _layer_bytes(lay, experts=False)
    return {"weights.token_embd": lay.tensor_bytes["token_embd"],
            "weights.cpu_layers": sum(_layer_bytes(lay, experts=True)) - sum(gpu_side[i] for i in lay.on_gpu),
            "kv_cache.cpu_layers": sum(c for i, c in enumerate(lay.kv_layer) if i not in lay.on_gpu)}


def _disk_share(req: TargetRequest, lay: _Layout) -> float:
    """Share of the CPU's weight reads that come from disk: llama.cpp memory-maps the GGUF, and the page cache holds
    what RAM leaves (less HOST_OS_RESERVE_BYTES and the CPU layers' cache). Whole layers are read in the same order
    every token, so once they exceed the cache LRU evicts each page just before it is needed again: all of it comes
    from disk, as vramwise's own offload model assumes. Experts on the CPU are read as the router picks them; with
    picks spread evenly over the experts, the cached share of them is hit and the rest read from disk."""
    host = _host_items(lay)
    weights = host["weights.token_embd"] + host["weights.cpu_layers"]
    room = req.host.ram_bytes - HOST_OS_RESERVE_BYTES - host["kv_cache.cpu_layers"]
    if weights <= room:
        return 0.0
    if lay.cpu_expert_layers:
        return 1.0 - max(room, 0) / weights
    return 1.0


def kv_read_bytes(spec, kv: str, depth: int, n_ubatch: int = N_UBATCH) -> list[int]:
    """Cache bytes each layer's attention reads for one token at `depth` tokens of context. Flash attention reads
    every cell of the cache's view, masked or not: all `depth` positions, and on a sliding-window layer of an
    SWA_FAMILIES model the whole SWA cache once the context has filled it (kv_cells at n_ctx = depth: the
    window plus one micro-batch, not the window alone). On a DGX Spark (benches/dgx-spark.md, n_ubatch 2048)
    Gemma 3 4B slows from 79.0 to 68.9 tok/s by depth 4096, and 4096 -> 32768 costs little more: the 29
    sliding layers read their 3072 cells, not the 1024-token window. A linear-attention layer reads and writes
    its recurrent state every token, at any depth."""
    fmt, state = KV_FORMATS[kv], mem.recurrent_state_bytes(spec)
    cells = kv_cells(spec, depth, n_ubatch) if depth else [0] * spec.num_layers
    return [2 * state if spec.is_linear(i) else mem.kv_bytes_per_token_at(spec, fmt, i) * n
            for i, n in enumerate(cells)]


def kv_read_cost(spec, kv: str, depth: int, vendor: str, n_ubatch: int = N_UBATCH) -> list[float]:
    """Bytes each layer's attention is priced at for one token at `depth`: what it reads (kv_read_bytes), but
      - a multi-head latent cache quantized under ggml-cuda's flash attention (CUDA_FA_VENDORS), which no vec kernel
        takes (576-wide K), is converted to f16 in the CUDA pool every token and the copy read: the quantized bytes,
        plus the f16 copy written and read. Published (benchmarks/fit_kv_read.py): DeepSeek-V2-Lite at 32768 on an
        RTX 3090 pays 2.34 times its f16 cache's attention time with q8_0; the copy's bytes give 2.53;
      - under Metal every query head reads the cache itself: its bytes x (query heads per KV head) x
        METAL_CACHE_READ_COST (not fit for latent attention, whose one cached row all heads share: priced at its
        bytes).
    Any other quantized cache under CUDA is read at its own bytes; its dequantization is kv_dequant_seconds."""
    read = kv_read_bytes(spec, kv, depth, n_ubatch)
    if vendor == "apple" and not spec.is_mla:
        return [float(b) if spec.is_linear(i) else b * METAL_CACHE_READ_COST * spec.num_heads / spec.kv_heads_at(i)
                for i, b in enumerate(read)]
    if kv == "fp16" or vendor not in CUDA_FA_VENDORS or not spec.is_mla:
        return [float(b) for b in read]
    f16 = kv_read_bytes(spec, "fp16", depth, n_ubatch)
    return [float(q) if spec.is_linear(i) else float(q + 2 * f) for i, (q, f) in enumerate(zip(read, f16))]


def kv_dequant_seconds(spec, kv: str, depth: int, gpu, n_ubatch: int = N_UBATCH) -> list[float]:
    """Seconds each layer's vec flash-attention kernel spends dequantizing a quantized cache for one token at
    `depth` (ggml-cuda, CUDA_FA_VENDORS): QUANT_CACHE_DEQUANT_CYCLES for every cached K and V element each query
    head reads, over the card's SMs at its boost clock. 0 for an f16 cache, other backends, latent attention
    (converted instead: kv_read_cost) and linear-attention layers."""
    if kv == "fp16" or gpu.vendor not in CUDA_FA_VENDORS or spec.is_mla or not depth:
        return [0.0] * spec.num_layers
    f16 = KV_FORMATS["fp16"]
    cycles_per_s = gpu.sm_count * efficiency(gpu).clock_hz(gpu)
    cells = kv_cells(spec, depth, n_ubatch)
    return [0.0 if spec.is_linear(i) else QUANT_CACHE_DEQUANT_CYCLES * n * mem.kv_bytes_per_token_at(spec, f16, i)
            / 2 * spec.num_heads / spec.kv_heads_at(i) / cycles_per_s for i, n in enumerate(cells)]


def _decode_s(req: TargetRequest, lay: _Layout, depth: int = 0, n_ubatch: int = N_UBATCH) -> float:
    """Seconds a token at `depth` tokens of context: the weights the token reads, plus the cache attention reads."""
    spec, on_gpu = lay.spec, lay.on_gpu
    kv = kv_read_cost(spec, lay.kv, depth, req.gpu.vendor, n_ubatch)
    dequant = kv_dequant_seconds(spec, lay.kv, depth, req.gpu, n_ubatch)
    gpu_read = float(sum(kv[i] for i in on_gpu))
    cpu_read = float(sum(kv) - gpu_read)
    share = spec.experts_per_token / spec.num_experts if spec.is_moe else 1.0
    for t in gguf.gguf_tensors(spec):
        if t.layer < 0:
            if t.category == "output" or (t.category == "token_embd" and spec.tie_embeddings):
                if lay.head_on_gpu:
                    gpu_read += lay.tensor_bytes[t.name]
                else:
                    cpu_read += lay.tensor_bytes[t.name]
            continue
        nbytes = lay.tensor_bytes[t.name] * (share if t.expert else 1.0)
        if t.layer in on_gpu and not (t.expert and t.layer in lay.cpu_expert_layers):
            gpu_read += nbytes
        else:
            cpu_read += nbytes
    eff = efficiency(req.gpu)
    disk = cpu_read * _disk_share(req, lay)
    traffic = Traffic(vram_bytes=gpu_read, cpu_bytes=cpu_read - disk, disk_bytes=disk,
                      link_bytes=8 * spec.hidden_size * (1 if cpu_read else 0),
                      overhead_s=eff.decode_overhead_s(req.gpu, spec.num_layers) + sum(dequant[i] for i in on_gpu))
    return decode_seconds(traffic, eff, memory_bandwidth(req.gpu, eff), req.gpu.host_link_gb_s,
                          req.host.cpu_bandwidth_gb_s, req.host.disk_gb_s)


def decode_seconds_for(req: TargetRequest, ftype: str, gpu_layers: int | None = None, depth: int = 0,
                       n_ubatch: int = N_UBATCH, kv: str = "fp16") -> float:
    """Seconds per token llama.cpp is predicted to take for a file type with the last `gpu_layers` repeating
    layers on the GPU(s) (all, and the head, when None), split evenly across req.gpu_count cards, whether or
    not it fits: the settings of a published run, not a plan (benchmarks/validate_published.py)."""
    spec = req.model
    n = spec.num_layers
    k = n if gpu_layers is None else max(0, min(gpu_layers, n))
    bounds = [n - k + round(k * c / req.gpu_count) for c in range(req.gpu_count + 1)]
    split = tuple(zip(bounds, bounds[1:]))
    types = gguf.tensor_types(spec, ftype, ftype.startswith("IQ"))
    lay = _Layout(spec, types, max(n_ubatch, depth), kv, split, k == n, frozenset())
    return _decode_s(req, lay, depth, n_ubatch)


def _avg_bpw(spec, types) -> float:
    tb = gguf.file_bytes(spec, types)
    return 8 * sum(tb.values()) / sum(t.numel for t in gguf.gguf_tensors(spec))


def _ftypes(req: TargetRequest) -> list[str]:
    ladder = NATIVE_FTYPES.get(req.model.family) or (
        ("F16",) + LADDER if req.bpw is not None and req.bpw >= 16 else LADDER)
    out = []
    for f in ladder:
        bpw = _avg_bpw(req.model, gguf.tensor_types(req.model, f, f.startswith("IQ")))
        if (req.bpw is None or bpw <= req.bpw) and bpw >= req.min_bpw:
            out.append(f)
    return out


def _bump(req: TargetRequest, lay: _Layout, ftype: str) -> tuple[_Layout, dict[str, str]]:
    """Mixed precision where it pays: raise whole tensor categories, most sensitive first, while all fits."""
    if ftype not in LADDER or ftype.startswith("IQ") or ftype in ("Q8_0",):
        return lay, {}
    spec, overrides = req.model, {}
    imatrix = False
    for cat in BUMP_ORDER:
        current = {lay.types[t.name] for t in gguf.gguf_tensors(spec) if t.category == cat}
        rank = max((K_LADDER.index(c) for c in current if c in K_LADDER), default=None)
        if rank is None or rank + 1 >= len(K_LADDER):
            continue
        trial = {**overrides, cat: K_LADDER[rank + 1]}
        types = gguf.tensor_types(spec, ftype, imatrix, trial)
        placed = _place(req, spec, types, lay.ctx, lay.kv)
        if placed is not None and placed.head_on_gpu:
            lay, overrides = placed, trial
    return lay, overrides


def _kv_names(req: TargetRequest) -> list[str]:
    if req.kv in (None, "auto"):
        return ["fp16", "q8", "q4"] if req.kv == "auto" else ["fp16"]
    if req.kv not in KV_TYPES:
        raise TargetError(f"llama.cpp has no {req.kv} KV cache; use --kv fp16, q8 (q8_0) or q4 (q4_0)")
    return [req.kv]


def plan(req: TargetRequest) -> Outcome:
    spec = req.model
    ftypes = _ftypes(req)
    if not ftypes:
        raise TargetError(f"no llama.cpp file type lies between --min-bpw {req.min_bpw:g} and --bpw {req.bpw:g}")
    for ctx in _ctx_ladder(req):
        for kv in _kv_names(req):
            for ftype in ftypes:
                types = gguf.tensor_types(spec, ftype, ftype.startswith("IQ"))
                lay = _place(req, spec, types, ctx, kv)
                if lay is not None and lay.head_on_gpu:
                    lay, overrides = _bump(req, lay, ftype)
                    return _outcome(req, lay, ftype, overrides, "gpu", f"the best llama-quantize type that fits "
                                    f"every layer, the head and a {ctx}-token {KV_TYPES[kv]} cache")
    return _offload(req, ftypes)


def _offload(req: TargetRequest, ftypes: list[str]) -> Outcome:
    spec = req.model
    ftype = OFFLOAD_FTYPE if OFFLOAD_FTYPE in ftypes else ftypes[-1]
    types = gguf.tensor_types(spec, ftype, ftype.startswith("IQ"))
    ctx, kv = _ctx_ladder(req)[0], _kv_names(req)[-1]
    options: list[tuple[float, _Layout, str]] = []
    dense = _place(req, spec, types, ctx, kv)
    if dense is not None:
        options.append((_decode_s(req, dense), dense, "layers"))
    if spec.is_moe:
        for n_cpu in range(1, spec.num_layers + 1):     # experts of the first n layers on the CPU
            lay = _place(req, spec, types, ctx, kv, frozenset(range(n_cpu)))
            if lay is not None and lay.head_on_gpu:
                options.append((_decode_s(req, lay), lay, "experts"))
                break
    if not options:
        raise TargetError(f"{spec.name} does not fit even one layer on {req.gpu.name} with llama.cpp at {ftype} and "
                          f"a {ctx}-token cache; try --ctx smaller, --kv q4 or --reserve 0")
    _, lay, how = min(options, key=lambda o: o[0])
    gpu_n = sum(b - a for a, b in lay.gpu_layers)
    if how == "experts":
        why = (f"the {ftype} model does not fit; the experts of the first {len(lay.cpu_expert_layers)} layers stay in "
               f"host RAM (--n-cpu-moe), everything else on the GPU: faster than offloading whole layers")
    else:
        why = (f"the smallest useful type does not fit; {ftype} with the last {gpu_n} of {spec.num_layers} layers on "
               f"the GPU (-ngl {gpu_n}), the rest computed by the CPU")
    return _outcome(req, lay, ftype, {}, "offload", why)


def _swa_why(spec, ctx: int) -> str:
    cells = [c for i, c in enumerate(kv_cells(spec, ctx)) if not spec.is_linear(i)]
    linear = sum(spec.is_linear(i) for i in range(spec.num_layers))
    out = ""
    if linear:
        out = (f"; {linear} of {spec.num_layers} layers are linear attention with no cache: each keeps "
               f"{fmt_bytes(mem.recurrent_state_bytes(spec))} of f32 recurrent state, counted in kv_cache")
    if min(cells) == max(cells):
        return out
    n = sum(c < max(cells) for c in cells)
    return out + (f"; {n} of {spec.num_layers} layers attend over a {spec.sliding_window}-token sliding window and "
                  f"keep {min(cells)} cells (the window and one {N_UBATCH}-token micro-batch, padded to {CELL_PAD}), "
                  f"the others all {max(cells)}")


def _emulated_dp4a(gpu) -> bool:
    """An NVIDIA card below compute capability 6.1 (Tesla P100): ggml-cuda's ggml_cuda_dp4a multiplies byte by byte."""
    if gpu.vendor != "nvidia":
        return False
    try:
        cc = tuple(int(x) for x in gpu.compute_capability.split(".")[:2])
    except ValueError:
        return False
    return (0, 0) < cc < (6, 1)          # a custom card's "0.0" is unknown, not old


def _quant_cache_why(req: TargetRequest, lay: _Layout) -> str:
    if lay.kv == "fp16" or req.gpu.vendor not in CUDA_FA_VENDORS:
        return ""
    return (f"; under CUDA flash attention a {KV_TYPES[lay.kv]} cache saves memory, not time: deep into the context "
            f"it is read slower than an f16 one (the decode rate at the end prices it), and one layer's f16 copy "
            f"takes {fmt_bytes(fa_convert_bytes(lay.spec, lay.ctx, lay.kv, req.gpu.vendor))} (fa_convert)")


def _outcome(req: TargetRequest, lay: _Layout, ftype: str, overrides: dict, mode: str, why: str) -> Outcome:
    spec = lay.spec
    layer_bytes = _layer_bytes(lay, experts=False)
    per_gpu = [_card(req, lay, c, layer_bytes) for c in range(len(lay.gpu_layers))]
    n_gpu = sum(b - a for a, b in lay.gpu_layers)
    ngl = n_gpu + 1 if lay.head_on_gpu else n_gpu
    rows = [mem.kv_bytes_per_token_at(spec, KV_FORMATS[lay.kv], i) for i in range(spec.num_layers)]
    kv_tok = (f"{rows[0]} bytes per token per layer" if min(rows) == max(rows) else
              f"{rows[0]} bytes per token in a sliding layer, {rows[-1]} in a full-attention one")
    host = _host_items(lay)
    total_file = sum(lay.tensor_bytes.values()) + gguf.metadata_bytes(spec)
    kv_name = KV_TYPES[lay.kv]
    settings = {"ftype": ftype, "imatrix": ftype.startswith("IQ"), "tensor_types": dict(overrides),
                "ctx": lay.ctx, "n_gpu_layers": ngl, "cache_type_k": kv_name, "cache_type_v": kv_name,
                "flash_attn": "on", "n_cpu_moe": len(lay.cpu_expert_layers), "n_ubatch": N_UBATCH,
                "n_parallel": 1, "tensor_split": [b - a for a, b in lay.gpu_layers] if len(lay.gpu_layers) > 1 else []}
    by_type: dict[str, int] = {}
    for name, t in lay.types.items():
        by_type[t] = by_type.get(t, 0) + lay.tensor_bytes[name]
    weights = {"format": f"GGUF {ftype}", "avg_bpw": round(_avg_bpw(spec, lay.types), 4),
               "bytes": sum(lay.tensor_bytes.values()), "file_bytes_estimate": total_file,
               "bytes_by_type": dict(sorted(by_type.items()))}
    decisions = [("mode", mode, why),
                 ("file_type", ftype, f"{weights['avg_bpw']:.2f} bits per weight over all tensors "
                                      f"(llama-quantize's own mix for {ftype}); file about {fmt_bytes(total_file)}")]
    if overrides:
        decisions.append(("tensor_types", ", ".join(f"{k}={v.lower()}" for k, v in overrides.items()),
                          "memory left after the type: more bits for the tensors most sensitive to quantization "
                          "(attn_v, then ffn_down), as llama-quantize's own mixes favour them"))
    if settings["imatrix"]:
        decisions.append(("imatrix", "yes", "IQ types are tuned with an importance matrix (llama-imatrix)"))
    yarn = f"the export's llama-server --rope-scaling yarn --rope-scale {lay.ctx / spec.max_context:g}"
    decisions += [("context", str(lay.ctx), asked_context(lay.ctx, spec, yarn) if req.ctx
                   else "the model's native context, capped at 4096"),
                  ("kv_cache", kv_name, f"{kv_tok}; quantized V needs "
                                        f"flash attention (-fa on, used always: it also shrinks the compute buffer)"
                                        + _swa_why(spec, lay.ctx) + _quant_cache_why(req, lay)),
                  ("n_gpu_layers", str(ngl), f"{n_gpu} of {spec.num_layers} layers" +
                   (" and the output head (-ngl beyond the layer count)" if lay.head_on_gpu else "; head on the CPU")),
                  ("fit_margin", fmt_bytes(FIT_TARGET_BYTES), "llama.cpp's --fit default keeps 1024 MiB free per device")]
    share = _disk_share(req, lay)
    if share:
        mapped = host["weights.token_embd"] + host["weights.cpu_layers"]
        decisions.append(("storage", "disk", f"host-side weights ({fmt_bytes(mapped)}) exceed RAM "
                                             f"({fmt_bytes(req.host.ram_bytes)} less {fmt_bytes(HOST_OS_RESERVE_BYTES)} "
                                             f"for the OS and the CPU layers' cache): "
                                             f"{share:.0%} of the CPU's weight reads come from disk at "
                                             f"{req.host.disk_gb_s:g} GB/s (--ram / --disk-bandwidth)"))
    if settings["n_cpu_moe"]:
        decisions.append(("cpu_moe", str(settings["n_cpu_moe"]), "experts of these first layers in host RAM: only "
                                                                 "the routed experts are read per token"))
    if any(windowed_layers(spec, SWA_FAMILIES)) or spec.linear_attention_interval:
        decisions.append(("slots", "1", "llama-server -np 1: its default since late 2025 (ggml-org/llama.cpp#16736) "
                                        "is 4 slots sharing one cache, which keeps " +
                          ("4 windows in each sliding layer's cache" if not spec.linear_attention_interval else
                           "4 recurrent states in each linear-attention layer") +
                          " where this plan keeps one; raise it only with memory to spare"))
    if _emulated_dp4a(req.gpu) and not ftype.startswith(("F16", "BF16", "F32")):
        decisions.append(("speed", "optimistic", f"compute capability {req.gpu.compute_capability} has no dp4a: "
                                                 "llama.cpp's CUDA int8 dot product falls back to byte-by-byte "
                                                 "multiplies, so quantized decode is compute-bound, which this "
                                                 "model does not price (a published gpt-oss 20B run on a Tesla P100 "
                                                 "decoded at 40% of the predicted rate)"))
    if spec.family in NEWER_FAMILIES:
        decisions.append(("build", NEWER_FAMILIES[spec.family][0], NEWER_FAMILIES[spec.family][1]))
    if spec.family == "gemma4" and spec.is_moe:
        decisions.append(("speed", "optimistic", "Gemma 4's MoE layers (a dense MLP beside the routed experts, seven "
                                                 "norms, a scaled router) run more kernels than the fixed cost a layer "
                                                 "prices: published runs on builds of spring 2026 decoded 35-45% "
                                                 "slower than this model predicts, a later CUDA master within 12% "
                                                 "(benchmarks/published/measurements.yaml, known_gap)"))
    if spec.linear_attention_interval:
        decisions.append(("speed", "optimistic", "the linear-attention layers' many small kernels are priced as an "
                                                 "attention layer's fixed cost: a published Qwen3-Next Q4_K_M run on "
                                                 "an A100 decoded 41% slower than this model predicts "
                                                 "(benchmarks/published/measurements.yaml, its known_gap)"))
    if settings["tensor_split"]:
        decisions.append(("tensor_split", ",".join(map(str, settings["tensor_split"])), "layers per card (-sm layer)"))
    attending = sum(row for i, row in enumerate(rows) if not spec.is_linear(i))
    return Outcome("llama.cpp", mode, settings, per_gpu, host, lay.ctx, kv_name, attending, weights,
                   _decode_s(req, lay), decisions, _decode_s(req, lay, lay.ctx))
