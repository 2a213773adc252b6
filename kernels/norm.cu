// Residual add + RMSNorm, fused with the site operations around them. Per row t:
//   dl = post_w ? rmsnorm(delta[t], post_w) : delta[t]     (sublayer post-norm: Gemma 2, OLMo 2)
//   delta_site ops on dl; delta[t] <- dl                     (AttnOut / MlpOut)
//   resid[t] += dl                                           (only when delta is given)
//   resid_site0 then resid_site1 ops on resid[t]             (ResidMid, or ResidPost then ResidPre)
//   o = pre_w ? rmsnorm(resid[t], pre_w) : resid[t]          (next sublayer's pre-norm / final norm)
//   out_site ops on o; out_f32[t] <- o; out_bf16[t] <- bf16(o) (AttnIn / MlpIn / FinalNorm)
// rmsnorm(x, w) = w * (x * r) (one_plus: (x * r) * (1 + w)), r = 1 / sqrt(mean(x^2) + eps),
// the mean of squares summed in f32 — as src/backend/cpu.rs `rmsnorm`.
//
// One block per row. Each thread owns the elements i = threadIdx.x + k * blockDim.x of the
// row and does every element-wise step on them in global memory, so the steps need no
// barrier between them; the mean of squares is a block reduction; site ops (all threads of the
// block, barriers before and after) run only on rows that have them. f32 throughout; bf16
// output rounded to nearest even (__float2bfloat16).
#include <cuda_bf16.h>
#include "site_ops.cuh"

struct AddNormArgs {
    float* resid;             // [T, d] residual stream, in/out
    float* delta;             // [T, d] sublayer output, in/out (post-normed in place), or null (no add)
    const float* post_w;      // [d] norm of delta before the add, or null
    const float* pre_w;       // [d] norm of the new residual, or null (= copy)
    float* out_f32;           // [T, d] normalised output after out_site ops
    __nv_bfloat16* out_bf16;  // [T, d] the same rounded to bf16, or null
    int T;
    int d;
    float eps;
    int one_plus;             // 1: x_hat * (1 + w) (Gemma); 0: x_hat * w
    SitePlan delta_site;
    SitePlan resid_site0;
    SitePlan resid_site1;
    SitePlan out_site;
};
static_assert(sizeof(AddNormArgs) == 64 + 4 * sizeof(SitePlan), "AddNormArgs must match its Rust mirror");

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
