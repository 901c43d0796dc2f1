// Torch glue of the CUDA varlen attention kernels (attention.cu, attention_bwd.cu).
// cu_seqlens stays on the device (reading it here would synchronise the stream in every call):
// the kernels schedule the tiles that cu_seqlens describes, so a max_seqlen smaller than a real
// sequence cannot leave rows unwritten; it is only checked to be >= 0. q, k, v may be strided
// views (e.g. qkv.view(N, 3, H, D).unbind(1)) with a contiguous last dim: no copy is made.
#include <torch/library.h>

#include "cuda/glue.h"

namespace nit {
namespace cuda_glue {
namespace varlen_attention {

constexpr int64_t kMaxGridDim = 65535;  // heads index grid dim y

// q, k, v: a float dtype and a contiguous last dim; the token and head strides are passed on.
void check_attn_input(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(t.dim() == 3, name, " must be [N, H, D], got shape ", t.sizes());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides());
  TORCH_CHECK(t.stride(0) >= 0 && t.stride(1) >= 0, name,
              " must have non-negative strides, got ", t.strides());
}

cuda::AttnArgs check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                          int64_t max_k, double softmax_scale, bool causal) {
  check_cuda(q, "q");
  check_attn_input(q, "q");
  check_attn_input(k, "k");
  check_attn_input(v, "v");
  check_like(k, q, "k", "q");
  check_like(v, q, "v", "q");
  const int64_t H = q.size(1), Hk = k.size(1), D = q.size(2);
  TORCH_CHECK(k.size(2) == D && v.size(2) == D, "q, k, v must share head_dim, got ", D, ", ",
              k.size(2), ", ", v.size(2));
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == Hk, "v must have k's tokens and heads ",
              k.sizes().slice(0, 2), ", got ", v.sizes().slice(0, 2));
  TORCH_CHECK(D >= 1 && D <= cuda::kAttnMaxHeadDim,
              "the CUDA attention kernel supports head_dim 1..", cuda::kAttnMaxHeadDim, ", got ", D);
  check_attention_heads(H, Hk);
  TORCH_CHECK(H <= kMaxGridDim, "at most ", kMaxGridDim, " heads are supported, got ", H);
  const int64_t B = check_cu_seqlens_qk(cu_q, cu_k, q, k);
  TORCH_CHECK(max_q >= 0 && max_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ", max_q,
              " and ", max_k);
  cuda::AttnArgs a;
  a.cu_q = cu_q.data_ptr<int32_t>();
  a.cu_k = cu_k.data_ptr<int32_t>();
  a.num_seqs = static_cast<int>(B);
  a.nq = q.size(0);
  a.nk = k.size(0);
  a.max_seqlen_q = max_q;
  a.max_seqlen_k = max_k;
  a.H = H;
  a.Hk = Hk;
  a.D = D;
  a.q_row = q.stride(0);
  a.q_head = q.stride(1);
  a.k_row = k.stride(0);
  a.k_head = k.stride(1);
  a.v_row = v.stride(0);
  a.v_head = v.stride(1);
  a.softmax_scale = static_cast<float>(softmax_scale);
  a.causal = causal;
  return a;
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& cu_q,
                                       const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                                       double softmax_scale, bool causal) {
  const cuda::AttnArgs a = check_args(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal);
  auto out = at::empty(q.sizes(), q.options());  // contiguous whatever q's strides
  auto lse = fp32_empty({a.H, a.nq}, q);
  auto ws = fp32_empty({cuda::varlen_attention_fwd_workspace(dtype_of(q), a)}, q);
  launch_on(q, "varlen_attention_fwd", [&](cudaStream_t stream) {
    return cuda::varlen_attention_fwd(dtype_of(q), q.data_ptr(), k.data_ptr(), v.data_ptr(), a,
                                      out.data_ptr(), f32(lse), f32(ws), stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, double softmax_scale, bool causal) {
  const cuda::AttnArgs a = check_args(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal);
  check_attention_saved(dout, out, lse, q, q.sizes());
  auto dq = at::empty(q.sizes(), q.options());  // contiguous whatever q, k, v's strides
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto ws = fp32_empty({cuda::varlen_attention_bwd_workspace(dtype_of(q), a)}, q);
  launch_on(q, "varlen_attention_bwd", [&](cudaStream_t stream) {
    return cuda::varlen_attention_bwd(dtype_of(q), dout.data_ptr(), q.data_ptr(), k.data_ptr(),
                                      v.data_ptr(), out.data_ptr(), f32(lse), a, dq.data_ptr(),
                                      dk.data_ptr(), dv.data_ptr(), f32(ws), stream);
  });
  return {dq, dk, dv};
}

}  // namespace varlen_attention
}  // namespace cuda_glue

NIT_CUDA_GLUE_IMPL(m) {
  m.impl("varlen_attention_fwd", &cuda_glue::varlen_attention::fwd);
  m.impl("varlen_attention_bwd", &cuda_glue::varlen_attention::bwd);
}

}  // namespace nit
