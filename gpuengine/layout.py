"""A layer's weights as one contiguous byte image, and the views of it the kernels read.

A layer (or the head with the final norm) travels as one block of bytes: packed words, permutations and
float32 arrays first, then the 2-byte fp16 scales and matrices, ordered so every array is aligned for the
widest load the kernels make of it with no padding, and the image is exactly the tensors' bytes (planner.formats counts the same bytes,
plus 12 per slice for the slice table, which the device does not need: the shapes are in `QMeta`). A
resident layer's image is copied once into its own device buffer; a streamed layer's image stays in
pinned host memory and is copied into one of two device slots when it runs (one copy per layer).

Pure NumPy: `views` takes the buffer's array module's arrays (CuPy on the device, NumPy in CPU tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from planner.formats import PACK_VALUES

@dataclass(frozen=True)
class SliceMeta:
    start: int            # first input channel, in the permuted order
    rows: int             # input channels
    bits: int
    units: int            # 32-value packing units per output row
    groups: int           # scales per output row
    xoff: int             # where its (padded) input starts in the matvec's gathered x


@dataclass(frozen=True)
class QMeta:
    """Shape of one packed linear: (n out, k in), its group size and slices."""

    n: int
    k: int
    group_size: int
    slices: tuple[SliceMeta, ...]
    has_perm: bool

    @property
    def gathered_len(self) -> int:
        """Length of the matvec's input after gather: each slice padded to whole units."""
        return sum(s.units * PACK_VALUES for s in self.slices)

    @property
    def needs_gather(self) -> bool:
        """False when x can be read as it is: one slice, no permutation, k a whole number of units."""
        return self.has_perm or len(self.slices) > 1 or self.k % PACK_VALUES != 0


@dataclass(frozen=True)
class Part:
    key: str              # tensor name, or name + "/s0.w", "/s0.scales", "/perm"
    offset: int
    shape: tuple[int, ...]
    dtype: str            # numpy dtype string


@dataclass
class LayerImage:
    """The bytes of some tensors (data) and where each array lies in them (parts)."""

    parts: dict[str, Part]
    qmeta: dict[str, QMeta]       # packed linears
    halves: set[str]              # unquantized linears, stored fp16
    data: np.ndarray              # uint8

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def qmeta_of(t: Any) -> QMeta:
    """QMeta of a refengine.quant.QTensor."""
    n, k = t.shape
    slices, xoff = [], 0
    for s in t.slices:
        units = math.ceil(s.rows / PACK_VALUES)
        slices.append(SliceMeta(s.start, s.rows, s.bits, units, math.ceil(s.rows / t.option.group_size), xoff))
        xoff += units * PACK_VALUES
    return QMeta(n, k, t.option.group_size, tuple(slices), t.perm is not None)


def _arrays(name: str, value: Any) -> tuple[list[tuple[str, np.ndarray]], QMeta | None, bool]:
    """The arrays one tensor stores: packed linears as words, scales (as raw uint16) and permutation;
    unquantized linears as fp16 (raw uint16); norms and biases as float32."""
    t = getattr(value, "qtensor", None)
    if t is not None:
        out = []
        for j, s in enumerate(t.slices):
            out.append((f"{name}/s{j}.w", np.ascontiguousarray(s.qweight, dtype=np.uint32)))
            out.append((f"{name}/s{j}.scales", np.ascontiguousarray(s.scales, dtype=np.float16).view(np.uint16)))
        if t.perm is not None:
            out.append((f"{name}/perm", np.ascontiguousarray(t.perm, dtype=np.int32)))
        return out, qmeta_of(t), False
    a = np.asarray(value)
    if a.ndim == 2:
        return [(name, np.ascontiguousarray(a, dtype=np.float16).view(np.uint16))], None, True
    return [(name, np.ascontiguousarray(a, dtype=np.float32))], None, False


def _placement(item: tuple[str, np.ndarray]) -> tuple[int, int]:
    """Sort key: 4-byte arrays before 2-byte ones, and among them sizes divisible by 16, then by 8, then the
    rest, so each array starts at a multiple of the largest of 16, 8, 4 dividing its size: 4- and 8-bit
    words (16 * units * bits / 4 bytes a row) are read with 16-byte loads, 2-bit words with 8-byte loads,
    fp16 matrices (an even number of columns) as 4-byte pairs."""
    a = item[1]
    wide = a.dtype.itemsize == 4
    size = a.nbytes
    return (0 if wide else 1, 0 if size % 16 == 0 else 1 if size % 8 == 0 else 2 if size % 4 == 0 else 3)


def build_image(tensors: Mapping[str, Any], out: np.ndarray | None = None) -> LayerImage:
    """Pack tensors (canonical name -> QuantizedLinear or array) into one image; `out` may supply the
    uint8 buffer (e.g. pinned host memory) of exactly image_bytes(tensors) bytes."""
    arrays, qmeta, halves = [], {}, set()
    for name, value in tensors.items():
        parts, meta, half = _arrays(name, value)
        arrays += parts
        if meta is not None:
            qmeta[name] = meta
        if half:
            halves.add(name)
    arrays.sort(key=_placement)
    total = sum(a.nbytes for _, a in arrays)
    data = np.empty(total, dtype=np.uint8) if out is None else out
    if data.nbytes != total:
        raise ValueError(f"image buffer of {data.nbytes} bytes for {total} bytes of tensors")
    parts, off = {}, 0
    for key, a in arrays:
        data[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
        parts[key] = Part(key, off, a.shape, a.dtype.str)
        off += a.nbytes
    return LayerImage(parts, qmeta, halves, data)


def image_bytes(tensors: Mapping[str, Any]) -> int:
    return sum(a.nbytes for name, v in tensors.items() for _, a in _arrays(name, v)[0])


@dataclass(frozen=True)
class DeviceLinear:
    """What the matvec / dequantize launchers take: a packed linear's views, or an fp16 matrix."""

    meta: QMeta | None
    words: tuple[Any, ...] = ()           # per slice (n, units * bits) uint32
    scales: tuple[Any, ...] = ()          # per slice (n, groups) uint16 (fp16 bits)
    perm: Any = None                      # (k,) int32, mixed options only
    half: Any = None                      # (n, k) uint16 (fp16 bits): an unquantized linear

    @property
    def shape(self) -> tuple[int, int]:
        return (self.meta.n, self.meta.k) if self.meta is not None else tuple(self.half.shape)


def row_block(lin: Any, r0: int, r1: int) -> Any:
    """Output rows r0 .. r1 of a linear (or a bias), as views of its arrays (no copy: rows are whole in every
    array): how refengine.ops.unfuse cuts Phi-3's fused linears on the device."""
    if not isinstance(lin, DeviceLinear):
        return lin[r0:r1]
    if lin.meta is None:
        return DeviceLinear(None, half=lin.half[r0:r1])
    m = lin.meta
    return DeviceLinear(QMeta(r1 - r0, m.k, m.group_size, m.slices, m.has_perm),
                        tuple(w[r0:r1] for w in lin.words), tuple(s[r0:r1] for s in lin.scales), lin.perm)


def views(buf: Any, image: LayerImage) -> dict[str, Any]:
    """name -> DeviceLinear or array, over `buf` (a 1-D uint8 array, at least image.nbytes long, holding
    the image's bytes)."""
    def part(key: str) -> Any:
        p = image.parts[key]
        count = int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
        return buf[p.offset:p.offset + count].view(np.dtype(p.dtype)).reshape(p.shape)

    out: dict[str, Any] = {}
    for name, meta in image.qmeta.items():
        out[name] = DeviceLinear(meta, tuple(part(f"{name}/s{j}.w") for j in range(len(meta.slices))),
                                 tuple(part(f"{name}/s{j}.scales") for j in range(len(meta.slices))),
                                 part(f"{name}/perm") if meta.has_perm else None)
    for name in image.halves:
        out[name] = DeviceLinear(None, half=part(name))
    for key in image.parts:
        if "/" not in key and key not in image.halves:
            out[key] = part(key)
    return out
