"""The Python API: load_model(name or path) -> Model with .tokenizer, .logits(ids), .generate(ids, ...)."""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Optional

import numpy as np

from planner import memory as mem
from refengine.generate import Sampling, generate
from refengine.model import Transformer
from refengine.tokenizer import Tokenizer, for_checkpoint
from refengine.weights import ROPE_INTERLEAVED, Checkpoint, load_checkpoint


class _Weights(Mapping):
    """Canonical name -> float32 array, dequantized from the checkpoint on first use and kept."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.cache = ckpt, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = np.ascontiguousarray(self.ckpt[name].numpy(np.float32))
        return self.cache[name]

    def __iter__(self):
        return iter(self.ckpt.tensors)

    def __len__(self) -> int:
        return len(self.ckpt.tensors)


class Model:
    """A loaded model on the reference engine."""

    def __init__(self, ckpt: Checkpoint, tokenizer: Tokenizer, ctx: int, kv: str, chunk: int):
        self.checkpoint, self.spec, self.tokenizer = ckpt, ckpt.spec, tokenizer
        self.net = Transformer(ckpt.spec, _Weights(ckpt), ctx, kv, chunk, ckpt.rope_layout == ROPE_INTERLEAVED)

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


def load_model(name_or_path: str, ctx: Optional[int] = None, kv: str = "fp16",
               chunk: int = mem.DEFAULT_CHUNK) -> Model:
    """Load 'smollm2-135m', a .gguf, a .safetensors file or a Hugging Face folder onto the reference engine."""
    ckpt = load_checkpoint(name_or_path)
    return Model(ckpt, for_checkpoint(ckpt), ctx or min(ckpt.spec.max_context, 4096), kv, chunk)
