// emu/cuda_emu.h — the CUDA device environment for kernels compiled as host C++.
//
// build/emu.rs force-includes this header (g++ -include) into every kernels/*.cu compiled for the
// emulated device (DESIGN.md section 6; the runtime and its design are in emu/runtime.cpp).
// It provides what a kernel sees on a GPU:
//   - the built-in variables threadIdx, blockIdx, blockDim, gridDim, warpSize: they read the
//     CURRENT fiber's values (every CUDA thread of a block is a fiber on one OS thread);
//   - __shared__ = static thread_local: one copy per OS thread, shared by the fibers of the block
//     that runs there; build/scan.rs rewrites each `extern __shared__ T name[];` into
//     `T* name = ::emu::dynamic_shared<T>(__func__);` (the block's dynamic shared memory);
//   - barriers, warp shuffles/votes/reductions (they are where fibers switch), atomics, fences;
//   - math intrinsics and the real cuda_fp16.h / cuda_bf16.h in host mode (stub headers in
//     emu/stub make them compile with g++), so bf16/fp16 rounding is the GPU's.
// Sync points take __FILE__/__LINE__ (through macros) so that a misuse is reported where it is.
// Not emulated: inline PTX (asm), wmma/mma, cp.async, clusters, texture/surface objects.
#pragma once

#define PATCHBAY_EMU 1

#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <math.h>
#include <type_traits>
#include <utility>

#include "crt/host_defines.h"  // emu/stub: __host__, __device__, __align__ ...
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// ---------------------------------------------------------------------------------------------
// Declaration specifiers
// ---------------------------------------------------------------------------------------------
// A function-local thread_local is implicitly static: the fibers of a block (one OS thread)
// share it, blocks running on other OS threads have their own. `static` gives namespace-scope
// shared variables internal linkage. `extern __shared__` declarations never reach the compiler:
// build/scan.rs rewrites them (see emu::dynamic_shared).
#define __shared__ static thread_local
#define __constant__
#define __managed__
#define __grid_constant__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __maxnreg__(n)
#define __builtin_assume(x) ((void)0)
// __restrict__ is a g++ keyword already; __forceinline__, __noinline__, __align__: emu/stub.

// ---------------------------------------------------------------------------------------------
// The emulator runtime (emu/runtime.cpp)
// ---------------------------------------------------------------------------------------------
namespace emu {
struct ThreadState;
}
// Set by the scheduler (emu/runtime.cpp): the running fiber's state, the block's dynamic shared memory.
extern __thread ::emu::ThreadState* patchbay_emu_current;
extern __thread unsigned char* patchbay_emu_dynamic_smem;

namespace emu {

/// What one CUDA thread sees; the scheduler points patchbay_emu_current at the running fiber's.
struct ThreadState {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

/// Warp collectives (the `op` of warp_op).
enum WarpOp : int {
    OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR,
    OP_BALLOT, OP_ANY, OP_ALL, OP_MATCH_ANY,
    OP_REDUCE_ADD, OP_REDUCE_MIN_U, OP_REDUCE_MAX_U, OP_REDUCE_MIN_I, OP_REDUCE_MAX_I,
    OP_REDUCE_AND, OP_REDUCE_OR, OP_REDUCE_XOR,
    OP_SYNCWARP,
};

/// Block barrier variants (the `op` of syncthreads).
enum BarrierOp : int { BAR_PLAIN, BAR_COUNT, BAR_AND, BAR_OR };

/// __syncthreads and its counting variants: returns the block-wide count/and/or of `pred`.
int syncthreads(const char* file, int line, int op, int pred);
/// Every lane of `mask` (the caller included) meets here; returns this lane's result.
uint64_t warp_op(const char* file, int line, int op, unsigned mask, uint64_t value, int arg, int width);
/// Lanes of the caller's warp that have not exited.
unsigned activemask();
/// Ends the launch with an error at file:line (assert, __trap, misuse).
[[noreturn]] void trap(const char* file, int line, const char* what);

template <class T>
inline T shfl(const char* file, int line, int op, unsigned mask, T var, int arg, int width = 32) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "warp shuffles move values of at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = warp_op(file, line, op, mask, bits, arg, width);
    T out = var;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

/// The block's dynamic shared memory, typed: what `extern __shared__ T name[];` becomes.
/// (`where` is the enclosing function's __func__: the declaration must be inside a function.)
template <class T>
inline T* dynamic_shared(const char* where) {
    (void)where;
    return reinterpret_cast<T*>(patchbay_emu_dynamic_smem);
}

template <class T>
inline uint64_t bits_of(T v) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}

inline unsigned reduce_add(const char* f, int l, unsigned m, unsigned v) { return (unsigned)warp_op(f, l, OP_REDUCE_ADD, m, v, 0, 32); }
inline int reduce_add(const char* f, int l, unsigned m, int v) { return (int)warp_op(f, l, OP_REDUCE_ADD, m, (unsigned)v, 0, 32); }
inline unsigned reduce_min(const char* f, int l, unsigned m, unsigned v) { return (unsigned)warp_op(f, l, OP_REDUCE_MIN_U, m, v, 0, 32); }
inline int reduce_min(const char* f, int l, unsigned m, int v) { return (int)warp_op(f, l, OP_REDUCE_MIN_I, m, (unsigned)v, 0, 32); }
inline unsigned reduce_max(const char* f, int l, unsigned m, unsigned v) { return (unsigned)warp_op(f, l, OP_REDUCE_MAX_U, m, v, 0, 32); }
inline int reduce_max(const char* f, int l, unsigned m, int v) { return (int)warp_op(f, l, OP_REDUCE_MAX_I, m, (unsigned)v, 0, 32); }

// --- Kernel entry thunks: build/emu.rs generates `{"name", &emu::thunk<&name>, emu::arity(&name)}`
// for every `extern "C" __global__` entry point; the parameter types come from the function type,
// so nothing has to parse them. Each CUDA thread calls the thunk, i.e. gets its own copy of the
// arguments (as on a GPU).
template <class T>
inline T load_arg(void* p) {
    static_assert(std::is_trivially_copyable<T>::value, "kernel parameters must be trivially copyable");
    alignas(T) unsigned char buf[sizeof(T)];
    std::memcpy(buf, p, sizeof(T));  // the argument slot may be less aligned than T
    return *reinterpret_cast<T*>(buf);
}
template <class... A, std::size_t... I>
inline void invoke(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(load_arg<typename std::remove_cv<A>::type>(args[I])...);
}
template <class... A>
constexpr unsigned arity(void (*)(A...)) { return sizeof...(A); }
template <auto F>
void thunk(void** args) {
    invoke(F, args, std::make_index_sequence<arity(F)>());
}

}  // namespace emu

/// A kernel entry point as build/emu.rs registers it (same layout in src/backend/emu.rs).
struct patchbay_emu_entry {
    const char* name;
    void (*thunk)(void**);
    unsigned nparams;
    const char* file;
};


// ---------------------------------------------------------------------------------------------
// Built-in variables
// ---------------------------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(patchbay_emu_current->thread_idx))
#define blockIdx (static_cast<const uint3&>(patchbay_emu_current->block_idx))
#define blockDim (static_cast<const dim3&>(patchbay_emu_current->block_dim))
#define gridDim (static_cast<const dim3&>(patchbay_emu_current->grid_dim))
#define warpSize 32

// ---------------------------------------------------------------------------------------------
// Synchronisation (fibers switch here; file:line says where a misuse happened)
// ---------------------------------------------------------------------------------------------
#define __syncthreads() ((void)::emu::syncthreads(__FILE__, __LINE__, ::emu::BAR_PLAIN, 0))
#define __syncthreads_count(p) ::emu::syncthreads(__FILE__, __LINE__, ::emu::BAR_COUNT, (p) ? 1 : 0)
#define __syncthreads_and(p) ::emu::syncthreads(__FILE__, __LINE__, ::emu::BAR_AND, (p) ? 1 : 0)
#define __syncthreads_or(p) ::emu::syncthreads(__FILE__, __LINE__, ::emu::BAR_OR, (p) ? 1 : 0)
#define __syncwarp(...) ((void)::emu::warp_op(__FILE__, __LINE__, ::emu::OP_SYNCWARP, ::patchbay_emu_mask(__VA_ARGS__), 0, 0, 32))
inline unsigned patchbay_emu_mask() { return 0xffffffffu; }
inline unsigned patchbay_emu_mask(unsigned m) { return m; }

#define __shfl_sync(mask, var, ...) ::emu::shfl(__FILE__, __LINE__, ::emu::OP_SHFL_IDX, (mask), (var), __VA_ARGS__)
#define __shfl_up_sync(mask, var, ...) ::emu::shfl(__FILE__, __LINE__, ::emu::OP_SHFL_UP, (mask), (var), __VA_ARGS__)
#define __shfl_down_sync(mask, var, ...) ::emu::shfl(__FILE__, __LINE__, ::emu::OP_SHFL_DOWN, (mask), (var), __VA_ARGS__)
#define __shfl_xor_sync(mask, var, ...) ::emu::shfl(__FILE__, __LINE__, ::emu::OP_SHFL_XOR, (mask), (var), __VA_ARGS__)
#define __ballot_sync(mask, p) ((unsigned)::emu::warp_op(__FILE__, __LINE__, ::emu::OP_BALLOT, (mask), (p) ? 1 : 0, 0, 32))
#define __any_sync(mask, p) ((int)::emu::warp_op(__FILE__, __LINE__, ::emu::OP_ANY, (mask), (p) ? 1 : 0, 0, 32))
#define __all_sync(mask, p) ((int)::emu::warp_op(__FILE__, __LINE__, ::emu::OP_ALL, (mask), (p) ? 1 : 0, 0, 32))
#define __match_any_sync(mask, v) ((unsigned)::emu::warp_op(__FILE__, __LINE__, ::emu::OP_MATCH_ANY, (mask), ::emu::bits_of(v), 0, 32))
#define __reduce_add_sync(mask, v) ::emu::reduce_add(__FILE__, __LINE__, (mask), (v))
#define __reduce_min_sync(mask, v) ::emu::reduce_min(__FILE__, __LINE__, (mask), (v))
#define __reduce_max_sync(mask, v) ::emu::reduce_max(__FILE__, __LINE__, (mask), (v))
#define __reduce_and_sync(mask, v) ((unsigned)::emu::warp_op(__FILE__, __LINE__, ::emu::OP_REDUCE_AND, (mask), (unsigned)(v), 0, 32))
#define __reduce_or_sync(mask, v) ((unsigned)::emu::warp_op(__FILE__, __LINE__, ::emu::OP_REDUCE_OR, (mask), (unsigned)(v), 0, 32))
#define __reduce_xor_sync(mask, v) ((unsigned)::emu::warp_op(__FILE__, __LINE__, ::emu::OP_REDUCE_XOR, (mask), (unsigned)(v), 0, 32))
#define __activemask() ::emu::activemask()

#undef assert
#define assert(e) ((e) ? (void)0 : ::emu::trap(__FILE__, __LINE__, "assertion failed: " #e))
#define __trap() ::emu::trap(__FILE__, __LINE__, "__trap()")
#define __brkpt() ::emu::trap(__FILE__, __LINE__, "__brkpt()")

// Memory fences: blocks run on several OS threads, so these are real fences.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }

// ---------------------------------------------------------------------------------------------
// Atomics: real atomics (blocks of a grid run concurrently on several OS threads); relaxed
// ordering as on the GPU. Floating-point adds are compare-and-swap loops.
// ---------------------------------------------------------------------------------------------
namespace emu {
template <class T, class U, class F>
inline T atomic_update(T* p, F f) {
    static_assert(sizeof(T) == sizeof(U), "bit-width mismatch");
    U* q = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(q, __ATOMIC_RELAXED);
    for (;;) {
        T oldv, newv;
        std::memcpy(&oldv, &old, sizeof(T));
        newv = f(oldv);
        U nb;
        std::memcpy(&nb, &newv, sizeof(T));
        if (__atomic_compare_exchange_n(q, &old, nb, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return oldv;
    }
}
}  // namespace emu

#define PATCHBAY_EMU_ATOMIC_INT(T)                                                                        \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                 \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }               \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                 \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                   \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                 \
    inline T atomicMin(T* p, T v) { return ::emu::atomic_update<T, T>(p, [v](T o) { return o < v ? o : v; }); } \
    inline T atomicMax(T* p, T v) { return ::emu::atomic_update<T, T>(p, [v](T o) { return o > v ? o : v; }); } \
    inline T atomicCAS(T* p, T cmp, T v) {                                                                \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);              \
        return cmp;                                                                                       \
    }
PATCHBAY_EMU_ATOMIC_INT(int)
PATCHBAY_EMU_ATOMIC_INT(unsigned int)
PATCHBAY_EMU_ATOMIC_INT(long long int)
PATCHBAY_EMU_ATOMIC_INT(unsigned long long int)
#undef PATCHBAY_EMU_ATOMIC_INT
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline unsigned atomicInc(unsigned* p, unsigned lim) {
    return ::emu::atomic_update<unsigned, unsigned>(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned lim) {
    return ::emu::atomic_update<unsigned, unsigned>(p, [lim](unsigned o) { return (o == 0 || o > lim) ? lim : o - 1; });
}
inline float atomicExch(float* p, float v) { return ::emu::atomic_update<float, uint32_t>(p, [v](float) { return v; }); }
inline float atomicAdd(float* p, float v) { return ::emu::atomic_update<float, uint32_t>(p, [v](float o) { return o + v; }); }
inline double atomicAdd(double* p, double v) { return ::emu::atomic_update<double, uint64_t>(p, [v](double o) { return o + v; }); }
inline __half atomicAdd(__half* p, __half v) { return ::emu::atomic_update<__half, uint16_t>(p, [v](__half o) { return __hadd(o, v); }); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
    return ::emu::atomic_update<__nv_bfloat16, uint16_t>(p, [v](__nv_bfloat16 o) { return __hadd(o, v); });
}
inline __half2 atomicAdd(__half2* p, __half2 v) { return ::emu::atomic_update<__half2, uint32_t>(p, [v](__half2 o) { return __hadd2(o, v); }); }
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* p, __nv_bfloat162 v) {
    return ::emu::atomic_update<__nv_bfloat162, uint32_t>(p, [v](__nv_bfloat162 o) { return __hadd2(o, v); });
}
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin
#define atomicCAS_block atomicCAS
#define atomicExch_block atomicExch

// ---------------------------------------------------------------------------------------------
// Loads/stores with cache hints: plain accesses here.
// ---------------------------------------------------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------------
// Math intrinsics. The fast approximations (__expf, __logf, __fdividef...) are computed
// exactly here: results agree with the GPU to a few ulp, not bit for bit.
// ---------------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return (float)(1.0 / sqrt((double)x)); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline long long __double_as_longlong(double x) { long long u; std::memcpy(&u, &x, 8); return u; }
inline double __longlong_as_double(long long u) { double x; std::memcpy(&x, &u, 8); return x; }

namespace emu {
// cvt.rni/rzi/rmi/rpi.s32.f32 saturate and map NaN to 0.
template <class I>
inline I float_to_int(float r) {
    if (r != r) return 0;
    if (r <= (float)std::numeric_limits<I>::min()) return std::numeric_limits<I>::min();
    if (r >= (float)std::numeric_limits<I>::max()) return std::numeric_limits<I>::max();
    return (I)r;
}
}  // namespace emu
inline int __float2int_rn(float x) { return ::emu::float_to_int<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return ::emu::float_to_int<int>(truncf(x)); }
inline int __float2int_rd(float x) { return ::emu::float_to_int<int>(floorf(x)); }
inline int __float2int_ru(float x) { return ::emu::float_to_int<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return ::emu::float_to_int<unsigned>(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return ::emu::float_to_int<unsigned>(truncf(x)); }
inline long long __float2ll_rn(float x) { return ::emu::float_to_int<long long>(nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return ::emu::float_to_int<long long>(truncf(x)); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
    return (unsigned)(((((uint64_t)hi << 32) | lo) << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
    return (unsigned)((((uint64_t)hi << 32) | lo) >> (s & 31));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned s) {
    return (unsigned)(((((uint64_t)hi << 32) | lo) << (s > 32 ? 32 : s)) >> 32);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned s) {
    return (unsigned)((((uint64_t)hi << 32) | lo) >> (s > 32 ? 32 : s));
}
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __mul24(int a, int b) { return (int)((((a << 8) >> 8) * (long long)((b << 8) >> 8))); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __hadd(int a, int b) { return (int)(((long long)a + b) >> 1); }
inline int __rhadd(int a, int b) { return (int)(((long long)a + b + 1) >> 1); }
inline unsigned __uhadd(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a + b) >> 1); }
inline unsigned __urhadd(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a + b + 1) >> 1); }

// min/max: the overload set of CUDA's math_functions.hpp, so that a call resolves as in NVRTC.
#define PATCHBAY_EMU_MINMAX(R, A, B)                          \
    inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; } \
    inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }
PATCHBAY_EMU_MINMAX(int, int, int)
PATCHBAY_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
PATCHBAY_EMU_MINMAX(unsigned int, int, unsigned int)
PATCHBAY_EMU_MINMAX(unsigned int, unsigned int, int)
PATCHBAY_EMU_MINMAX(long, long, long)
PATCHBAY_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
PATCHBAY_EMU_MINMAX(unsigned long, long, unsigned long)
PATCHBAY_EMU_MINMAX(unsigned long, unsigned long, long)
PATCHBAY_EMU_MINMAX(long long, long long, long long)
PATCHBAY_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
PATCHBAY_EMU_MINMAX(unsigned long long, long long, unsigned long long)
PATCHBAY_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef PATCHBAY_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// ---------------------------------------------------------------------------------------------
// bf16 / fp16 functions that cuda_bf16.h / cuda_fp16.h declare for device code only. Computed
// in float (double for fma: single rounding to the 8/11-bit mantissa) and rounded to nearest.
// ---------------------------------------------------------------------------------------------
#define PATCHBAY_EMU_H(T, TO, FROM)                                                                      \
    inline T __hfma(T a, T b, T c) { return TO((float)fma((double)FROM(a), (double)FROM(b), (double)FROM(c))); } \
    inline T __hfma_relu(T a, T b, T c) {                                                                  \
        float r = (float)fma((double)FROM(a), (double)FROM(b), (double)FROM(c));                            \
        return TO(r != r ? r : (r < 0.0f ? 0.0f : r));                                                     \
    }                                                                                                      \
    inline T hexp(T a) { return TO(expf(FROM(a))); }                                                       \
    inline T hexp2(T a) { return TO(exp2f(FROM(a))); }                                                     \
    inline T hexp10(T a) { return TO(exp10f(FROM(a))); }                                                   \
    inline T hlog(T a) { return TO(logf(FROM(a))); }                                                       \
    inline T hlog2(T a) { return TO(log2f(FROM(a))); }                                                     \
    inline T hlog10(T a) { return TO(log10f(FROM(a))); }                                                   \
    inline T hsqrt(T a) { return TO(sqrtf(FROM(a))); }                                                     \
    inline T hrsqrt(T a) { return TO(1.0f / sqrtf(FROM(a))); }                                             \
    inline T hrcp(T a) { return TO(1.0f / FROM(a)); }                                                      \
    inline T hsin(T a) { return TO(sinf(FROM(a))); }                                                       \
    inline T hcos(T a) { return TO(cosf(FROM(a))); }                                                       \
    inline T htanh(T a) { return TO(tanhf(FROM(a))); }
PATCHBAY_EMU_H(__nv_bfloat16, __float2bfloat16_rn, __bfloat162float)
PATCHBAY_EMU_H(__half, __float2half_rn, __half2float)
#undef PATCHBAY_EMU_H
#define PATCHBAY_EMU_H2(T2, T, F2, FROM2, TO2)                                                                  \
    inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }            \
    inline T2 __hfma2_relu(T2 a, T2 b, T2 c) { return T2(__hfma_relu(a.x, b.x, c.x), __hfma_relu(a.y, b.y, c.y)); } \
    inline T2 h2exp(T2 a) { return T2(hexp(a.x), hexp(a.y)); }                                                 \
    inline T2 h2log(T2 a) { return T2(hlog(a.x), hlog(a.y)); }                                                 \
    inline T2 h2sqrt(T2 a) { return T2(hsqrt(a.x), hsqrt(a.y)); }                                              \
    inline T2 h2rsqrt(T2 a) { return T2(hrsqrt(a.x), hrsqrt(a.y)); }                                           \
    inline T2 h2rcp(T2 a) { return T2(hrcp(a.x), hrcp(a.y)); }
PATCHBAY_EMU_H2(__nv_bfloat162, __nv_bfloat16, float2, __bfloat1622float2, __float22bfloat162_rn)
PATCHBAY_EMU_H2(__half2, __half, float2, __half22float2, __float22half2_rn)
#undef PATCHBAY_EMU_H2
inline int __bfloat162int_rn(__nv_bfloat16 h) { return __float2int_rn(__bfloat162float(h)); }
inline int __half2int_rn(__half h) { return __float2int_rn(__half2float(h)); }
