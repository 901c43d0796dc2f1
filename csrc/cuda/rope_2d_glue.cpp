// Torch glue of the CUDA rope_2d kernel (rope_2d.cu).
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {
namespace rope_2d {

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& cu_seqlens, const at::Tensor& sizes,
                                       const at::Tensor& freqs, std::string_view positions,
                                       double mscale, bool inverse) {
  check_cuda(q, "q");
  check_float_input(q, "q");
  check_float_input(k, "k");
  check_like(k, q, "k", "q");
  TORCH_CHECK(q.dim() == 3, "q must be [N, H, Dh], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "k must be [N, Hk, Dh] with q's N and Dh ", q.sizes(), ", got shape ", k.sizes());
  const int64_t N = q.size(0), Dh = q.size(2);
  TORCH_CHECK(Dh % 4 == 0, "head_dim must be a multiple of 4 for axial 2D RoPE, got ", Dh);
  check_cu_seqlens(cu_seqlens, N, q);
  check_sizes(sizes, cu_seqlens);
  const at::Tensor f = fp32_param(freqs, {2, Dh / 4}, q, "freqs");
  const DeviceGuard guard(q.device());
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  const cuda::RopeArgs rope{sizes.data_ptr<int32_t>(), f.data_ptr<float>(),
                            official_positions(positions), static_cast<float>(mscale)};
  check_launch(cuda::rope_2d(dtype_of(q), q.data_ptr(), k.data_ptr(), pack_of(cu_seqlens, N),
                             q.size(1), k.size(1), Dh, rope, inverse, q_out.data_ptr(),
                             k_out.data_ptr(), current_stream()),
               "rope_2d");
  return {q_out, k_out};
}

}  // namespace rope_2d
}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) { m.impl("rope_2d", &cuda_glue::rope_2d::run); }

}  // namespace nit
