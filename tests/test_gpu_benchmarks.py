"""benchmarks/gpu_kernels.py end to end on the CPU twin (tests/cudaemu.py) with small shapes, so that a lent
GPU's minutes are not spent finding a slip in the script: every kernel and candidate it times is launched
once through the real launchers. Nothing is timed here (`timed` runs the launch once and reports 1 µs)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import cudaemu
from test_gpu_kernels import record_kernels

pytestmark = pytest.mark.cudaemu
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_gpu_kernels(tmp_path, monkeypatch) -> tuple[dict, set]:
    """gpu_kernels.py on the CPU twin at small shapes, every launch timed as 1 us: (its JSON, the kernels it
    launched)."""
    cudaemu.install(monkeypatch)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_kernels

    from gpuengine import device, launch
    for name, value in dict(H=128, F=256, HEADS=8, HEAD_D=32, CTX=64, LENGTHS=(8, 32, 64), PREFILL_T=24,
                            COLD_BYTES=1).items():
        monkeypatch.setattr(gpu_kernels, name, value)
    launched, kernels = [], record_kernels(monkeypatch)
    monkeypatch.setattr(gpu_kernels, "timed", lambda cp, fn, **kw: (launched.append(fn()), 1.0)[1])
    monkeypatch.setattr(device, "name", lambda: "CPU twin")
    for name in ("MATVEC", "DEQUANT", "ATTN_PREFILL", "ATTN_DECODE", "GATHER", "MATVEC_TC", "MATVEC_REGS"):   # restored after
        monkeypatch.setattr(launch, name, getattr(launch, name))
    out = tmp_path / "kernels.json"
    assert gpu_kernels.main(["--out", str(out)]) == 0
    return json.loads(out.read_text()), kernels


def test_gpu_kernels_script_launches_every_kernel_and_candidate(tmp_path, monkeypatch):
    from gpuengine import launch
    from gpuengine.kernels import MATVEC_INSTANCES, MATVEC_STAGED, TC_TILES
    defaults = launch.MATVEC, launch.DEQUANT, launch.ATTN_PREFILL, launch.ATTN_DECODE
    doc, kernels = run_gpu_kernels(tmp_path, monkeypatch)
    lane = [i for i in MATVEC_INSTANCES if i[2] == 32]
    assert len(doc["matvec_block_sweep"]) == 4 * (len(MATVEC_INSTANCES) + 2 * len(MATVEC_STAGED) + len(lane))
    assert len(doc["tensor_core_sweep"]) == 3 * len(TC_TILES)
    assert doc["tensor_core_best"]["tiles"] in TC_TILES and doc["nvrtc"] == "none (the CPU twin)"
    names = " | ".join(r["kernel"] for r in doc["kernels"])
    for expected in ("(gqa)", "8q/2kv heads", "dequantize rows", "dequantize slice", "attention prefill tiled",
                     "attention prefill query", "with the norm folded in", "rmsnorm, then fused q,k,v",
                     "gathered by launch", "gathered by kernel", "rope_store + attention fp16 len 64 (gqa)",
                     "attention step fp16 len 64", "attention step q8 len 8", "attention step fp16 8q/2kv heads len 64",
                     "matvec 1:4b g128 128x128 (tensor cores", "matvec fused q,k,v 1:4b g128 3x128x128 (tensor cores",
                     "matvec gate+up+swiglu 1:4b g128 2x256x128 (tensor cores", "matvec 1:2b g128 128x128 (tensor cores",
                     "matvec 1:8b g128 128x128 (tensor cores", "gate+up+swiglu with the norm folded in, registers capped",
                     "gathered by kernel, registers capped", "experts Mixtral gate", "experts Qwen3-30B-A3B gate 8x24x64 1:4b g128, registers capped",
                     "matvec 1:5b g128 128x128 (qmatvec<4, 1, 32, 4> x 1)", "matvec 1:3b g128 128x128 (qmatvec<1, 4, 8, 0>",
                     "(qmatvec_moe<4, 1, 32, 4> x 1)", "matvec 1:8b g128 128x128 (qmatvec<4, 1, 32, 12> x 1)",
                     "(qmatvec_moe<4, 1, 32, 12> x 1)", "matvec 1:6b g128 128x128 (qmatvec<2, 1, 32, 16> x 1)",
                     "matvec 1:4b g128 128x128, registers capped (qmatvec<4, 1, 32, 12> x 1)",
                     "attention fp16 len 64 (lanes)",
                     "rope_store + attention q8 len 8 (lanes)"):
        assert expected in names
    # the script leaves the engine's switches as it found them, but for the sweep's pick
    assert (launch.DEQUANT, launch.ATTN_PREFILL, launch.ATTN_DECODE) == defaults[1:] and launch.GATHER == "launch"
    assert launch.MATVEC_TC is None and launch.MATVEC_REGS is False
    assert {f"tmatvec<{t}, 0>" for t in TC_TILES} <= kernels and {"attention_gqa<0, 1>", "attention_lanes<2>"} <= kernels
    assert {f"qmatvec<{r}, 1, 32, {n}>" for r in MATVEC_STAGED for n in (4, 12)} <= kernels
    assert {f"qmatvec<{r}, {u}, 32, 16>" for r, u, _ in lane} <= kernels
    assert launch.MATVEC == launch.MatvecShape.from_json(doc["matvec_best"])


def test_gpu_kernels_sweep_skips_a_candidate_that_fails_or_is_wrong(tmp_path, monkeypatch):
    """A sweep shape whose launch fails, or whose results are not the default matvec's, is recorded with
    why and never picked; the others are timed."""
    from gpuengine import launch
    matvec = launch.matvec

    def flawed(x, y, lin, xp, *args, **kw):
        if launch.MATVEC.rows == 16:
            raise launch.LaunchError("no such shape here")
        matvec(x, y, lin, xp, *args, **kw)
        if launch.MATVEC.idot:
            y *= 1.001

    monkeypatch.setattr(launch, "matvec", flawed)
    doc, _ = run_gpu_kernels(tmp_path, monkeypatch)
    sweep = doc["matvec_block_sweep"]
    assert all("no such shape" in r["error"] for r in sweep if r["rows"] == 16)
    assert all("differ" in r["error"] for r in sweep if r.get("idot") and r["rows"] != 16)
    assert all("total_us" in r for r in sweep if r["rows"] != 16 and not r.get("idot"))
    assert doc["matvec_best"]["rows"] != 16 and not doc["matvec_best"].get("idot")


def test_gpu_decode_script_runs_each_case_and_the_candidates(tmp_path, monkeypatch):
    """gpu_decode.py --candidates end to end: each case, the 70B extrapolation, and streaming serial and
    overlapped, on models of the plans' formats shrunk to a few hundred thousand weights."""
    import dataclasses
    import sys
    import types

    cudaemu.install(monkeypatch)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_decode

    from gpuengine import device, launch
    from gpuengine import model as engine
    cp = sys.modules["cupy"]
    cp.__version__ = "CPU twin"
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(total_bytes=lambda: 1, free_all_blocks=lambda: None)
    for module, name in ((engine, "OVERLAP"), (launch, "DEQUANT"), (launch, "ATTN_PREFILL"), (launch, "ATTN_DECODE"),
                         (launch, "FUSE_NORM"), (launch, "MATVEC"), (launch, "GATHER"), (launch, "MATVEC_REGS")):
        monkeypatch.setattr(module, name, getattr(module, name))             # restored after the test
    monkeypatch.setattr(device, "require", lambda: None)
    monkeypatch.setattr(device, "name", lambda: "CPU twin")
    monkeypatch.setattr(gpu_decode, "copy_bandwidth", lambda cp: {"device_copy_gb_s": 1e3, "host_to_device_gb_s": 50.0})
    monkeypatch.setattr(gpu_decode, "PROMPT", 12)
    monkeypatch.setattr(gpu_decode, "DECODE_AT", 12)
    make_plan = gpu_decode.make_plan

    def tiny_plan(model, gpu, bpw, ctx, extra=()):
        plan = make_plan(model, "h100-sxm", bpw, 64, extra)
        spec = dataclasses.replace(plan.spec, hidden_size=64, intermediate_size=96, num_heads=4,
                                   num_kv_heads=2 if plan.spec.num_kv_heads < plan.spec.num_heads else 4,
                                   head_dim=16, vocab_size=64, num_layers=2)
        return dataclasses.replace(plan, spec=spec)
    monkeypatch.setattr(gpu_decode, "make_plan", tiny_plan)
    out = tmp_path / "decode.json"
    assert gpu_decode.main(["--out", str(out), "--candidates"]) == 0
    doc = json.loads(out.read_text())
    assert doc["engine"] == {"matvec": dataclasses.asdict(launch.MATVEC), "overlap_streaming": True, "dequant": "rows",
                             "prefill_attention": "tiled", "decode_attention": "step", "norm_folded": True,
                             "gather_in_kernel": True, "tensor_cores": None, "register_caps": True}
    assert [c["case"] for c in doc["cases"]] == ["SmolLM2-135M 4.0 bpw", "Llama-2-7B shape 4.0 bpw",
                                                 "Llama-2-7B shape 2.5 bpw"]
    # the tensor-core matvec, with the shape a gpu_kernels.py sweep chose
    kernels = tmp_path / "kernels.json"
    kernels.write_text(json.dumps({"tensor_core_best": None}))                # a card before sm_80
    with pytest.raises(SystemExit, match="has no tensor-core sweep"):
        gpu_decode.main(["--out", str(tmp_path / "tc.json"), "--quick", "--tensor-cores-from", str(kernels)])
    with pytest.raises(SystemExit, match="cannot read"):
        gpu_decode.main(["--quick", "--tensor-cores-from", str(tmp_path / "missing.json")])
    kernels.write_text(json.dumps({"tensor_core_best": {"tiles": 2, "warps": 4}}))
    monkeypatch.setattr(launch, "MATVEC_TC", None)
    assert gpu_decode.main(["--out", str(tmp_path / "tc.json"), "--quick", "--tensor-cores-from", str(kernels)]) == 0
    assert json.loads((tmp_path / "tc.json").read_text())["engine"]["tensor_cores"] == {"tiles": 2, "warps": 4}
    # a sweep's staged, integer-dot pick, with the lane-a-position decode attention
    monkeypatch.setattr(launch, "MATVEC_TC", None)
    staged = {"rows": 8, "units": 1, "lane": 32, "warps": 2, "staged": True, "idot": True, "ordered": False}
    kernels.write_text(json.dumps({"matvec_best": staged}))
    assert gpu_decode.main(["--out", str(tmp_path / "staged.json"), "--quick", "--matvec-from", str(kernels),
                            "--attention", "lanes"]) == 0
    engine = json.loads((tmp_path / "staged.json").read_text())["engine"]
    assert engine["matvec"] == staged and engine["decode_attention"] == "lanes"
    # the 70B figure is a slope between two timed runs: on the twin, beside other work, it can come out any sign
    assert [r["case"] for r in doc["architectures"]] == [name for name, _ in gpu_decode.ARCHITECTURES]
    assert not [r["error"] for r in doc["architectures"] if "error" in r]
    assert "overlapped" in doc["streaming"] and math.isfinite(doc["llama2_70b_2.5bpw"]["decode_tok_s_extrapolated"])


def test_matvec_sass_counts_the_bytes_a_loop_has_in_flight(monkeypatch):
    """matvec_sass.py's static measure of loads in flight: a load's bytes count from its issue until an
    instruction waits on its scoreboard, and a load issued for the next iteration counts into the next."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import matvec_sass
    loop = [(0, "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]", "S01 W2"),
            (16, "LDG.E.128.STRONG.GPU R8, desc[UR4][R2.64+0x10]", "S01 W2"),
            (32, "LDG.E.U16.CONSTANT R1, desc[UR4][R6.64]", "S01 W3"),
            (48, "FFMA R10, R4, R8, RZ", "S01 wait[2]"),
            (64, "LDG.E.128.CONSTANT R4, desc[UR4][R12.64]", "S01 W2"),        # the next iteration's
            (80, "HADD2.F32 R1, -RZ, R1.H0_H0", "S01 wait[3]")]
    # steady state: 16 carried in, 2 x 16 + 2 issued before the wait on scoreboard 2
    assert matvec_sass.bytes_in_flight(loop) == 50
    assert matvec_sass.bytes_in_flight(loop[:4]) == 36       # the scale never waited for: the laps' two count
    assert [matvec_sass.load_bytes(op) for op in ("LDG.E.64", "LDG.E", "LDG.E.U8.CONSTANT")] == [8, 4, 1]
    x = [(96 + 16 * q, f"LDG.E.128 R{20 + 4 * q}, desc[UR4][R30.64+0x{16 * q:x}]", "S01 W4") for q in range(8)]
    x.append((224, "FFMA R50, R20, R4, R50", "S01 wait[4]"))
    assert matvec_sass.x_bases(loop + x) == {"R30"}              # 8 loads off one address: x's unit
    assert matvec_sass.bytes_in_flight(loop + x) == 16 + 128       # the carried weights and all of x
    assert matvec_sass.bytes_in_flight(loop + x, weights_only=True) == 50
