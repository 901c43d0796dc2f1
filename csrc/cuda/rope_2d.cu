// CUDA kernel of axial 2D RoPE on q [N, H, Dh] and k [N, Hk, Dh]:
//   (x0, x1) -> mscale * (x0 cos a - x1 sin a, x1 cos a + x0 sin a),  a = p_axis * freqs[axis][i]
// One thread per (token, pair): the angle is evaluated once and applied to every q and k head
// of the token; consecutive threads touch consecutive pairs of a head row (coalesced).
// inverse = true rotates by -a: the transpose, i.e. the backward (times mscale).
#include "cuda/rope.cuh"

namespace nit {
namespace cuda {
namespace {

constexpr int kRopeThreads = 256;

template <typename T>
__device__ __forceinline__ void rotate_heads(const T* __restrict__ x, T* __restrict__ out,
                                             int64_t row, int64_t heads, int64_t Dh, int64_t i,
                                             float c, float s, float mscale, bool inverse) {
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t off = (row * heads + h) * Dh + 2 * i;
    float y0, y1;
    rope_rotate_pair(to_float(x[off]), to_float(x[off + 1]), c, s, mscale, inverse, &y0, &y1);
    out[off] = from_float<T>(y0);
    out[off + 1] = from_float<T>(y1);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRopeThreads)
    rope_2d_kernel(const T* __restrict__ q, const T* __restrict__ k, Pack pack, int64_t H,
                   int64_t Hk, int64_t Dh, RopeArgs rope, bool inverse, T* __restrict__ q_out,
                   T* __restrict__ k_out) {
  const int64_t pairs = Dh / 2;
  const int64_t idx = int64_t(blockIdx.x) * kRopeThreads + threadIdx.x;
  if (idx >= pack.num_tokens * pairs) return;
  const int64_t row = idx / pairs, i = idx % pairs;
  float c, s;
  pair_cos_sin(token_position(pack, rope, row), rope.freqs, Dh / 4, i, &c, &s);
  rotate_heads(q, q_out, row, H, Dh, i, c, s, rope.mscale, inverse);
  rotate_heads(k, k_out, row, Hk, Dh, i, c, s, rope.mscale, inverse);
}

}  // namespace

cudaError_t rope_2d(DType dt, const void* q, const void* k, Pack pack, int64_t H, int64_t Hk,
                    int64_t Dh, RopeArgs rope, bool inverse, void* q_out, void* k_out,
                    cudaStream_t stream) {
  if (Dh % 4 != 0) return cudaErrorInvalidValue;
  const int64_t threads = pack.num_tokens * (Dh / 2);
  if (threads <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(cdiv(threads, int64_t(kRopeThreads))));
  NIT_DISPATCH_DTYPE(dt, T, {
    launch<rope_2d_kernel<T>>(
        grid, kRopeThreads, 0, stream, static_cast<const T*>(q), static_cast<const T*>(k), pack, H, Hk, Dh, rope, inverse,
        static_cast<T*>(q_out), static_cast<T*>(k_out));
  })
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace nit
