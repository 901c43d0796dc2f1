// bf16 varlen attention on bf16 tiles (AMX-BF16 or AVX512-BF16 GEMMs through ATen's brgemm), called
// by attention.cpp for the images of a bf16 call that attention_bf16_choice() gives them.
#pragma once

#include <ATen/ATen.h>

#include <stdint.h>

#include <algorithm>
#include <vector>

#include "cpu/attention_common.h"

namespace nit {

// The ISA of the bf16 tiles' GEMMs: oneDNN's brgemm (through ATen) picks its kernels for the
// ISA it sees, AMX-BF16 tiles or AVX512-BF16 (vdpbf16ps) where AMX is absent or hidden by
// ONEDNN_MAX_CPU_ISA; none: no bf16 tiles (bf16 runs on the fp32 tiles).
enum class Bf16Isa { none, avx512_bf16, amx };
Bf16Isa attention_bf16_isa();  // detected once

// Shortest image (query and key tokens) that the bf16 tiles take by default, forward and
// backward, per ISA; shorter images run on the fp32 tiles, which were faster there (the bf16
// tiles pay per task for packing K and V, for padding keys and query rows to 32 and for a
// brgemm kernel per shape). Measured on a Xeon with AMX (bf16 tiles / fp32 tiles, time per
// pack of about 2,048 tokens, one thread, NiT-S and NiT-XL heads): forward 0.67-0.70 at 16
// tokens, 0.97-0.99 at 24, 1.11 at 28, 1.12-1.19 at 32; backward 0.83-0.96 at 24, 1.04-1.44
// at 32, 0.94-1.16 at 40, 1.02-1.16 at 44, 1.07-1.43 at 48, 1.35-1.72 at 64.
constexpr int64_t kBf16MinTokensFwd = 32;
constexpr int64_t kBf16MinTokensBwd = 48;

// Which images of a bf16 call run on the bf16 tiles; the others on the fp32 tiles. The
// environment variable NIT_CPU_ATTENTION_ISA (read at each call) forces a path for every image:
// amx or avx512_bf16 (raises unless that is the ISA detected here) or fp32; unset, the images
// with at least kBf16MinTokens* query and key tokens take the bf16 tiles where an ISA is found.
// A rule of the shapes alone: results do not depend on the thread count.
struct Bf16Choice {
  Bf16Isa isa = Bf16Isa::none;
  bool every_image = false;  // forced
  bool takes(int64_t sq, int64_t sk, bool backward) const {
    if (isa == Bf16Isa::none) return false;
    return every_image || std::min(sq, sk) >= (backward ? kBf16MinTokensBwd : kBf16MinTokensFwd);
  }
};
Bf16Choice attention_bf16_choice();

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
