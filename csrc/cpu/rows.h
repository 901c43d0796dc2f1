// Row helpers shared by the CPU kernels: the image-by-image row loop, per-image row gathering,
// LayerNorm statistics of an fp32 row buffer.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>

#include "common/segments.h"
#include "cpu/vec.h"

namespace nit {
namespace cpu {

constexpr int64_t kAhead = 2;  // rows prefetched ahead of the one being computed

// Prefetches, while row r + kAhead < end, that row of every [rows, width] table whose row r
// starts at one of `at_r`.
template <typename T>
inline void prefetch_ahead(int64_t r, int64_t end, int64_t width, std::initializer_list<const T*> at_r) {
  if (r + kAhead >= end) return;
  for (const T* p : at_r) prefetch(p + kAhead * width, width * sizeof(T));
}

// fp32 copy of row `seg` of a [B, D] table plus `add` (1 turns scale into 1 + scale).
template <typename T>
inline void widen_row(const T* table, int64_t seg, int64_t D, float add, float* out) {
  const T* row = table + seg * D;
  for_each_vec(D, [&](int64_t j, auto tag) { (load_v(row, j, D, tag) + Vec8(add)).storeu(out + j * kLanes); });
}

// Iterate rows [begin, end) image by image: enter(seg) runs when a new image starts.
template <class Enter, class Row>
inline void for_rows(const int32_t* cu, int B, int64_t begin, int64_t end, Enter&& enter, Row&& row) {
  if (begin >= end) return;
  int seg = find_segment(cu, B, begin);
  enter(seg);
  for (int64_t r = begin; r < end; ++r) {
    if (r >= cu[seg + 1]) {
      while (r >= cu[seg + 1]) ++seg;
      enter(seg);
    }
    row(r);
  }
}

// Statistics of buf[0..D) given its sum; the zero padding up to whole vectors is overwritten
// with the mean so that it adds nothing to the squared deviations.
inline void row_stats(float* buf, int64_t D, float sum, float eps, float* mean, float* rstd) {
  const float m = sum / static_cast<float>(D);
  const int64_t Dp = padded(D);
  for (int64_t c = D; c < Dp; ++c) buf[c] = m;
  const Vec8 mv(m);
  const float ss = reduce_sum(Dp, [&](int64_t j, auto) {
    const Vec8 d = Vec8::loadu(buf + j * kLanes) - mv;
    return d * d;
  });
  *mean = m;
  *rstd = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
}

}  // namespace cpu
}  // namespace nit
