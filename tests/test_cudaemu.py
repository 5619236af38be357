"""The CPU stand-in for CUDA (tests/cudaemu.py) on small kernels of known behaviour: it must run threads,
barriers and shuffles as a GPU does, and must fail, not pass by luck, on the kernel bugs a GPU punishes."""
from __future__ import annotations

import numpy as np
import pytest

import cudaemu

pytestmark = pytest.mark.cudaemu

SOURCE = r"""
#include <cstdint>
typedef unsigned int u32;

// out[b * n + t]: thread (t, b) of grid b, block n, plus warp reductions and a block barrier.
extern "C" __global__ void ids(int* out) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int n = blockDim.x * blockDim.y * blockDim.z;
    out[b * n + t] = b * 1000 + t;
}

extern "C" __global__ void reduce(const float* x, float* out, int n) {
    __shared__ float part[32];
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += part[w];
        out[0] = s;
    }
}

extern "C" __global__ void shuffles(int* out) {
    const int lane = threadIdx.x & 31;
    const int v = lane * 10 + (threadIdx.x >> 5);
    out[4 * threadIdx.x] = __shfl_sync(0xffffffffu, v, 3);
    out[4 * threadIdx.x + 1] = __shfl_down_sync(0xffffffffu, v, 5);
    out[4 * threadIdx.x + 2] = __shfl_xor_sync(0xffffffffu, v, 9);
    out[4 * threadIdx.x + 3] = (int)__byte_perm(0x33221100u, 0x77665544u, 0x5140u) == 0x55114400 ? 1 : 0;
}

// A race: thread 0 writes the flag the others read, with no barrier between.
extern "C" __global__ void racy(int* out) {
    __shared__ int flag;
    if (threadIdx.x == 0) flag = blockIdx.x + 1;
    out[blockIdx.x * blockDim.x + threadIdx.x] = flag;
}

extern "C" __global__ void fixed(int* out) {
    __shared__ int flag;
    if (threadIdx.x == 0) flag = blockIdx.x + 1;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = flag;
}

extern "C" __global__ void shuffle_after_exit(float* out) {
    if ((threadIdx.x & 31) >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void mixed_barriers(float* out) {
    if ((threadIdx.x & 31) < 16) __syncwarp(); else __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void takes(long long a, double b, float* out) { out[0] = (float)(a + b); }

// The last of the grid's blocks to finish (by an atomic ticket) writes how many blocks ran before it.
extern "C" __global__ void last_block(int* ticket, int* out) {
    __shared__ int mine;
    if (threadIdx.x == 0) mine = atomicAdd(ticket, 1);
    __syncthreads();
    if (mine == (int)(gridDim.x - 1) && threadIdx.x == 0) out[0] = mine;
    if (threadIdx.x == 0) out[1 + mine] = blockIdx.x;         // the order the blocks ran in
}

// One m16n8k16 tile: A (16 x 16) and B (16 x 8) fp16 bits, row-major, into the lanes' fragments as the PTX
// ISA lays them out (lane = 4 group + t), D (16 x 8) back the same way.
extern "C" __global__ void mma_tile(const unsigned short* A, const unsigned short* B, float* D) {
    const int g = threadIdx.x >> 2, t = threadIdx.x & 3;
    const unsigned a[4] = {A[g * 16 + 2 * t] | (unsigned)A[g * 16 + 2 * t + 1] << 16,
                           A[(g + 8) * 16 + 2 * t] | (unsigned)A[(g + 8) * 16 + 2 * t + 1] << 16,
                           A[g * 16 + 2 * t + 8] | (unsigned)A[g * 16 + 2 * t + 9] << 16,
                           A[(g + 8) * 16 + 2 * t + 8] | (unsigned)A[(g + 8) * 16 + 2 * t + 9] << 16};
    const unsigned b[2] = {B[2 * t * 8 + g] | (unsigned)B[(2 * t + 1) * 8 + g] << 16,
                           B[(2 * t + 8) * 8 + g] | (unsigned)B[(2 * t + 9) * 8 + g] << 16};
    float d[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    emu::mma16816(d, a, b);
    D[g * 8 + 2 * t] = d[0]; D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2]; D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// cp.async as common.cuh's cp_async / cp_async_commit / cp_async_wait call it: thread t copies x[t] and then
// x[T + t] into its words of the dynamic shared memory, two groups, and reads them back before and between
// the waits.
extern "C" __global__ void async_copies(const unsigned* x, unsigned* out) {
    unsigned* s = reinterpret_cast<unsigned*>(emu::dynamic_shared());
    const int t = threadIdx.x, T = blockDim.x;
    emu::async_copy(s + t, x + t, 4);
    emu::async_commit();
    emu::async_copy(s + T + t, x + T + t, 4);
    emu::async_commit();
    out[4 * t] = s[t];
    emu::async_wait(1);
    out[4 * t + 1] = s[t];
    out[4 * t + 2] = s[T + t];
    emu::async_wait(0);
    out[4 * t + 3] = s[T + t];
}
"""
NAMES = ["ids", "reduce", "shuffles", "racy", "fixed", "shuffle_after_exit", "mixed_barriers", "takes", "last_block",
         "mma_tile", "async_copies"]


@pytest.fixture(scope="module")
def k():
    return cudaemu.build("test-kernels", SOURCE, NAMES)


def test_every_thread_of_every_block_runs_once(k):
    out = np.full(2 * 3 * 2 * 40, -1, np.int32)
    k["ids"]((2, 3, 2), (5, 4, 2), (out,))
    n = 40
    assert out.tolist() == [b * 1000 + t for b in range(12) for t in range(n)]


@pytest.mark.parametrize("threads", [32, 64, 256, 1024])
def test_shuffles_and_barriers_reduce_a_block(k, threads):
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    out = np.zeros(1, np.float32)
    k["reduce"]((1,), (threads,), (x, out, np.int32(x.size)))
    assert abs(out[0] - x.astype(np.float64).sum()) < 1e-3


def test_shuffle_sources_follow_cuda(k):
    out = np.zeros(4 * 64, np.int32).reshape(64, 4)
    k["shuffles"]((1,), (64,), (out,))
    lane, warp = np.arange(64) % 32, np.arange(64) // 32
    assert out[:, 0].tolist() == (30 + warp).tolist()
    down = np.where(lane + 5 < 32, lane + 5, lane)
    assert out[:, 1].tolist() == (down * 10 + warp).tolist()
    assert out[:, 2].tolist() == ((lane ^ 9) * 10 + warp).tolist()
    assert (out[:, 3] == 1).all()


def test_a_race_without_a_barrier_shows_and_the_barrier_fixes_it(k):
    """Threads run in a new order between barriers, so some read the flag before thread 0 writes it."""
    out = np.zeros(64 * 8, np.int32)
    k["racy"]((8,), (64,), (out,))
    want = np.repeat(np.arange(1, 9), 64)
    assert not np.array_equal(out, want)
    k["fixed"]((8,), (64,), (out,))
    assert np.array_equal(out, want)


def test_misuse_that_is_undefined_on_a_gpu_stops_the_launch(k):
    out = np.zeros(64, np.float32)
    with pytest.raises(cudaemu.EmulationError, match="after lanes of warp 0 returned"):
        k["shuffle_after_exit"]((1,), (64,), (out,))
    with pytest.raises(cudaemu.EmulationError, match="deadlock"):
        k["mixed_barriers"]((1,), (64,), (out,))


def test_arguments_are_checked_against_the_parameters(k):
    out = np.zeros(1, np.float32)
    k["takes"]((1,), (1,), (np.int64(2), np.float64(0.5), out))
    assert out[0] == 2.5
    with pytest.raises(cudaemu.EmulationError, match="argument 0 has 4 bytes, the parameter 8"):
        k["takes"]((1,), (1,), (np.int32(2), np.float64(0.5), out))
    with pytest.raises(cudaemu.EmulationError, match="2 arguments for 3"):
        k["takes"]((1,), (1,), (np.int64(2), out))
    with pytest.raises(cudaemu.EmulationError, match="is a int"):
        k["takes"]((1,), (1,), (2, np.float64(0.5), out))
    with pytest.raises(cudaemu.EmulationError, match="launch of grid"):
        k["takes"]((1,), (2048,), (np.int64(2), np.float64(0.5), out))


def test_blocks_run_in_a_shuffled_order_and_atomics_count_them(k):
    """A GPU runs blocks in any order: the twin shuffles them, so the last block to take a ticket is not
    always the last in grid order."""
    orders = []
    for _ in range(3):
        ticket, out = np.zeros(1, np.int32), np.full(65, -1, np.int32)
        k["last_block"]((64,), (32,), (ticket, out))
        assert ticket[0] == 64 and out[0] == 63 and sorted(out[1:]) == list(range(64))
        orders.append(out[1:].tolist())
    assert orders[0] != list(range(64)) and len({tuple(o) for o in orders}) > 1


def test_mma_follows_the_ptx_fragment_layout(k):
    """D = A B + C for one m16n8k16 tile, fragments as the PTX ISA gives them (C = 1): fp16 products are exact
    in fp32, so the sums agree to fp32 rounding."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((16, 16)).astype(np.float16)
    b = rng.standard_normal((16, 8)).astype(np.float16)
    d = np.zeros((16, 8), np.float32)
    k["mma_tile"]((1,), (32,), (a.view(np.uint16).copy(), b.view(np.uint16).copy(), d))
    want = a.astype(np.float64) @ b.astype(np.float64) + 1.0
    assert np.abs(d - want).max() < 1e-5


def test_async_copies_land_at_the_wait_that_completes_their_group(k):
    """A cp.async lands when a wait completes its group, in order, so a kernel reading its slot before the
    wait reads shared memory's fill (0xCD bytes) and fails its test instead of passing by the twin's timing;
    dynamic shared memory past 48 KiB needs the kernel's limit raised, as on a GPU."""
    x = np.arange(1, 129, dtype=np.uint32)
    out = np.zeros((64, 4), np.uint32)
    k["async_copies"]((1,), (64,), (x, out), shared_mem=8 * 64)
    fill = 0xCDCDCDCD
    assert (out[:, 0] == fill).all() and (out[:, 2] == fill).all()
    assert out[:, 1].tolist() == x[:64].tolist() and out[:, 3].tolist() == x[64:].tolist()
    with pytest.raises(cudaemu.EmulationError, match="over the kernel's 49152"):
        k["async_copies"]((1,), (64,), (x, out), shared_mem=64 * 1024)
    k["async_copies"].max_dynamic_shared_size_bytes = 64 * 1024
    k["async_copies"]((1,), (64,), (x, out), shared_mem=64 * 1024)
    assert out[:, 3].tolist() == x[64:].tolist()
    with pytest.raises(cudaemu.EmulationError, match="at most"):
        k["async_copies"].max_dynamic_shared_size_bytes = 300 * 1024


def test_the_engine_sources_build_with_every_kernel_they_name():
    for name in ("matvec", "dequant", "norm", "attention", "sample"):
        assert set(cudaemu.module(name)) == set(cudaemu.kernel_names(name))
    with pytest.raises(cudaemu.EmulationError, match="no kernel"):
        cudaemu.function("norm", "nope")


def test_a_compiler_that_cannot_build_the_twin_is_a_skip_reason(monkeypatch, tmp_path):
    """An old g++ (no _Float16) or a broken one makes the twin's tests skip with the compiler's error, not fail."""
    bad = tmp_path / "old-g++"
    bad.write_text("#!/bin/sh\necho \"cudaemu.h:1: error: '_Float16' was not declared\" >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(cudaemu, "CXX", str(bad))
    cudaemu.unavailable_reason.cache_clear()
    try:
        reason = cudaemu.unavailable_reason()
    finally:
        cudaemu.unavailable_reason.cache_clear()
    assert "cannot build the CPU twin" in reason and "_Float16" in reason
