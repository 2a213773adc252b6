// Site operations on device: the interventions and captures of src/intervene.rs (`apply_op`)
// applied to one row of an activation, cooperatively by the threads of one block.
//
// An op acts on the selected slice of a row: a list of (start, len) element ranges, width
// w = sum of lens; element j of the selected vector is row[start_k + e] with j = (lens of the
// earlier ranges) + e. With x the selected vector:
//   PATCH   x <- operands[operand .. +w]                   (the row's source values)
//   PATCH_ROW  the selected elements <- the same elements of a source row held on the device:
//           row[i] <- src[i], src the float address `operand` (a whole row; no copy first)
//   ADD     x <- x + param * v,  v = operands[operand .. +w]
//   PROJECT x <- x - param * P x + v,  P = operands[operand .. +w*w] ([w, w] row-major),
//           v = the w floats after P; P x goes through scratch[seed .. +w] (global memory,
//           one region per op, so no shared memory is needed whatever w)
//   ZERO    x <- 0
//   MEAN    x <- operands[operand .. +w]
//   RANDOM  x <- g * |x| / |g|,  g_j = gaussian(seed, pos, j) (splitmix64 + Box-Muller in
//           f64, bit-for-bit the hash of intervene.rs; 0 when |g| = 0)
//   SCALE   x <- param * x
//   CAPTURE capture[operand .. + row_width] <- the whole row (after the interventions before
//           it); skipped when the plan has no capture buffer
//
// Work split: every thread of the block calls `site_apply_row` (uniform control flow: it
// holds __syncthreads). Element-wise ops stride the threads over each range; the norms of
// RANDOM are block reductions (warp shuffles, then one partial per warp in shared memory);
// P x gives one output element per warp (lanes over j, coalesced rows of P), then a barrier,
// then the element-wise update. blockDim.x must be a multiple of 32 (<= 1024).
// dtypes: f32 throughout (the Gaussian in f64 as the reference).
#pragma once

#include "common.cuh"

#define SITE_PATCH 0
#define SITE_ADD 1
#define SITE_PROJECT 2
#define SITE_ZERO 3
#define SITE_MEAN 4
#define SITE_RANDOM 5
#define SITE_SCALE 6
#define SITE_CAPTURE 7
#define SITE_PATCH_ROW 8

// One op on one row (48 bytes; mirrored by `SiteOp` in src/backend/ops/site_ops.rs, the field
// offsets of both checked by build/layout.rs; the SITE_* codes above are the Rust consts' source).
struct SiteOp {
    int row;          // row of the activation [T, row_width]
    int code;         // SITE_*
    int slice_begin;  // first (start, len) pair in SitePlan::slices
    int n_slices;     // number of pairs (0 for CAPTURE)
    int width;        // w = sum of the lens
    int pos;          // absolute position of the row (RANDOM's noise key)
    long long operand;  // float offset into operands (PATCH, ADD, MEAN, PROJECT) or capture (CAPTURE);
                        // PATCH_ROW: the device address of the source row
    float param;      // ADD, PROJECT: beta; SCALE: alpha
    int pad;
    unsigned long long seed;  // RANDOM: the seed; PROJECT: float offset into scratch (w floats)
};
static_assert(sizeof(SiteOp) == 48, "SiteOp must match its Rust mirror");

// All ops of one site for one launch (64 bytes; mirrored by `SitePlan` in site_ops.rs, checked
// likewise).
// An empty plan has n_active = 0 and null pointers.
struct SitePlan {
    const SiteOp* ops;        // [n_ops], grouped by row
    const int* active_rows;   // [n_active] rows with ops, ascending
    const int* row_ops;       // [n_active + 1]: ops of active row i are ops[row_ops[i] .. row_ops[i+1])
    int n_active;
    int pad;
    const int* slices;        // [n_pairs, 2] (start, len)
    const float* operands;    // PATCH/ADD/MEAN/PROJECT operands
    float* capture;           // capture arena (CAPTURE offsets), or null
    float* scratch;           // PROJECT's P x, one w-float region per PROJECT op, or null
};
static_assert(sizeof(SitePlan) == 64, "SitePlan must match its Rust mirror");

// Sum of v over the block; every thread gets the same value (fixed order: deterministic).
// Must be called by all threads of the block.
static __device__ __forceinline__ float site_block_sum(float v) {
    __shared__ float site_red[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // an earlier call may still be reading site_red
    if ((threadIdx.x & 31) == 0) site_red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
    const int nw = (blockDim.x + 31) >> 5;
    for (int w = 0; w < nw; ++w) t += site_red[w];
    return t;
}

// intervene.rs `gaussian`: a standard normal keyed by (seed, position, element).
static __device__ __forceinline__ float site_gaussian(unsigned long long seed, unsigned long long pos, unsigned long long i) {
    const unsigned long long h = pb_splitmix64(seed ^ pb_splitmix64((pos * 0x1000000001B3ull) ^ pb_splitmix64(i)));
    const double u1 = ((double)(h >> 40) + 0.5) / 16777216.0;
    const double u2 = ((double)(h & 0xFFFFFFull) + 0.5) / 16777216.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * 3.14159265358979323846 * u2));
}

// Calls f(j, idx) for each selected element this thread owns: j in the selected vector,
// idx in the row.
template <class F>
static __device__ __forceinline__ void site_for_each(const int* sl, int n_slices, F f) {
    int j0 = 0;
    for (int k = 0; k < n_slices; ++k) {
        const int start = sl[2 * k], len = sl[2 * k + 1];
        for (int e = threadIdx.x; e < len; e += blockDim.x) f(j0 + e, start + e);
        j0 += len;
    }
}

// The index in plan.active_rows of `row`, or -1 (binary search; the same in every thread).
static __device__ __forceinline__ int site_find(const SitePlan& p, int row) {
    int lo = 0, hi = p.n_active;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        const int r = p.active_rows[mid];
        if (r == row) return mid;
        if (r < row) lo = mid + 1; else hi = mid;
    }
    return -1;
}

// Applies the ops of active row `a` of the plan to `x` (that row, [row_width], global or
// shared memory), in order. Called by all threads of the block; starts and ends with a
// barrier, so the caller's writes to x before and its reads after are ordered.
static __device__ void site_apply_active(const SitePlan& p, int a, float* x, int row_width) {
    const int o_end = p.row_ops[a + 1];
    for (int o = p.row_ops[a]; o < o_end; ++o) {
        const SiteOp op = p.ops[o];
        const int* sl = p.slices + 2 * op.slice_begin;
        __syncthreads();
        switch (op.code) {
        case SITE_PATCH:
        case SITE_MEAN: {
            const float* v = p.operands + op.operand;
            site_for_each(sl, op.n_slices, [&](int j, int i) { x[i] = v[j]; });
        } break;
        case SITE_PATCH_ROW: {
            const float* src = (const float*)op.operand;
            site_for_each(sl, op.n_slices, [&](int, int i) { x[i] = src[i]; });
        } break;
        case SITE_ADD: {
            const float* v = p.operands + op.operand;
            const float beta = op.param;
            site_for_each(sl, op.n_slices, [&](int j, int i) { x[i] = x[i] + beta * v[j]; });
        } break;
        case SITE_ZERO:
            site_for_each(sl, op.n_slices, [&](int, int i) { x[i] = 0.0f; });
            break;
        case SITE_SCALE: {
            const float alpha = op.param;
            site_for_each(sl, op.n_slices, [&](int, int i) { x[i] = x[i] * alpha; });
        } break;
        case SITE_RANDOM: {
            float ss = 0.0f, gs = 0.0f;
            const unsigned long long seed = op.seed, pos = (unsigned long long)op.pos;
            site_for_each(sl, op.n_slices, [&](int j, int i) {
                const float g = site_gaussian(seed, pos, (unsigned long long)j);
                ss += x[i] * x[i];
                gs += g * g;
            });
            ss = site_block_sum(ss);  // barriers: every read of x is done before the writes
            gs = site_block_sum(gs);
            const float target = sqrtf(ss), gn = sqrtf(gs);
            const float s = gn > 0.0f ? target / gn : 0.0f;
            site_for_each(sl, op.n_slices, [&](int j, int i) { x[i] = site_gaussian(seed, pos, (unsigned long long)j) * s; });
        } break;
        case SITE_PROJECT: {
            const long long w = op.width;
            const float* P = p.operands + op.operand;  // [w, w]
            const float* v = P + w * w;                // [w]
            float* px = p.scratch + op.seed;           // [w]
            const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
            for (int r = threadIdx.x >> 5; r < w; r += nwarps) {  // uniform within a warp
                const float* prow = P + (long long)r * w;
                float acc = 0.0f;
                int j0 = 0;
                for (int k = 0; k < op.n_slices; ++k) {
                    const int start = sl[2 * k], len = sl[2 * k + 1];
                    for (int e = lane; e < len; e += 32) acc += prow[j0 + e] * x[start + e];
                    j0 += len;
                }
                for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
                if (lane == 0) px[r] = acc;
            }
            __syncthreads();  // P x complete (and every read of x done) before the update
            const float beta = op.param;
            site_for_each(sl, op.n_slices, [&](int j, int i) { x[i] = x[i] - beta * px[j] + v[j]; });
        } break;
        case SITE_CAPTURE:
            if (p.capture) {
                float* c = p.capture + op.operand;
                for (int i = threadIdx.x; i < row_width; i += blockDim.x) c[i] = x[i];
            }
            break;
        default:
            break;
        }
    }
    __syncthreads();
}

// Applies the plan's ops for `row` (if any) to x = that row. For fused kernels with one
// block per row: call from all threads; a row without ops costs a binary search and nothing else
// (no barrier either).
static __device__ __forceinline__ void site_apply_row(const SitePlan& p, int row, float* x, int row_width) {
    if (p.n_active == 0) return;
    const int a = site_find(p, row);
    if (a >= 0) site_apply_active(p, a, x, row_width);
}
