"""Strict YAML -> frozen dataclass conversion for the hardware and model databases.

Every error names the file, the entry and the field, and says how to fix it (style habit 2).
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any

import yaml


# libyaml's safe loader when PyYAML was built with it (about 10x faster), else the Python one
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class HwdbError(ValueError):
    """A database file or entry is unusable; the message is one line for the user."""


def read_yaml(path: Path) -> Any:
    """Parse a YAML file with the safe loader; a syntax error becomes one HwdbError line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise HwdbError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise HwdbError(f"{path}: not a UTF-8 text file") from None
    try:
        return yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise HwdbError(f"{path}:{where}: malformed YAML ({problem}); fix the syntax") from None
    except RecursionError:
        raise HwdbError(f"{path}: malformed YAML (nested too deeply)") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are asked."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except HwdbError as exc:
                errors.append(str(exc))
        raise HwdbError(errors[0] if errors else f"{where}: must not be null")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise HwdbError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise HwdbError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HwdbError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HwdbError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise HwdbError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise HwdbError(f"{where}: expected text, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {_type_name(tp)}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, entry_id: str, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown and missing fields."""
    if not isinstance(data, dict):
        raise HwdbError(f"{where}: entry {entry_id!r} must be a mapping of fields")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "id"}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise HwdbError(f"{where}: entry {entry_id!r}: unknown field {unknown[0]!r} "
                        f"(known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {"id": entry_id}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}: entry {entry_id!r} field '{name}'")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise HwdbError(f"{where}: entry {entry_id!r}: missing field '{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise HwdbError(f"{where}: entry {entry_id!r}: {exc}") from None
