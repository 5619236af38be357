"""The GPU and model databases: YAML package data, strictly validated, overridable by a user file.

`load()` returns both tables; `find_gpu` / `find_model` look a name up (id, name or alias, case and
punctuation ignored) and raise `HwdbError` listing the closest names when nothing matches.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from hwdb.schema import HwdbError, build, read_yaml
from hwdb.specs import GPUSpec, ModelSpec

DATA_DIR = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
ENV_VAR = "VRAMWISE_HWDB"
_SECTIONS = {"gpus": GPUSpec, "models": ModelSpec}


@dataclass(frozen=True)
class Database:
    """Both tables, keyed by id, plus the files they were read from."""

    gpus: Mapping[str, GPUSpec]
    models: Mapping[str, ModelSpec]
    files: tuple[str, ...]

    def find_gpu(self, name: str) -> GPUSpec:
        try:
            return _find(self.gpus, name, "GPU", "vramwise gpus")
        except HwdbError:
            hit = _sized_gpu(self.gpus, name)
            if hit is None:
                raise
            return hit

    def find_model(self, name: str) -> ModelSpec:
        return _find(self.models, name, "model", "vramwise models")


def normalize(name: str) -> str:
    """Lower-case alphanumerics only: 'RTX 4090', 'rtx-4090' and 'rtx4090' are one key."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _names(entry: Any) -> list[str]:
    return [entry.id, entry.name, *entry.aliases]


def _find(table: Mapping[str, Any], name: str, kind: str, listing: str) -> Any:
    key = normalize(name)
    for entry in table.values():
        if key and key in {normalize(n) for n in _names(entry)}:
            return entry
    by_key = {normalize(n): entry.id for entry in table.values() for n in _names(entry)}
    close = difflib.get_close_matches(key, list(by_key), n=8, cutoff=0.5)
    ids = list(dict.fromkeys(by_key[c] for c in close))[:4]
    hint = f"closest: {', '.join(ids)}" if ids else f"see `{listing}`"
    raise HwdbError(f"unknown {kind} {name!r} ({hint}; or add it with --hwdb FILE)")


_SIZE = re.compile(r"[\s,(]*(\d+(?:\.\d+)?)\s*GB\s*\)?\s*$", re.IGNORECASE)
_VENDOR = re.compile(r"^\s*(nvidia|amd|intel|apple)\s+", re.IGNORECASE)


def _size(gpu: GPUSpec) -> float:
    """The memory size a name gives for this card: its own, or for an Apple chip the RAM, of which its
    memory_bytes (macOS's GPU working-set limit) is 2/3 on machines of 32 GB and less, else 3/4."""
    if gpu.vendor != "apple":
        return gpu.memory_bytes
    return gpu.memory_bytes * 3 / 2 if gpu.memory_bytes * 3 / 2 <= 33 * 2**30 else gpu.memory_bytes * 4 / 3


def _sized_gpu(table: Mapping[str, GPUSpec], name: str) -> Optional[GPUSpec]:
    """A name as benchmark tables and shops write it: the vendor's name, maybe without 'NVIDIA' / 'AMD', then
    the memory size ('NVIDIA GeForce RTX 3090 24GB', 'RTX 2080 (8 GB)'). The size must agree with the entry's
    memory (within 6%, in GB or GiB) and pick one entry; a size that disagrees is an error naming the card
    that matched, so an 8 GB RTX 3060 is never planned as the 12 GB one."""
    size = _SIZE.search(name)
    base = name[:size.start()] if size else name
    keys = {normalize(base), normalize(_VENDOR.sub("", base))} - {""}
    named = [g for g in table.values() if keys & {normalize(n) for n in _names(g)}]
    if not named or size is None:
        return named[0] if len(named) == 1 else None
    gb = float(size.group(1))
    fits = [g for g in named if any(abs(_size(g) / unit - gb) <= 0.06 * gb for unit in (1e9, 2**30))]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        have = ", ".join(f"{g.id} has {_size(g) / 2**30:.0f} GiB" + (" of RAM" if g.vendor == "apple" else "")
                         for g in named)
        raise HwdbError(f"unknown GPU {name!r}: {have}, not {gb:g} GB (if only the memory differs, pass "
                        f"--gpu {named[0].id} --vram SIZE; else add the card with --hwdb FILE)")
    return None


def _read_tables(path: Path, data: Any) -> dict[str, dict[str, Any]]:
    """Check a file's top level: `schema_version` plus `gpus:` and/or `models:` mappings."""
    if not isinstance(data, dict):
        raise HwdbError(f"{path}: expected a mapping with 'gpus:' and/or 'models:' at the top")
    unknown = sorted(set(map(str, data)) - {"schema_version", *_SECTIONS})
    if unknown:
        raise HwdbError(f"{path}: unknown top-level key {unknown[0]!r} (allowed: schema_version, gpus, models)")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise HwdbError(f"{path}: schema_version {version!r} is not supported (this vramwise reads {SCHEMA_VERSION})")
    tables = {}
    for section in _SECTIONS:
        table = data.get(section) or {}
        if not isinstance(table, dict):
            raise HwdbError(f"{path}: '{section}:' must map ids to entries")
        tables[section] = table
    return tables


def _parse(path: Path, tables: dict[str, dict[str, Any]], base: Optional[dict] = None) -> dict:
    """Build entries; a user file's entry may set only some fields of an existing id (override)."""
    out: dict[str, dict[str, Any]] = {s: dict((base or {}).get(s, {})) for s in _SECTIONS}
    for section, cls in _SECTIONS.items():
        for entry_id, fields in tables[section].items():
            entry_id = str(entry_id)
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", entry_id):
                raise HwdbError(f"{path}: {section} id {entry_id!r} must be lower-case letters, digits, '.', '_' or '-'")
            if base is not None and entry_id in out[section] and isinstance(fields, dict):
                old = out[section][entry_id]
                merged = {k: getattr(old, k) for k in old.__dataclass_fields__ if k != "id"}
                merged.update(fields)
                merged["aliases"] = list(merged["aliases"])
                fields = merged
            out[section][entry_id] = build(cls, entry_id, fields, f"{path}: {section}")
    return out


def load(user_file: Optional[str | os.PathLike] = None) -> Database:
    """Read the packaged tables, then the user file (argument, else $VRAMWISE_HWDB) on top."""
    files = [DATA_DIR / "gpus.yaml", DATA_DIR / "models.yaml"]
    merged: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for path in files:
        parsed = _parse(path, _read_tables(path, read_yaml(path)))
        for section in _SECTIONS:
            merged[section].update(parsed[section])
    user = user_file or os.environ.get(ENV_VAR)
    if user:
        path = Path(user)
        if not path.is_file():
            raise HwdbError(f"{path}: hwdb file not found (check --hwdb or ${ENV_VAR})")
        merged = _parse(path, _read_tables(path, read_yaml(path)), base=merged)
        files.append(path)
    return Database(gpus=merged["gpus"], models=merged["models"], files=tuple(map(str, files)))


__all__ = ["Database", "GPUSpec", "HwdbError", "ModelSpec", "load", "normalize"]
