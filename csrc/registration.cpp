// Every op schema of the `nit` library, defined once. Backends add implementations with
// TORCH_LIBRARY_IMPL(nit, CPU|CUDA, m) in csrc/cpu/<family>.cpp and csrc/cuda/<family>_glue.cpp;
// Python registers the checking fakes and the autograd once per op (nit_kernels/_autograd.py).
//
// Shared conventions: tokens of image i are rows cu_seqlens[i] .. cu_seqlens[i+1]-1 of every
// [N, ...] tensor; cu_seqlens and sizes are int32; per-image rows (shift, scale, gate) are
// [B, D]; all math is fp32 whatever the input dtype; outputs have the input dtype; saved
// statistics (mean, rstd, lse) are fp32.
#include <Python.h>
#include <torch/library.h>

#define NIT_CUDA_LIMITS_ONLY
#include "cuda/launchers.h"

TORCH_LIBRARY(nit, m) {
  // packed AdaLN: y = LN(x) * (1 + scale[seg]) + shift[seg]; mean/rstd [N] for backward
  m.def("adaln_modulate_fwd(Tensor x, Tensor shift, Tensor scale, Tensor cu_seqlens, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("adaln_modulate_bwd(Tensor dy, Tensor x, Tensor scale, Tensor mean, Tensor rstd, Tensor cu_seqlens) -> (Tensor dx, Tensor dshift, Tensor dscale)");
  // gated residual: out = x + gate[seg] * y
  m.def("gated_residual_fwd(Tensor x, Tensor y, Tensor gate, Tensor cu_seqlens) -> Tensor");
  m.def("gated_residual_bwd(Tensor dout, Tensor y, Tensor gate, Tensor cu_seqlens) -> (Tensor dy, Tensor dgate)");
  // residual + next AdaLN in one pass: x_new = x + gate[seg]*y; h = adaln(x_new). The backward
  // takes x (not the rounded x_new) and re-forms x_new in fp32 from x, y and gate.
  m.def("residual_adaln_fwd(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, Tensor cu_seqlens, float eps) -> (Tensor x_new, Tensor h, Tensor mean, Tensor rstd)");
  m.def("residual_adaln_bwd(Tensor dx_new, Tensor dh, Tensor x, Tensor y, Tensor gate, Tensor scale, Tensor mean, Tensor rstd, Tensor cu_seqlens) -> (Tensor dx, Tensor dy, Tensor dgate, Tensor dshift, Tensor dscale)");
  // axial 2D RoPE on q [N,H,Dh] and k [N,Hk,Dh]; inverse=true applies the transposed rotation (backward)
  m.def("rope_2d(Tensor q, Tensor k, Tensor cu_seqlens, Tensor sizes, Tensor freqs, str positions, float mscale, bool inverse) -> (Tensor q_rot, Tensor k_rot)");
  // LayerNorm over Dh with affine, then rope_2d; mean/rstd [N,H] and [N,Hk]
  m.def("qk_norm_rope_fwd(Tensor q, Tensor k, Tensor cu_seqlens, Tensor sizes, Tensor freqs, Tensor q_weight, Tensor q_bias, Tensor k_weight, Tensor k_bias, float eps, str positions, float mscale) -> (Tensor q_rot, Tensor k_rot, Tensor q_mean, Tensor q_rstd, Tensor k_mean, Tensor k_rstd)");
  m.def("qk_norm_rope_bwd(Tensor dq_rot, Tensor dk_rot, Tensor q, Tensor k, Tensor cu_seqlens, Tensor sizes, Tensor freqs, Tensor q_weight, Tensor k_weight, Tensor q_mean, Tensor q_rstd, Tensor k_mean, Tensor k_rstd, str positions, float mscale) -> (Tensor dq, Tensor dk, Tensor dq_weight, Tensor dq_bias, Tensor dk_weight, Tensor dk_bias)");
  // varlen attention, flash_attn_varlen_func semantics; lse [H, N_q] fp32 (natural log).
  // max_seqlen_* are SymInt so that torch.compile does not specialise (and recompile) on them.
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)");
  m.def("varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal) -> (Tensor dq, Tensor dk, Tensor dv)");
  // y = gelu_tanh(x + bias) on x [N, H], bias [H] (any float dtype; math fp32). The backward
  // also returns the recomputed y, for callers that keep x instead of y.
  m.def("bias_gelu_fwd(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor bias) -> (Tensor dx, Tensor dbias, Tensor y)");
  // largest head_dim of the CUDA kernels (csrc/cuda/launchers.h); the CPU kernels have no limit
  m.def("limits() -> (int varlen_attention_max_head_dim, int qk_norm_rope_max_head_dim)");
}

// limits takes no tensor, so no backend key selects a kernel: one serves every backend.
TORCH_LIBRARY_IMPL(nit, CompositeExplicitAutograd, m) { m.impl("limits", &nit::cuda::limits); }

// `import nit_kernels._C` loads this library (and with it the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
