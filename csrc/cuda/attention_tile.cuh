// Building blocks of the varlen attention kernels (attention.cu, attention_bwd.cu):
// tile shapes, shared-memory tile loads, and the two warp-level products every kernel is made of.
//
// Work split: every warp owns a 16-row strip of the block's tile (query rows in the forward and
// dq kernels, key rows in the dk/dv kernel). Score strips, softmax, and accumulators of a strip
// stay with its warp, so only the shared K/V (or Q/dO) tiles need block barriers.
//
//   strip_nt:  C[16][N] (fp32 smem)  = A[16][K] * B[N][K]^T      (S = Q K^T, dP = dO V^T, ...)
//   StripAcc:  acc[16][Dp] (fp32)   += A[16][K] * B[K][Dp]       (O += P V, dK += dS^T Q, ...)
//
// fp16/bf16 use tensor cores through WMMA (16x16x16, fp32 accumulation); fp32 uses exact fp32
// FMAs on CUDA cores (TF32 tensor cores would lose the fp32 accuracy the tests demand).
// Head dims are padded to kDp (a multiple of 16, the mma k-step) with zero columns in shared
// memory, so head_dim 72 runs as 80 with the padding contributing exact zeros.
#pragma once
#include <mma.h>

#include <type_traits>

#include "common/softmax_math.h"
#include "cuda/cuda_common.cuh"

namespace nit {
namespace cuda {
namespace attn {

namespace wmma = nvcuda::wmma;

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Tile shapes for element type T and padded head dim kDp (64, 80 or 128).
//  - tensor cores: 4 warps, 64-row tiles, 64 keys per forward step, 32-wide backward steps.
//    At kDp = 128 the forward takes 78 KB of shared memory, dk/dv 79 KB and dq 75 KB, so two
//    CTAs (8 warps) fit on an SM of A100 (164 KB) and of H100 (228 KB; the 255-register cap of
//    the forward also allows only two), and one on sm_86/89 (100 KB).
//  - fp32: 2 warps, 32-row tiles, 32-wide steps (fp32 tiles take twice the bytes per element):
//    at most 83 KB.
template <typename T, int kDp>
struct Tile {
  static_assert(kDp % 16 == 0, "padded head dim must be a multiple of 16");
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  static constexpr int kWarps = kTensorCores ? 4 : 2;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;                // rows owned by the block
  static constexpr int kFwdCols = kTensorCores ? 64 : 32;  // keys per forward step
  static constexpr int kBwdCols = 32;                      // inner step of the backward kernels
  // Leading dims (elements). T tiles: +8 halves keep WMMA's 32-byte alignment and spread the
  // rows of a fragment load over all banks; fp32 tiles: odd, so column walks are conflict-free.
  static constexpr int kLdIn = kDp + (kTensorCores ? 8 : 1);
  static constexpr int ld_p(int cols) { return cols + (kTensorCores ? 8 : 4); }
  static constexpr int ld_s(int cols) { return cols + 4; }  // fp32 score strips (WMMA stores)
};

// ---- shared-memory tile loads (all threads of the block call) -----------------------------------
// dst[r][c] = src[r * stride + c] for r < nvalid and c < D, zero elsewhere, for r < kR, c < kDp.
// vec: D * sizeof(T) is a multiple of 16 and src is 16-byte aligned (16-byte global loads).
template <typename T, int kR, int kDp, int kLd, int kThreads>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src,
                                          int64_t stride, int nvalid, int D, bool vec) {
  const T zero = from_float<T>(0.f);
  if (vec) {
    constexpr int E = 16 / sizeof(T);
    constexpr int kChunks = kDp / E;
    for (int idx = threadIdx.x; idx < kR * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * E;
      Vec<T, E> v;
      if (r < nvalid && c < D) {
        v = *reinterpret_cast<const Vec<T, E>*>(src + r * stride + c);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) v.v[e] = zero;
      }
      if constexpr ((kLd * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<Vec<T, E>*>(dst + r * kLd + c) = v;
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) dst[r * kLd + c + e] = v.v[e];
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < kR * kDp; idx += kThreads) {
      const int r = idx / kDp, c = idx % kDp;
      dst[r * kLd + c] = (r < nvalid && c < D) ? src[r * stride + c] : zero;
    }
  }
}

// dst[r] = src[r] for r < nvalid, `fill` for nvalid <= r < n.
template <int kThreads>
__device__ __forceinline__ void load_rows(float* __restrict__ dst, const float* __restrict__ src,
                                          int n, int nvalid, float fill) {
  for (int r = threadIdx.x; r < n; r += kThreads) dst[r] = r < nvalid ? src[r] : fill;
}

// ---- C[16][N] = A[16][K] * B[N][K]^T, one warp -------------------------------------------------
template <typename T, int K, int N>
__device__ __forceinline__ void strip_nt(float* __restrict__ C, int ldc, const T* __restrict__ A,
                                         int lda, const T* __restrict__ B, int ldb) {
  static_assert(K % 16 == 0 && N % 32 == 0, "strip_nt tile shape");
  if constexpr (!std::is_same<T, float>::value) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[K / 16];
#pragma unroll
    for (int kt = 0; kt < K / 16; ++kt) wmma::load_matrix_sync(a[kt], A + kt * 16, lda);
#pragma unroll
    for (int nt = 0; nt < N / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.f);
#pragma unroll
      for (int kt = 0; kt < K / 16; ++kt) {
        // B[N][K] row-major is B^T[K][N] column-major
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, B + nt * 16 * ldb + kt * 16, ldb);
        wmma::mma_sync(c, a[kt], b, c);
      }
      wmma::store_matrix_sync(C + nt * 16, c, ldc, wmma::mem_row_major);
    }
  } else {
    constexpr int J = N / 32;  // columns lane, lane + 32, ...
    const int lane = threadIdx.x % 32;
    float acc[16][J];
#pragma unroll
    for (int r = 0; r < 16; ++r)
#pragma unroll
      for (int j = 0; j < J; ++j) acc[r][j] = 0.f;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      float b[J];
#pragma unroll
      for (int j = 0; j < J; ++j) b[j] = B[(lane + 32 * j) * ldb + k];
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const float a = A[r * lda + k];
#pragma unroll
        for (int j = 0; j < J; ++j) acc[r][j] = fmaf(a, b[j], acc[r][j]);
      }
    }
#pragma unroll
    for (int r = 0; r < 16; ++r)
#pragma unroll
      for (int j = 0; j < J; ++j) C[r * ldc + lane + 32 * j] = acc[r][j];
  }
}

// ---- acc[16][kDp] += A[16][K] * B[K][kDp], one warp ------------------------------------------
template <typename T, int kDp, bool kTensorCores = !std::is_same<T, float>::value>
struct StripAcc;

template <typename T, int kDp>
struct StripAcc<T, kDp, true> {
  using Frag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static constexpr int kTiles = kDp / 16;
  Frag acc[kTiles];
  // Row index of every fragment element. WMMA leaves the element -> (row, col) mapping
  // unspecified but fixed for a fragment type, so it is learned once by loading a tile whose
  // entries are their own row index; scale_rows needs it for the online-softmax rescale.
  Frag row_of;

  __device__ void zero() {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) wmma::fill_fragment(acc[t], 0.f);
  }

  // scratch: 16 x 16 fp32 in shared memory (ld a multiple of 4), free for this warp.
  __device__ void init_rows(float* scratch, int ld) {
    const int lane = threadIdx.x % 32;
    for (int e = lane; e < 256; e += 32) scratch[(e / 16) * ld + e % 16] = float(e / 16);
    __syncwarp();
    wmma::load_matrix_sync(row_of, scratch, ld, wmma::mem_row_major);
    __syncwarp();
  }

  template <int K>
  __device__ void mma(const T* __restrict__ A, int lda, const T* __restrict__ B, int ldb) {
    static_assert(K % 16 == 0, "mma k-step");
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[K / 16];
#pragma unroll
    for (int kt = 0; kt < K / 16; ++kt) wmma::load_matrix_sync(a[kt], A + kt * 16, lda);
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int kt = 0; kt < K / 16; ++kt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, B + kt * 16 * ldb + t * 16, ldb);
        wmma::mma_sync(acc[t], a[kt], b, acc[t]);
      }
    }
  }

  // acc[r][:] *= f[r] (f: 16 floats in shared memory)
  __device__ void scale_rows(const float* f) {
    float fe[Frag::num_elements];
#pragma unroll
    for (int i = 0; i < Frag::num_elements; ++i) fe[i] = f[static_cast<int>(row_of.x[i])];
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int i = 0; i < Frag::num_elements; ++i) acc[t].x[i] *= fe[i];
  }

  // write(r, c, value) for every element, through a 16 x 16 fp32 scratch (ld a multiple of 4).
  template <typename Write>
  __device__ void for_each(float* scratch, int ld, Write&& write) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      wmma::store_matrix_sync(scratch, acc[t], ld, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) write(e / 16, t * 16 + e % 16, scratch[(e / 16) * ld + e % 16]);
      __syncwarp();
    }
  }
};

template <typename T, int kDp>
struct StripAcc<T, kDp, false> {
  static constexpr int J = (kDp + 31) / 32;  // columns lane + 32 j (< kDp)
  float acc[16][J];

  __device__ void zero() {
#pragma unroll
    for (int r = 0; r < 16; ++r)
#pragma unroll
      for (int j = 0; j < J; ++j) acc[r][j] = 0.f;
  }

  __device__ void init_rows(float*, int) {}

  template <int K>
  __device__ void mma(const T* __restrict__ A, int lda, const T* __restrict__ B, int ldb) {
    const int lane = threadIdx.x % 32;
#pragma unroll 2
    for (int k = 0; k < K; ++k) {
      float b[J];
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int c = lane + 32 * j;
        b[j] = c < kDp ? B[k * ldb + c] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const float a = A[r * lda + k];
#pragma unroll
        for (int j = 0; j < J; ++j) acc[r][j] = fmaf(a, b[j], acc[r][j]);
      }
    }
  }

  __device__ void scale_rows(const float* f) {
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const float s = f[r];
#pragma unroll
      for (int j = 0; j < J; ++j) acc[r][j] *= s;
    }
  }

  template <typename Write>
  __device__ void for_each(float*, int, Write&& write) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 16; ++r)
#pragma unroll
      for (int j = 0; j < J; ++j)
        if (lane + 32 * j < kDp) write(r, lane + 32 * j, acc[r][j]);
  }
};

// ---- kernel arguments -----------------------------------------------------------------------
struct Ranges {
  int64_t q_begin, sq, k_begin, sk;
};

__device__ __forceinline__ Ranges image_ranges(const AttnArgs& a, int b) {
  int64_t q0, q1, k0, k1;
  segment_range(a.cu_q, b, a.nq, &q0, &q1);
  segment_range(a.cu_k, b, a.nk, &k0, &k1);
  return {q0, q1 - q0, k0, k1 - k0};
}

// ---- work lists: one (image, tile) item per tile of rows that exists --------------------------
// A grid of cdiv(max_seqlen, rows) x images leaves most blocks idle on packs of mixed sizes
// (max ~4,096, mean ~170 tokens) and trusts max_seqlen to cover every row. Instead every call
// builds, on the device and without a host sync, the flat list of the tiles that exist:
// items[i] = (image, tile index in the image), in image order, unused slots (-1, 0). The grid
// has one block per slot. Capacity: sum_b cdiv(len_b, rows) <= n / rows + B, so
// cdiv(n, rows) + B slots always suffice. Cost: one single-block launch reading cu_seqlens
// once (B + 1 ints) and writing the list (8 bytes a slot), a few microseconds.
__host__ __device__ inline int64_t work_capacity(int64_t n, int64_t num_seqs, int64_t rows) {
  return (n + rows - 1) / rows + num_seqs;
}

constexpr int kListThreads = 1024;

// A template, so that both attention translation units may instantiate it (one definition).
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    build_work_list_kernel(const int32_t* __restrict__ cu, int num_seqs, int64_t n, int rows,
                           int64_t capacity, int2* __restrict__ items) {
  static_assert(kThreads == 1024, "warp 0 scans the totals of exactly 32 warps");
  constexpr int kWarps = kThreads / 32;
  __shared__ long long warp_total[kWarps];
  __shared__ long long carry;  // slots taken by the images of earlier chunks
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int b0 = 0; b0 < num_seqs; b0 += kThreads) {
    const int b = b0 + static_cast<int>(threadIdx.x);
    long long tiles = 0;
    if (b < num_seqs) {
      int64_t s0, s1;
      segment_range(cu, b, n, &s0, &s1);
      tiles = (s1 - s0 + rows - 1) / rows;
    }
    long long incl = tiles;  // inclusive scan over the chunk: warps, then warp totals
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long up = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += up;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      long long t = warp_total[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const long long up = __shfl_up_sync(kFullMask, t, o);
        if (lane >= o) t += up;
      }
      warp_total[lane] = t;
    }
    __syncthreads();
    const long long first = carry + (warp > 0 ? warp_total[warp - 1] : 0) + incl - tiles;
    for (long long t = 0; t < tiles && first + t < capacity; ++t) {
      items[first + t] = make_int2(b, static_cast<int>(t));
    }
    __syncthreads();  // carry and warp_total are read
    if (threadIdx.x == kThreads - 1) carry = first + tiles;
    __syncthreads();
  }
  for (long long i = carry + threadIdx.x; i < capacity; i += kThreads) items[i] = make_int2(-1, 0);
}

inline cudaError_t build_work_list(const int32_t* cu, int num_seqs, int64_t n, int rows,
                                   int2* items, cudaStream_t stream) {
  launch<build_work_list_kernel<kListThreads>>(1, kListThreads, 0, stream, cu, num_seqs, n, rows,
                                               work_capacity(n, num_seqs, rows), items);
  return cudaGetLastError();
}

// The image and first row of this block's item; false for an unused slot (the whole block
// returns before any barrier).
__device__ __forceinline__ bool work_item(const int2* items, int rows, int* image, int64_t* row0) {
  const int2 it = items[blockIdx.x];
  *image = it.x;
  *row0 = int64_t(it.y) * rows;
  return it.x >= 0;
}

// 16-byte loads of q/k/v rows need D, both strides and the base pointers in 16-byte units.
template <typename T>
inline bool can_vectorize_strided(int64_t D, const void* p, int64_t row, int64_t head) {
  constexpr int64_t E = 16 / sizeof(T);
  return can_vectorize<T>(D, p) && row % E == 0 && head % E == 0;
}

// Key j (in the image) is visible to query i: causal attention is aligned bottom-right
// (flash-attn >= 2.1): j <= i + sk - sq.
__device__ __forceinline__ bool visible(bool causal, int64_t i, int64_t j, int64_t sq, int64_t sk) {
  return !causal || j <= i + sk - sq;
}

// Keys [0, end) that the query rows [m0, m0 + rows) of an image can see.
__device__ __forceinline__ int64_t keys_end(bool causal, int64_t m0, int64_t rows, int64_t sq,
                                            int64_t sk) {
  if (!causal) return sk;
  const int64_t last = (m0 + rows < sq ? m0 + rows : sq) + sk - sq;
  return last < 0 ? 0 : (last > sk ? sk : last);
}

// Pick the padded head dim: launch(Int<kDp>) with kDp in {64, 80, 128}.
template <int V>
using DpTag = std::integral_constant<int, V>;

template <typename Launch>
inline cudaError_t with_padded_head_dim(int64_t D, Launch&& launch) {
  if (D <= 0 || D > kAttnMaxHeadDim) return cudaErrorInvalidValue;
  if (D <= 64) return launch(DpTag<64>{});
  if (D <= 80) return launch(DpTag<80>{});
  return launch(DpTag<128>{});
}

// Opt in to more than 48 KB of dynamic shared memory when a kernel needs it.
template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace attn
}  // namespace cuda
}  // namespace nit
