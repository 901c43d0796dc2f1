// CUDA kernels of the packed AdaLN ops (math: common/adaln_math.h):
//
//   adaln_modulate:  y = (x - mean) * rstd * (1 + scale[seg]) + shift[seg],  rstd = 1/sqrt(var + eps)
//   residual_adaln:  x_new = x + gate[seg] * y;  h = the same modulated LayerNorm of x_new, computed
//                    from the fp32 x_new (before rounding to the output dtype)
//
// over rows [N, D], with the image's rows [B, D] (shift, scale, gate) gathered by segment. Both
// share the row passes below: the forward (Welford statistics, then the modulated output) and the
// first pass of the backward (two row means). residual_adaln's backward re-forms x_new in fp32
// from x, y and gate: the rounded x_new loses a row's deviations from its mean when the mean
// dwarfs them, as in real residual streams.
//
// Backward, with u = x or x_new, xhat = (u - mean) * rstd and g = dy * (1 + scale[seg]):
//   du = rstd * (g - mean(g) - xhat * mean(g * xhat))   (+ dx_new for residual_adaln)
//   adaln_modulate: dx = du
//   residual_adaln: dx = du,  dy = du * gate[seg],  dgate[b] = sum du * y
//   dshift[b] = sum dy (or dh),  dscale[b] = sum dy * xhat   (over the rows of image b)
// Each backward runs the row pass (the two row means), a chunk pass (dx and per-piece column
// sums) and slot_sums (per-image totals in a fixed order: deterministic, no atomics).
#include "cuda/packed_rows.cuh"

namespace nit {
namespace cuda {

// ---- row passes shared by adaln_modulate and residual_adaln -----------------------------------
// The LayerNorm input u of one row: x, or x + gate[seg] * y (residual_adaln, y != nullptr),
// read kVec columns at a time.
template <typename T>
struct LnInput {
  const T* x;
  const T* y;
  const T* gate;

  __device__ __forceinline__ LnInput(const T* x_, const T* y_, const T* gate_, int64_t row,
                                     int seg, int64_t D)
      : x(x_ + row * D),
        y(y_ == nullptr ? nullptr : y_ + row * D),
        gate(y_ == nullptr ? nullptr : gate_ + int64_t(seg) * D) {}

  template <int kVec>
  __device__ __forceinline__ void load(int64_t c, float (&v)[kVec]) const {
    load_f32<kVec>(x + c, v);
    if (y == nullptr) return;
    float b[kVec], s[kVec];
    load_f32<kVec>(y + c, b);
    load_f32<kVec>(gate + c, s);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = gated_residual_elem(v[i], s[i], b[i]);
  }
};

// One row per group: Welford statistics of u in one pass (x_new written on the way when
// x_new != nullptr), then h from a second, cached read of the row.
template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    adaln_fwd_rows_kernel(const T* __restrict__ x, const T* __restrict__ y,
                          const T* __restrict__ gate, const T* __restrict__ shift,
                          const T* __restrict__ scale, Pack pack, int64_t D, float eps,
                          T* __restrict__ x_new, T* __restrict__ h, float* __restrict__ mean,
                          float* __restrict__ rstd) {
  __shared__ float red[3 * (kGroup / 32)];
  const int64_t row = group_row<kGroup>(pack.num_tokens);
  if (row < 0) return;
  const int lane = threadIdx.x % kGroup;
  const int seg = find_segment(pack.cu_seqlens, pack.num_seqs, row);
  const LnInput<T> u(x, y, gate, row, seg, D);

  Welford w;
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float v[kVec];
    u.load(c, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) w.add(v[i]);
    if (x_new != nullptr) store_f32<kVec>(x_new + row * D + c, v);
  }
  w = RowGroup<kGroup>::welford(w, red);
  const float mu = w.mean;
  const float rs = rsqrtf(w.var() + eps);

  // u is formed again in fp32 from cached reads rather than re-read rounded from x_new.
  const T* sh = shift + int64_t(seg) * D;
  const T* sc = scale + int64_t(seg) * D;
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float v[kVec], a[kVec], s[kVec], o[kVec];
    u.load(c, v);
    load_f32<kVec>(sh + c, a);
    load_f32<kVec>(sc + c, s);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = adaln_modulate_elem(ln_normalize(v[i], mu, rs), 1.f + s[i], a[i]);
    store_f32<kVec>(h + row * D + c, o);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
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
  const T* sc = scale + int64_t(seg) * D;
  const LnInput<T> u(x, y, gate, row, seg, D);
  const float mu = mean[row], rs = rstd[row];
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float d[kVec], v[kVec], s[kVec];
    load_f32<kVec>(dyr + c, d);
    u.load(c, v);
    load_f32<kVec>(sc + c, s);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float g = d[i] * (1.f + s[i]);
      acc.x += g;
      acc.y += g * ln_normalize(v[i], mu, rs);
    }
  }
  acc = RowGroup<kGroup>::sum2(acc, red);
  if (lane == 0) rowstat[row] = make_float2(acc.x / float(D), acc.y / float(D));
}

// y, gate, x_new: nullptr for adaln_modulate; residual_adaln's y [N, D], gate [B, D] and
// x_new [N, D].
template <typename T>
inline cudaError_t adaln_fwd_rows(const T* x, const T* y, const T* gate, const T* shift,
                                  const T* scale, Pack pack, int64_t D, float eps, T* x_new, T* h,
                                  float* mean, float* rstd, cudaStream_t stream) {
  const bool vec = y == nullptr ? can_vectorize<T>(D, x, shift, scale, h)
                                : can_vectorize<T>(D, x, y, gate, shift, scale, x_new, h);
  return launch_rows<T>(pack.num_tokens, D, vec, [&](auto G, auto V, dim3 grid, dim3 block) {
    launch<adaln_fwd_rows_kernel<T, decltype(G)::value, decltype(V)::value>>(
        grid, block, 0, stream, x, y, gate, shift, scale, pack, D, eps, x_new, h, mean, rstd);
  });
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

// The chunk pass of the backward: dx (with residual_adaln, y != nullptr: dx = dx_new + du and
// dy_out = dx * gate), and the column sums of every piece of this chunk -> partial[slot][V][D]:
// V = 2, (dshift, dscale), for adaln_modulate; V = 3, (dgate, dshift, dscale), for residual_adaln.
template <typename T>
__global__ void __launch_bounds__(kColThreads)
    adaln_bwd_chunks_kernel(const T* __restrict__ dx_new, const T* __restrict__ dy,
                            const T* __restrict__ x, const T* __restrict__ y,
                            const T* __restrict__ gate, const T* __restrict__ scale,
                            const float* __restrict__ mean, const float* __restrict__ rstd,
                            const float2* __restrict__ rowstat, Pack pack, int64_t D, int64_t R,
                            T* __restrict__ dx, T* __restrict__ dy_out,
                            float* __restrict__ partial) {
  const int64_t col = int64_t(blockIdx.y) * kColThreads + threadIdx.x;
  if (col >= D) return;
  const bool residual = y != nullptr;
  float dgate = 0.f, dshift = 0.f, dscale = 0.f;
  walk_chunk(
      pack, R, blockIdx.x,
      [&](int64_t r, int seg) {
        const int64_t i = r * D + col;
        const float d = to_float(dy[i]);
        const float rs = rstd[r];
        const float yi = residual ? to_float(y[i]) : 0.f;
        const float gi = residual ? to_float(gate[int64_t(seg) * D + col]) : 0.f;
        const float u = residual ? gated_residual_elem(to_float(x[i]), gi, yi) : to_float(x[i]);
        const float xhat = ln_normalize(u, mean[r], rs);
        const float g = d * (1.f + to_float(scale[int64_t(seg) * D + col]));
        const float2 st = rowstat[r];
        const float du = ln_backward_elem(g, xhat, rs, st.x, st.y);
        if (residual) {
          const float dtot = to_float(dx_new[i]) + du;  // the total gradient of x_new
          dx[i] = from_float<T>(dtot);
          dy_out[i] = from_float<T>(dtot * gi);
          dgate += dtot * yi;
        } else {
          dx[i] = from_float<T>(du);
        }
        dshift += d;
        dscale += d * xhat;
      },
      [&](int64_t slot) {
        float* p = partial + slot * (residual ? 3 : 2) * D + col;
        if (residual) {
          *p = dgate;
          p += D;
        }
        p[0] = dshift;
        p[D] = dscale;
        dgate = dshift = dscale = 0.f;
      });
}

// ---- adaln_modulate ---------------------------------------------------------------------------
cudaError_t adaln_modulate_fwd(DType dt, const void* x, const void* shift, const void* scale,
                               Pack pack, int64_t D, float eps, void* y, float* mean,
                               float* rstd, cudaStream_t stream) {
  NIT_DISPATCH_DTYPE(dt, T, {
    return adaln_fwd_rows<T>(static_cast<const T*>(x), nullptr, nullptr, static_cast<const T*>(shift),
                             static_cast<const T*>(scale), pack, D, eps, nullptr, static_cast<T*>(y),
                             mean, rstd, stream);
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
          chunk_grid(L, D), kColThreads, 0, stream, nullptr, static_cast<const T*>(dy),
          static_cast<const T*>(x), nullptr, nullptr, static_cast<const T*>(scale), mean, rstd,
          rowstat, pack, D, L.rows_per_chunk, static_cast<T*>(dx), nullptr, partial);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  })
  void* outs[2] = {dshift, dscale};
  return slot_sums(dt, partial, 2, D, pack.cu_seqlens, pack.num_seqs, pack.num_tokens, L, outs,
                   stream);
}

// ---- residual_adaln ---------------------------------------------------------------------------
cudaError_t residual_adaln_fwd(DType dt, const void* x, const void* y, const void* gate,
                               const void* shift, const void* scale, Pack pack, int64_t D,
                               float eps, void* x_new, void* h, float* mean, float* rstd,
                               cudaStream_t stream) {
  NIT_DISPATCH_DTYPE(dt, T, {
    return adaln_fwd_rows<T>(static_cast<const T*>(x), static_cast<const T*>(y),
                             static_cast<const T*>(gate), static_cast<const T*>(shift),
                             static_cast<const T*>(scale), pack, D, eps, static_cast<T*>(x_new),
                             static_cast<T*>(h), mean, rstd, stream);
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
      launch<adaln_bwd_chunks_kernel<T>>(
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
