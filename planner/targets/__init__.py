"""Plans for other engines: llama.cpp, ExLlamaV2 and vLLM, beside vramwise's own (the default target).

Each target module prices a layout the way its engine accounts memory and returns an `Outcome`: the
engine's settings (what `vramwise export` turns into commands), an itemized budget per card, and the
reasons. The plan document shares the vramwise plan's stable keys (memory.items, context.length, ...)
and adds `target:`; reading it back re-plans from the recorded request and must reproduce every number.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hwdb import GPUSpec, ModelSpec
from hwdb.schema import read_yaml
from planner.budget import CardTotals, Host
from planner.plan import KIND, SCHEMA_VERSION, PlanFileError, spec_dict, specs_from
from planner.roofline import efficiency
from planner.spec import architecture_digest, param_count

TARGETS = ("vramwise", "llama.cpp", "exllamav2", "vllm")
DATA_FILE = Path(__file__).resolve().parents[2] / "hwdb" / "targets.yaml"


class TargetError(ValueError):
    """A target that cannot run the request; the message says why and what to change."""


@dataclass(frozen=True)
class TargetRequest:
    """What the user asked, in the terms every target understands."""

    model: ModelSpec
    gpu: GPUSpec
    host: Host
    gpu_count: int = 1              # cards per node
    nodes: int = 1
    ctx: Optional[int] = None
    kv: Optional[str] = None        # a vramwise KV format name, "auto" or None
    reserve_bytes: Optional[int] = None
    bpw: Optional[float] = None
    min_bpw: float = 2.0


@dataclass
class Outcome(CardTotals):
    """One target's plan: engine settings, memory per card and on the host, and the reasons."""

    target: str
    mode: str                                  # gpu | offload
    settings: dict[str, Any]                   # engine knobs, the input of `vramwise export`
    per_gpu: list[dict[str, int]]
    host: dict[str, int]
    ctx: int
    kv_dtype: str
    kv_bytes_per_token: int                    # K and V over the layers that cache (not linear-attention ones)
    weights: dict[str, Any]                    # format, bytes, avg_bpw, per-tensor detail
    decode_s: float
    decisions: list[tuple[str, str, str]] = field(default_factory=list)
    decode_full_s: Optional[float] = None      # a token at the end of the planned context (the cache read too)


def engine_data(target: str) -> dict:
    """The target's entry in hwdb/targets.yaml: engine version, documented flags, sources."""
    data = read_yaml(DATA_FILE)
    return data["targets"][target]


def plan_target(target: str, req: TargetRequest) -> Outcome:
    """Plan for one engine; vramwise's own target is planned by planner.optimize, not here."""
    if req.nodes > 1 and target != "vllm":
        raise TargetError(f"--nodes {req.nodes}: only --target vllm plans across nodes (Ray, pipeline parallel); "
                          f"{target} runs on one machine")
    if target == "llama.cpp":
        from planner.targets import llamacpp as mod
    elif target == "exllamav2":
        from planner.targets import exllamav2 as mod
    elif target == "vllm":
        from planner.targets import vllm as mod
    else:
        raise TargetError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    out = mod.plan(req)
    for i, card in enumerate(out.per_gpu):
        assert sum(card.values()) <= req.gpu.memory_bytes, f"{target} plan overfills GPU{i}"
    return out


def request_record(req: TargetRequest) -> dict:
    return {"ctx": req.ctx, "kv": req.kv, "reserve_bytes": req.reserve_bytes, "bpw": req.bpw,
            "min_bpw": req.min_bpw, "gpus_per_node": req.gpu_count, "nodes": req.nodes}


def build_document(target: str, req: TargetRequest, out: Outcome, request: dict) -> dict:
    """The plan file of a target plan, with the vramwise plan's stable keys."""
    spec, gpu = req.model, req.gpu
    cards = req.gpu_count * req.nodes
    budget = gpu.memory_bytes * len(out.per_gpu)
    info = engine_data(target)
    return {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "mode": out.mode,
        "target": {"name": target, "engine": info["engine"], "version": info["version"], "settings": out.settings},
        "model": {"name": spec.name, "id": spec.id, "params": param_count(spec),
                  "architecture_digest": architecture_digest(spec), "spec": spec_dict(spec)},
        "gpu": {"name": gpu.name, "id": gpu.id, "count": cards, "per_node": req.gpu_count, "nodes": req.nodes,
                "memory_bytes": gpu.memory_bytes, "spec": spec_dict(gpu)},
        "host": dataclasses.asdict(req.host),
        "request": {**request, "target_request": request_record(req)},
        "decisions": [{"what": w, "choice": c, "why": y} for w, c, y in out.decisions],
        "weights": out.weights,
        "context": {"length": out.ctx},
        "kv_cache": {"dtype": out.kv_dtype, "bytes": sum(c.get("kv_cache", 0) for c in out.per_gpu),
                     "bytes_per_token": out.kv_bytes_per_token},
        "memory": {"budget_bytes": budget, "total_bytes": out.total, "free_bytes": budget - out.total,
                   "items": out.items,
                   "per_gpu": [{"budget_bytes": gpu.memory_bytes, "total_bytes": sum(c.values()), "items": c}
                               for c in out.per_gpu],
                   "host": {"items": out.host}},
        "predicted": {"decode_tokens_per_s": round(1 / out.decode_s, 6),
                      **({"decode_tokens_per_s_full_context": round(1 / out.decode_full_s, 6)}
                         if out.decode_full_s else {}),
                      "efficiency": efficiency(gpu).fit},
    }


def load_target_plan(path: str | Path) -> tuple[dict, Outcome]:
    """Read a target plan and re-plan it from its recorded request: a hand-edited plan is refused."""
    path = Path(path)
    doc, spec, gpu, host = specs_from(path)
    target = doc.get("target", {}).get("name") if isinstance(doc.get("target"), dict) else None
    if target is None:
        return doc, None                                          # a vramwise plan
    rec = doc.get("request", {}).get("target_request")
    if not isinstance(rec, dict):
        raise PlanFileError(f"{path}: missing 'request.target_request'; re-create it with `vramwise plan`")
    try:
        req = TargetRequest(spec, gpu, host, int(rec["gpus_per_node"]), int(rec["nodes"]), rec["ctx"], rec["kv"],
                            rec["reserve_bytes"], rec["bpw"], float(rec["min_bpw"]))
        out = plan_target(target, req)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanFileError(f"{path}: the recorded request no longer plans ({exc}); re-run `vramwise plan`") from None
    recorded = doc.get("target", {}).get("settings")
    if recorded != yaml.safe_load(yaml.safe_dump(out.settings)) or doc.get("memory", {}).get("items") != out.items:
        raise PlanFileError(f"{path}: target settings or memory items do not match what the request plans; the file "
                            f"was edited, re-run `vramwise plan`")
    return doc, out


__all__ = ["Outcome", "TARGETS", "TargetError", "TargetRequest", "build_document", "engine_data",
           "load_target_plan", "plan_target"]
