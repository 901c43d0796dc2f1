// Torch glue of the CUDA qk_norm_rope kernels (qk_norm_rope.cu). LayerNorm weights and biases
// may come in any float dtype; the kernels read them as fp32 and their gradients are returned
// in the weights' dtype.
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {
namespace qk_norm_rope {

// q [N, H, Dh], k [N, Hk, Dh], one float dtype, Dh % 4 == 0 and <= kQkNormMaxHeadDim.
void check_qk(const at::Tensor& q, const at::Tensor& k, const char* q_name, const char* k_name,
              const at::Tensor& cu_seqlens, const at::Tensor& sizes) {
  check_cuda(q, q_name);
  check_float_input(q, q_name);
  check_float_input(k, k_name);
  check_like(k, q, k_name, q_name);
  TORCH_CHECK(q.dim() == 3, q_name, " must be [N, H, Dh], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2), k_name,
              " must be [N, Hk, Dh] with N and Dh of ", q_name, " ", q.sizes(), ", got shape ",
              k.sizes());
  const int64_t Dh = q.size(2);
  TORCH_CHECK(Dh % 4 == 0, "head_dim must be a multiple of 4 for axial 2D RoPE, got ", Dh);
  TORCH_CHECK(Dh <= cuda::kQkNormMaxHeadDim, "the CUDA qk_norm_rope kernel supports head_dim <= ",
              cuda::kQkNormMaxHeadDim, ", got ", Dh);
  check_cu_seqlens(cu_seqlens, q.size(0), q);
  check_sizes(sizes, cu_seqlens);
}

cuda::RopeArgs rope_args(const at::Tensor& sizes, const at::Tensor& freqs32,
                         std::string_view positions, double mscale) {
  return {sizes.data_ptr<int32_t>(), freqs32.data_ptr<float>(), official_positions(positions),
          static_cast<float>(mscale)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
    const at::Tensor& sizes, const at::Tensor& freqs, const at::Tensor& q_weight,
    const at::Tensor& q_bias, const at::Tensor& k_weight, const at::Tensor& k_bias, double eps,
    std::string_view positions, double mscale) {
  check_qk(q, k, "q", "k", cu_seqlens, sizes);
  const int64_t N = q.size(0), H = q.size(1), Hk = k.size(1), Dh = q.size(2);
  const at::Tensor f = fp32_param(freqs, {2, Dh / 4}, q, "freqs");
  const at::Tensor qw = fp32_param(q_weight, {Dh}, q, "q_weight");
  const at::Tensor qb = fp32_param(q_bias, {Dh}, q, "q_bias");
  const at::Tensor kw = fp32_param(k_weight, {Dh}, q, "k_weight");
  const at::Tensor kb = fp32_param(k_bias, {Dh}, q, "k_bias");
  const DeviceGuard guard(q.device());
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  const auto f32 = q.options().dtype(at::kFloat);
  auto q_mean = at::empty({N, H}, f32), q_rstd = at::empty({N, H}, f32);
  auto k_mean = at::empty({N, Hk}, f32), k_rstd = at::empty({N, Hk}, f32);
  check_launch(
      cuda::qk_norm_rope_fwd(dtype_of(q), q.data_ptr(), k.data_ptr(), pack_of(cu_seqlens, N), H,
                             Hk, Dh, rope_args(sizes, f, positions, mscale), qw.data_ptr<float>(),
                             qb.data_ptr<float>(), kw.data_ptr<float>(), kb.data_ptr<float>(),
                             static_cast<float>(eps), q_out.data_ptr(), k_out.data_ptr(),
                             q_mean.data_ptr<float>(), q_rstd.data_ptr<float>(),
                             k_mean.data_ptr<float>(), k_rstd.data_ptr<float>(),
                             current_stream()),
      "qk_norm_rope_fwd");
  return {q_out, k_out, q_mean, q_rstd, k_mean, k_rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dq_rot, const at::Tensor& dk_rot, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& cu_seqlens, const at::Tensor& sizes, const at::Tensor& freqs,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& q_mean,
    const at::Tensor& q_rstd, const at::Tensor& k_mean, const at::Tensor& k_rstd,
    std::string_view positions, double mscale) {
  check_qk(q, k, "q", "k", cu_seqlens, sizes);
  check_float_input(dq_rot, "dq_rot");
  check_float_input(dk_rot, "dk_rot");
  check_like(dq_rot, q, "dq_rot", "q");
  check_like(dk_rot, q, "dk_rot", "q");
  check_shape(dq_rot, q.sizes(), "dq_rot");
  check_shape(dk_rot, k.sizes(), "dk_rot");
  const int64_t N = q.size(0), H = q.size(1), Hk = k.size(1), Dh = q.size(2);
  check_stats(q_mean, {N, H}, q, "q_mean");
  check_stats(q_rstd, {N, H}, q, "q_rstd");
  check_stats(k_mean, {N, Hk}, q, "k_mean");
  check_stats(k_rstd, {N, Hk}, q, "k_rstd");
  const at::Tensor f = fp32_param(freqs, {2, Dh / 4}, q, "freqs");
  const at::Tensor qw = fp32_param(q_weight, {Dh}, q, "q_weight");
  const at::Tensor kw = fp32_param(k_weight, {Dh}, q, "k_weight");
  const DeviceGuard guard(q.device());
  const cuda::Pack pack = pack_of(cu_seqlens, N);
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  const auto f32 = q.options().dtype(at::kFloat);
  auto dparams = at::empty({4, Dh}, f32);  // dq_weight, dq_bias, dk_weight, dk_bias
  auto ws = at::empty({cuda::qk_norm_rope_bwd_workspace(pack, Dh)}, f32);
  check_launch(
      cuda::qk_norm_rope_bwd(dtype_of(q), dq_rot.data_ptr(), dk_rot.data_ptr(), q.data_ptr(),
                             k.data_ptr(), pack, H, Hk, Dh, rope_args(sizes, f, positions, mscale),
                             qw.data_ptr<float>(), kw.data_ptr<float>(),
                             q_mean.data_ptr<float>(), q_rstd.data_ptr<float>(),
                             k_mean.data_ptr<float>(), k_rstd.data_ptr<float>(), dq.data_ptr(),
                             dk.data_ptr(), dparams.data_ptr<float>(), ws.data_ptr<float>(),
                             current_stream()),
      "qk_norm_rope_bwd");
  // separate tensors (copies), in the parameters' dtypes: outputs must not alias each other
  const auto qt = q_weight.scalar_type(), kt = k_weight.scalar_type();
  return {dq, dk, dparams[0].to(qt, false, true), dparams[1].to(qt, false, true),
          dparams[2].to(kt, false, true), dparams[3].to(kt, false, true)};
}

}  // namespace qk_norm_rope
}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) {
  m.impl("qk_norm_rope_fwd", &cuda_glue::qk_norm_rope::fwd);
  m.impl("qk_norm_rope_bwd", &cuda_glue::qk_norm_rope::bwd);
}

}  // namespace nit
