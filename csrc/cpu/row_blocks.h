// Fixed blocks of token rows for deterministic reductions in the CPU backward kernels.
//
// Per-image sums (dshift, dscale, dgate) are accumulated per block of at most kBlockRows rows
// that never straddles two images, then the blocks of each image are added in block order. The
// blocks depend only on cu_seqlens, never on how the blocks are spread over threads, so the
// results are bitwise identical for any thread count, without atomics.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/vec.h"

namespace nit {
namespace cpu {

constexpr int64_t kBlockRows = 64;

struct ImageBlocks {
  const int32_t* cu;
  int64_t num_seqs;
  std::vector<int64_t> first;  // first[b]: index of image b's first block; first[B]: block count

  ImageBlocks(const int32_t* cu_seqlens, int64_t B) : cu(cu_seqlens), num_seqs(B), first(B + 1, 0) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = int64_t(cu[b + 1]) - cu[b];
      first[b + 1] = first[b] + (len + kBlockRows - 1) / kBlockRows;
    }
  }
  int64_t count() const { return first[num_seqs]; }

  // f(seg, r0, r1, k) for every block k in [kb, ke): rows r0..r1-1 of image seg.
  template <class F>
  void visit(int64_t kb, int64_t ke, F&& f) const {
    if (kb >= ke) return;
    int64_t seg = std::upper_bound(first.begin(), first.end(), kb) - first.begin() - 1;
    for (int64_t k = kb; k < ke; ++k) {
      while (k >= first[seg + 1]) ++seg;
      const int64_t r0 = cu[seg] + (k - first[seg]) * kBlockRows;
      const int64_t r1 = std::min<int64_t>(r0 + kBlockRows, cu[seg + 1]);
      f(seg, r0, r1, k);
    }
  }

  // out[b, c] = sum over the blocks k of image b, in order, of partial[k, c]; partial is
  // [count(), ld] fp32, out is [B, D] in the output dtype (an image without rows gets zeros).
  template <typename T>
  void sum_per_image(const float* partial, int64_t ld, int64_t D, T* out) const {
    at::parallel_for(0, num_seqs, 4, [&](int64_t b0, int64_t b1) {
      std::vector<float> acc(ld);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t k = first[b]; k < first[b + 1]; ++k) {
          for (int64_t j = 0; j < ld; j += kLanes) {
            (Vec8::loadu(acc.data() + j) + Vec8::loadu(partial + k * ld + j)).storeu(acc.data() + j);
          }
        }
        for (int64_t c = 0; c < D; ++c) out[b * D + c] = from_float<T>(acc[c]);
      }
    });
  }
};

}  // namespace cpu
}  // namespace nit
