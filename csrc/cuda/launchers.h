// Host interface of the CUDA kernels: plain functions on raw device pointers, sizes and a
// stream. This header needs only the CUDA runtime API, so the kernels (.cu) compile with plain
// nvcc and the torch glue (<family>_glue.cpp) stays thin: it checks arguments, allocates outputs
// and workspaces with torch's caching allocator, and calls one of these on the current stream.
//
// Conventions shared by every launcher:
//   - tensors are contiguous and row-major; x [N, D], per-image rows [B, D], q [N, H, Dh]
//     (attention inputs may be strided views, see AttnArgs);
//   - cu_seqlens int32 [B+1] and sizes int32 [B, 2] live on the device; they are trusted (the
//     host validates them once per pack), but kernels clamp every row index to [0, N) so a bad
//     cu_seqlens gives wrong numbers, never an out-of-bounds access;
//   - statistics (mean, rstd, lse) and workspaces are fp32; all math is fp32;
//   - the return value is the first CUDA error met (cudaSuccess otherwise); launches are async.
#pragma once
#include <stdint.h>

#include <tuple>

namespace nit {
namespace cuda {

// ---- head-dim limits of the kernels: the one statement of them -------------------------------
// The glue refuses a larger head_dim with a clear error, the launchers return
// cudaErrorInvalidValue, and the extension reports them to Python (op nit::limits; the CPU
// kernels have no such limits). attention: tiles padded to 64, 80 or 128 columns (attention_tile.cuh);
// qk_norm_rope: at most 4 pairs per lane of a warp (rope.cu).
constexpr int64_t kAttnMaxHeadDim = 128;
constexpr int64_t kQkNormMaxHeadDim = 256;

// The value of op nit::limits() -> (varlen_attention_max_head_dim, qk_norm_rope_max_head_dim).
inline std::tuple<int64_t, int64_t> limits() { return {kAttnMaxHeadDim, kQkNormMaxHeadDim}; }

}  // namespace cuda
}  // namespace nit

// The rest needs the CUDA runtime API; registration.cpp, built without CUDA too, reads only the
// limits above (it defines NIT_CUDA_LIMITS_ONLY).
#if !defined(NIT_CUDA_LIMITS_ONLY)
#include <cuda_runtime_api.h>
#if defined(NIT_CUDA_SIM) && !defined(__CUDACC__)
#include "sim/runtime.h"
#endif
#include <stddef.h>

namespace nit {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Packing metadata as the kernels see it.
struct Pack {
  const int32_t* cu_seqlens;  // [B+1]
  int num_seqs;               // B
  int64_t num_tokens;         // N
};

// ---- adaln_modulate: y = LN(x) * (1 + scale[seg]) + shift[seg] -----------------------------
cudaError_t adaln_modulate_fwd(DType dt, const void* x, const void* shift, const void* scale,
                               Pack pack, int64_t D, float eps, void* y, float* mean,
                               float* rstd, cudaStream_t stream);
// Workspace (fp32 elements) of adaln_modulate_bwd.
int64_t adaln_modulate_bwd_workspace(Pack pack, int64_t D);
cudaError_t adaln_modulate_bwd(DType dt, const void* dy, const void* x, const void* scale,
                               const float* mean, const float* rstd, Pack pack, int64_t D,
                               void* dx, void* dshift, void* dscale, float* workspace,
                               cudaStream_t stream);

// ---- gated_residual: out = x + gate[seg] * y --------------------------------------------------
cudaError_t gated_residual_fwd(DType dt, const void* x, const void* y, const void* gate, Pack pack,
                               int64_t D, void* out, cudaStream_t stream);
int64_t gated_residual_bwd_workspace(Pack pack, int64_t D);
cudaError_t gated_residual_bwd(DType dt, const void* dout, const void* y, const void* gate,
                               Pack pack, int64_t D, void* dy, void* dgate, float* workspace,
                               cudaStream_t stream);

// ---- residual_adaln: x_new = x + gate[seg] * y; h = LN(x_new) * (1 + scale[seg]) + shift[seg] -
cudaError_t residual_adaln_fwd(DType dt, const void* x, const void* y, const void* gate,
                               const void* shift, const void* scale, Pack pack, int64_t D,
                               float eps, void* x_new, void* h, float* mean, float* rstd,
                               cudaStream_t stream);
int64_t residual_adaln_bwd_workspace(Pack pack, int64_t D);
// x is the forward's input: x_new = x + gate[seg] * y is re-formed in fp32 from x, y and gate.
cudaError_t residual_adaln_bwd(DType dt, const void* dx_new, const void* dh, const void* x,
                               const void* y, const void* gate, const void* scale,
                               const float* mean, const float* rstd, Pack pack, int64_t D,
                               void* dx, void* dy, void* dgate, void* dshift, void* dscale,
                               float* workspace, cudaStream_t stream);

// ---- axial 2D RoPE ------------------------------------------------------------------------------
struct RopeArgs {
  const int32_t* sizes;  // [B, 2] (h, w)
  const float* freqs;    // [2, Dh/4]
  bool official;         // positions="official" (p0 = t % h) instead of "grid" (p0 = t % w)
  float mscale;
};
// q_out = rotate(q), k_out = rotate(k); inverse rotates by the negated angle (the backward).
cudaError_t rope_2d(DType dt, const void* q, const void* k, Pack pack, int64_t H, int64_t Hk,
                    int64_t Dh, RopeArgs rope, bool inverse, void* q_out, void* k_out,
                    cudaStream_t stream);

// ---- qk_norm_rope: LayerNorm over Dh with affine (fp32 weight/bias), then RoPE -------------------
cudaError_t qk_norm_rope_fwd(DType dt, const void* q, const void* k, Pack pack, int64_t H,
                             int64_t Hk, int64_t Dh, RopeArgs rope, const float* q_weight,
                             const float* q_bias, const float* k_weight, const float* k_bias,
                             float eps, void* q_out, void* k_out, float* q_mean, float* q_rstd,
                             float* k_mean, float* k_rstd, cudaStream_t stream);
int64_t qk_norm_rope_bwd_workspace(Pack pack, int64_t Dh);
// dparams: fp32 [4, Dh] = (dq_weight, dq_bias, dk_weight, dk_bias).
cudaError_t qk_norm_rope_bwd(DType dt, const void* dq_rot, const void* dk_rot, const void* q,
                             const void* k, Pack pack, int64_t H, int64_t Hk, int64_t Dh,
                             RopeArgs rope, const float* q_weight, const float* k_weight,
                             const float* q_mean, const float* q_rstd, const float* k_mean,
                             const float* k_rstd, void* dq, void* dk, float* dparams,
                             float* workspace, cudaStream_t stream);

// ---- varlen attention (flash_attn_varlen_func semantics) ---------------------------------------
struct AttnArgs {
  const int32_t* cu_q;  // [B+1]
  const int32_t* cu_k;  // [B+1]
  int num_seqs;
  int64_t nq, nk;       // total query / key tokens
  int64_t max_seqlen_q, max_seqlen_k;  // informational: every real row is covered whatever they say
  int64_t H, Hk, D;     // query heads, k/v heads (H % Hk == 0), head_dim <= kAttnMaxHeadDim
  // Element strides of q, k, v between tokens and between heads (the last dim is contiguous),
  // so views such as qkv.view(N, 3, H, D).unbind(1) are read in place. out, dout, dq, dk, dv
  // are contiguous.
  int64_t q_row, q_head, k_row, k_head, v_row, v_head;
  float softmax_scale;
  bool causal;          // bottom-right aligned; rows that see no key output 0 (lse = -inf)
};
// Workspace (4-byte elements) of the forward: its (image, query tile) work list.
int64_t varlen_attention_fwd_workspace(DType dt, const AttnArgs& a);
// out [nq, H, D] (input dtype), lse fp32 [H, nq] (natural log).
cudaError_t varlen_attention_fwd(DType dt, const void* q, const void* k, const void* v,
                                 AttnArgs a, void* out, float* lse, float* workspace,
                                 cudaStream_t stream);
// Workspace (4-byte elements) of the backward: delta = rowsum(dO * O) [H, nq], then the
// (image, query tile) and (image, key tile) work lists.
int64_t varlen_attention_bwd_workspace(DType dt, const AttnArgs& a);
cudaError_t varlen_attention_bwd(DType dt, const void* dout, const void* q, const void* k,
                                 const void* v, const void* out, const float* lse, AttnArgs a,
                                 void* dq, void* dk, void* dv, float* workspace,
                                 cudaStream_t stream);

// ---- the one launch path of every kernel ----------------------------------------------------
// launch<kernel>(grid, block, dynamic_smem, stream, args...) is `kernel<<<...>>>(args...)` under
// nvcc and a run of the SIMT simulator (csrc/sim) in the host build of the kernels (NIT_CUDA_SIM),
// which checks the launch configuration as the driver would. The kernel is a template argument
// so that the simulator can name it in its errors. Errors surface through cudaGetLastError().
#if defined(__CUDACC__)
template <auto kKernel, typename... Args>
inline void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  kKernel<<<grid, block, smem, stream>>>(args...);
}
#elif defined(NIT_CUDA_SIM)
template <auto kKernel, typename... Args>
inline void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  ::nit::sim::launch<kKernel>(grid, block, smem, stream, args...);
}
#endif

}  // namespace cuda
}  // namespace nit
#endif  // !NIT_CUDA_LIMITS_ONLY
