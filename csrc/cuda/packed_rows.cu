// Second pass of the deterministic per-image column sums (see packed_rows.cuh).
#include "cuda/packed_rows.cuh"

namespace nit {
namespace cuda {
namespace {

constexpr int kSumCols = 32;   // columns per block (one warp wide: coalesced slot rows)
constexpr int kSumLanes = 8;   // slots summed in parallel per column, combined in a fixed order
constexpr unsigned kMaxGridY = 65535;

template <typename Tout>
struct OutRows {
  Tout* p[4];
};

template <typename Tout>
__global__ void __launch_bounds__(kSumCols* kSumLanes)
    slot_sums_kernel(const float* __restrict__ partial, int nvals, int64_t ncols,
                     const int32_t* __restrict__ cu, int B, int64_t N, int64_t R,
                     int64_t num_slots, OutRows<Tout> out) {
  __shared__ float red[kSumLanes][kSumCols + 1];
  const int64_t col = int64_t(blockIdx.x) * kSumCols + threadIdx.x;
  const int v = blockIdx.z;
  for (int b = blockIdx.y; b < B; b += gridDim.y) {
    int64_t s0 = 0, s1 = num_slots;
    if (cu != nullptr) image_slots(cu, b, N, R, num_slots, &s0, &s1);
    float acc = 0.f;
    if (col < ncols) {
      for (int64_t s = s0 + threadIdx.y; s < s1; s += kSumLanes) {
        acc += partial[(s * nvals + v) * ncols + col];
      }
    }
    red[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < ncols) {
      float total = red[0][threadIdx.x];
#pragma unroll
      for (int i = 1; i < kSumLanes; ++i) total += red[i][threadIdx.x];
      out.p[v][int64_t(b) * ncols + col] = from_float<Tout>(total);
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t slot_sums(DType out_dtype, const float* partial, int nvals, int64_t ncols,
                      const int32_t* cu, int B, int64_t N, const SlotLayout& L,
                      void* const* outs, cudaStream_t stream) {
  if (nvals < 1 || nvals > 4) return cudaErrorInvalidValue;
  if (ncols <= 0 || B <= 0) return cudaSuccess;
  const unsigned gy = B < int(kMaxGridY) ? unsigned(B) : kMaxGridY;
  const dim3 grid(static_cast<unsigned>(cdiv(ncols, int64_t(kSumCols))), gy, nvals);
  const dim3 block(kSumCols, kSumLanes);
  NIT_DISPATCH_DTYPE(out_dtype, T, {
    OutRows<T> o{};
    for (int v = 0; v < nvals; ++v) o.p[v] = static_cast<T*>(outs[v]);
    launch<slot_sums_kernel<T>>(grid, block, 0, stream, partial, nvals, ncols, cu, B, N,
                                                    L.rows_per_chunk, L.num_slots, o);
  })
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace nit
