// Torch glue of the CUDA kernels of the packed AdaLN ops (adaln.cu): checks (checks.h),
// allocation, launch on the current stream of the tensors' device.
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {

namespace adaln_modulate {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& shift,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& cu_seqlens, double eps) {
  check_cuda(x, "x");
  check_rows(x, "x", cu_seqlens, {{&shift, "shift"}, {&scale, "scale"}}, {}, true);
  const int64_t N = x.size(0), D = x.size(1);
  auto y = at::empty_like(x);
  auto mean = fp32_empty({N}, x), rstd = fp32_empty({N}, x);
  launch_on(x, "adaln_modulate_fwd", [&](cudaStream_t stream) {
    return cuda::adaln_modulate_fwd(dtype_of(x), x.data_ptr(), shift.data_ptr(), scale.data_ptr(),
                                    pack_of(cu_seqlens, N), D, static_cast<float>(eps),
                                    y.data_ptr(), f32(mean), f32(rstd), stream);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dy, const at::Tensor& x,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& mean,
                                                   const at::Tensor& rstd,
                                                   const at::Tensor& cu_seqlens) {
  check_cuda(x, "x");
  check_rows(x, "x", cu_seqlens, {{&scale, "scale"}}, {{&dy, "dy"}}, true);
  const int64_t N = x.size(0), D = x.size(1);
  check_fp32(mean, {N}, x, "mean");
  check_fp32(rstd, {N}, x, "rstd");
  const cuda::Pack pack = pack_of(cu_seqlens, N);
  auto dx = at::empty_like(x);
  auto dshift = at::empty_like(scale);
  auto dscale = at::empty_like(scale);
  auto ws = fp32_empty({cuda::adaln_modulate_bwd_workspace(pack, D)}, x);
  launch_on(x, "adaln_modulate_bwd", [&](cudaStream_t stream) {
    return cuda::adaln_modulate_bwd(dtype_of(x), dy.data_ptr(), x.data_ptr(), scale.data_ptr(),
                                    f32(mean), f32(rstd), pack, D, dx.data_ptr(),
                                    dshift.data_ptr(), dscale.data_ptr(), f32(ws), stream);
  });
  return {dx, dshift, dscale};
}

}  // namespace adaln_modulate

namespace residual_adaln {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const at::Tensor& cu_seqlens, double eps) {
  check_cuda(x, "x");
  check_rows(x, "x", cu_seqlens, {{&gate, "gate"}, {&shift, "shift"}, {&scale, "scale"}},
             {{&y, "y"}}, true);
  const int64_t N = x.size(0), D = x.size(1);
  auto x_new = at::empty_like(x);
  auto h = at::empty_like(x);
  auto mean = fp32_empty({N}, x), rstd = fp32_empty({N}, x);
  launch_on(x, "residual_adaln_fwd", [&](cudaStream_t stream) {
    return cuda::residual_adaln_fwd(dtype_of(x), x.data_ptr(), y.data_ptr(), gate.data_ptr(),
                                    shift.data_ptr(), scale.data_ptr(), pack_of(cu_seqlens, N), D,
                                    static_cast<float>(eps), x_new.data_ptr(), h.data_ptr(),
                                    f32(mean), f32(rstd), stream);
  });
  return {x_new, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dx_new, const at::Tensor& dh, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& cu_seqlens) {
  check_cuda(x, "x");
  check_rows(x, "x", cu_seqlens, {{&gate, "gate"}, {&scale, "scale"}},
             {{&y, "y"}, {&dx_new, "dx_new"}, {&dh, "dh"}}, true);
  const int64_t N = x.size(0), D = x.size(1);
  check_fp32(mean, {N}, x, "mean");
  check_fp32(rstd, {N}, x, "rstd");
  const cuda::Pack pack = pack_of(cu_seqlens, N);
  auto dx = at::empty_like(x);
  auto dy = at::empty_like(y);
  auto dgate = at::empty_like(gate);
  auto dshift = at::empty_like(scale);
  auto dscale = at::empty_like(scale);
  auto ws = fp32_empty({cuda::residual_adaln_bwd_workspace(pack, D)}, x);
  launch_on(x, "residual_adaln_bwd", [&](cudaStream_t stream) {
    return cuda::residual_adaln_bwd(dtype_of(x), dx_new.data_ptr(), dh.data_ptr(), x.data_ptr(),
                                    y.data_ptr(), gate.data_ptr(), scale.data_ptr(), f32(mean),
                                    f32(rstd), pack, D, dx.data_ptr(), dy.data_ptr(),
                                    dgate.data_ptr(), dshift.data_ptr(), dscale.data_ptr(),
                                    f32(ws), stream);
  });
  return {dx, dy, dgate, dshift, dscale};
}

}  // namespace residual_adaln

}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) {
  m.impl("adaln_modulate_fwd", &cuda_glue::adaln_modulate::fwd);
  m.impl("adaln_modulate_bwd", &cuda_glue::adaln_modulate::bwd);
  m.impl("residual_adaln_fwd", &cuda_glue::residual_adaln::fwd);
  m.impl("residual_adaln_bwd", &cuda_glue::residual_adaln::bwd);
}

}  // namespace nit
