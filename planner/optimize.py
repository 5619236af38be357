"""The planning policy: fit weights, context and KV cache into the budget, else offload or stream."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np

from hwdb import GPUSpec, ModelSpec
from planner import memory as mem
from planner.budget import (Assessment, Host, Layout, assess, avg_bpw, card_items, contiguous_split,
                            streams_offload)
from planner.errors import Measurement, candidate_table, kv_error
from planner.formats import KV_FORMATS, OPTIONS, QuantOption, kv_format
from planner.knapsack import Solution, pareto_curve, solve
from planner.reasons import explain_fallback, explain_gpu
from planner.spec import Tensor, layer_linears, tensors

DEFAULT_MAX_CTX = 4096       # default context: the model's native one, capped here (issue policy)
MIN_AUTO_CTX = 2048          # a default context may be halved down to this before offloading
FALLBACK_BPW = 4.125         # offload/stream default: 4-bit g128, the 4-bit class AirLLM runs 405B in
FALLBACK_MODES = ("offload", "stream")
PARETO_POINTS = 48           # points of the size-error curve kept in plan.yaml


class PlanError(ValueError):
    """The request cannot be planned; the message says why and what to change."""


@dataclass(frozen=True)
class Request:
    model: ModelSpec
    gpu: GPUSpec
    host: Host
    gpu_count: int = 1
    ctx: Optional[int] = None
    kv: Optional[str] = None              # a KV format name, "auto", or None: fp16, stepping down
                                          # to q8/q4 only where offload/stream needs it
    reserve_bytes: Optional[int] = None   # None: the desktop default for cards with displays
    bpw: Optional[float] = None           # fix the average bpw (ExLlamaV2's -b)
    min_bpw: float = 2.0
    chunk: int = mem.DEFAULT_CHUNK
    prompt_tokens: int = 512
    measurement: Optional[Measurement] = None
    mode: Optional[str] = None            # None: GPU-resident if it fits, else the faster of offload and stream;
                                          # "offload" or "stream": that mode (e.g. to leave VRAM free)


@dataclass
class Outcome:
    """A chosen layout with its price, the optimizer's proof, and the reasons behind each choice."""

    layout: Layout
    assessment: Assessment
    solution: Solution
    expected_error: float
    decisions: list[tuple[str, str, str]] = field(default_factory=list)   # (what, choice, why)
    alternatives: dict[str, dict] = field(default_factory=dict)
    pareto: list[tuple[int, float, float]] = field(default_factory=list)  # (bytes, avg bpw, error)


@dataclass(frozen=True)
class _Items:
    linears: tuple[Tensor, ...]
    options: tuple[tuple[QuantOption, ...], ...]
    sizes: tuple[np.ndarray, ...]
    errors: tuple[np.ndarray, ...]
    params: int


@lru_cache(maxsize=16)
def _items(spec: ModelSpec, measurement: Optional[Measurement]) -> _Items:
    linears = layer_linears(spec)
    table = candidate_table(linears, OPTIONS, spec.num_layers, measurement)
    sizes_by_shape: dict[tuple, np.ndarray] = {}
    sizes = []
    for t, (opts, _) in zip(linears, table):
        key = (t.shape, opts)
        if key not in sizes_by_shape:
            sizes_by_shape[key] = np.array([mem.tensor_bytes(t, o) for o in opts], dtype=np.int64)
        sizes.append(sizes_by_shape[key])
    return _Items(linears, tuple(o for o, _ in table), tuple(sizes), tuple(e for _, e in table),
                  sum(t.numel for t in linears))


def _assignment(items: _Items, sol: Solution) -> dict[str, QuantOption]:
    return {t.name: opts[i] for t, opts, i in zip(items.linears, items.options, sol.choice)}


def _fixed_device_bytes(req: Request, ctx: int, kv_name: str, mode: str,
                        n_cards: int) -> tuple[list[int], list[int], int]:
    """Per card: bytes besides the layers' weights and KV; plus each layer's KV bytes, and the layer extras."""
    spec, kv = req.model, kv_format(kv_name)
    probe = Layout(mode, {}, ctx, kv, min(req.chunk, ctx), tuple((0, 0) for _ in range(n_cards)),
                   reserve(req), req.prompt_tokens)
    per_card = []
    for card in range(n_cards):
        items = card_items(spec, req.gpu, probe, card, [0] * spec.num_layers)
        per_card.append(sum(items.values()))
    kv_layer = mem.kv_layer_bytes(spec, ctx, min(req.chunk, ctx), kv)
    unquantized = sum(mem.tensor_bytes(t) for t in tensors(spec) if t.layer >= 0 and not t.quantized)
    return per_card, kv_layer, unquantized


def reserve(req: Request) -> int:
    return mem.default_reserve(req.gpu) if req.reserve_bytes is None else req.reserve_bytes


def _ctx_ladder(req: Request) -> list[int]:
    if req.ctx:
        return [req.ctx]
    top = min(req.model.max_context, DEFAULT_MAX_CTX)
    out = [top]
    while out[-1] // 2 >= min(MIN_AUTO_CTX, top) and out[-1] > MIN_AUTO_CTX:
        out.append(out[-1] // 2)
    return out


def _kv_names(req: Request, fallback: bool = False) -> list[str]:
    if req.kv == "auto" or (req.kv is None and fallback):
        return list(KV_FORMATS)
    return [req.kv or "fp16"]


def _fit_gpu(req: Request, items: _Items, ctx: int, kv_name: str) -> Optional[tuple[Layout, Solution]]:
    """Everything on the GPU(s): the least-error weights in the bytes left, split across cards."""
    spec, n = req.model, req.gpu_count
    per_card, kv_layer, unquantized = _fixed_device_bytes(req, ctx, kv_name, "gpu", n)
    budgets = [req.gpu.memory_bytes] * n
    capacity = sum(budgets) - sum(per_card) - sum(kv_layer) - unquantized
    if req.bpw is not None:
        wanted = int(req.bpw * items.params / 8)
        if wanted > capacity:
            return None
        capacity = wanted
    for _ in range(n + 1):                      # shrink until a contiguous split across cards fits
        sol = solve(items.sizes, items.errors, capacity)
        if sol is None:
            return None
        assignment = _assignment(items, sol)
        if avg_bpw(spec, assignment) < req.min_bpw:
            return None
        layer_bytes = mem.layer_weight_bytes(spec, assignment)
        split = contiguous_split(layer_bytes, per_card, budgets, kv_layer)
        if split is not None:
            lay = Layout("gpu", assignment, ctx, kv_format(kv_name), min(req.chunk, ctx), split, reserve(req),
                         req.prompt_tokens)
            return lay, sol
        capacity -= max(layer_bytes)
    return None


def _weights_at(items: _Items, bpw: float) -> Solution:
    sol = solve(items.sizes, items.errors, int(bpw * items.params / 8))
    if sol is None:
        raise PlanError(f"no quantization option is as small as {bpw:g} bpw; raise --bpw")
    return sol


def _offload(req: Request, items: _Items, sol: Solution, ctx: int, kv_name: str) -> Optional[Layout]:
    """Of _layer_offload and, for an MoE on one card of a streaming engine, _expert_offload, the one that fits
    and decodes faster; within 0.1%, the one moving fewer bytes over the link (overlapped copies hide a streamed
    layer's core behind compute in the model, not always on a busy link)."""
    layouts = [lay for lay in (_layer_offload(req, items, sol, ctx, kv_name),
                               _expert_offload(req, items, sol, ctx, kv_name)) if lay is not None]
    if len(layouts) < 2:
        return layouts[0] if layouts else None
    assessed = [(assess(req.model, req.gpu, req.gpu_count, req.host, lay), lay) for lay in layouts]
    fastest = min(a.decode_s for a, _ in assessed)
    return min((x for x in assessed if x[0].decode_s <= 1.001 * fastest), key=lambda x: x[0].traffic.link_bytes)[1]


def _expert_offload(req: Request, items: _Items, sol: Solution, ctx: int, kv_name: str) -> Optional[Layout]:
    """An MoE with every layer on the GPU but the routed experts of its first n layers, n as small as fits: those
    stay in host memory and the CUDA engine reads each token's k of them in place over the link (as llama.cpp's
    --n-cpu-moe keeps experts in RAM, but computed on the GPU). One card, an engine that streams only."""
    spec = req.model
    if not spec.is_moe or req.gpu_count != 1 or not streams_offload(req.gpu):
        return None
    assignment = _assignment(items, sol)
    whole, core = mem.layer_weight_bytes(spec, assignment), mem.layer_stream_bytes(spec, assignment)
    per_card, kv_layer, _ = _fixed_device_bytes(req, ctx, kv_name, "offload", 1)
    room = req.gpu.memory_bytes - per_card[0] - sum(kv_layer)
    need = sum(whole)
    for n in range(spec.num_layers + 1):
        if need <= room:
            return Layout("offload", assignment, ctx, kv_format(kv_name), min(req.chunk, ctx), ((0, spec.num_layers),),
                          reserve(req), req.prompt_tokens, host_experts=n) if n else None
        if n < spec.num_layers:
            need -= whole[n] - core[n]
    return None


def _layer_offload(req: Request, items: _Items, sol: Solution, ctx: int, kv_name: str) -> Optional[Layout]:
    """The last k layers (and the head) on the GPU(s), k as large as fits; the rest computed by the CPU, or
    on an engine that streams them (streams_offload), copied to card 0's two layer buffers each token, with
    their KV cache there."""
    spec = req.model
    assignment = _assignment(items, sol)
    layer_bytes = mem.layer_weight_bytes(spec, assignment)
    per_card, kv_layer, _ = _fixed_device_bytes(req, ctx, kv_name, "offload", req.gpu_count)
    budgets = [req.gpu.memory_bytes] * req.gpu_count
    streaming = streams_offload(req.gpu)
    slot_bytes = mem.layer_stream_bytes(spec, assignment) if streaming else layer_bytes
    for k in range(spec.num_layers, 0, -1):       # at least one layer: k = 0 would be CPU inference
        first = spec.num_layers - k
        fixed = list(per_card)
        if streaming and first:
            fixed[0] += sum(kv_layer[:first]) + 2 * max(slot_bytes[:first])
        split = contiguous_split(layer_bytes[first:], fixed, budgets, kv_layer[first:])
        if split is not None:
            split = tuple((a + first, b + first) for a, b in split)
            return Layout("offload", assignment, ctx, kv_format(kv_name), min(req.chunk, ctx), split,
                          reserve(req), req.prompt_tokens)
    return None


def _stream(req: Request, items: _Items, sol: Solution, ctx: int, kv_name: str) -> Optional[Layout]:
    """All layers streamed through two resident buffers on card 0 (as AirLLM, with prefetch)."""
    lay = Layout("stream", _assignment(items, sol), ctx, kv_format(kv_name), min(req.chunk, ctx), ((0, 0),),
                 reserve(req), req.prompt_tokens)
    a = assess(req.model, req.gpu, 1, req.host, lay)
    return lay if a.total <= req.gpu.memory_bytes else None


def _pareto(items: _Items, spec: ModelSpec) -> list[tuple[int, float, float]]:
    curve = pareto_curve(items.sizes, items.errors)
    idx = sorted({round(k * (len(curve.sizes) - 1) / (PARETO_POINTS - 1)) for k in range(PARETO_POINTS)})
    return [(int(curve.sizes[i]), round(8 * float(curve.sizes[i]) / items.params, 4), round(float(curve.errors[i]), 6))
            for i in idx]


def make_plan(req: Request) -> Outcome:
    """The best plan for the request: GPU-resident if anything fits, else the faster of offload and stream."""
    spec = req.model
    items = _items(spec, req.measurement)
    ladder, kvs = _ctx_ladder(req), _kv_names(req)
    if req.mode is not None:
        if req.mode not in FALLBACK_MODES:
            raise PlanError(f"mode {req.mode!r} cannot be forced; choose one of {', '.join(FALLBACK_MODES)}")
        return _fallback(req, items, ladder, _kv_names(req, fallback=True))
    for ctx in ladder:
        best = None
        for kv_name in kvs:
            fit = _fit_gpu(req, items, ctx, kv_name)
            if fit is not None:
                score = fit[1].error + kv_error(kv_name, spec.num_layers)
                if best is None or score < best[0]:
                    best = (score, kv_name, fit)
        if best is not None:
            score, kv_name, (lay, sol) = best
            out = Outcome(lay, assess(spec, req.gpu, req.gpu_count, req.host, lay), sol, score)
            out.pareto = _pareto(items, spec)
            if req.kv in (None, "fp16"):          # what trading the lossless cache for weight bits would give
                alt = _fit_gpu(req, items, ctx, "q8")
                if alt is not None:
                    out.alternatives["kv_q8"] = {"avg_bpw": round(avg_bpw(spec, alt[0].assignment), 4),
                                                 "expected_error": round(alt[1].error + kv_error("q8", spec.num_layers), 6)}
            explain_gpu(req, out, ladder, kvs, items)
            return out
    return _fallback(req, items, ladder, _kv_names(req, fallback=True))


def _fallback(req: Request, items: _Items, ladder: list[int], kvs: list[str]) -> Outcome:
    spec = req.model
    bpw = req.bpw if req.bpw is not None else max(FALLBACK_BPW, req.min_bpw)
    sol = _weights_at(items, bpw)
    candidates: dict[str, tuple[Layout, Assessment]] = {}
    builds = {"offload": _offload, "stream": _stream}
    for mode in (req.mode,) if req.mode else FALLBACK_MODES:
        build = builds[mode]
        # each mode at its largest context, then its least-error KV format, that fits
        for ctx in ladder:
            for kv_name in sorted(kvs, key=lambda k: kv_error(k, spec.num_layers)):
                lay = build(req, items, sol, ctx, kv_name)
                if lay is not None:
                    candidates[mode] = (lay, assess(spec, req.gpu, req.gpu_count, req.host, lay))
                    break
            if mode in candidates:
                break
    if not candidates:
        how = "with one layer resident" if req.mode == "offload" else "even streaming one layer at a time"
        raise PlanError(f"{spec.name} does not fit on {req.gpu_count} x {req.gpu.name} {how} at {bpw:g} bpw; "
                        f"try --kv q4, a smaller --ctx or --reserve 0")
    mode = min(candidates, key=lambda m: candidates[m][1].decode_s)
    lay, a = candidates[mode]
    out = Outcome(lay, a, sol, sol.error + kv_error(lay.kv.name, spec.num_layers))
    out.pareto = _pareto(items, spec)
    explain_fallback(req, out, candidates, bpw, items)
    return out

