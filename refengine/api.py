"""The Python API: load_model(name or path) -> Model with .tokenizer, .logits(ids), .generate(ids, ...)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional

import numpy as np

from planner import memory as mem
from planner.formats import HEAD_OPTION, QuantOption
from planner.spec import architecture_difference, architecture_digest
from refengine.errors import EngineError
from refengine.packed import QuantizedLinear
from refengine.generate import Sampling, generate
from refengine.model import Transformer
from refengine.stream import CachedWeights, LayerStore, StreamedWeights, quantize_tensor, stored
from refengine.tokenizer import Tokenizer, for_checkpoint
from refengine.weights import ROPE_INTERLEAVED, Checkpoint, load_checkpoint

if TYPE_CHECKING:
    from planner.plan import Plan
    from refengine.qmodel import QuantizedDir


def load_tensor(ckpt: Checkpoint, name: str, assignment: Optional[Mapping[str, QuantOption]] = None):
    """One tensor as the engine holds it: under a plan its linears and the head quantized to their formats
    (packed), the embedding as the fp16 lookup table the planner prices (memory.EMBED_DTYPE), an MoE router in
    fp16 under a plan (stream.stored), the rest float32. `head` of a tied model is the embedding matrix."""
    if assignment is not None and (name in assignment or name == "head"):
        source = ckpt.lm_head.name if name == "head" else name
        return QuantizedLinear(quantize_tensor(ckpt, source, ckpt[source].numpy(np.float32),
                                               assignment.get(name, HEAD_OPTION)))
    if name == "embed":
        return np.ascontiguousarray(ckpt[name].numpy(np.float32).astype(np.float16))
    if name == "head":
        return np.ascontiguousarray(ckpt.lm_head.numpy(np.float32))
    w = np.ascontiguousarray(ckpt[name].numpy(np.float32))
    return w if assignment is None else stored(name, w)


def _names(ckpt: Checkpoint) -> list[str]:
    return list(ckpt.tensors) + ([] if "head" in ckpt.tensors else ["head"])


class _Weights(CachedWeights):
    """Canonical name -> weight (load_tensor), loaded on first use and kept."""

    def __init__(self, ckpt: Checkpoint, assignment: Optional[Mapping[str, QuantOption]] = None):
        self.ckpt, self.cache, self.assignment = ckpt, {}, assignment
        self.names = _names(ckpt)

    def __getitem__(self, name: str):
        if name not in self.cache:
            if name not in self.names:
                raise KeyError(name)
            self.cache[name] = load_tensor(self.ckpt, name, self.assignment)
        return self.cache[name]


def streamed_weights(ckpt: Checkpoint, assignment: Optional[Mapping[str, QuantOption]] = None,
                     store_dir: Optional[Path] = None, prefetch: bool = True,
                     progress: Optional[Callable[[int, int], None]] = None) -> StreamedWeights:
    """Weights for layer streaming: under a plan its layers come from a LayerStore (built first where missing,
    resumably), else straight from the memory-mapped checkpoint, dequantized to float32 per load."""
    if assignment is not None:
        store = LayerStore(ckpt, assignment, store_dir)
        store.build(progress)
        load_layer = store.load
    else:
        def load_layer(i: int) -> dict:
            return {n: np.ascontiguousarray(r.numpy(np.float32)) for n, r in ckpt.layer(i).items()}
    return StreamedWeights(_names(ckpt), lambda name: load_tensor(ckpt, name, assignment), load_layer,
                           ckpt.spec.num_layers, prefetch)


class Model:
    """A loaded model on the reference engine."""

    def __init__(self, ckpt: Checkpoint, tokenizer: Tokenizer, ctx: int, kv: str, chunk: int,
                 assignment: Optional[Mapping[str, QuantOption]] = None, weights: Optional[Mapping] = None):
        self.checkpoint, self.spec, self.tokenizer = ckpt, ckpt.spec, tokenizer
        self.weights = weights if weights is not None else _Weights(ckpt, assignment)
        self.streaming = isinstance(self.weights, StreamedWeights)
        self.net = self._network(ctx, kv, chunk)

    def _network(self, ctx: int, kv: str, chunk: int):
        return Transformer(self.spec, self.weights, ctx, kv, chunk, self.checkpoint.rope_layout == ROPE_INTERLEAVED,
                           self.checkpoint.rope_factors)

    @property
    def ctx(self) -> int:
        return self.net.ctx

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits (len(ids), vocab) float32, from an empty cache."""
        self.net.reset()
        return self.net.forward(list(ids)).astype(np.float32, copy=False)

    def stream(self, ids: list[int], max_new_tokens: int = 128, sampling: Sampling = Sampling()) -> Iterator[int]:
        """Yield generated token ids one at a time (prefill from an empty cache, stop on EOS)."""
        self.net.reset()
        limit = min(max_new_tokens, self.ctx - len(ids))
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        yield from generate(self.net.forward, list(ids), limit, sampling, eos)

    def generate(self, ids: list[int], max_new_tokens: int = 128, sampling: Sampling = Sampling(),
                 on_token: Optional[Callable[[int], None]] = None) -> list[int]:
        out = []
        for tok in self.stream(ids, max_new_tokens, sampling):
            out.append(tok)
            if on_token is not None:
                on_token(tok)
        return out


def plan_checkpoint(plan: "Plan", source: str) -> Checkpoint:
    """The checkpoint at `source`, refused in one line unless it has the plan's architecture."""
    ckpt = load_checkpoint(source)
    want = plan.doc["model"]["architecture_digest"]
    if architecture_digest(ckpt.spec) != want:
        raise EngineError(f"{source}: this checkpoint's architecture is not the plan's "
                          f"({architecture_difference(plan.spec, ckpt.spec)}); pass the weights the plan was made for")
    return ckpt


def plan_quantized_dir(plan: Optional["Plan"], path) -> "QuantizedDir":
    """A `vramwise quantize` directory, refused in one line unless it holds the plan's formats (any plan: None)."""
    from refengine.qmodel import QuantizedDir

    qdir = QuantizedDir(Path(path))
    if plan is not None and {n: o.name for n, o in plan.layout.assignment.items()} != {
            n: o.name for n, o in qdir.plan.layout.assignment.items()}:
        raise EngineError(f"{path}: quantized for other formats than this plan's; quantize with this plan, or run "
                          f"--plan {Path(path) / 'plan.yaml'}")
    return qdir


def load_for_plan(plan: "Plan", source: str, stream: Optional[bool] = None, store_dir: Optional[Path] = None,
                  progress: Optional[Callable[[int, int], None]] = None, engine: str = "ref") -> Model:
    """The plan's model on the reference engine (engine="gpu": the CuPy engine, gpuengine/api.py): its
    context, KV format, chunk and per-linear formats.

    stream (default: the plan's mode is "stream"): run layer by layer from a LayerStore of the plan's
    quantized layers (built on first use in store_dir, default refengine.stream.cache_root()/layers)."""
    from refengine.qmodel import is_quantized_dir
    if engine == "gpu":
        from gpuengine.api import load_for_plan as gpu_load_for_plan
        return gpu_load_for_plan(plan, source, stream, store_dir, progress)
    if is_quantized_dir(source):
        return load_quantized(source, plan, stream)
    ckpt = plan_checkpoint(plan, source)
    lay = plan.layout
    stream = lay.mode == "stream" if stream is None else stream
    weights = streamed_weights(ckpt, lay.assignment, store_dir, progress=progress) if stream else None
    return Model(ckpt, for_checkpoint(ckpt), lay.ctx, lay.kv.name, lay.chunk, lay.assignment, weights)


def load_model(name_or_path: str, ctx: Optional[int] = None, kv: str = "fp16",
               chunk: int = mem.DEFAULT_CHUNK, stream: bool = False, engine: str = "ref") -> Model:
    """Load 'smollm2-135m', a .gguf, a .safetensors file or a Hugging Face folder onto the reference engine
    (engine="gpu": the CuPy engine, with unquantized linears in fp16).

    stream: hold one layer at a time (read from the memory-mapped checkpoint per step), as AirLLM does."""
    from refengine.qmodel import is_quantized_dir
    if engine == "gpu":
        from gpuengine.api import load_model as gpu_load_model
        return gpu_load_model(name_or_path, ctx, kv, chunk, stream)
    if is_quantized_dir(name_or_path):
        return load_quantized(name_or_path, stream=stream, ctx=ctx, kv=kv)
    ckpt = load_checkpoint(name_or_path)
    weights = streamed_weights(ckpt) if stream else None
    return Model(ckpt, for_checkpoint(ckpt), ctx or min(ckpt.spec.max_context, 4096), kv, chunk, weights=weights)


def load_quantized(path, plan: Optional["Plan"] = None, stream: Optional[bool] = None, ctx: Optional[int] = None,
                   kv: Optional[str] = None) -> Model:
    """A `vramwise quantize` directory on the reference engine, under `plan` (which must choose the formats
    the directory holds) or else under the plan stored in it."""
    from refengine.qmodel import QuantizedWeights

    qdir = plan_quantized_dir(plan, path)
    lay = (plan or qdir.plan).layout
    stream = lay.mode == "stream" if stream is None else stream
    weights: Mapping = QuantizedWeights(qdir)
    if stream:                      # the globals from it, the layers one at a time from their files
        weights = StreamedWeights(weights.names, weights.__getitem__, qdir.load_layer, qdir.spec.num_layers)
    return Model(qdir.checkpoint(), qdir.tokenizer(), ctx or lay.ctx, kv or lay.kv.name, lay.chunk, None, weights)


def negative_log_likelihood(model: Model, ids: list[int], window: Optional[int] = None,
                            on_window: Optional[Callable[[int], None]] = None) -> tuple[float, int]:
    """(total NLL in nats, tokens scored) of ids, teacher-forced in consecutive windows of the model's
    context (each window from an empty cache, predicting its tokens 1..n from the ones before).
    perplexity = exp(nll / count). on_window(tokens scored) after each window, for progress bars."""
    window = window or model.ctx
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logits = model.logits(chunk[:-1]).astype(np.float64)                      # (T, V)
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
        if on_window is not None:
            on_window(len(chunk) - 1)
    return nll, count
