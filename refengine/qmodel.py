"""`vramwise quantize`: a plan's model written as a quantized directory that loads without the original.

The directory:
  vramwise-model.yaml      the header, written last: kind, format version, model, method, calibration,
                           tokenizer ids, and every file with its size (a directory without it is
                           unfinished: running quantize again resumes it)
  plan.yaml                the plan that chose the formats (its model spec rebuilds the architecture)
  tokenizer.json           the model's tokenizer (Hugging Face tokenizers format)
  layer_0000.safetensors   each layer's linears packed in their plan option (words, fp16 scales, slice
  ...                      table, permutation; refengine.stream.write_tensors), norms and biases float32
  globals.safetensors      the fp16 embedding, the final norm and the head (HEAD_OPTION)

GPTQ (default) quantizes layer by layer on calibration text: each layer's linears are quantized with
Hessians from their real inputs, then the calibration activations move on through the quantized layer,
as GPTQ's sequential mode does. The walk is checkpointed after every layer (`.partial/`), so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np

from planner import yamlout
from planner.formats import HEAD_OPTION, QuantOption
from planner.spec import architecture_difference, architecture_digest
from refengine import ops
from refengine.calibrate import LayerWalk, WalkCheckpoint, calibration_rows
from refengine.errors import WeightsError
from refengine.gptq import gptq_quantize
from refengine.quant import QTensor, dequantize
from refengine.stream import (CachedWeights, LayerStore, file_meta, quantize_tensor, read_tensors, stored,
                              write_tensors)
from refengine.weights import ROPE_INTERLEAVED, Checkpoint, load_checkpoint

if TYPE_CHECKING:
    from planner.plan import Plan

HEADER = "vramwise-model.yaml"
KIND = "vramwise-quantized-model"
FORMAT_VERSION = 2             # 2: the header carries a scaled RoPE's factors (Llama 3.1 on)


def is_quantized_dir(path: Any) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / HEADER).exists() or (p / "plan.yaml").exists() and any(p.glob("layer_*.safetensors")))


def quantize_model(plan: "Plan", source: str, out: Path, method: str = "gptq", text: str = "",
                   text_source: str = "", rows: int = 32, row_tokens: int = 256,
                   progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write `out` for the plan's formats from checkpoint `source`; returns the header. Resumable."""
    from refengine.tokenizer import for_checkpoint

    ckpt = load_checkpoint(source)
    spec, lay = ckpt.spec, plan.layout
    if architecture_digest(spec) != plan.doc["model"]["architecture_digest"]:
        raise WeightsError(f"{source}: this checkpoint's architecture is not the plan's "
                           f"({architecture_difference(plan.spec, spec)}); pass the weights the plan "
                           "was made for")
    if method not in ("gptq", "rtn"):
        raise WeightsError(f"unknown method {method!r} (choose gptq or rtn)")
    tok = for_checkpoint(ckpt)
    text_hash = hashlib.sha256(text.encode()).hexdigest() if method == "gptq" else ""
    store = LayerStore(ckpt, lay.assignment, out,
                       salt=f"{method}|{text_hash}|{rows}|{row_tokens}|rope {ckpt.spec.rope_scaling}")
    out.mkdir(parents=True, exist_ok=True)
    (out / HEADER).unlink(missing_ok=True)            # unfinished until the header is written again
    head_x = None
    if method == "rtn":
        store.build(progress)
    else:
        try:
            ids = calibration_rows(tok, text, rows, row_tokens, text_source)
        except ValueError as exc:
            raise WeightsError(str(exc)) from None
        head_x = _gptq_layers(ckpt, store, lay.assignment, ids, out, progress)
    head_w = ckpt.lm_head.numpy(np.float32)
    if head_x is not None:
        head = quantize_tensor(ckpt, ckpt.lm_head.name, head_w, HEAD_OPTION,
                               lambda w, o: gptq_quantize(w, o, head_x.T @ head_x))
    else:
        head = quantize_tensor(ckpt, ckpt.lm_head.name, head_w, HEAD_OPTION)
    globals_ = {"embed": ckpt["embed"].numpy(np.float32).astype(np.float16), "head": head,
                **{n: r.numpy(np.float32) for n, r in ckpt.tensors.items() if n.startswith("norm.final")}}
    write_tensors(out / "globals.safetensors", globals_, {"key": store.key})
    (out / "tokenizer.json").write_text(tok.backend.to_str(), encoding="utf-8")
    yamlout.write_atomic(out / "plan.yaml", yamlout.dump(plan.doc))
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != HEADER)
    sizes = {name: (out / name).stat().st_size for name in files}
    header = {"kind": KIND, "format_version": FORMAT_VERSION, "key": store.key,
              "model": {"name": spec.name, "digest": architecture_digest(spec), "source": ckpt.path.name},
              "rope_layout": ckpt.rope_layout, "method": method,
              "rope_factors": None if ckpt.rope_factors is None else [float(f) for f in ckpt.rope_factors],
              "rope_mscale": ckpt.rope_mscale,          # YaRN's: already in the quantized queries
              "calibration": ({"text": text_source, "sha256": text_hash, "rows": rows, "row_tokens": row_tokens}
                              if method == "gptq" else None),
              "tokenizer": {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "add_bos": tok.add_bos,
                            "chat_template": tok.chat_template},
              "layers": [list(names) for names in store.names],
              "files": sizes, "weight_bytes": sum(v for k, v in sizes.items() if k.endswith(".safetensors")),
              "planned_weight_bytes": planned_weight_bytes(plan)}
    yamlout.write_atomic(out / HEADER, yamlout.dump(header))
    WalkCheckpoint(out / ".partial", store.key).remove()
    return header


def planned_weight_bytes(plan: "Plan") -> int:
    """What the plan says every weight takes (its weights.bytes): layers, head, final norm, embedding."""
    from planner import memory as mem

    return mem.all_weight_bytes(plan.spec, plan.layout.assignment)


def _gptq_layers(ckpt: Checkpoint, store: LayerStore, assignment: Mapping[str, QuantOption], ids: np.ndarray,
                 out: Path, progress: Optional[Callable[[int, int], None]]) -> np.ndarray:
    """GPTQ every layer along the calibration walk; returns the final-norm output (the head's input)."""
    spec = ckpt.spec
    partial = WalkCheckpoint(out / ".partial", store.key)
    done, state, _ = partial.load()
    missing = store.missing()
    if state is None or any(i < done for i in missing):
        done, state = 0, None                            # layers before the checkpoint must all be there
    embed = ckpt["embed"].numpy(np.float32)
    walk = LayerWalk(spec, embed, ids, ckpt.rope_layout == ROPE_INTERLEAVED, state, done, ckpt.rope_factors)
    del embed
    for i in range(done, spec.num_layers):
        w = {n: r.numpy(np.float32) for n, r in ckpt.layer(i).items()}
        seen = walk.step(w, advance=False)
        tensors: dict[str, Any] = {}
        for name, weight in w.items():
            if name in assignment:
                gram = seen.gram(name)
                weight = quantize_tensor(ckpt, name, weight, assignment[name], lambda a, o: gptq_quantize(a, o, gram))
            tensors[name] = weight if name in assignment else stored(name, weight)
        store.write_layer(i, tensors)
        walk.step({n: dequantize(t) if isinstance(t, QTensor) else t for n, t in tensors.items()})
        partial.save(i + 1, walk.x, {})
        if progress is not None:
            progress(i + 1, spec.num_layers)
    final = ckpt["norm.final"].numpy(np.float32)
    x = walk.x.reshape(-1, spec.hidden_size)
    return ops.rmsnorm(x, final, spec.norm_eps).astype(np.float64)


# --- loading ---------------------------------------------------------------------------------------

class QuantizedDir:
    """A finished quantized directory, checked: header, plan, every file present at its recorded size."""

    def __init__(self, path: Path):
        import yaml

        from planner.plan import PlanFileError, load_plan

        self.path = Path(path)
        head = self.path / HEADER
        if not head.exists():
            raise WeightsError(f"{self.path}: no {HEADER}: the quantization did not finish; run `vramwise quantize` "
                               "again with the same plan to resume it")
        try:
            self.header = yaml.safe_load(head.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise WeightsError(f"{head}: unreadable ({' '.join(str(exc).split())}); quantize again") from None
        if not isinstance(self.header, dict) or self.header.get("kind") != KIND:
            raise WeightsError(f"{head}: not a vramwise quantized model header (kind {KIND!r} expected)")
        if self.header.get("format_version") != FORMAT_VERSION:
            raise WeightsError(f"{head}: format_version {self.header.get('format_version')!r}, this vramwise reads "
                               f"{FORMAT_VERSION}; quantize the model again")
        for name, size in (self.header.get("files") or {}).items():
            f = self.path / name
            if not f.exists() or f.stat().st_size != size:
                have = f.stat().st_size if f.exists() else "missing"
                raise WeightsError(f"{f}: {have} bytes where the header records {size}; the directory is truncated "
                                   "or was changed, quantize again")
        try:
            self.plan = load_plan(self.path / "plan.yaml")
        except PlanFileError as exc:
            raise WeightsError(str(exc)) from None
        self.spec = self.plan.spec
        if architecture_digest(self.spec) != self.header["model"]["digest"]:
            raise WeightsError(f"{head}: the header's architecture is not its plan's; quantize again")
        self.key = self.header["key"]
        self.layers: list[list[str]] = self.header["layers"]

    def checkpoint(self) -> Checkpoint:
        factors = self.header.get("rope_factors")
        return Checkpoint(self.path, "vramwise", self.spec, {}, self.header["rope_layout"], self.header,  # type: ignore[arg-type]
                          None if factors is None else np.asarray(factors, dtype=np.float32),
                          float(self.header.get("rope_mscale", 1.0)))

    def tokenizer(self):
        from tokenizers import Tokenizer as Backend

        from refengine.tokenizer import Tokenizer
        t = self.header["tokenizer"]
        try:
            backend = Backend.from_file(str(self.path / "tokenizer.json"))
        except Exception as exc:       # the tokenizers library raises plain Exception
            raise WeightsError(f"{self.path / 'tokenizer.json'}: unreadable ({' '.join(str(exc).split())})") from None
        return Tokenizer(backend, t["bos_id"], t["eos_id"], bool(t["add_bos"]), t["chat_template"], str(self.path))

    def load_layer(self, i: int) -> dict[str, Any]:
        return read_tensors(self.path / f"layer_{i:04d}.safetensors", self.layers[i], self.key,
                            "quantize the model again")

    def load_globals(self) -> dict[str, Any]:
        from safetensors import safe_open
        try:
            with safe_open(str(self.path / "globals.safetensors"), framework="numpy") as f:
                quantized = list(file_meta(f).get("tensors", {}))
                names = quantized + [k for k in f.keys()
                                     if not any(k.startswith(q + ".") for q in quantized)]
        except Exception as exc:
            raise WeightsError(f"{self.path / 'globals.safetensors'}: unreadable ({' '.join(str(exc).split())}); "
                               "quantize the model again") from None
        return read_tensors(self.path / "globals.safetensors", names, self.key, "quantize the model again")


class QuantizedWeights(CachedWeights):
    """A quantized directory's tensors, each layer read on first use and kept."""

    def __init__(self, qdir: QuantizedDir):
        self.qdir = qdir
        self.cache: dict[str, Any] = {}
        self.names = [n for layer in qdir.layers for n in layer] + ["embed", "norm.final", "head"]

    def __getitem__(self, name: str):
        if name not in self.cache:
            from refengine.stream import layer_of
            i = layer_of(name)
            self.cache.update(self.qdir.load_layer(i) if i >= 0 else self.qdir.load_globals())
        return self.cache[name]


__all__ = ["HEADER", "QuantizedDir", "QuantizedWeights", "is_quantized_dir", "planned_weight_bytes",
           "quantize_model"]
