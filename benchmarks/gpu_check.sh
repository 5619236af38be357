#!/usr/bin/env bash
# The GPU checks of issues 5 and 6 in one call on a lent machine (device/METHOD.md: one short prepared script):
# the GPU tests, then the benchmarks, most wanted first. Logs and JSON go to $OUT (or benchmarks/results/ when
# OUT is unset).
# Carried along (git-ignored): .whl/ (wheels the machine lacks, e.g. gguf) and .gpuassets/ (a SmolLM2 GGUF
# small enough to travel, made by benchmarks/truncate_gguf.py; named by VRAMWISE_SMOLLM2).
#
# Settings (environment):
#   DEADLINE=s   seconds this script may take in all: each step's own limit is cut to what is left, so the last
#                steps shrink rather than the call's limit killing everything (default: no deadline)
#   PACK=file    after each step, pack $OUT into this .tgz (the device tool returns at most 8 files)
#   NO_TESTS=1   skip the tests; TESTS, TEST_S, TEST_TIMEOUT (a test's own limit), TEST_WORKERS (pytest-xdist);
#                TESTS_LAST=1 runs them after the benchmarks
#   NO_BENCH=1   stop after the tests
#   NO_KERNELS=1 skip the per-kernel times and sweeps (the decode benchmarks then run the engine's defaults)
#   CANDIDATES=1 the decode benchmark with the engine's alternatives to its defaults on (run 9 timed each
#                kernel slower), and the same with the tensor cores (else the defaults)
#   QUICK=1      the decode benchmarks on SmolLM2 and the 7B shape only
#   BASELINE=1   also the defaults' quick decode, for a same-card comparison with the candidates
#   MOE=1        routed experts (gpu_decode.py --quick --moe); ONLY_MOE=1 runs nothing else after the tests;
#                REGS=1 runs them again with the matvec's register caps (--regs)
#   NCU=1        ncu's view of the chosen matvec
#   NO_WARM=1    skip compiling every kernel first in parallel (benchmarks/warm_kernels.py; WARM_S its limit)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
[ -z "${VRAMWISE_SMOLLM2:-}" ] && [ -f .gpuassets/smollm2-8l.gguf ] && export VRAMWISE_SMOLLM2=.gpuassets/smollm2-8l.gguf

# limit S: S seconds, or what is left before DEADLINE (less a margin for packing) if that is less
limit() {
    local left=$(( ${DEADLINE:-1000000} - SECONDS - 8 ))
    (( left < $1 )) && echo "$left" || echo "$1"
}
# step NAME S COMMAND...: run COMMAND under its limit (skipped when under 15 s are left), its output kept in
# $OUT/NAME.log, then pack $OUT
step() {
    local name=$1 s
    s=$(limit "$2")
    shift 2
    if (( s < 15 )); then
        echo "== $name: skipped, ${s} s left" | tee -a "$OUT/steps.txt"
        return 0
    fi
    echo "== $name (limit ${s} s) at ${SECONDS} s" | tee -a "$OUT/steps.txt"
    timeout "$s" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc at ${SECONDS} s" | tee -a "$OUT/steps.txt"
    tail -"${TAIL:-25}" "$OUT/$name.log"
    [ -n "${PACK:-}" ] && tar czf "$PACK" -C "$OUT" --exclude "$(basename "$PACK")" .
    return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu_device.txt"
python3 -c "import cupy, numba, numpy; from cupy.cuda import nvrtc; print('cupy', cupy.__version__, 'nvrtc', nvrtc.getVersion(), 'numba', numba.__version__, 'numpy', numpy.__version__)" \
    | tee -a "$OUT/gpu_device.txt"
# every kernel program compiled at once, a process each (CuPy's disk cache then serves the tests and benchmarks;
# one after another NVRTC takes minutes: benchmarks/results/nvrtc_check.json); NO_WARM=1 skips it
[ -z "${NO_WARM:-}" ] && TAIL=6 step warm_kernels "${WARM_S:-150}" python3 benchmarks/warm_kernels.py \
    ${REGS:+--variant regs}
tests() {
    [ -n "${NO_TESTS:-}" ] && return 0
    TAIL=40 step gpu_tests "${TEST_S:-260}" python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15 \
        --timeout "${TEST_TIMEOUT:-150}" ${TEST_WORKERS:+-n "$TEST_WORKERS"} -m gpu \
        ${TESTS:-tests/test_gpu_kernels.py tests/test_gpu_model.py}
}
[ -z "${TESTS_LAST:-}" ] && tests
[ -n "${NO_BENCH:-}" ] && exit 0
TUNED=""
if [ -z "${ONLY_MOE:-}" ]; then
    # per-kernel times, the matvec block-shape sweep and the tensor-core sweep (the JSON is written after each
    # sweep, so a cut-short run still names its shape); the decode benchmark then runs with the shape it chose
    [ -z "${NO_KERNELS:-}" ] && TAIL=45 step gpu_kernels "${KERNELS_S:-240}" python3 benchmarks/gpu_kernels.py \
        --out "$OUT/gpu_kernels.json"
    [ -f "$OUT/gpu_kernels.json" ] && TUNED="--matvec-from $OUT/gpu_kernels.json"
    # CANDIDATES=1: the alternatives (the one-launch decode attention, the norm fold, the in-kernel gather)
    step gpu_decode "${BENCH_S:-200}" python3 benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json" $TUNED \
        ${QUICK:+--quick} ${CANDIDATES:+--candidates} ${BENCH_ARGS:-}
    # BASELINE=1: the engine's defaults (SmolLM2 and the 7B shape) on the same card
    [ -n "${BASELINE:-}" ] && TAIL=8 step gpu_decode_baseline 120 python3 benchmarks/gpu_decode.py --quick \
        --out "$OUT/gpu_decode_baseline.json"
fi
# MOE=1: routed experts (Qwen3-30B-A3B, an 8-layer Mixtral 8x7B shape, its experts streamed in place)
[ -n "${MOE:-}" ] && TAIL=12 step gpu_decode_moe "${MOE_S:-400}" python3 benchmarks/gpu_decode.py --quick --moe \
    --out "$OUT/gpu_decode_moe.json"
[ -n "${MOE:-}" ] && [ -n "${REGS:-}" ] && TAIL=12 step gpu_decode_moe_regs "${MOE_S:-400}" python3 \
    benchmarks/gpu_decode.py --quick --moe --regs --out "$OUT/gpu_decode_moe_regs.json"
if [ -n "${ONLY_MOE:-}" ]; then
    [ -n "${TESTS_LAST:-}" ] && tests
    exit 0
fi
# CANDIDATES=1 also: the same candidates with linears on the tensor cores (tmatvec, the sweep's shape), quick
if [ -n "${CANDIDATES:-}" ] && [ -f "$OUT/gpu_kernels.json" ]; then
    TAIL=8 step gpu_decode_tc "${TC_S:-120}" python3 benchmarks/gpu_decode.py --quick --candidates \
        --out "$OUT/gpu_decode_tc.json" $TUNED --tensor-cores-from "$OUT/gpu_kernels.json"
fi
# ncu's view of the chosen matvec (skipped where ncu is absent)
if [ -n "${NCU:-}" ] && command -v ncu > /dev/null && [ -f "$OUT/gpu_kernels.json" ]; then
    step ncu_qmatvec 90 ncu --clock-control none -k regex:qmatvec -s 2 -c 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/gpu_one_matvec.py --matvec-from "$OUT/gpu_kernels.json"
fi
[ -n "${TESTS_LAST:-}" ] && tests
exit 0
