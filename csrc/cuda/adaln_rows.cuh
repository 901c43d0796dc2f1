// Row pass of the modulated-LayerNorm backward, shared by adaln_modulate and residual_adaln:
// with xhat = (x - mean) * rstd and g = dy * (1 + scale[seg]),
//   rowstat[row] = (mean(g), mean(g * xhat))
// which the chunk pass turns into dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
// residual_adaln passes y and gate: the normalised input is then x + gate[seg] * y formed in
// fp32 (the rounded x_new would lose the row's deviations when its mean dwarfs them).
#pragma once
#include "common/adaln_math.h"
#include "cuda/packed_rows.cuh"

namespace nit {
namespace cuda {

// The LayerNorm input at column c of a row: x, or x + gate * y (residual_adaln, y != nullptr).
template <int kVec, typename T>
__device__ __forceinline__ void load_ln_input(const T* x, const T* y, const T* gate,
                                              float (&v)[kVec]) {
  load_f32<kVec>(x, v);
  if (y == nullptr) return;
  float b[kVec], s[kVec];
  load_f32<kVec>(y, b);
  load_f32<kVec>(gate, s);
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = gated_residual_elem(v[i], s[i], b[i]);
}

template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    adaln_grad_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                           const T* __restrict__ y, const T* __restrict__ gate,
                           const T* __restrict__ scale, const float* __restrict__ mean,
                           const float* __restrict__ rstd, Pack pack, int64_t D,
                           float2* __restrict__ rowstat) {
  __shared__ float red[2 * (kGroup / 32)];
  const int64_t row = group_row<kGroup>(pack.num_tokens);
  if (row < 0) return;
  const int lane = threadIdx.x % kGroup;
  const int seg = find_segment(pack.cu_seqlens, pack.num_seqs, row);
  const T* dyr = dy + row * D;
  const T* xr = x + row * D;
  const T* sc = scale + int64_t(seg) * D;
  const T* yr = y == nullptr ? nullptr : y + row * D;
  const T* gr = y == nullptr ? nullptr : gate + int64_t(seg) * D;
  const float mu = mean[row], rs = rstd[row];
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float d[kVec], v[kVec], s[kVec];
    load_f32<kVec>(dyr + c, d);
    load_ln_input<kVec>(xr + c, yr == nullptr ? nullptr : yr + c,
                        gr == nullptr ? nullptr : gr + c, v);
    load_f32<kVec>(sc + c, s);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float g = d[i] * (1.f + s[i]);
      acc.x += g;
      acc.y += g * ((v[i] - mu) * rs);
    }
  }
  acc = RowGroup<kGroup>::sum2(acc, red);
  if (lane == 0) rowstat[row] = make_float2(acc.x / float(D), acc.y / float(D));
}

// y, gate: nullptr for adaln_modulate; residual_adaln's y [N, D] and gate [B, D].
template <typename T>
inline cudaError_t adaln_grad_rows(const T* dy, const T* x, const T* y, const T* gate,
                                   const T* scale, const float* mean, const float* rstd, Pack pack,
                                   int64_t D, float2* rowstat, cudaStream_t stream) {
  const bool vec = y == nullptr ? can_vectorize<T>(D, dy, x, scale)
                                : can_vectorize<T>(D, dy, x, y, gate, scale);
  return launch_rows<T>(pack.num_tokens, D, vec, [&](auto G, auto V, dim3 grid, dim3 block) {
    launch<adaln_grad_rows_kernel<T, decltype(G)::value, decltype(V)::value>>(
        grid, block, 0, stream, dy, x, y, gate, scale, mean, rstd, pack, D, rowstat);
  });
}

}  // namespace cuda
}  // namespace nit
