"""Model architectures: the tensor inventory, parameter counts, and specs from config.json or GGUF.

Canonical tensor names (what plans, loaders and engines share):
  embed, head, norm.final,
  layers.{i}.attn.{q,k,v,o,qkv}, layers.{i}.attn.{q,k,v,qkv}.bias,
  layers.{i}.mlp.{gate,up,down,gate_up}, layers.{i}.moe.router, layers.{i}.moe.{e}.{gate,up,down},
  layers.{i}.norm.{n}
Linear shapes are (out_features, in_features), as PyTorch and GGUF store them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from hwdb import Database, HwdbError, ModelSpec


MAX_LAYERS = 10_000    # no published model comes near (Llama 3.1 405B has 126): a larger count is corruption


class ModelSourceError(ValueError):
    """A --model argument that is neither a known name nor a readable config.json / .gguf."""


@dataclass(frozen=True)
class Tensor:
    """One tensor of the model."""

    name: str
    layer: int                   # -1 for embed, head and the final norm
    kind: str                    # q k v o qkv gate up down gate_up router expert norm bias embed head
    shape: tuple[int, ...]       # (out_features, in_features) for linears
    quantized: bool              # a linear whose format the optimizer chooses
    read_fraction: float = 1.0   # share of it read per decoded token (MoE experts: k / E)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @cached_property
    def expert(self) -> bool:
        return is_expert(self.name)


def is_expert(name: str) -> bool:
    """Part of one routed expert (its linears and their biases): layers.{i}.moe.{e}.*"""
    parts = name.split(".")
    return len(parts) > 4 and parts[2] == "moe" and parts[3].isdigit()


def _mla(spec: ModelSpec, i: int) -> list[Tensor]:
    """Multi-head latent attention (DeepSeek V2/V3): the query through its low-rank bottleneck (q_a, its norm, q_b),
    the key/value latent and the shared rotary key (kv_a), its norm, the up-projection to every head's no-rope key
    and value (kv_b), and o."""
    h, heads, r, lat = spec.hidden_size, spec.num_heads, spec.rope_head_dim, spec.kv_lora_rank
    p = f"layers.{i}.attn"
    if spec.q_lora_rank:
        out = [Tensor(f"{p}.q_a", i, "q_a", (spec.q_lora_rank, h), True),
               Tensor(f"{p}.q_a_norm", i, "norm", (1, spec.q_lora_rank), False),
               Tensor(f"{p}.q_b", i, "q", (spec.q_dim, spec.q_lora_rank), True)]
    else:
        out = [Tensor(f"{p}.q", i, "q", (spec.q_dim, h), True)]
    return out + [Tensor(f"{p}.kv_a", i, "kv_a", (lat + r, h), True),
                  Tensor(f"{p}.kv_a_norm", i, "norm", (1, lat), False),
                  Tensor(f"{p}.kv_b", i, "kv_b", (heads * (spec.head_dim - r + spec.v_head_dim), lat), True),
                  Tensor(f"{p}.o", i, "o", (h, heads * spec.v_head_dim), True)]


def _gated_delta(spec: ModelSpec, i: int) -> list[Tensor]:
    """A Gated DeltaNet layer (Qwen3-Next, Qwen3.5), as llama.cpp stores it: the input projection to queries, keys
    and values (qkv: linear_key_heads query and key heads, linear_value_heads value heads) and to the output gate
    (z), the per-value-head beta and alpha projections, the depthwise causal convolution over qkv, the decay
    (A, dt bias), the gated RMSNorm over a value head, and the output projection."""
    h, hd = spec.hidden_size, spec.linear_head_dim
    keys, values = spec.linear_key_heads * hd, spec.linear_value_heads * hd
    conv = 2 * keys + values
    p = f"layers.{i}.gdn"
    return [Tensor(f"{p}.qkv", i, "gdn_qkv", (conv, h), True), Tensor(f"{p}.z", i, "gdn_z", (values, h), True),
            Tensor(f"{p}.ba", i, "gdn_ba", (2 * spec.linear_value_heads, h), True),
            Tensor(f"{p}.conv1d", i, "conv", (conv, spec.linear_conv_kernel), False),
            Tensor(f"{p}.dt_bias", i, "bias", (spec.linear_value_heads,), False),
            Tensor(f"{p}.a_log", i, "bias", (spec.linear_value_heads,), False),
            Tensor(f"{p}.norm", i, "norm", (1, hd), False),
            Tensor(f"{p}.out", i, "gdn_out", (h, values), True)]


def _attention(spec: ModelSpec, i: int) -> list[Tensor]:
    if spec.is_mla:
        return _mla(spec, i)
    if spec.is_linear(i):
        return _gated_delta(spec, i)
    h, hd = spec.hidden_size, spec.head_dim_at(i)
    q, kv = spec.num_heads * hd, spec.kv_heads_at(i) * hd
    p = f"layers.{i}.attn"
    if not spec.has_v_at(i):           # values from the k projection (Gemma 4's full-attention layers)
        out = [Tensor(f"{p}.q", i, "q", (q, h), True), Tensor(f"{p}.k", i, "k", (kv, h), True)]
        bias = [Tensor(f"{p}.{n}.bias", i, "bias", (d,), False) for n, d in (("q", q), ("k", kv))]
    elif spec.attn_output_gate:          # the gate's half of q_proj
        out = [Tensor(f"{p}.q", i, "q", (2 * q, h), True), Tensor(f"{p}.k", i, "k", (kv, h), True),
               Tensor(f"{p}.v", i, "v", (kv, h), True)]
        bias = []
    elif spec.fused_qkv:
        out = [Tensor(f"{p}.qkv", i, "qkv", (q + 2 * kv, h), True)]
        bias = [Tensor(f"{p}.qkv.bias", i, "bias", (q + 2 * kv,), False)]
    else:
        out = [Tensor(f"{p}.q", i, "q", (q, h), True), Tensor(f"{p}.k", i, "k", (kv, h), True),
               Tensor(f"{p}.v", i, "v", (kv, h), True)]
        bias = [Tensor(f"{p}.{n}.bias", i, "bias", (d,), False) for n, d in (("q", q), ("k", kv), ("v", kv))]
    out.append(Tensor(f"{p}.o", i, "o", (h, q), True))
    out += bias if spec.qkv_bias else []
    if spec.qk_norm:
        out += [Tensor(f"{p}.{n}_norm", i, "norm", (1, hd), False) for n in ("q", "k")]
    if spec.extra_bias:
        out.append(Tensor(f"{p}.o.bias", i, "bias", (h,), False))
    if spec.attn_sinks:
        out.append(Tensor(f"{p}.sinks", i, "bias", (spec.num_heads,), False))
    return out


def _mlp(spec: ModelSpec, i: int, prefix: str, read_fraction: float = 1.0, width: int = 0) -> list[Tensor]:
    h, f = spec.hidden_size, width or spec.intermediate_size
    if spec.mlp == "plain":
        shapes = [("up", (f, h)), ("down", (h, f))]
    elif spec.fused_gate_up:
        shapes = [("gate_up", (2 * f, h)), ("down", (h, f))]
    else:
        shapes = [("gate", (f, h)), ("up", (f, h)), ("down", (h, f))]
    out = [Tensor(f"{prefix}.{n}", i, n, s, True, read_fraction) for n, s in shapes]
    if spec.extra_bias and spec.is_moe:
        out += [Tensor(f"{prefix}.{n}.bias", i, "bias", s[:1], False, read_fraction) for n, s in shapes]
    return out


def _layer(spec: ModelSpec, i: int) -> list[Tensor]:
    out = _attention(spec, i)
    if spec.is_moe_layer(i):
        out.append(Tensor(f"layers.{i}.moe.router", i, "router", (spec.num_experts, spec.hidden_size), False))
        if spec.extra_bias or spec.router_bias:
            out.append(Tensor(f"layers.{i}.moe.router.bias", i, "bias", (spec.num_experts,), False))
        share = spec.experts_per_token / spec.num_experts
        for e in range(spec.num_experts):
            out += _mlp(spec, i, f"layers.{i}.moe.{e}", share)
        if spec.shared_experts:          # always active, outside the experts llama.cpp's --n-cpu-moe moves
            out += _mlp(spec, i, f"layers.{i}.shared", 1.0, spec.shared_experts * spec.intermediate_size)
        if spec.shared_expert_gate:
            out.append(Tensor(f"layers.{i}.shared.gate_inp", i, "router", (1, spec.hidden_size), False))
    else:
        out += _mlp(spec, i, f"layers.{i}.mlp", 1.0, spec.dense_intermediate_size if spec.is_moe else 0)
    width = 2 if spec.norm == "layernorm" else 1      # layernorm: weight and bias
    out += [Tensor(f"layers.{i}.norm.{n}", i, "norm", (width, spec.hidden_size), False)
            for n in range(spec.norms_per_layer)]
    return out


@lru_cache(maxsize=64)
def tensors(spec: ModelSpec) -> tuple[Tensor, ...]:
    """Every tensor of the model, in checkpoint order."""
    h, v = spec.hidden_size, spec.vocab_size
    out = [Tensor("embed", -1, "embed", (v, h), False)]
    for i in range(spec.num_layers):
        out += _layer(spec, i)
    width = 2 if spec.norm == "layernorm" else 1
    out.append(Tensor("norm.final", -1, "norm", (width, h), False))
    if not spec.tie_embeddings:
        out.append(Tensor("head", -1, "head", (v, h), False))
    return tuple(out)


def param_count(spec: ModelSpec) -> int:
    """Total parameters, the tied head counted once (as published totals count it)."""
    return sum(t.numel for t in tensors(spec))


def active_param_count(spec: ModelSpec) -> int:
    """Parameters used per token (MoE: only the routed experts), head counted as used."""
    n = sum(t.numel * t.read_fraction for t in tensors(spec))
    if spec.tie_embeddings:
        n += spec.vocab_size * spec.hidden_size
    return int(n)


def layer_linears(spec: ModelSpec) -> tuple[Tensor, ...]:
    """The quantized linears: the optimizer's items."""
    return tuple(t for t in tensors(spec) if t.quantized)


# What vramwise's engines (the reference engine and the CUDA engine) run today: Llama-family decoders, Qwen3's
# per-head q/k norms, Phi-3's fused q/k/v and gate/up linears, Gemma 1 / 2 / 3's departures, and Mixtral's and
# Qwen3-MoE's routed experts (refengine.arch; the k chosen renormalized), whose checkpoints' tensors their name
# tables know exactly. refengine.model.check_supported refuses the other families and fields (a tuple: any of
# those values).
ENGINE_RUNS = {"mlp": "gated", "norm": "rmsnorm", "norms_per_layer": (2, 4), "shared_experts": 0,
               "router_bias": False, "dense_layers": 0, "shared_expert_gate": False,
               "extra_bias": False, "attn_sinks": False, "kv_lora_rank": 0, "rotary_dim": 0, "moe_renormalize": True}
MOE_FAMILIES = ("llama", "mistral", "mixtral", "qwen3", "qwen3_moe", "qwen3moe")   # routed experts: softmax, top-k
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")     # Gemma 4 is not run (per-layer geometry)
ENGINE_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "qwen3moe", "phi3") + GEMMA_FAMILIES
SCALED_ROPE = ("llama3", "linear", "yarn")     # RoPE scalings the engines run, as per-pair frequency factors
ENGINE_ROPE_SCALING = ("",) + SCALED_ROPE


def unsupported_fields(spec: ModelSpec) -> list[tuple[str, Any]]:
    """The fields of this spec the engines do not run, each with the value (or values) they do run."""
    out: list[tuple[str, Any]] = [(field, want) for field, want in ENGINE_RUNS.items()
                                  if getattr(spec, field) not in (want if isinstance(want, tuple) else (want,))]
    if spec.rope_scaling not in ENGINE_ROPE_SCALING:
        out.append(("rope_scaling", ENGINE_ROPE_SCALING))
    if spec.is_moe and spec.family not in MOE_FAMILIES:
        out.append(("num_experts", 0))
    return out


def windowed_layers(spec: ModelSpec, families: tuple[str, ...]) -> list[bool]:
    """Per layer, whether an engine that gives these families' sliding layers a window-sized cache treats it as
    sliding (the engines differ in which families they do it for)."""
    return [spec.family in families and spec.is_sliding(i) for i in range(spec.num_layers)]


def positions_read(spec: ModelSpec, families: tuple[str, ...], depth: float) -> list[float]:
    """Cached positions each layer's attention reads for a token `depth` tokens into the context: all of them, or
    on a windowed layer (windowed_layers) only the window's."""
    return [min(depth, spec.sliding_window) if w else depth for w in windowed_layers(spec, families)]


def engine_gaps(spec: ModelSpec) -> list[str]:
    """Why `vramwise run` cannot run this architecture yet ([] if it can)."""
    gaps = [f"{field}={getattr(spec, field)!r}" for field, _ in unsupported_fields(spec)]
    if spec.family not in ENGINE_FAMILIES:
        gaps.insert(0, f"family {spec.family}")
    return gaps


def architecture_fields(spec: ModelSpec) -> dict[str, Any]:
    """The fields that shape the tensors and the run state (what architecture_digest hashes)."""
    keys = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "vocab_size", "tie_embeddings", "mlp", "norm", "norms_per_layer", "qkv_bias", "fused_qkv",
            "fused_gate_up", "num_experts", "experts_per_token")
    fields = {k: getattr(spec, k) for k in keys}
    newer = ("extra_bias", "attn_sinks", "shared_experts", "router_bias", "dense_layers", "dense_intermediate_size",
             "kv_lora_rank", "q_lora_rank", "rope_head_dim", "v_head_dim", "linear_attention_interval",
             "linear_key_heads", "linear_value_heads", "linear_head_dim", "linear_conv_kernel", "attn_output_gate",
             "qk_norm", "shared_expert_gate", "global_kv_heads", "global_head_dim", "global_k_eq_v", "rope_scaling",
             "rotary_dim", "activation", "query_scale", "attn_softcap", "final_softcap", "sliding_rope_theta",
             "moe_renormalize")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    fields.update({k: getattr(spec, k) for k in newer if getattr(spec, k) != defaults[k]})   # older digests unchanged
    return fields


def architecture_digest(spec: ModelSpec) -> str:
    """A short hash of the fields that shape the tensors: plans made for another shape are refused."""
    import hashlib

    text = json.dumps(architecture_fields(spec), sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def architecture_difference(planned: ModelSpec, found: ModelSpec) -> str:
    """Where two specs' architectures differ, for a one-line refusal: "rope_scaling 'llama3' planned, '' found"."""
    a, b = architecture_fields(planned), architecture_fields(found)
    diffs = [f"{k} {a.get(k, '')!r} planned, {b.get(k, '')!r} found" for k in sorted(set(a) | set(b))
             if a.get(k, "") != b.get(k, "")]
    return "; ".join(diffs[:3]) + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")


# --- specs from files -------------------------------------------------------------------------

# Hugging Face `model_type` -> the quirks its config.json does not spell out.
_HF_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "mixtral": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True},
    "qwen3_moe": {"qk_norm": True},
    "gemma": {"tie_embeddings": True}, "gemma2": {"tie_embeddings": True, "norms_per_layer": 4},
    "gemma3_text": {"tie_embeddings": True, "norms_per_layer": 4, "qk_norm": True},
    "gemma3": {"tie_embeddings": True, "norms_per_layer": 4, "qk_norm": True},
    "phi3": {"fused_qkv": True, "fused_gate_up": True},
    "falcon": {"mlp": "plain", "norm": "layernorm", "fused_qkv": True, "tie_embeddings": True},
    "gpt_oss": {"qkv_bias": True, "extra_bias": True, "attn_sinks": True},
    "deepseek_v2": {}, "deepseek_v3": {}, "glm4_moe": {}, "llama4": {}, "ministral3": {},
    "qwen3_next": {"attn_output_gate": True, "qk_norm": True}, "qwen3_5": {"qk_norm": True},
    "qwen3_5_moe": {"qk_norm": True},
    "gemma4": {"tie_embeddings": True, "norms_per_layer": 4, "qk_norm": True},
    "minimax_m2": {"qk_norm": True},
}
_HYBRID_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


class _MissingKey(KeyError):
    """A config.json key with no default is absent (spec_from_hf_config names the file)."""


def _first(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is None:
        raise _MissingKey(keys[0])
    return default


# Where a config.json names no layer pattern: Gemma 2 alternates (the modeling code's `layer_idx % 2`), Gemma 3
# defaults to Gemma3TextConfig's sliding_window_pattern of 6.
_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6, "gpt_oss": 2}


def _width(cfg: dict, key: str, name: str, default: Any = None) -> int:
    """A layer width from a config.json, which the readers divide by or into: a whole number, positive unless 0 is
    the default (no such layer)."""
    value = _first(cfg, key, default=default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (value == 0 and default != 0):
        raise ModelSourceError(f"{name}: {key} {value!r} is not a layer width (a positive whole number)")
    return value


def _last_of_every(marked: list[bool]) -> int | None:
    """N where exactly the last layer of every N is marked (a layer_types list's global layers), or None."""
    return next((n for n in range(1, len(marked) + 1)
                 if all(m == ((i + 1) % n == 0) for i, m in enumerate(marked))), None)


def _rope_parameters(cfg: dict, layer_type: str = "full_attention") -> Any:
    """transformers 5's rope_parameters, for one layer type where it gives them per type (Gemma 3:
    {"full_attention": {...}, "sliding_attention": {...}})."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    return params


def hf_rope_scaling(cfg: dict) -> dict:
    """config.json's RoPE scaling parameters (rope_scaling, or transformers 5's rope_parameters), {} for none."""
    for params in (cfg.get("rope_scaling"), _rope_parameters(cfg)):
        if isinstance(params, dict) and (params.get("rope_type") or params.get("type") or "default") != "default":
            return params
    return {}


def _rope_kind(cfg: dict, name: str) -> str:
    params = hf_rope_scaling(cfg)
    kind = params.get("rope_type") or params.get("type") or ""
    if not isinstance(kind, str):
        raise ModelSourceError(f"{name}: rope_scaling type {kind!r} is not a name")
    return kind


def _rotary_dim(cfg: dict, hidden: int, heads: int) -> int:
    """The rotated dims of a head under partial_rotary_factor (Phi-4-mini 0.75); 0 when RoPE rotates all."""
    factor = cfg.get("partial_rotary_factor")
    if factor is None:
        factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    head = cfg.get("head_dim") or hidden // heads
    return 0 if not isinstance(factor, (int, float)) or factor >= 1 else int(head * factor)


def _sliding(cfg: dict, family: str, name: str) -> dict[str, int]:
    """sliding_window and sliding_window_pattern from a config.json (ModelSpec's meaning of each)."""
    window = cfg.get("sliding_window") or 0
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ModelSourceError(f"{name}: sliding_window {window!r} is not a token count")
    if not window or cfg.get("use_sliding_window") is False:       # Qwen2/Qwen3 state a window they do not use
        return {"sliding_window": 0, "sliding_window_pattern": 0}
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        slides = [t == "sliding_attention" for t in types]
        if not any(slides):
            return {"sliding_window": 0, "sliding_window_pattern": 0}
        if all(slides):
            return {"sliding_window": window, "sliding_window_pattern": 0}
        n = _last_of_every([not s for s in slides])
        if n is None:
            raise ModelSourceError(f"{name}: layer_types mixes sliding and full attention in an order vramwise "
                                   f"cannot plan (it plans the last of every N layers global)")
        return {"sliding_window": window, "sliding_window_pattern": n}
    pattern = cfg.get("sliding_window_pattern", _SLIDING_PATTERN.get(family, 0))
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 0:
        raise ModelSourceError(f"{name}: sliding_window_pattern {pattern!r} is not a layer count")
    return {"sliding_window": window, "sliding_window_pattern": pattern}


def _shared_moe(cfg: dict, family: str, name: str) -> dict[str, Any]:
    """DeepSeek V2/V3 and GLM-4.5's MoE: routed experts of moe_intermediate_size beside shared ones, after
    first_k_dense_replace dense layers of intermediate_size; DeepSeek's multi-head latent attention."""
    if cfg.get("moe_layer_freq", 1) != 1:
        raise ModelSourceError(f"{name}: moe_layer_freq {cfg['moe_layer_freq']} (MoE every few layers) is not supported")
    out: dict[str, Any] = dict(
        num_experts=_first(cfg, "n_routed_experts"), intermediate_size=_first(cfg, "moe_intermediate_size"),
        dense_intermediate_size=_first(cfg, "intermediate_size"),
        dense_layers=int(cfg.get("first_k_dense_replace") or 0),
        shared_experts=int(cfg.get("n_shared_experts") or 0),
        # the noaux_tc router (DeepSeek V3, GLM-4.5) adds a learned bias, e_score_correction_bias, to its scores
        router_bias=cfg.get("topk_method") == "noaux_tc" or family == "glm4_moe")
    if family == "glm4_moe":
        out["qkv_bias"] = bool(cfg.get("attention_bias", False))
        out["qk_norm"] = bool(cfg.get("use_qk_norm", False))
    else:
        rope, nope = _first(cfg, "qk_rope_head_dim"), _first(cfg, "qk_nope_head_dim")
        out.update(kv_lora_rank=_first(cfg, "kv_lora_rank"), q_lora_rank=int(cfg.get("q_lora_rank") or 0),
                   rope_head_dim=rope, v_head_dim=_first(cfg, "v_head_dim"), head_dim=nope + rope)
    return out


def _llama4_text(cfg: dict, name: str) -> dict:
    """Llama 4's language model as the other families spell it: a shared expert beside the routed ones in every
    layer, and chunked attention (attention_chunk_size) on the layers that use RoPE, the others global
    (no_rope_layers: 1 where a layer uses RoPE), planned as a sliding window of the chunk size."""
    text = {**cfg.get("text_config", {}), "model_type": "llama4"} if isinstance(cfg.get("text_config"), dict) else cfg
    if text.get("interleave_moe_layer_step", 1) != 1:
        raise ModelSourceError(f"{name}: interleave_moe_layer_step {text['interleave_moe_layer_step']} (dense layers "
                               f"between the MoE ones, Llama 4 Maverick) is not supported")
    out = {**text, "model_type": "llama4", "shared_experts": 1}
    chunk, rope = text.get("attention_chunk_size"), text.get("no_rope_layers")
    if chunk:
        out["sliding_window"] = chunk
        if isinstance(rope, list) and rope:
            out["layer_types"] = ["sliding_attention" if r else "full_attention" for r in rope]
    return out


def _hybrid(cfg: dict, family: str, name: str) -> dict[str, Any]:
    """Qwen3-Next and Qwen3.5: Gated DeltaNet layers with full attention in the last of every
    full_attention_interval (or as layer_types lists them), its q_proj doubled by the output gate; Qwen3-Next and
    Qwen3.5-MoE's experts of moe_intermediate_size beside a gated shared expert in every layer."""
    keys, values = _first(cfg, "linear_key_head_dim"), _first(cfg, "linear_value_head_dim")
    if keys != values:
        raise ModelSourceError(f"{name}: linear_key_head_dim {keys} differs from linear_value_head_dim {values}, "
                               f"which vramwise does not plan")
    interval = cfg.get("full_attention_interval", 4)
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        interval = _last_of_every([t == "full_attention" for t in types])
        if interval is None:
            raise ModelSourceError(f"{name}: layer_types mixes linear and full attention in an order vramwise cannot "
                                   f"plan (it plans the last of every N layers full)")
    out: dict[str, Any] = dict(
        linear_attention_interval=interval, linear_head_dim=keys,
        linear_key_heads=_first(cfg, "linear_num_key_heads"), linear_value_heads=_first(cfg, "linear_num_value_heads"),
        linear_conv_kernel=_first(cfg, "linear_conv_kernel_dim"),
        attn_output_gate=bool(cfg.get("attn_output_gate", family == "qwen3_next")))
    if family != "qwen3_5":                          # the MoE ones: experts in every layer, a gated shared expert
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ModelSourceError(f"{name}: dense layers among the expert ones (mlp_only_layers, "
                                   f"decoder_sparse_step) are not supported")
        width = _width(cfg, "moe_intermediate_size", name)
        shared = _width(cfg, "shared_expert_intermediate_size", name, default=0)
        if shared % width:
            raise ModelSourceError(f"{name}: shared_expert_intermediate_size {shared} is not a multiple of "
                                   f"moe_intermediate_size {width}")
        out.update(intermediate_size=width, shared_experts=shared // width, shared_expert_gate=bool(shared))
    return out


def _gemma4(cfg: dict, name: str) -> dict[str, Any]:
    """Gemma 4's text model: full-attention layers with their own head width (global_head_dim, 512) and KV heads
    (num_global_key_value_heads), values from the k projection (attention_k_eq_v); with enable_moe_block, every
    layer runs a dense MLP of intermediate_size beside top_k_experts of num_experts routed experts of
    moe_intermediate_size, each branch with its own norms (7 a layer)."""
    if cfg.get("num_kv_shared_layers") or cfg.get("hidden_size_per_layer_input"):
        raise ModelSourceError(f"{name}: Gemma 4 with per-layer embeddings or KV shared across layers (E2B, E4B) "
                               f"is not supported; the 31B and 26B-A4B are")
    out: dict[str, Any] = dict(head_dim=cfg.get("head_dim") or 256, global_head_dim=cfg.get("global_head_dim") or 512,
                               global_k_eq_v=bool(cfg.get("attention_k_eq_v", False)))
    if cfg.get("num_global_key_value_heads"):
        out["global_kv_heads"] = cfg["num_global_key_value_heads"]
    if cfg.get("enable_moe_block"):
        width, dense = _width(cfg, "moe_intermediate_size", name), _width(cfg, "intermediate_size", name)
        if dense % width:
            raise ModelSourceError(f"{name}: intermediate_size {dense} (the dense MLP beside the experts) is not a "
                                   f"multiple of moe_intermediate_size {width}")
        out.update(intermediate_size=width, shared_experts=dense // width, norms_per_layer=7,
                   num_experts=_first(cfg, "num_experts"), experts_per_token=_first(cfg, "top_k_experts"))
    return out


def spec_from_hf_config(cfg: dict, name: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json mapping."""
    try:
        return _spec_from_hf_config(cfg, name)
    except _MissingKey as exc:
        raise ModelSourceError(f"{name}: config.json lacks '{exc.args[0]}' (copy the model's own config.json "
                               f"from its hub page)") from None


def _gemma(cfg: dict, family: str, name: str) -> dict[str, Any]:
    """What a Gemma config.json says beyond a Llama's: GeGLU (every Gemma's modeling code uses GELU's tanh form,
    whatever hidden_act says), query_pre_attn_scalar, Gemma 2's soft caps, Gemma 3's local RoPE base."""
    out: dict[str, Any] = {"activation": "gelu_tanh"}
    # absent keys: transformers' Gemma2Config / Gemma3TextConfig defaults (Gemma 1 has none of them)
    defaults = {"gemma2": (256.0, 50.0, 30.0), "gemma": (None, None, None)}.get(family, (256.0, None, None))
    keys = (("query_scale", "query_pre_attn_scalar"), ("attn_softcap", "attn_logit_softcapping"),
            ("final_softcap", "final_logit_softcapping"))
    for (field, key), default in zip(keys, defaults):
        value = cfg.get(key, default)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ModelSourceError(f"{name}: {key} {value!r} is not a non-negative number")
            out[field] = float(value)
    if family in ("gemma3", "gemma3_text"):
        local = cfg.get("rope_local_base_freq") or (_rope_parameters(cfg, "sliding_attention") or {}).get("rope_theta")
        out["sliding_rope_theta"] = float(local or 10000.0)        # Gemma3TextConfig's default
    return out


def _spec_from_hf_config(cfg: dict, name: str) -> ModelSpec:
    family = cfg.get("model_type")
    if family == "gemma4_text":
        family = "gemma4"
    if family == "kimi_k2":                      # Kimi K2: DeepSeek-V3's architecture (DeepseekV3ForCausalLM)
        family = "deepseek_v3"
    if family in ("gemma3", "gemma4", "qwen3_5", "qwen3_5_moe") and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": family}       # image-text checkpoint: plan the language model
    if family in ("llama4", "llama4_text"):
        cfg, family = _llama4_text(cfg, name), "llama4"
    if family == "mistral3" and isinstance(cfg.get("text_config"), dict):     # Mistral Small 3.x, Ministral 3
        family = cfg["text_config"].get("model_type") or "mistral"
        cfg = {**cfg["text_config"], "model_type": family}
    if family not in _HF_FAMILIES:
        raise ModelSourceError(f"{name}: model_type {family!r} is not supported "
                               f"(supported: {', '.join(sorted(_HF_FAMILIES))})")
    quirks = dict(_HF_FAMILIES[family])
    hidden = _first(cfg, "hidden_size", "n_embd")
    heads = _first(cfg, "num_attention_heads", "n_head")
    args: dict[str, Any] = dict(
        id=Path(name).stem.lower() or "custom", name=name, family=family, hidden_size=hidden,
        intermediate_size=_first(cfg, "intermediate_size", "ffn_hidden_size", default=4 * hidden),
        num_layers=_first(cfg, "num_hidden_layers", "n_layer"), num_heads=heads,
        num_kv_heads=_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads),
        vocab_size=_first(cfg, "vocab_size"),
        max_context=_first(cfg, "max_position_embeddings", default=2048),
        head_dim=cfg.get("head_dim") or 0,
        rope_theta=float(cfg.get("rope_theta") or (_rope_parameters(cfg) or {}).get("rope_theta") or 10000.0),
        norm_eps=float(cfg.get("rms_norm_eps") or cfg.get("layer_norm_epsilon") or 1e-5),
        num_experts=cfg.get("num_local_experts") or cfg.get("num_experts") or 0,
        experts_per_token=cfg.get("num_experts_per_tok") or 0,
        rope_scaling=_rope_kind(cfg, name), rotary_dim=_rotary_dim(cfg, hidden, heads),
        source=f"config.json ({name})", **_sliding(cfg, family, name))
    if family == "falcon":
        if not cfg.get("new_decoder_architecture", False):
            quirks.update(norms_per_layer=1)     # parallel attention with one shared layernorm
            if not cfg.get("multi_query", True):
                args["num_kv_heads"] = heads
            elif args["num_kv_heads"] == heads:
                args["num_kv_heads"] = 1
    if family == "qwen3_moe":                  # intermediate_size is a dense layer's; the experts are narrower
        args["intermediate_size"] = _first(cfg, "moe_intermediate_size")
        # transformers' Qwen3MoeConfig leaves norm_topk_prob false when a config.json does not say
        args["moe_renormalize"] = bool(cfg.get("norm_topk_prob", False))
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ModelSourceError(f"{name}: Qwen3-MoE with dense layers among the expert ones (mlp_only_layers, "
                                   f"decoder_sparse_step) is not supported")
    if family in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        args.update(_shared_moe(cfg, family, name))
    if family == "llama4":
        args["shared_experts"] = 1
    if family == "minimax_m2":
        args["router_bias"] = bool(cfg.get("use_routing_bias", True))
    if family in _HYBRID_FAMILIES:
        args.update(_hybrid(cfg, family, name))
    if family == "gemma4":
        gemma = _gemma4(cfg, name)
        quirks["norms_per_layer"] = gemma.pop("norms_per_layer", quirks["norms_per_layer"])
        args.update(gemma)
    if family in GEMMA_FAMILIES:
        args.update(_gemma(cfg, family, name))
    if "tie_word_embeddings" in cfg:
        quirks["tie_embeddings"] = bool(cfg["tie_word_embeddings"])
    args.update(quirks)
    try:
        return ModelSpec(**args)
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(f"{name}: {exc}") from None


_GGUF_ARCHS = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"qk_norm": True}, "qwen3moe": {"qk_norm": True},
               "gemma": {"activation": "gelu_tanh"},
               "gemma2": {"norms_per_layer": 4, "activation": "gelu_tanh"},
               "gemma3": {"norms_per_layer": 4, "qk_norm": True, "activation": "gelu_tanh"},
               "phi3": {"fused_qkv": True, "fused_gate_up": True},
               "falcon": {"mlp": "plain", "norm": "layernorm", "fused_qkv": True},
               "gpt-oss": {"family": "gpt_oss", "extra_bias": True, "attn_sinks": True},
               "deepseek2": {"family": "deepseek_v3"}, "glm4moe": {"family": "glm4_moe"}, "llama4": {},
               "qwen3next": {"family": "qwen3_next"}, "qwen35": {"family": "qwen3_5"},
               "qwen35moe": {"family": "qwen3_5_moe"}, "gemma4": {"qk_norm": True},
               "minimax-m2": {"family": "minimax_m2", "qk_norm": True, "router_bias": True}}
# llama.cpp's load_hparams for LLM_ARCH_LLAMA4 sets chunked attention itself (n_swa 8192, three chunked layers to
# one global): the GGUF carries neither.
_LLAMA4_CHUNK, _LLAMA4_PATTERN = 8192, 4


def spec_from_gguf(path: Path, reader: Any = None) -> ModelSpec:
    """A ModelSpec from a GGUF file's metadata and tensor list (no tensor data is read).

    Pass an open gguf.GGUFReader to avoid parsing the file twice (parsing a vocabulary takes seconds)."""
    if reader is None:
        try:
            from gguf import GGUFReader  # llama.cpp's own reader (see pyproject)

            reader = GGUFReader(str(path), "r")
        except (ValueError, OSError, KeyError, IndexError, EOFError) as exc:
            raise ModelSourceError(f"{path}: not a readable GGUF file, truncated or corrupt ({exc}); "
                                   "re-download it") from None

    def meta(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise ModelSourceError(f"{path}: GGUF metadata lacks '{key}'")
            return default
        try:
            return f.contents()
        except UnicodeDecodeError as exc:
            raise ModelSourceError(f"{path}: GGUF metadata {key!r} holds a string that is not UTF-8 (byte "
                                   f"{exc.start}: {exc.reason}); the file is corrupt, re-download it") from None

    arch = meta("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ModelSourceError(f"{path}: GGUF architecture {arch!r} is not supported "
                               f"(supported: {', '.join(sorted(_GGUF_ARCHS))})")
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = meta(f"{arch}.vocab_size", len(tokens.data) if tokens is not None else 0)
    heads = int(meta(f"{arch}.attention.head_count"))
    kv = meta(f"{arch}.attention.head_count_kv", heads)
    kv_heads = None                                                         # per layer (Gemma 4)
    if isinstance(kv, list):
        if not kv or len(kv) != meta(f"{arch}.block_count") or not all(isinstance(k, int) for k in kv):
            raise ModelSourceError(f"{path}: attention.head_count_kv is not one count a layer for block_count's "
                                   f"{meta(f'{arch}.block_count')}; the metadata is corrupt, re-download the file")
        kv_heads, kv = kv, kv[0]
    args: dict[str, Any] = dict(
        id=path.stem.lower(), name=str(meta("general.name", path.stem)), family=arch,
        hidden_size=int(meta(f"{arch}.embedding_length")),
        intermediate_size=int(meta(f"{arch}.expert_feed_forward_length", 0)
                              or _scalar(meta(f"{arch}.feed_forward_length"))),
        num_layers=int(meta(f"{arch}.block_count")), num_heads=heads,
        num_kv_heads=int(kv), vocab_size=int(vocab),
        max_context=int(meta(f"{arch}.context_length", 2048)),
        head_dim=int(meta(f"{arch}.attention.key_length", 0)),
        rope_theta=float(meta(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 0.0)
                       or meta(f"{arch}.attention.layer_norm_epsilon", 1e-5)),
        num_experts=int(meta(f"{arch}.expert_count", 0)),
        experts_per_token=int(meta(f"{arch}.expert_used_count", 0)),
        tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
        # llama.cpp's converter writes Llama 3.1's scaling as per-pair factors (rope_freqs), others by name
        rope_scaling=("llama3" if "rope_freqs.weight" in names else "longrope" if "rope_factors_long.weight" in names
                      else str(meta(f"{arch}.rope.scaling.type", "none"))),
        source=f"GGUF metadata ({path.name})")
    if args["rope_scaling"] == "none":
        args["rope_scaling"] = ""
    rotary = int(meta(f"{arch}.rope.dimension_count", 0))
    if 0 < rotary < (args["head_dim"] or args["hidden_size"] // heads):
        args["rotary_dim"] = rotary
    if arch in ("deepseek2", "glm4moe"):
        args.update(_gguf_shared_moe(meta, arch, names, path, args))
    if arch in ("qwen3next", "qwen35", "qwen35moe"):
        args.update(_gguf_hybrid(meta, arch, names, args))
    if arch == "gemma4":
        args.update(_gguf_gemma4(meta, arch, names, path, args, kv_heads))
    if arch == "llama4":
        step = int(meta(f"{arch}.interleave_moe_layer_step", 1))
        if step != 1:
            raise ModelSourceError(f"{path}: interleave_moe_layer_step {step} (dense layers between the MoE ones, "
                                   f"Llama 4 Maverick) is not supported")
        args.update(shared_experts=1 if "blk.0.ffn_gate_shexp.weight" in names else 0,
                    sliding_window=_LLAMA4_CHUNK, sliding_window_pattern=_LLAMA4_PATTERN)
    family = _GGUF_ARCHS[arch].get("family", arch)
    if family in _SLIDING_PATTERN:      # llama.cpp's own layer pattern for these architectures (load_hparams)
        args.update(sliding_window=int(meta(f"{arch}.attention.sliding_window", 0)),
                    sliding_window_pattern=_SLIDING_PATTERN[family])
    if arch in ("gemma2", "gemma3"):
        args.update(_gguf_gemma(meta, arch, args))
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors
              if t.name.startswith("blk.") and t.name.split(".")[1].isdigit()}
    # corrupt metadata: refuse before anything is sized per layer (a file of metadata alone has no blocks)
    if (blocks and args["num_layers"] > len(blocks)) or args["num_layers"] > MAX_LAYERS:
        raise ModelSourceError(f"{path}: the metadata says {args['num_layers']} layers but the file's tensors hold "
                               f"{len(blocks)}; the file is incomplete or its metadata corrupt, re-download it")
    args.update(_GGUF_ARCHS[arch])
    if arch == "falcon" and "blk.0.attn_norm_2.weight" not in names:
        args["norms_per_layer"] = 1          # Falcon 7B/40B layout: one layernorm shared by attention and MLP
    try:
        return ModelSpec(**args)
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(f"{path}: {exc}") from None


# llama.cpp's load_hparams: a Gemma 2 / 3 of the 27B's layer count divides q.k by sqrt(hidden / heads), others
# by sqrt(head_dim) (the GGUF carries no query_pre_attn_scalar); Gemma 3's sliding layers use RoPE base 10000.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gguf_gemma(meta: Any, arch: str, args: dict) -> dict[str, Any]:
    caps = (50.0, 30.0) if arch == "gemma2" else (0.0, 0.0)       # llama.cpp's defaults where the keys are absent
    out: dict[str, Any] = {"attn_softcap": float(meta(f"{arch}.attn_logit_softcapping", caps[0])),
                           "final_softcap": float(meta(f"{arch}.final_logit_softcapping", caps[1]))}
    if arch == "gemma3":
        out["attn_softcap"] = 0.0                       # llama.cpp's gemma3 graph caps no attention scores
        if args["sliding_window"]:
            out["sliding_rope_theta"] = 10000.0
    if args["num_layers"] == _GEMMA_27B_LAYERS[arch]:
        out["query_scale"] = float(args["hidden_size"] // args["num_heads"])
    return out


def _scalar(value: Any) -> Any:
    """A GGUF key some architectures write per layer (an array): its first layer's value."""
    return value[0] if isinstance(value, list) and value else value


def _gguf_gemma4(meta: Any, arch: str, names: set[str], path: Path, args: dict,
                 kv_heads: list[int] | None) -> dict[str, Any]:
    """llama.cpp's gemma4 GGUF: a per-layer sliding_window_pattern (true: sliding) and head_count_kv, the sliding
    layers' head width in key_length_swa and the full ones' in key_length, no attn_v in a full layer whose values
    come from k; the MoE model's dense MLP (feed_forward_length) beside experts of expert_feed_forward_length."""
    if meta(f"{arch}.embedding_length_per_layer_input", 0) or meta(f"{arch}.attention.shared_kv_layers", 0):
        raise ModelSourceError(f"{path}: Gemma 4 with per-layer embeddings or KV shared across layers (E2B, E4B) is "
                               f"not supported; the 31B and 26B-A4B are")
    slides = [bool(x) for x in meta(f"{arch}.attention.sliding_window_pattern")]
    every = _last_of_every([not x for x in slides])
    if every is None or len(slides) != args["num_layers"]:
        raise ModelSourceError(f"{path}: sliding_window_pattern mixes sliding and full attention in an order vramwise "
                               f"cannot plan (it plans the last of every N layers global)")
    full = every - 1
    out: dict[str, Any] = dict(
        sliding_window=int(meta(f"{arch}.attention.sliding_window")), sliding_window_pattern=every,
        head_dim=int(meta(f"{arch}.attention.key_length_swa")),
        global_head_dim=int(meta(f"{arch}.attention.key_length")),
        global_k_eq_v=f"blk.{full}.attn_v.weight" not in names, norms_per_layer=4, tie_embeddings=True)
    if kv_heads:
        out["global_kv_heads"] = kv_heads[full]
    if args["num_experts"]:
        dense = int(_scalar(meta(f"{arch}.feed_forward_length")))
        if dense % args["intermediate_size"]:
            raise ModelSourceError(f"{path}: feed_forward_length {dense} is not a multiple of the experts' "
                                   f"{args['intermediate_size']}")
        out.update(shared_experts=dense // args["intermediate_size"], norms_per_layer=7)
    return out


def _gguf_shared_moe(meta: Any, arch: str, names: set[str], path: Path, args: dict) -> dict[str, Any]:
    """DeepSeek (deepseek2) and GLM-4.5 (glm4moe) GGUFs: leading dense layers, shared experts, and DeepSeek's MLA
    as llama.cpp's converter writes it (one KV head of key_length = latent + rope; the per-head widths under
    key_length_mla / value_length_mla). GLM's block_count counts its multi-token-prediction layer, which llama.cpp
    loads only for drafting: it is left out."""
    dense = int(meta(f"{arch}.leading_dense_block_count", 0))
    out: dict[str, Any] = dict(
        dense_layers=dense, dense_intermediate_size=int(meta(f"{arch}.feed_forward_length")),
        shared_experts=int(meta(f"{arch}.expert_shared_count", 0)),
        router_bias=f"blk.{dense}.exp_probs_b.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
        num_layers=args["num_layers"] - int(meta(f"{arch}.nextn_predict_layers", 0)))
    if arch == "deepseek2":
        mla = int(meta(f"{arch}.attention.key_length_mla", 0))
        if not mla:
            raise ModelSourceError(f"{path}: a DeepSeek GGUF converted before llama.cpp's MLA support (no "
                                   f"key_length_mla): llama.cpp caches 24576 + 16384 values a layer for it, which "
                                   f"vramwise does not plan; use a newer conversion or the model's config.json")
        rope = int(meta(f"{arch}.rope.dimension_count"))
        out.update(num_kv_heads=args["num_heads"], head_dim=mla, rope_head_dim=rope,
                   v_head_dim=int(meta(f"{arch}.attention.value_length_mla")),
                   kv_lora_rank=int(meta(f"{arch}.attention.kv_lora_rank")),
                   q_lora_rank=int(meta(f"{arch}.attention.q_lora_rank", 0)))
    return out


def _gguf_hybrid(meta: Any, arch: str, names: set[str], args: dict) -> dict[str, Any]:
    """Qwen3-Next and Qwen3.5 GGUFs (llama.cpp's qwen3next, qwen35, qwen35moe): the linear-attention widths under
    the ssm.* keys (state_size the head width, group_count the key heads, time_step_rank the value heads), full
    attention in the last of every full_attention_interval layers, the gated shared expert's width; a
    multi-token-prediction layer some files carry (nextn_predict_layers) is left out, as llama.cpp decodes
    without it."""
    shared = int(meta(f"{arch}.expert_shared_feed_forward_length", 0))
    out: dict[str, Any] = dict(
        linear_attention_interval=int(meta(f"{arch}.full_attention_interval", 4)),
        linear_head_dim=int(meta(f"{arch}.ssm.state_size")), linear_key_heads=int(meta(f"{arch}.ssm.group_count")),
        linear_value_heads=int(meta(f"{arch}.ssm.time_step_rank")),
        linear_conv_kernel=int(meta(f"{arch}.ssm.conv_kernel")), attn_output_gate=True, qk_norm=True,
        num_layers=args["num_layers"] - int(meta(f"{arch}.nextn_predict_layers", 0)))
    if shared and args["intermediate_size"]:
        out.update(shared_experts=shared // args["intermediate_size"],
                   shared_expert_gate="blk.0.ffn_gate_inp_shexp.weight" in names)
    return out


def resolve_model(arg: str, db: Database) -> ModelSpec:
    """--model: a database name, a config.json (or a folder holding one), or a .gguf file."""
    path = Path(arg)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"{path}: GGUF file not found")
        return spec_from_gguf(path)
    if path.suffix.lower() == ".json":
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelSourceError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelSourceError(f"{path}: not a readable JSON config ({exc})") from None
        if not isinstance(cfg, dict):
            raise ModelSourceError(f"{path}: a config.json must hold a JSON object")
        return spec_from_hf_config(cfg, str(path))
    return db.find_model(arg)


__all__ = ["ModelSourceError", "Tensor", "active_param_count", "architecture_digest", "layer_linears",
           "param_count", "resolve_model", "spec_from_gguf", "spec_from_hf_config", "tensors", "HwdbError"]
