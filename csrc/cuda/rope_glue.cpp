// Torch glue of the CUDA kernels of axial 2D RoPE (rope.cu): rope_2d and qk_norm_rope.
// qk_norm_rope's LayerNorm weights and biases may come in any float dtype; the kernels read them
// as fp32 and their gradients are returned in the weights' dtype.
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

namespace qk_norm_rope {

// The RoPE arguments (checks.h) on the device, head_dim within the kernel's limit; the kernels'
// view of them, with freqs32 the fp32 copy of freqs.
RopeArgs check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                    const at::Tensor& sizes, c10::string_view positions) {
  check_cuda(q, "q");
  const RopeArgs a = check_rope(q, k, cu_seqlens, sizes, positions);
  check_head_dim_at_most(a.Dh, cuda::kQkNormMaxHeadDim, "CUDA qk_norm_rope");
  return a;
}

cuda::RopeArgs kernel_rope(const RopeArgs& a, const at::Tensor& sizes, const at::Tensor& freqs32,
                           double mscale) {
  return {sizes.data_ptr<int32_t>(), f32(freqs32), a.official, static_cast<float>(mscale)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
    const at::Tensor& sizes, const at::Tensor& freqs, const at::Tensor& q_weight,
    const at::Tensor& q_bias, const at::Tensor& k_weight, const at::Tensor& k_bias, double eps,
    c10::string_view positions, double mscale) {
  const RopeArgs a = check_args(q, k, cu_seqlens, sizes, positions);
  const int64_t N = a.N, H = q.size(1), Hk = k.size(1), Dh = a.Dh;
  const at::Tensor f = fp32_param(freqs, {2, Dh / 4}, q, "freqs");
  const at::Tensor qw = fp32_param(q_weight, {Dh}, q, "q_weight");
  const at::Tensor qb = fp32_param(q_bias, {Dh}, q, "q_bias");
  const at::Tensor kw = fp32_param(k_weight, {Dh}, q, "k_weight");
  const at::Tensor kb = fp32_param(k_bias, {Dh}, q, "k_bias");
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  auto q_mean = fp32_empty({N, H}, q), q_rstd = fp32_empty({N, H}, q);
  auto k_mean = fp32_empty({N, Hk}, q), k_rstd = fp32_empty({N, Hk}, q);
  launch_on(q, "qk_norm_rope_fwd", [&](cudaStream_t stream) {
    return cuda::qk_norm_rope_fwd(dtype_of(q), q.data_ptr(), k.data_ptr(), pack_of(cu_seqlens, N),
                                  H, Hk, Dh, kernel_rope(a, sizes, f, mscale), f32(qw), f32(qb),
                                  f32(kw), f32(kb), static_cast<float>(eps), q_out.data_ptr(),
                                  k_out.data_ptr(), f32(q_mean), f32(q_rstd), f32(k_mean),
                                  f32(k_rstd), stream);
  });
  return {q_out, k_out, q_mean, q_rstd, k_mean, k_rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dq_rot, const at::Tensor& dk_rot, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& cu_seqlens, const at::Tensor& sizes, const at::Tensor& freqs,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& q_mean,
    const at::Tensor& q_rstd, const at::Tensor& k_mean, const at::Tensor& k_rstd,
    c10::string_view positions, double mscale) {
  const RopeArgs a = check_args(q, k, cu_seqlens, sizes, positions);
  check_qk_grads(dq_rot, dk_rot, q, k);
  const int64_t N = a.N, H = q.size(1), Hk = k.size(1), Dh = a.Dh;
  check_fp32(q_mean, {N, H}, q, "q_mean");
  check_fp32(q_rstd, {N, H}, q, "q_rstd");
  check_fp32(k_mean, {N, Hk}, q, "k_mean");
  check_fp32(k_rstd, {N, Hk}, q, "k_rstd");
  const at::Tensor f = fp32_param(freqs, {2, Dh / 4}, q, "freqs");
  const at::Tensor qw = fp32_param(q_weight, {Dh}, q, "q_weight");
  const at::Tensor kw = fp32_param(k_weight, {Dh}, q, "k_weight");
  const cuda::Pack pack = pack_of(cu_seqlens, N);
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dparams = fp32_empty({4, Dh}, q);  // dq_weight, dq_bias, dk_weight, dk_bias
  auto ws = fp32_empty({cuda::qk_norm_rope_bwd_workspace(pack, Dh)}, q);
  launch_on(q, "qk_norm_rope_bwd", [&](cudaStream_t stream) {
    return cuda::qk_norm_rope_bwd(dtype_of(q), dq_rot.data_ptr(), dk_rot.data_ptr(), q.data_ptr(),
                                  k.data_ptr(), pack, H, Hk, Dh, kernel_rope(a, sizes, f, mscale),
                                  f32(qw), f32(kw), f32(q_mean), f32(q_rstd), f32(k_mean),
                                  f32(k_rstd), dq.data_ptr(), dk.data_ptr(), f32(dparams),
                                  f32(ws), stream);
  });
  // separate tensors (copies), in the parameters' dtypes: outputs must not alias each other
  const auto qt = q_weight.scalar_type(), kt = k_weight.scalar_type();
  return {dq, dk, dparams[0].to(qt, false, true), dparams[1].to(qt, false, true),
          dparams[2].to(kt, false, true), dparams[3].to(kt, false, true)};
}

}  // namespace qk_norm_rope

}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) {
  m.impl("rope_2d", &cuda_glue::rope_2d::run);
  m.impl("qk_norm_rope_fwd", &cuda_glue::qk_norm_rope::fwd);
  m.impl("qk_norm_rope_bwd", &cuda_glue::qk_norm_rope::bwd);
}

}  // namespace nit
