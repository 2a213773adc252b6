// Residual add + RMSNorm, fused with the site operations around them. Per row t:
//   dl = post_w ? rmsnorm(delta[t], post_w) : delta[t]     (sublayer post-norm: Gemma 2, OLMo 2)
//   delta_site ops on dl; delta[t] <- dl                     (AttnOut / MlpOut)
//   resid[t] += dl                                           (only when delta is given)
//   resid_site0 then resid_site1 ops on resid[t]             (ResidMid, or ResidPost then ResidPre)
//   o = pre_w ? rmsnorm(resid[t], pre_w) : resid[t]          (next sublayer's pre-norm / final norm)
//   out_site ops on o; out_f32[t] <- o; out_bf16[t] <- bf16(o) (AttnIn / MlpIn / FinalNorm)
// rmsnorm(x, w) = w * (x * r) (one_plus: (x * r) * (1 + w)), r = 1 / sqrt(mean(x^2) + eps),
// the mean of squares summed in f32 — as ops/norm.rs `rmsnorm_ref`.
//
// One block per row. Each thread owns the elements i = threadIdx.x + k * blockDim.x of the
// row and does every element-wise step on them in global memory, so the steps need no
// barrier between them; the mean of squares is a block reduction; site ops (all threads of the
// block, barriers before and after) run only on rows that have them. f32 throughout; bf16
// output rounded to nearest even (__float2bfloat16).
//
// qk_norm_f32:  x[t, :] <- w * (x[t, :] / sqrt(mean(x[t, :]^2) + eps)), in place, over the whole
//   projection width n (OLMo 2 q_norm / k_norm). One block per row t; each thread sums the
//   squares of a strided slice, warp shuffles then shared memory reduce to the block total,
//   then every thread rescales its slice. f32 throughout. Reference: ops/norm.rs `rmsnorm_ref`
//   (NormWeight::Plain).
#include <cuda_bf16.h>
#include "norm.cuh"
#include "site_ops.cuh"

// 1 / sqrt(mean(x^2) + eps) of one row (all threads of the block).
static __device__ __forceinline__ float norm_rinv(const float* x, int d, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += x[i] * x[i];
    ss = site_block_sum(ss);
    return 1.0f / sqrtf(ss / (float)d + eps);
}

static __device__ __forceinline__ float norm_apply(float x, float r, float w, int one_plus) {
    return one_plus ? (x * r) * (1.0f + w) : w * (x * r);
}

extern "C" __global__ void add_norm_f32(
    AddNormArgs a  // pointers as documented in AddNormArgs; checked by the Rust wrapper
) {
    const int t = blockIdx.x;
    if (t >= a.T) return;
    const int d = a.d;
    float* resid = a.resid + (long long)t * d;
    float* out = a.out_f32 + (long long)t * d;

    if (a.delta) {
        float* delta = a.delta + (long long)t * d;
        if (a.post_w) {
            const float r = norm_rinv(delta, d, a.eps);
            for (int i = threadIdx.x; i < d; i += blockDim.x) delta[i] = norm_apply(delta[i], r, a.post_w[i], a.one_plus);
        }
        site_apply_row(a.delta_site, t, delta, d);
        for (int i = threadIdx.x; i < d; i += blockDim.x) resid[i] = resid[i] + delta[i];
    }
    site_apply_row(a.resid_site0, t, resid, d);
    site_apply_row(a.resid_site1, t, resid, d);

    if (a.pre_w) {
        const float r = norm_rinv(resid, d, a.eps);
        for (int i = threadIdx.x; i < d; i += blockDim.x) out[i] = norm_apply(resid[i], r, a.pre_w[i], a.one_plus);
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) out[i] = resid[i];
    }
    site_apply_row(a.out_site, t, out, d);
    if (a.out_bf16) {
        __nv_bfloat16* ob = a.out_bf16 + (long long)t * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) ob[i] = __float2bfloat16(out[i]);
    }
}

#define QK_NORM_WARP 32

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
static __device__ __forceinline__ float qk_norm_block_sum(float v, float* red /* [32] shared */) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / QK_NORM_WARP, lane = threadIdx.x % QK_NORM_WARP;
    const int n_warps = blockDim.x / QK_NORM_WARP;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < n_warps ? red[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

extern "C" __global__ void qk_norm_f32(
    float* x,        // [T, n] normalised in place
    const float* w,  // [n]
    int T, int n, float eps) {
    __shared__ float red[32];
    const int t = blockIdx.x;
    if (t >= T) return;
    float* row = x + (size_t)t * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += row[i] * row[i];
    ss = qk_norm_block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = w[i] * (row[i] * r);
}
