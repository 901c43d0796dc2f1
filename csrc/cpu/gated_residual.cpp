// CPU kernels of gated_residual: out = x + gate[seg] * y, and its backward.
// Rows are visited image by image, so gate rows are gathered by segment and no per-token
// conditioning tensor exists. The per-image reduction of dgate sums fixed blocks of rows in a
// fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "common/segments.h"

namespace nit {
namespace {

constexpr int64_t kRowBlock = 64;  // rows per reduction block (fixed: keeps sums deterministic)

void check_gated(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                 const at::Tensor& cu) {
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [N, D], got shape ", x.sizes());
  check_float_input(y, "y");
  check_float_input(gate, "gate");
  check_like(y, x, "y", "x");
  check_like(gate, x, "gate", "x");
  check_shape(y, x.sizes(), "y");
  const int64_t B = check_cu_seqlens(cu, x.size(0), x);
  check_shape(gate, {B, x.size(1)}, "gate");
}

at::Tensor gated_residual_fwd_cpu(const at::Tensor& x, const at::Tensor& y,
                                  const at::Tensor& gate, const at::Tensor& cu_seqlens) {
  check_gated(x, y, gate, cu_seqlens);
  auto out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1);
  const int B = static_cast<int>(cu_seqlens.numel() - 1);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_residual_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      int seg = find_segment(cu, B, begin);
      for (int64_t r = begin; r < end; ++r) {
        while (r >= cu[seg + 1]) ++seg;
        const scalar_t* xr = xp + r * D;
        const scalar_t* yr = yp + r * D;
        const scalar_t* gr = gp + seg * D;
        scalar_t* orow = op + r * D;
        for (int64_t c = 0; c < D; ++c) {
          orow[c] = static_cast<scalar_t>(static_cast<float>(xr[c]) +
                                          static_cast<float>(gr[c]) * static_cast<float>(yr[c]));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& dout,
                                                          const at::Tensor& y,
                                                          const at::Tensor& gate,
                                                          const at::Tensor& cu_seqlens) {
  check_gated(dout, y, gate, cu_seqlens);
  const int64_t N = y.size(0), D = y.size(1);
  const int B = static_cast<int>(cu_seqlens.numel() - 1);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  auto dy = at::empty_like(y);
  // Blocks of kRowBlock rows that never straddle two images: block j of image b starts at
  // cu[b] + j*kRowBlock. partial[k] is the fp32 sum of dout*y over block k.
  std::vector<int64_t> block_start(B + 1, 0);
  for (int b = 0; b < B; ++b) {
    const int64_t len = cu[b + 1] - cu[b];
    block_start[b + 1] = block_start[b] + (len + kRowBlock - 1) / kRowBlock;
  }
  const int64_t num_blocks = block_start[B];
  auto partial = at::zeros({num_blocks, D}, y.options().dtype(at::kFloat));
  float* pp = partial.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gated_residual_bwd", [&] {
    const scalar_t* dp = dout.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    scalar_t* dyp = dy.data_ptr<scalar_t>();
    at::parallel_for(0, num_blocks, 1, [&](int64_t kb, int64_t ke) {
      int seg = 0;
      for (int64_t k = kb; k < ke; ++k) {
        while (k >= block_start[seg + 1]) ++seg;
        const int64_t r0 = cu[seg] + (k - block_start[seg]) * kRowBlock;
        const int64_t r1 = std::min<int64_t>(r0 + kRowBlock, cu[seg + 1]);
        const scalar_t* gr = gp + seg * D;
        float* acc = pp + k * D;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* dr = dp + r * D;
          const scalar_t* yr = yp + r * D;
          scalar_t* dyr = dyp + r * D;
          for (int64_t c = 0; c < D; ++c) {
            const float d = static_cast<float>(dr[c]);
            dyr[c] = static_cast<scalar_t>(d * static_cast<float>(gr[c]));
            acc[c] += d * static_cast<float>(yr[c]);
          }
        }
      }
    });
  });
  // Combine the blocks of each image in order (deterministic).
  auto dgate32 = at::zeros({B, D}, y.options().dtype(at::kFloat));
  float* gacc = dgate32.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t k = block_start[b]; k < block_start[b + 1]; ++k) {
        for (int64_t c = 0; c < D; ++c) gacc[b * D + c] += pp[k * D + c];
      }
    }
  });
  return {dy, dgate32.to(y.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nit, CPU, m) {
  m.impl("gated_residual_fwd", &gated_residual_fwd_cpu);
  m.impl("gated_residual_bwd", &gated_residual_bwd_cpu);
}

}  // namespace nit
