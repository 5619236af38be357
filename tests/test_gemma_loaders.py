"""Gemma 1 / 2 / 3 as Hugging Face checkpoints, against the same weights as llama.cpp's GGUF.

The tiny Gemma models of benchmarks/llamacpp_architectures.py (checked against llama.cpp's logits in
test_architectures.py) are written here a second time, as Hugging Face would save them: config.json with the
model's own keys (query_pre_attn_scalar, soft caps, rope_local_base_freq, rope_scaling), tensors under HF's
names, Gemma 2 / 3's post_attention_layernorm AFTER attention, every norm weight stored as w where llama.cpp's
converter wrote 1 + w. Both loaders must give the oracle the same logits: (w - 1) + 1 is exact in float32 for
w in [0.5, 2] (Sterbenz), so the two hand it the same weights, and the logits agree to 1e-9 of their scale
(measured 4e-15: the GGUF's float32 norm_eps); a misread (a norm without its 1, a scale, a cap, a RoPE base)
is off by 0.02 or more. The GGUF reader's llama.cpp rules (query_scale of the 27B models) are checked as well.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from planner.spec import hf_rope_scaling, spec_from_hf_config
from refengine.errors import WeightsError
from refengine.oracle import oracle_logits
from refengine.weights import ROPE_HALVES, ROPE_INTERLEAVED, load_gguf, load_safetensors
from test_weights import ARCHS as bench

RECORD = json.loads(bench.RESULT.read_text())["models"]
IDS = RECORD["gemma2"]["ids"]
TIGHT = 1e-9               # the same float32 weights both ways (measured: 4e-15 at most)
MISREAD = 1e-2             # each misread below is off by more (measured: 0.02 to 0.18)
# the spec fields both loaders must agree on (name, id, family, source and max_context may differ; norm_eps is
# a float32 in the GGUF: same_arch compares it to that precision)
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "vocab_size", "tie_embeddings", "norms_per_layer", "qk_norm", "activation", "rope_theta",
               "rope_scaling", "sliding_window", "sliding_window_pattern", "sliding_rope_theta", "query_scale",
               "attn_softcap", "final_softcap")


def hf_config(cfg: dict, **changes) -> dict:
    """config.json for a benchmark cfg, as transformers writes a Gemma / Gemma 2 / Gemma 3 (text) one; changes:
    keys replaced, or removed where the value is None."""
    hd = cfg.get("head_dim", cfg["hidden"] // cfg["heads"])
    out = {"model_type": {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[cfg["arch"]],
           "hidden_size": cfg["hidden"], "intermediate_size": cfg["ff"], "num_hidden_layers": cfg["layers"],
           "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["kv"], "head_dim": hd,
           "vocab_size": cfg["vocab"], "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
           "rope_theta": cfg["theta"], "hidden_activation": "gelu_pytorch_tanh",
           "tie_word_embeddings": cfg["tied"], "torch_dtype": "float32"}
    if cfg["arch"] in ("gemma2", "gemma3"):
        # llama.cpp's GGUF of a model this size divides q.k by sqrt(head_dim): the HF spelling of that is
        # query_pre_attn_scalar = head_dim
        out.update(sliding_window=cfg["window"], query_pre_attn_scalar=hd)
    if cfg["arch"] == "gemma2":
        out.update(attn_logit_softcapping=cfg["attn_softcap"], final_logit_softcapping=cfg["final_softcap"])
    if cfg["arch"] == "gemma3":
        out.update(rope_local_base_freq=10000.0, rope_scaling=dict(cfg["rope_scaling"]), sliding_window_pattern=6,
                   attn_logit_softcapping=None, final_logit_softcapping=None)
    for key, value in changes.items():
        out.pop(key, None)
        if value is not None:
            out[key] = value
    return out


def hf_tensors(cfg: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The GGUF arrays under Hugging Face names, each norm stored as (GGUF weight - 1). Gemma's q/k rows are in
    HF's rotate_half order in the GGUF already: no permutation."""
    post = cfg["arch"] != "gemma"           # Gemma 2 / 3: four norms a layer
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "pre_feedforward_layernorm" if post else "post_attention_layernorm",
             "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
    out = {}
    for name, a in arrays.items():
        parts = name.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
        else:
            hf = f"{names[parts[0]]}.weight"
        out[hf] = (a - np.float32(1)) if "norm" in parts[-2] else a
    return out


def write_hf(folder, config: dict, tensors: dict[str, np.ndarray]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({n: np.ascontiguousarray(a) for n, a in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def logits(ckpt, ids=IDS, w=None) -> np.ndarray:
    w = {n: r.numpy() for n, r in ckpt.tensors.items()} if w is None else w
    return oracle_logits(ckpt.spec, w, ids, ckpt.rope_layout == ROPE_INTERLEAVED, rope_factors=ckpt.rope_factors)


def same_arch(spec, want) -> None:
    for f in ARCH_FIELDS:
        assert getattr(spec, f) == getattr(want, f), f
    assert spec.norm_eps == pytest.approx(want.norm_eps, rel=1e-6)


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (benchmark cfg, GGUF arrays, GGUF checkpoint, its oracle logits) for gemma, gemma2, gemma3."""
    root = tmp_path_factory.mktemp("gemma")
    out = {}
    for name in ("gemma", "gemma2", "gemma3"):
        cfg = RECORD[name]["config"]
        arrays = bench.tiny_tensors(cfg)
        assert bench.digest(arrays) == RECORD[name]["weights_digest"]
        ckpt = load_gguf(bench.write_gguf(root / f"{name}.gguf", cfg, arrays))
        out[name] = (cfg, arrays, ckpt, logits(ckpt))
    return out


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_hf_checkpoint_matches_gguf(tiny, tmp_path, name):
    """A Gemma's HF checkpoint gives the logits of llama.cpp's GGUF of the same weights: every norm read as
    1 + w (_gemma_norms; without it the norms are ~0.1 and the logits nothing alike), Gemma 2 / 3's
    post_attention_layernorm as the norm after attention (HF_GEMMA_NAMES; Gemma 1's is the one before the MLP),
    query_pre_attn_scalar, the soft caps, Gemma 3's two RoPE bases and its global layers' linear factors."""
    cfg, arrays, gguf_ckpt, want = tiny[name]
    ckpt = load_safetensors(write_hf(tmp_path / name, hf_config(cfg), hf_tensors(cfg, arrays)))
    assert ckpt.rope_layout == ROPE_HALVES
    same_arch(ckpt.spec, gguf_ckpt.spec)
    if name == "gemma3":
        np.testing.assert_array_equal(ckpt.rope_factors, gguf_ckpt.rope_factors)
    assert rel(logits(ckpt), want) <= TIGHT


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_query_pre_attn_scalar_is_applied(tiny, tmp_path, name):
    """query_pre_attn_scalar = 4 x head_dim divides q.k by 2 x sqrt(head_dim): the logits of the GGUF's weights
    with q.k halved (its q rows for Gemma 2; its q_norm for Gemma 3, whose q_norm would undo a scaled q_proj),
    and not the GGUF's own (the scalar ignored)."""
    cfg, arrays, gguf_ckpt, want = tiny[name]
    config = hf_config(cfg, query_pre_attn_scalar=4 * cfg["head_dim"])
    ckpt = load_safetensors(write_hf(tmp_path / name, config, hf_tensors(cfg, arrays)))
    assert ckpt.spec.query_scale == 4 * cfg["head_dim"]
    w = {n: r.numpy() for n, r in gguf_ckpt.tensors.items()}
    for i in range(cfg["layers"]):
        w[f"layers.{i}.attn.{'q_norm' if cfg['qk_norm'] else 'q'}"] *= np.float32(0.5)
    got = logits(ckpt)
    assert rel(got, logits(gguf_ckpt, w=w)) <= TIGHT
    assert rel(got, want) > MISREAD


@pytest.mark.parametrize("name,changes", [
    ("gemma2", dict(query_pre_attn_scalar=64)),
    ("gemma2", dict(attn_logit_softcapping=None)),       # Gemma2Config's default 50, which does not bind here
    ("gemma2", dict(final_logit_softcapping=None, sliding_window=4)),
    ("gemma3", dict(query_pre_attn_scalar=64)),
    ("gemma3", dict(rope_scaling=None)),
    ("gemma3", dict(rope_local_base_freq=1000000.0)),
    ("gemma3", dict(sliding_window_pattern=2)),
])
def test_a_misread_config_is_caught(tiny, tmp_path, name, changes):
    """The comparison above discriminates: the same tensors under a config.json that says another
    query_pre_attn_scalar, soft cap, window, RoPE scaling, local RoPE base or layer pattern are far off."""
    cfg, arrays, _, want = tiny[name]
    ckpt = load_safetensors(write_hf(tmp_path / name, hf_config(cfg, **changes), hf_tensors(cfg, arrays)))
    assert rel(logits(ckpt), want) > MISREAD


LAYOUTS = {   # transformers < 4.52 and >= 4.52: where Gemma3ForConditionalGeneration saves its parts
    "language_model.model.": ("vision_tower.", "multi_modal_projector."),
    "model.language_model.": ("model.vision_tower.", "model.multi_modal_projector."),
}


def image_text(cfg: dict, arrays: dict[str, np.ndarray], prefix: str, **changes) -> tuple[dict, dict]:
    """(config.json, tensors) of a Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration): the text
    model's config as text_config (changes applied), its tensors under prefix, a dummy vision tower and projector."""
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": hf_config(cfg, **changes), "mm_tokens_per_image": 256, "tie_word_embeddings": True,
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16}}
    tower, projector = LAYOUTS[prefix]
    tensors = {prefix + n[len("model."):]: a for n, a in hf_tensors(cfg, arrays).items()}
    tensors[tower + "vision_model.embeddings.patch_embedding.weight"] = np.ones((16, 3, 4, 4), np.float32)
    tensors[projector + "mm_input_projection_weight"] = np.ones((16, cfg["hidden"]), np.float32)
    return config, tensors


@pytest.mark.parametrize("prefix", sorted(LAYOUTS))
def test_gemma3_image_text_checkpoint(tiny, tmp_path, prefix):
    """Gemma 3 4B and up are image-text checkpoints: config.json's text_config is the language model, its
    tensors lie under language_model.model. (or model.language_model.), beside a vision tower and projector that
    are skipped. Their language model loads as the text-only checkpoint and gives the same logits. (Here its
    text_config has no rope_scaling, so the reference is the GGUF's weights without the linear factors: the
    case with them is the next test.)"""
    cfg, arrays, gguf_ckpt, _ = tiny["gemma3"]
    config, tensors = image_text(cfg, arrays, prefix, rope_scaling=None)
    ckpt = load_safetensors(write_hf(tmp_path / "it", config, tensors))
    assert (ckpt.spec.family, ckpt.spec.rope_scaling, ckpt.rope_factors) == ("gemma3", "", None)
    same_arch(ckpt.spec, dataclasses.replace(gguf_ckpt.spec, rope_scaling=""))
    assert {r.source for r in ckpt.tensors.values()} == {n for n in tensors if n.startswith(prefix)}
    w = {n: r.numpy() for n, r in gguf_ckpt.tensors.items()}
    want = oracle_logits(ckpt.spec, w, IDS, False)
    assert rel(logits(ckpt), want) <= TIGHT


@pytest.mark.parametrize("prefix", sorted(LAYOUTS))
def test_gemma3_image_text_checkpoint_scaled_rope(tiny, tmp_path, prefix):
    """A real Gemma 3 image-text config.json states rope_scaling {"rope_type": "linear", "factor": 8} inside
    text_config only: the global layers' factors come from there, and the logits are the GGUF's."""
    cfg, arrays, gguf_ckpt, want = tiny["gemma3"]
    ckpt = load_safetensors(write_hf(tmp_path / "it", *image_text(cfg, arrays, prefix)))
    same_arch(ckpt.spec, gguf_ckpt.spec)
    np.testing.assert_array_equal(ckpt.rope_factors, gguf_ckpt.rope_factors)
    assert rel(logits(ckpt), want) <= TIGHT


def test_gemma3_rope_parameters_checkpoint(tiny, tmp_path):
    """transformers 5 writes Gemma 3's RoPE as rope_parameters per layer type (no rope_theta, rope_scaling or
    rope_local_base_freq): the same model, the same logits."""
    cfg, arrays, _, want = tiny["gemma3"]
    config = hf_config(cfg, rope_theta=None, rope_scaling=None, rope_local_base_freq=None, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": cfg["theta"]},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    ckpt = load_safetensors(write_hf(tmp_path / "v5", config, hf_tensors(cfg, arrays)))
    assert rel(logits(ckpt), want) <= TIGHT


GEMMA3_27B = {"model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
              "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 262208,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
              "sliding_window": 1024, "sliding_window_pattern": 6, "query_pre_attn_scalar": 168,
              "attn_logit_softcapping": None, "final_logit_softcapping": None}
GEMMA2_9B = {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 4096,
             "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


def test_gemma_hf_configs():
    """The real models' configs: Gemma 3 27B's query_pre_attn_scalar 168 (hidden / heads, not head_dim 128) kept,
    as its image-text config too; Gemma 2 9B's 256 = head_dim normalized to 0 (the default, one spelling);
    Gemma 2's caps, Gemma 3's none and its local RoPE base."""
    spec = spec_from_hf_config(GEMMA3_27B, "google/gemma-3-27b-it")
    assert (spec.query_scale, spec.head_dim, spec.family, spec.activation) == (168.0, 128, "gemma3_text", "gelu_tanh")
    assert (spec.rope_theta, spec.rope_scaling, spec.sliding_rope_theta) == (1e6, "linear", 1e4)
    assert (spec.attn_softcap, spec.final_softcap, spec.sliding_window, spec.sliding_window_pattern) == (0, 0, 1024, 6)
    assert (spec.norms_per_layer, spec.qk_norm, spec.tie_embeddings) == (4, True, True)
    wrapped = spec_from_hf_config({"model_type": "gemma3", "text_config": GEMMA3_27B, "vision_config": {}},
                                  "google/gemma-3-27b-it")
    assert {f: getattr(wrapped, f) for f in ARCH_FIELDS} == {f: getattr(spec, f) for f in ARCH_FIELDS}
    spec = spec_from_hf_config(GEMMA2_9B, "google/gemma-2-9b")
    assert (spec.query_scale, spec.attn_softcap, spec.final_softcap) == (0.0, 50.0, 30.0)
    assert (spec.sliding_window, spec.sliding_window_pattern, spec.sliding_rope_theta) == (4096, 2, 0.0)
    # absent keys: Gemma2Config's defaults (query_pre_attn_scalar 256, caps 50 / 30)
    spec = spec_from_hf_config({k: v for k, v in GEMMA2_9B.items() if "soft" not in k and "query" not in k}, "g2")
    assert (spec.query_scale, spec.attn_softcap, spec.final_softcap) == (0.0, 50.0, 30.0)


def test_gemma3_rope_parameters_config():
    """transformers 5's per-layer-type rope_parameters: the global layers' base and linear scaling, the sliding
    layers' own base (read, not defaulted: another value comes through)."""
    params = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    cfg = {k: v for k, v in GEMMA3_27B.items() if k not in ("rope_theta", "rope_scaling", "rope_local_base_freq")}
    spec = spec_from_hf_config({**cfg, "rope_parameters": params}, "gemma-3-27b")
    assert (spec.rope_theta, spec.rope_scaling, spec.sliding_rope_theta) == (1e6, "linear", 1e4)
    assert hf_rope_scaling({**cfg, "rope_parameters": params})["factor"] == 8.0
    params["sliding_attention"]["rope_theta"] = 20000.0
    assert spec_from_hf_config({**cfg, "rope_parameters": params}, "gemma-3-27b").sliding_rope_theta == 2e4


@pytest.mark.parametrize("name,layers", [("gemma2", 46), ("gemma3", 62)])
def test_gguf_27b_query_scale(tmp_path, name, layers):
    """llama.cpp's rule for a GGUF, which has no query_pre_attn_scalar: a Gemma 2 of 46 layers or a Gemma 3 of
    62 (the 27Bs) divides q.k by sqrt(hidden / heads), here sqrt(16) where head_dim is 32; folded into the q rows
    (Gemma 2) or q_norm (Gemma 3) by sqrt(32 / 16). Its HF checkpoint with query_pre_attn_scalar 16 agrees; a
    layer count other than those keeps sqrt(head_dim)."""
    cfg = {**RECORD[name]["config"], "layers": layers}
    arrays = bench.tiny_tensors(cfg)
    ckpt = load_gguf(bench.write_gguf(tmp_path / f"{name}.gguf", cfg, arrays))
    qs = cfg["hidden"] // cfg["heads"]
    assert (ckpt.spec.query_scale, ckpt.spec.head_dim) == (qs, cfg["head_dim"])
    folded, raw = ("attn.q_norm", "attn_q_norm") if cfg["qk_norm"] else ("attn.q", "attn_q")
    np.testing.assert_allclose(ckpt[f"layers.0.{folded}"].numpy(),
                               arrays[f"blk.0.{raw}.weight"] * np.float32(math.sqrt(cfg["head_dim"] / qs)), rtol=1e-6)
    ids = IDS[:12]
    hf = load_safetensors(write_hf(tmp_path / "hf", hf_config(cfg, query_pre_attn_scalar=qs), hf_tensors(cfg, arrays)))
    assert hf.spec.query_scale == qs
    assert rel(logits(hf, ids), logits(ckpt, ids)) <= TIGHT
    short = {**cfg, "layers": layers - 1}
    arrays = {n: a for n, a in arrays.items() if not n.startswith(f"blk.{layers - 1}.")}
    assert load_gguf(bench.write_gguf(tmp_path / "short.gguf", short, arrays)).spec.query_scale == 0.0


def test_hf_gemma_without_its_norm_names_is_refused(tiny, tmp_path):
    """A Gemma 2 checkpoint missing pre_feedforward_layernorm (a Llama-style, two-norm layer) names the missing
    tensor rather than running with a norm misplaced."""
    cfg, arrays, _, _ = tiny["gemma2"]
    tensors = {n: a for n, a in hf_tensors(cfg, arrays).items() if "layers.1.pre_feedforward" not in n}
    with pytest.raises(WeightsError, match="pre_feedforward_layernorm"):
        load_safetensors(write_hf(tmp_path / "g2", hf_config(cfg), tensors))
