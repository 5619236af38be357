"""Every GPU kernel compiled as the engine compiles it, without a GPU: NVRTC (the compiler CuPy's RawModule
calls at run time), one program per source and compile family (gpuengine.kernels.family) and variant, with the
options CuPy 14 passes, for one architecture (sm_90, the H100 / H200, by default). Reports each kernel's
registers, stack and local memory (spills), static shared memory, and each compile's seconds and warnings.

Why: nvcc builds of matvec.cu (benchmarks/matvec_sass.py) are not what a GPU run compiles. NVRTC has no host
side, takes templates through name expressions, and its version can differ from nvcc's. A kernel NVRTC refuses
costs a lent GPU's test run; this finds it here. It is not a speed.

Needs libnvrtc (CUDA 12 or 13; `pip install nvidia-cuda-nvrtc`) and cuobjdump (`pip install
nvidia-cuda-cuobjdump`), no CuPy. Prints a table, writes benchmarks/results/nvrtc_check.json, and exits 1 if
any program fails to compile.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import date
from pathlib import Path

from benchlib import ROOT, write_json
from matvec_sass import tool

from gpuengine.kernels import OPTIONS, SOURCES, expressions, label, options, programs, source  # noqa: E402

# CuPy 14's NVRTC options beyond the program's own (kernels.options):
# cupy/cuda/compiler.py's _compile_with_cache_cuda adds -ftz=true, and _compile_using_nvrtc the architecture as
# sm_XX (so NVRTC makes a cubin) and the default execution space
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def find_nvrtc() -> str:
    """libnvrtc from a pip-installed NVIDIA wheel, /usr/local/cuda, or the loader's path."""
    site = sysconfig.get_paths()["purelib"]
    for pattern in (os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so.*"),
                    os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.*"),
                    "/usr/local/cuda/lib64/libnvrtc.so*"):
        found = [p for p in sorted(glob.glob(pattern)) if "builtins" not in p]
        if found:
            return found[0]
    import ctypes.util
    found = ctypes.util.find_library("nvrtc")
    if not found:
        sys.exit("error: libnvrtc not found: `pip install nvidia-cuda-nvrtc` (CUDA 13) or install the CUDA toolkit")
    return found


class Nvrtc:
    """The few NVRTC calls a compile takes (nvrtc.h), through ctypes."""

    def __init__(self, path: str):
        # libnvrtc opens its builtins library by name at the first compile: load the one beside it first, as a
        # pip wheel's folder is not on the loader's path (NVRTC 13.0 from pip failed to find it otherwise)
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*"))):
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"

    def _check(self, status: int, call: str) -> None:
        if status:
            raise RuntimeError(f"{call}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile(self, text: str, name: str, options: tuple[str, ...], expressions: tuple[str, ...]
                ) -> tuple[bool, str, bytes, dict[str, str]]:
        """(compiled, log, cubin, {name expression: lowered name})."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            for e in expressions:
                self._check(self.lib.nvrtcAddNameExpression(prog, e.encode()), "nvrtcAddNameExpression")
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = self.lib.nvrtcCompileProgram(prog, len(options), argv)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = buf.value.decode(errors="replace").strip()
            if status:
                return False, log, b"", {}
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            lowered = {}
            for e in expressions:
                out = ctypes.c_char_p()
                self._check(self.lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(out)), "nvrtcGetLoweredName")
                lowered[e] = out.value.decode()
            return True, log, cubin.raw, lowered
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


RESOURCE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(listing: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage's lines, by mangled kernel name."""
    return {m.group(1): {"registers": int(m.group(2)), "stack": int(m.group(3)), "shared": int(m.group(4)),
                         "local": int(m.group(5))}
            for m in RESOURCE.finditer(listing)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90", help="the architecture NVRTC compiles for (default sm_90)")
    ap.add_argument("--nvrtc", help="the libnvrtc to load (default: found in pip's NVIDIA wheels or CUDA)")
    ap.add_argument("--only", help="compile only the programs of this source (e.g. matvec)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nvrtc_check.json")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        sys.exit(f"error: --arch {args.arch!r} is not an architecture such as sm_90")
    todo = [p for p in programs() if args.only in (None, p[0])]
    if not todo:
        sys.exit(f"error: --only {args.only!r} names no source; the sources are {', '.join(SOURCES)}")
    path = args.nvrtc or find_nvrtc()
    try:
        nvrtc = Nvrtc(path)
    except (OSError, AttributeError) as exc:              # not a loadable library, or not libnvrtc
        sys.exit(f"error: {path!r} is not a loadable libnvrtc ({exc}); give --nvrtc the path of libnvrtc.so from "
                 "CUDA or pip's nvidia-cuda-nvrtc")
    cuobjdump = tool("cuobjdump")
    rows, compiles, failed = [], [], 0
    with tempfile.TemporaryDirectory() as work:
        for name, fam, variant in todo:
            exprs = expressions(name, fam)
            opts = (*options(name, fam, variant), f"-arch={args.arch}", *CUPY_OPTIONS)
            t0 = time.perf_counter()
            ok, log, cubin, lowered = nvrtc.compile(source(name), f"{name}.cu", opts, exprs)
            seconds = time.perf_counter() - t0
            compiles.append({"source": name, "family": fam, "variant": variant, "compiled": ok,
                             "seconds": round(seconds, 2), "log": log[-4000:]})
            print(f"{label((name, fam, variant)):28} {'ok' if ok else 'FAILED':6} {seconds:6.1f} s" + (f"  ({len(log.splitlines())} "
                  "log lines)" if log else ""), flush=True)
            if not ok:
                failed += 1
                print("\n".join("    " + line for line in log.splitlines()[:40]))
                continue
            path = Path(work) / "k.cubin"
            path.write_bytes(cubin)
            usage = resource_usage(subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True,
                                                  text=True, check=True).stdout)
            by_mangled = {v: k for k, v in lowered.items()}
            for mangled, use in sorted(usage.items()):
                rows.append({"source": name, "family": fam, "variant": variant,
                             "kernel": by_mangled.get(mangled, mangled), **use})
    print(f"\n{'kernel':40} {'variant':8} {'regs':>5} {'stack':>6} {'local':>6} {'shared':>7}")
    for r in rows:
        print(f"{r['kernel'][:40]:40} {r['variant']:8} {r['registers']:>5} {r['stack']:>6} {r['local']:>6} "
              f"{r['shared']:>7}")
    write_json({"date": date.today().isoformat(), "arch": args.arch, "nvrtc": nvrtc.version,
                "options": [*OPTIONS, "-arch=" + args.arch, *CUPY_OPTIONS],
                "what": "each kernel as NVRTC compiles it for the engine (CuPy's options), without a GPU: "
                        "registers, stack and local bytes, static shared bytes (not a speed)",
                "failed": failed, "compiles": compiles, "kernels": rows}, args.out)
    print(f"wrote {args.out}" + (f"; {failed} program(s) failed to compile" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
