// Gated MLP activation with the MlpPost site ops, on the output of the one GEMM of the stacked
// gate and up projections (row t: the gate projection, then the up projection). Per row t,
// element i < I:
//   g = gate_up[t,i] (+ gate_b[i]), u = gate_up[t,I+i] (+ up_b[i])
//   gate_up[t,i] <- act(g) * u,  act = silu: g / (1 + exp(-g))
//                             gelu_tanh: 0.5 g (1 + tanh(0.7978846 (g + 0.044715 g^3)))
//   site ops on the row (MlpPost interventions, captures); out_bf16[t,i] <- bf16(gate_up[t,i])
// as src/backend/ops/act.rs `act_mul_ref` (bias as cpu.rs `linear` adds it before).
// One block per row, each thread owning elements threadIdx.x + k * blockDim.x (no barrier
// between element-wise steps); site ops only on rows that have them. f32 in/out, bf16 copy
// rounded to nearest even.
#include <cuda_bf16.h>
#include "site_ops.cuh"

extern "C" __global__ void act_mul_f32(
    float* gate_up,             // [T, 2I] in: per row the gate then the up projection;
                                // out: the first I of each row <- act(gate) * up after site ops
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
    float* g = gate_up + (long long)t * 2 * I;
    const float* u = g + I;
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
