// CUDA kernels of axial 2D RoPE on q [N, H, Dh] and k [N, Hk, Dh] (math: common/rope_math.h).
// Angles are computed from the token index and the pack: no cos/sin table.
//
// rope_2d: (x0, x1) -> mscale * (x0 cos a - x1 sin a, x1 cos a + x0 sin a),  a = p_axis * freqs[axis][i]
//   One thread per (token, pair): the angle is evaluated once and applied to every q and k head
//   of the token; consecutive threads touch consecutive pairs of a head row (coalesced).
//   inverse = true rotates by -a: the transpose, i.e. the backward (times mscale).
//
// qk_norm_rope, the fused qk-norm + RoPE, q and k in one launch:
//   n = (x - mean) * rstd * weight + bias      (LayerNorm over Dh of every (token, head) row)
//   out = mscale * R(a) n
//   One warp per token: lane l owns pairs l, l+32, ... of every head, so the angles (and the
//   weight/bias entries) are computed once per token and reused by all H + Hk heads.
//   Backward per row, with g = mscale * R(-a) dout (the gradient of n) and xhat = (x - mean) * rstd:
//   dweight += g * xhat,  dbias += g,  dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w * xhat))
//   The parameter sums are fixed-order per-block partials reduced by slot_sums: deterministic.
#include "common/rope_math.h"
#include "cuda/packed_rows.cuh"

namespace nit {
namespace cuda {

// ---- angles --------------------------------------------------------------------------------
// Pair i of a head (dims 2i, 2i+1; 0 <= i < Dh/2) rotates with axis 0 for i < Dh/4 and axis 1
// otherwise; freqs [2, Dh/4] flattened is indexed by i directly.
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
  int64_t p0, p1;
  rope_positions(t, h, w, rope.official, &p0, &p1);
  return {static_cast<float>(p0), static_cast<float>(p1)};
}

// cos and sin (without mscale) of pair i's angle p * freqs[axis][i mod Dh/4].
__device__ __forceinline__ void pair_cos_sin(const TokenPos& pos, const float* __restrict__ freqs,
                                             int64_t quarter, int64_t i, float* c, float* s) {
  rope_cos_sin(i < quarter ? pos.p0 : pos.p1, freqs[i], c, s);
}

// ---- rope_2d -------------------------------------------------------------------------------
namespace {

constexpr int kRopeThreads = 256;

template <typename T>
__device__ __forceinline__ void rotate_heads(const T* __restrict__ x, T* __restrict__ out,
                                             int64_t row, int64_t heads, int64_t Dh, int64_t i,
                                             float c, float s, float mscale, bool inverse) {
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t off = (row * heads + h) * Dh + 2 * i;
    float y0, y1;
    rope_rotate_pair(to_float(x[off]), to_float(x[off + 1]), c, s, mscale, inverse, &y0, &y1);
    out[off] = from_float<T>(y0);
    out[off + 1] = from_float<T>(y1);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRopeThreads)
    rope_2d_kernel(const T* __restrict__ q, const T* __restrict__ k, Pack pack, int64_t H,
                   int64_t Hk, int64_t Dh, RopeArgs rope, bool inverse, T* __restrict__ q_out,
                   T* __restrict__ k_out) {
  const int64_t pairs = Dh / 2;
  const int64_t idx = int64_t(blockIdx.x) * kRopeThreads + threadIdx.x;
  if (idx >= pack.num_tokens * pairs) return;
  const int64_t row = idx / pairs, i = idx % pairs;
  float c, s;
  pair_cos_sin(token_position(pack, rope, row), rope.freqs, Dh / 4, i, &c, &s);
  rotate_heads(q, q_out, row, H, Dh, i, c, s, rope.mscale, inverse);
  rotate_heads(k, k_out, row, Hk, Dh, i, c, s, rope.mscale, inverse);
}

}  // namespace

cudaError_t rope_2d(DType dt, const void* q, const void* k, Pack pack, int64_t H, int64_t Hk,
                    int64_t Dh, RopeArgs rope, bool inverse, void* q_out, void* k_out,
                    cudaStream_t stream) {
  if (Dh % 4 != 0) return cudaErrorInvalidValue;
  const int64_t threads = pack.num_tokens * (Dh / 2);
  if (threads <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(cdiv(threads, int64_t(kRopeThreads))));
  NIT_DISPATCH_DTYPE(dt, T, {
    launch<rope_2d_kernel<T>>(
        grid, kRopeThreads, 0, stream, static_cast<const T*>(q), static_cast<const T*>(k), pack, H, Hk, Dh, rope, inverse,
        static_cast<T*>(q_out), static_cast<T*>(k_out));
  })
  return cudaGetLastError();
}

// ---- qk_norm_rope --------------------------------------------------------------------------
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kTokensPerWarpBwd = 4;  // tokens per warp in the backward: fewer partial rows
constexpr int kTokensPerBlockBwd = kWarpsPerBlock * kTokensPerWarpBwd;

// cos/sin of the pairs owned by `lane` for token `row` (identity for pairs past Dh/2).
template <int kPPL>
__device__ __forceinline__ void lane_angles(const Pack& pack, const RopeArgs& rope, int64_t row,
                                            int64_t Dh, int lane, float (&c)[kPPL],
                                            float (&s)[kPPL]) {
  const TokenPos pos = token_position(pack, rope, row);
#pragma unroll
  for (int j = 0; j < kPPL; ++j) {
    const int64_t i = lane + 32 * j;
    c[j] = 1.f;
    s[j] = 0.f;
    if (i < Dh / 2) pair_cos_sin(pos, rope.freqs, Dh / 4, i, &c[j], &s[j]);
  }
}

template <typename T, int kPPL>
__device__ void norm_rope_heads(const T* __restrict__ x, int64_t heads, int64_t row, int64_t Dh,
                                int lane, const float* __restrict__ weight,
                                const float* __restrict__ bias, const float (&c)[kPPL],
                                const float (&s)[kPPL], float eps, float mscale,
                                T* __restrict__ out, float* __restrict__ mean,
                                float* __restrict__ rstd) {
  const int64_t pairs = Dh / 2;
  float w[kPPL][2], b[kPPL][2];
#pragma unroll
  for (int j = 0; j < kPPL; ++j) {
    const int64_t i = lane + 32 * j;
    const bool ok = i < pairs;
    w[j][0] = ok ? weight[2 * i] : 0.f;
    w[j][1] = ok ? weight[2 * i + 1] : 0.f;
    b[j][0] = ok ? bias[2 * i] : 0.f;
    b[j][1] = ok ? bias[2 * i + 1] : 0.f;
  }
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t base = (row * heads + h) * Dh;
    float v[kPPL][2] = {};
    Welford st;
#pragma unroll
    for (int j = 0; j < kPPL; ++j) {
      const int64_t i = lane + 32 * j;
      if (i < pairs) {
        v[j][0] = to_float(x[base + 2 * i]);
        v[j][1] = to_float(x[base + 2 * i + 1]);
        st.add(v[j][0]);
        st.add(v[j][1]);
      }
    }
    st = warp_welford(st);
    const float rs = rsqrtf(st.var() + eps);
#pragma unroll
    for (int j = 0; j < kPPL; ++j) {
      const int64_t i = lane + 32 * j;
      if (i < pairs) {
        const float n0 = ln_normalize(v[j][0], st.mean, rs) * w[j][0] + b[j][0];
        const float n1 = ln_normalize(v[j][1], st.mean, rs) * w[j][1] + b[j][1];
        float y0, y1;
        rope_rotate_pair(n0, n1, c[j], s[j], mscale, false, &y0, &y1);
        out[base + 2 * i] = from_float<T>(y0);
        out[base + 2 * i + 1] = from_float<T>(y1);
      }
    }
    if (lane == 0) {
      mean[row * heads + h] = st.mean;
      rstd[row * heads + h] = rs;
    }
  }
}

template <typename T, int kPPL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    qk_norm_rope_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, Pack pack,
                            int64_t H, int64_t Hk, int64_t Dh, RopeArgs rope,
                            const float* __restrict__ qw, const float* __restrict__ qb,
                            const float* __restrict__ kw, const float* __restrict__ kb,
                            float eps, T* __restrict__ q_out, T* __restrict__ k_out,
                            float* __restrict__ q_mean, float* __restrict__ q_rstd,
                            float* __restrict__ k_mean, float* __restrict__ k_rstd) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= pack.num_tokens) return;
  const int lane = threadIdx.x % 32;
  float c[kPPL], s[kPPL];
  lane_angles<kPPL>(pack, rope, row, Dh, lane, c, s);
  norm_rope_heads<T, kPPL>(q, H, row, Dh, lane, qw, qb, c, s, eps, rope.mscale, q_out, q_mean,
                           q_rstd);
  norm_rope_heads<T, kPPL>(k, Hk, row, Dh, lane, kw, kb, c, s, eps, rope.mscale, k_out, k_mean,
                           k_rstd);
}

// Backward of the heads of one token; adds this lane's dweight/dbias terms to dw/db.
template <typename T, int kPPL>
__device__ void norm_rope_heads_bwd(const T* __restrict__ dout, const T* __restrict__ x,
                                    int64_t heads, int64_t row, int64_t Dh, int lane,
                                    const float* __restrict__ weight, const float (&c)[kPPL],
                                    const float (&s)[kPPL], float mscale,
                                    const float* __restrict__ mean,
                                    const float* __restrict__ rstd, T* __restrict__ dx,
                                    float (&dw)[kPPL][2], float (&db)[kPPL][2]) {
  const int64_t pairs = Dh / 2;
  const float inv_dh = 1.f / float(Dh);
  float w[kPPL][2];
#pragma unroll
  for (int j = 0; j < kPPL; ++j) {
    const int64_t i = lane + 32 * j;
    w[j][0] = i < pairs ? weight[2 * i] : 0.f;
    w[j][1] = i < pairs ? weight[2 * i + 1] : 0.f;
  }
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t base = (row * heads + h) * Dh;
    const float mu = mean[row * heads + h], rs = rstd[row * heads + h];
    float xhat[kPPL][2], dxhat[kPPL][2];
    float sum_d = 0.f, sum_dx = 0.f;
#pragma unroll
    for (int j = 0; j < kPPL; ++j) {
      const int64_t i = lane + 32 * j;
      xhat[j][0] = xhat[j][1] = dxhat[j][0] = dxhat[j][1] = 0.f;
      if (i < pairs) {
        float g0, g1;
        rope_rotate_pair(to_float(dout[base + 2 * i]), to_float(dout[base + 2 * i + 1]), c[j],
                         s[j], mscale, true, &g0, &g1);
        xhat[j][0] = ln_normalize(to_float(x[base + 2 * i]), mu, rs);
        xhat[j][1] = ln_normalize(to_float(x[base + 2 * i + 1]), mu, rs);
        dw[j][0] += g0 * xhat[j][0];
        dw[j][1] += g1 * xhat[j][1];
        db[j][0] += g0;
        db[j][1] += g1;
        dxhat[j][0] = g0 * w[j][0];
        dxhat[j][1] = g1 * w[j][1];
        sum_d += dxhat[j][0] + dxhat[j][1];
        sum_dx += dxhat[j][0] * xhat[j][0] + dxhat[j][1] * xhat[j][1];
      }
    }
    const float mean_d = warp_sum(sum_d) * inv_dh;
    const float mean_dx = warp_sum(sum_dx) * inv_dh;
#pragma unroll
    for (int j = 0; j < kPPL; ++j) {
      const int64_t i = lane + 32 * j;
      if (i < pairs) {
        dx[base + 2 * i] = from_float<T>(ln_backward_elem(dxhat[j][0], xhat[j][0], rs, mean_d, mean_dx));
        dx[base + 2 * i + 1] =
            from_float<T>(ln_backward_elem(dxhat[j][1], xhat[j][1], rs, mean_d, mean_dx));
      }
    }
  }
}

// dq, dk; partial[block][4][Dh] = this block's (dq_weight, dq_bias, dk_weight, dk_bias) sums.
template <typename T, int kPPL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    qk_norm_rope_bwd_kernel(const T* __restrict__ dq_rot, const T* __restrict__ dk_rot,
                            const T* __restrict__ q, const T* __restrict__ k, Pack pack,
                            int64_t H, int64_t Hk, int64_t Dh, RopeArgs rope,
                            const float* __restrict__ qw, const float* __restrict__ kw,
                            const float* __restrict__ q_mean, const float* __restrict__ q_rstd,
                            const float* __restrict__ k_mean, const float* __restrict__ k_rstd,
                            T* __restrict__ dq, T* __restrict__ dk, float* __restrict__ partial) {
  extern __shared__ float red[];  // [kWarpsPerBlock][4][Dh]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[4][kPPL][2];
#pragma unroll
  for (int v = 0; v < 4; ++v)
#pragma unroll
    for (int j = 0; j < kPPL; ++j) acc[v][j][0] = acc[v][j][1] = 0.f;

  for (int t = 0; t < kTokensPerWarpBwd; ++t) {
    const int64_t row = int64_t(blockIdx.x) * kTokensPerBlockBwd + warp + kWarpsPerBlock * t;
    if (row >= pack.num_tokens) break;  // no barrier inside the loop
    float c[kPPL], s[kPPL];
    lane_angles<kPPL>(pack, rope, row, Dh, lane, c, s);
    norm_rope_heads_bwd<T, kPPL>(dq_rot, q, H, row, Dh, lane, qw, c, s, rope.mscale, q_mean,
                                 q_rstd, dq, acc[0], acc[1]);
    norm_rope_heads_bwd<T, kPPL>(dk_rot, k, Hk, row, Dh, lane, kw, c, s, rope.mscale, k_mean,
                                 k_rstd, dk, acc[2], acc[3]);
  }
  // Combine the warps of the block in warp order.
#pragma unroll
  for (int v = 0; v < 4; ++v)
#pragma unroll
    for (int j = 0; j < kPPL; ++j) {
      const int64_t i = lane + 32 * j;
      if (i < Dh / 2) {
        red[(warp * 4 + v) * Dh + 2 * i] = acc[v][j][0];
        red[(warp * 4 + v) * Dh + 2 * i + 1] = acc[v][j][1];
      }
    }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < 4 * Dh; e += blockDim.x) {
    float total = 0.f;
    for (int w = 0; w < kWarpsPerBlock; ++w) total += red[w * 4 * Dh + e];
    partial[int64_t(blockIdx.x) * 4 * Dh + e] = total;
  }
}

// Calls launch(Int<kPPL>) with the pairs-per-lane needed for head_dim Dh (<= 256).
template <typename Launch>
inline cudaError_t with_pairs_per_lane(int64_t Dh, Launch&& launch) {
  if (Dh % 4 != 0 || Dh <= 0 || Dh > kQkNormMaxHeadDim) return cudaErrorInvalidValue;
  if (Dh <= 64) launch(Int<1>{});
  else if (Dh <= 128) launch(Int<2>{});
  else launch(Int<4>{});
  return cudaGetLastError();
}

}  // namespace

cudaError_t qk_norm_rope_fwd(DType dt, const void* q, const void* k, Pack pack, int64_t H,
                             int64_t Hk, int64_t Dh, RopeArgs rope, const float* q_weight,
                             const float* q_bias, const float* k_weight, const float* k_bias,
                             float eps, void* q_out, void* k_out, float* q_mean, float* q_rstd,
                             float* k_mean, float* k_rstd, cudaStream_t stream) {
  if (pack.num_tokens <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(cdiv(pack.num_tokens, int64_t(kWarpsPerBlock))));
  NIT_DISPATCH_DTYPE(dt, T, {
    return with_pairs_per_lane(Dh, [&](auto P) {
      launch<qk_norm_rope_fwd_kernel<T, decltype(P)::value>>(
          grid, kWarpsPerBlock * 32, 0, stream, static_cast<const T*>(q), static_cast<const T*>(k), pack, H, Hk, Dh, rope, q_weight,
          q_bias, k_weight, k_bias, eps, static_cast<T*>(q_out), static_cast<T*>(k_out), q_mean,
          q_rstd, k_mean, k_rstd);
    });
  })
}

int64_t qk_norm_rope_bwd_workspace(Pack pack, int64_t Dh) {
  return cdiv(pack.num_tokens, int64_t(kTokensPerBlockBwd)) * 4 * Dh;
}

cudaError_t qk_norm_rope_bwd(DType dt, const void* dq_rot, const void* dk_rot, const void* q,
                             const void* k, Pack pack, int64_t H, int64_t Hk, int64_t Dh,
                             RopeArgs rope, const float* q_weight, const float* k_weight,
                             const float* q_mean, const float* q_rstd, const float* k_mean,
                             const float* k_rstd, void* dq, void* dk, float* dparams,
                             float* workspace, cudaStream_t stream) {
  const int64_t blocks = cdiv(pack.num_tokens, int64_t(kTokensPerBlockBwd));
  if (blocks > 0) {
    const size_t smem = sizeof(float) * kWarpsPerBlock * 4 * Dh;  // <= 32 KiB for Dh <= 256
    cudaError_t err = cudaSuccess;
    NIT_DISPATCH_DTYPE(dt, T, {
      err = with_pairs_per_lane(Dh, [&](auto P) {
        launch<qk_norm_rope_bwd_kernel<T, decltype(P)::value>>(
                static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem, stream,
                static_cast<const T*>(dq_rot), static_cast<const T*>(dk_rot),
                static_cast<const T*>(q), static_cast<const T*>(k), pack, H, Hk, Dh, rope,
                q_weight, k_weight, q_mean, q_rstd, k_mean, k_rstd, static_cast<T*>(dq),
                static_cast<T*>(dk), workspace);
      });
    })
    if (err != cudaSuccess) return err;
  }
  // Sum the block partials in block order; with no tokens the sums are zero.
  const SlotLayout L{1, blocks, blocks};
  void* outs[4] = {dparams, dparams + Dh, dparams + 2 * Dh, dparams + 3 * Dh};
  return slot_sums(DType::kFloat32, workspace, 4, Dh, nullptr, 1, pack.num_tokens, L, outs,
                   stream);
}

}  // namespace cuda
}  // namespace nit
