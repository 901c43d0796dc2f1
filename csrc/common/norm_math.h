// Row statistics shared by the LayerNorm-based kernels (adaln_modulate, residual_adaln,
// qk_norm_rope) on CPU and CUDA: Welford accumulation with Chan's parallel merge, so partial
// statistics of any split of a row combine to the same mean and (biased) variance.
#pragma once
#include "common/macros.h"

namespace nit {

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

// dx of y = (x - mean) * rstd given dxhat = dL/dxhat for one row of length n:
// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
NIT_HD float layernorm_dx(float dxhat, float xhat, float rstd, float mean_dxhat,
                          float mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

}  // namespace nit
