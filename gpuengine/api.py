"""The GPU engine behind refengine's Python API: load_model(..., engine="gpu") and load_for_plan(...,
engine="gpu") return a Model whose logits and generate run here, with tokens chosen on the device."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

import numpy as np

from gpuengine import device
from gpuengine import launch as K
from planner import memory as mem
from refengine.api import Model, _Weights, plan_checkpoint, plan_quantized_dir, streamed_weights
from refengine.errors import EngineError
from refengine.generate import Sampling
from refengine.tokenizer import for_checkpoint
from refengine.weights import ROPE_INTERLEAVED, load_checkpoint

if TYPE_CHECKING:
    from planner.plan import Plan


class GPUModel(Model):
    """A Model on the GPU: `weights` is the device copy (gpuengine.model.DeviceWeights)."""

    def __init__(self, ckpt: Any, tokenizer: Any, ctx: int, kv: str, chunk: int, weights: Mapping,
                 resident: range, host_experts: int = 0):
        self._host_weights, self._resident, self._host_experts = weights, resident, host_experts
        super().__init__(ckpt, tokenizer, ctx, kv, chunk, weights=weights)
        self.weights = self.net.weights
        self._host_weights = None                # copied to the device (or pinned): the host maps can go
        self.streaming = len(resident) < self.spec.num_layers

    def _network(self, ctx: int, kv: str, chunk: int):
        from gpuengine.model import GPUTransformer

        return GPUTransformer(self.spec, self._host_weights, ctx, kv, chunk,
                              self.checkpoint.rope_layout == ROPE_INTERLEAVED, self._resident,
                              rope_factors=self.checkpoint.rope_factors, host_experts=self._host_experts)

    def stream(self, ids: list[int], max_new_tokens: int = 128, sampling: Sampling = Sampling()) -> Iterator[int]:
        """As refengine's Model.stream, with the logits kept on the device and only token ids returned."""
        self.net.reset()
        limit = min(max_new_tokens, self.ctx - len(ids))
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        stream = self.net.stream                     # the sampler's work follows the step's on its stream
        with stream:
            sampler = DeviceSampler(sampling, self.spec.vocab_size, ids, self.net.state["sampled"])
        logits = self.net.forward_device(list(ids))
        for _ in range(limit):
            with stream:
                tok = sampler.pick(logits)
            if tok in eos:
                return
            yield tok
            with stream:
                sampler.saw(tok)
            logits = self.net.forward_device([tok])


class DeviceSampler:
    """refengine.generate.sample on the device: greedy by the argmax kernel; temperature, top-k and top-p
    by CuPy's sort and scan; the repetition penalty by a kernel over a mask of seen tokens."""

    def __init__(self, s: Sampling, vocab: int, prompt: list[int], out: Any):
        import cupy as cp

        self.s, self.out = s, out
        self.seen = None
        if s.repetition_penalty != 1.0:
            self.seen = cp.zeros(vocab, dtype=cp.uint8)
            self.seen[cp.asarray(np.unique(np.asarray(prompt, dtype=np.int64)))] = 1
        self.rng = cp.random.RandomState(s.seed) if s.temperature > 0 else None

    def saw(self, tok: int) -> None:
        if self.seen is not None:
            self.seen[tok] = 1

    def pick(self, logits: Any) -> int:
        """The next token; runs on the current stream (the model's), then waits for it."""
        import cupy as cp

        if self.seen is not None:
            K.penalize(logits, self.seen, self.s.repetition_penalty)
        if self.s.temperature == 0:
            K.argmax(logits, self.out)
            cp.cuda.get_current_stream().synchronize()
            return int(self.out.get()[0])
        return self._draw(logits)

    def _draw(self, logits: Any) -> int:
        import cupy as cp

        s, n = self.s, logits.size
        z = logits.astype(cp.float64) / s.temperature
        if s.top_k and s.top_k < n:
            kth = cp.partition(z, n - s.top_k)[n - s.top_k]
            z = cp.where(z >= kth, z, -cp.inf)
        p = cp.exp(z - z.max())
        p /= p.sum()
        if s.top_p < 1.0:                       # nucleus: the smallest set of likeliest tokens reaching top_p
            order = cp.argsort(-p)
            cum = cp.cumsum(p[order])
            keep = order[: int(cp.searchsorted(cum, s.top_p)) + 1]
            mask = cp.zeros(n, dtype=bool)
            mask[keep] = True
            p = cp.where(mask, p, 0.0)
        c = cp.cumsum(p)
        u = self.rng.random_sample() * c[-1]
        return int(cp.minimum(cp.searchsorted(c, u, side="right"), n - 1))


def _resident_layers(plan: "Plan", stream: Optional[bool]) -> range:
    lay, layers = plan.layout, plan.spec.num_layers
    if len(lay.gpu_layers) > 1:
        raise EngineError(f"this plan splits the model over {len(lay.gpu_layers)} GPUs; the GPU engine runs on one "
                          "(plan again without --gpus, or run it with --engine ref)")
    if stream or (stream is None and lay.mode == "stream"):
        return range(0)
    if lay.mode == "offload":
        return range(*lay.gpu_layers[0])
    return range(layers)


def load_for_plan(plan: "Plan", source: str, stream: Optional[bool] = None, store_dir: Optional[Path] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> GPUModel:
    """The plan's model on the GPU: its formats, context, KV format and chunk; layers outside the plan's
    resident range (offload) or all layers (stream) run from pinned host memory.

    From a checkpoint, the layers are quantized once into the plan's LayerStore (refengine.stream; resumable,
    kept in store_dir or the cache), so later runs of the plan read packed layers instead of quantizing."""
    device.require()
    from refengine.qmodel import QuantizedWeights, is_quantized_dir

    resident = _resident_layers(plan, stream)
    lay = plan.layout
    host_experts = lay.host_experts if len(resident) else 0      # streaming all layers reads every expert in place
    if is_quantized_dir(source):
        qdir = plan_quantized_dir(plan, source)
        return GPUModel(qdir.checkpoint(), qdir.tokenizer(), lay.ctx, lay.kv.name, lay.chunk,
                        QuantizedWeights(qdir), resident, host_experts)
    ckpt = plan_checkpoint(plan, source)
    weights = streamed_weights(ckpt, lay.assignment, store_dir, progress=progress)
    try:
        return GPUModel(ckpt, for_checkpoint(ckpt), lay.ctx, lay.kv.name, lay.chunk, weights, resident, host_experts)
    finally:
        weights.close()


def load_model(name_or_path: str, ctx: Optional[int] = None, kv: str = "fp16", chunk: int = mem.DEFAULT_CHUNK,
               stream: bool = False) -> GPUModel:
    """A checkpoint on the GPU without a plan: linears in fp16 (a quantize directory: its own formats)."""
    device.require()
    from refengine.qmodel import QuantizedDir, QuantizedWeights, is_quantized_dir

    if is_quantized_dir(name_or_path):
        qdir = QuantizedDir(Path(name_or_path))
        lay = qdir.plan.layout
        layers = range(0) if stream else range(qdir.spec.num_layers)
        return GPUModel(qdir.checkpoint(), qdir.tokenizer(), ctx or lay.ctx, kv or lay.kv.name, lay.chunk,
                        QuantizedWeights(qdir), layers)
    ckpt = load_checkpoint(name_or_path)
    layers = range(0) if stream else range(ckpt.spec.num_layers)
    return GPUModel(ckpt, for_checkpoint(ckpt), ctx or min(ckpt.spec.max_context, 4096), kv, chunk,
                    _Weights(ckpt), layers)
