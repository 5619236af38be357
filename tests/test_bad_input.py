"""Bad input end to end: corrupt, truncated or unsupported weight files and over-long prompts.

Through the loader (a WeightsError whose message is one line naming the file) and through the CLI (one
line on stderr, exit 2, no traceback, and nothing half-written: no plan file, no partial output).
Every model here is tiny and written by the test, so nothing skips.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import yaml
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import save_file

from planner.cli import main
from refengine.errors import WeightsError
from refengine.weights import load_checkpoint
from test_tokenizer import add_bpe_tokenizer, bpe_meta
from test_weights import HF_CONFIG, close_gguf, gguf_writer, hf_folder, hf_tensors, tiny_tensors

TOKENS = bpe_meta("smollm")     # 265 tokens: specials, the 256 byte symbols, a few merges ("hello" is one token)
CFG = dict(hidden=64, ff=96, layers=2, heads=4, kv=2, vocab=len(TOKENS["tokenizer.ggml.tokens"]), tied=True,
           bias=False)
CTX = 64


def tiny_gguf(path: Path, arch: str = "llama", arrays: dict | None = None, raw: dict | None = None,
              layers: int = 2, experts: int = 0) -> Path:
    """A runnable tiny Llama GGUF with a byte-level BPE vocabulary; raw: name -> (bytes array, GGML type)."""
    w = gguf_writer(path, arch, {**CFG, "layers": layers}, "zz-tiny-name", experts, rope_base=None)
    add_bpe_tokenizer(w, TOKENS, "smollm")
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(16)          # shorter than the tests' contexts, so the window slides
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    for name, a in (tiny_tensors(CFG) if arrays is None else arrays).items():
        if name in (raw or {}):
            data, qtype = raw[name]
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    return close_gguf(w, path)


def tiny_family_gguf(path: Path, family: str) -> Path:
    """tiny_gguf as a Qwen3 (the same tensors plus an RMSNorm weight over each query and key head), a Phi-3
    (q / k / v and gate / up each in one tensor) or a Gemma 3 (Qwen3's plus norms after attention and the MLP,
    a 16-token sliding window), or as a Mixtral-style "moe" (llama with 4 routed experts, 2 a token)."""
    if family == "phi3":
        return tiny_gguf(path, "phi3", tiny_tensors({**CFG, "fused": True}))
    if family == "moe":
        return tiny_gguf(path, arrays=moe_tensors(), experts=4)
    arrays, hd = tiny_tensors(CFG), CFG["hidden"] // CFG["heads"]
    rng = np.random.default_rng(3)
    for i in range(CFG["layers"]):
        for n in "qk":
            arrays[f"blk.{i}.attn_{n}_norm.weight"] = (1 + 0.2 * rng.standard_normal(hd)).astype(np.float32)
        if family == "gemma3":
            for n in ("post_attention_norm", "post_ffw_norm"):
                arrays[f"blk.{i}.{n}.weight"] = (1 + 0.2 * rng.standard_normal(CFG["hidden"])).astype(np.float32)
    return tiny_gguf(path, family, arrays)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code: int, err: str, named: Path | str) -> str:
    """Exit 2, exactly one non-empty line on stderr, no traceback, and the file named in it."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].strip(), err
    assert "Traceback" not in err and str(named) in err, err
    return lines[0]


def assert_load_error(path: Path, match: str | None = None) -> str:
    with pytest.raises(WeightsError, match=match) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text, text
    return text


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def good(work) -> Path:
    return tiny_gguf(work / "good.gguf")


@pytest.fixture(scope="module")
def plan(work, good) -> Path:
    path = work / "plan.yaml"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(good), "--ctx", str(CTX), "-o", str(path),
                 "--quiet"]) == 0
    return path


def run_bad(capsys, plan: Path, weights: Path, *extra: str) -> str:
    """`vramwise run --json` on bad weights: one line naming them, and no JSON (nor anything) on stdout."""
    code, out, err = cli(capsys, "run", "--plan", str(plan), "--weights", str(weights), "--prompt", "hello",
                         "--max-new-tokens", "2", "--json", *extra)
    assert out == ""
    return assert_one_line(code, err, weights)


def plan_bad(capsys, model: Path, out: Path) -> str:
    """`vramwise plan` on a bad model: one line naming it, and no plan file written."""
    code, _, err = cli(capsys, "plan", "--gpu", "rtx4090", "--model", str(model), "-o", str(out))
    assert not out.exists()
    return assert_one_line(code, err, model)


def test_the_tiny_model_runs(capsys, plan):
    """The control: the files below are broken copies of this one, which plans and runs."""
    code, out, _ = cli(capsys, "run", "--plan", str(plan), "--prompt", "hello hello", "--max-new-tokens", "2",
                       "--json")
    assert code == 0 and json.loads(out)["prompt_tokens"] == 2


# --- GGUF: truncated, garbage, not GGUF ---------------------------------------------------------------

def regions(path: Path) -> dict[str, int]:
    """A byte in the middle of each part of a GGUF file: header, key/values, tensor infos, tensor data."""
    r = gguf.GGUFReader(str(path))
    infos = min(t.field.offset for t in r.tensors)
    return {"header": 12, "metadata": (24 + infos) // 2, "tensor_info": (infos + r.data_offset) // 2,
            "tensor_data": (r.data_offset + path.stat().st_size) // 2}


@pytest.mark.parametrize("region", ["header", "metadata", "tensor_info", "tensor_data"])
def test_truncated_gguf_plan_and_run(capsys, work, good, plan, region):
    cut = work / f"cut_{region}.gguf"
    cut.write_bytes(good.read_bytes()[:regions(good)[region]])
    assert_load_error(cut, "truncated")
    plan_bad(capsys, cut, work / f"plan_{region}.yaml")
    run_bad(capsys, plan, cut)


@given(keep=st.integers(0, 10**6))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_gguf_cut_anywhere_is_a_weights_error(work, good, keep):
    data = good.read_bytes()
    cut = work / "cut_any.gguf"
    cut.write_bytes(data[:keep % len(data)])
    assert_load_error(cut)


def _garbage(data: bytes) -> bytes:
    return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("case, make, message", [
    ("empty", lambda d: b"", "0 bytes, too short for a GGUF header"),
    ("garbage", _garbage, "not a GGUF file"),
    ("wrong_magic", lambda d: b"GGUX" + d[4:], "not a GGUF file (it starts with b'GGUX'"),
    ("safetensors_named_gguf", lambda d: (16).to_bytes(8, "little") + b'{"a": 1}' + b" " * 8, "not a GGUF file"),
    ("future_version", lambda d: d[:4] + struct.pack("<I", 99) + d[8:], "GGUF version 99"),
    ("counts_huge", lambda d: d[:8] + struct.pack("<QQ", 2**40, 2**40) + d[24:], "truncated or corrupt"),
])
def test_not_a_gguf(capsys, work, good, plan, case, make, message):
    bad = work / f"{case}.gguf"
    bad.write_bytes(make(good.read_bytes()))
    assert message in assert_load_error(bad)
    assert message in run_bad(capsys, plan, bad)


def _flip(data: bytes, needle: bytes) -> bytes:
    at = data.index(needle)
    assert data.count(needle) == 1
    return data[:at] + b"\xff" + data[at + 1:]


@pytest.mark.parametrize("needle, key", [(b"zz-tiny-name", "general.name"),                  # read by the spec
                                          (b"<|im_end|>", "tokenizer.ggml.tokens")])       # by the tokenizer
def test_gguf_string_not_utf8_is_named(capsys, work, good, plan, needle, key):
    bad = work / f"utf8_{key}.gguf"
    bad.write_bytes(_flip(good.read_bytes(), needle))
    line = run_bad(capsys, plan, bad)
    assert f"metadata '{key}' holds a string that is not UTF-8" in line and "sampling" not in line


def test_plan_of_a_gguf_whose_name_is_not_utf8(capsys, work, good):
    bad = work / "utf8_plan.gguf"
    bad.write_bytes(_flip(good.read_bytes(), b"zz-tiny-name"))
    plan_bad(capsys, bad, work / "u.yaml")


def test_merge_of_an_unknown_token_is_one_line(capsys, work, good, plan):
    bad = work / "merge.gguf"
    data = good.read_bytes()
    at = data.index(b"hell o")                   # the merge list's "hell o" becomes "Jell o": no such token
    bad.write_bytes(data[:at] + b"J" + data[at + 1:])
    assert "Jell" in run_bad(capsys, plan, bad)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_weight_beyond_fp16_scales_is_one_line(capsys, work, plan):
    arrays = tiny_tensors(CFG)
    arrays["blk.0.attn_q.weight"][0, 0] = 1e30   # finite, but no fp16 scale can hold it
    bad = tiny_gguf(work / "huge.gguf", arrays=arrays)
    assert "blk.0.attn_q.weight" in run_bad(capsys, plan, bad)


def test_corrupt_layer_count_is_refused_at_once(capsys, work, plan):
    """block_count = 10^9 would otherwise build an inventory of 10^9 layers before failing."""
    bad = tiny_gguf(work / "layers.gguf", layers=10**9)
    assert "the metadata says 1000000000 layers but the file's tensors hold 2" in assert_load_error(bad)
    run_bad(capsys, plan, bad)


def test_nan_in_tensor_data_is_named(capsys, work, plan):
    arrays = tiny_tensors(CFG)
    arrays["blk.1.ffn_norm.weight"][5] = np.nan
    bad = tiny_gguf(work / "nan.gguf", arrays=arrays)
    ckpt = load_checkpoint(bad)                  # headers are fine: the values are read on use
    with pytest.raises(WeightsError, match=r"'blk\.1\.ffn_norm\.weight' \(F32\) holds NaN or infinite values"):
        ckpt["layers.1.norm.1"].numpy()
    assert "blk.1.ffn_norm.weight" in run_bad(capsys, plan, bad)


# --- GGUF: unsupported tensor types and architectures -------------------------------------------------

def _q8_1_bytes(shape: tuple[int, int]) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    return np.zeros((shape[0], shape[1] // block * size), dtype=np.uint8)


@pytest.mark.parametrize("tensor, stored", [("blk.0.attn_q.weight", "Q8_1"), ("blk.0.attn_norm.weight", "F64"),
                                            ("blk.1.ffn_norm.weight", "I8")])
def test_unsupported_ggml_type_names_tensor_type_and_the_readable_ones(capsys, work, plan, tensor, stored):
    arrays = tiny_tensors(CFG)
    raw = {}
    if stored == "Q8_1":
        raw[tensor] = (_q8_1_bytes(arrays[tensor].shape), Q.Q8_1)
    else:
        arrays[tensor] = arrays[tensor].astype(np.float64 if stored == "F64" else np.int8)
    bad = tiny_gguf(work / f"type_{stored}.gguf", arrays=arrays, raw=raw)
    text = assert_load_error(bad, rf"tensor '{tensor}' has GGML type {stored}, which")
    assert "it reads F32, F16, Q4_0" in text and "Q4_K" in text and "requantize" in text
    assert stored in run_bad(capsys, plan, bad)


def test_unsupported_architecture_plan_and_run(capsys, work, plan):
    bad = tiny_gguf(work / "mamba.gguf", arch="mamba")
    assert "GGUF architecture 'mamba' is not supported (supported: " in plan_bad(capsys, bad, work / "mamba.yaml")
    assert "'mamba' is not supported" in run_bad(capsys, plan, bad)


def test_weights_of_another_architecture_name_the_difference(capsys, work, plan):
    """The plan's model had no scaled RoPE; a file with Llama 3.1's rope_freqs is refused, saying so (an early
    Llama 3.1 conversion without them is the common case the other way round)."""
    factors = np.full(CFG["hidden"] // CFG["heads"] // 2, 2.0, np.float32)
    scaled = tiny_gguf(work / "scaled.gguf", arrays={**tiny_tensors(CFG), "rope_freqs.weight": factors})
    line = run_bad(capsys, plan, scaled)
    assert "architecture is not the plan's (rope_scaling '' planned, 'llama3' found)" in line


def moe_tensors() -> dict:
    """tiny_tensors with each layer's MLP as 4 routed experts (stacked, as llama.cpp's converter writes them)."""
    arrays = {k: v for k, v in tiny_tensors(CFG).items() if "ffn_" not in k or "norm" in k}
    rng = np.random.default_rng(1)
    for i in range(CFG["layers"]):
        arrays[f"blk.{i}.ffn_gate_inp.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
        for n, s in (("gate", (4, 96, 64)), ("up", (4, 96, 64)), ("down", (4, 64, 96))):
            arrays[f"blk.{i}.ffn_{n}_exps.weight"] = (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
    return arrays


def test_moe_model_plans_and_runs_on_both_engines(capsys, work, monkeypatch):
    """A Mixtral-style GGUF (4 experts, 2 a token): planned with no engine caveat, run by the reference engine
    holding exactly the plan's bytes, and by the CUDA engine (its kernels on the CPU twin) when a device is
    found, to the same tokens; on a card too small for it, a plan keeping some layers' experts in host memory
    runs on the CUDA engine to the reference's tokens too."""
    moe = tiny_family_gguf(work / "moe.gguf", "moe")
    moe_plan = work / "moe.yaml"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(moe), "--ctx", str(CTX), "-o", str(moe_plan),
                 "--quiet"]) == 0
    assert "engine:" not in moe_plan.read_text()
    run = ["run", "--plan", str(moe_plan), "--prompt", "hello there", "--max-new-tokens", "4", "--json"]
    code, out, err = cli(capsys, *run, "--engine", "ref")
    ref = json.loads(out)
    assert code == 0 and ref["generated_tokens"] == 4
    assert ref["measured"]["engine_bytes"] == ref["plan"]["weights_and_state_bytes"]   # routers in fp16, as planned
    import cudaemu
    if cudaemu.unavailable_reason():
        pytest.skip(cudaemu.unavailable_reason())
    cudaemu.install(monkeypatch)
    from gpuengine import device
    from planner import cli_engine
    for name, value in (("available", True), ("unavailable_reason", ""), ("name", "CPU twin")):
        monkeypatch.setattr(device, name, lambda value=value: value)
    monkeypatch.setattr(cli_engine, "_device_memory", lambda engine: {})      # CUDA's own counters
    monkeypatch.setattr(cli_engine, "_oom_errors", lambda: ())
    code, out, err = cli(capsys, *run)
    gpu = json.loads(out)
    assert code == 0 and "gpu" in gpu["engine"] and gpu["text"] == ref["text"], err
    held, planned = gpu["measured"]["engine_bytes"], gpu["plan"]["weights_and_state_bytes"]
    assert held <= planned
    # at 4.125 bpw, a card 20 KB smaller than the model needs (a layer's experts are 33 KB; the safety margin is a
    # share of the card): one layer's experts stay in host memory, read in place, and the tokens do not change
    tight = work / "moe-tight.yaml"
    plan_on = ["--bpw", "4.125", "--reserve", "0", "--model", str(moe), "--ctx", str(CTX), "--quiet"]
    assert main(["plan", "--gpu", "rtx4090", "--vram", "1GiB", *plan_on, "-o", str(tight)]) == 0
    memory = yaml.safe_load(tight.read_text())["memory"]
    share = memory["items"]["safety_margin"] / 2**30
    needed = (memory["total_bytes"] - memory["items"]["safety_margin"]) / (1 - share)
    assert main(["plan", "--gpu", "rtx4090", "--vram", str(int(needed) - 20_000), *plan_on, "-o", str(tight)]) == 0
    assert yaml.safe_load(tight.read_text())["placement"]["host_experts"] == 1
    code, out, err = cli(capsys, "run", "--plan", str(tight), *run[3:])
    doc = json.loads(out)
    code_ref, out_ref, _ = cli(capsys, "run", "--plan", str(tight), *run[3:], "--engine", "ref")
    assert code == code_ref == 0 and doc["text"] == json.loads(out_ref)["text"], err
    assert "gpu" in doc["engine"] and doc["measured"]["engine_bytes"] < held


# --- safetensors --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_plan(work) -> Path:
    root, _ = hf_folder(work / "hf_good")
    path = work / "hf_plan.yaml"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(root), "--ctx", str(CTX), "-o", str(path), "--quiet"]) == 0
    return path


def _header(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def _with_header(data: bytes, edit) -> bytes:
    n, header = _header(data)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def _set(name: str, **fields):
    return lambda data: _with_header(data, lambda h: h[name].update(fields))


@pytest.mark.parametrize("case, make, message", [
    ("empty", lambda d: b"", "0 bytes, too short for a safetensors header"),
    ("header_only", lambda d: d[:8 + _header(d)[0]], "lies at data bytes"),
    ("length_past_end", lambda d: (len(d) * 10).to_bytes(8, "little") + d[8:], "shorter than the header it declares"),
    ("garbage_json", lambda d: d[:8] + b"{nope" + d[13:], "JSON header does not parse"),
    ("json_array", lambda d: (8).to_bytes(8, "little") + b"[1, 2]  ", "header is not a JSON object"),
    ("truncated_data", lambda d: d[:-100], "lies at data bytes"),
    ("offsets_past_end", _set("model.norm.weight", data_offsets=[0, 10**9]), "lies at data bytes 0..1000000000"),
    ("shape_wrong_for_bytes", _set("model.norm.weight", shape=[32]), "is F32 (32,), 128 bytes, but its data_offsets "
                                                                     "span 256"),
    ("dtype_wrong_for_bytes", _set("model.norm.weight", dtype="F64"), "is F64 (64,), 512 bytes"),
    ("no_offsets", _set("model.norm.weight", data_offsets=None), "lacks a dtype, a shape or data_offsets"),
])
def test_corrupt_safetensors(capsys, work, hf_plan, case, make, message):
    root = work / f"st_{case}"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(HF_CONFIG))
    shard = root / "model.safetensors"
    save_file(hf_tensors(), str(shard))
    shard.write_bytes(make(shard.read_bytes()))
    assert message in assert_load_error(shard)
    assert message in run_bad(capsys, hf_plan, root)


@given(keep=st.integers(0, 10**6))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_safetensors_cut_anywhere_is_a_weights_error(work, keep):
    root = work / "st_cut"
    if not root.exists():
        root.mkdir()
        (root / "config.json").write_text(json.dumps(HF_CONFIG))
        save_file(hf_tensors(), str(root / "whole.bin"))
    data = (root / "whole.bin").read_bytes()
    shard = root / "model.safetensors"
    shard.write_bytes(data[:keep % len(data)])
    assert_load_error(shard)


@pytest.mark.parametrize("dtype", [np.int8, np.float64])
def test_safetensors_unsupported_dtype_names_tensor_and_the_readable_ones(capsys, work, hf_plan, dtype):
    root = work / f"st_{np.dtype(dtype).name}"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(HF_CONFIG))
    arrays = hf_tensors()
    arrays["model.layers.1.input_layernorm.weight"] = arrays["model.layers.1.input_layernorm.weight"].astype(dtype)
    save_file(arrays, str(root / "model.safetensors"))
    tag = {np.int8: "I8", np.float64: "F64"}[dtype]
    assert_load_error(root / "model.safetensors",
                      rf"'model\.layers\.1\.input_layernorm\.weight' has dtype {tag}; the reference engine reads "
                      r"F32, F16, BF16")
    assert tag in run_bad(capsys, hf_plan, root)


# --- prompts longer than the plan's context ------------------------------------------------------------

@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_prompt_longer_than_the_plan_prints_no_generation(capsys, plan, json_flag):
    code, out, err = cli(capsys, "run", "--plan", str(plan), "--prompt", "hello" + " hello" * 99, *json_flag)
    line = assert_one_line(code, err, plan)
    assert out == "" and "the prompt has 100 tokens; the plan's context is 64" in line and "--ctx above 100" in line


def test_prompt_exactly_the_context_is_refused(capsys, plan):
    """No room for one generated token: refused, not silently generating nothing."""
    code, out, err = cli(capsys, "run", "--plan", str(plan), "--prompt", "hello" + " hello" * (CTX - 1), "--json")
    assert out == "" and "the prompt has 64 tokens" in assert_one_line(code, err, plan)


# --- nothing half-written -------------------------------------------------------------------------------

def test_failed_plan_leaves_an_existing_plan_file_alone(capsys, work, good):
    folder = work / "keep"
    folder.mkdir()
    target = folder / "plan.yaml"
    target.write_text("an earlier plan\n")
    bad = folder / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:5000])
    code, _, err = cli(capsys, "plan", "--gpu", "rtx4090", "--model", str(bad), "-o", str(target))
    assert_one_line(code, err, bad)
    assert target.read_text() == "an earlier plan\n"
    assert sorted(p.name for p in folder.iterdir()) == ["bad.gguf", "plan.yaml"]       # no temporary left


@pytest.mark.parametrize("command", ["run", "plan"])
def test_real_process_exit_code_and_stderr(work, good, plan, command):
    """The console entry point itself: exit status 2, one line, no traceback, empty stdout."""
    bad = work / f"proc_{command}.gguf"
    bad.write_bytes(good.read_bytes()[: regions(good)["tensor_data"]])
    args = (["run", "--plan", str(plan), "--weights", str(bad), "--prompt", "hello", "--json"] if command == "run"
            else ["plan", "--gpu", "rtx4090", "--model", str(bad), "-o", str(work / "proc.yaml"), "--json"])
    done = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=120)
    assert done.stdout == "" and not (work / "proc.yaml").exists()
    assert_one_line(done.returncode, done.stderr, bad)
