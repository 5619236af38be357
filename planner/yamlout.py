"""A fast block-style YAML writer for plain data (dict, list, str, int, float, bool, None).

PyYAML's representer costs ~100 ms on a plan's 560-layer list, a fifth of `vramwise plan`'s budget.
Plain data needs none of its generality. tests/test_yamlout.py checks yaml.safe_load(dump(x)) == x.
Reading stays with yaml.safe_load.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import yaml

_SAFE_TEXT = re.compile(r"[\x20-\x7e]*")


def _text(s: str) -> str:
    if _SAFE_TEXT.fullmatch(s):
        return json.dumps(s)        # a JSON string literal is a valid YAML double-quoted scalar
    return yaml.safe_dump(s, default_style='"', width=float("inf"), allow_unicode=False).rstrip("\n").removesuffix("\n...")


def _scalar(x) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return ".nan"
        if math.isinf(x):
            return ".inf" if x > 0 else "-.inf"
        r = repr(x)
        mant, _, exp = r.partition("e")
        if "." not in mant:         # YAML 1.1 floats need a dot: 1e-05 -> 1.0e-05
            mant += ".0"
        return mant + ("e" + exp if exp else "")
    if isinstance(x, str):
        return _text(x)
    raise TypeError(f"cannot write {type(x).__name__} to YAML")


def _complex(x) -> bool:
    return isinstance(x, (dict, list, tuple)) and len(x) > 0


def _lines(obj, indent: int) -> list[str]:
    pad, out = " " * indent, []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if _complex(v):
                out.append(f"{pad}{_scalar(k)}:")
                out += _lines(v, indent + 2)
            else:
                out.append(f"{pad}{_scalar(k)}: {_empty_or_scalar(v)}")
    else:
        for v in obj:
            if _complex(v):
                sub = _lines(v, indent + 2)
                out.append(f"{pad}- {sub[0].lstrip()}")
                out += sub[1:]
            else:
                out.append(f"{pad}- {_empty_or_scalar(v)}")
    return out


def _empty_or_scalar(v) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, (list, tuple)):
        return "[]"
    return _scalar(v)


def dump(obj) -> str:
    """YAML text for a plain-data document."""
    if not _complex(obj):
        return _empty_or_scalar(obj) + "\n"
    return "\n".join(_lines(obj, 0)) + "\n"


def make_ordinary(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain open() would (0666 less the umask): temporary-file writers
    create 0600, and what the project writes is ordinary files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to path atomically: a temporary file in the same folder, then a rename over the target
    (a reader sees the old file or the new one, never half of one). Raises OSError."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        make_ordinary(tmp)                       # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
