#!/usr/bin/env bash
# The GPU checks of issues 5 and 6 in one call on a lent machine (device/METHOD.md: one short prepared script):
# the GPU tests, then the benchmark. Logs and JSON go to $OUT (or benchmarks/results/ when OUT is unset).
# Carried along (git-ignored): .whl/ (wheels the machine lacks, e.g. gguf) and .gpuassets/ (a SmolLM2 GGUF
# small enough to travel, made by benchmarks/truncate_gguf.py; named by VRAMWISE_SMOLLM2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
[ -z "${VRAMWISE_SMOLLM2:-}" ] && [ -f .gpuassets/smollm2-8l.gguf ] && export VRAMWISE_SMOLLM2=.gpuassets/smollm2-8l.gguf
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu_device.txt"
python3 -c "import cupy, numba, numpy; print('cupy', cupy.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)" \
    | tee -a "$OUT/gpu_device.txt"
# NO_TESTS=1 skips them (a second call that only benchmarks, where one call would pass the 10-minute limit)
if [ -z "${NO_TESTS:-}" ]; then
    timeout "${TEST_S:-260}" python3 -m pytest -q -p no:cacheprovider -rfEs --timeout 150 -m gpu ${TESTS:-tests/test_gpu_kernels.py tests/test_gpu_model.py} 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -60
fi
# NO_BENCH=1 stops here (a first call of two: the tests alone)
[ -n "${NO_BENCH:-}" ] && exit 0
# MOE=1: routed experts (gpu_decode.py --quick --moe: Qwen3-30B-A3B, an 8-layer Mixtral 8x7B shape, its experts
# streamed in place); ONLY_MOE=1 stops after it (a call of its own)
if [ -n "${MOE:-}" ]; then
    timeout "${MOE_S:-400}" python3 benchmarks/gpu_decode.py --quick --moe --out "$OUT/gpu_decode_moe.json" 2>&1 \
        | tee "$OUT/gpu_decode_moe.log" | tail -12
    [ -n "${ONLY_MOE:-}" ] && exit 0
fi
# per-kernel times and the matvec block-shape sweep; the decode benchmark then runs with the shape it chose
timeout "${KERNELS_S:-240}" python3 benchmarks/gpu_kernels.py --out "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/gpu_kernels.log" | tail -45
TUNED=""
[ -f "$OUT/gpu_kernels.json" ] && TUNED="--matvec-from $OUT/gpu_kernels.json"
# BASELINE=1: the engine's defaults too (SmolLM2 and the 7B shape), for a card with no earlier run to compare
if [ -n "${BASELINE:-}" ]; then
    timeout 120 python3 benchmarks/gpu_decode.py --quick --out "$OUT/gpu_decode_baseline.json" 2>&1 \
        | tee "$OUT/gpu_decode_baseline.log" | tail -8
fi
# CANDIDATES=1: the untimed candidates (overlapped streaming, dequant_rows, tiled prefill attention, the one-launch
# decode attention, with a unit-a-lane shape the fold and the in-kernel gather)
timeout "${BENCH_S:-200}" python3 benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json" $TUNED \
    ${CANDIDATES:+--candidates} ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_decode.log" | tail -25
# CANDIDATES=1 also: the same candidates with linears on the tensor cores (tmatvec, the sweep's shape),
# quick (SmolLM2 and the 7B shape): beside gpu_decode.json, what the tensor cores add
if [ -n "${CANDIDATES:-}" ] && [ -f "$OUT/gpu_kernels.json" ]; then
    timeout "${TC_S:-120}" python3 benchmarks/gpu_decode.py --quick --candidates --out "$OUT/gpu_decode_tc.json" \
        $TUNED --tensor-cores-from "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/gpu_decode_tc.log" | tail -8
fi
# ncu's view of the chosen matvec (skipped where ncu is absent)
if [ -n "${NCU:-}" ] && command -v ncu > /dev/null && [ -f "$OUT/gpu_kernels.json" ]; then
    timeout 90 ncu --clock-control none -k regex:qmatvec -s 2 -c 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/gpu_one_matvec.py --matvec-from "$OUT/gpu_kernels.json" > "$OUT/ncu_qmatvec.txt" 2>&1
    grep -E "Throughput|Occupancy|Registers|Issue|Stall|Warp Cycles|Eligible|Duration" "$OUT/ncu_qmatvec.txt" | head -40
fi
