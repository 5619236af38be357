// CUDA kernels run on the CPU, for tests without a GPU (tests/cudaemu.py compiles gpuengine/kernels/*.cu
// with this header in front, by g++). A launch runs its blocks one after another, in a shuffled order; a
// block's threads are fibers (ucontext) on one OS thread, each running until it reaches a barrier
// (__syncthreads, __syncwarp, a warp shuffle) or returns. Between barriers the fibers run in a shuffled order, so a kernel that reads
// another thread's write without a barrier between gives different results from run to run and fails
// its test rather than passing by luck of the order. Misuse that is undefined on a GPU stops the launch
// with a message: a block barrier some threads skip (deadlock), a full-mask shuffle after lanes of the warp
// have returned.
//
// What this checks is the kernels' logic (indexing, arithmetic, barriers, shuffles), not the GPU's memory
// model beyond barriers, nor speed. Memory accesses are plain host accesses: arrays are NumPy buffers.
#pragma once
#define VRAMWISE_CUDA_EMU 1

#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
// Blocks run one after another, each to its end, so atomics are plain read-modify-writes and fences no-ops:
// the twin checks what a kernel does with them, not the GPU's memory ordering (that is for the GPU tests).
template <class T> inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <class T> inline T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
    return (unsigned)(((((unsigned long long)hi) << 32) | lo) >> (s & 31u));
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
    return (unsigned)((((((unsigned long long)hi) << 32) | lo) << (s & 31u)) >> 32);
}
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned sel) {    // PRMT, default mode
    const unsigned long long v = ((unsigned long long)b << 32) | a;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((sel >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r;
}

namespace emu {

enum State { RUN, AT_BLOCK, AT_WARP, DONE };

// Switching fibers: on x86-64 by saving the callee-saved registers on the stack and swapping stack
// pointers (ucontext's swapcontext also saves the signal mask, a system call per switch, which made the
// attention tests ten times slower); elsewhere by ucontext.
#if defined(__x86_64__)
extern "C" void vw_emu_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .p2align 4
    .type vw_emu_switch, @function
vw_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size vw_emu_switch, .-vw_emu_switch
)");
struct Context {
    void* sp = nullptr;
};
inline void switch_to(Context& from, Context& to) { vw_emu_switch(&from.sp, to.sp); }
inline void start(Context& c, char* stack, size_t size, void (*fn)()) {
    void** top = reinterpret_cast<void**>(((uintptr_t)(stack + size)) & ~(uintptr_t)15);
    top[-1] = nullptr;                               // fn's return address: it never returns
    top[-2] = reinterpret_cast<void*>(fn);           // popped by vw_emu_switch's ret
    for (int i = 3; i <= 8; ++i) top[-i] = nullptr;  // rbp, rbx, r12 .. r15
    c.sp = top - 8;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void start(Context& c, char* stack, size_t size, void (*fn)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fn, 0);
}
#endif

struct Fiber {
    Context ctx;
    State state = RUN;
    dim3 tid;
    int warp = 0;
    bool shuffle = false;              // waiting at a shuffle (full mask): every lane must be there
    unsigned shuffles = 0;             // shuffles done: their parity picks the exchange buffer
    // cp.async: copies issued since the last commit, then the committed groups, oldest first. A copy lands
    // only when a wait_group completes its group, so a kernel reading its slot before waiting reads what was
    // there before (poison, shared memory's fill) and fails its test.
    struct Copy { void* dst; const void* src; int n; };
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
};

constexpr size_t STACK = 256 * 1024;

struct Block {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;
    std::vector<unsigned long long> exchange[2];   // 32 slots per warp, for shuffles, used in turn
    std::vector<unsigned> fragments[2];            // 6 words a lane (A and B fragments), for mma, in turn
    Context sched;
    int current = 0;
    std::function<void()> body;
    std::string error;
    unsigned long long rng = 0x9e3779b97f4a7c15ull;
    size_t dynamic_bytes = 0;                      // the launch's dynamic shared memory (extern __shared__)
    std::vector<unsigned char> dynamic;            // refilled with 0xCD for every block: no block sees another's
};

inline Block& block() {
    static Block b;
    return b;
}

inline Fiber& self() { return block().fibers[block().current]; }

inline int lane() { return (int)(&self() - block().fibers.data()) & 31; }

inline void wait(State s, bool shuffle = false) {
    Block& b = block();
    Fiber& f = b.fibers[b.current];
    f.state = s;
    f.shuffle = shuffle;
    switch_to(f.ctx, b.sched);
}

inline void entry() {
    Block& b = block();
    b.body();
    b.fibers[b.current].state = DONE;
    switch_to(b.fibers[b.current].ctx, b.sched);
}

inline char* stack(size_t i) {
    Block& b = block();
    while (b.stacks.size() <= i) {
        void* p = mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return nullptr;
        mprotect(p, 4096, PROT_NONE);      // guard page: a stack overflow faults instead of corrupting
        b.stacks.push_back(static_cast<char*>(p));
    }
    return b.stacks[i];
}

// Run one block to completion; false (and b.error) on misuse.
inline bool run_block() {
    Block& b = block();
    const int n = (int)(blockDim.x * blockDim.y * blockDim.z);
    b.fibers.assign(n, Fiber{});
    b.dynamic.assign(b.dynamic_bytes + 16, 0xCD);
    for (auto& e : b.exchange) e.assign(((n + 31) / 32) * 32, 0);
    for (auto& e : b.fragments) e.assign(((n + 31) / 32) * 32 * 6, 0);
    for (int i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.tid = {(unsigned)i % blockDim.x, ((unsigned)i / blockDim.x) % blockDim.y,
                 (unsigned)i / (blockDim.x * blockDim.y)};
        f.warp = i / 32;
        char* st = stack(i);
        if (!st) { b.error = "out of memory for fiber stacks"; return false; }
        start(f.ctx, st, STACK, entry);
    }
    std::vector<int> order(n);
    for (;;) {
        for (int i = 0; i < n; ++i) order[i] = i;
        for (int i = n - 1; i > 0; --i) {                      // a fresh order for every interval
            b.rng = b.rng * 6364136223846793005ull + 1442695040888963407ull;
            std::swap(order[i], order[(int)((b.rng >> 33) % (unsigned long long)(i + 1))]);
        }
        for (int i : order) {
            if (b.fibers[i].state != RUN) continue;
            b.current = i;
            threadIdx = b.fibers[i].tid;
            switch_to(b.sched, b.fibers[i].ctx);
        }
        bool live = false, released = false, all_block = true;
        for (int w = 0; w * 32 < n; ++w) {
            bool waiting = false, warp_all = true, exited = false, shuffle = false;
            for (int i = w * 32; i < n && i < w * 32 + 32; ++i) {
                const Fiber& f = b.fibers[i];
                if (f.state == DONE) { exited = true; continue; }
                live = true;
                waiting = true;
                shuffle |= f.shuffle;
                if (f.state != AT_WARP) warp_all = false;
                if (f.state != AT_BLOCK) all_block = false;
            }
            if (waiting && warp_all) {
                if (exited && shuffle) {
                    b.error = "warp shuffle with a full mask after lanes of warp " + std::to_string(w) + " returned";
                    return false;
                }
                for (int i = w * 32; i < n && i < w * 32 + 32; ++i)
                    if (b.fibers[i].state == AT_WARP) b.fibers[i].state = RUN;
                released = true;
            }
        }
        if (!live) return true;
        if (released) continue;
        if (all_block) {
            for (Fiber& f : b.fibers)
                if (f.state == AT_BLOCK) f.state = RUN;
            continue;
        }
        b.error = "deadlock: threads wait at different barriers (a __syncthreads some threads skip, or a warp "
                  "barrier beside a block barrier)";
        return false;
    }
}

// The block's dynamic shared memory (common.cuh's DYNAMIC_SHARED), 16-byte aligned.
inline unsigned char* dynamic_shared() {
    unsigned char* p = block().dynamic.data();
    return p + ((16 - ((uintptr_t)p & 15)) & 15);
}

// cp.async for the twin (common.cuh's cp_async, cp_async_commit, cp_async_wait): queued per thread, done at
// the wait that completes their group, in order.
inline void async_copy(void* dst, const void* src, int n) { self().open.push_back({dst, src, n}); }
inline void async_commit() {
    Fiber& f = self();
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
inline void async_wait(int pending) {
    Fiber& f = self();
    while ((int)f.groups.size() > pending) {
        for (const Fiber::Copy& c : f.groups.front()) std::memcpy(c.dst, c.src, (size_t)c.n);
        f.groups.erase(f.groups.begin());
    }
}

template <class F>
inline bool launch(dim3 grid, dim3 blk, size_t dynamic_bytes, F&& kernel, std::string& err) {
    Block& b = block();
    b.dynamic_bytes = dynamic_bytes;
    gridDim = grid;
    blockDim = blk;
    b.body = std::forward<F>(kernel);
    // Blocks run one at a time, in a shuffled order: a GPU runs them in any order, so a kernel whose
    // blocks hand work over (the last block to finish merges, by an atomic ticket) must not pass only
    // because block 0 happened to run first.
    const unsigned long long total = (unsigned long long)grid.x * grid.y * grid.z;
    std::vector<unsigned long long> order(total);
    for (unsigned long long i = 0; i < total; ++i) order[i] = i;
    for (unsigned long long i = total; i > 1; --i) {
        b.rng = b.rng * 6364136223846793005ull + 1442695040888963407ull;
        std::swap(order[i - 1], order[(b.rng >> 33) % i]);
    }
    for (unsigned long long i : order) {
        const unsigned x = (unsigned)(i % grid.x), y = (unsigned)((i / grid.x) % grid.y),
                       z = (unsigned)(i / ((unsigned long long)grid.x * grid.y));
        blockIdx = {x, y, z};
        if (!run_block()) {
            err = b.error + " (block " + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
            return false;
        }
    }
    return true;
}

// A kernel called with cudaLaunchKernel's arguments: args[i] points at parameter i's value.
template <class... A, size_t... I>
inline void call_with(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <class... A>
inline void call(void (*k)(A...), void** args) {
    call_with(k, args, std::index_sequence_for<A...>{});
}
template <class... A>
inline int signature(void (*)(A...), long long* sizes) {
    const long long s[] = {(long long)sizeof(A)..., 0};
    for (size_t i = 0; i < sizeof...(A); ++i) sizes[i] = s[i];
    return (int)sizeof...(A);
}

template <class T>
inline T exchange(T v, int src) {
    Block& b = block();
    static_assert(sizeof(T) <= 8, "shuffle of a value over 8 bytes");
    const int me = b.current;
    // Buffers in turn: a lane writes this one again only two shuffles on, past a barrier every lane of
    // the warp must reach after reading it, so one barrier per shuffle suffices.
    std::vector<unsigned long long>& slots = b.exchange[b.fibers[me].shuffles++ & 1];
    unsigned long long slot = 0;
    std::memcpy(&slot, &v, sizeof(T));
    slots[me] = slot;
    wait(AT_WARP, true);
    const int from = (me & ~31) + (src & 31);
    T r = v;
    if (from < (int)b.fibers.size()) std::memcpy(&r, &slots[from], sizeof(T));
    return r;
}

// mma.sync.m16n8k16.row.col.f32.f16.f16.f32 for the warp (common.cuh's mma16816 gives the fragments): each
// lane leaves its A and B fragments in the warp's slots, waits for the others as at a shuffle, and sums its
// own four outputs in fp32, k in order (fp16 products are exact in fp32; the tensor cores' order of
// addition is their own, so GPU and twin agree to fp32 rounding).
inline float half_of(unsigned word, int high) {
    const unsigned short h = (unsigned short)(high ? word >> 16 : word & 0xffffu);
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}

inline void mma16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&bf)[2]) {
    Block& b = block();
    const int me = b.current, base = me & ~31, group = (me & 31) >> 2, t = me & 3;
    std::vector<unsigned>& slots = b.fragments[b.fibers[me].shuffles++ & 1];
    for (int i = 0; i < 4; ++i) slots[6 * me + i] = a[i];
    slots[6 * me + 4] = bf[0];
    slots[6 * me + 5] = bf[1];
    wait(AT_WARP, true);
    auto A = [&](int row, int k) {
        const int lane = (row & 7) * 4 + ((k & 7) >> 1), reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return half_of(slots[6 * (base + lane) + reg], k & 1);
    };
    auto B = [&](int k, int col) {
        const int lane = col * 4 + ((k & 7) >> 1);
        return half_of(slots[6 * (base + lane) + 4 + (k >= 8 ? 1 : 0)], k & 1);
    };
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = group + 8 * (i >> 1), col = 2 * t + (i & 1);
        float s = d[i];
        for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
        out[i] = s;
    }
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::AT_BLOCK); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::AT_WARP); }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o, int = 32) { return emu::exchange(v, emu::lane() ^ o); }
template <class T> inline T __shfl_sync(unsigned, T v, int src, int = 32) { return emu::exchange(v, src); }
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) {
    const int l = emu::lane();
    const T r = emu::exchange(v, l + (int)d < 32 ? l + (int)d : l);
    return r;
}
