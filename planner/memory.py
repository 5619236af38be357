"""Byte math shared by the planner and the engines: weights per tensor, KV cache, run-state buffers.

The engines allocate exactly `run_state_buffers(...)` and `kv_cache_buffers(...)`; tests assert that
the bytes they hold equal the bytes planned here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping, Optional

from hwdb import GPUSpec, ModelSpec
from planner.formats import DTYPE_BYTES, HEAD_OPTION, OPTIONS, PACK_VALUES, KVFormat, QuantOption
from planner.spec import SCALED_ROPE, Tensor, tensors

MiB = 1 << 20
GiB = 1 << 30

# CUDA context with lazy module loading (CUDA >= 11.7): 287,047,680 B measured in
# pytorch/pytorch#86509 (benchmarks/published/measurements.yaml, overheads). Rounded up to 288 MiB.
CUDA_CONTEXT_BYTES = 288 * MiB
# cuBLAS workspace: the cuBLAS docs recommend 4 MiB before Hopper and 32 MiB on Hopper (sm_90+).
CUBLAS_WORKSPACE_BYTES = {"pre_hopper": 4 * MiB, "hopper": 32 * MiB}
# A desktop session can hold about 1.5 GB of VRAM (shared/docs/background.md, section 1);
# the default reserve on cards with display outputs. Datacenter cards get 0.
DESKTOP_RESERVE_BYTES = 1_500_000_000
# Allocator rounding and fragmentation: CuPy's pool rounds to 512 B and splits 2 MiB+ chunks;
# keep 2% of the card free so a plan that "just fits" does not fail on the last allocation.
SAFETY_MARGIN_FRACTION = 0.02
# Tokens per prefill step: llama.cpp's default physical batch (n_ubatch = 512).
DEFAULT_CHUNK = 512
# Prefill dequantizes weights to fp16 for cuBLAS in tiles of at most this many elements (32 MiB),
# so the staging buffer does not grow with the largest matrix (a 70B down_proj is 235M elements).
DEQUANT_TILE_ELEMS = 16 * MiB
# Dtypes of the tensors the optimizer does not choose a format for.
NORM_DTYPE, BIAS_DTYPE, ROUTER_DTYPE, EMBED_DTYPE = "f32", "f32", "f16", "f16"
MAX_SLICES = max(len(o.slices) for o in (*OPTIONS, HEAD_OPTION))
# The GPU engine's table entry for one routed expert's linear (gpuengine.launch.expert_table): its QMat (136
# bytes), XGather (64) and fp16 matrix address (8), rounded up.
EXPERT_TABLE_BYTES = 256
# The GPU engine's decode attention splits the context into at most this many chunks per head (flash-decoding),
# each leaving head_dim + 2 floats for the merge (gpuengine/kernels/attention.cu).
ATTN_MAX_SPLITS = 64


@dataclass(frozen=True)
class Buffer:
    """One allocation of run state: the engines create exactly these."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@lru_cache(maxsize=65536)
def _option_bytes(option: QuantOption, n_out: int, k_in: int) -> int:
    return option.tensor_bytes(n_out, k_in)


def tensor_bytes(t: Tensor, option: Optional[QuantOption] = None) -> int:
    """Stored bytes of one tensor: quantized linears in their option, the head in HEAD_OPTION."""
    if t.quantized:
        if option is None:
            raise ValueError(f"{t.name} needs a quantization option")
        return _option_bytes(option, *t.shape)
    if t.kind == "head":
        return _option_bytes(HEAD_OPTION, *t.shape)
    dtype = {"norm": NORM_DTYPE, "bias": BIAS_DTYPE, "router": ROUTER_DTYPE, "embed": EMBED_DTYPE,
             "conv": NORM_DTYPE}[t.kind]      # a linear-attention layer's depthwise convolution: fp32, as norms
    return t.numel * DTYPE_BYTES[dtype]


def head_tensor(spec: ModelSpec) -> Tensor:
    """The output head as stored on the device; a tied head is a quantized copy of the embedding."""
    return Tensor("head", -1, "head", (spec.vocab_size, spec.hidden_size), False)


def layer_weight_bytes(spec: ModelSpec, assignment: Mapping[str, QuantOption]) -> list[int]:
    """Bytes of each transformer layer (its linears in their options, norms, biases, router)."""
    out = [0] * spec.num_layers
    for t in tensors(spec):
        if t.layer >= 0:
            out[t.layer] += tensor_bytes(t, assignment.get(t.name))
    return out


def layer_stream_bytes(spec: ModelSpec, assignment: Mapping[str, QuantOption]) -> list[int]:
    """What a stream buffer holds of each layer when it is streamed: the layer without its routed experts, which
    the GPU engine reads in place in (mapped) host memory, so a token moves its k experts' bytes of the E
    (gpuengine.model.DeviceWeights)."""
    out = layer_weight_bytes(spec, assignment)
    for t in tensors(spec):
        if t.expert:
            out[t.layer] -= tensor_bytes(t, assignment.get(t.name))
    return out


def layer_read_bytes(spec: ModelSpec, assignment: Mapping[str, QuantOption]) -> list[float]:
    """Bytes of each layer read per decoded token (MoE: only the routed experts' share)."""
    out = [0.0] * spec.num_layers
    for t in tensors(spec):
        if t.layer >= 0:
            out[t.layer] += tensor_bytes(t, assignment.get(t.name)) * t.read_fraction
    return out


def layer_read_values(spec: ModelSpec) -> list[float]:
    """Weights of each layer's linears decoded per token (MoE: only the routed experts' share)."""
    out = [0.0] * spec.num_layers
    for t in tensors(spec):
        if t.layer >= 0 and t.quantized:
            out[t.layer] += t.numel * t.read_fraction
    return out


def expert_values_per_token(spec: ModelSpec) -> float:
    """Weights of the routed experts a token multiplies, over all layers (its k experts a layer)."""
    return sum(t.numel * t.read_fraction for t in tensors(spec) if t.expert and t.quantized)


def global_weight_bytes(spec: ModelSpec) -> dict[str, int]:
    """Tensors outside the layers: head (device), final norm (device), embedding (host)."""
    by_kind = {t.kind: t for t in tensors(spec) if t.layer < 0}
    return {"head": tensor_bytes(head_tensor(spec)), "norm.final": tensor_bytes(by_kind["norm"]),
            "embed": tensor_bytes(by_kind["embed"])}


def all_weight_bytes(spec: ModelSpec, assignment: Mapping[str, QuantOption]) -> int:
    """Every weight the model stores: layers (linears in their options), embedding, final norm and head
    (a tied head is a separate quantized copy of the embedding, so it counts once more)."""
    total = sum(tensor_bytes(t, assignment.get(t.name)) for t in tensors(spec))
    return total + (global_weight_bytes(spec)["head"] if spec.tie_embeddings else 0)


def kv_bytes_per_token_at(spec: ModelSpec, kv: KVFormat, layer: int) -> int:
    """Cache bytes one position adds in this layer (K and V). Multi-head latent attention caches one row: the
    kv_lora_rank latent and the shared rotary key, from which every head's key and value are computed (llama.cpp
    since ggml-org/llama.cpp#19067 and vLLM's MLA backends keep only this, V being a view of it). Gemma 4's
    full-attention layers have their own KV heads and width, and cache V apart though it comes from k."""
    if spec.is_mla:
        return kv.row_bytes(spec.kv_lora_rank + spec.rope_head_dim)
    return 2 * spec.kv_heads_at(layer) * kv.row_bytes(spec.head_dim_at(layer))


def kv_bytes_per_token(spec: ModelSpec, kv: KVFormat) -> int:
    """Cache bytes one position adds in one layer: the widest layer's (every layer's but in Gemma 4, where the
    sliding layers' are the larger: a count over all layers from it errs high)."""
    if not spec.has_global_geometry:
        return kv_bytes_per_token_at(spec, kv, 0)
    return max(kv_bytes_per_token_at(spec, kv, i) for i in range(spec.num_layers))


def recurrent_state_bytes(spec: ModelSpec) -> int:
    """One linear-attention (Gated DeltaNet) layer's state for one sequence, in f32 whatever the cache type, as
    llama.cpp's llama_memory_recurrent allocates it (hparams n_embd_r and n_embd_s): the convolution's last
    kernel - 1 inputs over the query, key and value channels, and a key x value matrix per value head. Published:
    Qwen3-Next's 36 linear layers hold "R (f32): 3.38 MiB, S (f32): 72.00 MiB" (llama_memory_recurrent, 1 seq)."""
    if not spec.linear_attention_interval:
        return 0
    hd = spec.linear_head_dim
    channels = (spec.linear_value_heads + 2 * spec.linear_key_heads) * hd
    return 4 * ((spec.linear_conv_kernel - 1) * channels + spec.linear_value_heads * hd * hd)


def kv_rows(spec: ModelSpec, ctx: int, chunk: int, layer: int) -> int:
    """Positions layer's cache holds in vramwise's engines: the context, or on a sliding layer a ring of the
    window plus a prefill chunk less one (position p in row p mod rows): a chunk's queries see their own
    positions and the window - 1 before the first, so no row a query of the chunk needs is overwritten by
    another's key. llama.cpp sizes its sliding caches likewise (window + ubatch, with swa_full off)."""
    if not spec.is_sliding(layer):
        return ctx
    return min(ctx, spec.sliding_window + min(chunk, ctx) - 1)


def kv_cache_buffers(spec: ModelSpec, ctx: int, kv: KVFormat, layers: Iterable[int], chunk: int) -> list[Buffer]:
    """Per layer one K and one V buffer of raw bytes: (kv_rows, kv_heads, bytes per head vector)."""
    row = (spec.num_kv_heads, kv.row_bytes(spec.head_dim))
    return [Buffer(f"kv.{i}.{kv_}", (kv_rows(spec, ctx, chunk, i), *row), "u8") for i in layers for kv_ in ("k", "v")]


def kv_layer_bytes(spec: ModelSpec, ctx: int, chunk: int, kv: KVFormat) -> list[int]:
    """Each layer's cache bytes (kv_cache_buffers')."""
    return [buffers_bytes(kv_cache_buffers(spec, ctx, kv, [i], chunk)) for i in range(spec.num_layers)]


def run_state_buffers(spec: ModelSpec, ctx: int, chunk: int, logits: bool = True,
                      gemm_staging: bool = True) -> list[Buffer]:
    """Scratch for one prefill chunk (decode uses the first row): activations in fp32.

    gemm_staging: the GPU engine's buffers instead of the reference engine's. It adds the fp16 activation
    copy and dequantized-weight tile of cuBLAS prefill, the decode matvec's gathered input and the sampled
    token, and its attention needs no score matrix (online softmax) but the partial sums of decode's split
    context (and a ticket a KV head for merging them in the same launch). Logits only where the head runs."""
    h, q, kv = spec.hidden_size, spec.q_dim, spec.kv_dim
    f = max(spec.intermediate_size, spec.dense_intermediate_size, spec.shared_experts * spec.intermediate_size)
    group = spec.num_heads // spec.num_kv_heads
    out = [Buffer("tokens", (chunk,), "i32"), Buffer("positions", (chunk,), "i32"),
           Buffer("x", (chunk, h), "f32"), Buffer("xn", (chunk, h), "f32"),
           Buffer("q", (chunk, q), "f32"), Buffer("k", (chunk, kv), "f32"), Buffer("v", (chunk, kv), "f32"),
           Buffer("attn_out", (chunk, q), "f32"),
           Buffer("ffn_gate", (chunk, f), "f32"), Buffer("ffn_up", (chunk, f), "f32")]
    if not gemm_staging:
        out.append(Buffer("scores", (group, chunk, ctx), "f32"))          # one GQA group's scores at a time
    if spec.rope_scaling in SCALED_ROPE:               # each RoPE pair's frequency divisor, from the weights
        out.append(Buffer("rope_freqs", (spec.head_dim // 2,), "f32"))
    if spec.is_moe:
        out.append(Buffer("router_logits", (chunk, spec.num_experts), "f32"))
        out += moe_slot_buffers(spec, chunk) if gemm_staging else [Buffer("moe_out", (chunk, h), "f32")]
    if gemm_staging:
        largest = max(t.numel for t in tensors(spec) if t.quantized)
        widest = max(h, q, f)
        out += [Buffer("gemm_in", (chunk, widest), "f16"),
                Buffer("dequant_tile", (min(largest, DEQUANT_TILE_ELEMS),), "f16"),
                # decode's matvec input, permuted and padded to whole packing units per slice
                Buffer("matvec_in", (widest + MAX_SLICES * PACK_VALUES,), "f32"),
                Buffer("sampled", (1,), "i32"),                 # the token chosen on the device
                Buffer("attn_partials", (spec.num_heads, ATTN_MAX_SPLITS, spec.head_dim + 2), "f32"),
                # a counter a KV head: the last chunk of a one-launch decode attention to finish merges
                Buffer("attn_tickets", (spec.num_kv_heads,), "i32")]
    if logits:
        out.append(Buffer("logits", (chunk, spec.vocab_size), "f32"))
    return out


def moe_slots(spec: ModelSpec, chunk: int) -> int:
    """Expert slots the GPU engine runs in one launch: whole tokens' k chosen experts, as many as a chunk has
    rows (k where the chunk is shorter)."""
    k = spec.experts_per_token
    return k * max(1, chunk // k)


def moe_slot_buffers(spec: ModelSpec, chunk: int) -> list[Buffer]:
    """The GPU engine's routed experts (gpuengine/model.py): each slot's expert and weight, the slots ordered by
    expert for grouped prefill, each slot's input gathered in its expert's layout (as matvec_in), the gate, up
    and down outputs, and a table a layer of every expert's gate, up and down (EXPERT_TABLE_BYTES each)."""
    s, h, f, k = moe_slots(spec, chunk), spec.hidden_size, spec.intermediate_size, spec.experts_per_token
    rows = max(s, chunk)                # as slots, or one expert's tokens in grouped prefill (at most a chunk)
    width = -(-max(h, f) // PACK_VALUES) * PACK_VALUES + MAX_SLICES * PACK_VALUES
    return [Buffer("moe_sel", (chunk * k,), "i32"), Buffer("moe_weights", (chunk * k,), "f32"),
            # grouped prefill: the chunk's slots ordered by expert, as token rows and weights
            Buffer("moe_rows", (chunk * k,), "i32"), Buffer("moe_row_weights", (chunk * k,), "f32"),
            Buffer("moe_in", (s, width), "f32"), Buffer("moe_gate", (rows, f), "f32"),
            Buffer("moe_up", (rows, f), "f32"), Buffer("moe_out", (rows, h), "f32"),
            Buffer("moe_tables", (spec.num_layers, 3, spec.num_experts * EXPERT_TABLE_BYTES), "u8")]


def buffers_bytes(buffers: list[Buffer]) -> int:
    return sum(b.nbytes for b in buffers)


def cublas_workspace_bytes(gpu: GPUSpec) -> int:
    """cuBLAS workspace by architecture (NVIDIA only; other vendors' BLAS is counted the same)."""
    try:
        major = int(gpu.compute_capability.split(".")[0])
    except ValueError:
        major = 0
    return CUBLAS_WORKSPACE_BYTES["hopper" if major >= 9 else "pre_hopper"]


def default_reserve(gpu: GPUSpec) -> int:
    return DESKTOP_RESERVE_BYTES if gpu.display else 0


def safety_margin(gpu: GPUSpec) -> int:
    return int(gpu.memory_bytes * SAFETY_MARGIN_FRACTION)
