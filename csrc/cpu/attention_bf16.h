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
//
// Without AMX: cpublas::could_pack(kBFloat16) asks for oneDNN's AMX ISA and is false, but
// cpublas::brgemm still runs bf16 with B in the same VNNI layout ([K/2][N][2]) through oneDNN's
// avx512_core_bf16 kernels (ATen only needs the ISA to be at least avx512_core), which is what
// the probe of attention_bf16_isa() checks. Under ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 on a Xeon
// with AMX (oneDNN then reports "AVX-512 with Intel DL Boost and bfloat16 support") the bf16 tiles
// pass the accuracy tests, but were slower than the fp32 tiles at every image length (one
// thread, packs of about 2,048 tokens of 16 to 1,024-token images, NiT-S and NiT-XL heads):
// forward 0.67-0.89x, backward 0.43-0.80x. The cause is the instruction, not the kernels: on that
// core vdpbf16ps zmm (64 flops) issues at a quarter of the rate of vfmadd231ps zmm (32 flops),
// 113-118 against 224-238 GFLOP/s per core in a register-only loop with 12 or 24 independent
// accumulators, and torch's bf16 matmul under the same ISA ran at 107-114 GFLOP/s, one thread,
// where fp32 ran at 171-228 (M x K x N = 2,048 x 2,048 x 64, 2,048 x 72 x 2,048,
// 2,048 x 2,048 x 80) and 66 (2,048 x 64 x 2,048); with AMX, bf16 ran at 547-1,089. With a
// peak of half the fp32 FMA rate, a hand-written vdpbf16ps kernel is not expected to beat the
// fp32 tiles there either (not tried). So avx512_bf16 runs only when forced (for tests, and for
// measuring CPUs whose vdpbf16ps is faster relative to FMA; none was measured); unforced, bf16
// stays on the fp32 tiles where AMX is absent.
enum class Bf16Isa { none, avx512_bf16, amx };
Bf16Isa attention_bf16_isa();  // detected once

// Shortest image (query and key tokens) that the bf16 tiles take by default: forward; backward
// with head dims (of q and v) up to 64; backward with a larger head dim. Shorter images run on the
// fp32 tiles, which were as fast or faster there (the bf16 tiles pay per task for packing K and
// V, for padding keys and query rows to 32, and for a brgemm kernel per shape). Measured on a
// Xeon with AMX: speed of the bf16 tiles over the fp32 tiles on packs of about 2,048 tokens of
// equal images, CPU time of one thread, on a machine shared with other work (three runs, CPU
// pressure 5-60%, 50-70% and 85-100%; python -m benchmarks.attention_ratios --sweep), NiT-S heads
// (head dim 64) / NiT-XL heads (72), the lowest of the runs that measured a shape (44 tokens: one
// run, NiT-XL backward two):
//   tokens    16         24         28         32         40         44         48         64
//   forward   0.63/0.67  0.98/0.95  1.05/1.03  1.16/1.12  1.17/1.19  1.33/1.27  1.40/1.17  1.56/1.52
//   backward  0.76/0.75  0.96/0.83  1.09/0.91  1.43/1.04  1.16/0.94  1.22/1.02  1.38/1.07  1.72/1.35
// The NiT-XL backward at 32-44 tokens was 1.04-1.26x in the two calmer runs but 0.94x at 40 in the
// busiest: 48 above head dim 64 keeps a margin.
constexpr int64_t kBf16MinTokensFwd = 32;
constexpr int64_t kBf16MinTokensBwd64 = 32;
constexpr int64_t kBf16MinTokensBwd = 48;

// Which images of a bf16 call run on the bf16 tiles; the others on the fp32 tiles. The
// environment variable NIT_CPU_ATTENTION_ISA (read at each call) forces a path for every image:
// amx or avx512_bf16 (raises unless that is the ISA detected here) or fp32; unset, the images
// with at least kBf16MinTokens* query and key tokens take the bf16 tiles where the ISA is amx.
// A rule of the shapes alone: results do not depend on the thread count.
struct Bf16Choice {
  Bf16Isa isa = Bf16Isa::none;
  bool every_image = false;  // forced
  // an image of sq queries and sk keys, head dims d (q, k) and dv (v)
  bool takes(int64_t sq, int64_t sk, int64_t d, int64_t dv, bool backward) const {
    if (isa == Bf16Isa::none) return false;
    const int64_t least = !backward ? kBf16MinTokensFwd
                          : std::max(d, dv) <= 64 ? kBf16MinTokensBwd64 : kBf16MinTokensBwd;
    return every_image || std::min(sq, sk) >= least;
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
