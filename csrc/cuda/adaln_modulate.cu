// CUDA kernels of packed AdaLN modulation:
//   y = (x - mean) * rstd * (1 + scale[seg]) + shift[seg],  rstd = 1/sqrt(var + eps)
// over rows of x [N, D], with the image's shift/scale rows [B, D] gathered by segment.
// Backward, with xhat = (x - mean) * rstd and g = dy * (1 + scale[seg]):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   dshift[b] = sum_{rows of b} dy,  dscale[b] = sum_{rows of b} dy * xhat
// The backward runs a row pass (the two row means), a chunk pass (dx and per-piece column sums)
// and slot_sums (per-image totals in a fixed order: deterministic, no atomics).
#include "cuda/adaln_rows.cuh"

namespace nit {
namespace cuda {
namespace {

template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    adaln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                     const T* __restrict__ scale, Pack pack, int64_t D, float eps,
                     T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
  __shared__ float red[3 * (kGroup / 32)];
  const int64_t row = group_row<kGroup>(pack.num_tokens);
  if (row < 0) return;
  const int lane = threadIdx.x % kGroup;
  const T* xr = x + row * D;

  Welford w;
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float v[kVec];
    load_f32<kVec>(xr + c, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) w.add(v[i]);
  }
  w = RowGroup<kGroup>::welford(w, red);
  const float mu = w.mean;
  const float rs = rsqrtf(w.var() + eps);

  // Second read of the row: it was just loaded by this group, so it comes from L1/L2.
  const int seg = find_segment(pack.cu_seqlens, pack.num_seqs, row);
  const T* sh = shift + int64_t(seg) * D;
  const T* sc = scale + int64_t(seg) * D;
  T* yr = y + row * D;
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float v[kVec], a[kVec], s[kVec], o[kVec];
    load_f32<kVec>(xr + c, v);
    load_f32<kVec>(sh + c, a);
    load_f32<kVec>(sc + c, s);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = (v[i] - mu) * rs * (1.f + s[i]) + a[i];
    store_f32<kVec>(yr + c, o);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx, and the column sums of (dy, dy * xhat) of every piece of this chunk -> partial[slot][2][D].
template <typename T>
__global__ void __launch_bounds__(kColThreads)
    adaln_bwd_chunks_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                            const T* __restrict__ scale, const float* __restrict__ mean,
                            const float* __restrict__ rstd, const float2* __restrict__ rowstat,
                            Pack pack, int64_t D, int64_t R, T* __restrict__ dx,
                            float* __restrict__ partial) {
  const int64_t col = int64_t(blockIdx.y) * kColThreads + threadIdx.x;
  if (col >= D) return;
  float dshift = 0.f, dscale = 0.f;
  walk_chunk(
      pack, R, blockIdx.x,
      [&](int64_t r, int seg) {
        const float d = to_float(dy[r * D + col]);
        const float rs = rstd[r];
        const float xhat = (to_float(x[r * D + col]) - mean[r]) * rs;
        const float g = d * (1.f + to_float(scale[int64_t(seg) * D + col]));
        const float2 st = rowstat[r];
        dx[r * D + col] = from_float<T>(layernorm_dx(g, xhat, rs, st.x, st.y));
        dshift += d;
        dscale += d * xhat;
      },
      [&](int64_t slot) {
        partial[(slot * 2 + 0) * D + col] = dshift;
        partial[(slot * 2 + 1) * D + col] = dscale;
        dshift = dscale = 0.f;
      });
}

}  // namespace

cudaError_t adaln_modulate_fwd(DType dt, const void* x, const void* shift, const void* scale,
                               Pack pack, int64_t D, float eps, void* y, float* mean,
                               float* rstd, cudaStream_t stream) {
  NIT_DISPATCH_DTYPE(dt, T, {
    const bool vec = can_vectorize<T>(D, x, shift, scale, y);
    return launch_rows<T>(pack.num_tokens, D, vec, [&](auto G, auto V, dim3 grid, dim3 block) {
      launch<adaln_fwd_kernel<T, decltype(G)::value, decltype(V)::value>>(
          grid, block, 0, stream, static_cast<const T*>(x), static_cast<const T*>(shift), static_cast<const T*>(scale),
          pack, D, eps, static_cast<T*>(y), mean, rstd);
    });
  })
}

// rowstat (2 per row), then partial [num_slots][2][D].
int64_t adaln_modulate_bwd_workspace(Pack pack, int64_t D) {
  const SlotLayout L = slot_layout(pack.num_tokens, pack.num_seqs);
  return 2 * pack.num_tokens + L.num_slots * 2 * D;
}

cudaError_t adaln_modulate_bwd(DType dt, const void* dy, const void* x, const void* scale,
                               const float* mean, const float* rstd, Pack pack, int64_t D,
                               void* dx, void* dshift, void* dscale, float* workspace,
                               cudaStream_t stream) {
  const SlotLayout L = slot_layout(pack.num_tokens, pack.num_seqs);
  float2* rowstat = reinterpret_cast<float2*>(workspace);
  float* partial = workspace + 2 * pack.num_tokens;
  cudaError_t err = cudaSuccess;
  NIT_DISPATCH_DTYPE(dt, T, {
    err = adaln_grad_rows<T>(static_cast<const T*>(dy), static_cast<const T*>(x), nullptr, nullptr,
                             static_cast<const T*>(scale), mean, rstd, pack, D, rowstat, stream);
    if (err != cudaSuccess) return err;
    if (pack.num_tokens > 0 && D > 0) {
      launch<adaln_bwd_chunks_kernel<T>>(
          chunk_grid(L, D), kColThreads, 0, stream, static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(scale),
          mean, rstd, rowstat, pack, D, L.rows_per_chunk, static_cast<T*>(dx), partial);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  })
  void* outs[2] = {dshift, dscale};
  return slot_sums(dt, partial, 2, D, pack.cu_seqlens, pack.num_seqs, pack.num_tokens, L, outs,
                   stream);
}

}  // namespace cuda
}  // namespace nit
