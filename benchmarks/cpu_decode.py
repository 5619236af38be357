"""CPU decode and prefill speed on SmolLM2-135M with 2 threads: NumPy vs Numba, and llama.cpp beside them.

  numpy  : refengine with float32 (dequantized) weights, BLAS matmuls
  numba  : refengine under a 4.0-bpw vramwise plan: packed weights, fused Numba dequantize + matvec
  numba, layer streaming: the same plan run layer by layer from its layer store (at most two layers held)
  llama.cpp (if llama-cpp-python is installed): the same GGUF, n_threads=2

Each engine runs in a process of its own (thread pools and OpenMP spin settings do not leak between
them), REPEATS times after a warm-up; the table shows medians. Prints a table and writes
benchmarks/results/cpu_decode.json. Usage: python benchmarks/cpu_decode.py
Thread counts: NUMBA_NUM_THREADS / OMP_NUM_THREADS / OPENBLAS_NUM_THREADS, set to 2 here if unset.
"""
from __future__ import annotations

import os

for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "2")

import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchlib import cpu_name, write_json  # noqa: E402

PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg " * 4
NEW_TOKENS = 64
REPEATS = 3
ENGINES = ("numpy (fp32 weights)", "numba (4.0-bpw plan, packed)", "numba, layer streaming (same plan)",
           "llama.cpp (GGUF Q4_1)")


def _median_run(prefill_fn, decode_fn, n_prompt: int) -> dict:
    """Medians over REPEATS of: prefill the prompt from an empty cache, then NEW_TOKENS greedy steps."""
    prefill, decode = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        step = prefill_fn()
        t1 = time.perf_counter()
        for _ in range(NEW_TOKENS):
            step = decode_fn(step)
        prefill.append(t1 - t0)
        decode.append((time.perf_counter() - t1) / NEW_TOKENS)
    return {"prompt_tokens": n_prompt, "prefill_tokens_per_s": n_prompt / statistics.median(prefill),
            "decode_tokens_per_s": 1 / statistics.median(decode),
            "decode_ms_runs": [round(1e3 * d, 2) for d in decode]}


def time_engine(model) -> dict:
    ids = model.tokenizer.encode(PROMPT)
    model.logits(ids[:8])                                    # warm-up: compile kernels, touch weights
    model.logits(ids[:1])

    def prefill():
        model.net.reset()
        return int(model.net.forward(ids)[-1].argmax())

    def decode(tok):
        return int(model.net.forward([tok])[-1].argmax())

    row = _median_run(prefill, decode, len(ids))
    row["engine_bytes"] = model.weights.peak_bytes + model.net.state.nbytes
    row.update(kernel_share(model))
    return row


def kernel_share(model) -> dict:
    """Time of one token's matvecs alone (every packed linear once, as decode calls them): what the
    kernels bound decode to, apart from the rest of the forward pass."""
    import numpy as np
    from refengine.packed import QuantizedLinear

    cache = getattr(model.weights, "cache", {})
    lins = [w for w in cache.values() if isinstance(w, QuantizedLinear)]
    if not lins:
        return {}
    xs = [np.random.default_rng(0).standard_normal(w.shape[1]).astype(np.float32) for w in lins]
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        for w, x in zip(lins, xs):
            w.packed.matvec(x)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    packed = sum(w.nbytes for w in lins)
    return {"matvec_ms_per_token": round(1e3 * t, 2), "packed_mb": round(packed / 1e6, 1),
            "matvec_gb_per_s": round(packed / t / 1e9, 2)}


def time_llamacpp(path: str) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_batch=512, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(ids[:8])

    def prefill():
        llm.reset()
        llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def decode(tok):
        llm.eval([tok])
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    return _median_run(prefill, decode, len(ids))


def run_one(engine: str) -> dict:
    """One engine's row, in this process."""
    from planner.cli import main as cli
    from planner.plan import load_plan
    from refengine.api import load_for_plan, load_model
    from refengine.models import find_model_file

    if engine.startswith("llama.cpp"):
        return time_llamacpp(str(find_model_file("smollm2-135m")))
    if engine.startswith("numpy"):
        return time_engine(load_model("smollm2-135m", ctx=512))
    with tempfile.TemporaryDirectory() as tmp:
        plan = f"{tmp}/plan.yaml"
        cli(["plan", "--gpu", "rtx4060", "--model", "smollm2-135m", "--bpw", "4.0", "--ctx", "512", "-o", plan,
             "--quiet"])
        stream = "streaming" in engine
        model = load_for_plan(load_plan(plan), "smollm2-135m", stream=stream, store_dir=Path(tmp) / "store")
        model.weights.materialize()
        row = time_engine(model)
        model.weights.close()
        return row




def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--engine":
        print(json.dumps(run_one(sys.argv[2])))
        return
    rows = {}
    for engine in ENGINES:
        if engine.startswith("llama.cpp") and importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp: not installed (pip install llama-cpp-python), row skipped")
            continue
        done = subprocess.run([sys.executable, __file__, "--engine", engine], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{engine}: failed: {done.stderr.strip().splitlines()[-1:]}")
        rows[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    ref = rows.get("llama.cpp (GGUF Q4_1)")
    print(f"{'engine':36s} {'prompt':>6s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'vs llama.cpp':>13s} "
          f"{'engine MB':>10s}")
    for name, r in rows.items():
        ratio = f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x" if ref else "-"
        held = f"{r['engine_bytes'] / 1e6:.1f}" if "engine_bytes" in r else "-"
        print(f"{name:36s} {r['prompt_tokens']:6d} {r['prefill_tokens_per_s']:14.1f} {r['decode_tokens_per_s']:13.2f} "
              f"{ratio:>13s} {held:>10s}")
    for name, r in rows.items():
        if "matvec_ms_per_token" in r:
            print(f"{name}: matvecs alone {r['matvec_ms_per_token']:.2f} ms of {1e3 / r['decode_tokens_per_s']:.2f} ms "
                  f"per token ({r['packed_mb']} MB packed at {r['matvec_gb_per_s']} GB/s)")
    import numba
    import numpy
    versions = {"numpy": numpy.__version__, "numba": numba.__version__}
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp
        versions["llama_cpp_python"] = llama_cpp.__version__
    write_json({"date": time.strftime("%Y-%m-%d"), "threads": 2, "cpus": os.cpu_count(), "cpu": cpu_name(),
                "versions": versions, "new_tokens": NEW_TOKENS, "repeats": REPEATS, "rows": rows},
               ROOT / "benchmarks/results/cpu_decode.json")

if __name__ == "__main__":
    main()
