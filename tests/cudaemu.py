"""The CUDA kernels of gpuengine/kernels, compiled by g++ and run on the CPU (tests/cudaemu.h), so the GPU
kernel tests also run on machines without a GPU (CI's among them).

`function(module, kernel)` stands in for gpuengine.kernels.function: the same sources, the same launch
call (grid, block, args) with NumPy arrays for device arrays, so gpuengine/launch.py's launchers run
unchanged. Arguments are checked against the kernel's parameter sizes, which CUDA does not do. `install`
puts the stand-in in place for one test, with tests/gpu_fake.py's CuPy stand-in under it; cuBLAS's GEMM,
the one piece of device code not in the sources, is gpu_fake's NumPy reference.

What it proves is the kernels' logic and arithmetic on every CI run; speed and the GPU's own behaviour are
only measured on a GPU (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gpuengine import kernels

HEADER = Path(__file__).with_name("cudaemu.h")
CXX = os.environ.get("CXX", "g++")
FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-w")


class EmulationError(RuntimeError):
    """A kernel misused barriers or shuffles in a way that is undefined on a GPU (cudaemu.h names it)."""


PROBE = r"""
__device__ __forceinline__ float probe_half(float f) { return (float)(_Float16)f; }
extern "C" __global__ void probe(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = probe_half((float)threadIdx.x);
    __syncthreads();
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, s[63 - threadIdx.x], 1);
}
"""


@lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why the kernels cannot run on this CPU (None when they can): no Linux, no g++, or a g++ that cannot
    build the header (it needs C++17 and _Float16: GCC 12 on x86-64), found by building a probe kernel."""
    if platform.system() != "Linux":
        return f"CUDA emulation needs Linux (ucontext fibers), not {platform.system()}"
    if shutil.which(CXX) is None:
        return f"no C++ compiler ({CXX}) to build the CUDA kernels for the CPU"
    try:
        out = np.zeros(64, np.float32)
        build("probe", PROBE, ["probe"])["probe"]((1,), (64,), (out,))
    except (EmulationError, OSError) as exc:
        first = next((line for line in str(exc).splitlines()[1:] if "error" in line), str(exc).splitlines()[0])
        return f"{CXX} cannot build the CPU twin of the CUDA kernels: {first.strip()[:200]}"
    if out.tolist() != [float(63 - (i ^ 1)) for i in range(64)]:
        return "the CPU twin of the CUDA kernels gives wrong results on this machine"
    return None


def kernel_names(module: str) -> list[str]:
    """Every kernel of a source: its extern "C" kernels and the template instances the engine names."""
    plain = re.findall(r'extern "C" __global__ void (\w+)', kernels.source(module))
    return plain + list(kernels.NAME_EXPRESSIONS.get(module, ()))


def program(source: str, names: list[str]) -> str:
    """The C++ translation unit: the header, the kernel source, and a table of launch entry points."""
    glue = ["", "namespace {"]
    for i, name in enumerate(names):
        glue.append(f"bool vw_launch_{i}(dim3 g, dim3 b, size_t d, void** a, std::string& e) "
                    f"{{ return emu::launch(g, b, d, [a] {{ emu::call(&{name}, a); }}, e); }}")
    glue.append("}")
    glue.append('extern "C" int vw_signature(int i, long long* sizes) { switch (i) {')
    glue += [f"    case {i}: return emu::signature(&{name}, sizes);" for i, name in enumerate(names)]
    glue.append("} return -1; }")
    glue.append('extern "C" int vw_launch(int i, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                'unsigned bz, unsigned long long shared, void** args, char* err, int errlen) {')
    glue.append("    std::string e; bool ok = false; dim3 g{gx, gy, gz}, b{bx, by, bz}; switch (i) {")
    glue += [f"    case {i}: ok = vw_launch_{i}(g, b, (size_t)shared, args, e); break;" for i in range(len(names))]
    glue.append("    default: e = \"no such kernel\"; }")
    glue.append("    if (!ok) snprintf(err, errlen, \"%s\", e.c_str()); return ok; }")
    return f'#include "{HEADER}"\n{source}\n' + "\n".join(glue) + "\n"


def _cache_dir() -> Path:
    base = os.environ.get("VRAMWISE_CUDAEMU_CACHE") or os.path.join(tempfile.gettempdir(), "vramwise-cudaemu")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(label: str, source: str, names: list[str]) -> dict[str, "Kernel"]:
    """Kernels `names` of a CUDA source, compiled for the CPU (cached on disk by the text's hash)."""
    text = program(source, names)
    key = hashlib.sha256((text + HEADER.read_text() + " ".join((CXX, *FLAGS))).encode()).hexdigest()[:16]
    so = _cache_dir() / f"{label}-{key}.so"
    if not so.exists():
        src = so.with_suffix(f".{os.getpid()}.cpp")
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        src.write_text(text)
        done = subprocess.run([CXX, *FLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True)
        src.unlink()
        if done.returncode:
            raise EmulationError(f"{CXX} failed on {label}:\n{done.stderr[-4000:]}")
        os.replace(tmp, so)                        # atomic: a parallel build never loads half a file
    lib = ctypes.CDLL(str(so))
    lib.vw_launch.restype = ctypes.c_int
    lib.vw_launch.argtypes = ([ctypes.c_int] + [ctypes.c_uint] * 6
                              + [ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int])
    return {name: Kernel(lib, i, name) for i, name in enumerate(names)}


@lru_cache(maxsize=None)
def module(name: str) -> dict[str, "Kernel"]:
    """One of gpuengine/kernels' sources, every kernel of it."""
    return build(name, kernels.source(name), kernel_names(name))


# Dynamic shared memory a block may have: 48 KiB unless the kernel's max_dynamic_shared_size_bytes is raised,
# as CUDA's launch refuses more; at most the 227 KiB of an sm_90 SM's opt-in.
DEFAULT_DYNAMIC_SHARED, MAX_DYNAMIC_SHARED = 48 * 1024, 227 * 1024


class Kernel:
    """One kernel, called as CuPy's RawModule functions are: kernel(grid, block, args, shared_mem=0), with
    CuPy Function's settable max_dynamic_shared_size_bytes."""

    def __init__(self, lib: ctypes.CDLL, index: int, name: str):
        self.lib, self.index, self.name = lib, index, name
        sizes = (ctypes.c_longlong * 64)()
        self.sizes = list(sizes[:self.lib.vw_signature(self.index, sizes)])
        self._max_dynamic = DEFAULT_DYNAMIC_SHARED

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, n: int) -> None:
        if not 0 <= n <= MAX_DYNAMIC_SHARED:
            raise EmulationError(f"{self.name}: {n} bytes of dynamic shared memory (at most {MAX_DYNAMIC_SHARED})")
        self._max_dynamic = n

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        if len(args) != len(self.sizes):
            raise EmulationError(f"{self.name}: {len(args)} arguments for {len(self.sizes)} parameters")
        keep, ptrs = [], (ctypes.c_void_p * max(1, len(args)))()
        for i, (a, size) in enumerate(zip(args, self.sizes)):
            if isinstance(a, np.ndarray) and a.dtype.fields is not None:   # a struct, by value
                value = np.ascontiguousarray(a)
                got = value.nbytes
            elif isinstance(a, np.ndarray):                              # a device array: its address
                value = np.array([a.ctypes.data], dtype=np.uint64)
                got = 8
            elif isinstance(a, np.generic):
                value = np.array(a)
                got = value.itemsize
            else:
                raise EmulationError(f"{self.name}: argument {i} is a {type(a).__name__}, not a NumPy value")
            if got != size:
                raise EmulationError(f"{self.name}: argument {i} has {got} bytes, the parameter {size}")
            keep.append(value)
            ptrs[i] = value.ctypes.data
        g = (tuple(grid) + (1, 1))[:3]
        b = (tuple(block) + (1, 1))[:3]
        if min(g) < 1 or min(b) < 1 or int(np.prod(b)) > 1024:
            raise EmulationError(f"{self.name}: launch of grid {g}, block {b}")
        if not 0 <= shared_mem <= self._max_dynamic:
            raise EmulationError(f"{self.name}: {shared_mem} bytes of dynamic shared memory, over the kernel's "
                                 f"{self._max_dynamic} (max_dynamic_shared_size_bytes)")
        err = ctypes.create_string_buffer(512)
        if not self.lib.vw_launch(self.index, *g, *b, shared_mem, ptrs, err, len(err)):
            raise EmulationError(f"{self.name}: {err.value.decode()}")


def function(module_name: str, kernel: str) -> Kernel:
    """gpuengine.kernels.function's stand-in (a variant's options are the GPU compiler's: the twin ignores them)."""
    module_name = module_name.partition(":")[0]
    found = module(module_name)
    if kernel not in found:
        raise EmulationError(f"{module_name}.cu has no kernel {kernel!r} (it has {', '.join(found)})")
    return found[kernel]


def install(monkeypatch: Any) -> None:
    """Run gpuengine's launchers on the emulated kernels for one test, over gpu_fake's CuPy stand-in."""
    import gpu_fake
    from gpuengine import device, launch

    gpu_fake.install_runtime(monkeypatch)
    monkeypatch.setattr(device, "compute_capability", lambda: 90)       # the twin's mma is sm_80+'s
    monkeypatch.setattr(device, "sm_count", lambda: 132)
    monkeypatch.setattr(device, "max_shared_per_block", lambda: MAX_DYNAMIC_SHARED)
    monkeypatch.setattr(device, "nvrtc_version", lambda: "none (the CPU twin)")
    monkeypatch.setattr(kernels, "function", function)
    monkeypatch.setattr(launch, "function", function)
    monkeypatch.setattr(launch, "gemm", gpu_fake.LAUNCHERS["gemm"])
