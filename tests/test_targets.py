"""Plans for llama.cpp, ExLlamaV2 and vLLM: published figures, budgets, and bad input."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from planner import memory as mem
from planner.budget import Host
from planner.cli import main
from planner.formats import KV_FORMATS
from planner.spec import param_count
from planner.targets import TargetError, TargetRequest, exllamav2, gguf, llamacpp, plan_target, vllm

FIGURES = yaml.safe_load((Path(__file__).parent / "data" / "published_figures.yaml").read_text())["figures"]
HOST = Host(64 << 30)


def predict(fig: dict, db) -> float:
    spec = db.find_model(fig["model"])
    kind = fig["kind"]
    if kind in ("gguf_bpw", "gguf_gib"):
        nbytes = sum(gguf.file_bytes(spec, gguf.tensor_types(spec, fig["ftype"], fig["imatrix"])).values())
        return 8 * nbytes / param_count(spec) if kind == "gguf_bpw" else nbytes / 2**30
    if kind == "llamacpp_kv_mib":
        return sum(llamacpp.kv_layer_bytes(spec, fig["ctx"], fig["kv"])) / 2**20
    if kind == "llamacpp_recurrent_mib":
        return sum(b for i, b in enumerate(llamacpp.kv_layer_bytes(spec, 4096, "fp16")) if spec.is_linear(i)) / 2**20
    if kind == "llamacpp_compute_mib":
        return llamacpp.compute_buffer_bytes(spec, fig["ctx"], fig["flash_attn"], True) / 2**20
    if kind == "vllm_weights_gib":
        return vllm.stage_items(spec, "bf16", fig["tp"], 1, 0, 2048)["weights"] / 2**30
    if kind == "vllm_activation_gib":
        return vllm.activation_bytes(spec, fig["tp"], fig["batched_tokens"]) / 2**30
    if kind in ("vllm_blocks", "vllm_kv_gib"):
        gpu = db.find_gpu(fig["gpu"])
        items = vllm.stage_items(spec, "bf16", fig["tp"], 1, 0, fig["batched_tokens"])
        free = vllm.kv_memory_bytes(gpu.memory_bytes, fig["utilization"], items)
        if kind == "vllm_kv_gib":
            return free / 2**30
        return free // vllm.block_bytes(spec, spec.num_layers, fig["tp"], 2)
    if kind == "exl2_gb":
        lin = sum(t.numel for t in exllamav2.layer_linears(spec))
        total = (fig["bpw"] * lin / 8 + sum(exllamav2._norm_bytes(spec)) + exllamav2.head_bytes(spec, fig["head_bits"])
                 + spec.hidden_size * 2 + spec.vocab_size * spec.hidden_size * 2)
        return total / 1e9
    raise AssertionError(kind)


@pytest.mark.parametrize("fig", [f for f in FIGURES if f["checked"]], ids=lambda f: f["id"])
def test_published_figure(fig, db):
    got = predict(fig, db)
    if fig["tolerance"] == 0:
        assert got == pytest.approx(fig["value"], abs=0.005), fig["source"]     # MiB printed to 2 decimals
    else:
        assert abs(got - fig["value"]) <= fig["tolerance"] * fig["value"], (got, fig["source"])


def test_every_figure_names_its_source():
    kinds = {f["kind"] for f in FIGURES}
    assert {"gguf_bpw", "llamacpp_kv_mib", "llamacpp_compute_mib", "vllm_blocks", "vllm_activation_gib",
            "exl2_gb"} <= kinds
    assert all(f["source"] and f["value"] > 0 for f in FIGURES)
    assert all(f.get("note") for f in FIGURES if not f["checked"])


def test_compute_buffer_is_the_largest_live_set_not_a_sum(db):
    spec = db.find_model("llama3-8b")
    n, mib = llamacpp.N_UBATCH, 2**20
    # short context, flash attention: the logits of the micro-batch and the final norm set the peak
    assert llamacpp.compute_buffer_bytes(spec, 4096, True, True) == n * (spec.vocab_size + spec.hidden_size) * 4
    # without the head on this card the peak is a layer's, far below the logits
    assert llamacpp.compute_buffer_bytes(spec, 4096, True, False) < 150 * mib
    # without flash attention the n_kv x n_ubatch x heads score matrix grows with the context
    assert llamacpp.compute_buffer_bytes(spec, 65536, False, True) > 65536 * n * spec.num_heads * 4
    assert llamacpp.compute_buffer_bytes(spec, 65536, True, True) < 600 * mib


def test_vllm_activation_peak_does_not_shrink_below_the_sampler_with_tp(db):
    spec = db.find_model("llama3-8b")
    sampler = vllm.SAMPLER_COPIES * vllm.MAX_NUM_SEQS * spec.vocab_size * 4
    assert vllm.activation_bytes(spec, 1, 8192) >= sampler and vllm.activation_bytes(spec, 8, 8192) == sampler


def test_ggml_block_sizes_are_llama_cpps():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    for name, size in gguf.GGML_TYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == size


def test_kv_q8_is_34_bytes_per_32_values(db):
    spec = db.find_model("qwen2.5-32b")
    assert mem.kv_bytes_per_token(spec, KV_FORMATS["q8"]) == 2 * spec.num_kv_heads * spec.head_dim // 32 * 34
    assert mem.kv_bytes_per_token(spec, KV_FORMATS["q4"]) == 2 * spec.num_kv_heads * spec.head_dim // 32 * 18


def test_exl2_qparams_bits_match_exllamav2s_table():
    # 4-bit, group 128 on a 5120 x 5120 linear: about 4.03 bpw (shared/docs/background.md's table says 4.03)
    bits = exllamav2.qparams_bits(5120, 13824, 128, ((1.0, 4),))
    assert 4.0 < bits / (5120 * 13824) < 4.05


def _req(db, model, gpu, cards=1, nodes=1, vram=None, **kw):
    g = db.find_gpu(gpu)
    if vram:
        g = dataclasses.replace(g, memory_bytes=vram)
    return TargetRequest(db.find_model(model), g, HOST, cards, nodes, **kw)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["llama.cpp", "exllamav2", "vllm"]),
       model=st.sampled_from(["llama2-7b", "mistral-7b", "qwen2.5-1.5b", "mixtral-8x7b", "gemma3-27b"]),
       gib=st.integers(6, 96), cards=st.sampled_from([1, 2]), ctx=st.sampled_from([None, 2048, 8192]))
def test_a_target_plan_never_exceeds_its_budget(db, target, model, gib, cards, ctx):
    req = _req(db, model, "rtx4090", cards, vram=gib << 30, ctx=ctx)
    try:
        out = plan_target(target, req)
    except TargetError:
        return
    assert len(out.per_gpu) == cards
    for card in out.per_gpu:
        assert all(v >= 0 for v in card.values())
        assert sum(card.values()) <= req.gpu.memory_bytes
    assert out.ctx == (ctx or out.ctx)


def test_llamacpp_offloads_moe_experts_to_the_cpu(db):
    out = plan_target("llama.cpp", _req(db, "mixtral-8x7b", "rtx4060"))
    assert out.mode == "offload" and out.settings["n_cpu_moe"] > 0 and out.host["weights.cpu_layers"] > 0


def test_llamacpp_partial_offload_of_a_dense_model(db):
    out = plan_target("llama.cpp", _req(db, "llama2-70b", "rtx4060"))
    assert out.mode == "offload" and 0 < out.settings["n_gpu_layers"] < 80


def test_llamacpp_sliding_window_layers_keep_the_window(db):
    """llama.cpp's iSWA cache (llama-kv-cache-iswa.cpp): Gemma 3's 52 local layers of 62 keep
    min(n_ctx, 1024 + n_ubatch) cells rounded up to 256, its 10 global layers n_ctx (also rounded up to 256);
    Mistral 7B v0.1 runs as the llama architecture, which has no SWA cache, so its 4096-token window keeps every
    cell."""
    gemma, mistral = db.find_model("gemma3-27b"), db.find_model("mistral-7b")
    cells = llamacpp.kv_cells(gemma, 32768)
    assert cells.count(1536) == 52 and cells.count(32768) == 10 and cells[5] == cells[11] == 32768
    assert set(llamacpp.kv_cells(gemma, 5000)) == {5120, 1536}      # n_ctx padded to 256 (ggml-org/llama.cpp#17046)
    assert set(llamacpp.kv_cells(gemma, 1000)) == {1024}             # the window's cache is never larger than n_ctx's
    assert set(llamacpp.kv_cells(mistral, 32768)) == {32768}
    row = mem.kv_bytes_per_token(gemma, KV_FORMATS["fp16"])
    out = plan_target("llama.cpp", _req(db, "gemma3-27b", "rtx4090", ctx=32768))
    assert out.mode == "gpu" and out.items["kv_cache"] == (10 * 32768 + 52 * 1536) * row
    # offloaded: the layers on the CPU keep their own caches there, and the two parts add up to the whole
    part = plan_target("llama.cpp", _req(db, "gemma3-27b", "rtx4060", ctx=32768))
    assert part.mode == "offload" and part.host["kv_cache.cpu_layers"] > 0
    assert part.items["kv_cache"] + part.host["kv_cache.cpu_layers"] == (10 * 32768 + 52 * 1536) * row
    assert "52 of 62 layers attend over a 1024-token sliding window" in dict(
        (w, y) for w, _, y in out.decisions)["kv_cache"]


def test_vllm_hybrid_kv_groups_match_a_published_gemma3_log(db):
    """vLLM V1's hybrid KV cache manager on google/gemma-3-4b-it (ovg-project/kvcached#215, an A100, 2025-11-13):
    'Add 1 padding layers', 'GPU KV cache size: 317,136 tokens' (blocks // 7 groups x 16) and 'Maximum concurrency
    for 3,072 tokens per request: 102.78x' (blocks / blocks a request takes). 34 layers, 5 global: groups of 5, one
    global and six sliding (30 slots for 29 layers); a 3072-token request takes 192 blocks in the global group and
    ceil(min(1023 + 2048, 3072) / 16) + 1 = 193 in each sliding one, 1350 in all, and 138,753 blocks give both
    logged figures."""
    g = vllm.KVGroups(db.find_model("gemma3-4b"), (0, 34), 1, 2, 2048)
    assert (g.group, g.full_groups, g.sliding_groups) == (5, 1, 6) and g.group * g.sliding_groups - 29 == 1
    assert g.blocks_for(3072) == 1350
    blocks = 138_753
    assert blocks // 7 * 16 == 317_136 and round(blocks / g.blocks_for(3072), 2) == 102.78
    # a model without sliding layers: one group of every layer, a block per 16 tokens
    llama = vllm.KVGroups(db.find_model("llama3-8b"), (0, 32), 1, 2, 2048)
    assert (llama.group, llama.sliding_groups, llama.blocks_for(4097), llama.max_tokens(100)) == (32, 0, 257, 1600)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(["gemma3-27b", "gemma2-9b", "gemma3-1b", "mistral-7b"]),
       blocks=st.integers(0, 200_000), batched=st.sampled_from([2048, 8192]))
def test_vllm_max_tokens_is_the_longest_request_the_blocks_hold(db, model, blocks, batched):
    spec = db.find_model(model)
    g = vllm.KVGroups(spec, (0, spec.num_layers), 1, 2, batched)
    n = g.max_tokens(blocks)
    assert n % vllm.BLOCK_SIZE == 0 and g.blocks_for(n) <= blocks < g.blocks_for(n + vllm.BLOCK_SIZE)


def test_vllm_plans_gemma3_with_the_hybrid_manager(db):
    """A 32K-token Gemma 3 27B request on one H100: the sliding layers' groups keep a window each, so the cache
    the plan holds is far below 62 layers x 32768 tokens, and still takes the request."""
    out = plan_target("vllm", _req(db, "gemma3-27b", "H100 SXM", ctx=32768))
    spec = db.find_model("gemma3-27b")
    g = vllm.KVGroups(spec, (0, 62), 1, 2, out.settings["max_num_batched_tokens"])
    assert g.max_tokens(out.settings["gpu_blocks"]) >= 32768
    assert out.items["kv_cache"] == out.settings["gpu_blocks"] * g.block
    assert "hybrid KV cache manager" in dict((w, y) for w, _, y in out.decisions)["kv_cache"]


def test_gpt_oss_plans_its_native_mxfp4(db):
    """llama.cpp plans gpt-oss in the MXFP4_MOE files it ships as (experts MXFP4, the rest Q8_0), with the 128-token
    sliding layers' 768-cell cache (ggml-org/llama.cpp#17609's log at -c 4096), and offloads 120B's experts to host
    RAM on a 24 GB card; vLLM serves the MXFP4 checkpoint and prices decode on the 4 routed experts of 32."""
    spec = db.find_model("gpt-oss-20b")
    assert llamacpp.kv_cells(spec, 4096).count(768) == 12
    out = plan_target("llama.cpp", _req(db, "gpt-oss-20b", "rtx4090"))
    assert out.mode == "gpu" and out.settings["ftype"] == "MXFP4_MOE"
    assert out.weights["bytes_by_type"].keys() == {"MXFP4", "Q8_0", "F32"}
    big = plan_target("llama.cpp", _req(db, "gpt-oss-120b", "rtx4090"))
    assert big.mode == "offload" and big.settings["n_cpu_moe"] > 0
    g = vllm.KVGroups(spec, (0, 24), 1, 2, 8192)                     # vLLM: 12 global and 12 sliding layers
    assert (g.group, g.full_groups, g.sliding_groups) == (12, 1, 1)
    v = plan_target("vllm", _req(db, "gpt-oss-20b", "H100 SXM"))
    assert v.settings["weights"] == "mxfp4" and 4.5 < v.weights["avg_bpw"] < 4.8     # 4.25 experts, 16 attention
    all_experts = vllm._weights_per_gpu(spec, "mxfp4", 1, (0, 24), True, True)
    routed = vllm._weights_per_gpu(spec, "mxfp4", 1, (0, 24), True, True, active=True)
    assert 12e9 < all_experts < 15e9 and routed < all_experts / 3       # embedding: one row a token


def test_deepseek_caches_one_latent_row_and_keeps_its_shared_expert_on_the_gpu(db):
    """MLA: a token caches the 512-value latent and the 64-value rotary key, one row a layer (llama.cpp's V-less cache
    since ggml-org/llama.cpp#19067: 2196 MiB at 32768 cells and f16; vLLM's MLA blocks the same, on every TP rank).
    --n-cpu-moe moves the routed experts only: the shared expert and the dense layers stay on the GPU."""
    spec = db.find_model("deepseek-r1")
    assert mem.kv_bytes_per_token(spec, KV_FORMATS["fp16"]) == 576 * 2
    assert sum(llamacpp.kv_layer_bytes(spec, 32768, "fp16")) == 2196 * 2**20
    assert vllm.block_bytes(spec, 61, 8, 1) == 16 * 61 * 576
    cats = {t.name: t for t in gguf.gguf_tensors(spec)}
    assert not cats["layers.5.shared.gate"].expert and cats["blk.5.ffn_gate_exps"].expert
    assert cats["layers.5.attn.kv_b.k_b"].ncols == 128 and cats["layers.5.attn.kv_b.v_b"].ncols == 512
    types = gguf.tensor_types(spec, "Q4_K_M")
    assert types["layers.5.attn.kv_b.k_b"] in ("Q5_0", "Q8_0")          # rows of 128: no 256-value K-quant block
    out = plan_target("llama.cpp", _req(db, "deepseek-r1", "rtx4090", bpw=2.5))
    assert out.mode == "offload" and out.settings["n_cpu_moe"] > 0 and out.items["kv_cache"] < 2**30


@pytest.mark.parametrize("model", ["qwen3-8b", "qwen3-30b-a3b", "gemma3-27b", "falcon-180b", "gpt-oss-20b",
                                   "deepseek-r1", "glm-4.5-air"])
def test_exllamav2_refuses_families_its_version_does_not_load(db, model):
    with pytest.raises(TargetError, match="ExLlamaV2 0.2.8 does not load .*--target llama.cpp or vllm"):
        plan_target("exllamav2", _req(db, model, "h100 sxm"))


def test_llamacpp_decode_at_the_end_of_the_context_reads_the_cache_too(db):
    """A token deep into the context also reads every cached position (a sliding layer only its SWA cache): Llama
    3.1 8B at 65536 tokens is about half as fast as at the start, Gemma 3 27B at 32768 loses far less (52 of its
    62 layers read a 1536-cell cache). Published: gpt-oss 120B on a DGX Spark, 59.02 tok/s at depth 0 and 41.35
    at 32768 (llama.cpp benches/dgx-spark.md; benchmarks/validate_published.py has the predictions)."""
    llama = plan_target("llama.cpp", _req(db, "llama3.1-8b", "rtx4090", ctx=65536))
    gemma = plan_target("llama.cpp", _req(db, "gemma3-27b", "rtx4090", ctx=32768))
    assert 0.4 < llama.decode_s / llama.decode_full_s < 0.6
    assert 0.8 < gemma.decode_s / gemma.decode_full_s < 0.95
    for target in ("exllamav2", "vllm"):          # the other engines price the same cache read
        out = plan_target(target, _req(db, "llama3.1-8b", "h100 sxm", ctx=32768))
        assert 0.6 < out.decode_s / out.decode_full_s < 0.95, target
    g = plan_target("vllm", _req(db, "gemma3-27b", "h100 sxm", ctx=32768))
    assert g.decode_s / g.decode_full_s > 0.9                       # vLLM's sliding layers read their window
    spark = TargetRequest(db.find_model("gpt-oss-120b"), db.find_gpu("DGX Spark"), HOST, 1, 1)
    start, deep = (1 / llamacpp.decode_seconds_for(spark, "MXFP4_MOE", None, d) for d in (0, 32768))
    assert start == pytest.approx(59.02, rel=0.15) and deep == pytest.approx(41.35, rel=0.15)


def test_llamacpp_weights_beyond_ram_come_from_disk(db):
    """llama.cpp memory-maps the GGUF: host-side weights beyond RAM (less the OS's share) are read from disk. Dense
    layers, scanned in order, miss the page cache entirely; experts, picked by the router, hit it in proportion."""
    def plan(model, gpu, ram):
        req = dataclasses.replace(_req(db, model, gpu), host=Host(ram))
        out = plan_target("llama.cpp", req)
        return out, dict((w, y) for w, _, y in out.decisions).get("storage", "")
    roomy, why = plan("gpt-oss-120b", "rtx4090", 128 << 30)
    tight, tight_why = plan("gpt-oss-120b", "rtx4090", 32 << 30)
    assert not why and "come from disk" in tight_why and tight.decode_s > 2 * roomy.decode_s
    weights = tight.host["weights.token_embd"] + tight.host["weights.cpu_layers"]
    share = 1 - ((32 << 30) - llamacpp.HOST_OS_RESERVE_BYTES - tight.host["kv_cache.cpu_layers"]) / weights
    assert f"{share:.0%} of the CPU's weight reads" in tight_why
    _, dense_why = plan("llama2-70b", "rtx4060", 16 << 30)
    assert "100% of the CPU's weight reads come from disk" in dense_why


def test_llamacpp_quantized_v_uses_flash_attention(db):
    out = plan_target("llama.cpp", _req(db, "llama3.1-8b", "rtx4060", kv="q4"))
    assert out.settings["cache_type_v"] == "q4_0" and out.settings["flash_attn"] == "on"


def test_exllamav2_fits_70b_on_a_4090_at_the_articles_bpw(db):
    out = plan_target("exllamav2", _req(db, "llama2-70b", "rtx4090"))
    assert 2.3 <= out.settings["bpw"] <= 2.6 and out.settings["head_bits"] == 6


def test_vllm_multinode_is_pipeline_parallel(db):
    out = plan_target("vllm", _req(db, "llama3.1-405b", "h100-sxm", 8, 2))
    s = out.settings
    assert (s["tensor_parallel_size"], s["pipeline_parallel_size"]) == (8, 2) and len(out.per_gpu) == 16
    assert s["gpu_blocks"] * 16 >= s["max_model_len"]


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["--target", "tensorrt"], "unknown target 'tensorrt'"),
    (["--target", "llama.cpp", "--nodes", "2"], "only --target vllm plans across nodes"),
    (["--nodes", "2"], "only --target vllm"),
    (["--target", "exllamav2", "--gpu", "rtx4060", "--model", "llama2-70b"], "has no CPU offload"),
    (["--target", "vllm", "--kv", "q4"], "vLLM has no q4"),
    (["--target", "llama.cpp", "--kv", "fp8"], "llama.cpp has no fp8 KV cache"),
    (["--target", "vllm", "--gpus", "3"], "divisible by --tensor-parallel-size"),
])
def test_bad_target_input_is_one_line_and_exit_2(capsys, tmp_path, args, message):
    base = {"--gpu": "rtx4090", "--model": "llama2-7b"}
    for i in range(0, len(args) - 1):
        if args[i] in base:
            base[args[i]] = args[i + 1]
    rest = [a for i, a in enumerate(args) if a not in base and (i == 0 or args[i - 1] not in base)]
    argv = ["plan", "--gpu", base["--gpu"], "--model", base["--model"], *rest, "-o", str(tmp_path / "p.yaml")]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def test_target_plan_file_records_target_budget_and_reasons(capsys, tmp_path):
    path = tmp_path / "p.yaml"
    code, out, _ = run(capsys, "plan", "--gpu", "rtx4090", "--model", "llama2-70b", "--target", "llama.cpp",
                       "-o", str(path))
    doc = yaml.safe_load(path.read_text())
    assert code == 0 and "GPU memory" in out
    assert doc["target"]["name"] == "llama.cpp" and doc["target"]["settings"]["ftype"]
    assert sum(doc["memory"]["items"].values()) == doc["memory"]["total_bytes"] <= doc["memory"]["budget_bytes"]
    assert {d["what"] for d in doc["decisions"]} >= {"mode", "file_type", "kv_cache", "n_gpu_layers"}


def test_a_target_plan_is_refused_by_vramwise_run(tmp_path, capsys):
    from planner.plan import PlanFileError, load_plan
    path = tmp_path / "p.yaml"
    assert main(["plan", "--gpu", "t4", "--model", "qwen2.5-0.5b", "--target", "vllm", "--quiet", "-o", str(path)]) == 0
    with pytest.raises(PlanFileError, match="vramwise export"):
        load_plan(path)


def test_plan_path_imports_no_engine():
    import subprocess
    import sys
    code = ("import sys; from planner.cli import main; main(['plan','--gpu','t4','--model','llama2-7b','--target',"
            "'llama.cpp','--quiet','-o','/dev/null']); assert 'numba' not in sys.modules and 'cupy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_llamacpp_sliding_layers_read_their_whole_swa_cache(db):
    """Flash attention reads every cell of the SWA cache's view, masked or not: the window plus a micro-batch.
    Published (llama.cpp benches/dgx-spark.md, -ub 2048): Gemma 3 4B Q4_0 on a DGX Spark, 78.97 tok/s at depth 0
    and 68.94 at 4096, a ratio of 0.873. Reading the 1024-token window alone would predict 0.93."""
    spec = db.find_model("gemma3-4b")
    row = mem.kv_bytes_per_token(spec, KV_FORMATS["fp16"])
    sliding = [spec.is_sliding(i) for i in range(spec.num_layers)]
    assert llamacpp.kv_read_bytes(spec, "fp16", 4096, 2048) == [row * (3072 if s else 4096) for s in sliding]
    assert llamacpp.kv_read_bytes(spec, "fp16", 1000, 2048) == [row * 1024] * spec.num_layers   # padded to 256
    assert llamacpp.kv_read_bytes(spec, "fp16", 0) == [0] * spec.num_layers
    spark = TargetRequest(spec, db.find_gpu("DGX Spark"), HOST, 1, 1)
    start, deep = (llamacpp.decode_seconds_for(spark, "Q4_0", None, d, 2048) for d in (0, 4096))
    assert start / deep == pytest.approx(68.94 / 78.97, rel=0.03)


def test_quantized_cache_gets_flash_attentions_f16_copy_on_cuda(db):
    """ggml-cuda's launch_fattn converts a quantized layer's K and V to f16 in the CUDA pool (one layer, all its
    cells). Published (RTX 3090, master 36b101543, n_ctx 131072): Llama 3 8B's compute buffer grows by 436.08 MiB
    with a q8_0 cache, where that build pre-allocates the copy (one layer's 512 MiB less what it shares);
    DeepSeek-V2-Lite's by 138.14 MiB (its 576-wide K, 144 MiB; V is a view)."""
    llama, ds, mib = db.find_model("llama3.1-8b"), db.find_model("deepseek-v2-lite"), 2**20
    assert llamacpp.fa_convert_bytes(llama, 131072, "q8", "nvidia") == 512 * mib
    assert 436.08 * mib <= llamacpp.fa_convert_bytes(llama, 131072, "q4", "amd") <= 512 * mib
    assert 138.14 * mib <= llamacpp.fa_convert_bytes(ds, 131072, "q8", "nvidia") == 144 * mib
    assert llamacpp.fa_convert_bytes(llama, 131072, "fp16", "nvidia") == 0       # f16 is read as it is
    assert llamacpp.fa_convert_bytes(llama, 131072, "q8", "apple") == 0          # Metal reads q8_0 itself
    out = plan_target("llama.cpp", _req(db, "llama3.1-8b", "rtx3090", ctx=131072, kv="q8"))
    assert out.per_gpu[0]["fa_convert"] == 512 * mib
    tight = plan_target("llama.cpp", _req(db, "codestral-22b", "rtx3060", ctx=32768, kv="q8"))   # partial offload:
    assert sum(tight.per_gpu[0].values()) <= db.find_gpu("rtx3060").memory_bytes               # placed with it


def test_quantized_cache_read_costs_more_than_its_bytes_on_cuda(db):
    """A q8_0 cache is not cheaper to attend over than an f16 one on CUDA (benchmarks/fit_kv_read.py): the vec
    kernel reads the q8_0 bytes and dequantizes every element for each query head, QUANT_CACHE_DEQUANT_CYCLES SM
    cycles apiece, so the cost grows with the query heads a KV head serves and shrinks with the card's SMs and
    clock; an MLA cache is copied to f16 every token (q8_0 bytes + the copy written and read). Vulkan is priced at
    what is cached (Metal: test_metal_reads_the_cache_once_per_query_head)."""
    llama, ds, gemma = (db.find_model(m) for m in ("llama3.1-8b", "deepseek-v2-lite", "gemma-2b"))
    f16 = llamacpp.kv_read_bytes(llama, "fp16", 32768)
    q8 = llamacpp.kv_read_bytes(llama, "q8", 32768)
    assert llamacpp.kv_read_cost(llama, "fp16", 32768, "nvidia") == f16
    assert llamacpp.kv_read_cost(llama, "q8", 32768, "intel") == q8             # Vulkan: its bytes
    assert llamacpp.kv_read_cost(llama, "q8", 32768, "nvidia") == q8
    d16, d8 = (llamacpp.kv_read_bytes(ds, kv, 32768) for kv in ("fp16", "q8"))
    assert llamacpp.kv_read_cost(ds, "q8", 32768, "nvidia") == [q + 2 * f for q, f in zip(d8, d16)]
    r3090, laptop, arc = (db.find_gpu(g) for g in ("rtx3090", "rtx5070-laptop", "arc-b580"))
    sec = llamacpp.kv_dequant_seconds(llama, "q8", 32768, r3090)
    # 32768 cells x 32 query heads x 128 x 2 (K and V) elements a layer, at 0.065 cycles over 82 SMs at 1695 MHz
    assert sec == pytest.approx([0.065 * 32768 * 32 * 128 * 2 / (82 * 1695e6)] * 32)
    assert llamacpp.kv_dequant_seconds(llama, "fp16", 32768, r3090) == [0.0] * 32
    assert llamacpp.kv_dequant_seconds(llama, "q8", 32768, arc) == [0.0] * 32          # not ggml-cuda's kernel
    assert llamacpp.kv_dequant_seconds(ds, "q8", 32768, r3090) == [0.0] * ds.num_layers  # converted instead
    assert sum(llamacpp.kv_dequant_seconds(llama, "q8", 32768, laptop)) > 1.6 * sum(sec)  # 36 SMs at 2347 MHz
    g = sum(llamacpp.kv_dequant_seconds(gemma, "q8", 32768, r3090)) / gemma.num_layers   # 8 query heads a KV head
    assert g == pytest.approx(sum(sec) / 32 * (8 * 256) / (32 * 128))


def test_kv_read_constants_are_the_fitted_ones():
    fit = yaml.safe_load((Path(__file__).parents[1] / "benchmarks" / "results" / "kv_read_fit.json").read_text())
    assert llamacpp.QUANT_CACHE_DEQUANT_CYCLES == fit["quant_cache_dequant_cycles"]
    assert fit["vec_rows"] >= 11 and fit["worst_residual"] < 0.1


def test_exllamav2_quantized_cache_is_dequantized_before_each_layers_attention(db):
    """ExLlamaV2's Q4/Q8 caches are converted to the fp16 buffer up to the current position before each layer's
    attention (cache.py get_kv_state): deep into the context a token moves the quantized bytes and an fp16 K and
    V written and read, more than an FP16 cache's read. At the start the weights dominate either way."""
    fp16, q4 = (plan_target("exllamav2", _req(db, "llama3.1-8b", "rtx4090", ctx=65536, kv=kv)) for kv in ("fp16", "q4"))
    assert q4.decode_full_s > fp16.decode_full_s * 1.3
    assert q4.decode_s == pytest.approx(fp16.decode_s, rel=0.05)


def test_hybrid_linear_attention_in_llamacpp(db):
    """Qwen3-Next: only its 12 full-attention layers cache tokens; its 36 Gated DeltaNet layers keep 75.38 MiB of f32
    state (llama_memory_recurrent's published size) whatever the context and cache type, read and written every
    token. vLLM 0.10.1 and ExLlamaV2 0.2.8 are refused in one line."""
    spec, mib = db.find_model("qwen3-next-80b-a3b"), 2**20
    linear = [spec.is_linear(i) for i in range(spec.num_layers)]
    assert sum(linear) == 36
    row = mem.kv_bytes_per_token(spec, KV_FORMATS["fp16"])
    for ctx in (4096, 262144):
        per_layer = llamacpp.kv_layer_bytes(spec, ctx, "q8")
        assert sum(b for b, lin in zip(per_layer, linear) if lin) == pytest.approx(75.375 * mib)
        assert sum(b for b, lin in zip(per_layer, linear) if not lin) == 12 * ctx * mem.kv_bytes_per_token(
            spec, KV_FORMATS["q8"])
    read = llamacpp.kv_read_bytes(spec, "fp16", 0)
    assert sum(read) == 2 * 75.375 * mib                 # at any depth the state is read and written
    assert sum(llamacpp.kv_read_bytes(spec, "fp16", 8192)) == 2 * 75.375 * mib + 12 * 8192 * row
    out = plan_target("llama.cpp", _req(db, "qwen3-next-80b-a3b", "rtx4090", ctx=65536))
    assert out.kv_bytes_per_token == 12 * row
    assert out.per_gpu[0]["kv_cache"] == 12 * 65536 * row + 36 * mem.recurrent_state_bytes(spec)
    with pytest.raises(TargetError, match="vLLM 0.10.1 does not plan .*linear-attention"):
        plan_target("vllm", _req(db, "qwen3.5-27b", "h100 sxm"))
    with pytest.raises(TargetError, match="ExLlamaV2 0.2.8 does not load"):
        plan_target("exllamav2", _req(db, "qwen3.5-27b", "h100 sxm"))


def test_metal_reads_the_cache_once_per_query_head(db):
    """Metal's flash attention: a token deep into the context costs the cache's bytes x query heads per KV head x
    0.96 (benchmarks/fit_kv_read.py); latent attention and the linear layers' state are priced at their bytes."""
    qwen = db.find_model("qwen3.5-27b")
    read = llamacpp.kv_read_bytes(qwen, "fp16", 100000)
    cost = llamacpp.kv_read_cost(qwen, "fp16", 100000, "apple")
    assert cost == pytest.approx([b if qwen.is_linear(i) else b * 6 * 0.96 for i, b in enumerate(read)])
    ds = db.find_model("deepseek-v2-lite")
    assert llamacpp.kv_read_cost(ds, "fp16", 8192, "apple") == llamacpp.kv_read_bytes(ds, "fp16", 8192)
    fit = yaml.safe_load((Path(__file__).parents[1] / "benchmarks" / "results" / "kv_read_fit.json").read_text())
    assert llamacpp.METAL_CACHE_READ_COST == fit["metal_cache_read_cost"]


def test_plans_say_when_their_decode_rate_is_optimistic(db):
    """A Tesla P100 (cc 6.0) has no dp4a, so llama.cpp's quantized decode is compute-bound there, and hybrid
    linear-attention models run kernels the model prices as an attention layer's: both plans say so; a plain
    model on a plain card, or a custom card of unknown compute capability, does not."""
    def speed(model, gpu, **kw):
        out = plan_target("llama.cpp", _req(db, model, gpu, **kw))
        return [why for what, choice, why in out.decisions if what == "speed" and choice == "optimistic"]
    assert "no dp4a" in speed("llama3.1-8b", "p100-pcie-16gb")[0]
    assert "linear-attention" in speed("qwen3.5-27b", "rtx-pro-6000")[0]
    assert speed("llama3.1-8b", "rtx4090") == [] and speed("llama3.1-8b", "tesla-p40") == []
    custom = dataclasses.replace(db.find_gpu("rtx4090"), id="custom", compute_capability="0.0")
    out = plan_target("llama.cpp", TargetRequest(db.find_model("llama3.1-8b"), custom, HOST))
    assert out.decisions and not [d for d in out.decisions if d[0] == "speed"]


def test_gemma4_plans_for_llamacpp_only(db):
    """Gemma 4: llama.cpp plans cache each layer in its own geometry (a full-attention layer half a sliding one's
    bytes a cell, at every cell of the context) and say which build loads it; vLLM 0.10.1 and ExLlamaV2 0.2.8,
    which predate it, refuse it in one line."""
    spec = db.find_model("gemma4-31b")
    out = plan_target("llama.cpp", _req(db, "gemma4-31b", "rtx-a6000", ctx=32768))
    full = [b for i, b in enumerate(llamacpp.kv_layer_bytes(spec, 32768, "fp16")) if not spec.is_sliding(i)]
    assert full == [32768 * 4 * 512 * 2 * 2] * 10 and out.per_gpu[0]["kv_cache"] == sum(
        llamacpp.kv_layer_bytes(spec, 32768, "fp16"))
    assert [d for d in out.decisions if d[0] == "build"][0][1] == "b8639 or later"
    assert not [d for d in out.decisions if d[0] == "speed"]          # the dense 31B: within 15% on the R9700
    moe = plan_target("llama.cpp", _req(db, "gemma4-26b-a4b", "rtx-a6000"))
    assert "MoE layers" in [d for d in moe.decisions if d[0] == "speed"][0][2]
    for target, message in (("vllm", "predates Gemma 4 31B"), ("exllamav2", "does not load Gemma 4 31B")):
        with pytest.raises(TargetError, match=message):
            plan_target(target, _req(db, "gemma4-31b", "rtx-a6000"))


def test_engines_older_than_a_model_refuse_it(db):
    """vLLM 0.10.1 (August 2025) does not load MiniMax-M2 (October 2025); llama.cpp's January 2026 master does."""
    with pytest.raises(TargetError, match="vLLM 0.10.1 .* predates MiniMax-M2"):
        plan_target("vllm", _req(db, "minimax-m2", "h100-sxm", cards=4))
    out = plan_target("llama.cpp", _req(db, "minimax-m2", "h100-sxm", cards=4))
    assert out.per_gpu and 1 / out.decode_s > 0
