// Torch glue of the CUDA rope_2d kernel (rope_2d.cu).
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {
namespace rope_2d {

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& cu_seqlens, const at::Tensor& sizes,
                                       const at::Tensor& freqs, c10::string_view positions,
                                       double mscale, bool inverse) {
  check_cuda(q, "q");
  const RopeArgs a = check_rope(q, k, cu_seqlens, sizes, positions);
  const at::Tensor f = fp32_param(freqs, {2, a.Dh / 4}, q, "freqs");
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  const cuda::RopeArgs rope{sizes.data_ptr<int32_t>(), f32(f), a.official,
                            static_cast<float>(mscale)};
  launch_on(q, "rope_2d", [&](cudaStream_t stream) {
    return cuda::rope_2d(dtype_of(q), q.data_ptr(), k.data_ptr(), pack_of(cu_seqlens, a.N),
                         q.size(1), k.size(1), a.Dh, rope, inverse, q_out.data_ptr(),
                         k_out.data_ptr(), stream);
  });
  return {q_out, k_out};
}

}  // namespace rope_2d
}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) { m.impl("rope_2d", &cuda_glue::rope_2d::run); }

}  // namespace nit
