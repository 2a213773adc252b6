// Small element-wise helpers of the forward pass. f32 math; bf16 outputs rounded to nearest
// even (__float2bfloat16). Work split: row kernels take one block per row with the threads
// striding over the row; flat kernels are grid-stride loops over n elements. References:
// src/backend/ops/elementwise.rs `<name>_ref` (bias_add_ref, to_bf16_ref, ...).
//   bias_add_f32          x[t, i] += b[i]
//   to_bf16_f32           y[i] = bf16(x[i])
//   head_mask_bf16        out[t, h, :] = h == head ? bf16(z[t, h, :]) : 0
//   sum_heads_f32         out[t, i] = (sum over h in order of result[t, h, i]) + bias[i]
//                         (as sum_heads_ref: per-head sum from 0, then the bias)
//   softcap_f32           x[i] = tanh(x[i] / cap) * cap
//   count_nonfinite_f32   *count += the number of x[i] that are NaN or +-Inf (i < n)
//   gather_rows_f32_bf16  out[k, :] = bf16(src[rows[k], :])
//   gather_rows_bf16      out[k, :] = src[rows[k], :]
// Gathers write a NaN row for an index outside [0, R) (the Rust wrappers check host indices;
// the guard keeps device indices memory-safe).
#include <cuda_bf16.h>

extern "C" __global__ void bias_add_f32(
    float* x,        // [T, n] in/out
    const float* b,  // [n]
    int T,
    int n
) {
    const int t = blockIdx.x;
    if (t >= T) return;
    float* r = x + (long long)t * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) r[i] = r[i] + b[i];
}

extern "C" __global__ void to_bf16_f32(
    const float* x,      // [n]
    __nv_bfloat16* y,    // [n]
    long long n
) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = __float2bfloat16(x[i]);
}

extern "C" __global__ void head_mask_bf16(
    const float* z,            // [T, H * dh]
    __nv_bfloat16* out,        // [T, H * dh]
    int T,
    int H,
    int dh,
    int head
) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const int n = H * dh, lo = head * dh, hi = lo + dh;
    const float* zr = z + (long long)t * n;
    __nv_bfloat16* o = out + (long long)t * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = (i >= lo && i < hi) ? __float2bfloat16(zr[i]) : __float2bfloat16(0.0f);
}

extern "C" __global__ void sum_heads_f32(
    const float* result,  // [T, H, d]
    const float* bias,    // [d] or null
    float* out,           // [T, d]
    int T,
    int H,
    int d
) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const float* r = result + (long long)t * H * d;
    float* o = out + (long long)t * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
        for (int h = 0; h < H; ++h) acc += r[(long long)h * d + i];
        if (bias) acc += bias[i];
        o[i] = acc;
    }
}

extern "C" __global__ void softcap_f32(
    float* x,     // [n] in/out
    long long n,
    float cap
) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = tanhf(x[i] / cap) * cap;
}

extern "C" __global__ void count_nonfinite_f32(
    const float* x,               // [n]
    long long n,
    unsigned long long* count     // [1] in/out
) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    unsigned long long c = 0;
    // Exponent bits all ones: NaN or +-Inf.
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) c += (__float_as_uint(x[i]) & 0x7f800000u) == 0x7f800000u;
    if (c) atomicAdd(count, c);
}

static __device__ __forceinline__ __nv_bfloat16 gather_to_bf16(float v) { return __float2bfloat16(v); }
static __device__ __forceinline__ __nv_bfloat16 gather_to_bf16(__nv_bfloat16 v) { return v; }

// out[k, :] = bf16(src[rows[k], :]); a row index outside 0..R gives a NaN row.
template <typename T>
static __device__ __forceinline__ void gather_rows(const T* src, const int* rows, __nv_bfloat16* out, int n, int d, int R) {
    const int k = blockIdx.x;
    if (k >= n) return;
    const int r = rows[k];
    __nv_bfloat16* o = out + (long long)k * d;
    if (r < 0 || r >= R) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = __float2bfloat16(__int_as_float(0x7fffffff));
        return;
    }
    const T* s = src + (long long)r * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = gather_to_bf16(s[i]);
}

// Intended twin: the two entry points differ only in the source type. They stay written out
// because build/scan.rs finds entry points by their `extern "C" __global__` text (a macro would
// hide them from the scanner and from the generated typed handles).
extern "C" __global__ void gather_rows_f32_bf16(
    const float* src,      // [R, d]
    const int* rows,       // [n]
    __nv_bfloat16* out,    // [n, d]
    int n,
    int d,
    int R
) {
    gather_rows(src, rows, out, n, d, R);
}

extern "C" __global__ void gather_rows_bf16(
    const __nv_bfloat16* src,  // [R, d]
    const int* rows,           // [n]
    __nv_bfloat16* out,        // [n, d]
    int n,
    int d,
    int R
) {
    gather_rows(src, rows, out, n, d, R);
}
