"""What a quantized KV cache costs llama.cpp's CUDA flash attention in decode, and what Metal's costs.

A token deep into the context reads the whole cache. llama.cpp's CUDA (and HIP) flash attention runs a
quantized cache two ways:
  * vec kernel (head sizes 64, 128, 256): it dequantizes K and V as it reads them, for each query head on its
    own, so a KV head shared by more query heads (grouped-query attention) is dequantized more often. Published
    runs show this is slower than reading an f16 cache of the same depth (a q8_0 cache saves memory, not decode
    time), and by a factor that differs between cards: an RTX 3090 pays 2.6x the f16 time on Gemma 2B, an RTX
    5070 Laptop GPU 1.9x. A compute cost explains both: the cache's own bytes at the weights' share of the
    bandwidth, plus QUANT_CACHE_DEQUANT_CYCLES SM clock cycles for every cached element each query head reads,
    over the card's SMs at its boost clock (planner/targets/llamacpp.py kv_dequant_seconds). Fit: for each
    quantized row of a depth ladder, the seconds it adds over the same run's depth-0 row, less the modelled bytes'
    seconds, over the modelled cycles' seconds at one cycle an element; the geometric mean over the rows.
  * no vec kernel (multi-head latent attention's 576-wide K): launch_fattn converts the layer's K to f16 in
    the CUDA pool every token, then the tensor-core kernel reads the copy: the quantized bytes, plus the f16
    copy written and read again. That is a byte count, not a fit; this script checks it against the ratio of a
    quantized row's attention seconds (1/tps(depth) - 1/tps(0)) to an f16 row's at the same depth and build.

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
from planner.roofline import efficiency, memory_bandwidth  # noqa: E402
from planner.targets.llamacpp import (KV_FROM_TYPE, QUANT_CACHE_DEQUANT_CYCLES, kv_dequant_seconds,  # noqa: E402
                                      kv_read_bytes, kv_read_cost)

RESULT = ROOT / "benchmarks" / "results" / "kv_read_fit.json"


def _runs(rows: list[published_rows.Row]) -> dict[tuple, dict]:
    """llama.cpp decode rows by (card, model, file, build), then by (cache type, depth)."""
    runs: dict[tuple, dict] = {}
    for row in rows:
        m = row.m
        if m["engine"] != "llama.cpp" or m["test"] not in ("tg128", "tg32", "decode") or row.model is None:
            continue
        key = (m["gpu"], m["model"], m["weights_format"], str(m.get("engine_version")))
        runs.setdefault(key, {})[(m.get("cache_type") or "f16", int(m.get("depth") or 0))] = row
    return runs


def vec_rows(rows: list[published_rows.Row]) -> list[dict]:
    """Each quantized-cache row past depth 0 of a card hwdb has (not latent attention), against its run's depth-0
    row: the measured extra seconds, the modelled bytes' seconds, and the modelled dequantization seconds at one
    cycle an element (the fit's unit)."""
    out = []
    for (gpu, model, fmt, build), got in sorted(_runs(rows).items()):
        for (cache, depth), row in sorted(got.items()):
            start = got.get((cache, 0))
            if cache == "f16" or depth == 0 or start is None or row.gpu is None or row.model.is_mla:
                continue
            spec, card, kv = row.model, row.gpu, KV_FROM_TYPE[cache]
            eff = efficiency(card)
            rate = eff.decode_bandwidth * memory_bandwidth(card, eff) * 1e9
            measured = 1 / row.m["tokens_per_s"] - 1 / start.m["tokens_per_s"]
            bytes_s = sum(kv_read_cost(spec, kv, depth, card.vendor)) / rate
            unit_s = sum(kv_dequant_seconds(spec, kv, depth, card)) / QUANT_CACHE_DEQUANT_CYCLES
            out.append({"gpu": gpu, "model": model, "weights": fmt, "build": build, "depth": depth, "cache": cache,
                        "gqa": spec.num_heads // spec.num_kv_heads, "sms": card.sm_count,
                        "boost_clock_mhz": card.boost_clock_mhz, "measured_ms": round(measured * 1e3, 3),
                        "bytes_ms": round(bytes_s * 1e3, 3), "cycles": round((measured - bytes_s) / unit_s, 4),
                        "_unit_s": unit_s, "_bytes_s": bytes_s, "_measured_s": measured})
    return out


def mla_pairs(rows: list[published_rows.Row]) -> list[dict]:
    """Latent-attention runs with an f16 and a quantized row at one depth, and the same runs' depth-0 row."""
    out = []
    for (gpu, model, fmt, build), got in sorted(_runs(rows).items()):
        start = [row for (_, d), row in got.items() if d == 0]
        if not start or not start[0].model.is_mla:
            continue
        spec, t0 = start[0].model, 1 / start[0].m["tokens_per_s"]
        for (cache, depth), row in sorted(got.items()):
            if cache == "f16" or depth == 0 or ("f16", depth) not in got:
                continue
            f16_s = 1 / got[("f16", depth)].m["tokens_per_s"] - t0
            q_s = 1 / row.m["tokens_per_s"] - t0
            q_row = mem.kv_bytes_per_token(spec, KV_FORMATS[KV_FROM_TYPE[cache]])
            f_row = mem.kv_bytes_per_token(spec, KV_FORMATS["fp16"])
            out.append({"gpu": gpu, "model": model, "weights": fmt, "build": build, "depth": depth, "cache": cache,
                        "f16_attention_ms": round(f16_s * 1e3, 3), "quantized_attention_ms": round(q_s * 1e3, 3),
                        "ratio": round(q_s / f16_s, 3),
                        "conversion_model_ratio": round((q_row + 2 * f_row) / f_row, 3)})
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
        eff = efficiency(card)
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


def main() -> None:
    rows = published_rows.load(hwdb.load())
    vec = vec_rows(rows)
    cycles = math.exp(sum(math.log(p["cycles"]) for p in vec) / len(vec))
    print(f"{'gpu':28s} {'model':12s} {'gqa':>3s} {'SMs':>3s} {'depth':>6s} {'cache':6s} {'measured ms':>11s} "
          f"{'bytes ms':>8s} {'cycles':>6s} {'model ms':>8s} {'resid':>6s}")
    for p in vec:
        model_s = p["_bytes_s"] + cycles * p["_unit_s"]
        p["model_ms"] = round(model_s * 1e3, 3)
        p["residual"] = round(model_s / p["_measured_s"] - 1, 3)
        print(f"{p['gpu'][:28]:28s} {p['model'][:12]:12s} {p['gqa']:3d} {p['sms']:3d} {p['depth']:6d} {p['cache']:6s} "
              f"{p['measured_ms']:11.3f} {p['bytes_ms']:8.3f} {p['cycles']:6.4f} {p['model_ms']:8.3f} "
              f"{p['residual']:+6.1%}")
    for p in vec:
        for k in ("_unit_s", "_bytes_s", "_measured_s"):
            del p[k]
    worst = max(abs(p["residual"]) for p in vec)
    low, high = min(p["cycles"] for p in vec), max(p["cycles"] for p in vec)
    print(f"\nvec kernel: QUANT_CACHE_DEQUANT_CYCLES = {cycles:.3f} ({len(vec)} rows, {low:.3f} "
          f"to {high:.3f}; worst residual of the attention seconds {worst:.0%})")
    mla = mla_pairs(rows)
    for p in mla:
        print(f"MLA ({p['model']}, {p['gpu']}, {p['depth']}): measured {p['ratio']:.2f} x the f16 cache's attention "
              f"seconds, f16 copy model {p['conversion_model_ratio']:.2f}")
    metal = metal_pairs(rows)
    metal_cost = math.exp(sum(math.log(p["cost"]) for p in metal) / len(metal))
    print(f"\n{'Metal run':40s} {'gqa':>3s} {'depths':>14s} {'measured ms':>11s} {'bytes ms':>8s} {'cost':>5s}")
    for p in metal:
        print(f"{(p['gpu'] + ' ' + p['model'])[:40]:40s} {p['gqa']:3d} {p['from_depth']:6d}->{p['depth']:6d} "
              f"{p['measured_ms']:11.3f} {p['bytes_model_ms']:8.3f} {p['cost']:5.2f}")
    print(f"METAL_CACHE_READ_COST = {metal_cost:.2f} ({len(metal)} pairs, {min(p['cost'] for p in metal):.2f} to "
          f"{max(p['cost'] for p in metal):.2f})")
    benchlib.write_json({"what": "llama.cpp CUDA decode with a quantized KV cache (published llama-bench depth "
                                 "ladders): the seconds each row adds over its run's depth-0 row, less the cache's "
                                 "bytes at the weights' share of the bandwidth, in SM clock cycles per cached element "
                                 "a query head reads; latent attention's f16-copy byte model against f16/quantized "
                                 "pairs. Metal: measured over modelled extra seconds with depth, per query head a KV "
                                 "head serves",
                         "quant_cache_dequant_cycles": round(cycles, 3), "vec_rows": len(vec),
                         "worst_residual": round(worst, 3), "rows": vec, "mla_pairs": mla,
                         "metal_cache_read_cost": round(metal_cost, 2), "metal_pairs": metal}, RESULT)
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
