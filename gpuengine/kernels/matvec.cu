// Decode: y = W x for one token, W packed in a registry option (planner/formats.py), fused with its
// dequantization (32-value units of BITS uint32 words, one fp16 scale per group; codes decoded by bit
// tricks). A mixed option's slices are separate packed arrays, each at its own width: the slice loop is
// outside the unit loop and the width a template parameter, so the inner loop has no branch and every
// shift is a constant. x arrives permuted and zero-padded per slice where the option needs it (gather_x; or
// the unit-a-lane kernel gathers it itself, XMap), so the codes packed into a slice's last, partial unit
// multiply zeros. Accumulation in fp32.
//
// Decode reads every weight byte once, so the layout of the loads decides the speed: a block takes R rows
// (R a template parameter), its threads split the rows' units (split-K inside the block), and each
// x value loaded is used for all R rows.

// A packed linear as the kernels take it (passed by value; gpuengine/launch.py builds the same layout as a
// NumPy structured scalar, and a GPU test checks sizes and offsets). Slice s: words (n, units * bits),
// scales (n, groups), its input at x + xoff.
struct QSlice {
    const u32* w;
    const u16* s;
    int bits, units, groups, xoff;
};
struct QMat {
    float* y;
    const float* bias;
    QSlice sl[3];
    int n, nslices, accumulate, has_bias, gshift;      // 2^gshift units per scale group
};

// RMSNorm folded into the matvec (the unit-a-lane instances with N's bit 0): x is the residual stream and the matvec computes W (x / rms(x) * w), as rmsnorm
// then the matvec would: each block weighs the x it loads by w and sums x^2 on the way (a block reads all of
// x), then scales its dot products by 1 / sqrt(mean(x^2) + eps). Two launches fewer per layer in decode
// (launch.FUSE_NORM).
struct NormIn {
    const float* w;
    float eps;
    int h;                                             // the input size, the mean's divisor
};

// x as each matrix's slices read it, gathered in the kernel (the unit-a-lane layout, launch.GATHER): slice
// s of matrix m takes x[perm_m[start + j]] (x[start + j] where perm_m is null) as its j-th input, j < rows,
// and zeros to the end of its last unit: what gather_x writes, read in place, so a mixed option needs no
// launch before its matvec, and q / k / v (gate / up) of mixed options share one.
struct XMap {
    const int* perm[3];
    int start[3][3], rows[3][3];
};

// Where a slice's inputs come from, in unit_rows: x and the folded norm's weight at offset xoff of the
// gathered input (perm unused), or, gathering, at the original indices.
struct XSrc {
    const float* x;
    const float* w;
    const int* perm;
    int start, rows;
};

// The block's threads in groups of four ("quads"): quad q takes units q, q + Q, q + 2Q, ... (Q quads in the
// block) of each of the block's R rows, and lane g of a quad takes values 8g .. 8g + 7 of the unit, which
// are exactly BITS bytes at byte g * BITS of the unit's 4 * BITS, inside one or two aligned words. So a
// warp's weight loads cover 8 consecutive units of a row (contiguous bytes), its x loads 8 consecutive
// floats per lane (contiguous too), and each x value loaded serves all R rows. Each thread issues the words
// of U units of all R rows before it decodes any.
//
// Decoding: a code goes into the top BITS mantissa bits of a float in [1, 2), f = 1 + code / 2^BITS, so
// code - 2^(BITS-1) = 2^BITS (f - 1.5) and a lane's 8-value dot is 2^BITS (sum f x - 1.5 sum x), with sum x
// shared by the block's R rows: a shift, a mask-and-or and an FMA per value (converting each code and
// subtracting its offset instead made 7B decode 8% slower on the H200: GPU_NOTES.md, run 7). The
// cancellation costs at most a few fp32 ulps of 1.5 sum |x| per unit. Row and scale addresses are formed
// once per slice; scale groups are 2^gshift units (an integer division there made the matvec 24% slower).

template <int BITS>
__device__ __forceinline__ float code_float(u32 lo, u32 hi, int i) {   // i, BITS constant after unrolling
    const int top = 23 - BITS, p = i * BITS;
    u32 t;
    if (p + BITS <= 32) t = p >= top ? lo >> (p - top) : lo << (top - p);
    else if (p >= 32) t = p - 32 >= top ? hi >> (p - 32 - top) : hi << (top - (p - 32));
    else t = __funnelshift_r(lo, hi, p - top);
    return __uint_as_float((t & (((1u << BITS) - 1u) << top)) | 0x3f800000u);
}

template <int BITS, int R, int U>
__device__ __forceinline__ void slice_rows(const QSlice& sl, const float* __restrict__ x, int gshift,
                                           const int (&rows)[R], float (&acc)[R]) {
    const int g = threadIdx.x & 3, nq = blockDim.x >> 2;
    const int byte = g * BITS, shift = (byte & 3) * 8;
    const bool two = shift + 8 * BITS > 32;
    const float scale = (float)(1 << BITS);
    const u32* wr[R];
    const u16* sr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        wr[r] = sl.w + (size_t)rows[r] * sl.units * BITS + (byte >> 2);
        sr[r] = sl.s + (size_t)rows[r] * sl.groups;
    }
    const float* __restrict__ xg = x + sl.xoff + g * 8;
    for (int u0 = threadIdx.x >> 2; u0 < sl.units; u0 += nq * U) {
        float sc[U][R];
        u32 lo[U][R], hi[U][R];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int u = u0 + j * nq;
            const bool in = u < sl.units;
            const int uu = in ? u : u0;                     // a unit past the end reads unit u0 and weighs 0
#pragma unroll
            for (int r = 0; r < R; ++r) {
                lo[j][r] = __ldg(wr[r] + uu * BITS);
                hi[j][r] = two ? __ldg(wr[r] + uu * BITS + 1) : 0u;
                sc[j][r] = in ? h2f(__ldg(sr[r] + (uu >> gshift))) * scale : 0.0f;
            }
        }
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int uu = u0 + j * nq < sl.units ? u0 + j * nq : u0;
            const float4 a = *reinterpret_cast<const float4*>(xg + (size_t)uu * 32);
            const float4 b = *reinterpret_cast<const float4*>(xg + (size_t)uu * 32 + 4);
            const float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            const float sx = ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w));
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const u32 l = __funnelshift_r(lo[j][r], hi[j][r], shift), h = hi[j][r] >> shift;
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; ++i) d = fmaf(code_float<BITS>(l, h, i), xs[i], d);
                acc[r] = fmaf(sc[j][r], fmaf(-1.5f, sx, d), acc[r]);
            }
        }
    }
}

// Layout L = 32, a unit per lane: thread l of the block takes whole units l, l + T, l + 2T, ... (T threads)
// of each of its R rows. A unit's BITS words are one to three vector loads (layout.py aligns 4- and 8-bit
// rows to 16 bytes, 2- and 6-bit rows to 8), a warp's loads of a row cover 32 consecutive units, and per
// unit the thread loads one scale and 8 float4 of x, the x shared by the R rows. Against the quad layout
// this moves the per-unit work (loads, scale, address and bounds arithmetic) from every 8 values to every
// 32: the decode, 3 instructions a value, is left as most of the loop. Whole steps of U units run with no
// bounds test, then single units to the end of the slice.

// How a unit's BITS words are read: NV vectors of VB bytes (layout.py aligns 4- and 8-bit rows to 16 bytes, 2- and
// 6-bit rows to 8, 3- and 5-bit rows to words). load_unit's loads and the staged matvec's copies.
template <int BITS>
struct UnitCopy {
    static constexpr int VB = (BITS == 4 || BITS == 8) ? 16 : (BITS == 2 || BITS == 6) ? 8 : 4, NV = 4 * BITS / VB;
};

// ORDERED: as ld_ordered (common.cuh), else through the read-only cache.
template <bool ORDERED, typename T>
__device__ __forceinline__ T load(const T* p) {
    if constexpr (ORDERED) return ld_ordered(p);
    else return __ldg(p);
}

template <int BITS, bool ORDERED = false>
__device__ __forceinline__ void load_unit(const u32* __restrict__ p, u32 (&w)[BITS]) {
    using C = UnitCopy<BITS>;
#pragma unroll
    for (int v = 0; v < C::NV; ++v) {
        if constexpr (C::VB == 16) {
            const uint4 q = load<ORDERED>(reinterpret_cast<const uint4*>(p) + v);
            w[4 * v] = q.x; w[4 * v + 1] = q.y; w[4 * v + 2] = q.z; w[4 * v + 3] = q.w;
        } else if constexpr (C::VB == 8) {
            const uint2 q = load<ORDERED>(reinterpret_cast<const uint2*>(p) + v);
            w[2 * v] = q.x; w[2 * v + 1] = q.y;
        } else {
            w[v] = load<ORDERED>(p + v);
        }
    }
}

// Code i of a unit (bits i * BITS .. of its words, LSB first) as a float in [1, 2), as code_float.
template <int BITS>
__device__ __forceinline__ float unit_code(const u32 (&w)[BITS], int i) {   // i constant after unrolling
    const int top = 23 - BITS, p = i * BITS, wi = p >> 5, b = p & 31;
    u32 t;
    if (b + BITS <= 32) t = b >= top ? w[wi] >> (b - top) : w[wi] << (top - b);
    else t = __funnelshift_r(w[wi], w[wi + 1], b - top);               // straddles two words
    return __uint_as_float(and_or<((1u << BITS) - 1u) << top, 0x3f800000u>(t));
}

// sum_i (code_i - 2^(BITS-1)) x_i / 2^BITS over one unit (x's sum sx given): its dot product before the scale.
template <int BITS>
__device__ __forceinline__ float unit_dot(const u32 (&w)[BITS], const float (&xf)[32], float sx) {
    float d0 = 0.0f, d1 = 0.0f;                              // two chains: half the FMA latency in line
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        d0 = fmaf(unit_code<BITS>(w, i), xf[i], d0);
        d1 = fmaf(unit_code<BITS>(w, i + 16), xf[i + 16], d1);
    }
    return fmaf(-1.5f, sx, d0 + d1);
}

// x's 32 values of one unit (16-byte aligned; ORDERED: as ld_ordered), and their sum in a fixed order.
template <bool ORDERED = false>
__device__ __forceinline__ void load_x32(const float* p, float (&xf)[32]) {
    const float4* xv = reinterpret_cast<const float4*>(p);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const float4 a = ORDERED ? ld_ordered(xv + q) : xv[q];
        xf[4 * q] = a.x; xf[4 * q + 1] = a.y; xf[4 * q + 2] = a.z; xf[4 * q + 3] = a.w;
    }
}

__device__ __forceinline__ float sum32(const float (&xf)[32]) {
    float part[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) part[q] = (xf[4 * q] + xf[4 * q + 1]) + (xf[4 * q + 2] + xf[4 * q + 3]);
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <int BITS, int R, int U, bool NORM, bool GATHER, bool BOUND = false, bool ORDERED = false>
__device__ __forceinline__ void unit_step(const u32* const (&wr)[R], const u16* const (&sr)[R], const XSrc& src,
                                          int u, int step, int gshift, float (&acc)[R], float& sq) {
    const float scale = (float)(1 << BITS);
    u32 w[U][R][BITS];
    float sc[U][R];
#pragma unroll
    for (int j = 0; j < U; ++j)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            load_unit<BITS, ORDERED>(wr[r] + (size_t)(u + j * step) * BITS, w[j][r]);
            sc[j][r] = h2f(load<ORDERED>(sr[r] + ((u + j * step) >> gshift))) * scale;
        }
#pragma unroll
    for (int j = 0; j < U; ++j) {
        float xf[32], gf[32];
        if constexpr (GATHER) {                               // x (and w) at the inputs' original indices
            const int base = (u + j * step) * 32;
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const bool in = !BOUND || base + i < src.rows;      // BOUND: the slice's last, partial unit
                const int c = src.start + base + i;
                const int at = in ? (src.perm != nullptr ? __ldg(src.perm + c) : c) : 0;
                xf[i] = in ? __ldg(src.x + at) : 0.0f;
                if constexpr (NORM) gf[i] = in ? __ldg(src.w + at) : 0.0f;
            }
        } else {
            load_x32<ORDERED>(src.x + (size_t)(u + j * step) * 32, xf);
            if constexpr (NORM) {
                const float4* wv = reinterpret_cast<const float4*>(src.w + (size_t)(u + j * step) * 32);
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    const float4 g = wv[q];
                    gf[4 * q] = g.x; gf[4 * q + 1] = g.y; gf[4 * q + 2] = g.z; gf[4 * q + 3] = g.w;
                }
            }
        }
        if constexpr (NORM) {                                 // folded RMSNorm: sum x^2, weigh x by w
            float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int q = 0; q < 8; ++q)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s4[e] = fmaf(xf[4 * q + e], xf[4 * q + e], s4[e]);
                    xf[4 * q + e] *= gf[4 * q + e];
                }
            sq += (s4[0] + s4[1]) + (s4[2] + s4[3]);
        }
        const float sx = sum32(xf);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = fmaf(sc[j][r], unit_dot<BITS>(w[j][r], xf, sx), acc[r]);
    }
}

template <int BITS, int R, int U, bool NORM, bool GATHER, bool ORDERED = false>
__device__ __forceinline__ void unit_rows(const QSlice& sl, XSrc src, int gshift, const int (&rows)[R],
                                          float (&acc)[R], float& sq) {
    const int step = blockDim.x;
    const u32* wr[R];
    const u16* sr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        wr[r] = sl.w + (size_t)rows[r] * sl.units * BITS;
        sr[r] = sl.s + (size_t)rows[r] * sl.groups;
    }
    if constexpr (!GATHER) {                                 // the gathered input: this slice's part
        src.x += sl.xoff;
        if constexpr (NORM) src.w += sl.xoff;
    }
    int u = threadIdx.x;
    // gathering, the units wholly inside the slice's inputs need no bound (a gathered copy is padded)
    const int whole = GATHER ? src.rows >> 5 : sl.units;
    for (; u + (U - 1) * step < whole; u += U * step)
        unit_step<BITS, R, U, NORM, GATHER, false, ORDERED>(wr, sr, src, u, step, gshift, acc, sq);
    if constexpr (U > 1)
        for (; u < whole; u += step)
            unit_step<BITS, R, 1, NORM, GATHER, false, ORDERED>(wr, sr, src, u, step, gshift, acc, sq);
    if constexpr (GATHER)
        for (; u < sl.units; u += step) unit_step<BITS, R, 1, NORM, true, true>(wr, sr, src, u, step, gshift, acc, sq);
}

// Staged (N bit 2, launch.MatvecShape.staged): the unit-a-lane layout with every weight copied into shared
// memory by cp.async before it is decoded, each thread's copies its own. The plain kernel's PTX loads all R rows
// of a unit before decoding any, but ptxas sinks each load to about one row ahead of its use (SASS of
// qmatvec<8, 1, 32, 0>, sm_90), so a warp has one or two rows' loads in flight, and on the H200 the kernel took
// 8 to 9 us for a 4096x4096 matrix at 2, 4 and 8 bits alike (GPU_NOTES.md, runs 9 and 11: DRAM 20% busy,
// warps waiting on loads). Staged, a thread issues all R rows of its first unit at once, a cp.async group a
// row, waits for row r alone before decoding it, and refills row r's slot with the row's next unit as soon as
// it is decoded: R rows' bytes stay in flight while it decodes.
//
// Each thread has its own STRIDE bytes of the block's dynamic shared memory: R slots of 32 bytes (a unit of
// any width, 4 * BITS bytes, copied in vectors as load_unit reads it), then R words of scales. STRIDE is an odd
// number of 16-byte lines, so the 16-byte reads of 8 consecutive threads fall in distinct banks, and every
// address is a thread's base plus a constant (no per-row addresses held in registers). A unit's fp16 scale is
// copied as the aligned 4-byte word holding it and read back at its half; where that word would reach outside
// the slice's scales (their first or last, alone in its word), the thread loads the scale itself.
template <int R>
struct StagedRing {
    static constexpr int SCALES = 32 * R, LINES = (36 * R + 15) / 16, STRIDE = 16 * (LINES | 1);
};

// Row r's unit at w (its scale at s; the slice's scales are [s0, s1)) into the thread's slot r at `mine`.
// EDGE: the block holds the matrix's first or last row, the only rows whose scales may be alone in a word.
template <int BITS, int R, bool EDGE>
__device__ __forceinline__ void stage_unit(u8* mine, int r, const u8* w, const u16* s, const u16* s0, const u16* s1) {
    using C = UnitCopy<BITS>;
#pragma unroll
    for (int c = 0; c < C::NV; ++c) cp_async<C::VB>(mine + 32 * r + c * C::VB, w + c * C::VB);
    u8* sd = mine + StagedRing<R>::SCALES + 4 * r;
    const u16* word = reinterpret_cast<const u16*>((size_t)s & ~(size_t)3);
    if (!EDGE || (word >= s0 && word + 2 <= s1)) cp_async<4>(sd, word);
    else *reinterpret_cast<u16*>(sd + ((size_t)s & 2)) = __ldg(s);
}

// Integer dot (N bit 3, staged only; 2-, 4- and 8-bit slices, others decode as above): x's unit as 23-bit
// integers q_i = round(x_i (2^22 - 1) / m), m = max |x_i| of the unit (the float's own rounding: that plus
// 1.5 2^23 has q_i + 2^22 in its low 23 bits), in three byte planes (q's bytes 0 and 1 unsigned, byte 2
// signed), each plane's 32 bytes in the order a width's codes come out of their words four at a time
// (code_bytes), so sum c_i q_i is 3 dp4a a 4 codes, exact in integers. The codes' offset 2^(BITS-1) comes
// off with sum q. Against the float decode (3 instructions a weight) a 4-bit word of 8 weights costs 3 to
// split its codes and 6 dp4a; the planes cost about 190 instructions a unit, shared by the R rows. x's error
// is at most m / (2^23 - 2) a value (fp32 rounds x_i to |x_i| 2^-24): the test bound is the float path's.
template <int BITS>
__device__ __forceinline__ u32 code_bytes(const u32 (&w)[BITS], int t) {   // codes of vector t, t < 8, a byte each
    if constexpr (BITS == 8) return w[t];
    else if constexpr (BITS == 4) return t & 1 ? (w[t >> 1] >> 4) & 0x0f0f0f0fu : w[t >> 1] & 0x0f0f0f0fu;
    else return (w[t >> 2] >> (2 * (t & 3))) & 0x03030303u;
}

template <int BITS>
__device__ __forceinline__ int code_index(int t, int j) {   // the unit's value in byte j of vector t
    if constexpr (BITS == 8) return 4 * t + j;
    else if constexpr (BITS == 4) return 8 * (t >> 1) + 2 * j + (t & 1);
    else return 16 * (t >> 2) + 4 * j + (t & 3);
}

struct XPlanes {
    u32 p[3][8];
    float step;                                            // x_i = q_i * step (about)
    float sum;                                             // sum q_i (exact below 2^24)
};

template <int BITS>
__device__ __forceinline__ XPlanes x_planes(const float (&xf)[32]) {
    XPlanes x;
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; ++i) m = fmaxf(m, fabsf(xf[i]));
    const float inv = m > 0.0f ? 4194303.0f / m : 0.0f;
    x.step = m * (1.0f / 4194303.0f);
    u32 b[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) b[i] = __float_as_uint(fmaf(xf[i], inv, 12582912.0f));   // 2^22 + q_i below bit 23
    int s0 = 0, s1 = 0, s2 = 0;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        const u32 *v0 = &b[code_index<BITS>(t, 0)], *v1 = &b[code_index<BITS>(t, 1)];
        const u32 *v2 = &b[code_index<BITS>(t, 2)], *v3 = &b[code_index<BITS>(t, 3)];
#pragma unroll
        for (int pl = 0; pl < 3; ++pl) {
            const u32 sel = (u32)pl | ((u32)(pl + 4) << 4);
            x.p[pl][t] = __byte_perm(__byte_perm(*v0, *v1, sel), __byte_perm(*v2, *v3, sel), 0x5410);
        }
        u32 top = x.p[2][t] ^ 0x40404040u;                 // bits 16-22 of 2^22 + q, less 64: q's byte 2, signed
        x.p[2][t] = top | ((top & 0x40404040u) << 1);
        s0 = dp4a<false>(x.p[0][t], 0x01010101u, s0);
        s1 = dp4a<false>(x.p[1][t], 0x01010101u, s1);
        s2 = dp4a<true>(0x01010101u, x.p[2][t], s2);
    }
    x.sum = (float)(s0 + 256 * s1 + 65536 * s2);
    return x;
}

// sum_i (c_i - 2^(BITS-1)) q_i for a unit of codes w.
template <int BITS>
__device__ __forceinline__ float unit_idot(const u32 (&w)[BITS], const XPlanes& x) {
    int a0 = 0, a1 = 0, a2 = 0;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        const u32 c = code_bytes<BITS>(w, t);
        a0 = dp4a<false>(c, x.p[0][t], a0);
        a1 = dp4a<false>(c, x.p[1][t], a1);
        a2 = dp4a<true>(c, x.p[2][t], a2);
    }
    return fmaf((float)a2, 65536.0f, fmaf((float)a1, 256.0f, (float)a0)) - (float)(1 << (BITS - 1)) * x.sum;
}

template <int BITS, int R, bool EDGE, bool IDOT = false>
__device__ __forceinline__ void staged_rows(const QSlice& sl, const float* __restrict__ x, int n, int gshift,
                                            const int (&rows)[R], float (&acc)[R], u8* mine) {
    const int T = blockDim.x;
    const u16 *s0 = sl.s, *s1 = sl.s + (size_t)n * sl.groups;
    const float scale = (float)(1 << BITS);
    // row r's words and scales lie these far from the block's first row's, the same for every thread (rows
    // past the matrix repeat its last; R rows of words are far under 4 GiB): one address a step is the thread's
    u32 woff[R];
    int soff[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        woff[r] = (u32)(rows[r] - rows[0]) * (u32)sl.units * (BITS * 4);
        soff[r] = (rows[r] - rows[0]) * sl.groups;
    }
    const u8* w0 = reinterpret_cast<const u8*>(sl.w + (size_t)rows[0] * sl.units * BITS);
    const u16* g0 = s0 + (size_t)rows[0] * sl.groups;
    int u = threadIdx.x;
#pragma unroll
    for (int r = 0; r < R; ++r) {                          // the first unit of every row, a group a row
        if (u < sl.units)
            stage_unit<BITS, R, EDGE>(mine, r, w0 + woff[r] + u * BITS * 4, g0 + soff[r] + (u >> gshift), s0, s1);
        cp_async_commit();
    }
    constexpr bool INT = IDOT && (BITS == 2 || BITS == 4 || BITS == 8);
    for (; u < sl.units; u += T) {
        float xf[32];
        load_x32(x + sl.xoff + (size_t)u * 32, xf);
        float sx = 0.0f;
        XPlanes xq;
        if constexpr (INT) xq = x_planes<BITS>(xf);
        else sx = sum32(xf);
        const int next = u + T;
        const u16* su = g0 + (u >> gshift);
        const u8* wn = w0 + (size_t)next * BITS * 4;
        const u16* sn = g0 + (next >> gshift);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            cp_async_wait<R - 1>();                        // row r's group: the oldest of the R in flight
            u32 buf[8], wv[BITS];                          // 16-byte reads past the unit's bytes: unused
            const uint4 q0 = *reinterpret_cast<const uint4*>(mine + 32 * r);
            buf[0] = q0.x; buf[1] = q0.y; buf[2] = q0.z; buf[3] = q0.w;
            if constexpr (BITS > 4) {
                const uint4 q1 = *reinterpret_cast<const uint4*>(mine + 32 * r + 16);
                buf[4] = q1.x; buf[5] = q1.y; buf[6] = q1.z; buf[7] = q1.w;
            }
#pragma unroll
            for (int i = 0; i < BITS; ++i) wv[i] = buf[i];
            const u16 h = *reinterpret_cast<const u16*>(mine + StagedRing<R>::SCALES + 4 * r + ((size_t)(su + soff[r]) & 2));
            if constexpr (INT) acc[r] = fmaf(h2f(h) * xq.step, unit_idot<BITS>(wv, xq), acc[r]);
            else acc[r] = fmaf(h2f(h) * scale, unit_dot<BITS>(wv, xf, sx), acc[r]);
            if (next < sl.units)                           // the slot is free: the row's next unit into it
                stage_unit<BITS, R, EDGE>(mine, r, wn + woff[r], sn + soff[r], s0, s1);
            cp_async_commit();
        }
    }
    cp_async_wait<0>();                                    // what is left are empty groups: the slots are free
}

// One slice's rows in layout L: 8 values a lane (quads, slice_rows) or 32 (a unit a lane, unit_rows, its loads
// in program order with N's bit 4; staged through shared memory with N's bit 2, staged_rows).
template <int BITS, int R, int U, int L, int N>
__device__ __forceinline__ void slice_dot(const QSlice& sl, const XSrc& src, int n, int gshift, const int (&rows)[R],
                                          float (&acc)[R], float& sq, u8* mine) {
    if constexpr (L == 8) slice_rows<BITS, R, U>(sl, src.x, gshift, rows, acc);
    else if constexpr ((N & 4) != 0) {                  // the checks of a lone scale, in the edge blocks only
        constexpr bool IDOT = (N & 8) != 0;
        if (rows[0] == 0 || rows[R - 1] == n - 1) staged_rows<BITS, R, true, IDOT>(sl, src.x, n, gshift, rows, acc, mine);
        else staged_rows<BITS, R, false, IDOT>(sl, src.x, n, gshift, rows, acc, mine);
    }
    else unit_rows<BITS, R, U, (N & 1) != 0, (N & 2) != 0, (N & 16) != 0>(sl, src, gshift, rows, acc, sq);
}

// Matrix `which` of the three (or slice s of it) as values: selects on kernel parameters, so the kernel has
// one copy of the decode loop per bit width rather than one per matrix and slice (and compiles in seconds).
#define QPICK(f) (which == 0 ? m0.f : which == 1 ? m1.f : m2.f)
#define QPICK_SLICE(f) (s == 0 ? QPICK(sl[0].f) : s == 1 ? QPICK(sl[1].f) : QPICK(sl[2].f))

__device__ __forceinline__ int pick3x3(const int (&a)[3][3], int which, int s) {   // by selects, as QPICK:
    int r[3];                                                  // an address into the parameter would copy
#pragma unroll                                                 // the whole struct to local memory
    for (int m = 0; m < 3; ++m) r[m] = s == 0 ? a[m][0] : s == 1 ? a[m][1] : a[m][2];
    return which == 0 ? r[0] : which == 1 ? r[1] : r[2];
}

__device__ __forceinline__ QSlice pick_slice(const QMat& m0, const QMat& m1, const QMat& m2, int which, int s) {
    QSlice r;
    r.w = QPICK_SLICE(w);
    r.s = QPICK_SLICE(s);
    r.bits = QPICK_SLICE(bits);
    r.units = QPICK_SLICE(units);
    r.groups = QPICK_SLICE(groups);
    r.xoff = QPICK_SLICE(xoff);
    return r;
}

// A block's result for one row: y[row] of matrix `which` from its dot product (+ bias, + y where it
// accumulates), or with glu (1 SwiGLU, 2 GeGLU: gated_act's act), m0.y[row] = act(gate . x) * (up . x).
// qmatvec's and tmatvec's epilogue.
__device__ __forceinline__ void qmat_store(const QMat& m0, const QMat& m1, const QMat& m2, int which, int glu,
                                           int row, float dot, float up) {
    if (glu) {
        m0.y[row] = gated_act(dot, glu) * up;
        return;
    }
    const float r = dot + (QPICK(has_bias) ? QPICK(bias)[row] : 0.0f);
    float* y = QPICK(y);
    y[row] = QPICK(accumulate) ? y[row] + r : r;
}

// y_m[n] = (accumulate ? y_m[n] : 0) + (has_bias ? bias_m[n] : 0) + W_m[n] . x for matrix m = blockIdx.y of
// up to three sharing x (q, k and v): block b takes rows b * R .. b * R + R - 1 (rows past the matrix repeat
// its last row, and are not written). glu (1 or 2): one matrix pair (gate m0, up m1) of one shape, and
// m0.y[n] = act(gate . x) * (up . x) (SwiGLU or GeGLU, as qmat_store). U: units per thread whose loads are in flight
// together; L: values per lane of a unit (8: quads, 32: a unit per lane). N, L = 32 only: bit 0, RMSNorm
// folded in (NormIn); bit 1, x gathered in the kernel (XMap); bits 2 and 3, staged (and the integer dot);
// N = 16, the loads in program order (ld_ordered; launch.MatvecShape.ordered). Each N its own instances, so the
// plain ones keep their registers.
template <int R, int U, int L, int N>
__device__ __forceinline__ void qmatvec_block(const float* __restrict__ x, int glu, const QMat& m0, const QMat& m1,
                                              const QMat& m2, const NormIn& norm, const XMap& map, int first) {
    static_assert(N == 0 || L == 32, "the fold and the gather are for the unit-a-lane layout only");
    static_assert((N & 4) == 0 || ((N & 3) == 0 && U == 1), "staged: plain (no fold, no gather), a unit at a time");
    static_assert((N & 8) == 0 || (N & 4) != 0, "the integer dot is staged");
    static_assert((N & 16) == 0 || (N == 16 && L == 32), "ordered loads: the plain unit-a-lane matvec");
    __shared__ float red[2][R * 32];
    const int row0 = blockIdx.x * R;
    int which = first;
    const int n = QPICK(n);
    if (row0 >= n) return;                                  // the grid spans the largest matrix
    u8* mine = nullptr;                                     // staged: this thread's part of the ring
    if constexpr ((N & 4) != 0) {
        DYNAMIC_SHARED(ring);
        mine = ring + threadIdx.x * StagedRing<R>::STRIDE;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float sum0 = 0.0f, sum1 = 0.0f, sq = 0.0f;
#pragma unroll 1
    for (which = first; which <= first + (glu != 0); ++which) {
        int rows[R];
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) { rows[r] = min(row0 + r, n - 1); acc[r] = 0.0f; }
        const int nslices = QPICK(nslices), gshift = QPICK(gshift);
        XSrc src{x, (N & 1) ? norm.w : nullptr, nullptr, 0, 0};
        if constexpr ((N & 2) != 0) src.perm = which == 0 ? map.perm[0] : which == 1 ? map.perm[1] : map.perm[2];
        float sq_unused = 0.0f;
        float& sqr = which == first ? sq : sq_unused;     // x^2 summed once, over the first matrix's loads
#pragma unroll 1
        for (int s = 0; s < nslices; ++s) {
            const QSlice sl = pick_slice(m0, m1, m2, which, s);
            if constexpr ((N & 2) != 0) {
                src.start = pick3x3(map.start, which, s);
                src.rows = pick3x3(map.rows, which, s);
            }
            switch (sl.bits) {
                case 2: slice_dot<2, R, U, L, N>(sl, src, n, gshift, rows, acc, sqr, mine); break;
                case 3: slice_dot<3, R, U, L, N>(sl, src, n, gshift, rows, acc, sqr, mine); break;
                case 4: slice_dot<4, R, U, L, N>(sl, src, n, gshift, rows, acc, sqr, mine); break;
                case 5: slice_dot<5, R, U, L, N>(sl, src, n, gshift, rows, acc, sqr, mine); break;
                case 6: slice_dot<6, R, U, L, N>(sl, src, n, gshift, rows, acc, sqr, mine); break;
                case 8: slice_dot<8, R, U, L, N>(sl, src, n, gshift, rows, acc, sqr, mine); break;
            }
        }
        float* rd = red[which - first];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) rd[r * 32 + warp] = v;
        }
        __syncthreads();
        float sum = 0.0f;
        if (threadIdx.x < R)
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) sum += rd[threadIdx.x * 32 + w];
        if (which == first) sum0 = sum; else sum1 = sum;
    }
    if constexpr ((N & 1) != 0) {                          // 1 / rms of x, from every thread's x^2
        __shared__ float sqs[32];
        const float v = warp_sum(sq);
        if (lane == 0) sqs[warp] = v;
        __syncthreads();
        float total = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += sqs[w];
        const float inv = rsqrtf(total / (float)norm.h + norm.eps);
        sum0 *= inv;
        sum1 *= inv;
    }
    const int row = row0 + threadIdx.x;
    if (threadIdx.x >= R || row >= n) return;
    qmat_store(m0, m1, m2, first, glu, row, sum0, sum1);
}

template <int R, int U, int L, int N>
__global__ void qmatvec(const float* __restrict__ x, int glu, QMat m0, QMat m1, QMat m2, NormIn norm, XMap map) {
    qmatvec_block<R, U, L, N>(x, glu, m0, m1, m2, norm, map, glu ? 0 : (int)blockIdx.y);
}

// Routed experts (MoE): one launch for the same linear (gate, up or down) of every slot's expert. Slot s
// (blockIdx.y; a token's j-th chosen expert, gpuengine/model.py) runs expert sel[s], whose QMat is tab[sel[s]]
// (n = 0 where that expert is an fp16 matrix, hmatvec_moe's), on row s / per of x (ldx floats apart: the
// token's input read as it is, per = k, or the slot's own row, per = 1, as gather_moe lays it out for the
// expert's option), into y + s * ldy. glu (1 or 2): gate and up of the expert in one launch, up's QMat in
// up[sel[s]], y = act(gate x) * (up x) as qmatvec's. No bias, no accumulate: the slots' sums meet in
// moe_combine.
// N = 4: staged, 12: staged with the integer dot, as qmatvec's N bits 2 and 3 (launch sizes the dynamic shared
// memory: StagedRing<R>, the same for every width).
// launch.MATVEC_REGS caps the instances past 168 registers (below, with qmatvec's caps).
#define QMATVEC_MOE_PARAMS const float* __restrict__ x, int ldx, int per, int glu, const QMat* __restrict__ tab, \
    const QMat* __restrict__ up, const int* __restrict__ sel, float* __restrict__ y, int ldy
template <int R, int U, int L, int N>
__device__ __forceinline__ void qmatvec_moe_body(QMATVEC_MOE_PARAMS) {
    const int slot = blockIdx.y, e = sel[slot];
    QMat m = tab[e];
    if (m.n == 0) return;
    m.y = y + (size_t)slot * ldy;
    QMat u = m;
    if (glu) u = up[e];
    qmatvec_block<R, U, L, N>(x + (size_t)(slot / per) * ldx, glu, m, u, m, NormIn{}, XMap{}, 0);
}

template <int R, int U, int L, int N = 0>
__global__ void qmatvec_moe(QMATVEC_MOE_PARAMS) {
    qmatvec_moe_body<R, U, L, N>(x, ldx, per, glu, tab, up, sel, y, ldy);
}

// Tensor-core decode (launch.MATVEC_TC, a candidate): slices of every width (2 to 8 bits) with scale groups
// of 128 values, x read as it is (no gather). Keeps fp32-class accuracy: the codes minus their offset are exact in
// fp16 and so are their products with fp16 values in the tensor cores' fp32 sums, and x goes in as two fp16
// parts, xh = fp16(x) in A's rows 0-7 and xl = fp16(x - xh) in rows 8-15 (a matvec needs one row of A's
// 16), about 22 bits of x where fp32 has 24. x is first scaled by a power of two that puts max |x| in
// [2^13, 2^14), so neither part overflows fp16 or loses bits to its subnormals; the sums are scaled back,
// exactly.
//
// Layout: a warp takes T tiles of 8 rows and the block's warps split K in k-blocks of 128 values (4 units,
// one scale group). Lane l = 4 g + t loads unit 4 i + t of row g of each tile, whole (vector loads), and
// decodes it to 16 f16x2 registers, the B fragments of the 8 16-k slices of k-block i (tc_decode: at 4 bits
// 9 instructions for 8 values, as Marlin decodes; 3, 5 and 6 bits about 3 for 2). tc_value says which of the unit's values each slot
// holds; the block stages x in shared memory in that order, TC_KC values a pass, each (k-block, slice, t)
// as the lane's whole A fragment (one 16-byte load). D's rows 0-7 then hold the xh sums and rows 8-15 the
// xl sums of every lane's columns 2t, 2t + 1, so each lane ends with whole sums: each k-block's 8 mma start
// from zero and the group scales of rows 2t, 2t + 1 weigh them in fp32. The warps' partial sums meet in
// shared memory; glu, bias and accumulate as qmatvec, and N = 1 folds RMSNorm in as qmatvec's N bit 0 does
// (x weighed by w where it is staged, the sums by 1 / rms of x).
#define TC_KC 2048

// The fields of one matrix tmatvec reads (picked from the parameters by value, as QPICK does).
struct TcMat {
    const u32* w;
    const u16* s;
    int n, units, groups, gshift;
};

__device__ __forceinline__ TcMat tc_pick(const QMat& m0, const QMat& m1, const QMat& m2, int which) {
    return TcMat{QPICK(sl[0].w), QPICK(sl[0].s), QPICK(n), QPICK(sl[0].units), QPICK(sl[0].groups), QPICK(gshift)};
}

// A unit of BITS-bit codes (its BITS words at p) as exact fp16 halves of code - 2^(BITS-1), in the B fragments
// of its 8 slices: b[s][0] holds the values at slots 2t, 2t + 1 of slice s, b[s][1] those at 2t + 8, 2t + 9.
// A mask-and-or puts two codes 16 bits apart into the mantissas of 1024 + c (or 1024 + 4^k c), then one
// HSUB2 or HFMA2 takes the offset off, exactly. Which value lands where is tc_value's map.
template <int K>                                            // 2-bit codes k of each byte pair, 4^k c + 1024
__device__ __forceinline__ u32 tc_two(u32 w) {
    const u32 h = and_or<0x00030003u << (2 * K), 0x64006400u>(w);
    if (K == 0) return hsub2(h, 0x64026402u);                         // - 1026
    if (K == 1) return hfma2(h, 0x34003400u, 0xdc08dc08u);            // / 4 - 258
    if (K == 2) return hfma2(h, 0x2c002c00u, 0xd420d420u);            // / 16 - 66
    return hfma2(h, 0x24002400u, 0xcc80cc80u);                        // / 64 - 18
}

// 3, 5 and 6 bits: no two codes sit exactly 16 bits apart, but values i and j = i + d do within a few bits
// of it (d = 4 for 3 and 5 bits, 2 for 6: blocks of 2d values, i the first d of each). One window of the
// unit's bits (a shift, or a funnel shift across two words) puts code i at bit s0 and code j at bit 16 + s1
// (s0, s1 <= 10 - BITS), one mask-and-or makes them 1024 + 2^s c, and one HFMA2 scales each half by 2^-s and
// takes 1024 2^-s + 2^(BITS-1) off, exactly: pair q fills b[q / 2][q % 2].
template <int BITS, int Q>
struct TcPair {
    static constexpr int d = BITS == 6 ? 2 : 4, i = (Q / d) * 2 * d + Q % d, j = i + d;
    static constexpr int D = BITS * d - 16, s0 = D < 0 ? -D : 0, s1 = s0 + D, k = BITS * i - s0;
    static constexpr u32 code = (1u << BITS) - 1u, mask = (code << s0) | (code << (16 + s1));
    static constexpr u32 scale = ((15u - s0) << 10) | ((15u - s1) << 26);                   // 2^-s0, 2^-s1
    static constexpr u32 neg = (0x8000u | ((25u - s0) << 10) | (1u << (BITS - 1 + s0)))
                               | ((0x8000u | ((25u - s1) << 10) | (1u << (BITS - 1 + s1))) << 16);
};

template <int BITS, int K>                                  // the unit's bits K .. K + 31 (K < 0: shifted up)
__device__ __forceinline__ u32 tc_window(const u32 (&w)[BITS]) {
    if constexpr (K < 0) return w[0] << -K;
    else if constexpr ((K & 31) == 0) return w[K >> 5];
    else if constexpr ((K >> 5) + 1 < BITS) return __funnelshift_r(w[K >> 5], w[(K >> 5) + 1], K & 31);
    else return w[K >> 5] >> (K & 31);
}

template <int BITS, int Q>
struct TcPairs {
    static __device__ __forceinline__ void decode(const u32 (&w)[BITS], u32 (&b)[8][2]) {
        using P = TcPair<BITS, Q>;
        b[Q >> 1][Q & 1] = hfma2(and_or<P::mask, 0x64006400u>(tc_window<BITS, P::k>(w)), P::scale, P::neg);
        TcPairs<BITS, Q + 1>::decode(w, b);
    }
};
template <int BITS>
struct TcPairs<BITS, 16> {
    static __device__ __forceinline__ void decode(const u32 (&)[BITS], u32 (&)[8][2]) {}
};

template <int BITS>
__device__ __forceinline__ void tc_decode(const u32* __restrict__ p, u32 (&b)[8][2]) {
    if constexpr (BITS == 4) {                              // word j: slices 2j, 2j + 1
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
        const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 w = words[j], w8 = w >> 8;
            b[2 * j][0] = hsub2(and_or<0x000f000fu, 0x64006400u>(w), 0x64086408u);                  // - 1032
            b[2 * j][1] = hfma2(and_or<0x00f000f0u, 0x64006400u>(w), 0x2c002c00u, 0xd480d480u);      // / 16 - 72
            b[2 * j + 1][0] = hsub2(and_or<0x000f000fu, 0x64006400u>(w8), 0x64086408u);
            b[2 * j + 1][1] = hfma2(and_or<0x00f000f0u, 0x64006400u>(w8), 0x2c002c00u, 0xd480d480u);
        }
    } else if constexpr (BITS == 8) {                       // word j: slice j
        const uint4 q0 = __ldg(reinterpret_cast<const uint4*>(p)), q1 = __ldg(reinterpret_cast<const uint4*>(p) + 1);
        const u32 words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            b[j][0] = hsub2(and_or<0x00ff00ffu, 0x64006400u>(words[j]), 0x64806480u);              // - 1152
            b[j][1] = hsub2(and_or<0x00ff00ffu, 0x64006400u>(words[j] >> 8), 0x64806480u);
        }
    } else if constexpr (BITS == 3 || BITS == 5 || BITS == 6) {
        u32 w[BITS];
        load_unit<BITS>(p, w);
        TcPairs<BITS, 0>::decode(w, b);
    } else {                                                // 2 bits, word j: slices 4j .. 4j + 3
        const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
        const u32 words[2] = {q.x, q.y};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const u32 w = words[j], w8 = w >> 8;
            b[4 * j][0] = tc_two<0>(w); b[4 * j][1] = tc_two<1>(w);
            b[4 * j + 1][0] = tc_two<2>(w); b[4 * j + 1][1] = tc_two<3>(w);
            b[4 * j + 2][0] = tc_two<0>(w8); b[4 * j + 2][1] = tc_two<1>(w8);
            b[4 * j + 3][0] = tc_two<2>(w8); b[4 * j + 3][1] = tc_two<3>(w8);
        }
    }
}

// The value (0..31 of a unit) tc_decode puts at slot p of slice s (p = 0..3: slots 2t, 2t + 1, 2t + 8, 2t + 9).
__device__ __forceinline__ int tc_value(int bits, int s, int p) {
    if (bits == 4) return 8 * (s >> 1) + 2 * (s & 1) + (p >> 1) + 4 * (p & 1);      // +0, 4, 1, 5
    if (bits == 8) return 4 * s + (p >> 1) + 2 * (p & 1);                            // +0, 2, 1, 3
    if (bits == 2) return 16 * (s >> 2) + 2 * (s & 3) + (p >> 1) + 8 * (p & 1);      // +0, 8, 1, 9
    const int d = bits == 6 ? 2 : 4, q = 2 * s + (p >> 1);                           // TcPair q's i or j
    return (q / d) * 2 * d + q % d + (p & 1) * d;
}

// One matrix's k-blocks of this pass, warp w taking a contiguous run of them: acc[tau][j] += the scaled dot
// of row 8 tau + 2t + j. Lane l loads the scale of its own B row (g) and takes those of rows 2t, 2t + 1 from
// lanes 8t and 8t + 4 (one load a tile, not two); groups are one k-block (128 values), so the words' and
// scales' addresses step by a constant.
template <int T, int BITS>
__device__ __forceinline__ void tc_rows(const TcMat m, const uint4 (*xs)[8][4], int c0, int kbs, int row0,
                                        float (&acc)[T][2]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3, per = (kbs + warps - 1) / warps;
    const int kb0 = warp * per, kb1 = min(kbs, kb0 + per);
    const u32* wr[T];
    const u16* sr[T];
#pragma unroll
    for (int tau = 0; tau < T; ++tau) {
        const size_t row = (size_t)min(row0 + 8 * tau + g, m.n - 1);
        wr[tau] = m.w + (row * m.units + c0 / 32 + kb0 * 4 + t) * BITS;
        sr[tau] = m.s + row * m.groups + c0 / 128 + kb0;
    }
    for (int kb = kb0; kb < kb1; ++kb) {
        u32 a[8][4];
#pragma unroll
        for (int sl = 0; sl < 8; ++sl) {
            const uint4 f = xs[kb][sl][t];
            a[sl][0] = f.x; a[sl][1] = f.y; a[sl][2] = f.z; a[sl][3] = f.w;
        }
#pragma unroll
        for (int tau = 0; tau < T; ++tau) {
            u32 b[8][2];
            tc_decode<BITS>(wr[tau], b);
            const float sg = h2f(__ldg(sr[tau]));
            wr[tau] += 4 * BITS;
            sr[tau] += 1;
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int sl = 0; sl < 8; ++sl) mma16816(d, a[sl], b[sl]);
            acc[tau][0] = fmaf(__shfl_sync(FULL_MASK, sg, 8 * t), d[0] + d[2], acc[tau][0]);
            acc[tau][1] = fmaf(__shfl_sync(FULL_MASK, sg, 8 * t + 4), d[1] + d[3], acc[tau][1]);
        }
    }
}

// One matrix's pass at its width (every matrix of a launch has one width: the launcher checks).
template <int T>
__device__ __forceinline__ void tc_rows_any(int bits, const TcMat m, const uint4 (*xs)[8][4], int c0, int kbs,
                                            int row0, float (&acc)[T][2]) {
    switch (bits) {
        case 2: tc_rows<T, 2>(m, xs, c0, kbs, row0, acc); break;
        case 3: tc_rows<T, 3>(m, xs, c0, kbs, row0, acc); break;
        case 4: tc_rows<T, 4>(m, xs, c0, kbs, row0, acc); break;
        case 5: tc_rows<T, 5>(m, xs, c0, kbs, row0, acc); break;
        case 6: tc_rows<T, 6>(m, xs, c0, kbs, row0, acc); break;
        default: tc_rows<T, 8>(m, xs, c0, kbs, row0, acc); break;
    }
}

template <int T, int N>
__global__ void tmatvec(const float* __restrict__ x, int glu, QMat m0, QMat m1, QMat m2, NormIn norm) {
    __shared__ uint4 xs[TC_KC / 128][8][4];                 // [k-block][slice][t]: (xh, xl) at k 2t.., 2t + 8..
    __shared__ float red[2][8 * T][33];
    const int first = glu ? 0 : blockIdx.y, row0 = blockIdx.x * 8 * T;
    int which = first;
    const int n = QPICK(n), k = QPICK(sl[0].units) * 32, bits = QPICK(sl[0].bits);   // one k, one width
    if (row0 >= n) return;                                  // the grid spans the largest matrix
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float mx = 0.0f, sq = 0.0f;                            // N: x weighed by the norm's w, and sum x^2
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        mx = fmaxf(mx, fabsf(N ? x[i] * norm.w[i] : x[i]));
        if (N) sq = fmaf(x[i], x[i], sq);
    }
    mx = block_reduce(mx, true);
    const float inv = N ? rsqrtf(block_reduce(sq, false) / (float)norm.h + norm.eps) : 1.0f;
    int ex = 0;
    frexpf(mx, &ex);                                        // mx = f 2^ex, f in [0.5, 1)
    const int e = mx > 0.0f ? min(14 - ex, 120) : 0;
    const float up = ldexpf(1.0f, e), down = ldexpf(1.0f, -e);
    float acc[2][T][2];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int tau = 0; tau < T; ++tau) acc[m][tau][0] = acc[m][tau][1] = 0.0f;
    const TcMat mf = tc_pick(m0, m1, m2, first), mu = tc_pick(m0, m1, m2, 1);
    for (int c0 = 0; c0 < k; c0 += TC_KC) {
        const int kbs = min(TC_KC, k - c0) / 128;
        __syncthreads();                                    // the previous pass's fragments are used
        for (int i = threadIdx.x; i < kbs * 32; i += blockDim.x) {
            const int kb = i >> 5, sl = (i >> 2) & 7, tt = i & 3;
            const int at = c0 + (kb * 4 + tt) * 32;
            float v[4];                                     // slots 2t, 2t + 1, 2t + 8, 2t + 9
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const int i = at + tc_value(bits, sl, p);
                v[p] = (N ? x[i] * norm.w[i] : x[i]) * up;
            }
            u32 hi[4], lo[4];
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const u16 h = f2h(v[p]);
                hi[p] = h;
                lo[p] = f2h(v[p] - h2f(h));
            }
            xs[kb][sl][tt] = make_uint4(hi[0] | (hi[1] << 16), lo[0] | (lo[1] << 16), hi[2] | (hi[3] << 16),
                                        lo[2] | (lo[3] << 16));
        }
        __syncthreads();
        tc_rows_any<T>(bits, mf, xs, c0, kbs, row0, acc[0]);
        if (glu) tc_rows_any<T>(bits, mu, xs, c0, kbs, row0, acc[1]);
    }
    const int g = lane >> 2, t = lane & 3;
    if (g == 0)
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int tau = 0; tau < T; ++tau)
#pragma unroll
                for (int j = 0; j < 2; ++j) red[m][8 * tau + 2 * t + j][warp] = acc[m][tau][j];
    __syncthreads();
    const int r = threadIdx.x, row = row0 + r;
    if (r >= 8 * T || row >= n) return;
    float sum[2] = {0.0f, 0.0f};
    for (int m = 0; m <= (glu != 0); ++m)
        for (int wp = 0; wp < warps; ++wp) sum[m] += red[m][r][wp];
    qmat_store(m0, m1, m2, first, glu, row, sum[0] * down * inv, sum[1] * down * inv);
}

// The staged ring's bytes a thread for each compiled R (kernels.MATVEC_STAGED), for the test that
// launch.MatvecShape.shared_bytes matches.
extern "C" __global__ void staged_layout(unsigned long long* out) {
    out[0] = StagedRing<4>::STRIDE; out[1] = StagedRing<8>::STRIDE; out[2] = StagedRing<16>::STRIDE;
}

// Sizes and offsets of QMat's, NormIn's and XMap's fields, for the test that launch.py's structured dtypes
// match the compiler's.
extern "C" __global__ void qmat_layout(unsigned long long* out) {
    const QMat* p = nullptr;
    out[0] = sizeof(QMat); out[1] = sizeof(QSlice);
    out[2] = (unsigned long long)&p->y; out[3] = (unsigned long long)&p->bias; out[4] = (unsigned long long)&p->sl;
    out[5] = (unsigned long long)&p->n; out[6] = (unsigned long long)&p->nslices;
    out[7] = (unsigned long long)&p->accumulate; out[8] = (unsigned long long)&p->has_bias;
    out[9] = (unsigned long long)&p->sl[0].bits; out[10] = (unsigned long long)&p->sl[0].xoff;
    out[11] = (unsigned long long)&p->gshift;
    const NormIn* r = nullptr;
    out[12] = sizeof(NormIn); out[13] = (unsigned long long)&r->eps; out[14] = (unsigned long long)&r->h;
    const XMap* g = nullptr;
    out[15] = sizeof(XMap); out[16] = (unsigned long long)&g->start; out[17] = (unsigned long long)&g->rows;
}

// The same for an unquantized fp16 matrix (n_rows, k) (models run without a plan): lane l reads
// columns 2l, 2l + 1, then 64 further on, as one 4-byte word each (k is even; the launcher checks).
__device__ __forceinline__ float hrow_dot(const float* __restrict__ x, const u32* __restrict__ w, int row, int k) {
    const u32* wr = w + (size_t)row * (k >> 1);
    float acc = 0.0f;
    for (int c = threadIdx.x & 31; c < (k >> 1); c += 32) {
        const u32 pair = __ldg(wr + c);
        acc = fmaf(h2f((u16)(pair & 0xffffu)), x[2 * c], acc);
        acc = fmaf(h2f((u16)(pair >> 16)), x[2 * c + 1], acc);
    }
    return warp_sum(acc);
}

// With a grid of T rows in y: x (T, k) and y (T, n_rows), row t = blockIdx.y (prefill's router logits, in
// fp32 as decode computes them, so both pick the same experts).
extern "C" __global__ void hmatvec(const float* __restrict__ x, float* __restrict__ y, const u32* __restrict__ w,
                                   const float* __restrict__ bias, int has_bias, int accumulate, int n_rows, int k) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    x += (size_t)blockIdx.y * k;
    y += (size_t)blockIdx.y * n_rows;
    const float acc = hrow_dot(x, w, row, k);
    if (lane == 0) {
        float r = acc + (has_bias ? bias[row] : 0.0f);
        y[row] = accumulate ? y[row] + r : r;
    }
}

// xp, the matvec's input laid out per slice: slice s at xoff_s holds x[perm[start_s + j]] for
// j < rows_s, then zeros up to its units_s * 32 (perm is the identity where has_perm is 0).
extern "C" __global__ void gather_x(const float* __restrict__ x, const int* __restrict__ perm, int has_perm,
                                    float* __restrict__ xp, int nslices, int st0, int r0, int n0, int o0,
                                    int st1, int r1, int n1, int o1, int st2, int r2, int n2, int o2) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    int start, rows, len, off, j;
    if (i < n0) { start = st0; rows = r0; off = o0; j = i; }
    else if (nslices > 1 && i < n0 + n1) { start = st1; rows = r1; off = o1; j = i - n0; }
    else if (nslices > 2 && i < n0 + n1 + n2) { start = st2; rows = r2; off = o2; j = i - n0 - n1; }
    else return;
    len = rows;
    const int src = start + j;
    xp[off + j] = j < len ? x[has_perm ? perm[src] : src] : 0.0f;
}

// hmatvec for routed experts stored in fp16 (a model run without a plan): slot s = blockIdx.y runs expert
// sel[s], the matrix at tab[sel[s]] (0 where that expert is packed, qmatvec_moe's), on row s / per of x into
// y + s * ldy.
extern "C" __global__ void hmatvec_moe(const float* __restrict__ x, int ldx, int per, const unsigned long long* __restrict__ tab,
                                       const int* __restrict__ sel, float* __restrict__ y, int ldy, int n_rows, int k) {
    const int slot = blockIdx.y, row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const u32* w = reinterpret_cast<const u32*>(tab[sel[slot]]);
    if (w == nullptr || row >= n_rows) return;
    const float acc = hrow_dot(x + (size_t)(slot / per) * ldx, w, row, k);
    if ((threadIdx.x & 31) == 0) y[(size_t)slot * ldy + row] = acc;
}

// gather_x for routed experts: each slot's input as its expert's option reads it. Slot s = blockIdx.y reads
// row s / per of x (per = k: a token's normed hidden state, read by each of its k slots; 1: the slot's own
// row) and writes row s of xp (ldp floats apart) in the layout of XGather tab[sel[s]]: slice j at off[j]
// holds x[perm[start[j] + i]] for i < rows[j] (x[start[j] + i] where perm is null), then zeros to len[j].
struct XGather {
    const int* perm;
    int nslices;
    int start[3], rows[3], len[3], off[3];
};

extern "C" __global__ void gather_moe(const float* __restrict__ x, int ldx, int per, const XGather* __restrict__ tab,
                                      const int* __restrict__ sel, float* __restrict__ xp, int ldp) {
    const int slot = blockIdx.y;
    const XGather g = tab[sel[slot]];
    const float* xs = x + (size_t)(slot / per) * ldx;
    float* out = xp + (size_t)slot * ldp;
    for (int j = 0; j < g.nslices; ++j)
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < g.len[j]; i += gridDim.x * blockDim.x) {
            const int src = g.start[j] + i;
            out[g.off[j] + i] = i < g.rows[j] ? xs[g.perm != nullptr ? g.perm[src] : src] : 0.0f;
        }
}

// XGather's size and field offsets, for the test that launch.XGATHER matches the compiler's.
extern "C" __global__ void xgather_layout(unsigned long long* out) {
    const XGather* p = nullptr;
    out[0] = sizeof(XGather); out[1] = (unsigned long long)&p->nslices; out[2] = (unsigned long long)&p->start;
    out[3] = (unsigned long long)&p->rows; out[4] = (unsigned long long)&p->len; out[5] = (unsigned long long)&p->off;
}

// Register caps (launch.MATVEC_REGS: NVRTC's -DVRAMWISE_MATVEC_REGS), on the instances whose registers halve
// the blocks an SM holds: uncapped (nvcc 13, sm_90) the unit-a-lane instances that fold the norm in or gather x
// take up to 174 registers where the plain one takes 128, and some qmatvec_moe instances up to 255. Capped,
// 128 and 168: a few words spill (benchmarks/nvrtc_check.py lists them). Only the instances past their cap
// are capped: __maxnreg__ is a budget ptxas fills, so a cap on one that takes fewer (qmatvec<2, 1, 32, 1>: 84)
// raises it to the cap, and the plain instances keep their code. The staged matvec is held to what it takes
// under nvcc 13.0 and NVRTC 13.5, which NVRTC 13.0 exceeds (below). Explicit specializations are compiled
// wherever they are defined, so a program gets its own family's only (kernels.options names it:
// VRAMWISE_CAPS_<family>; nvcc's check build, all): in every program, all of them made NVRTC take about a
// minute longer a compile (2 cores).
#ifdef VRAMWISE_MATVEC_REGS
#define QMATVEC_CAPPED_AT(CAP, R, U, N) \
    template <> __global__ void __maxnreg__(CAP) qmatvec<R, U, 32, N>(const float* __restrict__ x, int glu, QMat m0, \
                                                                    QMat m1, QMat m2, NormIn norm, XMap map) { \
        qmatvec_block<R, U, 32, N>(x, glu, m0, m1, m2, norm, map, glu ? 0 : (int)blockIdx.y); \
    }
#define QMATVEC_CAPPED(R, U, N) QMATVEC_CAPPED_AT(128, R, U, N)
#define QMATVEC_MOE_CAPPED(R, U, L, N) \
    template <> __global__ void __maxnreg__(168) qmatvec_moe<R, U, L, N>(QMATVEC_MOE_PARAMS) { \
        qmatvec_moe_body<R, U, L, N>(x, ldx, per, glu, tab, up, sel, y, ldy); \
    }
#if defined(VRAMWISE_CAPS_8x1x32) || defined(VRAMWISE_NVCC_CHECK)      // 174, 168, 168; experts 255
QMATVEC_CAPPED(8, 1, 1) QMATVEC_CAPPED(8, 1, 2) QMATVEC_CAPPED(8, 1, 3) QMATVEC_MOE_CAPPED(8, 1, 32, 0)
#endif
#if defined(VRAMWISE_CAPS_4x2x32) || defined(VRAMWISE_NVCC_CHECK)      // 140 (N = 1), 168 (N = 3); experts 255
QMATVEC_CAPPED(4, 2, 1) QMATVEC_CAPPED(4, 2, 3) QMATVEC_MOE_CAPPED(4, 2, 32, 0)
#endif
#if defined(VRAMWISE_CAPS_4x4x8) || defined(VRAMWISE_NVCC_CHECK)       // experts 176
QMATVEC_MOE_CAPPED(4, 4, 8, 0)
#endif
// The staged matvec at what nvcc 13.0 and NVRTC 13.5 give it (NVRTC 13.0: 127, 167 and 255 registers at 4, 8
// and 16 rows; benchmarks/results/nvrtc_check_13.0.json).
#if defined(VRAMWISE_CAPS_4x1x32s) || defined(VRAMWISE_NVCC_CHECK)
QMATVEC_CAPPED_AT(80, 4, 1, 4) QMATVEC_CAPPED_AT(80, 4, 1, 12)
#endif
#if defined(VRAMWISE_CAPS_8x1x32s) || defined(VRAMWISE_NVCC_CHECK)     // experts 167 and 224 (NVRTC 13.0: 255)
QMATVEC_CAPPED(8, 1, 4) QMATVEC_CAPPED(8, 1, 12) QMATVEC_MOE_CAPPED(8, 1, 32, 4) QMATVEC_MOE_CAPPED(8, 1, 32, 12)
#endif
#if defined(VRAMWISE_CAPS_16x1x32s) || defined(VRAMWISE_NVCC_CHECK)    // staged experts 254, 255
QMATVEC_CAPPED_AT(168, 16, 1, 4) QMATVEC_CAPPED_AT(168, 16, 1, 12)
QMATVEC_MOE_CAPPED(16, 1, 32, 4) QMATVEC_MOE_CAPPED(16, 1, 32, 12)
#endif
#endif

#ifdef VRAMWISE_NVCC_CHECK                  // nvcc builds of this file (benchmarks/matvec_sass.py): kernels/__init__'s list
#define QMATVEC(R, U, L, N) template __global__ void qmatvec<R, U, L, N>(const float*, int, QMat, QMat, QMat, NormIn, XMap);
#define QMATVEC_LANE(R, U) QMATVEC(R, U, 32, 0) QMATVEC(R, U, 32, 1) QMATVEC(R, U, 32, 2) QMATVEC(R, U, 32, 3) \
    QMATVEC(R, U, 32, 16)
QMATVEC(1, 4, 8, 0) QMATVEC(2, 4, 8, 0) QMATVEC(2, 8, 8, 0) QMATVEC(4, 4, 8, 0)
QMATVEC_LANE(2, 1) QMATVEC_LANE(4, 1) QMATVEC_LANE(4, 2) QMATVEC_LANE(8, 1)
#define QMATVEC_MOE(R, U, L) template __global__ void qmatvec_moe<R, U, L>(const float*, int, int, int, const QMat*, const QMat*, const int*, float*, int);
QMATVEC_MOE(1, 4, 8) QMATVEC_MOE(2, 4, 8) QMATVEC_MOE(2, 8, 8) QMATVEC_MOE(4, 4, 8)
QMATVEC_MOE(2, 1, 32) QMATVEC_MOE(4, 1, 32) QMATVEC_MOE(4, 2, 32) QMATVEC_MOE(8, 1, 32)
#define QMATVEC_STAGED_N(R, N) QMATVEC(R, 1, 32, N) template __global__ void qmatvec_moe<R, 1, 32, N>(const float*, int, int, int, const QMat*, const QMat*, const int*, float*, int);
#define QMATVEC_STAGED(R) QMATVEC_STAGED_N(R, 4) QMATVEC_STAGED_N(R, 12)
QMATVEC_STAGED(4) QMATVEC_STAGED(8) QMATVEC_STAGED(16)
#define TMATVEC(T, N) template __global__ void tmatvec<T, N>(const float*, int, QMat, QMat, QMat, NormIn);
TMATVEC(1, 0) TMATVEC(2, 0) TMATVEC(4, 0) TMATVEC(1, 1) TMATVEC(2, 1) TMATVEC(4, 1)
#endif
