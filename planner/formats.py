"""The registry of storage formats: quantized weight options and KV-cache formats, with exact bytes.

These byte functions are the ones the engines allocate with; nothing else computes format sizes.

Weight options (ExLlamaV2-style, e.g. "0.1:4b/0.9:3b g128"): a linear W of shape (N out, K in) is
quantized group-wise along K. K is split into slices of whole groups, each at its own bit width.
Storage of one tensor:
  - packed values: per output row and slice, 32 values at b bits fill exactly b uint32 words, so a
    slice of K_s inputs takes ceil(K_s / 32) * b words per row (any width packs without waste);
  - scales: one fp16 per output row per group (symmetric: w = scale * (q - 2^(b-1)); no zero point);
  - a slice table: 3 int32 per slice (first input row, rows, bits);
  - mixed options (more than one slice) also store an int32 input-channel permutation of length K,
    so the quantizer may put the most important input channels in the widest slice (act-order).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

SCALE_BYTES = 2            # fp16 scale per (row, group)
SLICE_HEADER_BYTES = 12    # int32 first_row, rows, bits
PERM_BYTES_PER_INPUT = 4   # int32 permutation entry
PACK_VALUES = 32           # values per packing unit (b uint32 words)
WEIGHT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


class FormatError(ValueError):
    """An option or KV format name that does not parse or is not registered."""


@dataclass(frozen=True)
class QuantOption:
    """One quantization option: bit-width slices over the input dimension, and a group size."""

    slices: tuple[tuple[float, int], ...]    # (fraction of K, bits), widest first
    group_size: int

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise FormatError(f"group size {self.group_size} not in {GROUP_SIZES}")
        if any(b not in WEIGHT_BITS for _, b in self.slices):
            raise FormatError(f"bit widths must be in {WEIGHT_BITS}")
        if abs(sum(f for f, _ in self.slices) - 1.0) > 1e-9 or any(f <= 0 for f, _ in self.slices):
            raise FormatError("slice fractions must be positive and sum to 1")

    @property
    def name(self) -> str:
        parts = "/".join(f"{f:g}:{b}b" for f, b in self.slices)
        return f"{parts} g{self.group_size}"

    @property
    def nominal_bpw(self) -> float:
        """Bits per weight for a large tensor: values plus fp16 scales (per-tensor metadata excluded)."""
        return sum(f * b for f, b in self.slices) + 8 * SCALE_BYTES / self.group_size

    def slice_rows(self, k: int) -> tuple[tuple[int, int], ...]:
        """(rows, bits) per slice in whole groups; each slice keeps at least one group while K has enough."""
        groups = math.ceil(k / self.group_size)
        counts = [max(1, round(frac * groups)) for frac, _ in self.slices[:-1]]
        while sum(counts) > groups - 1 and counts and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
        counts.append(groups - sum(counts))
        out, start = [], 0
        for n, (_, bits) in zip(counts, self.slices):
            rows = min(n * self.group_size, k - start) if n > 0 else 0
            if rows > 0:
                out.append((rows, bits))
                start += rows
        return tuple(out)

    def tensor_bytes(self, n_out: int, k_in: int) -> int:
        """Exact bytes of one (n_out, k_in) tensor in this format."""
        total = 0
        slices = self.slice_rows(k_in)
        for rows, bits in slices:
            total += n_out * math.ceil(rows / PACK_VALUES) * bits * 4
            total += n_out * math.ceil(rows / self.group_size) * SCALE_BYTES
        total += len(slices) * SLICE_HEADER_BYTES
        if len(slices) > 1:
            total += k_in * PERM_BYTES_PER_INPUT
        return total

    def bpw(self, n_out: int, k_in: int) -> float:
        return 8 * self.tensor_bytes(n_out, k_in) / (n_out * k_in)


_OPTION_RE = re.compile(r"^\s*((?:\d*\.?\d+:\d+b/)*\d*\.?\d+:\d+b)\s+g(\d+)\s*$")


@lru_cache(maxsize=None)
def parse_option(text: str) -> QuantOption:
    """'0.1:4b/0.9:3b g128' -> QuantOption; slices are sorted widest first."""
    m = _OPTION_RE.match(text)
    if not m:
        raise FormatError(f"quant option {text!r} does not parse (expected e.g. '0.1:4b/0.9:3b g128')")
    slices = []
    for part in m.group(1).split("/"):
        frac, bits = part.split(":")
        slices.append((float(frac), int(bits[:-1])))
    slices.sort(key=lambda s: -s[1])
    return QuantOption(tuple(slices), int(m.group(2)))


# The candidate options of the optimizer, about 2.1 to 8.1 nominal bpw. Mixed options follow
# ExLlamaV2's measurement table (shared/docs/background.md) with our fp16-scale groups.
OPTION_NAMES = (
    "1:2b g128", "0.1:3b/0.9:2b g128", "1:2b g64", "0.25:3b/0.75:2b g128", "0.5:3b/0.5:2b g128",
    "0.1:4b/0.4:3b/0.5:2b g128", "1:3b g128", "0.1:4b/0.9:3b g128", "1:3b g64", "1:3b g32",
    "0.4:4b/0.6:3b g128", "0.2:6b/0.8:3b g128", "1:4b g128", "0.1:5b/0.9:4b g128", "1:4b g64",
    "0.1:6b/0.9:4b g128", "1:4b g32", "1:5b g128", "0.1:6b/0.9:5b g128", "1:5b g64",
    "0.4:6b/0.6:5b g128", "1:6b g128", "0.1:8b/0.9:6b g128", "1:6b g32", "1:8b g128", "1:8b g32",
)
OPTIONS: tuple[QuantOption, ...] = tuple(sorted((parse_option(n) for n in OPTION_NAMES),
                                                key=lambda o: o.nominal_bpw))
HEAD_OPTION = parse_option("1:6b g128")   # ExLlamaV2 quantizes the head at 6 bits by default (-hb 6)


# --- plain dtypes of the unquantized tensors -------------------------------------------------------

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4, "u8": 1}


# --- KV cache formats --------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVFormat:
    """A KV-cache element format: blocks of `block` values taking `block_bytes` bytes."""

    name: str
    block: int            # values per block along head_dim
    block_bytes: int      # bytes per block, scales included
    description: str

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one cached head vector (one position, one KV head, K or V)."""
        return math.ceil(head_dim / self.block) * self.block_bytes


KV_FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("fp16", 1, 2, "IEEE half precision"),
    KVFormat("fp8", 1, 1, "float8 e4m3, no scale (range +-448 covers K and V after RoPE)"),
    KVFormat("q8", 32, 34, "q8_0-style: 32 int8 + one fp16 scale per block (llama.cpp q8_0)"),
    KVFormat("q4", 32, 18, "q4_0-style: 32 4-bit values + one fp16 scale per block (llama.cpp q4_0)"),
)}


# The code each engine's kernels take for a KV format (refengine.kernels_attention's Numba kernel, the
# template argument of gpuengine/kernels/attention.cu).
KV_CODES = {"fp16": 0, "fp8": 1, "q8": 2, "q4": 3}


def kv_format(name: str) -> KVFormat:
    try:
        return KV_FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown KV cache format {name!r} (choose from {', '.join(KV_FORMATS)})") from None
