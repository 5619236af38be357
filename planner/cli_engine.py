"""`vramwise run` and `vramwise eval`: the commands that load an engine (imported lazily by cli.py)."""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

from planner import memory as mem
from planner.plan import load_plan
from planner.units import fmt_bytes


class RunError(ValueError):
    """A run that cannot start: missing weights, a prompt longer than the plan's context, no engine."""


def build_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a plan: stream tokens, then measured figures beside the plan's")
    p.add_argument("--plan", required=True, help="a plan.yaml from `vramwise plan`, or a directory from "
                                                 "`vramwise quantize` (its plan and weights)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue")
    src.add_argument("--chat", action="store_true", help="chat on stdin in the model's own chat template, one line per turn")
    p.add_argument("--weights", help="checkpoint (.gguf, .safetensors, HF folder); default: the plan's --model")
    p.add_argument("--engine", choices=["auto", "ref", "gpu"], default="auto",
                   help="gpu (CuPy) or ref (NumPy/Numba CPU); auto (default): gpu when CUDA is present")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="hold one layer at a time, as AirLLM (default: when the plan's mode is stream)")
    p.add_argument("--store", help="folder for the plan's quantized layers, kept for later runs: when streaming, "
                                   "and always on the GPU (default: $VRAMWISE_CACHE or ~/.cache/vramwise, under layers/)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(handler=run)


def build_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a model over a text file")
    p.add_argument("--model", required=True, help="model name or checkpoint path")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--plan", help="evaluate with this plan's formats, context and KV cache")
    p.add_argument("--ctx", type=int, default=512, help="window in tokens (default 512; a plan's context wins)")
    p.add_argument("--max-tokens", type=int, default=0, help="stop after this many tokens (0: whole text)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=evaluate)


def build_measure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="measure every linear's error under every format option (for plan --measurement)")
    p.add_argument("--model", required=True, help="model name or checkpoint path")
    p.add_argument("--calib", help="UTF-8 calibration text (default: the project's own, refengine/data/calib.txt)")
    p.add_argument("--rows", type=int, default=32, help="calibration rows (default 32: GPTQ needs several times "
                                                          "more tokens than a layer has inputs)")
    p.add_argument("--row-tokens", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="quantizer (default gptq)")
    p.add_argument("-o", "--output", default="measurement.yaml", help="where to write (default measurement.yaml)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=measure)


def measure(args: argparse.Namespace) -> int:
    from refengine.measure import measure as run_measure

    _check_rows(args)
    text, path = _calibration_text(args.calib)
    out = Path(args.output)
    from rich.progress import Progress
    t0 = time.perf_counter()
    with Progress(transient=True, disable=args.quiet) as bar:
        task = bar.add_task("measuring", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"measured {what}")
        try:
            doc = run_measure(args.model, out, text, str(path), args.rows, args.row_tokens, args.method,
                              progress=progress)
        except _engine_errors() as exc:
            raise RunError(_named(args.model, exc)) from None
    if not args.quiet:
        print(f"measured {len(doc['tensors'])} linears x {len(doc['options'])} options ({args.method}) in "
              f"{time.perf_counter() - t0:.0f} s -> {out}")
    return 0


def build_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write a plan's model as a quantized directory (GPTQ or RTN; resumable)")
    p.add_argument("--plan", required=True, help="a plan.yaml from `vramwise plan`")
    p.add_argument("--weights", help="checkpoint to quantize (default: the plan's --model)")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="quantizer (default gptq)")
    p.add_argument("--calib", help="UTF-8 calibration text for GPTQ (default: refengine/data/calib.txt)")
    p.add_argument("--rows", type=int, default=32, help="calibration rows (default 32)")
    p.add_argument("--row-tokens", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("-o", "--output", required=True, help="the directory to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=quantize)


def _check_rows(args: argparse.Namespace) -> None:
    if args.rows < 1 or args.row_tokens < 2:
        raise RunError(f"--rows {args.rows} --row-tokens {args.row_tokens}: need at least 1 row of 2 tokens")


def _calibration_text(calib: str | None) -> tuple[str, str]:
    """(text, where from) of --calib (default: the project's own)."""
    from refengine.calibrate import DEFAULT_CALIB

    path = Path(calib) if calib else DEFAULT_CALIB
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read the calibration text ({getattr(exc, 'strerror', None) or exc})") from None


def quantize(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from refengine.qmodel import quantize_model

    _check_rows(args)
    text, text_source = _calibration_text(args.calib) if args.method == "gptq" else ("", "")
    plan = load_plan(args.plan)
    source = args.weights or plan.doc.get("request", {}).get("model") or plan.spec.id
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory; choose another -o")
    t0 = time.perf_counter()
    with Progress(transient=True, disable=args.quiet) as bar:
        task = bar.add_task(f"quantizing ({args.method})", total=None)
        try:
            header = quantize_model(plan, source, out, args.method, text, text_source, args.rows, args.row_tokens,
                                    lambda done, total: bar.update(task, completed=done, total=total))
        except _engine_errors() as exc:
            raise RunError(_named(source, exc)) from None
        except OSError as exc:
            raise RunError(f"{exc.filename or out}: cannot write ({exc.strerror or exc})") from None
    if not args.quiet:
        print(f"{out}: {header['weight_bytes'] / 1e6:.2f} MB of weights (the plan predicted "
              f"{header['planned_weight_bytes'] / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f} s; "
              f"run it with: vramwise run --plan {out} --prompt ...")
    return 0


def _engine_errors() -> tuple:
    from gpuengine.device import NoDevice
    from refengine.errors import EngineError
    from refengine.model import UnsupportedModel
    return (EngineError, UnsupportedModel, NoDevice)


def _named(source: str, exc: Exception) -> str:
    """An engine error's message, led by the checkpoint it is about when it does not name it already."""
    text = " ".join(str(exc).split())
    return text if str(source) in text else f"{source}: {text}"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux reports KiB


def _chat_prompt(tok, turns: list[tuple[str, str]]) -> list[int]:
    from refengine.chat import ChatTemplateError, chat_ids
    if not tok.chat_template:
        raise RunError(f"{tok.source}: the model carries no chat template, so --chat cannot format turns; "
                       "use --prompt with the text as the model expects it")
    try:
        return chat_ids(tok, [{"role": role, "content": msg} for role, msg in turns])
    except ChatTemplateError as exc:
        raise RunError(f"--chat: {exc}") from None


def _choose_engine(choice: str) -> str:
    """auto -> gpu where CuPy sees a CUDA device, else ref; an explicit gpu without one is an error."""
    if choice == "ref":
        return "ref"
    from gpuengine import device
    if choice == "gpu":
        try:
            device.require()
        except device.NoDevice as exc:
            raise RunError(str(exc)) from None
    return "gpu" if device.available() else "ref"


def _oom_errors() -> tuple:
    """CUDA out-of-memory exceptions, where CuPy is loaded (never imported here for the CPU engine)."""
    cupy = sys.modules.get("cupy")
    return (cupy.cuda.memory.OutOfMemoryError,) if cupy is not None else ()


def run(args: argparse.Namespace) -> int:
    args.engine = _choose_engine(args.engine)
    quantized = Path(args.plan) if Path(args.plan).is_dir() else None     # a `vramwise quantize` directory
    if quantized and not (quantized / "plan.yaml").exists():
        raise RunError(f"{quantized}: a folder without plan.yaml, so not a `vramwise quantize` directory; pass a "
                       "plan.yaml or the directory quantize wrote")
    plan = load_plan(quantized / "plan.yaml" if quantized else args.plan)
    from refengine.api import load_for_plan
    from refengine.generate import Sampling
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    except ValueError as exc:
        raise RunError(f"sampling: {exc}") from None
    source = args.weights or (str(quantized) if quantized else None) or plan.doc.get("request", {}).get("model") \
        or plan.spec.id
    try:      # everything that reads the checkpoint, before a token is printed
        model = load_for_plan(plan, source, args.stream, Path(args.store) if args.store else None,
                              _store_progress(args.json), engine=args.engine)
        ids = None if args.chat else _prompt_ids(model, args)
        model.weights.materialize()
        if args.chat:
            return _chat(model, sampling, args)
        return _generate_and_report(model, plan, ids, sampling, args)
    except _engine_errors() as exc:
        raise RunError(_named(source, exc)) from None
    except _oom_errors():
        raise RunError(f"CUDA out of memory on {_device_name()} while running {args.plan}: the plan predicted "
                       f"{fmt_bytes(plan.doc['memory']['total_bytes'])} for a {plan.doc['gpu']['name']}; plan again "
                       "for this card (vramwise plan --gpu auto) or with a smaller --ctx") from None


def _device_name() -> str:
    from gpuengine import device
    return device.name()


def _prompt_ids(model, args: argparse.Namespace) -> list[int]:
    """--prompt as token ids, refused before any weight is quantized when it leaves no room in the context."""
    ids = model.tokenizer.encode(args.prompt or "")
    if not ids:
        raise RunError("give a non-empty --prompt (or --chat)")
    if len(ids) >= model.ctx:
        raise RunError(f"the prompt has {len(ids)} tokens; the plan's context is {model.ctx} ({args.plan}); "
                       f"shorten the prompt, or plan again with a --ctx above {len(ids)}")
    return ids


def _generate_and_report(model, plan, ids, sampling, args) -> int:
    t0 = time.perf_counter()
    first_at, out = None, []
    for tok in model.stream(ids, args.max_new_tokens, sampling):
        if first_at is None:
            first_at = time.perf_counter()
        out.append(tok)
        if not args.json:
            sys.stdout.write(model.tokenizer.decode([tok]))
            sys.stdout.flush()
    end = time.perf_counter()
    first_at = first_at or end
    decode_s = (end - first_at) / max(len(out) - 1, 1)
    pred = plan.doc["predicted"]
    held = model.weights.peak_bytes + model.net.state.nbytes
    engine = ("gpu (CuPy, " + _device_name() + ")" if args.engine == "gpu" else "ref (NumPy/Numba, CPU)") + \
        (", layer streaming" if model.streaming else "")
    report = {"engine": engine, "prompt_tokens": len(ids), "generated_tokens": len(out),
              "text": model.tokenizer.decode(out),
              "measured": {"prefill_tokens_per_s": round(len(ids) / (first_at - t0), 3),
                           "decode_tokens_per_s": round(1 / decode_s, 3) if len(out) > 1 else None,
                           "time_to_first_token_s": round(first_at - t0, 3),
                           "engine_bytes": held, "peak_rss_bytes": _peak_rss(), **_device_memory(args.engine)},
              "plan": {"device": plan.doc["gpu"]["name"], "decode_tokens_per_s": pred["decode_tokens_per_s"],
                       "prefill_tokens_per_s": pred["prefill_tokens_per_s"],
                       "time_to_first_token_s": pred["time_to_first_token_s"],
                       "weights_and_state_bytes": _planned_engine_bytes(plan, args.engine),
                       "total_bytes": plan.doc["memory"]["total_bytes"]}}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return 0


def _device_memory(engine: str) -> dict:
    """The GPU engine's memory as CUDA sees it: CuPy's pool (every array of the run) and the whole device's use
    (context, cuBLAS workspace and other processes included)."""
    if engine != "gpu":
        return {}
    import cupy
    free, total = cupy.cuda.runtime.memGetInfo()
    return {"device_pool_bytes": cupy.get_default_memory_pool().total_bytes(), "device_used_bytes": total - free}


def _planned_engine_bytes(plan, engine: str = "ref") -> int:
    """What the plan says the weights, KV cache and compute buffers take (its fixed costs aside): on the GPU
    with cuBLAS staging and without the embedding (kept on the host); on the CPU engine with it."""
    items = plan.doc["memory"]["items"]
    keys = ("weights.layers", "weights.stream_buffers", "weights.head", "weights.norm_final", "kv_cache")
    if engine == "gpu":
        compute = ("compute.activations", "compute.attention_scores", "compute.gemm_staging", "compute.logits")
        return sum(items.get(k, 0) for k in keys + compute)
    # the reference engine's own scratch (a score matrix, no GPU staging), as refengine.model allocates it
    state = mem.run_state_buffers(plan.spec, plan.layout.ctx, plan.layout.chunk, logits=True, gemm_staging=False)
    return sum(items.get(k, 0) for k in keys) + mem.buffers_bytes(state) + plan.doc["weights"]["embedding"]["bytes"]


def _print_report(r: dict) -> None:
    from planner import render
    m, p = r["measured"], r["plan"]
    decode = f"{m['decode_tokens_per_s']:.2f}" if m["decode_tokens_per_s"] else "-"
    print()
    render.table(f"Measured ({r['engine']}) beside the plan (predicted for " + p["device"] + ")",
                 ("figure", "measured", "plan"),
                 [("prefill tok/s", f"{m['prefill_tokens_per_s']:.1f}", f"{p['prefill_tokens_per_s']:.1f}"),
                  ("decode tok/s", decode, f"{p['decode_tokens_per_s']:.1f}"),
                  ("time to first token", f"{m['time_to_first_token_s']:.2f} s", f"{p['time_to_first_token_s']:.2f} s"),
                  ("weights + KV + buffers (peak)", fmt_bytes(m["engine_bytes"]), fmt_bytes(p["weights_and_state_bytes"])),
                  ("peak RSS (whole process)", fmt_bytes(m["peak_rss_bytes"]), "-")]
                 + ([("CuPy memory pool (held)", fmt_bytes(m["device_pool_bytes"]), fmt_bytes(p["weights_and_state_bytes"])),
                     ("device memory in use", fmt_bytes(m["device_used_bytes"]), fmt_bytes(p["total_bytes"]))]
                    if "device_pool_bytes" in m else []))


def _chat(model, sampling, args) -> int:
    turns: list[tuple[str, str]] = []
    for line in sys.stdin:
        turns.append(("user", line.rstrip("\n")))
        ids = _chat_prompt(model.tokenizer, turns)
        if len(ids) >= model.ctx:
            raise RunError(f"the conversation reached the plan's context of {model.ctx} tokens")
        reply = model.tokenizer.decode(model.generate(ids, args.max_new_tokens, sampling), skip_special=True)
        print(reply.strip(), flush=True)
        turns.append(("assistant", reply.strip()))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    path = Path(args.text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    from rich.progress import Progress

    from refengine.api import load_for_plan, load_model
    try:
        model = load_for_plan(load_plan(args.plan), args.model) if args.plan else load_model(args.model, ctx=args.ctx)
        model.weights.materialize()          # a corrupt tensor is named here, not mid-way through the text
    except _engine_errors() as exc:
        raise RunError(_named(args.model, exc)) from None
    ids = model.tokenizer.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise RunError(f"{path}: needs at least 2 tokens of text")
    from refengine.api import negative_log_likelihood
    window = model.ctx
    t0 = time.perf_counter()
    with Progress(transient=True, disable=args.json) as bar:
        task = bar.add_task("perplexity", total=len(ids))
        nll, count = negative_log_likelihood(model, ids, window, lambda n: bar.update(task, advance=n))
    result = {"model": args.model, "text": str(path), "tokens": count, "window": window,
              "perplexity": round(math.exp(nll / count), 4), "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(result) if args.json else
          f"perplexity {result['perplexity']:.3f} over {count} tokens (window {window}) in {result['seconds']:.1f} s")
    return 0


def _store_progress(quiet: bool):
    """A progress callback for building a layer store: one updating line on stderr."""
    live = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        if not quiet and (live or done == total):
            sys.stderr.write(f"\rquantizing the plan's layers (once, into the layer store): {done}/{total}"
                             + ("\n" if done == total else ""))
            sys.stderr.flush()
    return report
