"""The error model: the prior reproduces its source table; KV priors re-derive; measurements steer the optimizer."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

import hwdb
from planner.errors import (EXLLAMAV2_TABLE, EXLLAMAV2_TABLE_K_IN, KV_RFN, MeasurementError, load_measurement,
                            option_rfn)
from planner.formats import OPTIONS, parse_option
from planner.optimize import Request, make_plan
from planner.budget import Host
from planner.spec import architecture_digest, layer_linears



@pytest.mark.parametrize("name, rfn", EXLLAMAV2_TABLE)
def test_prior_reproduces_the_exllamav2_table(name, rfn):
    assert option_rfn(parse_option(name), EXLLAMAV2_TABLE_K_IN) == pytest.approx(rfn, rel=0.07)


def test_prior_falls_with_bits():
    uniform = sorted((o for o in OPTIONS if len(o.slices) == 1 and o.group_size == 128), key=lambda o: o.nominal_bpw)
    errs = [option_rfn(o, 4096) for o in uniform]
    assert errs == sorted(errs, reverse=True)


def _kv_sim(name: str, x: np.ndarray) -> float:
    if name == "fp16":
        y = x.astype(np.float16).astype(np.float64)
    elif name == "fp8":        # e4m3: 3 mantissa bits
        m, e = np.frexp(x)
        y = np.ldexp(np.round(m * 16) / 16, e)
    elif name == "q8":
        d = (np.abs(x).max(1, keepdims=True) / 127).astype(np.float16).astype(np.float64)
        y = np.round(x / d) * d
    else:                      # q4_0: d = signed max / -8, q in [0, 15]
        idx = np.argmax(np.abs(x), 1)
        d = (x[np.arange(len(x)), idx] / -8).astype(np.float16).astype(np.float64)[:, None]
        y = (np.clip(np.round(x / d) + 8, 0, 15) - 8) * d
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


@pytest.mark.parametrize("name", list(KV_RFN))
def test_kv_prior_rederives(name):
    x = np.random.default_rng(1).standard_normal((20000, 32))
    assert _kv_sim(name, x) == pytest.approx(KV_RFN[name], rel=0.05)


def _measurement(spec, path, tweak=None):
    tensors = {}
    for t in layer_linears(spec):
        tensors[t.name] = {o.name: {"rfn_error": option_rfn(o, t.shape[1]), "bytes": o.tensor_bytes(*t.shape)}
                           for o in OPTIONS}
        if tweak:
            tweak(t, tensors[t.name])
    path.write_text(yaml.safe_dump({"schema_version": 1, "kind": "vramwise-measurement",
                                    "model": {"name": spec.name, "digest": architecture_digest(spec)},
                                    "tensors": tensors}))
    return path


def test_measurements_steer_the_allocation(tmp_path):
    db = hwdb.load()
    spec, gpu = db.find_model("smollm2-135m"), db.find_gpu("rtx4090")
    target = "layers.5.mlp.down"

    def sensitive(t, opts):
        if t.name == target:
            for name, rec in opts.items():
                rec["rfn_error"] *= 1 if parse_option(name).nominal_bpw >= 8 else 1000
    m = load_measurement(_measurement(spec, tmp_path / "m.yaml", sensitive), architecture_digest(spec), layer_linears(spec))
    out = make_plan(Request(spec, gpu, Host(32 * 2**30), bpw=3.0, measurement=m))
    assert out.layout.assignment[target].nominal_bpw >= 8
    plain = make_plan(Request(spec, gpu, Host(32 * 2**30), bpw=3.0))
    assert plain.layout.assignment[target].nominal_bpw < 8


def test_measurement_for_another_model_is_refused(tmp_path):
    db = hwdb.load()
    a, b = db.find_model("smollm2-135m"), db.find_model("smollm2-360m")
    path = _measurement(a, tmp_path / "m.yaml")
    with pytest.raises(MeasurementError, match="another architecture"):
        load_measurement(path, architecture_digest(b), layer_linears(b))


def test_measurement_missing_a_tensor_is_refused(tmp_path):
    spec = hwdb.load().find_model("smollm2-135m")
    path = _measurement(spec, tmp_path / "m.yaml")
    doc = yaml.safe_load(path.read_text())
    del doc["tensors"]["layers.3.attn.v"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(MeasurementError, match="layers.3.attn.v' is missing"):
        load_measurement(path, architecture_digest(spec), layer_linears(spec))
