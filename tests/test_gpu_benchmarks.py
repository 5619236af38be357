"""benchmarks/gpu_kernels.py end to end on the CPU twin (tests/cudaemu.py) with small shapes, so that a lent
GPU's minutes are not spent finding a slip in the script: every kernel and candidate it times is launched
once through the real launchers. Nothing is timed here (`timed` runs the launch once and reports 1 µs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import cudaemu

pytestmark = pytest.mark.cudaemu
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_kernels_script_launches_every_kernel_and_candidate(tmp_path, monkeypatch):
    cudaemu.install(monkeypatch)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_kernels

    from gpuengine import device, launch
    from gpuengine.kernels import MATVEC_INSTANCES
    for name, value in dict(H=64, F=96, HEADS=8, HEAD_D=32, CTX=64, LENGTHS=(8, 32, 64), PREFILL_T=24,
                            COLD_BYTES=1).items():
        monkeypatch.setattr(gpu_kernels, name, value)
    launched = []
    monkeypatch.setattr(gpu_kernels, "timed", lambda cp, fn, **kw: (launched.append(fn()), 1.0)[1])
    monkeypatch.setattr(device, "name", lambda: "CPU twin")
    defaults = launch.MATVEC, launch.DEQUANT, launch.ATTN_PREFILL, launch.ATTN_DECODE
    for name in ("MATVEC", "DEQUANT", "ATTN_PREFILL", "ATTN_DECODE"):     # restored after the test
        monkeypatch.setattr(launch, name, getattr(launch, name))
    out = tmp_path / "kernels.json"
    assert gpu_kernels.main(["--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["matvec_block_sweep"]) == 3 * len(MATVEC_INSTANCES)
    names = " | ".join(r["kernel"] for r in doc["kernels"])
    for expected in ("(gqa)", "8q/2kv heads", "dequantize rows", "dequantize slice", "attention prefill tiled",
                     "attention prefill query", "with the norm folded in", "rmsnorm, then fused q,k,v"):
        assert expected in names
    # the script leaves the engine's switches as it found them, but for the sweep's pick
    assert (launch.DEQUANT, launch.ATTN_PREFILL, launch.ATTN_DECODE) == defaults[1:]
    assert launch.MATVEC == launch.MatvecShape.from_json(doc["matvec_best"])
