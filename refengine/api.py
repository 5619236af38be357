"""The Python API: load_model(name or path) -> Model with .tokenizer, .logits(ids), .generate(ids, ...)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional

import numpy as np

from planner import memory as mem
from planner.formats import HEAD_OPTION, QuantOption
from planner.spec import architecture_digest
from refengine.errors import EngineError
from refengine.packed import QuantizedLinear
from refengine.quant import quantize
from refengine.generate import Sampling, generate
from refengine.model import Transformer
from refengine.tokenizer import Tokenizer, for_checkpoint
from refengine.weights import ROPE_INTERLEAVED, Checkpoint, load_checkpoint

if TYPE_CHECKING:
    from planner.plan import Plan


class _Weights(Mapping):
    """Canonical name -> float32 array, dequantized from the checkpoint on first use and kept.

    With an assignment (a plan's per-linear options), those linears and the head are quantized to
    their format on first use instead and kept packed."""

    def __init__(self, ckpt: Checkpoint, assignment: Optional[Mapping[str, QuantOption]] = None):
        self.ckpt, self.cache, self.assignment = ckpt, {}, assignment

    def __getitem__(self, name: str):
        if name not in self.cache:
            if self.assignment is not None and (name in self.assignment or name == "head"):
                option = self.assignment.get(name, HEAD_OPTION)
                self.cache[name] = QuantizedLinear(quantize(self.ckpt.lm_head.numpy(np.float32) if name == "head"
                                                            else self.ckpt[name].numpy(np.float32), option))
            elif name == "embed":      # stored as the planner prices it (memory.EMBED_DTYPE): a lookup table
                self.cache[name] = np.ascontiguousarray(self.ckpt[name].numpy(np.float32).astype(np.float16))
            else:
                self.cache[name] = np.ascontiguousarray(self.ckpt[name].numpy(np.float32))
        return self.cache[name]

    def materialize(self) -> None:
        """Load (and quantize) every tensor now, so timings measure inference alone."""
        for name in list(self.ckpt.tensors) + (["head"] if self.assignment is not None else []):
            self[name]

    def __contains__(self, name: object) -> bool:
        return name in self.ckpt.tensors or (name == "head" and self.assignment is not None)

    def nbytes(self) -> int:
        """Bytes held now: packed linears at their format's size, float32 arrays at 4 bytes each."""
        return sum(w.nbytes for w in self.cache.values())

    def __iter__(self):
        return iter(self.ckpt.tensors)

    def __len__(self) -> int:
        return len(self.ckpt.tensors)


class Model:
    """A loaded model on the reference engine."""

    def __init__(self, ckpt: Checkpoint, tokenizer: Tokenizer, ctx: int, kv: str, chunk: int,
                 assignment: Optional[Mapping[str, QuantOption]] = None):
        self.checkpoint, self.spec, self.tokenizer = ckpt, ckpt.spec, tokenizer
        self.weights = _Weights(ckpt, assignment)
        self.net = Transformer(ckpt.spec, self.weights, ctx, kv, chunk, ckpt.rope_layout == ROPE_INTERLEAVED)

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


def load_for_plan(plan: "Plan", source: str) -> Model:
    """The plan's model on the reference engine: its context, KV format, chunk and per-linear formats."""
    ckpt = load_checkpoint(source)
    want = plan.doc["model"]["architecture_digest"]
    if architecture_digest(ckpt.spec) != want:
        raise EngineError(f"{source}: this checkpoint's architecture ({architecture_digest(ckpt.spec)}) is not the "
                          f"plan's ({want}); pass the weights the plan was made for")
    lay = plan.layout
    return Model(ckpt, for_checkpoint(ckpt), lay.ctx, lay.kv.name, lay.chunk, lay.assignment)


def load_model(name_or_path: str, ctx: Optional[int] = None, kv: str = "fp16",
               chunk: int = mem.DEFAULT_CHUNK) -> Model:
    """Load 'smollm2-135m', a .gguf, a .safetensors file or a Hugging Face folder onto the reference engine."""
    ckpt = load_checkpoint(name_or_path)
    return Model(ckpt, for_checkpoint(ckpt), ctx or min(ckpt.spec.max_context, 4096), kv, chunk)
