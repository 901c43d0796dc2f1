// Segment lookup in cu_seqlens, shared by CPU and CUDA kernels.
#pragma once
#include <stdint.h>
#include "common/macros.h"

namespace nit {

// Index i of the image holding token t: cu[i] <= t < cu[i+1] (upper bound over cu[1..B]).
// Empty images (cu[i] == cu[i+1]) are skipped naturally.
NIT_HD int find_segment(const int32_t* cu, int num_seqs, int64_t t) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (t < cu[mid + 1]) hi = mid; else lo = mid + 1;
  }
  return lo;
}

}  // namespace nit
