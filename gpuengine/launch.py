"""One launcher per kernel: each checks its arrays' dtypes, shapes and contiguity, then launches.

Arrays are CuPy arrays; the checks alone also run on NumPy arrays (tests/test_gpu_runtime.py). Integer
arguments go to the kernels as int32 and floats as float32 (double where the kernel says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from gpuengine import device
from gpuengine.kernels import MATVEC_INSTANCES, MATVEC_STAGED, TC_TILES, function
from gpuengine.layout import DeviceLinear
from planner.formats import KV_CODES, PACK_VALUES
from planner.memory import ATTN_MAX_SPLITS

WARPS_PER_BLOCK = 8                # fp16 matvec (hmatvec): one warp per output row
THREADS = 256                      # element-wise kernels
NORM_THREADS = 1024                # rmsnorm: one block per row
ATTN_THREADS = 128                 # attention: 4 warps (ATTN_WARPS in attention.cu)
ATTN_MAX_D = 256                   # largest head dim of the attention kernel (ATTN_MAX_D in attention.cu)
MAX_BLOCKS = 65535
_i, _f = np.int32, np.float32


class LaunchError(ValueError):
    """A launcher got arrays of the wrong dtype, shape or layout (a bug in the caller, not user input)."""


def check(name: str, a: Any, dtype: Any, shape: Optional[tuple] = None) -> None:
    if a.dtype != np.dtype(dtype):
        raise LaunchError(f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise LaunchError(f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise LaunchError(f"{name}: not C-contiguous")


def _blocks(n: int, threads: int = THREADS) -> int:
    return max(1, min(math.ceil(n / threads), MAX_BLOCKS))


def check_linear(lin: DeviceLinear) -> None:
    """A linear's arrays as the matvec kernels read them: an fp16 matrix of even width, or packed slices (at
    most 3, of the registry's widths, whole packing units a scale group) and their permutation."""
    n, k = lin.shape
    if lin.meta is None:
        check("weight", lin.half, np.uint16, (n, k))
        if k % 2:
            raise LaunchError(f"fp16 matvec needs an even input size, got {k}")
        return
    if len(lin.meta.slices) > 3:
        raise LaunchError(f"at most 3 slices per option, got {len(lin.meta.slices)}")
    for s, w, sc in zip(lin.meta.slices, lin.words, lin.scales):
        if s.bits not in (2, 3, 4, 5, 6, 8) or lin.meta.group_size % PACK_VALUES:
            raise LaunchError(f"unsupported slice: {s.bits} bits, group {lin.meta.group_size}")
        check("words", w, np.uint32, (n, s.units * s.bits))
        check("scales", sc, np.uint16, (n, s.groups))
    if lin.perm is not None:
        check("perm", lin.perm, np.int32, (k,))


def check_matvec(x: Any, y: Any, lin: DeviceLinear, xp: Any) -> None:
    n, k = lin.shape
    check("x", x, np.float32, (k,))
    check("y", y, np.float32, (n,))
    check_linear(lin)
    if lin.meta is not None and lin.meta.needs_gather and not gathers_in_kernel():
        check("gather buffer", xp, np.float32)
        if xp.size < lin.meta.gathered_len:
            raise LaunchError(f"gather buffer of {xp.size} floats for {lin.meta.gathered_len}")


@dataclass(frozen=True)
class MatvecShape:
    """A launch of the packed matvec: `rows` output rows a block, `units` packing units a thread has in
    flight, `lane` values of a unit a lane takes (8: quads, 32: a whole unit; the three name a template
    instance, kernels.MATVEC_INSTANCES lists those compiled), `warps` warps a block splitting the units.
    `staged`: a unit a lane (units 1), each thread's weights copied into shared memory by cp.async, all of a
    unit's rows in flight at once (matvec.cu's staged_rows; kernels.MATVEC_STAGED lists the rows compiled);
    it neither folds RMSNorm in nor gathers x. `idot` (staged only): 2-, 4- and 8-bit slices summed by dp4a
    against x as 23-bit integers in three byte planes (matvec.cu's x_planes). `ordered` (a unit a lane, not
    staged): the weights, scales and x loaded in program order (common.cuh's ld_ordered), so that all R rows'
    loads are in flight before the first decode; no fold, no gather, and routed experts run the plain
    qmatvec_moe."""

    rows: int
    units: int
    lane: int
    warps: int
    staged: bool = False
    idot: bool = False
    ordered: bool = False

    @property
    def kernel(self) -> str:
        return self.instance(norm=False)

    def instance(self, norm: bool, gather: bool = False) -> str:
        """The template instance: with norm, the one that folds RMSNorm in; with gather, the one that reads
        x through a mixed option's slices and permutation (both unit a lane only, not staged)."""
        if (self.staged or self.ordered) and (norm or gather):
            raise LaunchError(f"the {'staged' if self.staged else 'ordered'} matvec neither folds RMSNorm in nor "
                              "gathers x")
        if self.ordered and (self.staged or self.idot or self.lane != 32):
            raise LaunchError("ordered loads are for the plain unit-a-lane matvec (not staged, no integer dot)")
        flags = self._staged_flags if self.staged or self.idot else 16 if self.ordered else int(norm) | int(gather) << 1
        return f"qmatvec<{self.rows}, {self.units}, {self.lane}, {flags}>"

    @property
    def takes_variants(self) -> bool:
        """Whether its layout has the variants that fold RMSNorm in and gather x in the kernel: a unit a lane,
        neither staged nor ordered."""
        return self.lane == 32 and not self.staged and not self.ordered

    @property
    def _staged_flags(self) -> int:
        if self.idot and not self.staged:
            raise LaunchError("the integer dot runs in the staged matvec only")
        return 4 | (8 if self.idot else 0)

    @property
    def experts(self) -> str:
        """The instance running routed experts' slots (qmatvec_moe)."""
        flags = f", {self._staged_flags}" if self.staged or self.idot else ""
        return f"qmatvec_moe<{self.rows}, {self.units}, {self.lane}{flags}>"

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory of a launch: the staged ring (matvec.cu's StagedRing<R>::STRIDE bytes a
        thread: R 32-byte slots and R scale words, in an odd number of 16-byte lines), else none."""
        if not self.staged:
            return 0
        lines = (36 * self.rows + 15) // 16
        return 16 * (lines | 1) * 32 * self.warps

    @classmethod
    def from_json(cls, d: dict) -> "MatvecShape":
        """From a benchmark's record (runs before the lane layout existed used quads: lane 8)."""
        return cls(d["rows"], d["units"], d.get("lane", 8), d["warps"], d.get("staged", False), d.get("idot", False),
                   d.get("ordered", False))


# The shape every matvec launches with: chosen by benchmarks/gpu_kernels.py's sweep of all 24 shapes on an H200
# (run 9, 2026-11-28; benchmarks/results/gpu_kernels.json names every time): a unit a lane, 8 rows a block,
# 4 warps. Its 4-bit 4096x4096 / 11008x4096 / 4096x11008 took 8.2 / 16.8 / 15.7 us against 8.5 / 18.4 / 19.6
# for the quads (4 rows, 4 units, 2 warps) that every earlier run used.
MATVEC = MatvecShape(rows=8, units=1, lane=32, warps=4)
# Staged shapes (MatvecShape(R, 1, 32, warps, staged=True), R in kernels.MATVEC_STAGED) are in that sweep since
# 2026-11-28 and not yet timed: built without a GPU after the SASS of this default showed ptxas issuing each row's
# weight load about one row ahead of its use (GPU_NOTES.md). nvcc 13, sm_90: qmatvec<8, 1, 32, 4> 128 registers,
# 4.0 SASS instructions a 4-bit weight against this default's 3.7 (benchmarks/matvec_sass.py); with the integer
# dot (idot=True) qmatvec<16, 1, 32, 12> 2.5 against the staged float decode's 3.9. Ordered shapes
# (MatvecShape(R, U, 32, warps, ordered=True), the unit-a-lane instances) are in it too, not yet timed: the same
# loads as this default in program order, so the SASS issues all R rows' weights before the first decode
# (qmatvec<8, 1, 32, 16>: 168 registers, 3.7 instructions a 4-bit weight, as this default).


@dataclass(frozen=True)
class TcShape:
    """A launch of the tensor-core matvec tmatvec<tiles>: `tiles` tiles of 8 rows a warp, `warps` warps a
    block splitting K."""

    tiles: int
    warps: int

    @property
    def kernel(self) -> str:
        return self.instance(norm=False)

    def instance(self, norm: bool) -> str:
        """The template instance: with norm, the one that folds RMSNorm in."""
        return f"tmatvec<{self.tiles}, {int(norm)}>"


# Decode of linears of one slice (any width), scale groups of 128 values and x read as it is, on the tensor
# cores, x split into two fp16 parts (tmatvec in matvec.cu): None (off: every GPU run so far used the CUDA
# cores) or a TcShape. Needs sm_80 or later; other linears keep `MATVEC`. Folds RMSNorm in as the unit-a-lane
# layout does (FUSE_NORM). Off: on an H200 (run 9) its best shape, tmatvec<2> x 8 warps, took 10.7 / 24.5 /
# 25.0 us for the 4-bit shapes MATVEC takes 8.2 / 16.8 / 15.7 us for, and lost at 2 and 8 bits too.
MATVEC_TC: Optional[TcShape] = None
TC_MIN_CAPABILITY = 80
TC_BITS = (2, 3, 4, 5, 6, 8)       # tc_decode's widths: every width of the registry

# numpy twins of matvec.cu's QSlice / QMat (C layout: align=True), passed to the kernel by value.
QSLICE = np.dtype([("w", "u8"), ("s", "u8"), ("bits", "i4"), ("units", "i4"), ("groups", "i4"), ("xoff", "i4")],
                  align=True)
QMAT = np.dtype([("y", "u8"), ("bias", "u8"), ("sl", QSLICE, (3,)), ("n", "i4"), ("nslices", "i4"),
                 ("accumulate", "i4"), ("has_bias", "i4"), ("gshift", "i4")], align=True)
NORM_IN = np.dtype([("w", "u8"), ("eps", "f4"), ("h", "i4")], align=True)
XMAP = np.dtype([("perm", "u8", (3,)), ("start", "i4", (3, 3)), ("rows", "i4", (3, 3))], align=True)
_NO_NORM, _NO_XMAP = np.zeros(1, NORM_IN), np.zeros(1, XMAP)     # the arguments of a launch without them

# Decode folds each RMSNorm into the matvec that reads its output (NormIn in matvec.cu) where the linears are
# `fusable` and the matvec layout is a unit a lane: two launches fewer a layer. Off: on an H200 (run 9) the
# folded 7B q/k/v took 31.0 us where rmsnorm then the matvec took 21.8, and gate/up 54.6 against 35.1 (each
# block works out the norm of x again: more than the launch it saves).
FUSE_NORM = False

# Where a mixed option's input is gathered (permuted, each slice padded to whole units): "launch", by gather_x
# before each matvec (as measured), or "kernel", read in place by a unit-a-lane matvec (XMap in matvec.cu),
# which also lets mixed q / k / v and gate / up share launches. "launch": on an H200 (run 9) a 4096x4096
# 0.1:5b/0.9:4b matvec took 11.7 us after gather_x, 25.9 us gathering in the kernel (scalar x loads).
GATHER = "launch"


# Register caps on the packed matvec's variants (matvec.cu, VRAMWISE_MATVEC_REGS): the unit-a-lane instances
# that fold the norm in or gather x at 128 registers a thread, the routed experts' qmatvec_moe at 168, each only
# where it takes more uncapped (a cap is a budget ptxas fills: capping all raised qmatvec<2, 1, 32, 1> from 84
# to 128), and the staged matvec at 80, 128 and 168 (4, 8 and 16 rows: what nvcc 13.0 and NVRTC 13.5 give it,
# where NVRTC 13.0 gives 127, 167 and 255); the plain instances' machine code is byte-identical with the
# switch. Off: not yet timed.
# nvcc 13 for sm_90 without caps: qmatvec<8, 1, 32, N> 128 registers at N = 0, 174 with the fold, 168
# gathering, and qmatvec_moe<8, 1, 32> 255, so an SM holds 2 blocks of 128 threads of those, 4 of the plain
# one: run 9 measured the fold and the gather slower, and run 10 the experts' weights at 71% of the dense
# rate. Capped: 128 registers with 20 bytes of spills (fold), 60 (gather); qmatvec_moe 168, no spills.
MATVEC_REGS = False


def _compiled_matvec() -> MatvecShape:
    """MATVEC, refused where no compiled instance has its shape (kernels.MATVEC_INSTANCES, MATVEC_STAGED)."""
    if MATVEC.staged:
        compiled = MATVEC.units == 1 and MATVEC.lane == 32 and MATVEC.rows in MATVEC_STAGED
    else:                                     # (an integer dot that is not staged is refused by its instance)
        compiled = (MATVEC.rows, MATVEC.units, MATVEC.lane) in MATVEC_INSTANCES
    if not compiled:
        raise LaunchError(f"matvec {MATVEC.kernel} is not compiled")
    return MATVEC


def _shared(kernel: Any, shape: MatvecShape) -> dict:
    """The launch's keyword for the shape's dynamic shared memory ({} for none), raising the kernel's limit
    past CUDA's default 48 KiB where the shape needs it (up to the device's opt-in maximum)."""
    need = shape.shared_bytes
    if not need:
        return {}
    if need > 48 * 1024:
        most = device.max_shared_per_block()
        if need > most:
            raise LaunchError(f"matvec {shape.kernel} x {shape.warps} warps needs {need} bytes of shared memory "
                              f"a block, over this device's {most}: use fewer warps or rows")
        if kernel.max_dynamic_shared_size_bytes < need:
            kernel.max_dynamic_shared_size_bytes = need
    return {"shared_mem": need}


def _matvec_module() -> str:
    return "matvec:regs" if MATVEC_REGS else "matvec"


def gathers_in_kernel() -> bool:
    return GATHER == "kernel" and MATVEC.takes_variants


def _ptr(a: Any) -> int:
    return int(getattr(a.data, "ptr", None) or a.ctypes.data)


def _gshift(group_size: int) -> int:
    """log2 of a scale group's packing units: the kernels find a unit's group by a shift."""
    gunits = group_size // PACK_VALUES
    if gunits & (gunits - 1):
        raise LaunchError(f"group size {group_size} is not a power-of-two number of packing units")
    return gunits.bit_length() - 1


def _qmat(lin: DeviceLinear, y: Any, bias: Any = None, accumulate: bool = False) -> np.ndarray:
    """One QMat argument (a (1,) structured array, the form CuPy passes by value)."""
    m = lin.meta
    q = np.zeros(1, QMAT)
    q["y"], q["bias"] = _ptr(y) if y is not None else 0, _ptr(bias) if bias is not None else 0
    q["n"], q["nslices"], q["accumulate"], q["has_bias"] = m.n, len(m.slices), int(accumulate), int(bias is not None)
    q["gshift"] = _gshift(m.group_size)
    for j, s in enumerate(m.slices):
        q["sl"][0, j] = (_ptr(lin.words[j]), _ptr(lin.scales[j]), s.bits, s.units, s.groups, s.xoff)
    return q


def fusable(*lins: DeviceLinear) -> bool:
    """Whether packed linears can share one matvec launch: one input size, each reading x as it is or
    gathering it in the kernel."""
    metas = [lin.meta for lin in lins]
    return (all(m is not None and (gathers_in_kernel() or not m.needs_gather) for m in metas)
            and len({m.k for m in metas}) == 1)


def on_tensor_cores(*lins: DeviceLinear) -> bool:
    """Whether these linears' decode matvec runs as tmatvec: MATVEC_TC on, a card with the mma it needs, and
    the linears of one width, each in one slice with 128-value scale groups (a k-block each), x read as it
    is."""
    if MATVEC_TC is None or not lins or device.compute_capability() < TC_MIN_CAPABILITY:
        return False
    metas = [lin.meta for lin in lins]
    return (all(m is not None and not m.needs_gather and m.slices[0].bits in TC_BITS and m.group_size == 128
                and m.slices[0].units % 4 == 0 for m in metas)
            and len({m.k for m in metas}) == 1 and len({m.slices[0].bits for m in metas}) == 1)


def folds_norm(*lins: DeviceLinear) -> bool:
    """Whether a decode matvec of these (fusable) linears takes the RMSNorm before it in (launch.FUSE_NORM):
    the unit-a-lane layout and the tensor-core matvec can, the quads and the staged matvec cannot."""
    return FUSE_NORM and (MATVEC.takes_variants or on_tensor_cores(*lins))


def _tmatvec(x: Any, mats: list, n: int, glu: int = 0, norm: Optional[tuple] = None) -> None:
    shape = MATVEC_TC
    if shape.tiles not in TC_TILES or not 1 <= shape.warps <= 32:
        raise LaunchError(f"tensor-core matvec {shape.kernel} x {shape.warps} warps is not compiled")
    grid = (math.ceil(n / (8 * shape.tiles)), 1 if glu else len(mats))
    padded = mats + [mats[0]] * (3 - len(mats))
    function("matvec", shape.instance(norm is not None))(
        grid, (32 * shape.warps,), (x, _i(glu), *padded, _norm_in(norm, x, tensor_cores=True)))


def _xmap(lins: list) -> tuple[np.ndarray, bool]:
    """The kernel's XMap for matrices 0, 1, 2 = lins, and whether the launch gathers (some linear needs it
    and the kernel can)."""
    if not (gathers_in_kernel() and any(lin.meta.needs_gather for lin in lins)):
        return _NO_XMAP, False
    a = np.zeros(1, XMAP)
    for w, lin in enumerate(lins):
        a["perm"][0, w] = _ptr(lin.perm) if lin.perm is not None else 0
        for j, s in enumerate(lin.meta.slices):
            a["start"][0, w, j], a["rows"][0, w, j] = s.start, s.rows
    return a, True


def _norm_in(norm: Optional[tuple], x: Any, tensor_cores: bool = False) -> np.ndarray:
    """The kernel's NormIn: (weight (h,) float32, eps) folds RMSNorm of x in; None leaves x as it is."""
    if norm is None:
        return _NO_NORM
    w, eps = norm
    check("norm weight", w, np.float32, x.shape)
    if not MATVEC.takes_variants and not tensor_cores:
        raise LaunchError(f"RMSNorm folds into the unit-a-lane matvec only, not {MATVEC.kernel}")
    a = np.zeros(1, NORM_IN)
    a["w"], a["eps"], a["h"] = _ptr(w), eps, w.size
    return a


def _qmatvec(x: Any, mats: list, n: int, glu: int = 0, norm: Optional[tuple] = None,
             lins: Optional[list] = None) -> None:
    shape = _compiled_matvec()
    norm_in = _norm_in(norm, x)                                  # refuses a fold into the quad layout
    xmap, gather = _xmap(lins or [])
    if _ptr(x) % 16:
        raise LaunchError("matvec input not 16-byte aligned")
    grid = (math.ceil(n / shape.rows), 1 if glu else len(mats))       # blockIdx.y picks the matrix
    padded = mats + [mats[0]] * (3 - len(mats))
    kernel = function(_matvec_module(), shape.instance(norm is not None, gather))
    kernel(grid, (32 * shape.warps,), (x, _i(glu), *padded, norm_in, xmap), **_shared(kernel, shape))


def matvec(x: Any, y: Any, lin: DeviceLinear, xp: Any, bias: Any = None, accumulate: bool = False) -> None:
    """y (n,) = W x (+ bias) (+ y if accumulate) for one token; xp is the gather scratch (matvec_in)."""
    check_matvec(x, y, lin, xp)
    n, k = lin.shape
    if bias is not None:
        check("bias", bias, np.float32, (n,))
    if lin.meta is None:
        b = bias if bias is not None else y
        grid, block = (math.ceil(n / WARPS_PER_BLOCK),), (32 * WARPS_PER_BLOCK,)
        function("matvec", "hmatvec")(grid, block, (x, y, lin.half, b, _i(bias is not None), _i(accumulate), _i(n), _i(k)))
        return
    m = lin.meta
    if on_tensor_cores(lin):
        _tmatvec(x, [_qmat(lin, y, bias, accumulate)], n)
        return
    src = x
    if m.needs_gather and not gathers_in_kernel():
        sl = list(m.slices) + [m.slices[0]] * (3 - len(m.slices))
        args = [x, lin.perm if lin.perm is not None else x, _i(lin.perm is not None), xp, _i(len(m.slices))]
        for s in sl:
            args += [_i(s.start), _i(s.rows), _i(s.units * PACK_VALUES), _i(s.xoff)]
        function("matvec", "gather_x")((_blocks(m.gathered_len),), (THREADS,), tuple(args))
        src = xp
    _qmatvec(src, [_qmat(lin, y, bias, accumulate)], n, lins=[lin])


def matvec_fused(x: Any, jobs: list, norm: Optional[tuple] = None) -> None:
    """One launch for up to three packed linears sharing the input x (q, k, v): jobs are (y, lin, bias,
    accumulate); each y (n,) = W x (+ bias) (+ y). The linears must be `fusable`. norm = (w, eps): x is
    first RMS-normalized and weighed by w (ops.rmsnorm), inside the launch."""
    if not 1 <= len(jobs) <= 3 or not fusable(*(lin for _, lin, _, _ in jobs)):
        raise LaunchError(f"{len(jobs)} linears cannot share one matvec launch")
    mats = []
    for y, lin, bias, accumulate in jobs:
        check_matvec(x, y, lin, None)
        if bias is not None:
            check("bias", bias, np.float32, (lin.meta.n,))
        mats.append(_qmat(lin, y, bias, accumulate))
    n, lins = max(lin.meta.n for _, lin, _, _ in jobs), [lin for _, lin, _, _ in jobs]
    if on_tensor_cores(*lins):
        _tmatvec(x, mats, n, norm=norm)
    else:
        _qmatvec(x, mats, n, norm=norm, lins=lins)


def matvec_glu(x: Any, gate: DeviceLinear, up: DeviceLinear, y: Any, norm: Optional[tuple] = None,
               act: str = "silu") -> None:
    """y (n,) = act(gate x) * (up x) in one launch (the MLP's SwiGLU or GeGLU input to down); gate and up
    `fusable` and of one shape; norm as matvec_fused's."""
    if not fusable(gate, up) or gate.shape != up.shape:
        raise LaunchError("gate and up cannot share one matvec launch")
    check_matvec(x, y, gate, None)
    check_matvec(x, y, up, None)
    if on_tensor_cores(gate, up):
        _tmatvec(x, [_qmat(gate, y), _qmat(up, y)], gate.meta.n, glu=ACT_CODES[act], norm=norm)
    else:
        _qmatvec(x, [_qmat(gate, y), _qmat(up, y)], gate.meta.n, glu=ACT_CODES[act], norm=norm, lins=[gate, up])


# Prefill's dequantization kernel: "slice" (a flat index over the tile) or "rows" (a 2D grid, no 64-bit
# division; bit-identical output). "rows": on an H200 (run 9) a 4096x4096 4-bit tile took 57.6 us against
# 97.3 (and 205.7 against 207.5 for a mixed option).
DEQUANT = "rows"


def dequantize(lin: DeviceLinear, row0: int, tile: Any) -> None:
    """tile (rows, k) fp16 bits = rows row0 .. row0 + rows of a packed linear, in original input order."""
    m = lin.meta
    nrows = tile.shape[0]
    check("tile", tile, np.uint16, (nrows, m.k))
    if row0 < 0 or row0 + nrows > m.n:
        raise LaunchError(f"rows {row0}..{row0 + nrows} outside 0..{m.n}")
    perm = lin.perm if lin.perm is not None else lin.words[0]
    for j, s in enumerate(m.slices):
        check("words", lin.words[j], np.uint32, (m.n, s.units * s.bits))
        common = (lin.words[j], lin.scales[j], perm, _i(lin.perm is not None), tile, _i(row0), _i(nrows), _i(m.k),
                  _i(s.start), _i(s.rows), _i(s.bits), _i(s.units), _i(s.groups))
        if DEQUANT == "rows":
            grid = (math.ceil(s.rows / THREADS), min(nrows, MAX_BLOCKS))
            function("dequant", "dequant_rows")(grid, (THREADS,), (*common, _i(_gshift(m.group_size))))
        else:
            function("dequant", "dequant_slice")((_blocks(nrows * s.rows),), (THREADS,), (*common, _i(m.group_size)))


def to_half(x: Any, out: Any) -> None:
    check("x", x, np.float32)
    check("out", out, np.uint16, x.shape)
    function("dequant", "to_half")((_blocks(x.size),), (THREADS,), (x, out, np.int64(x.size)))


# cuBLAS through CuPy's binding: fp16 inputs, fp32 output and accumulation (so activations beyond fp16's range
# in the residual stream never pass through fp16 outputs). Values from cublas_api.h / library_types.h.
_OP_N, _OP_T, _R_16F, _R_32F, _COMPUTE_32F, _GEMM_DEFAULT, _POINTER_HOST = 0, 1, 2, 0, 68, -1, 0
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


def gemm(a16: Any, w16: Any, out: Any, col0: int = 0, accumulate: bool = False) -> None:
    """out[:, col0:col0 + n] (+)= a16 (t, k) @ w16 (n, k)^T; a16, w16 fp16 bits, out (t, N) float32."""
    import cupy
    from cupy_backends.cuda.libs import cublas

    t, k = a16.shape
    n = w16.shape[0]
    check("a16", a16, np.uint16)
    check("w16", w16, np.uint16, (n, k))
    check("out", out, np.float32)
    if out.shape[0] != t or col0 + n > out.shape[1]:
        raise LaunchError(f"gemm output {tuple(out.shape)} cannot take ({t}, {n}) at column {col0}")
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, _POINTER_HOST)
    # row-major out (t, N) is column-major out^T (N, t): out^T[col0:col0+n] = W (n x k) @ a^T (k x t)
    cublas.gemmEx(handle, _OP_T, _OP_N, n, t, k, _ONE.ctypes.data, w16.data.ptr, _R_16F, k,
                  a16.data.ptr, _R_16F, k, (_ONE if accumulate else _ZERO).ctypes.data,
                  out.data.ptr + 4 * col0, _R_32F, out.shape[1], _COMPUTE_32F, _GEMM_DEFAULT)


def rmsnorm(x: Any, w: Any, out: Any, eps: float, add: bool = False) -> None:
    """out (t, h) = ops.rmsnorm(x, w, eps), or with add out += it (then not in place)."""
    t, h = x.shape
    check("x", x, np.float32)
    check("w", w, np.float32, (h,))
    check("out", out, np.float32, (t, h))
    if add and _ptr(x) == _ptr(out):
        raise LaunchError("rmsnorm: add needs an output apart from its input")
    function("norm", "rmsnorm")((t,), (NORM_THREADS,), (x, w, out, _i(h), _f(eps), _i(add)))


# ModelSpec.activation -> the kernels' code for a gated MLP's activation (gated_act in common.cuh)
ACT_CODES = {"silu": 1, "gelu_tanh": 2}


def glu(gate: Any, up: Any, act: str = "silu") -> None:
    """gate = act(gate) * up, in place (the MLP's input to down, after prefill's GEMMs)."""
    check("gate", gate, np.float32)
    check("up", up, np.float32, gate.shape)
    function("norm", "glu")((_blocks(gate.size),), (THREADS,), (gate, up, np.int64(gate.size), _i(ACT_CODES[act])))


def softcap(x: Any, cap: float) -> None:
    """x = cap tanh(x / cap), in place (Gemma 2's logits)."""
    check("x", x, np.float32)
    function("norm", "softcap")((_blocks(x.size),), (THREADS,), (x, np.int64(x.size), _f(cap)))


def add_bias(y: Any, b: Any) -> None:
    check("y", y, np.float32)
    check("b", b, np.float32, (y.shape[-1],))
    function("norm", "add_bias")((_blocks(y.size),), (THREADS,), (y, b, _i(b.size), np.int64(y.size)))


# --- routed experts (MoE) ---------------------------------------------------------------------------------
# A layer's experts run as slots: slot t * k + j is token t's j-th chosen expert (moe_route). Each of gate, up
# and down is one qmatvec_moe launch over all slots (plus one hmatvec_moe where some experts are fp16), each
# reading its expert's entry in a device table: the expert's QMat, its XGather and its fp16 matrix
# (planner.memory.EXPERT_TABLE_BYTES each). Where some expert's option reads a gathered input (a mixed option's
# slices), a gather_moe launch first lays out every slot's input; else the slots read x as it is, and gate and
# up share one launch (act(gate x) * up x).

# numpy twin of matvec.cu's XGather (C layout), read by gather_moe from the device table.
XGATHER = np.dtype([("perm", "u8"), ("nslices", "i4"), ("start", "i4", (3,)), ("rows", "i4", (3,)),
                    ("len", "i4", (3,)), ("off", "i4", (3,))], align=True)
ROUTE_THREADS = 32                 # moe_route: one warp a token


@dataclass(frozen=True)
class ExpertTable:
    """One linear (gate, up or down) of a layer's routed experts as the expert launches read it: the device
    table's three arrays (per expert: QMat, n = 0 for an fp16 expert; XGather; the fp16 matrix's address, 0
    for a packed one), the linear's shape, the widest gathered input, and which kinds of experts it holds."""

    mats: Any
    gathers: Any
    halves: Any
    n: int
    k: int
    width: int
    packed: bool
    half: bool
    direct: bool          # no expert needs its input gathered: the slots read x as it is


def expert_entries(lins: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table's host arrays for experts 0 .. E - 1 (DeviceLinears of one shape): (E,) QMAT, (E,) XGATHER,
    (E,) uint64."""
    shapes = {lin.shape for lin in lins}
    if len(shapes) != 1:
        raise LaunchError(f"experts of different shapes {sorted(shapes)}")
    mats, gathers = np.zeros(len(lins), QMAT), np.zeros(len(lins), XGATHER)
    halves = np.zeros(len(lins), np.uint64)
    for e, lin in enumerate(lins):
        check_linear(lin)
        if lin.meta is None:
            k = lin.shape[1]
            halves[e] = _ptr(lin.half)
            gathers[e] = (0, 1, (0, 0, 0), (k, 0, 0), (k, 0, 0), (0, 0, 0))
            continue
        m = lin.meta
        mats[e] = _qmat(lin, None)[0]
        g = gathers[e:e + 1]
        g["perm"], g["nslices"] = _ptr(lin.perm) if lin.perm is not None else 0, len(m.slices)
        for j, sl in enumerate(m.slices):
            g["start"][0, j], g["rows"][0, j], g["len"][0, j], g["off"][0, j] = (sl.start, sl.rows,
                                                                                sl.units * PACK_VALUES, sl.xoff)
    return mats, gathers, halves


def expert_table(lins: list, region: Any) -> ExpertTable:
    """Experts 0 .. E - 1's table written into `region` (device bytes, at least E * EXPERT_TABLE_BYTES)."""
    from planner.memory import EXPERT_TABLE_BYTES
    mats, gathers, halves = expert_entries(lins)
    e = len(lins)
    if QMAT.itemsize + XGATHER.itemsize + 8 > EXPERT_TABLE_BYTES or region.nbytes < e * EXPERT_TABLE_BYTES:
        raise LaunchError(f"an expert table of {region.nbytes} bytes for {e} experts")
    host = np.zeros(region.nbytes, np.uint8)
    a, b = mats.nbytes, mats.nbytes + gathers.nbytes
    host[:a], host[a:b], host[b:b + halves.nbytes] = mats.view(np.uint8), gathers.view(np.uint8), halves.view(np.uint8)
    region.set(host)
    width = max(int(g["off"][j] + g["len"][j]) for g in gathers for j in range(int(g["nslices"])))
    n, k = lins[0].shape
    return ExpertTable(region[:a], region[a:b], region[b:b + halves.nbytes], n, k, width,
                       any(lin.meta is not None for lin in lins), any(lin.meta is None for lin in lins),
                       not any(lin.meta is not None and lin.meta.needs_gather for lin in lins))


def experts_fusable(gate: ExpertTable, up: ExpertTable) -> bool:
    """Whether a layer's expert gate and up share one launch: every expert of both packed and reading x as it
    is, and one shape."""
    return gate.direct and up.direct and not (gate.half or up.half) and (gate.n, gate.k) == (up.n, up.k)


def hmatmul(x: Any, lin: DeviceLinear, y: Any) -> None:
    """y (T, n) = x (T, k) W^T for an fp16 matrix, in fp32 (hmatvec a row of x each): the router's logits,
    which prefill's fp16 GEMM inputs could tip to other experts than decode picks."""
    n, k = lin.shape
    t = x.shape[0]
    if lin.meta is not None:
        raise LaunchError("hmatmul takes an fp16 matrix, not a packed linear")
    check_linear(lin)
    check("x", x, np.float32, (t, k))
    check("y", y, np.float32, (t, n))
    function("matvec", "hmatvec")((math.ceil(n / WARPS_PER_BLOCK), t), (32 * WARPS_PER_BLOCK,),
                                  (x, y, lin.half, y, _i(0), _i(0), _i(n), _i(k)))


def moe_route(logits: Any, k: int, sel: Any, weight: Any) -> None:
    """Each token's k experts and their weights (refengine.arch.route) from its router logits (T, E): sel and
    weight (T * k,), token t's j-th expert at t * k + j."""
    t, e = logits.shape
    check("logits", logits, np.float32)
    check("sel", sel, np.int32, (t * k,))
    check("weight", weight, np.float32, (t * k,))
    if not 1 <= k <= e:
        raise LaunchError(f"{k} experts a token of {e}")
    function("moe", "moe_route")((t,), (ROUTE_THREADS,), (logits, _i(e), _i(k), sel, weight))


def matvec_experts(x: Any, per: int, table: ExpertTable, sel: Any, xp: Any, y: Any,
                   up: Optional[ExpertTable] = None, act: str = "silu") -> None:
    """y[s] (n,) = W_e x[s // per] for every slot s, e = sel[s] (on the device), W_e expert e's linear of
    `table`; with `up` (experts_fusable), y[s] = act(W_e x) * (U_e x), U_e expert e's linear of up. xp (slots,
    width) is the gathered inputs' scratch."""
    slots = sel.shape[0]
    check("x", x, np.float32, (x.shape[0], table.k))
    check("sel", sel, np.int32, (slots,))
    check("y", y, np.float32, (slots, table.n))
    check("gather buffer", xp, np.float32, (slots, xp.shape[1]))
    if x.shape[0] * per != slots or xp.shape[1] < table.width or xp.shape[1] % 4:
        raise LaunchError(f"{slots} slots over {x.shape[0]} rows, per {per}; gather rows of {xp.shape[1]}")
    if up is not None and not experts_fusable(table, up):
        raise LaunchError("these experts' gate and up cannot share a launch")
    if table.direct:
        src, ld, rows_per = x, table.k, per
        if _ptr(x) % 16:
            raise LaunchError("expert matvec input not 16-byte aligned")
    else:
        function("matvec", "gather_moe")((_blocks(table.width), slots), (THREADS,),
                                         (x, _i(table.k), _i(per), table.gathers, sel, xp, _i(xp.shape[1])))
        src, ld, rows_per = xp, xp.shape[1], 1
    if table.packed:
        shape = _compiled_matvec()
        kernel = function(_matvec_module(), shape.experts)
        kernel((math.ceil(table.n / shape.rows), slots), (32 * shape.warps,),
               (src, _i(ld), _i(rows_per), _i(ACT_CODES[act] if up is not None else 0), table.mats,
                (up or table).mats, sel, y, _i(table.n)), **_shared(kernel, shape))
    if table.half:
        function("matvec", "hmatvec_moe")((math.ceil(table.n / WARPS_PER_BLOCK), slots), (32 * WARPS_PER_BLOCK,),
                                          (src, _i(ld), _i(rows_per), table.halves, sel, y, _i(table.n),
                                           _i(table.n), _i(table.k)))


def gather_rows_half(x: Any, rows: Any, out: Any) -> None:
    """out (n, h) fp16 bits = x[rows] (x (T, h) float32, rows (n,) int32 on the device): one expert's tokens as
    its GEMM input, in grouped prefill."""
    n, h = out.shape
    check("x", x, np.float32, (x.shape[0], h))
    check("rows", rows, np.int32, (n,))
    check("out", out, np.uint16, (n, h))
    function("moe", "gather_rows_half")((_blocks(out.size),), (THREADS,), (x, rows, out, _i(h), np.int64(out.size)))


def scatter_add(x: Any, y: Any, rows: Any, weight: Any) -> None:
    """x[rows[j]] += weight[j] y[j] (y (n, h); rows distinct): one expert's outputs joining its tokens' residuals."""
    n, h = y.shape
    check("x", x, np.float32, (x.shape[0], h))
    check("y", y, np.float32, (n, h))
    check("rows", rows, np.int32, (n,))
    check("weight", weight, np.float32, (n,))
    function("moe", "scatter_add")((_blocks(y.size),), (THREADS,), (x, y, rows, weight, _i(h), np.int64(y.size)))


def moe_combine(x: Any, out: Any, weight: Any, k: int) -> None:
    """x (T, h) += sum over j of weight[t k + j] out[t k + j]: the slots' down outputs (T * k, h) joining
    the residual."""
    t, h = x.shape
    check("x", x, np.float32)
    check("out", out, np.float32, (t * k, h))
    check("weight", weight, np.float32, (t * k,))
    function("moe", "moe_combine")((_blocks(x.size),), (THREADS,), (x, out, weight, _i(k), _i(h), np.int64(x.size)))


def _factors(factors: Any, d: int) -> Any:
    """A scaled RoPE's per-pair frequency divisors (d/2,) float32 on the device, or a null pointer for none."""
    if factors is None:
        return np.uint64(0)
    check("rope factors", factors, np.float32, (d // 2,))
    return factors


def rope_store(fmt: str, q: Any, k: Any, v: Any, kc: Any, vc: Any, pos: Any, theta: float, interleaved: bool,
               factors: Any = None) -> None:
    """One step's q (t, hq, d) and k (t, hkv, d) rotated in place (RoPE at positions pos (t,), int32 on the
    device: the caller keeps them inside the context, as GPUTransformer._step checks; frequencies divided by
    `factors` (d/2,) where RoPE is scaled), then k and v (t, hkv, d) stored in the caches kc, vc (rows, hkv,
    row bytes) at those positions (mod rows: a sliding layer's ring, planner.memory.kv_rows), in one launch."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    check("q", q, np.float32)
    check("k", k, np.float32, (t, hkv, d))
    check("v", v, np.float32, (t, hkv, d))
    check("k cache", kc, np.uint8)
    check("v cache", vc, np.uint8, kc.shape)
    check("pos", pos, np.int32, (t,))
    if d % 2 or kc.shape[1] != hkv:
        raise LaunchError(f"rope_store: head dim {d} (must be even), cache {tuple(kc.shape)} for {hkv} KV heads")
    function("attention", f"rope_store<{KV_CODES[fmt]}>")(
        (_blocks(t * (hq + 2 * hkv) * 32, 128),), (128,),
        (q, k, v, kc, vc, pos, _i(t), _i(hq), _i(hkv), _i(d), _i(kc.shape[2]), np.float64(theta), _factors(factors, d),
         _i(interleaved), _i(kc.shape[0])))


ATTN_CHUNK = 32                    # decode attention: positions per block, at least (attention.cu)
ATTN_TILE_D, ATTN_TQ = 128, 16     # attention_tiled: largest head dim, queries per block (attention.cu)
# Prefill's attention: "query" (a block per query and head) or "tiled" (attention_tiled: K / V tiles shared
# by 16 queries). "tiled": on an H200 (run 9) 512 queries of 32 heads took 564 us against 789.
ATTN_PREFILL = "tiled"
# Decode's attention: "split" (`attention`: a block per query head and chunk, as measured), "gqa"
# (attention_gqa: a block per KV head and chunk, for all its query heads, a lane per position for the
# scores), or "step" (attention_gqa<FMT, 1>: the same, with RoPE, the cache store and the merge of the
# chunks inside, so a decode step's attention is one launch where rope_store, attention and
# attention_merge are three). attention_gqa takes head dims up to 128 (multiples of 4) and up to 8 query
# heads a KV head; outside that decode uses `attention`. "split": on an H200 (run 9) at 512 positions, 32
# heads, fp16, rope_store + attention took 18.7 us, rope_store + attention_gqa 34.7, the one-launch step 40.3;
# with 32 query heads on 8 KV heads 18.5, 25.5 and 29.3 (a lane a position leaves the gqa kernels too few
# blocks for a decode step). "lanes" (attention_lanes, built 2026-11-28, not yet timed): `attention`'s grid and
# partials, the chunk taken 32 positions at a time, a lane a position for the scores (the warps splitting the
# head dim), one max and one sum reduction a tile where `attention` has a 5-shuffle sum a position.
ATTN_DECODE = "split"
GQA_MAX_G = 8


def gqa_fits(hq: int, hkv: int, d: int) -> bool:
    """Whether attention_gqa takes these heads (launch.attention falls back to `attention` where not)."""
    return d <= ATTN_TILE_D and d % 4 == 0 and hq % hkv == 0 and hq // hkv <= GQA_MAX_G


def attends_in_one_step(hq: int, hkv: int, d: int) -> bool:
    """Whether a decode step's RoPE, cache store and attention run as one launch (attention_step)."""
    return ATTN_DECODE == "step" and gqa_fits(hq, hkv, d)


def attention_split(t: int, ctx: int, window: int = 0) -> tuple[int, int]:
    """(positions per block, blocks per head): one token's context (a sliding layer's: its window) is split
    into chunks of ATTN_CHUNK (more for long contexts, at most ATTN_MAX_SPLITS of them) so its few heads fill
    the GPU; a prefill chunk's queries give enough blocks already and each takes its whole context."""
    if window:
        ctx = min(ctx, window)
    if t > 1:
        return ctx, 1
    chunk = max(ATTN_CHUNK, math.ceil(ctx / ATTN_MAX_SPLITS))
    return chunk, math.ceil(ctx / chunk)


def _check_attention(q: Any, kc: Any, vc: Any, pos: Any, out: Any, partials: Any) -> None:
    """The arguments attention and attention_step share: q (t, hq, d), caches, positions, output, partials."""
    t, hq, d = q.shape
    check("q", q, np.float32)
    check("k cache", kc, np.uint8)
    check("v cache", vc, np.uint8, kc.shape)
    check("pos", pos, np.int32, (t,))
    check("out", out, np.float32, (t, hq, d))
    check("partials", partials, np.float32)


def attention(fmt: str, q: Any, kc: Any, vc: Any, pos: Any, out: Any, partials: Any, window: int = 0,
              cap: float = 0.0) -> None:
    """out (t, hq, d) = causal attention of q (t, hq, d) over the caches (ctx, hkv, row bytes) at positions
    pos (t,); partials: planner.memory's attn_partials (hq, ATTN_MAX_SPLITS, d + 2) float32. window: a sliding
    layer's (0: none); cap: the scores' soft cap (0: none), both as ops.attention."""
    t, hq, d = q.shape
    ctx, hkv, row_bytes = kc.shape
    _check_attention(q, kc, vc, pos, out, partials)
    if d > ATTN_MAX_D:
        raise LaunchError(f"attention: head dim {d} above the kernel's {ATTN_MAX_D}")
    if hq % hkv:
        raise LaunchError(f"attention: {hq} heads over {hkv} KV heads")
    if t > 1 and ATTN_PREFILL == "tiled" and d <= ATTN_TILE_D:
        function("attention", f"attention_tiled<{KV_CODES[fmt]}>")(
            (math.ceil(t / ATTN_TQ), hq), (ATTN_THREADS,),
            (q, kc, vc, pos, out, _i(t), _i(hq), _i(hkv), _i(d), _i(row_bytes), _i(window), _f(cap), _i(ctx)))
        return
    chunk, nsplit = attention_split(t, ctx, window)
    if nsplit > 1 and partials.size < hq * t * nsplit * (d + 2):
        raise LaunchError(f"attention: {partials.size} partial floats for {hq} heads x {nsplit} splits")
    if t == 1 and ATTN_DECODE in ("gqa", "step") and gqa_fits(hq, hkv, d):
        function("attention", f"attention_gqa<{KV_CODES[fmt]}, 0>")(
            (nsplit, hkv), (ATTN_THREADS,),
            (q, q, q, kc, vc, pos, out, partials, pos, _i(hq), _i(hkv), _i(d), _i(row_bytes), _i(chunk), _i(nsplit),
             np.float64(0), np.uint64(0), _i(0), _i(window), _f(cap), _i(ctx)))
    else:
        kernel = "attention_lanes" if t == 1 and ATTN_DECODE == "lanes" else "attention"
        function("attention", f"{kernel}<{KV_CODES[fmt]}>")(
            (t * nsplit, hq), (ATTN_THREADS,),
            (q, kc, vc, pos, out, partials, _i(t), _i(0), _i(hq), _i(hkv), _i(d), _i(row_bytes), _i(chunk), _i(nsplit),
             _i(window), _f(cap), _i(ctx)))
    if nsplit > 1:
        function("attention", "attention_merge")(
            (t, hq), (ATTN_THREADS,),
            (partials, pos, out, _i(t), _i(0), _i(hq), _i(d), _i(chunk), _i(nsplit), _i(window)))


def attention_step(fmt: str, q: Any, k: Any, v: Any, kc: Any, vc: Any, pos: Any, out: Any, partials: Any,
                   tickets: Any, theta: float, interleaved: bool, factors: Any = None, window: int = 0,
                   cap: float = 0.0) -> None:
    """A decode step's attention in one launch: q (1, hq, d) and k (1, hkv, d) rotated (RoPE at pos (1,), on
    the device) inside the kernel (q and k stay as they are), k and v (1, hkv, d) stored in the caches kc, vc
    (ctx, hkv, row bytes) at pos, and out (1, hq, d) = causal attention over positions 0 .. pos: rope_store
    then attention, as one launch. tickets: planner.memory's attn_tickets (hkv,) int32, zero between launches
    (the kernel leaves them so)."""
    t, hq, d = q.shape
    ctx, hkv, row_bytes = kc.shape
    _check_attention(q, kc, vc, pos, out, partials)
    check("k", k, np.float32, (1, hkv, d))
    check("v", v, np.float32, (1, hkv, d))
    check("tickets", tickets, np.int32)
    if t != 1 or not gqa_fits(hq, hkv, d):
        raise LaunchError(f"attention_step: {t} queries of {hq} heads over {hkv} KV heads of dim {d} "
                          f"(one query, head dim <= {ATTN_TILE_D} and a multiple of 4, <= {GQA_MAX_G} heads a KV head)")
    chunk, nsplit = attention_split(1, ctx, window)
    if partials.size < hq * nsplit * (d + 2) or tickets.size < hkv:
        raise LaunchError(f"attention_step: {partials.size} partial floats, {tickets.size} tickets for {hq} heads "
                          f"x {nsplit} splits over {hkv} KV heads")
    function("attention", f"attention_gqa<{KV_CODES[fmt]}, 1>")(
        (nsplit, hkv), (ATTN_THREADS,),
        (q, k, v, kc, vc, pos, out, partials, tickets, _i(hq), _i(hkv), _i(d), _i(row_bytes), _i(chunk), _i(nsplit),
         np.float64(theta), _factors(factors, d), _i(interleaved), _i(window), _f(cap), _i(ctx)))


def argmax(x: Any, out: Any) -> None:
    check("x", x, np.float32)
    check("out", out, np.int32)
    function("sample", "argmax")((1,), (1024,), (x, _i(x.size), out))


def penalize(x: Any, seen: Any, penalty: float) -> None:
    check("x", x, np.float32)
    check("seen", seen, np.uint8, x.shape)
    function("sample", "penalize")((_blocks(x.size),), (THREADS,), (x, seen, _i(x.size), _f(penalty)))
