// Rotary position embedding and its neighbours in the attention sublayer: the OLMo 2 q/k
// RMSNorm, RoPE on the varlen batch, and the write of the new rows' K/V into the paged cache.
// Reference: src/backend/cpu.rs `rmsnorm` (NormWeight::Plain), `rope`; src/engine/forward.rs.
//
// qk_norm_f32:  x[t, :] <- w * (x[t, :] / sqrt(mean(x[t, :]^2) + eps)), in place, over the whole
//   projection width n (OLMo 2 q_norm / k_norm). One block per row t; each thread sums the
//   squares of a strided slice, warp shuffles then shared memory reduce to the block total,
//   then every thread rescales its slice. f32 throughout.
//
// rope_f32:  rotate-half RoPE on the first rotary_dim dims of each head, in place. With
//   half = rotary_dim / 2, s = row_seq[t], angle_i = (float)pos[t] * inv_freq[s, i] (an f32
//   product, as the CPU), c_i = cos(angle_i) * attn_factor[s], s_i = sin(angle_i) * attn_factor[s]:
//     out[i]        = x[i] c_i - x[i + half] s_i
//     out[i + half] = x[i + half] c_i + x[i] s_i        (i < half; dims >= rotary_dim untouched)
//   One block per row t. The block first computes the half (c_i, s_i) pairs into shared memory
//   (once per row, not once per head), then threads stride over (head, i) pairs.
//   cos/sin are evaluated in double precision of the f32 angle and rounded to f32: this matches
//   the CPU's correctly-rounded-in-practice f32 cos/sin within an ulp at any position, and unlike
//   cosf/sinf it cannot be turned into the inaccurate __cosf/__sinf by --use_fast_math (angles
//   reach 1e5 rad at long positions, where __cosf is wrong in the first digit). Cost: one
//   double sin and cos per (row, i), negligible next to the GEMMs.
//
// kv_write_bf16:  k_cache[slot[t], :] <- bf16(k[t, :]), v_cache[slot[t], :] <- bf16(v[t, :]);
//   round to nearest even (__float2bfloat16, the same rounding as half::bf16::from_f32).
//   One block per row t, threads stride over kv_width.
//
// kv_copy_slots_bf16:  k_cache[dst[i], :] <- k_cache[src[i], :], v_cache likewise: the
//   copy-on-write of a resumed segment's partial prefix block (its first positions are the
//   clean run's, the rest its own). One block per copied slot, threads stride over kv_width.
//   Host-validated (SlotCopies in ops/rope.rs): slots in range, destinations distinct and never
//   a source; out-of-range slots are skipped so device memory stays safe regardless.
//
// Index arrays (pos, row_seq, slot) come from a host-validated PagedBatch (ops/attention.rs):
// the kernels trust them. Offsets into the cache are computed in 64-bit.

#include <cuda_bf16.h>

#define ROPE_WARP 32

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
static __device__ __forceinline__ float rope_block_sum(float v, float* red /* [32] shared */) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / ROPE_WARP, lane = threadIdx.x % ROPE_WARP;
    const int n_warps = blockDim.x / ROPE_WARP;
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
    ss = rope_block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = w[i] * (row[i] * r);
}

extern "C" __global__ void rope_f32(
    float* x,                  // [T, n_heads, d_head] rotated in place
    const int* pos,            // [T] absolute position of each row
    const int* row_seq,        // [T] sequence of each row
    const float* inv_freq,     // [S, rotary_dim / 2] per sequence (longrope: by sequence length)
    const float* attn_factor,  // [S]
    int T, int n_heads, int d_head, int rotary_dim) {
    extern __shared__ float rope_cs[]; // [2, rotary_dim / 2]: cos then sin
    const int t = blockIdx.x;
    if (t >= T) return;
    const int half = rotary_dim / 2;
    float* cs = rope_cs;
    float* sn = rope_cs + half;
    const int s = row_seq[t];
    const float p = (float)pos[t];
    const float f = attn_factor[s];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float angle = p * inv_freq[(size_t)s * half + i];
        cs[i] = (float)cos((double)angle) * f;
        sn[i] = (float)sin((double)angle) * f;
    }
    __syncthreads();
    float* row = x + (size_t)t * n_heads * d_head;
    for (int idx = threadIdx.x; idx < n_heads * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        float* xh = row + (size_t)h * d_head;
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * cs[i] - b * sn[i];
        xh[i + half] = b * cs[i] + a * sn[i];
    }
}

extern "C" __global__ void kv_write_bf16(
    const float* k,           // [T, kv_width]
    const float* v,           // [T, kv_width]
    __nv_bfloat16* k_cache,   // [n_slots, kv_width]
    __nv_bfloat16* v_cache,   // [n_slots, kv_width]
    const int* slot,          // [T] cache slot of each row
    int T, int kv_width) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const size_t src = (size_t)t * kv_width;
    const size_t dst = (size_t)slot[t] * kv_width;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        k_cache[dst + i] = __float2bfloat16(k[src + i]);
        v_cache[dst + i] = __float2bfloat16(v[src + i]);
    }
}

extern "C" __global__ void kv_copy_slots_bf16(
    __nv_bfloat16* k_cache,   // [n_slots, kv_width]
    __nv_bfloat16* v_cache,   // [n_slots, kv_width]
    const int* src_slot,      // [n]
    const int* dst_slot,      // [n]
    int n, int kv_width, int n_slots) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const int s = src_slot[i], d = dst_slot[i];
    if (s < 0 || s >= n_slots || d < 0 || d >= n_slots) return;
    const size_t src = (size_t)s * kv_width;
    const size_t dst = (size_t)d * kv_width;
    for (int j = threadIdx.x; j < kv_width; j += blockDim.x) {
        k_cache[dst + j] = k_cache[src + j];
        v_cache[dst + j] = v_cache[src + j];
    }
}
