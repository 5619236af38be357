"""`vramwise`: a thin root, one builder and one handler per subcommand. Engines are never imported here."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from typing import Callable, NoReturn, Optional

import hwdb
from hwdb import GPUSpec, HwdbError
from planner import cli_engine
from planner.budget import Host
from planner.detect import DetectError, detect_gpus, host_ram_bytes
from planner.errors import MeasurementError, load_measurement
from planner.formats import KV_FORMATS, FormatError
from planner.optimize import PlanError, Request, make_plan
from planner.plan import PlanFileError, build_document, write_plan
from planner.spec import ModelSourceError, architecture_digest, layer_linears, param_count, resolve_model
from planner.targets import TARGETS, TargetError
from planner.units import UnitError, fmt_bytes, parse_bytes, parse_rate_gb_s

USER_ERRORS = (HwdbError, ModelSourceError, MeasurementError, FormatError, PlanError, PlanFileError, UnitError,
               DetectError, cli_engine.RunError, TargetError)
DEFAULT_HOST_LINK_GB_S = 25.0     # PCIe 4.0 x16 at ~80% (hwdb's convention) for a card given by --vram


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{v} must be positive")
    return v


def _build_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan how to run a model on a GPU; writes plan.yaml")
    p.add_argument("--model", required=True, help="database name, config.json (or its folder), or .gguf file")
    p.add_argument("--gpu", help="database name, or 'auto' to detect the local GPU (nvidia-smi / NVML)")
    p.add_argument("--gpus", type=_positive_int, help="number of identical cards (default 1; auto: all detected)")
    p.add_argument("--vram", help="memory per card, e.g. 8GiB (a card not in the database, or an override)")
    p.add_argument("--bandwidth", help="memory bandwidth, e.g. 448GB/s (with --vram for a custom card)")
    p.add_argument("--tflops", type=_positive_float, help="dense fp16 TFLOP/s of a custom card")
    p.add_argument("--host-link", help=f"host->device copy rate of a custom card (default {DEFAULT_HOST_LINK_GB_S:g}GB/s)")
    p.add_argument("--vendor", choices=["nvidia", "amd", "apple", "intel"],
                   help="maker of a custom card (default nvidia): sets the speed factors and, for apple, unified memory")
    p.add_argument("--ctx", type=_positive_int, help="context length (default: native, capped at 4096)")
    p.add_argument("--kv", choices=[*KV_FORMATS, "auto"],
                   help="KV cache format (default fp16; offload/stream plans may step down to q8/q4 to fit)")
    p.add_argument("--reserve", help="VRAM to leave free (default 1.5GB on cards with displays, else 0)")
    p.add_argument("--bpw", type=_positive_float, help="fix the average bits per weight (as ExLlamaV2's -b)")
    p.add_argument("--min-bpw", type=_positive_float, default=2.0, help="below this average, offload (default 2.0)")
    p.add_argument("--mode", choices=["auto", "offload", "stream"], default="auto",
                   help="auto (default): GPU-resident if it fits, else the faster of offload and stream; or force "
                        "offload (the last layers resident) or stream (every layer over the host link)")
    p.add_argument("--chunk", type=_positive_int, default=512, help="prefill chunk in tokens (default 512)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=512, help="prompt length for TTFT (default 512)")
    p.add_argument("--measurement", help="per-layer measured errors (from `vramwise measure`)")
    p.add_argument("--ram", help="host RAM (default: this machine's)")
    p.add_argument("--cpu-bandwidth", help="host RAM bandwidth (default 76.8GB/s: dual-channel DDR5-4800)")
    p.add_argument("--disk-bandwidth", help="disk read rate for weights beyond RAM (default 3.5GB/s NVMe)")
    p.add_argument("--hwdb", help="YAML file adding or overriding GPUs and models (or $VRAMWISE_HWDB)")
    p.add_argument("--target", default="vramwise", help="engine to plan for: vramwise (default), llama.cpp, "
                                                        "exllamav2 or vllm")
    p.add_argument("--nodes", type=_positive_int, help="machines of --gpus cards each (vllm only: Ray, pipeline parallel)")
    p.add_argument("-o", "--output", default="plan.yaml", help="where to write the plan (default plan.yaml)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(handler=_plan)


def _build_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="print the commands that run a plan on its target engine")
    p.add_argument("--plan", required=True, help="a plan.yaml written by `vramwise plan`")
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from planner import export
    from planner.targets import load_target_plan
    doc, _ = load_target_plan(args.plan)
    if "target" not in doc:
        from planner.plan import load_plan
        load_plan(args.plan)                     # a vramwise plan must hold as well
    print("\n".join(export.commands(doc, args.plan)))
    return 0


def _median_ratio(db: hwdb.Database) -> float:
    """fp16 TFLOP/s per GB/s of the database's display cards: estimates a custom card's compute."""
    return statistics.median(g.fp16_tflops / g.bandwidth_gb_s for g in db.gpus.values() if g.display)


def _median_sms(db: hwdb.Database, tflops: float) -> int:
    """A custom card's SM count from its fp16 TFLOP/s, by the NVIDIA display cards' median SMs per TFLOP/s
    (vramwise's engine model scales its decode rate by SMs)."""
    per = statistics.median(g.sm_count / g.fp16_tflops for g in db.gpus.values() if g.display and g.vendor == "nvidia")
    return max(1, round(per * tflops))


def _detected_entry(db: hwdb.Database, name: str, total: int) -> GPUSpec:
    """The entry for a detected card. Variants of one card print one name and differ in memory, and sometimes in
    bus width (an RTX 3060 with 8 GB has two thirds of the 12 GB card's bandwidth), so the detected size picks
    among them ('NVIDIA GeForce RTX 3060' with 8 GiB: rtx3060-8gb); the name alone when no variant has that size."""
    if total:
        try:
            return db.find_gpu(f"{name} {round(total / 2**30)}GB")
        except HwdbError:
            pass
    return db.find_gpu(name)


def _resolve_gpu(args: argparse.Namespace, db: hwdb.Database) -> tuple[GPUSpec, int]:
    count = args.gpus or 1
    if args.gpu == "auto":
        found = detect_gpus()
        name, total = found[0]
        count = args.gpus or sum(1 for n, _ in found if n == name)
        try:
            gpu = _detected_entry(db, name, total)
            gpu = dataclasses.replace(gpu, memory_bytes=total) if total else gpu   # 0: not reported (unified)
        except HwdbError:
            if not total:
                raise HwdbError(f"detected '{name}' reports no memory size and is not in the database; describe it "
                                f"with --vram and --bandwidth instead of --gpu auto, or add it with "
                                f"--hwdb FILE") from None
            if not args.bandwidth:
                raise HwdbError(f"detected '{name}' ({fmt_bytes(total)}) is not in the database; pass --bandwidth "
                                f"(and --tflops), or add it with --hwdb FILE") from None
            args.vram = args.vram or str(total)
            gpu = None
    elif args.gpu:
        gpu = db.find_gpu(args.gpu)
    else:
        gpu = None
        if not args.vram or not args.bandwidth:
            raise UnitError("name a card with --gpu NAME (or --gpu auto), or describe one with --vram and --bandwidth")
    if gpu is None:
        vram, bw = parse_bytes(args.vram), parse_rate_gb_s(args.bandwidth)
        vendor = args.vendor or "nvidia"
        tflops = args.tflops or round(bw * _median_ratio(db), 1)
        if vendor == "apple":               # one memory: the GPU reads the host's weights at its own bandwidth
            if args.host_link:
                raise UnitError("--host-link does not apply to --vendor apple: its GPU reads host memory directly, "
                                "at --bandwidth")
            link_name, link = "unified memory", bw
        else:
            link_name = "PCIe (assumed)"
            link = parse_rate_gb_s(args.host_link) if args.host_link else DEFAULT_HOST_LINK_GB_S
        source = ("command line" + ("" if args.tflops else "; fp16 TFLOP/s estimated from bandwidth (hwdb median)")
                  + "; SMs estimated from TFLOP/s (hwdb median)")
        gpu = GPUSpec("custom", f"custom GPU ({fmt_bytes(vram)}, {bw:g} GB/s)", vendor, "unknown", "0.0", vram,
                      "unknown", bw, tflops, 0.0, _median_sms(db, tflops), link_name, link, True, source)
    else:
        if args.vendor:
            raise UnitError(f"--vendor describes a custom card (with --vram and --bandwidth); {gpu.id} is "
                            f"{gpu.vendor}'s, from the database")
        changes = {}
        if args.vram and args.gpu != "auto":
            changes["memory_bytes"] = parse_bytes(args.vram)
        if args.bandwidth:
            changes["bandwidth_gb_s"] = parse_rate_gb_s(args.bandwidth)
        if args.tflops:
            changes["fp16_tflops"] = args.tflops
        if args.host_link:
            changes["host_link_gb_s"] = parse_rate_gb_s(args.host_link)
        gpu = dataclasses.replace(gpu, **changes) if changes else gpu
    if gpu.memory_bytes <= 0:
        raise UnitError("--vram must be more than 0")
    return gpu, count


def _plan(args: argparse.Namespace) -> int:
    db = hwdb.load(args.hwdb)
    spec = resolve_model(args.model, db)
    gpu, count = _resolve_gpu(args, db)
    measurement = None
    if args.measurement:
        measurement = load_measurement(args.measurement, architecture_digest(spec), layer_linears(spec))
    ram = parse_bytes(args.ram) if args.ram else host_ram_bytes()
    host = Host(ram, *(parse_rate_gb_s(x) for x in (args.cpu_bandwidth or "76.8", args.disk_bandwidth or "3.5")))
    if args.target != "vramwise":
        return _plan_target(args, spec, gpu, count, host)
    if args.nodes:
        raise TargetError("--nodes plans across machines, which only --target vllm runs (Ray, pipeline parallel)")
    req = Request(spec, gpu, host, count, args.ctx, args.kv, parse_bytes(args.reserve) if args.reserve else None,
                  args.bpw, args.min_bpw, args.chunk, args.prompt_tokens, measurement,
                  None if args.mode == "auto" else args.mode)
    out = make_plan(req)
    request = {"model": args.model, "gpu": args.gpu or "custom", "ctx": args.ctx, "kv": args.kv or "default", "reserve": args.reserve,
               "bpw": args.bpw, "min_bpw": args.min_bpw, "measurement": args.measurement, "mode": args.mode}
    doc = build_document(spec, gpu, count, host, out.layout, out.assessment, out.expected_error,
                         out.solution.lower_bound, out.solution.exact, out.decisions, out.alternatives, out.pareto,
                         request)
    return _emit(args, doc, "plan")


def _plan_target(args: argparse.Namespace, spec, gpu: GPUSpec, count: int, host: Host) -> int:
    from planner import targets
    if args.target not in TARGETS:
        raise TargetError(f"unknown target {args.target!r} (choose from {', '.join(TARGETS)})")
    if args.measurement:
        raise TargetError(f"--measurement feeds vramwise's own quantizer; {args.target} quantizes with its own tools")
    req = targets.TargetRequest(spec, gpu, host, count, args.nodes or 1, args.ctx, args.kv,
                                parse_bytes(args.reserve) if args.reserve else None, args.bpw, args.min_bpw)
    out = targets.plan_target(args.target, req)
    request = {"model": args.model, "gpu": args.gpu or "custom", "target": args.target}
    doc = targets.build_document(args.target, req, out, request)
    return _emit(args, doc, "target_plan")


def _emit(args: argparse.Namespace, doc: dict, renderer: str) -> int:
    """Write the plan, then print it as JSON or as tables (render.<renderer>)."""
    write_plan(doc, args.output)
    if args.json:
        print(json.dumps(doc, indent=1))
    elif not args.quiet:
        from planner import render
        getattr(render, renderer)(doc, args.output)
    return 0


def _build_list(sub: argparse._SubParsersAction, name: str, handler: Callable, help_: str) -> None:
    p = sub.add_parser(name, help=help_)
    p.add_argument("--filter", help="text in the name, id or aliases; for GPUs also a memory size like 24GB")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--hwdb", help="YAML file adding or overriding entries (or $VRAMWISE_HWDB)")
    p.set_defaults(handler=handler)


def _matches(entry, text: Optional[str]) -> bool:
    if not text:
        return True
    key = hwdb.normalize(text)
    return any(key in hwdb.normalize(n) for n in (entry.id, entry.name, *entry.aliases))


def _memory_match(gpu: GPUSpec, text: str) -> bool:
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gi?b)\s*", text, re.I)
    return bool(m) and abs(gpu.memory_bytes / 2**30 - float(m.group(1))) <= 0.06 * float(m.group(1))


def _gpus(args: argparse.Namespace) -> int:
    db = hwdb.load(args.hwdb)
    rows = [g for g in db.gpus.values() if _matches(g, args.filter) or (args.filter and _memory_match(g, args.filter))]
    if args.json:
        print(json.dumps([{"id": g.id, "name": g.name, "memory_bytes": g.memory_bytes, "bandwidth_gb_s": g.bandwidth_gb_s,
                           "fp16_tflops": g.fp16_tflops, "int8_tops": g.int8_tops, "host_link_gb_s": g.host_link_gb_s,
                           "sm_count": g.sm_count, "boost_clock_mhz": g.boost_clock_mhz,
                           "architecture": g.architecture, "compute_capability": g.compute_capability,
                           "aliases": list(g.aliases), "source": g.source} for g in rows], indent=1))
        return 0
    from planner import render
    render.table(f"{len(rows)} GPUs", ("id", "name", "memory", "GB/s", "fp16 TF", "int8 TOPS", "boost MHz",
                                          "host link"),
                 [(g.id, g.name, fmt_bytes(g.memory_bytes), f"{g.bandwidth_gb_s:g}", f"{g.fp16_tflops:g}",
                   f"{g.int8_tops:g}", f"{g.boost_clock_mhz:g}" if g.boost_clock_mhz else "-",
                   f"{g.host_link} ({g.host_link_gb_s:g} GB/s)") for g in rows])
    return 0


def _models(args: argparse.Namespace) -> int:
    db = hwdb.load(args.hwdb)
    rows = [m for m in db.models.values() if _matches(m, args.filter)]
    if args.json:
        print(json.dumps([{"id": m.id, "name": m.name, "params": param_count(m), "layers": m.num_layers,
                           "hidden_size": m.hidden_size, "heads": m.num_heads, "kv_heads": m.num_kv_heads,
                           "vocab_size": m.vocab_size, "max_context": m.max_context, "experts": m.num_experts,
                           "aliases": list(m.aliases), "source": m.source} for m in rows], indent=1))
        return 0
    from planner import render
    render.table(f"{len(rows)} models", ("id", "name", "params", "layers", "hidden", "heads/kv", "vocab", "context"),
                 [(m.id, m.name, f"{param_count(m) / 1e9:.2f}B", str(m.num_layers), str(m.hidden_size),
                   f"{m.num_heads}/{m.num_kv_heads}", str(m.vocab_size), str(m.max_context)) for m in rows])
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit 2, as every other bad input; its
    subcommands' parsers are of this class too (argparse makes them of the root's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="vramwise", description="Plan and run LLMs on the GPU you have.")
    sub = root.add_subparsers(dest="command", required=True)
    _build_plan(sub)
    _build_export(sub)
    _build_list(sub, "gpus", _gpus, "list the GPU database")
    _build_list(sub, "models", _models, "list the model database")
    cli_engine.build_run(sub)
    cli_engine.build_eval(sub)
    cli_engine.build_measure(sub)
    cli_engine.build_quantize(sub)
    return root


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as exc:
        from planner import render
        render.error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
