// bf16 varlen attention on the matrix units: the tile products run as bf16 x bf16 -> fp32 GEMMs
// through ATen's batch-reduce GEMM (at::native::cpublas::brgemm, oneDNN's AMX micro-kernels, the
// primitive PyTorch's own CPU flash attention uses), softmax and accumulation stay in fp32.
//
// Same tasks, tiling, masking and non-finite semantics as the fp32 tiles (attention.cpp,
// attention_kernels.h); what differs:
//   - scores s = (q . k) * scale * log2(e), the product in fp32 after the bf16 GEMM (the fp32
//     tiles scale q before it);
//   - the forward rounds P to bf16 once for P V (as bf16 flash attention kernels do; l sums the
//     fp32 weights, from a degree-5 exp2); the backward rounds P once for dV = P^T dO and dS once
//     for dQ = dS K, but gives dK = dS^T Q its dS as two bf16 terms, hi = bf16(x) and
//     lo = bf16(x - hi), two GEMMs into one fp32 accumulator (x keeps about 16 significant bits):
//     dK sums dS over every query row of the image. Worst error over the bound of the accuracy
//     rule on the tests' shapes, seeds 0-3: dK 0.71 split, 0.91 rounded once; dV 0.43 split,
//     0.70 rounded once; dQ 1.00 either way (its worst case, NiT-XL shapes with seed 3, is set
//     elsewhere: it was 1.00 with all three products split too). q, k, v and dO are bf16
//     already, so every other operand is exact;
//   - the backward clamps s ln2 - lse at 0, so P <= 1 even if a GEMM rounded differently from the
//     forward (a NaN stays NaN).
// brgemm reads its B operand in the VNNI layout: column blocks of at most 128 columns (16 padded),
// each [K/2][width][2] (pairs of consecutive k interleaved); pack_rows / pack_cols write it
// straight from the strided [tokens, heads, dim] rows, with zeros in the padding.
//
// Chosen at run time, image by image (attention_bf16.h): AMX-BF16 where cpublas::could_pack says
// oneDNN can use it, for images of at least kBf16MinTokens*, else the fp32 tiles; where oneDNN
// runs bf16 with AVX512-BF16 but not AMX these tiles run only when forced (slower than the fp32
// tiles there); NIT_CPU_ATTENTION_ISA=amx|avx512_bf16|fp32 forces one path. Results are
// deterministic for any thread count, as on the fp32 path.
//
// fp16 stays on the fp32 tiles: on a CPU with AVX512-FP16 but no AMX-FP16 (Sapphire Rapids),
// cpublas::could_pack(kHalf) is false and ATen's fp16 brgemm ran at 55-70 GFLOP/s on the tile
// shapes used here (64 x 64 x 64 to 64 x 64 x 1024, one thread), against 280-490 for bf16; the
// whole fp32 attention, softmax included, runs at about 65 GFLOP/s (NiT-S, 4 x 1,024 tokens). Where
// could_pack(kHalf) holds (AMX-FP16), this code could take fp16 through a template on the
// element type.
#include "cpu/attention_bf16.h"

#include <ATen/native/CPUBlas.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <string>

#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12 flags the deliberately undefined source of its own AVX-512 intrinsics (_mm512_undefined)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The vector helpers of the fp32 tiles (exp2, reductions, masks, scratch), 512 bits wide, and
// the bf16 packing below with AVX-512BW's 16-bit shuffles (without BW GCC splits them into
// scalar moves) and AVX512-BF16's conversions: every CPU with AMX-BF16 has AVX-512F/BW/VL/DQ/BF16.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NIT_ATTENTION_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
namespace nit { namespace { namespace vec512 {  // the tiles with 512-bit vectors
#define NIT_ATTENTION_VECTOR_BYTES 64
#include "cpu/attention_kernels.h"
} } }  // namespace nit::(anonymous)::vec512
#else
#define NIT_ATTENTION_BF16 0
#endif

namespace nit {

#if NIT_ATTENTION_BF16
namespace {
using namespace vec512;
using bf = at::BFloat16;

inline int64_t even(int64_t n) { return (n + 1) & ~int64_t(1); }
inline int64_t pad16(int64_t n) { return round_up(n, 16); }

// Columns per VNNI block of a packed B (one brgemm call each): a head_dim of 72 or 80 (16
// padded) is one block, not 64 + a 16-wide remainder.
constexpr int64_t kNb = 128;

typedef uint16_t vh32 __attribute__((vector_size(64)));
struct Interleave {  // lanes of (a, b) for the low and high halves of a 16-bit pair interleave
  int16_t lo[32], hi[32];
  constexpr Interleave() : lo(), hi() {
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = i, lo[2 * i + 1] = 32 + i;
      hi[2 * i] = 16 + i, hi[2 * i + 1] = 48 + i;
    }
  }
};
constexpr Interleave kInter{};

// B[k, n] = x[k * ldx + n] for k < K, n < N: the rows of x (e.g. V tokens) are B's rows.
// stack > 0: B is [x; x] with 2 * stack rows (rows K..stack of each half 0), the B of [hi | lo] A.
// kb > 0 (even, >= K): B has kb rows, those from K on 0.
void pack_rows(const bf* x, int64_t ldx, int64_t K, int64_t N, bf* out, int64_t stack = 0,
               int64_t kb = 0) {
  const int64_t Kb = stack > 0 ? 2 * stack : kb > 0 ? kb : even(K), N16 = pad16(N);
  memset(static_cast<void*>(out), 0, sizeof(bf) * Kb * N16);
  const bf zero[32] = {};
  vh32 ilo, ihi;
  memcpy(&ilo, kInter.lo, sizeof(ilo));
  memcpy(&ihi, kInter.hi, sizeof(ihi));
  for (int64_t n0 = 0; n0 < N; n0 += kNb) {
    const int64_t w = std::min<int64_t>(kNb, N16 - n0), nn = std::min<int64_t>(kNb, N - n0);
    bf* o = out + n0 * Kb;
    for (int64_t half = 0; half < (stack > 0 ? 2 : 1); ++half) {
      for (int64_t k = 0; k < K; k += 2) {  // rows k, k + 1 -> one VNNI row of pairs
        const int64_t kb = k + half * stack;  // stack is even: kb has k's parity
        const bf* a = x + k * ldx + n0;
        const bf* b = k + 1 < K ? a + ldx : zero;
        const int64_t bstep = k + 1 < K ? 1 : 0;
        bf* ok = o + (kb >> 1) * 2 * w;
        int64_t n = 0;
        for (; n + 32 <= nn; n += 32) {
          vh32 va, vb;
          memcpy(&va, a + n, sizeof(va));
          if (bstep) memcpy(&vb, b + n, sizeof(vb)); else vb = vh32{};
          const vh32 lo = __builtin_shuffle(va, vb, ilo), hi = __builtin_shuffle(va, vb, ihi);
          memcpy(static_cast<void*>(ok + 2 * n), &lo, sizeof(lo));
          memcpy(static_cast<void*>(ok + 2 * n + 32), &hi, sizeof(hi));
        }
        for (; n < nn; ++n) {
          ok[2 * n] = a[n];
          ok[2 * n + 1] = b[n * bstep];
        }
      }
    }
  }
}

// B[k, n] = x[n * ldx + k] for k < K, n < N: the rows of x (e.g. K tokens) are B's columns, one
// column block of pad16(N) <= kNb.
// A VNNI row of B holds the pairs (x[n][k], x[n][k + 1]), adjacent in x: with K and ldx even
// this is a transpose of 32-bit words, done 16 x 16 in registers; the last N % 16 rows of x go
// through a zero-padded copy of 16 rows (done element by element, they made a task on an image
// of 36 tokens 1.3-1.5x slower than one on 48).
void pack_cols(const bf* x, int64_t ldx, int64_t K, int64_t N, bf* out) {
  const int64_t K2 = even(K), N16 = pad16(N);
  constexpr int64_t kTailWords = 256;  // the copy's row (K up to 512)
  const bool words = K % 2 == 0 && ldx % 2 == 0;
  const int64_t nfull = words ? N / kVec * kVec : 0;
  const int64_t kdone = words ? (K / 2) / kVec * kVec * 2 : 0;  // k done by the transposes
  float* dst = reinterpret_cast<float*>(out);
  if (kdone > 0 && nfull > 0) {
    transpose(reinterpret_cast<const float*>(x), ldx / 2, nfull, kdone / 2, dst, N16);
  }
  int64_t ntail = nfull;  // rows from here on: element by element (for k < kdone too)
  if (kdone > 0 && N > nfull && kdone / 2 <= kTailWords) {
    alignas(64) float tail[kVec * kTailWords];
    const int64_t w = kdone / 2;
    for (int64_t r = 0; r < kVec; ++r) {
      if (nfull + r < N) {
        memcpy(tail + r * w, x + (nfull + r) * ldx, sizeof(float) * w);
      } else {
        std::fill(tail + r * w, tail + (r + 1) * w, 0.f);
      }
    }
    transpose(tail, w, kVec, w, dst + nfull, N16);
    ntail = N16;
  }
  for (int64_t n = 0; n < N16; ++n) {
    const bf* src = x + n * ldx;
    for (int64_t k = n < ntail ? kdone : 0; k < K2; ++k) {
      out[(k >> 1) * 2 * N16 + 2 * n + (k & 1)] = n < N && k < K ? src[k] : bf(0.f);
    }
  }
}

// C[M, n] (+)= sum_k A[M, k] B[k, n] for n < pad16(N), k < even(K); B packed for (K, N) by
// pack_rows/pack_cols, A row-major with finite values (zeros) in a padding column k = K.
void mm(int64_t M, int64_t N, int64_t K, const bf* A, int64_t lda, const bf* B, float* C,
        int64_t ldc, bool acc) {
  if (M <= 0) return;
  const int64_t K2 = even(K), N16 = pad16(N);
  if (K2 == 0) {  // an empty sum (a task without query rows): brgemm refuses K = 0
    for (int64_t m = 0; m < M && !acc; ++m) std::fill(C + m * ldc, C + m * ldc + N16, 0.f);
    return;
  }
  for (int64_t n0 = 0; n0 < N16; n0 += kNb) {
    const int64_t w = std::min<int64_t>(kNb, N16 - n0);
    at::native::cpublas::brgemm(M, w, K2, lda, w, ldc, acc, A, B + n0 * K2, C + n0, true);
  }
}

// n elements of x to dst, zeros up to n2
inline void copy_row(bf* dst, const bf* x, int64_t n, int64_t n2) {
  memcpy(static_cast<void*>(dst), x, sizeof(bf) * n);
  for (int64_t d = n; d < n2; ++d) dst[d] = bf(0.f);
}


// x[0..16) as hi + lo, two bf16 (lo 0 where hi is not finite, so an inf stays an inf); the
// conversions are AVX512-BF16's (round to nearest even, a NaN stays a NaN).
__attribute__((always_inline)) inline void split16(const vf& xv, bf* hi, bf* lo) {
  const __m512 x = (__m512)xv;
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), h);
  const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(hf, hf), _mm512_setzero_ps(), _CMP_EQ_OQ);
  const __m512 d = _mm512_maskz_sub_ps(finite, x, hf);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(d)));
}
__attribute__((always_inline)) inline void split16(const float* src, bf* hi, bf* lo) {
  split16(vload(src), hi, lo);
}

// 2^x for x <= 0 (-inf gives 0, NaN stays NaN, 2^0 = 1 exactly): n = round(x), f = x - n in
// [-1/2, 1/2], 2^f by a degree-5 polynomial fitted for the least maximum relative error
// (2.4e-7, measured on a fine grid, in fp32), times 2^n by AVX-512's scalef. x is raised to -125
// first (vmaxps returns its second operand, x, when x is NaN) and results for x < -125 are set
// to 0 afterwards: scalef never makes a subnormal or underflows, each of which costs a microcode
// assist (padding keys, at -inf, would take one per vector; that made small images 1.5x slower).
// The forward rounds the weights to bf16 (relative error 2^-9) before P V and sums them for l,
// where 2.4e-7 is far below bf16's rounding of the output; the backward keeps vexp2.
__attribute__((always_inline)) inline vf vexp2_5(const vf& xv) {
  const __m512 lim = _mm512_set1_ps(-125.f);
  const __mmask16 tiny = _mm512_cmp_ps_mask((__m512)xv, lim, _CMP_LT_OQ);
  const __m512 x = _mm512_max_ps(lim, (__m512)xv);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = (vf)_mm512_sub_ps(x, n);
  vf p = vsplat(1.327647129073739e-03f);
  p = p * f + vsplat(9.675540961325169e-03f);
  p = p * f + vsplat(5.550713092088699e-02f);
  p = p * f + vsplat(2.402212023735046e-01f);
  p = p * f + vsplat(6.931469440460205e-01f);
  p = p * f + vsplat(1.f);
  return (vf)_mm512_mask_mov_ps(_mm512_scalef_ps((__m512)p, n), tiny, _mm512_setzero_ps());
}

// x[0..16) rounded to bf16 (AVX512-BF16: round to nearest even, a NaN stays a NaN)
__attribute__((always_inline)) inline void cvt16(const float* src, bf* dst) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      reinterpret_cast<__m256i>(_mm512_cvtneps_pbh((__m512)vload(src))));
}

// bf16 scratch carved from the worker's float buffer
inline bf* take_bf(Carver& c, int64_t n) { return reinterpret_cast<bf*>(c.take((n + 1) / 2)); }
inline int64_t pad_bf(int64_t n) { return pad((n + 1) / 2); }

// Releases the tile state at the end of a task (brgemm configures it on the next call).
struct TileRelease {
  ~TileRelease() { at::native::cpublas::brgemm_release(true); }
};

}  // namespace

// Forward tiles: query rows per tile and keys per S product (one packed block of K^T, kFk <= kNb):
// on one core, S products of 128 x 128 x D ran about 1.3x faster than the 64 x 64 x D ones.
constexpr int64_t kFq = 128, kFk = 128;
static_assert(kFk <= kNb, "a key tile of K^T must be one packed column block");

// One task = query rows [r0, r1) of image b, head h. Each query tile takes its scores against
// every visible key at once (S [rows, Np] in fp32), so its softmax is exact rather than online,
// and the GEMMs run back to back with one shape each: S by key tiles of kFk, O = P V in one
// product over all keys (switching brgemm shapes costs about a GEMM each time).
void attention_bf16_fwd_task(const Geometry& g, const bf* q, const bf* k, const bf* v, bf* out,
                             float* lse, const Task& t, std::vector<float>& buf) {
  TileRelease release;
  const int64_t q0 = g.cq[t.b], sq = g.cq[t.b + 1] - q0;
  const int64_t k0 = g.ck[t.b], sk = g.ck[t.b + 1] - k0;
  const int64_t off = sk - sq, h = t.head, hk = h / g.G;
  const int64_t D = g.D, Dv = g.Dv, H = g.H, Hk = g.Hk;
  const int64_t D2 = even(D), Dv16 = pad16(Dv);
  // keys padded to 32 (an AMX bf16 tile row): fewer distinct GEMM shapes over a pack of images
  const int64_t nvis = visible_keys(g.causal, t.r1, sq, sk), Np = round_up(nvis, 32);
  const int64_t nkb = (nvis + kFk - 1) / kFk;
  const int64_t kt_size = D2 * kFk;  // one packed key tile of K^T
  Carver c = carve(buf, pad_bf(nkb * kt_size) + pad_bf(Np * Dv16) + pad_bf(kFq * D2) +
                            pad_bf(kFq * Np) + pad(kFq * Np) + pad(kFq * Dv16) + 2 * pad(kFq));
  bf* kt = take_bf(c, nkb * kt_size);
  bf* vp = take_bf(c, Np * Dv16);  // V over the visible keys
  bf* qa = take_bf(c, kFq * D2);
  bf* pa = take_bf(c, kFq * Np);   // P in bf16
  float* S = c.take(kFq * Np);
  float* O = c.take(kFq * Dv16);
  float* m = c.take(kFq);
  float* l = c.take(kFq);
  vf rmax[kFq];  // per query row: the running max of its score vectors

  for (int64_t jb = 0; jb < nkb; ++jb) {
    const int64_t j0 = jb * kFk, nk = std::min(kFk, nvis - j0);
    pack_cols(k + ((k0 + j0) * Hk + hk) * D, Hk * D, D, nk, kt + jb * kt_size);
  }
  if (Np > 0) pack_rows(v + (k0 * Hk + hk) * Dv, Hk * Dv, nvis, Dv, vp, 0, Np);

  const float qmul = g.scale * kLog2e;  // scores in base 2: exp(s) = 2^(s log2 e)
  const vf vq = vsplat(qmul);
  for (int64_t i0 = t.r0; i0 < t.r1; i0 += kFq) {
    const int64_t rows = std::min(kFq, t.r1 - i0);
    const int64_t kend = visible_keys(g.causal, i0 + rows, sq, sk);
    for (int64_t r = 0; r < rows; ++r) {
      copy_row(qa + r * D2, q + ((q0 + i0 + r) * H + h) * D, D, D2);
      m[r] = -INFINITY;
      l[r] = 0.f;
    }
    // Without causality only the padding keys [kend, Np) are masked, all in the last vectors:
    // the scores stay unscaled in S, and the max (taken on each key tile right after its GEMM,
    // while the tile is in L1) and the exp pass scale them on the fly, the same rounded product
    // each time. Scaled before the mask (scale may be 0 or < 0).
    const bool plain = !g.causal;
    const int64_t full = plain ? kend / kVec * kVec : Np;  // vectors before `full` need no mask
    vi lane;
    for (int i = 0; i < kVec; ++i) lane[i] = i;
    const vf ninf = vsplat(-INFINITY);
    const auto score = [&](const float* s, int64_t cc) {  // the scaled, masked scores at key cc
      const vf x = vload(s + cc);
      if (!plain) return x;
      const vf t = vround(x * vq);
      return cc < full ? t : lane < static_cast<int32_t>(kend - cc) ? t : ninf;
    };
    for (int64_t r = 0; r < rows; ++r) rmax[r] = ninf;
    for (int64_t j0 = 0; j0 < kend; j0 += kFk) {  // N as packed (the tile's B layout depends on it)
      mm(rows, std::min(kFk, nvis - j0), D, qa, D2, kt + (j0 / kFk) * kt_size, S + j0, Np, false);
      if (!plain) continue;
      const int64_t j1 = std::min(j0 + kFk, Np);
      for (int64_t r = 0; r < rows; ++r) {
        vf vmax = rmax[r];
        for (int64_t cc = j0; cc < j1; cc += kVec) {
          const vf x = score(S + r * Np, cc);
          vmax = x > vmax ? x : vmax;
        }
        rmax[r] = vmax;
      }
    }
    if (!plain) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t cc = 0; cc < Np; cc += kVec) vstore(S + r * Np + cc, vload(S + r * Np + cc) * vq);
      }
      mask_tile(S, Np, rows, Np, kend, g.causal, i0, 0, off, -INFINITY);
      for (int64_t r = 0; r < rows; ++r) {
        vf vmax = ninf;
        for (int64_t cc = 0; cc < Np; cc += kVec) {
          const vf x = vload(S + r * Np + cc);
          vmax = x > vmax ? x : vmax;
        }
        rmax[r] = vmax;
      }
    }
    for (int64_t r = 0; r < rows && Np > 0; ++r) {
      const float* s = S + r * Np;
      bf* p = pa + r * Np;
      const vf vmax = rmax[r];
      // NaN scores are skipped by the max and reach l and O through exp2 (vexp2(NaN) = NaN)
      m[r] = hmax(vmax);
      if (m[r] == -INFINITY) {  // every visible score -inf or NaN: weights 0 ...
        for (int64_t cc = 0; cc < Np; cc += kVec) {
          const vf x = score(s, cc);
          for (int i = 0; i < kVec; ++i) {
            if (std::isnan(x[i])) l[r] = NAN;  // ... but a NaN score makes the row NaN
          }
        }
        memset(static_cast<void*>(p), 0, sizeof(bf) * Np);
        continue;
      }
      const vf vm = vsplat(m[r]);
      vf vsum = vsplat(0.f);
      for (int64_t cc = 0; cc < Np; cc += kVec) {
        const vf e = vexp2_5(score(s, cc) - vm);
        vsum += e;
        const __m512 x = (__m512)e;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + cc), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
      }
      l[r] = hsum(vsum);
    }
    if (Np > 0) {
      mm(rows, Dv, Np, pa, Np, vp, O, Dv16, false);
    } else {
      std::fill(O, O + rows * Dv16, 0.f);
    }
    // l > 0: the row's softmax; l == 0 and no visible key (causal, or sk = 0): out 0, lse -inf;
    // l == 0 with visible keys (all scores -inf) or l NaN: out and lse NaN, as softmax gives.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = q0 + i0 + r;
      const bool sees = visible_keys(g.causal, i0 + r + 1, sq, sk) > 0;
      const float none = sees ? NAN : 0.f;
      store_row(out + (row * H + h) * Dv, O + r * Dv16, Dv, l[r] > 0.f ? 1.f / l[r] : none);
      lse[h * g.Nq + row] = l[r] > 0.f ? (m[r] + std::log2(l[r])) * kLn2 : sees ? NAN : -INFINITY;
    }
  }
}

// One task = query rows [r0, r1) of image b and the G query heads of k/v head hk, against every
// key of the image (the math of attention_kernels.h's bwd_task):
//   dV += P^T dO,  dP = dO V^T,  dS = P (dP - delta) scale,  dK += dS^T Q,  dQ += dS K,
// delta = rowsum(dO * O) taken from the diagonal of the GEMM dO O^T, so that a one-hot row
// (huge softmax_scale) has dP - delta exactly 0 at its key. Each key tile meets all R = G * rows
// query rows of the task in one GEMM per product (five shapes per key tile, whatever R is).
void attention_bf16_bwd_task(const Geometry& g, const bf* dout, const bf* q, const bf* k,
                             const bf* v, const bf* out, const float* lse, bf* dq, bf* dk, bf* dv,
                             float* dk_part, float* dv_part, const Task& t,
                             std::vector<float>& buf) {
  TileRelease release;
  const int64_t q0 = g.cq[t.b], sq = g.cq[t.b + 1] - q0;
  const int64_t k0 = g.ck[t.b], sk = g.ck[t.b + 1] - k0;
  const int64_t off = sk - sq, hk = t.head, G = g.G, H = g.H, Hk = g.Hk;
  const int64_t D = g.D, Dv = g.Dv, D2 = even(D), Dv2 = even(Dv);
  const int64_t D16 = pad16(D), Dv16 = pad16(Dv);
  const int64_t rows = t.r1 - t.r0, nvis = visible_keys(g.causal, t.r1, sq, sk);
  // query rows padded to 32 (zero rows, lse -inf): a few GEMM shapes over a pack of images
  const int64_t R = G * rows, Rp = round_up(R, 32);
  const float qmul = g.scale * kLog2e;
  Carver c = carve(buf, pad_bf(Rp * D2) + pad_bf(Rp * Dv2) + pad_bf(2 * Rp * D16) + pad_bf(Rp * Dv16) +
                            pad_bf(D2 * kBk) + pad_bf(Dv2 * kBk) + pad_bf(kBk * D16) +
                            pad_bf(kBk * Rp) + pad_bf(kBk * 2 * Rp) + pad_bf(Rp * kBk) + pad(Rp * D16) + 2 * pad(Rp) +
                            pad(kBk * D16) + pad(kBk * Dv16) + 3 * pad(Rp * kBk));
  bf* Qa = take_bf(c, Rp * D2);                 // A operands: q and dO rows, row e = gi * rows + r
  bf* dOa = take_bf(c, Rp * Dv2);
  bf* Qs = take_bf(c, 2 * Rp * D16);            // B operands [Q; Q], dO
  bf* dOs = take_bf(c, Rp * Dv16);
  bf* Ktp = take_bf(c, D2 * kBk);               // B operands of the key tile: K^T, V^T, K
  bf* Vtp = take_bf(c, Dv2 * kBk);
  bf* Kp = take_bf(c, kBk * D16);
  bf* Pta = take_bf(c, kBk * Rp);               // A operands P^T, [dS^T_hi | dS^T_lo], dS
  bf* dSta = take_bf(c, kBk * 2 * Rp);
  bf* dSa = take_bf(c, Rp * kBk);
  float* dQ = c.take(Rp * D16);
  float* lse_r = c.take(Rp);
  float* delta = c.take(Rp);
  float* dKa = c.take(kBk * D16);
  float* dVa = c.take(kBk * Dv16);
  float* P = c.take(Rp * kBk);
  float* dS = c.take(Rp * kBk);
  float* T = c.take(kBk * Rp);  // P^T or dS^T in fp32

  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t h = hk * G + gi;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = q0 + t.r0 + r, e = gi * rows + r;
      copy_row(Qa + e * D2, q + (i * H + h) * D, D, D2);
      copy_row(dOa + e * Dv2, dout + (i * H + h) * Dv, Dv, Dv2);
      lse_r[e] = lse[h * g.Nq + i];
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kBq) {
      // delta[r] = (dO O^T)[r, r]: O^T packed as the B of a [mr, mr] product
      const int64_t mr = std::min(kBq, rows - r0), e0 = gi * rows + r0, i = q0 + t.r0 + r0;
      pack_cols(out + (i * H + h) * Dv, H * Dv, Dv, mr, Vtp);
      mm(mr, mr, Dv, dOa + e0 * Dv2, Dv2, Vtp, P, kBk, false);
      for (int64_t r = 0; r < mr; ++r) delta[e0 + r] = P[r * kBk + r];
    }
  }
  memset(static_cast<void*>(Qa + R * D2), 0, sizeof(bf) * (Rp - R) * D2);
  memset(static_cast<void*>(dOa + R * Dv2), 0, sizeof(bf) * (Rp - R) * Dv2);
  std::fill(lse_r + R, lse_r + Rp, -INFINITY);  // padding rows: P = 0, dS = 0
  std::fill(delta + R, delta + Rp, 0.f);
  pack_rows(Qa, D2, R, D, Qs, Rp);
  pack_rows(dOa, Dv2, R, Dv, dOs, 0, Rp);
  std::fill(dQ, dQ + Rp * D16, 0.f);

  const vf vln2 = vsplat(kLn2), vlog2e = vsplat(kLog2e), vq = vsplat(qmul), vsc = vsplat(g.scale);
  for (int64_t j0 = 0; j0 < sk; j0 += kBk) {
    const int64_t nk = std::min(kBk, sk - j0), N = pad16(nk);
    if (j0 < nvis) {
      const bf* kr = k + ((k0 + j0) * Hk + hk) * D;
      const bf* vr = v + ((k0 + j0) * Hk + hk) * Dv;
      pack_cols(kr, Hk * D, D, nk, Ktp);
      pack_cols(vr, Hk * Dv, Dv, nk, Vtp);
      pack_rows(kr, Hk * D, nk, D, Kp, 0, N);
      mm(Rp, nk, D, Qa, D2, Ktp, P, kBk, false);
      for (int64_t e = 0; e < Rp; ++e) {
        float* p = P + e * kBk;
        const float lr = lse_r[e];
        if (lr == -INFINITY) {  // the row saw no key: all weights 0 (a NaN lse flows on)
          std::fill(p, p + N, 0.f);
          continue;
        }
        const vf vl = vsplat(lr);
        for (int64_t cc = 0; cc < N; cc += kVec) {
          // s ln2 - lse, rounded as the forward's max was, clamped at 0 (NaN stays NaN)
          const vf x = vround(vround(vload(p + cc) * vq) * vln2) - vl;
          vstore(p + cc, vexp2((x > vsplat(0.f) ? vsplat(0.f) : x) * vlog2e));
        }
      }
      // masked after exp (scale may be 0, and 0 * -inf would be NaN)
      for (int64_t gi = 0; gi < G; ++gi) {
        mask_tile(P + gi * rows * kBk, kBk, rows, N, nk, g.causal, t.r0, j0, off, 0.f);
      }
      mm(Rp, nk, Dv, dOa, Dv2, Vtp, dS, kBk, false);
      for (int64_t e = 0; e < Rp; ++e) {
        const vf vd = vsplat(delta[e]);
        float* ds = dS + e * kBk;
        const float* p = P + e * kBk;
        for (int64_t cc = 0; cc < N; cc += kVec) vstore(ds + cc, vload(p + cc) * (vload(ds + cc) - vd) * vsc);
        for (int64_t cc = nk; cc < N; ++cc) ds[cc] = 0.f;  // also where a NaN delta met P = 0
        for (int64_t cc = 0; cc < N; cc += kVec) cvt16(ds + cc, dSa + e * N + cc);
      }
      // the transposes over the Rp query rows (padding rows are 0): P^T rounded to bf16 once,
      // dS^T as [hi | lo] rows
      transpose(P, kBk, Rp, N, T, Rp);
      for (int64_t cc = 0; cc < nk; ++cc) {
        for (int64_t r = 0; r < Rp; r += kVec) cvt16(T + cc * Rp + r, Pta + cc * Rp + r);
      }
      transpose(dS, kBk, Rp, N, T, Rp);
      for (int64_t cc = 0; cc < nk; ++cc) {
        bf* a = dSta + cc * 2 * Rp;
        for (int64_t r = 0; r < Rp; r += kVec) split16(T + cc * Rp + r, a + r, a + Rp + r);
      }
      mm(nk, Dv, Rp, Pta, Rp, dOs, dVa, Dv16, false);
      mm(nk, D, 2 * Rp, dSta, 2 * Rp, Qs, dKa, D16, false);
      mm(Rp, D, N, dSa, N, Kp, dQ, D16, true);
    } else {
      std::fill(dKa, dKa + nk * D16, 0.f);
      std::fill(dVa, dVa + nk * Dv16, 0.f);
    }
    store_dkdv(t, sk, k0, j0, nk, Hk, hk, D, Dv, dKa, D16, dVa, Dv16, dk, dv, dk_part, dv_part);
  }
  for (int64_t gi = 0; gi < G; ++gi) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = q0 + t.r0 + r;
      store_row(dq + (i * H + hk * G + gi) * D, dQ + (gi * rows + r) * D16, D);
    }
  }
}

#else  // no x86-64 GCC build: attention_bf16_isa() is none, these are never called

void attention_bf16_fwd_task(const Geometry&, const at::BFloat16*, const at::BFloat16*,
                             const at::BFloat16*, at::BFloat16*, float*, const Task&,
                             std::vector<float>&) {
  TORCH_CHECK(false, "this build has no bf16 attention tiles");
}
void attention_bf16_bwd_task(const Geometry&, const at::BFloat16*, const at::BFloat16*,
                             const at::BFloat16*, const at::BFloat16*, const at::BFloat16*,
                             const float*, at::BFloat16*, at::BFloat16*, at::BFloat16*, float*,
                             float*, const Task&, std::vector<float>&) {
  TORCH_CHECK(false, "this build has no bf16 attention tiles");
}
#endif

}  // namespace nit

#if NIT_ATTENTION_BF16
#pragma GCC pop_options
#endif

namespace nit {

// Outside the AVX-512 region: this runs on every CPU.
namespace {

#if NIT_ATTENTION_BF16
// Whether oneDNN's brgemm computes a bf16 product with B in the VNNI layout (it raises where
// it has no kernel for the ISA it sees): a 16 x 16 x 2 product of ones.
bool brgemm_runs_bf16() {
  try {
    bf a[16 * 2], b[2 * 16];
    float c[16 * 16];
    std::fill(a, a + 32, bf(1.f));
    std::fill(b, b + 32, bf(1.f));
    at::native::cpublas::brgemm(16, 16, 2, 2, 16, 16, false, a, b, c, true);
    at::native::cpublas::brgemm_release(true);
    return std::all_of(c, c + 256, [](float x) { return x == 2.f; });
  } catch (const std::exception&) {
    return false;
  }
}
#endif

// The ISA oneDNN runs the bf16 tiles' GEMMs on here (at most the one ONEDNN_MAX_CPU_ISA allows).
Bf16Isa detect_bf16_isa() {
#if NIT_ATTENTION_BF16
  if (at::native::cpublas::could_pack(at::kBFloat16)) return Bf16Isa::amx;
  // AVX512-BF16 for the GEMMs and the conversions of this file, AVX-512BW/VL/DQ for the rest
  const bool cpu = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (cpu && brgemm_runs_bf16()) return Bf16Isa::avx512_bf16;
#endif
  return Bf16Isa::none;
}

const char* isa_name(Bf16Isa isa) {
  return isa == Bf16Isa::amx ? "amx" : isa == Bf16Isa::avx512_bf16 ? "avx512_bf16" : "fp32";
}

}  // namespace

Bf16Isa attention_bf16_isa() {
  static const Bf16Isa isa = detect_bf16_isa();
  return isa;
}

Bf16Choice attention_bf16_choice() {
  const char* env = std::getenv("NIT_CPU_ATTENTION_ISA");
  const std::string want = env ? env : "";
  TORCH_CHECK(want.empty() || want == "amx" || want == "avx512_bf16" || want == "fp32",
              "NIT_CPU_ATTENTION_ISA must be amx, avx512_bf16 or fp32, got '", want, "'");
  const Bf16Isa has = attention_bf16_isa();
  Bf16Choice c;
  if (want.empty()) {
    // AVX512-BF16 only when forced: slower than the fp32 tiles (attention_bf16.h)
    c.isa = has == Bf16Isa::amx ? has : Bf16Isa::none;
  } else if (want != "fp32") {
    TORCH_CHECK(want == isa_name(has), "NIT_CPU_ATTENTION_ISA=", want,
                " needs oneDNN's brgemm to run bf16 on ", want == "amx" ? "AMX-BF16 tiles" : "AVX512-BF16 without AMX",
                " (an x86-64 GCC build; ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 set before the first oneDNN call "
                "keeps it off AMX); here it runs bf16 on: ", isa_name(has));
    c.isa = has;
    c.every_image = true;
  }
  return c;
}

}  // namespace nit
