// CUDA kernels of the residual joined to the next AdaLN, one pass over memory:
//   x_new = x + gate[seg] * y
//   h     = (x_new - mean) * rstd * (1 + scale[seg]) + shift[seg]
// h is computed from the fp32 x_new (before rounding to the output dtype).
// Backward, with xhat = (x_new - mean) * rstd and g = dh * (1 + scale[seg]), where x_new is
// re-formed in fp32 from x, y and gate (the rounded x_new loses a row's deviations from its
// mean when the mean dwarfs them, as in real residual streams):
//   dtot = dx_new + rstd * (g - mean(g) - xhat * mean(g * xhat))   (total gradient of x_new)
//   dx = dtot,  dy = dtot * gate[seg]
//   dgate[b] = sum dtot * y,  dshift[b] = sum dh,  dscale[b] = sum dh * xhat   (rows of image b)
#include "cuda/adaln_rows.cuh"

namespace nit {
namespace cuda {
namespace {

template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    residual_adaln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ y,
                              const T* __restrict__ gate, const T* __restrict__ shift,
                              const T* __restrict__ scale, Pack pack, int64_t D, float eps,
                              T* __restrict__ x_new, T* __restrict__ h, float* __restrict__ mean,
                              float* __restrict__ rstd) {
  __shared__ float red[3 * (kGroup / 32)];
  const int64_t row = group_row<kGroup>(pack.num_tokens);
  if (row < 0) return;
  const int lane = threadIdx.x % kGroup;
  const int seg = find_segment(pack.cu_seqlens, pack.num_seqs, row);
  const T* xr = x + row * D;
  const T* yr = y + row * D;
  const T* g = gate + int64_t(seg) * D;

  Welford w;
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float a[kVec], b[kVec], s[kVec], o[kVec];
    load_f32<kVec>(xr + c, a);
    load_f32<kVec>(yr + c, b);
    load_f32<kVec>(g + c, s);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      o[i] = a[i] + s[i] * b[i];
      w.add(o[i]);
    }
    store_f32<kVec>(x_new + row * D + c, o);
  }
  w = RowGroup<kGroup>::welford(w, red);
  const float mu = w.mean;
  const float rs = rsqrtf(w.var() + eps);

  // x_new is recomputed in fp32 from x, y and gate (cached reads) rather than re-read rounded.
  const T* sh = shift + int64_t(seg) * D;
  const T* sc = scale + int64_t(seg) * D;
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float a[kVec], b[kVec], s[kVec], m[kVec], k[kVec], o[kVec];
    load_f32<kVec>(xr + c, a);
    load_f32<kVec>(yr + c, b);
    load_f32<kVec>(g + c, s);
    load_f32<kVec>(sh + c, m);
    load_f32<kVec>(sc + c, k);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = (a[i] + s[i] * b[i] - mu) * rs * (1.f + k[i]) + m[i];
    store_f32<kVec>(h + row * D + c, o);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx, dy, and the column sums of (dtot * y, dh, dh * xhat) of every piece -> partial[slot][3][D].
template <typename T>
__global__ void __launch_bounds__(kColThreads)
    residual_adaln_bwd_chunks_kernel(const T* __restrict__ dx_new, const T* __restrict__ dh,
                                     const T* __restrict__ x, const T* __restrict__ y,
                                     const T* __restrict__ gate, const T* __restrict__ scale,
                                     const float* __restrict__ mean,
                                     const float* __restrict__ rstd,
                                     const float2* __restrict__ rowstat, Pack pack, int64_t D,
                                     int64_t R, T* __restrict__ dx, T* __restrict__ dy,
                                     float* __restrict__ partial) {
  const int64_t col = int64_t(blockIdx.y) * kColThreads + threadIdx.x;
  if (col >= D) return;
  float dgate = 0.f, dshift = 0.f, dscale = 0.f;
  walk_chunk(
      pack, R, blockIdx.x,
      [&](int64_t r, int seg) {
        const int64_t i = r * D + col;
        const float d = to_float(dh[i]);
        const float rs = rstd[r];
        const float yi = to_float(y[i]), gi = to_float(gate[int64_t(seg) * D + col]);
        const float xhat = (gated_residual_elem(to_float(x[i]), gi, yi) - mean[r]) * rs;
        const float g = d * (1.f + to_float(scale[int64_t(seg) * D + col]));
        const float2 st = rowstat[r];
        const float dtot = to_float(dx_new[i]) + layernorm_dx(g, xhat, rs, st.x, st.y);
        dx[i] = from_float<T>(dtot);
        dy[i] = from_float<T>(dtot * gi);
        dgate += dtot * yi;
        dshift += d;
        dscale += d * xhat;
      },
      [&](int64_t slot) {
        partial[(slot * 3 + 0) * D + col] = dgate;
        partial[(slot * 3 + 1) * D + col] = dshift;
        partial[(slot * 3 + 2) * D + col] = dscale;
        dgate = dshift = dscale = 0.f;
      });
}

}  // namespace

cudaError_t residual_adaln_fwd(DType dt, const void* x, const void* y, const void* gate,
                               const void* shift, const void* scale, Pack pack, int64_t D,
                               float eps, void* x_new, void* h, float* mean, float* rstd,
                               cudaStream_t stream) {
  NIT_DISPATCH_DTYPE(dt, T, {
    const bool vec = can_vectorize<T>(D, x, y, gate, shift, scale, x_new, h);
    return launch_rows<T>(pack.num_tokens, D, vec, [&](auto G, auto V, dim3 grid, dim3 block) {
      launch<residual_adaln_fwd_kernel<T, decltype(G)::value, decltype(V)::value>>(
          grid, block, 0, stream, static_cast<const T*>(x), static_cast<const T*>(y),
                                       static_cast<const T*>(gate), static_cast<const T*>(shift),
                                       static_cast<const T*>(scale), pack, D, eps,
                                       static_cast<T*>(x_new), static_cast<T*>(h), mean, rstd);
    });
  })
}

// rowstat (2 per row), then partial [num_slots][3][D].
int64_t residual_adaln_bwd_workspace(Pack pack, int64_t D) {
  const SlotLayout L = slot_layout(pack.num_tokens, pack.num_seqs);
  return 2 * pack.num_tokens + L.num_slots * 3 * D;
}

cudaError_t residual_adaln_bwd(DType dt, const void* dx_new, const void* dh, const void* x,
                               const void* y, const void* gate, const void* scale,
                               const float* mean, const float* rstd, Pack pack, int64_t D,
                               void* dx, void* dy, void* dgate, void* dshift, void* dscale,
                               float* workspace, cudaStream_t stream) {
  const SlotLayout L = slot_layout(pack.num_tokens, pack.num_seqs);
  float2* rowstat = reinterpret_cast<float2*>(workspace);
  float* partial = workspace + 2 * pack.num_tokens;
  cudaError_t err = cudaSuccess;
  NIT_DISPATCH_DTYPE(dt, T, {
    err = adaln_grad_rows<T>(static_cast<const T*>(dh), static_cast<const T*>(x),
                             static_cast<const T*>(y), static_cast<const T*>(gate),
                             static_cast<const T*>(scale), mean, rstd, pack, D, rowstat, stream);
    if (err != cudaSuccess) return err;
    if (pack.num_tokens > 0 && D > 0) {
      launch<residual_adaln_bwd_chunks_kernel<T>>(
          chunk_grid(L, D), kColThreads, 0, stream, static_cast<const T*>(dx_new), static_cast<const T*>(dh), static_cast<const T*>(x),
          static_cast<const T*>(y), static_cast<const T*>(gate), static_cast<const T*>(scale),
          mean, rstd, rowstat, pack, D, L.rows_per_chunk, static_cast<T*>(dx),
          static_cast<T*>(dy), partial);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  })
  void* outs[3] = {dgate, dshift, dscale};
  return slot_sums(dt, partial, 3, D, pack.cu_seqlens, pack.num_seqs, pack.num_tokens, L, outs,
                   stream);
}

}  // namespace cuda
}  // namespace nit
