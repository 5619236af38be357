"""GGUF storage: ggml type block sizes, llama-quantize's per-tensor type mixes, and exact file bytes.

Sources (described, not copied):
  - block sizes: ggml's type traits, as the `gguf` Python package (llama.cpp's own, pinned in pyproject)
    exposes them in gguf.constants.GGML_QUANT_SIZES: (values per block, bytes per block);
  - the mix each llama-quantize type applies: src/llama-quant.cpp (llama_tensor_get_type_impl and
    tensor_type_fallback) in ggml-org/llama.cpp, read at commit 007dbbf3. 1-D tensors (norms, biases)
    and the MoE router stay F32; the output head gets Q6_K unless the base type is Q8_0 (Q5_K for the
    IQ1/IQ2/IQ3_XXS mixes); attn_v and ffn_down get more bits in the first and last eighth of the layers
    and every third layer between (its `use_more_bits`); a tensor whose row length is not a multiple of
    the type's block falls back to a 32-block type.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional

from hwdb import ModelSpec
from planner.spec import tensors

# ggml type -> (values per block, bytes per block); gguf.constants.GGML_QUANT_SIZES (gguf 0.19)
GGML_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82),
    "IQ3_XXS": (256, 98), "IQ3_S": (256, 110), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
    "MXFP4": (32, 17),                   # an E8M0 scale and 32 4-bit E2M1 values (gpt-oss's experts)
}

# llama-quantize file types -> base tensor type (llama_model_quantize_impl's switch)
FTYPES: dict[str, str] = {
    "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
    "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_1": "Q4_1", "Q4_0": "Q4_0",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K",
    "IQ3_M": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_XS": "IQ3_S", "IQ3_XXS": "IQ3_XXS", "Q2_K": "Q2_K",
    "Q2_K_S": "Q2_K", "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS",
    "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S",
    "MXFP4_MOE": "Q8_0",                 # experts MXFP4, every other weight Q8_0 (the gpt-oss files' type)
}
# the low-bit mixes that need an importance matrix (llama-quantize refuses them without one)
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"})
_LOW_IQ = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
# fallback of a 256-block type for rows not a multiple of 256 (tensor_type_fallback)
_FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
             "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# GGUF header, key/value metadata and tensor-info overhead beside the tensor data (vocabulary strings
# dominate): an estimate, 64 bytes per vocabulary entry plus 64 KiB; a few MB against GB-sized files.
METADATA_BYTES_PER_TOKEN = 64
METADATA_BASE_BYTES = 65536


class GGUFError(ValueError):
    """An unknown GGUF type or llama-quantize file type."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as llama.cpp stores it: GGUF name, category, row length (ne[0]) and element count."""

    name: str
    layer: int
    category: str        # token_embd output attn_q attn_k attn_v attn_qkv attn_output ffn_gate ffn_up ffn_down other
    ncols: int
    numel: int
    quantizable: bool    # llama-quantize quantizes only 2-D/3-D weights, never norms or the router
    expert: bool = False


def type_bytes(ggml_type: str, numel: int, ncols: int) -> int:
    """Exact bytes of a tensor: whole blocks along each row (rows of ncols values)."""
    try:
        block, size = GGML_TYPES[ggml_type]
    except KeyError:
        raise GGUFError(f"unknown ggml type {ggml_type!r} (known: {', '.join(GGML_TYPES)})") from None
    assert ncols % block == 0, "callers apply the fallback first"
    return numel // block * size


# Gated DeltaNet input projections: Qwen3.5's GGUFs name them attn_qkv (which llama-quantize's attn_qkv rules
# then raise, as for a fused attention qkv) and attn_gate; Qwen3-Next's store them fused as ssm_in, no rule.
_GDN_ATTN_QKV_FAMILIES = ("qwen3_5", "qwen3_5_moe")


def _kind_to_category(kind: str, family: str = "") -> str:
    if kind == "gdn_qkv":
        return "attn_qkv" if family in _GDN_ATTN_QKV_FAMILIES else "ssm_in"
    return {"q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
            "q_a": "attn_q_a", "kv_a": "attn_kv_a_mqa",
            "gate": "ffn_gate", "up": "ffn_up", "gate_up": "ffn_up", "down": "ffn_down",
            "gdn_z": "attn_gate", "gdn_ba": "ssm_ba", "gdn_out": "ssm_out", "conv": "ssm_conv1d",
            "embed": "token_embd", "head": "output"}.get(kind, "other")


@lru_cache(maxsize=64)
def gguf_tensors(spec: ModelSpec) -> tuple[GGUFTensor, ...]:
    """The model's tensors under llama.cpp's layout: MoE experts merged into one 3-D tensor per projection."""
    out: list[GGUFTensor] = []
    merged: dict[tuple[int, str], list] = {}
    for t in tensors(spec):
        cat = _kind_to_category(t.kind, spec.family)
        if t.expert:                     # one 3-D tensor a projection (and one 2-D for its biases, gpt-oss)
            key = (t.layer, cat if t.kind != "bias" else _kind_to_category(t.name.split(".")[-2]) + "_bias")
            if key not in merged:
                merged[key] = [t, 0]
                out.append(key)          # placeholder, replaced below in order
            merged[key][1] += t.numel
            continue
        if t.kind == "kv_b":             # MLA: stored as k_b (rows of the no-rope key width) and v_b (of the latent)
            nope, lat = spec.head_dim - spec.rope_head_dim, spec.kv_lora_rank
            out += [GGUFTensor(f"{t.name}.k_b", t.layer, "attn_k_b", nope, spec.num_heads * nope * lat, True),
                    GGUFTensor(f"{t.name}.v_b", t.layer, "attn_v_b", lat, spec.num_heads * spec.v_head_dim * lat, True)]
            continue
        name = "token_embd" if t.kind == "embed" else "output" if t.kind == "head" else t.name
        out.append(GGUFTensor(name, t.layer, cat, t.shape[-1], t.numel, t.quantized or t.kind in ("embed", "head")))
    result = []
    for item in out:
        if isinstance(item, tuple):
            t, numel = merged[item]
            if item[1].endswith("_bias"):            # gpt-oss: the experts' biases, one 2-D F32 tensor a projection
                cat = item[1][:-5]
                name = f"blk.{t.layer}.{cat}_exps.bias"
                result.append(GGUFTensor(name, t.layer, cat, t.shape[-1], numel, False, True))
                continue
            result.append(GGUFTensor(f"blk.{t.layer}.{item[1]}_exps", t.layer, item[1], t.shape[-1], numel, True, True))
        else:
            result.append(item)
    return tuple(result)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mixed_type(spec: ModelSpec, ftype: str, t: GGUFTensor, base: str, i_v: int, n_v: int, imatrix: bool) -> str:
    """The type llama-quantize's mix gives one tensor (its per-category rules, in our words)."""
    gqa, experts, n = spec.num_heads // spec.num_kv_heads, spec.num_experts, spec.num_layers
    big70 = n == 80 and spec.family in ("llama", "qwen2")       # llama.cpp's LLM_TYPE_70B
    cat, i = t.category, t.layer
    if ftype == "MXFP4_MOE":                   # llama-quantize: "MoE tensors -> MXFP4, other tensors -> Q8_0"
        return "MXFP4" if t.expert else "Q8_0"
    if cat == "output" or (cat == "token_embd" and spec.tie_embeddings):
        if spec.family == "falcon" or t.ncols % GGML_TYPES[base][0]:
            return "Q8_0"
        return "Q5_K" if ftype in _LOW_IQ | {"IQ3_XXS"} else (base if base == "Q8_0" else "Q6_K")
    if cat == "token_embd":
        return {"IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "IQ2_S": "IQ3_S",
                "IQ2_M": "IQ3_S", "IQ3_XXS": "IQ3_S"}.get(ftype, base)
    if ftype in _LOW_IQ:
        if cat in ("attn_v", "attn_qkv"):
            return "Q4_K" if gqa >= 4 or experts >= 4 else ("IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K")
        if experts == 8 and cat == "attn_k":
            return "Q4_K"
        if cat == "ffn_down" and i < n // 8:
            return "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
        if cat == "attn_output":
            if experts == 8:
                return "Q5_K"
            return {"IQ1_S": "IQ2_XXS", "IQ1_M": "IQ2_XXS", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}.get(ftype, base)
        return base
    if cat in ("attn_v", "attn_qkv") and not (cat == "attn_qkv" and ftype in ("Q3_K_M", "Q3_K_L", "IQ3_M", "Q4_K_M", "Q5_K_M")):
        new = base
        if ftype == "Q2_K":
            new = "Q4_K" if gqa >= 4 else "Q3_K"
        elif ftype == "Q2_K_S" and gqa >= 4:
            new = "Q4_K"
        elif ftype == "IQ3_XXS":
            new = "Q4_K" if gqa >= 4 else ("IQ3_XXS" if imatrix else "IQ3_S")
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa >= 4:
            new = "Q4_K"
        elif ftype == "IQ3_M":
            new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i_v < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(i_v, n_v):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i_v < 4:
            new = "Q5_K"
        if big70 and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        return "Q8_0" if experts == 8 else new
    if cat == "attn_qkv":
        return {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "IQ3_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}[ftype]
    if cat in ("attn_k", "attn_q"):
        if experts == 8 and cat == "attn_k":
            return "Q8_0"
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, base)
    if cat == "ffn_down":
        return _ffn_down(spec, ftype, base, i, n, imatrix)
    if cat == "attn_output":
        if spec.family == "falcon":
            return "Q4_K" if ftype == "Q3_K_L" else base
        if experts == 8:
            moe_up = {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"}
            return "Q5_K" if ftype in moe_up else base
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ftype, base)
    if cat in ("ffn_gate", "ffn_up") and ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
        return "IQ3_XXS"
    return base


def _ffn_down(spec: ModelSpec, ftype: str, base: str, i: int, n: int, imatrix: bool) -> str:
    falcon = spec.family == "falcon"
    if ftype == "Q2_K":
        return "Q3_K"
    if ftype == "Q2_K_S":
        return "Q4_K" if i < n // 8 else base
    if ftype == "IQ3_XXS" and not imatrix:
        return "Q4_K" if i < n // 8 else "Q3_K"
    if ftype == "Q3_K_M":
        return "Q5_K" if i < n // 16 else ("Q4_K" if not falcon or _more_bits(i, n) else "Q3_K")
    if ftype == "IQ3_M" and (i < n // 8 or (spec.num_experts == 8 and _more_bits(i, n))):
        return "Q4_K"
    if ftype == "Q3_K_L":
        return "Q4_K" if falcon else "Q5_K"
    if ftype == "Q4_K_M":
        if falcon:
            return "Q6_K" if i < n // 16 else ("Q5_K" if _more_bits(i, n) else "Q4_K")
        return "Q6_K" if _more_bits(i, n) else base
    if i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not imatrix:
        return "Q5_K"
    if ftype == "Q5_K_M" and _more_bits(i, n):
        return "Q6_K"
    if ftype == "Q4_K_S" and not falcon and i < n // 8:
        return "Q5_K"
    if ftype in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
        return "Q4_1" if ftype == "Q4_0" else "Q5_1"
    return base


def _fallback(ggml_type: str, ncols: int) -> str:
    if ncols % GGML_TYPES[ggml_type][0] == 0:
        return ggml_type
    new = _FALLBACK.get(ggml_type, "F16")
    return new if ncols % GGML_TYPES[new][0] == 0 else "F16"


def tensor_types(spec: ModelSpec, ftype: str, imatrix: bool = False,
                 overrides: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """GGUF tensor name -> ggml type for a llama-quantize file type; `overrides` maps a category
    (e.g. 'attn_v') to a type, as `llama-quantize --tensor-type attn_v=q6_k` does."""
    if ftype not in FTYPES:
        raise GGUFError(f"unknown llama.cpp file type {ftype!r} (choose from {', '.join(FTYPES)})")
    base = FTYPES[ftype]
    float_file = base in ("F16", "BF16")
    out: dict[str, str] = {}
    n_v = sum(1 for t in gguf_tensors(spec) if t.category in ("attn_v", "attn_qkv"))
    i_v = 0
    for t in gguf_tensors(spec):
        if not t.quantizable:
            out[t.name] = "F32"
            continue
        if float_file:
            out[t.name] = base
            continue
        if overrides and t.category in overrides:
            new = overrides[t.category]
        else:
            new = _mixed_type(spec, ftype, t, base, i_v, n_v, imatrix)
        if t.category in ("attn_v", "attn_qkv"):
            i_v += 1
        out[t.name] = _fallback(new, t.ncols)
    return out


def file_bytes(spec: ModelSpec, types: Mapping[str, str]) -> dict[str, int]:
    """Tensor bytes by tensor name, under the given types."""
    return {t.name: type_bytes(types[t.name], t.numel, t.ncols) for t in gguf_tensors(spec)}


def metadata_bytes(spec: ModelSpec) -> int:
    return METADATA_BASE_BYTES + METADATA_BYTES_PER_TOKEN * spec.vocab_size
