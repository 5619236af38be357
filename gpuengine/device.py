"""Whether a CUDA device is usable, asked without importing CuPy on any path that does not need it."""
from __future__ import annotations

from functools import lru_cache


class NoDevice(RuntimeError):
    """No usable CUDA device (CuPy missing, no driver, or no GPU)."""


@lru_cache(maxsize=1)
def unavailable_reason() -> str:
    """'' when CuPy sees a CUDA device, else why not, in a few words."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'vramwise[gpu]', or cupy-cuda13x for CUDA 13)"
    except Exception as exc:                   # a broken CuPy install raises anything at import
        return f"CuPy does not load ({' '.join(str(exc).split())[:120]})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:                   # cupy's CUDARuntimeError: no driver, no device
        return f"no CUDA device ({' '.join(str(exc).split())[:120]})"
    return "" if count > 0 else "no CUDA device"


def available() -> bool:
    return unavailable_reason() == ""


def require() -> None:
    why = unavailable_reason()
    if why:
        raise NoDevice(f"--engine gpu needs a CUDA GPU: {why}; run with --engine ref for the CPU engine")


def name() -> str:
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


@lru_cache(maxsize=1)
def sm_count() -> int:
    """The current device's multiprocessor count (cudaDevAttrMultiProcessorCount): with the plans' model of the
    engine (planner.roofline.moe_prefill_grouped), what its routed experts' prefill path is weighed by."""
    import cupy
    rt = cupy.cuda.runtime
    return int(rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMultiProcessorCount", 16), cupy.cuda.Device().id))


@lru_cache(maxsize=1)
def compute_capability() -> int:
    """The current device's compute capability as major * 10 + minor (90 for Hopper)."""
    import cupy
    return int(cupy.cuda.Device().compute_capability)


@lru_cache(maxsize=1)
def max_shared_per_block() -> int:
    """The most shared memory a block may have on the current device, opted in (cudaDevAttrMaxSharedMemoryPerBlockOptin:
    227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86 / sm_89): the staged matvec's limit."""
    import cupy
    rt = cupy.cuda.runtime
    return int(rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97), cupy.cuda.Device().id))


@lru_cache(maxsize=1)
def nvrtc_version() -> str:
    """The NVRTC that CuPy compiles the kernels with, as "13.0": the same source gets other registers from other
    versions (benchmarks/results/nvrtc_check*.json: the staged matvec 167 under 13.0, 128 under 13.5)."""
    from cupy.cuda import nvrtc
    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"
