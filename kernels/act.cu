// Gated MLP activation with the MlpPost site ops. Per row t, element i:
//   g = gate[t,i] (+ gate_b[i]), u = up[t,i] (+ up_b[i])
//   gate[t,i] <- act(g) * u,  act = silu: g / (1 + exp(-g))
//                             gelu_tanh: 0.5 g (1 + tanh(0.7978846 (g + 0.044715 g^3)))
//   site ops on the row (MlpPost interventions, captures); out_bf16[t,i] <- bf16(gate[t,i])
// as src/backend/ops/act.rs `act_mul_ref` (bias as cpu.rs `linear` adds it before).
// One block per row, each thread owning elements threadIdx.x + k * blockDim.x (no barrier
// between element-wise steps); site ops only on rows that have them. f32 in/out, bf16 copy
// rounded to nearest even.
#include <cuda_bf16.h>
#include "site_ops.cuh"

extern "C" __global__ void act_mul_f32(
    float* gate,                // [T, I] in: gate projection; out: act(gate) * up after site ops
    const float* up,            // [T, I]
    const float* gate_b,        // [I] or null
    const float* up_b,          // [I] or null
    __nv_bfloat16* out_bf16,    // [T, I] or null
    int T,
    int I,
    int act,                    // 0 silu, 1 gelu_tanh
    SitePlan site               // rows < T, slices within I
) {
    const int t = blockIdx.x;
    if (t >= T) return;
    float* g = gate + (long long)t * I;
    const float* u = up + (long long)t * I;
    for (int i = threadIdx.x; i < I; i += blockDim.x) {
        float x = g[i];
        float y = u[i];
        if (gate_b) x = x + gate_b[i];
        if (up_b) y = y + up_b[i];
        float a;
        if (act == 1) {
            a = 0.5f * x * (1.0f + tanhf(0.7978846f * (x + 0.044715f * x * x * x)));
        } else {
            a = x / (1.0f + expf(-x));
        }
        g[i] = a * y;
    }
    site_apply_row(site, t, g, I);
    if (out_bf16) {
        __nv_bfloat16* o = out_bf16 + (long long)t * I;
        for (int i = threadIdx.x; i < I; i += blockDim.x) o[i] = __float2bfloat16(g[i]);
    }
}
