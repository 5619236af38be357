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


def pytest_collection_modifyitems(config, items):
    marked = [i for i in items if "gpu" in i.keywords]
    if not marked:
        return
    reason = _cuda_reason()
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def db() -> hwdb.Database:
    return hwdb.load()
