"""The command line: exit codes, one-line errors, JSON output, model sources, a light import path."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from planner.cli import main


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["plan", "--gpu", "rtx4091", "--model", "llama2-7b"], "unknown GPU 'rtx4091'"),
    (["plan", "--gpu", "rtx4090", "--model", "llama9-7b"], "unknown model 'llama9-7b'"),
    (["plan", "--vram", "eight", "--bandwidth", "448", "--model", "llama2-7b"], "'eight' is not a size"),
    (["plan", "--model", "llama2-7b"], "name a card with --gpu"),
    (["plan", "--gpu", "rtx4090", "--vendor", "amd", "--model", "llama2-7b"], "--vendor describes a custom card"),
    (["plan", "--vram", "8GiB", "--bandwidth", "100GB/s", "--vendor", "apple", "--host-link", "25GB/s", "--model",
      "llama2-7b"], "--host-link does not apply to --vendor apple"),
    (["plan", "--gpu", "RTX 3070 16GB", "--model", "llama2-7b"], "rtx3070 has 8 GiB, not 16 GB"),
    (["plan", "--gpu", "rtx4090", "--model", "./missing.json"], "config file not found"),
    (["plan", "--gpu", "rtx4090", "--model", "llama2-7b", "--measurement", "/nonexistent.yaml"], "cannot read file"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, message):
    code, out, err = run(capsys, *args, "-o", str(tmp_path / "p.yaml"))
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def test_gpu_auto_without_a_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    code, _, err = run(capsys, "plan", "--gpu", "auto", "--model", "llama2-7b", "-o", str(tmp_path / "p.yaml"))
    assert code == 2 and "--gpu auto found no GPU" in err


def test_gpu_auto_uses_nvidia_smi(capsys, tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 24564'\necho 'NVIDIA GeForce RTX 4090, 24564'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    code, out, _ = run(capsys, "plan", "--gpu", "auto", "--model", "llama2-70b", "--json", "-o", str(tmp_path / "p.yaml"))
    doc = json.loads(out)
    assert code == 0 and doc["gpu"]["id"] == "rtx4090" and doc["gpu"]["count"] == 2


@pytest.mark.parametrize("name,mib,gpu_id,gb_s", [
    ("NVIDIA GeForce RTX 4060 Ti", 8188, "rtx4060ti-8gb", 288), ("NVIDIA GeForce RTX 4060 Ti", 16380, "rtx4060ti-16gb", 288),
    ("NVIDIA GeForce RTX 3060", 8192, "rtx3060-8gb", 240), ("NVIDIA GeForce RTX 3060", 12288, "rtx3060-12gb", 360),
    ("NVIDIA GeForce RTX 5060 Ti", 8151, "rtx5060ti-8gb", 448), ("NVIDIA GeForce RTX 5060 Ti", 16311, "rtx5060ti-16gb", 448)])
def test_gpu_auto_tells_variants_of_one_name_apart_by_memory(capsys, tmp_path, monkeypatch, name, mib, gpu_id, gb_s):
    """Both RTX 3060 cards print one name, and the 8 GB one has two thirds of the bandwidth: the detected memory
    picks the entry."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{name}, {mib}'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    code, out, _ = run(capsys, "plan", "--gpu", "auto", "--model", "llama3-8b", "--json", "-o", str(tmp_path / "p.yaml"))
    doc = json.loads(out)
    assert code == 0 and doc["gpu"]["id"] == gpu_id and doc["gpu"]["memory_bytes"] == mib * 2**20
    assert doc["gpu"]["bandwidth_gb_s"] == gb_s


def test_gpu_auto_on_unified_memory_keeps_the_databases_size(capsys, tmp_path, monkeypatch):
    """nvidia-smi reports no memory total for a DGX Spark's GB10 ('[N/A]'): the card is still found by name and
    planned with hwdb's size; an unknown card that reports none asks for --vram in one line."""
    from planner.detect import parse_nvidia_smi
    assert parse_nvidia_smi("NVIDIA GB10, [N/A]\nNVIDIA GeForce RTX 4090, 24564\n") == [
        ("NVIDIA GB10", 0), ("NVIDIA GeForce RTX 4090", 24564 * 2**20)]
    smi = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    smi.write_text("#!/bin/sh\necho 'NVIDIA GB10, [N/A]'\n")
    smi.chmod(0o755)
    code, out, _ = run(capsys, "plan", "--gpu", "auto", "--model", "gpt-oss-20b", "--json",
                       "-o", str(tmp_path / "p.yaml"))
    doc = json.loads(out)
    assert code == 0 and doc["gpu"]["id"] == "nvidia-gb10" and doc["gpu"]["memory_bytes"] == 124610 * 2**20
    smi.write_text("#!/bin/sh\necho 'NVIDIA Future APU, [N/A]'\n")
    code, _, err = run(capsys, "plan", "--gpu", "auto", "--model", "gpt-oss-20b", "-o", str(tmp_path / "q.yaml"))
    assert code == 2 and "reports no memory size" in err and "--vram" in err


def test_a_custom_apple_chip_plans_with_unified_memory_and_apples_factors(capsys, tmp_path):
    from planner.roofline import EFFICIENCY
    args = ("plan", "--vram", "10GiB", "--bandwidth", "100GB/s", "--model", "llama3-8b", "--json")
    code, out, _ = run(capsys, *args, "--vendor", "apple", "-o", str(tmp_path / "a.yaml"))
    apple = json.loads(out)
    card = apple["gpu"]["spec"]
    assert code == 0 and card["vendor"] == "apple" and card["host_link"] == "unified memory"
    assert card["host_link_gb_s"] == 100
    assert apple["predicted"]["efficiency"]["layer_cycles"] == EFFICIENCY["apple"].layer_cycles
    code, out, _ = run(capsys, *args, "-o", str(tmp_path / "n.yaml"))
    assert code == 0 and json.loads(out)["gpu"]["spec"]["vendor"] == "nvidia"        # the default, as before


def test_plan_json_matches_the_file(capsys, tmp_path):
    import yaml
    code, out, _ = run(capsys, "plan", "--gpu", "t4", "--model", "mistral-7b", "--json", "-o", str(tmp_path / "p.yaml"))
    assert code == 0 and json.loads(out) == yaml.safe_load((tmp_path / "p.yaml").read_text())


def test_table_output_mentions_the_budget(capsys, tmp_path):
    code, out, _ = run(capsys, "plan", "--gpu", "rtx4090", "--model", "llama2-70b", "-o", str(tmp_path / "p.yaml"))
    assert code == 0 and "GPU memory" in out and "Decisions" in out and "reserve" in out


def test_gpus_and_models_json(capsys):
    code, out, _ = run(capsys, "gpus", "--json", "--filter", "24GB")
    gpus = json.loads(out)
    assert code == 0 and any(g["id"] == "rtx4090" for g in gpus)
    assert all({"id", "name", "memory_bytes", "bandwidth_gb_s", "fp16_tflops", "int8_tops", "host_link_gb_s"} <= set(g)
               for g in gpus)
    code, out, _ = run(capsys, "models", "--json", "--filter", "llama")
    models = json.loads(out)
    assert code == 0 and len(models) >= 8
    assert all({"id", "name", "params", "layers", "hidden_size", "heads", "kv_heads", "vocab_size"} <= set(m)
               for m in models)


def test_hf_config_json(capsys, tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
           "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
           "tie_word_embeddings": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, out, _ = run(capsys, "plan", "--gpu", "t4", "--model", str(path), "--json", "-o", str(tmp_path / "p.yaml"))
    assert code == 0 and json.loads(out)["model"]["params"] == 494032768      # Qwen2.5-0.5B, as published


def test_hf_config_json_of_newer_families(tmp_path):
    """Qwen3-MoE: the experts' width is moe_intermediate_size and their count num_experts (Qwen3-30B-A3B's
    config.json: 30.5B parameters, 3.3B active, per its model card), and its norm_topk_prob says whether the k
    weights are renormalized (the engines run only that; transformers' default, when the key is absent, is not
    to); Gemma 3: an image-text config plans its text_config, with Gemma's four norms a layer and tied
    embeddings."""
    from planner.spec import active_param_count, engine_gaps, param_count, spec_from_hf_config
    cfg = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
           "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
           "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 151936,
           "max_position_embeddings": 40960, "tie_word_embeddings": False}
    moe = spec_from_hf_config(cfg, "Qwen3-30B-A3B")
    assert moe.num_experts == 128 and moe.intermediate_size == 768
    assert param_count(moe) == pytest.approx(30.5e9, rel=0.005)
    assert active_param_count(moe) == pytest.approx(3.3e9, rel=0.03)
    assert moe.moe_renormalize and not engine_gaps(moe)
    for raw in ({**cfg, "norm_topk_prob": False}, {k: v for k, v in cfg.items() if k != "norm_topk_prob"}):
        plain = spec_from_hf_config(raw, "Qwen3-MoE, unrenormalized")
        assert not plain.moe_renormalize and engine_gaps(plain) == ["moe_renormalize=False"]
    gemma = spec_from_hf_config({"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208, "max_position_embeddings": 131072,
        "sliding_window": 1024}}, "gemma-3-4b-it")
    assert (gemma.family, gemma.norms_per_layer, gemma.tie_embeddings, gemma.head_dim) == ("gemma3", 4, True, 256)
    assert (gemma.sliding_window, gemma.sliding_window_pattern) == (1024, 6)       # Gemma3TextConfig's default


# The layer pattern of sliding-window attention, from each way a config.json states it
BASE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 12, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 8192}


@pytest.mark.parametrize("extra, window, pattern", [
    ({"model_type": "gemma2", "sliding_window": 4096}, 4096, 2),                 # the modeling code alternates
    ({"model_type": "gemma3_text", "sliding_window": 512, "sliding_window_pattern": 4}, 512, 4),
    ({"model_type": "gemma3_text", "sliding_window": 512,
      "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2}, 512, 6),
    ({"model_type": "mistral", "sliding_window": 4096}, 4096, 0),               # Mistral 7B v0.1: every layer
    ({"model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}, 0, 0),   # stated, unused
    ({"model_type": "qwen3", "sliding_window": None}, 0, 0),
    ({"model_type": "gemma3_text", "sliding_window": 512, "layer_types": ["full_attention"] * 12}, 0, 0),
])
def test_sliding_window_from_config(extra, window, pattern):
    from planner.spec import spec_from_hf_config
    spec = spec_from_hf_config({**BASE, **extra}, "m")
    assert (spec.sliding_window, spec.sliding_window_pattern) == (window, pattern)
    slides = [spec.is_sliding(i) for i in range(spec.num_layers)]
    if "layer_types" in extra:
        assert slides == [t == "sliding_attention" for t in extra["layer_types"]]
    assert sum(slides) == (0 if not window else 12 if not pattern else 12 - 12 // pattern)


def test_gpt_oss_config_json_counts_every_bias_and_sink(db):
    """openai/gpt-oss-20b's config.json: biases on q, k, v, o, the router and every expert linear, a sink per
    head, sliding layers first; the count is the database entry's, which rounds to llama.cpp's 20.91 B."""
    from planner.spec import param_count, spec_from_hf_config
    cfg = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
           "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
           "num_experts_per_tok": 4, "vocab_size": 201088, "max_position_embeddings": 131072, "sliding_window": 128,
           "layer_types": ["sliding_attention", "full_attention"] * 12, "attention_bias": True,
           "tie_word_embeddings": False, "rope_theta": 150000, "rms_norm_eps": 1e-5}
    spec = spec_from_hf_config(cfg, "gpt-oss-20b")
    assert (spec.family, spec.qkv_bias, spec.extra_bias, spec.attn_sinks) == ("gpt_oss", True, True, True)
    assert (spec.sliding_window, spec.sliding_window_pattern) == (128, 2)
    assert spec.is_sliding(0) and not spec.is_sliding(1)
    assert param_count(spec) == 20_914_757_184 == param_count(db.find_model("gpt-oss-20b"))
    assert round(param_count(spec) / 1e9, 2) == 20.91


def _tiny_gguf(path, arch, keys, tensors):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in keys:
        if isinstance(value, list):
            w.add_array(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_token_list([f"t{i}" for i in range(100)])
    for name, shape in tensors:
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gpt_oss_gguf_metadata(tmp_path):
    """A gpt-oss GGUF: llama.cpp's own layer pattern (every other layer a window) and window from its metadata,
    biases on every linear and the sinks from the architecture."""
    from planner.spec import spec_from_gguf
    keys = [("embedding_length", 64), ("feed_forward_length", 64), ("expert_feed_forward_length", 64),
            ("block_count", 2), ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 256),
            ("expert_count", 4), ("expert_used_count", 2), ("attention.sliding_window", 16),
            ("attention.key_length", 16)]
    tensors = [("token_embd.weight", (100, 64)), ("blk.0.attn_q.bias", (64,)), ("blk.1.attn_q.bias", (64,)),
               ("output.weight", (100, 64))]
    spec = spec_from_gguf(_tiny_gguf(tmp_path / "gpt-oss.gguf", "gpt-oss", keys, tensors))
    assert (spec.family, spec.qkv_bias, spec.extra_bias, spec.attn_sinks) == ("gpt_oss", True, True, True)
    assert (spec.sliding_window, spec.sliding_window_pattern, spec.num_experts, spec.head_dim) == (16, 2, 4, 16)


def test_deepseek_and_glm_gguf_metadata(tmp_path):
    """llama.cpp's deepseek2 GGUF (MLA as its converter writes it: one KV head of latent + rope, the per-head widths
    under key_length_mla / value_length_mla) and glm4moe (block_count counts the MTP layer, which is left out); a
    DeepSeek GGUF converted before MLA support is refused in one line."""
    from planner.spec import ModelSourceError, spec_from_gguf
    blocks = [(f"blk.{i}.attn_norm.weight", (64,)) for i in range(4)] + [("blk.1.exp_probs_b.bias", (4,)),
                                                                        ("token_embd.weight", (100, 64)),
                                                                        ("output.weight", (100, 64))]
    common = [("embedding_length", 64), ("feed_forward_length", 128), ("expert_feed_forward_length", 32),
              ("expert_count", 4), ("expert_used_count", 2), ("expert_shared_count", 1),
              ("leading_dense_block_count", 1), ("attention.head_count", 4), ("context_length", 256)]
    mla = [("block_count", 3), ("attention.head_count_kv", 1), ("attention.key_length", 24),
           ("attention.value_length", 16), ("attention.q_lora_rank", 32), ("attention.kv_lora_rank", 16),
           ("rope.dimension_count", 8)]
    ds = spec_from_gguf(_tiny_gguf(tmp_path / "ds.gguf", "deepseek2", common + mla + [
        ("attention.key_length_mla", 24), ("attention.value_length_mla", 16)], blocks))
    assert (ds.family, ds.is_mla, ds.head_dim, ds.v_head_dim, ds.rope_head_dim, ds.kv_lora_rank) == (
        "deepseek_v3", True, 24, 16, 8, 16)
    assert (ds.dense_layers, ds.dense_intermediate_size, ds.shared_experts, ds.router_bias) == (1, 128, 1, True)
    with pytest.raises(ModelSourceError, match="before llama.cpp's MLA support"):
        spec_from_gguf(_tiny_gguf(tmp_path / "old.gguf", "deepseek2", common + mla, blocks))
    glm = spec_from_gguf(_tiny_gguf(tmp_path / "glm.gguf", "glm4moe", common + [
        ("block_count", 4), ("nextn_predict_layers", 1), ("attention.head_count_kv", 2)], blocks))
    assert (glm.family, glm.num_layers, glm.is_mla, glm.shared_experts) == ("glm4_moe", 3, False, 1)


def test_llama4_gguf_metadata(tmp_path):
    """llama.cpp's llama4 GGUF: the expert width from expert_feed_forward_length, the shared expert from its
    tensors, chunked attention as llama.cpp's load_hparams sets it (8192, every fourth layer global); Maverick's
    interleaved dense layers are refused."""
    from planner.spec import ModelSourceError, spec_from_gguf
    keys = [("embedding_length", 64), ("feed_forward_length", 128), ("expert_feed_forward_length", 32),
            ("block_count", 4), ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 256),
            ("expert_count", 4), ("expert_used_count", 1)]
    tensors = [(f"blk.{i}.attn_norm.weight", (64,)) for i in range(4)] + [
        ("blk.0.ffn_gate_shexp.weight", (32, 64)), ("token_embd.weight", (100, 64)), ("output.weight", (100, 64))]
    spec = spec_from_gguf(_tiny_gguf(tmp_path / "scout.gguf", "llama4", keys, tensors))
    assert (spec.family, spec.intermediate_size, spec.shared_experts) == ("llama4", 32, 1)
    assert (spec.sliding_window, spec.sliding_window_pattern) == (8192, 4) and not spec.is_sliding(3)
    with pytest.raises(ModelSourceError, match="interleave_moe_layer_step 2"):
        spec_from_gguf(_tiny_gguf(tmp_path / "maverick.gguf", "llama4", keys + [("interleave_moe_layer_step", 2)],
                                  tensors))


def test_hybrid_linear_attention_gguf_metadata(tmp_path):
    """llama.cpp's qwen3next / qwen35moe GGUFs: the linear-attention widths from the ssm.* keys, full attention in
    every full_attention_interval-th layer, the gated shared expert; a multi-token-prediction block is left out."""
    from planner.spec import spec_from_gguf
    keys = [("embedding_length", 64), ("feed_forward_length", 128), ("expert_feed_forward_length", 32),
            ("expert_shared_feed_forward_length", 32), ("block_count", 5), ("nextn_predict_layers", 1),
            ("attention.head_count", 4), ("attention.head_count_kv", 2), ("attention.key_length", 32),
            ("context_length", 256), ("expert_count", 4), ("expert_used_count", 2), ("ssm.conv_kernel", 4),
            ("ssm.state_size", 16), ("ssm.group_count", 2), ("ssm.time_step_rank", 4), ("ssm.inner_size", 64),
            ("full_attention_interval", 4)]
    tensors = [(f"blk.{i}.attn_norm.weight", (64,)) for i in range(5)] + [
        ("blk.0.ffn_gate_inp_shexp.weight", (64,)), ("token_embd.weight", (100, 64)), ("output.weight", (100, 64))]
    spec = spec_from_gguf(_tiny_gguf(tmp_path / "q35.gguf", "qwen35moe", keys, tensors))
    assert (spec.family, spec.num_layers, spec.linear_attention_interval) == ("qwen3_5_moe", 4, 4)
    assert (spec.linear_head_dim, spec.linear_key_heads, spec.linear_value_heads, spec.linear_conv_kernel) == (
        16, 2, 4, 4)
    assert (spec.shared_experts, spec.shared_expert_gate, spec.attn_output_gate) == (1, True, True)
    assert [spec.is_linear(i) for i in range(4)] == [True, True, True, False]


def test_deepseek_and_glm_config_json(db):
    """DeepSeek-V3's config.json (MLA, 3 dense layers, 256 routed + 1 shared expert, e_score_correction_bias) and
    GLM-4.5-Air's (1 dense layer, 128 routed + 1 shared, q/k/v biases): the counts of the database entries, 671.03B
    (README_WEIGHTS.md's 671B main model) and 106.85B (ik_llama.cpp's load log without the MTP layer)."""
    from planner.spec import param_count, spec_from_hf_config
    ds = spec_from_hf_config({
        "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "vocab_size": 129280, "max_position_embeddings": 163840,
        "tie_word_embeddings": False, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3,
        "topk_method": "noaux_tc", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128}, "DeepSeek-V3")
    assert (ds.is_mla, ds.head_dim, ds.dense_layers, ds.shared_experts, ds.router_bias) == (True, 192, 3, 1, True)
    assert param_count(ds) == 671_026_419_200 == param_count(db.find_model("deepseek-r1"))
    glm = spec_from_hf_config({
        "model_type": "glm4_moe", "hidden_size": 4096, "num_hidden_layers": 46, "num_attention_heads": 96,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151552, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "attention_bias": True}, "GLM-4.5-Air")
    assert param_count(glm) == 106_852_251_264 == param_count(db.find_model("glm-4.5-air"))
    assert round(param_count(glm) / 1e9, 2) == 106.85


@pytest.mark.parametrize("extra", [
    {"layer_types": ["sliding_attention", "full_attention", "full_attention"] * 4},   # not the last of every N
    {"sliding_window": -1}, {"sliding_window_pattern": "six"}])
def test_sliding_window_config_errors(extra):
    from planner.spec import ModelSourceError, spec_from_hf_config
    with pytest.raises(ModelSourceError, match="^m: .*(sliding|layer_types)"):
        spec_from_hf_config({**BASE, "model_type": "gemma3_text", "sliding_window": 512, **extra}, "m")


def test_llama4_config_json(db):
    """Llama 4 Scout's config.json (the multimodal wrapper): its text_config gives the database entry, every
    fourth layer global (no_rope_layers 0) and the others chunked over 8192 tokens; Maverick's dense layers
    between the MoE ones are refused in one line."""
    from planner.spec import ModelSourceError, param_count, spec_from_hf_config
    text = {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
            "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 202048, "max_position_embeddings": 262144, "rope_theta": 500000.0, "num_local_experts": 16,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "attention_chunk_size": 8192,
            "no_rope_layers": [1, 1, 1, 0] * 12, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
    scout = spec_from_hf_config({"model_type": "llama4", "text_config": text}, "Llama-4-Scout")
    entry = db.find_model("llama4-scout")
    assert param_count(scout) == param_count(entry) == 107_769_861_120
    assert (scout.sliding_window, scout.sliding_window_pattern, scout.shared_experts) == (8192, 4, 1)
    assert [i for i in range(48) if not scout.is_sliding(i)] == list(range(3, 48, 4))
    with pytest.raises(ModelSourceError, match="^Maverick: interleave_moe_layer_step 2"):
        spec_from_hf_config({"model_type": "llama4", "text_config": {**text, "interleave_moe_layer_step": 2}},
                            "Maverick")


def test_hybrid_linear_attention_config_json(db):
    """Qwen3-Next's config.json (top level) and Qwen3.5's (text_config of the image-text checkpoint): the database
    entries' exact counts, full attention in every fourth layer (full_attention_interval or layer_types), the
    gated shared expert from shared_expert_intermediate_size."""
    from planner.spec import ModelSourceError, param_count, spec_from_hf_config
    nxt = {"model_type": "qwen3_next", "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 48,
           "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 151936,
           "max_position_embeddings": 262144, "rope_theta": 10000000, "tie_word_embeddings": False,
           "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
           "shared_expert_intermediate_size": 512, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
           "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}
    spec = spec_from_hf_config(nxt, "Qwen3-Next")
    assert param_count(spec) == param_count(db.find_model("qwen3-next-80b-a3b")) == 79_674_391_296
    assert [i for i in range(48) if not spec.is_linear(i)] == list(range(3, 48, 4))
    text = {"hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 64, "num_attention_heads": 24,
            "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 248320, "max_position_embeddings": 262144,
            "tie_word_embeddings": False, "attn_output_gate": True, "linear_num_key_heads": 16,
            "linear_num_value_heads": 48, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4, "rope_parameters": {"rope_theta": 10000000, "partial_rotary_factor": 0.25},
            "layer_types": ["linear_attention"] * 3 * 16}
    text["layer_types"] = [("full" if (i + 1) % 4 == 0 else "linear") + "_attention" for i in range(64)]
    dense = spec_from_hf_config({"model_type": "qwen3_5", "text_config": text}, "Qwen3.5-27B")
    assert param_count(dense) == param_count(db.find_model("qwen3.5-27b")) == 26_895_998_464
    assert dense.rope_theta == 1e7 and dense.linear_attention_interval == 4
    with pytest.raises(ModelSourceError, match="^m: layer_types mixes linear and full attention"):
        spec_from_hf_config({"model_type": "qwen3_5", "text_config": {**text, "layer_types": ["full_attention"] +
                             ["linear_attention"] * 63}}, "m")


def test_mistral3_config_json(db):
    """Mistral's image-text checkpoints (model_type mistral3): the text_config's own model type decides the family:
    Mistral Small 3.1's mistral, Ministral 3's ministral3 (YaRN positions vramwise's engine does not run)."""
    from planner.spec import engine_gaps, param_count, spec_from_hf_config
    text = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 34, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072, "max_position_embeddings": 262144,
            "tie_word_embeddings": False, "rope_theta": 1000000.0}
    m8 = spec_from_hf_config({"model_type": "mistral3", "text_config": {**text, "model_type": "ministral3"}}, "M3-8B")
    assert m8.family == "ministral3" and param_count(m8) == param_count(db.find_model("ministral-3-8b"))
    assert "family ministral3" in engine_gaps(m8)
    small = {**text, "model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40}
    s31 = spec_from_hf_config({"model_type": "mistral3", "text_config": small}, "Mistral-Small-3.1")
    assert s31.family == "mistral" and param_count(s31) == param_count(db.find_model("mistral-small-3.1-24b"))


@pytest.mark.parametrize("family,drop", [("llama", "vocab_size"), ("qwen3_moe", "moe_intermediate_size"),
                                         ("deepseek_v3", "kv_lora_rank")])
def test_missing_config_key_names_the_file(tmp_path, capsys, family, drop):
    """A key with no default that config.json lacks: one line naming the file and the key, exit 2."""
    cfg = {**BASE, "model_type": family, "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
           "kv_lora_rank": 64, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
           "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1}
    del cfg[drop]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["plan", "--gpu", "rtx4090", "--model", str(path), "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and f"lacks '{drop}'" in err, err


def test_database_gemmas_slide_as_published(db):
    """Gemma 2 alternates local and global layers; Gemma 3 has 5 local to 1 global (model cards)."""
    for model, local in (("gemma2-9b", 21), ("gemma2-27b", 23), ("gemma3-27b", 52), ("gemma3-4b", 29)):
        spec = db.find_model(model)
        assert sum(spec.is_sliding(i) for i in range(spec.num_layers)) == local, model


def test_gguf_metadata(capsys, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("embedding_length", 64), ("feed_forward_length", 128), ("block_count", 2),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 256)]:
        getattr(w, "add_uint32")(f"llama.{key}", value)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, out, _ = run(capsys, "plan", "--gpu", "t4", "--model", str(path), "--json", "-o", str(tmp_path / "p.yaml"))
    doc = json.loads(out)
    assert code == 0 and doc["model"]["spec"]["num_layers"] == 2 and doc["model"]["spec"]["vocab_size"] == 100


def test_truncated_gguf_is_one_line(capsys, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code, _, err = run(capsys, "plan", "--gpu", "t4", "--model", str(path), "-o", str(tmp_path / "p.yaml"))
    assert code == 2 and "bad.gguf" in err and len(err.strip().splitlines()) == 1


def test_plan_path_imports_no_engine(tmp_path):
    code = ("import sys; from planner.cli import main; "
            f"main(['plan','--gpu','rtx4090','--model','llama2-7b','-o',r'{tmp_path / 'p.yaml'}','--quiet']); "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('numba','cupy','refengine','gpuengine')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("args", [["plan", "--gpu", "t4", "--model", "llama2-7b", "--mode", "gpu"],
                                  ["plan", "--gpu", "t4"], ["nonsense"], []])
def test_argument_errors_are_one_line(capsys, args):
    """argparse's own errors (a bad choice, a missing argument, an unknown command) are one line on stderr,
    exit 2, like every other bad input."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "error:" in err and "--help" in err


def test_gemma4_config_json(db):
    """Gemma 4's config.json (the image-text wrapper): its text_config gives the database entries, down to the
    full-attention layers' own geometry (4 KV heads of 512 in the 31B where the sliding layers have 16 of 256, no
    v projection) and the 26B-A4B's dense MLP beside its experts; the E2B/E4B's per-layer embeddings are refused."""
    from planner import memory as mem
    from planner.formats import KV_FORMATS
    from planner.spec import ModelSourceError, param_count, spec_from_hf_config
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 10
    text = {"model_type": "gemma4_text", "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 60,
            "num_attention_heads": 32, "num_key_value_heads": 16, "num_global_key_value_heads": 4, "head_dim": 256,
            "global_head_dim": 512, "attention_k_eq_v": True, "sliding_window": 1024, "layer_types": types,
            "vocab_size": 262144, "tie_word_embeddings": True, "max_position_embeddings": 262144,
            "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0}
    dense = spec_from_hf_config({"model_type": "gemma4", "text_config": text}, "gemma-4-31B-it")
    assert param_count(dense) == param_count(db.find_model("gemma4-31b")) == 30_697_345_280
    f16 = KV_FORMATS["fp16"]
    assert [mem.kv_bytes_per_token_at(dense, f16, i) for i in (0, 5)] == [16 * 256 * 2 * 2, 4 * 512 * 2 * 2]
    assert [dense.has_v_at(i) for i in (4, 5, 59)] == [True, False, False]
    moe = {**text, "hidden_size": 2816, "intermediate_size": 2112, "num_hidden_layers": 30, "num_attention_heads": 16,
           "num_key_value_heads": 8, "num_global_key_value_heads": 2, "layer_types": types[:30],
           "enable_moe_block": True, "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704}
    spec = spec_from_hf_config({"model_type": "gemma4", "text_config": moe}, "gemma-4-26B-A4B-it")
    assert param_count(spec) == param_count(db.find_model("gemma4-26b-a4b")) == 25_233_053_440
    assert (spec.shared_experts, spec.norms_per_layer, spec.num_experts) == (3, 7, 128)
    for bad, message in (({"intermediate_size": "x"}, "intermediate_size 'x' is not a layer width"),
                         ({"moe_intermediate_size": 0}, "moe_intermediate_size 0 is not a layer width")):
        with pytest.raises(ModelSourceError, match=message):
            spec_from_hf_config({"model_type": "gemma4", "text_config": {**moe, **bad}}, "m")
    with pytest.raises(ModelSourceError, match="^e4b: Gemma 4 with per-layer embeddings"):
        spec_from_hf_config({"model_type": "gemma4", "text_config": {**text, "hidden_size_per_layer_input": 256}},
                            "e4b")


def test_gemma4_gguf_metadata(tmp_path):
    """llama.cpp's gemma4 GGUF: per-layer KV heads and sliding pattern arrays, the two head widths, no attn_v in a
    full-attention layer, the dense MLP beside the experts; per-layer embeddings (E2B/E4B) are refused."""
    from planner.spec import ModelSourceError, spec_from_gguf
    slides = [True] * 5 + [False]
    keys = [("embedding_length", 64), ("feed_forward_length", 96), ("expert_feed_forward_length", 32),
            ("block_count", 6), ("attention.head_count", 4), ("attention.head_count_kv", [2] * 5 + [1]),
            ("attention.key_length", 32), ("attention.key_length_swa", 16), ("attention.sliding_window", 8),
            ("attention.sliding_window_pattern", slides), ("context_length", 256), ("expert_count", 4),
            ("expert_used_count", 2)]
    tensors = [(f"blk.{i}.attn_v.weight", (32, 64)) for i in range(5)] + [
        ("blk.5.attn_k.weight", (32, 64)), ("token_embd.weight", (100, 64))]
    spec = spec_from_gguf(_tiny_gguf(tmp_path / "g4.gguf", "gemma4", keys, tensors))
    assert (spec.num_kv_heads, spec.global_kv_heads, spec.head_dim, spec.global_head_dim) == (2, 1, 16, 32)
    assert (spec.sliding_window, spec.sliding_window_pattern, spec.global_k_eq_v) == (8, 6, True)
    assert (spec.shared_experts, spec.norms_per_layer, spec.tie_embeddings, spec.qk_norm) == (3, 7, True, True)
    with pytest.raises(ModelSourceError, match="per-layer embeddings"):
        spec_from_gguf(_tiny_gguf(tmp_path / "e4b.gguf", "gemma4", keys + [("embedding_length_per_layer_input", 8)],
                                  tensors))
    short = [(k, [2] * 5 if k == "attention.head_count_kv" else v) for k, v in keys]
    with pytest.raises(ModelSourceError, match="head_count_kv is not one count a layer"):
        spec_from_gguf(_tiny_gguf(tmp_path / "bad.gguf", "gemma4", short, tensors))


def test_kimi_k2_and_minimax_m2_config_json(db):
    """Kimi K2's config.json says model_type kimi_k2 for DeepSeek-V3's architecture; MiniMax-M2's is its own family
    (256 experts with a routing bias, q/k norms). Both give the database entries' counts."""
    from planner.spec import param_count, spec_from_hf_config
    kimi = {"model_type": "kimi_k2", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 61, "first_k_dense_replace": 1, "n_routed_experts": 384, "n_shared_experts": 1,
            "num_experts_per_tok": 8, "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
            "vocab_size": 163840, "tie_word_embeddings": False, "max_position_embeddings": 131072,
            "topk_method": "noaux_tc", "moe_layer_freq": 1}
    spec = spec_from_hf_config(kimi, "Kimi-K2-Instruct")
    assert spec.family == "deepseek_v3" and param_count(spec) == param_count(db.find_model("kimi-k2"))
    assert param_count(spec) == 1_026_408_232_448                 # the checkpoint's weights, FP8 scales aside
    mm = {"model_type": "minimax_m2", "hidden_size": 3072, "intermediate_size": 1536, "num_hidden_layers": 62,
          "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 256,
          "num_experts_per_tok": 8, "vocab_size": 200064, "tie_word_embeddings": False,
          "max_position_embeddings": 196608, "use_routing_bias": True, "use_qk_norm": True, "rotary_dim": 64}
    spec = spec_from_hf_config(mm, "MiniMax-M2")
    assert (spec.family, spec.router_bias, spec.qk_norm) == ("minimax_m2", True, True)
    assert param_count(spec) == param_count(db.find_model("minimax-m2")) == 228_689_764_864 - 428_544


def test_minimax_m2_gguf_metadata(tmp_path):
    """llama.cpp's minimax-m2 GGUF: its family, the experts' routing bias and q/k norms from the architecture."""
    from planner.spec import spec_from_gguf
    keys = [("embedding_length", 64), ("feed_forward_length", 32), ("expert_feed_forward_length", 32),
            ("block_count", 2), ("attention.head_count", 4), ("attention.head_count_kv", 2),
            ("attention.key_length", 16), ("context_length", 256), ("expert_count", 8), ("expert_used_count", 2)]
    tensors = [(f"blk.{i}.attn_norm.weight", (64,)) for i in range(2)] + [
        ("token_embd.weight", (100, 64)), ("output.weight", (100, 64))]
    spec = spec_from_gguf(_tiny_gguf(tmp_path / "mm.gguf", "minimax-m2", keys, tensors))
    assert (spec.family, spec.router_bias, spec.qk_norm, spec.num_experts, spec.head_dim) == (
        "minimax_m2", True, True, 8, 16)
