// Rotation coefficients of axial 2D RoPE, shared by CPU and CUDA kernels (see rope_math.h for
// positions and the per-pair rotation).
#pragma once
#include <math.h>
#include <stdint.h>
#include "common/macros.h"

namespace nit {

// Integer positions of token t of an h x w image, the values rope_positions gives as floats
// (for indexing per-position tables).
NIT_HD void rope_position_indices(int64_t t, int64_t h, int64_t w, bool official, int64_t* p0,
                                  int64_t* p1) {
  const int64_t m = official ? h : w;
  *p0 = t % m;
  *p1 = t / m;
}

// Number of distinct values of p0 and p1 over an h x w image (positions of rope_positions):
// grid: p0 < w, p1 < h; official: p0 < h, p1 < w.
NIT_HD void rope_axis_extents(int64_t h, int64_t w, bool official, int64_t* n0, int64_t* n1) {
  *n0 = official ? h : w;
  *n1 = official ? w : h;
}

// Coefficients of one interleaved pair at position p with angular frequency f: the angle is
// the fp32 product p * f (as in the reference), c = mscale * cos(angle), s = mscale * sin(angle),
// s negated for the inverse (transposed) rotation. Applied as
// (x0, x1) -> (x0 * c - x1 * s, x1 * c + x0 * s).
NIT_HD void rope_coeffs(float p, float f, float mscale, bool inverse, float* c, float* s) {
  const float angle = p * f;
  float sn, cs;
#if defined(__CUDA_ARCH__)
  sincosf(angle, &sn, &cs);
#else
  // evaluated in double, then rounded: accurate to fp32 rounding for any angle
  sn = static_cast<float>(sin(static_cast<double>(angle)));
  cs = static_cast<float>(cos(static_cast<double>(angle)));
#endif
  *c = mscale * cs;
  *s = inverse ? -(mscale * sn) : mscale * sn;
}

}  // namespace nit
