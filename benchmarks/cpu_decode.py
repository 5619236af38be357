"""CPU decode and prefill speed on SmolLM2-135M with 2 threads: NumPy vs Numba, and llama.cpp beside them.

  numpy  : refengine with float32 (dequantized) weights, BLAS matmuls
  numba  : refengine under a 4.0-bpw vramwise plan: packed weights, fused Numba dequantize + matvec
  llama.cpp (if llama-cpp-python is installed): the same GGUF, n_threads=2
Prints a table; writes benchmarks/results/cpu_decode.json. Usage: python benchmarks/cpu_decode.py
Set NUMBA_NUM_THREADS / OMP_NUM_THREADS before starting Python; this script sets them to 2 if unset.
"""
from __future__ import annotations

import os

for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "2")

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg " * 4
NEW_TOKENS = 32


def time_engine(model) -> dict:
    ids = model.tokenizer.encode(PROMPT)
    model.logits(ids[:8])                                    # warm-up: compile kernels, touch weights
    model.net.reset()
    t0 = time.perf_counter()
    model.net.forward(ids)
    prefill = time.perf_counter() - t0
    tok = int(model.net.forward([ids[-1]])[-1].argmax())
    t1 = time.perf_counter()
    for _ in range(NEW_TOKENS):
        tok = int(model.net.forward([tok])[-1].argmax())
    decode = (time.perf_counter() - t1) / NEW_TOKENS
    return {"prompt_tokens": len(ids), "prefill_tokens_per_s": len(ids) / prefill, "decode_tokens_per_s": 1 / decode}


def time_llamacpp(path: str, n_prompt: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_batch=512, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(ids[:8])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(NEW_TOKENS):                            # greedy, like the other engines
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = (time.perf_counter() - t1) / NEW_TOKENS
    return {"prompt_tokens": len(ids), "prefill_tokens_per_s": len(ids) / prefill, "decode_tokens_per_s": 1 / decode}


def main() -> None:
    from planner.cli import main as cli
    from planner.plan import load_plan
    from refengine.api import load_for_plan, load_model

    rows = {}
    fp32 = load_model("smollm2-135m", ctx=512)
    rows["numpy (fp32 weights)"] = time_engine(fp32)
    with tempfile.TemporaryDirectory() as tmp:
        plan = f"{tmp}/plan.yaml"
        cli(["plan", "--gpu", "rtx4060", "--model", "smollm2-135m", "--bpw", "4.0", "--ctx", "512", "-o", plan, "--quiet"])
        packed = load_for_plan(load_plan(plan), "smollm2-135m")
        packed.weights.materialize()
        rows["numba (4.0-bpw plan, packed)"] = time_engine(packed)
    if importlib.util.find_spec("llama_cpp") is not None:
        rows["llama.cpp (GGUF Q4_1)"] = time_llamacpp(str(fp32.checkpoint.path), rows["numpy (fp32 weights)"]["prompt_tokens"])
    ref = rows.get("llama.cpp (GGUF Q4_1)")
    print(f"{'engine':32s} {'prompt':>6s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'decode vs llama.cpp':>20s}")
    for name, r in rows.items():
        ratio = f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x" if ref else "-"
        print(f"{name:32s} {r['prompt_tokens']:6d} {r['prefill_tokens_per_s']:14.1f} {r['decode_tokens_per_s']:13.2f} {ratio:>20s}")
    out = ROOT / "benchmarks/results/cpu_decode.json"
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": 2, "cpus": os.cpu_count(),
                                   "new_tokens": NEW_TOKENS, "rows": rows}, indent=1))
    os.replace(tmp_out, out)


if __name__ == "__main__":
    main()
