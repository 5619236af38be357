// Device helpers shared by every kernel source (the loader, gpuengine/kernels/__init__.py, puts this
// file in front of each .cu). No #include: NVRTC (CuPy's RawModule) and nvcc compile these alike.
// fp16 conversions go through PTX cvt; fp8 e4m3 is decoded by bit arithmetic, so the values are exactly
// refengine.quant's.
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define FULL_MASK 0xffffffffu
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifdef VRAMWISE_CUDA_EMU                               // tests/cudaemu.h: the same conversions on the CPU
__device__ __forceinline__ float h2f(u16 h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
__device__ __forceinline__ u16 f2h(float f) { const _Float16 v = (_Float16)f; u16 h; memcpy(&h, &v, 2); return h; }
#else
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {          // round to nearest even, as numpy's astype
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// (a & mask) | set for constants mask and set, as one LOP3: C++'s & then | compile to two LOP3s, each with
// one immediate, since an instruction takes one immediate (seen in the matvec's SASS, sm_90).
template <u32 MASK, u32 SET>
__device__ __forceinline__ u32 and_or(u32 a) {
#ifdef VRAMWISE_CUDA_EMU
    return (a & MASK) | SET;
#else
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(MASK), "n"(SET));
    return r;
#endif
}

// Pairs of fp16 values in one register (f16x2, the lower-indexed value in the low half): d = a - b and
// d = a * b + c, each rounded to fp16 (the tensor-core matvec uses them only where the result is exact).
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
#ifdef VRAMWISE_CUDA_EMU
    return (u32)f2h(h2f((u16)a) - h2f((u16)b)) | ((u32)f2h(h2f((u16)(a >> 16)) - h2f((u16)(b >> 16))) << 16);
#else
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
#endif
}

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
#ifdef VRAMWISE_CUDA_EMU
    return (u32)f2h(fmaf(h2f((u16)a), h2f((u16)b), h2f((u16)c)))
           | ((u32)f2h(fmaf(h2f((u16)(a >> 16)), h2f((u16)(b >> 16)), h2f((u16)(c >> 16)))) << 16);
#else
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#endif
}

// d += A B on the tensor cores, one warp together (every lane must call it): A 16 x 16 and B 16 x 8 fp16,
// d 16 x 8 fp32, in the fragments of the PTX ISA's mma.m16n8k16 (lane l = 4 * group + t): a[0] holds
// A[group][2t, 2t + 1], a[1] A[group + 8][2t, 2t + 1], a[2] and a[3] the same at columns 2t + 8, 2t + 9;
// b[0] holds B[2t, 2t + 1][group], b[1] B[2t + 8, 2t + 9][group]; d[0], d[1] are D[group][2t, 2t + 1] and
// d[2], d[3] D[group + 8][2t, 2t + 1]. sm_80 and later (the launcher checks; older cards trap).
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#if defined(VRAMWISE_CUDA_EMU)
    emu::mma16816(d, a, b);
#elif __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

// float8 e4m3fn -> float: bias 7, no infinities, NaN only at S.1111.111; subnormals m * 2^-9.
__device__ __forceinline__ float e4m3_to_f(u32 b) {
    const u32 e = (b >> 3) & 15u, m = b & 7u;
    float mag = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(m | 8u), (int)e - 10);
    if (e == 15u && m == 7u) mag = __int_as_float(0x7fc00000);
    return (b & 0x80u) ? -mag : mag;
}

// float -> float8 e4m3fn, clipped to +-448 first (refengine.quant.kv_quantize), round to nearest even.
// Below 2^-6 the code is the value in steps of 2^-9 (code 8 is 2^-6, so the two ranges join up).
__device__ __forceinline__ u8 f_to_e4m3(float f) {
    const u32 sign = (__float_as_uint(f) >> 24) & 0x80u;
    const float a = fminf(fabsf(f), 448.0f);
    u32 code;
    if (a < 0.015625f) {
        code = (u32)rintf(a * 512.0f);
    } else {
        u32 bits = __float_as_uint(a);
        bits += 0x7ffffu + ((bits >> 20) & 1u);          // round the mantissa to 3 bits, ties to even
        code = (((bits >> 23) - 120u) << 3) | ((bits >> 20) & 7u);
    }
    return (u8)(sign | code);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Asynchronous copies global -> shared (cp.async, sm_80 and later): each thread's copies go in groups
// (cp_async_commit closes one), and cp_async_wait<N> returns once all but the newest N of the thread's groups
// have landed, the data then visible to that thread. The copies are issued where the code puts them: the
// compiler cannot sink them towards their use as it does plain loads into registers (ptxas moved the unit-a-lane
// matvec's weight loads down to one row ahead of their use, GPU_NOTES.md), so a thread keeps as many bytes in
// flight as it issues. Before sm_80 each copy is a load and a store, done at once (correct, not asynchronous).
// N bytes: 4, 8 or 16, both addresses N-aligned.
template <int N>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
    static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(VRAMWISE_CUDA_EMU)
    emu::async_copy(smem, gmem, N);
#elif __CUDA_ARCH__ >= 800
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    if constexpr (N == 16)                                  // .cg: L2 only, as the weights are read once
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(s), "l"(gmem), "n"(N) : "memory");
#else
    if constexpr (N == 16) *reinterpret_cast<uint4*>(smem) = __ldg(reinterpret_cast<const uint4*>(gmem));
    else if constexpr (N == 8) *reinterpret_cast<uint2*>(smem) = __ldg(reinterpret_cast<const uint2*>(gmem));
    else *reinterpret_cast<u32*>(smem) = __ldg(reinterpret_cast<const u32*>(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(VRAMWISE_CUDA_EMU)
    emu::async_commit();
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(VRAMWISE_CUDA_EMU)
    emu::async_wait(N);
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Loads the compiler keeps in program order (ld.relaxed.gpu: strong loads, which ptxas issues in the order
// written). ptxas sinks the plain unit-a-lane matvec's loads into registers to about one row ahead of their use;
// issued as these, a unit's weights of all R rows and then its x, the weights all go out before the first
// decode (SASS of qmatvec<8, 1, 32, 16>, sm_90: GPU_NOTES.md). Strong loads at GPU scope are served by L2, not
// L1 (the weights are read once, x is in L2). Before sm_70, and in the CPU twin, plain loads.
#if defined(VRAMWISE_CUDA_EMU) || __CUDA_ARCH__ < 700
template <typename T>
__device__ __forceinline__ T ld_ordered(const T* p) { return *p; }
#else
#define LD_ORDERED_ASM(op, ...) asm volatile("ld.relaxed.gpu.global." op : __VA_ARGS__ : "l"(p)); return v
__device__ __forceinline__ uint4 ld_ordered(const uint4* p) {
    uint4 v; LD_ORDERED_ASM("v4.u32 {%0, %1, %2, %3}, [%4];", "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w));
}
__device__ __forceinline__ float4 ld_ordered(const float4* p) {
    float4 v; LD_ORDERED_ASM("v4.f32 {%0, %1, %2, %3}, [%4];", "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w));
}
__device__ __forceinline__ uint2 ld_ordered(const uint2* p) {
    uint2 v; LD_ORDERED_ASM("v2.u32 {%0, %1}, [%2];", "=r"(v.x), "=r"(v.y));
}
__device__ __forceinline__ u32 ld_ordered(const u32* p) { u32 v; LD_ORDERED_ASM("u32 %0, [%1];", "=r"(v)); }
__device__ __forceinline__ u16 ld_ordered(const u16* p) { u16 v; LD_ORDERED_ASM("u16 %0, [%1];", "=h"(v)); }
#undef LD_ORDERED_ASM
#endif

// c + the dot product of a's and b's four bytes (dp4a, sm_61 and later), a's unsigned, b's unsigned or (SIGNED)
// signed. Exact in 32-bit integers.
template <bool SIGNED>
__device__ __forceinline__ int dp4a(u32 a, u32 b, int c) {
#ifdef VRAMWISE_CUDA_EMU
    for (int i = 0; i < 4; ++i) {
        const u32 bb = (b >> (8 * i)) & 255u;
        c += (int)((a >> (8 * i)) & 255u) * (SIGNED ? (int)(signed char)bb : (int)bb);
    }
    return c;
#else
    int d;
    if constexpr (SIGNED) asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    else asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#endif
}

// The launch's dynamic shared memory (its shared_mem bytes) as a 16-byte aligned u8 array `name`.
#ifdef VRAMWISE_CUDA_EMU
#define DYNAMIC_SHARED(name) u8* name = emu::dynamic_shared()
#else
#define DYNAMIC_SHARED(name) extern __shared__ __align__(16) u8 name[]
#endif

// Block-wide sum / max (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_reduce(float v, bool is_max) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();                                       // part[] may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float r = lane < warps ? part[lane] : (is_max ? -INFINITY : 0.0f);
    return is_max ? warp_max(r) : warp_sum(r);
}

// A gated MLP's activation of its gate value g: act 1 silu, g / (1 + e^-g) (SwiGLU); 2 GELU's tanh form,
// g (1 + tanh z) / 2 = g / (1 + e^(-2z)) with z = sqrt(2 / pi) (g + 0.044715 g^3) (GeGLU, Gemma), as
// ops.gelu_tanh writes it (no cancellation for negative g); as ops.ACTIVATIONS.
__device__ __forceinline__ float gated_act(float g, int act) {
    if (act == 2) return g / (1.0f + expf(-1.5957691216057308f * (g + 0.044715f * g * g * g)));
    return g / (1.0f + expf(-g));
}
