"""The reference engine against llama.cpp (the reference implementation for GGUF) on the packaged SmolLM2.

Both engines read the same SmolLM2-135M-Instruct Q4_1 GGUF and are teacher-forced on the same token ids
(llama.cpp's own tokenization, BOS not added, special tokens parsed); per position we compare the next-token
distributions: KL(llama.cpp || ours), top-1 agreement, and the Pearson correlation of the logits.
llama.cpp's CPU matmuls round activations to 8 bits (Q4_1 weights x Q8_1 activations, the tied Q8_0 head
x Q8_0) where ours dequantize the weights and multiply in float32, so the logits differ by small noise:
compare distributions, not max-abs. Two controls separate that noise from a real mismatch:
  * f32 control: llama.cpp on the same GGUF with every tensor dequantized to F32 (exactly the float weights
    ours multiply with; F32 matmuls take float32 activations), so only summation order and llama.cpp's f16
    Q / softmax in attention remain: any architecture slip (RoPE, norm eps, scale, head) shows here;
  * q8 noise floor: KL(ours || ours with its linear inputs rounded as llama.cpp's Q8_1/Q8_0 blocks do):
    how far 8-bit activation rounding alone moves our own distributions.
Our own tokenizer is checked against llama.cpp's on every prompt too.

Needs llama-cpp-python (not a dependency of vramwise: pip install llama-cpp-python).
Prints a table; writes benchmarks/results/llamacpp_compare.json.
Usage: python benchmarks/compare_llamacpp.py
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT = ROOT / "benchmarks" / "results" / "llamacpp_compare.json"
MODEL = "smollm2-135m"
N_CTX = 512

LONG = (
    "The history of the lighthouse is, in many ways, the history of coastal trade itself. Long before "
    "electric lamps and rotating Fresnel lenses, sailors relied on open fires lit on headlands to mark "
    "dangerous rocks and the mouths of harbours. The Pharos of Alexandria, completed around 280 BC, stood "
    "more than a hundred metres tall and was counted among the wonders of the ancient world; travellers "
    "claimed its light could be seen from fifty kilometres out at sea. In medieval Europe, monasteries and "
    "port towns kept small beacons burning, often paid for by tolls levied on passing ships. The great "
    "change came in the nineteenth century. Augustin Fresnel, a French physicist, designed a lens made of "
    "concentric rings of glass prisms that bent scattered light into a single powerful beam, and within a "
    "few decades his design was adopted along nearly every major coastline. Keepers lived with their "
    "families in isolated towers, trimming wicks, polishing brass and winding the clockwork that turned the "
    "lens through the night. Storms could cut them off from the mainland for weeks. Today almost all "
    "lighthouses are automated, monitored remotely and powered by solar panels, and satellite navigation has "
    "made many of them redundant. Yet they remain beloved landmarks: restored towers now serve as museums, "
    "guest houses and wedding venues, and the sight of a distant flashing light still tells a sailor, as it "
    "has for two thousand years, that land is near and that someone has taken care to warn them."
)

PROMPTS: dict[str, str] = {
    "prose": "The old library smelled of dust and rain. Every evening, after the last visitor had gone, "
             "the librarian walked between the shelves and straightened the books that had been left askew.",
    "code": "def fibonacci(n: int) -> list[int]:\n    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
            "    seq = [0, 1]\n    while len(seq) < n:\n        seq.append(seq[-1] + seq[-2])\n"
            "    return seq[:n]\n\n\nif __name__ == \"__main__\":\n    print(fibonacci(10))\n",
    "chatml": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n"
              "<|im_start|>assistant\nThe capital of France is Paris. It is famous for the Eiffel Tower, "
              "the Louvre and its cafés.<|im_end|>\n<|im_start|>user\nThanks! And Italy?<|im_end|>\n"
              "<|im_start|>assistant\n",
    "numbers": "Quarterly revenue: Q1 1,234,567.89; Q2 2,345,678.90; Q3 3,141,592.65; Q4 2,718,281.83. "
               "Total = 9,440,121.27 (up 12.5% from 8,391,218.91 in 2023). 17 * 23 = 391; 2^10 = 1024.",
    "french": "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui vendait des "
              "coquillages. Chaque matin, elle se levait avant l'aube et marchait le long de la plage déserte.",
    "long": LONG,
}


# --- metrics --------------------------------------------------------------------------------------------

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, ours: np.ndarray) -> dict:
    """Per position: KL(ref || ours) in nats, top-1 agreement, Pearson correlation of the logit vectors."""
    assert ref.shape == ours.shape, (ref.shape, ours.shape)
    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)                      # (T,)
    top_ref, top_ours = ref.argmax(-1), ours.argmax(-1)
    agree = top_ref == top_ours
    a = ref - ref.mean(-1, keepdims=True)
    b = ours - ours.mean(-1, keepdims=True)
    corr = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))        # (T,)
    # where top-1 differs: llama.cpp's logit margin between its choice and ours (a near-tie is noise)
    rows = np.nonzero(~agree)[0]
    margins = (ref[rows, top_ref[rows]] - ref[rows, top_ours[rows]]).astype(float)
    return {
        "tokens": int(ref.shape[0]),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "kl_max_position": int(kl.argmax()),
        "top1_agreement": float(agree.mean()),
        "top1_disagreements": [{"position": int(r), "llamacpp": int(top_ref[r]), "ours": int(top_ours[r]),
                                "llamacpp_logit_margin": round(float(m), 4)} for r, m in zip(rows, margins)],
        "corr_mean": float(corr.mean()),
        "corr_min": float(corr.min()),
        "max_abs_logit_diff": float(np.abs(ref - ours).max()),
        "mean_abs_logit_diff": float(np.abs(ref - ours).mean()),
    }


# --- engines --------------------------------------------------------------------------------------------

def load_llamacpp(path: str, n_ctx: int = N_CTX, n_threads: int = 2):
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=n_threads,
                           verbose=False)


def llamacpp_tokenize(llm, text: str) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def llamacpp_logits(llm, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits (len(ids), vocab) from an empty KV cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def write_f32_gguf(src: str, dst: str) -> None:
    """Copy a GGUF with every tensor dequantized to F32 (gguf-py's reference dequantizers), metadata kept."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        writer.add_key_value(name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        rows_cols = tuple(int(n) for n in reversed(t.shape.tolist()))
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(rows_cols)
        writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def q8_round(x: np.ndarray) -> np.ndarray:
    """x (T, K) as llama.cpp's quantize_row_q8_1 / q8_0 leave it: blocks of 32, d = amax/127 stored as f16,
    q = round(x / d) (numpy rounds ties to even, ggml away from zero: ties are vanishingly rare)."""
    t, k = x.shape
    b = x.reshape(t, k // 32, 32).astype(np.float32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return (np.round(b * inv) * d.astype(np.float16).astype(np.float32)).reshape(t, k)


@contextlib.contextmanager
def q8_activations():
    """Our engine with every linear's input rounded as llama.cpp's CPU quantized matmuls round it."""
    import refengine.model as rm

    orig = rm.linear
    rm.linear = lambda x, w: orig(q8_round(x), w)
    try:
        yield
    finally:
        rm.linear = orig


def token_mismatch(ours: list[int], ref: list[int], tokenizer) -> dict | None:
    """None when identical, else where and how the two tokenizations first differ."""
    if ours == ref:
        return None
    i = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    return {"first_diff": i, "ours_len": len(ours), "llamacpp_len": len(ref),
            "ours": [tokenizer.token(t) for t in ours[i:i + 5]],
            "llamacpp": [tokenizer.token(t) for t in ref[i:i + 5]]}


CONTROL_KEYS = ("kl_mean", "kl_max", "top1_agreement", "corr_mean", "corr_min", "max_abs_logit_diff")


def run(prompts: dict[str, str], model=None, llm=None, llm_f32=None, noise_floor: bool = False) -> dict:
    """Per prompt: ours vs llama.cpp on the GGUF as shipped; with llm_f32 (llama.cpp on write_f32_gguf's
    copy) the f32 control; with noise_floor the q8 noise floor (one more forward pass of ours)."""
    from refengine import load_model
    model = model or load_model(MODEL, ctx=N_CTX)
    llm = llm or load_llamacpp(str(model.checkpoint.path))
    out = {}
    for name, text in prompts.items():
        ids = llamacpp_tokenize(llm, text)
        ours_ids = model.tokenizer.encode(text)
        t0 = time.perf_counter()
        ref = llamacpp_logits(llm, ids)
        t1 = time.perf_counter()
        got = model.logits(ids)
        t2 = time.perf_counter()
        row = compare_logits(ref, got)
        row["tokenizer_identical"] = ours_ids == ids
        row["tokenizer_mismatch"] = token_mismatch(ours_ids, ids, model.tokenizer)
        row["seconds"] = {"llamacpp": round(t1 - t0, 3), "ours": round(t2 - t1, 3)}
        if llm_f32 is not None:
            ctl = compare_logits(llamacpp_logits(llm_f32, ids), got)
            row["f32_control"] = {k: ctl[k] for k in CONTROL_KEYS}
        if noise_floor:
            with q8_activations():
                rounded = model.logits(ids)
            floor = compare_logits(got, rounded)
            row["q8_noise_floor"] = {k: floor[k] for k in CONTROL_KEYS}
        out[name] = row
    return out


# --- report ---------------------------------------------------------------------------------------------

def print_table(results: dict) -> None:
    head = f"{'prompt':<10}{'tokens':>7}{'KL mean':>11}{'KL max':>11}{'top-1':>8}{'corr mean':>11}" \
           f"{'corr min':>10}{'max|dl|':>9}  tokenizer"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(f"{name:<10}{r['tokens']:>7}{r['kl_mean']:>11.2e}{r['kl_max']:>11.2e}{r['top1_agreement']:>8.3f}"
              f"{r['corr_mean']:>11.6f}{r['corr_min']:>10.6f}{r['max_abs_logit_diff']:>9.3f}  "
              f"{'identical' if r['tokenizer_identical'] else 'MISMATCH'}")
    for name, r in results.items():
        if r["tokenizer_mismatch"]:
            print(f"tokenizer mismatch on {name!r}: {r['tokenizer_mismatch']}")
        for d in r["top1_disagreements"]:
            print(f"top-1 differs on {name!r} at position {d['position']}: llama.cpp {d['llamacpp']}, ours "
                  f"{d['ours']} (llama.cpp's margin {d['llamacpp_logit_margin']:.4f} logits)")


def print_control(results: dict, key: str, title: str) -> None:
    rows = {n: r[key] for n, r in results.items() if key in r}
    if not rows:
        return
    print(f"\n{title}")
    head = f"{'prompt':<10}{'KL mean':>11}{'KL max':>11}{'top-1':>8}{'corr mean':>13}{'corr min':>12}{'max|dl|':>9}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:<10}{r['kl_mean']:>11.2e}{r['kl_max']:>11.2e}{r['top1_agreement']:>8.3f}"
              f"{r['corr_mean']:>13.8f}{r['corr_min']:>12.8f}{r['max_abs_logit_diff']:>9.4f}")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    import llama_cpp
    from refengine import load_model

    model = load_model(MODEL, ctx=N_CTX)
    llm = load_llamacpp(str(model.checkpoint.path))
    with tempfile.TemporaryDirectory() as tmp:
        f32_path = os.path.join(tmp, "f32.gguf")
        write_f32_gguf(str(model.checkpoint.path), f32_path)
        llm_f32 = load_llamacpp(f32_path)
        results = run(PROMPTS, model, llm, llm_f32, noise_floor=True)
        llm_f32.close()
    print("ours vs llama.cpp, both on the GGUF as shipped (llama.cpp rounds activations to 8 bits)")
    print_table(results)
    print_control(results, "f32_control", "f32 control: ours vs llama.cpp on the same weights dequantized to F32 "
                                          "(no activation rounding)")
    print_control(results, "q8_noise_floor", "q8 noise floor: ours vs ours with 8-bit activation rounding "
                                             "(Q8_1 blocks) simulated")
    total = sum(r["tokens"] for r in results.values())
    summary = {
        "tokens": total,
        "kl_mean": sum(r["kl_mean"] * r["tokens"] for r in results.values()) / total,
        "kl_max": max(r["kl_max"] for r in results.values()),
        "top1_agreement": sum(r["top1_agreement"] * r["tokens"] for r in results.values()) / total,
        "corr_min": min(r["corr_min"] for r in results.values()),
        "tokenizer_identical": all(r["tokenizer_identical"] for r in results.values()),
    }
    for key in ("f32_control", "q8_noise_floor"):
        summary[key] = {
            "kl_mean": sum(r[key]["kl_mean"] * r["tokens"] for r in results.values()) / total,
            "kl_max": max(r[key]["kl_max"] for r in results.values()),
            "top1_agreement": sum(r[key]["top1_agreement"] * r["tokens"] for r in results.values()) / total,
            "corr_min": min(r[key]["corr_min"] for r in results.values()),
        }
    print(f"\nall {total} positions: KL mean {summary['kl_mean']:.2e}, KL max {summary['kl_max']:.2e}, "
          f"top-1 {summary['top1_agreement']:.4f}, corr min {summary['corr_min']:.6f}, tokenizer "
          f"{'identical' if summary['tokenizer_identical'] else 'MISMATCH'}")
    for key in ("f32_control", "q8_noise_floor"):
        c = summary[key]
        print(f"{key}: KL mean {c['kl_mean']:.2e}, KL max {c['kl_max']:.2e}, top-1 {c['top1_agreement']:.4f}, "
              f"corr min {c['corr_min']:.8f}")
    write_json(RESULT, {
        "what": "reference engine vs llama.cpp, teacher-forced on llama.cpp's token ids (KL in nats, "
                "KL(llama.cpp || ours) per position)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "llama_cpp_python": llama_cpp.__version__,
        "model": MODEL,
        "gguf": Path(model.checkpoint.path).name,
        "n_ctx": N_CTX,
        "llamacpp_threads": 2,
        "kv": "fp16 (both)",
        "controls": {
            "f32_control": "ours vs llama.cpp on the same GGUF with every tensor dequantized to F32 (gguf-py), "
                           "so llama.cpp does no 8-bit activation rounding",
            "q8_noise_floor": "KL(ours || ours with each linear input rounded to Q8_1 blocks of 32, d in f16)",
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "summary": summary,
        "prompts": results,
    })
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
