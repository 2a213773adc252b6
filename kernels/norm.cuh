// Arguments of add_norm_f32 (kernels/norm.cu), passed by value. Mirrored by `AddNormArgs` in
// src/backend/ops/norm.rs; build/layout.rs checks both against this definition, field by field.
#pragma once

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
