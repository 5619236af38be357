"""The Llama-family forward pass on a CUDA GPU: refengine/model.py's steps, each a kernel of gpuengine/kernels.

Weights stay packed in the plan's formats on the device (gpuengine/layout.py); decode runs the fused
dequantize + matvec kernels, prefill dequantizes tiles to fp16 for cuBLAS. The residual stream is fp32.
All run state is allocated once, from the planner's byte functions (planner.memory, gemm_staging=True).
Shape legend as refengine/ops.py: T tokens, H hidden, Hq / Hkv heads, D head dim, F MLP width, V vocab.
"""
from __future__ import annotations

import ctypes
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from gpuengine import device, launch as K
from gpuengine.layout import LayerImage, build_image, image_bytes, row_block, views
from gpuengine.schedule import COPY, Op, StreamSchedule
from hwdb import ModelSpec
from planner import memory as mem
from planner.formats import kv_format
from planner.roofline import VRAMWISE_CUDA, moe_prefill_grouped
from planner.spec import is_expert
from refengine.arch import Arch
from refengine.model import check_supported, fill_rope_factors
from refengine.ops import unfuse
from refengine.stream import layer_of

USE_GRAPHS = True          # capture decode steps as CUDA graphs (tests on the CPU stand-in turn this off)
# streamed layers' copies on their own stream (gpuengine.schedule): the planner's model of this engine says
# whether (planner.roofline.VRAMWISE_CUDA.overlap_streaming), so plans price what runs; on since an H200 ran
# the 7B shape streamed at 1.00x the link bound overlapped, 1.06x serial (run 10)
OVERLAP = VRAMWISE_CUDA.overlap_streaming
# How prefill runs routed experts: "auto" (grouped or as slots, whichever the planner's model of this engine
# prices faster on this device), "grouped" or "slots" (tests and benchmarks)
MOE_PREFILL = "auto"
_DTYPES = {"f32": np.float32, "f16": np.uint16, "i32": np.int32, "u8": np.uint8}   # fp16 as raw bits


class RunState:
    """Every device buffer of a run, allocated once: exactly planner.memory's buffers for the GPU engine."""

    def __init__(self, spec: ModelSpec, ctx: int, chunk: int, kv_name: str):
        import cupy as cp

        self.kv = kv_format(kv_name)
        self.buffers = mem.run_state_buffers(spec, ctx, chunk, logits=True, gemm_staging=True)
        self.buffers += mem.kv_cache_buffers(spec, ctx, self.kv, range(spec.num_layers), chunk)
        self.arrays = {b.name: cp.empty(b.shape, dtype=_DTYPES[b.dtype]) for b in self.buffers}
        self.arrays["attn_tickets"].fill(0)         # launch.attention_step counts on zero tickets

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())

    def __getitem__(self, name: str) -> Any:
        return self.arrays[name]


class DeviceWeights:
    """Resident layers in their own device buffers; the others in pinned host memory, each copied into one
    of two device slots when it runs (the planner's two stream buffers); head and final norm resident; the
    embedding table stays on the host (the planner prices it there) and only the step's rows travel.

    A streamed layer's routed experts are not copied: they stay in mapped pinned memory, and the expert kernels
    read the chosen ones in place over the host link (CUDA's unified addressing), so a token moves its k experts'
    bytes of the layer's E, and the slots hold the rest of the layer (planner.memory.layer_stream_bytes). The
    first host_experts resident layers keep their experts there too (a plan's placement.host_experts)."""

    def __init__(self, weights: Mapping[str, Any], spec: ModelSpec, resident: Iterable[int], host_experts: int = 0):
        import cupy as cp
        import cupyx

        self.dims = (spec.q_dim, spec.kv_dim) if spec.fused_qkv or spec.fused_gate_up else None
        resident = set(resident)
        names = list(weights)
        self.views: dict[int, dict] = {}
        self.images: dict[int, LayerImage] = {}
        # routed experts read in place in host memory: streamed layers', and the first host_experts layers'
        self.in_place: dict[int, dict] = {}
        self.resident_bytes = 0
        for i in range(spec.num_layers):
            layer = [n for n in names if layer_of(n) == i]
            tensors = {n: weights[n] for n in layer}
            experts = {n: t for n, t in tensors.items() if is_expert(n) and (i not in resident or i < host_experts)}
            core = {n: t for n, t in tensors.items() if n not in experts}
            if experts:
                host, dev = mapped(image_bytes(experts))
                self.in_place[i] = views(dev, build_image(experts, host))
            if i in resident:
                self.views[i] = {**self._unfused(self._upload(build_image(core))), **self.in_place.get(i, {})}
            else:
                self.images[i] = build_image(core, cupyx.empty_pinned((image_bytes(core),), np.uint8))
            _release(weights, layer)
        slot = max((img.nbytes for img in self.images.values()), default=0)
        self.slots = [cp.empty(slot, cp.uint8) for _ in range(2)] if self.images else []
        self.slot_bytes = 2 * slot if self.images else 0
        self.globals = self._upload(build_image({"head": weights["head"], "norm.final": weights["norm.final"]}))
        self.embed = np.asarray(weights["embed"])                                # (V, H) fp16, host

    def _upload(self, image: LayerImage) -> dict:
        import cupy as cp

        buf = cp.empty(image.nbytes, cp.uint8)
        buf.set(image.data)
        self.resident_bytes += image.nbytes
        return views(buf, image)

    def copy(self, i: int, slot: int, stream: Any) -> None:
        """Streamed layer i's image into device slot `slot`, in `stream`'s order."""
        image = self.images[i]
        h2d(self.slots[slot][:image.nbytes], image.data, stream)

    def view(self, i: int, slot: int) -> dict:
        """Layer i's tensors on the device: its own buffer, or the slot a streamed layer was copied into."""
        if i in self.views:
            return self.views[i]
        return {**self._unfused(views(self.slots[slot], self.images[i])), **self.in_place.get(i, {})}

    def _unfused(self, layer: dict) -> dict:
        """Phi-3: the fused linears' row blocks of device memory under the separate linears' names."""
        return layer if self.dims is None else unfuse(layer, *self.dims, rows=row_block)

    def nbytes(self) -> int:
        """Device bytes of weights: resident images plus the two stream slots."""
        return self.resident_bytes + self.slot_bytes

    @property
    def peak_bytes(self) -> int:
        return self.nbytes()

    def materialize(self) -> None:
        """Everything is on the device (or pinned) from the start."""


def h2d(dst: Any, src: np.ndarray, stream: Any) -> None:
    """Copy pinned host memory into a device array in stream order, by cudaMemcpyAsync: from pinned memory
    the copy is a legal node of a captured graph (CuPy's ndarray.set refuses host copies while capturing)."""
    import cupy as cp

    if dst.nbytes != src.nbytes:
        raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
    cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes, cp.cuda.runtime.memcpyHostToDevice,
                                stream.ptr)


def mapped(nbytes: int) -> tuple[np.ndarray, Any]:
    """nbytes of pinned host memory mapped into the device's address space: (the host's view, a CuPy uint8
    array over the same bytes, which kernels read in place over the host link)."""
    import cupy as cp

    mem = cp.cuda.PinnedMemory(nbytes, _HOST_ALLOC_PORTABLE | _HOST_ALLOC_MAPPED)
    host = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(mem.ptr), np.uint8)
    # under unified addressing (every 64-bit CUDA platform) the host address is the device address too
    dev = cp.ndarray((nbytes,), cp.uint8, cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(mem.ptr, nbytes, mem), 0))
    return host, dev


_HOST_ALLOC_PORTABLE, _HOST_ALLOC_MAPPED = 1, 2          # cudaHostAlloc's flags (cuda_runtime_api.h)


def _release(weights: Mapping[str, Any], names: list[str]) -> None:
    release = getattr(weights, "release", None)
    if release is not None:
        release(names)


class GPUTransformer:
    """forward(tokens) appends tokens at the current position and returns their logits (T, V) on the host;
    forward_device returns the last token's logits (V,) as a device array, for sampling there.

    Each step's inputs (positions, embedding rows) are staged in pinned host memory and copied in stream
    order, and every kernel reads the position from the device, so a decode step is position-independent
    work: with graphs=True it is captured once as a CUDA graph and replayed for every later token (one
    launch instead of hundreds; Python's per-launch cost is what bounds small-batch decode).

    Streamed layers are copied as gpuengine.schedule says: serially on the compute stream, or with
    overlap=True on a copy stream, the next streamed layer while the current one computes."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, Any], ctx: int, kv_name: str = "fp16",
                 chunk: int = mem.DEFAULT_CHUNK, rope_interleaved: bool = True,
                 resident: Optional[Iterable[int]] = None, graphs: Optional[bool] = None,
                 overlap: Optional[bool] = None, rope_factors: Optional[np.ndarray] = None, host_experts: int = 0):
        import cupy as cp
        import cupyx

        check_supported(spec)
        self.arch = Arch(spec)
        self.spec, self.ctx = spec, ctx
        self.chunk = min(chunk, ctx)
        self.rope_interleaved = rope_interleaved
        self.state = RunState(spec, ctx, self.chunk, kv_name)
        self.rope_factors = fill_rope_factors(self.state.arrays, spec, rope_factors)   # device buffer, or None
        self.weights = DeviceWeights(weights, spec, range(spec.num_layers) if resident is None else resident,
                                     host_experts)
        self.pos = 0
        self.stream = cp.cuda.Stream(non_blocking=True)            # all of this model's work, in order
        self.schedule = StreamSchedule(spec.num_layers, self.weights.images, OVERLAP if overlap is None else overlap)
        self.expert_values: dict[int, float] = {}                # a layer's one expert's weights
        self.experts = self._expert_tables() if spec.is_moe else {}
        if self.schedule.overlap:
            self.copy_stream = cp.cuda.Stream(non_blocking=True)
            self.events = {name: cp.cuda.Event(disable_timing=True)
                           for name in ("start", "loaded/0", "loaded/1", "freed/0", "freed/1")}
        self._pinned_x = cupyx.empty_pinned((self.chunk, spec.hidden_size), np.float32)
        self._pinned_pos = cupyx.empty_pinned((self.chunk,), np.int32)
        slots = self.chunk * spec.experts_per_token               # grouped prefill's slots ordered by expert
        self._pinned_rows = cupyx.empty_pinned((slots,), np.int32)
        self._pinned_row_weights = cupyx.empty_pinned((slots,), np.float32)
        self.graphs = USE_GRAPHS if graphs is None else graphs
        self._graph: Any = None
        self._eager_decodes = 0

    def reset(self) -> None:
        self.pos = 0

    def forward(self, tokens: list[int]) -> np.ndarray:
        out = []
        for i in range(0, len(tokens), self.chunk):
            logits = self._step(np.asarray(tokens[i:i + self.chunk], dtype=np.int32))
            self.stream.synchronize()
            out.append(logits.get())
        return np.concatenate(out) if len(out) > 1 else out[0]

    def forward_device(self, tokens: list[int]) -> Any:
        for i in range(0, len(tokens), self.chunk):
            logits = self._step(np.asarray(tokens[i:i + self.chunk], dtype=np.int32))
        return logits[-1]

    def _step(self, tokens: np.ndarray) -> Any:
        """Stage the step's inputs, then run it: a single token by graph replay once one is captured."""
        t = len(tokens)
        if self.pos + t > self.ctx:
            raise ValueError(f"{self.pos + t} tokens exceed the planned context of {self.ctx}")
        self.stream.synchronize()                  # the previous step's copies have read the pinned inputs
        self._pinned_pos[:t] = np.arange(self.pos, self.pos + t, dtype=np.int32)
        self._pinned_x[:t] = self.arch.embed(self.weights.embed[tokens].astype(np.float32))   # (T, H), host
        with self.stream:
            if t == 1 and self.graphs and self._graph is None and self._eager_decodes >= 1:
                self.stream.begin_capture()        # the first decode ran eagerly: every kernel is compiled
                try:
                    self._run(1)
                finally:                           # never leave the stream capturing
                    graph = self.stream.end_capture()
                self._graph = graph
            if t == 1 and self._graph is not None:
                self._graph.launch(self.stream)
            else:
                self._run(t)
                self._eager_decodes += t == 1
        self.pos += t
        return self.state["logits"][:t]

    def _run(self, t: int) -> Any:
        """The step's device work, in stream order: input copies, then every layer, the final norm and head."""
        spec, st = self.spec, self.state
        h2d(st["positions"][:t], self._pinned_pos[:t], self.stream)
        x, xn = st["x"][:t], st["xn"][:t]                                          # (T, H)
        h2d(x, self._pinned_x[:t], self.stream)
        sched = self.schedule
        self._issue(sched.start())
        for i in range(spec.num_layers):
            self._issue(sched.before(i))
            w = self.weights.view(i, sched.slot.get(i, -1))
            self._attention(i, w, x, xn, t)
            if spec.is_moe_layer(i):
                self._experts(i, w, x, xn, t)
            else:
                self._mlp(i, w, x, xn, t)
            self._issue(sched.after(i))
        g = self.weights.globals
        head, logits = g["head"], st["logits"][:t]                                 # (T, V)
        if t == 1 and K.fusable(head) and K.folds_norm(head):
            K.matvec_fused(x[0], [(logits[0], head, None, False)], norm=(g["norm.final"], spec.norm_eps))
        else:
            K.rmsnorm(x, g["norm.final"], xn, spec.norm_eps)
            self._linear(xn, head, logits)
        if spec.final_softcap:
            K.softcap(logits, spec.final_softcap)

    def _mlp(self, i: int, w: dict, x: Any, xn: Any, t: int) -> None:
        """rmsnorm, act(gate) * up, down (into x)."""
        spec, st = self.spec, self.state
        p, norm = f"layers.{i}.mlp", (w[f"layers.{i}.norm.1"], spec.norm_eps)
        gate, up = st["ffn_gate"][:t], st["ffn_up"][:t]                            # (T, F)
        wg, wu, act = w[f"{p}.gate"], w[f"{p}.up"], spec.activation
        if t == 1 and K.fusable(wg, wu) and wg.shape == wu.shape:
            if K.folds_norm(wg, wu):
                K.matvec_glu(x[0], wg, wu, gate[0], norm=norm, act=act)            # act(gate) * up of rmsnorm(x)
            else:
                K.rmsnorm(x, norm[0], xn, norm[1])
                K.matvec_glu(xn[0], wg, wu, gate[0], act=act)                      # act(gate) * up
        else:
            K.rmsnorm(x, norm[0], xn, norm[1])
            self._linear(xn, wg, gate)
            self._linear(xn, wu, up)
            K.glu(gate, up, act)
        self._residual(gate, w[f"{p}.down"], x, xn, w.get(f"layers.{i}.norm.3"))

    def _experts(self, i: int, w: dict, x: Any, xn: Any, t: int) -> None:
        """The routed experts in place of the MLP (refengine.arch): rmsnorm, the router, each token's k experts
        and their weights (moe_route), then gate, up and down over slots of whole tokens, each one launch for
        all the slots of the tokens it takes, and their weighted sum into x (moe_combine). Every launch reads
        the experts chosen from the device, so a decode step stays one captured graph."""
        spec, st, k = self.spec, self.state, self.spec.experts_per_token
        K.rmsnorm(x, w[f"layers.{i}.norm.1"], xn, spec.norm_eps)
        logits = st["router_logits"][:t]                                           # (T, E)
        router = w[f"layers.{i}.moe.router"]
        if router.meta is None:                                 # stored fp16 (planner.memory.ROUTER_DTYPE)
            K.hmatmul(xn, router, logits)
        else:
            self._linear(xn, router, logits)
        if self._grouped(i, t):
            self._experts_grouped(i, w, x, xn, t)
            return
        table, per = self.experts[i], st["moe_in"].shape[0] // k                    # tokens a launch takes
        for a in range(0, t, per):
            n = min(per, t - a)
            s = n * k
            sel, weight, xp = st["moe_sel"][:s], st["moe_weights"][:s], st["moe_in"][:s]
            gate, up, out = st["moe_gate"][:s], st["moe_up"][:s], st["moe_out"][:s]      # (S, F), (S, F), (S, H)
            K.moe_route(logits[a:a + n], k, sel, weight)
            if K.experts_fusable(table["gate"], table["up"]):               # act(gate) * up in one launch
                K.matvec_experts(xn[a:a + n], k, table["gate"], sel, xp, gate, table["up"], spec.activation)
            else:
                K.matvec_experts(xn[a:a + n], k, table["gate"], sel, xp, gate)
                K.matvec_experts(xn[a:a + n], k, table["up"], sel, xp, up)
                K.glu(gate, up, spec.activation)
            K.matvec_experts(gate, 1, table["down"], sel, xp, out)
            K.moe_combine(x[a:a + n], out, weight, k)

    def _grouped(self, i: int, t: int) -> bool:
        """Whether layer i's experts run grouped over these t tokens (MOE_PREFILL; "auto": always where they are read
        in host memory, else as the planner's model of this engine prices faster on this device,
        planner.roofline.moe_prefill_grouped)."""
        if t == 1 or MOE_PREFILL == "slots":
            return False
        return MOE_PREFILL == "grouped" or i in self.weights.in_place or moe_prefill_grouped(
            VRAMWISE_CUDA, t, self.spec.experts_per_token, self.spec.num_experts, self.expert_values[i],
            device.sm_count())

    def _experts_grouped(self, i: int, w: dict, x: Any, xn: Any, t: int) -> None:
        """Prefill's routed experts grouped: the host reads the chunk's picks (one sync a layer) and orders its
        slots by expert; each expert some token took then runs once over its tokens' rows, gate / up / down as
        fp16 GEMMs (as _linear's), its output added into those tokens' residuals weighted."""
        spec, st, k = self.spec, self.state, self.spec.experts_per_token
        n, h, f = t * k, spec.hidden_size, spec.intermediate_size
        sel, weight = st["moe_sel"][:n], st["moe_weights"][:n]
        K.moe_route(st["router_logits"][:t], k, sel, weight)
        picked, weights = sel.get(), weight.get()                 # a blocking copy: the stream's work is done
        order = np.argsort(picked, kind="stable")
        self._pinned_rows[:n] = order // k                        # slot t k + j is token t's
        self._pinned_row_weights[:n] = weights[order]
        rows, row_weights = st["moe_rows"][:n], st["moe_row_weights"][:n]
        h2d(rows, self._pinned_rows[:n], self.stream)
        h2d(row_weights, self._pinned_row_weights[:n], self.stream)
        staging = st["gemm_in"].reshape(-1)
        a = 0
        for e, m in enumerate(np.bincount(picked, minlength=spec.num_experts)):
            if not m:
                continue
            p, r, rw = f"layers.{i}.moe.{e}", rows[a:a + m], row_weights[a:a + m]
            a += m
            gate, up, out = st["moe_gate"][:m], st["moe_up"][:m], st["moe_out"][:m]
            x16 = staging[:m * h].reshape(m, h)
            K.gather_rows_half(xn, r, x16)
            self._gemm(x16, w[f"{p}.gate"], gate)
            self._gemm(x16, w[f"{p}.up"], up)
            K.glu(gate, up, spec.activation)
            g16 = staging[:m * f].reshape(m, f)
            K.to_half(gate, g16)
            self._gemm(g16, w[f"{p}.down"], out)
            K.scatter_add(x, out, r, rw)

    def _expert_tables(self) -> dict[int, dict[str, K.ExpertTable]]:
        """Per MoE layer, its experts' gate, up and down tables (launch.expert_table), in the run state's
        moe_tables: a resident layer's point into its own buffer, a streamed layer's into its slot."""
        spec, tables = self.spec, self.state["moe_tables"]
        out = {}
        for i in range(spec.num_layers):
            if spec.is_moe_layer(i):
                w = self.weights.view(i, self.schedule.slot.get(i, -1))
                lins = {name: [w[f"layers.{i}.moe.{e}.{name}"] for e in range(spec.num_experts)]
                        for name in ("gate", "up", "down")}
                out[i] = {name: K.expert_table(lins[name], tables[i, c]) for c, name in enumerate(lins)}
                self.expert_values[i] = float(sum(np.prod(group[0].shape) for group in lins.values()))
        return out

    def _residual(self, a: Any, lin: Any, x: Any, scratch: Any, post_norm: Any) -> None:
        """x += a W^T, a sublayer's output joining the residual; where the model norms it first (Gemma 2 / 3:
        norm.2 after attention, norm.3 after the MLP; None elsewhere), through scratch (T, H)."""
        if post_norm is None:
            self._linear(a, lin, x, accumulate=True)
            return
        self._linear(a, lin, scratch)
        K.rmsnorm(scratch, post_norm, x, self.spec.norm_eps, add=True)

    def _issue(self, ops: list[Op]) -> None:
        """Streaming's copies and the events ordering them (gpuengine.schedule), in issue order."""
        for op in ops:
            stream = self.copy_stream if op.stream == COPY else self.stream
            if op.kind == "copy":
                self.weights.copy(op.layer, op.slot, stream)
            elif op.kind == "record":
                self.events[op.event].record(stream)
            else:
                stream.wait_event(self.events[op.event])

    def _attention(self, i: int, w: dict, x: Any, xn: Any, t: int) -> None:
        """rmsnorm, q / k / v, RoPE and the cache store, attention, o (into x)."""
        spec, st, p = self.spec, self.state, f"layers.{i}.attn"
        d, hq, hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        norm = (w[f"layers.{i}.norm.0"], spec.norm_eps)
        q, k, v = st["q"][:t], st["k"][:t], st["v"][:t]                           # (T, Hq*D), (T, Hkv*D)
        jobs = [(out, w[f"{p}.{name}"], w.get(f"{p}.{name}.bias")) for name, out in (("q", q), ("k", k), ("v", v))]
        if t == 1 and K.fusable(*(lin for _, lin, _ in jobs)):
            fused = [(out[0], lin, bias, False) for out, lin, bias in jobs]
            if K.folds_norm(*(lin for _, lin, _, _ in fused)):
                K.matvec_fused(x[0], fused, norm=norm)                             # rmsnorm and q, k, v: one launch
            else:
                K.rmsnorm(x, norm[0], xn, norm[1])
                K.matvec_fused(xn[0], fused)                                       # one launch
        else:
            K.rmsnorm(x, norm[0], xn, norm[1])
            for out, lin, bias in jobs:
                self._linear(xn, lin, out, bias=bias)
        if spec.qk_norm:                     # Qwen3: an RMSNorm over each query and key head, in place, before RoPE
            for buf, heads, name in ((q, hq, "q"), (k, hkv, "k")):
                rows = buf.reshape(t * heads, d)
                K.rmsnorm(rows, w[f"{p}.{name}_norm"], rows, spec.norm_eps)
        pos = st["positions"][:t]
        q3, k3, v3 = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
        kc, vc = st[f"kv.{i}.k"], st[f"kv.{i}.v"]
        out = st["attn_out"][:t]                                                   # (T, Hq*D)
        theta, factors = ((spec.sliding_rope_theta, None) if self.arch.rope_kind(i) == "local"   # Gemma 3's local
                          else (spec.rope_theta, self.rope_factors))
        window, cap = self.arch.window(i), spec.attn_softcap
        if t == 1 and K.attends_in_one_step(hq, hkv, d):                           # RoPE, store, attention
            K.attention_step(st.kv.name, q3, k3, v3, kc, vc, pos, out.reshape(t, hq, d), st["attn_partials"],
                             st["attn_tickets"], theta, self.rope_interleaved, factors, window, cap)
        else:
            K.rope_store(st.kv.name, q3, k3, v3, kc, vc, pos, theta, self.rope_interleaved, factors)
            K.attention(st.kv.name, q3, kc, vc, pos, out.reshape(t, hq, d), st["attn_partials"], window, cap)
        self._residual(out, w[f"{p}.o"], x, xn, w.get(f"layers.{i}.norm.2"))

    def _linear(self, x: Any, lin: Any, out: Any, accumulate: bool = False, bias: Any = None) -> None:
        """out (T, N) (+)= x (T, K) W^T (+ bias): the fused matvec for one token, else fp16 tiles + cuBLAS."""
        st, t = self.state, x.shape[0]
        if t == 1:
            K.matvec(x[0], out[0], lin, st["matvec_in"], bias, accumulate)
            return
        k = lin.shape[1]
        a16 = st["gemm_in"].reshape(-1)[:t * k].reshape(t, k)
        K.to_half(x, a16)
        self._gemm(a16, lin, out, accumulate)
        if bias is not None:
            K.add_bias(out, bias)

    def _gemm(self, a16: Any, lin: Any, out: Any, accumulate: bool = False) -> None:
        """out (T, N) (+)= a16 (T, K) W^T, a16 fp16: cuBLAS on an fp16 matrix, or on fp16 tiles of a packed one."""
        n, k = lin.shape
        if lin.meta is None:
            K.gemm(a16, lin.half, out, 0, accumulate)
        else:
            tile = self.state["dequant_tile"]
            rows = tile.size // k
            for r0 in range(0, n, rows):
                nr = min(rows, n - r0)
                w16 = tile[:nr * k].reshape(nr, k)
                K.dequantize(lin, r0, w16)
                K.gemm(a16, w16, out, r0, accumulate)
