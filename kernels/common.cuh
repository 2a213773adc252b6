// Small device helpers shared by several kernel files.
#pragma once

// splitmix64, bit-identical to crate::rng::splitmix64 (the counter-based hash behind the
// intervention noise and the sampler's uniforms).
static __device__ __forceinline__ unsigned long long pb_splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The float with bit pattern `u` (NVRTC has no INFINITY/NAN macros; a union works on the device
// and in the host emulator alike).
static __device__ __forceinline__ float pb_float_from_bits(unsigned int u) {
    union {
        unsigned int u;
        float f;
    } v;
    v.u = u;
    return v.f;
}
