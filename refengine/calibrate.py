"""Calibration: the inputs every linear layer sees on real text, layer by layer, as GPTQ collects them.

`LayerWalk` holds the hidden states of a batch of calibration rows (R rows of T tokens) and, for layer
i, runs that layer's reference forward pass over the whole batch, returning the input matrix of each of
its linears (q, k, v share one; gate and up share one) and moving the hidden states past the layer.
Only the current layer's weights and the (R*T, hidden) activations are in memory. The walk's state is
one float32 array, so a long job can save it after any layer and resume bit-identically.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from hwdb import ModelSpec
from refengine import ops
from refengine.arch import Arch, decoder_layer
from refengine.model import check_supported

DEFAULT_CALIB = Path(__file__).resolve().parent / "data" / "calib.txt"

# Linears of a layer that read the same input, by the name of the input.
INPUT_GROUPS = {"attn_in": ("attn.q", "attn.k", "attn.v", "attn.qkv"), "attn_out": ("attn.o",),
                "mlp_in": ("mlp.gate", "mlp.up", "mlp.gate_up"), "mlp_hidden": ("mlp.down",)}


def calibration_rows(tokenizer, text: str, rows: int, row_tokens: int, where: str = "calibration text") -> np.ndarray:
    """(rows, row_tokens) int32 token ids: consecutive windows of the tokenized text."""
    ids = tokenizer.encode(text, bos=False)
    need = rows * row_tokens
    if len(ids) < need:
        raise ValueError(f"{where}: {len(ids)} tokens, fewer than --rows {rows} x --row-tokens {row_tokens} = "
                         f"{need}; give a longer text or fewer rows")
    return np.asarray(ids[:need], dtype=np.int32).reshape(rows, row_tokens)


@dataclass
class LayerInputs:
    """What layer i's linears read: input name -> (R*T, K) float32 matrix."""

    layer: int
    inputs: dict[str, np.ndarray]
    _grams: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def group(self, linear: str) -> str:
        """The input a linear reads, by its canonical name (layers.{i}.attn.q) or suffix (attn.q); an expert's
        linears (moe.{e}.gate / up / down) read the rows routed to it (refengine.arch)."""
        suffix = linear.split(".", 2)[2] if linear.startswith("layers.") else linear
        for name, members in INPUT_GROUPS.items():
            if suffix in members:
                return name
        parts = suffix.split(".")
        if len(parts) == 3 and parts[0] == "moe" and parts[1].isdigit() and parts[2] in ("gate", "up", "down"):
            return f"moe.{parts[1]}." + ("hidden" if parts[2] == "down" else "in")
        raise KeyError(linear)

    def of(self, linear: str) -> np.ndarray:
        return self.inputs[self.group(linear)]

    def gram(self, linear: str) -> np.ndarray:
        """X^T X (float64) of a linear's input, computed once per input (q, k and v share theirs)."""
        name = self.group(linear)
        if name not in self._grams:
            x = self.inputs[name].astype(np.float64)
            self._grams[name] = x.T @ x
        return self._grams[name]


class LayerWalk:
    """Hidden states of the calibration batch, advanced one reference layer at a time."""

    def __init__(self, spec: ModelSpec, embed: np.ndarray, ids: np.ndarray, rope_interleaved: bool,
                 state: np.ndarray | None = None, next_layer: int = 0, rope_factors: np.ndarray | None = None):
        check_supported(spec)
        self.spec, self.ids, self.interleaved = spec, ids, rope_interleaved
        self.arch = Arch(spec)
        self.x = (self.arch.embed(np.asarray(embed, dtype=np.float32)[ids]) if state is None
                  else np.asarray(state, dtype=np.float32).reshape(*ids.shape, spec.hidden_size))
        self.next_layer = next_layer
        self.tables = self.arch.rope_tables(np.arange(ids.shape[1]), np.float32, rope_factors)   # (T, D/2) each

    def step(self, w: Mapping[str, np.ndarray], advance: bool = True) -> LayerInputs:
        """Run layer `next_layer` with float32 weights w (canonical names) and return its linears' inputs;
        advance: move the hidden states past the layer (else only look)."""
        spec, i, x = self.spec, self.next_layer, self.x
        r, t, h = x.shape
        positions = np.arange(t)
        tables = {kind: (np.tile(c, (r, 1)), np.tile(s, (r, 1))) for kind, (c, s) in self.tables.items()}

        def lin(a: np.ndarray, name: str) -> np.ndarray:
            return a @ w[name].T

        def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            out = np.empty_like(q)                                     # each calibration row its own sequence
            for row in range(r):
                sl = slice(row * t, (row + 1) * t)
                out[sl] = ops.attention(q[sl], k[sl], v[sl], positions, window=self.arch.window(layer),
                                        cap=spec.attn_softcap)
            return out

        flat, inputs = decoder_layer(self.arch, w, i, x.reshape(r * t, h), lin, attend, tables, self.interleaved)
        if advance:
            self.x = flat.reshape(r, t, h).astype(np.float32, copy=False)
            self.next_layer += 1
        return LayerInputs(i, inputs)


class WalkCheckpoint:
    """A long walk's progress in a folder: the hidden states after `done` layers and whatever the job
    keeps beside them (a table of results). Each file is written atomically and the state file is named
    by its layer, so a crash between the two writes cannot pair the record with the wrong state. `key`
    identifies the job: a folder left by another job is ignored."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key

    def load(self) -> tuple[int, Optional[np.ndarray], dict]:
        """(layers done, hidden states, extra) of a matching checkpoint, else (0, None, {})."""
        import yaml

        try:
            meta = yaml.safe_load((self.folder / "progress.yaml").read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("key") != self.key:
                return 0, None, {}
            done = int(meta["layers_done"])
            state = np.load(self.folder / f"state_{done:04d}.npy", allow_pickle=False)
            return done, state, dict(meta.get("extra") or {})
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            return 0, None, {}                           # none, or a damaged one: start over

    def save(self, done: int, state: np.ndarray, extra: Mapping[str, Any]) -> None:
        from planner import yamlout

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"state_{done:04d}.npy"
        tmp = self.folder / f".state_{done:04d}.tmp.npy"
        np.save(tmp, state, allow_pickle=False)
        os.replace(tmp, path)
        yamlout.write_atomic(self.folder / "progress.yaml",
                             yamlout.dump({"key": self.key, "layers_done": done, "extra": dict(extra)}))
        for old in self.folder.glob("state_*.npy"):
            if old != path:
                old.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def output_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray, reference: float | None = None) -> float:
    """ExLlamaV2's measure: ||X (W - W^)^T||_F / ||X W^T||_F, from the Gram matrix X^T X (float64).
    `reference` is ||X W^T||_F^2 when already known (output_energy), to skip recomputing it."""
    d = (w - w_hat).astype(np.float32)          # float32 products: plenty for an error measure
    num = float(np.einsum("nk,nk->", (d @ gram.astype(np.float32)).astype(np.float64), d))
    den = output_energy(w, gram) if reference is None else reference
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def output_energy(w: np.ndarray, gram: np.ndarray) -> float:
    """||X W^T||_F^2 = sum((W G) * W) for G = X^T X."""
    w64 = w.astype(np.float64)
    return float(np.einsum("nk,nk->", w64 @ gram, w64))


__all__ = ["DEFAULT_CALIB", "INPUT_GROUPS", "LayerInputs", "LayerWalk", "WalkCheckpoint", "calibration_rows", "output_energy", "output_error"]
