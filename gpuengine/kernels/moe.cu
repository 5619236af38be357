// Routed experts (MoE) around the expert matvecs (matvec.cu's qmatvec_moe, hmatvec_moe, gather_moe): which
// experts each token takes, and their weighted sum. Slot t * k + j is token t's j-th expert.

// refengine.arch.route for one token a warp (blockIdx.x = t): p = softmax over its E router logits, its k
// experts by p, most probable first (the lower index first among equals, as a stable sort), each weighed by
// its p over the sum of the k chosen. Writes sel (T * k) and weight (T * k).
extern "C" __global__ void moe_route(const float* __restrict__ logits, int E, int k, int* __restrict__ sel,
                                     float* __restrict__ weight) {
    const int t = blockIdx.x, lane = threadIdx.x;
    const float* l = logits + (size_t)t * E;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) sum += expf(l[e] - mx);
    sum = warp_sum(sum);
    int* chosen = sel + (size_t)t * k;
    float total = 0.0f;
    for (int j = 0; j < k; ++j) {
        float best = -1.0f;
        int at = E;
        for (int e = lane; e < E; e += 32) {
            bool taken = false;
            for (int q = 0; q < j; ++q) taken |= chosen[q] == e;
            const float p = expf(l[e] - mx) / sum;
            if (!taken && p > best) { best = p; at = e; }     // e ascends: a tie keeps the lower index
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(FULL_MASK, best, o);
            const int oat = __shfl_xor_sync(FULL_MASK, at, o);
            if (ob > best || (ob == best && oat < at)) { best = ob; at = oat; }
        }
        if (lane == 0) { chosen[j] = at; weight[(size_t)t * k + j] = best; }
        __syncwarp();
        total += best;
    }
    for (int j = lane; j < k; j += 32) weight[(size_t)t * k + j] /= total;
}

// x (T, h) += sum over j < k of weight[t k + j] out[t k + j] (the slots' down outputs, (T * k, h)): the routed
// experts' weighted sum joining the residual.
extern "C" __global__ void moe_combine(float* __restrict__ x, const float* __restrict__ out,
                                       const float* __restrict__ weight, int k, int h, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / h, c = i - t * h;
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) acc = fmaf(weight[t * k + j], out[(t * k + j) * h + c], acc);
        x[i] += acc;
    }
}

// Prefill with each expert's tokens grouped (gpuengine/model.py): out (n, h) fp16 bits = x[rows[j]] (x (T, h)
// float32), the rows of the tokens routed to one expert, as its GEMM input.
extern "C" __global__ void gather_rows_half(const float* __restrict__ x, const int* __restrict__ rows,
                                            u16* __restrict__ out, int h, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long j = i / h, c = i - j * h;
        out[i] = f2h(x[(long long)rows[j] * h + c]);
    }
}

// x[rows[j]] += weight[j] y[j] for j < n (y (n, h)): one expert's output joining its tokens' residuals (a token
// takes an expert once, so no two j of a launch write one row).
extern "C" __global__ void scatter_add(float* __restrict__ x, const float* __restrict__ y, const int* __restrict__ rows,
                                       const float* __restrict__ weight, int h, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long j = i / h, c = i - j * h;
        x[(long long)rows[j] * h + c] += weight[j] * y[i];
    }
}
