// Arguments of attention_f32 / attention_pattern_f32 (kernels/attention.cu), passed by value.
// Mirrored field for field by `AttnArgs` in src/backend/ops/attention.rs (#[repr(C)], 128 bytes,
// no padding); build/layout.rs checks both sides' field offsets against this definition.
#pragma once

#include <cuda_bf16.h>

struct AttnArgs {
    const float* q;                  // [T, H, dh] rotated queries
    const __nv_bfloat16* k_cache;    // [n_slots, KV, dh]
    const __nv_bfloat16* v_cache;    // [n_slots, KV, dh]
    const int* q_start;              // [S + 1] first row of each sequence; q_start[S] = T
    const int* pos0;                 // [S] absolute position of each sequence's first row
    const int* block_table;          // [S, max_blocks] cache block of each block of positions
    float* z;                        // [T, H, dh] output
    int S;
    int H;
    int KV;
    int dh;
    int block_size;
    int max_blocks;
    int n_slots;                     // cache capacity in slots: a table entry outside it reads zeros
    float scale;                     // softmax scale
    float softcap;                   // 0 = none, else s = cap * tanh(s / cap) after scaling
    int sliding_window;              // 0 = full causal, else keys j with p - sliding_window < j <= p
    const int* pat_row;              // [n_pat] batch row of each captured pattern
    const int* pat_head;             // [n_pat] query head of each captured pattern
    float* pat_out;                  // [n_pat, n_keys] probabilities, zero outside the visible keys
    int n_pat;
    int n_keys;
};

static_assert(sizeof(AttnArgs) == 128, "AttnArgs must stay 128 bytes without padding (Rust mirror)");
