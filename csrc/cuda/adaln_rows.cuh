// Row pass of the modulated-LayerNorm backward, shared by adaln_modulate and residual_adaln:
// with xhat = (x - mean) * rstd and g = dy * (1 + scale[seg]),
//   rowstat[row] = (mean(g), mean(g * xhat))
// which the chunk pass turns into dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
#pragma once
#include "cuda/packed_rows.cuh"

namespace nit {
namespace cuda {

template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    adaln_grad_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x,
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
  const float mu = mean[row], rs = rstd[row];
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float d[kVec], v[kVec], s[kVec];
    load_f32<kVec>(dyr + c, d);
    load_f32<kVec>(xr + c, v);
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

template <typename T>
inline cudaError_t adaln_grad_rows(const T* dy, const T* x, const T* scale, const float* mean,
                                   const float* rstd, Pack pack, int64_t D, float2* rowstat,
                                   cudaStream_t stream) {
  const bool vec = can_vectorize<T>(D, dy, x, scale);
  return launch_rows<T>(pack.num_tokens, D, vec, [&](auto G, auto V, dim3 grid, dim3 block) {
    launch<adaln_grad_rows_kernel<T, decltype(G)::value, decltype(V)::value>>(
        grid, block, 0, stream, dy, x, scale, mean, rstd, pack, D, rowstat);
  });
}

}  // namespace cuda
}  // namespace nit
