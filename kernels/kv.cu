// The paged bf16 KV cache: the write of the new rows' K/V, and slot-to-slot copies.
// Reference: src/backend/ops/kv.rs `kv_write_ref`, `kv_copy_slots_ref`.
//
// kv_write_bf16:  k_cache[slot[t], :] <- bf16(k[t, :]), v_cache[slot[t], :] <- bf16(v[t, :]);
//   round to nearest even (__float2bfloat16, the same rounding as half::bf16::from_f32).
//   One block per row t, threads stride over kv_width.
//
// kv_copy_slots_bf16:  for every layer l, k_caches[l][dst[i], :] <- k_caches[l][src[i], :],
//   v_caches likewise: the copy-on-write of a resumed segment's partial prefix block (its first
//   positions are the clean run's, the rest its own), in one launch for all the layers of a
//   call. One block per (copied slot, layer), threads stride over kv_width.
//   Host-validated (SlotCopies in ops/kv.rs): slots in range, destinations distinct and never
//   a source; out-of-range slots are skipped so device memory stays safe regardless.
//
// The slot array of kv_write comes from a host-validated PagedBatch (ops/attention.rs): the
// kernel trusts it. Offsets into the cache are computed in 64-bit.

#include <cuda_bf16.h>

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
    __nv_bfloat16* const* k_caches,  // [n_layers] -> [n_slots, kv_width]
    __nv_bfloat16* const* v_caches,  // [n_layers] -> [n_slots, kv_width]
    const int* src_slot,      // [n]
    const int* dst_slot,      // [n]
    int n, int n_layers, int kv_width, int n_slots) {
    const int i = blockIdx.x, l = blockIdx.y;
    if (i >= n || l >= n_layers) return;
    __nv_bfloat16* k_cache = k_caches[l];
    __nv_bfloat16* v_cache = v_caches[l];
    const int s = src_slot[i], d = dst_slot[i];
    if (s < 0 || s >= n_slots || d < 0 || d >= n_slots) return;
    const size_t src = (size_t)s * kv_width;
    const size_t dst = (size_t)d * kv_width;
    for (int j = threadIdx.x; j < kv_width; j += blockDim.x) {
        k_cache[dst + j] = k_cache[src + j];
        v_cache[dst + j] = v_cache[src + j];
    }
}
