"""Expected error of each choice: a calibrated prior, or per-layer measurements from a file.

Error unit: relative Frobenius norm of a layer's output error on calibration data ("rfn"), as
ExLlamaV2's measurement reports it. The optimizer minimizes sum_j weight_j * rfn_j.

Prior for a weight option (fit by benchmarks/fit_error_prior.py to the 24-row ExLlamaV2 table for
Llama 2 13B layer 10 mlp.up_proj in shared/docs/background.md; rms log error 2.7%, worst row 6.3%):
  uniform b bits, group 128:  BASE_RFN[b]
  group g:                    times GROUP_FACTOR[g]
  mixed slices (fractions p): MIX_FACTOR * sqrt(sum_i p_i * rfn_i^2)
That table used 4-bit scales where we store fp16 ones; the value grid, which dominates the error,
is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from hwdb.schema import HwdbError, read_yaml
from planner.formats import FormatError, QuantOption, parse_option
from planner.spec import Tensor

# The source data: ExLlamaV2 measurement of Llama 2 13B, layer 10, mlp.up_proj (in_features 5120),
# option -> relative Frobenius error (shared/docs/background.md, section 1).
EXLLAMAV2_TABLE = (
    ("0.05:3b/0.95:2b g32", 0.21867), ("0.25:3b/0.75:2b g32", 0.20617), ("0.25:4b/0.75:2b g32", 0.20230),
    ("0.1:4b/0.4:3b/0.5:2b g32", 0.18449), ("0.1:4b/0.9:3b g32", 0.10229), ("0.2:6b/0.8:3b g32", 0.09791),
    ("1:3b g128", 0.11354), ("1:3b g32", 0.10491), ("0.05:4b/0.95:3b g32", 0.10363), ("0.4:4b/0.6:3b g32", 0.09272),
    ("0.6:4b/0.4:3b g64", 0.08835), ("1:4b g128", 0.05756), ("1:4b g32", 0.05007), ("0.1:5b/0.9:4b g32", 0.04889),
    ("0.1:6b/0.9:4b g32", 0.04861), ("1:5b g128", 0.02879), ("0.1:6b/0.9:5b g32", 0.02494),
    ("0.05:8b/0.05:6b/0.9:5b g32", 0.02486), ("0.4:6b/0.6:5b g32", 0.02297), ("0.1:8b/0.3:6b/0.6:5b g32", 0.02280),
    ("1:6b g128", 0.01503), ("1:6b g32", 0.01471), ("0.1:8b/0.9:6b g128", 0.01463), ("1:8b g32", 0.00934),
)
EXLLAMAV2_TABLE_K_IN = 5120

BASE_RFN = {2: 0.24786, 3: 0.11644, 4: 0.05564, 5: 0.02854, 6: 0.01533, 8: 0.01015}
GROUP_FACTOR = {128: 1.0, 64: 0.9588, 32: 0.9193}    # 64: geometric mean of 32 and 128
MIX_FACTOR = 1.0121

# Layer-type and depth weights of the prior. They follow llama.cpp's k-quant mixes
# (llama_tensor_get_type in src/llama-quant.cpp), which spend extra bits on attn_v and ffn_down
# and on the first and last eighth of the layers: under rfn ~ 2^-bits, a weight w moves the
# optimum by log2(w) bits, so 2.0 gives v about one bit more and 1.5 gives down about 0.6.
TYPE_WEIGHT = {"q": 1.0, "k": 1.0, "v": 2.0, "qkv": 1.3, "o": 1.0,
               "gate": 1.0, "up": 1.0, "gate_up": 1.0, "down": 1.5}
EDGE_LAYER_WEIGHT = 1.5

# rfn of one cached K or V vector per format, simulated on N(0,1) data in blocks of 32
# (tests/test_errors.py re-derives them). K and V of a layer count like two linears of weight 1.
KV_RFN = {"fp16": 0.00021, "fp8": 0.02655, "q8": 0.00535, "q4": 0.08596}


class MeasurementError(ValueError):
    """A --measurement file that does not fit the model or is malformed."""


@lru_cache(maxsize=65536)
def option_rfn(option: QuantOption, k_in: int) -> float:
    """Prior rfn of a tensor with k_in inputs in this option (effective slice fractions)."""
    slices = option.slice_rows(k_in)
    g = GROUP_FACTOR[option.group_size]
    mean_sq = sum(rows / k_in * (BASE_RFN[bits] * g) ** 2 for rows, bits in slices)
    return (MIX_FACTOR if len(slices) > 1 else 1.0) * math.sqrt(mean_sq)


def layer_weight(tensor: Tensor, num_layers: int) -> float:
    """Importance of a tensor's error: type, depth, and the share of tokens an expert sees."""
    edge = tensor.layer < num_layers / 8 or tensor.layer >= 7 * num_layers / 8
    return TYPE_WEIGHT.get(tensor.kind, 1.0) * (EDGE_LAYER_WEIGHT if edge else 1.0) * tensor.read_fraction


def kv_error(kv_name: str, num_layers: int) -> float:
    """Expected error that a KV format adds, in the weights' units."""
    edge_layers = sum(1 for i in range(num_layers) if i < num_layers / 8 or i >= 7 * num_layers / 8)
    weight = (num_layers - edge_layers) + EDGE_LAYER_WEIGHT * edge_layers
    return 2 * KV_RFN[kv_name] * weight


@dataclass(frozen=True, eq=False)      # hashed by identity: one loaded file, one cache entry
class Measurement:
    """Measured rfn per tensor and option, for one architecture."""

    path: str
    model_name: str
    digest: str
    errors: Mapping[str, Mapping[str, float]]     # tensor name -> option name -> rfn

    def candidates(self, tensor: str) -> dict[QuantOption, float]:
        return {parse_option(name): err for name, err in self.errors[tensor].items()}


def _fail(path: Path, msg: str) -> MeasurementError:
    return MeasurementError(f"{path}: {msg}")


def load_measurement(path: str | Path, digest: str, linears: tuple[Tensor, ...]) -> Measurement:
    """Read and check a measurement file: it must be for this architecture and cover every linear."""
    path = Path(path)
    try:
        data: Any = read_yaml(path)
    except HwdbError as exc:
        raise MeasurementError(str(exc)) from None
    if not isinstance(data, dict) or data.get("kind") != "vramwise-measurement":
        raise _fail(path, "not a vramwise measurement file (expected 'kind: vramwise-measurement')")
    if data.get("schema_version") != 1:
        raise _fail(path, f"schema_version {data.get('schema_version')!r} is not supported (expected 1)")
    model = data.get("model") or {}
    if not isinstance(model, dict) or model.get("digest") != digest:
        raise _fail(path, f"measured for another architecture (digest {model.get('digest') if isinstance(model, dict) else None}, "
                          f"this model is {digest}); measure this model")
    table = data.get("tensors")
    if not isinstance(table, dict):
        raise _fail(path, "'tensors:' must map tensor names to {option: {rfn_error: ...}}")
    errors: dict[str, dict[str, float]] = {}
    for t in linears:
        entry = table.get(t.name)
        if not isinstance(entry, dict) or not entry:
            raise _fail(path, f"tensor '{t.name}' is missing; re-run the measurement")
        errors[t.name] = {}
        for opt_name, rec in entry.items():
            try:
                opt = parse_option(str(opt_name))
            except FormatError as exc:
                raise _fail(path, f"tensor '{t.name}': {exc}") from None
            err = rec.get("rfn_error") if isinstance(rec, dict) else None
            if isinstance(err, bool) or not isinstance(err, (int, float)) or not math.isfinite(err) or err < 0:
                raise _fail(path, f"tensor '{t.name}' option {opt_name!r}: rfn_error must be a number >= 0")
            expected = opt.tensor_bytes(*t.shape)
            if isinstance(rec.get("bytes"), int) and rec["bytes"] != expected:
                raise _fail(path, f"tensor '{t.name}' option {opt_name!r}: {rec['bytes']} bytes recorded, "
                                  f"the format takes {expected}; the file is from another format version")
            errors[t.name][opt.name] = float(err)
    return Measurement(str(path), str(model.get("name", "")), digest, errors)


def candidate_table(linears: tuple[Tensor, ...], options: tuple[QuantOption, ...], num_layers: int,
                    measurement: Optional[Measurement] = None) -> list[tuple[tuple[QuantOption, ...], np.ndarray]]:
    """Per linear: its candidate options and their weighted expected errors (measured if a file is given)."""
    if measurement is not None:
        out = []
        for t in linears:
            cand = measurement.candidates(t.name)
            out.append((tuple(cand), np.array(list(cand.values()))))
        return out
    base: dict[int, np.ndarray] = {}
    for t in linears:
        if t.shape[1] not in base:
            base[t.shape[1]] = np.array([option_rfn(o, t.shape[1]) for o in options])
    return [(options, layer_weight(t, num_layers) * base[t.shape[1]]) for t in linears]
