"""The planner's speed models against published runs it was not fit to: how far off is a prediction?

For every single-sequence decode row of benchmarks/published/measurements.yaml, predict tokens/s with the model
of the engine that ran it, at the row's own settings:
  * llama.cpp: the llama.cpp target's decode model (planner.targets.llamacpp.decode_seconds_for) for the row's
    GGUF file type, its -ngl (partial offload) and its number of cards (layers split evenly);
  * ExLlamaV2: the exllamav2 target's plan at the row's EXL2 bits per weight.
Rows of engines vramwise does not plan for (gpt-fast, MLC, ExLlama v1, GPTQ files in ExLlamaV2), of cards or
models hwdb lacks, and of MoE expert offload are listed as skipped, with the reason.

Rows are grouped: `fit` (the llama-bench Llama 2 7B rows benchmarks/calibrate_speed.py fits the factors to: an
in-sample residual, not a test) and `held-out` (everything else: other models, harnesses, builds, engines).
Errors are predicted / published - 1. Old builds are slower than the January 2026 llama.cpp the target models,
so each row carries the year its source gives for the build, and the held-out llama.cpp rows are summed up
by era too.

Prints a table; writes benchmarks/results/published_validation.json.
Usage: python benchmarks/validate_published.py
"""
from __future__ import annotations

import datetime
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchlib  # noqa: E402
import hwdb  # noqa: E402
import published_rows  # noqa: E402
from calibrate_speed import in_fit  # noqa: E402
from planner.budget import Host  # noqa: E402
from planner.targets import TargetError, TargetRequest, plan_target  # noqa: E402
from planner.targets import gguf  # noqa: E402
from planner.targets.llamacpp import KV_FROM_TYPE, N_UBATCH, decode_seconds_for  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "published_validation.json"
HOST = Host(256 * 2**30)


def _ngl(row: published_rows.Row) -> int | None:
    """The row's -ngl when it offloads part of the model; None when every layer ran on the GPU."""
    text = str(row.m.get("gpu_layers") or "")
    hit = re.search(r"-ngl (\d+)", text)
    return int(hit.group(1)) if hit and int(hit.group(1)) < row.model.num_layers else None


def _host(row: published_rows.Row) -> Host:
    bw = row.m.get("host_ram_bandwidth_gbs")
    return Host(HOST.ram_bytes, cpu_bandwidth_gb_s=float(bw)) if bw else HOST


def predict(row: published_rows.Row) -> tuple[float | None, str]:
    """Predicted tokens/s, or None and why not."""
    m = row.m
    req = TargetRequest(row.model, row.gpu, _host(row), gpu_count=m["gpu_count"])
    if m["engine"] == "llama.cpp":
        ftype = m["weights_format"].split()[0]
        if ftype not in gguf.FTYPES:
            return None, f"GGUF type {m['weights_format']!r} not modelled"
        if "cpu-moe" in str(m.get("gpu_layers") or ""):
            return None, "MoE experts on the CPU"
        ngl = _ngl(row)
        weights = sum(gguf.file_bytes(row.model, gguf.tensor_types(row.model, ftype, ftype.startswith("IQ"))).values())
        if ngl is None and published_rows.spilled(row, weights):
            return None, "weights larger than the card's memory (the run spilled)"
        depth = int(m.get("depth") or 0) + int(m.get("n_gen") or 0) // 2       # the generated tokens' mean depth
        ubatch = int(m.get("n_ubatch") or N_UBATCH)
        kv = KV_FROM_TYPE.get(m.get("cache_type") or "f16")
        if kv is None:
            return None, f"cache type {m['cache_type']!r} not modelled"
        return 1 / decode_seconds_for(req, ftype, ngl, depth, ubatch, kv), ""
    if m["engine"] == "exllamav2":
        bpw = re.fullmatch(r"exl2-([\d.]+)bpw", m["weights_format"])
        if not bpw:
            return None, f"{m['weights_format']} weights (vramwise plans EXL2 files)"
        try:
            out = plan_target("exllamav2", TargetRequest(row.model, row.gpu, HOST, gpu_count=m["gpu_count"],
                                                         bpw=float(bpw.group(1))))
        except TargetError as exc:
            return None, f"exllamav2 target: {exc}"
        return 1 / out.decode_s, ""
    return None, f"no vramwise target for {m['engine']}"


def _summary(errs: list[float]) -> dict:
    if not errs:
        return {"rows": 0}
    a = sorted(abs(e) for e in errs)
    return {"rows": len(errs), "median_abs_err": round(statistics.median(a), 3),
            "p90_abs_err": round(a[min(len(a) - 1, int(0.9 * len(a)))], 3), "max_abs_err": round(a[-1], 3),
            "mean_err": round(statistics.fmean(errs), 3), "within_15pct": sum(x <= 0.15 for x in a)}


def main() -> None:
    db = hwdb.load()
    done, skipped = [], []
    for row in published_rows.load(db):
        if not row.decode:
            continue
        pred, why = (None, row.skip) if row.skip else predict(row)
        m = row.m
        base = {"id": m["id"], "engine": m["engine"], "gpu": m["gpu"], "gpu_count": m["gpu_count"],
                "model": m["model"], "format": m["weights_format"], "version": str(m.get("engine_version", "")),
                "depth": int(m.get("depth") or 0), "cache_type": m.get("cache_type") or "f16"}
        if pred is None:
            skipped.append({**base, "why": why})
            continue
        year = re.search(r"\b(20[12]\d)\b", base["version"])
        done.append({**base, "group": "fit" if in_fit(row) else "held-out", "hwdb_gpu": row.gpu.id,
                     "year": int(year.group(1)) if year else None, "moe": row.model.is_moe,
                     **({"outlier": m["outlier"]} if m.get("outlier") else {}),
                     **({"known_gap": m["known_gap"]} if m.get("known_gap") else {}),
                     "published_tps": m["tokens_per_s"], "predicted_tps": round(pred, 2),
                     "err": round(pred / m["tokens_per_s"] - 1, 4)})
    groups = {}
    for name, keep in (("fit", lambda r: r["group"] == "fit"), ("held-out", lambda r: r["group"] == "held-out"),
                       ("held-out llama.cpp", lambda r: r["group"] == "held-out" and r["engine"] == "llama.cpp"),
                       ("held-out llama.cpp 2025+", lambda r: r["group"] == "held-out" and r["engine"] == "llama.cpp"
                        and (r["year"] or 0) >= 2025),
                       ("held-out llama.cpp 2023-24", lambda r: r["group"] == "held-out" and r["engine"] == "llama.cpp"
                        and r["year"] in (2023, 2024)),
                       ("held-out llama.cpp MoE", lambda r: r["group"] == "held-out" and r["engine"] == "llama.cpp"
                        and r["moe"]),
                       ("held-out exllamav2", lambda r: r["group"] == "held-out" and r["engine"] == "exllamav2")):
        groups[name] = _summary([r["err"] for r in done if keep(r)])

    print(f"{'group':9s} {'engine':10s} {'gpu':34s} {'n':>2s} {'model':16s} {'format':12s} {'version':12s} "
          f"{'published':>9s} {'predicted':>9s} {'err':>7s}")
    for r in sorted(done, key=lambda r: (r["group"], r["engine"], r["model"], r["gpu"])):
        print(f"{r['group']:9s} {r['engine']:10s} {r['gpu'][:34]:34s} {r['gpu_count']:2d} {r['model'][:16]:16s} "
              f"{r['format'][:12]:12s} {r['version'][:12]:12s} {r['published_tps']:9.1f} {r['predicted_tps']:9.1f} "
              f"{r['err']:+7.1%}")
    print()
    for name, s in groups.items():
        if s["rows"]:
            print(f"{name:26s} rows {s['rows']:3d}  median |err| {s['median_abs_err']:.1%}  p90 {s['p90_abs_err']:.1%}"
                  f"  max {s['max_abs_err']:.1%}  mean {s['mean_err']:+.1%}  within 15%: {s['within_15pct']}")
    reasons: dict[str, int] = {}
    for r in skipped:
        reasons[r["why"]] = reasons.get(r["why"], 0) + 1
    print("skipped:", ", ".join(f"{why} ({n})" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
    benchlib.write_json({"what": "planner speed models against published decode runs",
                         "date": datetime.date.today().isoformat(), "summary": groups,
                         "rows": done, "skipped": skipped}, RESULT)


if __name__ == "__main__":
    main()
