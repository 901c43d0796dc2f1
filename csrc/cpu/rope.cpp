// CPU kernels of axial 2D RoPE (rope_2d) and of LayerNorm-over-Dh + RoPE (qk_norm_rope), with
// q [N, H, Dh] and k [N, Hk, Dh] handled in one call.
//
// Token t of an h x w image has positions (p0, p1) (common/rope_math.h); the first Dh/2 columns
// rotate with p0 and freqs[0], the last Dh/2 with p1 and freqs[1], in interleaved pairs. The
// angles depend only on an axis position, so each call evaluates cos/sin once per distinct
// position value (at most the longest image side per axis, capped at kMaxTablePositions;
// longer axes are evaluated per token with the same function), never per token.
// In vector form a pair rotation is y = x * C + swap_pairs(x) * S with C = (c, c) and
// S = (-s, s) per pair, mscale and the inverse sign folded into c and s.
//
// qk_norm_rope backward: du = R^T dout (the inverse rotation), then the LayerNorm backward;
// dweight/dbias are column sums over all tokens and heads, accumulated per fixed block of
// tokens and combined in block order, so no result depends on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "common/adaln_math.h"
#include "common/rope_math.h"
#include "common/segments.h"
#include "cpu/rows.h"
#include "cpu/vec.h"

namespace nit {
namespace cpu {
namespace {

constexpr int64_t kGrain = 8;               // tokens per parallel task, at least
constexpr int64_t kTokenBlock = 32;         // tokens per reduction block of dweight/dbias
constexpr int64_t kMaxTablePositions = 4096;

// Rotation coefficients C, S of every token, from per-axis tables indexed by position.
class RopeCoeffs {
 public:
  RopeCoeffs(const float* freqs, int64_t head_dim, const int32_t* sizes, int64_t B, bool official,
             float mscale, bool inverse)
      : half_(head_dim / 2), freqs_(freqs), mscale_(mscale), inverse_(inverse) {
    int64_t extent[2] = {0, 0};
    for (int64_t b = 0; b < B; ++b) {
      int64_t n0, n1;
      rope_axis_extents(sizes[2 * b], sizes[2 * b + 1], official, &n0, &n1);
      extent[0] = std::max(extent[0], n0);
      extent[1] = std::max(extent[1], n1);
    }
    for (int a = 0; a < 2; ++a) {
      if (extent[a] > kMaxTablePositions) continue;
      table_[a].resize(extent[a] * 2 * half_);
      at::parallel_for(0, extent[a], 16, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          float* row = table_[a].data() + p * 2 * half_;
          axis_row(a, p, row, row + half_);
        }
      });
    }
  }

  // C[0..Dh), S[0..Dh) of a token at positions (p0, p1); columns past Dh are left untouched.
  void token(int64_t p0, int64_t p1, float* C, float* S) const {
    const int64_t p[2] = {p0, p1};
    for (int a = 0; a < 2; ++a) {
      float* c = C + a * half_;
      float* s = S + a * half_;
      if (table_[a].empty()) {
        axis_row(a, p[a], c, s);
      } else {
        const float* row = table_[a].data() + p[a] * 2 * half_;
        std::memcpy(c, row, half_ * sizeof(float));
        std::memcpy(s, row + half_, half_ * sizeof(float));
      }
    }
  }

 private:
  // The Dh/2 coefficients of axis a at position p: C = (c_i, c_i), S = (-s_i, s_i) per pair.
  void axis_row(int a, int64_t p, float* C, float* S) const {
    const float* f = freqs_ + a * (half_ / 2);
    for (int64_t i = 0; i < half_ / 2; ++i) {
      float c, s;
      rope_coeffs(static_cast<float>(p), f[i], mscale_, inverse_, &c, &s);
      C[2 * i] = c;
      C[2 * i + 1] = c;
      S[2 * i] = -s;
      S[2 * i + 1] = s;
    }
  }

  int64_t half_;
  const float* freqs_;
  float mscale_;
  bool inverse_;
  std::vector<float> table_[2];  // per axis [extent, 2 * half_]: C then S of each position
};

// Positions of the rows of the image the row loop is in.
struct ImageCursor {
  const int32_t* cu;
  const int32_t* sizes;
  bool official;
  int64_t start = 0, h = 1, w = 1;

  void enter(int seg) {
    start = cu[seg];
    h = sizes[2 * seg];
    w = sizes[2 * seg + 1];
  }
  void positions(int64_t r, int64_t* p0, int64_t* p1) const {
    rope_positions(r - start, h, w, official, p0, p1);
  }
};

// row(r) for every token r in [begin, end), image by image, after C and S hold r's coefficients.
template <class Row>
inline void for_rotated_rows(const int32_t* cu, const int32_t* sizes, int64_t B, bool official,
                             const RopeCoeffs& coeffs, int64_t begin, int64_t end, float* C, float* S, Row&& row) {
  ImageCursor img{cu, sizes, official};
  cpu::for_rows(cu, static_cast<int>(B), begin, end, [&](int seg) { img.enter(seg); }, [&](int64_t r) {
    int64_t p0, p1;
    img.positions(r, &p0, &p1);
    coeffs.token(p0, p1, C, S);
    row(r);
  });
}

// y = x * C + swap_pairs(x) * S over one head row
template <typename T>
inline void rotate_row(const T* x, T* y, const float* C, const float* S, int64_t Dh) {
  cpu::for_each_vec(Dh, [&](int64_t j, auto tag) {
    const Vec8 v = load_v(x, j, Dh, tag);
    const int64_t c = j * kLanes;
    store_v(y, j, Dh, cpu::fmadd(v, Vec8::loadu(C + c), cpu::swap_pairs(v) * Vec8::loadu(S + c)), tag);
  });
}

std::tuple<at::Tensor, at::Tensor> rope_2d_cpu(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& cu_seqlens, const at::Tensor& sizes,
                                               const at::Tensor& freqs, c10::string_view positions,
                                               double mscale, bool inverse) {
  const RopeArgs a = check_rope(q, k, cu_seqlens, sizes, positions);
  check_fp32(freqs, {2, a.Dh / 4}, q, "freqs");
  const int64_t H = q.size(1), Hk = k.size(1), Dh = a.Dh, Dhp = cpu::padded(Dh);
  auto q_rot = at::empty_like(q);
  auto k_rot = at::empty_like(k);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* sz = sizes.data_ptr<int32_t>();
  const RopeCoeffs coeffs(freqs.data_ptr<float>(), Dh, sz, a.B, a.official, static_cast<float>(mscale), inverse);
  NIT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "rope_2d", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* qo = q_rot.data_ptr<scalar_t>();
    scalar_t* ko = k_rot.data_ptr<scalar_t>();
    at::parallel_for(0, a.N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> cs(2 * Dhp, 0.f);
      float *C = cs.data(), *S = C + Dhp;
      for_rotated_rows(cu, sz, a.B, a.official, coeffs, begin, end, C, S, [&](int64_t r) {
        cpu::prefetch_ahead(r, end, H * Dh, {qp + r * H * Dh});
        cpu::prefetch_ahead(r, end, Hk * Dh, {kp + r * Hk * Dh});
        for (int64_t h = 0; h < H; ++h) rotate_row(qp + (r * H + h) * Dh, qo + (r * H + h) * Dh, C, S, Dh);
        for (int64_t h = 0; h < Hk; ++h) rotate_row(kp + (r * Hk + h) * Dh, ko + (r * Hk + h) * Dh, C, S, Dh);
      });
    });
  });
  return {q_rot, k_rot};
}

// ---------------------------------------------------------------------------------------------
// qk_norm_rope
// ---------------------------------------------------------------------------------------------
// out = R(LN(x) * weight + bias) for one head row; buf, C, S, weight, bias padded to whole vectors.
template <typename T>
inline void norm_rope_row(const T* x, T* out, float* buf, const float* weight, const float* bias,
                          const float* C, const float* S, int64_t Dh, float eps, float* mean, float* rstd) {
  const float sum = cpu::reduce_sum(Dh, [&](int64_t j, auto tag) {
    const Vec8 v = load_v(x, j, Dh, tag);
    v.storeu(buf + j * kLanes);
    return v;
  });
  cpu::row_stats(buf, Dh, sum, eps, mean, rstd);
  const Vec8 mv(*mean), rv(*rstd);
  cpu::for_each_vec(Dh, [&](int64_t j, auto tag) {
    const int64_t c = j * kLanes;
    const Vec8 u = cpu::fmadd(ln_normalize(Vec8::loadu(buf + c), mv, rv), Vec8::loadu(weight + c), Vec8::loadu(bias + c));
    store_v(out, j, Dh, cpu::fmadd(u, Vec8::loadu(C + c), cpu::swap_pairs(u) * Vec8::loadu(S + c)), tag);
  });
}

// Backward of norm_rope_row given dout, with C, S of the inverse rotation; adds du * xhat and du
// to the column accumulators acc_w and acc_b. xh, dxh are scratch rows.
template <typename T>
inline void norm_rope_row_bwd(const T* dout, const T* x, T* dx, float mean, float rstd,
                              const float* weight, const float* C, const float* S, float* acc_w,
                              float* acc_b, float* xh, float* dxh, int64_t Dh) {
  const Vec8 mv(mean), rv(rstd);
  float sum_dxh, sum_dxh_xh;
  cpu::reduce_sum2(Dh, [&](int64_t j, auto tag, Vec8& a, Vec8& b) {
    const int64_t c = j * kLanes;
    const Vec8 g = load_v(dout, j, Dh, tag);  // zero in the padding, which then adds nothing
    const Vec8 du = cpu::fmadd(g, Vec8::loadu(C + c), cpu::swap_pairs(g) * Vec8::loadu(S + c));
    const Vec8 xhat = ln_normalize(load_v(x, j, Dh, tag), mv, rv);
    const Vec8 dxhat = du * Vec8::loadu(weight + c);
    cpu::fmadd(du, xhat, Vec8::loadu(acc_w + c)).storeu(acc_w + c);
    (Vec8::loadu(acc_b + c) + du).storeu(acc_b + c);
    xhat.storeu(xh + c);
    dxhat.storeu(dxh + c);
    a += dxhat;
    b = cpu::fmadd(dxhat, xhat, b);
  }, &sum_dxh, &sum_dxh_xh);
  const Vec8 m1(sum_dxh / static_cast<float>(Dh)), m2(sum_dxh_xh / static_cast<float>(Dh));
  cpu::for_each_vec(Dh, [&](int64_t j, auto tag) {
    const int64_t c = j * kLanes;
    store_v(dx, j, Dh, ln_backward_elem(Vec8::loadu(dxh + c), Vec8::loadu(xh + c), rv, m1, m2), tag);
  });
}

// fp32 copy of a [Dh] parameter padded with zeros to whole vectors
std::vector<float> padded_param(const at::Tensor& t, int64_t Dh) {
  std::vector<float> v(cpu::padded(Dh), 0.f);
  std::memcpy(v.data(), t.data_ptr<float>(), Dh * sizeof(float));
  return v;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens, const at::Tensor& sizes,
    const at::Tensor& freqs, const at::Tensor& q_weight, const at::Tensor& q_bias,
    const at::Tensor& k_weight, const at::Tensor& k_bias, double eps, c10::string_view positions,
    double mscale) {
  const RopeArgs a = check_rope(q, k, cu_seqlens, sizes, positions);
  check_fp32(freqs, {2, a.Dh / 4}, q, "freqs");
  const int64_t N = a.N, H = q.size(1), Hk = k.size(1), Dh = a.Dh, Dhp = cpu::padded(Dh);
  check_fp32(q_weight, {Dh}, q, "q_weight");
  check_fp32(q_bias, {Dh}, q, "q_bias");
  check_fp32(k_weight, {Dh}, q, "k_weight");
  check_fp32(k_bias, {Dh}, q, "k_bias");
  auto q_rot = at::empty_like(q);
  auto k_rot = at::empty_like(k);
  auto f32 = q.options().dtype(at::kFloat);
  auto q_mean = at::empty({N, H}, f32), q_rstd = at::empty({N, H}, f32);
  auto k_mean = at::empty({N, Hk}, f32), k_rstd = at::empty({N, Hk}, f32);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* sz = sizes.data_ptr<int32_t>();
  const RopeCoeffs coeffs(freqs.data_ptr<float>(), Dh, sz, a.B, a.official, static_cast<float>(mscale), false);
  const auto qw = padded_param(q_weight, Dh), qb = padded_param(q_bias, Dh);
  const auto kw = padded_param(k_weight, Dh), kb = padded_param(k_bias, Dh);
  float *qm = q_mean.data_ptr<float>(), *qr = q_rstd.data_ptr<float>();
  float *km = k_mean.data_ptr<float>(), *kr = k_rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  NIT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "qk_norm_rope_fwd", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* qo = q_rot.data_ptr<scalar_t>();
    scalar_t* ko = k_rot.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> work(3 * Dhp, 0.f);
      float *C = work.data(), *S = C + Dhp, *buf = S + Dhp;
      for_rotated_rows(cu, sz, a.B, a.official, coeffs, begin, end, C, S, [&](int64_t r) {
        cpu::prefetch_ahead(r, end, H * Dh, {qp + r * H * Dh});
        cpu::prefetch_ahead(r, end, Hk * Dh, {kp + r * Hk * Dh});
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = r * H + h;
          norm_rope_row(qp + i * Dh, qo + i * Dh, buf, qw.data(), qb.data(), C, S, Dh, e, qm + i, qr + i);
        }
        for (int64_t h = 0; h < Hk; ++h) {
          const int64_t i = r * Hk + h;
          norm_rope_row(kp + i * Dh, ko + i * Dh, buf, kw.data(), kb.data(), C, S, Dh, e, km + i, kr + i);
        }
      });
    });
  });
  return {q_rot, k_rot, q_mean, q_rstd, k_mean, k_rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_bwd_cpu(
    const at::Tensor& dq_rot, const at::Tensor& dk_rot, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& cu_seqlens, const at::Tensor& sizes, const at::Tensor& freqs,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& q_mean,
    const at::Tensor& q_rstd, const at::Tensor& k_mean, const at::Tensor& k_rstd,
    c10::string_view positions, double mscale) {
  const RopeArgs a = check_rope(q, k, cu_seqlens, sizes, positions);
  check_fp32(freqs, {2, a.Dh / 4}, q, "freqs");
  const int64_t N = a.N, H = q.size(1), Hk = k.size(1), Dh = a.Dh, Dhp = cpu::padded(Dh);
  check_qk_grads(dq_rot, dk_rot, q, k);
  check_fp32(q_weight, {Dh}, q, "q_weight");
  check_fp32(k_weight, {Dh}, q, "k_weight");
  check_fp32(q_mean, {N, H}, q, "q_mean");
  check_fp32(q_rstd, {N, H}, q, "q_rstd");
  check_fp32(k_mean, {N, Hk}, q, "k_mean");
  check_fp32(k_rstd, {N, Hk}, q, "k_rstd");
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  const int64_t nblocks = (N + kTokenBlock - 1) / kTokenBlock;
  // per-block column sums: dq_weight, dq_bias, dk_weight, dk_bias
  auto partial = at::zeros({4, nblocks, Dhp}, q.options().dtype(at::kFloat));
  float* pp = partial.data_ptr<float>();
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* sz = sizes.data_ptr<int32_t>();
  const RopeCoeffs coeffs(freqs.data_ptr<float>(), Dh, sz, a.B, a.official, static_cast<float>(mscale), true);
  const auto qw = padded_param(q_weight, Dh), kw = padded_param(k_weight, Dh);
  const float *qm = q_mean.data_ptr<float>(), *qr = q_rstd.data_ptr<float>();
  const float *km = k_mean.data_ptr<float>(), *kr = k_rstd.data_ptr<float>();
  NIT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "qk_norm_rope_bwd", [&] {
    const scalar_t* dqp = dq_rot.data_ptr<scalar_t>();
    const scalar_t* dkp = dk_rot.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* dqo = dq.data_ptr<scalar_t>();
    scalar_t* dko = dk.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t kb0, int64_t kb1) {
      std::vector<float> work(4 * Dhp, 0.f);
      float *C = work.data(), *S = C + Dhp, *xh = S + Dhp, *dxh = xh + Dhp;
      for (int64_t blk = kb0; blk < kb1; ++blk) {
        float* acc_qw = pp + (0 * nblocks + blk) * Dhp;
        float* acc_qb = pp + (1 * nblocks + blk) * Dhp;
        float* acc_kw = pp + (2 * nblocks + blk) * Dhp;
        float* acc_kb = pp + (3 * nblocks + blk) * Dhp;
        const int64_t r0 = blk * kTokenBlock, r1 = std::min(N, r0 + kTokenBlock);
        for_rotated_rows(cu, sz, a.B, a.official, coeffs, r0, r1, C, S, [&](int64_t r) {
          cpu::prefetch_ahead(r, N, H * Dh, {dqp + r * H * Dh, qp + r * H * Dh});
          cpu::prefetch_ahead(r, N, Hk * Dh, {dkp + r * Hk * Dh, kp + r * Hk * Dh});
          for (int64_t h = 0; h < H; ++h) {
            const int64_t i = r * H + h;
            norm_rope_row_bwd(dqp + i * Dh, qp + i * Dh, dqo + i * Dh, qm[i], qr[i], qw.data(), C, S,
                              acc_qw, acc_qb, xh, dxh, Dh);
          }
          for (int64_t h = 0; h < Hk; ++h) {
            const int64_t i = r * Hk + h;
            norm_rope_row_bwd(dkp + i * Dh, kp + i * Dh, dko + i * Dh, km[i], kr[i], kw.data(), C, S,
                              acc_kw, acc_kb, xh, dxh, Dh);
          }
        });
      }
    });
  });
  // combine the blocks in order: sums[t][c] = sum over blocks of partial[t][blk][c]
  std::vector<at::Tensor> sums;
  for (int64_t t = 0; t < 4; ++t) {
    std::vector<float> acc(Dhp, 0.f);
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const float* row = pp + (t * nblocks + blk) * Dhp;
      for (int64_t j = 0; j < Dhp; j += kLanes) {
        (Vec8::loadu(acc.data() + j) + Vec8::loadu(row + j)).storeu(acc.data() + j);
      }
    }
    sums.push_back(at::empty({Dh}, q.options().dtype(at::kFloat)));
    std::memcpy(sums.back().data_ptr<float>(), acc.data(), Dh * sizeof(float));
  }
  return {dq, dk, sums[0], sums[1], sums[2], sums[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(nit, CPU, m) {
  m.impl("rope_2d", &rope_2d_cpu);
  m.impl("qk_norm_rope_fwd", &qk_norm_rope_fwd_cpu);
  m.impl("qk_norm_rope_bwd", &qk_norm_rope_bwd_cpu);
}

}  // namespace cpu
}  // namespace nit
