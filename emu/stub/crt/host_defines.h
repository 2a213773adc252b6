/* Stub of CUDA's crt/host_defines.h for the emulator (emu/cuda_emu.h): lets the real
 * cuda_fp16.h / cuda_bf16.h / vector_types.h compile as plain host C++ with g++.
 * Only what those headers use in host mode is defined. */
#pragma once

#define __host__
#define __device__
#define __global__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __inline_hint__
#define __align__(n) __attribute__((aligned(n)))
#define __thread__ __thread
#define __import__
#define __export__
#define __cdecl
#define __annotate__(a) __attribute__((a))
#define __location__(a) __annotate__(a)
#define CUDARTAPI
#define CUDARTAPI_CDECL
#define __specialization_static
#define __builtin_align__(a) __align__(a)
#define __grid_constant__
#define __cudart_builtin__
#define __device_builtin__
#define __device_builtin_texture_type__
#define __device_builtin_surface_type__
#define __CUDA_ALIGN__(n) __attribute__((aligned(n)))
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
