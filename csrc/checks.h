// Argument checks shared by the CPU and CUDA torch glue (csrc/cpu/*.cpp, csrc/cuda/*_glue.cpp):
// the one place that says what every op accepts. Every message says what was expected and what
// came, so a wrong call fails before any kernel can read or write out of bounds. Device checks
// (CPU or CUDA) stay with each backend's glue.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <utility>

namespace nit {

inline void check_float_input(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (got strides ", t.strides(),
              " for shape ", t.sizes(), ")");
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

// cu_seqlens: int32 [B+1] on the device of `ref`, cu[0] == 0, non-decreasing, cu[B] == n_tokens.
// The contents are checked where they live on the host (CPU tensors); CUDA callers validate on
// the host once per pack (PackedSeqs) instead of synchronising in every op.
inline int64_t check_cu_seqlens(const at::Tensor& cu, int64_t n_tokens, const at::Tensor& ref,
                                const char* name = "cu_seqlens") {
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, name,
              " must be 1-D with B+1 >= 2 entries, got shape ", cu.sizes());
  TORCH_CHECK(cu.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(cu.device() == ref.device(), name, " is on ", cu.device(),
              " but the data is on ", ref.device());
  const int64_t num_seqs = cu.numel() - 1;
  if (cu.device().is_cpu()) {
    const int32_t* c = cu.data_ptr<int32_t>();
    TORCH_CHECK(c[0] == 0, name, "[0] must be 0, got ", c[0]);
    for (int64_t i = 0; i < num_seqs; ++i) {
      TORCH_CHECK(c[i + 1] >= c[i], name, " must be non-decreasing, but ", name, "[", i + 1,
                  "]=", c[i + 1], " < ", name, "[", i, "]=", c[i]);
    }
    TORCH_CHECK(c[num_seqs] == n_tokens, name, "[-1]=", c[num_seqs],
                " must equal the number of tokens ", n_tokens);
  }
  return num_seqs;
}

// sizes: int32 [B, 2] of (h, w) with h*w equal to the segment lengths of cu_seqlens (host-checked).
inline void check_sizes(const at::Tensor& sizes, const at::Tensor& cu, const char* name = "sizes") {
  const int64_t num_seqs = cu.numel() - 1;
  TORCH_CHECK(sizes.scalar_type() == at::kInt, name, " must be int32, got ", sizes.scalar_type());
  TORCH_CHECK(sizes.dim() == 2 && sizes.size(0) == num_seqs && sizes.size(1) == 2, name,
              " must have shape [", num_seqs, ", 2], got ", sizes.sizes());
  TORCH_CHECK(sizes.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(sizes.device() == cu.device(), name, " is on ", sizes.device(),
              " but cu_seqlens is on ", cu.device());
  if (sizes.device().is_cpu()) {
    const int32_t* s = sizes.data_ptr<int32_t>();
    const int32_t* c = cu.data_ptr<int32_t>();
    for (int64_t i = 0; i < num_seqs; ++i) {
      TORCH_CHECK(s[2 * i] > 0 && s[2 * i + 1] > 0, name, "[", i, "]=(", s[2 * i], ", ",
                  s[2 * i + 1], ") must be positive");
      TORCH_CHECK(int64_t(s[2 * i]) * s[2 * i + 1] == int64_t(c[i + 1]) - c[i], name, "[", i,
                  "]=(", s[2 * i], ", ", s[2 * i + 1], ") holds ",
                  int64_t(s[2 * i]) * s[2 * i + 1], " tokens but cu_seqlens gives ",
                  int64_t(c[i + 1]) - c[i]);
    }
  }
}

// Saved fp32 statistics and fp32 parameter tables: dtype, shape, contiguity, device of `ref`.
inline void check_fp32(const at::Tensor& t, at::IntArrayRef expected, const at::Tensor& ref,
                       const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  check_shape(t, expected, name);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (got strides ", t.strides(), ")");
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the data is on ",
              ref.device());
}

// Small parameter tables (freqs, LayerNorm weights) where any float dtype is accepted: the
// given shape, on ref's device; returns an fp32 contiguous copy (or t itself when it is one).
inline at::Tensor fp32_param(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& ref,
                             const char* name) {
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the data is on ",
              ref.device());
  check_shape(t, shape, name);
  return t.to(at::kFloat).contiguous();
}

// t has x's float dtype and device and the given shape ([N, D] per token or [B, D] per image).
inline void check_same_kind(const at::Tensor& t, const char* name, const at::Tensor& x,
                            const char* x_name, at::IntArrayRef shape) {
  check_float_input(t, name);
  check_like(t, x, name, x_name);
  check_shape(t, shape, name);
}

using Named = std::pair<const at::Tensor*, const char*>;

// The row-wise ops of the AdaLN family: x [N, D] (named x_name) with its cu_seqlens, per-image
// rows [B, D] like x (shift, scale, gate) and token tensors [N, D] like x; returns B.
// needs_columns: the op normalises rows, so D == 0 is refused.
inline int64_t check_rows(const at::Tensor& x, const char* x_name, const at::Tensor& cu,
                          std::initializer_list<Named> per_image,
                          std::initializer_list<Named> per_token = {}, bool needs_columns = false) {
  check_float_input(x, x_name);
  TORCH_CHECK(x.dim() == 2, x_name, " must be [N, D], got shape ", x.sizes());
  TORCH_CHECK(!needs_columns || x.size(1) > 0, x_name,
              " must have at least one column to normalise, got shape ", x.sizes());
  const int64_t B = check_cu_seqlens(cu, x.size(0), x);
  for (const auto& [t, name] : per_image) check_same_kind(*t, name, x, x_name, {B, x.size(1)});
  for (const auto& [t, name] : per_token) check_same_kind(*t, name, x, x_name, x.sizes());
  return B;
}

// q [N, H, Dh] and k [N, Hk, Dh] of the RoPE ops: same dtype, device, N and Dh; Dh % 4 == 0.
inline void check_qk(const at::Tensor& q, const at::Tensor& k, const char* q_name = "q",
                     const char* k_name = "k") {
  check_float_input(q, q_name);
  check_float_input(k, k_name);
  check_like(k, q, k_name, q_name);
  TORCH_CHECK(q.dim() == 3, q_name, " must be [N, H, Dh], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, k_name, " must be [N, Hk, Dh], got shape ", k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), k_name,
              " must have the tokens and head_dim of ", q_name, " [", q.size(0), ", Hk, ", q.size(2),
              "], got shape ", k.sizes());
  TORCH_CHECK(q.size(2) > 0 && q.size(2) % 4 == 0,
              "head_dim must be a positive multiple of 4 for axial 2D RoPE, got ", q.size(2));
}

// positions of the RoPE ops: "grid" or "official"; returns true for "official".
inline bool check_positions(c10::string_view positions) {
  TORCH_CHECK(positions == "grid" || positions == "official",
              "positions must be \"grid\" or \"official\", got \"", std::string(positions), "\"");
  return positions == "official";
}

// The packing arguments of the RoPE ops: q, k (check_qk), cu_seqlens, sizes and positions.
struct RopeArgs {
  int64_t N, B, Dh;
  bool official;
};
inline RopeArgs check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu,
                           const at::Tensor& sizes, c10::string_view positions) {
  check_qk(q, k);
  const int64_t B = check_cu_seqlens(cu, q.size(0), q);
  check_sizes(sizes, cu);
  return {q.size(0), B, q.size(2), check_positions(positions)};
}

// Gradients of the RoPE ops' q_rot, k_rot: dtype and device of q, shapes of q and k.
inline void check_qk_grads(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& q,
                           const at::Tensor& k) {
  check_same_kind(dq, "dq_rot", q, "q", q.sizes());
  check_same_kind(dk, "dk_rot", q, "q", k.sizes());
}

// A kernel's largest head_dim (csrc/cuda/launchers.h states the limits of the CUDA kernels).
inline void check_head_dim_at_most(int64_t head_dim, int64_t limit, const char* kernel) {
  TORCH_CHECK(head_dim <= limit, "the ", kernel, " kernel supports head_dim <= ", limit, ", got ",
              head_dim);
}

// Heads of varlen attention: q has H heads, k and v Hk, with H a positive multiple of Hk.
inline void check_attention_heads(int64_t H, int64_t Hk) {
  TORCH_CHECK(H >= 1 && Hk >= 1 && H % Hk == 0, "q heads (", H,
              ") must be a positive multiple of k/v heads (", Hk, ")");
}

// cu_seqlens_q of q and cu_seqlens_k of k, describing the same number of images; returns B.
inline int64_t check_cu_seqlens_qk(const at::Tensor& cu_q, const at::Tensor& cu_k,
                                   const at::Tensor& q, const at::Tensor& k) {
  const int64_t B = check_cu_seqlens(cu_q, q.size(0), q, "cu_seqlens_q");
  const int64_t Bk = check_cu_seqlens(cu_k, k.size(0), q, "cu_seqlens_k");
  TORCH_CHECK(B == Bk, "cu_seqlens_q and cu_seqlens_k must describe the same number of "
              "sequences, got ", B, " and ", Bk);
  return B;
}

// out and dout of the attention backward: [Nq, H, Dv] like q; lse fp32 [H, Nq].
inline void check_attention_saved(const at::Tensor& dout, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef out_shape) {
  check_same_kind(dout, "dout", q, "q", out_shape);
  check_same_kind(out, "out", q, "q", out_shape);
  check_fp32(lse, {out_shape[1], out_shape[0]}, q, "lse");
}

}  // namespace nit
