// kernels/selftest/selftest.cu — kernels that exercise the CUDA emulator (tests/emulator.rs).
// Each also compiles with NVRTC (build/; ptxas validates them) but is not part of the
// product's kernel table. Some are WRONG ON PURPOSE (a missing barrier, a divergent barrier, a
// shuffle waiting on an exited lane): the tests check that the emulator exposes them.
// Line numbers of the erroneous kernels are checked by the tests: keep the markers
// (`// ERROR-LINE: <tag>`) on the lines that must be reported.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Block-wide sum of each row: x [rows, n] -> out [rows]; one block per row, blockDim.x a power
// of two <= 1024. Strided partial sums, then a shared-memory tree with a barrier per level.
extern "C" __global__ void __launch_bounds__(1024) selftest_block_reduce(const float* __restrict__ x, float* __restrict__ out, int n) {
    __shared__ float partial[1024];
    const float* row = x + (size_t)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += row[i];
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// One warp per row of 32 values: x [rows, 32] -> sum (xor butterfly, every lane), max (shuffle
// down, lane 0), ballot of x > 0, any/all of x > 0, the inclusive prefix sum scan [rows, 32]
// (shuffle up) and its last element broadcast from lane 31 (shuffle idx) as total [rows].
// Rows of a block: blockDim.x / 32.
extern "C" __global__ void selftest_warp_ops(const float* __restrict__ x, float* __restrict__ sum, float* __restrict__ mx,
                                             unsigned* __restrict__ ballot, int* __restrict__ any_all,
                                             float* __restrict__ scan, float* __restrict__ total_out, int rows) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;  // whole warps only: rows are per warp
    const float v = x[(size_t)row * 32 + lane];
    float s = v;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float m = v;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_down_sync(0xffffffffu, m, o));
    const unsigned b = __ballot_sync(0xffffffffu, v > 0.0f);
    const int any = __any_sync(0xffffffffu, v > 0.0f);
    const int all = __all_sync(0xffffffffu, v > -1e30f);
    float inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        const float t = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += t;
    }
    const float total = __shfl_sync(0xffffffffu, inc, 31);
    __syncwarp();
    scan[(size_t)row * 32 + lane] = inc;
    if (lane == 3) total_out[row] = total;
    if (lane == 0) {
        mx[row] = m;
        ballot[row] = b;
        any_all[row * 2] = any;
        any_all[row * 2 + 1] = all;
    }
    if (lane == 7) sum[row] = s;  // every lane holds the sum after the butterfly
}

// Dynamic shared memory: row of n floats reversed through shared memory, plus a shared counter
// placed after the floats (a second extern __shared__ name aliasing the same bytes).
// shared_bytes = n * 4 + 4.
extern "C" __global__ void selftest_dynamic_smem(const float* __restrict__ x, float* __restrict__ out,
                                                 int* __restrict__ counts, int n) {
    extern __shared__ float vals[];
    extern __shared__ __align__(16) int ints[];
    if (threadIdx.x == 0) ints[n] = 0;
    const float* row = x + (size_t)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) vals[i] = row[i];
    __syncthreads();
    atomicAdd(&ints[n], 1);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(size_t)blockIdx.x * n + i] = vals[n - 1 - i];
    __syncthreads();
    if (threadIdx.x == 0) counts[blockIdx.x] = ints[n];
}

// Atomics across blocks (blocks run on several OS threads in the emulator).
// acc: float sum of x; ucount: number of threads; imax/imin: max/min of q; ull: sum of indices;
// cas: a counter incremented through an atomicCAS loop; exch: the last value written wins.
extern "C" __global__ void selftest_atomics(const float* __restrict__ x, const int* __restrict__ q, int n,
                                            float* acc, unsigned* ucount, int* imax, int* imin,
                                            unsigned long long* ull, int* cas, int* exch) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(acc, x[i]);
    atomicAdd(ucount, 1u);
    atomicMax(imax, q[i]);
    atomicMin(imin, q[i]);
    atomicAdd(ull, (unsigned long long)i);
    int old = *cas, assumed;
    do {
        assumed = old;
        old = atomicCAS(cas, assumed, assumed + 1);
    } while (old != assumed);
    atomicExch(exch, 1);
}

// bf16 / fp16 conversions and arithmetic through the real cuda_bf16.h / cuda_fp16.h.
// b[i] = bf16(x[i]), back[i] = float(b[i]), h[i] = half(x[i]), sum2[i] = bf16 pair add of
// (x[i], y[i]) + (y[i], x[i]) computed in bf16 (rounded inputs, rounded result).
extern "C" __global__ void selftest_bf16(const float* __restrict__ x, const float* __restrict__ y,
                                         __nv_bfloat16* __restrict__ b, float* __restrict__ back,
                                         __half* __restrict__ h, __nv_bfloat162* __restrict__ sum2, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const __nv_bfloat16 v = __float2bfloat16(x[i]);
    b[i] = v;
    back[i] = __bfloat162float(v);
    h[i] = __float2half(x[i]);
    const __nv_bfloat162 p = __floats2bfloat162_rn(x[i], y[i]);
    const __nv_bfloat162 r = __floats2bfloat162_rn(y[i], x[i]);
    sum2[i] = __hadd2(p, r);
}

// PLANTED BUG: shared memory written and read by another thread with no barrier between.
// out[b, t] should be x[b, (t + 1) % n] (n = blockDim.x) but a thread may read its neighbour's
// slot before the neighbour wrote it. selftest_neighbour is the same with the barrier.
extern "C" __global__ void selftest_missing_barrier(const float* __restrict__ x, float* __restrict__ out) {
    __shared__ float slot[1024];
    const int n = blockDim.x, t = threadIdx.x;
    slot[t] = x[(size_t)blockIdx.x * n + t];
    // missing: __syncthreads();
    out[(size_t)blockIdx.x * n + t] = slot[(t + 1) % n];
}

extern "C" __global__ void selftest_neighbour(const float* __restrict__ x, float* __restrict__ out) {
    __shared__ float slot[1024];
    const int n = blockDim.x, t = threadIdx.x;
    slot[t] = x[(size_t)blockIdx.x * n + t];
    __syncthreads();
    out[(size_t)blockIdx.x * n + t] = slot[(t + 1) % n];
}

// PLANTED BUG: threads past the first warp return before a barrier the others wait at.
extern "C" __global__ void selftest_divergent_barrier(float* out) {
    if (threadIdx.x >= 32) return;
    __syncthreads();  // ERROR-LINE: divergent_barrier
    out[threadIdx.x] = 1.0f;
}

// PLANTED BUG: two halves of the block wait at two different barriers.
extern "C" __global__ void selftest_two_barriers(float* out) {
    if (threadIdx.x % 2 == 0) {
        __syncthreads();  // ERROR-LINE: two_barriers
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// PLANTED BUG: lane 5 exits; the others shuffle with a full mask and would wait for it forever.
extern "C" __global__ void selftest_shfl_exited(float* out) {
    const int lane = threadIdx.x % 32;
    if (lane == 5) return;
    const float v = __shfl_xor_sync(0xffffffffu, (float)lane, 1);  // ERROR-LINE: shfl_exited
    out[threadIdx.x] = v;
}

// PLANTED BUG: lane 0 waits at a block barrier while its warp waits for it in a shuffle.
extern "C" __global__ void selftest_shfl_vs_barrier(float* out) {
    float v = 1.0f;
    if (threadIdx.x == 0) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);  // ERROR-LINE: shfl_vs_barrier
    }
    out[threadIdx.x] = v;
}

// PLANTED BUG: a failed device-side assertion ends the launch with an error.
extern "C" __global__ void selftest_assert(const int* flag) {
    assert(*flag == 0);  // ERROR-LINE: assert
}

// A struct argument by value (mirrored by a #[repr(C)] Pod struct in tests/emulator.rs), and
// the built-in variables of a 3-D grid of 3-D blocks read before and after a barrier.
struct SelftestParams {
    float scale;
    int n;
    const float* x;
    float* y;
    unsigned flags;
    double bias;
};

extern "C" __global__ void selftest_struct_arg(SelftestParams p, unsigned* __restrict__ ids) {
    const unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
    const unsigned g = bid * nthreads + tx;
    __syncthreads();  // the built-ins must still be this thread's after a switch
    const unsigned tx2 = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned bid2 = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    ids[g] = (tx2 == tx && bid2 == bid) ? g : 0xffffffffu;
    if ((int)g < p.n) p.y[g] = p.x[g] * p.scale + (float)p.bias + (float)(p.flags & 1u);
}
