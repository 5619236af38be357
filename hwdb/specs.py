"""The two record types of the databases: one GPU, one model architecture.

Units live in field names (bytes, GB/s = 1e9 bytes/s, TFLOP/s = 1e12 FLOP/s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator, as its vendor specifies it and its driver reports it."""

    id: str
    name: str                        # marketing name, e.g. "NVIDIA GeForce RTX 4090"
    vendor: Literal["nvidia", "amd", "apple", "intel"]
    architecture: str                # e.g. "Ada Lovelace"
    compute_capability: str          # CUDA "8.9"; AMD "gfx1100"; Apple GPU family "apple9"
    memory_bytes: int                # usable device memory: total as the driver reports it
    memory_type: str                 # e.g. "GDDR6X", "HBM3", "LPDDR5X"
    bandwidth_gb_s: float            # peak device-memory bandwidth
    fp16_tflops: float               # dense fp16 tensor/matrix throughput, fp32 accumulate
    int8_tops: float                 # dense int8 tensor/matrix throughput
    sm_count: int                    # SMs (NVIDIA), CUs (AMD), GPU cores (Apple)
    host_link: str                   # e.g. "PCIe 4.0 x16", "unified memory"
    host_link_gb_s: float            # practical one-way host->device copy rate (pinned memory)
    display: bool                    # has display outputs: a desktop may hold some of its memory
    source: str                      # where the figures come from
    aliases: tuple[str, ...] = ()    # other names: "rtx4090", "4090", the name nvidia-smi prints
    notes: str = ""
    # Rated boost clock (NVIDIA, AMD; Intel's graphics clock), MHz. None where the vendor publishes none
    # (Apple). Decode's fixed costs (kernel latencies a layer) scale with it (planner.roofline).
    boost_clock_mhz: Optional[float] = None
    # A device-to-device copy rate someone measured, where the memory delivers far less than its rated bandwidth
    # (an integrated GPU on shared LPDDR5X): decode is priced at no more than it (planner.roofline).
    measured_copy_gb_s: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("boost_clock_mhz", "measured_copy_gb_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"field '{name}' must be positive")
        for name in ("memory_bytes", "bandwidth_gb_s", "fp16_tflops", "host_link_gb_s", "sm_count"):
            if getattr(self, name) <= 0:
                raise ValueError(f"field '{name}' must be positive")
        if self.int8_tops < 0:
            raise ValueError("field 'int8_tops' must not be negative")
        if not self.source.strip():
            raise ValueError("field 'source' must name where the figures come from")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer architecture, enough to count every tensor exactly."""

    id: str
    name: str
    family: str                      # llama, mistral, mixtral, qwen2, gemma2, phi3, falcon, ...
    hidden_size: int
    intermediate_size: int           # per expert for MoE models
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_context: int                 # native context length
    source: str
    head_dim: int = 0                # 0: hidden_size // num_heads
    tie_embeddings: bool = False     # the output head reuses the embedding matrix
    mlp: Literal["gated", "plain"] = "gated"     # gated: gate/up/down (SwiGLU, GeGLU); plain: up/down
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"   # layernorm carries a bias vector too
    norms_per_layer: int = 2         # Gemma 2 has 4 (pre and post attention and MLP)
    qkv_bias: bool = False           # Qwen2 has biases on q, k and v
    extra_bias: bool = False         # gpt-oss: o, the router and every expert linear carry biases too
    attn_sinks: bool = False         # gpt-oss: one learned attention-sink logit per head and layer
    fused_qkv: bool = False          # checkpoint stores q, k, v as one tensor (Phi-3, Falcon)
    fused_gate_up: bool = False      # checkpoint stores gate and up as one tensor (Phi-3)
    num_experts: int = 0             # MoE: experts per layer (0: dense)
    experts_per_token: int = 0       # MoE: experts active per token
    shared_experts: int = 0          # MoE: always-active experts, one MLP of shared_experts x intermediate_size
    router_bias: bool = False        # MoE: a bias a router output (DeepSeek's and GLM's e_score_correction_bias)
    dense_layers: int = 0            # MoE: the first N layers are dense MLPs of dense_intermediate_size
    dense_intermediate_size: int = 0
    # Multi-head latent attention (DeepSeek V2/V3): queries through a q_lora_rank bottleneck (0: a plain q),
    # keys and values through a kv_lora_rank latent, which with rope_head_dim rotary dims is all a token caches.
    # head_dim is then the query/key head (no-rope dims + rope_head_dim), v_head_dim the value head.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    rope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int = 0          # attention window of the sliding layers, tokens (0: every layer global)
    # With sliding_window: the last layer of every N attends globally, the others slide (Gemma 2: 2, Gemma 3: 6,
    # as Gemma 3's config.json names it); 0: every layer slides (Mistral 7B v0.1). Engines differ in whether
    # they shrink a sliding layer's cache to its window (planner.targets.llamacpp, .vllm).
    sliding_window_pattern: int = 0
    # Hybrid linear attention (Qwen3-Next, Qwen3.5): the last layer of every linear_attention_interval attends
    # over the cache; the others are Gated DeltaNet layers, which keep a fixed-size recurrent state instead (a
    # convolution window and a key x value matrix per value head) whatever the context.
    linear_attention_interval: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_head_dim: int = 0         # the key and value head width of the linear-attention layers (128 in both)
    linear_conv_kernel: int = 0
    attn_output_gate: bool = False   # q_proj twice as wide: half of it gates the attention output (Qwen3-Next)
    qk_norm: bool = False            # an RMSNorm weight over each query and key head (head_dim each)
    shared_expert_gate: bool = False  # MoE: a sigmoid gate (hidden -> 1) on the shared expert's output
    # MoE: the k chosen experts' softmax probabilities renormalized to sum to 1 (Mixtral; Qwen3-MoE's
    # norm_topk_prob, true in its checkpoints); False: weighed by the probabilities as they are
    moe_renormalize: bool = True
    # Full-attention layers of a sliding-window model with their own geometry (Gemma 4): their KV heads and head
    # width (0: the sliding layers' num_kv_heads / head_dim), and global_k_eq_v: no v projection, the values are
    # the k projection's output (llama.cpp still caches them apart: V is normed but not rotated).
    global_kv_heads: int = 0
    global_head_dim: int = 0
    global_k_eq_v: bool = False
    rope_theta: float = 10000.0
    # Gemma 3: the sliding layers' own RoPE base (10000, unscaled: rope_scaling is the global layers'); 0: rope_theta
    sliding_rope_theta: float = 0.0
    # How Gemma departs from a Llama besides its norms (refengine.arch): the gated MLP's activation ("silu": SwiGLU;
    # "gelu_tanh": GeGLU with GELU's tanh approximation), the width attention divides q.k by the root of
    # (query_pre_attn_scalar; 0: head_dim), and Gemma 2's soft caps: scores, and logits, -> cap * tanh(x / cap).
    activation: Literal["silu", "gelu_tanh"] = "silu"
    query_scale: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    # RoPE scaling, as config.json's rope_scaling names it: "" none, "llama3" (Llama 3.1 on: a factor dividing each
    # pair's frequency, llama.cpp's rope_freqs tensor), "linear" (positions over a factor); others ("yarn",
    # "longrope", "dynamic") are planned but not run by vramwise's engines. The factors come with the weights.
    rope_scaling: str = ""
    rotary_dim: int = 0              # dims of a head RoPE rotates where not all (partial_rotary_factor); 0: all
    norm_eps: float = 1e-5           # RMSNorm / LayerNorm epsilon
    published_params: int = 0        # the published total, checked against our count
    params_source: str = ""
    aliases: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "vocab_size", "max_context", "norms_per_layer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"field '{name}' must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("field 'num_kv_heads' must divide num_heads")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError("hidden_size is not a multiple of num_heads: set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError("field 'experts_per_token' must be in 1..num_experts for an MoE model")
        for name in ("shared_experts", "dense_layers", "dense_intermediate_size", "kv_lora_rank", "q_lora_rank",
                     "rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"field '{name}' must not be negative")
        if self.dense_layers and not self.dense_intermediate_size:
            raise ValueError("field 'dense_intermediate_size' is needed with dense_layers")
        if self.kv_lora_rank and not (self.rope_head_dim and self.v_head_dim):
            raise ValueError("fields 'rope_head_dim' and 'v_head_dim' are needed with kv_lora_rank (MLA)")
        if self.sliding_window < 0 or self.sliding_window_pattern < 0:
            raise ValueError("fields 'sliding_window' and 'sliding_window_pattern' must not be negative")
        linear = ("linear_key_heads", "linear_value_heads", "linear_head_dim", "linear_conv_kernel")
        if self.linear_attention_interval < 0 or any(getattr(self, n) < 0 for n in linear):
            raise ValueError("the linear_* fields must not be negative")
        if self.linear_attention_interval and not all(getattr(self, n) for n in linear):
            raise ValueError(f"fields {', '.join(repr(n) for n in linear)} are needed with linear_attention_interval")
        if self.global_kv_heads < 0 or self.global_head_dim < 0:
            raise ValueError("fields 'global_kv_heads' and 'global_head_dim' must not be negative")
        if self.has_global_geometry and not self.sliding_window_pattern:
            raise ValueError("the global_* fields describe the full-attention layers among sliding ones: "
                             "they need sliding_window and sliding_window_pattern")
        for name in ("sliding_rope_theta", "query_scale", "attn_softcap", "final_softcap"):
            if getattr(self, name) < 0:
                raise ValueError(f"field '{name}' must not be negative")
        if self.query_scale == self.head_dim:        # the default said out loud (Gemma 2 9B's 256): one spelling
            object.__setattr__(self, "query_scale", 0.0)
        if self.global_kv_heads and self.num_heads % self.global_kv_heads:
            raise ValueError("field 'global_kv_heads' must divide num_heads")

    def is_sliding(self, layer: int) -> bool:
        """Whether this layer attends over a sliding window rather than the whole context."""
        n = self.sliding_window_pattern
        return self.sliding_window > 0 and (n == 0 or (layer + 1) % n != 0)

    def is_linear(self, layer: int) -> bool:
        """Whether this layer is a linear-attention (Gated DeltaNet) layer, with a recurrent state and no cache."""
        n = self.linear_attention_interval
        return n > 0 and (layer + 1) % n != 0

    @property
    def has_global_geometry(self) -> bool:
        """Whether the full-attention layers have a geometry of their own (Gemma 4: the global_* fields)."""
        return bool(self.global_kv_heads or self.global_head_dim or self.global_k_eq_v)

    def _global(self, layer: int) -> bool:
        return self.sliding_window_pattern > 0 and not self.is_sliding(layer)

    def kv_heads_at(self, layer: int) -> int:
        """KV heads of this layer: a full-attention layer's own count where the model gives one (Gemma 4)."""
        return self.global_kv_heads if self.global_kv_heads and self._global(layer) else self.num_kv_heads

    def head_dim_at(self, layer: int) -> int:
        """Query/key head width of this layer (Gemma 4's full-attention layers: 512 where the sliding ones have 256)."""
        return self.global_head_dim if self.global_head_dim and self._global(layer) else self.head_dim

    def has_v_at(self, layer: int) -> bool:
        """Whether this layer has a v projection (Gemma 4's full-attention layers take the values from k)."""
        return not (self.global_k_eq_v and self._global(layer))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.dense_layers

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

