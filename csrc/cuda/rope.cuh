// Axial 2D RoPE angles on the GPU, from the token index and the pack (no cos/sin table).
// Pair i of a head (dims 2i, 2i+1; 0 <= i < Dh/2) rotates with axis 0 for i < Dh/4 and axis 1
// otherwise; freqs [2, Dh/4] flattened is indexed by i directly.
#pragma once
#include "common/rope_math.h"
#include "cuda/cuda_common.cuh"

namespace nit {
namespace cuda {

struct TokenPos {
  float p0, p1;
};

// Positions (p0, p1) of packed token `row` (see rope_positions for the two modes).
__device__ __forceinline__ TokenPos token_position(const Pack& pack, const RopeArgs& rope,
                                                   int64_t row) {
  const int seg = find_segment(pack.cu_seqlens, pack.num_seqs, row);
  int64_t t = row - pack.cu_seqlens[seg];
  t = t < 0 ? 0 : t;
  // sizes are validated on the host; max(., 1) keeps a corrupt table from dividing by zero
  const int64_t h = max(rope.sizes[2 * seg], 1), w = max(rope.sizes[2 * seg + 1], 1);
  TokenPos p;
  rope_positions(t, h, w, rope.official, &p.p0, &p.p1);
  return p;
}

// cos and sin (without mscale) of pair i's angle p * freqs[axis][i mod Dh/4].
__device__ __forceinline__ void pair_cos_sin(const TokenPos& pos, const float* __restrict__ freqs,
                                             int64_t quarter, int64_t i, float* c, float* s) {
  const float p = i < quarter ? pos.p0 : pos.p1;
  const float angle = p * freqs[i];  // one fp32 rounding, as the reference
  accurate_sincos(angle, c, s);
}

}  // namespace cuda
}  // namespace nit
