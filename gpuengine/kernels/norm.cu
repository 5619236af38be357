// Row-wise and element-wise ops of the forward pass (refengine/ops.py is their reference).

// out (T, H) = x / sqrt(mean(x^2) + eps) * w, one block per row; the mean in double, as ops.rmsnorm
// (residual activations of real models reach ~1e4, so their squares lose digits in fp32 sums).
extern "C" __global__ void rmsnorm(const float* __restrict__ x, const float* __restrict__ w,
                                   float* __restrict__ out, int h, float eps) {
    __shared__ double part[32];
    const float* xr = x + (size_t)blockIdx.x * h;
    float* orow = out + (size_t)blockIdx.x * h;
    double s = 0.0;
    for (int i = threadIdx.x; i < h; i += blockDim.x) s += (double)xr[i] * (double)xr[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
        if (lane == 0) part[0] = s;
    }
    __syncthreads();
    const double inv = 1.0 / sqrt(part[0] / h + (double)eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) orow[i] = (float)((double)xr[i] * inv) * w[i];
}

// gate = silu(gate) * up over n values (SwiGLU; silu(x) = x / (1 + e^-x), as ops.silu).
extern "C" __global__ void swiglu(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// y (T, n) += b (n): the q/k/v biases of Qwen2-style models after a prefill GEMM.
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ b, int n, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
        y[i] += b[i % n];
}
