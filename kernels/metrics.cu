// Logit metrics over a label set, reduced on device (DESIGN.md section 1, "reduce on device").
//
// Input: logits [n, L] f32, row r = the logits of the L labels of one final row (the forward
// computes them with a GEMM against the gathered lm_head rows of the label tokens; Gemma
// soft-capping already applied). Per row r, with x = logits[r, :]:
//   pred[r]       = argmax_j x[j]                      (ties -> lowest j, as numpy.argmax)
//   logit_diff[r] = x[a[r]] - x[b[r]]                  when 0 <= b[r] < L
//                 = x[a[r]] - max_{j != a[r]} x[j]     when b[r] == -1 (-inf when L == 1,
//                                                       so the difference is +inf)
//   prob[r]       = exp(x[c[r]] - m) / sum_j exp(x[j] - m),  m = max_j x[j]
//   logsumexp[r]  = m + log(sum_j exp(x[j] - m))
// An index out of range (a or c outside [0, L), b outside [-1, L)) gives NaN for the output
// that uses it; the other outputs of the row are still written. Logits are finite or -inf (a
// masked label); a row whose logits are all -inf gets logsumexp = -inf and prob = NaN.
// The CPU reference with the same semantics is `label_metrics_ref` in
// src/backend/ops/metrics.rs.
//
// Work split: one warp per row, METRICS_WARPS warps per block (blockDim = 32 * METRICS_WARPS),
// grid.x = ceil(n / METRICS_WARPS). Lane l reads x[l], x[l + 32], ... (coalesced), keeps its
// running max/argmax, the max over j != a, then the warp combines them with xor-shuffles
// (every lane ends with the same value). A second strided pass sums exp(x[j] - m).
// No shared memory, no __syncthreads: warps are independent.
//
// dtypes: f32 in, f32 math and accumulation, i32 indices.

#include "common.cuh"

#define METRICS_WARPS 4
#define METRICS_FULL_MASK 0xffffffffu

#define METRICS_NEG_INF pb_float_from_bits(0xff800000u)
#define METRICS_NAN pb_float_from_bits(0x7fc00000u)

// (v, i) wins over (w, k) when v > w, or v == w and i < k: the lowest index among equal maxima.
__device__ __forceinline__ void metrics_argmax_combine(float& v, int& i, float w, int k) {
    if (w > v || (w == v && k < i)) {
        v = w;
        i = k;
    }
}

extern "C" __global__ void label_metrics_f32(
    const float* logits,  // [n, L]
    int n,
    int L,
    const int* a,         // [n] label index of the first term
    const int* b,         // [n] label index subtracted, or -1 = the max over the other labels
    const int* c,         // [n] label whose probability is reported
    int* pred,            // [n] out
    float* logit_diff,    // [n] out
    float* prob,          // [n] out
    float* logsumexp      // [n] out
) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * METRICS_WARPS + (threadIdx.x >> 5);
    if (row >= n) {
        return;  // the whole warp leaves together
    }
    const float* x = logits + (long long)row * L;
    const int ia = a[row];
    const int ib = b[row];
    const int ic = c[row];

    // Pass 1: max and argmax over all labels, max over the labels other than a.
    float best = METRICS_NEG_INF;
    int best_i = L;  // L = "no element yet": loses every tie against a real index
    float other = METRICS_NEG_INF;
    for (int j = lane; j < L; j += 32) {
        const float v = x[j];
        if (v > best || best_i == L) {
            best = v;
            best_i = j;
        }
        if (j != ia) {
            other = fmaxf(other, v);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(METRICS_FULL_MASK, best, o);
        const int k = __shfl_xor_sync(METRICS_FULL_MASK, best_i, o);
        metrics_argmax_combine(best, best_i, w, k);
        other = fmaxf(other, __shfl_xor_sync(METRICS_FULL_MASK, other, o));
    }

    // Pass 2: sum of exp(x - m). A row of -inf shifts by 0 (every term is then 0).
    const float shift = best == METRICS_NEG_INF ? 0.0f : best;
    float s = 0.0f;
    for (int j = lane; j < L; j += 32) {
        s += expf(x[j] - shift);
    }
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(METRICS_FULL_MASK, s, o);
    }

    if (lane == 0) {
        const float nan = METRICS_NAN;
        const bool a_ok = ia >= 0 && ia < L;
        float diff = nan;
        if (a_ok && ib == -1) {
            diff = x[ia] - other;
        } else if (a_ok && ib >= 0 && ib < L) {
            diff = x[ia] - x[ib];
        }
        pred[row] = best_i;
        logit_diff[row] = diff;
        prob[row] = (ic >= 0 && ic < L) ? expf(x[ic] - shift) / s : nan;
        logsumexp[row] = shift + logf(s);
    }
}
