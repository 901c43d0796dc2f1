// SIMT simulator of the CUDA execution model, so that the kernels of csrc/cuda compile as host
// C++ (g++, -DNIT_CUDA_SIM) and run on the CPU with CUDA's semantics and a sanitizer's checks.
//
// Model: a launch runs its blocks one after another on the calling thread; every CUDA thread of
// a block is a fiber (own stack, cooperative switches). A fiber runs until it reaches a
// synchronisation point (__syncthreads, __syncwarp, a warp shuffle, a WMMA load/store) or exits;
// when no fiber of the block can run, the scheduler checks the waiting fibers and releases them:
//   - __syncthreads(): every live thread of the block waits at the same call site, none exited;
//   - warp ops: the lanes that wait at one with mask m are exactly the lanes of m, same site;
// anything else (a barrier some thread never reaches, a mask that leaves out or names a lane
// that is elsewhere) is an error that names the check ("barrier", "shuffle") and the kernel,
// found deterministically (never a hang). Fibers resume in thread order, or in reverse order
// (and blocks in reverse order) under the second schedule of the race check (see glue_hooks.h).
//
// Shared memory: `__shared__` variables are static storage (blocks run one at a time, under one
// lock) and keep what the previous block left (g++ puts template statics in COMDAT storage the
// runtime cannot enumerate, so they are not poisoned); dynamic shared memory is one buffer,
// poison-filled before every block. The build
// rewrites `extern __shared__ T name[];` to `T* const name = dynamic_shared<T>();` (a macro
// cannot turn an extern declaration into a definition).
#pragma once
// the toolkit headers first: the built-in names below are macros that their declarations must not see
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace nit {
namespace sim {

// ---- per-thread state of the running fiber (read through threadIdx & co) ----------------------
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern ThreadState g_state;

// Poison of memory nobody wrote: the bytes BA 7F repeated are a NaN in fp32, fp16 and bf16.
constexpr uint8_t kPoisonLo = 0xBA, kPoisonHi = 0x7F;
void poison(void* p, size_t bytes);

// Bounds check: buffers a kernel may be given are allocated with an inaccessible page right
// after their last byte (glue_hooks.h); an access there faults, and the fault becomes an error
// "out of bounds" naming the kernel, block, thread and how far past which buffer it reached.
void note_buffer(const void* p, size_t bytes);
void forget_buffer(const void* p);

// Dynamic shared memory of the running block (the opt-in limit of the largest target).
constexpr size_t kMaxDynamicSmem = 227 * 1024;
unsigned char* dynamic_smem_base();
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(dynamic_smem_base());
}

// Synchronisation points (implemented by the scheduler, runtime.cpp).
void syncthreads(const char* site);
void syncwarp(unsigned mask, const char* site);
enum class ShflKind { kIdx, kXor, kDown, kUp };
uint64_t shfl(unsigned mask, uint64_t bits, ShflKind kind, int arg, int width, const char* site);

// Raise an error of check `check` ("barrier", "shuffle", "wmma", "launch", ...) naming the
// running kernel, block and thread.
[[noreturn]] void fail(std::string_view check, const std::string& what);

// ---- launch --------------------------------------------------------------------------------------
using Body = void (*)(const void* closure);
void run_kernel(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem,
                Body body, const void* closure);

// "nit::cuda::attn::{anonymous}::attn_fwd_kernel<float, 64>" from the signature of this function.
inline std::string name_from_signature(std::string s) {
  const auto at = s.find("kKernel = ");
  if (at == std::string::npos) return s;
  s = s.substr(at + 10);
  return s.substr(0, s.find_first_of(";]"));
}
template <auto kKernel>
const char* kernel_name() {
  static const std::string name = name_from_signature(__PRETTY_FUNCTION__);
  return name.c_str();
}

template <auto kKernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  struct Closure {
    static void call(const void* c) {
      std::apply([](auto... a) { kKernel(a...); }, *static_cast<const std::tuple<Args...>*>(c));
    }
  };
  const std::tuple<Args...> closure(args...);
  run_kernel(reinterpret_cast<const void*>(kKernel), kernel_name<kKernel>(), grid, block, smem,
             &Closure::call, &closure);
}

// 0: threads and blocks resume in order; 1: in reverse order (the race check's second run).
void set_schedule(int schedule);

// The target whose limits launches are checked against: sm_80 (default) or sm_90
// (environment variable NIT_CUDA_SIM_ARCH, read at the first launch).
size_t target_max_dynamic_smem();

}  // namespace sim
}  // namespace nit

// ---- CUDA built-ins ---------------------------------------------------------------------------
#define threadIdx (::nit::sim::g_state.thread_idx)
#define blockIdx (::nit::sim::g_state.block_idx)
#define blockDim (::nit::sim::g_state.block_dim)
#define gridDim (::nit::sim::g_state.grid_dim)
constexpr int warpSize = 32;

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define NIT_SIM_STR2(x) #x
#define NIT_SIM_STR(x) NIT_SIM_STR2(x)
#define NIT_SIM_SITE __FILE__ ":" NIT_SIM_STR(__LINE__)
#define __syncthreads() ::nit::sim::syncthreads(NIT_SIM_SITE)
#define __syncwarp(...) ::nit::sim::syncwarp_at(NIT_SIM_SITE __VA_OPT__(, ) __VA_ARGS__)

namespace nit {
namespace sim {
inline void syncwarp_at(const char* site, unsigned mask = 0xffffffffu) { syncwarp(mask, site); }

template <typename T>
inline T shfl_as(unsigned mask, T v, ShflKind kind, int arg, int width, const char* site) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a word");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = shfl(mask, bits, kind, arg, width, site);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace sim
}  // namespace nit

#define __shfl_sync(mask, v, src, ...) \
  ::nit::sim::shfl_as(mask, v, ::nit::sim::ShflKind::kIdx, src, NIT_SIM_WIDTH(__VA_ARGS__), NIT_SIM_SITE)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::nit::sim::shfl_as(mask, v, ::nit::sim::ShflKind::kXor, m, NIT_SIM_WIDTH(__VA_ARGS__), NIT_SIM_SITE)
#define __shfl_down_sync(mask, v, d, ...) \
  ::nit::sim::shfl_as(mask, v, ::nit::sim::ShflKind::kDown, d, NIT_SIM_WIDTH(__VA_ARGS__), NIT_SIM_SITE)
#define __shfl_up_sync(mask, v, d, ...) \
  ::nit::sim::shfl_as(mask, v, ::nit::sim::ShflKind::kUp, d, NIT_SIM_WIDTH(__VA_ARGS__), NIT_SIM_SITE)
#define NIT_SIM_WIDTH(...) (32 __VA_OPT__(* 0 + (__VA_ARGS__)))

// the C++ overload of cuda_runtime.h (nvcc only): attributes of a kernel given as a function
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---- math intrinsics: the accurate host functions (fast-math error is not simulated) -----------
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }

// integer/float min and max of device code (CUDA declares them for mixed arithmetic types)
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}

// ---- atomics: fibers of a launch never run concurrently, so plain read-modify-writes --------
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
