// Prefill: a quantized matrix is dequantized to fp16 in tiles of rows (planner.memory's dequant_tile)
// for cuBLAS, in its original input order (a mixed option's permutation undone on the way).

// One slice of rows [row0, row0 + nrows): out (nrows, k) fp16, out[r, col(j)] = scale * (code - 2^(b-1))
// for the slice's j-th input, col(j) = perm[start + j] (or start + j). One thread per value.
extern "C" __global__ void dequant_slice(const u32* __restrict__ w, const u16* __restrict__ scales,
                                         const int* __restrict__ perm, int has_perm, u16* __restrict__ out,
                                         int row0, int nrows, int k, int start, int rows, int bits, int units,
                                         int groups, int group_size) {
    const long long total = (long long)nrows * rows;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / rows), j = (int)(i % rows), row = row0 + r;
        const u32* wr = w + (size_t)row * units * bits;
        const int bit = (j & 31) * bits, word = (j >> 5) * bits + (bit >> 5), off = bit & 31;
        u32 v = wr[word] >> off;
        if (off + bits > 32) v |= wr[word + 1] << (32 - off);
        v &= (1u << bits) - 1u;
        const float d = h2f(scales[(size_t)row * groups + j / group_size]);
        const int col = has_perm ? perm[start + j] : start + j;
        out[(size_t)r * k + col] = f2h(d * (float)((int)v - (1 << (bits - 1))));
    }
}

// The same tile, as dequant_slice writes it, from a 2D grid: blockIdx.y strides over the tile's rows, x over
// the slice's inputs, so a value's unit, code and scale group come from shifts (group_size = 32 << gshift)
// where dequant_slice divides a 64-bit flat index (sm_90 SASS: 64-bit division is a long software
// sequence). A warp's 32 values are one unit: its loads are that unit's words, its stores 64 contiguous
// bytes where there is no permutation.
extern "C" __global__ void dequant_rows(const u32* __restrict__ w, const u16* __restrict__ scales,
                                        const int* __restrict__ perm, int has_perm, u16* __restrict__ out,
                                        int row0, int nrows, int k, int start, int rows, int bits, int units,
                                        int groups, int gshift) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= rows) return;
    const int bit = (j & 31) * bits, word = (j >> 5) * bits + (bit >> 5), off = bit & 31;
    const bool two = off + bits > 32;
    const int col = has_perm ? perm[start + j] : start + j;
    const int half = 1 << (bits - 1);
    const u32 mask = (1u << bits) - 1u;
    for (int r = blockIdx.y; r < nrows; r += gridDim.y) {
        const size_t row = (size_t)(row0 + r);
        const u32* wr = w + row * units * bits;
        const u32 v = __funnelshift_r(wr[word], two ? wr[word + 1] : 0u, off) & mask;
        const float d = h2f(scales[row * groups + (j >> (5 + gshift))]);
        out[(size_t)r * k + col] = f2h(d * (float)((int)v - half));
    }
}

// fp32 -> fp16 (round to nearest even), n values: activations into cuBLAS's fp16 input.
extern "C" __global__ void to_half(const float* __restrict__ x, u16* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = f2h(x[i]);
}
