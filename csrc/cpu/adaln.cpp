// CPU kernels of the packed AdaLN ops, forward and backward:
//
//   adaln_modulate:  y = LN(x) * (1 + scale[seg]) + shift[seg]
//   residual_adaln:  x_new = x + gate[seg] * y;  h = LN(x_new) * (1 + scale[seg]) + shift[seg]
//
// LN has no affine parameters and uses the biased variance. Every token row is read from memory
// once into an fp32 row buffer; the statistics take two passes over that L1-resident buffer
// (the mean, then the mean squared deviation, which stays accurate for rows with a large mean)
// and the outputs are written once. Per-image rows (shift, scale, gate) are widened to fp32 when
// the row loop enters a new image, so no per-token conditioning tensor exists.
// Backward: dx in one pass per row (residual_adaln re-forms x_new = x + gate*y in fp32 rather
// than reading the rounded x_new, whose error dwarfs a row's deviations when its mean is large); the per-image sums accumulate over the fixed row blocks of
// row_blocks.h, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "common/adaln_math.h"
#include "cpu/row_blocks.h"
#include "cpu/rows.h"
#include "cpu/vec.h"

namespace nit {
namespace cpu {
namespace {

constexpr int64_t kGrain = 16;  // rows per parallel task, at least

// h = modulate(LN(buf)) for one row whose statistics are known.
template <typename T>
inline void modulate_row(const float* buf, const float* one_plus_scale, const float* shift,
                         float mean, float rstd, int64_t D, T* out) {
  const Vec8 mv(mean), rv(rstd);
  cpu::for_each_vec(D, [&](int64_t j, auto tag) {
    const int64_t c = j * kLanes;
    const Vec8 xhat = ln_normalize(Vec8::loadu(buf + c), mv, rv);
    store_v(out, j, D, adaln_modulate_elem(xhat, Vec8::loadu(one_plus_scale + c), Vec8::loadu(shift + c)), tag);
  });
}

// ---------------------------------------------------------------------------------------------
// adaln_modulate
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_fwd_cpu(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
    const at::Tensor& cu_seqlens, double eps) {
  const int64_t B = check_rows(x, "x", cu_seqlens, {{&shift, "shift"}, {&scale, "scale"}});
  const int64_t N = x.size(0), D = x.size(1), Dp = cpu::padded(D);
  auto y = at::empty_like(x);
  auto mean = at::empty({N}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  NIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "adaln_modulate_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* shp = shift.data_ptr<scalar_t>();
    const scalar_t* scp = scale.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> work(3 * Dp);
      float *buf = work.data(), *s1 = buf + Dp, *sh = s1 + Dp;
      auto enter = [&](int seg) {
        widen_row(scp, seg, D, 1.f, s1);
        widen_row(shp, seg, D, 0.f, sh);
      };
      for_rows(cu, static_cast<int>(B), begin, end, enter, [&](int64_t r) {
        const scalar_t* xr = xp + r * D;
        cpu::prefetch_ahead(r, end, D, {xr});
        const float sum = cpu::reduce_sum(D, [&](int64_t j, auto tag) {
          const Vec8 v = load_v(xr, j, D, tag);
          v.storeu(buf + j * kLanes);
          return v;
        });
        row_stats(buf, D, sum, static_cast<float>(eps), mp + r, rp + r);
        modulate_row(buf, s1, sh, mp[r], rp[r], D, yp + r * D);
      });
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& cu_seqlens) {
  const int64_t B = check_rows(x, "x", cu_seqlens, {{&scale, "scale"}}, {{&dy, "dy"}});
  const int64_t N = x.size(0), D = x.size(1), Dp = cpu::padded(D);
  check_fp32(mean, {N}, x, "mean");
  check_fp32(rstd, {N}, x, "rstd");
  const cpu::ImageBlocks blocks(cu_seqlens.data_ptr<int32_t>(), B);
  auto dx = at::empty_like(x);
  auto dshift = at::empty_like(scale);
  auto dscale = at::empty_like(scale);
  // per-block partial sums of dy and dy * xhat
  auto partial = at::zeros({2, blocks.count(), Dp}, x.options().dtype(at::kFloat));
  float* p_shift = partial.data_ptr<float>();
  float* p_scale = p_shift + blocks.count() * Dp;
  const float* mp = mean.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  NIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "adaln_modulate_bwd", [&] {
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* scp = scale.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, blocks.count(), 1, [&](int64_t kb, int64_t ke) {
      std::vector<float> work(3 * Dp);
      float *s1 = work.data(), *xh = s1 + Dp, *dxh = xh + Dp;
      blocks.visit(kb, ke, [&](int64_t seg, int64_t r0, int64_t r1, int64_t k) {
        widen_row(scp, seg, D, 1.f, s1);
        float* acc_shift = p_shift + k * Dp;
        float* acc_scale = p_scale + k * Dp;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * D;
          const scalar_t* dyr = dyp + r * D;
          cpu::prefetch_ahead(r, r1, D, {xr, dyr});
          const Vec8 mv(mp[r]), rv(rp[r]);
          float sum_dxh, sum_dxh_xh;
          cpu::reduce_sum2(D, [&](int64_t j, auto tag, Vec8& a, Vec8& b) {
            const int64_t c = j * kLanes;
            const Vec8 xhat = ln_normalize(load_v(xr, j, D, tag), mv, rv);
            const Vec8 g = load_v(dyr, j, D, tag);  // zero in the padding, which then adds nothing
            const Vec8 dxhat = g * Vec8::loadu(s1 + c);
            xhat.storeu(xh + c);
            dxhat.storeu(dxh + c);
            a += dxhat;
            b = cpu::fmadd(dxhat, xhat, b);
            (Vec8::loadu(acc_shift + c) + g).storeu(acc_shift + c);
            cpu::fmadd(g, xhat, Vec8::loadu(acc_scale + c)).storeu(acc_scale + c);
          }, &sum_dxh, &sum_dxh_xh);
          const Vec8 m1(sum_dxh / static_cast<float>(D)), m2(sum_dxh_xh / static_cast<float>(D));
          scalar_t* dxr = dxp + r * D;
          cpu::for_each_vec(D, [&](int64_t j, auto tag) {
            const int64_t c = j * kLanes;
            store_v(dxr, j, D, ln_backward_elem(Vec8::loadu(dxh + c), Vec8::loadu(xh + c), rv, m1, m2), tag);
          });
        }
      });
    });
    blocks.sum_per_image(p_shift, Dp, D, dshift.data_ptr<scalar_t>());
    blocks.sum_per_image(p_scale, Dp, D, dscale.data_ptr<scalar_t>());
  });
  return {dx, dshift, dscale};
}

// ---------------------------------------------------------------------------------------------
// residual_adaln
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_adaln_fwd_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const at::Tensor& cu_seqlens, double eps) {
  const int64_t B = check_rows(x, "x", cu_seqlens,
                               {{&gate, "gate"}, {&shift, "shift"}, {&scale, "scale"}}, {{&y, "y"}});
  const int64_t N = x.size(0), D = x.size(1), Dp = cpu::padded(D);
  auto x_new = at::empty_like(x);
  auto h = at::empty_like(x);
  auto mean = at::empty({N}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  NIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "residual_adaln_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    const scalar_t* shp = shift.data_ptr<scalar_t>();
    const scalar_t* scp = scale.data_ptr<scalar_t>();
    scalar_t* xnp = x_new.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> work(4 * Dp);
      float *buf = work.data(), *g = buf + Dp, *s1 = g + Dp, *sh = s1 + Dp;
      auto enter = [&](int seg) {
        widen_row(gp, seg, D, 0.f, g);
        widen_row(scp, seg, D, 1.f, s1);
        widen_row(shp, seg, D, 0.f, sh);
      };
      for_rows(cu, static_cast<int>(B), begin, end, enter, [&](int64_t r) {
        const scalar_t* xr = xp + r * D;
        const scalar_t* yr = yp + r * D;
        scalar_t* xnr = xnp + r * D;
        cpu::prefetch_ahead(r, end, D, {xr, yr});
        // h is normalised from the fp32 x_new, before it is rounded to the output dtype
        const float sum = cpu::reduce_sum(D, [&](int64_t j, auto tag) {
          const Vec8 v = gated_residual_elem(load_v(xr, j, D, tag), Vec8::loadu(g + j * kLanes), load_v(yr, j, D, tag));
          v.storeu(buf + j * kLanes);
          store_v(xnr, j, D, v, tag);
          return v;
        });
        row_stats(buf, D, sum, static_cast<float>(eps), mp + r, rp + r);
        modulate_row(buf, s1, sh, mp[r], rp[r], D, hp + r * D);
      });
    });
  });
  return {x_new, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_adaln_bwd_cpu(
    const at::Tensor& dx_new, const at::Tensor& dh, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& cu_seqlens) {
  const int64_t B = check_rows(x, "x", cu_seqlens, {{&gate, "gate"}, {&scale, "scale"}},
                               {{&dx_new, "dx_new"}, {&dh, "dh"}, {&y, "y"}});
  const int64_t N = x.size(0), D = x.size(1), Dp = cpu::padded(D);
  check_fp32(mean, {N}, x, "mean");
  check_fp32(rstd, {N}, x, "rstd");
  const cpu::ImageBlocks blocks(cu_seqlens.data_ptr<int32_t>(), B);
  const int64_t K = blocks.count();
  auto dx = at::empty_like(x);
  auto dy = at::empty_like(y);
  auto dgate = at::empty_like(gate);
  auto dshift = at::empty_like(scale);
  auto dscale = at::empty_like(scale);
  // per-block partial sums of dh, dh * xhat and dx * y
  auto partial = at::zeros({3, K, Dp}, x.options().dtype(at::kFloat));
  float* p_shift = partial.data_ptr<float>();
  float* p_scale = p_shift + K * Dp;
  float* p_gate = p_scale + K * Dp;
  const float* mp = mean.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  NIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "residual_adaln_bwd", [&] {
    const scalar_t* dxnp = dx_new.data_ptr<scalar_t>();
    const scalar_t* dhp = dh.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    const scalar_t* scp = scale.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* dyp = dy.data_ptr<scalar_t>();
    at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
      std::vector<float> work(4 * Dp);
      float *s1 = work.data(), *g = s1 + Dp, *xh = g + Dp, *dxh = xh + Dp;
      blocks.visit(kb, ke, [&](int64_t seg, int64_t r0, int64_t r1, int64_t k) {
        widen_row(scp, seg, D, 1.f, s1);
        widen_row(gp, seg, D, 0.f, g);
        float* acc_shift = p_shift + k * Dp;
        float* acc_scale = p_scale + k * Dp;
        float* acc_gate = p_gate + k * Dp;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * D;
          const scalar_t* dhr = dhp + r * D;
          const scalar_t* dxnr = dxnp + r * D;
          const scalar_t* yr = yp + r * D;
          cpu::prefetch_ahead(r, r1, D, {xr, dhr, dxnr, yr});
          const Vec8 mv(mp[r]), rv(rp[r]);
          float sum_dxh, sum_dxh_xh;
          cpu::reduce_sum2(D, [&](int64_t j, auto tag, Vec8& a, Vec8& b) {
            const int64_t c = j * kLanes;
            // x_new in fp32 as the forward formed it: the rounded x_new loses the row's
            // deviations from its mean when that mean dwarfs them (real residual streams)
            const Vec8 xn = gated_residual_elem(load_v(xr, j, D, tag), Vec8::loadu(g + c), load_v(yr, j, D, tag));
            const Vec8 xhat = ln_normalize(xn, mv, rv);
            const Vec8 gh = load_v(dhr, j, D, tag);  // zero in the padding, which then adds nothing
            const Vec8 dxhat = gh * Vec8::loadu(s1 + c);
            xhat.storeu(xh + c);
            dxhat.storeu(dxh + c);
            a += dxhat;
            b = cpu::fmadd(dxhat, xhat, b);
            (Vec8::loadu(acc_shift + c) + gh).storeu(acc_shift + c);
            cpu::fmadd(gh, xhat, Vec8::loadu(acc_scale + c)).storeu(acc_scale + c);
          }, &sum_dxh, &sum_dxh_xh);
          const Vec8 m1(sum_dxh / static_cast<float>(D)), m2(sum_dxh_xh / static_cast<float>(D));
          scalar_t* dxr = dxp + r * D;
          scalar_t* dyr = dyp + r * D;
          cpu::for_each_vec(D, [&](int64_t j, auto tag) {
            const int64_t c = j * kLanes;
            // the gradient of x_new: through h, plus the one that reached x_new directly
            const Vec8 d = ln_backward_elem(Vec8::loadu(dxh + c), Vec8::loadu(xh + c), rv, m1, m2) +
                           load_v(dxnr, j, D, tag);
            store_v(dxr, j, D, d, tag);
            store_v(dyr, j, D, d * Vec8::loadu(g + c), tag);
            cpu::fmadd(d, load_v(yr, j, D, tag), Vec8::loadu(acc_gate + c)).storeu(acc_gate + c);
          });
        }
      });
    });
    blocks.sum_per_image(p_shift, Dp, D, dshift.data_ptr<scalar_t>());
    blocks.sum_per_image(p_scale, Dp, D, dscale.data_ptr<scalar_t>());
    blocks.sum_per_image(p_gate, Dp, D, dgate.data_ptr<scalar_t>());
  });
  return {dx, dy, dgate, dshift, dscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(nit, CPU, m) {
  m.impl("adaln_modulate_fwd", &adaln_modulate_fwd_cpu);
  m.impl("adaln_modulate_bwd", &adaln_modulate_bwd_cpu);
  m.impl("residual_adaln_fwd", &residual_adaln_fwd_cpu);
  m.impl("residual_adaln_bwd", &residual_adaln_bwd_cpu);
}

}  // namespace cpu
}  // namespace nit
