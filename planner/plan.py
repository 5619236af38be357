"""plan.yaml: building the document, writing it atomically, and reading it back with full re-checks.

Stable keys (other programs read them; all sizes in bytes): schema_version, mode, model.name,
model.params, gpu.name, gpu.count, gpu.memory_bytes, weights.avg_bpw, weights.bytes, weights.layers
(name, option, bpw, bytes), context.length, kv_cache.dtype, kv_cache.bytes, memory.budget_bytes,
memory.total_bytes, memory.items, predicted.decode_tokens_per_s, predicted.prefill_tokens_per_s,
predicted.time_to_first_token_s.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwdb import GPUSpec, HwdbError, ModelSpec
from hwdb.schema import build, read_yaml
from planner import memory as mem, yamlout
from planner.budget import Assessment, Host, Layout, assess, avg_bpw
from planner.formats import HEAD_OPTION, FormatError, kv_format, parse_option
from planner.roofline import ENGINE_SPEED, efficiency
from planner.spec import architecture_digest, layer_linears, param_count

SCHEMA_VERSION = 1
KIND = "vramwise-plan"


class PlanFileError(ValueError):
    """A plan file that cannot be used as it is; the message says what and how to fix it."""


@dataclass(frozen=True)
class Plan:
    """A plan: the model, the GPU, the host, the layout, and the document recorded for them."""

    spec: ModelSpec
    gpu: GPUSpec
    gpu_count: int
    host: Host
    layout: Layout
    doc: dict

    def assessment(self) -> Assessment:
        return assess(self.spec, self.gpu, self.gpu_count, self.host, self.layout)


def spec_dict(obj: Any) -> dict:
    d = dataclasses.asdict(obj)
    d.pop("id")
    d["aliases"] = list(d["aliases"])
    return d


def build_document(spec: ModelSpec, gpu: GPUSpec, gpu_count: int, host: Host, lay: Layout, a: Assessment,
                   expected_error: float, lower_bound: float, optimal: bool, decisions: list,
                   alternatives: dict, pareto: list, request: dict) -> dict:
    """The plan as plain data, in the order a reader wants it."""
    linears = layer_linears(spec)
    layers = [{"name": t.name, "option": lay.assignment[t.name].name,
               "bpw": round(8 * mem.tensor_bytes(t, lay.assignment[t.name]) / t.numel, 4),
               "bytes": mem.tensor_bytes(t, lay.assignment[t.name])} for t in linears]
    all_weights = mem.all_weight_bytes(spec, lay.assignment)
    kv_token = mem.kv_bytes_per_token(spec, lay.kv)
    kv_full = [i for i in range(spec.num_layers) if mem.kv_rows(spec, lay.ctx, lay.chunk, i) == lay.ctx]
    budget = gpu.memory_bytes * gpu_count
    return {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "mode": lay.mode,
        "model": {"name": spec.name, "id": spec.id, "params": param_count(spec),
                  "architecture_digest": architecture_digest(spec), "spec": spec_dict(spec)},
        "gpu": {"name": gpu.name, "id": gpu.id, "count": gpu_count, "memory_bytes": gpu.memory_bytes,
                "bandwidth_gb_s": gpu.bandwidth_gb_s, "fp16_tflops": gpu.fp16_tflops,
                "host_link_gb_s": gpu.host_link_gb_s, "source": gpu.source, "spec": spec_dict(gpu)},
        "host": dataclasses.asdict(host),
        "request": request,
        "decisions": [{"what": w, "choice": c, "why": y} for w, c, y in decisions],
        "weights": {"avg_bpw": round(avg_bpw(spec, lay.assignment), 4), "bytes": all_weights,
                    "quantized_bytes": sum(x["bytes"] for x in layers),
                    "quantized_params": sum(t.numel for t in linears),
                    "expected_error": round(expected_error, 6), "error_lower_bound": round(lower_bound, 6),
                    "proven_optimal": optimal,
                    "head": {"option": HEAD_OPTION.name, "bytes": mem.global_weight_bytes(spec)["head"]},
                    "embedding": {"placement": "host", "dtype": mem.EMBED_DTYPE,
                                  "bytes": mem.global_weight_bytes(spec)["embed"]},
                    "layers": layers},
        "context": {"length": lay.ctx, "chunk": lay.chunk},
        "kv_cache": {"dtype": lay.kv.name, "bytes": sum(mem.kv_layer_bytes(spec, lay.ctx, lay.chunk, lay.kv)),
                     # a position more of context: in the layers that cache every position (not the sliding rings)
                     "bytes_per_token": kv_token * len(kv_full)},
        "placement": {"gpu_layers": [list(r) for r in lay.gpu_layers], "reserve_bytes": lay.reserve_bytes,
                      **({"host_experts": lay.host_experts} if lay.host_experts else {})},
        "memory": {"budget_bytes": budget, "total_bytes": a.total, "free_bytes": budget - a.total,
                   "items": a.items,
                   "per_gpu": [{"budget_bytes": gpu.memory_bytes, "total_bytes": sum(c.values()), "items": c}
                               for c in a.per_gpu],
                   "host": {"items": a.host, "weights_in_ram": a.weights_in_ram}},
        "predicted": {"decode_tokens_per_s": round(1 / a.decode_s, 6),
                      "prefill_tokens_per_s": round(min(lay.prompt_tokens, lay.ctx) / a.ttft_s, 3),
                      "time_to_first_token_s": round(a.ttft_s, 4), "prompt_tokens": lay.prompt_tokens,
                      "decode_position": min(lay.prompt_tokens, lay.ctx),
                      "bytes_per_token": {k: round(v) for k, v in dataclasses.asdict(a.traffic).items()
                                          if k.endswith("bytes")},
                      "efficiency": _efficiency_doc(gpu)},
        "alternatives": alternatives,
        "pareto": [{"bytes": b, "avg_bpw": p, "expected_error": e} for b, p, e in pareto],
    }


def _efficiency_doc(gpu: GPUSpec) -> dict:
    """The speed model's factors: vramwise's measured CUDA engine on NVIDIA cards, else the vendor's."""
    engine = ENGINE_SPEED.get(gpu.vendor)
    if engine is not None:
        return {"engine": "vramwise CUDA", **dataclasses.asdict(engine), "calibration": engine.fit}
    eff = efficiency(gpu)
    return {"decode_bandwidth": eff.decode_bandwidth, "layer_cycles": eff.layer_cycles,
            "layer_overhead_s": float(f"{eff.layer_seconds(gpu):.4g}"), "prefill_compute": eff.prefill_compute,
            "calibration": eff.fit}


def write_plan(doc: dict, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, then rename over the target."""
    try:
        yamlout.write_atomic(path, yamlout.dump(doc))
    except OSError as exc:
        raise PlanFileError(f"{path}: cannot write the plan ({exc.strerror or exc})") from None


def _get(doc: Any, dotted: str, path: Path) -> Any:
    cur = doc
    for key in dotted.split("."):
        if not isinstance(cur, dict) or key not in cur:
            raise PlanFileError(f"{path}: missing '{dotted}'; re-create it with `vramwise plan`")
        cur = cur[key]
    return cur


def _layout_from(doc: dict, spec: ModelSpec, path: Path) -> Layout:
    recorded = _get(doc, "weights.layers", path)
    if not isinstance(recorded, list):
        raise PlanFileError(f"{path}: 'weights.layers' must be a list")
    names = {t.name for t in layer_linears(spec)}
    assignment = {}
    for i, row in enumerate(recorded):
        if not isinstance(row, dict) or row.get("name") not in names:
            raise PlanFileError(f"{path}: weights.layers[{i}] names no linear of {spec.name}; the plan does not match its model")
        try:
            assignment[row["name"]] = parse_option(str(row.get("option")))
        except FormatError as exc:
            raise PlanFileError(f"{path}: weights.layers[{i}] ({row['name']}): {exc}") from None
    missing = sorted(names - set(assignment))
    if missing:
        raise PlanFileError(f"{path}: weights.layers lacks '{missing[0]}'; the plan does not match its model")
    try:
        kv = kv_format(str(_get(doc, "kv_cache.dtype", path)))
        gpu_layers = tuple((int(a), int(b)) for a, b in _get(doc, "placement.gpu_layers", path))
        lay = Layout(str(_get(doc, "mode", path)), assignment, _count(doc, "context.length", path), kv,
                     _count(doc, "context.chunk", path), gpu_layers,
                     _count(doc, "placement.reserve_bytes", path, minimum=0),
                     _count(doc, "predicted.prompt_tokens", path),
                     _count(doc, "placement.host_experts", path, minimum=0)
                     if "host_experts" in (doc.get("placement") or {}) else 0)
    except (FormatError, TypeError, ValueError) as exc:
        raise PlanFileError(f"{path}: {exc}") from None
    if lay.mode not in ("gpu", "offload", "stream"):
        raise PlanFileError(f"{path}: mode {lay.mode!r} is not one of gpu, offload, stream")
    if not gpu_layers or any(not 0 <= a <= b <= spec.num_layers for a, b in gpu_layers):
        raise PlanFileError(f"{path}: placement.gpu_layers must be [start, end) ranges within 0..{spec.num_layers}")
    if lay.host_experts and not (spec.is_moe and lay.mode == "offload" and gpu_layers == ((0, spec.num_layers),)
                                 and lay.host_experts <= spec.num_layers):
        raise PlanFileError(f"{path}: placement.host_experts {lay.host_experts} needs an MoE offload plan with every "
                            f"layer on one GPU and at most {spec.num_layers} layers; re-create it with `vramwise plan`")
    return lay


def _count(doc: dict, dotted: str, path: Path, minimum: int = 1) -> int:
    value = _get(doc, dotted, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanFileError(f"{path}: {dotted} must be a whole number >= {minimum}")
    return value


def specs_from(path: str | os.PathLike) -> tuple[dict, ModelSpec, GPUSpec, Host]:
    """Read any plan file (vramwise or another target) and rebuild its model, GPU and host."""
    path = Path(path)
    try:
        doc = read_yaml(path)
    except HwdbError as exc:
        raise PlanFileError(str(exc)) from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise PlanFileError(f"{path}: not a vramwise plan (expected 'kind: {KIND}')")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise PlanFileError(f"{path}: schema_version {doc.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})")
    try:
        spec = build(ModelSpec, str(_get(doc, "model.id", path)), dict(_get(doc, "model.spec", path)), f"{path}: model")
        gpu = build(GPUSpec, str(_get(doc, "gpu.id", path)), dict(_get(doc, "gpu.spec", path)), f"{path}: gpu")
        host = _host_from(_get(doc, "host", path), path)
    except HwdbError as exc:
        raise PlanFileError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise PlanFileError(f"{path}: {exc}") from None
    if _get(doc, "model.architecture_digest", path) != architecture_digest(spec):
        raise PlanFileError(f"{path}: model.spec no longer matches model.architecture_digest; the plan does not "
                            f"match its model (re-run `vramwise plan`)")
    return doc, spec, gpu, host


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan and re-derive every number from its choices; refuse one that no longer holds."""
    path = Path(path)
    doc, spec, gpu, host = specs_from(path)
    if isinstance(doc.get("target"), dict):
        name = doc["target"].get("name")
        raise PlanFileError(f"{path}: this plan is for {name}, not vramwise's engines; `vramwise export --plan {path}` "
                            f"prints the commands to run it there")
    count = _get(doc, "gpu.count", path)
    if not isinstance(count, int) or count < 1:
        raise PlanFileError(f"{path}: gpu.count must be a whole number >= 1")
    lay = _layout_from(doc, spec, path)
    plan = Plan(spec, gpu, count, host, lay, doc)
    try:
        _check(plan, path)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as exc:
        if isinstance(exc, PlanFileError):
            raise
        raise PlanFileError(f"{path}: a field has an unusable value ({exc}); re-run `vramwise plan`") from None
    return plan


def _host_from(data: Any, path: Path) -> Host:
    if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(Host)}:
        raise PlanFileError(f"{path}: 'host' must hold ram_bytes, cpu_bandwidth_gb_s and disk_gb_s")
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise PlanFileError(f"{path}: host.{key} must be a positive number")
    return Host(**data)


def _check(plan: Plan, path: Path) -> None:
    """The recorded numbers must be what the choices give, and every card must hold its share."""
    a = plan.assessment()
    for card, items in enumerate(a.per_gpu):
        if sum(items.values()) > plan.gpu.memory_bytes:
            raise PlanFileError(f"{path}: no longer fits: GPU{card} needs {sum(items.values())} bytes of "
                                f"{plan.gpu.memory_bytes}; re-run `vramwise plan`")
    for i, row in enumerate(plan.doc["weights"]["layers"]):
        t = next(t for t in layer_linears(plan.spec) if t.name == row["name"])
        if row.get("bytes") != mem.tensor_bytes(t, plan.layout.assignment[t.name]):
            raise PlanFileError(f"{path}: weights.layers[{i}] ({row['name']}) records {row.get('bytes')} bytes, its "
                                f"option takes {mem.tensor_bytes(t, plan.layout.assignment[t.name])}; the file was edited")
    recorded = _get(plan.doc, "memory.items", path)
    if recorded != a.items or _get(plan.doc, "memory.total_bytes", path) != a.total:
        key = next((k for k in a.items if not isinstance(recorded, dict) or recorded.get(k) != a.items[k]), "total_bytes")
        raise PlanFileError(f"{path}: memory.{key} does not match the plan's choices (recorded "
                            f"{recorded.get(key) if isinstance(recorded, dict) else recorded}, recomputed "
                            f"{a.items.get(key, a.total)}); the file was edited, re-run `vramwise plan`")
