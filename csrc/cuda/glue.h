// Helpers of the thin torch glue of the CUDA kernels (<op>_glue.cpp): dtype mapping, device
// guard and current stream, launch-error reporting. Only the glue includes torch headers.
//
// The simulator build (NIT_CUDA_SIM, see csrc/sim/glue_hooks.h) compiles the same glue for CPU
// tensors: it registers the ops as nit_sim::* on the CPU key and swaps the device checks, guard
// and stream below for CPU ones.
#pragma once
#include <ATen/ATen.h>
#if !defined(NIT_CUDA_SIM)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <string_view>

#include "checks.h"
#include "cuda/launchers.h"

#if defined(NIT_CUDA_SIM)
#include "sim/glue_hooks.h"
#else
// Registers the glue's kernels of the op library for CUDA tensors.
#define NIT_CUDA_GLUE_IMPL(m) TORCH_LIBRARY_IMPL(nit, CUDA, m)
#endif

namespace nit {
namespace cuda_glue {

#if !defined(NIT_CUDA_SIM)
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}
#endif

inline cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// fp32 statistics saved by a forward: float32, contiguous, the given shape, on ref's device.
inline void check_stats(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& ref,
                        const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the data is on ",
              ref.device());
  check_shape(t, shape, name);
}

// Small fp32 parameter tables (freqs, LayerNorm weights): any float dtype is accepted and
// converted, so a caller holding fp16 weights still gets fp32 math.
inline at::Tensor fp32_param(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& ref,
                             const char* name) {
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the data is on ",
              ref.device());
  check_shape(t, shape, name);
  return t.to(at::kFloat).contiguous();
}

// x [N, D] of the row-wise ops: CUDA, float, contiguous, with its cu_seqlens; returns B.
inline int64_t check_token_matrix(const at::Tensor& x, const char* name, const at::Tensor& cu_seqlens,
                                  bool needs_columns) {
  check_cuda(x, name);
  check_float_input(x, name);
  TORCH_CHECK(x.dim() == 2, name, " must be [N, D], got shape ", x.sizes());
  TORCH_CHECK(!needs_columns || x.size(1) > 0, name,
              " must have at least one column to normalise, got shape ", x.sizes());
  return check_cu_seqlens(cu_seqlens, x.size(0), x);
}

// t has x's dtype and device and the given shape ([N, D] per token or [B, D] per image).
inline void check_same_kind(const at::Tensor& t, const char* name, const at::Tensor& x,
                            const char* x_name, at::IntArrayRef shape) {
  check_float_input(t, name);
  check_like(t, x, name, x_name);
  check_shape(t, shape, name);
}

inline bool official_positions(std::string_view positions) {
  TORCH_CHECK(positions == "grid" || positions == "official",
              "positions must be 'grid' or 'official', got '", std::string(positions), "'");
  return positions == "official";
}

inline cuda::Pack pack_of(const at::Tensor& cu_seqlens, int64_t num_tokens) {
  return {cu_seqlens.data_ptr<int32_t>(), static_cast<int>(cu_seqlens.numel() - 1), num_tokens};
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "nit::", op, ": CUDA error ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

}  // namespace cuda_glue
}  // namespace nit
