"""Planning: the issue's reference cases, budget invariants, monotonicity, byte-function consistency."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import hwdb
from planner import memory as mem
from planner.budget import Host, assess, avg_bpw
from planner.formats import KV_FORMATS
from planner.optimize import PlanError, Request, make_plan
from planner.spec import tensors

DB = hwdb.load()
HOST = Host(64 * 2**30)
SMALL_MODELS = ["smollm2-135m", "qwen2.5-0.5b", "tinyllama-1.1b", "gemma2-2b", "phi3-mini", "llama2-7b", "mixtral-8x7b"]


def plan(model, gpu="rtx4090", **kw):
    return make_plan(Request(DB.find_model(model), kw.pop("gpu_spec", None) or DB.find_gpu(gpu), kw.pop("host", HOST), **kw))


def fits(out, gpu_memory):
    return all(sum(card.values()) <= gpu_memory for card in out.assessment.per_gpu)


def test_llama2_70b_on_rtx4090_lands_on_the_articles_answer():
    out = plan("llama2-70b")
    bpw = avg_bpw(out.layout.assignment and DB.find_model("llama2-70b"), out.layout.assignment)
    assert out.layout.mode == "gpu" and out.layout.ctx == 4096
    assert 2.3 <= bpw <= 2.55
    assert fits(out, DB.find_gpu("rtx4090").memory_bytes)
    assert sum(out.assessment.items.values()) == out.assessment.total
    assert out.solution.exact


def test_405b_on_an_8gb_card_streams():
    gpu = dataclasses.replace(DB.find_gpu("rtx4060"), memory_bytes=8 * 2**30)
    out = plan("llama3.1-405b", gpu_spec=gpu)
    assert out.layout.mode == "stream"
    assert 1 / out.assessment.decode_s < 1          # seconds per token, not tokens per second
    assert fits(out, gpu.memory_bytes)


def test_offload_when_model_fits_in_ram():
    out = plan("llama2-70b", "t4")
    assert out.layout.mode == "offload" and fits(out, DB.find_gpu("t4").memory_bytes)
    k = sum(b - a for a, b in out.layout.gpu_layers)
    assert 0 < k < 80 and out.layout.gpu_layers[0][1] == 80          # the last layers sit on the GPU
    assert "stream" in out.alternatives and "offload" in out.alternatives


def test_offload_on_nvidia_streams_the_host_layers_as_the_cuda_engine_runs_them():
    """vramwise's CUDA engine computes every layer on the GPU: an offload plan prices two layer buffers and
    every layer's KV cache on the card, the host layers pinned in RAM, and decode as GPU time plus their
    copies (no CPU compute). On an AMD card (no vramwise engine) offload stays llama.cpp's CPU split."""
    spec = DB.find_model("llama2-70b")
    out = plan("llama2-70b", "t4")
    lay, a = out.layout, out.assessment
    first = lay.gpu_layers[0][0]
    assert lay.mode == "offload" and 0 < first < spec.num_layers and fits(out, DB.find_gpu("t4").memory_bytes)
    layer_bytes = mem.layer_weight_bytes(spec, lay.assignment)
    card = a.per_gpu[0]
    assert card["weights.stream_buffers"] == 2 * max(layer_bytes[:first])
    assert card["kv_cache"] == spec.num_layers * lay.ctx * mem.kv_bytes_per_token(spec, lay.kv)
    assert a.host == {"embedding": mem.global_weight_bytes(spec)["embed"], "weights.streamed": sum(layer_bytes[:first])}
    assert a.traffic.cpu_bytes == 0 and a.traffic.link_bytes == sum(layer_bytes[:first])
    assert 1 / a.decode_s > out.alternatives["stream"]["decode_tokens_per_s"]       # fewer bytes over the link
    amd = plan("llama2-70b", "rx7900xtx", mode="offload")
    assert amd.layout.mode == "offload" and "compute.cpu" in amd.assessment.host
    assert "weights.stream_buffers" not in amd.assessment.per_gpu[0]


def test_mode_can_be_forced():
    out = plan("llama2-70b", "rtx4090", mode="stream")
    assert out.layout.mode == "stream" and set(out.alternatives) == {"stream"}
    assert plan("llama2-7b", "rtx4090", mode="offload").layout.mode == "offload"
    with pytest.raises(PlanError, match="cannot be forced"):
        plan("llama2-7b", "rtx4090", mode="gpu")


def test_two_cards_split_contiguously():
    out = plan("llama2-70b", "rtx3090", gpu_count=2)
    (a0, b0), (a1, b1) = out.layout.gpu_layers
    assert (a0, b1) == (0, 80) and b0 == a1 and 0 < b0 < 80
    assert fits(out, DB.find_gpu("rtx3090").memory_bytes)
    assert avg_bpw(DB.find_model("llama2-70b"), out.layout.assignment) > 4.0


def test_fixed_bpw_is_honoured():
    out = plan("llama2-70b", "a100-80gb-sxm", bpw=2.5)
    assert avg_bpw(DB.find_model("llama2-70b"), out.layout.assignment) <= 2.5


def test_explicit_ctx_and_kv_are_honoured():
    out = plan("llama2-70b", ctx=16384, kv="q4", reserve_bytes=int(1.5 * 2**30))
    assert out.layout.ctx == 16384 and out.layout.kv.name == "q4" and out.layout.reserve_bytes == int(1.5 * 2**30)


def test_kv_auto_chooses_by_expected_error():
    auto = plan("llama2-70b", kv="auto")
    for name in KV_FORMATS:
        fixed = plan("llama2-70b", kv=name)
        if fixed.layout.mode == "gpu":
            assert auto.expected_error <= fixed.expected_error + 1e-9


def test_nothing_fits_is_a_clear_error():
    tiny = dataclasses.replace(DB.find_gpu("t4"), memory_bytes=600 * 2**20)
    with pytest.raises(PlanError, match="does not fit"):
        plan("llama3.1-70b", gpu_spec=tiny)


@given(model=st.sampled_from(SMALL_MODELS), gib=st.floats(0.5, 100), ctx=st.sampled_from([None, 512, 2048, 8192]),
       kv=st.sampled_from([None, "fp16", "q8", "q4", "auto"]), count=st.integers(1, 3))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_plan_exceeds_its_budget(model, gib, ctx, kv, count):
    gpu = dataclasses.replace(DB.find_gpu("l4"), memory_bytes=int(gib * 2**30))
    try:
        out = plan(model, gpu_spec=gpu, ctx=ctx, kv=kv, gpu_count=count)
    except PlanError:
        return
    assert fits(out, gpu.memory_bytes)
    assert out.assessment.total == sum(out.assessment.items.values())


@given(model=st.sampled_from(SMALL_MODELS[:5]), gib=st.floats(0.8, 12), extra=st.floats(0.01, 8))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_more_memory_never_gives_higher_expected_error(model, gib, extra):
    small = dataclasses.replace(DB.find_gpu("l4"), memory_bytes=int(gib * 2**30))
    large = dataclasses.replace(small, memory_bytes=int((gib + extra) * 2**30))
    try:
        a = plan(model, gpu_spec=small, ctx=2048, kv="auto")
    except PlanError:
        return
    b = plan(model, gpu_spec=large, ctx=2048, kv="auto")
    if a.layout.mode == "gpu":
        assert b.layout.mode == "gpu" and b.expected_error <= a.expected_error + 1e-9


def test_planned_bytes_are_the_buffers_bytes():
    spec, kv = DB.find_model("llama2-7b"), KV_FORMATS["q8"]
    out = plan("llama2-7b", ctx=4096, kv="q8")
    card = out.assessment.per_gpu[0]
    kv_buffers = mem.kv_cache_buffers(spec, 4096, kv, range(spec.num_layers), 512)
    assert card["kv_cache"] == sum(b.nbytes for b in kv_buffers) == spec.num_layers * 4096 * mem.kv_bytes_per_token(spec, kv)
    # a sliding layer's cache is a ring of its window and a prefill chunk (Gemma 3 12B: 40 of 48 layers)
    g3 = DB.find_model("gemma3-12b")
    g3_card = plan("gemma3-12b", ctx=32768, kv="q8").assessment.per_gpu[0]
    rows = [mem.kv_rows(g3, 32768, 512, i) for i in range(g3.num_layers)]
    assert sorted(set(rows)) == [1024 + 512 - 1, 32768] and rows.count(32768) == 8
    assert g3_card["kv_cache"] == sum(rows) * mem.kv_bytes_per_token(g3, kv)
    state = mem.run_state_buffers(spec, 4096, 512)
    assert (card["compute.activations"] + card["compute.attention_scores"] + card["compute.gemm_staging"]
            + card["compute.logits"]) == sum(b.nbytes for b in state)
    layer_sum = sum(mem.tensor_bytes(t, out.layout.assignment.get(t.name)) for t in tensors(spec) if t.layer >= 0)
    assert card["weights.layers"] == layer_sum


def test_moe_decode_reads_only_routed_experts():
    spec = DB.find_model("mixtral-8x7b")
    out = plan("mixtral-8x7b", "a100-80gb-sxm")
    assert out.assessment.traffic.vram_bytes < 0.45 * out.assessment.items["weights.layers"]
    assert spec.experts_per_token == 2 and spec.num_experts == 8


def test_a_plan_says_when_vramwise_run_cannot_run_the_architecture_yet():
    """Gemma 4, Phi-4-mini's LongRoPE, DeepSeek's shared experts: the plan prices the CUDA engine but says
    `vramwise run` refuses the model, and what llama.cpp would make of it; Llama-family, dense Qwen3, Phi-4,
    Gemma 2 / 3 and routed-expert (Mixtral, Qwen3-MoE) plans say nothing."""
    for model, gap in (("gemma4-31b", "family gemma4"), ("phi-4-mini", "rope_scaling='longrope'"),
                       ("deepseek-v2-lite", "shared_experts")):
        out = plan(model, "rtx4090")
        (why,) = [w for what, choice, w in out.decisions if what == "engine"]
        assert gap in why and "--target llama.cpp" in why and "tok/s predicted" in why, why
    for model in ("llama2-70b", "mistral-7b", "qwen2.5-7b", "smollm2-135m", "qwen3-8b", "phi-4", "llama3.1-8b",
                  "gemma2-9b", "gemma3-27b", "qwen3-30b-a3b", "mixtral-8x7b"):
        assert not [d for d in plan(model, "rtx4090").decisions if d[0] == "engine"]


def test_the_planner_and_the_engines_agree_on_what_runs():
    from planner.spec import engine_gaps
    from refengine.model import UnsupportedModel, check_supported
    for spec in DB.models.values():
        try:
            check_supported(spec)
            refused = False
        except UnsupportedModel:
            refused = True
        assert refused == bool(engine_gaps(spec)), spec.id      # the engine refuses exactly what the plan flags


def test_a_context_past_a_sliding_window_runs():
    """The engines mask each sliding layer to its window: Mistral 7B v0.1 (every layer a 4096-token window) and
    Gemma 3 run past it, and the plan says nothing against it."""
    from refengine.model import check_supported
    for name, ctx in (("mistral-7b", 8192), ("gemma3-4b", 32768)):
        check_supported(DB.find_model(name))
        assert not [d for d in plan(name, "rtx4090", ctx=ctx).decisions if d[0] == "engine"]


def test_moe_prefill_groups_a_long_chunk_and_runs_a_short_one_as_slots():
    """The CUDA engine's prefill runs a 512-token chunk's routed experts grouped, for Mixtral's 8 experts of 14336
    and Qwen3-30B-A3B's 128 of 768 alike (an H200 measured grouped 7.1x and 3.0x faster than slots,
    benchmarks/results/gpu_decode_moe.json), and a few tokens as slots (a dequantized expert costs more than
    its few slots' matvecs); a single token never groups."""
    from planner.roofline import VRAMWISE_CUDA, moe_prefill_grouped
    mixtral, qwen = 3 * 4096 * 14336, 3 * 2048 * 768
    for sms in (24, 128, 132):
        assert moe_prefill_grouped(VRAMWISE_CUDA, 512, 2, 8, mixtral, sms)
        assert moe_prefill_grouped(VRAMWISE_CUDA, 512, 8, 128, qwen, sms)
        assert not moe_prefill_grouped(VRAMWISE_CUDA, 4, 2, 8, mixtral, sms)
        assert not moe_prefill_grouped(VRAMWISE_CUDA, 4, 8, 128, qwen, sms)
        assert not moe_prefill_grouped(VRAMWISE_CUDA, 1, 2, 8, mixtral, sms)


def test_streamed_moe_layers_move_only_their_routed_experts():
    """Mixtral 8x7B on an 8 GB card streams most layers: their slots hold each layer without its experts, and a
    decoded token moves the streamed layers' attention and router plus 2 of the 8 experts (read in place in
    host memory), not whole layers."""
    from planner import optimize as O
    req = O.Request(DB.find_model("mixtral-8x7b"), DB.find_gpu("rtx4060"), Host(ram_bytes=256 * 2**30))
    spec, items = req.model, O._items(req.model, None)
    lay = O._layer_offload(req, items, O._weights_at(items, O.FALLBACK_BPW), 4096, "fp16")
    a = assess(spec, req.gpu, 1, req.host, lay)
    assert lay.mode == "offload" and lay.host_experts == 0
    on_gpu = {i for s, e in lay.gpu_layers for i in range(s, e)}
    off = [i for i in range(spec.num_layers) if i not in on_gpu]
    whole = mem.layer_weight_bytes(spec, lay.assignment)
    core = mem.layer_stream_bytes(spec, lay.assignment)
    read = mem.layer_read_bytes(spec, lay.assignment)
    assert a.per_gpu[0]["weights.stream_buffers"] == 2 * max(core[i] for i in off) < 0.1 * max(whole)
    assert a.traffic.link_bytes == pytest.approx(sum(read[i] for i in off))
    experts = [whole[i] - core[i] for i in off]
    assert sum(read[i] for i in off) == pytest.approx(sum(core[i] for i in off) + sum(experts) / 4)


def test_an_moe_that_does_not_fit_keeps_the_fewest_layers_experts_in_host_memory():
    """Qwen3-235B-A22B on an RTX 4090 (256 GiB of RAM): every layer on the GPU but the routed experts of the first
    n layers, n as small as fits, read in place over the link; that decodes faster than the best layer offload,
    and the token's link bytes are its k of E experts of those n layers."""
    from planner import optimize as O
    req = O.Request(DB.find_model("qwen3-235b-a22b"), DB.find_gpu("rtx4090"), Host(ram_bytes=256 * 2**30))
    spec, gpu = req.model, req.gpu
    out = make_plan(req)
    lay, a = out.layout, out.assessment
    n = lay.host_experts
    assert lay.mode == "offload" and lay.gpu_layers == ((0, spec.num_layers),) and 0 < n < spec.num_layers
    assert a.total <= gpu.memory_bytes
    assert assess(spec, gpu, 1, req.host, dataclasses.replace(lay, host_experts=n - 1)).total > gpu.memory_bytes
    whole, core = mem.layer_weight_bytes(spec, lay.assignment), mem.layer_stream_bytes(spec, lay.assignment)
    assert a.host["weights.host_experts"] == sum(whole[i] - core[i] for i in range(n))
    read = mem.layer_read_bytes(spec, lay.assignment)
    assert a.traffic.link_bytes == pytest.approx(sum(read[i] - core[i] for i in range(n)))
    items = O._items(spec, None)
    sol = O._weights_at(items, O.FALLBACK_BPW)
    layered = O._layer_offload(req, items, sol, lay.ctx, lay.kv.name)
    assert assess(spec, gpu, 1, req.host, layered).decode_s > 1.4 * a.decode_s
    assert any(what == "mode" and "routed experts of the first" in why for what, _, why in out.decisions)
