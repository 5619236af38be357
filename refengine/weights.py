"""Weight loading: a GGUF file (llama.cpp) or a Hugging Face safetensors checkpoint -> canonical tensors.

Canonical names are planner/spec.py's (embed, head, norm.final, layers.{i}.attn.q, ...), so the loader,
the planner and the engines share one inventory. Loading reads headers only: every tensor stays on disk,
memory-mapped, until `TensorRecord.numpy()` dequantizes it, so an engine can materialize one layer at a
time (layer streaming). Shapes are PyTorch's: linears (out_features, in_features), norms (hidden,).

Norm order, for architectures with more than two norms per layer: norm.0 before attention, norm.1 before
the MLP, norm.2 after attention, norm.3 after the MLP (Gemma 2). A layernorm's bias is `<norm>.bias`.

RoPE layout (`Checkpoint.rope_layout`): llama.cpp's converter permutes the q and k rows of llama-type
models so that each rotated pair is adjacent (x[2j], x[2j+1]), the layout of ggml's "normal" RoPE;
Hugging Face rotates x[j] with x[j + head_dim/2] (rotate_half), as does ggml's "neox" RoPE, which the
converter uses unpermuted for Qwen 2, Phi-3, Gemma 2 and Falcon (llama.cpp `llama_model_rope_type`).
`rope_rows_to_halves` / `rope_rows_to_interleaved` convert between the two.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Union

import numpy as np

from hwdb import ModelSpec
from planner.spec import (GEMMA_FAMILIES, SCALED_ROPE, ModelSourceError, hf_rope_scaling, spec_from_gguf,
                          spec_from_hf_config, tensors as inventory)
from refengine.errors import WeightsError, one_line

ROPE_INTERLEAVED = "gguf-interleaved"     # pairs (x[2j], x[2j+1]): llama.cpp-permuted q/k rows
ROPE_HALVES = "hf-halves"                 # pairs (x[j], x[j + d/2]): Hugging Face rotate_half

# File tensor name -> canonical name; None drops the tensor. {i} is the layer, {e} the expert; a target
# with {e} whose source has none is a stacked (experts, out, in) tensor, split along its first axis.
GGUF_NAMES: dict[str, Optional[str]] = {
    "token_embd.weight": "embed",
    "output.weight": "head",
    "output_norm.weight": "norm.final",
    "output_norm.bias": "norm.final.bias",
    "rope_freqs.weight": None,            # Llama 3.1 RoPE scaling factors: Checkpoint.rope_factors
    "rope_factors_long.weight": None,     # Phi-3 LongRoPE factors: likewise
    "rope_factors_short.weight": None,
    "blk.{i}.attn_q.weight": "layers.{i}.attn.q",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.k",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.v",
    "blk.{i}.attn_qkv.weight": "layers.{i}.attn.qkv",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.o",
    "blk.{i}.attn_q.bias": "layers.{i}.attn.q.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.attn.k.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attn.v.bias",
    "blk.{i}.attn_qkv.bias": "layers.{i}.attn.qkv.bias",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm",    # Qwen3: an RMSNorm over each head
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down",
    "blk.{i}.attn_norm.weight": "layers.{i}.norm.0",
    "blk.{i}.attn_norm.bias": "layers.{i}.norm.0.bias",
    "blk.{i}.ffn_norm.weight": "layers.{i}.norm.1",
    "blk.{i}.attn_norm_2.weight": "layers.{i}.norm.1",        # Falcon 40B: the MLP's own layernorm
    "blk.{i}.attn_norm_2.bias": "layers.{i}.norm.1.bias",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.norm.2",  # Gemma 2
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.norm.3",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.moe.router",
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.moe.{e}.gate",
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.moe.{e}.up",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.moe.{e}.down",
    "blk.{i}.ffn_gate.{e}.weight": "layers.{i}.moe.{e}.gate",  # early Mixtral GGUFs: one tensor per expert
    "blk.{i}.ffn_up.{e}.weight": "layers.{i}.moe.{e}.up",
    "blk.{i}.ffn_down.{e}.weight": "layers.{i}.moe.{e}.down",
}
GGUF_FUSED_GATE_UP = {"blk.{i}.ffn_up.weight": "layers.{i}.mlp.gate_up"}   # Phi-3 stores gate;up as ffn_up

HF_NAMES: dict[str, Optional[str]] = {
    "model.embed_tokens.weight": "embed",
    "lm_head.weight": "head",
    "model.norm.weight": "norm.final",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v",
    "model.layers.{i}.self_attn.qkv_proj.weight": "layers.{i}.attn.qkv",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.o",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm",
    "model.layers.{i}.self_attn.rotary_emb.inv_freq": None,   # a buffer old checkpoints saved: recomputed
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down",
    "model.layers.{i}.mlp.gate_up_proj.weight": "layers.{i}.mlp.gate_up",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.norm.0",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.norm.1",
    "model.layers.{i}.block_sparse_moe.gate.weight": "layers.{i}.moe.router",
    "model.layers.{i}.mlp.gate.weight": "layers.{i}.moe.router",                 # Qwen3-MoE
    "model.layers.{i}.mlp.experts.{e}.gate_proj.weight": "layers.{i}.moe.{e}.gate",
    "model.layers.{i}.mlp.experts.{e}.up_proj.weight": "layers.{i}.moe.{e}.up",
    "model.layers.{i}.mlp.experts.{e}.down_proj.weight": "layers.{i}.moe.{e}.down",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": "layers.{i}.moe.{e}.gate",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight": "layers.{i}.moe.{e}.up",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight": "layers.{i}.moe.{e}.down",
}

# Gemma 2 / 3 norm after attention as well as before the MLP: their post_attention_layernorm is not a Llama's.
HF_GEMMA_NAMES: dict[str, Optional[str]] = {
    **HF_NAMES,
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.norm.2",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.norm.1",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.norm.3",
}
# An image-text checkpoint's language model (Gemma 3 4B and up): its names under these prefixes, as a text-only
# checkpoint's under "model."; the vision encoder and projector are not planned or run.
HF_LANGUAGE_PREFIXES = ("language_model.model.", "model.language_model.")
HF_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

# GGUF architecture -> the q/k row layout its converter wrote (llama.cpp llama_model_rope_type: NORM / NEOX).
GGUF_ROPE_LAYOUT = {"llama": ROPE_INTERLEAVED, "mistral": ROPE_INTERLEAVED, "qwen2": ROPE_HALVES,
                    "qwen3": ROPE_HALVES, "phi3": ROPE_HALVES, "gemma": ROPE_HALVES, "gemma2": ROPE_HALVES,
                    "gemma3": ROPE_HALVES, "falcon": ROPE_HALVES, "qwen3moe": ROPE_HALVES}

SAFETENSORS_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorRecord:
    """One canonical tensor, still on disk: `numpy()` reads and dequantizes it."""

    name: str                    # canonical
    source: str                  # name in the file
    file: Path
    dtype: str                   # GGML type ("Q4_1", "F32") or safetensors dtype ("BF16")
    shape: tuple[int, ...]       # PyTorch order: (out_features, in_features) for linears
    nbytes: int                  # bytes in the file
    read: Callable[[], np.ndarray] = field(repr=False, compare=False)

    def numpy(self, dtype: Any = np.float32) -> np.ndarray:
        """A fresh, writable array of `shape`, dequantized to `dtype` (float32 unless asked)."""
        data = self.read()
        if data.size != math.prod(self.shape):
            raise WeightsError(f"{self.file}: tensor {self.source!r} holds {data.size} values, expected "
                               f"{math.prod(self.shape)} for shape {self.shape}; the file is corrupt, re-download it")
        # min/max propagate NaN and show inf without a temporary the size of the tensor
        if data.size and not (np.isfinite(data.min()) and np.isfinite(data.max())):
            raise WeightsError(f"{self.file}: tensor {self.source!r} ({self.dtype}) holds NaN or infinite values; "
                               f"the file is corrupt, re-download it")
        out = data.reshape(self.shape)
        if isinstance(out, np.memmap) or out.dtype != np.dtype(dtype):     # still the file's bytes: copy
            return np.array(out, dtype=dtype)
        return out


@dataclass(frozen=True)
class Checkpoint:
    """A model's spec and its tensors by canonical name (in inventory order), none of them read yet."""

    path: Path
    format: Literal["gguf", "safetensors"]
    spec: ModelSpec
    tensors: Mapping[str, TensorRecord]
    rope_layout: str             # ROPE_INTERLEAVED or ROPE_HALVES: how the q/k rows are ordered
    metadata: Mapping[str, Any] = field(repr=False)   # GGUF key/values, or the HF config.json
    # float32 (head_dim / 2,): each RoPE pair's frequency divisor where spec.rope_scaling is llama3, linear or yarn
    rope_factors: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    rope_mscale: float = 1.0     # YaRN's multiplier of cos and sin, already folded into the queries (_fold_queries)

    def __getitem__(self, name: str) -> TensorRecord:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    @property
    def lm_head(self) -> TensorRecord:
        """The output projection: `head`, or `embed` when the model ties them."""
        return self.tensors["embed" if self.spec.tie_embeddings else "head"]

    def layer(self, i: int) -> dict[str, TensorRecord]:
        """The tensors of layer i, for loading one layer at a time."""
        prefix = f"layers.{i}."
        return {k: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# --- names and validation ---------------------------------------------------------------------

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _pattern(name: str) -> tuple[str, tuple[int, ...]]:
    """'blk.3.attn_q.weight' -> ('blk.{i}.attn_q.weight', (3,)); a second index becomes {e}."""
    nums = tuple(int(n) for n in _INDEX.findall(name))
    if len(nums) > 2:
        return name, ()
    slots = iter(("{i}", "{e}"))
    return _INDEX.sub(lambda _: next(slots), name), nums


def _expected(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Canonical name -> PyTorch shape, from the planner's inventory (norms as vectors, biases apart)."""
    out: dict[str, tuple[int, ...]] = {}
    for t in inventory(spec):
        if t.kind == "norm":                  # the planner counts (width, hidden): weight, and bias if layernorm
            out[t.name] = (t.shape[-1],)
            if t.shape[0] == 2:
                out[f"{t.name}.bias"] = (t.shape[-1],)
        else:
            out[t.name] = t.shape
    return out


def _file_name(canonical: str, table: Mapping[str, Optional[str]]) -> str:
    """The name a missing canonical tensor would have in the file (for the error message)."""
    pat, nums = _pattern(canonical)
    for src, dst in table.items():
        if dst == pat:
            return src.format(**dict(zip(("i", "e"), nums)))
    return canonical


def _check_layer_count(path: Path, spec: ModelSpec, records: list[TensorRecord]) -> None:
    """Corrupt metadata can claim billions of layers: refuse before the inventory is built for them."""
    found = {int(r.name.split(".")[1]) for r in records if r.name.startswith("layers.")}
    if spec.num_layers > len(found):
        raise WeightsError(f"{path}: the metadata says {spec.num_layers} layers but the file's tensors hold "
                           f"{len(found)}; the file is incomplete or its metadata corrupt, re-download it")


def _collect(path: Path, spec: ModelSpec, table: Mapping[str, Optional[str]],
             records: Iterator[TensorRecord]) -> Mapping[str, TensorRecord]:
    """Check the file's tensors against the inventory: nothing unknown, missing, doubled or misshapen."""
    records = list(records)
    _check_layer_count(path, spec, records)
    expected = _expected(spec)
    found: dict[str, TensorRecord] = {}
    for rec in records:
        if rec.name == "head" and spec.tie_embeddings:
            continue                          # a tied head some checkpoints also save: the embedding is used
        if rec.name not in expected:
            raise WeightsError(f"{rec.file}: tensor {rec.source!r} maps to {rec.name!r}, which {spec.name!r} "
                               f"({spec.family}, {spec.num_layers} layers) does not have; the metadata and "
                               f"the tensors disagree")
        if rec.name in found:
            raise WeightsError(f"{path}: tensors {found[rec.name].source!r} and {rec.source!r} both map to "
                               f"{rec.name!r}")
        if rec.shape != expected[rec.name]:
            raise WeightsError(f"{rec.file}: tensor {rec.source!r} has shape {rec.shape}, but {rec.name} of "
                               f"{spec.name!r} is {expected[rec.name]}; the tensors and the metadata disagree, "
                               f"re-download or re-convert the model")
        found[rec.name] = rec
    for name in expected:
        if name not in found:
            raise WeightsError(f"{path}: tensor {_file_name(name, table)!r} ({name}) is missing; "
                               f"the file is incomplete or not a {spec.family} checkpoint")
    return MappingProxyType({name: found[name] for name in expected})


def _canonical(path: Path, table: Mapping[str, Optional[str]], source: str, kind: str) -> Optional[tuple[str, tuple]]:
    pat, nums = _pattern(source)
    if pat not in table:
        raise WeightsError(f"{path}: unknown tensor {source!r} (not in the {kind} name table of "
                           f"refengine/weights.py): this architecture is not supported by the reference engine")
    target = table[pat]
    return None if target is None else (target, nums)


# --- GGUF ---------------------------------------------------------------------------------------

class _GGUFMetadata(Mapping):
    """GGUF key/values, decoded on access (the token list alone is 50k strings)."""

    def __init__(self, path: Path, fields: Mapping[str, Any]):
        self._path, self._fields = path, fields

    def __getitem__(self, key: str) -> Any:
        try:
            return self._fields[key].contents()
        except UnicodeDecodeError as exc:
            raise WeightsError(f"{self._path}: GGUF metadata {key!r} holds a string that is not UTF-8 (byte "
                               f"{exc.start}: {exc.reason}); the file is corrupt, re-download it") from None

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


@lru_cache(maxsize=None)
def _dequantizable(qtype: Any) -> bool:
    """Whether the gguf package can dequantize this type: tried on one all-zero block, no file data read."""
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _readable_types() -> list[str]:
    import gguf

    return [t.name for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES and _dequantizable(t)]


def _gguf_reader(data: np.ndarray, qtype: Any) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        import gguf

        return gguf.quants.dequantize(data, qtype)
    return read


def _gguf_records(path: Path, reader: Any, table: Mapping[str, Optional[str]]) -> Iterator[TensorRecord]:
    for t in reader.tensors:
        hit = _canonical(path, table, t.name, "GGUF")
        if hit is None:
            continue
        if not _dequantizable(t.tensor_type):
            raise WeightsError(f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which the installed "
                               f"gguf package cannot dequantize (it reads {', '.join(_readable_types())}); "
                               f"requantize the file to one of those, or upgrade gguf")
        target, nums = hit
        shape = tuple(int(d) for d in reversed(t.shape))        # GGUF lists ne[0] (the fastest axis) first
        if "{e}" in target and len(nums) == 1:                   # stacked experts: (experts, out, in)
            for e in range(shape[0]):
                yield TensorRecord(target.format(i=nums[0], e=e), t.name, path, t.tensor_type.name, shape[1:],
                                   int(t.n_bytes) // shape[0], _gguf_reader(t.data[e], t.tensor_type))
        else:
            yield TensorRecord(target.format(**dict(zip(("i", "e"), nums))), t.name, path, t.tensor_type.name,
                               shape, int(t.n_bytes), _gguf_reader(t.data, t.tensor_type))


def _rope_factors(where: Path, spec: ModelSpec, factors: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The factors as the engines take them (float32, one a RoPE pair), checked; None without scaling."""
    if spec.rope_scaling not in SCALED_ROPE:
        return None
    if factors is None:
        raise WeightsError(f"{where}: RoPE scaling {spec.rope_scaling!r} without its parameters; re-convert the model")
    factors = np.array(factors, dtype=np.float32).reshape(-1)
    if factors.size != spec.head_dim // 2 or not (np.isfinite(factors).all() and (factors > 0).all()):
        raise WeightsError(f"{where}: RoPE factors {factors.size} values, expected {spec.head_dim // 2} positive "
                           f"ones (head_dim {spec.head_dim} / 2); the file is corrupt or not this model's")
    return factors


def _fold_queries(spec: ModelSpec, tensors: Mapping[str, TensorRecord], mscale: float) -> Mapping[str, TensorRecord]:
    """Two constants that multiply every attention logit q.k, folded into the queries as they are read (Qwen3's
    and Gemma 3's q_norm weight, else q_proj's rows and bias), so that no engine, oracle or quantizer needs to
    know of them (they all read these tensors):
    - YaRN multiplies cos and sin by mscale, so q.k by mscale^2 (RoPE is linear);
    - Gemma divides q.k by sqrt(query_pre_attn_scalar) where the engines divide by sqrt(head_dim)."""
    scale = mscale * mscale * (math.sqrt(spec.head_dim / spec.query_scale) if spec.query_scale else 1.0)
    if scale == 1.0:
        return tensors
    names = [f"layers.{i}.attn.{n}" for i in range(spec.num_layers)
             for n in (("q_norm",) if spec.qk_norm else ("qkv", "qkv.bias") if spec.fused_qkv else ("q", "q.bias"))]
    rows = spec.q_dim if spec.fused_qkv and not spec.qk_norm else None
    return _scaled(tensors, [n for n in names if n in tensors], np.float32(scale), rows=rows)


def _scaled(tensors: Mapping[str, TensorRecord], names: list[str], scale: np.float32, add: float = 0.0,
            rows: Optional[int] = None) -> Mapping[str, TensorRecord]:
    """These tensors read as (w + add) * scale, in float32; rows: only their first rows scaled."""
    def changed(rec: TensorRecord) -> TensorRecord:
        def read() -> np.ndarray:
            a = np.array(rec.read(), dtype=np.float32).reshape(rec.shape) + np.float32(add)
            a[:rows] *= scale
            return a
        return replace(rec, read=read)
    return MappingProxyType({**tensors, **{n: changed(tensors[n]) for n in names}})


def _gemma_norms(spec: ModelSpec, tensors: Mapping[str, TensorRecord]) -> Mapping[str, TensorRecord]:
    """Gemma's RMSNorms multiply by (1 + w), and a Hugging Face checkpoint stores w: read as 1 + w, the weight
    every other norm multiplies by (llama.cpp's converter adds the 1 likewise, so a Gemma GGUF needs nothing)."""
    if spec.family not in GEMMA_FAMILIES:
        return tensors
    names = [n for n in tensors if n == "norm.final" or re.fullmatch(r"layers\.\d+\.(norm\.\d|attn\.[qk]_norm)", n)]
    return _scaled(tensors, names, np.float32(1.0), add=1.0)


def _gguf_rope(path: Path, reader: Any, spec: ModelSpec) -> tuple[Optional[np.ndarray], float]:
    """A scaled RoPE's factors and mscale from a GGUF: llama.cpp's rope_freqs tensor (Llama 3.1 on), or linear
    and YaRN scaling from the metadata (rope.scaling.factor, original_context_length, yarn_beta_fast / slow;
    YaRN's mscale times rope.scaling.attn_factor, as llama.cpp applies it)."""
    if spec.rope_scaling not in ("linear", "yarn"):
        found = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
        return (np.asarray(found[0].data, dtype=np.float32) if found else None), 1.0
    meta, key = _GGUFMetadata(path, reader.fields), f"{spec.family}.rope.scaling"
    params = {"factor": meta.get(f"{key}.factor"), "original_max_position_embeddings":
              meta.get(f"{key}.original_context_length"), "beta_fast": meta.get(f"{key}.yarn_beta_fast"),
              "beta_slow": meta.get(f"{key}.yarn_beta_slow")}
    if params["factor"] is None or (spec.rope_scaling == "yarn" and params["original_max_position_embeddings"] is None):
        return None, 1.0
    from refengine.ops import rope_factors, rope_mscale
    try:
        mscale = rope_mscale(spec.rope_scaling, params) * float(meta.get(f"{key}.attn_factor") or 1.0)
        return rope_factors(spec.rope_scaling, params, spec.head_dim, spec.rope_theta), mscale
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: unreadable {key}.* metadata ({one_line(exc)}); the file is corrupt, "
                           f"re-download it") from None


def _check_gguf_header(path: Path) -> None:
    """Magic and version, so that a file of another kind or a newer GGUF is named as such, not as corrupt."""
    from gguf import GGUF_MAGIC
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise WeightsError(f"{path}: {len(head)} bytes, too short for a GGUF header (magic + version); "
                           f"the file is truncated, re-download it")
    if int.from_bytes(head[:4], "little") != GGUF_MAGIC:
        raise WeightsError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, a GGUF file with b'GGUF'); "
                           f"pass a .gguf written by llama.cpp's converter, or re-download it")
    version = int.from_bytes(head[4:], "little")
    if version not in READER_SUPPORTED_VERSIONS and int.from_bytes(head[4:], "big") not in READER_SUPPORTED_VERSIONS:
        raise WeightsError(f"{path}: GGUF version {version}, but the installed gguf package reads versions "
                           f"{', '.join(map(str, READER_SUPPORTED_VERSIONS))}; upgrade gguf or re-convert the model")


def load_gguf(path: Union[str, Path]) -> Checkpoint:
    """A GGUF checkpoint: spec from its metadata, tensors memory-mapped and dequantized on demand."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: GGUF file not found")
    _check_gguf_header(path)
    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, OSError, KeyError, IndexError, EOFError) as exc:
        raise WeightsError(f"{path}: not a readable GGUF file, truncated or corrupt ({one_line(exc)}); "
                           f"re-download it") from None
    try:
        spec = spec_from_gguf(path, reader)
    except ModelSourceError as exc:
        raise WeightsError(one_line(exc)) from None
    except UnicodeDecodeError:
        meta = _GGUFMetadata(path, reader.fields)
        for key in meta:            # decoding the bad key again raises a WeightsError that names it
            meta[key]
        raise
    layout = GGUF_ROPE_LAYOUT.get(spec.family)
    if layout is None:
        raise WeightsError(f"{path}: GGUF architecture {spec.family!r} has no known RoPE layout "
                           f"(known: {', '.join(sorted(GGUF_ROPE_LAYOUT))})")
    table = {**GGUF_NAMES, **(GGUF_FUSED_GATE_UP if spec.fused_gate_up else {})}
    tensors = _collect(path, spec, table, _gguf_records(path, reader, table))
    factors, mscale = _gguf_rope(path, reader, spec)
    return Checkpoint(path, "gguf", spec, _fold_queries(spec, tensors, mscale), layout,
                      _GGUFMetadata(path, reader.fields), _rope_factors(path, spec, factors), mscale)


# --- safetensors --------------------------------------------------------------------------------

# Bytes per element of the safetensors dtypes, to check each tensor's extent before the library does
# (its error names neither the tensor nor the numbers).
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(byte where the data starts, header), each tensor's extent checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8:
            raise WeightsError(f"{path}: the file is {size} bytes, too short for a safetensors header; "
                               f"it is truncated, re-download it")
        if 8 + n > size:
            raise WeightsError(f"{path}: the file is {size} bytes, shorter than the header it declares "
                               f"({8 + n} bytes); it is truncated or not safetensors, re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{path}: the safetensors JSON header does not parse ({one_line(exc)}); "
                               f"the file is corrupt, re-download it") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object; the file is corrupt, re-download it")
    for name, entry in header.items():
        if name != "__metadata__":
            _check_safetensors_entry(path, name, entry, size - 8 - n)
    return 8 + n, header


def _check_safetensors_entry(path: Path, name: str, entry: Any, data_bytes: int) -> None:
    try:
        dtype, shape, (begin, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError, OverflowError):
        raise WeightsError(f"{path}: the header entry of tensor {name!r} lacks a dtype, a shape or "
                           f"data_offsets [begin, end]; the file is corrupt, re-download it") from None
    if not 0 <= begin <= end <= data_bytes:
        raise WeightsError(f"{path}: tensor {name!r} lies at data bytes {begin}..{end}, but the file holds "
                           f"{data_bytes} bytes of data; it is truncated or corrupt, re-download it")
    want = math.prod(shape) * SAFETENSORS_ITEMSIZE.get(str(dtype), 0)
    if want and end - begin != want:
        raise WeightsError(f"{path}: tensor {name!r} is {dtype} {tuple(shape)}, {want} bytes, but its "
                           f"data_offsets span {end - begin}; the file is corrupt, re-download it")


def _open_safetensors(path: Path) -> tuple[Any, int, dict]:
    """(safe_open handle, byte where the data starts, header); the handle validates the whole layout."""
    from safetensors import SafetensorError, safe_open

    start, header = _read_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or corrupt ({one_line(exc)}); "
                           f"re-download it") from None
    return handle, start, header


def _bf16_reader(path: Path, offset: int, count: int) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        raw = np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(count,))
        return (raw.astype(np.uint32) << 16).view(np.float32)   # bf16 is the top half of a float32
    return read


def _safetensors_records(path: Path, table: Mapping[str, Optional[str]]) -> Iterator[TensorRecord]:
    handle, start, header = _open_safetensors(path)
    for name in handle.keys():
        if name.startswith(HF_VISION_PREFIXES):
            continue
        language = next((p for p in HF_LANGUAGE_PREFIXES if name.startswith(p)), None)
        hit = _canonical(path, table, "model." + name[len(language):] if language else name, "Hugging Face")
        if hit is None:
            continue
        target, nums = hit
        sl = handle.get_slice(name)
        dtype, shape = sl.get_dtype(), tuple(int(d) for d in sl.get_shape())
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype}; the reference engine reads "
                               f"{', '.join(SAFETENSORS_DTYPES)} (quantized HF checkpoints: use the original or a GGUF)")
        begin, end = header[name]["data_offsets"]
        if dtype == "BF16":
            read = _bf16_reader(path, start + begin, math.prod(shape))
        else:
            read = (lambda h=handle, n=name: h.get_tensor(n))
        yield TensorRecord(target.format(**dict(zip(("i", "e"), nums))), name, path, dtype, shape,
                           end - begin, read)


def load_safetensors(path_or_dir: Union[str, Path]) -> Checkpoint:
    """A Hugging Face checkpoint: config.json + one or more *.safetensors (F32, F16 or BF16)."""
    path = Path(path_or_dir)
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise WeightsError(f"{path}: no .safetensors file found")
    config = folder / "config.json"
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{config}: not found; a safetensors checkpoint needs its Hugging Face config.json "
                           f"beside it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{config}: not a readable JSON config ({one_line(exc)})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{config}: a config.json must hold a JSON object")
    try:
        spec = spec_from_hf_config(cfg, str(folder))
    except ModelSourceError as exc:
        raise WeightsError(one_line(exc)) from None

    table = HF_GEMMA_NAMES if spec.family in GEMMA_FAMILIES and spec.norms_per_layer == 4 else HF_NAMES

    def records() -> Iterator[TensorRecord]:
        for f in files:
            yield from _safetensors_records(f, table)
    tensors = _collect(path, spec, table, records())
    factors, mscale = None, 1.0
    if spec.rope_scaling in SCALED_ROPE:
        from refengine.ops import rope_factors, rope_mscale
        # YaRN's original context defaults to max_position_embeddings, as transformers reads it; an image-text
        # checkpoint (Gemma 3 4B and up) keeps both in its language model's text_config
        text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
        params = {"original_max_position_embeddings": text.get("max_position_embeddings"), **hf_rope_scaling(text)}
        try:
            factors = rope_factors(spec.rope_scaling, params, spec.head_dim, spec.rope_theta)
            mscale = rope_mscale(spec.rope_scaling, params)
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{config}: rope_scaling {spec.rope_scaling!r} lacks or misstates a parameter "
                               f"({one_line(exc)}); copy the model's own config.json") from None
    return Checkpoint(path, "safetensors", spec, _fold_queries(spec, _gemma_norms(spec, tensors), mscale), ROPE_HALVES,
                      MappingProxyType(cfg), _rope_factors(config, spec, factors), mscale)


def load_checkpoint(name_or_path: Union[str, Path]) -> Checkpoint:
    """Any model the engines run: a packaged name (smollm2-135m), a .gguf, a .safetensors, or an HF folder."""
    from refengine.models import find_model_file

    path = find_model_file(name_or_path)
    return load_gguf(path) if path.suffix.lower() == ".gguf" else load_safetensors(path)


# --- RoPE row layouts ---------------------------------------------------------------------------

def rope_rows_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face q/k rows (or bias) -> GGUF order, as llama.cpp's convert_hf_to_gguf `permute` does.

    n_heads: the heads of this projection (num_kv_heads for k)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_rows_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF q/k rows (or bias) -> Hugging Face order: the inverse permutation."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


__all__ = ["Checkpoint", "GGUF_NAMES", "GGUF_ROPE_LAYOUT", "HF_NAMES", "ROPE_HALVES", "ROPE_INTERLEAVED",
           "TensorRecord", "load_checkpoint", "load_gguf", "load_safetensors", "rope_rows_to_halves",
           "rope_rows_to_interleaved"]
