// Helpers of the thin torch glue of the CUDA kernels (<family>_glue.cpp): dtype mapping, device
// guard and current stream, launch-error reporting. The argument checks are those of checks.h,
// shared with the CPU kernels. Only the glue includes torch headers.
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

inline cuda::Pack pack_of(const at::Tensor& cu_seqlens, int64_t num_tokens) {
  return {cu_seqlens.data_ptr<int32_t>(), static_cast<int>(cu_seqlens.numel() - 1), num_tokens};
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "nit::", op, ": CUDA error ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

// The launch block of every glue function: launcher(stream) runs on the current stream of
// ref's device (made current for the call); a CUDA error it returns raises, naming op.
template <typename Launcher>
inline void launch_on(const at::Tensor& ref, const char* op, Launcher&& launcher) {
  const DeviceGuard guard(ref.device());
  check_launch(launcher(current_stream()), op);
}

// An fp32 tensor on ref's device: saved statistics, and the kernels' workspaces.
inline at::Tensor fp32_empty(at::IntArrayRef shape, const at::Tensor& ref) {
  return at::empty(shape, ref.options().dtype(at::kFloat));
}

inline float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }

}  // namespace cuda_glue
}  // namespace nit
