// Torch glue of the CUDA adaln_modulate kernels (adaln_modulate.cu): checks, allocation, launch
// on the current stream of the tensors' device.
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {
namespace adaln_modulate {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& shift,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& cu_seqlens, double eps) {
  const int64_t B = check_token_matrix(x, "x", cu_seqlens, true);
  check_same_kind(shift, "shift", x, "x", {B, x.size(1)});
  check_same_kind(scale, "scale", x, "x", {B, x.size(1)});
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1);
  auto y = at::empty_like(x);
  auto mean = at::empty({N}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));
  check_launch(cuda::adaln_modulate_fwd(dtype_of(x), x.data_ptr(), shift.data_ptr(),
                                        scale.data_ptr(), pack_of(cu_seqlens, N), D,
                                        static_cast<float>(eps), y.data_ptr(),
                                        mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                        current_stream()),
               "adaln_modulate_fwd");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dy, const at::Tensor& x,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& mean,
                                                   const at::Tensor& rstd,
                                                   const at::Tensor& cu_seqlens) {
  const int64_t B = check_token_matrix(x, "x", cu_seqlens, true);
  check_same_kind(scale, "scale", x, "x", {B, x.size(1)});
  check_same_kind(dy, "dy", x, "x", x.sizes());
  const int64_t N = x.size(0), D = x.size(1);
  check_stats(mean, {N}, x, "mean");
  check_stats(rstd, {N}, x, "rstd");
  const DeviceGuard guard(x.device());
  const cuda::Pack pack = pack_of(cu_seqlens, N);
  auto dx = at::empty_like(x);
  auto dshift = at::empty_like(scale);
  auto dscale = at::empty_like(scale);
  auto ws = at::empty({cuda::adaln_modulate_bwd_workspace(pack, D)}, x.options().dtype(at::kFloat));
  check_launch(cuda::adaln_modulate_bwd(dtype_of(x), dy.data_ptr(), x.data_ptr(), scale.data_ptr(),
                                        mean.data_ptr<float>(), rstd.data_ptr<float>(), pack, D,
                                        dx.data_ptr(), dshift.data_ptr(), dscale.data_ptr(),
                                        ws.data_ptr<float>(), current_stream()),
               "adaln_modulate_bwd");
  return {dx, dshift, dscale};
}

}  // namespace adaln_modulate
}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) {
  m.impl("adaln_modulate_fwd", &cuda_glue::adaln_modulate::fwd);
  m.impl("adaln_modulate_bwd", &cuda_glue::adaln_modulate::bwd);
}

}  // namespace nit
