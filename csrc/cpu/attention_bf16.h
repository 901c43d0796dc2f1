// bf16 varlen attention on the CPU's matrix units (AMX tiles through ATen's brgemm), called by
// attention.cpp for bf16 inputs when attention_bf16_selected() says so.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu/attention_common.h"

namespace nit {

// Whether bf16 attention runs on the matrix units. NIT_CPU_ATTENTION_ISA=amx|fp32 forces a path
// (amx raises on a CPU without AMX-BF16); unset: amx where the CPU has it, else the fp32 tiles.
bool attention_bf16_selected();

// One forward / backward task of attention.cpp's task lists, same contract as the fp32 tiles.
void attention_bf16_fwd_task(const Geometry& g, const at::BFloat16* q, const at::BFloat16* k,
                             const at::BFloat16* v, at::BFloat16* out, float* lse, const Task& t,
                             std::vector<float>& buf);
void attention_bf16_bwd_task(const Geometry& g, const at::BFloat16* dout, const at::BFloat16* q,
                             const at::BFloat16* k, const at::BFloat16* v,
                             const at::BFloat16* out, const float* lse, at::BFloat16* dq,
                             at::BFloat16* dk, at::BFloat16* dv, float* dk_part, float* dv_part,
                             const Task& t, std::vector<float>& buf);

}  // namespace nit
