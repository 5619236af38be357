"""CUDA kernel sources (.cu), compiled through CuPy's RawModule (NVRTC) once per process; CuPy caches the
compiled code on disk (~/.cupy/kernel_cache), so later runs skip the compiler.

Each source is compiled with common.cuh in front of it and `#line` directives, so compiler messages name
the real file and line. Template kernels are reached through `name_expressions`."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from planner.formats import KV_CODES

# The packed matvec's compiled shapes, qmatvec<R, U, L, N> (matvec.cu): R rows a block, U units in flight a
# thread, L values of a unit a lane (8: quads, 32: a unit a lane); each unit-a-lane shape with N = 0 to 3
# (bit 0: RMSNorm folded in, bit 1: x gathered in the kernel) and N = 16 (its loads in program order:
# launch.MatvecShape.ordered), and each as qmatvec_moe<R, U, L> (routed experts).
# launch.MATVEC picks a shape.
MATVEC_INSTANCES = ((1, 4, 8), (2, 4, 8), (2, 8, 8), (4, 4, 8), (2, 1, 32), (4, 1, 32), (4, 2, 32), (8, 1, 32))

# The staged matvec's rows a block: qmatvec<R, 1, 32, N> and qmatvec_moe<R, 1, 32, N> (a unit a lane, each
# thread's weights copied into shared memory by cp.async; launch.MatvecShape.staged), N = 4, or 12 with the
# integer dot (launch.MatvecShape.idot).
MATVEC_STAGED = (4, 8, 16)

# The tensor-core matvec's compiled tiles of 8 rows a warp, tmatvec<T, N> (matvec.cu; launch.MATVEC_TC), each
# plain (N = 0) and folding RMSNorm in (N = 1).
TC_TILES = (1, 2, 4)

# Template instantiations per source: the KV-cache kernels take the format code (planner.formats.KV_CODES);
# attention_gqa<FMT, STEP> also whether it is a decode step's whole attention (RoPE, cache store, merge).
NAME_EXPRESSIONS = {
    "attention": tuple(f"{k}<{c}>" for k in ("rope_store", "attention", "attention_lanes", "attention_tiled")
                       for c in KV_CODES.values())
    + tuple(f"attention_gqa<{c}, {step}>" for c in KV_CODES.values() for step in (0, 1)),
    "matvec": tuple(f"qmatvec<{r}, {u}, {lane}, {n}>" for r, u, lane in MATVEC_INSTANCES
                    for n in ((0, 1, 2, 3, 16) if lane == 32 else (0,)))
    + tuple(f"qmatvec_moe<{r}, {u}, {lane}>" for r, u, lane in MATVEC_INSTANCES)
    + tuple(f"{k}<{r}, 1, 32, {n}>" for r in MATVEC_STAGED for n in (4, 12) for k in ("qmatvec", "qmatvec_moe"))
    + tuple(f"tmatvec<{t}, {n}>" for t in TC_TILES for n in (0, 1)),
}
SOURCES = ("matvec", "dequant", "norm", "attention", "sample", "moe")


def source(name: str) -> str:
    """The text NVRTC compiles for one kernel file: common.cuh, then the file, each under its own #line."""
    here = resources.files(__package__)
    common = (here / "common.cuh").read_text(encoding="utf-8")
    body = (here / f"{name}.cu").read_text(encoding="utf-8")
    return f'#line 1 "common.cuh"\n{common}\n#line 1 "{name}.cu"\n{body}'


def family(module_name: str, kernel: str) -> str:
    """Which compile of a source holds a kernel. matvec.cu's template instances are compiled on first use only,
    a family at a time: each packed shape (R, U, L) with its variants (qmatvec<R, U, L, N> for every N, and
    qmatvec_moe<R, U, L>), each staged shape (qmatvec<R, 1, 32, N> and qmatvec_moe<R, 1, 32, N>, N = 4 and 12:
    "Rx1x32s"), and
    the tensor-core matvec. A run needs the one shape launch.MATVEC names.
    Instantiating every shape at once took nvcc 49 s for sm_90 on a 2-core VM; the quads alone 3.2 s, the
    tensor-core matvec 6.1 s."""
    if module_name != "matvec" or "<" not in kernel:
        return ""
    if kernel.startswith("tmatvec"):
        return "tensor"
    r, u, lane, *n = (v.strip() for v in kernel[kernel.index("<") + 1:-1].split(","))   # qmatvec<R, U, L, N>
    return f"{r}x{u}x{lane}" + ("s" if n in (["4"], ["12"]) else "")                   # qmatvec_moe<R, U, L[, N]>


# A source's variant, after a colon in the module name launch asks for: "matvec:regs" compiles matvec.cu with
# its register caps (VRAMWISE_MATVEC_REGS: launch.MATVEC_REGS).
VARIANTS = {"regs": ("-DVRAMWISE_MATVEC_REGS",)}


# The options of every compile (CuPy's RawModule adds its own: benchmarks/nvrtc_check.py names them).
OPTIONS = ("--std=c++17",)


def expressions(name: str, fam: str = "") -> tuple[str, ...]:
    """The template instances one compile of a source takes: those of family `fam` (and any of no family)."""
    return tuple(e for e in NAME_EXPRESSIONS.get(name, ()) if family(name, e) in (fam, ""))


def programs() -> list[tuple[str, str, str]]:
    """(source, family, variant) of every compile the engine may ask for: each source once, matvec.cu once a
    family and variant (its extern "C" kernels come with every family, so it has none of its own)."""
    out = []
    for name in SOURCES:
        families = sorted({family(name, e) for e in NAME_EXPRESSIONS.get(name, ())} or {""})
        for variant in ("", *VARIANTS) if name == "matvec" else ("",):
            out += [(name, fam, variant) for fam in families]
    return out


def label(program: tuple[str, str, str]) -> str:
    """A program (programs()) as its messages name it: "matvec:regs [8x1x32s]"."""
    name, fam, variant = program
    return name + (f":{variant}" if variant else "") + (f" [{fam}]" if fam else "")


def options(name: str, fam: str = "", variant: str = "") -> tuple[str, ...]:
    """The compiler options of one program: OPTIONS, the variant's, and with the register caps its family
    (matvec.cu compiles the capped specializations of that family only: VRAMWISE_CAPS_<family>)."""
    out = (*OPTIONS, *VARIANTS.get(variant, ()))
    if name == "matvec" and variant == "regs" and fam:
        out += (f"-DVRAMWISE_CAPS_{fam}",)
    return out


@lru_cache(maxsize=None)
def module(name: str, fam: str = "", variant: str = ""):
    """One source compiled with the template instances of one family (its extern "C" kernels always), and the
    options of the program (options(): a variant's, VARIANTS, among them)."""
    import cupy

    return cupy.RawModule(code=source(name), options=options(name, fam, variant),
                          name_expressions=expressions(name, fam))


def _compile(program: tuple[str, str, str]) -> float:
    import time

    t0 = time.perf_counter()
    module(*program).compile()              # NVRTC, or a load from CuPy's cache
    return time.perf_counter() - t0


def warm(jobs: int, todo: list[tuple[str, str, str]] | None = None):
    """Compile every program (programs()) in `jobs` processes at once, so that CuPy's kernel cache on disk holds
    them all and later processes load each in milliseconds instead of compiling it (NVRTC takes from under a
    second to a minute a program: benchmarks/results/nvrtc_check.json). Yields (program, seconds) as each
    finishes; a program that fails raises a RuntimeError naming it, with CuPy's error (NVRTC's log) after."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = programs() if todo is None else todo
    first = sorted(todo, key=lambda p: p[0] != "matvec")       # matvec.cu's families take the longest
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        running = {pool.submit(_compile, p): p for p in first}
        for done in as_completed(running):
            program = running[done]
            try:
                seconds = done.result()
            except Exception as e:
                raise RuntimeError(f"{label(program)}: {e}") from e
            yield program, seconds
    finally:
        pool.shutdown(cancel_futures=True)


@lru_cache(maxsize=None)
def function(module_name: str, kernel: str):
    """A kernel of module `name` or `name:variant` (VARIANTS)."""
    name, _, variant = module_name.partition(":")
    return module(name, family(name, kernel), variant).get_function(kernel)
