// Device helpers shared by the CUDA kernels: dtype conversion, vectorised row access, warp and
// block reductions (sums and Welford statistics), segment ranges, and dtype dispatch.
//
// torch compiles .cu files with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__,
// so every conversion here is an explicit intrinsic.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "common/macros.h"
#include "common/adaln_math.h"
#include "common/segments.h"
#include "cuda/launchers.h"

namespace nit {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename A, typename B>
__host__ __device__ __forceinline__ A cdiv(A a, B b) {
  return (a + b - 1) / b;
}

// ---- conversions --------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- vectorised access: kVec consecutive elements, loaded/stored as one aligned word ----------
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <int kVec, typename T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[kVec]) {
  const Vec<T, kVec> raw = *reinterpret_cast<const Vec<T, kVec>*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float(raw.v[i]);
}

template <int kVec, typename T>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[kVec]) {
  Vec<T, kVec> raw;
#pragma unroll
  for (int i = 0; i < kVec; ++i) raw.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, kVec>*>(p) = raw;
}

// Widest vector (16 bytes) usable for rows of D elements at these addresses, else 1.
inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}
template <typename T, typename... Ptrs>
inline bool can_vectorize(int64_t D, Ptrs... ptrs) {
  constexpr int64_t kVec = 16 / sizeof(T);
  bool ok = (D % kVec) == 0;
  const void* all[] = {static_cast<const void*>(ptrs)...};
  for (const void* p : all) ok = ok && (p == nullptr || aligned16(p));
  return ok;
}

// a * b rounded to fp32. nvcc may otherwise fuse the product into a later add (an FMA keeps the
// exact product): the attention backward must recompute the forward's scores bit for bit, or
// with a huge softmax_scale the rounding error of a score times the scale flips its weight. The
// simulator's host compiler does not contract (ISO C++ mode).
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(NIT_CUDA_SIM)
  return a * b;
#else
  return __fmul_rn(a, b);
#endif
}

// ---- reductions ---------------------------------------------------------------------------------
// Butterfly sum: IEEE addition is commutative, so every lane ends with the identical value.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Welford merge is not commutative bit for bit, so reduce down to lane 0 in a fixed tree and
// broadcast: every lane then normalises with the statistics that are saved for the backward.
__device__ __forceinline__ Welford warp_welford(Welford w) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Welford other;
    other.mean = __shfl_down_sync(kFullMask, w.mean, o);
    other.m2 = __shfl_down_sync(kFullMask, w.m2, o);
    other.count = __shfl_down_sync(kFullMask, w.count, o);
    w.merge(other);
  }
  w.mean = __shfl_sync(kFullMask, w.mean, 0);
  w.m2 = __shfl_sync(kFullMask, w.m2, 0);
  w.count = __shfl_sync(kFullMask, w.count, 0);
  return w;
}

// A row shared by kGroup threads: one warp (kGroup == 32) or a whole block (kGroup == blockDim.x,
// a multiple of 32). Block groups combine their warps through `smem` in warp order, so every
// thread computes the same result; all threads of the block must call. `smem` is plain float
// storage (__shared__ variables cannot have constructors): 3 floats per warp for welford,
// 2 for sum2.
template <int kGroup>
struct RowGroup {
  static_assert(kGroup % 32 == 0, "a row group is made of whole warps");
  static constexpr int kWarps = kGroup / 32;

  __device__ static Welford welford(Welford w, float* smem) {
    w = warp_welford(w);
    if (kWarps == 1) return w;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      smem[3 * warp + 0] = w.mean;
      smem[3 * warp + 1] = w.m2;
      smem[3 * warp + 2] = w.count;
    }
    __syncthreads();
    Welford total;
    for (int i = 0; i < kWarps; ++i) {
      Welford part;
      part.mean = smem[3 * i + 0];
      part.m2 = smem[3 * i + 1];
      part.count = smem[3 * i + 2];
      total.merge(part);
    }
    __syncthreads();  // smem may be reused by the next call
    return total;
  }

  __device__ static float2 sum2(float2 v, float* smem) {
    v.x = warp_sum(v.x);
    v.y = warp_sum(v.y);
    if (kWarps == 1) return v;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      smem[2 * warp + 0] = v.x;
      smem[2 * warp + 1] = v.y;
    }
    __syncthreads();
    float2 total = make_float2(0.f, 0.f);
    for (int i = 0; i < kWarps; ++i) {
      total.x += smem[2 * i + 0];
      total.y += smem[2 * i + 1];
    }
    __syncthreads();
    return total;
  }
};

// ---- packing ------------------------------------------------------------------------------------
// Rows [begin, end) of image b, clamped to [0, n] so that a bad cu_seqlens cannot index outside.
NIT_HD void segment_range(const int32_t* cu, int b, int64_t n, int64_t* begin, int64_t* end) {
  int64_t a = cu[b], e = cu[b + 1];
  a = a < 0 ? 0 : (a > n ? n : a);
  e = e < a ? a : (e > n ? n : e);
  *begin = a;
  *end = e;
}

}  // namespace cuda
}  // namespace nit

// Runs the statement block with `T` bound to the C++ type of the DType value `dt`.
#define NIT_DISPATCH_DTYPE(dt, T, ...)                  \
  switch (dt) {                                         \
    case ::nit::cuda::DType::kFloat32: {                \
      using T = float;                                  \
      __VA_ARGS__                                       \
    } break;                                            \
    case ::nit::cuda::DType::kFloat16: {                \
      using T = __half;                                 \
      __VA_ARGS__                                       \
    } break;                                            \
    case ::nit::cuda::DType::kBFloat16: {               \
      using T = __nv_bfloat16;                          \
      __VA_ARGS__                                       \
    } break;                                            \
    default:                                            \
      return cudaErrorInvalidValue;                     \
  }
