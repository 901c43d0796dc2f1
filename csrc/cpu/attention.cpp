// CPU kernels of varlen attention (flash_attn_varlen_func semantics), forward and backward.
//
// Design: a tiled online-softmax kernel of our own (FlashAttention-2, Dao 2023: the forward
// walks key tiles with a running max and sum; the backward recomputes P from the saved
// log-sum-exp). The alternative was ATen's fused CPU kernel
// (_scaled_dot_product_flash_attention_for_cpu and its backward) called per image from C++,
// either image after image with the kernel's own threads or one image per thread. On a
// 4,077-token ImageNet-like pack (27 images, fp32, H=6/Dh=64 and H=16/Dh=72, one thread) this
// kernel took 0.79-0.85x its CPU time in the forward and 0.75-0.82x in forward+backward, with
// AVX-512 on both sides and with both held to AVX2; it is also the only one of the two that
//   - schedules every (image, head, query chunk) of the pack as one task list over all
//     threads, largest first, in one parallel region (a region per image stalls when cores are
//     shared, and small images leave threads idle);
//   - computes fp16/bf16 inputs in fp32 tiles at fp32 speed (reduced-precision CPU GEMM is
//     ~100x slower than fp32 on CPUs without fp16/bf16 matrix instructions);
//   - implements bottom-right causal alignment for sq != sk, rows that see no key (out 0,
//     lse -inf), grouped-query heads and a head_dim of v different from that of q.
//
// Layout: q [Nq, H, D], k [Nk, Hk, D], v [Nk, Hk, Dv], out [Nq, H, Dv]; lse fp32 [H, Nq]
// (natural log). The tile code (attention_kernels.h) is compiled twice: with 256-bit vectors
// (AVX2 under the default -march=x86-64-v3) and, with GCC on x86-64, with 512-bit vectors
// under `#pragma GCC target("avx512f")`; the wider one runs where the CPU has AVX-512F.
// NIT_CPU_ATTENTION_VECTOR_BITS=256|512 overrides the choice (for tests and measurements).
// bf16 inputs run on bf16 tiles instead where oneDNN's brgemm runs bf16 on AMX-BF16
// (attention_bf16.cpp: the same tasks, with bf16 GEMMs through ATen's brgemm), image by image:
// images shorter than kBf16MinTokens* (attention_bf16.h) stay on these tiles, which are faster
// there. NIT_CPU_ATTENTION_ISA=amx|avx512_bf16|fp32 forces one path for every image (fp32: these
// tiles, as for fp16 and fp32 inputs; avx512_bf16: the bf16 tiles where oneDNN runs bf16 with
// AVX512-BF16 but not AMX, slower than these tiles, hence never chosen unforced).
//
// Non-finite input flows as through softmax(q k^T) v: a NaN score, or a row whose visible scores
// are all -inf, makes the row NaN (out and lse), and the backward spreads it through the saved
// lse, without a per-element test in the tile loops. A row that sees no key by the mask alone
// (causal, sq > sk) keeps out 0 and lse -inf.
//
// Determinism: each task owns its output rows, the partial dK/dV of an image split into several
// query chunks are summed in chunk order, and tiles are fixed: results are bitwise identical
// for any thread count, forward and backward (for a given vector width).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/attention_bf16.h"
#include "cpu/attention_common.h"
#include "cpu/isa.h"


// Vectors are passed only between inline functions of this file, so no ABI is crossed; GCC
// reports -Wpsabi at the end of the translation unit, hence no push/pop around it.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace nit { namespace { namespace vec256 {  // the tiles with 256-bit vectors
#define NIT_ATTENTION_VECTOR_BYTES 32
#include "cpu/attention_kernels.h"
} } }  // namespace nit::(anonymous)::vec256

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NIT_ATTENTION_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace nit { namespace { namespace vec512 {  // the tiles with 512-bit vectors
#define NIT_ATTENTION_VECTOR_BYTES 64
#include "cpu/attention_kernels.h"
} } }  // namespace nit::(anonymous)::vec512
#pragma GCC pop_options
#else
#define NIT_ATTENTION_AVX512 0
#endif

namespace nit {
namespace {

// ----------------------------------------------------------------------------------------------
// argument checks
// ----------------------------------------------------------------------------------------------
int64_t longest(const at::Tensor& cu) {
  const int32_t* c = cu.data_ptr<int32_t>();
  int64_t m = 0;
  for (int64_t i = 0; i + 1 < cu.numel(); ++i) m = std::max<int64_t>(m, int64_t(c[i + 1]) - c[i]);
  return m;
}

Geometry check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                         int64_t max_k, double scale, bool causal) {
  check_float_input(q, "q");
  check_float_input(k, "k");
  check_float_input(v, "v");
  TORCH_CHECK(q.dim() == 3, "q must be [Nq, H, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "k must be [Nk, Hk, D], got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 3, "v must be [Nk, Hk, Dv], got shape ", v.sizes());
  check_like(k, q, "k", "q");
  check_like(v, q, "v", "q");
  TORCH_CHECK(k.size(2) == q.size(2), "q and k must share head_dim, got ", q.size(2), " and ",
              k.size(2));
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1),
              "v must have k's tokens and heads [", k.size(0), ", ", k.size(1), ", Dv], got ",
              v.sizes());
  TORCH_CHECK(q.size(2) > 0 && v.size(2) > 0, "head_dim must be positive, got q ", q.sizes(),
              " and v ", v.sizes());
  check_attention_heads(q.size(1), k.size(1));
  TORCH_CHECK(std::isfinite(scale), "softmax_scale must be finite, got ", scale);
  const int64_t B = check_cu_seqlens_qk(cu_q, cu_k, q, k);
  const int64_t longest_q = longest(cu_q), longest_k = longest(cu_k);
  TORCH_CHECK(max_q >= longest_q, "max_seqlen_q=", max_q,
              " is smaller than the longest query sequence (", longest_q, ")");
  TORCH_CHECK(max_k >= longest_k, "max_seqlen_k=", max_k,
              " is smaller than the longest key sequence (", longest_k, ")");
  Geometry g;
  g.B = B;
  g.Nq = q.size(0);
  g.Nk = k.size(0);
  g.H = q.size(1);
  g.Hk = k.size(1);
  g.G = g.H / g.Hk;
  g.D = q.size(2);
  g.Dv = v.size(2);
  g.cq = cu_q.data_ptr<int32_t>();
  g.ck = cu_k.data_ptr<int32_t>();
  g.scale = static_cast<float>(scale);
  g.causal = causal;
  return g;
}

bool use_avx512() {
#if NIT_ATTENTION_AVX512
  static const bool has = __builtin_cpu_supports("avx512f");
  return cpu::choose_512_bits("NIT_CPU_ATTENTION_VECTOR_BITS", true, has, "AVX-512F");
#else
  return cpu::choose_512_bits("NIT_CPU_ATTENTION_VECTOR_BITS", false, false, "AVX-512F");
#endif
}

template <class F>
void dispatch_float(at::ScalarType st, const F& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", st);
  }
}

// ----------------------------------------------------------------------------------------------
// forward
// ----------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, bool causal) {
  const Geometry g = check_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal);
  auto out = at::empty({g.Nq, g.H, g.Dv}, q.options());
  auto lse = at::empty({g.H, g.Nq}, q.options().dtype(at::kFloat));
  // images on the bf16 tiles (bf16 inputs; attention_bf16.h says which)
  std::vector<char> on_bf16(g.B, 0);
  if (q.scalar_type() == at::kBFloat16) {
    const Bf16Choice choice = attention_bf16_choice();
    for (int64_t b = 0; b < g.B; ++b) {
      on_bf16[b] = choice.takes(g.cq[b + 1] - g.cq[b], g.ck[b + 1] - g.ck[b], g.D, g.Dv, false);
    }
  }
  std::vector<Task> tasks;
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t sq = g.cq[b + 1] - g.cq[b], sk = g.ck[b + 1] - g.ck[b];
    // The bf16 tiles pack K and V once per task: longer tasks pack them fewer times per image.
    const int64_t chunk = on_bf16[b] ? kFwdChunkBf16 : kFwdChunk;
    for (int64_t r0 = 0; r0 < sq; r0 += chunk) {
      const int64_t r1 = std::min(sq, r0 + chunk);
      const double cost = double(r1 - r0) * (visible_keys(causal, r1, sq, sk) + 16);
      for (int64_t h = 0; h < g.H; ++h) tasks.push_back({b, h, r0, r1, -1, 0, cost});
    }
  }
  const bool wide = use_avx512();
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    float* lp = lse.data_ptr<float>();
    run_tasks(tasks, [&](const Task& t, std::vector<float>& buf) {
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (on_bf16[t.b]) return attention_bf16_fwd_task(g, qp, kp, vp, op, lp, t, buf);
      }
#if NIT_ATTENTION_AVX512
      if (wide) return vec512::fwd_task<T>(g, qp, kp, vp, op, lp, t, buf);
#endif
      vec256::fwd_task<T>(g, qp, kp, vp, op, lp, t, buf);
    });
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------------------------
// backward
// ----------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, double scale, bool causal) {
  const Geometry g = check_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal);
  check_attention_saved(dout, out, lse, q, {g.Nq, g.H, g.Dv});
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  // Images longer than kBwdChunk queries are split into nc <= kBwdMaxSplit chunks (a rule of
  // the shape alone, so results do not depend on the thread count); their dK/dV partials are
  // summed in chunk order afterwards. The bf16 tiles take longer chunks (fewer partials to
  // write and sum, longer GEMMs).
  std::vector<char> on_bf16(g.B, 0);
  if (q.scalar_type() == at::kBFloat16) {
    const Bf16Choice choice = attention_bf16_choice();
    for (int64_t b = 0; b < g.B; ++b) {
      on_bf16[b] = choice.takes(g.cq[b + 1] - g.cq[b], g.ck[b + 1] - g.ck[b], g.D, g.Dv, true);
    }
  }
  std::vector<Task> tasks;
  std::vector<std::pair<int64_t, int64_t>> split;  // images with more than one chunk, and their count
  int64_t part_rows = 0;
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t sq = g.cq[b + 1] - g.cq[b], sk = g.ck[b + 1] - g.ck[b];
    if (sq == 0 && sk == 0) continue;
    const int64_t chunk = on_bf16[b] ? kBwdChunkBf16 : kBwdChunk;
    const int64_t nc = std::clamp<int64_t>((sq + chunk - 1) / chunk, 1, kBwdMaxSplit);
    const int64_t rows = (sq + nc - 1) / nc;
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t r0 = std::min(sq, c * rows), r1 = std::min(sq, r0 + rows);
      const double cost = double(r1 - r0) * g.G * (sk + 16) + sk;
      for (int64_t h = 0; h < g.Hk; ++h) {
        tasks.push_back({b, h, r0, r1, nc > 1 ? c : -1, part_rows, cost});
      }
    }
    if (nc > 1) {
      split.push_back({b, nc});
      part_rows += nc * sk;
    }
  }
  auto dk_part = at::empty({part_rows, g.Hk, g.D}, q.options().dtype(at::kFloat));
  auto dv_part = at::empty({part_rows, g.Hk, g.Dv}, q.options().dtype(at::kFloat));
  const bool wide = use_avx512();
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* dop = dout.data_ptr<T>();
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    const T* op = out.data_ptr<T>();
    const float* lp = lse.data_ptr<float>();
    T* dqp = dq.data_ptr<T>();
    T* dkp = dk.data_ptr<T>();
    T* dvp = dv.data_ptr<T>();
    float* pk = dk_part.data_ptr<float>();
    float* pv = dv_part.data_ptr<float>();
    run_tasks(tasks, [&](const Task& t, std::vector<float>& buf) {
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (on_bf16[t.b]) {
          return attention_bf16_bwd_task(g, dop, qp, kp, vp, op, lp, dqp, dkp, dvp, pk, pv, t, buf);
        }
      }
#if NIT_ATTENTION_AVX512
      if (wide) return vec512::bwd_task<T>(g, dop, qp, kp, vp, op, lp, dqp, dkp, dvp, pk, pv, t, buf);
#endif
      vec256::bwd_task<T>(g, dop, qp, kp, vp, op, lp, dqp, dkp, dvp, pk, pv, t, buf);
    });
    // dK, dV of split images: sum of the chunks' partials, in chunk order
    int64_t part = 0;
    for (const auto& [b, nc] : split) {
      const int64_t k0 = g.ck[b], sk = g.ck[b + 1] - k0;
      at::parallel_for(0, sk * g.Hk, 8, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(std::max(g.D, g.Dv));
        for (int64_t jh = begin; jh < end; ++jh) {
          for (const auto& [src, dst, w] : {std::tuple{pk, dkp, g.D}, std::tuple{pv, dvp, g.Dv}}) {
            std::fill(acc.begin(), acc.begin() + w, 0.f);
            for (int64_t c = 0; c < nc; ++c) {
              const float* s = src + ((part + c * sk) * g.Hk + jh) * w;
              for (int64_t d = 0; d < w; ++d) acc[d] += s[d];
            }
            for (int64_t d = 0; d < w; ++d) dst[(k0 * g.Hk + jh) * w + d] = static_cast<T>(acc[d]);
          }
        }
      });
      part += nc * sk;
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(nit, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace nit
