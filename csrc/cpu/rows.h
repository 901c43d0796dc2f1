// Row helpers shared by the CPU kernels: argument checks of the packed AdaLN family, the
// image-by-image row loop, per-image row gathering, LayerNorm statistics of an fp32 row buffer.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include <initializer_list>
#include <utility>

#include "checks.h"
#include "common/segments.h"
#include "cpu/vec.h"

namespace nit {
namespace cpu {

using Named = std::pair<const at::Tensor*, const char*>;

// x [N, D] (named x_name), cu_seqlens [B+1] consistent with N, and per-image rows [B, D] like x.
inline int64_t check_modulation(const at::Tensor& x, const char* x_name, const at::Tensor& cu,
                                std::initializer_list<Named> rows) {
  check_float_input(x, x_name);
  TORCH_CHECK(x.dim() == 2, x_name, " must be [N, D], got shape ", x.sizes());
  const int64_t B = check_cu_seqlens(cu, x.size(0), x);
  for (const auto& [t, name] : rows) {
    check_float_input(*t, name);
    check_like(*t, x, name, x_name);
    check_shape(*t, {B, x.size(1)}, name);
  }
  return B;
}

// token tensors [N, D] like x
inline void check_tokens(const at::Tensor& x, const char* x_name, std::initializer_list<Named> tensors) {
  for (const auto& [t, name] : tensors) {
    check_float_input(*t, name);
    check_like(*t, x, name, x_name);
    check_shape(*t, x.sizes(), name);
  }
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
