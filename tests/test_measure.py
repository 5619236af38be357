"""`vramwise measure`: the calibration walk is the model's own forward pass, errors are ExLlamaV2's measure,
the file feeds the planner, and an interrupted run resumes to the very same file."""
from __future__ import annotations

import numpy as np
import pytest

from planner.cli import main
from planner.errors import load_measurement
from planner.formats import parse_option
from planner.spec import architecture_digest, layer_linears
from refengine import ops
from refengine.calibrate import LayerWalk, calibration_rows, output_error
from refengine.measure import MeasureError, measure
from refengine.oracle import oracle_logits
from refengine.tokenizer import for_checkpoint
from refengine.weights import ROPE_INTERLEAVED, load_checkpoint
from test_bad_input import CFG, tiny_family_gguf, tiny_gguf
from test_weights import tiny_tensors

TEXT = ("The quick brown fox jumps over the lazy dog. hello world, hello again! " * 40)
OPTIONS = tuple(parse_option(o) for o in ("1:2b g32", "1:3b g32", "1:4b g32", "1:8b g32", "0.25:4b/0.75:2b g32"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("measure") / "tiny.gguf")


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3", "moe"])
def test_the_walk_is_the_models_forward_pass(family, model, tmp_path):
    """Walk every layer, then the final norm and head: the oracle's logits for each row (Gemma 3: 24-token rows
    past its 16-token window)."""
    ckpt = load_checkpoint(model if family == "llama" else tiny_family_gguf(tmp_path / "m.gguf", family))
    assert ckpt.spec.family == family or (family == "moe" and ckpt.spec.is_moe)
    ids = calibration_rows(for_checkpoint(ckpt), TEXT, 3, 24)
    walk = LayerWalk(ckpt.spec, ckpt["embed"].numpy(np.float32), ids, ckpt.rope_layout == ROPE_INTERLEAVED,
                     rope_factors=ckpt.rope_factors)
    weights = {n: r.numpy(np.float32) for n, r in ckpt.tensors.items()}
    for i in range(ckpt.spec.num_layers):
        walk.step(weights)
    head = weights.get("head", weights["embed"])
    for row in range(3):
        got = ops.rmsnorm(walk.x[row], weights["norm.final"], ckpt.spec.norm_eps) @ head.T
        want = oracle_logits(ckpt.spec, weights, list(ids[row]), ckpt.rope_layout == ROPE_INTERLEAVED)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_output_error_is_the_relative_frobenius_norm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 48)) @ rng.standard_normal((48, 48))      # correlated inputs
    w = rng.standard_normal((32, 48)).astype(np.float32)
    w_hat = w + 0.01 * rng.standard_normal(w.shape).astype(np.float32)
    want = np.linalg.norm(x @ (w - w_hat).T.astype(np.float64)) / np.linalg.norm(x @ w.T.astype(np.float64))
    assert output_error(w, w_hat, x.T @ x) == pytest.approx(want, rel=1e-5)


def test_measurement_feeds_the_planner(model, tmp_path):
    out = tmp_path / "m.yaml"
    doc = measure(str(model), out, TEXT, "test text", rows=2, row_tokens=32, method="rtn", options=OPTIONS)
    ckpt = load_checkpoint(model)
    m = load_measurement(out, architecture_digest(ckpt.spec), layer_linears(ckpt.spec))
    assert set(m.errors) == {t.name for t in layer_linears(ckpt.spec)}
    for name, row in m.errors.items():
        e = [row[o] for o in ("1:2b g32", "1:3b g32", "1:4b g32", "1:8b g32")]
        assert e[0] > e[1] > e[2] > e[3] > 0, (name, e)           # more bits, less error, never none
        assert row["0.25:4b/0.75:2b g32"] < e[0]                  # a quarter at 4 bits beats all at 2
    assert not (tmp_path / "m.yaml.partial").exists() and doc["method"] == "rtn"
    plan = tmp_path / "plan.yaml"
    assert main(["plan", "--gpu", "rtx4090", "--model", str(model), "--measurement", str(out), "--bpw", "3",
                 "-o", str(plan), "--quiet"]) == 0


def test_an_interrupted_run_resumes_to_the_same_file(model, tmp_path):
    whole = tmp_path / "whole.yaml"
    measure(str(model), whole, TEXT, "t", rows=2, row_tokens=32, method="rtn", options=OPTIONS)

    def stop(done, total, what):
        if done == 1:
            raise KeyboardInterrupt

    cut = tmp_path / "cut.yaml"
    with pytest.raises(KeyboardInterrupt):
        measure(str(model), cut, TEXT, "t", rows=2, row_tokens=32, method="rtn", options=OPTIONS, progress=stop)
    assert not cut.exists() and (tmp_path / "cut.yaml.partial" / "state_0001.npy").exists()
    seen = []
    measure(str(model), cut, TEXT, "t", rows=2, row_tokens=32, method="rtn", options=OPTIONS,
            progress=lambda d, t, w: seen.append(d))
    assert seen == [2]                                          # layer 0 was not measured again
    assert cut.read_bytes() == whole.read_bytes()


def test_a_checkpoint_of_another_job_is_not_resumed(model, tmp_path):
    out = tmp_path / "m.yaml"

    def stop(done, total, what):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure(str(model), out, TEXT, "t", rows=2, row_tokens=32, method="rtn", options=OPTIONS, progress=stop)
    seen = []
    measure(str(model), out, TEXT, "t", rows=2, row_tokens=16, method="rtn", options=OPTIONS,   # other rows
            progress=lambda d, t, w: seen.append(d))
    assert seen == [1, 2]


def test_too_little_text_is_one_line(model, tmp_path, capsys):
    with pytest.raises(MeasureError, match="fewer than --rows 32 x --row-tokens 256"):
        measure(str(model), tmp_path / "m.yaml", "too short", "short.txt", method="rtn", options=OPTIONS)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["measure", "--model", str(model), "--calib", str(short), "--method", "rtn", "-o",
                 str(tmp_path / "m.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "short.txt" in err and not (tmp_path / "m.yaml").exists()


def test_a_killed_measure_process_resumes_to_the_same_file(tmp_path):
    """SIGKILL mid-run (no cleanup of any kind), then run again: the same file as one uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    model = tiny_gguf(tmp_path / "deep.gguf", arrays=tiny_tensors(dict(CFG, layers=12)), layers=12)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    cmd = [sys.executable, "-m", "planner.cli", "measure", "--model", str(model), "--calib", str(calib), "--rows",
           "2", "--row-tokens", "32", "--method", "rtn", "--quiet", "-o"]
    subprocess.run(cmd + [str(tmp_path / "whole.yaml")], check=True, timeout=300)
    out = tmp_path / "killed.yaml"
    proc = subprocess.Popen(cmd + [str(out)])
    progress = tmp_path / "killed.yaml.partial" / "progress.yaml"
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = yaml.safe_load(progress.read_text())["layers_done"]
        except (OSError, TypeError, KeyError, yaml.YAMLError):
            done = 0
        if done >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert 2 <= done < 12 and not out.exists(), "the run ended before it could be killed midway"
    subprocess.run(cmd + [str(out)], check=True, timeout=300)
    assert out.read_bytes() == (tmp_path / "whole.yaml").read_bytes()
    assert not (tmp_path / "killed.yaml.partial").exists()
