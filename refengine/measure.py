"""`vramwise measure`: every linear's output error under every option of the format registry.

For each layer (walked as refengine.calibrate does: the reference layer's real inputs on calibration
text) and each of its linears, every candidate option is quantized (GPTQ with that linear's Hessian,
or round to nearest) and scored with ExLlamaV2's measure, the relative Frobenius norm of the output
error on the calibration inputs; its exact bytes come from the format registry. The file does not
depend on any target bpw: the planner's knapsack reads it (`vramwise plan --measurement FILE`).

Checkpoints: after each layer, the walk's hidden states and the table so far go to `<out>.partial/`
(refengine.calibrate.WalkCheckpoint). A run that finds a matching `.partial` resumes after its
last finished layer and writes the same file an uninterrupted run writes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from planner import yamlout
from planner.formats import OPTIONS, QuantOption
from planner.spec import architecture_digest
from refengine.calibrate import (LayerWalk, WalkCheckpoint, calibration_rows, output_energy,
                                 output_error)
from refengine.errors import EngineError
from refengine.quant import QTensor, dequantize, quantize
from refengine.tokenizer import for_checkpoint
from refengine.weights import ROPE_INTERLEAVED, Checkpoint, load_checkpoint

MEASURE_VERSION = 1
METHODS = ("gptq", "rtn")

Progress = Callable[[int, int, str], None]     # (layers done, layers, what just finished)


class MeasureError(EngineError):
    """A measurement that cannot run or resume: bad calibration text, an unwritable output."""


def quantizer(method: str) -> Callable[[np.ndarray, QuantOption, np.ndarray], QTensor]:
    """(w, option, gram = X^T X) -> QTensor for a method name."""
    if method == "rtn":        # activation-aware column order for mixed options: diag(X^T X)
        return lambda w, option, gram: quantize(w, option, importance=np.diag(gram))
    if method == "gptq":
        from refengine.gptq import gptq_quantize
        return lambda w, option, gram: gptq_quantize(w, option, gram)
    raise MeasureError(f"unknown method {method!r} (choose {', '.join(METHODS)})")


def _job_key(ckpt: Checkpoint, text: str, rows: int, row_tokens: int, method: str,
             options: Sequence[QuantOption]) -> str:
    st = ckpt.path.stat()
    parts = [str(MEASURE_VERSION), architecture_digest(ckpt.spec), str(ckpt.path.resolve()), str(st.st_size),
             str(st.st_mtime_ns), hashlib.sha256(text.encode()).hexdigest(), str(rows), str(row_tokens), method,
             *(o.name for o in options)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def measure_layer(w: dict, inputs, method: str, options: Sequence[QuantOption]) -> dict:
    """{linear name: {option name: {rfn_error, bytes}}} for one layer's float32 weights and inputs."""
    quant = quantizer(method)
    table: dict[str, dict] = {}
    for name in w:
        try:
            gram = inputs.gram(name)              # the linears: what reads no input group is a norm, bias, router
        except KeyError:
            continue
        weight = w[name]
        energy = output_energy(weight, gram)
        row = {}
        for option in options:
            t = quant(weight, option, gram)
            expected = option.tensor_bytes(*weight.shape)
            if t.nbytes != expected:              # the registry and the packer must agree to the byte
                raise AssertionError(f"{name} {option.name}: packed {t.nbytes} bytes, registry says {expected}")
            row[option.name] = {"rfn_error": round(output_error(weight, dequantize(t), gram, energy), 8),
                                "bytes": expected}
        table[name] = row
    return table


def measure(source: str, out: Path, text: str, text_source: str, rows: int = 32, row_tokens: int = 256,
            method: str = "gptq", options: Sequence[QuantOption] = OPTIONS,
            progress: Optional[Progress] = None) -> dict:
    """Measure a checkpoint and write `out` (atomically); resumes from `<out>.partial/`. Returns the document."""
    ckpt = load_checkpoint(source)
    spec = ckpt.spec
    quantizer(method)                                    # an unknown method fails before any work
    try:
        ids = calibration_rows(for_checkpoint(ckpt), text, rows, row_tokens, text_source)
    except ValueError as exc:
        raise MeasureError(str(exc)) from None
    key = _job_key(ckpt, text, rows, row_tokens, method, options)
    partial = WalkCheckpoint(out.with_name(out.name + ".partial"), key)
    start, state, extra = partial.load()
    table = dict(extra.get("tensors", {}))
    embed = ckpt["embed"].numpy(np.float32)
    walk = LayerWalk(spec, embed, ids, ckpt.rope_layout == ROPE_INTERLEAVED, state, start, ckpt.rope_factors)
    del embed
    try:
        for i in range(start, spec.num_layers):
            w = {n: r.numpy(np.float32) for n, r in ckpt.layer(i).items()}
            table.update(measure_layer(w, walk.step(w), method, options))
            partial.save(i + 1, walk.x, {"tensors": table})
            if progress is not None:
                progress(i + 1, spec.num_layers, f"layer {i}")
        doc = {"kind": "vramwise-measurement", "schema_version": 1,
               "model": {"name": spec.name, "digest": architecture_digest(spec), "source": ckpt.path.name},
               "calibration": {"text": text_source, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                               "rows": rows, "row_tokens": row_tokens},
               "method": method, "measure": "rfn: ||X (W - W^)^T||_F / ||X W^T||_F on the calibration inputs",
               "options": [o.name for o in options], "tensors": table}
        yamlout.write_atomic(out, yamlout.dump(doc))
    except OSError as exc:
        raise MeasureError(f"{exc.filename or out}: cannot write ({exc.strerror or exc})") from None
    partial.remove()
    return doc


__all__ = ["METHODS", "MeasureError", "measure", "measure_layer", "quantizer"]
