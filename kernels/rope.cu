// Rotary position embedding on the varlen batch of the attention sublayer.
// Reference: src/backend/ops/rope.rs `rope_ref`.
//
// rope_f32:  rotate-half RoPE on the first rotary_dim dims of each head of q and, in the same
//   launch, of k (the attention sublayer's two rotated tensors: one launch per layer, and the
//   angles computed once per row for both), in place. With
//   half = rotary_dim / 2, s = row_seq[t], angle_i = (float)pos[t] * inv_freq[s, i] (an f32
//   product, as the CPU), c_i = cos(angle_i) * attn_factor[s], s_i = sin(angle_i) * attn_factor[s]:
//     out[i]        = x[i] c_i - x[i + half] s_i
//     out[i + half] = x[i + half] c_i + x[i] s_i        (i < half; dims >= rotary_dim untouched)
//   One block per row t. The block first computes the half (c_i, s_i) pairs into shared memory
//   (once per row, not once per head or tensor), then threads stride over (head, i) pairs, the
//   n_q heads of q then the n_k heads of k.
//   cos/sin are evaluated in double precision of the f32 angle and rounded to f32: this matches
//   the CPU's correctly-rounded-in-practice f32 cos/sin within an ulp at any position, and unlike
//   cosf/sinf it cannot be turned into the inaccurate __cosf/__sinf by --use_fast_math (angles
//   reach 1e5 rad at long positions, where __cosf is wrong in the first digit). Cost: one
//   double sin and cos per (row, i), negligible next to the GEMMs.
//
// Index arrays (pos, row_seq) come from a host-validated PagedBatch (ops/attention.rs): the
// kernel trusts them.

extern "C" __global__ void rope_f32(
    float* q,                  // [T, n_q, d_head] rotated in place
    float* k,                  // [T, n_k, d_head] rotated in place; null when n_k = 0
    const int* pos,            // [T] absolute position of each row
    const int* row_seq,        // [T] sequence of each row
    const float* inv_freq,     // [S, rotary_dim / 2] per sequence (longrope: by sequence length)
    const float* attn_factor,  // [S]
    int T, int n_q, int n_k, int d_head, int rotary_dim) {
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
    float* q_row = q + (size_t)t * n_q * d_head;
    float* k_row = n_k > 0 ? k + (size_t)t * n_k * d_head : nullptr;
    for (int idx = threadIdx.x; idx < (n_q + n_k) * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        float* xh = h < n_q ? q_row + (size_t)h * d_head : k_row + (size_t)(h - n_q) * d_head;
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * cs[i] - b * sn[i];
        xh[i + half] = b * cs[i] + a * sn[i];
    }
}
