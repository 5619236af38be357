"""What a quantized KV cache costs llama.cpp's CUDA flash attention in decode, against an f16 cache.

A token deep into the context reads the whole cache. llama.cpp's CUDA (and HIP) flash attention runs a
quantized cache two ways:
  * vec kernel (head sizes 64, 128, 256): it dequantizes K and V as it reads them, for each query head on its
    own, so a KV head shared by more query heads (grouped-query attention) is read and dequantized more often.
    The published runs below show that this is slower than reading an f16 cache of the same depth: a q8_0
    cache saves memory, not decode time, and the more so the more query heads share a KV head. Fit:
    ratio = C x (query heads per KV head / 4)^K, least squares on the logarithms; planner/targets/llamacpp.py
    prices the read as an f16 cache's bytes times it (QUANT_CACHE_READ_COST, QUANT_CACHE_GQA_EXPONENT), but
    never below the quantized cache's own bytes.
  * no vec kernel (multi-head latent attention's 576-wide K): launch_fattn converts the layer's K to f16 in
    the CUDA pool every token, then the tensor-core kernel reads the copy: the quantized bytes, plus the f16
    copy written and read again. That is a byte count, not a fit; this script checks it.

Pairs: published llama-bench tg128 rows of one card, model, build and depth, with an f16 and a quantized cache,
and the depth-0 row of the same runs. The attention's seconds are 1/tps(depth) - 1/tps(0); the ratio is the
quantized cache's over the f16 cache's. It needs no card specs, so cards hwdb lacks count too.

Metal: llama.cpp's Metal flash attention reads the cache once for each query head, so a run's slowdown with depth
is the f16 cache's bytes x (query heads per KV head) x METAL_CACHE_READ_COST at the weights' share of the
bandwidth. Fit: the ratio of measured to modelled extra seconds between each deeper Metal row and its run's
shallowest row past depth 0 (the step from depth 0 adds a fixed cost of its own), divided by the query heads per
KV head; the geometric mean over the pairs.

Prints a table; writes benchmarks/results/kv_read_fit.json.
Usage: python benchmarks/fit_kv_read.py
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchlib  # noqa: E402
import hwdb  # noqa: E402
import published_rows  # noqa: E402
from planner import memory as mem  # noqa: E402
from planner.formats import KV_FORMATS  # noqa: E402
from planner.roofline import EFFICIENCY, memory_bandwidth  # noqa: E402
from planner.targets.llamacpp import KV_FROM_TYPE, kv_read_bytes  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "kv_read_fit.json"


def pairs(rows: list[published_rows.Row]) -> list[dict]:
    """Every (card, model, build, depth) with an f16 and a quantized row, and the same runs' depth-0 row. Rows of
    cards hwdb lacks count too: the ratio needs no card."""
    runs: dict[tuple, dict] = {}
    specs = {}
    for row in rows:
        m = row.m
        if m["engine"] != "llama.cpp" or m["test"] not in ("tg128", "tg32", "decode"):
            continue
        key = (m["gpu"], m["model"], m["weights_format"], str(m.get("engine_version")))
        runs.setdefault(key, {})[(m.get("cache_type") or "f16", int(m.get("depth") or 0))] = m["tokens_per_s"]
        specs[key] = row.model
    out = []
    for key, got in sorted(runs.items()):
        gpu, model, fmt, build = key
        start = [tps for (_, d), tps in got.items() if d == 0]
        if not start:
            continue
        t0 = 1 / start[0]
        spec = specs[key]
        for (cache, depth), tps in sorted(got.items()):
            if cache == "f16" or depth == 0 or ("f16", depth) not in got:
                continue
            f16_s = 1 / got[("f16", depth)] - t0
            q_s = 1 / tps - t0
            row = {"gpu": gpu, "model": model, "weights": fmt, "build": build, "depth": depth, "cache": cache,
                   "f16_attention_ms": round(f16_s * 1e3, 3), "quantized_attention_ms": round(q_s * 1e3, 3),
                   "ratio": round(q_s / f16_s, 3), "mla": bool(spec and spec.is_mla),
                   "gqa": spec.num_heads // spec.num_kv_heads if spec else None}
            if spec is not None and spec.is_mla:
                q_row = mem.kv_bytes_per_token(spec, KV_FORMATS[KV_FROM_TYPE[cache]])
                f_row = mem.kv_bytes_per_token(spec, KV_FORMATS["fp16"])
                row["conversion_model_ratio"] = round((q_row + 2 * f_row) / f_row, 3)
            out.append(row)
    return out


def metal_pairs(rows: list[published_rows.Row]) -> list[dict]:
    """Each Metal run's deeper rows against its shallowest row past depth 0 (mean depth: + n_gen / 2)."""
    runs: dict[tuple, list] = {}
    for row in rows:
        m = row.m
        if row.skip or m["engine"] != "llama.cpp" or m["backend"] != "metal" or not m.get("depth"):
            continue
        key = (m["gpu"], m["model"], m["weights_format"], str(m.get("engine_version")))
        runs.setdefault(key, []).append(row)
    out = []
    for (gpu, model, fmt, build), rows in sorted(runs.items()):
        rows.sort(key=lambda r: r.m["depth"])
        spec, card = rows[0].model, rows[0].gpu
        eff = EFFICIENCY[card.vendor]
        rate = eff.decode_bandwidth * memory_bandwidth(card, eff) * 1e9

        def at(r):
            depth = int(r.m["depth"]) + int(r.m.get("n_gen") or 0) // 2
            return depth, sum(kv_read_bytes(spec, "fp16", depth)) / rate
        d0, s0 = at(rows[0])
        for r in rows[1:]:
            d, s = at(r)
            measured = 1 / r.m["tokens_per_s"] - 1 / rows[0].m["tokens_per_s"]
            gqa = spec.num_heads // spec.num_kv_heads
            out.append({"gpu": gpu, "model": model, "weights": fmt, "build": build, "from_depth": d0, "depth": d,
                        "gqa": gqa, "measured_ms": round(measured * 1e3, 3), "bytes_model_ms": round((s - s0) * 1e3, 3),
                        "cost": round(measured / (s - s0) / gqa, 3)})
    return out


def fit(vec: list[dict]) -> tuple[float, float]:
    """Least squares of log(ratio) on log(gqa / 4): (C, K)."""
    xs = [math.log(p["gqa"] / 4) for p in vec]
    ys = [math.log(p["ratio"]) for p in vec]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - k * mx), k


def main() -> None:
    rows = published_rows.load(hwdb.load())
    found = pairs(rows)
    vec = [p for p in found if not p["mla"]]
    c, k = fit(vec)
    for p in vec:
        p["fit_ratio"] = round(c * (p["gqa"] / 4) ** k, 3)
    print(f"{'gpu':28s} {'model':12s} {'gqa':>3s} {'depth':>6s} {'cache':6s} {'f16 ms':>7s} {'quant ms':>8s} "
          f"{'ratio':>6s} {'model':>6s}")
    for p in found:
        expected = p.get("conversion_model_ratio", p.get("fit_ratio"))
        print(f"{p['gpu'][:28]:28s} {p['model'][:12]:12s} {p['gqa']:3d} {p['depth']:6d} {p['cache']:6s} "
              f"{p['f16_attention_ms']:7.3f} {p['quantized_attention_ms']:8.3f} {p['ratio']:6.2f} {expected:6.2f}")
    worst = max(abs(p["ratio"] / p["fit_ratio"] - 1) for p in vec)
    print(f"\nvec kernel: QUANT_CACHE_READ_COST = {c:.2f}, QUANT_CACHE_GQA_EXPONENT = {k:.2f} ({len(vec)} pairs; "
          f"worst residual {worst:.0%})")
    for p in (p for p in found if p["mla"]):
        print(f"MLA ({p['model']}, {p['gpu']}): measured {p['ratio']:.2f}, f16 copy model {p['conversion_model_ratio']:.2f}")
    metal = metal_pairs(rows)
    metal_cost = math.exp(sum(math.log(p["cost"]) for p in metal) / len(metal))
    print(f"\n{'Metal run':40s} {'gqa':>3s} {'depths':>14s} {'measured ms':>11s} {'bytes ms':>8s} {'cost':>5s}")
    for p in metal:
        print(f"{(p['gpu'] + ' ' + p['model'])[:40]:40s} {p['gqa']:3d} {p['from_depth']:6d}->{p['depth']:6d} "
              f"{p['measured_ms']:11.3f} {p['bytes_model_ms']:8.3f} {p['cost']:5.2f}")
    print(f"METAL_CACHE_READ_COST = {metal_cost:.2f} ({len(metal)} pairs, {min(p['cost'] for p in metal):.2f} to "
          f"{max(p['cost'] for p in metal):.2f})")
    benchlib.write_json({"what": "quantized over f16 KV-cache attention seconds in llama.cpp CUDA decode, same card, "
                                 "model, build and depth (published llama-bench rows); vec pairs fit as "
                                 "C x (gqa / 4)^K. Metal: measured over modelled extra seconds with depth, per query "
                                 "head a KV head serves",
                         "quant_cache_read_cost": round(c, 2), "quant_cache_gqa_exponent": round(k, 2),
                         "vec_pairs": len(vec), "worst_residual": round(worst, 3), "pairs": found,
                         "metal_cache_read_cost": round(metal_cost, 2), "metal_pairs": metal}, RESULT)
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
