// Row-wise and element-wise ops of the forward pass (refengine/ops.py is their reference).

// out (T, H) = x / sqrt(mean(x^2) + eps) * w, one block per row; the mean in double, as ops.rmsnorm
// (residual activations of real models reach ~1e4, so their squares lose digits in fp32 sums). add: out +=
// instead (Gemma 2 / 3's norm of a sublayer's output, into the residual). x may be out (each thread reads its
// elements before it writes them), but not with add.
extern "C" __global__ void rmsnorm(const float* x, const float* __restrict__ w, float* out, int h, float eps, int add) {
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
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float y = (float)((double)xr[i] * inv) * w[i];
        orow[i] = add ? orow[i] + y : y;
    }
}

// gate = act(gate) * up over n values: act 1 silu (SwiGLU), 2 GELU's tanh form (GeGLU), as gated_act
// (common.cuh) and ops.ACTIVATIONS.
extern "C" __global__ void glu(float* __restrict__ gate, const float* __restrict__ up, long long n, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        gate[i] = gated_act(gate[i], act) * up[i];
}

// x = cap tanh(x / cap) over n values (Gemma 2's logits; ops.softcap).
extern "C" __global__ void softcap(float* __restrict__ x, long long n, float cap) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = tanhf(x[i] / cap) * cap;
}

// y (T, n) += b (n): the q/k/v biases of Qwen2-style models after a prefill GEMM.
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ b, int n, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
        y[i] += b[i % n];
}
