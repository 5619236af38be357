"""Sampling and the generation loop: greedy, temperature, top-k, top-p, repetition penalty; seeded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0      # > 1 discourages tokens already in the context (CTRL, Keskar 2019)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")


def penalize(logits: np.ndarray, seen: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or not len(seen):
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(seen))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filtered_probs(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """Probabilities after temperature, top-k and top-p (nucleus: the smallest set reaching top_p)."""
    z = logits.astype(np.float64) / s.temperature
    if s.top_k and s.top_k < len(z):
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, s.top_p) + 1)]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def sample(logits: np.ndarray, s: Sampling, seen: Sequence[int], rng: np.random.Generator) -> int:
    logits = penalize(logits, seen, s.repetition_penalty)
    if s.temperature == 0:
        return int(np.argmax(logits))
    return int(rng.choice(len(logits), p=filtered_probs(logits, s)))


def generate(forward: Callable[[list[int]], np.ndarray], prompt: list[int], max_new_tokens: int, s: Sampling,
             eos_ids: Sequence[int] = ()) -> Iterator[int]:
    """Prefill the prompt, then yield one sampled token at a time until EOS or max_new_tokens."""
    rng = np.random.default_rng(s.seed)
    seen = list(prompt)
    logits = forward(prompt)[-1]
    for _ in range(max_new_tokens):
        tok = sample(logits, s, seen, rng)
        if tok in eos_ids:
            return
        yield tok
        seen.append(tok)
        logits = forward([tok])[-1]
