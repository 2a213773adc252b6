// Rotary position embedding on the varlen batch of the attention sublayer.
// Reference: src/backend/ops/rope.rs `rope_ref`.
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
// Index arrays (pos, row_seq) come from a host-validated PagedBatch (ops/attention.rs): the
// kernel trusts them.

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
