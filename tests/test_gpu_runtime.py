"""The GPU engine's runtime, run on the CPU with reference launchers (tests/gpu_fake.py): it allocates exactly
what the planner prices, lays weights out exactly as the formats count them, streams layers through two
slots, and computes what refengine computes. The kernels are checked on a GPU in test_gpu_kernels.py."""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

import gpu_fake
from gpuengine.layout import build_image, image_bytes, qmeta_of, views
from planner import memory as mem
from planner.formats import SLICE_HEADER_BYTES, kv_format, parse_option
from refengine.api import Model, _Weights
from refengine.quant import quantize
from refengine.stream import layer_of
from refengine.tokenizer import Tokenizer
from test_stream import IDS, assignment, ckpt, run  # noqa: F401 - fixtures

TOKENIZER = Tokenizer(None, None, None, False, None, "none")


def gpu_model(monkeypatch, ckpt, assignment, resident, kv="q8", ctx=32, chunk=4):  # noqa: F811
    gpu_fake.install(monkeypatch)
    from gpuengine.api import GPUModel
    return GPUModel(ckpt, TOKENIZER, ctx, kv, chunk, _Weights(ckpt, assignment), resident)


@pytest.mark.parametrize("kv", ["fp16", "q8", "q4", "fp8"])
def test_decode_path_computes_what_the_reference_engine_does(monkeypatch, ckpt, assignment, kv):  # noqa: F811
    """chunk 1: every token through the fp32 matvec path, so only summation order differs."""
    ref = run(Model(ckpt, TOKENIZER, 32, kv, 1, assignment))
    got = run(gpu_model(monkeypatch, ckpt, assignment, range(6), kv, chunk=1))
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_prefill_path_computes_what_the_reference_engine_does(monkeypatch, ckpt, assignment):  # noqa: F811
    """chunk 4: prefill multiplies fp16 weights and activations (as cuBLAS does), so within fp16's rounding."""
    ref = run(Model(ckpt, TOKENIZER, 32, "fp16", 4, assignment))
    got = run(gpu_model(monkeypatch, ckpt, assignment, range(6), "fp16"))
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.9


@pytest.mark.parametrize("resident", [range(0), range(2, 5)], ids=["stream", "offload"])
def test_streamed_layers_give_the_resident_logits(monkeypatch, ckpt, assignment, resident):  # noqa: F811
    held = run(gpu_model(monkeypatch, ckpt, assignment, range(6)))
    model = gpu_model(monkeypatch, ckpt, assignment, resident)
    assert np.array_equal(run(model), held)
    layers = mem.layer_weight_bytes(ckpt.spec, assignment)
    streamed = [layers[i] for i in range(6) if i not in resident]
    slot = model.weights.slot_bytes // 2
    assert slot <= max(streamed) and model.weights.slot_bytes == 2 * slot


def test_state_is_exactly_what_the_planner_prices(monkeypatch, ckpt, assignment):  # noqa: F811
    model = gpu_model(monkeypatch, ckpt, assignment, range(6), "q4", ctx=32, chunk=4)
    spec = ckpt.spec
    planned = mem.run_state_buffers(spec, 32, 4, logits=True, gemm_staging=True)
    planned += mem.kv_cache_buffers(spec, 32, kv_format("q4"), range(spec.num_layers), 4)
    assert model.net.state.nbytes == mem.buffers_bytes(planned)
    # weights: the planner's bytes less the 12-byte slice tables the device does not keep
    headers = sum(SLICE_HEADER_BYTES * len(o.slice_rows(ckpt[n].shape[1])) for n, o in assignment.items())
    globals_ = mem.global_weight_bytes(spec)
    assert model.weights.resident_bytes == (sum(mem.layer_weight_bytes(spec, assignment)) - headers
                                            + globals_["head"] - SLICE_HEADER_BYTES + globals_["norm.final"])


@pytest.mark.parametrize("mode,resident", [("offload", range(2, 6)), ("stream", range(0))])
def test_offload_and_stream_state_is_what_the_planner_prices(monkeypatch, ckpt, assignment, mode, resident):  # noqa: F811
    """An offload plan on an NVIDIA card (the planner's streaming offload) and a stream plan: the engine holds
    every layer's KV cache and two layer slots, as the plan's card items say (slots less the slice tables)."""
    import hwdb
    from planner.budget import Layout, card_items
    spec, kv = ckpt.spec, kv_format("q8")
    lay = Layout(mode, assignment, 32, kv, 4, ((resident.start, resident.stop),) if len(resident) else ((0, 0),), 0, 16)
    layer_bytes = mem.layer_weight_bytes(spec, assignment)
    items = card_items(spec, hwdb.load().find_gpu("rtx4090"), lay, 0, layer_bytes)
    model = gpu_model(monkeypatch, ckpt, assignment, resident, "q8", ctx=32, chunk=4)
    kv_bytes = sum(int(a.nbytes) for name, a in model.net.state.arrays.items() if name.startswith("kv."))
    assert kv_bytes == items["kv_cache"] == spec.num_layers * 32 * mem.kv_bytes_per_token(spec, kv)
    headers = max(sum(SLICE_HEADER_BYTES * len(o.slice_rows(ckpt[n].shape[1])) for n, o in assignment.items()
                      if layer_of(n) == i) for i in range(spec.num_layers) if i not in resident)
    assert 0 <= items["weights.stream_buffers"] - model.weights.slot_bytes <= 2 * headers


def test_greedy_generation_matches_the_reference(monkeypatch, ckpt, assignment):  # noqa: F811
    ref = Model(ckpt, TOKENIZER, 32, "fp16", 4, assignment).generate(IDS, 8)
    assert gpu_model(monkeypatch, ckpt, assignment, range(6), "fp16").generate(IDS, 8) == ref


def test_layer_image_is_exactly_the_tensors_and_views_read_them_back(ckpt, assignment):  # noqa: F811
    weights = _Weights(ckpt, assignment)
    tensors = {n: weights[n] for n in weights.names if layer_of(n) == 1}
    image = build_image(tensors)
    assert image.nbytes == image_bytes(tensors)
    got = views(image.data, image)
    for name, value in tensors.items():
        if name in assignment:
            t = value.qtensor
            lin = got[name]
            assert lin.meta == qmeta_of(t) and lin.shape == t.shape
            for s, w, sc in zip(t.slices, lin.words, lin.scales):
                assert np.array_equal(w, s.qweight) and np.array_equal(sc.view(np.float16), s.scales)
                assert w.ctypes.data % 4 == 0
            assert (lin.perm is None) == (t.perm is None) and (t.perm is None or np.array_equal(lin.perm, t.perm))
        else:
            assert np.array_equal(got[name], value)


def test_cuda_out_of_memory_is_one_line_with_the_plans_prediction(monkeypatch, tmp_path, capsys):
    """What `run` says when the device runs out of memory (the stand-in raises CuPy's exception on load)."""
    import types

    from gpuengine import device
    from planner.cli import main

    class OutOfMemoryError(MemoryError):
        pass

    gpu_fake.install(monkeypatch)
    cupy = __import__("sys").modules["cupy"]
    cupy.cuda.memory = types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError)
    monkeypatch.setattr(device, "unavailable_reason", lambda: "")
    monkeypatch.setattr(device, "name", lambda: "Test GPU")

    def no_room(*args, **kwargs):
        raise OutOfMemoryError("out of memory allocating 1,073,741,824 bytes")
    monkeypatch.setattr("gpuengine.api.load_for_plan", no_room)
    plan = tmp_path / "plan.yaml"
    assert main(["plan", "--gpu", "rtx4060", "--model", "smollm2-135m", "--bpw", "4.0", "--ctx", "64", "-o", str(plan),
                 "--quiet"]) == 0
    assert main(["run", "--plan", str(plan), "--prompt", "hello", "--engine", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "CUDA out of memory on Test GPU" in err and "the plan predicted" in err and "NVIDIA GeForce RTX 4060" in err


def test_qkv_biases_and_a_tied_head_run_as_the_reference(monkeypatch, tmp_path):
    """A Qwen2-shaped model: q/k/v biases (the matvec's bias and prefill's add_bias) and a tied head."""
    from refengine.weights import load_checkpoint
    from test_stream import CONFIG as BASE
    from test_stream import random_tensors
    from test_weights import hf_folder

    cfg = dict(BASE, model_type="qwen2", num_hidden_layers=2, tie_word_embeddings=True)
    arrays = random_tensors(cfg, seed=3)
    del arrays["lm_head.weight"]
    rng = np.random.default_rng(4)
    for i in range(cfg["num_hidden_layers"]):
        for proj, width in (("q", 128), ("k", 32), ("v", 32)):
            arrays[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = rng.standard_normal(width).astype(np.float32)
    root, _ = hf_folder(tmp_path / "qwen", cfg, arrays)
    qwen = load_checkpoint(root)
    assert qwen.spec.qkv_bias and qwen.spec.tie_embeddings
    from planner.formats import HEAD_OPTION
    options = {n: HEAD_OPTION for n in qwen.tensors if n.rsplit(".", 1)[-1] in ("q", "k", "v", "o", "gate", "up", "down")}
    for chunk, bound in ((1, 1e-4), (4, 0.02)):             # the fp32 decode path, then fp16 prefill
        ref = run(Model(qwen, TOKENIZER, 32, "fp16", chunk, options))
        got = run(gpu_model(monkeypatch, qwen, options, range(2), "fp16", chunk=chunk))
        assert np.abs(got - ref).max() <= bound * np.abs(ref).max()


def test_a_quantize_directory_and_a_plan_load_through_the_gpu_api(monkeypatch, tmp_path):
    """gpuengine.api with the stand-in: a GGUF under a plan and the same plan's quantize directory, resident and
    streamed, give the reference engine's logits; a plan over two GPUs is refused in one line."""
    from gpuengine import api, device
    from planner.cli import main
    from planner.plan import load_plan
    from refengine.api import load_for_plan
    from refengine.errors import EngineError
    from refengine.qmodel import quantize_model
    from test_bad_input import tiny_gguf

    gpu_fake.install(monkeypatch)
    monkeypatch.setattr(device, "unavailable_reason", lambda: "")
    monkeypatch.setenv("VRAMWISE_CACHE", str(tmp_path / "cache"))
    model = tiny_gguf(tmp_path / "tiny.gguf")
    path = tmp_path / "plan.yaml"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(model), "--bpw", "3.5", "--ctx", "64", "-o", str(path),
                 "--quiet"]) == 0
    plan = load_plan(path)
    ids = [5, 17, 42, 100, 7, 64, 3]
    want = load_for_plan(plan, str(model)).logits(ids)
    out = tmp_path / "q"
    quantize_model(plan, str(model), out, "rtn")
    for source, stream in ((str(model), None), (str(model), True), (str(out), None), (str(out), True)):
        got = load_for_plan(plan, source, stream, engine="gpu").logits(ids)
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    stores = list((tmp_path / "cache" / "layers").iterdir())    # the checkpoint's layers were quantized once
    assert len(stores) == 1 and len(list(stores[0].glob("layer_*.safetensors"))) == plan.spec.num_layers
    two_cards = dataclasses.replace(plan.layout, gpu_layers=((0, 1), (1, plan.spec.num_layers)))
    with pytest.raises(EngineError, match="splits the model over 2 GPUs"):
        api.load_for_plan(dataclasses.replace(plan, layout=two_cards), str(model))


def test_every_kernel_a_launcher_calls_is_in_its_packaged_source():
    """The loader finds each .cu (and common.cuh) as package data, and every kernel launch.py names exists there
    (a misspelt name would otherwise surface only on a GPU)."""
    import re
    from pathlib import Path

    from gpuengine import kernels
    launchers = (Path(kernels.__file__).parents[1] / "launch.py").read_text()
    called = set(re.findall(r'function\("(\w+)", f?"(\w+)(?:<[^"]*>)?"\)', launchers))
    assert {m for m, _ in called} == set(kernels.SOURCES)
    for module, name in called:
        text = kernels.source(module)
        assert text.startswith('#line 1 "common.cuh"') and f'#line 1 "{module}.cu"' in text
        assert re.search(rf"__global__ void {name}\b", text), f"{name} not in {module}.cu"
    for module, names in kernels.NAME_EXPRESSIONS.items():
        for expr in names:
            assert re.search(rf"__global__ void {expr.split('<')[0]}\b", kernels.source(module))


def test_every_matvec_launch_is_a_compiled_instance_and_carries_its_linear():
    """Each block shape the launcher (and the benchmark's sweep) may pick is among the template
    instances NVRTC compiles, and the structured argument holds the linear's arrays and slice table."""
    from gpuengine import launch
    from gpuengine.kernels import NAME_EXPRESSIONS
    from gpuengine.kernels import MATVEC_INSTANCES, MATVEC_STAGED, TC_TILES
    shapes = [launch.MatvecShape(*i, 1) for i in MATVEC_INSTANCES]
    staged = [launch.MatvecShape(r, 1, 32, 1, True, idot) for r in MATVEC_STAGED for idot in (False, True)]
    both = (False, True)
    assert {s.instance(norm, gather) for s in shapes for norm in both for gather in both if s.lane == 32 or
            not (norm or gather)} | {launch.TcShape(t, 1).instance(norm) for t in TC_TILES for norm in both} \
        | {s.experts for s in shapes + staged} | {s.kernel for s in staged} \
        | {launch.MatvecShape(*i, 1, ordered=True).kernel for i in MATVEC_INSTANCES if i[2] == 32} \
        == set(NAME_EXPRESSIONS["matvec"])
    with pytest.raises(launch.LaunchError, match="staged"):
        staged[0].instance(norm=True)
    with pytest.raises(launch.LaunchError, match="integer dot"):
        launch.MatvecShape(8, 1, 32, 4, idot=True).kernel
    ordered = launch.MatvecShape(8, 1, 32, 4, ordered=True)
    assert ordered.kernel == "qmatvec<8, 1, 32, 16>" and ordered.experts == "qmatvec_moe<8, 1, 32>"
    assert not ordered.takes_variants and ordered.shared_bytes == 0
    with pytest.raises(launch.LaunchError, match="ordered"):
        ordered.instance(norm=True)
    with pytest.raises(launch.LaunchError, match="ordered loads"):
        launch.MatvecShape(4, 4, 8, 2, ordered=True).kernel
    assert launch.MATVEC.kernel in NAME_EXPRESSIONS["matvec"]
    rng = np.random.default_rng(3)
    t = quantize(rng.standard_normal((5, 100)).astype(np.float32), parse_option("0.25:6b/0.75:3b g64"))
    image = build_image({"w": types.SimpleNamespace(qtensor=t)})
    lin = views(image.data, image)["w"]
    y, bias = np.zeros(5, np.float32), np.ones(5, np.float32)
    q = launch._qmat(lin, y, bias, accumulate=True)[0]
    assert (q["y"], q["bias"], q["n"], q["nslices"], q["accumulate"], q["has_bias"], q["gshift"]) == \
        (y.ctypes.data, bias.ctypes.data, 5, 2, 1, 1, 1)
    for j, s in enumerate(lin.meta.slices):
        assert tuple(q["sl"][j]) == (lin.words[j].ctypes.data, lin.scales[j].ctypes.data, s.bits, s.units, s.groups, s.xoff)
    assert launch.fusable(lin) is False                     # a mixed option gathers its permuted input


def test_each_kernel_compiles_with_its_own_family_only(monkeypatch):
    """kernels.function compiles a source with the template instances of the asked kernel's family: a matvec
    shape with its variants (every N, and its routed experts' instance), never waiting for the other shapes or
    the tensor-core instances (gpuengine.kernels.family)."""
    import re
    import sys
    import types

    from gpuengine import kernels
    built, compiled = [], []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.names = set(name_expressions)
            built.append(self.names)
            compiled.append(options)

        def get_function(self, name):
            assert name in self.names or "<" not in name, f"{name} not instantiated"
            return name

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=RawModule))
    kernels.module.cache_clear()
    kernels.function.cache_clear()
    try:
        for name in ("qmatvec<4, 4, 8, 0>", "qmatvec_moe<4, 1, 32>", "qmatvec<4, 1, 32, 4>", "tmatvec<2, 0>", "hmatvec"):
            assert kernels.function("matvec", name) == name
        kernels.function("attention", "attention<0>")
    finally:
        kernels.module.cache_clear()
        kernels.function.cache_clear()
    quads, lane, staged, tensor, plain, attention = built
    assert quads == {"qmatvec<4, 4, 8, 0>", "qmatvec_moe<4, 4, 8>"} and not plain
    assert lane == {f"qmatvec<4, 1, 32, {n}>" for n in (0, 1, 2, 3, 16)} | {"qmatvec_moe<4, 1, 32>"}
    assert staged == {f"{k}<4, 1, 32, {n}>" for k in ("qmatvec", "qmatvec_moe") for n in (4, 12)}
    assert all(n.startswith("tmatvec") for n in tensor) and len(tensor) == 2 * len(kernels.TC_TILES)
    shapes = {kernels.family("matvec", n) for n in kernels.NAME_EXPRESSIONS["matvec"]}
    assert len(shapes) == len(kernels.MATVEC_INSTANCES) + len(kernels.MATVEC_STAGED) + 1    # + the tensor cores
    assert attention == set(kernels.NAME_EXPRESSIONS["attention"])
    assert all("-DVRAMWISE_MATVEC_REGS" not in o for o in compiled)
    try:                          # a variant (launch.MATVEC_REGS): the same family, compiled with its options
        assert kernels.function("matvec:regs", "qmatvec<4, 1, 32, 1>") == "qmatvec<4, 1, 32, 1>"
    finally:
        kernels.module.cache_clear()
        kernels.function.cache_clear()
    assert built[-1] == lane and "-DVRAMWISE_MATVEC_REGS" in compiled[-1]
    # with its own family's capped specializations only (matvec.cu compiles those its family's macro names)
    assert "-DVRAMWISE_CAPS_4x1x32" in compiled[-1]
    try:
        kernels.function("matvec:regs", "qmatvec<4, 4, 8, 0>")
        kernels.function("matvec:regs", "qmatvec<8, 1, 32, 4>")
        kernels.function("matvec", "qmatvec<8, 1, 32, 1>")
    finally:
        kernels.module.cache_clear()
        kernels.function.cache_clear()
    assert [[o for o in c if "CAPS" in o] for c in compiled[-3:]] == [["-DVRAMWISE_CAPS_4x4x8"],
                                                                      ["-DVRAMWISE_CAPS_8x1x32s"], []]
    source = kernels.source("matvec")                     # each family named there is a compiled family
    named = set(re.findall(r"VRAMWISE_CAPS_(\w+)", source))
    assert named and named <= {kernels.family("matvec", e) for e in kernels.NAME_EXPRESSIONS["matvec"]}


def test_programs_cover_every_instance_once_a_variant():
    """kernels.programs lists each compile the engine may ask for: every template instance in exactly one
    program of each matvec variant (its family's), each other source once."""
    from gpuengine import kernels
    progs = kernels.programs()
    assert len(progs) == len(set(progs))
    for variant in ("", *kernels.VARIANTS):
        mine = [(n, f) for n, f, v in progs if v == variant and n == "matvec"]
        taken = [e for n, f in mine for e in kernels.expressions(n, f)]
        assert sorted(taken) == sorted(kernels.NAME_EXPRESSIONS["matvec"])
    assert {(n, f) for n, f, v in progs if n != "matvec"} == {(n, "") for n in kernels.SOURCES if n != "matvec"}
    assert all(v == "" for n, f, v in progs if n != "matvec")


WARM_STUB = """
import json, os
class RawModule:
    def __init__(self, code, options, name_expressions):
        self.code, self.options, self.names = code, list(options), sorted(name_expressions)
    def compile(self):
        if os.environ.get("WARM_FAIL") and os.environ["WARM_FAIL"] in self.code:
            raise ValueError("NVRTC says no")
        with open(os.environ["WARM_LOG"], "a") as f:
            f.write(json.dumps({"options": self.options, "names": self.names, "pid": os.getpid()}) + "\\n")
"""


def test_warm_compiles_each_program_in_worker_processes(tmp_path, monkeypatch):
    """kernels.warm compiles each program it is given once, in worker processes (a stand-in cupy records what
    each compile was asked), and a program that fails stops it with a RuntimeError naming the program."""
    import json
    import os

    from gpuengine import kernels
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(WARM_STUB)
    monkeypatch.syspath_prepend(str(tmp_path))             # spawned workers start with this sys.path
    log = tmp_path / "log"
    monkeypatch.setenv("WARM_LOG", str(log))
    todo = [("matvec", "8x1x32s", ""), ("matvec", "8x1x32s", "regs"), ("norm", "", "")]
    got = dict(kernels.warm(2, todo))
    assert set(got) == set(todo) and all(t >= 0 for t in got.values())
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(map(tuple, (r["names"] for r in seen))) == sorted(
        [tuple(sorted(kernels.expressions("matvec", "8x1x32s")))] * 2 + [()])
    assert sum("-DVRAMWISE_MATVEC_REGS" in r["options"] for r in seen) == 1
    assert all(r["pid"] != os.getpid() for r in seen)
    monkeypatch.setenv("WARM_FAIL", '#line 1 "norm.cu"')
    with pytest.raises(RuntimeError, match="^norm: .*NVRTC says no"):
        list(kernels.warm(2, [("norm", "", ""), ("sample", "", "")]))
