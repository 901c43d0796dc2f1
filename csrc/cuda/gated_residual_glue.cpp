// Torch glue of the CUDA gated_residual kernels (gated_residual.cu).
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {
namespace gated_residual {

void check_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                const at::Tensor& cu_seqlens, const char* x_name) {
  const int64_t B = check_token_matrix(x, x_name, cu_seqlens, false);
  check_same_kind(y, "y", x, x_name, x.sizes());
  check_same_kind(gate, "gate", x, x_name, {B, x.size(1)});
}

at::Tensor fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
               const at::Tensor& cu_seqlens) {
  check_args(x, y, gate, cu_seqlens, "x");
  const DeviceGuard guard(x.device());
  auto out = at::empty_like(x);
  check_launch(cuda::gated_residual_fwd(dtype_of(x), x.data_ptr(), y.data_ptr(), gate.data_ptr(),
                                        pack_of(cu_seqlens, x.size(0)), x.size(1), out.data_ptr(),
                                        current_stream()),
               "gated_residual_fwd");
  return out;
}

std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& y,
                                       const at::Tensor& gate, const at::Tensor& cu_seqlens) {
  check_args(dout, y, gate, cu_seqlens, "dout");
  const DeviceGuard guard(y.device());
  const cuda::Pack pack = pack_of(cu_seqlens, y.size(0));
  const int64_t D = y.size(1);
  auto dy = at::empty_like(y);
  auto dgate = at::empty_like(gate);
  auto ws = at::empty({cuda::gated_residual_bwd_workspace(pack, D)}, y.options().dtype(at::kFloat));
  check_launch(cuda::gated_residual_bwd(dtype_of(y), dout.data_ptr(), y.data_ptr(), gate.data_ptr(),
                                        pack, D, dy.data_ptr(), dgate.data_ptr(),
                                        ws.data_ptr<float>(), current_stream()),
               "gated_residual_bwd");
  return {dy, dgate};
}

}  // namespace gated_residual
}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) {
  m.impl("gated_residual_fwd", &cuda_glue::gated_residual::fwd);
  m.impl("gated_residual_bwd", &cuda_glue::gated_residual::bwd);
}

}  // namespace nit
