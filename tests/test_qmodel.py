"""`vramwise quantize`: a quantized directory that loads without the original, holds exactly the plan's
bytes, resumes an interrupted GPTQ run to the same files, and refuses a damaged directory in one line."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from planner.cli import main
from planner.plan import load_plan
from refengine.api import load_for_plan, load_model
from refengine.errors import EngineError, WeightsError
from refengine.qmodel import HEADER, QuantizedDir, planned_weight_bytes, quantize_model
from test_bad_input import tiny_family_gguf, tiny_gguf

TEXT = "The quick brown fox jumps over the lazy dog. hello world, hello again! " * 40
IDS = [5, 17, 42, 100, 7, 64, 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("qmodel")
    model = tiny_gguf(work / "tiny.gguf")
    plan = work / "plan.yaml"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(model), "--bpw", "3.5", "--ctx", "64", "-o", str(plan),
                 "--quiet"]) == 0
    return work, model, plan


def payload(path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def test_rtn_directory_runs_like_the_plan_and_holds_the_planned_bytes(setup, tmp_path):
    work, model, plan = setup
    out = tmp_path / "q"
    header = quantize_model(load_plan(plan), str(model), out, "rtn")
    assert (out / HEADER).exists() and not (out / ".partial").exists()
    direct = load_for_plan(load_plan(plan), str(model)).logits(IDS)
    assert np.array_equal(load_model(str(out)).logits(IDS), direct)             # no original needed
    assert np.array_equal(load_for_plan(load_plan(plan), str(out)).logits(IDS), direct)
    assert np.array_equal(load_for_plan(load_plan(plan), str(out), stream=True).logits(IDS), direct)
    files = sorted(out.glob("*.safetensors"))
    assert sum(payload(f) for f in files) == planned_weight_bytes(load_plan(plan)) == header["planned_weight_bytes"]


def test_gptq_resumes_to_the_same_files(setup, tmp_path):
    work, model, plan = setup
    whole = tmp_path / "whole"
    quantize_model(load_plan(plan), str(model), whole, "gptq", TEXT, "t", rows=2, row_tokens=32)

    def stop(done, total):
        if done == 1:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(load_plan(plan), str(model), cut, "gptq", TEXT, "t", rows=2, row_tokens=32, progress=stop)
    assert not (cut / HEADER).exists()
    with pytest.raises(WeightsError, match="did not finish"):
        QuantizedDir(cut)
    seen = []
    quantize_model(load_plan(plan), str(model), cut, "gptq", TEXT, "t", rows=2, row_tokens=32,
                   progress=lambda d, t: seen.append(d))
    assert seen == [2]                                           # layer 0 was kept
    for f in sorted(p.name for p in whole.iterdir()):
        assert (cut / f).read_bytes() == (whole / f).read_bytes(), f
    logits = load_model(str(cut)).logits(IDS)
    reference = load_model(str(model), ctx=64).logits(IDS)
    # random weights at 3.5 bpw: RTN's logits correlate 0.79 with the float model's, GPTQ's 0.80 (measured)
    assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > 0.7


def test_a_damaged_directory_is_one_line(setup, tmp_path):
    work, model, plan = setup
    out = tmp_path / "q"
    quantize_model(load_plan(plan), str(model), out, "rtn")
    layer = out / "layer_0001.safetensors"
    layer.write_bytes(layer.read_bytes()[:-10])
    with pytest.raises(WeightsError) as err:
        load_model(str(out))
    assert "layer_0001.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_a_directory_for_other_formats_is_refused(setup, tmp_path):
    work, model, plan = setup
    out = tmp_path / "q"
    quantize_model(load_plan(plan), str(model), out, "rtn")
    other = tmp_path / "other.yaml"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(model), "--bpw", "6", "--ctx", "64", "-o", str(other),
                 "--quiet"]) == 0
    with pytest.raises(EngineError, match="other formats than this plan's"):
        load_for_plan(load_plan(other), str(out))


def test_cli_quantize_run_eval(setup, tmp_path, capsys):
    work, model, plan = setup
    out = tmp_path / "q"
    assert main(["quantize", "--plan", str(plan), "--weights", str(model), "--method", "rtn", "-o", str(out),
                 "--quiet"]) == 0
    assert main(["run", "--plan", str(out / "plan.yaml"), "--weights", str(out), "--prompt", "hello world",
                 "--max-new-tokens", "3", "--json"]) == 0
    assert main(["run", "--plan", str(out), "--prompt", "hello world", "--max-new-tokens", "3", "--json"]) == 0
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--text", str(text), "--ctx", "32", "--max-tokens", "64",
                 "--json"]) == 0
    assert '"perplexity"' in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["run", "--plan", str(tmp_path / "empty"), "--prompt", "hi"]) == 2
    assert "not a `vramwise quantize` directory" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["quantize", "--plan", str(plan), "--weights", str(model), "--calib", str(short), "-o",
                 str(tmp_path / "q2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "short.txt" in err


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3", "moe"])
def test_other_families_plan_quantize_by_gptq_and_run(tmp_path, capsys, family):
    """Qwen3, Phi-3, Gemma 3 and a Mixtral-style MoE end to end: the plan says `vramwise run` runs them (the MoE
    on the reference engine), GPTQ quantizes them (its calibration walk is the engine's decoder layer,
    refengine.arch, each expert calibrated on the rows routed to it; checked against the oracle in
    test_measure.py), the directory holds the planned bytes, and run allocates exactly the plan."""
    model, plan, out = tiny_family_gguf(tmp_path / "m.gguf", family), tmp_path / "plan.yaml", tmp_path / "q"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(model), "--bpw", "4", "--ctx", "64", "-o", str(plan),
                 "--quiet"]) == 0
    assert "does not run this architecture" not in plan.read_text()
    header = quantize_model(load_plan(plan), str(model), out, "gptq", TEXT, "t", rows=2, row_tokens=32)
    assert sum(payload(f) for f in out.glob("*.safetensors")) == header["planned_weight_bytes"]
    assert np.isfinite(load_model(str(out)).logits(IDS)).all()
    capsys.readouterr()
    assert main(["run", "--plan", str(out), "--prompt", "hello world", "--max-new-tokens", "3", "--json",
                 "--engine", "ref"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["generated_tokens"] == 3
    assert doc["measured"]["engine_bytes"] == doc["plan"]["weights_and_state_bytes"]


def test_a_scaled_rope_travels_with_the_quantized_directory(tmp_path):
    """Llama 3.1's RoPE factors (a GGUF's rope_freqs) are in the header: the directory alone runs as the original."""
    from refengine import ops
    from test_bad_input import CFG
    from test_weights import tiny_tensors
    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    factors = ops.rope_factors("llama3", params, CFG["hidden"] // CFG["heads"], 10000.0).astype(np.float32)
    model = tiny_gguf(tmp_path / "llama31.gguf", arrays={**tiny_tensors(CFG), "rope_freqs.weight": factors})
    plan, out = tmp_path / "plan.yaml", tmp_path / "q"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(model), "--bpw", "4", "--ctx", "64", "-o", str(plan),
                 "--quiet"]) == 0
    quantize_model(load_plan(plan), str(model), out, "rtn")
    loaded = load_model(str(out))
    assert loaded.spec.rope_scaling == "llama3" and np.array_equal(loaded.checkpoint.rope_factors, factors)
    assert np.array_equal(loaded.logits(IDS), load_for_plan(load_plan(plan), str(model)).logits(IDS))


def test_a_gemma_quantized_directory_runs_as_the_original(tmp_path):
    """What Gemma computes beyond a Llama (GeGLU, embedding scale, post norms, window, the query scale already in
    the weights) comes back with the directory alone: its logits are the original's under the same plan."""
    from test_bad_input import tiny_family_gguf
    model, plan, out = tiny_family_gguf(tmp_path / "g.gguf", "gemma3"), tmp_path / "plan.yaml", tmp_path / "q"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(model), "--bpw", "4", "--ctx", "64", "-o", str(plan),
                 "--quiet"]) == 0
    quantize_model(load_plan(plan), str(model), out, "rtn")
    loaded = load_model(str(out))
    assert (loaded.spec.activation, loaded.spec.sliding_window, loaded.spec.norms_per_layer) == ("gelu_tanh", 16, 4)
    ids = [int(i) for i in np.random.default_rng(5).integers(0, loaded.spec.vocab_size, 40)]   # past the window
    assert np.array_equal(loaded.logits(ids), load_for_plan(load_plan(plan), str(model)).logits(ids))
