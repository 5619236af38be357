// Token choice on the device: only the chosen id goes back to the host.

// out[0] = index of the largest of x[0..n), the first one on ties (numpy's argmax); one block.
extern "C" __global__ void argmax(const float* __restrict__ x, int n, int* __restrict__ out) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    float best = -INFINITY;
    int at = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (x[i] > best || (at == 0x7fffffff && x[i] == best)) { best = x[i]; at = i; }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(FULL_MASK, best, o);
        const int oa = __shfl_xor_sync(FULL_MASK, at, o);
        if (ob > best || (ob == best && oa < at)) { best = ob; at = oa; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { bv[warp] = best; bi[warp] = at; }
    __syncthreads();
    if (warp == 0) {
        best = lane < (int)(blockDim.x >> 5) ? bv[lane] : -INFINITY;
        at = lane < (int)(blockDim.x >> 5) ? bi[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(FULL_MASK, best, o);
            const int oa = __shfl_xor_sync(FULL_MASK, at, o);
            if (ob > best || (ob == best && oa < at)) { best = ob; at = oa; }
        }
        if (lane == 0) out[0] = at == 0x7fffffff ? 0 : at;
    }
}

// CTRL repetition penalty on the tokens marked in seen (n,): positive logits / p, negative ones * p.
extern "C" __global__ void penalize(float* __restrict__ x, const u8* __restrict__ seen, int n, float p) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        if (seen[i]) x[i] = x[i] > 0.0f ? x[i] / p : x[i] * p;
}
