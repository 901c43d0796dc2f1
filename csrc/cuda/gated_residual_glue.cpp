// Torch glue of the CUDA gated_residual kernels (gated_residual.cu).
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {
namespace gated_residual {

at::Tensor fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
               const at::Tensor& cu_seqlens) {
  check_cuda(x, "x");
  check_rows(x, "x", cu_seqlens, {{&gate, "gate"}}, {{&y, "y"}});
  auto out = at::empty_like(x);
  launch_on(x, "gated_residual_fwd", [&](cudaStream_t stream) {
    return cuda::gated_residual_fwd(dtype_of(x), x.data_ptr(), y.data_ptr(), gate.data_ptr(),
                                    pack_of(cu_seqlens, x.size(0)), x.size(1), out.data_ptr(),
                                    stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& y,
                                       const at::Tensor& gate, const at::Tensor& cu_seqlens) {
  check_cuda(dout, "dout");
  check_rows(dout, "dout", cu_seqlens, {{&gate, "gate"}}, {{&y, "y"}});
  const cuda::Pack pack = pack_of(cu_seqlens, y.size(0));
  const int64_t D = y.size(1);
  auto dy = at::empty_like(y);
  auto dgate = at::empty_like(gate);
  auto ws = fp32_empty({cuda::gated_residual_bwd_workspace(pack, D)}, y);
  launch_on(y, "gated_residual_bwd", [&](cudaStream_t stream) {
    return cuda::gated_residual_bwd(dtype_of(y), dout.data_ptr(), y.data_ptr(), gate.data_ptr(),
                                    pack, D, dy.data_ptr(), dgate.data_ptr(), f32(ws), stream);
  });
  return {dy, dgate};
}

}  // namespace gated_residual
}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) {
  m.impl("gated_residual_fwd", &cuda_glue::gated_residual::fwd);
  m.impl("gated_residual_bwd", &cuda_glue::gated_residual::bwd);
}

}  // namespace nit
