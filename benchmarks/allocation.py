"""Per-layer allocation on SmolLM2-135M: the planner's exact knapsack vs uniform and greedy allocations at
the same average bpw, by measured error and by perplexity; GPTQ vs RTN; beside the unquantized model.

  python benchmarks/allocation.py [--measurement FILE] [--eval-tokens N]

Inputs: a `vramwise measure` file of SmolLM2 (default benchmarks/results/smollm2_measurement.yaml; make
it with `vramwise measure --model smollm2-135m -o ...`), the project's evaluation text
(refengine/data/eval.txt) and calibration text (refengine/data/calib.txt).

For each target, "uniform" gives every linear the same registry option (the one listed in TARGETS),
"optimal" is `vramwise plan --bpw <uniform's bpw> --measurement FILE` (the exact multiple-choice
knapsack over the measured errors) and "greedy" upgrades, from the cheapest option, the linear with the
best error drop per byte until the same byte budget is spent. Error = sum of the measured rfn errors of
the 210 linears. Perplexity: teacher-forced on the evaluation text in 512-token windows.

GPTQ here takes each layer's Hessians from the reference model's activations on the calibration text
(one walk serves all allocations); `vramwise quantize` instead walks through the already quantized
layers (GPTQ's sequential mode). The head is quantized as the planner prices it (HEAD_OPTION, RTN).
Writes benchmarks/results/allocation.json and, when matplotlib is installed, docs/allocation.png.
"""
from __future__ import annotations

import os

for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "2")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchlib import write_json  # noqa: E402

TARGETS = {2.5: "0.25:3b/0.75:2b g128", 3.0: "0.1:4b/0.4:3b/0.5:2b g128", 4.0: "1:4b g128", 5.0: "1:5b g128",
           6.0: "1:6b g128", 8.0: "1:8b g128"}
WINDOW = 512


def greedy(linears, errors: dict, budget_bits: float) -> dict:
    """Start every linear at its cheapest option; repeatedly take the upgrade with the largest error drop
    per extra byte that still fits the budget."""
    from planner.formats import parse_option

    cands = {}
    for t in linears:
        opts = sorted(((parse_option(o).tensor_bytes(*t.shape), e, o) for o, e in errors[t.name].items()))
        cands[t.name] = opts
    pick = {n: 0 for n in cands}
    used = sum(c[0][0] for c in cands.values())
    while True:
        best = None
        for n, opts in cands.items():
            b0, e0, _ = opts[pick[n]]
            for j in range(pick[n] + 1, len(opts)):
                b1, e1, _ = opts[j]
                if e1 < e0 and used + b1 - b0 <= budget_bits / 8:
                    gain = (e0 - e1) / max(b1 - b0, 1)
                    if best is None or gain > best[0]:
                        best = (gain, n, j, b1 - b0)
        if best is None:
            return {n: cands[n][pick[n]][2] for n in cands}
        _, n, j, extra = best
        pick[n], used = j, used + extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurement", default=str(ROOT / "benchmarks/results/smollm2_measurement.yaml"))
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--calib-rows", type=int, default=32)
    args = ap.parse_args()

    from planner.cli import main as cli
    from planner.errors import load_measurement
    from planner.formats import parse_option
    from planner.plan import load_plan
    from planner.spec import architecture_digest, layer_linears
    from refengine.api import Model, _Weights, load_model, negative_log_likelihood
    from refengine.calibrate import DEFAULT_CALIB, LayerWalk, calibration_rows
    from refengine.gptq import gptq_quantize
    from refengine.packed import QuantizedLinear
    from refengine.tokenizer import for_checkpoint
    from refengine.weights import ROPE_INTERLEAVED, load_checkpoint

    ckpt = load_checkpoint("smollm2-135m")
    spec, tok = ckpt.spec, for_checkpoint(ckpt)
    linears = layer_linears(spec)
    params = sum(t.numel for t in linears)
    m = load_measurement(args.measurement, architecture_digest(spec), linears)
    eval_ids = tok.encode((ROOT / "refengine/data/eval.txt").read_text(encoding="utf-8"))[:args.eval_tokens]

    def err_of(assign: dict) -> float:
        return float(sum(m.errors[n][o] for n, o in assign.items()))

    def bpw_of(assign: dict) -> float:
        return 8 * sum(parse_option(assign[t.name]).tensor_bytes(*t.shape) for t in linears) / params

    configs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target, uniform in TARGETS.items():
            u = {t.name: uniform for t in linears}
            bpw = bpw_of(u)
            plan = Path(tmp) / f"p{target}.yaml"
            cli(["plan", "--gpu", "rtx4090", "--model", "smollm2-135m", "--bpw", f"{bpw:.6f}", "--measurement",
                 args.measurement, "--ctx", str(WINDOW), "-o", str(plan), "--quiet"])
            opt = {n: o.name for n, o in load_plan(plan).layout.assignment.items()}
            g = greedy(linears, m.errors, bpw * params)
            for kind, assign in (("uniform", u), ("optimal", opt), ("greedy", g)):
                configs[f"{target}/{kind}"] = {"target": target, "allocation": kind, "assignment": assign,
                                               "bpw": round(bpw_of(assign), 4), "sum_error": round(err_of(assign), 5)}

    # GPTQ tensors for every config, from one reference walk.
    ppl_configs = list(configs)
    ids = calibration_rows(tok, DEFAULT_CALIB.read_text(encoding="utf-8"), args.calib_rows, 256)
    walk = LayerWalk(spec, ckpt["embed"].numpy(np.float32), ids, ckpt.rope_layout == ROPE_INTERLEAVED,
                     rope_factors=ckpt.rope_factors)
    gptq: dict[str, dict] = {k: {} for k in ppl_configs}
    t0 = time.perf_counter()
    for i in range(spec.num_layers):
        w = {n: r.numpy(np.float32) for n, r in ckpt.layer(i).items()}
        seen = walk.step(w)
        for t in linears:
            if t.layer != i:
                continue
            done = {}
            for k in ppl_configs:
                o = configs[k]["assignment"][t.name]
                if o not in done:
                    done[o] = QuantizedLinear(gptq_quantize(w[t.name], parse_option(o), seen.gram(t.name)))
                gptq[k][t.name] = done[o]
        print(f"gptq layer {i + 1}/{spec.num_layers} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    gptq_seconds = time.perf_counter() - t0

    def perplexity(model) -> float:
        nll, count = negative_log_likelihood(model, eval_ids, WINDOW)
        return math.exp(nll / count)

    ref = load_model("smollm2-135m", ctx=WINDOW)
    rows = {"reference (dequantized GGUF, float32)": {"perplexity": round(perplexity(ref), 4)}}
    print(f"reference perplexity {rows['reference (dequantized GGUF, float32)']['perplexity']}", file=sys.stderr)
    for k in ppl_configs:
        c = configs[k]
        assign = {n: parse_option(o) for n, o in c["assignment"].items()}
        for method in ("rtn", "gptq"):
            weights = _Weights(ckpt, assign)
            if method == "gptq":
                weights.cache.update(gptq[k])
            model = Model(ckpt, tok, WINDOW, "fp16", WINDOW, assign, weights)
            c[f"perplexity_{method}"] = round(perplexity(model), 4)
        print(f"{k}: bpw {c['bpw']} error {c['sum_error']} ppl rtn {c['perplexity_rtn']} gptq {c['perplexity_gptq']}",
              file=sys.stderr)

    print(f"{'target':>6s} {'allocation':>10s} {'bpw':>7s} {'sum error':>10s} {'ppl RTN':>9s} {'ppl GPTQ':>9s}")
    for k, c in configs.items():
        ppl = (f"{c['perplexity_rtn']:9.3f} {c['perplexity_gptq']:9.3f}" if "perplexity_rtn" in c
               else f"{'-':>9s} {'-':>9s}")
        print(f"{c['target']:6.1f} {c['allocation']:>10s} {c['bpw']:7.3f} {c['sum_error']:10.4f} {ppl}")
    print(f"reference perplexity: {rows['reference (dequantized GGUF, float32)']['perplexity']:.3f} "
          f"over {len(eval_ids)} tokens of refengine/data/eval.txt")
    write_json({"date": time.strftime("%Y-%m-%d"), "measurement": Path(args.measurement).name,
                "eval_tokens": len(eval_ids), "window": WINDOW, "calibration_tokens": int(ids.size),
                "gptq_seconds_all_configs": round(gptq_seconds), "reference": rows,
                "configs": {k: {x: y for x, y in c.items() if x != "assignment"} for k, c in configs.items()}},
               ROOT / "benchmarks/results/allocation.json")
    plot(configs, rows["reference (dequantized GGUF, float32)"]["perplexity"])


def plot(configs: dict, reference: float) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, method, style in (("uniform", "rtn", "o--"), ("uniform", "gptq", "s--"), ("optimal", "rtn", "o-"),
                                ("optimal", "gptq", "s-"), ("greedy", "gptq", "x:")):
        pts = sorted((c["bpw"], c[f"perplexity_{method}"]) for c in configs.values()
                     if c["allocation"] == kind and f"perplexity_{method}" in c)
        ax.plot(*zip(*pts), style, label=f"{kind} allocation, {method.upper()}")
    ax.axhline(reference, color="gray", lw=1, label="unquantized (dequantized GGUF)")
    ax.set_xlabel("average bits per weight (linears)")
    ax.set_ylabel("perplexity (refengine/data/eval.txt)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: knapsack-optimal vs uniform allocation, GPTQ vs RTN")
    ax.legend()
    fig.tight_layout()
    (ROOT / "docs").mkdir(exist_ok=True)
    fig.savefig(ROOT / "docs/allocation.png", dpi=120)


if __name__ == "__main__":
    main()
