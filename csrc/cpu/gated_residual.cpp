// CPU kernels of gated_residual: out = x + gate[seg] * y, and its backward.
// Rows are visited image by image, so gate rows are gathered by segment (widened to fp32 once
// per image) and no per-token conditioning tensor exists. Each row is read and written once.
// The per-image reduction of dgate sums the fixed row blocks of row_blocks.h in block order, so
// results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

at::Tensor gated_residual_fwd_cpu(const at::Tensor& x, const at::Tensor& y,
                                  const at::Tensor& gate, const at::Tensor& cu_seqlens) {
  const int64_t B = check_rows(x, "x", cu_seqlens, {{&gate, "gate"}}, {{&y, "y"}});
  auto out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1), Dp = cpu::padded(D);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  NIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gated_residual_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> g(Dp);
      auto enter = [&](int seg) { cpu::widen_row(gp, seg, D, 0.f, g.data()); };
      cpu::for_rows(cu, static_cast<int>(B), begin, end, enter, [&](int64_t r) {
        const scalar_t* xr = xp + r * D;
        const scalar_t* yr = yp + r * D;
        scalar_t* orow = op + r * D;
        cpu::prefetch_ahead(r, end, D, {xr, yr});
        cpu::for_each_vec(D, [&](int64_t j, auto tag) {
          const Vec8 gj = Vec8::loadu(g.data() + j * kLanes);
          store_v(orow, j, D, gated_residual_elem(load_v(xr, j, D, tag), gj, load_v(yr, j, D, tag)), tag);
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& dout,
                                                          const at::Tensor& y,
                                                          const at::Tensor& gate,
                                                          const at::Tensor& cu_seqlens) {
  const int64_t B = check_rows(y, "y", cu_seqlens, {{&gate, "gate"}}, {{&dout, "dout"}});
  const int64_t D = y.size(1), Dp = cpu::padded(D);
  const cpu::ImageBlocks blocks(cu_seqlens.data_ptr<int32_t>(), B);
  auto dy = at::empty_like(y);
  auto dgate = at::empty_like(gate);
  auto partial = at::zeros({blocks.count(), Dp}, y.options().dtype(at::kFloat));  // sums of dout*y
  float* pp = partial.data_ptr<float>();
  NIT_DISPATCH_FLOAT_TYPES(y.scalar_type(), "gated_residual_bwd", [&] {
    const scalar_t* dp = dout.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    scalar_t* dyp = dy.data_ptr<scalar_t>();
    at::parallel_for(0, blocks.count(), 1, [&](int64_t kb, int64_t ke) {
      std::vector<float> g(Dp);
      blocks.visit(kb, ke, [&](int64_t seg, int64_t r0, int64_t r1, int64_t k) {
        cpu::widen_row(gp, seg, D, 0.f, g.data());
        float* acc = pp + k * Dp;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* dr = dp + r * D;
          const scalar_t* yr = yp + r * D;
          scalar_t* dyr = dyp + r * D;
          cpu::prefetch_ahead(r, r1, D, {dr, yr});
          cpu::for_each_vec(D, [&](int64_t j, auto tag) {
            const int64_t c = j * kLanes;
            const Vec8 d = load_v(dr, j, D, tag);
            store_v(dyr, j, D, d * Vec8::loadu(g.data() + c), tag);
            cpu::fmadd(d, load_v(yr, j, D, tag), Vec8::loadu(acc + c)).storeu(acc + c);
          });
        }
      });
    });
    blocks.sum_per_image(pp, Dp, D, dgate.data_ptr<scalar_t>());
  });
  return {dy, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(nit, CPU, m) {
  m.impl("gated_residual_fwd", &gated_residual_fwd_cpu);
  m.impl("gated_residual_bwd", &gated_residual_bwd_cpu);
}

}  // namespace cpu
}  // namespace nit
