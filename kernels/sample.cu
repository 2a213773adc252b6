// Next-token sampling for generation: temperature, top-p (nucleus), a counter-based draw.
//
// Per row r (x = logits[r, :], V tokens), with T = temperature:
//   T == 0: out[r] = argmax_i x[i] (ties -> lowest id).
//   T > 0:  w[i] = exp((x[i] - m) / T), m = max_i x[i]   (so 0 <= w <= 1, w[argmax] = 1)
//           Z = sum_i w[i]; p[i] = w[i] / Z.
//           Kept set K: order tokens by (w descending, id ascending); K is the shortest prefix
//           of that order whose mass reaches top_p * Z (top_p >= 1 keeps every token).
//           u = sample_uniform(seed, step[r]) in [0, 1): splitmix64 of (seed, step) only, so a
//           row's draw does not depend on the batch it is in; the top 24 bits of the hash.
//           out[r] = the first id i of K, in increasing id order, whose cumulative mass
//           sum_{j in K, j <= i} w[j] exceeds u * sum_{j in K} w[j].
// The CPU reference with the same rule is `sample_row` in src/backend/ops/sample.rs (f64 math);
// sample_uniform and splitmix64 there are bit-identical to the functions below.
//
// How K is found without sorting: S(t) = sum_{w[i] >= t} w[i] is non-increasing in t, and the
// bit patterns of non-negative floats order as their values. Bisection over the bit pattern of
// t in [0, 1.0f] finds the largest t with S(t) >= top_p * Z: that t is the weight W of the last
// kept token. Every token with w > W is kept (their mass G < top_p * Z); of the c tokens with
// w == W the r = clamp(ceil((top_p * Z - G) / W), 1, c) lowest ids are kept.
//
// Work split: one block per row (blockDim a multiple of 32, at most 1024). The argmax, Z and
// each bisection step are strided passes over the row (coalesced) with a block reduction. The
// tie ranks and the draw use a contiguous chunk of ceil(V / blockDim) ids per thread: each
// thread sums its kept weights, a block exclusive scan gives each chunk's starting mass, and
// the thread whose chunk contains the crossing walks it. Weights are recomputed from the
// logits in every pass (no workspace). All reductions are fixed trees over shuffles and a
// 32-entry shared array: results are deterministic run to run.
//
// dtypes: f32 logits, f32 math and accumulation; i32 steps and ids; u64 seed.

#include "common.cuh"

#define SAMPLE_FULL_MASK 0xffffffffu
#define SAMPLE_MAX_INT 0x7fffffff
// Domain separation from the other users of splitmix64 (intervention noise).
#define SAMPLE_SALT 0x73616d706c652121ull


// The row's uniform in [0, 1): the top 24 bits of splitmix64(seed ^ splitmix64(step ^ salt)),
// an exact float. Mirrors ops::sample::sample_uniform.
__device__ __forceinline__ float sample_uniform(unsigned long long seed, int step) {
    const unsigned long long h = pb_splitmix64(seed ^ pb_splitmix64((unsigned long long)(unsigned int)step ^ SAMPLE_SALT));
    return (float)(unsigned int)(h >> 40) * (1.0f / 16777216.0f);
}

// The sum over the block, the same value in every thread. `sh` is a 32-entry shared array;
// the call begins and ends with a barrier, so consecutive calls may share it.
__device__ __forceinline__ float sample_block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(SAMPLE_FULL_MASK, v, o);
    }
    __syncthreads();
    if (lane == 0) {
        sh[warp] = v;
    }
    __syncthreads();
    float t = lane < nwarps ? sh[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        t += __shfl_xor_sync(SAMPLE_FULL_MASK, t, o);
    }
    return t;
}

// The minimum (op_max = false) or maximum over the block, the same value in every thread.
__device__ __forceinline__ int sample_block_minmax(int v, bool op_max, int* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const int w = __shfl_xor_sync(SAMPLE_FULL_MASK, v, o);
        v = (op_max ? w > v : w < v) ? w : v;
    }
    __syncthreads();
    if (lane == 0) {
        sh[warp] = v;
    }
    __syncthreads();
    int t = lane < nwarps ? sh[lane] : v;
    for (int o = 16; o > 0; o >>= 1) {
        const int w = __shfl_xor_sync(SAMPLE_FULL_MASK, t, o);
        t = (op_max ? w > t : w < t) ? w : t;
    }
    return t;
}

// (value, id) argmax over the warp, ties -> lowest id; the same result in every lane.
__device__ __forceinline__ void sample_warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(SAMPLE_FULL_MASK, v, o);
        const int k = __shfl_xor_sync(SAMPLE_FULL_MASK, i, o);
        if (w > v || (w == v && k < i)) {
            v = w;
            i = k;
        }
    }
}

// (value, id) argmax over the block, ties -> lowest id; the same result in every thread.
__device__ __forceinline__ void sample_block_argmax(float& v, int& i, float* shv, int* shi) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    sample_warp_argmax(v, i);
    __syncthreads();
    if (lane == 0) {
        shv[warp] = v;
        shi[warp] = i;
    }
    __syncthreads();
    if (lane < nwarps) {
        v = shv[lane];
        i = shi[lane];
    }
    sample_warp_argmax(v, i);
}

// Exclusive prefix sum over threads in threadIdx order; `*total` gets the block total. A fixed
// tree, so the float version is deterministic; the int version is exact.
template <typename T>
__device__ __forceinline__ T sample_block_excl_scan(T v, T* sh, T* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    T inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        const T t = __shfl_up_sync(SAMPLE_FULL_MASK, inc, o);
        if (lane >= o) {
            inc += t;
        }
    }
    T excl = __shfl_up_sync(SAMPLE_FULL_MASK, inc, 1);
    if (lane == 0) {
        excl = T(0);
    }
    __syncthreads();
    if (lane == 31) {
        sh[warp] = inc;
    }
    __syncthreads();
    T w = lane < nwarps ? sh[lane] : T(0);
    for (int o = 1; o < 32; o <<= 1) {
        const T t = __shfl_up_sync(SAMPLE_FULL_MASK, w, o);
        if (lane >= o) {
            w += t;
        }
    }
    const T before = __shfl_sync(SAMPLE_FULL_MASK, w, (warp + 31) & 31);
    *total = __shfl_sync(SAMPLE_FULL_MASK, w, nwarps - 1);
    return (warp == 0 ? T(0) : before) + excl;
}

// The unnormalised probability of logit v: exp((v - m) / T) in [0, 1].
__device__ __forceinline__ float sample_weight(float v, float m, float inv_t) {
    return fminf(expf((v - m) * inv_t), 1.0f);
}

// Whether weight w is in the nucleus whose threshold weight is W: every w > W, and the first r
// of the ids tied at W in id order (`rank` counts the ties seen so far, advanced here).
__device__ __forceinline__ bool sample_keep(float w, float W, int r, int& rank) {
    if (w != W) return w > W;
    return rank++ < r;
}

extern "C" __global__ void sample_f32(
    const float* logits,  // [n, V]
    int n,
    int V,
    float temperature,    // >= 0; 0 = greedy
    float top_p,          // in (0, 1]
    unsigned long long seed,
    const int* step,      // [n] the decode step of each row
    int* out              // [n] out: the sampled token id
) {
    __shared__ float sh_f[32];
    __shared__ int sh_i[32];
    const int row = blockIdx.x;
    if (row >= n) {
        return;  // the whole block leaves together
    }
    const float* x = logits + (long long)row * V;
    const int tid = threadIdx.x, nt = blockDim.x;

    // Argmax (ties -> lowest id); its value is the shift m.
    float m = pb_float_from_bits(0xff800000u);  // -inf
    int best = V;                             // V = "no element yet"
    for (int i = tid; i < V; i += nt) {
        const float v = x[i];
        if (v > m || best == V) {
            m = v;
            best = i;
        }
    }
    sample_block_argmax(m, best, sh_f, sh_i);
    if (temperature == 0.0f) {
        if (tid == 0) {
            out[row] = best;
        }
        return;
    }
    const float inv_t = 1.0f / temperature;

    // Total mass Z = S(0).
    float z = 0.0f;
    for (int i = tid; i < V; i += nt) {
        z += sample_weight(x[i], m, inv_t);
    }
    z = sample_block_sum(z, sh_f);

    // Threshold weight W (bisection on the bit pattern) and the number r of ties kept.
    // top_p >= 1 keeps everything: W = 0 and every tie at 0 is kept.
    const bool keep_all = top_p >= 1.0f;
    const float target = top_p * z;
    float W = 0.0f;
    if (!keep_all) {
        unsigned int lo = 0u, hi = 0x3f800001u;  // S(lo) >= target; S(hi) = 0 (w <= 1)
        while (hi - lo > 1u) {
            const unsigned int mid = lo + (hi - lo) / 2u;
            const float t = pb_float_from_bits(mid);
            float s = 0.0f;
            for (int i = tid; i < V; i += nt) {
                const float w = sample_weight(x[i], m, inv_t);
                if (w >= t) {
                    s += w;
                }
            }
            s = sample_block_sum(s, sh_f);
            if (s >= target) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        W = pb_float_from_bits(lo);
    }

    // Chunk pass 1: mass above W (G) and the ties at W, ranked by id.
    const int chunk = (V + nt - 1) / nt;
    const int c0 = tid * chunk < V ? tid * chunk : V;
    const int c1 = c0 + chunk < V ? c0 + chunk : V;
    float g = 0.0f;
    int ties = 0;
    for (int i = c0; i < c1; ++i) {
        const float w = sample_weight(x[i], m, inv_t);
        if (w > W) {
            g += w;
        } else if (w == W) {
            ++ties;
        }
    }
    g = sample_block_sum(g, sh_f);
    int n_ties = 0;
    const int tie_rank0 = sample_block_excl_scan(ties, sh_i, &n_ties);
    int r = n_ties;
    if (!keep_all && W > 0.0f) {
        const float need = ceilf((target - g) / W);
        r = need >= (float)n_ties ? n_ties : (need >= 1.0f ? (int)need : 1);
    }

    // Chunk pass 2: kept mass of each chunk, the last kept id with positive weight.
    float kept = 0.0f;
    int last = -1;
    int rank = tie_rank0;
    for (int i = c0; i < c1; ++i) {
        const float w = sample_weight(x[i], m, inv_t);
        const bool keep = sample_keep(w, W, r, rank);
        if (keep && w > 0.0f) {
            kept += w;
            last = i;
        }
    }
    float mass = 0.0f;
    const float before = sample_block_excl_scan(kept, sh_f, &mass);
    last = sample_block_minmax(last, true, sh_i);

    // The draw: the first kept id whose cumulative mass exceeds u * mass. The chunk whose range
    // holds the crossing walks itself, summing in the same order as pass 2.
    const float thresh = sample_uniform(seed, step[row]) * mass;
    int pick = SAMPLE_MAX_INT;
    if (before <= thresh && before + kept > thresh) {
        float run = 0.0f;
        rank = tie_rank0;
        for (int i = c0; i < c1; ++i) {
            const float w = sample_weight(x[i], m, inv_t);
            const bool keep = sample_keep(w, W, r, rank);
            if (keep && w > 0.0f) {
                run += w;
                if (before + run > thresh) {
                    pick = i;
                    break;
                }
            }
        }
    }
    pick = sample_block_minmax(pick, false, sh_i);
    if (tid == 0) {
        // No crossing can only come from rounding at the very end (or NaN logits): the last
        // kept token, else the argmax.
        out[row] = pick != SAMPLE_MAX_INT ? pick : (last >= 0 ? last : best);
    }
}
