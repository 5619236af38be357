"""The reference engine against llama.cpp on the packaged SmolLM2 GGUF: same tokens, same distributions.

llama.cpp rounds activations to 8 bits in its quantized matmuls (Q4_1 x Q8_1), ours multiply in float32,
so on the GGUF as shipped the logits carry small noise and the asserts are on distributions (KL, top-1),
not on max-abs differences. The sharp check is the f32 control: llama.cpp on the same weights dequantized
to F32 does no activation rounding, and there the two engines agree to KL ~1e-6.
Full numbers on more prompts: benchmarks/compare_llamacpp.py -> benchmarks/results/llamacpp_compare.json.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (optional, not a vramwise dependency: "
                "pip install llama-cpp-python)", allow_module_level=True)

from refengine.errors import ModelNotFoundError  # noqa: E402
from refengine.models import PACKAGED, find_model_file  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "compare_llamacpp", Path(__file__).resolve().parents[1] / "benchmarks" / "compare_llamacpp.py")
cmp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cmp)

PROMPTS = {
    "prose": "The old library smelled of dust and rain. Every evening the librarian walked between the shelves.",
    "chatml": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "code_numbers": "def area(r):\n    return 3.14159 * r ** 2  # r = 12.5 -> 490.87\n",
}

# Measured (llama-cpp-python 0.3.36, x86-64 CPU, 2 threads) on these prompts, GGUF as shipped: KL mean
# <= 3.8e-3, KL max <= 0.024; top-1 0.875-1.0 per prompt (73 positions, 3 differ, 0.959 pooled), every
# disagreement a near-tie (llama.cpp's top-1 leads by <= 0.23 logits). Our own engine with 8-bit activation
# rounding simulated (the q8 noise floor) flips the same chatml positions, so 0.95 per prompt is not a fair
# bar for 16-token prompts: the top-1 bars below are ~3x the measured disagreement instead.
KL_MEAN, KL_MAX = 0.01, 0.1
TOP1_POOLED = 0.88          # measured 0.959 (4.1% disagree; 3x -> 12%)
NEAR_TIE = 0.75             # logits; measured largest margin at a disagreement 0.23
NOISE_FLOOR_RATIO = 3.0     # KL(llama.cpp || ours) / KL(ours || ours with Q8 rounding): measured 0.72-1.02
# f32 control, measured: KL mean <= 3.1e-6, KL max <= 9.6e-6, top-1 1.0, corr >= 0.9999985.
F32_KL_MEAN, F32_KL_MAX, F32_CORR = 3e-5, 1e-4, 0.99999


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    try:
        path = str(find_model_file("smollm2-135m"))
    except ModelNotFoundError:
        pytest.skip(f"SmolLM2 weights not installed ({PACKAGED['smollm2-135m'].install})")
    from refengine import load_model
    model = load_model(path, ctx=128)
    llm = cmp.load_llamacpp(path, n_ctx=128)
    f32 = str(tmp_path_factory.mktemp("llamacpp") / "smollm2-f32.gguf")
    cmp.write_f32_gguf(path, f32)
    llm_f32 = cmp.load_llamacpp(f32, n_ctx=128)
    try:
        return cmp.run(PROMPTS, model, llm, llm_f32, noise_floor=True)
    finally:
        llm_f32.close()
        llm.close()


@pytest.mark.parametrize("name", list(PROMPTS))
def test_same_tokenization(results, name):
    assert results[name]["tokenizer_identical"], results[name]["tokenizer_mismatch"]


@pytest.mark.parametrize("name", list(PROMPTS))
def test_f32_control_matches_tightly(results, name):
    """No activation rounding on either side: any architecture slip (RoPE, eps, scale, head) would show."""
    r = results[name]["f32_control"]
    assert r["kl_mean"] < F32_KL_MEAN and r["kl_max"] < F32_KL_MAX, r
    assert r["top1_agreement"] == 1.0 and r["corr_min"] > F32_CORR, r


@pytest.mark.parametrize("name", list(PROMPTS))
def test_as_shipped_distributions(results, name):
    r = results[name]
    assert r["kl_mean"] < KL_MEAN and r["kl_max"] < KL_MAX, r
    assert r["kl_mean"] < NOISE_FLOOR_RATIO * r["q8_noise_floor"]["kl_mean"], r
    for d in r["top1_disagreements"]:
        assert d["llamacpp_logit_margin"] < NEAR_TIE, d


def test_as_shipped_top1_pooled(results):
    tokens = sum(r["tokens"] for r in results.values())
    agree = sum(r["top1_agreement"] * r["tokens"] for r in results.values())
    assert agree / tokens >= TOP1_POOLED, {n: r["top1_agreement"] for n, r in results.items()}
