"""Each architecture the engines run, against llama.cpp's logits on the same tiny random weights.

benchmarks/llamacpp_architectures.py wrote one tiny random model per architecture (Llama, Llama 3.1's RoPE,
Phi-3, Qwen2 with q/k/v biases and with YaRN, Qwen3 with its per-head q/k norms and with heads wider than
hidden / heads, Mixtral and Qwen3-MoE with 4 experts, 2 a token, Gemma 1 / 2 / 3 with sliding windows past their
window) as an F32 GGUF, ran
llama.cpp on it and recorded its teacher-forced logits with a digest of the weights. Here the same weights
are made again (checked by the digest), written as the same GGUF, read by our loader and run by the oracle
and the float32 engine, prefill in chunks and token by token. llama.cpp itself is not needed; where it is
installed, it is also run live.

Bound: 2e-3 of the logit scale. Measured (llama-cpp-python 0.3.36, benchmarks/results/
llamacpp_architectures.json): at most 3.4e-4, llama.cpp's f16 KV cache and summation order. An
architecture misread (a Qwen3 without its q/k norms, a Gemma 2 without its window: tests below) is off by 0.03
to 1.3.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

from refengine.model import Transformer
from refengine.oracle import oracle_logits
from refengine.weights import ROPE_INTERLEAVED, load_gguf
from test_weights import ARCHS as bench

RECORD = json.loads(bench.RESULT.read_text())["models"]
TOL = 2e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (GGUF path, llama.cpp's recorded logits), the weights checked against the record's digest."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for name, rec in RECORD.items():
        arrays = bench.tiny_tensors(rec["config"])
        assert bench.digest(arrays) == rec["weights_digest"], \
            f"{name}: the weights are not the ones llama.cpp ran; rerun benchmarks/llamacpp_architectures.py"
        out[name] = (bench.write_gguf(root / f"{name}.gguf", rec["config"], arrays),
                     np.asarray(rec["llamacpp_logits"], dtype=np.float64))
    return out


def check(got: np.ndarray, want: np.ndarray) -> None:
    """Within TOL of the logit scale; the same top-1 wherever llama.cpp's lead exceeds twice that."""
    scale = np.abs(want).max()
    err = np.abs(np.asarray(got, np.float64) - want).max() / scale
    assert err <= TOL, f"max |ours - llama.cpp| = {err:.3g} x logit scale, bound {TOL}"
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * TOL * scale
    assert clear.any() and np.array_equal(got.argmax(1)[clear], want.argmax(1)[clear])


@pytest.mark.parametrize("name", sorted(RECORD))
@pytest.mark.parametrize("chunk", [1, 5, 24])
def test_engine_matches_llamacpp(tiny, name, chunk):
    path, want = tiny[name]
    ckpt = load_gguf(path)
    assert (ckpt.spec.family, ckpt.spec.qk_norm) == (RECORD[name]["config"]["arch"], RECORD[name]["config"]["qk_norm"])
    w = {n: r.numpy() for n, r in ckpt.tensors.items()}
    net = Transformer(ckpt.spec, w, ctx=len(RECORD[name]["ids"]), kv_name="fp16", chunk=chunk,
                      rope_interleaved=ckpt.rope_layout == ROPE_INTERLEAVED, rope_factors=ckpt.rope_factors)
    check(net.forward(RECORD[name]["ids"]), want)


@pytest.mark.parametrize("name", sorted(RECORD))
def test_oracle_matches_llamacpp(tiny, name):
    path, want = tiny[name]
    ckpt = load_gguf(path)
    w = {n: r.numpy() for n, r in ckpt.tensors.items()}
    check(oracle_logits(ckpt.spec, w, RECORD[name]["ids"], ckpt.rope_layout == ROPE_INTERLEAVED,
                        rope_factors=ckpt.rope_factors), want)


def _without_head_norms(spec, w):
    return dataclasses.replace(spec, qk_norm=False), {n: a for n, a in w.items() if not n.endswith(("q_norm", "k_norm"))}


def _without_rope_factors(spec, w):
    return dataclasses.replace(spec, rope_scaling=""), w


def _without_mscale(spec, w):                     # YaRN's factors kept, its q.k scale taken back out of q
    m2 = np.float32(1 + 0.1 * np.log(4)) ** 2
    return spec, {n: (a / m2 if n.endswith(("attn.q", "attn.q.bias")) else a) for n, a in w.items()}


def _changed(**fields):
    def misread(spec, w):
        return dataclasses.replace(spec, **fields), w
    misread.__name__ = "_with_" + "_".join(f"{k}_{v}" for k, v in fields.items())
    return misread


def _gate_and_up_swapped(spec, w):
    return spec, {n: (np.concatenate(np.split(a, 2)[::-1]) if n.endswith("gate_up") else a) for n, a in w.items()}


@pytest.mark.parametrize("name,misread", [("qwen3", _without_head_norms), ("llama3-rope", _without_rope_factors),
                                          ("qwen2-yarn", _without_rope_factors), ("qwen2-yarn", _without_mscale),
                                          ("phi3", _gate_and_up_swapped),
                                          ("gemma", _changed(family="llama")),               # no sqrt(H) embedding
                                          ("gemma2", _changed(activation="silu")),
                                          ("gemma2", _changed(sliding_window=0, sliding_window_pattern=0)),
                                          ("gemma2", _changed(attn_softcap=0.0)),
                                          ("gemma2", _changed(final_softcap=0.0)),
                                          ("gemma2", _changed(norms_per_layer=2)),           # no post norms
                                          ("gemma3", _changed(sliding_rope_theta=0.0)),
                                          ("gemma3", _without_rope_factors),
                                          ("mixtral", _changed(experts_per_token=1)),
                                          ("qwen3moe", _changed(experts_per_token=1))])
def test_a_misread_architecture_is_caught(tiny, name, misread):
    """The record discriminates: Qwen3 without its q/k norms, Llama 3.1's RoPE without its factors (the engines
    before 2026-11-27), YaRN without its factors or without its mscale, or Phi-3's gate and up halves swapped
    land 50 to 250 times past the bound (0.14, 0.19, 0.30, 0.12 and 0.50 of the logit scale). So do Gemma's
    departures, each left out (measured 2026-11-27): its embedding scale 0.48; Gemma 2 with SwiGLU 0.035, without
    its window 0.14, its score cap 0.067, its logit cap 1.3, its post norms 0.17; Gemma 3 with one RoPE base
    0.062, without its global layers' linear factors 0.027. Routed experts: one expert a token where the model
    takes two, 0.35 (Mixtral) and 0.36 (Qwen3-MoE); the two without renormalizing their weights (not a spec field,
    checked by hand) 0.19 and 0.14."""
    path, want = tiny[name]
    ckpt = load_gguf(path)
    spec, w = misread(ckpt.spec, {n: r.numpy() for n, r in ckpt.tensors.items()})
    factors = ckpt.rope_factors if spec.rope_scaling else None
    got = oracle_logits(spec, w, RECORD[name]["ids"], ckpt.rope_layout == ROPE_INTERLEAVED, rope_factors=factors)
    assert np.abs(got - want).max() / np.abs(want).max() > 10 * TOL


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (optional: pip install llama-cpp-python)")
@pytest.mark.parametrize("name", sorted(RECORD))
def test_llamacpp_live_matches_its_record(tiny, name):
    """The installed llama.cpp still gives the recorded logits (to its own f16-cache noise)."""
    path, want = tiny[name]
    got = bench.llamacpp_logits(path, RECORD[name]["ids"])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_qwen3_moe_hf_checkpoint_is_its_gguf(tiny, tmp_path):
    """The tiny Qwen3-MoE saved as Hugging Face does (mlp.gate the router, mlp.experts.{e}.*_proj each expert,
    config.json's moe_intermediate_size and num_experts): the same spec, the same logits as the GGUF."""
    import json

    from safetensors.numpy import save_file

    from refengine.weights import load_safetensors
    cfg, (path, want) = RECORD["qwen3moe"]["config"], tiny["qwen3moe"]
    gguf = load_gguf(path)
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate"}
    arrays = bench.tiny_tensors(cfg)
    out = {"model.embed_tokens.weight": arrays["token_embd.weight"], "model.norm.weight": arrays["output_norm.weight"],
           "lm_head.weight": arrays["output.weight"]}
    for name, a in arrays.items():
        parts = name.split(".")
        if parts[0] != "blk":
            continue
        p = f"model.layers.{parts[1]}."
        if parts[2].endswith("_exps"):
            for e, block in enumerate(a):
                out[f"{p}mlp.experts.{e}.{parts[2][4:-5]}_proj.weight"] = block
        else:
            out[p + names[parts[2]] + ".weight"] = a
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "hidden_size": cfg["hidden"], "intermediate_size": 3 * cfg["ff"],
        "moe_intermediate_size": cfg["ff"], "num_experts": cfg["experts"], "num_experts_per_tok": cfg["experts_used"],
        "norm_topk_prob": True, "num_hidden_layers": cfg["layers"], "num_attention_heads": cfg["heads"],
        "num_key_value_heads": cfg["kv"], "head_dim": cfg["head_dim"], "vocab_size": cfg["vocab"],
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": cfg["theta"],
        "tie_word_embeddings": False}))
    save_file({n: np.ascontiguousarray(a) for n, a in out.items()}, str(folder / "model.safetensors"))
    hf = load_safetensors(folder)
    assert (hf.spec.num_experts, hf.spec.experts_per_token, hf.spec.intermediate_size) == (4, 2, cfg["ff"])
    w = {n: r.numpy() for n, r in hf.tensors.items()}
    got = oracle_logits(hf.spec, w, RECORD["qwen3moe"]["ids"], False)
    check(got, want)
    ref = {n: r.numpy() for n, r in gguf.tensors.items()}
    assert np.allclose(got, oracle_logits(gguf.spec, ref, RECORD["qwen3moe"]["ids"], False), rtol=0, atol=1e-9)
