// Launch shapes and deterministic per-image column sums for the row-wise kernels
// (adaln_modulate, gated_residual, residual_adaln) and the parameter sums of qk_norm_rope.
//
// Row kernels: a row of D elements is handled by one warp (D <= kWarpRowMaxD: eight rows per
// 256-thread block, no block barrier) or by a whole 256-thread block (wider rows, so that no
// thread streams more than ~64 elements). Loads are 16-byte vectors when D and the pointers allow.
//
// Per-image sums (dshift, dscale, dgate) without atomics and without reading cu_seqlens on the
// host: rows are cut into chunks of R consecutive rows (chunk c = rows [c*R, (c+1)*R)). The rows
// of image b inside chunk c form one piece, whose fp32 column sums go to slot c + b of a partial
// buffer [num_slots][V][D]. Slots are unique: if image b ends in chunk e, image b+1 starts in a
// chunk >= e, i.e. at a slot >= e + b + 1. So image b owns the consecutive slots
// [cu[b]/R + b, (cu[b+1]-1)/R + b], which slot_sums adds in a fixed order. R depends on N only:
// the same call gives bitwise identical results on every run.
#pragma once
#include <type_traits>

#include "cuda/cuda_common.cuh"

namespace nit {
namespace cuda {

constexpr int kRowThreads = 256;        // threads per block of the row kernels
constexpr int64_t kWarpRowMaxD = 2048;  // widest row given to a single warp
constexpr int kColThreads = 256;        // columns per block of the chunk (column) kernels

template <int V>
using Int = std::integral_constant<int, V>;

// Calls launch(Int<kGroup>, Int<kVec>, grid, block) for rows of D elements.
template <typename T, typename Launch>
inline cudaError_t launch_rows(int64_t N, int64_t D, bool vectorize, Launch&& launch) {
  if (N <= 0 || D <= 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const dim3 block(kRowThreads);
  if (D <= kWarpRowMaxD) {
    const dim3 grid(static_cast<unsigned>(cdiv(N, int64_t(kRowThreads / 32))));
    if (vectorize) launch(Int<32>{}, Int<kVec>{}, grid, block);
    else launch(Int<32>{}, Int<1>{}, grid, block);
  } else {
    const dim3 grid(static_cast<unsigned>(N));
    if (vectorize) launch(Int<kRowThreads>{}, Int<kVec>{}, grid, block);
    else launch(Int<kRowThreads>{}, Int<1>{}, grid, block);
  }
  return cudaGetLastError();
}

// Row handled by the calling thread's group, or -1 past the end (uniform within the group).
template <int kGroup>
__device__ __forceinline__ int64_t group_row(int64_t N) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / kGroup) + threadIdx.x / kGroup;
  return row < N ? row : -1;
}

struct SlotLayout {
  int64_t rows_per_chunk;  // R
  int64_t num_chunks;      // ceil(N / R)
  int64_t num_slots;       // num_chunks + B
};

// About 512 chunks, so the chunk kernels fill the GPU, but at least 16 rows per chunk.
inline SlotLayout slot_layout(int64_t N, int B) {
  int64_t R = 16;
  while (R < 1024 && cdiv(N, R) > 512) R *= 2;
  const int64_t chunks = cdiv(N, R);
  return {R, chunks, chunks + B};
}

// Calls body(row, seg) for the rows of chunk c in order, and flush(slot) after the last row of
// each piece (the rows of one image inside the chunk). Pieces of empty images are never flushed.
template <typename Body, typename Flush>
NIT_HD void walk_chunk(const Pack& pack, int64_t R, int64_t c, Body&& body,
                                           Flush&& flush) {
  const int64_t r0 = c * R;
  const int64_t r1 = r0 + R < pack.num_tokens ? r0 + R : pack.num_tokens;
  const int32_t* cu = pack.cu_seqlens;
  const int last = pack.num_seqs - 1;
  int seg = find_segment(cu, pack.num_seqs, r0);
  int64_t seg_end = cu[seg + 1];
  bool open = false;
  for (int64_t r = r0; r < r1; ++r) {
    while (seg < last && r >= seg_end) {
      if (open) flush(c + seg);
      open = false;
      ++seg;
      seg_end = cu[seg + 1];
    }
    body(r, seg);
    open = true;
  }
  if (open) flush(c + seg);
}

// Slots [s0, s1) of the pieces of image b (empty for an empty image), within [0, num_slots).
NIT_HD void image_slots(const int32_t* cu, int b, int64_t N, int64_t R, int64_t num_slots,
                        int64_t* s0, int64_t* s1) {
  int64_t a, e;
  segment_range(cu, b, N, &a, &e);
  *s0 = a / R + b;
  *s1 = e > a ? (e - 1) / R + b + 1 : *s0;
  if (*s1 > num_slots) *s1 = num_slots;
  if (*s0 > *s1) *s0 = *s1;
}

// Grid of a chunk kernel: x = chunk, y = tile of kColThreads columns.
inline dim3 chunk_grid(const SlotLayout& L, int64_t D) {
  return dim3(static_cast<unsigned>(L.num_chunks), static_cast<unsigned>(cdiv(D, kColThreads)));
}

// out_v[b, col] = sum over the slots of image b of partial[slot, v, col], v < nvals (<= 4), in
// slot order; cu == nullptr sums all slots into one row (b = 0). Output dtype `out_dtype`.
cudaError_t slot_sums(DType out_dtype, const float* partial, int nvals, int64_t ncols,
                      const int32_t* cu, int B, int64_t N, const SlotLayout& L,
                      void* const* outs, cudaStream_t stream);

}  // namespace cuda
}  // namespace nit
