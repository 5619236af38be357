// Decode: y = W x for one token, W packed in a registry option (planner/formats.py), fused with its
// dequantization. One warp per output row; lane l takes packing units l, l + 32, ... (32 values in
// BITS uint32 words, one fp16 scale per group), so the warp reads each row's words contiguously.
// A mixed option's slices are separate packed arrays, each at its own width: the slice loop is outside
// the unit loop, and the bit width is a template parameter, so the inner loop has no branch and every
// shift is a constant. x arrives permuted and zero-padded per slice (gather_x), so the codes packed
// into a slice's last, partial unit multiply zeros. Accumulation in fp32.

template <int BITS>
__device__ __forceinline__ void load_unit(const u32* __restrict__ w, int u, u32 (&wd)[BITS]) {
    if constexpr (BITS % 4 == 0) {              // 16-byte loads (layout.py keeps these arrays 16-byte aligned)
        const uint4* p = reinterpret_cast<const uint4*>(w + (size_t)u * BITS);
#pragma unroll
        for (int j = 0; j < BITS / 4; ++j) {
            const uint4 v = __ldg(p + j);
            wd[4 * j] = v.x; wd[4 * j + 1] = v.y; wd[4 * j + 2] = v.z; wd[4 * j + 3] = v.w;
        }
    } else if constexpr (BITS == 2) {           // 8-byte loads
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(w + (size_t)u * BITS));
        wd[0] = v.x; wd[1] = v.y;
    } else {
#pragma unroll
        for (int j = 0; j < BITS; ++j) wd[j] = __ldg(w + (size_t)u * BITS + j);
    }
}

// sum over one unit of (code_i - 2^(b-1)) * x_i: every shift a constant, decoding by bit tricks
template <int BITS>
__device__ __forceinline__ float unit_dot(const u32 (&wd)[BITS], const float* __restrict__ x) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float part = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const float4 xv = x4[q];
        const float xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int bit = (q * 4 + r) * BITS, word = bit >> 5, off = bit & 31;
            u32 v = wd[word] >> off;
            if (off + BITS > 32) v |= wd[word + 1] << (32 - off);
            part = fmaf(centered<BITS>(v & ((1u << BITS) - 1u)), xs[r], part);
        }
    }
    return part;
}

// A lane's share of one row of a slice: units lane, lane + 32, ..., ILP of them loaded before any is
// used, so each lane keeps ILP independent reads in flight (decode is bound by memory latency otherwise);
// fewer for wide codes, whose words would otherwise take registers from occupancy.

template <int BITS>
__device__ __forceinline__ float slice_dot(const u32* __restrict__ w, const u16* __restrict__ scales,
                                           const float* __restrict__ x, int units, int gunits, int lane) {
    constexpr int ILP = BITS <= 4 ? 4 : 2;
    float acc = 0.0f;
    for (int base = lane; base < units; base += 32 * ILP) {
        u32 wd[ILP][BITS];
        float sc[ILP];
#pragma unroll
        for (int j = 0; j < ILP; ++j) {
            const int u = base + 32 * j;
            if (u < units) {
                load_unit<BITS>(w, u, wd[j]);
                sc[j] = h2f(__ldg(scales + u / gunits));
            }
        }
#pragma unroll
        for (int j = 0; j < ILP; ++j) {
            const int u = base + 32 * j;
            if (u < units) acc = fmaf(sc[j], unit_dot<BITS>(wd[j], x + (size_t)u * 32), acc);
        }
    }
    return acc;
}

__device__ __forceinline__ float slice_dot_any(int bits, const u32* w, const u16* s, const float* x, int units,
                                               int gunits, int lane) {
    switch (bits) {
        case 2: return slice_dot<2>(w, s, x, units, gunits, lane);
        case 3: return slice_dot<3>(w, s, x, units, gunits, lane);
        case 4: return slice_dot<4>(w, s, x, units, gunits, lane);
        case 5: return slice_dot<5>(w, s, x, units, gunits, lane);
        case 6: return slice_dot<6>(w, s, x, units, gunits, lane);
        case 8: return slice_dot<8>(w, s, x, units, gunits, lane);
    }
    return __int_as_float(0x7fc00000);                      // unreachable: the launcher checks bits
}

// y[n] = (accumulate ? y[n] : 0) + (has_bias ? bias[n] : 0) + sum over slices of W_s[n] . x_s.
// Slice s: words (n_rows, units_s * bits_s), scales (n_rows, groups_s), x at x + xoff_s.
extern "C" __global__ void qmatvec(const float* __restrict__ x, float* __restrict__ y,
                                   const float* __restrict__ bias, int has_bias, int accumulate, int n_rows,
                                   int gunits, int nslices,
                                   const u32* w0, const u16* s0, int b0, int u0, int g0, int x0,
                                   const u32* w1, const u16* s1, int b1, int u1, int g1, int x1,
                                   const u32* w2, const u16* s2, int b2, int u2, int g2, int x2) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    float acc = slice_dot_any(b0, w0 + (size_t)row * u0 * b0, s0 + (size_t)row * g0, x + x0, u0, gunits, lane);
    if (nslices > 1)
        acc += slice_dot_any(b1, w1 + (size_t)row * u1 * b1, s1 + (size_t)row * g1, x + x1, u1, gunits, lane);
    if (nslices > 2)
        acc += slice_dot_any(b2, w2 + (size_t)row * u2 * b2, s2 + (size_t)row * g2, x + x2, u2, gunits, lane);
    acc = warp_sum(acc);
    if (lane == 0) {
        float r = acc + (has_bias ? bias[row] : 0.0f);
        y[row] = accumulate ? y[row] + r : r;
    }
}

// The same for an unquantized fp16 matrix (n_rows, k) (models run without a plan): lane l reads
// columns 2l, 2l + 1, then 64 further on, as one 4-byte word each (k is even; the launcher checks).
extern "C" __global__ void hmatvec(const float* __restrict__ x, float* __restrict__ y, const u32* __restrict__ w,
                                   const float* __restrict__ bias, int has_bias, int accumulate, int n_rows, int k) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const u32* wr = w + (size_t)row * (k >> 1);
    float acc = 0.0f;
    for (int c = lane; c < (k >> 1); c += 32) {
        const u32 pair = __ldg(wr + c);
        acc = fmaf(h2f((u16)(pair & 0xffffu)), x[2 * c], acc);
        acc = fmaf(h2f((u16)(pair >> 16)), x[2 * c + 1], acc);
    }
    acc = warp_sum(acc);
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
