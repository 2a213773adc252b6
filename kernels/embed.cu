// Token embedding: out[t, :] = f32(table[ids[t], :]) * scale  (scale = sqrt(d_model) for Gemma,
// 1 otherwise; as src/backend/ops/embed.rs `embed_ref` and the reference forward: convert to
// f32, then multiply).
// One block per token row, threads striding over d. An id outside [0, V) gives a NaN row
// (the Rust wrapper checks host ids; the guard keeps device ids memory-safe).
// bf16 table, f32 output.
#include <cuda_bf16.h>

extern "C" __global__ void embed_bf16(
    float* out,                   // [T, d]
    const __nv_bfloat16* table,   // [V, d]
    const int* ids,               // [T]
    int T,
    int d,
    int V,
    float scale
) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const int id = ids[t];
    float* o = out + (long long)t * d;
    if (id < 0 || id >= V) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = __int_as_float(0x7fffffff);
        return;
    }
    const __nv_bfloat16* row = table + (long long)id * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = __bfloat162float(row[i]) * scale;
}
