// Varlen causal attention over a paged bf16 KV cache (flash / online softmax, f32 math).
// Reference: src/backend/ops/attention.rs `attention_ref`, applied per sequence by src/engine/forward.rs.
//
// Formula. Sequence s has query rows q_start[s] .. q_start[s+1] at absolute positions
// p = pos0[s] + (row - q_start[s]); its key/value at position j lives in cache slot
// block_table[s, j / block_size] * block_size + j % block_size. For row p and query head h
// (kv head kh = h / (H / KV), grouped-query attention):
//   s_j = dot(q[row, h], k[j, kh]) * scale;  s_j = softcap * tanh(s_j / softcap) if softcap > 0
//   visible keys: lo(p) <= j <= p with lo(p) = 0, or max(0, p - sliding_window + 1) with a
//   sliding window
//   z[row, h] = sum_j softmax(s)_j v[j, kh]   (softmax over the visible keys only)
// Masked keys get probability exactly zero, as on the CPU.
//
// attention_f32 — work split: one block of ATT_WARPS warps per (sequence, tile of ATT_WARPS
// consecutive query rows, query head); grid (S, ceil(max rows of a sequence / ATT_WARPS), H).
// Blocks whose tile lies past their sequence's rows exit at once (a batch of one-row segments
// has exactly one tile each). Each warp owns one query row. The block walks the union of its
// rows' key ranges in tiles of ATT_BK = 32 keys: the tile's K and V (bf16, as stored) are
// loaded into shared memory through the block table, then each lane scores one key of the
// tile (a full dot product over dh against the warp's query row in shared memory), the warp
// updates its running max m and sum l (online softmax: rescale by exp(m_old - m_new)), and
// each lane accumulates dims lane, lane + 32, ... of z with the tile's probabilities broadcast
// through shared memory (one __syncwarp instead of 32 shuffles). z = acc / l at the end.
// Shared K/V rows are padded (att_ks) so that 32 lanes reading 32 different key rows hit
// different banks. d_head up to 256 (ATT_MAXR * 32), any value. Two barriers per key tile.
// The block table comes from a host-validated PagedBatch; still, an entry outside the cache
// (n_slots) reads a zero key/value instead of wild memory.
//
// attention_pattern_f32 — the attention probabilities of the requested (row, head) pairs only
// (the full pattern is never materialised): one block per pair; pass 1 writes the raw scores
// of the visible keys into the output row (zeros elsewhere, up to n_keys) and takes their max,
// pass 2 exponentiates and sums, pass 3 divides. The score is the same function as in the
// main pass (same summation order), so the pattern is exactly the softmax the main pass used
// up to the rounding of the online rescaling.
//
// dtypes: q, z, patterns f32; K/V bf16 in the cache, converted to f32 on load; all math f32.
//
// What would make it faster (in order): one block per KV head processing its H/KV query
// heads together (GQA: K/V loaded once per group, not once per query head); more query rows
// per warp (K/V tile reuse is only ATT_WARPS rows now); tensor-core QK^T and PV (mma, bf16 q)
// behind a separately tested path; a split-K (flash-decoding) variant for batches of few rows
// with long prefixes, where one warp per row leaves the GPU idle; vectorised 16-byte K/V loads
// and cp.async double buffering of the next tile; exp2f with log2(e) folded into the scale.

#include <cuda_bf16.h>

#include "attention.cuh"

#define ATT_WARPS 4   // query rows (warps) per block
#define ATT_BK 32     // keys per shared-memory tile: one per lane when scoring
#define ATT_MAXR 8    // z accumulators per lane: d_head <= 32 * ATT_MAXR = 256
#define ATT_NEG_INF __uint_as_float(0xff800000u)  // -inf (NVRTC has no <math.h> INFINITY)

// Row stride of the shared K/V tiles in bf16 elements: even (4-byte aligned rows) and an odd
// number of 4-byte words for every even d_head, so 32 lanes on 32 rows use 32 banks.
static __device__ __forceinline__ int att_ks(int dh) { return 2 * ((dh + 1) / 2) + 2; }

// The pre-softmax score of one key: dot(q, k) * scale, soft-capped. Summation order is
// sequential over d in both kernels so both see bitwise the same scores.
static __device__ __forceinline__ float att_score(const float* q, const __nv_bfloat16* k, int dh, float scale, float softcap) {
    float dot = 0.0f;
    for (int d = 0; d < dh; ++d) dot += q[d] * __bfloat162float(k[d]);
    float s = dot * scale;
    if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
    return s;
}

// Cache slot of position j of sequence s, or -1 when the table entry is outside the cache.
static __device__ __forceinline__ long long att_slot(const AttnArgs& a, int s, int j) {
    const int blk = a.block_table[(size_t)s * a.max_blocks + j / a.block_size];
    const long long slot = (long long)blk * a.block_size + j % a.block_size;
    return (blk < 0 || slot >= a.n_slots) ? -1 : slot;
}

static __device__ __forceinline__ float att_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

static __device__ __forceinline__ float att_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void attention_f32(AttnArgs a) {
    extern __shared__ __align__(16) unsigned char att_smem[];
    __shared__ long long slot_s[ATT_BK];
    __shared__ float p_s[ATT_WARPS][ATT_BK];  // each warp's probabilities of the current tile

    const int s = blockIdx.x, tile = blockIdx.y, h = blockIdx.z;
    const int r0 = a.q_start[s];
    const int n_q = a.q_start[s + 1] - r0;
    const int t0 = tile * ATT_WARPS;
    if (t0 >= n_q) return;  // the whole block: this tile is past the sequence's rows
    const int rows = min(ATT_WARPS, n_q - t0);
    const int dh = a.dh;
    const int ks = att_ks(dh);
    const int kvh = h / (a.H / a.KV);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(att_smem);   // [ATT_BK, ks]
    __nv_bfloat16* v_s = k_s + ATT_BK * ks;                             // [ATT_BK, ks]
    float* q_s = reinterpret_cast<float*>(v_s + ATT_BK * ks);           // [ATT_WARPS, dh]

    // This block's rows: positions p_first .. p_last; warp w owns row r0 + t0 + w.
    const int p_first = a.pos0[s] + t0;
    const int p_last = p_first + rows - 1;
    const bool active = warp < rows;
    const size_t row = (size_t)r0 + t0 + warp;
    const int p = p_first + warp;
    const int lo = a.sliding_window > 0 ? max(0, p - a.sliding_window + 1) : 0;
    const int k_begin = a.sliding_window > 0 ? max(0, p_first - a.sliding_window + 1) : 0;

    for (int i = threadIdx.x; i < rows * dh; i += blockDim.x) {
        const int w = i / dh, d = i % dh;
        q_s[w * dh + d] = a.q[(((size_t)r0 + t0 + w) * a.H + h) * dh + d];
    }

    float m = ATT_NEG_INF, l = 0.0f;
    float acc[ATT_MAXR];
#pragma unroll
    for (int i = 0; i < ATT_MAXR; ++i) acc[i] = 0.0f;

    for (int kb = k_begin; kb <= p_last; kb += ATT_BK) {
        // slot_s is free: its readers (the previous tile's loads) all passed the barrier after
        // the loads. No barrier is needed here.
        if (threadIdx.x < ATT_BK) {
            const int j = kb + threadIdx.x;
            slot_s[threadIdx.x] = j <= p_last ? att_slot(a, s, j) : -1;
        }
        // The slots are written; the previous tile's K/V/p readers are done (they computed
        // before reaching this barrier); at the first tile the q rows are written.
        __syncthreads();
        for (int i = threadIdx.x; i < ATT_BK * dh; i += blockDim.x) {
            const int jj = i / dh, d = i % dh;
            const long long slot = slot_s[jj];
            __nv_bfloat16 kv_k = __float2bfloat16(0.0f), kv_v = __float2bfloat16(0.0f);
            if (slot >= 0) {
                const size_t off = ((size_t)slot * a.KV + kvh) * dh + d;
                kv_k = a.k_cache[off];
                kv_v = a.v_cache[off];
            }
            k_s[jj * ks + d] = kv_k;
            v_s[jj * ks + d] = kv_v;
        }
        __syncthreads();
        if (!active) continue;  // warp-uniform: idle warps of a short last tile only load

        const int j = kb + lane;
        const bool vis = j >= lo && j <= p;
        const float sc = vis ? att_score(q_s + warp * dh, k_s + lane * ks, dh, a.scale, a.softcap) : ATT_NEG_INF;
        const float m_new = fmaxf(m, att_warp_max(sc));
        if (m_new == ATT_NEG_INF) continue;  // warp-uniform: no visible key yet
        const float corr = expf(m - m_new);  // 0 while m is still -inf
        const float pj = vis ? expf(sc - m_new) : 0.0f;
        l = l * corr + att_warp_sum(pj);
        p_s[warp][lane] = pj;  // rewritten only after the next tile's first __syncthreads
        __syncwarp();
#pragma unroll
        for (int i = 0; i < ATT_MAXR; ++i) acc[i] *= corr;
        for (int jj = 0; jj < ATT_BK; ++jj) {
            const float pb = p_s[warp][jj];  // a shared-memory broadcast
            if (pb == 0.0f) continue;  // warp-uniform: masked key
            const __nv_bfloat16* vr = v_s + jj * ks;
#pragma unroll
            for (int i = 0; i < ATT_MAXR; ++i) {
                const int d = lane + 32 * i;
                if (d < dh) acc[i] += pb * __bfloat162float(vr[d]);
            }
        }
        m = m_new;
    }

    if (active) {
        float* zr = a.z + (row * a.H + h) * dh;
        const float inv = 1.0f / l;
#pragma unroll
        for (int i = 0; i < ATT_MAXR; ++i) {
            const int d = lane + 32 * i;
            if (d < dh) zr[d] = acc[i] * inv;
        }
    }
}

// Block-wide reduction (max when is_max, else sum) for blockDim.x a multiple of 32; every
// thread gets the result. Starts with a barrier so that back-to-back calls may reuse `red`.
static __device__ __forceinline__ float att_block_reduce(float v, bool is_max, float* red /* [32] shared */) {
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < (int)(blockDim.x / 32) ? red[lane] : (is_max ? ATT_NEG_INF : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, t, o);
        t = is_max ? fmaxf(t, u) : t + u;
    }
    return t;
}

extern "C" __global__ void attention_pattern_f32(AttnArgs a) {
    extern __shared__ __align__(16) unsigned char att_smem[];
    __shared__ float red[32];
    float* q_s = reinterpret_cast<float*>(att_smem);  // [dh]

    const int i = blockIdx.x;
    if (i >= a.n_pat) return;
    float* out = a.pat_out + (size_t)i * a.n_keys;
    const int T = a.q_start[a.S];
    const int r = a.pat_row[i], h = a.pat_head[i];
    if (r < 0 || r >= T || h < 0 || h >= a.H) {  // block-uniform; the host checked, never taken
        for (int j = threadIdx.x; j < a.n_keys; j += blockDim.x) out[j] = 0.0f;
        return;
    }
    // The sequence of row r: the last s with q_start[s] <= r (q_start[0] = 0 <= r < q_start[S]).
    int s = 0, hi = a.S;
    while (hi - s > 1) {
        const int mid = (s + hi) / 2;
        if (a.q_start[mid] <= r) s = mid; else hi = mid;
    }
    const int p = a.pos0[s] + (r - a.q_start[s]);
    const int lo = a.sliding_window > 0 ? max(0, p - a.sliding_window + 1) : 0;
    const int dh = a.dh;
    const int kvh = h / (a.H / a.KV);
    for (int d = threadIdx.x; d < dh; d += blockDim.x) q_s[d] = a.q[((size_t)r * a.H + h) * dh + d];
    __syncthreads();

    // Pass 1: raw scores of the visible keys (zeros elsewhere), their max.
    float m = ATT_NEG_INF;
    for (int j = threadIdx.x; j < a.n_keys; j += blockDim.x) {
        float v = 0.0f;
        if (j >= lo && j <= p) {
            const long long slot = att_slot(a, s, j);
            // A table entry outside the cache reads a zero key (score 0), as in the main pass.
            if (slot >= 0) v = att_score(q_s, a.k_cache + ((size_t)slot * a.KV + kvh) * dh, dh, a.scale, a.softcap);
            m = fmaxf(m, v);
        }
        out[j] = v;
    }
    m = att_block_reduce(m, true, red);
    // Pass 2: exponentiate and sum (each thread revisits only the entries it wrote).
    float l = 0.0f;
    for (int j = threadIdx.x; j < a.n_keys; j += blockDim.x) {
        if (j >= lo && j <= p) {
            const float e = expf(out[j] - m);
            out[j] = e;
            l += e;
        }
    }
    l = att_block_reduce(l, false, red);
    // Pass 3: normalise.
    for (int j = threadIdx.x; j < a.n_keys; j += blockDim.x) {
        if (j >= lo && j <= p) out[j] = out[j] / l;
    }
}
