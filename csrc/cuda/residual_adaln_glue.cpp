// Torch glue of the CUDA residual_adaln kernels (residual_adaln.cu).
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {
namespace residual_adaln {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const at::Tensor& cu_seqlens, double eps) {
  const int64_t B = check_token_matrix(x, "x", cu_seqlens, true);
  check_same_kind(y, "y", x, "x", x.sizes());
  check_same_kind(gate, "gate", x, "x", {B, x.size(1)});
  check_same_kind(shift, "shift", x, "x", {B, x.size(1)});
  check_same_kind(scale, "scale", x, "x", {B, x.size(1)});
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1);
  auto x_new = at::empty_like(x);
  auto h = at::empty_like(x);
  auto mean = at::empty({N}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));
  check_launch(cuda::residual_adaln_fwd(dtype_of(x), x.data_ptr(), y.data_ptr(), gate.data_ptr(),
                                        shift.data_ptr(), scale.data_ptr(),
                                        pack_of(cu_seqlens, N), D, static_cast<float>(eps),
                                        x_new.data_ptr(), h.data_ptr(), mean.data_ptr<float>(),
                                        rstd.data_ptr<float>(), current_stream()),
               "residual_adaln_fwd");
  return {x_new, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dx_new, const at::Tensor& dh, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& cu_seqlens) {
  const int64_t B = check_token_matrix(x, "x", cu_seqlens, true);
  check_same_kind(y, "y", x, "x", x.sizes());
  check_same_kind(dx_new, "dx_new", x, "x", x.sizes());
  check_same_kind(dh, "dh", x, "x", x.sizes());
  check_same_kind(gate, "gate", x, "x", {B, x.size(1)});
  check_same_kind(scale, "scale", x, "x", {B, x.size(1)});
  const int64_t N = x.size(0), D = x.size(1);
  check_stats(mean, {N}, x, "mean");
  check_stats(rstd, {N}, x, "rstd");
  const DeviceGuard guard(x.device());
  const cuda::Pack pack = pack_of(cu_seqlens, N);
  auto dx = at::empty_like(x);
  auto dy = at::empty_like(y);
  auto dgate = at::empty_like(gate);
  auto dshift = at::empty_like(scale);
  auto dscale = at::empty_like(scale);
  auto ws = at::empty({cuda::residual_adaln_bwd_workspace(pack, D)},
                      x.options().dtype(at::kFloat));
  check_launch(cuda::residual_adaln_bwd(dtype_of(x), dx_new.data_ptr(), dh.data_ptr(),
                                        x.data_ptr(), y.data_ptr(), gate.data_ptr(),
                                        scale.data_ptr(), mean.data_ptr<float>(),
                                        rstd.data_ptr<float>(), pack, D, dx.data_ptr(),
                                        dy.data_ptr(), dgate.data_ptr(), dshift.data_ptr(),
                                        dscale.data_ptr(), ws.data_ptr<float>(),
                                        current_stream()),
               "residual_adaln_bwd");
  return {dx, dy, dgate, dshift, dscale};
}

}  // namespace residual_adaln
}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) {
  m.impl("residual_adaln_fwd", &cuda_glue::residual_adaln::fwd);
  m.impl("residual_adaln_bwd", &cuda_glue::residual_adaln::bwd);
}

}  // namespace nit
