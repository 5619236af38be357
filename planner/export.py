"""`vramwise export`: the commands that run a plan on its target engine, one per line, ready to paste.

Every option printed is one the engine documents for the version named in hwdb/targets.yaml
(tests/test_export.py checks each against that list).
"""
from __future__ import annotations

import re
import shlex

from planner.targets import engine_data

PLACEHOLDER = "<hf-model-dir>"


def hf_repo(spec) -> str:
    """The Hugging Face repository a database entry names in its source, else a placeholder."""
    m = re.search(r"\b([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)\b", spec.get("source", ""))
    return m.group(1) if m and "." not in m.group(1).split("/")[0] else PLACEHOLDER


def _fetch(doc: dict) -> tuple[list[str], str]:
    """The download step and the local folder it fills: the converters read a folder, not a repository id.
    (Gated repositories such as Meta's need `hf auth login` first.)"""
    repo = hf_repo(doc["model"]["spec"])
    if repo == PLACEHOLDER:
        return [], PLACEHOLDER
    local = repo.split("/")[1]
    return [f"hf download {repo} --local-dir {local}"], local


def _stem(doc: dict) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", doc["model"]["name"]).strip("-").lower()


def _llamacpp(doc: dict, s: dict) -> list[str]:
    stem, ftype = _stem(doc), s["ftype"]
    bf16, quant = f"{stem}-bf16.gguf", f"{stem}-{ftype}.gguf"
    fetch, local = _fetch(doc)
    out = [f"# llama.cpp ({engine_data('llama.cpp')['version']})", *fetch,
           f"python convert_hf_to_gguf.py {local} --outtype bf16 --outfile {bf16}"]
    q = ["llama-quantize"]
    if s["imatrix"]:
        out.append("# calibration.txt: a few hundred KB of text like the model's use")
        out.append(f"llama-imatrix -m {bf16} -f calibration.txt -o imatrix.gguf -ngl 99")
        q += ["--imatrix", "imatrix.gguf"]
    for cat, t in s["tensor_types"].items():
        q += ["--tensor-type", f"{cat}={t.lower()}"]
    out.append(" ".join(q + [bf16, quant, ftype]))
    run = ["llama-server", "-m", quant, "-c", str(s["ctx"]), "-ngl", str(s["n_gpu_layers"]), "-ctk", s["cache_type_k"],
           "-ctv", s["cache_type_v"], "-fa", s["flash_attn"], "-ub", str(s["n_ubatch"]),
           "-np", str(s.get("n_parallel", 1)), "--fit", "off"]
    spec = doc["model"]["spec"]
    if s["ctx"] > spec["max_context"] and not spec.get("rope_scaling"):      # past the native context: YaRN
        run += ["--rope-scaling", "yarn", "--rope-scale", f"{s['ctx'] / spec['max_context']:g}", "--yarn-orig-ctx",
                str(spec["max_context"])]
    if s["n_cpu_moe"]:
        run += ["-ncmoe", str(s["n_cpu_moe"])]
    if s["tensor_split"]:
        run += ["-ts", ",".join(map(str, s["tensor_split"]))]
    return out + [" ".join(run)]


def _exllamav2(doc: dict, s: dict) -> list[str]:
    out_dir = f"{_stem(doc)}-{s['bpw']:.2f}bpw"
    run = ["python", "examples/chat.py", "-m", out_dir, "-mode", "llama", "-l", str(s["max_seq_len"])]
    if s["cache_mode"] != "FP16":
        run.append(f"-c{s['cache_mode'].lower()}")
    if s["gpu_split_gb"]:
        run += ["-gs", ",".join(f"{g:g}" for g in s["gpu_split_gb"])]
    fetch, local = _fetch(doc)
    return [f"# ExLlamaV2 {engine_data('exllamav2')['version']}", *fetch,
            f"python convert.py -i {local} -o work -cf {out_dir} -b {s['bpw']:.2f} -hb {s['head_bits']}", " ".join(run)]


def _vllm(doc: dict, s: dict) -> list[str]:
    model = hf_repo(doc["model"]["spec"])
    if s["weights"] == "awq":
        model = f"<{model}-AWQ checkpoint>" if model != PLACEHOLDER else "<AWQ checkpoint>"
    serve = ["vllm", "serve", shlex.quote(model), "--max-model-len", str(s["max_model_len"]),
             "--gpu-memory-utilization", f"{s['gpu_memory_utilization']:.2f}", "--kv-cache-dtype", s["kv_cache_dtype"],
             "--tensor-parallel-size", str(s["tensor_parallel_size"]),
             "--pipeline-parallel-size", str(s["pipeline_parallel_size"]),
             "--max-num-batched-tokens", str(s["max_num_batched_tokens"]), "--max-num-seqs", str(s["max_num_seqs"])]
    if s["weights"] not in ("bf16", "mxfp4"):     # an MXFP4 checkpoint names its quantization in its config.json
        serve += ["--quantization", s["weights"]]
    if s["dtype"] != "auto":
        serve += ["--dtype", s["dtype"]]
    out = [f"# vLLM {engine_data('vllm')['version']}"]
    if s["nodes"] > 1:
        serve += ["--distributed-executor-backend", "ray"]
        out += ["# on the head node:", "ray start --head --port 6379",
                f"# on each of the other {s['nodes'] - 1} node(s):", "ray start --address <head-node-ip>:6379",
                "# then on the head node:"]
    return out + [" ".join(serve)]


def commands(doc: dict, path: str) -> list[str]:
    """The lines to paste: comments start with '#'."""
    target = doc.get("target", {}).get("name", "vramwise")
    if target == "vramwise":
        return [f"# vramwise {engine_data('vramwise')['version']}", f"vramwise run --plan {shlex.quote(str(path))}"]
    build = {"llama.cpp": _llamacpp, "exllamav2": _exllamav2, "vllm": _vllm}[target]
    return build(doc, doc["target"]["settings"])


def tool_of(line: str, tools) -> str:
    """Which documented tool a command line runs (the longest matching prefix)."""
    return max((t for t in tools if line == t or line.startswith(t + " ")), key=len)


def options_of(line: str) -> list[str]:
    """The options a command line passes (tokens starting with '-')."""
    return [tok for tok in shlex.split(line) if tok.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", tok)]
