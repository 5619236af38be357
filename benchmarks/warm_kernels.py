"""Compile every GPU kernel program at once, one process each up to --jobs, before the GPU tests and
benchmarks run: CuPy keeps each compiled module in its kernel cache on disk (~/.cupy/kernel_cache), so the
processes that come after load it instead of compiling it again. On a fresh machine one after another, NVRTC
takes about 4 minutes for matvec.cu's families alone (benchmarks/results/nvrtc_check.json, 2 cores);
benchmarks/gpu_check.sh runs this first so that a lent GPU's minutes go to measuring.

Prints each program's seconds as it finishes and the wall time; exits 1 naming a program that does not
compile (NVRTC's log after it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import benchlib  # noqa: F401 - puts the repository on sys.path

from gpuengine import kernels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes at once (default: the CPUs)")
    ap.add_argument("--variant", action="append", default=[""], choices=sorted(kernels.VARIANTS),
                    help="also compile matvec.cu with this variant's options (repeatable; e.g. regs)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        sys.exit(f"error: --jobs {args.jobs}: give 1 or more")
    todo = [p for p in kernels.programs() if p[2] in args.variant]
    t0 = time.perf_counter()
    done = 0
    try:
        for program, seconds in kernels.warm(args.jobs, todo):
            done += 1
            print(f"{kernels.label(program):28} {seconds:6.1f} s   ({done}/{len(todo)} at "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
    except RuntimeError as e:                                     # kernels.warm names the program
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(todo)} programs in {time.perf_counter() - t0:.1f} s with {args.jobs} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
