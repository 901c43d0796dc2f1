// LayerNorm and the packed AdaLN family (adaln_modulate, gated_residual, residual_adaln), and
// the LayerNorm inside qk_norm_rope: the one statement of their per-element math and of the
// Welford row statistics, shared by the CPU and CUDA kernels. Element functions are templates
// over the value type V: float in CUDA threads and scalar tails, an fp32 SIMD vector on the CPU
// (any V with + - * and a broadcast constructor V(float)).
//
// Forward:  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)  (biased variance)
//           y = xhat * (1 + scale[seg]) + shift[seg]
// Backward: given dxhat and the row means m1 = mean(dxhat), m2 = mean(dxhat * xhat),
//           dx = rstd * (dxhat - m1 - xhat * m2)
#pragma once
#include "common/macros.h"

namespace nit {

// xhat = (x - mean) * rstd
template <typename V>
NIT_HD V ln_normalize(V x, V mean, V rstd) {
  return (x - mean) * rstd;
}

// y = xhat * (1 + scale) + shift, with one_plus_scale = 1 + scale[seg] formed once per element
// (CUDA) or once per image row (CPU)
template <typename V>
NIT_HD V adaln_modulate_elem(V xhat, V one_plus_scale, V shift) {
  return xhat * one_plus_scale + shift;
}

// out = x + gate[seg] * y
template <typename V>
NIT_HD V gated_residual_elem(V x, V gate, V y) {
  return x + gate * y;
}

// Backward of xhat = (x - mean) * rstd over a row of n columns, given dxhat and the row means
// mean_dxhat = sum(dxhat)/n and mean_dxhat_xhat = sum(dxhat * xhat)/n:
// dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
template <typename V>
NIT_HD V ln_backward_elem(V dxhat, V xhat, V rstd, V mean_dxhat, V mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

// Row statistics in one pass (the CUDA kernels): Welford accumulation with Chan's parallel
// merge, so partial statistics of any split of a row combine to the same mean and (biased)
// variance. The CPU kernels hold a row in L1 and take the exact two-pass statistics instead.
struct Welford {
  float mean = 0.f;
  float m2 = 0.f;   // sum of squared deviations from mean
  float count = 0.f;

  NIT_HD void add(float x) {
    count += 1.f;
    const float d = x - mean;
    mean += d / count;
    m2 += d * (x - mean);
  }
  NIT_HD void merge(const Welford& o) {
    if (o.count == 0.f) return;
    if (count == 0.f) { *this = o; return; }
    const float n = count + o.count;
    const float d = o.mean - mean;
    mean += d * (o.count / n);
    m2 += o.m2 + d * d * (count * o.count / n);
    count = n;
  }
  // biased variance, as LayerNorm uses
  NIT_HD float var() const { return count > 0.f ? m2 / count : 0.f; }
};

}  // namespace nit
