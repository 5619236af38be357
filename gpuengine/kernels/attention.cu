// The KV cache in the plan's format (planner.formats.KV_FORMATS) and attention over it, decoding each
// cached element from its raw bytes. FMT: 0 fp16, 1 fp8 (e4m3fn), 2 q8 (llama.cpp q8_0 blocks: fp16
// scale, 32 int8), 3 q4 (q4_0 blocks: fp16 scale, byte j holds codes j and j + 16). Rows are
// (position, kv head) of row_bytes bytes: planner.memory.kv_cache_buffers' layout. The stored bytes
// equal refengine.quant.kv_quantize's and the decoded values its kv_dequantize's.

template <int FMT>
__device__ __forceinline__ float kv_elem(const u8* __restrict__ row, int d) {
    if (FMT == 0) return h2f(reinterpret_cast<const u16*>(row)[d]);
    if (FMT == 1) return e4m3_to_f(row[d]);
    if (FMT == 2) {
        const u8* blk = row + (d >> 5) * 34;
        return h2f((u16)(blk[0] | (blk[1] << 8))) * (float)(signed char)blk[2 + (d & 31)];
    }
    const u8* blk = row + (d >> 5) * 18;
    const int j = d & 31;
    const u32 byte = blk[2 + (j & 15)];
    const int code = (int)(j < 16 ? (byte & 15u) : (byte >> 4));
    return h2f((u16)(blk[0] | (blk[1] << 8))) * (float)(code - 8);
}

// Writes rows x (t, heads, d) fp32 at cache positions pos (t,) (read on the device, so a captured decode
// step replays at any position): one warp per row, lane l owns elements l, l + 32, ...; a q8 / q4 block
// of 32 is one pass of the warp, whose reductions give the block's scale. Every byte of each written row
// is stored (padding blocks quantize zeros).
template <int FMT>
__global__ void kv_store(const float* __restrict__ x, u8* __restrict__ cache, const int* __restrict__ pos, int t,
                         int heads, int d, int row_bytes) {
    const int lane = threadIdx.x & 31;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    for (int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < t * heads; r += warps) {
        const float* xr = x + (size_t)r * d;
        u8* row = cache + ((size_t)pos[r / heads] * heads + r % heads) * row_bytes;
        if (FMT == 0) {
            u16* out = reinterpret_cast<u16*>(row);
            for (int i = lane; i < d; i += 32) out[i] = f2h(xr[i]);
        } else if (FMT == 1) {
            for (int i = lane; i < d; i += 32) row[i] = f_to_e4m3(xr[i]);
        } else {
            for (int b = 0; b < (d + 31) / 32; ++b) {
                const int i = b * 32 + lane;
                const float v = i < d ? xr[i] : 0.0f;
                if (FMT == 2) {
                    u8* blk = row + b * 34;
                    const u16 dh = f2h(warp_max(fabsf(v)) / 127.0f);
                    const float ds = h2f(dh);
                    const int q = ds == 0.0f ? 0 : (int)rintf(v / ds);
                    blk[2 + lane] = (u8)(signed char)q;
                    if (lane == 0) { blk[0] = (u8)(dh & 0xffu); blk[1] = (u8)(dh >> 8); }
                } else {
                    // the value of largest magnitude, first one on ties (numpy argmax), maps to code 0
                    float best = fabsf(v);
                    int at = lane;
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) {
                        const float ob = __shfl_xor_sync(FULL_MASK, best, o);
                        const int oa = __shfl_xor_sync(FULL_MASK, at, o);
                        if (ob > best || (ob == best && oa < at)) { best = ob; at = oa; }
                    }
                    const float m = __shfl_sync(FULL_MASK, v, at);
                    const u16 dh = f2h(m / -8.0f);
                    const float ds = h2f(dh);
                    const int q = ds == 0.0f ? 8 : (int)fminf(fmaxf(rintf(v / ds) + 8.0f, 0.0f), 15.0f);
                    const int hi = __shfl_down_sync(FULL_MASK, q, 16);
                    u8* blk = row + b * 18;
                    if (lane < 16) blk[2 + lane] = (u8)(q | (hi << 4));
                    if (lane == 0) { blk[0] = (u8)(dh & 0xffu); blk[1] = (u8)(dh >> 8); }
                }
            }
        }
    }
}

// Causal GQA attention for t queries q (t, hq, d) at positions pos (t,) over the cache (ctx, hkv, row_bytes):
// query t sees positions 0 .. pos[t]. One block per (query, head) for heads h0 .. h0 + gridDim.y - 1;
// scores (gridDim.y, t, ctx) fp32 is planner.memory's "scores" scratch. Warps score positions (lanes
// split the head dim), the block takes the max and sum, then each warp sums its share of positions with
// lanes again splitting the head dim (coalesced rows, ATTN_WARPS rows in flight), and the warps' partial
// sums meet in shared memory. out (t, hq, d) = softmax(q k / sqrt(d)) v, as ops.attention. d <= 256.
#define ATTN_WARPS 4
#define ATTN_MAX_D 256

template <int FMT>
__global__ void attention(const float* __restrict__ q, const u8* __restrict__ kc, const u8* __restrict__ vc,
                          const int* __restrict__ pos, float* __restrict__ out, float* __restrict__ scores,
                          int t, int h0, int hq, int hkv, int d, int row_bytes, int ctx) {
    __shared__ float partial[ATTN_WARPS][ATTN_MAX_D];
    const int tq = blockIdx.x, hl = blockIdx.y, h = h0 + hl, kvh = h / (hq / hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int len = pos[tq] + 1;
    const float* qv = q + ((size_t)tq * hq + h) * d;
    float* sc = scores + ((size_t)hl * t + tq) * ctx;
    const float root = sqrtf((float)d);
#pragma unroll 2
    for (int p = warp; p < len; p += ATTN_WARPS) {
        const u8* row = kc + ((size_t)p * hkv + kvh) * row_bytes;
        float s = 0.0f;
        for (int i = lane; i < d; i += 32) s = fmaf(qv[i], kv_elem<FMT>(row, i), s);
        s = warp_sum(s);
        if (lane == 0) sc[p] = s / root;
    }
    __syncthreads();
    float m = -INFINITY;
    for (int p = threadIdx.x; p < len; p += blockDim.x) m = fmaxf(m, sc[p]);
    m = block_reduce(m, true);
    float l = 0.0f;
    for (int p = threadIdx.x; p < len; p += blockDim.x) {
        const float e = expf(sc[p] - m);
        sc[p] = e;
        l += e;
    }
    l = block_reduce(l, false);
    __syncthreads();
    float acc[ATTN_MAX_D / 32];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_D / 32; ++j) acc[j] = 0.0f;
#pragma unroll 2
    for (int p = warp; p < len; p += ATTN_WARPS) {
        const float e = sc[p];
        const u8* row = vc + ((size_t)p * hkv + kvh) * row_bytes;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_D / 32; ++j)
            if (lane + 32 * j < d) acc[j] = fmaf(e, kv_elem<FMT>(row, lane + 32 * j), acc[j]);
    }
#pragma unroll
    for (int j = 0; j < ATTN_MAX_D / 32; ++j)
        if (lane + 32 * j < d) partial[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) sum += partial[w][i];
        out[((size_t)tq * hq + h) * d + i] = sum / l;
    }
}

#ifdef VRAMWISE_NVCC_CHECK
template __global__ void kv_store<0>(const float*, u8*, const int*, int, int, int, int);
template __global__ void kv_store<1>(const float*, u8*, const int*, int, int, int, int);
template __global__ void kv_store<2>(const float*, u8*, const int*, int, int, int, int);
template __global__ void kv_store<3>(const float*, u8*, const int*, int, int, int, int);
template __global__ void attention<0>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int);
template __global__ void attention<1>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int);
template __global__ void attention<2>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int);
template __global__ void attention<3>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int);
#endif
