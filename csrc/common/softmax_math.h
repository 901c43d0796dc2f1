// Online-softmax state shared by the attention kernels on CPU and CUDA
// (Milakov & Gimelshein 2018; FlashAttention-2, Dao 2023).
#pragma once
#include <math.h>
#include "common/macros.h"

namespace nit {

// Running max m and running sum l of exp(s - m) for one query row.
struct OnlineSoftmax {
  float m = -INFINITY;
  float l = 0.f;

  // Take a new block maximum; returns the factor by which earlier accumulators must be rescaled.
  NIT_HD float rescale_to(float block_max) {
    const float m_new = block_max > m ? block_max : m;
    const float alpha = (m == -INFINITY) ? 0.f : expf(m - m_new);
    l *= alpha;
    m = m_new;
    return alpha;
  }
  // log-sum-exp of everything seen; -inf for a row that saw no key.
  NIT_HD float lse() const { return l > 0.f ? m + logf(l) : -INFINITY; }
};

}  // namespace nit
