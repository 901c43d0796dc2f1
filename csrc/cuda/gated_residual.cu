// CUDA kernels of the gated residual: out = x + gate[seg] * y over rows [N, D], with the image's
// gate row [B, D] gathered by segment. Backward: dy = dout * gate[seg],
// dgate[b] = sum_{rows of b} dout * y (per-piece column sums, then slot_sums: deterministic).
#include "cuda/packed_rows.cuh"

namespace nit {
namespace cuda {
namespace {

template <typename T, int kGroup, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    gated_fwd_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate,
                     Pack pack, int64_t D, T* __restrict__ out) {
  const int64_t row = group_row<kGroup>(pack.num_tokens);
  if (row < 0) return;
  const int lane = threadIdx.x % kGroup;
  const int seg = find_segment(pack.cu_seqlens, pack.num_seqs, row);
  const T* g = gate + int64_t(seg) * D;
  for (int64_t c = int64_t(lane) * kVec; c < D; c += int64_t(kGroup) * kVec) {
    float a[kVec], b[kVec], s[kVec], o[kVec];
    load_f32<kVec>(x + row * D + c, a);
    load_f32<kVec>(y + row * D + c, b);
    load_f32<kVec>(g + c, s);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = gated_residual_elem(a[i], s[i], b[i]);
    store_f32<kVec>(out + row * D + c, o);
  }
}

// dy, and the column sums of dout * y of every piece of this chunk -> partial[slot][1][D].
template <typename T>
__global__ void __launch_bounds__(kColThreads)
    gated_bwd_chunks_kernel(const T* __restrict__ dout, const T* __restrict__ y,
                            const T* __restrict__ gate, Pack pack, int64_t D, int64_t R,
                            T* __restrict__ dy, float* __restrict__ partial) {
  const int64_t col = int64_t(blockIdx.y) * kColThreads + threadIdx.x;
  if (col >= D) return;
  float dgate = 0.f;
  walk_chunk(
      pack, R, blockIdx.x,
      [&](int64_t r, int seg) {
        const float d = to_float(dout[r * D + col]);
        dy[r * D + col] = from_float<T>(d * to_float(gate[int64_t(seg) * D + col]));
        dgate += d * to_float(y[r * D + col]);
      },
      [&](int64_t slot) {
        partial[slot * D + col] = dgate;
        dgate = 0.f;
      });
}

}  // namespace

cudaError_t gated_residual_fwd(DType dt, const void* x, const void* y, const void* gate, Pack pack,
                               int64_t D, void* out, cudaStream_t stream) {
  NIT_DISPATCH_DTYPE(dt, T, {
    const bool vec = can_vectorize<T>(D, x, y, gate, out);
    return launch_rows<T>(pack.num_tokens, D, vec, [&](auto G, auto V, dim3 grid, dim3 block) {
      launch<gated_fwd_kernel<T, decltype(G)::value, decltype(V)::value>>(
          grid, block, 0, stream, static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const T*>(gate), pack,
          D, static_cast<T*>(out));
    });
  })
}

int64_t gated_residual_bwd_workspace(Pack pack, int64_t D) {
  return slot_layout(pack.num_tokens, pack.num_seqs).num_slots * D;
}

cudaError_t gated_residual_bwd(DType dt, const void* dout, const void* y, const void* gate,
                               Pack pack, int64_t D, void* dy, void* dgate, float* workspace,
                               cudaStream_t stream) {
  const SlotLayout L = slot_layout(pack.num_tokens, pack.num_seqs);
  if (pack.num_tokens > 0 && D > 0) {
    NIT_DISPATCH_DTYPE(dt, T, {
      launch<gated_bwd_chunks_kernel<T>>(
          chunk_grid(L, D), kColThreads, 0, stream, static_cast<const T*>(dout), static_cast<const T*>(y), static_cast<const T*>(gate),
          pack, D, L.rows_per_chunk, static_cast<T*>(dy), workspace);
    })
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  void* outs[1] = {dgate};
  return slot_sums(dt, workspace, 1, D, pack.cu_seqlens, pack.num_seqs, pack.num_tokens, L, outs,
                   stream);
}

}  // namespace cuda
}  // namespace nit
