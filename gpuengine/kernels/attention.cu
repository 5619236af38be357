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

// One row xr (d fp32 values) into its cache row, by one warp: lane l owns elements l, l + 32, ...; a q8 / q4
// block of 32 is one pass of the warp, whose reductions give the block's scale. Every byte of the row is
// stored (padding blocks quantize zeros).
template <int FMT>
__device__ __forceinline__ void store_row(const float* __restrict__ xr, u8* __restrict__ row, int d, int lane) {
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

// Rotary embedding of pair i of a head row v (d values) at position p: frequency theta^(-2i/d), divided by
// factors[i] where a scaled RoPE gives them (null: none), and the angle p * freq, both in double, cos and sin
// rounded to float (ops.rope_tables). interleaved: pairs (2i, 2i + 1) (llama.cpp's layout of Llama q/k); else
// (i, i + d/2) (Hugging Face / NeoX).
__device__ __forceinline__ float2 rope_cos_sin(int i, int d, int p, double theta, const float* factors) {
    double freq = pow(theta, -(double)(2 * i) / (double)d);
    if (factors) freq /= (double)factors[i];
    const double ang = (double)p * freq;
    return make_float2((float)cos(ang), (float)sin(ang));
}

__device__ __forceinline__ void rotate_by(float* v, int i, int d, float2 cs, int interleaved) {
    const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + (d >> 1);
    const float a = v[ia], b = v[ib];
    v[ia] = a * cs.x - b * cs.y;
    v[ib] = a * cs.y + b * cs.x;
}

__device__ __forceinline__ void rotate_pair(float* v, int i, int d, int p, double theta, const float* factors,
                                            int interleaved) {
    rotate_by(v, i, d, rope_cos_sin(i, d, p, theta, factors), interleaved);
}

// Cache row of position p, KV head h, in a cache of `rows` positions: p itself where the cache holds the
// whole context (p < rows), else the ring slot p mod rows of a sliding layer (planner.memory.kv_rows).
__device__ __forceinline__ size_t kv_row(int p, int rows, int hkv, int h) { return (size_t)(p % rows) * hkv + h; }

// A step's q (t, hq, d), k and v (t, hkv, d) after their matvecs, in one launch: q and k rotated in place
// (rotate_pair), then k and v stored in their caches at positions pos (t,) (read on the device, so a
// captured decode step replays at any position). One warp per row of q, k or v; a warp's own writes are
// visible to its lanes after __syncwarp.
template <int FMT>
__global__ void rope_store(float* __restrict__ q, float* __restrict__ k, const float* __restrict__ v,
                           u8* __restrict__ kc, u8* __restrict__ vc, const int* __restrict__ pos, int t, int hq,
                           int hkv, int d, int row_bytes, double theta, const float* __restrict__ factors,
                           int interleaved, int rows) {
    const int lane = threadIdx.x & 31;
    const int warps = (gridDim.x * blockDim.x) >> 5, nq = t * hq, nk = t * hkv;
    for (int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < nq + 2 * nk; r += warps) {
        if (r < nq + nk) {
            const bool is_q = r < nq;
            const int j = is_q ? r : r - nq, heads = is_q ? hq : hkv;
            float* xr = (is_q ? q : k) + (size_t)j * d;
            const int p = pos[j / heads];
            for (int i = lane; i < (d >> 1); i += 32) rotate_pair(xr, i, d, p, theta, factors, interleaved);
            __syncwarp();
            if (!is_q) store_row<FMT>(xr, kc + kv_row(p, rows, hkv, j % hkv) * row_bytes, d, lane);
        } else {
            const int j = r - nq - nk;
            store_row<FMT>(v + (size_t)j * d, vc + kv_row(pos[j / hkv], rows, hkv, j % hkv) * row_bytes, d, lane);
        }
    }
}

// Causal GQA attention for t queries q (t, hq, d) at positions pos (t,) over the cache (ctx, hkv, row_bytes):
// query t sees positions 0 .. pos[t], out (t, hq, d) = softmax(q k / sqrt(d)) v, as ops.attention; d <= 256.
// A sliding window (window > 0) starts it at window_start(pos[t]); cap > 0 soft-caps each score
// (cap tanh(s / cap), Gemma 2), both as ops.attention. Every attention kernel here takes both.
//
// The positions are split into chunks of `chunk` (flash-decoding), so a decode step's few heads still fill
// the GPU: block (query, split, head) takes one chunk, its warps take every ATTN_WARPS-th position with lanes
// splitting the head dim, and each warp keeps a running max, sum and weighted V sum (online softmax), which
// the block then merges. With one split the block writes out; with several it writes its partial (the sum
// of V weighted by exp(score - m), then m, then the sum of weights: d + 2 floats) for attention_merge.
#define ATTN_WARPS 4
#define ATTN_MAX_D 256

// The first position a query at p sees: p - window + 1 with a sliding window, else 0.
__device__ __forceinline__ int window_start(int p, int window) { return window > 0 ? max(0, p - window + 1) : 0; }

__device__ __forceinline__ float soft_cap(float s, float cap) { return cap > 0.0f ? tanhf(s / cap) * cap : s; }

template <int FMT>
__global__ void attention(const float* __restrict__ q, const u8* __restrict__ kc, const u8* __restrict__ vc,
                          const int* __restrict__ pos, float* __restrict__ out, float* __restrict__ part,
                          int t, int h0, int hq, int hkv, int d, int row_bytes, int chunk, int nsplit, int window,
                          float cap, int rows) {
    __shared__ float wo[ATTN_WARPS][ATTN_MAX_D];
    __shared__ float wm[ATTN_WARPS], wl[ATTN_WARPS];
    const int tq = blockIdx.x / nsplit, c = blockIdx.x % nsplit, hl = blockIdx.y, h = h0 + hl;
    const int kvh = h / (hq / hkv), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int len = pos[tq] + 1, p0 = window_start(pos[tq], window) + c * chunk, p1 = min(p0 + chunk, len);
    if (p0 >= len) return;                                  // attention_merge reads only the chunks below len
    const float* qv = q + ((size_t)tq * hq + h) * d;
    const float root = sqrtf((float)d);
    float qr[ATTN_MAX_D / 32], acc[ATTN_MAX_D / 32];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_D / 32; ++j) {
        qr[j] = lane + 32 * j < d ? qv[lane + 32 * j] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
#pragma unroll 4
    for (int p = p0 + warp; p < p1; p += ATTN_WARPS) {
        const u8* krow = kc + kv_row(p, rows, hkv, kvh) * row_bytes;
        const u8* vrow = vc + kv_row(p, rows, hkv, kvh) * row_bytes;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_D / 32; ++j)
            if (lane + 32 * j < d) s = fmaf(qr[j], kv_elem<FMT>(krow, lane + 32 * j), s);
        s = soft_cap(warp_sum(s) / root, cap);
        const float mn = fmaxf(m, s), corr = expf(m - mn), e = expf(s - mn);
        l = fmaf(l, corr, e);
#pragma unroll
        for (int j = 0; j < ATTN_MAX_D / 32; ++j)
            if (lane + 32 * j < d) acc[j] = fmaf(acc[j], corr, e * kv_elem<FMT>(vrow, lane + 32 * j));
        m = mn;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int j = 0; j < ATTN_MAX_D / 32; ++j)
        if (lane + 32 * j < d) wo[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float bm = -INFINITY;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) bm = fmaxf(bm, wm[w]);    // warp 0 has a position: finite
    float scale[ATTN_WARPS], bl = 0.0f;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) {
        scale[w] = expf(wm[w] - bm);                         // 0 for a warp without positions
        bl = fmaf(wl[w], scale[w], bl);
    }
    float* dst = nsplit == 1 ? out + ((size_t)tq * hq + h) * d : part + (((size_t)hl * t + tq) * nsplit + c) * (d + 2);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) o = fmaf(wo[w][i], scale[w], o);
        dst[i] = nsplit == 1 ? o / bl : o;
    }
    if (nsplit > 1 && threadIdx.x == 0) { dst[d] = bm; dst[d + 1] = bl; }
}

// The same attention with a lane a position (launch.ATTN_DECODE = "lanes"): `attention`'s warps take one
// position at a time, so each position's score waits on its loads, then a 5-shuffle sum, then two expf,
// one dependent chain after another (run 9 on an H200: 14.8 us at 512 positions, 32 heads, fp16: 0.57 TB/s).
// Here the block takes its chunk 32 positions at a time, lane l position l of the tile: each warp sums its
// quarter of the head dim for all 32 (the lanes' loads independent), the quarters meet in shared memory, one
// max and one sum reduction serve the tile's online-softmax step, and the threads, a dim each (two for d above
// 128), add the tile's weighted V rows (the weights read from shared memory, one broadcast each). Same grid,
// partials and merge as `attention`.
template <int FMT>
__global__ void attention_lanes(const float* __restrict__ q, const u8* __restrict__ kc, const u8* __restrict__ vc,
                                const int* __restrict__ pos, float* __restrict__ out, float* __restrict__ part,
                                int t, int h0, int hq, int hkv, int d, int row_bytes, int chunk, int nsplit,
                                int window, float cap, int rows) {
    __shared__ float qs[ATTN_MAX_D];
    __shared__ float dots[ATTN_WARPS][32];
    __shared__ float wts[32];
    const int tq = blockIdx.x / nsplit, c = blockIdx.x % nsplit, hl = blockIdx.y, h = h0 + hl;
    const int kvh = h / (hq / hkv), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int len = pos[tq] + 1, p0 = window_start(pos[tq], window) + c * chunk, p1 = min(p0 + chunk, len);
    if (p0 >= len) return;                                  // attention_merge reads only the chunks below len
    const float* qv = q + ((size_t)tq * hq + h) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = qv[i];
    const float root = sqrtf((float)d);
    const int quarter = (d + ATTN_WARPS - 1) / ATTN_WARPS, i0 = warp * quarter, i1 = min(i0 + quarter, d);
    const int i = threadIdx.x;                              // this thread's dims: i and i + 128
    float acc0 = 0.0f, acc1 = 0.0f, m = -INFINITY, l = 0.0f;
    __syncthreads();
    for (int tile = p0; tile < p1; tile += 32) {
        const int p = tile + lane;
        float dot = 0.0f;
        if (p < p1) {
            const u8* krow = kc + kv_row(p, rows, hkv, kvh) * row_bytes;
            for (int k = i0; k < i1; ++k) dot = fmaf(qs[k], kv_elem<FMT>(krow, k), dot);
        }
        dots[warp][lane] = dot;
        __syncthreads();
        float s = -INFINITY;
        if (p < p1) {
            s = 0.0f;
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; ++w) s += dots[w][lane];
            s = soft_cap(s / root, cap);
        }
        const float mn = fmaxf(m, warp_max(s));             // every warp works out the same tile
        const float corr = expf(m - mn), e = p < p1 ? expf(s - mn) : 0.0f;
        l = fmaf(l, corr, warp_sum(e));
        m = mn;
        if (warp == 0) wts[lane] = e;
        __syncthreads();                                    // dots read, wts written
        const int n = min(32, p1 - tile);
        acc0 *= corr;
        acc1 *= corr;
        for (int j = 0; j < n; ++j) {
            const u8* vrow = vc + kv_row(tile + j, rows, hkv, kvh) * row_bytes;
            const float wj = wts[j];
            if (i < d) acc0 = fmaf(wj, kv_elem<FMT>(vrow, i), acc0);
            if (i + 128 < d) acc1 = fmaf(wj, kv_elem<FMT>(vrow, i + 128), acc1);
        }
        __syncthreads();                                    // wts read before the next tile writes it
    }
    float* dst = nsplit == 1 ? out + ((size_t)tq * hq + h) * d : part + (((size_t)hl * t + tq) * nsplit + c) * (d + 2);
    if (i < d) dst[i] = nsplit == 1 ? acc0 / l : acc0;
    if (i + 128 < d) dst[i + 128] = nsplit == 1 ? acc1 / l : acc1;
    if (nsplit > 1 && threadIdx.x == 0) { dst[d] = m; dst[d + 1] = l; }
}

// out (t, hq, d) from attention's partials: one block per (query, head), the chunks below its length merged
// by their maxima.
extern "C" __global__ void attention_merge(const float* __restrict__ part, const int* __restrict__ pos,
                                           float* __restrict__ out, int t, int h0, int hq, int d, int chunk,
                                           int nsplit, int window) {
    const int tq = blockIdx.x, hl = blockIdx.y;
    const int used = (pos[tq] - window_start(pos[tq], window) + chunk) / chunk;   // chunks holding what it sees
    const float* pr = part + ((size_t)hl * t + tq) * nsplit * (d + 2);
    float gm = -INFINITY;
    for (int c = 0; c < used; ++c) gm = fmaxf(gm, pr[c * (d + 2) + d]);
    float gl = 0.0f;
    for (int c = 0; c < used; ++c) gl = fmaf(pr[c * (d + 2) + d + 1], expf(pr[c * (d + 2) + d] - gm), gl);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.0f;
        for (int c = 0; c < used; ++c) o = fmaf(pr[c * (d + 2) + i], expf(pr[c * (d + 2) + d] - gm), o);
        out[((size_t)tq * hq + h0 + hl) * d + i] = o / gl;
    }
}

// Decode (one query) over chunk c of the positions for KV head blockIdx.y and all its G query heads, so the
// group's K and V rows are read once (GQA). Scores: a warp takes 32 positions at once, a lane each, and
// works out whole dot products for all G heads (q from shared memory, 4 dims a step), where `attention`
// sums each position's dot across the warp; online softmax per head over the 32 with one max and one sum
// reduction. Weighted V: lanes take dims l, l + 32, ..., positions in turn, the weights passed by shuffle.
// The block's warps then merge per head; with several chunks the block writes `attention`'s partials for
// attention_merge. Head dim up to 128 and a multiple of 4, G up to 8 (launch.attention falls back to
// `attention` outside that).
//
// STEP = 1 is a decode step's whole attention in one launch, where rope_store, attention and attention_merge
// are three: q (hq, d) and k (hkv, d) arrive unrotated. Every block rotates its group's q in shared memory
// (RoPE, the cos and sin worked out as rope_store does); the block whose chunk holds the new position
// rotates k, stores k and v into the caches and reads that position from shared copies of the rows it
// stored (so no block reads a cache row written in the same launch). With several chunks, each block
// writes its partials, and the last block of a KV head to finish (an atomic ticket a KV head, `tickets`,
// zero before the launch) merges them as attention_merge does and sets the ticket back to zero.
#define GQA_MAX_G 8
#define GQA_MAX_D 128

template <int FMT>
__device__ __forceinline__ void kv_elem4(const u8* __restrict__ row, int e, float (&v)[4]) {
    if (FMT == 0) {                                   // fp16: one 8-byte load (rows are 2d bytes, d % 4 == 0)
        const uint2 w = *reinterpret_cast<const uint2*>(row + 2 * e);
        v[0] = h2f((u16)(w.x & 0xffffu)); v[1] = h2f((u16)(w.x >> 16));
        v[2] = h2f((u16)(w.y & 0xffffu)); v[3] = h2f((u16)(w.y >> 16));
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = kv_elem<FMT>(row, e + i);
    }
}

template <int FMT, int STEP>
__global__ void attention_gqa(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                              u8* __restrict__ kc, u8* __restrict__ vc, const int* __restrict__ pos,
                              float* __restrict__ out, float* __restrict__ part, int* __restrict__ tickets, int hq,
                              int hkv, int d, int row_bytes, int chunk, int nsplit, double theta,
                              const float* __restrict__ factors, int interleaved, int window, float cap, int rows) {
    __shared__ __align__(16) float qs[GQA_MAX_G][GQA_MAX_D];
    __shared__ float wo[ATTN_WARPS][GQA_MAX_G][GQA_MAX_D];
    __shared__ float wm[ATTN_WARPS][GQA_MAX_G], wl[ATTN_WARPS][GQA_MAX_G];
    __shared__ float2 cs[GQA_MAX_D / 2];                           // STEP: each pair's cos and sin
    __shared__ float knew[GQA_MAX_D];                              // STEP: the new position's k, rotated
    __shared__ __align__(16) u8 krow_new[2 * GQA_MAX_D], vrow_new[2 * GQA_MAX_D];   // ... and its stored rows
    __shared__ int merges;
    const int c = blockIdx.x, kvh = blockIdx.y, G = hq / hkv, h0 = kvh * G;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cur = pos[0], len = cur + 1, lo = window_start(cur, window), p0 = lo + c * chunk;
    const int p1 = min(p0 + chunk, len);
    if (p0 >= len) return;                                  // attention_merge reads only the chunks below len
    const bool holds_new = STEP && p1 == len;               // this chunk holds the new position
    for (int i = threadIdx.x; i < G * d; i += blockDim.x) qs[i / d][i % d] = q[(size_t)h0 * d + i];
    if (STEP) {
        for (int i = threadIdx.x; i < (d >> 1); i += blockDim.x) cs[i] = rope_cos_sin(i, d, cur, theta, factors);
        if (holds_new)
            for (int i = threadIdx.x; i < d; i += blockDim.x) knew[i] = k[(size_t)kvh * d + i];
        __syncthreads();
        for (int i = threadIdx.x; i < G * (d >> 1); i += blockDim.x) {
            const int pair = i % (d >> 1);
            rotate_by(qs[i / (d >> 1)], pair, d, cs[pair], interleaved);
        }
        if (holds_new && warp == 0) {
            for (int i = lane; i < (d >> 1); i += 32) rotate_by(knew, i, d, cs[i], interleaved);
            __syncwarp();
            const size_t at = kv_row(cur, rows, hkv, kvh) * row_bytes;
            const float* vnew = v + (size_t)kvh * d;
            store_row<FMT>(knew, krow_new, d, lane);
            store_row<FMT>(knew, kc + at, d, lane);
            store_row<FMT>(vnew, vrow_new, d, lane);
            store_row<FMT>(vnew, vc + at, d, lane);
        }
    }
    __syncthreads();
    const float root = sqrtf((float)d);
    float m[GQA_MAX_G], l[GQA_MAX_G], acc[GQA_MAX_G][GQA_MAX_D / 32];
#pragma unroll
    for (int g = 0; g < GQA_MAX_G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < GQA_MAX_D / 32; ++j) acc[g][j] = 0.0f;
    }
    for (int b = p0 + 32 * warp; b < p1; b += 32 * ATTN_WARPS) {
        const int p = b + lane;
        const bool in = p < p1;                             // lane 0 always is: b < p1
        // four partial sums a head (one per dim mod 4), added pairwise: a dot product's rounding stays near
        // the warp-wide tree of `attention`, which matters where a sharp softmax magnifies score errors
        float s[GQA_MAX_G], s4[GQA_MAX_G][4];
#pragma unroll
        for (int g = 0; g < GQA_MAX_G; ++g) s4[g][0] = s4[g][1] = s4[g][2] = s4[g][3] = 0.0f;
        if (in) {
            const u8* krow = STEP && p == cur ? krow_new : kc + kv_row(p, rows, hkv, kvh) * row_bytes;
            for (int e = 0; e < d; e += 4) {
                float kv[4];
                kv_elem4<FMT>(krow, e, kv);
#pragma unroll
                for (int g = 0; g < GQA_MAX_G; ++g)
                    if (g < G) {
                        const float4 a = *reinterpret_cast<const float4*>(&qs[g][e]);
                        s4[g][0] = fmaf(a.x, kv[0], s4[g][0]);
                        s4[g][1] = fmaf(a.y, kv[1], s4[g][1]);
                        s4[g][2] = fmaf(a.z, kv[2], s4[g][2]);
                        s4[g][3] = fmaf(a.w, kv[3], s4[g][3]);
                    }
            }
        }
#pragma unroll
        for (int g = 0; g < GQA_MAX_G; ++g) s[g] = (s4[g][0] + s4[g][1]) + (s4[g][2] + s4[g][3]);
        float w[GQA_MAX_G];
#pragma unroll
        for (int g = 0; g < GQA_MAX_G; ++g) {
            w[g] = 0.0f;
            if (g < G) {                                    // G is the block's: every lane takes the branch
                const float sg = in ? soft_cap(s[g] / root, cap) : -INFINITY;
                const float mn = fmaxf(m[g], warp_max(sg));
                const float corr = expf(m[g] - mn);
                w[g] = in ? expf(sg - mn) : 0.0f;
                l[g] = fmaf(l[g], corr, warp_sum(w[g]));
#pragma unroll
                for (int j = 0; j < GQA_MAX_D / 32; ++j) acc[g][j] *= corr;
                m[g] = mn;
            }
        }
        const int np = min(32, p1 - b);
        for (int i = 0; i < np; ++i) {
            const u8* vrow = STEP && b + i == cur ? vrow_new : vc + kv_row(b + i, rows, hkv, kvh) * row_bytes;
            float vv[GQA_MAX_D / 32];
#pragma unroll
            for (int j = 0; j < GQA_MAX_D / 32; ++j) vv[j] = lane + 32 * j < d ? kv_elem<FMT>(vrow, lane + 32 * j) : 0.0f;
#pragma unroll
            for (int g = 0; g < GQA_MAX_G; ++g)
                if (g < G) {
                    const float wg = __shfl_sync(FULL_MASK, w[g], i);
#pragma unroll
                    for (int j = 0; j < GQA_MAX_D / 32; ++j) acc[g][j] = fmaf(wg, vv[j], acc[g][j]);
                }
        }
    }
#pragma unroll
    for (int g = 0; g < GQA_MAX_G; ++g)
        if (g < G) {
            if (lane == 0) { wm[warp][g] = m[g]; wl[warp][g] = l[g]; }
#pragma unroll
            for (int j = 0; j < GQA_MAX_D / 32; ++j)
                if (lane + 32 * j < d) wo[warp][g][lane + 32 * j] = acc[g][j];
        }
    __syncthreads();
    for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
        const int g = i / d, e = i % d, h = h0 + g;
        float bm = -INFINITY;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) bm = fmaxf(bm, wm[w][g]);   // warp 0 has a position: finite
        float bl = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) {
            const float sc = expf(wm[w][g] - bm);           // 0 for a warp without positions
            bl = fmaf(wl[w][g], sc, bl);
            o = fmaf(wo[w][g][e], sc, o);
        }
        if (nsplit == 1) {
            out[(size_t)h * d + e] = o / bl;
        } else {
            float* dst = part + ((size_t)h * nsplit + c) * (d + 2);
            dst[e] = o;
            if (e == 0) { dst[d] = bm; dst[d + 1] = bl; }
        }
    }
    if (!STEP || nsplit == 1) return;
    // the last of the KV head's chunks below len to finish merges: its partial writes, and every other
    // block's, are visible device-wide before the tickets that count them (fence, then the atomic)
    const int used = (cur - lo + chunk) / chunk;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) merges = atomicAdd(&tickets[kvh], 1) == used - 1;
    __syncthreads();
    if (!merges) return;
    __threadfence();
    for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
        const int g = i / d, e = i % d;
        const float* pr = part + (size_t)(h0 + g) * nsplit * (d + 2);  // read past L1: other blocks wrote it
        float gm = -INFINITY;
        for (int cc = 0; cc < used; ++cc) gm = fmaxf(gm, __ldcg(pr + cc * (d + 2) + d));
        float gl = 0.0f, o = 0.0f;
        for (int cc = 0; cc < used; ++cc) {
            const float sc = expf(__ldcg(pr + cc * (d + 2) + d) - gm);
            gl = fmaf(__ldcg(pr + cc * (d + 2) + d + 1), sc, gl);
            o = fmaf(__ldcg(pr + cc * (d + 2) + e), sc, o);
        }
        out[(size_t)(h0 + g) * d + e] = o / gl;
    }
    if (threadIdx.x == 0) tickets[kvh] = 0;                  // for the next launch (the next layer's)
}

// Prefill (t queries of one chunk): the same causal attention, tiled. Block (query tile, head) takes
// ATTN_TQ queries and walks the keys in tiles of ATTN_TK: it decodes each K / V tile into shared memory once
// for all its queries (where `attention` has every query's block read every key it sees), and keeps the
// running max, sum and output of each query in registers (online softmax, as flash-attention does).
// Thread (qi, g), qi = threadIdx.x / 8, g = threadIdx.x % 8: the scores of query qi with keys g, g + 8, ...
// and its output dims 16 g .. 16 g + 15, so a query's scores and output live in 8 neighbouring lanes and
// its max, sum and weights pass between them by shuffles. Head dim up to ATTN_TILE_D (the launcher falls
// back to `attention` above it). Shared rows are padded by 4 floats, so the 8 key rows a warp reads at once
// start in different banks.
#define ATTN_TQ 16
#define ATTN_TK 32
#define ATTN_TILE_D 128
#define ATTN_TILE_THREADS 128
#define ATTN_ROW (ATTN_TILE_D + 4)

template <int FMT>
__global__ void attention_tiled(const float* __restrict__ q, const u8* __restrict__ kc, const u8* __restrict__ vc,
                                const int* __restrict__ pos, float* __restrict__ out, int t, int hq, int hkv,
                                int d, int row_bytes, int window, float cap, int rows) {
    __shared__ __align__(16) float qs[ATTN_TQ][ATTN_ROW];
    __shared__ __align__(16) float ks[ATTN_TK][ATTN_ROW];
    __shared__ __align__(16) float vs[ATTN_TK][ATTN_ROW];
    __shared__ int qpos[ATTN_TQ];
    const int tq0 = blockIdx.x * ATTN_TQ, h = blockIdx.y, kvh = h / (hq / hkv);
    const int qi = threadIdx.x >> 3, g = threadIdx.x & 7, lane = threadIdx.x & 31;
    const int d4 = (d + 3) & ~3;                                  // dims rounded up to float4s, zero-padded
    const float root = sqrtf((float)d);
    for (int i = threadIdx.x; i < ATTN_TQ * ATTN_ROW; i += ATTN_TILE_THREADS) {
        const int r = i / ATTN_ROW, c = i % ATTN_ROW;
        qs[r][c] = tq0 + r < t && c < d ? q[((size_t)(tq0 + r) * hq + h) * d + c] : 0.0f;
    }
    if (threadIdx.x < ATTN_TQ) qpos[threadIdx.x] = tq0 + threadIdx.x < t ? pos[tq0 + threadIdx.x] : -1;
    __syncthreads();
    int last = -1, first = 0x7fffffff;                             // the tile's last and first visible keys
    for (int r = 0; r < ATTN_TQ; ++r)
        if (qpos[r] >= 0) { last = max(last, qpos[r]); first = min(first, window_start(qpos[r], window)); }
    const int mypos = qpos[qi], mystart = mypos >= 0 ? window_start(mypos, window) : 0;
    float m = -INFINITY, l = 0.0f, o[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) o[j] = 0.0f;
    for (int k0 = last >= 0 ? first : 0; k0 <= last; k0 += ATTN_TK) {
        __syncthreads();                                          // the previous tile is used up
        for (int i = threadIdx.x; i < ATTN_TK * (ATTN_TILE_D / 4); i += ATTN_TILE_THREADS) {
            const int r = i / (ATTN_TILE_D / 4), c0 = (i % (ATTN_TILE_D / 4)) * 4, p = k0 + r;
            const size_t at = kv_row(p, rows, hkv, kvh) * row_bytes;
#pragma unroll
            for (int c = c0; c < c0 + 4; ++c) {
                const bool in = p <= last && c < d;
                ks[r][c] = in ? kv_elem<FMT>(kc + at, c) : 0.0f;
                vs[r][c] = in ? kv_elem<FMT>(vc + at, c) : 0.0f;
            }
        }
        __syncthreads();
        float sc[ATTN_TK / 8];
#pragma unroll
        for (int j = 0; j < ATTN_TK / 8; ++j) sc[j] = 0.0f;
        for (int c = 0; c < d4; c += 4) {
            const float4 a = *reinterpret_cast<const float4*>(&qs[qi][c]);
#pragma unroll
            for (int j = 0; j < ATTN_TK / 8; ++j) {
                const float4 b = *reinterpret_cast<const float4*>(&ks[g + 8 * j][c]);
                sc[j] = fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, sc[j]))));
            }
        }
        float tmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < ATTN_TK / 8; ++j) {
            const int p = k0 + g + 8 * j;
            sc[j] = p <= mypos && p >= mystart ? soft_cap(sc[j] / root, cap) : -INFINITY;
            tmax = fmaxf(tmax, sc[j]);
        }
#pragma unroll
        for (int x = 1; x < 8; x <<= 1) tmax = fmaxf(tmax, __shfl_xor_sync(FULL_MASK, tmax, x));
        const float mn = fmaxf(m, tmax);
        const bool none = mn == -INFINITY;                        // a padding query, or no key seen yet
        const float corr = none ? 1.0f : expf(m - mn);
        float ps = 0.0f;
#pragma unroll
        for (int j = 0; j < ATTN_TK / 8; ++j) {
            sc[j] = none ? 0.0f : expf(sc[j] - mn);
            ps += sc[j];
        }
#pragma unroll
        for (int x = 1; x < 8; x <<= 1) ps += __shfl_xor_sync(FULL_MASK, ps, x);
        l = fmaf(l, corr, ps);
        m = mn;
#pragma unroll
        for (int j = 0; j < 16; ++j) o[j] *= corr;
#pragma unroll
        for (int key = 0; key < ATTN_TK; ++key) {                 // key's weight lives in lane (key % 8) of the 8
            const float w = __shfl_sync(FULL_MASK, sc[key >> 3], (lane & ~7) | (key & 7));
#pragma unroll
            for (int j = 0; j < 16; j += 4) {
                const float4 b = *reinterpret_cast<const float4*>(&vs[key][16 * g + j]);
                o[j] = fmaf(w, b.x, o[j]);
                o[j + 1] = fmaf(w, b.y, o[j + 1]);
                o[j + 2] = fmaf(w, b.z, o[j + 2]);
                o[j + 3] = fmaf(w, b.w, o[j + 3]);
            }
        }
    }
    if (tq0 + qi >= t) return;
#pragma unroll
    for (int j = 0; j < 16; ++j)
        if (16 * g + j < d) out[((size_t)(tq0 + qi) * hq + h) * d + 16 * g + j] = o[j] / l;
}

#ifdef VRAMWISE_NVCC_CHECK
template __global__ void rope_store<0>(float*, float*, const float*, u8*, u8*, const int*, int, int, int, int, int, double, const float*, int, int);
template __global__ void rope_store<3>(float*, float*, const float*, u8*, u8*, const int*, int, int, int, int, int, double, const float*, int, int);
template __global__ void attention<0>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int, int, int, float, int);
template __global__ void attention<1>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int, int, int, float, int);
template __global__ void attention<2>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int, int, int, float, int);
template __global__ void attention<3>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int, int, int, float, int);
template __global__ void attention_gqa<0, 0>(const float*, const float*, const float*, u8*, u8*, const int*, float*, float*, int*, int, int, int, int, int, int, double, const float*, int, int, float, int);
template __global__ void attention_gqa<0, 1>(const float*, const float*, const float*, u8*, u8*, const int*, float*, float*, int*, int, int, int, int, int, int, double, const float*, int, int, float, int);
template __global__ void attention_gqa<3, 1>(const float*, const float*, const float*, u8*, u8*, const int*, float*, float*, int*, int, int, int, int, int, int, double, const float*, int, int, float, int);
template __global__ void attention_lanes<0>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int, int, int, float, int);
template __global__ void attention_lanes<2>(const float*, const u8*, const u8*, const int*, float*, float*, int, int, int, int, int, int, int, int, int, float, int);
template __global__ void attention_tiled<0>(const float*, const u8*, const u8*, const int*, float*, int, int, int, int, int, int, float, int);
template __global__ void attention_tiled<3>(const float*, const u8*, const u8*, const int*, float*, int, int, int, int, int, int, float, int);
#endif
