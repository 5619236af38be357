"""Layer streaming, as AirLLM does it: the model's layers stay on disk and are materialized one at a time.

A `LayerStore` is a plan's quantized layers written once to disk, one safetensors file per layer (packed
words, fp16 scales, slice table and input permutation exactly as refengine.quant.QTensor holds them; norms
and biases as float32). Building it is a long job, so each layer file is written atomically and is its own
checkpoint: an interrupted build resumes at the first layer whose file is missing or stale.

`StreamedWeights` is the weight mapping the Transformer reads: the embedding, final norm and head stay
resident; touching any tensor of layer i loads layer i (from a store, or straight from the memory-mapped
checkpoint when no plan quantizes it) and drops the layer before it, while a background thread already
reads layer i + 1. At most two layers are held at once: the two stream buffers the planner budgets
(planner/budget.py, `weights.stream_buffers`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from planner.formats import QuantOption, parse_option
from planner.yamlout import make_ordinary
from refengine.errors import WeightsError
from refengine.packed import QuantizedLinear
from refengine.quant import QSlice, QTensor, quantize
from refengine.weights import Checkpoint

STORE_VERSION = "2"
_LAYER = re.compile(r"layers\.(\d+)\.")


def cache_root() -> Path:
    """$VRAMWISE_CACHE, else $XDG_CACHE_HOME/vramwise, else ~/.cache/vramwise."""
    if os.environ.get("VRAMWISE_CACHE"):
        return Path(os.environ["VRAMWISE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vramwise"


def layer_of(name: str) -> int:
    """The layer a canonical tensor name belongs to, -1 for embed, head and the final norm."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def quantize_tensor(ckpt: Checkpoint, name: str, w: np.ndarray, option: QuantOption,
                    quantizer: Optional[Callable[[np.ndarray, QuantOption], QTensor]] = None) -> QTensor:
    """quantize() (or the given quantizer, e.g. GPTQ) with a failure (a weight no fp16 scale can hold)
    named by file and tensor, in one line."""
    try:
        return (quantizer or quantize)(w, option)
    except ValueError as exc:
        source = ckpt.tensors[name].source if name in ckpt.tensors else name
        raise WeightsError(f"{ckpt.path}: tensor {source!r} cannot be quantized to {option.name}: {exc}; "
                           "the file is corrupt or not a trained model's weights") from None


def stored(name: str, w: np.ndarray) -> np.ndarray:
    """An unquantized tensor as a quantized model stores it (planner.memory's dtypes): an MoE router in fp16
    (ROUTER_DTYPE; exact in the engines' float32), anything else (norms, biases) in float32."""
    return w.astype(np.float16) if name.endswith(".moe.router") else w


def _array_bytes(value: Any) -> int:
    return value.nbytes if isinstance(value, (np.ndarray, QuantizedLinear)) else 0


def write_tensors(path: Path, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """One safetensors file, atomically: float arrays as they are, QTensors as their slice table, packed
    words, fp16 scales and permutation (exactly the bytes planner.formats counts), with the option and
    shape in the metadata under the tensor's name."""
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    meta = dict(meta, tensors={})
    for name, t in tensors.items():
        if not isinstance(t, QTensor):
            arrays[name] = np.ascontiguousarray(t)
            continue
        meta["tensors"][name] = {"option": t.option.name, "shape": list(t.shape)}
        arrays[f"{name}.slices"] = t.header           # int32 (start, rows, bits) per slice, as the format counts it
        for j, s in enumerate(t.slices):
            arrays[f"{name}.s{j}.qweight"] = np.ascontiguousarray(s.qweight)
            arrays[f"{name}.s{j}.scales"] = np.ascontiguousarray(s.scales)
        if t.perm is not None:
            arrays[f"{name}.perm"] = np.ascontiguousarray(t.perm)
    tmp = path.with_name(path.name + ".tmp")
    # one metadata entry: safetensors writes several in no fixed order, and the file must be reproducible
    save_file(arrays, str(tmp), metadata={"vramwise": json.dumps(meta, sort_keys=True)})
    make_ordinary(tmp)                            # the writer creates 0600
    os.replace(tmp, path)


def file_meta(f: Any) -> dict:
    """The vramwise metadata of an open safetensors file (write_tensors'), {} for a foreign file."""
    try:
        meta = json.loads((f.metadata() or {}).get("vramwise", "{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def read_tensors(path: Path, names: list[str], key: Optional[str], rebuild: str) -> dict[str, Any]:
    """What write_tensors wrote: name -> QuantizedLinear or array. key: the metadata's vramwise.key must
    equal it; rebuild: how to fix a bad file, for the one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = file_meta(f)
            if key is not None and meta.get("key") != key:
                raise WeightsError(f"{path}: this file is not from the expected weights and formats; {rebuild}")
            keys = set(f.keys())
            out: dict[str, Any] = {}
            for name in names:
                if name not in meta.get("tensors", {}):
                    out[name] = f.get_tensor(name)
                    continue
                info = meta["tensors"][name]
                slices = tuple(QSlice(int(start), int(rows), int(bits), f.get_tensor(f"{name}.s{j}.qweight"),
                                      f.get_tensor(f"{name}.s{j}.scales"))
                               for j, (start, rows, bits) in enumerate(f.get_tensor(f"{name}.slices").tolist()))
                perm = f.get_tensor(f"{name}.perm") if f"{name}.perm" in keys else None
                out[name] = QuantizedLinear(QTensor(parse_option(info["option"]), tuple(info["shape"]), slices, perm))
            return out
    except WeightsError:
        raise
    except Exception as exc:              # OSError, KeyError, FormatError, safetensors' SafetensorError
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: unreadable ({why}); {rebuild}") from None


class LayerStore:
    """One checkpoint's layers quantized as a plan assigns them, one safetensors file per layer.

    `salt` separates stores of the same formats made differently (GPTQ on some calibration text vs RTN)."""

    def __init__(self, ckpt: Checkpoint, assignment: Mapping[str, QuantOption], root: Optional[Path] = None,
                 salt: str = ""):
        self.ckpt, self.assignment, self.salt = ckpt, assignment, salt
        self.names = [list(ckpt.layer(i)) for i in range(ckpt.spec.num_layers)]
        self.key = self._key()
        self.dir = Path(root) if root is not None else cache_root() / "layers" / f"{ckpt.path.stem}-{self.key[:16]}"

    def _key(self) -> str:
        """Changes when the source file, the architecture, any layer's format or the salt changes."""
        st = self.ckpt.path.stat()
        parts = [STORE_VERSION, self.salt, str(self.ckpt.path.resolve()), str(st.st_size), str(st.st_mtime_ns)]
        parts += [f"{n}={self.assignment[n].name}" for layer in self.names for n in layer if n in self.assignment]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def path(self, i: int) -> Path:
        return self.dir / f"layer_{i:04d}.safetensors"

    def _fresh(self, i: int) -> bool:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(i)), framework="numpy") as f:
                return file_meta(f).get("key") == self.key
        except Exception:                 # missing, truncated or foreign: rebuild it
            return False

    def missing(self) -> list[int]:
        return [i for i in range(len(self.names)) if not self._fresh(i)]

    def write_layer(self, i: int, tensors: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_tensors(self.path(i), tensors, {"key": self.key, "layer": i})

    def build(self, progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Write every missing or stale layer file, rounding to nearest; returns how many. Resumable."""
        todo = self.missing()
        for done, i in enumerate(todo):
            tensors: dict[str, Any] = {}
            for name in self.names[i]:
                w = self.ckpt[name].numpy(np.float32)
                tensors[name] = (quantize_tensor(self.ckpt, name, w, self.assignment[name])
                                 if name in self.assignment else stored(name, w))
            self.write_layer(i, tensors)
            if progress is not None:
                progress(done + 1, len(todo))
        return len(todo)

    def load(self, i: int) -> dict[str, Any]:
        """Layer i read into fresh arrays: canonical name -> QuantizedLinear or float32 array."""
        return read_tensors(self.path(i), self.names[i], self.key, f"delete {self.dir} and run again to rebuild it")


class WeightMap(Mapping):
    """What the Transformer reads weights from: canonical name -> array or QuantizedLinear, over `names`.
    Subclasses load on __getitem__ and report what they hold (nbytes, and peak_bytes over the run)."""

    names: list[str]

    def materialize(self) -> None:
        """Load everything now, so timings measure inference alone."""
        for name in self.names:
            self[name]

    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def peak_bytes(self) -> int:
        return self.nbytes()

    def close(self) -> None:
        """Release background resources (none unless a subclass has them)."""

    def release(self, names: list[str]) -> None:
        """Forget these tensors, which the caller has copied elsewhere (the GPU engine); they load again on use."""

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class CachedWeights(WeightMap):
    """A WeightMap that keeps what it loads in `cache` (name -> array or QuantizedLinear)."""

    cache: dict[str, Any]

    def nbytes(self) -> int:
        """Bytes held now: packed linears at their format's size, arrays at their dtype's."""
        return sum(v.nbytes for v in self.cache.values())

    def release(self, names: list[str]) -> None:
        for name in names:
            self.cache.pop(name, None)


class StreamedWeights(WeightMap):
    """Canonical name -> weight, with only the resident globals and at most two layers in memory.

    `load_layer(i)` returns layer i's tensors by canonical name; `resident` maps the rest (embed, norm.final
    and, under a plan, the quantized head)."""

    def __init__(self, names: list[str], resident: Callable[[str], Any], load_layer: Callable[[int], dict],
                 num_layers: int, prefetch: bool = True):
        self.names, self._resident_fn, self._load, self.num_layers = names, resident, load_layer, num_layers
        self.resident: dict[str, Any] = {}
        self.current, self.layer = -1, {}
        self.loads = 0                        # layer loads so far: num_layers per forward step
        self._peak = 0                        # most bytes held at once (resident + layers)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramwise-prefetch") if prefetch else None
        self._next: Optional[tuple[int, Future]] = None

    def __getitem__(self, name: str):
        i = layer_of(name)
        if i < 0:
            if name not in self.resident:
                self.resident[name] = self._resident_fn(name)
            return self.resident[name]
        if i != self.current:
            self._enter(i)
        return self.layer[name]

    def _enter(self, i: int) -> None:
        self.layer, self.current = {}, -1             # drop the previous layer before holding the next two
        if self._next is not None and self._next[0] == i:
            layer = self._next[1].result()
        else:
            if self._next is not None:
                self._next[1].result()                 # a stale prefetch: let it finish, then forget it
            layer = self._load(i)
        self._next = None
        self.layer, self.current = layer, i
        self.loads += 1
        held = self.nbytes()
        if self._pool is not None:
            nxt = (i + 1) % self.num_layers
            self._next = (nxt, self._pool.submit(self._load, nxt))
            held += self._layer_bytes_estimate
        self._peak = max(self._peak, held)

    @property
    def _layer_bytes_estimate(self) -> int:
        """The prefetched layer's bytes, counted as soon as its read starts (all layers are alike in size)."""
        return sum(_array_bytes(v) for v in self.layer.values())

    def materialize(self) -> None:
        """Load the resident tensors now (layers are only ever held while they run)."""
        for name in self.names:
            if layer_of(name) < 0:
                self[name]

    def nbytes(self) -> int:
        """Bytes held now: resident tensors plus the layer being run (a prefetch in flight adds one layer)."""
        return sum(_array_bytes(v) for v in self.resident.values()) + sum(_array_bytes(v) for v in self.layer.values())

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


__all__ = ["CachedWeights", "LayerStore", "StreamedWeights", "WeightMap", "cache_root", "layer_of", "quantize_tensor", "read_tensors",
           "write_tensors"]
