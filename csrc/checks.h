// Argument checks shared by the CPU and CUDA torch glue. Every message says what was
// expected and what came, so a wrong call fails before any kernel can read or write out of bounds.
#pragma once
#include <ATen/ATen.h>

#include <string>

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

}  // namespace nit
