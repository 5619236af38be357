"""Shared fixtures; GPU tests carry the `gpu` marker and skip with a reason when CUDA is absent."""
from __future__ import annotations

import importlib.util

import pytest

import hwdb


def _cuda_reason() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install -e '.[gpu]')"
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device visible"
    except Exception as exc:  # noqa: BLE001 - any CUDA init failure means: skip, with its text
        return f"CUDA unavailable: {exc}"
    return None


def _emulation_reason() -> str | None:
    import cudaemu
    return cudaemu.unavailable_reason()


def pytest_collection_modifyitems(config, items):
    for marker, why in (("gpu", _cuda_reason), ("cudaemu", _emulation_reason)):
        marked = [i for i in items if marker in i.keywords]
        reason = why() if marked else None
        if reason:
            for item in marked:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def db() -> hwdb.Database:
    return hwdb.load()


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cpu", marks=pytest.mark.cudaemu)])
def backend(request, monkeypatch) -> str:
    """Where a GPU-engine test runs its kernels: on the GPU, or the same sources compiled for the CPU
    (tests/cudaemu.py), over gpu_fake's CuPy stand-in."""
    if request.param == "cpu":
        import cudaemu
        cudaemu.install(monkeypatch)
    return request.param

