"""The decode matvec's machine code, counted without a GPU: compiles gpuengine/kernels/matvec.cu with nvcc for
one architecture (sm_90, the H100 / H200, by default), disassembles it with cuobjdump, and for each compiled
qmatvec and tensor-core tmatvec instance and bit width reports the registers and the SASS instructions per
weight of its inner loop.

On the H200 the quad layout's matvec was bound by instruction issue (ncu, GPU_NOTES.md run 8: 7.7
instructions per weight, schedulers issuing on 56% of cycles), so this static count is the first check of a
new layout before device time is spent on it. It is not a speed: only a GPU run (benchmarks/gpu_check.sh)
says how fast a kernel is.

Needs nvcc (CUDA 12 or 13), cuobjdump and nvdisasm (in CUDA, or `pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm`). Prints a table and writes benchmarks/results/matvec_sass.json.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from datetime import date
from pathlib import Path

from benchlib import ROOT, write_json

from gpuengine.kernels import MATVEC_INSTANCES, MATVEC_STAGED, TC_TILES, source  # noqa: E402

# the decode's mask of a code in a float's top mantissa bits (matvec.cu's code_float / unit_code): its
# immediate names the bit width of the loop it appears in, and each occurrence is one decoded weight
MASKS = {((1 << b) - 1) << (23 - b): b for b in (2, 3, 4, 5, 6, 8)}


def tool(name: str) -> str:
    """A CUDA tool from PATH, /usr/local/cuda/bin, or a pip-installed NVIDIA wheel."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/cuda/bin")
    if not found:
        site = sysconfig.get_paths()["purelib"]
        found = next(iter(sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", name)))), None)
    if not found:
        sys.exit(f"error: {name} not found: install the CUDA toolkit (or, for cuobjdump and nvdisasm, "
                 "`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`)")
    return found


def compile_matvec(arch: str, work: Path) -> tuple[str, dict[str, int], str]:
    """(SASS listing, registers per kernel, nvcc's version line)."""
    nvcc = tool("nvcc")
    cu = work / "matvec.cu"
    cu.write_text(source("matvec"))
    done = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "--std=c++17", "-DVRAMWISE_NVCC_CHECK", "-Xptxas", "-v",
                           "-o", str(work / "matvec.cubin"), str(cu)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: nvcc failed:\n{done.stderr[-3000:]}")
    regs, current = {}, None
    for line in done.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            regs[current] = int(m.group(1))
    env = dict(os.environ, NVDISASM_PATH=str(Path(tool("nvdisasm")).parent))      # cuobjdump runs nvdisasm
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(work / "matvec.cubin")], capture_output=True, text=True,
                          check=True, env=env).stdout
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return sass, regs, version


def qmatvec_name(r: int, u: int, lane: int, n: int) -> str:
    """qmatvec<R, U, L, N>'s mangled name, as the disassembly names it."""
    return f"_Z7qmatvecILi{r}ELi{u}ELi{lane}ELi{n}EEvPKfi4QMatS2_S2_6NormIn4XMap"


def function_body(sass: str, mangled: str) -> str:
    """One kernel's part of the disassembly."""
    m = re.search(rf"Function : {mangled}\n(.*?)(?=\n\s+Function : |\Z)", sass, re.S)
    if not m:
        sys.exit(f"error: {mangled} not in the disassembly")
    return m.group(1)


def loop_ranges(body: str) -> list[tuple[int, int, list[str]]]:
    """Each backward branch's body: (first address, last address, instruction texts in address order)."""
    ins = [(int(a, 16), op.strip()) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
    out = []
    for addr, op in ins:
        m = re.search(r"BRA\s+(?:\w+\s+)?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            out.append((start, addr, [o for a, o in ins if start <= a <= addr]))
    return out


def loops(body: str) -> list[list[str]]:
    """Each backward branch's body (address order), as instruction texts."""
    return [texts for _, _, texts in loop_ranges(body)]


def width_of(loop: list[str]) -> tuple[int, int] | None:
    """(bits, weights an iteration) of an inner decode loop: its commonest mask immediate and how often it
    appears; None for a loop with no decode or one spanning several widths."""
    found = collections.Counter()
    for op in loop:
        if op.split()[0].startswith("LOP3") or "LOP3" in op:
            for imm in re.findall(r"0x([0-9a-f]+)", op):
                if int(imm, 16) in MASKS:
                    found[MASKS[int(imm, 16)]] += 1
    if len(found) != 1:
        return None
    (bits, n), = found.items()
    return bits, n


def controls(body: str) -> list[tuple[int, str, str]]:
    """Each instruction of a kernel's disassembly as (address, text, its control bits decoded): sm_70 and
    later keep them in the top bits of an instruction's second 64-bit word (bit 41 on): stall cycles (S), the
    scoreboard a variable-latency instruction sets when its result lands (W) or its sources are read (R), and
    the scoreboards it waits for first. A load's first use waits on the load's W: how far apart the two are is
    how long the load had in flight."""
    out = []
    for addr, text, hi in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);[^\n]*\n\s*/\* 0x([0-9a-f]{16}) \*/", body):
        ctl = int(hi, 16) >> 41
        bits = [f"S{ctl & 15:02d}"]
        if (ctl >> 5) & 7 != 7:
            bits.append(f"W{(ctl >> 5) & 7}")
        if (ctl >> 8) & 7 != 7:
            bits.append(f"R{(ctl >> 8) & 7}")
        if (ctl >> 11) & 63:
            bits.append("wait[" + ",".join(str(b) for b in range(6) if (ctl >> (11 + b)) & 1) + "]")
        out.append((int(addr, 16), " ".join(text.split()), " ".join(bits)))
    return out


def load_bytes(op: str) -> int:
    """The bytes one lane's load instruction reads (LDG.E.128: 16, .64: 8, .U16: 2, ...; a plain LDG.E: 4)."""
    m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[m.group(1)] if m else 4


def x_bases(ins: list[tuple[int, str, str]]) -> set[str]:
    """The address registers of a loop's x loads: load_x32 reads a unit's x as 8 16-byte vectors off one
    address (offsets 0x0 to 0x70), where a row's weights take one or two such vectors (or up to 5 words), its
    scale one 2-byte load."""
    bases = collections.Counter(m.group(1) for _, text, _ in ins if text.startswith("LDG.E.128")
                                for m in [re.search(r"\[(R\d+)\.64", text)] if m)
    return {b for b, n in bases.items() if n >= 8}


def bytes_in_flight(ins: list[tuple[int, str, str]], weights_only: bool = False) -> int:
    """The most bytes of global loads (LDG) a lane has in flight at once in a loop (controls() of its
    instructions), in the steady state: a load counts from its issue until an instruction waits on its
    scoreboard (W), and the loop runs twice so that loads issued for the next iteration count. weights_only:
    leave out x's loads (x_bases; x is read from L2, the weights and scales from DRAM)."""
    skip = x_bases(ins) if weights_only else set()
    waiting: collections.Counter = collections.Counter()
    most = 0
    for lap in range(2):
        for _, text, ctl in ins:
            m = re.search(r"wait\[([\d,]+)\]", ctl)
            for sb in m.group(1).split(",") if m else ():
                waiting[sb] = 0
            w = re.search(r"\bW(\d)", ctl)
            base = re.search(r"\[(R\d+)\.64", text)
            if text.split()[0].startswith("LDG.") and w and not (base and base.group(1) in skip):
                waiting[w.group(1)] += load_bytes(text.split()[0])
            if lap:
                most = max(most, sum(waiting.values()))
    return most


def main_loops(sass: str, mangled: str) -> dict[int, tuple[int, int, int]]:
    """bits -> (weights an iteration, instructions, weight and scale bytes in flight) of each width's main loop:
    the most weights an iteration, and of loops with as many, the shortest (the others are the same step
    bounded for a slice's last unit, or a variant the compiler split off on a runtime condition)."""
    body = function_body(sass, mangled)
    found: dict[int, list[tuple[int, int, int, int]]] = {}
    for first, last, loop in loop_ranges(body):
        if (w := width_of(loop)):
            found.setdefault(w[0], []).append((w[1], len(loop), first, last))
    out = {}
    ins = controls(body)
    for bits, found_loops in found.items():
        weights = max(w for w, *_ in found_loops)
        _, n, first, last = min((f for f in found_loops if f[0] == weights), key=lambda f: f[1])
        out[bits] = (weights, n, bytes_in_flight([i for i in ins if first <= i[0] <= last], weights_only=True))
    return out


def analyse(sass: str, regs: dict[str, int]) -> list[dict]:
    rows = []
    for r, u, lane in MATVEC_INSTANCES:
        mangled = qmatvec_name(r, u, lane, 0)
        variants = {label: qmatvec_name(r, u, lane, n)      # the same shape folding RMSNorm in, gathering x, ordered
                    for n, label in ((1, "norm_folded"), (2, "gathered"), (16, "ordered")) if lane == 32}
        found_variants = {label: main_loops(sass, name) for label, name in variants.items()}
        for bits, (weights, n_ins, flight) in sorted(main_loops(sass, mangled).items()):
            row = {"instance": f"qmatvec<{r}, {u}, {lane}>", "layout": "quads" if lane == 8 else "unit a lane",
                   "bits": bits, "registers": regs.get(mangled), "loop_instructions": n_ins,
                   "weights_per_iteration": weights, "instructions_per_weight": round(n_ins / weights, 2),
                   "weight_bytes_in_flight": flight}
            for label, found in found_variants.items():
                if bits in found:
                    row[f"instructions_per_weight_{label}"] = round(found[bits][1] / found[bits][0], 2)
                    row[f"registers_{label}"] = regs.get(variants[label])
                    row[f"weight_bytes_in_flight_{label}"] = found[bits][2]
            rows.append(row)
    for r in MATVEC_STAGED:                     # staged through shared memory (qmatvec<R, 1, 32, 4>)
        mangled = qmatvec_name(r, 1, 32, 4)
        for bits, (weights, n_ins, _) in sorted(main_loops(sass, mangled).items()):   # (its loads: LDGSTS)
            rows.append({"instance": f"qmatvec<{r}, 1, 32, 4>", "layout": "staged", "bits": bits,
                         "registers": regs.get(mangled), "loop_instructions": n_ins, "weights_per_iteration": weights,
                         "instructions_per_weight": round(n_ins / weights, 2)})
        mangled = qmatvec_name(r, 1, 32, 12)                # and with the integer dot (2, 4 and 8 bits)
        for bits, (weights, n_ins) in sorted(idot_loops(sass, mangled, r).items()):
            rows.append({"instance": f"qmatvec<{r}, 1, 32, 12>", "layout": "staged, dp4a", "bits": bits,
                         "registers": regs.get(mangled), "loop_instructions": n_ins, "weights_per_iteration": weights,
                         "instructions_per_weight": round(n_ins / weights, 2)})
    return rows


def idot_loops(sass: str, mangled: str, rows: int) -> dict[int, tuple[int, int]]:
    """bits -> (weights an iteration, instructions) of the integer dot's loops (IDP.4A, matvec.cu's
    unit_idot): 4 bits split their codes by the mask 0x0f0f0f0f, 2 bits by 0x03030303, 8 bits by neither; an
    iteration is a unit of each of the R rows; of a width's loops, the shortest (the blocks off the matrix's
    first and last rows)."""
    found: dict[int, tuple[int, int]] = {}
    for loop in loops(function_body(sass, mangled)):
        if not any("IDP.4A" in op for op in loop):
            continue
        text = " ".join(loop)
        bits = 4 if "0xf0f0f0f" in text else 2 if "0x3030303" in text else 8
        if len(loop) < found.get(bits, (0, 1 << 30))[1]:
            found[bits] = (32 * rows, len(loop))
    return found


# tmatvec's decode takes each width's offset off its codes by an HADD2 or HFMA2 of a constant (tc_decode,
# TcPair): the width of a loop
TC_OFFSETS = {"-1026": 2, "-1028": 3, "-1032": 4, "-1040": 5, "-1056": 6, "-1152": 8}


def tensor_core_rows(sass: str, regs: dict[str, int]) -> list[dict]:
    """tmatvec<T, N>: for each width, its loop over k-blocks (the innermost loops with HMMAs; each width's
    is told by its offset constant). Each m16n8k16 takes 8 rows x 16 k of weights, 4 a lane, so a lane's
    weights an iteration are 4 x its HMMAs."""
    def inner_loops(mangled: str) -> dict[int, tuple[int, int]]:
        found: dict[int, tuple[int, int]] = {}
        for loop in loops(function_body(sass, mangled)):
            hmma = sum(op.startswith("HMMA") for op in loop)
            widths = {bits for op in loop if op.startswith(("HADD2", "HFMA2")) for imm, bits in TC_OFFSETS.items()
                      if imm in op}
            if hmma and len(widths) == 1:
                bits = widths.pop()
                found[bits] = min(found.get(bits, (hmma, len(loop))), (hmma, len(loop)))
        return found

    rows = []
    for tiles in TC_TILES:
        mangled = f"_Z7tmatvecILi{tiles}ELi0EEvPKfi4QMatS2_S2_6NormIn"
        folded = mangled.replace("ELi0E", "ELi1E")
        plain, norm = inner_loops(mangled), inner_loops(folded)
        for bits, (hmma, length) in sorted(plain.items()):
            row = {"instance": f"tmatvec<{tiles}>", "layout": "tensor cores", "bits": bits,
                   "registers": regs.get(mangled), "loop_instructions": length, "weights_per_iteration": 4 * hmma,
                   "instructions_per_weight": round(length / (4 * hmma), 2)}
            if bits in norm:
                row["instructions_per_weight_norm_folded"] = round(norm[bits][1] / (4 * norm[bits][0]), 2)
                row["registers_norm_folded"] = regs.get(folded)
            rows.append(row)
    return rows


def instance(text: str) -> tuple[int, int, int, int]:
    """--controls's R,U,L,N: a qmatvec instance's four template arguments."""
    try:
        r, u, lane, n = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not R,U,L,N (four integers, e.g. 8,1,32,0)") from None
    return r, u, lane, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "matvec_sass.json")
    ap.add_argument("--controls", metavar="R,U,L,N", type=instance,
                    help="print instead the main loop of qmatvec<R, U, L, N> at --bits, each instruction with its "
                         "control bits (where each load is issued against where it is first waited for)")
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        sass, regs, version = compile_matvec(args.arch, Path(work))
    if args.controls:
        r, u, lane, n = args.controls
        body = function_body(sass, qmatvec_name(r, u, lane, n))
        ins = controls(body)
        chosen, span = None, None
        for first, last, loop in loop_ranges(body):
            found = width_of(loop)
            bits = found[0] if found else None
            if any("IDP.4A" in op for op in loop):     # the integer dot: told by its code masks
                text = " ".join(loop)
                bits = 4 if "0xf0f0f0f" in text else 2 if "0x3030303" in text else 8
            if bits == args.bits and (chosen is None or len(loop) < len(chosen)):
                chosen, span = loop, (first, last)
        if chosen is None:
            sys.exit(f"error: no {args.bits}-bit loop in qmatvec<{r}, {u}, {lane}, {n}>")
        for a, t, c in ins:
            if span[0] <= a <= span[1]:
                print(f"{a:06x}  {t:70} {c}")
        return 0
    rows = analyse(sass, regs) + tensor_core_rows(sass, regs)
    print(f"{'instance':20} {'layout':12} {'bits':>4} {'regs':>5} {'loop':>6} {'weights':>8} {'instr/weight':>13} "
          f"{'weight B in flight':>18} {'norm folded':>12} {'gathered':>9} {'ordered (regs, in flight)':>26}")
    for row in rows:
        ordered = (f"{row['instructions_per_weight_ordered']} ({row['registers_ordered']}, "
                   f"{row['weight_bytes_in_flight_ordered']})" if "instructions_per_weight_ordered" in row else "")
        print(f"{row['instance']:20} {row['layout']:12} {row['bits']:>4} {row['registers']:>5} "
              f"{row['loop_instructions']:>6} {row['weights_per_iteration']:>8} {row['instructions_per_weight']:>13} "
              f"{row.get('weight_bytes_in_flight', ''):>18} {row.get('instructions_per_weight_norm_folded', ''):>12} "
              f"{row.get('instructions_per_weight_gathered', ''):>9} {ordered:>26}")
    write_json({"date": date.today().isoformat(), "arch": args.arch, "nvcc": version,
                "what": "static SASS count of each qmatvec / tmatvec instance's inner decode loop (not a speed)",
                "rows": rows}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
