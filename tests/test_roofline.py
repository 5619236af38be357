"""Speed predictions: the efficiency factors are the calibration's, and predictions track published runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import hwdb
from planner.budget import Host
from planner.optimize import Request, make_plan
from planner.roofline import EFFICIENCY

ROOT = Path(__file__).resolve().parents[1]


def test_efficiency_factors_are_the_calibrated_ones():
    fit = json.loads((ROOT / "benchmarks/results/calibration.json").read_text())["fit"]
    for vendor, row in fit.items():
        eff = EFFICIENCY[vendor]
        assert eff.decode_bandwidth == pytest.approx(row["decode_bandwidth"], abs=1e-3)
        assert eff.token_overhead_s == pytest.approx(row["token_overhead_s"], abs=1e-5)
        if row["prefill_compute"] is not None:
            assert eff.prefill_compute == pytest.approx(row["prefill_compute"], abs=1e-3)


def test_70b_at_2_5_bpw_on_4090_near_exllamav2_figure():
    # ExLlamaV2 README: Llama 2 70B at 2.5 bpw, RTX 4090: 37 tokens/s (benchmarks/published/measurements.yaml)
    db = hwdb.load()
    out = make_plan(Request(db.find_model("llama2-70b"), db.find_gpu("rtx4090"), Host(64 * 2**30), bpw=2.5,
                            prompt_tokens=128))
    assert 1 / out.assessment.decode_s == pytest.approx(37, rel=0.25)


def test_decode_is_bandwidth_bound():
    db = hwdb.load()
    spec = db.find_model("llama2-7b")
    slow = make_plan(Request(spec, db.find_gpu("rtx4060"), Host(64 * 2**30), bpw=4.2))
    fast = make_plan(Request(spec, db.find_gpu("rtx4090"), Host(64 * 2**30), bpw=4.2))
    ratio = (1 / fast.assessment.decode_s) / (1 / slow.assessment.decode_s)
    bw = db.find_gpu("rtx4090").bandwidth_gb_s / db.find_gpu("rtx4060").bandwidth_gb_s
    assert 0.6 * bw < ratio <= bw
