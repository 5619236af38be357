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


# When the device does not say (the attributes below are missing): an RTX 4090's 1,008 GB/s.
DEFAULT_BANDWIDTH_GB_S = 1008.0


@lru_cache(maxsize=1)
def bandwidth_gb_s() -> float:
    """The current device's peak memory bandwidth, from its memory clock and bus width (two transfers a clock):
    what the engine weighs its own choices by (planner.roofline.moe_prefill_grouped), as plans weigh hwdb's."""
    import cupy
    try:        # cudaDeviceAttr values 36 and 37 (CUDA 13 keeps these where it dropped cudaDeviceProp's fields)
        rt = cupy.cuda.runtime
        dev = cupy.cuda.Device().id
        khz = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMemoryClockRate", 36), dev)
        bits = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrGlobalMemoryBusWidth", 37), dev)
    except Exception:                        # noqa: BLE001 - a runtime without these attributes
        return DEFAULT_BANDWIDTH_GB_S
    return 2 * khz * 1e3 * bits / 8 / 1e9 if khz > 0 and bits > 0 else DEFAULT_BANDWIDTH_GB_S


@lru_cache(maxsize=1)
def compute_capability() -> int:
    """The current device's compute capability as major * 10 + minor (90 for Hopper)."""
    import cupy
    return int(cupy.cuda.Device().compute_capability)
