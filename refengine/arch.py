"""One decoder layer, as every NumPy path runs it: the reference engine (refengine/model.py), the float64 oracle
(refengine/oracle.py) and the calibration walk (refengine/calibrate.py). Each brings its own linears and its own
attention over its own cache; the architecture between them is written once, here.

A Llama layer is x += attn(rmsnorm(x)); x += mlp(rmsnorm(x)). The departures the engines run:
- q / k / v biases (Qwen2); fused q/k/v and gate/up linears (Phi-3, split by output rows);
- an RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3);
- Gemma: GeGLU instead of SwiGLU, embeddings times sqrt(hidden), and with four norms a layer (Gemma 2 / 3) each
  sublayer's output normed before it joins the residual (norm.2 after attention, norm.3 after the MLP);
- sliding-window layers (Mistral 7B v0.1, Gemma 2 / 3) and Gemma 3's own RoPE base for them (unscaled);
- Gemma 2's soft caps on attention scores and on the logits;
- routed experts in place of the MLP (Mixtral, Qwen3-MoE): a softmax over the router's logits, each token's top-k
  experts weighted by their probabilities renormalized over the k, as llama.cpp's build_moe_ffn (norm_w).
Gemma's (1 + w) norms and its query_pre_attn_scalar need nothing here: the loaders fold both into the weights
(refengine/weights.py), as llama.cpp's converter does the first.
Shape legend as in refengine/ops.py; N rows (tokens, of one or more sequences).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from hwdb import ModelSpec
from planner.spec import GEMMA_FAMILIES
from refengine import ops

Linear = Callable[[np.ndarray, str], np.ndarray]                 # (x (N, K), canonical name) -> x W^T (N, out)
Attend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]   # (layer, q, k, v) rotated -> (N, Hq, D)
Tables = Mapping[str, tuple[np.ndarray, np.ndarray]]           # "global" / "local" -> RoPE cos, sin (N, D/2)


@dataclass(frozen=True)
class Arch:
    spec: ModelSpec

    @property
    def embed_scale(self) -> float:
        """What embeddings are multiplied by as they enter (Gemma: sqrt(hidden), as llama.cpp computes it)."""
        return math.sqrt(self.spec.hidden_size) if self.spec.family in GEMMA_FAMILIES else 1.0

    def window(self, i: int) -> int:
        """Layer i's sliding window in tokens, 0 where it attends over the whole context."""
        return self.spec.sliding_window if self.spec.is_sliding(i) else 0

    def rope_kind(self, i: int) -> str:
        """Which RoPE table layer i rotates by: "local" (Gemma 3's sliding layers' own base, unscaled) or "global"."""
        return "local" if self.spec.sliding_rope_theta and self.spec.is_sliding(i) else "global"

    def rope_tables(self, positions: np.ndarray, dtype: type, factors: np.ndarray | None,
                    mscale: float = 1.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """cos, sin for the given positions, by rope_kind: the global layers' (scaled where factors are given)
        and, where the model has them, the local layers'."""
        spec = self.spec
        out = {"global": ops.rope_tables(positions, spec.head_dim, spec.rope_theta, dtype, factors, mscale)}
        if spec.sliding_rope_theta:
            out["local"] = ops.rope_tables(positions, spec.head_dim, spec.sliding_rope_theta, dtype)
        return out

    def embed(self, rows: np.ndarray) -> np.ndarray:
        """Embedding rows (N, H) as the first layer reads them, in their own float dtype."""
        scale = self.embed_scale
        return rows if scale == 1.0 else rows * rows.dtype.type(scale)

    def logits(self, x: np.ndarray, w: Mapping[str, Any], lin: Linear, head: str) -> np.ndarray:
        """The final norm, the head (its canonical name: "head", or "embed" where tied) and Gemma 2's cap."""
        spec = self.spec
        return ops.softcap(lin(ops.rmsnorm(x, w["norm.final"], spec.norm_eps), head), spec.final_softcap)


def decoder_layer(arch: Arch, w: Mapping[str, Any], i: int, x: np.ndarray, lin: Linear, attend: Attend,
                  tables: Tables, interleaved: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Layer i on hidden states x (N, H): the new hidden states and the inputs of its linears, by
    refengine.calibrate.INPUT_GROUPS name. attend(i, q, k, v) gets this layer's rotated queries (N, Hq, D) and keys
    (N, Hkv, D) and its values (N, Hkv, D), and returns the attention output (N, Hq, D)."""
    spec, p = arch.spec, f"layers.{i}."
    n, eps = len(x), spec.norm_eps
    xn = ops.rmsnorm(x, w[p + "norm.0"], eps)
    if spec.fused_qkv:                 # Phi-3: one linear, its outputs q, k, v in that order
        qkv = lin(xn, p + "attn.qkv") + (w[p + "attn.qkv.bias"] if spec.qkv_bias else 0)
        q, k, v = np.split(qkv, [spec.q_dim, spec.q_dim + spec.kv_dim], axis=1)
    else:
        q, k, v = (lin(xn, f"{p}attn.{m}") + (w[f"{p}attn.{m}.bias"] if spec.qkv_bias else 0) for m in "qkv")
    qn, kn = (w[f"{p}attn.{m}_norm"] if spec.qk_norm else None for m in "qk")
    cos, sin = tables[arch.rope_kind(i)]
    q = ops.rope(ops.heads(q, spec.num_heads, spec.head_dim, qn, eps), cos, sin, interleaved)       # (N, Hq, D)
    k = ops.rope(ops.heads(k, spec.num_kv_heads, spec.head_dim, kn, eps), cos, sin, interleaved)    # (N, Hkv, D)
    attn = attend(i, q, k, v.reshape(n, spec.num_kv_heads, spec.head_dim)).reshape(n, -1)          # (N, Hq*D)
    out = lin(attn, p + "attn.o")
    if spec.norms_per_layer == 4:      # Gemma 2 / 3: the sublayer's output normed before the residual
        out = ops.rmsnorm(out, w[p + "norm.2"], eps)
    x = x + out
    xn2 = ops.rmsnorm(x, w[p + "norm.1"], eps)
    inputs = {"attn_in": xn, "attn_out": attn}
    if spec.is_moe_layer(i):
        out = _experts(arch, w, i, xn2, lin, inputs)
    else:
        inputs["mlp_in"] = xn2
        out, inputs["mlp_hidden"] = _gated_mlp(arch, xn2, lin, p + "mlp")
    if spec.norms_per_layer == 4:
        out = ops.rmsnorm(out, w[p + "norm.3"], eps)
    return x + out, inputs


def _gated_mlp(arch: Arch, x: np.ndarray, lin: Linear, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """down(act(gate x) * up x) and the hidden act(gate x) * up x (N, F) down reads."""
    if arch.spec.fused_gate_up:        # Phi-3: one linear, gate's outputs then up's
        gate, up = np.split(lin(x, prefix + ".gate_up"), 2, axis=1)
    else:
        gate, up = lin(x, prefix + ".gate"), lin(x, prefix + ".up")
    hidden = ops.ACTIVATIONS[arch.spec.activation](gate) * up
    return lin(hidden, prefix + ".down"), hidden


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k experts (N, k), most probable first, and their weights (N, k): the softmax over all the
    router's logits (N, E), renormalized over the k chosen."""
    probs = ops.softmax(logits)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, top, axis=1)
    return top, weights / weights.sum(axis=1, keepdims=True)


def _experts(arch: Arch, w: Mapping[str, Any], i: int, x: np.ndarray, lin: Linear,
             inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The routed experts' weighted sum (N, H) over x (N, H); each expert runs on the rows routed to it, whose
    inputs it records (moe.{e}.in, moe.{e}.hidden: what its linears read, for calibration)."""
    spec, p = arch.spec, f"layers.{i}.moe"
    top, weights = route(lin(x, p + ".router"), spec.experts_per_token)
    out = np.zeros_like(x)
    for e in range(spec.num_experts):
        rows, slot = np.nonzero(top == e)
        inputs[f"moe.{e}.in"] = x[rows]
        if not len(rows):
            inputs[f"moe.{e}.hidden"] = np.zeros((0, spec.intermediate_size), x.dtype)
            continue
        y, inputs[f"moe.{e}.hidden"] = _gated_mlp(arch, x[rows], lin, f"{p}.{e}")
        out[rows] += weights[rows, slot, None].astype(x.dtype) * y
    return out
