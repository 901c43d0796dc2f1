// Axial 2D RoPE math shared by the CPU and CUDA kernels (docs/ARCHITECTURE.md, the ops): the
// positions of a token, and the angle, cosine and sine of one interleaved pair.
//
// Token t (index inside its h x w image) has positions
//   grid:     p0 = t % w (column), p1 = t // w (row)
//   official: p0 = t % h,          p1 = t // h   (the released NiT meshgrid(..., 'xy') order)
// Pair i (dims 2i, 2i+1) of the first Dh/2 columns rotates with p0 and freqs[0][i], of the last
// Dh/2 with p1 and freqs[1][i]: (x0, x1) -> mscale * (x0 cos a - x1 sin a, x1 cos a + x0 sin a).
#pragma once
#include <math.h>
#include <stdint.h>
#include "common/macros.h"

namespace nit {

// Positions (p0, p1) of token t of an h x w image.
NIT_HD void rope_positions(int64_t t, int64_t h, int64_t w, bool official, int64_t* p0,
                           int64_t* p1) {
  const int64_t m = official ? h : w;
  *p0 = t % m;
  *p1 = t / m;
}

// Number of distinct values of p0 and p1 over an h x w image:
// grid: p0 < w, p1 < h; official: p0 < h, p1 < w.
NIT_HD void rope_axis_extents(int64_t h, int64_t w, bool official, int64_t* n0, int64_t* n1) {
  *n0 = official ? h : w;
  *n1 = official ? w : h;
}

// cos and sin of the angle of position p at angular frequency f: the angle is the fp32 product
// p * f (one rounding, as in the reference), evaluated in double and rounded, so it is accurate
// to fp32 rounding for any angle (fast-math sinf/cosf lose accuracy at the hundreds of radians
// RoPE angles reach).
NIT_HD void rope_cos_sin(float p, float f, float* c, float* s) {
  const double angle = static_cast<double>(p * f);
#if defined(__CUDA_ARCH__)
  double sd, cd;
  sincos(angle, &sd, &cd);
  *c = static_cast<float>(cd);
  *s = static_cast<float>(sd);
#else
  *s = static_cast<float>(sin(angle));
  *c = static_cast<float>(cos(angle));
#endif
}

// Rotation of one pair (the CUDA kernels):
// (x0, x1) -> mscale * (x0 c - x1 s, x1 c + x0 s); inverse rotates by -a (s negated).
NIT_HD void rope_rotate_pair(float x0, float x1, float c, float s, float mscale, bool inverse,
                             float* y0, float* y1) {
  if (inverse) s = -s;
  *y0 = mscale * (x0 * c - x1 * s);
  *y1 = mscale * (x1 * c + x0 * s);
}

// The same rotation with mscale and the inverse sign folded into the coefficients (the CPU
// kernels, which apply (x0, x1) -> (x0 c' - x1 s', x1 c' + x0 s') as y = x * C + swap(x) * S):
// c' = mscale * cos a, s' = +-mscale * sin a.
NIT_HD void rope_coeffs(float p, float f, float mscale, bool inverse, float* c, float* s) {
  float sn, cs;
  rope_cos_sin(p, f, &cs, &sn);
  *c = mscale * cs;
  *s = inverse ? -(mscale * sn) : mscale * sn;
}

}  // namespace nit
