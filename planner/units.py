"""Parsing and printing sizes and rates: '1.5GiB', '448GB/s', bytes -> '22.15 GB'."""
from __future__ import annotations

import re

_SIZE = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class UnitError(ValueError):
    """A size or rate that does not parse."""


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776, '1.5GB' -> 1500000000, '0' -> 0."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*", str(text), re.I)
    if not m:
        raise UnitError(f"{text!r} is not a size (examples: 1.5GiB, 8GB, 512MiB)")
    return int(round(float(m.group(1)) * _SIZE[(m.group(2) or "").lower()]))


def parse_rate_gb_s(text: str) -> float:
    """'448GB/s' or '448' -> 448.0 (GB/s, 1e9 bytes per second)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])i?b\s*/\s*s|gbps)?\s*", str(text), re.I)
    if not m or float(m.group(1)) <= 0:
        raise UnitError(f"{text!r} is not a positive rate (examples: 448GB/s, 1008)")
    scale = {"k": 1e-6, "m": 1e-3, "g": 1.0, "t": 1e3}[(m.group(2) or "g").lower()]
    return float(m.group(1)) * scale


def fmt_bytes(n: float) -> str:
    """Decimal units, as GPU vendors and the article quote them: 22150000000 -> '22.15 GB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_rate(tokens_per_s: float) -> str:
    """Tokens per second, or seconds per token when below one."""
    if tokens_per_s >= 1:
        return f"{tokens_per_s:.1f} tok/s"
    return f"{1 / tokens_per_s:.1f} s/token"
