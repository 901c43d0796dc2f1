// Axial 2D RoPE math shared by CPU and CUDA kernels (see DESIGN.md section 4, rope_2d).
#pragma once
#include <stdint.h>
#include "common/macros.h"

namespace nit {

// Positions of token t (index inside its image) of an h x w image.
// grid:     p0 = t % w (column), p1 = t // w (row)
// official: p0 = t % h,          p1 = t // h   (the released NiT meshgrid(..., 'xy') order)
NIT_HD void rope_positions(int64_t t, int64_t h, int64_t w, bool official, float* p0, float* p1) {
  const int64_t m = official ? h : w;
  *p0 = static_cast<float>(t % m);
  *p1 = static_cast<float>(t / m);
}

// Rotation of one interleaved pair by angle a, scaled by mscale:
// (x0, x1) -> mscale * (x0 cos a - x1 sin a, x1 cos a + x0 sin a). inverse rotates by -a.
NIT_HD void rope_rotate_pair(float x0, float x1, float c, float s, float mscale, bool inverse,
                             float* y0, float* y1) {
  if (inverse) s = -s;
  *y0 = mscale * (x0 * c - x1 * s);
  *y1 = mscale * (x1 * c + x0 * s);
}

}  // namespace nit
