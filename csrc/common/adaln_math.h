// Per-element math of the packed AdaLN family (adaln_modulate, gated_residual, residual_adaln)
// and of the LayerNorm inside qk_norm_rope, shared by the CPU and CUDA kernels. Templates over
// the value type V: float in CUDA threads and scalar tails, an fp32 SIMD vector on the CPU
// (any V with + - * and a broadcast constructor V(float)).
#pragma once
#include "common/macros.h"

namespace nit {

// xhat = (x - mean) * rstd
template <typename V>
NIT_HD V ln_normalize(V x, V mean, V rstd) {
  return (x - mean) * rstd;
}

// y = xhat * (1 + scale) + shift, with one_plus_scale = 1 + scale[seg] formed once per image row
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

}  // namespace nit
