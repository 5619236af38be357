"""Per-kernel times on the GPU for one decode step's shapes (Llama-2-7B: hidden 4096, MLP 11008, 32 heads),
by CUDA events, median of 50 launches after warm-up: where a decode step's time goes. Prints a table and
writes JSON (default benchmarks/results/gpu_kernels.json). A benchmark, never a test."""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import asdict
from datetime import date
from pathlib import Path

import numpy as np

from benchlib import ROOT, write_json

from gpu_decode import random_linear  # noqa: E402
from planner.formats import kv_format, parse_option  # noqa: E402
from planner.memory import ATTN_MAX_SPLITS  # noqa: E402


COLD_BYTES = 160_000_000          # > 3x the H200's 50 MB L2 (the largest L2 of the cards vramwise knows)
# Llama-2-7B's decode shapes (tests/test_gpu_benchmarks.py shrinks them to run this script on the CPU twin)
H, F, HEADS, HEAD_D, CTX = 4096, 11008, 32, 128, 2048
LENGTHS, PREFILL_T = (64, 512, 2048), 512


def timed(cp, fn, reps: int = 30, per_graph: int = 20) -> float:
    """Microseconds per launch: `per_graph` launches captured as one CUDA graph (so host launch costs stay
    out), the graph's replay timed by events, median of `reps`."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()
        s.synchronize()
        s.begin_capture()
        try:
            for _ in range(per_graph):
                fn()
        finally:
            g = s.end_capture()
        g.launch(s)
        out = []
        for _ in range(reps):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(s)
            g.launch(s)
            b.record(s)
            b.synchronize()
            out.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / per_graph)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_kernels.json")
    args = ap.parse_args(argv)
    import cupy as cp

    from gpuengine import device, kernels, launch
    from gpuengine.kernels import MATVEC_INSTANCES, MATVEC_STAGED, TC_TILES
    from gpuengine.layout import build_image, views
    rng = np.random.default_rng(0)
    rows = []

    def rotation(option, n, k):
        """Copies of one linear filling COLD_BYTES, taken in turn by successive launches, so each launch reads
        its weights from DRAM as decode does (one copy would stay in the H200's 50 MB L2 between launches)."""
        image = build_image({"w": random_linear(rng, parse_option(option), n, k)})
        copies = [views(cp.asarray(image.data), image)["w"] for _ in range(1 + max(1, COLD_BYTES // image.nbytes))]
        return itertools.cycle(copies).__next__, image.nbytes

    x = cp.asarray(rng.standard_normal(F).astype(np.float32))
    xp = cp.empty(F + 96, cp.float32)
    shapes = ((H, H), (F, H), (H, F))
    sweep = []
    mats = {(n, k): rotation("1:4b g128", n, k) for n, k in shapes}
    outs = {n: cp.empty(n, cp.float32) for n, _ in shapes}

    fixed = {(n, k): mats[n, k][0]() for n, k in shapes}          # one copy of each, for the results check

    def results() -> dict:
        """Each shape's 4-bit matvec output with the launch as it is set now."""
        out = {}
        for n, k in shapes:
            launch.matvec(x[:k], outs[n], fixed[n, k], xp)
            out[n] = outs[n].get().astype(np.float64)
        return out

    want = results()                                                # the engine's default matvec

    def sweep_point(shape) -> dict:
        """The 4-bit matvec of each shape with the launch as it is set now, as a sweep record of `shape`: its
        times, or why it has none (it failed, or its results are not the default matvec's within 1e-4 of the
        largest, so a broken candidate is never picked)."""
        try:
            got = results()
            bad = [n for n in got if np.abs(got[n] - want[n]).max() > 1e-4 * np.abs(want[n]).max()]
            if bad:
                raise RuntimeError(f"its results differ from the default matvec's (n = {bad})")
            us = {f"{n}x{k}": timed(cp, lambda: launch.matvec(x[:k], outs[n], mats[n, k][0](), xp)) for n, k in shapes}
        except Exception as exc:                   # a candidate that fails leaves the others to be timed
            print(f"matvec 1:4b g128, {shape.kernel} x {shape.warps} warps: failed: {exc}", flush=True)
            return {**asdict(shape), "error": " ".join(str(exc).split())[:300]}
        # as this device's NVRTC built it (other NVRTC versions give the same source other registers)
        compiled = kernels.function(launch._matvec_module(), shape.kernel)
        regs = {"registers": compiled.num_regs, "local_bytes": compiled.local_size_bytes} \
            if hasattr(compiled, "num_regs") else {}
        print(f"matvec 1:4b g128, {shape.kernel} x {shape.warps} warps: "
              + ", ".join(f"{s_} {v:.1f} us" for s_, v in us.items())
              + (f" ({regs['registers']} registers)" if regs else ""), flush=True)
        return {**asdict(shape), **regs, "us": us, "total_us": sum(us.values())}

    def fastest(records) -> dict:
        timed_ok = [r for r in records if "total_us" in r]
        if not timed_ok:
            raise SystemExit("error: no matvec shape of the sweep ran (see the failures above)")
        return min(timed_ok, key=lambda r: r["total_us"])

    shapes_swept = [launch.MatvecShape(*i, w) for i in MATVEC_INSTANCES for w in (1, 2, 4, 8)]
    # staged: each thread's weights through shared memory by cp.async, all of a unit's rows in flight; and
    # with the integer dot (dp4a against x as 23-bit integers)
    shapes_swept += [launch.MatvecShape(r, 1, 32, w, True, idot) for idot in (False, True) for r in MATVEC_STAGED
                     for w in (1, 2, 4, 8)]
    # ordered: the unit-a-lane shapes with their loads in program order (all R rows' weights in flight at once)
    shapes_swept += [launch.MatvecShape(*i, w, ordered=True) for i in MATVEC_INSTANCES if i[2] == 32
                     for w in (1, 2, 4, 8)]
    for shape in shapes_swept:                 # 8 warps: K split over more warps (run 11's ncu: too few in flight)
        launch.MATVEC = shape
        sweep.append(sweep_point(shape))
    best = fastest(sweep)
    launch.MATVEC = launch.MatvecShape.from_json(best)
    print(f"best: {launch.MATVEC.kernel} x {launch.MATVEC.warps} warps", flush=True)
    tc_sweep, tc_best = [], None

    def save(complete: bool) -> None:
        """The JSON as it stands: written after each sweep too, so a run cut short still names its shapes."""
        write_json({"device": device.name(), "nvrtc": device.nvrtc_version(), "date": date.today().isoformat(),
                    "complete": complete,
                    "matvec_block_sweep": sweep, "matvec_best": best,
                    "tensor_core_sweep": tc_sweep,
                    "tensor_core_best": {k: tc_best[k] for k in ("tiles", "warps")} if tc_best else None,
                    "kernels": rows}, args.out)

    save(False)
    # the best plain, staged, integer-dot and ordered shapes against each other at every width (4096x4096; the
    # sweep is 4-bit only)
    kinds = [[r for r in sweep if (r.get("staged", False), r.get("idot", False), r.get("ordered", False)) == kind
              and "total_us" in r]
             for kind in ((False, False, False), (True, False, False), (True, True, False), (False, False, True))]
    bests = [launch.MatvecShape.from_json(fastest(k)) for k in kinds if k]
    for option in ("1:2b g128", "1:3b g128", "1:5b g128", "1:6b g128", "1:8b g128"):
        w, nbytes = rotation(option, H, H)
        for shape in bests:
            launch.MATVEC = shape
            us = timed(cp, lambda: launch.matvec(x[:H], outs[H], w(), xp))
            rows.append({"kernel": f"matvec {option} {H}x{H} ({shape.kernel} x {shape.warps})", "us": us,
                         "gb_s": nbytes / us / 1e3})
    # the best staged and integer-dot shapes again with the register caps (matvec.cu holds the staged matvec to
    # what nvcc 13.0 and NVRTC 13.5 give it; NVRTC 13.0 takes more: nvrtc_check_13.0.json)
    launch.MATVEC_REGS = True
    for shape in (s_ for s_ in bests if s_.staged):
        launch.MATVEC = shape
        for n, k in shapes:
            us = timed(cp, lambda: launch.matvec(x[:k], outs[n], mats[n, k][0](), xp))
            rows.append({"kernel": f"matvec 1:4b g128 {n}x{k}, registers capped ({shape.kernel} x {shape.warps})",
                         "us": us, "gb_s": mats[n, k][1] / us / 1e3})
    launch.MATVEC_REGS = False
    launch.MATVEC = launch.MatvecShape.from_json(best)
    save(False)
    # the tensor-core candidate (tmatvec, sm_80+) on the same 4-bit shapes
    if device.compute_capability() >= launch.TC_MIN_CAPABILITY:
        for tiles in TC_TILES:
            for warps in (2, 4, 8):
                launch.MATVEC_TC = launch.TcShape(tiles, warps)
                tc_sweep.append(sweep_point(launch.MATVEC_TC))
        tc_best = fastest(tc_sweep)
        launch.MATVEC_TC = launch.TcShape(tc_best["tiles"], tc_best["warps"])
        save(False)
        tc_label = f"(tensor cores, {launch.MATVEC_TC.kernel} x {launch.MATVEC_TC.warps})"
        for n, k in shapes:                                  # beside the rows below: GB/s of the same weights
            us = timed(cp, lambda: launch.matvec(x[:k], outs[n], mats[n, k][0](), xp))
            rows.append({"kernel": f"matvec 1:4b g128 {n}x{k} {tc_label}", "us": us, "gb_s": mats[n, k][1] / us / 1e3})
        for option in ("1:2b g128", "1:8b g128"):          # the other widths tmatvec takes, both ways
            w, nbytes = rotation(option, H, H)
            for tc in (None, launch.MATVEC_TC):
                saved, launch.MATVEC_TC = launch.MATVEC_TC, tc
                us = timed(cp, lambda: launch.matvec(x[:H], outs[H], w(), xp))
                rows.append({"kernel": f"matvec {option} {H}x{H}" + (f" {tc_label}" if tc else ""), "us": us,
                             "gb_s": nbytes / us / 1e3})
                launch.MATVEC_TC = saved
        launch.MATVEC_TC = None
    for option in ("1:4b g128", "0.1:5b/0.9:4b g128", "0.5:3b/0.5:2b g128", "1:2b g128", "1:8b g32"):
        for n, k in shapes:
            w, nbytes = rotation(option, n, k)
            y = cp.empty(n, cp.float32)
            us = timed(cp, lambda: launch.matvec(x[:k], y, w(), xp))
            rows.append({"kernel": f"matvec {option} {n}x{k}", "us": us, "gb_s": nbytes / us / 1e3})
    qkv = [rotation("1:4b g128", H, H) for _ in range(3)]
    ys = [cp.empty(H, cp.float32) for _ in range(3)]
    gate, up = rotation("1:4b g128", F, H), rotation("1:4b g128", F, H)
    yg = cp.empty(F, cp.float32)
    for tc in [None] + ([launch.TcShape(tc_best["tiles"], tc_best["warps"])] if tc_sweep else []):
        launch.MATVEC_TC = tc
        label = f" (tensor cores, {tc.kernel} x {tc.warps})" if tc else ""
        us = timed(cp, lambda: launch.matvec_fused(x[:H], [(y, w(), None, False) for y, (w, _) in zip(ys, qkv)]))
        rows.append({"kernel": f"matvec fused q,k,v 1:4b g128 3x{H}x{H}{label}", "us": us,
                     "gb_s": sum(b for _, b in qkv) / us / 1e3})
        us = timed(cp, lambda: launch.matvec_glu(x[:H], gate[0](), up[0](), yg))
        rows.append({"kernel": f"matvec gate+up+swiglu 1:4b g128 2x{F}x{H}{label}", "us": us,
                     "gb_s": (gate[1] + up[1]) / us / 1e3})
    launch.MATVEC_TC = None
    # RMSNorm folded into the matvec (the fastest unit-a-lane shape) against rmsnorm then the matvec
    sweep_32 = [r for r in sweep if launch.MatvecShape.from_json(r).takes_variants and "total_us" in r]
    if sweep_32:
        chosen = launch.MATVEC
        launch.MATVEC = launch.MatvecShape.from_json(fastest(sweep_32))
        nw, xn = cp.ones(H, cp.float32), cp.empty((1, H), cp.float32)
        x2 = x[:H].reshape(1, H)
        folds = (
                ("rmsnorm, then fused q,k,v", lambda: (launch.rmsnorm(x2, nw, xn, 1e-5), launch.matvec_fused(
                    xn[0], [(y, w(), None, False) for y, (w, _) in zip(ys, qkv)]))),
                ("fused q,k,v with the norm folded in", lambda: launch.matvec_fused(
                    x[:H], [(y, w(), None, False) for y, (w, _) in zip(ys, qkv)], norm=(nw, 1e-5))),
                ("rmsnorm, then gate+up+swiglu", lambda: (launch.rmsnorm(x2, nw, xn, 1e-5), launch.matvec_glu(
                    xn[0], gate[0](), up[0](), yg))),
                ("gate+up+swiglu with the norm folded in", lambda: launch.matvec_glu(
                    x[:H], gate[0](), up[0](), yg, norm=(nw, 1e-5))))
        for label, run in folds:
            rows.append({"kernel": f"{label} ({launch.MATVEC.kernel} x {launch.MATVEC.warps})", "us": timed(cp, run),
                         "gb_s": 0})
        launch.MATVEC_REGS = True                     # the folds again with the register caps
        for label, run in folds[1::2]:
            rows.append({"kernel": f"{label}, registers capped ({launch.MATVEC.kernel} x {launch.MATVEC.warps})",
                         "us": timed(cp, run), "gb_s": 0})
        launch.MATVEC_REGS = False
        # a mixed option's input gathered by gather_x before the matvec, or read in place by it
        mixed, nbytes = rotation("0.1:5b/0.9:4b g128", H, H)
        ym = cp.empty(H, cp.float32)
        for gather, regs in (("launch", False), ("kernel", False), ("kernel", True)):
            launch.GATHER, launch.MATVEC_REGS = gather, regs
            us = timed(cp, lambda: launch.matvec(x[:H], ym, mixed(), xp))
            rows.append({"kernel": f"matvec 0.1:5b/0.9:4b g128 {H}x{H}, gathered by {gather}"
                                   + (", registers capped" if regs else "")
                                   + f" ({launch.MATVEC.kernel} x {launch.MATVEC.warps})", "us": us, "gb_s": nbytes / us / 1e3})
        launch.GATHER, launch.MATVEC_REGS = "launch", False
        launch.MATVEC = chosen
    # routed experts' matvec (qmatvec_moe, the chosen shape), uncapped and with the register caps: Mixtral's
    # gate (8 experts of 14336 x 4096, 2 a token) and Qwen3-30B-A3B's (128 of 768 x 2048, 8 a token), 4-bit
    for label, experts, k_slots, n, k in (("Mixtral gate", 8, 2, 14336 * H // 4096, H),
                                          ("Qwen3-30B-A3B gate", 128, 8, 768 * H // 4096, H // 2)):
        images = [build_image({"w": random_linear(rng, parse_option("1:4b g128"), n, k)}) for _ in range(experts)]
        lins = [views(cp.asarray(img.data), img)["w"] for img in images]
        table = launch.expert_table(lins, cp.zeros(experts * 256, cp.uint8))
        sel = cp.asarray(rng.choice(experts, k_slots, replace=False).astype(np.int32))
        xe, ye = cp.asarray(rng.standard_normal((1, k)).astype(np.float32)), cp.empty((k_slots, n), cp.float32)
        xpe = cp.empty((k_slots, table.width), cp.float32)
        chosen = launch.MATVEC
        for regs, shape in [(False, chosen), (True, chosen)] + [(False, b) for b in bests if b != chosen]:
            launch.MATVEC_REGS, launch.MATVEC = regs, shape       # and the best shape of each other kind
            us = timed(cp, lambda: launch.matvec_experts(xe, k_slots, table, sel, xpe, ye))
            rows.append({"kernel": f"experts {label} {k_slots}x{n}x{k} 1:4b g128" + (", registers capped" if regs else "")
                                   + f" ({launch.MATVEC.experts} x {launch.MATVEC.warps})",
                         "us": us, "gb_s": k_slots * images[0].nbytes / us / 1e3})
        launch.MATVEC_REGS, launch.MATVEC = False, chosen
    t, hq, hkv, d, ctx = 1, HEADS, HEADS, HEAD_D, CTX
    q = cp.asarray(rng.standard_normal((t, hq, d)).astype(np.float32))
    out = cp.empty((t, hq, d), cp.float32)
    partials = cp.empty((hq, ATTN_MAX_SPLITS, d + 2), cp.float32)

    def decode_attention(fmt, kv_heads, lengths, label):
        """A decode step's attention at each length: rope_store then `attention` (+ merge), as measured, then
        rope_store then attention_gqa (+ merge), then attention_step (all of it, one launch)."""
        f = kv_format(fmt)
        cache = cp.asarray(rng.integers(0, 120, (ctx, kv_heads, f.row_bytes(d)), dtype=np.uint8))
        kx = cp.asarray(rng.standard_normal((1, kv_heads, d)).astype(np.float32))
        tickets = cp.zeros(kv_heads, cp.int32)
        for length in lengths:
            pos = cp.asarray(np.array([length - 1], np.int32))
            gb = 2 * length * kv_heads * f.row_bytes(d) / 1e3
            for kernel in ("split", "gqa", "lanes"):        # the measured kernel, then the candidates
                launch.ATTN_DECODE = kernel
                tag = "" if kernel == "split" else f" ({kernel})"
                us = timed(cp, lambda: launch.attention(fmt, q, cache, cache, pos, out, partials))
                rows.append({"kernel": f"attention {label} len {length}{tag}", "us": us, "gb_s": gb / us})
                us = timed(cp, lambda: (launch.rope_store(fmt, q, kx, kx, cache, cache, pos, 1e4, True),
                                        launch.attention(fmt, q, cache, cache, pos, out, partials)))
                rows.append({"kernel": f"rope_store + attention {label} len {length}{tag}", "us": us, "gb_s": gb / us})
            launch.ATTN_DECODE = "split"
            us = timed(cp, lambda: launch.attention_step(fmt, q, kx, kx, cache, cache, pos, out, partials, tickets,
                                                         1e4, True))
            rows.append({"kernel": f"attention step {label} len {length} (rope, store, attention, merge)",
                         "us": us, "gb_s": gb / us})
        rows.append({"kernel": f"rope_store {label}", "gb_s": 0,
                     "us": timed(cp, lambda: launch.rope_store(fmt, q, kx, kx, cache, cache, pos, 1e4, True))})

    for fmt in ("fp16", "q8"):
        decode_attention(fmt, hkv, LENGTHS, fmt)
    # decode attention of a GQA model (4 query heads a KV head, as Llama 3 8B's 32 on 8): each kernel
    gkv = hq // 4
    decode_attention("fp16", gkv, LENGTHS[1:], f"fp16 {hq}q/{gkv}kv heads")
    # prefill's kernels, each beside its alternative (dequant_slice / dequant_rows, per-query / tiled attention)
    saved = launch.DEQUANT, launch.ATTN_PREFILL
    for option in ("1:4b g128", "0.1:5b/0.9:4b g128"):
        w, nbytes = rotation(option, H, H)
        tile = cp.empty((H, H), cp.uint16)
        for kernel in ("slice", "rows"):
            launch.DEQUANT = kernel
            us = timed(cp, lambda: launch.dequantize(w(), 0, tile))
            rows.append({"kernel": f"dequantize {kernel} {option} {H}x{H}", "us": us,
                         "gb_s": (nbytes + tile.nbytes) / us / 1e3})
    t, f = PREFILL_T, kv_format("fp16")
    cache = cp.asarray(rng.integers(0, 120, (ctx, hkv, f.row_bytes(d)), dtype=np.uint8))
    q = cp.asarray(rng.standard_normal((t, hq, d)).astype(np.float32))
    out = cp.empty((t, hq, d), cp.float32)
    pos = cp.asarray(np.arange(t, dtype=np.int32))
    for kernel in ("query", "tiled"):
        launch.ATTN_PREFILL = kernel
        us = timed(cp, lambda: launch.attention("fp16", q, cache, cache, pos, out, partials))
        rows.append({"kernel": f"attention prefill {kernel} fp16 {t} queries", "us": us,
                     "gb_s": 2 * t * hkv * f.row_bytes(d) / us / 1e3})
    launch.DEQUANT, launch.ATTN_PREFILL = saved
    h = cp.asarray(rng.standard_normal((1, H)).astype(np.float32))
    hn, wn = cp.empty((1, H), cp.float32), cp.ones(H, cp.float32)
    rows.append({"kernel": f"rmsnorm {H}", "us": timed(cp, lambda: launch.rmsnorm(h, wn, hn, 1e-5)), "gb_s": 0})
    g, u = cp.ones(F, cp.float32), cp.ones(F, cp.float32)
    rows.append({"kernel": f"swiglu {F}", "us": timed(cp, lambda: launch.glu(g, u)), "gb_s": 0})
    rows.append({"kernel": "empty launch (argmax of 1)", "us": timed(cp, lambda: launch.argmax(g[:1], cp.empty(1, cp.int32))), "gb_s": 0})
    print(f"{device.name()} ({date.today()})")
    for r in rows:
        print(f"{r['kernel']:45} {r['us']:9.1f} us {r['gb_s']:8.0f} GB/s")
    save(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
